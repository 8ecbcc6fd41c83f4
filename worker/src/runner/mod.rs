//! The worker loop: claim (XREADGROUP), begin, run the handler, heartbeat, checkpoint,
//! commit — every Redis transition through the fenced scripts of `honua_shared::store`.
//!
//! Tasks: a reader (blocking XREADGROUP on its own connection), a sweeper (reclaim.lua:
//! XAUTOCLAIM of jobs idle longer than the lease, dead-lettering at `max_deliveries`), a
//! heartbeat (one heartbeat.lua call for every held job; a `stale` answer cancels that
//! job's handler at once), a completer (one complete.lua call for every step result that
//! arrived while the previous call was in flight; each step is still fenced on its own),
//! and one task per running step.
//!
//! Claims: a claim is (entry id, delivery count). `begin.lua` starts a claim only while the
//! PEL still holds exactly that claim for this worker, and the in-flight map is keyed by the
//! claim, so one claim runs at most one execution. The sweeper reclaims whether or not a
//! slot is free: reclaimed jobs begin at once (heartbeats keep them) and wait for a slot
//! ahead of new reads. After a Redis restart or failover the sweeper holds off for one
//! lease plus one heartbeat on the server's clock, so live workers re-assert their claims
//! first (pending entries keep their pre-outage delivery times).
//!
//! Here: the [`Worker`], its shared state and shutdown. `claim`: the reader, sweeper,
//! heartbeat and `begin`. `execute`: one step from its handler to its result's fate.
//! `complete`: the completer.

mod claim;
mod complete;
mod execute;

