//! Compiles a decided [`Transition`] into the arguments of one `commit.lua` call: the
//! engine's actions become op codes over a table of hash-tagged keys. This is where the
//! decisions meet the key layout; [`crate::engine`] itself stays pure.

use crate::engine::{Action, Transition};
use crate::envelope::Event;
use crate::keys::{
    Key, Keys, SCHEDULER_GROUP, STATS_HOUR_TTL_SECS, STATS_MINUTE_TTL_SECS, field, stats_field,
};
use crate::record::Revision;
use crate::status::ProcessStatus;

/// The delayed-set member that fires a process's timeout (deterministic, so finishing the
/// process can remove it).
pub fn deadline_member(process_id: &str) -> String {
    delayed_member(
        "event",
        &Event::ProcessTimeout {
            process_id: process_id.to_string(),
        }
        .to_fields(),
    )
}

/// A delayed-set member: what fires (`kind`, `job` or `event`) and its stream fields.
pub(crate) fn delayed_member(kind: &str, fields: &[(String, String)]) -> String {
    let flat: Vec<&str> = fields
        .iter()
        .flat_map(|(k, v)| [k.as_str(), v.as_str()])
        .collect();
    serde_json::json!({ "k": kind, "f": flat }).to_string()
}

/// The process a delayed-set member fires for (its `pid` field), `None` for a member that is
/// not one [`delayed_member`] wrote.
pub fn delayed_member_process(member: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Member {
        f: Vec<String>,
    }
    let m: Member = serde_json::from_str(member).ok()?;
    m.f.chunks_exact(2)
        .find(|kv| kv[0] == crate::envelope::wire::PROCESS_ID)
        .map(|kv| kv[1].clone())
}

/// The arguments of one `commit.lua` call.
#[derive(Debug, Clone)]
pub struct CommitCall {
    pub keys: Vec<Key>,
    pub args: Vec<Vec<u8>>,
}

struct KeyTable(Vec<Key>);

impl KeyTable {
    fn idx(&mut self, k: Key) -> Vec<u8> {
        let i = match self.0.iter().position(|x| *x == k) {
            Some(i) => i,
            None => {
                self.0.push(k);
                self.0.len() - 1
            }
        };
        (i + 1).to_string().into_bytes()
    }
}

/// The source entry a commit acknowledges (submission or event).
pub struct AckSource<'a> {
    pub stream: Key,
    pub id: &'a str,
}

struct Ops {
    n: usize,
    args: Vec<Vec<u8>>,
}

impl Ops {
    fn op(&mut self, parts: Vec<Vec<u8>>) {
        self.n += 1;
        self.args.extend(parts);
    }
    fn pairs(&mut self, op: &str, key: Vec<u8>, pairs: Vec<(String, Vec<u8>)>) {
        if pairs.is_empty() {
            return;
        }
        let mut v = vec![
            op.as_bytes().to_vec(),
            key,
            pairs.len().to_string().into_bytes(),
        ];
        for (f, val) in pairs {
            v.push(f.into_bytes());
            v.push(val);
        }
        self.op(v);
    }
}

/// How long an idempotency key outlives its process's start: the process's timeout, then
/// the retention of its finished record.
fn idempotency_ttl(retention_secs: u64, timeout_ms: u64) -> u64 {
    retention_secs + timeout_ms / 1000 + 1
}

/// Arms a process's deadline (create, start, resume, reopen): the `deadline_ms` field and
/// the delayed-set member that fires its timeout.
struct Deadline<'a> {
    keys: &'a Keys,
    process_id: &'a str,
    now_ms: u64,
}

impl Deadline<'_> {
    fn arm(
        &self,
        ops: &mut Ops,
        kt: &mut KeyTable,
        meta_fields: &mut Vec<(String, Vec<u8>)>,
        delay_ms: u64,
    ) {
        meta_fields.push((field::DEADLINE_MS.into(), b(self.now_ms + delay_ms)));
        let delayed = kt.idx(self.keys.delayed());
        ops.op(vec![
            b("zaddin"),
            delayed,
            b(delay_ms),
            b(deadline_member(self.process_id)),
        ]);
    }
}

fn b(s: impl ToString) -> Vec<u8> {
    s.to_string().into_bytes()
}

