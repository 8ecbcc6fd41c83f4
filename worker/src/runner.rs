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

use crate::handler::{Checkpointer, HandlerRegistry, StepContext, StepError, StepOutput};
use backon::Retryable;
use honua_shared::codec::{CodecError, StateCodec};
use honua_shared::config::Config;
use honua_shared::definition::DefinitionSet;
use honua_shared::envelope::{JobEnvelope, StepResult};
use honua_shared::keys::{WORKERS_GROUP, field};
use honua_shared::metrics as m;
use honua_shared::status::outcome;
use honua_shared::store::{Begin, Completion, Entry, Fence, Held, ServerInfo, Store, StoreError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

const REASON_NONE: u8 = 0;
const REASON_STALE: u8 = 1;
const REASON_FINISHED: u8 = 2;
const REASON_SHUTDOWN: u8 = 3;
/// The handler returned and the runner is committing: heartbeats leave it alone (a
/// heartbeat racing the commit would otherwise report a false stale claim).
const REASON_FINISHING: u8 = 4;

/// Counters a worker keeps (exported as metrics, read by tests).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub started: AtomicU64,
    pub committed: AtomicU64,
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

/// What the sweeper knows of the Redis server: its run id, and until when (server ms) it
/// must not reclaim.
#[derive(Debug, Default)]
struct ServerWatch {
    run_id: Option<String>,
    hold_until_ms: u64,
    noperm_logged: bool,
}

impl ServerWatch {
    /// Records one `INFO server` + `TIME` reading; true when reclaiming is allowed. A
    /// server up for less than `settle_ms` holds reclaim off until it has been up that
    /// long; a run id other than the last one seen (a restart or a failover to a replica
    /// with a long uptime) holds it off for `settle_ms` from now.
    fn observe(&mut self, info: &ServerInfo, settle_ms: u64) -> bool {
        let started = info.now_ms.saturating_sub(info.uptime_ms);
        let mut until = started + settle_ms;
        if self.run_id.as_ref().is_some_and(|r| *r != info.run_id) {
            until = until.max(info.now_ms + settle_ms);
            info!(run_id = %info.run_id, "redis server changed (restart or failover); reclaim waits for live workers to heartbeat");
        }
        if self.run_id.as_deref() != Some(info.run_id.as_str()) {
            self.run_id = Some(info.run_id.clone());
        }
        self.hold_until_ms = self.hold_until_ms.max(until);
        info.now_ms >= self.hold_until_ms
    }
}

struct Running {
    held: Held,
    cancel: CancellationToken,
    reason: Arc<AtomicU8>,
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
    /// Step results waiting for the completer, which commits them in batches.
    completions: mpsc::UnboundedSender<Completing>,
    completions_rx: Mutex<Option<mpsc::UnboundedReceiver<Completing>>>,
}

/// Most step results one `complete.lua` call commits.
const COMPLETE_BATCH: usize = 256;

/// A step result handed to the completer, with where to send its answer.
struct Completing {
    held: Held,
    output: Option<Vec<u8>>,
    result: StepResult,
    done: oneshot::Sender<Result<Fence, String>>,
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
        let mut delay = Duration::from_millis(100);
        loop {
            let ready = async {
                inner.store.ensure_job_group().await?;
                inner.store.load_scripts().await
            };
            match ready.await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "redis not ready; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(honua_runtime::jitter(delay)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
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
                        r.reason.store(REASON_SHUTDOWN, Ordering::SeqCst);
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
        match inner.store.retire_consumer(&inner.id).await {
            Ok(true) => info!(worker = %inner.id, "consumer retired"),
            Ok(false) => warn!(worker = %inner.id, "consumer still owns pending jobs; kept"),
            Err(e) => warn!(error = %e, "could not retire consumer"),
        }
        info!(worker = %inner.id, "worker stopped");
    }
}

impl Inner {
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

    /// A slot for a reclaimed job that began without one; `None` when its claim was
    /// stopped (stale, finished, shutdown) before a slot came free.
    async fn wait_for_slot(&self, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        let p = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.ok(),
            _ = cancel.cancelled() => None,
        };
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        p
    }

    fn take_permits(&self, first: OwnedSemaphorePermit, max: usize) -> Vec<OwnedSemaphorePermit> {
        let mut permits = vec![first];
        while permits.len() < max {
            match self.slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        permits
    }

    async fn reader(self: Arc<Self>, shutdown: CancellationToken) {
        let block = Duration::from_millis(self.cfg.worker.read_block_ms);
        let Ok(mut conn) = self.store.blocking(block) else {
            error!("cannot create the blocking connection");
            return;
        };
        let jobs = self.store.keys().jobs();
        let mut backoff = Duration::from_millis(50);
        loop {
            let first = tokio::select! {
                p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = shutdown.cancelled() => return,
            };
            if shutdown.is_cancelled() {
                return;
            }
            if self.waiting.load(Ordering::SeqCst) > 0 {
                // Reclaimed jobs wait for a slot: this one goes to them (the semaphore serves
                // waiters in order), and the reader queues behind them.
                drop(first);
                tokio::task::yield_now().await;
                continue;
            }
            // Every slot the read may fill is held before it: entries Redis delivers never
            // wait for a slot (their idle time runs until `begin`).
            let permits = self.take_permits(first, 256);
            let count = permits.len();
            // Not raced against shutdown: entries Redis has delivered must not be dropped
            // unprocessed. The read returns within `block`.
            let res = self
                .store
                .read_group(&mut conn, &jobs, WORKERS_GROUP, &self.id, count, block)
                .await;
            match res {
                Ok(entries) => {
                    backoff = Duration::from_millis(50);
                    let mut permits = permits;
                    permits.truncate(entries.len());
                    // A fresh delivery (`>`) is the entry's first: delivery count 1.
                    let entries = entries.into_iter().map(|e| (e, 1)).collect();
                    self.clone().start(entries, permits).await;
                }
                Err(StoreError::NoGroup { stream, group }) => {
                    drop(permits);
                    error!(%stream, %group, "consumer group missing (server restarted without data?); recreating it");
                    self.stats.groups_recreated.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::GROUPS_RECREATED, "stream" => "jobs").increment(1);
                    if let Err(e) = self.store.ensure_job_group().await {
                        warn!(error = %e, "recreating groups failed");
                    }
                }
                Err(e) => {
                    drop(permits);
                    warn!(error = %e, "reading jobs failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(honua_runtime::jitter(backoff)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.cfg.worker.sweep_ms);
        let lease = self.cfg.worker.lease();
        let mut rounds: u64 = 0;
        let mut server = ServerWatch::default();
        // Reclaimed jobs waiting for a slot on this worker, at most: the rest stay for
        // other workers (or the next sweep).
        let cap = self.cfg.worker.max_concurrent_steps;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(honua_runtime::jitter(every)) => {}
                _ = shutdown.cancelled() => return,
            }
            rounds += 1;
            if !self.may_reclaim(&mut server).await {
                continue;
            }
            let mut cursor = "0-0".to_string();
            loop {
                let room = cap.saturating_sub(self.waiting.load(Ordering::SeqCst));
                if room == 0 || shutdown.is_cancelled() {
                    break;
                }
                let r = self
                    .store
                    .reclaim(
                        &self.id,
                        lease,
                        &cursor,
                        room.min(100),
                        self.cfg.worker.max_deliveries,
                    )
                    .await;
                let r = match r {
                    Ok(r) => r,
                    Err(StoreError::Redis(e)) if e.code() == Some("NOGROUP") => {
                        self.stats.groups_recreated.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(m::GROUPS_RECREATED, "stream" => "jobs").increment(1);
                        error!("job consumer group missing; recreating it");
                        let _ = self.store.ensure_job_group().await;
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, "reclaim failed");
                        break;
                    }
                };
                for id in &r.dead_lettered {
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::DEAD_LETTERS).increment(1);
                    warn!(entry = %id, "job dead-lettered after max_deliveries");
                }
                if r.deleted > 0 {
                    self.stats
                        .deleted_pending
                        .fetch_add(r.deleted, Ordering::Relaxed);
                    metrics::counter!(m::LOST_PENDING).increment(r.deleted);
                    error!(
                        count = r.deleted,
                        "pending jobs whose entries were deleted: their payload is lost"
                    );
                }
                if !r.claimed.is_empty() {
                    self.stats
                        .reclaimed
                        .fetch_add(r.claimed.len() as u64, Ordering::Relaxed);
                    metrics::counter!(m::RECLAIMS).increment(r.claimed.len() as u64);
                    info!(count = r.claimed.len(), worker = %self.id, "reclaimed jobs of a stopped worker");
                }
                // No slot is needed to claim: each job begins now and waits for a slot
                // ahead of new reads.
                self.clone().start(r.claimed, Vec::new()).await;
                if r.next_cursor == "0-0" {
                    break;
                }
                cursor = r.next_cursor;
            }
            if rounds.is_multiple_of(30) {
                self.retire_idle_consumers().await;
            }
        }
    }

    async fn retire_idle_consumers(&self) {
        let idle = self.cfg.worker.retire_idle();
        let after_ms = idle.as_millis() as u64;
        let Ok(consumers) = self.store.job_consumers().await else {
            return;
        };
        for c in consumers {
            if c.pending == 0
                && c.idle_ms > after_ms
                && *c.name != *self.id
                && let Ok(true) = self.store.retire_idle_consumer(&c.name, idle).await
            {
                info!(consumer = %c.name, "retired idle consumer");
            }
        }
    }

    async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
        let every = self.cfg.worker.heartbeat();
        // The first beat goes out at once, so the worker counts as live (`/health`,
        // `honua_workers_live`) from its start, not one interval later.
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
            }
            self.beat().await;
        }
    }

    /// One heartbeat of every held claim; a `stale` or `finished` answer stops that step.
    /// Returns false when Redis could not be reached.
    async fn beat(&self) -> bool {
        let held: Vec<Held> = self
            .inflight
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.reason.load(Ordering::SeqCst) == REASON_NONE)
            .map(|r| r.held.clone())
            .collect();
        let mut reached = true;
        for chunk in held.chunks(200).chain(held.is_empty().then_some(&[][..])) {
            match self.store.heartbeat(&self.id, chunk).await {
                Ok(answers) => {
                    for (h, a) in chunk.iter().zip(answers) {
                        let reason = match a {
                            Fence::Ok => continue,
                            Fence::Stale => REASON_STALE,
                            Fence::Finished => REASON_FINISHED,
                        };
                        // Only a step still running counts: one that finished meanwhile
                        // was acknowledged by its own commit.
                        let applied = match self.inflight.lock().unwrap().get(&claim(h)) {
                            Some(r) => {
                                let set = r
                                    .reason
                                    .compare_exchange(
                                        REASON_NONE,
                                        reason,
                                        Ordering::SeqCst,
                                        Ordering::SeqCst,
                                    )
                                    .is_ok();
                                if set {
                                    r.cancel.cancel();
                                }
                                set
                            }
                            None => false,
                        };
                        if !applied {
                            continue;
                        }
                        if reason == REASON_STALE {
                            self.stats.stale.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(m::STALE_COMMITS).increment(1);
                            warn!(process_id = %h.job.process_id, step = %h.job.step, "claim is stale (reclaimed elsewhere); stopping the step");
                        } else {
                            info!(process_id = %h.job.process_id, step = %h.job.step, "process is over; stopping the step");
                        }
                    }
                }
                Err(e) => {
                    reached = false;
                    warn!(error = %e, "heartbeat failed")
                }
            }
        }
        if reached {
            self.last_beat_ms
                .store(self.born.elapsed().as_millis() as u64, Ordering::SeqCst);
        }
        reached
    }

    /// Whether the sweeper may reclaim now. First re-asserts this worker's own claims when
    /// its last heartbeat is older than one interval (it was paused, or Redis was away), so
    /// it never reclaims jobs it is running itself. Then holds off while the server has
    /// been up (or, after a failover, known under its new run id) for less than one lease
    /// plus one heartbeat interval on the server's clock: pending entries keep their
    /// pre-outage delivery times, so right after a restart every job looks idle, and live
    /// workers need that long to re-assert their claims.
    async fn may_reclaim(&self, server: &mut ServerWatch) -> bool {
        let every = self.cfg.worker.heartbeat();
        let since = (self.born.elapsed().as_millis() as u64)
            .saturating_sub(self.last_beat_ms.load(Ordering::SeqCst));
        if since > every.as_millis() as u64 && !self.beat().await {
            return false;
        }
        let info = match self.store.server_info().await {
            Ok(i) => i,
            Err(StoreError::Redis(e)) if e.code() == Some("NOPERM") => {
                // An ACL without INFO (a template older than this worker): reclaiming
                // without the restart guard beats never reclaiming.
                if !server.noperm_logged {
                    server.noperm_logged = true;
                    error!(error = %e, "the worker's Redis user may not run INFO; reclaim cannot wait out Redis restarts (grant +info)");
                }
                return true;
            }
            Err(e) => {
                warn!(error = %e, "reading the server's run id failed; not reclaiming");
                return false;
            }
        };
        let settle = self.cfg.worker.lease_ms + every.as_millis() as u64;
        server.observe(&info, settle)
    }

    /// Parses, begins and spawns the given claims (entry, delivery count the starter saw).
    /// A job with no permit left in `permits` (reclaimed ones) waits for a slot ahead of
    /// new reads, heartbeaten meanwhile.
    async fn start(
        self: Arc<Self>,
        entries: Vec<(Entry, u64)>,
        mut permits: Vec<OwnedSemaphorePermit>,
    ) {
        let jobs_key = self.store.keys().jobs();
        let mut jobs = Vec::with_capacity(entries.len());
        for (e, seen) in entries {
            match JobEnvelope::from_fields(&e.fields) {
                Ok(job) => jobs.push((e.id, seen, job)),
                Err(err) => {
                    error!(entry = %e.id, error = %err, "unreadable job entry; quarantined");
                    let _ = self
                        .store
                        .drop_entry(
                            &jobs_key,
                            WORKERS_GROUP,
                            &e.id,
                            &format!("unreadable job: {err}"),
                            Some(&self.id),
                        )
                        .await;
                }
            }
        }
        if jobs.is_empty() {
            return;
        }
        // Each attempt's span exists before `begin`, so its context is stored with the step
        // record and a later attempt (reclaim, retry) can link to it.
        let mut spans: Vec<tracing::Span> =
            jobs.iter().map(|(_, _, j)| self.step_span(j)).collect();
        let traces: Vec<Option<String>> = spans
            .iter()
            .map(|s| honua_runtime::telemetry::trace_context_of(s).and_then(|t| t.traceparent))
            .collect();
        let answers = (|| self.store.begin(&self.id, &jobs, &traces))
            .retry(crate::redis_backoff(Duration::from_secs(5)))
            .when(StoreError::is_retryable)
            .notify(|e, _| warn!(error = %e, "begin failed; retrying"))
            .await
            .inspect_err(|e| warn!(error = %e, "begin failed; the jobs stay pending and are reclaimed after the lease"))
            .ok();
        let Some(answers) = answers else {
            // The entries stay in this consumer's pending list; the sweep reclaims them.
            return;
        };
        spans.reverse();
        for ((entry_id, _, job), answer) in jobs.into_iter().zip(answers) {
            let span = spans.pop().unwrap_or_else(tracing::Span::none);
            match answer {
                Begin::Ok {
                    deliveries,
                    process_type,
                    version,
                    step,
                    data,
                } => {
                    let permit = permits.pop();
                    if permit.is_none() {
                        self.waiting.fetch_add(1, Ordering::SeqCst);
                    }
                    let held = Held {
                        entry_id,
                        deliveries,
                        job,
                    };
                    span.record("honua.process_type", process_type.as_str());
                    span.record("honua.deliveries", deliveries);
                    if let Some(previous) = step.previous_attempt_trace.as_deref() {
                        honua_runtime::telemetry::add_link(&span, previous);
                    }
                    let me = self.clone();
                    let cancel = CancellationToken::new();
                    let reason = Arc::new(AtomicU8::new(REASON_NONE));
                    self.inflight.lock().unwrap().insert(
                        claim(&held),
                        Running {
                            held: held.clone(),
                            cancel: cancel.clone(),
                            reason: reason.clone(),
                        },
                    );
                    self.stats.started.fetch_add(1, Ordering::Relaxed);
                    self.slot_gauges();
                    tokio::spawn(async move {
                        let permit = match permit {
                            Some(p) => Some(p),
                            None => me.wait_for_slot(&cancel).await,
                        };
                        me.execute(span, held, process_type, version, data, cancel, reason)
                            .await;
                        drop(permit);
                    });
                }
                Begin::Lost => {
                    span.record("honua.outcome", "lost");
                    debug!(entry = %entry_id, "claim no longer current (reclaimed meanwhile); not started")
                }
                Begin::Obsolete(why) => {
                    span.record("honua.outcome", "obsolete");
                    debug!(entry = %entry_id, %why, "obsolete job dropped")
                }
            }
        }
    }

    /// The `step.execute` span of one attempt: a root tracing span whose parent is the
    /// job's W3C context (the process span the scheduler copied into every job), so every
    /// attempt of every step joins the process's trace. Type and deliveries are recorded
    /// once `begin` has answered.
    fn step_span(&self, job: &JobEnvelope) -> tracing::Span {
        let span = tracing::info_span!(
            parent: None,
            "step.execute",
            otel.kind = "consumer",
            honua.process_id = %job.process_id,
            honua.process_type = tracing::field::Empty,
            honua.step = %job.step,
            honua.attempt = job.attempt,
            honua.deliveries = tracing::field::Empty,
            honua.worker = %self.id,
            honua.outcome = tracing::field::Empty,
        );
        honua_runtime::telemetry::set_parent(&span, &job.trace);
        span
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        self: Arc<Self>,
        span: tracing::Span,
        held: Held,
        process_type: String,
        version: u32,
        data: HashMap<String, Vec<u8>>,
        cancel: CancellationToken,
        reason: Arc<AtomicU8>,
    ) {
        if held.deliveries > 1 {
            span.in_scope(|| {
                info!(
                    process_id = %held.job.process_id,
                    step = %held.job.step,
                    deliveries = held.deliveries,
                    "reclaimed"
                )
            });
        }
        let me = self.clone();
        me.execute_in_span(held, process_type, version, data, cancel, reason)
            .instrument(span)
            .await;
    }

    async fn execute_in_span(
        self: Arc<Self>,
        held: Held,
        process_type: String,
        version: u32,
        data: HashMap<String, Vec<u8>>,
        cancel: CancellationToken,
        reason: Arc<AtomicU8>,
    ) {
        let started = Instant::now();
        let stale_flag = Arc::new(AtomicBool::new(false));
        let (result, output) = self
            .run_step(
                &held,
                &process_type,
                version,
                data,
                cancel.clone(),
                stale_flag.clone(),
            )
            .await;
        tracing::Span::current().record("honua.outcome", result.outcome.as_str());
        if stale_flag.load(Ordering::SeqCst) {
            let _ = reason.compare_exchange(
                REASON_NONE,
                REASON_STALE,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        let pid = &held.job.process_id;
        let step = &held.job.step;
        let decided = match reason.compare_exchange(
            REASON_NONE,
            REASON_FINISHING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => REASON_NONE,
            Err(r) => r,
        };
        match decided {
            REASON_STALE => {
                info!(process_id = %pid, step = %step, "result discarded: claim is stale");
            }
            REASON_FINISHED => {
                info!(process_id = %pid, step = %step, "result discarded: process is over");
            }
            REASON_SHUTDOWN => self.release(&held).await,
            _ => {
                let duration_ms = started.elapsed().as_millis() as u64;
                let kind = self
                    .defs
                    .get(&process_type, version)
                    .and_then(|d| d.step(&held.job.step).map(|s| s.kind.clone()))
                    .unwrap_or_default();
                self.commit(&held, (&process_type, &kind), result, output, duration_ms)
                    .await;
            }
        }
        self.inflight.lock().unwrap().remove(&claim(&held));
        self.slot_gauges();
    }

    fn slot_gauges(&self) {
        let inflight = self.inflight.lock().unwrap().len();
        metrics::gauge!(m::WORKER_INFLIGHT).set(inflight as f64);
        let free = self
            .cfg
            .worker
            .max_concurrent_steps
            .saturating_sub(inflight);
        metrics::gauge!(m::WORKER_FREE_SLOTS).set(free as f64);
    }

    async fn release(&self, held: &Held) {
        let r = (|| self.store.release(&self.id, held))
            .retry(crate::redis_backoff(Duration::from_secs(10)))
            .when(StoreError::is_retryable)
            .notify(|e, _| warn!(error = %e, "release failed; retrying"))
            .await;
        match r {
            Ok(Fence::Ok) => {
                self.stats.released.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::RELEASES).increment(1);
                info!(process_id = %held.job.process_id, step = %held.job.step, "step handed back for another worker");
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, process_id = %held.job.process_id, step = %held.job.step, "could not hand the step back; it resumes after the lease")
            }
        }
    }

    async fn commit(
        &self,
        held: &Held,
        (process_type, kind): (&str, &str),
        result: StepResult,
        output: Option<Vec<u8>>,
        duration_ms: u64,
    ) {
        let pid = &held.job.process_id;
        let step = &held.job.step;
        let (done, answer) = oneshot::channel();
        let sent = self.completions.send(Completing {
            held: held.clone(),
            output,
            result: result.clone(),
            done,
        });
        let r = match sent {
            Ok(()) => answer
                .await
                .unwrap_or_else(|_| Err("the completer stopped".into())),
            Err(_) => Err("the worker is stopping".into()),
        };
        match r {
            Ok(Fence::Ok) => {
                self.stats.committed.fetch_add(1, Ordering::Relaxed);
                let labels = [
                    ("process_type", process_type.to_string()),
                    ("kind", kind.to_string()),
                    ("outcome", result.outcome.clone()),
                ];
                metrics::counter!(m::STEPS, &labels).increment(1);
                metrics::histogram!(m::STEP_DURATION, &labels[1..])
                    .record(duration_ms as f64 / 1000.0);
                if result.outcome == outcome::FAILED {
                    warn!(process_id = %pid, step = %step, worker = %self.id, duration_ms, error = result.error.as_deref().unwrap_or(""), "Process {pid} step {step} failed, duration {duration_ms} ms");
                } else {
                    info!(process_id = %pid, step = %step, worker = %self.id, duration_ms, outcome = %result.outcome, "Process {pid} step {step} completed, duration {duration_ms} ms");
                }
            }
            Ok(Fence::Stale) => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::STALE_COMMITS).increment(1);
                warn!(process_id = %pid, step = %step, "commit refused: claim is stale (job was reclaimed)");
            }
            Ok(Fence::Finished) => {
                info!(process_id = %pid, step = %step, "commit discarded: process is over")
            }
            Err(e) => {
                error!(error = %e, process_id = %pid, step = %step, "commit failed; the job will be reclaimed and run again")
            }
        }
    }

    /// Commits step results in batches: one `complete.lua` call for every result that
    /// arrived while the previous call was in flight (each step still fenced and committed
    /// on its own inside the script). Stops when `stop` fires, after answering what is
    /// queued.
    async fn completer(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Completing>,
        stop: CancellationToken,
    ) {
        loop {
            let first = tokio::select! {
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
                _ = stop.cancelled() => {
                    // Later sends fail at once; what is queued is still committed.
                    rx.close();
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < COMPLETE_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            let items: Vec<Completion<'_>> = batch
                .iter()
                .map(|c| Completion {
                    held: &c.held,
                    output: c.output.as_deref(),
                    result: &c.result,
                })
                .collect();
            let r = (|| self.store.complete_many(&self.id, &items))
                .retry(crate::redis_backoff(Duration::from_secs(60)))
                .when(StoreError::is_retryable)
                .notify(|e, _| warn!(error = %e, steps = items.len(), "commit failed; retrying"))
                .await;
            drop(items);
            match r {
                Ok(answers) => {
                    for (c, a) in batch.into_iter().zip(answers) {
                        let _ = c.done.send(Ok(a));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for c in batch {
                        let _ = c.done.send(Err(msg.clone()));
                    }
                }
            }
        }
    }

    /// Runs the handler; returns the result to commit and the encoded output.
    async fn run_step(
        &self,
        held: &Held,
        process_type: &str,
        version: u32,
        data: HashMap<String, Vec<u8>>,
        cancel: CancellationToken,
        stale: Arc<AtomicBool>,
    ) -> (StepResult, Option<Vec<u8>>) {
        let job = &held.job;
        let fail = |error: String, code: &str, retryable: bool, fatal: bool| StepResult {
            outcome: outcome::FAILED.into(),
            error: Some(error),
            code: Some(code.into()),
            retryable,
            retry_after_ms: None,
            fatal,
            yielded: false,
        };
        let Some(def) = self.defs.get(process_type, version) else {
            return (
                fail(
                    format!(
                        "definition {process_type} v{version} is not loaded on worker {}",
                        self.id
                    ),
                    "definition_missing",
                    true,
                    false,
                ),
                None,
            );
        };
        let Some(step_def) = def.step(&job.step) else {
            return (
                fail(
                    format!("step {} is not in {process_type} v{version}", job.step),
                    "definition_mismatch",
                    false,
                    true,
                ),
                None,
            );
        };
        let Some(handler) = self.handlers.get(&step_def.kind) else {
            return (
                fail(
                    format!(
                        "no handler for step kind {:?} on worker {}",
                        step_def.kind, self.id
                    ),
                    "no_handler",
                    false,
                    true,
                ),
                None,
            );
        };
        let state = match decode_state(&self.codec, &data, &job.step) {
            Ok(s) => s,
            Err((fieldname, e)) => {
                error!(process_id = %job.process_id, field = %fieldname, error = %e, "process state is unreadable; quarantining the process");
                return (
                    fail(
                        format!("process state field {fieldname} is unreadable: {e}"),
                        e.code(),
                        false,
                        true,
                    ),
                    None,
                );
            }
        };
        let ctx = StepContext {
            process_id: job.process_id.clone(),
            process_type: process_type.to_string(),
            version,
            step: job.step.clone(),
            kind: step_def.kind.clone(),
            config: step_def.config.clone(),
            timeout: step_def.timeout,
            attempt: job.attempt,
            visit: job.visit,
            deliveries: held.deliveries,
            input: state.input,
            outputs: state.outputs,
            checkpoint: state.checkpoint,
            cancel: cancel.clone(),
            checkpointer: Some(Checkpointer {
                store: self.store.clone(),
                consumer: self.id.clone(),
                held: held.clone(),
                codec: self.codec,
                cancel: cancel.clone(),
                stale,
            }),
        };
        let timeout = step_def.timeout;
        if cancel.is_cancelled() {
            // Stopped while waiting for a slot: the handler never starts.
            return (
                fail("step cancelled".into(), "cancelled", true, false),
                None,
            );
        }
        // The handler runs as a child of the step span (its own spans join the trace).
        let mut task = tokio::spawn(async move { handler.run(ctx).await }.in_current_span());
        let joined = tokio::select! {
            r = tokio::time::timeout(timeout, &mut task) => r,
            _ = cancel.cancelled() => {
                task.abort();
                return (fail("step cancelled".into(), "cancelled", true, false), None);
            }
        };
        let r = match joined {
            Err(_) => {
                task.abort();
                return (
                    fail(
                        format!(
                            "step timed out after {}",
                            humantime::format_duration(timeout)
                        ),
                        "step_timeout",
                        true,
                        false,
                    ),
                    None,
                );
            }
            Ok(Err(join)) => {
                let msg = if join.is_panic() {
                    "step handler panicked"
                } else {
                    "step handler was aborted"
                };
                return (fail(msg.into(), "handler_panic", true, false), None);
            }
            Ok(Ok(r)) => r,
        };
        match r {
            Ok(StepOutput {
                outcome: out,
                output,
            }) => {
                let blob = match output.map(|v| self.codec.encode(&v)).transpose() {
                    Ok(b) => b,
                    Err(e) => {
                        return (
                            fail(format!("step output rejected: {e}"), e.code(), false, false),
                            None,
                        );
                    }
                };
                (
                    StepResult {
                        outcome: out,
                        ..Default::default()
                    },
                    blob,
                )
            }
            Err(e) => {
                let mut r = fail(e.to_string(), e.code(), true, false);
                match e {
                    StepError::Permanent(_) => r.retryable = false,
                    StepError::RetryAfter { after, .. } => {
                        r.retry_after_ms = Some(after.as_millis() as u64)
                    }
                    StepError::Yield { after, .. } => {
                        r.retry_after_ms = Some(after.as_millis() as u64);
                        r.yielded = true;
                    }
                    _ => {}
                }
                (r, None)
            }
        }
    }
}

struct State {
    input: Value,
    outputs: BTreeMap<String, Value>,
    checkpoint: Option<Value>,
}

/// Decodes the process input, earlier outputs and this step's checkpoint, naming the field
/// that fails.
fn decode_state(
    codec: &StateCodec,
    data: &HashMap<String, Vec<u8>>,
    step: &str,
) -> Result<State, (String, CodecError)> {
    let dec = |name: &str, blob: &[u8]| {
        codec
            .decode::<Value>(blob)
            .map_err(|e| (name.to_string(), e))
    };
    let input = match data.get(field::INPUT) {
        Some(b) => dec(field::INPUT, b)?,
        None => Value::Object(Default::default()),
    };
    let mut outputs = BTreeMap::new();
    let mut checkpoint = None;
    for (k, v) in data {
        if let Some(name) = k.strip_prefix(field::OUTPUT_PREFIX) {
            outputs.insert(name.to_string(), dec(k, v)?);
        } else if k.strip_prefix(field::CHECKPOINT_PREFIX) == Some(step) {
            checkpoint = Some(dec(k, v)?);
        }
    }
    Ok(State {
        input,
        outputs,
        checkpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(run_id: &str, uptime_ms: u64, now_ms: u64) -> ServerInfo {
        ServerInfo {
            run_id: run_id.into(),
            uptime_ms,
            now_ms,
        }
    }

    #[test]
    fn reclaim_waits_until_the_server_has_been_up_for_the_settle_time() {
        let mut w = ServerWatch::default();
        // A server up for an hour: reclaim at once.
        assert!(w.observe(&info("a", 3_600_000, 10_000_000), 2_000));
        let mut w = ServerWatch::default();
        // Just restarted: not until it has been up 2 s (uptime is in whole seconds, so
        // the start is known to within a second, rounded late).
        assert!(!w.observe(&info("a", 1_000, 10_000_000), 2_000));
        assert!(!w.observe(&info("a", 1_000, 10_000_900), 2_000));
        assert!(!w.observe(&info("a", 2_000, 10_001_000), 2_000));
        assert!(w.observe(&info("a", 3_000, 10_002_000), 2_000));
    }

    #[test]
    fn a_new_run_id_holds_reclaim_off_even_with_a_long_uptime() {
        let mut w = ServerWatch::default();
        assert!(w.observe(&info("a", 3_600_000, 10_000_000), 2_000));
        // Failover to a replica that has been up for a day.
        assert!(!w.observe(&info("b", 86_400_000, 10_005_000), 2_000));
        assert!(!w.observe(&info("b", 86_401_000, 10_006_999), 2_000));
        assert!(w.observe(&info("b", 86_402_000, 10_007_000), 2_000));
        // The same run id again changes nothing.
        assert!(w.observe(&info("b", 86_403_000, 10_008_000), 2_000));
    }
}
