//! The scheduler loops: submissions → processes, events → graph transitions, due timers
//! and retries → streams, and takeover of events another scheduler left pending.
//!
//! Any number of schedulers may run: streams are read through one consumer group, and every
//! transition is one commit.lua call guarded by the process revision, so two schedulers
//! deciding from the same snapshot cannot both apply (the loser re-reads and decides again).

use crate::processes::{Answered, CONFLICT_BOUND, Decision, Processes};
use crate::submit::SubmitError;
use honua_shared::commit::{AckSource, CommitCall};
use honua_shared::engine::{self, Ctx};
use honua_shared::envelope::{Event, Submission};
use honua_shared::keys::{Key, Keys, SCHEDULER_GROUP};
use honua_shared::metrics as m;
use honua_shared::partition::Rotation;
use honua_shared::record::ProcessRecord;
use honua_shared::store::{Commit, Entry, Service, StoreError};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Counters a scheduler keeps.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub submissions: AtomicU64,
    pub events: AtomicU64,
    pub conflicts: AtomicU64,
    pub promoted: AtomicU64,
    pub quarantined: AtomicU64,
    pub groups_recreated: AtomicU64,
    /// Server time (ms) of the last completed timer round: loop liveness.
    pub last_tick_ms: AtomicU64,
}

pub struct Scheduler {
    engine: Processes,
    id: String,
    stats: Arc<SchedulerStats>,
}

impl Scheduler {
    pub fn new(engine: Processes) -> Self {
        // Installs the metrics recorder before anything is counted, and exports the
        // process counters at 0 for every known type so rate()/increase() see the first
        // event too.
        honua_runtime::telemetry::metrics_handle();
        for name in engine.defs.names() {
            for counter in [
                m::PROCESS_STARTED,
                m::PROCESS_COMPLETED,
                m::PROCESS_TIMEOUTS,
                m::PROCESS_CANCELLED,
            ] {
                metrics::counter!(counter, "process_type" => name.to_string()).increment(0);
            }
        }
        let id = engine
            .cfg
            .scheduler
            .id
            .clone()
            .unwrap_or_else(|| honua_shared::config::default_instance_id("scheduler"));
        Self {
            engine,
            id,
            stats: Arc::new(SchedulerStats::default()),
        }
    }

    pub fn stats(&self) -> Arc<SchedulerStats> {
        self.stats.clone()
    }

