//! Operator actions on processes (cancel, retry, retry-current-step, signal, purge) and
//! listing, shared by the HTTP API and tests. Every state change is a pure decision in
//! `honua_shared::engine` applied by one revision-checked `commit.lua` call.

use crate::processes::{Answered, Decision, Processes};
use honua_shared::engine::{self, Ctx, OpError, Transition};
use honua_shared::envelope::Event;
use honua_shared::record::ProcessRecord;
use honua_shared::status::ProcessStatus;
use honua_shared::store::{Commit, StoreError};
use serde_json::Value;
use std::time::Duration;

/// Why an operator action failed, typed by the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("no process {0}")]
    NotFound(String),
    /// Not allowed in the process's current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    #[error("process record is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<OpError> for OpsError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::UnknownStep(_) => OpsError::Invalid(e.to_string()),
            OpError::InvalidState(..) => OpsError::Conflict(e.to_string()),
        }
    }
}

/// Filters of `GET /api/processes`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub status: Option<ProcessStatus>,
    pub since: Option<Duration>,
    pub process_type: Option<String>,
    pub limit: usize,
    pub cursor: Option<String>,
    /// Only unfinished processes.
    pub active: bool,
}

/// Names `by` as the author of the audit entry `t` appends (the last one of its list).
fn stamp_audit(t: &mut Transition, by: Option<&str>) {
    let Some(by) = by else { return };
    for a in &mut t.actions {
        if let engine::Action::Audit(list) = a
            && let Some(last) = list.last_mut()
        {
            last.by = Some(by.to_string());
        }
    }
}

/// Parses `24h`, `7d`, `30m`, `90s` (and any humantime duration).
pub fn parse_age(s: &str) -> Result<Duration, OpsError> {
    humantime::parse_duration(s.trim())
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| OpsError::Invalid(format!("{s:?} is not a duration like 30m, 24h or 7d")))
}

/// The highest score a listing starts from (and a cursor may name).
const CURSOR_MAX_SCORE: u64 = u64::MAX / 2;
/// The largest offset a cursor may name: Redis takes `LIMIT offset` as a signed 64-bit
/// number, and no index holds more entries with one score than this.
const CURSOR_MAX_OFFSET: usize = i32::MAX as usize;

/// A `score:offset` cursor from `x-next-cursor`; anything else is bad input.
fn parse_cursor(c: &str) -> Result<(u64, usize), OpsError> {
    let bad = || OpsError::Invalid(format!("bad cursor {c:?}: pass x-next-cursor as given"));
    let (m, o) = c.split_once(':').ok_or_else(bad)?;
    let max: u64 = m.parse().map_err(|_| bad())?;
    let offset: usize = o.parse().map_err(|_| bad())?;
    if max > CURSOR_MAX_SCORE || offset > CURSOR_MAX_OFFSET {
        return Err(bad());
    }
    Ok((max, offset))
}