impl Transition {
    /// Compiles the actions into one `commit.lua` call. `rev` is the revision the decision
    /// was made on (`None` for a create): the commit applies only while the process is still
    /// at it.
    pub fn to_commit(
        &self,
        keys: &Keys,
        process_id: &str,
        rev: Option<Revision>,
        now_ms: u64,
        retention_secs: u64,
        ack: Option<AckSource<'_>>,
    ) -> CommitCall {
        let mut kt = KeyTable(vec![keys.process(process_id)]);
        let meta = kt.idx(keys.process(process_id));
        let steps_k = kt.idx(keys.steps(process_id));
        let data_k = kt.idx(keys.data(process_id));
        let mut ops = Ops { n: 0, args: vec![] };
        let mut meta_fields: Vec<(String, Vec<u8>)> = vec![
            (field::REV.into(), b(rev.map_or(1, |r| r.rev + 1))),
            (field::UPDATED_MS.into(), b(now_ms)),
        ];
        let deadline = Deadline {
            keys,
            process_id,
            now_ms,
        };
        let mut idem_idx = b(0);
        let mut step_fields = Vec::new();
        for a in &self.actions {
            match a {
                Action::Create {
                    process_type,
                    version,
                    input,
                    idempotency_key,
                    trace,
                    timeout_ms,
                    pending,
                    tenant,
                } => {
                    meta_fields.extend([
                        (field::TYPE.into(), b(process_type)),
                        (field::VERSION.into(), b(version)),
                        (field::CREATED_MS.into(), b(now_ms)),
                    ]);
                    if *pending {
                        meta_fields.push((field::STATUS.into(), b(ProcessStatus::Pending)));
                        let idx_pending = kt.idx(keys.index_status(ProcessStatus::Pending));
                        ops.op(vec![b("zadd"), idx_pending, b(now_ms), b(process_id)]);
                    } else {
                        meta_fields.extend([
                            (field::STATUS.into(), b(ProcessStatus::Running)),
                            (field::STARTED_MS.into(), b(now_ms)),
                        ]);
                        // Started only while intake is open: a drain set meanwhile makes
                        // the commit answer `closed`, and the caller creates it Pending.
                        let intake = kt.idx(keys.intake());
                        ops.op(vec![b("absent"), intake]);
                        deadline.arm(&mut ops, &mut kt, &mut meta_fields, *timeout_ms);
                    }
                    if let Some(t) = trace {
                        meta_fields.push((field::TRACE.into(), b(t)));
                    }
                    if let Some(t) = tenant {
                        meta_fields.push((field::TENANT.into(), b(t)));
                    }
                    ops.pairs(
                        "hset",
                        data_k.clone(),
                        vec![(field::INPUT.into(), input.clone())],
                    );
                    let idx_all = kt.idx(keys.index_all());
                    ops.op(vec![b("zadd"), idx_all, b(now_ms), b(process_id)]);
                    let idx_active = kt.idx(keys.index_active());
                    ops.op(vec![b("zadd"), idx_active, b(now_ms), b(process_id)]);
                    let idx_type = kt.idx(keys.index_active_type(process_type));
                    ops.op(vec![b("zadd"), idx_type, b(now_ms), b(process_id)]);
                    if let Some(k) = idempotency_key {
                        meta_fields.push((field::IDEMPOTENCY_KEY.into(), b(k)));
                        let ik = kt.idx(keys.idempotency(k));
                        idem_idx = ik.clone();
                        let ttl = idempotency_ttl(retention_secs, *timeout_ms);
                        ops.op(vec![b("setex"), ik, b(ttl), b(process_id)]);
                    }
                }
                Action::SetStep { step, record } => {
                    step_fields
                        .push((step.clone(), serde_json::to_vec(record).unwrap_or_default()));
                }
                Action::Enqueue(job) => {
                    let jobs = kt.idx(keys.jobs());
                    ops.pairs(
                        "xadd",
                        jobs,
                        job.to_fields()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect(),
                    );
                }
                Action::EnqueueLater { job, delay_ms } => {
                    let delayed = kt.idx(keys.delayed());
                    ops.op(vec![
                        b("zaddin"),
                        delayed,
                        b(delay_ms),
                        b(delayed_member("job", &job.to_fields())),
                    ]);
                }
                Action::EventLater { event, delay_ms } => {
                    let delayed = kt.idx(keys.delayed());
                    ops.op(vec![
                        b("zaddin"),
                        delayed,
                        b(delay_ms),
                        b(delayed_member("event", &event.to_fields())),
                    ]);
                }
                // A create sets the status itself and then states it again: one field.
                Action::SetStatus(s) => {
                    match meta_fields.iter_mut().find(|(f, _)| f == field::STATUS) {
                        Some((_, v)) => *v = b(s),
                        None => meta_fields.push((field::STATUS.into(), b(s))),
                    }
                }
                Action::Start {
                    timeout_ms,
                    idempotency_key,
                } => {
                    if let Some(k) = idempotency_key {
                        let ik = kt.idx(keys.idempotency(k));
                        ops.op(vec![
                            b("expire"),
                            ik,
                            b(idempotency_ttl(retention_secs, *timeout_ms)),
                        ]);
                    }
                    meta_fields.push((field::STARTED_MS.into(), b(now_ms)));
                    let idx_pending = kt.idx(keys.index_status(ProcessStatus::Pending));
                    ops.op(vec![b("zrem"), idx_pending, b(process_id)]);
                    deadline.arm(&mut ops, &mut kt, &mut meta_fields, *timeout_ms);
                }
                Action::Unindex(status) => {
                    let idx = kt.idx(keys.index_status(*status));
                    ops.op(vec![b("zrem"), idx, b(process_id)]);
                }
                Action::Pause { deadline_left_ms } => {
                    meta_fields.push((field::PAUSED_MS.into(), b(now_ms)));
                    let idx_paused = kt.idx(keys.index_status(ProcessStatus::Paused));
                    ops.op(vec![b("zadd"), idx_paused, b(now_ms), b(process_id)]);
                    if let Some(left) = deadline_left_ms {
                        meta_fields.push((field::DEADLINE_LEFT_MS.into(), b(left)));
                        ops.op(vec![b("hdel"), meta.clone(), b(1), b(field::DEADLINE_MS)]);
                        let delayed = kt.idx(keys.delayed());
                        ops.op(vec![b("zrem"), delayed, b(deadline_member(process_id))]);
                    }
                }
                Action::Resume { deadline_left_ms } => {
                    ops.op(vec![
                        b("hdel"),
                        meta.clone(),
                        b(2),
                        b(field::PAUSED_MS),
                        b(field::DEADLINE_LEFT_MS),
                    ]);
                    let idx_paused = kt.idx(keys.index_status(ProcessStatus::Paused));
                    ops.op(vec![b("zrem"), idx_paused, b(process_id)]);
                    if let Some(left) = deadline_left_ms {
                        deadline.arm(&mut ops, &mut kt, &mut meta_fields, *left);
                    }
                }
                Action::Reopen {
                    from,
                    timeout_ms,
                    process_type,
                } => {
                    ops.op(vec![
                        b("hdel"),
                        meta.clone(),
                        b(3),
                        b(field::ENDED_MS),
                        b(field::ERROR),
                        b(field::CODE),
                    ]);
                    let idx_status = kt.idx(keys.index_status(*from));
                    ops.op(vec![b("zrem"), idx_status, b(process_id)]);
                    let idx_active = kt.idx(keys.index_active());
                    ops.op(vec![b("zadd"), idx_active, b(now_ms), b(process_id)]);
                    let idx_type = kt.idx(keys.index_active_type(process_type));
                    ops.op(vec![b("zadd"), idx_type, b(now_ms), b(process_id)]);
                    for k in [meta.clone(), steps_k.clone(), data_k.clone()] {
                        ops.op(vec![b("persist"), k]);
                    }
                    deadline.arm(&mut ops, &mut kt, &mut meta_fields, *timeout_ms);
                }
                Action::SetInput(blob) => {
                    ops.pairs(
                        "hset",
                        data_k.clone(),
                        vec![(field::INPUT.into(), blob.clone())],
                    );
                }
                Action::Audit(list) => {
                    meta_fields.push((
                        field::AUDIT.into(),
                        serde_json::to_vec(list).unwrap_or_default(),
                    ));
                }
                Action::Finish {
                    status,
                    error,
                    code,
                    process_type,
                } => {
                    meta_fields.push((field::STATUS.into(), b(status)));
                    meta_fields.push((field::ENDED_MS.into(), b(now_ms)));
                    if let Some(e) = error {
                        meta_fields.push((field::ERROR.into(), b(e)));
                    }
                    if let Some(c) = code {
                        meta_fields.push((field::CODE.into(), b(c)));
                    }
                    let idx_active = kt.idx(keys.index_active());
                    ops.op(vec![b("zrem"), idx_active, b(process_id)]);
                    let idx_status = kt.idx(keys.index_status(*status));
                    ops.op(vec![b("zadd"), idx_status, b(now_ms), b(process_id)]);
                    let delayed = kt.idx(keys.delayed());
                    ops.op(vec![b("zrem"), delayed, b(deadline_member(process_id))]);
                    let idx_type = kt.idx(keys.index_active_type(process_type));
                    ops.op(vec![b("zrem"), idx_type, b(process_id)]);
                    // The per-type counts of finished processes (minute and hour buckets).
                    let stat = stats_field(*status, process_type);
                    for (k, ttl) in [
                        (keys.stats_minute(now_ms / 60_000), STATS_MINUTE_TTL_SECS),
                        (keys.stats_hour(now_ms / 3_600_000), STATS_HOUR_TTL_SECS),
                    ] {
                        let k = kt.idx(k);
                        ops.op(vec![b("hincrbyttl"), k, b(&stat), b(1), b(ttl)]);
                    }
                }
            }
        }
        ops.pairs("hset", steps_k.clone(), step_fields);
        ops.pairs("hset", meta.clone(), meta_fields);
        if self.finish().is_some() {
            for k in [meta, steps_k, data_k] {
                ops.op(vec![b("expire"), k, b(retention_secs)]);
            }
        }
        let (ack_idx, ack_id) = match ack {
            Some(a) => (kt.idx(a.stream), b(a.id)),
            None => (b(0), b("")),
        };
        let mut args = vec![
            b(if rev.is_some() { "update" } else { "create" }),
            b(rev.map_or(0, |r| r.rev)),
            idem_idx,
            ack_idx,
            b(SCHEDULER_GROUP),
            ack_id,
            b(rev.map_or(0, |r| r.steps_rev)),
            b(ops.n),
        ];
        args.extend(ops.args);
        CommitCall { keys: kt.0, args }
    }
}

