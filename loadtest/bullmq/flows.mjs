// BullMQ's flows on the shape honua-loadtest's `throughput` runs: N 3-step chains
// (A → B → C, all noop), for a same-machine comparison (see BENCHMARKS.md, "Against
// BullMQ on the same machine").
//
// A chain is one FlowProducer flow of nested children, BullMQ's idiomatic sequential
// flow: C's child is B, whose child is A. A child runs before its parent, so A runs
// first and C last; the flow's jobs are added atomically. All three jobs go to one
// queue, served by W worker processes (default 1), each one BullMQ Worker with
// concurrency 50 and default settings (lock 30 s renewed every 15 s, stalled-job check
// every 30 s, maxStalledCount 1, completed jobs kept). The main process only adds
// flows (32 concurrent submitters, like honua-loadtest's) and measures.
//
// The clock runs from the first add until every job of every chain is completed
// (polled every 10 ms with one ZCARD, as honua-loadtest polls its processes). Redis CPU
// is INFO cpu (used_cpu_user + used_cpu_sys) over that stretch, where it went is INFO
// commandstats; Node CPU is process.cpuUsage() of the submitting process and of each
// worker process over the same stretch.
//
// Usage: node flows.mjs REDIS_URL [--chains N] [--workers W] [--concurrency C]
//                       [--submitters S] [--json FILE]
// Expects a server of its own (run.sh starts one): its INFO figures count every client.

import { FlowProducer, Worker } from 'bullmq';
import IORedis from 'ioredis';
import { fork } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const QUEUE = 'steps';
const STEPS_PER_CHAIN = 3;

function connectionOptions(url) {
  const u = new URL(url);
  return {
    host: u.hostname,
    port: Number(u.port || 6379),
    // Required by BullMQ's blocking worker connections.
    maxRetriesPerRequest: null,
  };
}

function parseArgs(argv) {
  const opts = { chains: 10000, workers: 1, concurrency: 50, submitters: 32, json: null };
  const url = argv[0];
  if (!url || url.startsWith('--')) {
    throw new Error('usage: node flows.mjs REDIS_URL [--chains N] [--workers W] [--concurrency C] [--submitters S] [--json FILE]');
  }
  for (let i = 1; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    const value = argv[i + 1];
    if (!(key in opts) || value === undefined) throw new Error(`unknown or incomplete option ${argv[i]}`);
    opts[key] = key === 'json' ? value : Number(value);
    if (key !== 'json' && !(Number.isInteger(opts[key]) && opts[key] > 0)) {
      throw new Error(`--${key} must be a positive integer`);
    }
  }
  return { url, ...opts };
}

function chain(i) {
  // C runs last: its child is B, whose child is A.
  return {
    name: 'C',
    queueName: QUEUE,
    data: { chain: i },
    children: [
      {
        name: 'B',
        queueName: QUEUE,
        data: { chain: i },
        children: [{ name: 'A', queueName: QUEUE, data: { chain: i } }],
      },
    ],
  };
}

// --- worker process --------------------------------------------------------------------

async function workerMain(url, concurrency) {
  const worker = new Worker(QUEUE, async () => {}, {
    connection: connectionOptions(url),
    concurrency,
  });
  worker.on('error', (e) => console.error(`bullmq worker: ${e.message}`));
  await worker.waitUntilReady();
  let start = null;
  process.on('message', async (msg) => {
    if (msg === 'start') {
      start = process.cpuUsage();
    } else if (msg === 'stop') {
      const cpu = process.cpuUsage(start ?? undefined);
      process.send({ cpuUs: cpu.user + cpu.system });
      await worker.close();
      process.exit(0);
    }
  });
  process.send('ready');
}

// --- main process ----------------------------------------------------------------------

function parseInfo(text) {
  const out = {};
  for (const line of text.split(/\r?\n/)) {
    const at = line.indexOf(':');
    if (at > 0 && !line.startsWith('#')) out[line.slice(0, at)] = line.slice(at + 1);
  }
  return out;
}