/// The per-partition positions of a listing over several partitions: one `score:offset`
/// per partition, or `-` for a partition with nothing left, comma-separated in partition
/// order (`None`: every partition from the top). With one partition a cursor is the plain
/// `score:offset` of [`parse_cursor`].
fn parse_cursors(c: Option<&str>, partitions: u16) -> Result<Vec<Option<(u64, usize)>>, OpsError> {
    let Some(c) = c else {
        return Ok(vec![Some((CURSOR_MAX_SCORE, 0)); usize::from(partitions)]);
    };
    let bad = || OpsError::Invalid(format!("bad cursor {c:?}: pass x-next-cursor as given"));
    let positions = c
        .split(',')
        .map(|p| match p {
            "-" => Ok(None),
            p => parse_cursor(p).map(Some).map_err(|_| bad()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if positions.len() != usize::from(partitions) {
        return Err(bad());
    }
    Ok(positions)
}

/// The cursor [`parse_cursors`] reads.
fn format_cursors(positions: &[Option<(u64, usize)>]) -> String {
    positions
        .iter()
        .map(|p| match p {
            Some((score, offset)) => format!("{score}:{offset}"),
            None => "-".to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Paging through a score index, highest score first, in batches, by the `score:offset`
/// cursor of `x-next-cursor` ([`Processes::list`]'s scheme): the next page starts below the
/// last entry scanned (its score, and how many entries with exactly that score were
/// scanned), so entries indexed meanwhile neither repeat nor hide entries of the next page.
#[derive(Debug, Clone)]
pub(crate) struct CursorPage {
    max: u64,
    offset: usize,
    last: (u64, usize),
    remaining: usize,
    exhausted: bool,
}

/// Pages over the partitions of a deployment, one after the other, each through its own
/// [`CursorPage`], by a cursor of per-partition positions ([`parse_cursors`]; with one
/// partition the plain `score:offset` cursor).
pub(crate) fn partitioned_pages(
    cursor: Option<&str>,
    partitions: u16,
) -> Result<Vec<Option<(u64, usize)>>, OpsError> {
    if partitions <= 1 {
        return Ok(vec![Some(match cursor {
            None => (CURSOR_MAX_SCORE, 0),
            Some(c) => parse_cursor(c)?,
        })]);
    }
    parse_cursors(cursor, partitions)
}

/// The next cursor of [`partitioned_pages`]' positions (`None` when every one is done).
pub(crate) fn partitioned_cursor(positions: &[Option<(u64, usize)>]) -> Option<String> {
    match positions {
        [] => None,
        [one] => one.map(|(score, offset)| format!("{score}:{offset}")),
        many => many
            .iter()
            .any(Option::is_some)
            .then(|| format_cursors(many)),
    }
}

/// A page of at most `limit` entries from position (`max`, `offset`).
pub(crate) fn cursor_page_at((max, offset): (u64, usize), limit: usize) -> CursorPage {
    CursorPage {
        max,
        offset,
        last: (max, offset),
        remaining: limit,
        exhausted: false,
    }
}

impl CursorPage {
    /// How many entries to read next (at most `batch`), `None` when the page is done.
    pub(crate) fn next_batch(&self, batch: usize) -> Option<usize> {
        (!self.exhausted && self.remaining > 0).then(|| batch.min(self.remaining))
    }
    /// How many more entries this page may scan.
    pub(crate) fn remaining(&self) -> usize {
        self.remaining
    }
    /// The highest score to read from (`ZREVRANGEBYSCORE max`).
    pub(crate) fn max_score(&self) -> u64 {
        self.max
    }
    /// How many entries from `max_score` down to skip (`LIMIT offset`).
    pub(crate) fn offset(&self) -> usize {
        self.offset
    }
    /// One entry read, with its score.
    pub(crate) fn scanned(&mut self, score: u64) {
        self.offset += 1;
        self.remaining = self.remaining.saturating_sub(1);
        self.last = if score == self.last.0 {
            (self.last.0, self.last.1 + 1)
        } else {
            (score, 1)
        };
    }
    /// The index has no more entries.
    pub(crate) fn exhausted(&mut self) {
        self.exhausted = true;
    }
    /// The next page's position (`score`, `offset`), while the index may have entries left.
    pub(crate) fn position(&self) -> Option<(u64, usize)> {
        (!self.exhausted).then_some(self.last)
    }
}

impl Processes {
    /// The record and the server time.
    pub async fn load(&self, id: &str) -> Result<(ProcessRecord, u64), OpsError> {
        if !honua_shared::envelope::valid_id(id) {
            return Err(OpsError::NotFound(id.to_string()));
        }
        let (now, mut v) = self.store.of(id).load_processes(&[id]).await?;
        let (meta, steps) = v.remove(0);
        match ProcessRecord::parse(id, &meta, &steps) {
            Ok(Some(r)) => Ok((r, now)),
            Ok(None) => Err(OpsError::NotFound(id.to_string())),
            Err(e) => Err(OpsError::Corrupt(e.to_string())),
        }
    }

    /// Decides with `decide` on a fresh snapshot and commits, re-reading on a revision
    /// conflict ([`Processes::decide_and_commit`]). Returns what `decide` returned besides
    /// the transition; an empty transition commits nothing. The audit entry the decision
    /// appends is stamped with `by`, the acting API key's name.
    async fn transition<T>(
        &self,
        id: &str,
        by: Option<&str>,
        decide: impl Fn(&Ctx<'_>, &ProcessRecord) -> Result<(Transition, T), OpsError>,
    ) -> Result<T, OpsError> {
        let decide = &decide;
        // The process's own partition: its keys, and its server's clock.
        let this = &self.of(id);
        let decided = this
            .decide_and_commit(
                || async move {
                    let (rec, now) = this.load(id).await?;
                    let def = self
                        .defs
                        .get(&rec.process_type, rec.version)
                        .ok_or_else(|| {
                            OpsError::Conflict(format!(
                                "definition {} v{} is not loaded on this gateway",
                                rec.process_type, rec.version
                            ))
                        })?
                        .clone();
                    let ctx = Ctx {
                        def: &def,
                        kinds: &self.kinds,
                        now_ms: now,
                        jitter: rand::random(),
                    };
                    let (mut t, extra) = decide(&ctx, &rec)?;
                    stamp_audit(&mut t, by);
                    if t.is_empty() {
                        return Ok(Decision::Done(extra));
                    }
                    let call = t.to_commit(
                        this.store.keys(),
                        id,
                        Some(rec.revision()),
                        now,
                        self.cfg.retention_secs,
                        None,
                    );
                    Ok(Decision::Commit {
                        call,
                        span: tracing::Span::current(),
                        then: extra,
                    })
                },
                |extra, committed| match committed? {
                    Commit::Ok => Ok(Answered::Done(extra)),
                    Commit::Conflict => Ok(Answered::Conflict),
                    Commit::Gone => Err(OpsError::NotFound(id.to_string())),
                    other => Err(OpsError::Store(StoreError::Reply {
                        script: "commit",
                        detail: format!("{other:?}"),
                    })),
                },
            )
            .await?;
        decided
            .ok_or_else(|| OpsError::Conflict("the process is changing too fast; try again".into()))
    }

    /// Cancels an unfinished process; its running steps stop within one heartbeat.
    pub async fn cancel(
        &self,
        id: &str,
        reason: Option<&str>,
        by: Option<&str>,
    ) -> Result<(), OpsError> {
        let (process_type, took) = self
            .transition(id, by, |ctx, rec| {
                let t = engine::cancel(ctx, rec, reason)?;
                Ok((
                    t,
                    (
                        rec.process_type.clone(),
                        rec.duration_ms(ctx.now_ms).unwrap_or(0),
                    ),
                ))
            })
            .await?;
        crate::record_finish(
            &process_type,
            ProcessStatus::Cancelled,
            Some("cancelled"),
            took,
        );
        tracing::info!(process_id = %id, "Process {id} cancelled");
        Ok(())
    }

    /// Pauses a running process ([`engine::pause`]): it starts no new step until resumed;
    /// with `hand_back` its running steps are fenced out at once and run again on resume.
    pub async fn pause(
        &self,
        id: &str,
        hand_back: bool,
        reason: Option<&str>,
        by: Option<&str>,
    ) -> Result<(), OpsError> {
        let process_type = self
            .transition(id, by, |ctx, rec| {
                Ok((
                    engine::pause(ctx, rec, hand_back, reason)?,
                    rec.process_type.clone(),
                ))
            })
            .await?;
        metrics::counter!(honua_shared::metrics::PROCESS_TRANSITIONS, "process_type" => process_type,
            "status" => ProcessStatus::Paused.as_str())
        .increment(1);
        tracing::info!(process_id = %id, hand_back, "Process {id} paused");
        Ok(())
    }

    /// Resumes a paused process ([`engine::resume`]): its held steps start, its timers and
    /// deadline go on with what they had left.
    pub async fn resume(&self, id: &str, by: Option<&str>) -> Result<(), OpsError> {
        let process_type = self
            .transition(id, by, |ctx, rec| {
                Ok((engine::resume(ctx, rec)?, rec.process_type.clone()))
            })
            .await?;
        metrics::counter!(honua_shared::metrics::PROCESS_TRANSITIONS, "process_type" => process_type,
            "status" => ProcessStatus::Running.as_str())
        .increment(1);
        tracing::info!(process_id = %id, "Process {id} resumed");
        Ok(())
    }

    /// Starts a Pending process (created while intake was drained). `Ok(false)` when it is
    /// no longer Pending (another scheduler started it, or it was cancelled).
    pub async fn start(&self, id: &str) -> Result<bool, OpsError> {
        let started = self
            .transition(id, None, |ctx, rec| {
                if rec.status != ProcessStatus::Pending {
                    return Ok((Transition::default(), None));
                }
                let timeout = self.cfg.process_timeout(&ctx.def.name, ctx.def.timeout);
                let t = engine::start(ctx, rec, timeout)?;
                Ok((t, Some(rec.process_type.clone())))
            })
            .await?;
        let Some(process_type) = started else {
            return Ok(false);
        };
        metrics::counter!(honua_shared::metrics::PROCESS_TRANSITIONS, "process_type" => process_type.clone(),
            "status" => ProcessStatus::Running.as_str())
        .increment(1);
        tracing::info!(process_id = %id, process_type = %process_type, "Process {id} started ({process_type}): intake resumed");
        Ok(true)
    }

    /// Re-runs a Failed, Cancelled or TimedOut process from its failed step
    /// ([`engine::retry`]), or with `from_step` any finished process (Completed too) from
    /// that step of its definition ([`engine::retry_from`]: it and the steps downstream run
    /// again, the ones it depends on keep their results); optionally merging `patch` (a JSON
    /// object) into its input first.
    pub async fn retry(
        &self,
        id: &str,
        from_step: Option<&str>,
        patch: Option<&Value>,
        by: Option<&str>,
    ) -> Result<(), OpsError> {
        let input = self.patched_input(id, patch).await?;
        self.transition(id, by, |ctx, rec| {
            let timeout = self.cfg.process_timeout(&rec.process_type, ctx.def.timeout);
            let t = match from_step {
                Some(step) => engine::retry_from(ctx, rec, step, timeout, input.clone())?,
                None => engine::retry(ctx, rec, timeout, input.clone())?,
            };
            Ok((t, ()))
        })
        .await?;
        tracing::info!(process_id = %id, from_step, "Process {id} retried");
        Ok(())
    }

    /// The process input with `patch` (a JSON object) merged in, encoded; `None` without a
    /// patch.
    async fn patched_input(
        &self,
        id: &str,
        patch: Option<&Value>,
    ) -> Result<Option<Vec<u8>>, OpsError> {
        Ok(match patch {
            None => None,
            Some(Value::Object(p)) => {
                let data = self.store.load_data(id).await?;
                let codec = self.cfg.codec();
                let mut input: Value = match data.get(honua_shared::keys::field::INPUT) {
                    Some(b) => codec.decode(b).map_err(|e| {
                        OpsError::Conflict(format!("the process input is unreadable: {e}"))
                    })?,
                    None => Value::Object(Default::default()),
                };
                if let Value::Object(obj) = &mut input {
                    for (k, v) in p {
                        obj.insert(k.clone(), v.clone());
                    }
                }
                Some(
                    codec
                        .encode(&input)
                        .map_err(|e| OpsError::Invalid(format!("patched input rejected: {e}")))?,
                )
            }
            Some(_) => return Err(OpsError::Invalid("statePatch must be a JSON object".into())),
        })
    }

    /// Re-enqueues the running, queued or delayed steps of a process now; the previous
    /// claims are fenced out. Returns the steps.
    pub async fn retry_current_step(
        &self,
        id: &str,
        by: Option<&str>,
    ) -> Result<Vec<String>, OpsError> {
        let steps = self
            .transition(id, by, |ctx, rec| Ok(engine::retry_current_step(ctx, rec)?))
            .await?;
        tracing::info!(process_id = %id, steps = ?steps, "Process {id} current step re-enqueued");
        Ok(steps)
    }

    /// Delivers a signal to a step waiting for it (approval gates). `value` must name an
    /// outcome the waiting step routes on (see [`engine::signal_route`]); anything else is
    /// refused and changes nothing.
    pub async fn signal(
        &self,
        id: &str,
        name: &str,
        value: &str,
        by: Option<&str>,
    ) -> Result<(), OpsError> {
        if engine::signal_outcome(value).is_none() {
            return Err(OpsError::Invalid(format!(
                "signal value {value:?} must be approve, reject or an outcome name"
            )));
        }
        let (rec, _) = self.load(id).await?;
        let def = self.defs.get(&rec.process_type, rec.version);
        let Some((def, step)) =
            def.and_then(|d| engine::waiting_for_signal(d, &rec, name).map(|s| (d, s)))
        else {
            return Err(OpsError::Conflict(format!(
                "process {id} has no step waiting for signal {name:?} (status {})",
                rec.status
            )));
        };
        if let Err(accepted) = engine::signal_route(def, &step.name, value) {
            return Err(OpsError::Invalid(format!(
                "signal value {value:?} is not an outcome step {} routes on; accepted values: {}",
                step.name,
                accepted.join(", ")
            )));
        }
        self.store
            .send_event(&Event::Signal {
                process_id: id.to_string(),
                name: name.to_string(),
                value: value.to_string(),
                by: by.map(str::to_string),
            })
            .await?;
        Ok(())
    }

    /// Deletes processes finished with `status` more than `older_than` ago. Running
    /// processes are never touched (only finished statuses are accepted, and the delete
    /// script re-checks the status).
    pub async fn purge(
        &self,
        status: ProcessStatus,
        older_than: Duration,
    ) -> Result<u64, OpsError> {
        if !status.is_finished() {
            return Err(OpsError::Invalid(format!(
                "only finished processes can be purged, not {status}"
            )));
        }
        let now = self.store.server_time_ms().await?;
        let cutoff = now.saturating_sub(older_than.as_millis() as u64);
        let mut deleted = 0;
        for store in self.store.all() {
            let key = store.keys().index_status(status);
            loop {
                let page = store.index_page(&key, 0, cutoff, 0, 500).await?;
                if page.is_empty() {
                    break;
                }
                let ids: Vec<String> = page.into_iter().map(|(id, _)| id).collect();
                let n = store.purge(status, &ids).await?;
                deleted += n;
                if n == 0 {
                    break;
                }
            }
        }
        tracing::info!(status = %status, deleted, "purged finished processes");
        Ok(deleted)
    }

    /// One page of processes, newest first, and the cursor of the next page. With several
    /// partitions their indexes are merged in order ([`Processes::list_merged`]).
    pub async fn list(
        &self,
        q: &ListQuery,
    ) -> Result<(Vec<ProcessRecord>, Option<String>), OpsError> {
        if self.store.partitions() > 1 {
            return self.list_merged(q).await;
        }
        self.list_one(q).await
    }

    /// The index a listing with `q`'s filters reads, in `keys`' partition.
    fn list_index(keys: &honua_shared::keys::Keys, q: &ListQuery) -> honua_shared::keys::Key {
        // Finished statuses are indexed by end time, the others by creation time; Pending
        // processes (intake drained) and Paused ones (by pause time) have their own index.
        match q.status {
            Some(s)
                if s.is_finished()
                    || matches!(s, ProcessStatus::Pending | ProcessStatus::Paused) =>
            {
                keys.index_status(s)
            }
            Some(_) => keys.index_active(),
            None if q.active => keys.index_active(),
            None => keys.index_all(),
        }
    }

    /// Whether record `r` passes `q`'s filters.
    fn listed(q: &ListQuery, r: &ProcessRecord) -> bool {
        !(q.status.is_some_and(|s| s != r.status)
            || q.process_type
                .as_ref()
                .is_some_and(|t| *t != r.process_type))
    }

    /// [`Processes::list`] over several partitions: each partition's index is read in
    /// batches and the batches merged by score (ties: lower partition first), so the page
    /// is in the same order as one index of every process would give. The cursor holds one
    /// position per partition ([`parse_cursors`]); an entry counts as scanned (moves its
    /// partition's position) only once it is merged into the page, so fetched entries that
    /// did not fit are read again by the next page.
    async fn list_merged(
        &self,
        q: &ListQuery,
    ) -> Result<(Vec<ProcessRecord>, Option<String>), OpsError> {
        use std::collections::VecDeque;
        struct Part {
            store: honua_shared::store::Store,
            key: honua_shared::keys::Key,
            max: u64,
            /// Entries below `max` fetched so far (the next fetch's `LIMIT offset`).
            fetched: usize,
            /// The cursor position: (score, entries with that score scanned).
            last: (u64, usize),
            buf: VecDeque<(u64, Option<ProcessRecord>)>,
            /// The index had nothing left after the last fetch.
            exhausted: bool,
        }
        let parts_n = self.store.partitions();
        let now = self.store.server_time_ms().await?;
        let limit = q.limit.clamp(1, 1000);
        let min = q
            .since
            .map(|d| now.saturating_sub(d.as_millis() as u64))
            .unwrap_or(0);
        let positions = parse_cursors(q.cursor.as_deref(), parts_n)?;
        let mut parts: Vec<Part> = self
            .store
            .all()
            .into_iter()
            .zip(positions)
            .map(|(store, pos)| {
                let (max, offset) = pos.unwrap_or((0, 0));
                Part {
                    key: Self::list_index(store.keys(), q),
                    store,
                    max,
                    fetched: offset,
                    last: (max, offset),
                    buf: VecDeque::new(),
                    exhausted: pos.is_none(),
                }
            })
            .collect();
        let mut out = Vec::new();
        // Each fetch reads a share of the page from one partition (a partition is fetched
        // again once its share is merged, e.g. when filters skip entries); in all at most
        // about as many entries as a listing of one partition scans (20 pages' worth).
        let batch = (limit / parts.len() + 1).max(limit.min(10));
        let mut fetches = 20 * limit.div_ceil(batch) + parts.len();
        'page: while out.len() < limit {
            for part in parts.iter_mut() {
                if !part.buf.is_empty() || part.exhausted {
                    continue;
                }
                if fetches == 0 {
                    break 'page;
                }
                fetches -= 1;
                let page = part
                    .store
                    .index_page(&part.key, min, part.max, part.fetched, batch)
                    .await?;
                part.exhausted = page.len() < batch;
                part.fetched += page.len();
                let ids: Vec<&str> = page.iter().map(|(id, _)| id.as_str()).collect();
                let (_, recs) = part.store.load_processes(&ids).await?;
                for ((id, score), (meta, steps)) in page.iter().zip(recs) {
                    let rec = ProcessRecord::parse(id, &meta, &steps).ok().flatten();
                    part.buf.push_back((*score, rec));
                }
            }
            // Every partition that may hold more has entries buffered: the highest head
            // is the next entry of the merged order.
            let Some(part) = parts
                .iter_mut()
                .filter(|p| !p.buf.is_empty())
                .reduce(|a, b| if b.buf[0].0 > a.buf[0].0 { b } else { a })
            else {
                break;
            };
            let Some((score, rec)) = part.buf.pop_front() else {
                break;
            };
            part.last = if score == part.last.0 {
                (part.last.0, part.last.1 + 1)
            } else {
                (score, 1)
            };
            if let Some(r) = rec
                && Self::listed(q, &r)
            {
                out.push(r);
            }
        }
        let positions: Vec<Option<(u64, usize)>> = parts
            .iter()
            .map(|p| (!(p.exhausted && p.buf.is_empty())).then_some(p.last))
            .collect();
        let more = positions.iter().any(Option::is_some) || out.len() == limit;
        Ok((out, more.then(|| format_cursors(&positions))))
    }

    /// [`Processes::list`] on one partition.
    async fn list_one(
        &self,
        q: &ListQuery,
    ) -> Result<(Vec<ProcessRecord>, Option<String>), OpsError> {
        let keys = self.store.keys();
        let now = self.store.server_time_ms().await?;
        let limit = q.limit.clamp(1, 1000);
        let key = Self::list_index(keys, q);
        let min = q
            .since
            .map(|d| now.saturating_sub(d.as_millis() as u64))
            .unwrap_or(0);
        let (max, mut offset) = match &q.cursor {
            None => (CURSOR_MAX_SCORE, 0usize),
            Some(c) => parse_cursor(c)?,
        };
        // The next page starts below the last entry scanned: the cursor is its score and how
        // many entries with exactly that score were scanned, so processes indexed after
        // this page (newer scores) neither repeat nor hide items of the next one.
        let mut last = (max, offset);
        let mut out = Vec::new();
        let mut exhausted = false;
        for _ in 0..20 {
            let page = self.store.index_page(&key, min, max, offset, limit).await?;
            if page.len() < limit {
                exhausted = true;
            }
            let ids: Vec<&str> = page.iter().map(|(id, _)| id.as_str()).collect();
            let (_, recs) = self.store.load_processes(&ids).await?;
            for ((id, score), (meta, steps)) in page.iter().zip(recs) {
                offset += 1;
                last = if *score == last.0 {
                    (last.0, last.1 + 1)
                } else {
                    (*score, 1)
                };
                let Ok(Some(r)) = ProcessRecord::parse(id, &meta, &steps) else {
                    continue;
                };
                if !Self::listed(q, &r) {
                    continue;
                }
                out.push(r);
                if out.len() == limit {
                    break;
                }
            }
            if out.len() == limit || exhausted {
                break;
            }
        }
        // A page the filters left short (or empty) still has a cursor while the index has
        // entries left to scan.
        let more = !exhausted || out.len() == limit;
        let next = more.then(|| format!("{}:{}", last.0, last.1));
        Ok((out, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitioned_cursor_reads_back_what_it_wrote() {
        let positions = vec![
            Some((1_700_000_000_000, 2)),
            None,
            Some((CURSOR_MAX_SCORE, 0)),
        ];
        let c = format_cursors(&positions);
        assert_eq!(c, format!("1700000000000:2,-,{CURSOR_MAX_SCORE}:0"));
        assert_eq!(parse_cursors(Some(&c), 3).unwrap(), positions);
        assert_eq!(partitioned_cursor(&positions), Some(c));
        // From the top: every partition at the highest score.
        assert_eq!(
            parse_cursors(None, 2).unwrap(),
            vec![Some((CURSOR_MAX_SCORE, 0)); 2]
        );
        // Every partition done: no next page.
        assert_eq!(partitioned_cursor(&[None, None]), None);
    }

    #[test]
    fn a_cursor_of_another_shape_is_refused() {
        for bad in [
            "12:0",
            "1:0,2:0",
            "1:0,x,2:0",
            "1:0,,2:0",
            "1:0,2:0,3:0,4:0",
        ] {
            assert!(
                matches!(parse_cursors(Some(bad), 3), Err(OpsError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn one_partition_keeps_the_plain_cursor() {
        assert_eq!(
            partitioned_pages(Some("5:1"), 1).unwrap(),
            vec![Some((5, 1))]
        );
        assert_eq!(partitioned_cursor(&[Some((5, 1))]), Some("5:1".into()));
        assert_eq!(partitioned_cursor(&[None]), None);
        assert!(partitioned_pages(Some("5:1,-"), 1).is_err());
    }
}