/// A transition a worker commits itself, with the step result it follows from
/// (`complete.lua`'s fast path): only step records and jobs enqueued now — what the
/// worker's Redis user may write. It applies only while the process is still at
/// `revision`, and raises the steps hash's `steps_rev`; otherwise the result goes to the
/// scheduler as an event, as every result did before.
#[derive(Debug, Clone, PartialEq)]
pub struct FastCommit {
    pub revision: Revision,
    /// The process's status, which the transition keeps.
    pub status: ProcessStatus,
    /// Step records to write (name, JSON).
    pub steps: Vec<(String, Vec<u8>)>,
    /// Jobs to put on the job stream (their fields).
    pub jobs: Vec<Vec<(String, String)>>,
}

impl Transition {
    /// This transition as a [`FastCommit`] decided on `revision` (the process `status`),
    /// when it only writes step
    /// records and enqueues jobs now: no status change, no finish, no timer or delayed job,
    /// nothing in the meta hash, an index or the delayed set (the scheduler's to write).
    pub fn to_fast(&self, revision: Revision, status: ProcessStatus) -> Option<FastCommit> {
        let mut fast = FastCommit {
            revision,
            status,
            steps: Vec::new(),
            jobs: Vec::new(),
        };
        for a in &self.actions {
            match a {
                Action::SetStep { step, record } => fast
                    .steps
                    .push((step.clone(), serde_json::to_vec(record).ok()?)),
                Action::Enqueue(job) => fast.jobs.push(job.to_fields()),
                _ => return None,
            }
        }
        (!fast.steps.is_empty()).then_some(fast)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delayed_members_name_their_process() {
        assert_eq!(
            delayed_member_process(&deadline_member("p-1")).as_deref(),
            Some("p-1")
        );
        let job = delayed_member(
            "job",
            &[("v".into(), "1".into()), ("pid".into(), "x".into())],
        );
        assert_eq!(delayed_member_process(&job).as_deref(), Some("x"));
        assert_eq!(delayed_member_process(r#"{"k":"job","f":[]}"#), None);
        assert_eq!(delayed_member_process("not json"), None);
    }
}
