//! Engine throughput: N processes of a `noop` type run by one scheduler (or S) and W
//! workers against the server under test. The type's [`Shape`] is a straight line of three
//! steps (A → B → C: the common case, where every step has one fixed successor) or a DAG of
//! four (A fans out to B and C, D joins both: the path through joins, so the slow path
//! stays measured next to the fast one).
//!
//! Every scheduler and worker runs on a runtime of its own with its own Redis connections,
//! like separate pods, so their CPU can be told apart. Submissions go through
//! [`Processes::create`] (what the gateway does) from concurrent tasks on the main runtime.
//! One warm-up process per worker runs first, so connections, scripts and consumer groups
//! exist before the clock starts. The clock runs from the first submission until the poller
//! sees the last process finished.

use crate::component::Component;
use crate::cputime::{self, SCHEDULER_THREADS, WORKER_THREADS};
use crate::error::BenchError;
use crate::meter::Meter;
use crate::progress::Progress;
use crate::server::{self, Server};
use honua_scheduler::Processes;
use honua_scheduler::scheduler::SchedulerStats;
use honua_shared::config::Config;
use honua_shared::definition::{DefinitionSet, KindRegistry};
use honua_shared::envelope::{Submission, TraceContext};
use honua_shared::status::ProcessStatus;
use honua_shared::store::{Store, StoreError};
use honua_worker::{HandlerRegistry, Worker, WorkerStats};
use redis::AsyncCommands;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub(crate) const PROCESS_TYPE: &str = "Bench3";
/// Steps of the line shape, the one every scenario but `throughput --shape dag` runs.
pub const STEPS_PER_PROCESS: usize = 3;

/// The benchmark process type's graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    /// A → B → C.
    #[default]
    Line,
    /// A → {B, C} → D, D a join of both.
    Dag,
}

impl Shape {
    pub fn steps(self) -> usize {
        match self {
            Shape::Line => STEPS_PER_PROCESS,
            Shape::Dag => 4,
        }
    }

    /// The benchmark's process type with steps of `kind`.
    pub(crate) fn definition(self, kind: &str) -> String {
        match self {
            Shape::Line => definition(kind),
            Shape::Dag => dag_definition(kind),
        }
    }

    /// The same with `noop` steps that each output `output_bytes` bytes of text (a
    /// process's state grows by that much per step: what larger states cost per step).
    pub(crate) fn noop_definition(self, output_bytes: usize) -> String {
        let def = self.definition("noop");
        if output_bytes == 0 {
            return def;
        }
        let pad = "x".repeat(output_bytes);
        def.replace(
            "kind = \"noop\"\n",
            &format!("kind = \"noop\"\nconfig = {{ output = {{ pad = \"{pad}\" }} }}\n"),
        )
    }
}

/// The DAG shape: A fans out to B and C, which run in parallel; D joins both.
fn dag_definition(kind: &str) -> String {
    format!(
        r#"name = "{PROCESS_TYPE}"
version = 1
description = "Load test: {kind} steps, a fan-out to two and a join of both"

[[steps]]
name = "A"
kind = "{kind}"
next = ["B", "C"]

[[steps]]
name = "B"
kind = "{kind}"
next = "D"

[[steps]]
name = "C"
kind = "{kind}"
next = "D"

[[steps]]
name = "D"
kind = "{kind}"
join = "all"
"#
    )
}

/// The benchmark's process type: three steps of `kind` in sequence (A → B → C).
pub(crate) fn definition(kind: &str) -> String {
    format!(
        r#"name = "{PROCESS_TYPE}"
version = 1
description = "Load test: three {kind} steps in sequence"

[[steps]]
name = "A"
kind = "{kind}"
next = "B"

[[steps]]
name = "B"
kind = "{kind}"
next = "C"

[[steps]]
name = "C"
kind = "{kind}"
"#
    )
}

/// Completion poll period. Finer than the 50 ms one might expect: a 1000-process run lasts
/// about a second, and the poll's granularity is an error on the measured time. Four
/// `ZCARD`s per poll cost Redis next to nothing.
pub(crate) const POLL: Duration = Duration::from_millis(10);
/// How long the warm-up processes may take.
const WARM_UP: Duration = Duration::from_secs(30);
/// How long each component may take to stop after shutdown.
pub(crate) const STOP_WAIT: Duration = Duration::from_secs(60);
/// Finished records expire after this (the engine's minimum); the cost is the same as the
/// 24 h default, and an external server is not left holding them for a day.
pub(crate) const RETENTION_SECS: u64 = 60;

