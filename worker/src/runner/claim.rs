//! Claiming jobs: the reader (XREADGROUP of new jobs into free slots), the sweeper
//! (reclaim.lua for the jobs of stopped workers, held off after a Redis restart), the
//! heartbeat that keeps every held claim alive and stops a step whose claim was lost, and
//! `start`, which begins claimed jobs and spawns one task per step.

use super::execute::Begun;
use super::{Inner, Running, Stop, StopCell, claim};
use crate::handler::ServerClock;
use backon::Retryable;
use honua_shared::envelope::JobEnvelope;
use honua_shared::keys::WORKERS_GROUP;
use honua_shared::metrics as m;
use honua_shared::partition::Rotation;
use honua_shared::store::{Begin, Entry, Fence, Held, ServerInfo, Store, StoreError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

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

impl Inner {
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

    /// Reads new jobs of every partition into free slots, over one blocking connection
    /// whatever the partition count: one reader rotates over the partitions
    /// ([`Rotation`]), reading each busy one in turn without blocking (one read per
    /// partition per turn, so a partition with a backlog cannot starve the others) and,
    /// once a whole turn found nothing, blocking briefly on each in turn (`read_block_ms`
    /// split over them). With one partition every read blocks for `read_block_ms`, as
    /// before partitions. Not one blocking read per partition: on a cluster every blocking
    /// connection is a connection to each node, and a worker fleet times P of them would
    /// be mostly idle connections.
    pub(super) async fn reader(self: Arc<Self>, shutdown: CancellationToken) {
        let block = Duration::from_millis(self.cfg.worker.read_block_ms);
        let Ok(mut conn) = self.store.blocking(block) else {
            error!("cannot create the blocking connection");
            return;
        };
        let parts = self.store.all();
        let mut rotation = Rotation::all(self.store.partitions(), block);
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
            let (p, wait) = rotation.next_read();
            let Some(store) = parts.get(usize::from(p)) else {
                continue;
            };
            let jobs = store.keys().jobs();
            // Not raced against shutdown: entries Redis has delivered must not be dropped
            // unprocessed. The read returns within `block`.
            let res = store
                .read_group(&mut conn, &jobs, WORKERS_GROUP, &self.id, count, wait)
                .await;
            match res {
                Ok(entries) => {
                    backoff = Duration::from_millis(50);
                    rotation.found(entries.len());
                    let mut permits = permits;
                    permits.truncate(entries.len());
                    // A fresh delivery (`>`) is the entry's first: delivery count 1.
                    let entries = entries.into_iter().map(|e| (e, 1)).collect();
                    self.clone().start(p, entries, permits).await;
                }
                Err(StoreError::NoGroup { stream, group }) => {
                    drop(permits);
                    rotation.found(0);
                    error!(%stream, %group, "consumer group missing (server restarted without data?); recreating it");
                    self.stats.groups_recreated.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!(m::GROUPS_RECREATED, "stream" => "jobs").increment(1);
                    if let Err(e) = store.ensure_job_group().await {
                        warn!(error = %e, "recreating groups failed");
                    }
                }
                Err(e) => {
                    drop(permits);
                    rotation.found(0);
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

    pub(super) async fn sweeper(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.cfg.worker.sweep_ms);
        let mut rounds: u64 = 0;
        // Per partition on a cluster: each may live on another primary, with its own
        // restarts and failovers.
        let parts = self.store.all();
        let mut servers: Vec<ServerWatch> = parts.iter().map(|_| ServerWatch::default()).collect();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(honua_runtime::jitter(every)) => {}
                _ = shutdown.cancelled() => return,
            }
            rounds += 1;
            // On one server every partition has the same restarts: watch it once a round.
            let mut may = false;
            for (i, (store, server)) in parts.iter().zip(servers.iter_mut()).enumerate() {
                if shutdown.is_cancelled() {
                    break;
                }
                if i == 0 || self.store.is_cluster() {
                    may = self.may_reclaim(store, server).await;
                }
                if may {
                    self.clone().sweep(store, &shutdown).await;
                }
            }
            if rounds.is_multiple_of(30) {
                for store in &parts {
                    self.retire_idle_consumers(store).await;
                }
            }
        }
    }

    /// One lease sweep of `store`'s partition: reclaims (or dead-letters) the jobs idle
    /// longer than the lease, in pages, while this worker has room for them.
    async fn sweep(self: Arc<Self>, store: &Store, shutdown: &CancellationToken) {
        let lease = self.cfg.worker.lease();
        // Reclaimed jobs waiting for a slot on this worker, at most: the rest stay for
        // other workers (or the next sweep).
        let cap = self.cfg.worker.max_concurrent_steps;
        {
            let mut cursor = "0-0".to_string();
            loop {
                let room = cap.saturating_sub(self.waiting.load(Ordering::SeqCst));
                if room == 0 || shutdown.is_cancelled() {
                    break;
                }
                let r = store
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
                    Err(StoreError::NoGroup { .. }) => {
                        self.stats.groups_recreated.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!(m::GROUPS_RECREATED, "stream" => "jobs").increment(1);
                        error!("job consumer group missing; recreating it");
                        let _ = store.ensure_job_group().await;
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
                self.clone()
                    .start(store.partition(), r.claimed, Vec::new())
                    .await;
                if r.next_cursor == "0-0" {
                    break;
                }
                cursor = r.next_cursor;
            }
        }
    }

    async fn retire_idle_consumers(&self, store: &Store) {
        let idle = self.cfg.worker.retire_idle();
        let after_ms = idle.as_millis() as u64;
        let Ok(consumers) = store.job_consumers().await else {
            return;
        };
        for c in consumers {
            if c.pending == 0
                && c.idle_ms > after_ms
                && *c.name != *self.id
                && let Ok(true) = store.retire_idle_consumer(&c.name, idle).await
            {
                info!(consumer = %c.name, "retired idle consumer");
            }
        }
    }

    pub(super) async fn heartbeat(self: Arc<Self>, stop: CancellationToken) {
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
            .filter(|r| r.stop.get() == Stop::Running)
            .map(|r| r.held.clone())
            .collect();
        let mut reached = true;
        // Per partition (each call's keys share one slot); partition 0 always, so the
        // worker is in its registry (liveness, `/health`) whatever it holds.
        let mut groups = self
            .store
            .group_by_partition(held, |h| h.job.process_id.as_str());
        if groups.first().is_none_or(|(s, _)| s.partition() != 0) {
            groups.insert(0, (self.store.in_partition(0), vec![]));
        }
        for (store, held) in groups {
            for chunk in held.chunks(200).chain(held.is_empty().then_some(&[][..])) {
                match store.heartbeat(&self.id, chunk).await {
                    Ok(answers) => {
                        for (h, a) in chunk.iter().zip(answers) {
                            let why = match a {
                                Fence::Ok => continue,
                                Fence::Stale => Stop::Stale,
                                Fence::Finished => Stop::Finished,
                            };
                            // Only a step still running counts: one that finished meanwhile
                            // was acknowledged by its own commit.
                            let applied = match self.inflight.lock().unwrap().get(&claim(h)) {
                                Some(r) => {
                                    let set = r.stop.stop(why);
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
                            if why == Stop::Stale {
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
    async fn may_reclaim(&self, store: &Store, server: &mut ServerWatch) -> bool {
        let every = self.cfg.worker.heartbeat();
        let since = (self.born.elapsed().as_millis() as u64)
            .saturating_sub(self.last_beat_ms.load(Ordering::SeqCst));
        if since > every.as_millis() as u64 && !self.beat().await {
            return false;
        }
        let info = match store.server_info().await {
            Ok(i) => i,
            Err(StoreError::NoPermission(e)) => {
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
        partition: u16,
        entries: Vec<(Entry, u64)>,
        mut permits: Vec<OwnedSemaphorePermit>,
    ) {
        // Every call for these jobs goes to the partition they were read from.
        let store = self.store.in_partition(partition);
        let jobs_key = store.keys().jobs();
        let mut jobs = Vec::with_capacity(entries.len());
        for (e, seen) in entries {
            match JobEnvelope::from_fields(&e.fields) {
                Ok(job) => jobs.push((e.id, seen, job)),
                Err(err) => {
                    error!(entry = %e.id, error = %err, "unreadable job entry; quarantined");
                    let _ = store
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
        let may_route = |step: &str| self.defs.may_route(step);
        // When the (last) begin request went out: each claim's clock starts there.
        let sent_ns = AtomicU64::new(0);
        let answers = (|| {
            sent_ns.store(self.born.elapsed().as_nanos() as u64, Ordering::Relaxed);
            store.begin(&self.id, &jobs, &traces, &may_route)
        })
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
                    tenant,
                    snapshot,
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
                    // begin.lua stamps every claim with the server's time.
                    let sent = self.born + Duration::from_nanos(sent_ns.load(Ordering::Relaxed));
                    let clock = ServerClock::sent_at(step.claimed_ms.unwrap_or_default(), sent);
                    let me = self.clone();
                    let cancel = CancellationToken::new();
                    let stop = Arc::new(StopCell::default());
                    self.inflight.lock().unwrap().insert(
                        claim(&held),
                        Running {
                            held: held.clone(),
                            cancel: cancel.clone(),
                            stop: stop.clone(),
                        },
                    );
                    self.stats.started.fetch_add(1, Ordering::Relaxed);
                    self.slot_gauges();
                    let begun = Begun {
                        process_type,
                        version,
                        tenant,
                        clock,
                        snapshot,
                    };
                    // The step's task is its execute future itself (no async block around
                    // it, which would hold it twice and be copied whole when spawned); the
                    // future holds the slot until the step is settled. A reclaimed job
                    // without a slot waits for one first.
                    match permit {
                        Some(p) => {
                            tokio::spawn(me.execute(
                                span,
                                held,
                                begun,
                                data,
                                (cancel, stop),
                                Some(p),
                            ));
                        }
                        None => {
                            tokio::spawn(async move {
                                let p = me.wait_for_slot(&cancel).await;
                                me.execute(span, held, begun, data, (cancel, stop), p).await;
                            });
                        }
                    }
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
