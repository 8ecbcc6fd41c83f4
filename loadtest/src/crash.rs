//! Crash: inject faults while three-step processes arrive at a fixed rate, and count what
//! the engine guarantees. The fault (`--nemesis`) is one of:
//!
//! - `kill`: `kill -9` of a random worker process, replaced at once by a new one;
//! - `stop`: SIGSTOP of a random worker process for `fault_ms` (2 × lease by default: long
//!   enough for its jobs to be reclaimed), then SIGCONT (a VM pause, a GC-like stall);
//! - `redis`: `kill -9` of the (private) redis-server, `fault_ms` down, restart from its AOF.
//!
//! Each run has one nemesis, so its duplicate executions have that cause.
//!
//! Workers run as child processes (`honua-loadtest worker-child`) so they can be killed;
//! each killed worker is replaced at once by a new one with a new id (what a Deployment
//! does). The scheduler runs in this process. Steps are `probe`: they count their
//! executions in a hash of the run and take `step_ms` (50 ms by default), so that each
//! kill finds steps running — with no-op steps a kill mostly finds nothing in flight.
//!
//! - **Lost processes**: submitted (acknowledged) but not Completed once the run has had
//!   lease + sweep + a minute after the last arrival. Must be 0. Each arrival carries an
//!   idempotency key and is retried with it while Redis is down, so a submission whose
//!   answer was lost is not counted twice.
//! - **Step commits**: every committed step result either adds one event to the results
//!   stream (`XINFO STREAM … entries-added` over the run; in this run only `complete.lua`
//!   adds to it — no timers, signals, hand-backs or dead letters) or, when its worker
//!   enqueued the successor itself, raises its process's `steps_rev` by one; their sum
//!   over the run's processes. Commits beyond one per step are duplicate commits. Must be 0.
//! - **Duplicate executions**: probe executions beyond one per step (at-least-once: a
//!   step running when its worker died runs again), and of those, executions beyond one
//!   per *claim* (process, step, delivery count), which must be 0: a claim starts at most
//!   one execution.
//! - **Reclaim latency**: just before each kill the victim's pending jobs are read
//!   (`XPENDING … <consumer>`, then the entries' process and step); for each of them that
//!   was delivered again, the time from the kill to its new claim (`claimed_ms` of the step
//!   record, Redis `TIME`; the kill time is this host's clock, the same clock as a private
//!   server's).

use crate::child::{ChildArgs, PROBE_KIND, claims_key};
use crate::error::BenchError;
use crate::latency::read_records;
use crate::meter::Meter;
use crate::progress::Progress;
use crate::server::Server;
use crate::stats::Dist;
use crate::throughput::{self, Bench, Fleet, Outcome, STEPS_PER_PROCESS, submission};
use honua_scheduler::{Processes, Submitted};
use honua_shared::envelope::{FieldMap, JobEnvelope, Submission};
use honua_shared::keys::WORKERS_GROUP;
use honua_shared::store::Store;
use redis::AsyncCommands;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const RETENTION_SECS: u64 = 900;
/// Room for every step in flight (rate × step time) with a worker down.
const MAX_CONCURRENT_STEPS: usize = 128;

/// The fault a crash run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Nemesis {
    /// `kill -9` of a worker process (replaced at once).
    Kill,
    /// SIGSTOP of a worker process for the fault time, then SIGCONT.
    Stop,
    /// `kill -9` of redis-server, down for the fault time, restart from the AOF.
    Redis,
}