#[derive(Debug, Clone, Copy)]
pub struct EngineParams {
    pub processes: usize,
    pub schedulers: usize,
    pub workers: usize,
    pub max_concurrent_steps: usize,
    pub submitters: usize,
    pub timeout: Duration,
    pub shape: Shape,
    /// Bytes of output each step writes (0: none).
    pub output_bytes: usize,
}

/// Per-component figures (scheduler, workers, submitters).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PerComponent {
    pub scheduler: f64,
    pub workers: f64,
    pub submitters: f64,
}

impl PerComponent {
    pub(crate) fn scaled(cpu: cputime::CpuUse, by: f64) -> Self {
        Self {
            scheduler: cpu.scheduler_secs * by,
            workers: cpu.workers_secs * by,
            submitters: cpu.client_secs * by,
        }
    }
}

/// Processes by final status, counted from the status indexes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Outcome {
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub timed_out: u64,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} completed, {} failed, {} cancelled, {} timed out",
            self.completed, self.failed, self.cancelled, self.timed_out
        )
    }
}

impl Outcome {
    pub fn finished(&self) -> u64 {
        self.completed + self.failed + self.cancelled + self.timed_out
    }

    pub fn minus(&self, earlier: &Outcome) -> Outcome {
        Outcome {
            completed: self.completed.saturating_sub(earlier.completed),
            failed: self.failed.saturating_sub(earlier.failed),
            cancelled: self.cancelled.saturating_sub(earlier.cancelled),
            timed_out: self.timed_out.saturating_sub(earlier.timed_out),
        }
    }
}

/// What the engine counted while running (warm-up included) and what it set aside.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Health {
    /// Steps the run should have executed, warm-up included.
    pub steps_expected: u64,
    pub steps_started: u64,
    pub steps_committed: u64,
    /// Of `steps_committed`, those whose worker enqueued the successors itself (no
    /// scheduler round).
    pub steps_committed_by_workers: u64,
    pub stale_claims: u64,
    pub reclaimed: u64,
    pub dead_lettered: u64,
    pub deleted_pending: u64,
    pub released: u64,
    pub revision_conflicts: u64,
    pub quarantined: u64,
    pub groups_recreated: u64,
    pub dlq_entries: u64,
    pub quarantine_entries: u64,
}

