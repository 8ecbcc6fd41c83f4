#!/usr/bin/env bash
# Honua and BullMQ on the same machine in one run (BENCHMARKS.md, "Against BullMQ on the
# same machine"): `honua-loadtest throughput` (the raw XADD/XREADGROUP/XACK cycle, then
# 3-step noop processes, on a private redis-server it starts) and flows.mjs (BullMQ flows
# of 3-step chains on a private redis-server started here with the same settings), then
# the ratios.
#
# Usage: loadtest/bullmq/run.sh [N] [BULLMQ_WORKERS] [honua-first|bullmq-first]
#   N               processes / chains for both (default 20000)
#   BULLMQ_WORKERS  BullMQ worker processes, each concurrency 50 (default 1)
#   order           which side runs first (default honua-first); alternate it between runs
# Environment: HONUA_LOADTEST (default <repo>/target/release/honua-loadtest; build it with
# `cargo build --release -p honua-loadtest`), OUT (directory for the JSON files, default a
# new temporary directory).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
n="${1:-20000}"
bullmq_workers="${2:-1}"
order="${3:-honua-first}"
lt="${HONUA_LOADTEST:-$repo/target/release/honua-loadtest}"
out="${OUT:-$(mktemp -d -t honua-vs-bullmq-XXXXXX)}"
mkdir -p "$out"

[ -x "$lt" ] || { echo "run.sh: $lt not found (cargo build --release -p honua-loadtest, or set HONUA_LOADTEST)" >&2; exit 1; }
[ -d "$here/node_modules/bullmq" ] || (cd "$here" && npm ci --no-audit --no-fund >&2)

run_honua() {
  echo "== honua: $lt throughput --processes $n  (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  "$lt" throughput --processes "$n" --json "$out/honua.json"
}

redis_pid=""
redis_dir=""
stop_redis() {
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; fi
  if [ -n "$redis_dir" ]; then rm -rf "$redis_dir"; fi
  redis_pid=""
  redis_dir=""
}
trap stop_redis EXIT

run_bullmq() {
  echo "== bullmq: flows.mjs --chains $n --workers $bullmq_workers  (load: $(cut -d' ' -f1-3 /proc/loadavg))"
  # A private redis-server with honua-loadtest's settings: AOF on, appendfsync everysec,
  # no RDB snapshots, noeviction, in a temporary directory.
  local port
  redis_dir="$(mktemp -d -t bullmq-redis-XXXXXX)"
  port="$(node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")"
  redis-server --port "$port" --bind 127.0.0.1 \
    --appendonly yes --appendfsync everysec --save "" --maxmemory-policy noeviction \
    --dir "$redis_dir" --logfile "$redis_dir/redis.log" &
  redis_pid=$!
  until redis-cli -p "$port" ping >/dev/null 2>&1; do
    kill -0 "$redis_pid" 2>/dev/null || { cat "$redis_dir/redis.log" >&2; echo "run.sh: redis-server failed" >&2; return 1; }
    sleep 0.05
  done
  node "$here/flows.mjs" "redis://127.0.0.1:$port" --chains "$n" --workers "$bullmq_workers" --json "$out/bullmq.json"
  stop_redis
}

case "$order" in
  honua-first) run_honua; run_bullmq ;;
  bullmq-first) run_bullmq; run_honua ;;
  *) echo "run.sh: order must be honua-first or bullmq-first" >&2; exit 2 ;;
esac

node - "$out/honua.json" "$out/bullmq.json" <<'EOF'
const fs = require('fs');
const h = JSON.parse(fs.readFileSync(process.argv[2]));
const b = JSON.parse(fs.readFileSync(process.argv[3]));
const f = (x, d = 0) => x.toFixed(d);
const other = (x) => (x === null || x === undefined ? 'n/a' : `${f(x, 2)} cores`);
const hc = h.engine.cpu_us_per_step;
const bc = b.cpu_us_per_step;
console.log('== same run');
console.log(`  raw XADD/XREADGROUP/XACK  ${f(h.baseline.jobs_per_sec)} jobs/s  ${f(h.baseline.redis_cpu_us_per_job, 1)} µs Redis CPU/job`);
console.log(`  honua (1 scheduler, ${h.engine.workers} workers)  ${f(h.engine.steps_per_sec)} steps/s  ${f(h.engine.redis_cpu_us_per_step, 1)} µs Redis CPU/step  client ${f(hc.scheduler + hc.workers + hc.submitters)} µs/step  rest of host ${other(h.engine.host_other_busy)}`);
console.log(`  bullmq ${b.bullmq} flows (${b.workers} worker × ${b.concurrency})  ${f(b.steps_per_sec)} steps/s  ${f(b.redis_cpu_us_per_step, 1)} µs Redis CPU/step  client ${f(bc.submitter + bc.workers)} µs/step  rest of host ${other(b.host_other_busy)}`);
console.log(`  honua ÷ bullmq: steps/s ${f(h.engine.steps_per_sec / b.steps_per_sec, 2)}×, Redis µs/step ${f(h.engine.redis_cpu_us_per_step / b.redis_cpu_us_per_step, 2)}×; honua ÷ raw ${f(h.engine.steps_per_sec / h.baseline.jobs_per_sec, 3)}, bullmq ÷ raw ${f(b.steps_per_sec / h.baseline.jobs_per_sec, 3)}`);
EOF
echo "JSON: $out/honua.json $out/bullmq.json"