impl Nemesis {
    pub fn as_str(self) -> &'static str {
        match self {
            Nemesis::Kill => "kill",
            Nemesis::Stop => "stop",
            Nemesis::Redis => "redis",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CrashParams {
    pub label: &'static str,
    /// `None`: the default lease and sweep.
    pub lease_ms: Option<u64>,
    pub sweep_ms: Option<u64>,
    pub workers: usize,
    pub kills: usize,
    pub processes_per_sec: f64,
    pub seconds: f64,
    /// How long each step takes.
    pub step_ms: u64,
    pub nemesis: Nemesis,
    /// How long a pause or a Redis outage lasts (`None`: 2 × lease).
    pub fault_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CrashResult {
    pub label: &'static str,
    /// The cause of every fault (and so of every duplicate execution) in this run.
    pub nemesis: Nemesis,
    /// Pause or outage length (0 for kills).
    pub fault_ms: u64,
    pub lease_ms: u64,
    pub sweep_ms: u64,
    pub heartbeat_ms: u64,
    pub workers: usize,
    pub kills: usize,
    pub processes: usize,
    pub steps: usize,
    pub processes_per_sec: f64,
    pub step_ms: u64,
    pub max_concurrent_steps: usize,
    /// From the first arrival until the last process finished (or the deadline).
    pub seconds: f64,
    pub outcome: Outcome,
    pub lost_processes: u64,
    pub step_commits: u64,
    pub duplicate_commits: u64,
    pub executions: u64,
    pub duplicate_executions: u64,
    /// Executions beyond one per claim (process, step, delivery count): must be 0.
    pub duplicate_claim_executions: u64,
    pub steps_never_executed: u64,
    /// Submissions retried after an error that the engine answered with the process the
    /// first attempt had created (its answer was lost with the server): the idempotency
    /// key at work.
    pub resubmitted: u64,
    /// Jobs pending on the workers when they were killed.
    pub jobs_held_by_killed_workers: usize,
    /// Of those, the ones claimed again (the rest were finished by the victim between the
    /// snapshot and the kill).
    pub reclaimed_steps: usize,
    /// Kill → claimed again by another worker.
    pub reclaim: Dist,
    /// The engine's bound: lease + sweep interval.
    pub reclaim_bound_ms: u64,
    pub redis_cpu_us_per_step: f64,
}

impl CrashResult {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.lost_processes > 0 {
            out.push(format!(
                "crash {}: {} processes lost",
                self.label, self.lost_processes
            ));
        }
        if self.duplicate_commits > 0 {
            out.push(format!(
                "crash {}: {} duplicate step commits",
                self.label, self.duplicate_commits
            ));
        }
        if self.duplicate_claim_executions > 0 {
            out.push(format!(
                "crash {}: {} executions beyond one per claim",
                self.label, self.duplicate_claim_executions
            ));
        }
        if self.steps_never_executed > 0 {
            out.push(format!(
                "crash {}: {} steps never executed",
                self.label, self.steps_never_executed
            ));
        }
        out
    }
}

pub async fn run(
    server: &Server,
    prefix: &str,
    params: CrashParams,
) -> Result<CrashResult, BenchError> {
    let processes = ((params.processes_per_sec * params.seconds).round() as usize).max(1);
    let bench = Bench::prepare(server, prefix, PROBE_KIND, |cfg| {
        cfg.retention_secs = RETENTION_SECS;
        cfg.custom_step_kinds = vec![PROBE_KIND.into()];
        cfg.worker.max_concurrent_steps = MAX_CONCURRENT_STEPS;
        if let Some(l) = params.lease_ms {
            cfg.worker.lease_ms = l;
        }
        if let Some(s) = params.sweep_ms {
            cfg.worker.sweep_ms = s;
        }
    })?;
    let w = &bench.cfg.worker;
    eprintln!(
        "crash {}: {processes} processes at {}/s, {} worker processes, {} faults ({}), lease {} ms, sweep {} ms ...",
        params.label,
        params.processes_per_sec,
        params.workers,
        params.kills,
        params.nemesis.as_str(),
        w.lease_ms,
        w.sweep_ms
    );
    let probe_key = format!("{prefix}-probe-executions");
    let shutdown = CancellationToken::new();
    let fleet = match Fleet::start(&bench, 1, 0, &shutdown).await {
        Ok(f) => f,
        Err(e) => {
            shutdown.cancel();
            return Err(e);
        }
    };
    let measured = measure(server, &bench, params, processes, &probe_key).await;
    shutdown.cancel();
    let (_, stopped) = fleet.stop().await;
    let _: Result<usize, _> = bench
        .store
        .conn()
        .del(&[probe_key.clone(), claims_key(&probe_key)])
        .await;
    bench.cleanup(server).await;
    let result = measured?;
    stopped?;
    Ok(result)
}

async fn measure(
    server: &Server,
    bench: &Bench,
    params: CrashParams,
    processes: usize,
    probe_key: &str,
) -> Result<CrashResult, BenchError> {
    let store = &bench.store;
    let w = &bench.cfg.worker;
    let mut children = Children::new(&bench.cfg, probe_key, params.step_ms)?;
    for _ in 0..params.workers.max(1) {
        children.spawn()?;
    }
    let engine = bench.engine().await;
    throughput::warm_up(&engine, throughput::warm_up_processes(params.workers)).await?;
    let before = throughput::outcome(store).await?;
    let commits_before = entries_added(store).await?;
    let mut admin = server.connect(Duration::from_secs(5)).await?;
    let meter = Meter::start(&mut admin).await?;
    let window = Duration::from_secs_f64(params.seconds);
    let arriving = tokio::spawn(arrive(
        engine,
        processes,
        Duration::from_secs_f64(1.0 / params.processes_per_sec),
    ));
    let fault = Duration::from_millis(params.fault_ms.unwrap_or(2 * w.lease_ms));
    let faults = Faults {
        store: store.clone(),
        window,
        count: params.kills,
        nemesis: params.nemesis,
        fault,
    };
    let injecting = faults.inject(children, server);
    let deadline = Instant::now()
        + window
        + w.lease()
        + Duration::from_millis(w.sweep_ms)
        + Duration::from_secs(60);
    let mut progress = Progress::new(
        format!("crash {}", params.label),
        processes as u64,
        "processes",
    );
    let watching = async {
        let mut done = Outcome::default();
        loop {
            // Redis may be down (the redis nemesis): keep the last reading.
            if let Ok(now) = throughput::outcome(store).await {
                done = now.minus(&before);
            }
            progress.update(done.finished(), "");
            if (arriving.is_finished() && done.finished() >= processes as u64)
                || Instant::now() > deadline
            {
                break done;
            }
            tokio::time::sleep(throughput::POLL).await;
        }
    };
    let (injected, done) = tokio::join!(injecting, watching);
    progress.finish();
    let end = Instant::now();
    let (ids, resubmitted) = arriving
        .await
        .map_err(|_| BenchError::Component("submitting panicked".into()))??;
    let (mut children, kills) = injected?;
    if params.nemesis == Nemesis::Redis {
        // The admin connection died with the server; the CPU figure then covers the time
        // since the last restart only.
        admin = server.connect(Duration::from_secs(5)).await?;
    }
    let used = meter.stop(&mut admin, end).await?;
    children.kill_all().await;
    // (process, step) → when the worker that held it was killed (a later kill wins).
    let mut held: HashMap<(String, String), u64> = HashMap::new();
    for k in &kills {
        for job in &k.held {
            held.insert(job.clone(), k.at_ms);
        }
    }
    let steps = processes * STEPS_PER_PROCESS;
    let commits = entries_added(store).await?.saturating_sub(commits_before);
    let counts: HashMap<String, u64> = store.conn().hgetall(probe_key).await?;
    let per_claim: HashMap<String, u64> = store.conn().hgetall(claims_key(probe_key)).await?;
    let duplicate_claim_executions = per_claim.values().map(|n| n.saturating_sub(1)).sum();
    let (mut executions, mut duplicate_executions, mut never) = (0, 0, 0);
    for id in &ids {
        for step in ["A", "B", "C"] {
            let n = counts.get(&format!("{id}:{step}")).copied().unwrap_or(0);
            executions += n;
            duplicate_executions += n.saturating_sub(1);
            never += u64::from(n == 0);
        }
    }
    let mut reclaim = Vec::new();
    let mut commits = commits;
    for rec in read_records(bench, &ids).await? {
        commits += rec.steps_rev;
        for (name, step) in &rec.steps {
            let Some(killed_at) = held.get(&(rec.id.clone(), name.clone())) else {
                continue;
            };
            if let (Some(claimed), true) = (step.claimed_ms, step.deliveries.unwrap_or(1) >= 2) {
                reclaim.push(claimed.saturating_sub(*killed_at) as f64);
            }
        }
    }
    Ok(CrashResult {
        label: params.label,
        nemesis: params.nemesis,
        fault_ms: if params.nemesis == Nemesis::Kill {
            0
        } else {
            fault.as_millis() as u64
        },
        lease_ms: w.lease_ms,
        sweep_ms: w.sweep_ms,
        heartbeat_ms: w.heartbeat().as_millis() as u64,
        workers: params.workers,
        kills: kills.len(),
        jobs_held_by_killed_workers: kills.iter().map(|k| k.held.len()).sum(),
        processes,
        steps,
        processes_per_sec: params.processes_per_sec,
        step_ms: params.step_ms,
        max_concurrent_steps: w.max_concurrent_steps,
        seconds: used.seconds,
        outcome: done,
        lost_processes: (processes as u64).saturating_sub(done.completed),
        step_commits: commits,
        duplicate_commits: commits.saturating_sub(steps as u64),
        executions,
        duplicate_executions,
        duplicate_claim_executions,
        steps_never_executed: never,
        resubmitted,
        reclaimed_steps: reclaim.len(),
        reclaim: Dist::of(reclaim),
        reclaim_bound_ms: w.lease_ms + w.sweep_ms,
        redis_cpu_us_per_step: used.redis_cpu_secs * 1e6 / steps as f64,
    })
}

/// Submits `n` processes at a fixed rate (open loop); returns their ids.
async fn arrive(
    engine: Processes,
    n: usize,
    period: Duration,
) -> Result<(Vec<String>, u64), BenchError> {
    let start = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let engine = engine.clone();
        set.spawn(async move {
            // A submission refused while Redis is down (the redis nemesis) is retried with
            // its idempotency key, as a careful client does: one that landed but whose
            // answer was lost with the server returns the process it created instead of
            // starting a second one. Only an acknowledged one counts.
            let sub = Submission {
                idempotency_key: Some(format!("arrival-{i}")),
                ..submission()
            };
            let give_up = Instant::now() + Duration::from_secs(60);
            loop {
                match engine.create(&sub, None).await {
                    Ok(s) => {
                        let again = matches!(s, Submitted::Duplicate { .. });
                        return Ok::<_, BenchError>((s.id().to_string(), again));
                    }
                    Err(e) if Instant::now() > give_up => return Err(e.into()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
    }
    let (mut ids, mut resubmitted) = (Vec::with_capacity(n), 0);
    while let Some(joined) = set.join_next().await {
        let (id, again) =
            joined.map_err(|_| BenchError::Component("a submission panicked".into()))??;
        ids.push(id);
        resubmitted += u64::from(again);
    }
    Ok((ids, resubmitted))
}

/// One kill: when, and the jobs (process, step) the victim held.
struct Kill {
    at_ms: u64,
    held: Vec<(String, String)>,
}

/// What to inject, how often and for how long.
struct Faults {
    store: Store,
    window: Duration,
    count: usize,
    nemesis: Nemesis,
    fault: Duration,
}

impl Faults {
    /// Injects `count` faults evenly spread over `window`: kills (each worker replaced at
    /// once), pauses of a random worker, or Redis crashes and restarts. Returns the
    /// children and, per fault, the jobs the faulted worker held (none for Redis).
    async fn inject(
        self,
        mut children: Children,
        server: &Server,
    ) -> Result<(Children, Vec<Kill>), BenchError> {
        let start = tokio::time::Instant::now();
        let mut out = Vec::with_capacity(self.count);
        for i in 1..=self.count {
            let at = start + self.window.mul_f64(i as f64 / (self.count + 1) as f64);
            tokio::time::sleep_until(at).await;
            match self.nemesis {
                Nemesis::Kill => {
                    out.push(children.kill_random(&self.store).await?);
                    children.spawn()?;
                }
                Nemesis::Stop => out.push(children.pause_random(&self.store, self.fault).await?),
                Nemesis::Redis => {
                    server.crash_and_restart(self.fault).await?;
                    out.push(Kill {
                        at_ms: now_ms(),
                        held: Vec::new(),
                    });
                }
            }
        }
        Ok((children, out))
    }
}

/// One `XRANGE` entry: id and fields.
type StreamEntry = (String, Vec<(String, String)>);

/// The jobs pending on `consumer`: (process id, step) of each.
async fn held_by(store: &Store, consumer: &str) -> Result<Vec<(String, String)>, BenchError> {
    let jobs = store.keys().jobs();
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&jobs)
        .arg(WORKERS_GROUP)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg(consumer)
        .query_async(&mut store.conn())
        .await?;
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (id, ..) in &pending {
        pipe.cmd("XRANGE").arg(&jobs).arg(id).arg(id);
    }
    let entries: Vec<Vec<StreamEntry>> = pipe.query_async(&mut store.conn()).await?;
    Ok(entries
        .into_iter()
        .flatten()
        .filter_map(|(_, fields)| {
            let job = JobEnvelope::from_fields(&FieldMap::from_pairs(fields)).ok()?;
            Some((job.process_id, job.step))
        })
        .collect())
}

/// Sends a signal with kill(1) (the workspace forbids unsafe code, so no libc call).
fn signal(pid: u32, sig: &str) -> Result<(), BenchError> {
    let ok = std::process::Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .map_err(BenchError::io("cannot run kill"))?
        .success();
    if ok {
        Ok(())
    } else {
        Err(BenchError::Component(format!("kill {sig} {pid} failed")))
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "compares times taken by processes on this one machine"
)]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `XINFO STREAM <results> → entries-added` (one per committed step).
async fn entries_added(store: &Store) -> Result<u64, BenchError> {
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(store.keys().results())
        .query_async(&mut store.conn())
        .await?;
    match info.get("entries-added") {
        Some(redis::Value::Int(n)) => Ok(*n as u64),
        _ => Err(BenchError::Info("entries-added (needs Redis 7)")),
    }
}

/// The child worker processes.
pub(crate) struct Children {
    exe: PathBuf,
    cfg: honua_shared::config::Config,
    probe_key: String,
    probe_ms: u64,
    /// Passed to every child as `--llm-config`.
    pub llm_config: Option<PathBuf>,
    live: Vec<(String, tokio::process::Child)>,
    started: usize,
}

impl Children {
    pub fn new(
        cfg: &honua_shared::config::Config,
        probe_key: &str,
        probe_ms: u64,
    ) -> Result<Self, BenchError> {
        Ok(Self {
            exe: std::env::current_exe().map_err(BenchError::io("cannot find this executable"))?,
            cfg: cfg.clone(),
            probe_key: probe_key.to_string(),
            probe_ms,
            llm_config: None,
            live: Vec::new(),
            started: 0,
        })
    }

    pub fn spawn(&mut self) -> Result<(), BenchError> {
        let id = format!("lt-child-{}", self.started);
        self.started += 1;
        let mut args = ChildArgs::of(&self.cfg, &id, &self.probe_key, self.probe_ms);
        args.llm_config = self.llm_config.clone();
        let args = args.to_args();
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into());
        let child = tokio::process::Command::new(&self.exe)
            .args(args)
            .env("RUST_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(BenchError::io(format!("cannot start worker {id}")))?;
        self.live.push((id, child));
        Ok(())
    }

    /// SIGKILL to a random live worker, after reading the jobs it holds; returns when it
    /// is gone.
    async fn kill_random(&mut self, store: &Store) -> Result<Kill, BenchError> {
        if self.live.is_empty() {
            return Err(BenchError::Component("no worker left to kill".into()));
        }
        let (id, mut child) = self
            .live
            .swap_remove(rand::random_range(0..self.live.len()));
        let held = held_by(store, &id).await?;
        let at_ms = now_ms();
        child
            .start_kill()
            .map_err(BenchError::io("cannot kill a worker"))?;
        child
            .wait()
            .await
            .map_err(BenchError::io("cannot reap a killed worker"))?;
        Ok(Kill { at_ms, held })
    }

    /// SIGSTOP to a random live worker, after reading the jobs it holds; SIGCONT after
    /// `pause`. Returns when it runs again.
    async fn pause_random(&mut self, store: &Store, pause: Duration) -> Result<Kill, BenchError> {
        if self.live.is_empty() {
            return Err(BenchError::Component("no worker left to pause".into()));
        }
        let (id, child) = &self.live[rand::random_range(0..self.live.len())];
        let pid = child
            .id()
            .ok_or_else(|| BenchError::Component("a worker exited".into()))?;
        let held = held_by(store, id).await?;
        let at_ms = now_ms();
        signal(pid, "-STOP")?;
        tokio::time::sleep(pause).await;
        signal(pid, "-CONT")?;
        Ok(Kill { at_ms, held })
    }

    /// Consumer name and process id of every live worker.
    pub fn live(&self) -> Vec<(String, Option<u32>)> {
        self.live
            .iter()
            .map(|(id, c)| (id.clone(), c.id()))
            .collect()
    }

    pub async fn kill_all(&mut self) {
        for (_, mut c) in self.live.drain(..) {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}