impl Health {
    /// Everything that should not happen in a clean run on a healthy server.
    pub fn anomalies(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.steps_started != self.steps_expected {
            out.push(format!(
                "{} steps started, {} expected",
                self.steps_started, self.steps_expected
            ));
        }
        if self.steps_committed != self.steps_expected {
            out.push(format!(
                "{} steps committed, {} expected",
                self.steps_committed, self.steps_expected
            ));
        }
        for (n, what) in [
            (self.stale_claims, "stale claims"),
            (self.reclaimed, "reclaimed jobs"),
            (self.dead_lettered, "dead-lettered jobs"),
            (self.deleted_pending, "pending jobs with deleted entries"),
            (self.released, "jobs handed back"),
            (self.quarantined, "quarantined entries"),
            (self.groups_recreated, "consumer groups recreated"),
            (self.dlq_entries, "entries in the dead-letter stream"),
            (self.quarantine_entries, "entries in the quarantine stream"),
        ] {
            if n > 0 {
                out.push(format!("{n} {what}"));
            }
        }
        out
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineResult {
    pub process_type: &'static str,
    pub shape: Shape,
    /// Bytes of output each step wrote.
    pub output_bytes: usize,
    pub processes: usize,
    pub steps: usize,
    pub schedulers: usize,
    pub workers: usize,
    pub max_concurrent_steps: usize,
    pub submitters: usize,
    /// Whether submissions waited for `WAITAOF` (Redis/Valkey ≥ 7.2 with AOF on).
    pub waitaof: bool,
    pub seconds: f64,
    /// From the first submission until the last one was acknowledged.
    pub submit_seconds: f64,
    pub steps_per_sec: f64,
    pub processes_per_sec: f64,
    pub redis_cpu_us_per_step: f64,
    /// Redis CPU over the run's wall time (1.0 = one core busy the whole time).
    pub redis_busy: f64,
    /// This process's CPU per step by component; `None` without /proc.
    pub cpu_us_per_step: Option<PerComponent>,
    /// Component CPU over wall time (cores busy).
    pub busy: Option<PerComponent>,
    /// Cores the rest of the host kept busy meanwhile (other processes, the kernel's
    /// network work): other load here makes the figures unreliable.
    pub host_other_busy: Option<f64>,
    /// Where Redis spent its command time, per step, costliest first.
    pub redis_commands: Vec<server::CommandCost>,
    pub outcome: Outcome,
    pub health: Health,
}

/// Runs the scenario against `server`, keys under `prefix`.
pub async fn run(
    server: &Server,
    prefix: &str,
    params: EngineParams,
) -> Result<EngineResult, BenchError> {
    let definition = params.shape.noop_definition(params.output_bytes);
    let bench = Bench::prepare_with(server, prefix, &definition, |cfg| {
        cfg.worker.max_concurrent_steps = params.max_concurrent_steps;
    })?;
    let shutdown = CancellationToken::new();
    let fleet = Fleet::start(&bench, params.schedulers, params.workers, &shutdown).await;
    let fleet = match fleet {
        Ok(f) => f,
        Err(e) => {
            shutdown.cancel();
            return Err(e);
        }
    };
    let measured = measure(server, &bench, params).await;
    shutdown.cancel();
    let (stats, stopped) = fleet.stop().await;
    let total = params.processes + warm_up_processes(params.workers);
    let health = health(&bench.store, stats, total * params.shape.steps()).await;
    bench.cleanup(server).await;
    let mut result = measured?;
    stopped?;
    result.health = health?;
    Ok(result)
}

/// The definition, config and store of one engine run.
pub(crate) struct Bench {
    pub cfg: Config,
    pub defs: Arc<DefinitionSet>,
    pub kinds: Arc<KindRegistry>,
    pub handlers: HandlerRegistry,
    pub store: Store,
    /// Holds the definition file (deleted on drop); `cfg.definitions_dir` points here.
    _defs_dir: tempfile::TempDir,
}

impl Bench {
    /// Writes the three-step definition with steps of `kind` (a built-in one, or a custom
    /// one the workers register) and builds the run's config, then lets `tune` adjust it.
    pub fn prepare(
        server: &Server,
        prefix: &str,
        kind: &str,
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self, BenchError> {
        Self::prepare_with(server, prefix, &definition(kind), tune)
    }

    /// As [`Bench::prepare`], with the definition `toml` (one process type).
    pub fn prepare_with(
        server: &Server,
        prefix: &str,
        toml: &str,
        tune: impl FnOnce(&mut Config),
    ) -> Result<Self, BenchError> {
        let defs_dir = tempfile::Builder::new()
            .prefix("honua-loadtest-defs-")
            .tempdir()
            .map_err(BenchError::io("cannot create a temporary directory"))?;
        let path = defs_dir.path().join("bench3.toml");
        std::fs::write(&path, toml)
            .map_err(BenchError::io(format!("cannot write {}", path.display())))?;
        let mut cfg = bench_config(&server.url, prefix, defs_dir.path());
        tune(&mut cfg);
        cfg.validate()?;
        let handlers = honua_worker::builtin_handlers(&cfg);
        let (defs, kinds) = honua_scheduler::load_definitions(&cfg)
            .map_err(BenchError::setup("cannot load the benchmark definition"))?;
        let store = Store::from_config(&cfg)?;
        Ok(Self {
            cfg,
            defs,
            kinds,
            handlers,
            store,
            _defs_dir: defs_dir,
        })
    }

    /// A submitting engine (what the gateway uses) on the caller's runtime.
    pub async fn engine(&self) -> Processes {
        Processes::new(
            Arc::new(self.cfg.clone()),
            self.store.clone(),
            self.defs.clone(),
            self.kinds.clone(),
        )
        .await
    }

    /// On an external server, deletes the run's streams and indexes.
    pub async fn cleanup(&self, server: &Server) {
        if !server.is_private()
            && let Err(e) = cleanup(&self.store).await
        {
            tracing::warn!(error = %e, "could not delete the run's keys");
        }
    }
}

/// Threads of each scheduler's and worker's runtime (`runtime_threads`): the engine's
/// components share the host's cores with Redis and the submitters, as pods of one CPU
/// each would; a runtime per component with a thread per core spends its CPU waking its
/// threads up.
pub(crate) const ENGINE_RUNTIME_THREADS: usize = 1;

fn bench_config(url: &str, prefix: &str, definitions: &Path) -> Config {
    Config {
        redis_url: url.to_string(),
        key_prefix: prefix.to_string(),
        definitions_dir: definitions.to_path_buf(),
        retention_secs: RETENTION_SECS,
        runtime_threads: ENGINE_RUNTIME_THREADS,
        ..Config::default()
    }
}

/// The schedulers and the workers, each on its own runtime.
pub(crate) struct Fleet {
    components: Vec<Component>,
    stats: FleetStats,
}

#[derive(Default)]
pub(crate) struct FleetStats {
    schedulers: Vec<Arc<SchedulerStats>>,
    workers: Vec<Arc<WorkerStats>>,
}

type Ready<T> = oneshot::Receiver<Result<Arc<T>, StoreError>>;

impl Fleet {
    /// `schedulers` schedulers and `workers` in-process workers (either may be 0).
    pub async fn start(
        bench: &Bench,
        schedulers: usize,
        workers: usize,
        shutdown: &CancellationToken,
    ) -> Result<Self, BenchError> {
        let mut fleet = Fleet {
            components: Vec::new(),
            stats: FleetStats::default(),
        };
        let cfg = &bench.cfg;
        for i in 0..schedulers {
            let name = format!("{SCHEDULER_THREADS}-{i}");
            let (scheduler, ready) =
                spawn_scheduler(&name, cfg, &bench.defs, &bench.kinds, shutdown)?;
            fleet.components.push(scheduler);
            fleet
                .stats
                .schedulers
                .push(ready_stats(&name, ready).await?);
        }
        for i in 0..workers {
            let name = format!("{WORKER_THREADS}-{i}");
            let (worker, ready) =
                spawn_worker(&name, cfg, &bench.defs, bench.handlers.clone(), shutdown)?;
            fleet.components.push(worker);
            fleet.stats.workers.push(ready_stats(&name, ready).await?);
        }
        Ok(fleet)
    }

    /// Waits for every component to stop (the shutdown token must have fired).
    pub async fn stop(self) -> (FleetStats, Result<(), BenchError>) {
        let mut result = Ok(());
        for c in self.components {
            let r = c.join(STOP_WAIT).await;
            result = result.and(r);
        }
        (self.stats, result)
    }
}

async fn ready_stats<T>(name: &str, ready: Ready<T>) -> Result<Arc<T>, BenchError> {
    ready
        .await
        .map_err(|_| BenchError::Component(format!("{name} exited before it started")))?
        .map_err(BenchError::from)
}

fn spawn_scheduler(
    name: &str,
    cfg: &Config,
    defs: &Arc<DefinitionSet>,
    kinds: &Arc<KindRegistry>,
    shutdown: &CancellationToken,
) -> Result<(Component, Ready<SchedulerStats>), BenchError> {
    let (tx, rx) = oneshot::channel();
    let mut cfg = cfg.clone();
    cfg.scheduler.id = Some(name.to_string());
    let (cfg, defs, kinds) = (Arc::new(cfg), defs.clone(), kinds.clone());
    let shutdown = shutdown.clone();
    let component = Component::spawn(name, cfg.runtime_threads, move || async move {
        let store = match Store::from_config(&cfg) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let engine = Processes::new(cfg, store, defs, kinds).await;
        let scheduler = honua_scheduler::Scheduler::new(engine);
        let _ = tx.send(Ok(scheduler.stats()));
        scheduler.run(shutdown).await;
    })?;
    Ok((component, rx))
}

fn spawn_worker(
    name: &str,
    cfg: &Config,
    defs: &Arc<DefinitionSet>,
    handlers: HandlerRegistry,
    shutdown: &CancellationToken,
) -> Result<(Component, Ready<WorkerStats>), BenchError> {
    let (tx, rx) = oneshot::channel();
    let mut cfg = cfg.clone();
    cfg.worker.id = Some(name.to_string());
    let (defs, shutdown) = (defs.clone(), shutdown.clone());
    let component = Component::spawn(name, cfg.runtime_threads, move || async move {
        let store = match Store::from_config(&cfg) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let worker = Worker::new(cfg, store, defs, Arc::new(handlers));
        let _ = tx.send(Ok(worker.stats()));
        worker.run(shutdown).await;
    })?;
    Ok((component, rx))
}

async fn measure(
    server: &Server,
    bench: &Bench,
    params: EngineParams,
) -> Result<EngineResult, BenchError> {
    let store = &bench.store;
    let engine = bench.engine().await;
    let mut admin = server.connect(Duration::from_secs(5)).await?;
    warm_up(&engine, warm_up_processes(params.workers)).await?;
    let before = outcome(store).await?;
    let meter = Meter::start(&mut admin).await?;
    let (done, submitted_at) = submit_and_wait(
        engine.clone(),
        before,
        params.processes,
        params.submitters,
        params.timeout,
        format!("throughput, {} workers", params.workers),
    )
    .await?;
    let start = meter.started();
    let used = meter.stop(&mut admin, Instant::now()).await?;
    let seconds = used.seconds;
    let steps = params.processes * params.shape.steps();
    let per_step = 1e6 / steps.max(1) as f64;
    Ok(EngineResult {
        process_type: PROCESS_TYPE,
        shape: params.shape,
        output_bytes: params.output_bytes,
        processes: params.processes,
        steps,
        schedulers: params.schedulers,
        workers: params.workers,
        max_concurrent_steps: params.max_concurrent_steps,
        submitters: params.submitters,
        waitaof: engine.waitaof,
        seconds,
        submit_seconds: submitted_at.duration_since(start).as_secs_f64(),
        steps_per_sec: steps as f64 / seconds,
        processes_per_sec: params.processes as f64 / seconds,
        redis_cpu_us_per_step: used.redis_cpu_secs * per_step,
        redis_busy: used.redis_cpu_secs / seconds,
        cpu_us_per_step: used.cpu.map(|c| PerComponent::scaled(c, per_step)),
        busy: used.cpu.map(|c| PerComponent::scaled(c, 1.0 / seconds)),
        host_other_busy: used.host_other_busy,
        redis_commands: used.top_commands(steps, 12),
        outcome: done,
        health: Health::default(),
    })
}

pub(crate) fn submission() -> Submission {
    Submission {
        process_type: PROCESS_TYPE.into(),
        version: None,
        input: serde_json::json!({}),
        id: None,
        idempotency_key: None,
        tenant: None,
        trace: TraceContext::default(),
    }
}

/// Runs one process per worker to completion, so connections, scripts and groups are
/// ready before the clock starts. (Which workers ran them is not checked: on Redis < 7.2 a
/// consumer that was never served an entry does not show in `XINFO CONSUMERS`.)
pub(crate) async fn warm_up(engine: &Processes, processes: usize) -> Result<(), BenchError> {
    let store = &engine.store;
    let target = outcome(store).await?.finished() + processes as u64;
    for _ in 0..processes {
        engine.create(&submission(), None).await?;
    }
    let deadline = Instant::now() + WARM_UP;
    loop {
        let finished = outcome(store).await?.finished();
        if finished >= target {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Stuck(format!(
                "warm-up: after {WARM_UP:?} {} of {processes} warm-up processes had finished",
                processes as u64 - (target - finished)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `job(i)` for every `i` in `0..total` from `tasks` concurrent tasks; returns what
/// the jobs returned (in no particular order).
pub(crate) async fn spread<T, F, Fut>(
    total: usize,
    tasks: usize,
    job: F,
) -> Result<Vec<T>, BenchError>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<T, BenchError>> + Send,
    T: Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..tasks.max(1) {
        let (job, next) = (job.clone(), next.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<_, BenchError>(out);
                }
                out.push(job(i).await?);
            }
        });
    }
    let mut out = Vec::with_capacity(total);
    while let Some(joined) = set.join_next().await {
        out.extend(joined.map_err(|_| BenchError::Component("a benchmark task panicked".into()))??);
    }
    Ok(out)
}

/// Submits `processes` processes from `submitters` tasks and waits (showing progress as
/// `label`) until that many more than `before` have finished; returns those and when the
/// last submission was acknowledged.
pub(crate) async fn submit_and_wait(
    engine: Processes,
    before: Outcome,
    processes: usize,
    submitters: usize,
    timeout: Duration,
    label: String,
) -> Result<(Outcome, Instant), BenchError> {
    let store = engine.store.clone();
    let submitting = tokio::spawn(submit_all(engine, processes, submitters));
    let mut progress = Progress::new(label, processes as u64, "processes");
    wait_finished(
        &store,
        before,
        processes as u64,
        submitting,
        timeout,
        &mut progress,
    )
    .await
}

/// Creates `total` processes from `tasks` concurrent tasks; returns when the last was
/// acknowledged.
async fn submit_all(engine: Processes, total: usize, tasks: usize) -> Result<Instant, BenchError> {
    let sub = Arc::new(submission());
    spread(total, tasks, move |_| {
        let (engine, sub) = (engine.clone(), sub.clone());
        async move {
            engine.create(&sub, None).await?;
            Ok(())
        }
    })
    .await?;
    Ok(Instant::now())
}

/// Polls until `processes` more than `before` have finished (returns those and what the
/// submitting task returned); fails early when submitting failed and with a progress
/// report at `timeout`.
pub(crate) async fn wait_finished<T>(
    store: &Store,
    before: Outcome,
    processes: u64,
    mut submitting: tokio::task::JoinHandle<Result<T, BenchError>>,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<(Outcome, T), BenchError> {
    let deadline = Instant::now() + timeout;
    let mut submitted = None;
    loop {
        if submitted.is_none() && submitting.is_finished() {
            let joined = (&mut submitting).await;
            submitted =
                Some(joined.map_err(|_| BenchError::Component("submitting panicked".into()))??);
        }
        let done = outcome(store).await?.minus(&before);
        progress.update(done.finished(), "");
        if done.finished() >= processes
            && let Some(t) = submitted.take()
        {
            progress.finish();
            return Ok((done, t));
        }
        if Instant::now() > deadline {
            submitting.abort();
            progress.finish();
            return Err(BenchError::Stuck(
                stuck_report(store, done, processes, timeout).await,
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn stuck_report(store: &Store, done: Outcome, processes: u64, timeout: Duration) -> String {
    let mut conn = store.conn();
    let active: Option<u64> = conn.zcard(store.keys().index_active()).await.ok();
    let depth = store.job_depth().await.ok();
    let dlq: Option<u64> = conn.xlen(store.keys().dlq()).await.ok();
    format!(
        "after {timeout:?} only {} of {processes} processes had finished ({done}); processes still active: {}; job stream entries/pending: {}; dead-letter entries: {}",
        done.finished(),
        show(active),
        depth.map_or("?".into(), |(len, pending)| format!("{len}/{pending}")),
        show(dlq),
    )
}

fn show(n: Option<u64>) -> String {
    n.map_or("?".into(), |n| n.to_string())
}

/// Finished processes by status, summed over every partition.
pub(crate) async fn outcome(store: &Store) -> Result<Outcome, BenchError> {
    let mut sum = Outcome::default();
    for part in store.all() {
        let keys = part.keys();
        let (completed, failed, cancelled, timed_out): (u64, u64, u64, u64) = redis::pipe()
            .zcard(keys.index_status(ProcessStatus::Completed))
            .zcard(keys.index_status(ProcessStatus::Failed))
            .zcard(keys.index_status(ProcessStatus::Cancelled))
            .zcard(keys.index_status(ProcessStatus::TimedOut))
            .query_async(&mut part.conn())
            .await?;
        sum.completed += completed;
        sum.failed += failed;
        sum.cancelled += cancelled;
        sum.timed_out += timed_out;
    }
    Ok(sum)
}

pub(crate) fn warm_up_processes(workers: usize) -> usize {
    workers.max(1)
}

/// What the fleet counted over a run of `steps` steps (warm-up included).
pub(crate) async fn health(
    store: &Store,
    stats: FleetStats,
    steps: usize,
) -> Result<Health, BenchError> {
    let sum = |f: fn(&WorkerStats) -> u64| stats.workers.iter().map(|w| f(w)).sum::<u64>();
    let mut conn = store.conn();
    let sched = |f: fn(&SchedulerStats) -> u64| stats.schedulers.iter().map(|s| f(s)).sum::<u64>();
    Ok(Health {
        steps_expected: steps as u64,
        steps_started: sum(|w| w.started.load(Ordering::Relaxed)),
        steps_committed: sum(|w| w.committed.load(Ordering::Relaxed)),
        steps_committed_by_workers: sum(|w| w.fast_commits.load(Ordering::Relaxed)),
        stale_claims: sum(|w| w.stale.load(Ordering::Relaxed)),
        reclaimed: sum(|w| w.reclaimed.load(Ordering::Relaxed)),
        dead_lettered: sum(|w| w.dead_lettered.load(Ordering::Relaxed)),
        deleted_pending: sum(|w| w.deleted_pending.load(Ordering::Relaxed)),
        released: sum(|w| w.released.load(Ordering::Relaxed)),
        revision_conflicts: sched(|s| s.conflicts.load(Ordering::Relaxed)),
        quarantined: sched(|s| s.quarantined.load(Ordering::Relaxed)),
        groups_recreated: sched(|s| s.groups_recreated.load(Ordering::Relaxed))
            + sum(|w| w.groups_recreated.load(Ordering::Relaxed)),
        dlq_entries: conn.xlen(store.keys().dlq()).await?,
        quarantine_entries: conn.xlen(store.keys().quarantine()).await?,
    })
}

/// On an external server: deletes the run's streams and indexes (process records expire
/// after [`RETENTION_SECS`]).
async fn cleanup(store: &Store) -> Result<(), BenchError> {
    let keys = store.keys().shared();
    let _: usize = store.conn().del(&keys).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dag_shape_fans_out_and_joins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bench.toml"), Shape::Dag.definition("noop")).unwrap();
        let cfg = bench_config("redis://127.0.0.1:1", "lt-test", dir.path());
        let (defs, _) = honua_scheduler::load_definitions(&cfg).unwrap();
        let def = defs.latest(PROCESS_TYPE).unwrap();
        assert_eq!(def.steps.len(), Shape::Dag.steps());
        assert_eq!(def.targets("A", "ok"), ["B", "C"]);
        assert_eq!(def.targets("B", "ok"), ["D"]);
        assert_eq!(def.targets("C", "ok"), ["D"]);
        assert_eq!(
            def.step("D").unwrap().join,
            honua_shared::definition::Join::All
        );
    }

    #[test]
    fn steps_output_the_bytes_asked_for() {
        for shape in [Shape::Line, Shape::Dag] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("bench.toml"), shape.noop_definition(1000)).unwrap();
            let cfg = bench_config("redis://127.0.0.1:1", "lt-test", dir.path());
            let (defs, _) = honua_scheduler::load_definitions(&cfg).unwrap();
            let def = defs.latest(PROCESS_TYPE).unwrap();
            assert_eq!(def.steps.len(), shape.steps());
            for step in &def.steps {
                let pad = step.config["output"]["pad"].as_str().unwrap();
                assert_eq!(pad.len(), 1000, "{}", step.name);
            }
        }
        assert_eq!(
            Shape::Line.noop_definition(0),
            Shape::Line.definition("noop")
        );
    }

    #[test]
    fn the_definition_loads_with_the_builtin_kinds_and_a_custom_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bench3.toml"), definition("noop")).unwrap();
        let cfg = bench_config("redis://127.0.0.1:1", "lt-test", dir.path());
        cfg.validate().unwrap();
        let (defs, _) = honua_scheduler::load_definitions(&cfg).unwrap();
        let def = defs.latest(PROCESS_TYPE).unwrap();
        assert_eq!(def.steps.len(), STEPS_PER_PROCESS);

        std::fs::write(dir.path().join("bench3.toml"), definition("probe")).unwrap();
        assert!(honua_scheduler::load_definitions(&cfg).is_err());
        let mut cfg = cfg;
        cfg.custom_step_kinds = vec![crate::child::PROBE_KIND.into()];
        assert!(honua_scheduler::load_definitions(&cfg).is_ok());
    }

    #[test]
    fn a_clean_run_has_no_anomalies_and_a_failed_step_is_one() {
        let clean = Health {
            steps_expected: 6,
            steps_started: 6,
            steps_committed: 6,
            ..Health::default()
        };
        assert!(clean.anomalies().is_empty());
        let lost = Health {
            steps_committed: 5,
            dead_lettered: 1,
            ..clean
        };
        assert_eq!(lost.anomalies().len(), 2);
    }
}