    /// Runs every loop until `shutdown` fires: for each of the submission, event and
    /// result streams one reader over every partition (one blocking connection each, see
    /// [`Rotation`]), and per partition its timer, takeover and intake loops (on the shared
    /// multiplexed connection).
    pub async fn run(self, shutdown: CancellationToken) {
        let me = Arc::new(self);
        let store = &me.engine.store;
        if !store
            .wait_ready(Service::Scheduler, shutdown.cancelled())
            .await
        {
            return;
        }
        info!(scheduler = %me.id, partitions = store.partitions(), "scheduler started");
        // One view of this scheduler per partition: its engine's store is the partition's.
        let parts: Arc<[Arc<Scheduler>]> = me
            .engine
            .all()
            .into_iter()
            .map(|engine| {
                Arc::new(Scheduler {
                    engine,
                    id: me.id.clone(),
                    stats: me.stats.clone(),
                })
            })
            .collect();
        let mut tasks = vec![
            tokio::spawn(reader(parts.clone(), Keys::submit, shutdown.clone())),
            tokio::spawn(reader(parts.clone(), Keys::events, shutdown.clone())),
            tokio::spawn(reader(parts.clone(), Keys::results, shutdown.clone())),
        ];
        for part in parts.iter() {
            tasks.push(tokio::spawn(part.clone().timers(shutdown.clone())));
            tasks.push(tokio::spawn(part.clone().takeover(shutdown.clone())));
            tasks.push(tokio::spawn({
                let (engine, shutdown) = (part.engine.clone(), shutdown.clone());
                async move { engine.run_intake(shutdown).await }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        info!(scheduler = %me.id, "scheduler stopped");
    }

    async fn handle(&self, stream: &Key, entries: Vec<Entry>) {
        if entries.is_empty() {
            return;
        }
        if *stream == self.engine.store.keys().submit() {
            for e in entries {
                self.handle_submission(e).await;
            }
        } else {
            self.handle_events(stream, entries).await;
        }
    }

    async fn quarantine(&self, stream: &Key, id: &str, reason: &str) {
        self.stats.quarantined.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::QUARANTINED, "stream" => stream_name(stream)).increment(1);
        error!(stream = %stream, entry = %id, %reason, "entry set aside in the quarantine stream");
        if let Err(e) = self
            .engine
            .store
            .drop_entry(stream, SCHEDULER_GROUP, id, reason, None)
            .await
        {
            warn!(error = %e, "quarantining failed; the entry stays pending");
        }
    }

    async fn handle_submission(&self, e: Entry) {
        let stream = self.engine.store.keys().submit();
        let sub = match Submission::from_fields(&e.fields) {
            Ok(s) => s,
            Err(err) => {
                return self
                    .quarantine(&stream, &e.id, &format!("invalid submission: {err}"))
                    .await;
            }
        };
        self.stats.submissions.fetch_add(1, Ordering::Relaxed);
        match self.engine.create(&sub, Some(&e.id)).await {
            Ok(s) => debug!(process_id = s.id(), "submission stored"),
            Err(SubmitError::Store(err)) => {
                // Left pending: retried by takeover once idle.
                warn!(error = %err, entry = %e.id, "submission not stored yet; will retry");
            }
            Err(err) => {
                self.quarantine(&stream, &e.id, &format!("rejected submission: {err}"))
                    .await
            }
        }
    }

    async fn handle_events(&self, stream: &Key, entries: Vec<Entry>) {
        // The results stream is the workers' (their Redis user may write no other event
        // stream): only what a worker reports is taken from it, so a worker login cannot
        // forge a signal, a timer or a timeout.
        let from_workers = *stream == self.engine.store.keys().results();
        let mut parsed = Vec::with_capacity(entries.len());
        for e in entries {
            match Event::from_fields(&e.fields) {
                Ok(ev) if from_workers && !ev.is_worker_report() => {
                    let kind = event_kind(&ev);
                    self.quarantine(
                        stream,
                        &e.id,
                        &format!("a {kind} event is not accepted from the results stream"),
                    )
                    .await
                }
                Ok(ev) => parsed.push((e.id, ev)),
                Err(err) => {
                    self.quarantine(stream, &e.id, &format!("invalid event: {err}"))
                        .await
                }
            }
        }
        if parsed.is_empty() {
            return;
        }
        // One round trip for every record. The first event of each process is decided from
        // that snapshot and every such commit goes out in one pipeline (each commit is its
        // own revision-checked script, so this is the same as sending them one by one, minus
        // the round trips). Later events of a process already seen in this batch, and
        // commits that lost a revision race, re-read and go one by one.
        let ids: Vec<&str> = parsed.iter().map(|(_, ev)| ev.process_id()).collect();
        let (now, recs) = match self.engine.store.load_processes(&ids).await {
            Ok(loaded) => loaded,
            Err(e) => {
                warn!(error = %e, "loading records failed; events stay pending");
                return;
            }
        };
        let mut seen = std::collections::HashSet::new();
        let mut batch = Vec::with_capacity(parsed.len());
        let mut again = Vec::new();
        for ((entry_id, ev), (meta, steps)) in parsed.iter().zip(recs) {
            self.stats.events.fetch_add(1, Ordering::Relaxed);
            if !seen.insert(ev.process_id()) {
                again.push((entry_id.as_str(), ev));
                continue;
            }
            match self.prepare(stream, entry_id, ev, now, &meta, &steps).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) => {}
                Err(e) => warn!(error = %e, entry = %entry_id, "event not applied yet; will retry"),
            }
        }
        let calls: Vec<&CommitCall> = batch.iter().map(|(call, _)| call).collect();
        // `None`: nothing is known about which commits of the batch applied. Every event of
        // it then re-reads its record (an applied commit acknowledged its entry, and
        // replaying its event changes nothing).
        let answers: Vec<Option<Result<Commit, StoreError>>> =
            match self.engine.store.commit_many(&calls).await {
                Ok(a) => a.into_iter().map(Some).collect(),
                Err(e) => {
                    warn!(error = %e, "committing a batch failed; applying its events one by one");
                    (0..batch.len()).map(|_| None).collect()
                }
            };
        for ((_, p), answer) in batch.into_iter().zip(answers) {
            let (entry_id, ev) = (p.entry_id, p.ev);
            let retry = match answer {
                Some(Ok(c)) => self.committed(p, c),
                Some(Err(_)) => {
                    // E.g. the function library is missing (a fresh server): the one-by-one
                    // path loads it and retries.
                    p.span.record("honua.commit", "error");
                    true
                }
                None => {
                    p.span.record("honua.commit", "error");
                    true
                }
            };
            if retry {
                again.push((entry_id, ev));
            }
        }
        // In stream order, so events of one process apply in the order they were written.
        again.sort_by_key(|(id, _)| stream_order(id));
        for (entry_id, ev) in again {
            if let Err(e) = self.apply_event(stream, entry_id, ev).await {
                warn!(error = %e, entry = %entry_id, "event not applied yet; will retry");
            }
        }
    }

    /// Decides one event from a record snapshot: `Some` commit to send, or `None` when the
    /// event was dealt with here (dropped, quarantined, or left for another scheduler).
    async fn prepare<'e>(
        &self,
        stream: &Key,
        entry_id: &'e str,
        ev: &'e Event,
        now: u64,
        meta: &std::collections::HashMap<String, String>,
        steps: &std::collections::HashMap<String, String>,
    ) -> Result<Option<(CommitCall, Prepared<'e>)>, StoreError> {
        let store = &self.engine.store;
        let pid = ev.process_id();
        let rec = match ProcessRecord::parse(pid, meta, steps) {
            Ok(Some(r)) => r,
            Ok(None) => {
                debug!(process_id = %pid, "event for a process that no longer exists");
                store
                    .drop_entry(stream, SCHEDULER_GROUP, entry_id, "", None)
                    .await?;
                return Ok(None);
            }
            Err(err) => {
                self.quarantine(
                    stream,
                    entry_id,
                    &format!("process {pid} record is corrupt: {err}"),
                )
                .await;
                return Ok(None);
            }
        };
        let Some(def) = self.engine.defs.get(&rec.process_type, rec.version) else {
            error!(process_id = %pid, process_type = %rec.process_type, version = rec.version, "definition not loaded on this scheduler; event left for another");
            return Ok(None);
        };
        let ctx = Ctx {
            def,
            kinds: &self.engine.kinds,
            now_ms: now,
            jitter: rand::random(),
        };
        let t = engine::on_event(&ctx, &rec, ev);
        for n in &t.notes {
            debug!(process_id = %pid, note = %n);
        }
        if t.is_empty() {
            store
                .drop_entry(stream, SCHEDULER_GROUP, entry_id, "", None)
                .await?;
            return Ok(None);
        }
        let call = t.to_commit(
            store.keys(),
            pid,
            Some(rec.revision()),
            now,
            self.engine.cfg.retention_secs,
            Some(AckSource {
                stream: stream.clone(),
                id: entry_id,
            }),
        );
        let status_after = t
            .actions
            .iter()
            .find_map(|a| match a {
                engine::Action::Finish { status, .. } | engine::Action::SetStatus(status) => {
                    Some(*status)
                }
                _ => None,
            })
            .unwrap_or(rec.status);
        let span = tracing::info_span!(
            parent: None,
            "process.transition",
            honua.process_id = %pid,
            honua.process_type = %rec.process_type,
            honua.event = event_kind(ev),
            honua.status = status_after.as_str(),
            honua.commit = tracing::field::Empty,
        );
        honua_runtime::telemetry::set_parent(
            &span,
            &honua_shared::envelope::TraceContext {
                traceparent: rec.trace.clone(),
                tracestate: None,
            },
        );
        Ok(Some((
            call,
            Prepared {
                entry_id,
                ev,
                now,
                rec,
                t,
                span,
            },
        )))
    }