use crate::handler::HandlerRegistry;
use complete::Completing;
use honua_shared::codec::StateCodec;
use honua_shared::config::Config;
use honua_shared::definition::DefinitionSet;
use honua_shared::metrics as m;
use honua_shared::store::{Held, Service, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Why a running step stops before, or instead of, committing its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Stop {
    /// Nothing stopped it.
    Running = 0,
    /// The claim was lost (reclaimed elsewhere): the result is discarded.
    Stale = 1,
    /// The process is over: the result is discarded.
    Finished = 2,
    /// The worker is shutting down: the step is handed back.
    Shutdown = 3,
    /// The handler returned and the runner is committing: heartbeats leave it alone (a
    /// heartbeat racing the commit would otherwise report a false stale claim).
    Finishing = 4,
}

/// One step's [`Stop`], shared by its task, the heartbeat and shutdown.
#[derive(Debug, Default)]
struct StopCell(AtomicU8);

impl StopCell {
    fn get(&self) -> Stop {
        match self.0.load(Ordering::SeqCst) {
            1 => Stop::Stale,
            2 => Stop::Finished,
            3 => Stop::Shutdown,
            4 => Stop::Finishing,
            _ => Stop::Running,
        }
    }

    /// Stops a running step for `why`; false when it was already stopped or finishing.
    fn stop(&self, why: Stop) -> bool {
        self.0
            .compare_exchange(
                Stop::Running as u8,
                why as u8,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Sets `why` whatever the step's state.
    fn force(&self, why: Stop) {
        self.0.store(why as u8, Ordering::SeqCst);
    }

    /// Marks a running step as finishing; returns why it was stopped instead, or
    /// [`Stop::Running`] when it may commit.
    fn finish(&self) -> Stop {
        if self.stop(Stop::Finishing) {
            Stop::Running
        } else {
            self.get()
        }
    }
}

/// Counters a worker keeps (exported as metrics, read by tests).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub started: AtomicU64,
    pub committed: AtomicU64,
    /// Of `committed`, those committed with their successors (no event for the scheduler).
    pub fast_commits: AtomicU64,
    /// Commits or heartbeats refused because the claim was lost (zombie fence).
    pub stale: AtomicU64,
    pub reclaimed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub released: AtomicU64,
    /// Pending ids whose entries had been deleted (payload lost).
    pub deleted_pending: AtomicU64,
    pub groups_recreated: AtomicU64,
}

/// The in-flight map's key: one claim (entry id, delivery count).
fn claim(h: &Held) -> (String, u64) {
    (h.entry_id.clone(), h.deliveries)
}

struct Running {
    held: Held,
    cancel: CancellationToken,
    stop: Arc<StopCell>,
}

struct Inner {
    cfg: Config,
    store: Store,
    defs: Arc<DefinitionSet>,
    handlers: Arc<HandlerRegistry>,
    id: Arc<str>,
    codec: StateCodec,
    slots: Arc<Semaphore>,
    /// Keyed by claim (entry id, delivery count): a task removes only its own claim.
    inflight: Mutex<HashMap<(String, u64), Running>>,
    /// Reclaimed jobs that began and wait for a slot; the reader reads nothing new while
    /// any wait (they run before newer jobs).
    waiting: AtomicUsize,
    /// When the last heartbeat answered (ms since `born`): the sweeper beats first when it
    /// is older than one interval (after a pause), so it never reclaims its own live jobs.
    last_beat_ms: AtomicU64,
    born: Instant,
    stats: Arc<WorkerStats>,
    /// The slot gauges ([`Inner::slot_gauges`]), registered once: set twice per step.
    inflight_gauge: metrics::Gauge,
    free_slots_gauge: metrics::Gauge,
    /// The per-step metric handles of each label set seen ([`complete::StepMetrics`]).
    step_metrics: complete::StepMetrics,
    /// Step results waiting for the completer, which commits them in batches.
    completions: mpsc::UnboundedSender<Completing>,
    completions_rx: Mutex<Option<mpsc::UnboundedReceiver<Completing>>>,
}

/// A worker. Cheap to construct; [`Worker::run`] until the shutdown token fires.
pub struct Worker {
    inner: Arc<Inner>,
    /// Fired during shutdown: stop waiting for the grace period, hand the steps back now.
    hand_back: CancellationToken,
}

impl Worker {
    pub fn new(
        cfg: Config,
        store: Store,
        defs: Arc<DefinitionSet>,
        handlers: Arc<HandlerRegistry>,
    ) -> Self {
        let id: Arc<str> = cfg
            .worker
            .id
            .clone()
            .unwrap_or_else(|| honua_shared::config::default_instance_id("worker"))
            .into();
        let codec = cfg.codec();
        #[expect(
            clippy::disallowed_methods,
            reason = "bounded by the step slots: at most max_concurrent_steps completions are in flight"
        )]
        let (completions, completions_rx) = mpsc::unbounded_channel();
        let slots = Arc::new(Semaphore::new(cfg.worker.max_concurrent_steps));
        // Installs the metrics recorder before anything is counted.
        honua_runtime::telemetry::metrics_handle();
        Self {
            inner: Arc::new(Inner {
                cfg,
                store,
                defs,
                handlers,
                id,
                codec,
                slots,
                inflight: Mutex::new(HashMap::new()),
                waiting: AtomicUsize::new(0),
                last_beat_ms: AtomicU64::new(0),
                born: Instant::now(),
                inflight_gauge: metrics::gauge!(m::WORKER_INFLIGHT),
                free_slots_gauge: metrics::gauge!(m::WORKER_FREE_SLOTS),
                step_metrics: complete::StepMetrics::default(),
                completions,
                completions_rx: Mutex::new(Some(completions_rx)),
                stats: Arc::new(WorkerStats::default()),
            }),
            hand_back: CancellationToken::new(),
        }
    }

    /// When `hand_back` fires during shutdown (a second Ctrl-C), the running steps are
    /// handed back at once instead of after the grace period.
    pub fn with_hand_back(mut self, hand_back: CancellationToken) -> Self {
        self.hand_back = hand_back;
        self
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.inner.stats.clone()
    }

    /// Runs until `shutdown` fires, then stops claiming, lets in-flight steps finish within
    /// the grace period, hands the rest back (release.lua) and retires its consumer if it
    /// owns nothing.
    pub async fn run(self, shutdown: CancellationToken) {
        let (inner, hand_back) = (self.inner, self.hand_back);
        info!(worker = %inner.id, "worker starting");
        if !inner
            .store
            .wait_ready(Service::Worker, shutdown.cancelled())
            .await
        {
            return;
        }
        inner.register().await;
        let hb_stop = CancellationToken::new();
        let reader = tokio::spawn(inner.clone().reader(shutdown.clone()));
        let sweeper = tokio::spawn(inner.clone().sweeper(shutdown.clone()));
        let heartbeat = tokio::spawn(inner.clone().heartbeat(hb_stop.clone()));
        let completer = inner
            .completions_rx
            .lock()
            .unwrap()
            .take()
            .map(|rx| tokio::spawn(inner.clone().completer(rx, hb_stop.clone())));
        shutdown.cancelled().await;
        info!(worker = %inner.id, "shutdown: no longer claiming");
        let _ = reader.await;
        let _ = sweeper.await;
        let grace = Duration::from_millis(inner.cfg.worker.shutdown_grace_ms);
        let running: Vec<String> = (inner.inflight.lock().unwrap().values())
            .map(|r| format!("{}/{}", r.held.job.process_id, r.held.job.step))
            .collect();
        if !running.is_empty() {
            info!(worker = %inner.id, steps = ?running,
                "shutdown: waiting up to {} for {} running step(s) to finish; interrupt again to hand them back now",
                humantime::format_duration(grace), running.len());
        }
        let drained = tokio::select! {
            d = inner.wait_idle(grace) => d,
            _ = hand_back.cancelled() => inner.inflight.lock().unwrap().is_empty(),
        };
        if !drained {
            let left: Vec<String> = {
                let mut map = inner.inflight.lock().unwrap();
                map.values_mut()
                    .map(|r| {
                        r.stop.force(Stop::Shutdown);
                        r.cancel.cancel();
                        r.held.job.step.clone()
                    })
                    .collect()
            };
            info!(worker = %inner.id, steps = ?left, "grace period over; handing steps back");
            inner.wait_idle(Duration::from_secs(10)).await;
        }
        hb_stop.cancel();
        let _ = heartbeat.await;
        if let Some(c) = completer {
            let _ = c.await;
        }
        for store in inner.store.all() {
            match store.retire_consumer(&inner.id).await {
                Ok(true) => {
                    info!(worker = %inner.id, partition = store.partition(), "consumer retired")
                }
                Ok(false) => {
                    warn!(worker = %inner.id, partition = store.partition(), "consumer still owns pending jobs; kept")
                }
                Err(e) => warn!(error = %e, "could not retire consumer"),
            }
        }
        info!(worker = %inner.id, "worker stopped");
    }
}

impl Inner {
    /// Registers this worker's version, host, concurrency and start time for the console
    /// and `GET /api/workers` (removed when it retires). A failure is logged, not fatal:
    /// the worker runs the same without it.
    async fn register(&self) {
        let started_ms = self.store.server_time_ms().await.unwrap_or(0);
        let meta = honua_shared::store::WorkerMeta {
            version: env!("CARGO_PKG_VERSION").to_string(),
            host: honua_shared::config::host_name().unwrap_or_default(),
            concurrency: self.cfg.worker.max_concurrent_steps as u64,
            started_ms,
        };
        if let Err(e) = self.store.register_worker(&self.id, &meta).await {
            warn!(worker = %self.id, error = %e, "could not register the worker's version and host");
        }
    }

    async fn wait_idle(&self, max: Duration) -> bool {
        let deadline = Instant::now() + max;
        loop {
            if self.inflight.lock().unwrap().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn slot_gauges(&self) {
        let inflight = self.inflight.lock().unwrap().len();
        self.inflight_gauge.set(inflight as f64);
        let free = self
            .cfg
            .worker
            .max_concurrent_steps
            .saturating_sub(inflight);
        self.free_slots_gauge.set(free as f64);
    }
}