// Busy CPU seconds of the whole host so far (/proc/stat: all but idle and iowait), or
// null where there is no /proc.
function hostBusySeconds() {
  try {
    const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const busy = fields.slice(0, 8).reduce((a, b) => a + b, 0) - fields[3] - fields[4];
    return busy / 100; // USER_HZ, 100 on Linux
  } catch {
    return null;
  }
}

async function redisCpuSeconds(redis) {
  const info = parseInfo(await redis.info('cpu'));
  return Number(info.used_cpu_user) + Number(info.used_cpu_sys);
}

async function commandStats(redis) {
  const stats = {};
  for (const [key, value] of Object.entries(parseInfo(await redis.info('commandstats')))) {
    if (!key.startsWith('cmdstat_')) continue;
    const field = (name) => Number(value.match(new RegExp(`(?:^|,)${name}=([0-9.]+)`))?.[1]);
    stats[key.slice('cmdstat_'.length)] = { calls: field('calls'), usec: field('usec') };
  }
  return stats;
}

function topCommands(before, after, steps, n) {
  return Object.entries(after)
    .map(([command, { calls, usec }]) => ({
      command,
      calls_per_step: (calls - (before[command]?.calls ?? 0)) / steps,
      usec_per_step: (usec - (before[command]?.usec ?? 0)) / steps,
    }))
    .filter((c) => c.calls_per_step > 0)
    .sort((a, b) => b.usec_per_step - a.usec_per_step)
    .slice(0, n);
}

function startWorkers(url, count, concurrency) {
  const self = fileURLToPath(import.meta.url);
  return Promise.all(
    Array.from({ length: count }, () => new Promise((resolve, reject) => {
      const child = fork(self, ['--worker', url, String(concurrency)]);
      child.once('error', reject);
      child.once('exit', (code) => reject(new Error(`worker process exited early (${code})`)));
      child.once('message', (msg) => (msg === 'ready' ? resolve(child) : reject(new Error('unexpected message'))));
    })),
  );
}

function stopWorker(child) {
  return new Promise((resolve) => {
    child.removeAllListeners('exit');
    child.once('message', (msg) => resolve(msg.cpuUs));
    child.send('stop');
  });
}