    /// Records the answer of one commit. Returns true when the event must be decided again
    /// from a fresh read (a revision conflict).
    fn committed(&self, p: Prepared<'_>, committed: Commit) -> bool {
        let Prepared {
            now, rec, t, span, ..
        } = p;
        let pid = &rec.id;
        span.record(
            "honua.commit",
            match &committed {
                Commit::Ok => "ok",
                Commit::Conflict => "conflict",
                _ => "discarded",
            },
        );
        let _entered = span.enter();
        match committed {
            Commit::Ok => {
                if let Some((status, error)) = t.finish() {
                    let took = rec.duration_ms(now).unwrap_or(0);
                    let code = t.actions.iter().find_map(|a| match a {
                        honua_shared::engine::Action::Finish { code, .. } => code.as_deref(),
                        _ => None,
                    });
                    crate::record_finish(&rec.process_type, status, code, took);
                    match error {
                        Some(err) => {
                            warn!(process_id = %pid, process_type = %rec.process_type, status = %status, error = %err, duration_ms = took, "Process {pid} failed: {err}")
                        }
                        None => {
                            info!(process_id = %pid, process_type = %rec.process_type, status = %status, duration_ms = took, "Process {pid} completed, duration {took} ms")
                        }
                    }
                }
                false
            }
            Commit::Conflict => {
                self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::COMMIT_CONFLICTS).increment(1);
                true
            }
            Commit::Gone | Commit::Exists | Commit::Duplicate(_) | Commit::Closed => false,
        }
    }

    /// Decides and commits one event from a fresh read, re-reading on a revision conflict
    /// ([`Processes::decide_and_commit`]); an event that loses every race stays pending.
    async fn apply_event(
        &self,
        stream: &Key,
        entry_id: &str,
        ev: &Event,
    ) -> Result<(), StoreError> {
        let store = &self.engine.store;
        let pid = ev.process_id();
        let applied: Option<()> = self
            .engine
            .decide_and_commit(
                || async move {
                    let (now, mut v) = store.load_processes(&[pid]).await?;
                    let (meta, steps) = v.remove(0);
                    Ok(
                        match self
                            .prepare(stream, entry_id, ev, now, &meta, &steps)
                            .await?
                        {
                            None => Decision::Done(()),
                            Some((call, p)) => Decision::Commit {
                                call,
                                span: p.span.clone(),
                                then: p,
                            },
                        },
                    )
                },
                |p, committed| {
                    if committed.is_err() {
                        p.span.record("honua.commit", "error");
                    }
                    Ok::<_, StoreError>(if self.committed(p, committed?) {
                        Answered::Conflict
                    } else {
                        Answered::Done(())
                    })
                },
            )
            .await?;
        if applied.is_none() {
            warn!(process_id = %pid, "{CONFLICT_BOUND} revision conflicts in a row; event left pending");
        }
        Ok(())
    }

    async fn timers(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.engine.cfg.scheduler.timer_interval_ms);
        let store = &self.engine.store;
        let mut last_trim = 0u64;
        let mut last_sample = 0u64;
        let mut last_stream_trim = 0u64;
        while !shutdown.is_cancelled() {
            match store.promote(1000).await {
                Ok((moved, _next, now)) => {
                    self.stats.last_tick_ms.store(now, Ordering::Relaxed);
                    if now.saturating_sub(last_stream_trim) >= STREAM_TRIM_MS {
                        last_stream_trim = now;
                        match store.trim_streams(STREAM_TRIM_LIMIT).await {
                            Ok(n) if n > 0 => {
                                debug!(removed = n, "trimmed acknowledged stream entries")
                            }
                            Ok(_) => {}
                            Err(e) => debug!(error = %e, "trimming streams failed"),
                        }
                    }
                    // Partition 0's loop samples the gauges of every partition.
                    if store.partition() == 0 && now.saturating_sub(last_sample) >= 5_000 {
                        last_sample = now;
                        self.sample_fleet(now).await;
                    }
                    if now.saturating_sub(last_trim) > 60_000 {
                        last_trim = now;
                        match store
                            .trim_indexes(now, self.engine.cfg.retention_secs)
                            .await
                        {
                            Ok(n) if n > 0 => debug!(removed = n, "trimmed expired index entries"),
                            Ok(_) => {}
                            Err(e) => debug!(error = %e, "trimming indexes failed"),
                        }
                        // A cluster primary that joined since (or a flushed server) gets
                        // the library before a worker, which may not load it, calls there
                        // (`FUNCTION LOAD` goes to every primary: partition 0's loop asks).
                        if store.partition() == 0
                            && let Err(e) = store.load_scripts().await
                        {
                            debug!(error = %e, "checking the function library failed")
                        }
                    }
                    if moved > 0 {
                        self.stats.promoted.fetch_add(moved, Ordering::Relaxed);
                        if moved >= 1000 {
                            continue;
                        }
                    }
                }
                Err(e) => {
                    metrics::gauge!(m::REDIS_UP).set(0.0);
                    debug!(error = %e, "promoting timers failed")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Samples the fleet-wide gauges from Redis (every replica exports the same values):
    /// totals over every partition, and the queue gauges per stream — per partition too
    /// (label `partition`) when there are several.
    async fn sample_fleet(&self, now: u64) {
        let store = &self.engine.store;
        let parts = store.all();
        let labelled = parts.len() > 1;
        let mut ok = true;
        let (mut active, mut oldest_active) = (0u64, None::<u64>);
        let (mut draining, mut pending, mut paused) = (false, 0u64, 0u64);
        for part in &parts {
            match part.active_summary().await {
                Ok((n, oldest)) => {
                    active += n;
                    oldest_active = match (oldest_active, oldest) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Err(_) => ok = false,
            }
            let keys = part.keys();
            for (stream, group) in [
                (keys.submit(), SCHEDULER_GROUP),
                (keys.jobs(), honua_shared::keys::WORKERS_GROUP),
                (keys.events(), SCHEDULER_GROUP),
                (keys.results(), SCHEDULER_GROUP),
            ] {
                let mut labels = vec![("stream", stream_name(&stream).to_string())];
                if labelled {
                    labels.push(("partition", part.partition().to_string()));
                }
                match part.stream_stats(&stream, group).await {
                    Ok(s) => {
                        metrics::gauge!(m::QUEUE_LENGTH, &labels).set(s.length as f64);
                        metrics::gauge!(m::QUEUE_LAG, &labels)
                            .set(s.lag.unwrap_or(s.length) as f64);
                        metrics::gauge!(m::QUEUE_PENDING, &labels).set(s.pending as f64);
                        let age = s
                            .oldest_pending_ms
                            .map(|t| now.saturating_sub(t) as f64 / 1000.0)
                            .unwrap_or(0.0);
                        metrics::gauge!(m::QUEUE_OLDEST_PENDING_AGE, &labels).set(age);
                    }
                    Err(_) => ok = false,
                }
            }
            match (
                part.intake().await,
                part.status_count(honua_shared::status::ProcessStatus::Pending)
                    .await,
                part.status_count(honua_shared::status::ProcessStatus::Paused)
                    .await,
            ) {
                (Ok(intake), Ok(n_pending), Ok(n_paused)) => {
                    draining |= intake.is_some();
                    pending += n_pending;
                    paused += n_paused;
                }
                _ => ok = false,
            }
        }
        metrics::gauge!(m::ACTIVE_PROCESSES).set(active as f64);
        let age = oldest_active.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
        metrics::gauge!(m::OLDEST_ACTIVE_AGE).set(age);
        metrics::gauge!(m::INTAKE_DRAINING).set(if draining { 1.0 } else { 0.0 });
        metrics::gauge!(m::PENDING_PROCESSES).set(pending as f64);
        metrics::gauge!(m::PAUSED_PROCESSES).set(paused as f64);
        match store.workers(1000).await {
            Ok(ws) => {
                let live = ws
                    .iter()
                    .filter(|w| now.saturating_sub(w.last_seen_ms) < 30_000)
                    .count();
                metrics::gauge!(m::WORKERS_LIVE).set(live as f64);
            }
            Err(_) => ok = false,
        }
        metrics::gauge!(m::REDIS_UP).set(if ok { 1.0 } else { 0.0 });
    }

    /// Takes over submissions and events left pending by a stopped scheduler (or by this
    /// one after a Redis error).
    async fn takeover(self: Arc<Self>, shutdown: CancellationToken) {
        let idle = Duration::from_millis(self.engine.cfg.scheduler.reclaim_idle_ms);
        let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
        let store = &self.engine.store;
        let keys = store.keys().clone();
        while !shutdown.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(honua_runtime::jitter(every)) => {}
                _ = shutdown.cancelled() => return,
            }
            for stream in [keys.submit(), keys.events(), keys.results()] {
                let mut cursor = "0-0".to_string();
                for _ in 0..10 {
                    match store
                        .autoclaim(&stream, SCHEDULER_GROUP, &self.id, idle, &cursor, 100)
                        .await
                    {
                        Ok((next, entries)) => {
                            if !entries.is_empty() {
                                info!(count = entries.len(), stream = %stream, "took over pending entries");
                            }
                            self.handle(&stream, entries).await;
                            if next == "0-0" {
                                break;
                            }
                            cursor = next;
                        }
                        Err(e) => {
                            debug!(error = %e, "takeover failed");
                            break;
                        }
                    }
                }
            }
        }
    }
}

/// Reads one stream (`stream_of` names it in a partition's keys) of every partition
/// through one consumer group and one blocking connection, in [`Rotation`]: with one
/// partition every read blocks as long as `read_block_ms`; with several, busy partitions are
/// read in turn without blocking and an idle turn blocks briefly on each, so one scheduler
/// holds three blocking connections whatever the partition count.
async fn reader(
    parts: Arc<[Arc<Scheduler>]>,
    stream_of: fn(&Keys) -> Key,
    shutdown: CancellationToken,
) {
    let Some(first) = parts.first() else {
        return;
    };
    let cfg = &first.engine.cfg.scheduler;
    let block = Duration::from_millis(cfg.read_block_ms);
    let Ok(mut conn) = first.engine.store.blocking(block) else {
        return;
    };
    let mut rotation = Rotation::all(parts.len() as u16, block);
    let mut backoff = Duration::from_millis(50);
    while !shutdown.is_cancelled() {
        let (p, wait) = rotation.next_read();
        let Some(me) = parts.get(usize::from(p)) else {
            continue;
        };
        let store = &me.engine.store;
        let stream = stream_of(store.keys());
        let r = store
            .read_group(&mut conn, &stream, SCHEDULER_GROUP, &me.id, cfg.batch, wait)
            .await;
        match r {
            Ok(entries) => {
                backoff = Duration::from_millis(50);
                rotation.found(entries.len());
                me.handle(&stream, entries).await;
            }
            Err(StoreError::NoGroup { stream: s, group }) => {
                rotation.found(0);
                error!(stream = %s, %group, "consumer group missing (server restarted without data?); recreating it");
                me.stats.groups_recreated.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::GROUPS_RECREATED, "stream" => stream_name(&stream))
                    .increment(1);
                let _ = store.ensure_groups().await;
            }
            Err(e) => {
                rotation.found(0);
                warn!(error = %e, stream = %stream, "reading failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(honua_runtime::jitter(backoff)) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// How often (server ms) the timer loop trims acknowledged entries off the streams, and
/// at most how many entries one trim removes per stream (whole nodes of
/// `stream-node-max-entries`, 100 by default). Scripts acknowledge without deleting, so a
/// stream holds its live work plus at most this interval's acknowledged entries.
const STREAM_TRIM_MS: u64 = 250;
const STREAM_TRIM_LIMIT: usize = 20_000;

/// The stream's short name for metric labels (`submit`, `jobs`, `events`, `results`).
fn stream_name(stream: &Key) -> &'static str {
    let s = stream.as_str();
    if s.ends_with(":jobs") {
        "jobs"
    } else if s.ends_with(":events") {
        "events"
    } else if s.ends_with(":results") {
        "results"
    } else {
        "submit"
    }
}

/// The event's type tag (a span attribute).
fn event_kind(ev: &Event) -> &'static str {
    use honua_shared::envelope::event_type as t;
    match ev {
        Event::Step { .. } => t::STEP,
        Event::DeadLetter { .. } => t::DEAD_LETTER,
        Event::Timer { .. } => t::TIMER,
        Event::StepTimeout { .. } => t::STEP_TIMEOUT,
        Event::ProcessTimeout { .. } => t::PROCESS_TIMEOUT,
        Event::Signal { .. } => t::SIGNAL,
    }
}

/// One decided transition, ready to commit (its commit call goes beside it).
struct Prepared<'e> {
    entry_id: &'e str,
    ev: &'e Event,
    now: u64,
    rec: ProcessRecord,
    t: engine::Transition,
    span: tracing::Span,
}

/// A stream entry id (`ms-seq`) as a sortable pair; unparsable ids sort last.
fn stream_order(id: &str) -> (u64, u64) {
    let mut it = id
        .splitn(2, '-')
        .map(|p| p.parse::<u64>().unwrap_or(u64::MAX));
    (it.next().unwrap_or(u64::MAX), it.next().unwrap_or(u64::MAX))
}