async function waitCompleted(redis, jobs, deadlineMs) {
  const completed = `bull:${QUEUE}:completed`;
  const failed = `bull:${QUEUE}:failed`;
  for (;;) {
    const [[, done], [, bad]] = await redis.multi().zcard(completed).zcard(failed).exec();
    if (bad > 0) throw new Error(`${bad} jobs failed`);
    if (done >= jobs) return;
    if (Date.now() > deadlineMs) throw new Error(`timed out with ${done} of ${jobs} jobs completed`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

async function main() {
  const o = parseArgs(process.argv.slice(2));
  const redis = new IORedis(o.url, { maxRetriesPerRequest: null });
  const server = parseInfo(await redis.info('server'));
  const persistence = parseInfo(await redis.info('persistence'));
  const [, appendfsync] = await redis.config('GET', 'appendfsync');
  if ((await redis.dbsize()) !== 0) throw new Error('the server is not empty: give this run a server of its own');

  const workers = await startWorkers(o.url, o.workers, o.concurrency);
  const producer = new FlowProducer({ connection: connectionOptions(o.url) });
  await producer.waitUntilReady();

  // Warm-up: one chain per worker process, not measured.
  for (let w = 0; w < o.workers; w++) await producer.add(chain(-1 - w));
  await waitCompleted(redis, STEPS_PER_CHAIN * o.workers, Date.now() + 30_000);

  const cpu0 = await redisCpuSeconds(redis);
  const cmd0 = await commandStats(redis);
  for (const w of workers) w.send('start');
  const host0 = hostBusySeconds();
  const node0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();

  let next = 0;
  const submitter = async () => {
    while (next < o.chains) await producer.add(chain(next++));
  };
  await Promise.all(Array.from({ length: o.submitters }, submitter));
  const submitSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
  await waitCompleted(redis, STEPS_PER_CHAIN * (o.chains + o.workers), Date.now() + 600_000);

  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const nodeCpu = process.cpuUsage(node0);
  const host1 = hostBusySeconds();
  const cpu1 = await redisCpuSeconds(redis);
  const cmd1 = await commandStats(redis);
  const workerCpuUs = await Promise.all(workers.map(stopWorker));
  await producer.close();
  await redis.quit();

  const steps = STEPS_PER_CHAIN * o.chains;
  const us = (x) => Math.round(x * 100) / 100;
  const result = {
    tool: 'flows.mjs',
    bullmq: (await import('bullmq/package.json', { with: { type: 'json' } })).default.version,
    node: process.version,
    server: {
      version: server.redis_version,
      aof_enabled: persistence.aof_enabled === '1',
      appendfsync,
    },
    chains: o.chains,
    steps,
    workers: o.workers,
    concurrency: o.concurrency,
    submitters: o.submitters,
    seconds,
    submit_seconds: submitSeconds,
    steps_per_sec: steps / seconds,
    chains_per_sec: o.chains / seconds,
    redis_cpu_us_per_step: us(((cpu1 - cpu0) * 1e6) / steps),
    redis_busy: (cpu1 - cpu0) / seconds,
    cpu_us_per_step: {
      submitter: us((nodeCpu.user + nodeCpu.system) / steps),
      workers: us(workerCpuUs.reduce((a, b) => a + b, 0) / steps),
    },
    redis_commands: topCommands(cmd0, cmd1, steps, 8),
  };
  // Cores the rest of the host kept busy: all busy time minus Redis and this run's Node
  // processes (like honua-loadtest's "rest of the host").
  const ours = (cpu1 - cpu0) + (nodeCpu.user + nodeCpu.system + workerCpuUs.reduce((a, b) => a + b, 0)) / 1e6;
  result.host_other_busy = host0 === null ? null : Math.max(0, (host1 - host0 - ours) / seconds);

  console.log(`bullmq ${result.bullmq} flows: ${o.chains} chains of 3 noop jobs (C ← B ← A), ${o.workers} worker process(es) × concurrency ${o.concurrency}, ${o.submitters} submitters; Redis ${result.server.version}, AOF ${result.server.aof_enabled ? 'on' : 'off'}, appendfsync ${appendfsync}`);
  console.log(`  ${result.steps_per_sec.toFixed(0)} steps/s (${result.chains_per_sec.toFixed(0)} chains/s) in ${seconds.toFixed(3)} s, all added after ${submitSeconds.toFixed(3)} s`);
  console.log(`  Redis CPU ${result.redis_cpu_us_per_step} µs/step (Redis busy ${(result.redis_busy * 100).toFixed(0)}%); Node CPU: submitter ${result.cpu_us_per_step.submitter} + workers ${result.cpu_us_per_step.workers} µs/step; rest of the host ${result.host_other_busy === null ? 'n/a' : `${result.host_other_busy.toFixed(2)} cores`}`);
  console.log(`  Redis time per step by command: ${result.redis_commands.map((c) => `${c.command} ${c.usec_per_step.toFixed(1)} µs (${c.calls_per_step.toFixed(2)} calls)`).join(', ')}`);
  if (o.json) writeFileSync(o.json, JSON.stringify(result, null, 1) + '\n');
}

if (process.argv[2] === '--worker') {
  workerMain(process.argv[3], Number(process.argv[4])).catch((e) => {
    console.error(`bullmq worker: ${e.message}`);
    process.exit(1);
  });
} else {
  main().then(
    () => process.exit(0),
    (e) => {
      console.error(`flows.mjs: ${e.message}`);
      process.exit(1);
    },
  );
}
