//! Pure decisions: what a process transition does, as a list of [`Action`]s computed from a
//! definition, the current record and one event. No I/O here: the scheduler performs the
//! actions through one `commit.lua` call ([`Transition::to_commit`], compiled in
//! [`crate::commit`]) guarded by the record's revision, and the tests assert on the actions.

use crate::definition::{Executor, Join, KindRegistry, ProcessDefinition, StepDef};
use crate::envelope::{Event, Failure, JobEnvelope, TraceContext, event_type};
use crate::record::{ProcessRecord, StepRecord};
use crate::status::{ProcessStatus, StepStatus, outcome};
use std::collections::BTreeMap;
use std::time::Duration;

/// `Retry-After` values above this are clamped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// A step may yield this many times per visit; after that a yield counts as a failed
/// attempt (a bound even for a process without a deadline).
pub const MAX_YIELDS: u32 = 1000;
/// The shortest wait before a yielded step runs again.
pub const MIN_YIELD_DELAY_MS: u64 = 100;

/// One effect of a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// A finished process runs again (retry): it leaves its status index, its keys lose
    /// their expiry, and it gets a fresh deadline.
    Reopen {
        from: ProcessStatus,
        timeout_ms: u64,
        /// Its type, for the per-type count of unfinished processes.
        process_type: String,
    },
    /// Replace the process input (a retry's state patch), already encoded.
    SetInput(Vec<u8>),
    /// The full audit list after appending an operator action.
    Audit(Vec<crate::record::AuditEntry>),
    /// Create the process record (only in a create transition). A `pending` process (the
    /// fleet's intake is drained) is created with no step started and no deadline yet:
    /// [`start`] starts it once intake resumes. A create that starts its steps commits only
    /// while intake is open (the commit checks, so a drain is never raced past).
    Create {
        process_type: String,
        version: u32,
        input: Vec<u8>,
        idempotency_key: Option<String>,
        trace: Option<String>,
        timeout_ms: u64,
        pending: bool,
        /// The submission's tenant ([`Transition::with_tenant`]).
        tenant: Option<String>,
    },
    /// A Pending process starts: it leaves the pending index, its deadline starts now, and
    /// its idempotency key (if any) is kept as long as a process created now would keep it.
    Start {
        timeout_ms: u64,
        idempotency_key: Option<String>,
    },
    /// The process leaves the index of `Pending` or `Paused` processes (it starts, resumes
    /// or ends).
    Unindex(ProcessStatus),
    /// The process is paused: with `deadline_left_ms`, its deadline stops (what it had
    /// left is kept for the resume).
    Pause { deadline_left_ms: Option<u64> },
    /// A paused process resumes: with `deadline_left_ms`, its deadline runs again from now.
    Resume { deadline_left_ms: Option<u64> },
    /// Write a step's record.
    SetStep { step: String, record: StepRecord },
    /// Put a job on the job stream now.
    Enqueue(JobEnvelope),
    /// Put a job on the job stream after a delay (retry backoff).
    EnqueueLater { job: JobEnvelope, delay_ms: u64 },
    /// Deliver an event to the scheduler after a delay (timers, step timeouts).
    EventLater { event: Event, delay_ms: u64 },
    /// The process changes status (not finished).
    SetStatus(ProcessStatus),
    /// The process ends.
    Finish {
        status: ProcessStatus,
        error: Option<String>,
        code: Option<String>,
        /// Its type, for the per-type counts of finished processes.
        process_type: String,
    },
}

/// The actions of one transition and what the scheduler should log about it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transition {
    pub actions: Vec<Action>,
    pub notes: Vec<String>,
}

impl Transition {
    /// Records `tenant` on the process a create transition makes (no effect on others).
    pub fn with_tenant(mut self, tenant: Option<String>) -> Self {
        for a in &mut self.actions {
            if let Action::Create { tenant: t, .. } = a {
                t.clone_from(&tenant);
            }
        }
        self
    }

    pub fn finish(&self) -> Option<(ProcessStatus, Option<&str>)> {
        self.actions.iter().find_map(|a| match a {
            Action::Finish { status, error, .. } => Some((*status, error.as_deref())),
            _ => None,
        })
    }
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// What the decisions need besides the definition and the record.
pub struct Ctx<'a> {
    pub def: &'a ProcessDefinition,
    pub kinds: &'a KindRegistry,
    /// Server time (ms) read with the record.
    pub now_ms: u64,
    /// Random draw in [0, 1) for retry jitter (injected so tests are deterministic).
    pub jitter: f64,
}

/// No step records: a create's planner starts from these.
static NO_STEPS: BTreeMap<String, StepRecord> = BTreeMap::new();

/// The step records as a transition sees them: the record's own, under the ones this
/// transition changed. A record is copied when first changed, not the whole map up front
/// (a transition touches one or two of a process's records).
struct Steps<'a> {
    base: &'a BTreeMap<String, StepRecord>,
    changed: BTreeMap<String, StepRecord>,
}

impl<'a> Steps<'a> {
    fn get(&self, step: &str) -> Option<&StepRecord> {
        self.changed.get(step).or_else(|| self.base.get(step))
    }

    /// The record to change, copied from the base the first time (a default one for a
    /// step with no record yet).
    fn edit(&mut self, step: &str) -> &mut StepRecord {
        // No key allocated for a step changed before.
        if !self.changed.contains_key(step) {
            let r = self.base.get(step).cloned().unwrap_or_default();
            self.changed.insert(step.to_string(), r);
        }
        self.changed.get_mut(step).expect("inserted above")
    }

    /// The record to change, when the step has one.
    fn edit_existing(&mut self, step: &str) -> Option<&mut StepRecord> {
        self.get(step)?;
        Some(self.edit(step))
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &StepRecord)> {
        self.changed.iter().chain(
            self.base
                .iter()
                .filter(|(n, _)| !self.changed.contains_key(*n)),
        )
    }
}

struct Planner<'a> {
    ctx: &'a Ctx<'a>,
    pid: &'a str,
    trace: TraceContext,
    token_base: u64,
    tokens: u32,
    steps: Steps<'a>,
    touched: Vec<String>,
    actions: Vec<Action>,
    notes: Vec<String>,
    failure: Option<(ProcessStatus, String, String)>,
    /// The process is paused: steps entered now are held, not started.
    paused: bool,
}

impl<'a> Planner<'a> {
    fn new(
        ctx: &'a Ctx<'a>,
        pid: &'a str,
        token_base: u64,
        steps: &'a BTreeMap<String, StepRecord>,
        trace: Option<String>,
    ) -> Self {
        Self {
            ctx,
            pid,
            trace: TraceContext {
                traceparent: trace,
                tracestate: None,
            },
            token_base,
            tokens: 0,
            steps: Steps {
                base: steps,
                changed: BTreeMap::new(),
            },
            touched: Vec::new(),
            actions: Vec::new(),
            notes: Vec::new(),
            failure: None,
            paused: false,
        }
    }

    /// A planner for a transition of the process `rec`.
    fn for_record(ctx: &'a Ctx<'a>, rec: &'a ProcessRecord) -> Self {
        Self::new(
            ctx,
            &rec.id,
            rec.revision().token_base(),
            &rec.steps,
            rec.trace.clone(),
        )
    }

    fn token(&mut self) -> String {
        self.tokens += 1;
        format!("{}.{}", self.token_base, self.tokens)
    }

    fn rec(&mut self, step: &str) -> &mut StepRecord {
        if !self.touched.iter().any(|s| s == step) {
            self.touched.push(step.to_string());
        }
        self.steps.edit(step)
    }

    fn fail(&mut self, status: ProcessStatus, error: String, code: &str) {
        if self.failure.is_none() {
            self.failure = Some((status, error, code.to_string()));
        }
    }

    fn job(&self, step: &str, rec: &StepRecord) -> JobEnvelope {
        JobEnvelope {
            process_id: self.pid.to_string(),
            step: step.to_string(),
            token: rec.token.clone(),
            attempt: rec.attempt,
            visit: rec.visit,
            enqueued_ms: self.ctx.now_ms,
            trace: self.trace.clone(),
        }
    }

    /// Enter a step: enqueue its job, or start its timer / wait.
    fn activate(&mut self, name: &str) {
        let Some(def) = self.ctx.def.step(name) else {
            self.fail(
                ProcessStatus::Failed,
                format!("step {name} is not in the definition"),
                "definition_mismatch",
            );
            return;
        };
        let def: &StepDef = def;
        let visit = self.steps.get(name).map_or(0, |r| r.visit) + 1;
        if let Some(max) = def.max_visits
            && visit > max
        {
            self.fail(
                ProcessStatus::Failed,
                format!("step {name} exceeded max_visits ({max})"),
                "max_visits",
            );
            return;
        }
        let token = self.token();
        let now = self.ctx.now_ms;
        self.rec(name).archive_attempt();
        let history = std::mem::take(&mut self.rec(name).history);
        let mut rec = StepRecord {
            status: StepStatus::Queued,
            token,
            attempt: 1,
            visit,
            queued_ms: Some(now),
            history,
            ..Default::default()
        };
        if self.paused {
            if self.ctx.kinds.executor(&def.kind).is_none() {
                self.fail(
                    ProcessStatus::Failed,
                    format!("step {name} has unknown kind {:?}", def.kind),
                    "unknown_kind",
                );
                return;
            }
            rec.status = StepStatus::Held;
            rec.queued_ms = None;
            *self.rec(name) = rec;
            return;
        }
        self.start_step(name, def, rec);
    }

    /// Starts an entered step `rec` of `def`: enqueues its job (after `held_delay_ms` when
    /// it was held with a back-off left), or starts its timer (with `held_delay_ms` left
    /// when it was held, else its whole duration).
    fn start_step(&mut self, name: &str, def: &StepDef, mut rec: StepRecord) {
        let now = self.ctx.now_ms;
        let left = rec.held_delay_ms.take();
        match self.ctx.kinds.executor(&def.kind) {
            Some(Executor::Worker) => {
                rec.queued_ms = Some(now);
                let job = self.job(name, &rec);
                match left.filter(|d| *d > 0) {
                    Some(delay_ms) => {
                        rec.status = StepStatus::Delayed;
                        rec.due_ms = Some(now + delay_ms);
                        self.actions.push(Action::EnqueueLater { job, delay_ms });
                    }
                    None => {
                        rec.status = StepStatus::Queued;
                        rec.due_ms = None;
                        self.actions.push(Action::Enqueue(job));
                    }
                }
            }
            Some(Executor::Scheduler) => {
                rec.status = StepStatus::Waiting;
                rec.started_ms.get_or_insert(now);
                let (event, delay) = if def.kind == "sleep" {
                    let d = def
                        .config
                        .get("duration")
                        .and_then(|v| v.as_str())
                        .and_then(|s| humantime::parse_duration(s).ok())
                        .unwrap_or_default();
                    (
                        Event::Timer {
                            process_id: self.pid.to_string(),
                            step: name.to_string(),
                            token: rec.token.clone(),
                        },
                        d,
                    )
                } else {
                    (
                        Event::StepTimeout {
                            process_id: self.pid.to_string(),
                            step: name.to_string(),
                            token: rec.token.clone(),
                        },
                        def.timeout,
                    )
                };
                let delay_ms = left.unwrap_or(delay.as_millis() as u64);
                rec.due_ms = Some(now + delay_ms);
                self.actions.push(Action::EventLater { event, delay_ms });
            }
            None => {
                self.fail(
                    ProcessStatus::Failed,
                    format!("step {name} has unknown kind {:?}", def.kind),
                    "unknown_kind",
                );
                return;
            }
        }
        *self.rec(name) = rec;
    }

    /// Runs a step again in the same visit (operator retry): fresh token and attempts.
    fn reenter(&mut self, name: &str) {
        let visit = self.steps.get(name).map_or(0, |r| r.visit);
        if let Some(r) = self.steps.edit_existing(name) {
            r.visit = visit.saturating_sub(1);
        }
        self.activate(name);
    }

    /// A route from `from` reaches `target`.
    fn arrive(&mut self, target: &str, from: &str) {
        let inbound = self.ctx.def.inbound(target).to_vec();
        let join = self.ctx.def.step(target).map(|s| s.join.clone());
        if matches!(join, Some(Join::All)) && inbound.len() > 1 {
            let rec = self.rec(target);
            if !rec.arrived.iter().any(|a| a == from) {
                rec.arrived.push(from.to_string());
            }
            if inbound.iter().all(|i| rec.arrived.contains(i)) {
                rec.arrived.clear();
                self.activate(target);
            }
        } else if self.steps.get(target).is_some_and(|r| r.status.is_active()) {
            self.notes.push(format!(
                "{target} already active; arrival from {from} ignored"
            ));
        } else {
            self.activate(target);
        }
    }

    /// Ends the current attempt of a step with `out` (and its error).
    fn close_attempt(
        &mut self,
        step: &str,
        out: &str,
        error: Option<String>,
        code: Option<String>,
    ) {
        let now = self.ctx.now_ms;
        let rec = self.rec(step);
        // The ended attempt stays in the record's fields (`StepRecord::attempts`); it joins
        // `history` when the next attempt or visit begins.
        rec.outcome = Some(out.to_string());
        rec.error = error;
        rec.code = code;
        rec.ended_ms.get_or_insert(now);
    }

    /// Re-queues `step` as a new attempt after `delay_ms` (a retry or a yield).
    fn requeue(&mut self, step: &str, attempt: u32, yields: u32, delay_ms: u64) {
        let token = self.token();
        let now = self.ctx.now_ms;
        let paused = self.paused;
        let r = self.rec(step);
        r.archive_attempt();
        r.status = StepStatus::Delayed;
        r.token = token;
        r.attempt = attempt;
        r.yields = yields;
        r.due_ms = Some(now + delay_ms);
        r.queued_ms = Some(now);
        r.started_ms = None;
        r.claimed_ms = None;
        r.ended_ms = None;
        r.worker = None;
        r.deliveries = None;
        if paused {
            // Runs again on resume, after what is left of its back-off.
            r.status = StepStatus::Held;
            r.due_ms = None;
            r.queued_ms = None;
            r.held_delay_ms = Some(delay_ms);
            return;
        }
        let r = r.clone();
        let job = self.job(step, &r);
        self.actions.push(Action::EnqueueLater { job, delay_ms });
    }

    /// A step ended with `out`; route it.
    fn step_ended(&mut self, step: &str, out: &str) {
        self.rec(step).status = StepStatus::Completed;
        let targets = self.ctx.def.targets(step, out).to_vec();
        if targets.is_empty() && out != outcome::OK {
            self.notes.push(format!(
                "step {step} outcome {out:?} has no route; branch ends"
            ));
        }
        for t in targets {
            self.arrive(&t, step);
        }
    }

    /// A step failed for good (no retry left, or permanent).
    fn step_failed(&mut self, step: &str, error: &str, code: &str) {
        self.rec(step).status = StepStatus::Failed;
        let targets = self.ctx.def.targets(step, outcome::FAILED).to_vec();
        if targets.is_empty() {
            self.fail(
                ProcessStatus::Failed,
                format!("step {step} failed: {error}"),
                code,
            );
        } else {
            for t in targets {
                self.arrive(&t, step);
            }
        }
    }

    fn finish(mut self, current: Option<ProcessStatus>) -> Transition {
        // Ending, a Pending or Paused process leaves that status's index.
        let unindex =
            current.filter(|c| matches!(c, ProcessStatus::Pending | ProcessStatus::Paused));
        let status = if let Some((status, error, code)) = self.failure.take() {
            // Everything still open is cancelled; late commits are fenced out.
            let open: Vec<String> = self
                .steps
                .iter()
                .filter(|(_, r)| r.status.is_active())
                .map(|(n, _)| n.clone())
                .collect();
            for n in open {
                let now = self.ctx.now_ms;
                let r = self.rec(&n);
                r.status = StepStatus::Cancelled;
                r.ended_ms.get_or_insert(now);
            }
            self.push_steps();
            self.actions.extend(unindex.map(Action::Unindex));
            self.actions.push(Action::Finish {
                status,
                error: Some(error),
                code: Some(code),
                process_type: self.ctx.def.name.clone(),
            });
            return Transition {
                actions: self.actions,
                notes: self.notes,
            };
        } else if !self.steps.iter().any(|(_, r)| r.status.is_active()) {
            None
        } else if self.paused {
            Some(ProcessStatus::Paused)
        } else if self.steps.iter().any(|(n, r)| {
            r.status == StepStatus::Waiting
                && self.ctx.def.step(n).is_some_and(|d| d.kind == "approval")
        }) {
            Some(ProcessStatus::WaitingForApproval)
        } else {
            Some(ProcessStatus::Running)
        };
        self.push_steps();
        if status.is_none() {
            self.actions.extend(unindex.map(Action::Unindex));
        }
        match status {
            None => self.actions.push(Action::Finish {
                status: ProcessStatus::Completed,
                error: None,
                code: None,
                process_type: self.ctx.def.name.clone(),
            }),
            Some(s) if Some(s) != current => self.actions.push(Action::SetStatus(s)),
            Some(_) => {}
        }
        Transition {
            actions: self.actions,
            notes: self.notes,
        }
    }

    fn push_steps(&mut self) {
        let mut sets: Vec<Action> = self
            .touched
            .iter()
            .map(|n| Action::SetStep {
                record: self
                    .steps
                    .changed
                    .remove(n)
                    .expect("a touched step is changed"),
                step: n.clone(),
            })
            .collect();
        sets.append(&mut self.actions);
        self.actions = sets;
    }
}

/// The transition that creates a process.
pub fn create(
    ctx: &Ctx<'_>,
    process_id: &str,
    input: Vec<u8>,
    idempotency_key: Option<String>,
    trace: Option<String>,
    timeout: Duration,
) -> Transition {
    let mut p = Planner::new(ctx, process_id, 1, &NO_STEPS, trace.clone());
    p.actions.push(create_action(
        ctx,
        input,
        idempotency_key,
        trace,
        timeout,
        false,
    ));
    for s in ctx.def.start.clone() {
        p.activate(&s);
    }
    p.finish(None)
}

/// The record a create writes (the tenant is set by [`Transition::with_tenant`]).
fn create_action(
    ctx: &Ctx<'_>,
    input: Vec<u8>,
    idempotency_key: Option<String>,
    trace: Option<String>,
    timeout: Duration,
    pending: bool,
) -> Action {
    Action::Create {
        process_type: ctx.def.name.clone(),
        version: ctx.def.version,
        input,
        idempotency_key,
        trace,
        timeout_ms: timeout.as_millis() as u64,
        pending,
        tenant: None,
    }
}

/// The transition that creates a process while the fleet's intake is drained: the record
/// is stored `Pending`, with no step started and no deadline, until [`start`].
pub fn create_pending(
    ctx: &Ctx<'_>,
    process_id: &str,
    input: Vec<u8>,
    idempotency_key: Option<String>,
    trace: Option<String>,
    timeout: Duration,
) -> Transition {
    Transition {
        actions: vec![create_action(
            ctx,
            input,
            idempotency_key,
            trace,
            timeout,
            true,
        )],
        notes: vec![format!(
            "process {process_id} is Pending: intake is drained"
        )],
    }
}

/// Starts a Pending process (intake resumed): its first steps are entered and its deadline
/// (`timeout`, from now) starts counting.
pub fn start(ctx: &Ctx<'_>, rec: &ProcessRecord, timeout: Duration) -> Result<Transition, OpError> {
    if rec.status != ProcessStatus::Pending {
        return Err(OpError::InvalidState(
            rec.status,
            "only a Pending process can be started",
        ));
    }
    let mut p = Planner::for_record(ctx, rec);
    p.actions.push(Action::Start {
        timeout_ms: timeout.as_millis() as u64,
        idempotency_key: rec.idempotency_key.clone(),
    });
    for s in ctx.def.start.clone() {
        p.activate(&s);
    }
    Ok(p.finish(Some(rec.status)))
}

/// The transition an event causes, or an empty one when the event no longer applies
/// (stale token, finished process): the event is then only acknowledged.
pub fn on_event(ctx: &Ctx<'_>, rec: &ProcessRecord, event: &Event) -> Transition {
    if rec.status.is_finished() {
        return Transition {
            actions: vec![],
            notes: vec![format!("process already {}", rec.status)],
        };
    }
    let mut p = Planner::for_record(ctx, rec);
    p.paused = rec.status == ProcessStatus::Paused;
    let matches = |step: &str, token: &str, statuses: &[StepStatus]| {
        rec.steps
            .get(step)
            .is_some_and(|r| r.token == token && statuses.contains(&r.status))
    };
    match event {
        Event::Step {
            step,
            token,
            result,
            ..
        } => {
            if !matches(step, token, &[StepStatus::Done, StepStatus::Running]) {
                return stale(step);
            }
            if result.outcome == outcome::FAILED {
                let error = result.error.clone().unwrap_or_else(|| "step failed".into());
                let code = result.code.clone().unwrap_or_else(|| "step_failed".into());
                let attempt = rec.steps[step].attempt;
                let yields = rec.steps[step].yields;
                let failure = result.failure.unwrap_or(Failure::Permanent);
                let asked = failure
                    .retry_after_ms()
                    .unwrap_or(0)
                    .min(MAX_RETRY_AFTER.as_millis() as u64);
                if matches!(failure, Failure::Yield(_)) && yields < MAX_YIELDS {
                    // Waited for a shared resource without doing the work: again later,
                    // on a fresh attempt that the retry policy does not count.
                    p.close_attempt(step, outcome::YIELDED, Some(error), Some(code));
                    let delay = asked.max(MIN_YIELD_DELAY_MS);
                    p.requeue(step, attempt + 1, yields + 1, delay);
                    p.notes.push(format!(
                        "step {step} yielded; runs again in {delay} ms (yield {})",
                        yields + 1
                    ));
                    return p.finish(Some(rec.status));
                }
                p.close_attempt(
                    step,
                    outcome::FAILED,
                    Some(error.clone()),
                    Some(code.clone()),
                );
                // Attempts that yielded did not run: they do not use up the policy.
                let ran = attempt.saturating_sub(yields);
                let policy = ctx.def.step(step).map(|d| d.retry.clone());
                if failure == Failure::Fatal {
                    p.rec(step).status = StepStatus::Failed;
                    p.fail(
                        ProcessStatus::Failed,
                        format!("step {step} failed: {error}"),
                        &code,
                    );
                } else if let Some(policy) =
                    policy.filter(|pol| failure.is_retryable() && ran < pol.max_attempts)
                {
                    let backoff = backoff_ms(&policy, ran, ctx.jitter);
                    let delay = backoff.max(asked);
                    p.requeue(step, attempt + 1, yields, delay);
                    p.notes.push(format!(
                        "step {step} retries in {delay} ms (attempt {})",
                        ran + 1
                    ));
                } else {
                    let error = if ran > 1 {
                        format!("{error} (after {ran} attempts)")
                    } else {
                        error
                    };
                    p.step_failed(step, &error, &code);
                }
            } else {
                p.close_attempt(step, &result.outcome, None, None);
                p.step_ended(step, &result.outcome);
            }
        }
        Event::Timer { step, token, .. } => {
            if !matches(step, token, &[StepStatus::Waiting]) {
                return stale(step);
            }
            p.close_attempt(step, outcome::OK, None, None);
            p.step_ended(step, outcome::OK);
        }
        Event::StepTimeout { step, token, .. } => {
            if !matches(step, token, &[StepStatus::Waiting]) {
                return stale(step);
            }
            let timeout = ctx.def.step(step).map(|d| d.timeout).unwrap_or_default();
            let error = format!(
                "no signal within the step timeout of {}",
                humantime::format_duration(timeout)
            );
            p.close_attempt(
                step,
                outcome::FAILED,
                Some(error.clone()),
                Some("step_timeout".into()),
            );
            p.step_failed(step, &error, "step_timeout");
        }
        Event::DeadLetter {
            step,
            token,
            deliveries,
            reason,
            ..
        } => {
            let active = [StepStatus::Queued, StepStatus::Running, StepStatus::Done];
            if !matches(step, token, &active) {
                return stale(step);
            }
            let error =
                format!("step {step} was dead-lettered after {deliveries} deliveries: {reason}");
            p.close_attempt(
                step,
                outcome::FAILED,
                Some(error.clone()),
                Some("max_deliveries".into()),
            );
            p.rec(step).status = StepStatus::Failed;
            p.fail(ProcessStatus::Failed, error, "max_deliveries");
        }
        Event::ProcessTimeout { .. } => {
            // A deadline that stopped (paused) or moved (resumed since this fired) has not
            // passed. The event fires at its due time on the server clock, read again here,
            // so a second is slack enough.
            if rec.deadline_ms.is_none_or(|d| ctx.now_ms + 1000 < d) {
                return Transition {
                    actions: vec![],
                    notes: vec!["process timeout no longer due (paused or resumed)".into()],
                };
            }
            // From the start: a process created while intake was drained waited Pending
            // without a deadline.
            let timeout = rec
                .deadline_ms
                .map(|d| d.saturating_sub(rec.started_ms.unwrap_or(rec.created_ms)))
                .unwrap_or_default();
            p.fail(
                ProcessStatus::TimedOut,
                format!(
                    "timeout exceeded: process ran longer than {}",
                    humantime::format_duration(Duration::from_millis(timeout))
                ),
                "process_timeout",
            );
        }
        Event::Signal {
            name, value, by, ..
        } => {
            let Some(step) = waiting_for_signal(ctx.def, rec, name) else {
                return Transition {
                    actions: vec![],
                    notes: vec![format!("no step is waiting for signal {name:?}")],
                };
            };
            let step = step.name.clone();
            let Ok(out) = signal_route(ctx.def, &step, value) else {
                return Transition {
                    actions: vec![],
                    notes: vec![format!(
                        "signal value {value:?} is not an outcome step {step} routes on"
                    )],
                };
            };
            let mut entry = audit(
                rec,
                ctx.now_ms,
                &format!("signal {name}"),
                Some(format!("{value} at {step}")),
            );
            if let Action::Audit(list) = &mut entry
                && let Some(last) = list.last_mut()
            {
                last.by = by.clone();
            }
            p.actions.push(entry);
            p.close_attempt(&step, &out, None, None);
            p.step_ended(&step, &out);
        }
    }
    p.finish(Some(rec.status))
}

/// Why an operator action does not apply to a process in its current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("process is {0}; {1}")]
    InvalidState(ProcessStatus, &'static str),
    /// The operator named a step its process's definition does not have.
    #[error("the definition has no step {0:?}")]
    UnknownStep(String),
}

fn audit(rec: &ProcessRecord, now_ms: u64, action: &str, detail: Option<String>) -> Action {
    let mut list = rec.audit.clone();
    list.push(crate::record::AuditEntry {
        at_ms: now_ms,
        action: action.to_string(),
        detail,
        by: None,
    });
    if list.len() > crate::record::AUDIT_CAP {
        let extra = list.len() - crate::record::AUDIT_CAP;
        list.drain(..extra);
    }
    Action::Audit(list)
}

/// Cancels a running process: it ends Cancelled, its open steps are cancelled, and the
/// workers running them are stopped at their next heartbeat (their commits are refused).
pub fn cancel(
    ctx: &Ctx<'_>,
    rec: &ProcessRecord,
    reason: Option<&str>,
) -> Result<Transition, OpError> {
    if rec.status.is_finished() {
        return Err(OpError::InvalidState(
            rec.status,
            "only unfinished processes can be cancelled",
        ));
    }
    let mut p = Planner::for_record(ctx, rec);
    let why = reason.unwrap_or("cancelled by an operator");
    p.actions
        .push(audit(rec, ctx.now_ms, "cancel", reason.map(str::to_string)));

    p.fail(ProcessStatus::Cancelled, why.to_string(), "cancelled");
    Ok(p.finish(Some(rec.status)))
}

/// Pauses a running process: it starts no new step until [`resume`]. Steps queued or
/// waiting for a retry back-off are held (their jobs are fenced out by a new token and
/// they run on resume, a back-off with what it had left); running steps finish and commit,
/// their successors held — or with `hand_back` they are fenced out at once (their worker
/// stops them at its next heartbeat and their commit is refused) and run again on resume.
/// Unless the type counts timeouts in wall-clock time (`timeouts_while_paused = "count"`),
/// the process deadline, durable timers and step timeouts stop, keeping what they had left.
pub fn pause(
    ctx: &Ctx<'_>,
    rec: &ProcessRecord,
    hand_back: bool,
    reason: Option<&str>,
) -> Result<Transition, OpError> {
    match rec.status {
        ProcessStatus::Running | ProcessStatus::WaitingForApproval => {}
        ProcessStatus::Paused => {
            return Err(OpError::InvalidState(rec.status, "it is already paused"));
        }
        ProcessStatus::Pending => {
            return Err(OpError::InvalidState(
                rec.status,
                "it has not started (intake is drained); cancel it or resume intake",
            ));
        }
        _ => {
            return Err(OpError::InvalidState(
                rec.status,
                "only a running process can be paused",
            ));
        }
    }
    let now = ctx.now_ms;
    let stop = ctx.def.timeouts_while_paused == crate::definition::PausedTimeouts::Stop;
    let mut p = Planner::for_record(ctx, rec);
    p.paused = true;
    let detail = match (reason, hand_back) {
        (Some(r), true) => Some(format!("{r} (running steps handed back)")),
        (Some(r), false) => Some(r.to_string()),
        (None, true) => Some("running steps handed back".to_string()),
        (None, false) => None,
    };
    p.actions.push(audit(rec, now, "pause", detail));
    for (name, r) in &rec.steps {
        let left = r.due_ms.map(|d| d.saturating_sub(now));
        let sleeping = ctx.def.step(name).is_some_and(|d| d.kind == "sleep");
        let held = match r.status {
            StepStatus::Queued => Some(None),
            StepStatus::Delayed => Some(left),
            StepStatus::Running if hand_back => Some(None),
            StepStatus::Waiting if stop && sleeping => Some(left),
            StepStatus::Waiting if stop => {
                // An approval keeps waiting for its signal; its timeout stops.
                let token = p.token();
                let w = p.rec(name);
                w.token = token;
                w.held_delay_ms = left;
                w.due_ms = None;
                None
            }
            _ => None,
        };
        if let Some(left) = held {
            let token = p.token();
            let h = p.rec(name);
            h.status = StepStatus::Held;
            h.token = token;
            h.held_delay_ms = left;
            h.due_ms = None;
            if r.status == StepStatus::Running {
                p.notes
                    .push(format!("step {name} handed back: it runs again on resume"));
            }
        }
    }
    p.actions.push(Action::Pause {
        deadline_left_ms: if stop {
            rec.deadline_ms.map(|d| d.saturating_sub(now))
        } else {
            None
        },
    });
    Ok(p.finish(Some(rec.status)))
}

/// Resumes a paused process: its held steps start (a back-off or timer with what it had
/// left), a waiting approval's timeout and the process deadline run again from now with
/// what they had left.
pub fn resume(ctx: &Ctx<'_>, rec: &ProcessRecord) -> Result<Transition, OpError> {
    if rec.status != ProcessStatus::Paused {
        return Err(OpError::InvalidState(
            rec.status,
            "only a paused process can be resumed",
        ));
    }
    let mut p = Planner::for_record(ctx, rec);
    p.actions.push(audit(rec, ctx.now_ms, "resume", None));
    p.actions.push(Action::Resume {
        deadline_left_ms: rec.deadline_left_ms,
    });
    for (name, r) in &rec.steps {
        let Some(def) = ctx.def.step(name) else {
            continue;
        };
        if r.status == StepStatus::Held {
            p.rec(name);
            p.start_step(name, def, r.clone());
        } else if r.status == StepStatus::Waiting
            && let Some(left) = r.held_delay_ms
        {
            // An approval whose timeout stopped.
            let w = p.rec(name);
            w.held_delay_ms = None;
            w.due_ms = Some(ctx.now_ms + left);
            let token = w.token.clone();
            p.actions.push(Action::EventLater {
                event: Event::StepTimeout {
                    process_id: rec.id.clone(),
                    step: name.clone(),
                    token,
                },
                delay_ms: left,
            });
        }
    }
    Ok(p.finish(Some(rec.status)))
}

/// The planner of a retry: the finished process reopens (fresh deadline of `timeout`) with
/// `input` replacing its input when given.
fn reopen<'a>(
    ctx: &'a Ctx<'a>,
    rec: &'a ProcessRecord,
    timeout: Duration,
    input: Option<Vec<u8>>,
) -> Planner<'a> {
    let mut p = Planner::for_record(ctx, rec);
    p.actions.push(Action::Reopen {
        from: rec.status,
        timeout_ms: timeout.as_millis() as u64,
        process_type: ctx.def.name.clone(),
    });
    if let Some(blob) = input {
        p.actions.push(Action::SetInput(blob));
    }
    p
}

/// Re-runs a Failed, Cancelled or TimedOut process from where it stopped: completed steps
/// keep their results; the step that failed it (and every step that was cancelled) runs
/// again with fresh attempts.
pub fn retry(
    ctx: &Ctx<'_>,
    rec: &ProcessRecord,
    timeout: Duration,
    input: Option<Vec<u8>>,
) -> Result<Transition, OpError> {
    if !matches!(
        rec.status,
        ProcessStatus::Failed | ProcessStatus::Cancelled | ProcessStatus::TimedOut
    ) {
        return Err(OpError::InvalidState(
            rec.status,
            "only Failed, Cancelled or TimedOut processes can be retried",
        ));
    }
    let mut p = reopen(ctx, rec, timeout, input);
    let rerun: Vec<String> = rec
        .steps
        .iter()
        .filter(|(name, r)| match r.status {
            StepStatus::Cancelled => true,
            StepStatus::Failed => ctx.def.targets(name, outcome::FAILED).is_empty(),
            _ => false,
        })
        .map(|(n, _)| n.clone())
        .collect();
    p.actions.push(audit(
        rec,
        ctx.now_ms,
        "retry",
        Some(format!("from {}", rerun.join(", "))),
    ));
    if rerun.is_empty() {
        // Nothing failed a step (e.g. a timeout before any step ran): start over.
        for s in ctx.def.start.clone() {
            p.reenter(&s);
        }
    }
    for s in &rerun {
        p.reenter(s);
    }
    Ok(p.finish(Some(rec.status)))
}

/// Re-runs a finished process (Completed, Failed, Cancelled or TimedOut) from `from`, any
/// step of its definition: `from` and every step downstream of it (reachable through any
/// route) go back to not reached, keeping their past attempts; the steps `from` depends on
/// (those with a path to it) keep their records and results, even inside a loop; and
/// `from` runs again with fresh attempts. A join downstream keeps the arrivals of inputs
/// that are not reset and completed routing to it. Steps of other branches keep their
/// state (a plain [`retry`] re-runs those that failed or were cancelled).
pub fn retry_from(
    ctx: &Ctx<'_>,
    rec: &ProcessRecord,
    from: &str,
    timeout: Duration,
    input: Option<Vec<u8>>,
) -> Result<Transition, OpError> {
    if !rec.status.is_finished() {
        return Err(OpError::InvalidState(
            rec.status,
            "only a finished process can be retried from a step (cancel or pause it first)",
        ));
    }
    if ctx.def.step(from).is_none() {
        return Err(OpError::UnknownStep(from.to_string()));
    }
    let reset = downstream(ctx.def, from);
    let mut p = reopen(ctx, rec, timeout, input);
    p.actions.push(audit(
        rec,
        ctx.now_ms,
        "retry",
        Some(format!("from step {from} (chosen)")),
    ));
    for name in &reset {
        if name == from || !rec.steps.contains_key(name) {
            continue;
        }
        let arrived: Vec<String> = match ctx.def.step(name).map(|s| &s.join) {
            Some(Join::All) => ctx
                .def
                .inbound(name)
                .iter()
                .filter(|i| !reset.contains(*i))
                .filter(|i| {
                    rec.steps.get(*i).is_some_and(|r| {
                        r.status == StepStatus::Completed
                            && r.outcome
                                .as_deref()
                                .is_some_and(|o| ctx.def.targets(i, o).iter().any(|t| t == name))
                    })
                })
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let r = p.rec(name);
        r.archive_attempt();
        *r = StepRecord {
            status: StepStatus::Idle,
            // A retry is not a new visit: the next entry counts as this one again.
            visit: r.visit.saturating_sub(1),
            history: std::mem::take(&mut r.history),
            arrived,
            ..Default::default()
        };
    }
    p.reenter(from);
    Ok(p.finish(Some(rec.status)))
}

/// `from` and every step reachable from it through any route, less the steps with a path
/// to `from` that does not pass through it (what `from` depends on, in a loop too).
fn downstream(def: &ProcessDefinition, from: &str) -> std::collections::BTreeSet<String> {
    let mut ahead = std::collections::BTreeSet::from([from.to_string()]);
    let mut todo = vec![from.to_string()];
    while let Some(s) = todo.pop() {
        let Some(step) = def.step(&s) else { continue };
        for t in step.routes.values().flatten() {
            if ahead.insert(t.clone()) {
                todo.push(t.clone());
            }
        }
    }
    let mut behind = std::collections::BTreeSet::new();
    let mut todo: Vec<String> = def.inbound(from).to_vec();
    while let Some(s) = todo.pop() {
        if s == from || !behind.insert(s.clone()) {
            continue;
        }
        todo.extend(def.inbound(&s).iter().cloned());
    }
    ahead.retain(|s| s == from || !behind.contains(s));
    ahead
}

/// Re-enqueues the worker steps of a running process now (stuck or delayed ones): each gets
/// a new token, so the previous claim can no longer heartbeat or commit.
pub fn retry_current_step(
    ctx: &Ctx<'_>,
    rec: &ProcessRecord,
) -> Result<(Transition, Vec<String>), OpError> {
    if rec.status.is_finished() {
        return Err(OpError::InvalidState(
            rec.status,
            "the process is not running",
        ));
    }
    if rec.status == ProcessStatus::Paused {
        return Err(OpError::InvalidState(
            rec.status,
            "resume it first: a paused process starts no step",
        ));
    }
    let steps: Vec<String> = rec
        .steps
        .iter()
        .filter(|(_, r)| {
            matches!(
                r.status,
                StepStatus::Queued | StepStatus::Running | StepStatus::Delayed
            )
        })
        .map(|(n, _)| n.clone())
        .collect();
    if steps.is_empty() {
        return Err(OpError::InvalidState(
            rec.status,
            "no queued, delayed or running step to retry",
        ));
    }
    let mut p = Planner::for_record(ctx, rec);
    p.actions.push(audit(
        rec,
        ctx.now_ms,
        "retry-current-step",
        Some(steps.join(", ")),
    ));
    for s in &steps {
        p.reenter(s);
    }
    Ok((p.finish(Some(rec.status)), steps))
}

fn stale(step: &str) -> Transition {
    Transition {
        actions: vec![],
        notes: vec![format!("event for step {step} no longer applies")],
    }
}

/// The approval step of `rec` waiting for signal `name`, if any.
pub fn waiting_for_signal<'d>(
    def: &'d ProcessDefinition,
    rec: &ProcessRecord,
    name: &str,
) -> Option<&'d StepDef> {
    rec.steps
        .iter()
        .filter(|(_, r)| r.status == StepStatus::Waiting)
        .filter_map(|(n, _)| def.step(n))
        .find(|d| {
            d.kind == "approval"
                && d.config
                    .get("signal")
                    .and_then(|v| v.as_str())
                    .unwrap_or("approval")
                    == name
        })
}

/// The outcome signal `value` gives approval step `step`: `approve` (→ `ok`), `reject`
/// (→ `rejected`), or an outcome name the step routes on (its `on` table). Anything else —
/// a typo like `aprove` would otherwise end the branch — is refused with the values the step
/// accepts.
pub fn signal_route(
    def: &ProcessDefinition,
    step: &str,
    value: &str,
) -> Result<String, Vec<String>> {
    let routes = def.step(step).map(|s| &s.routes);
    let routed = |o: &str| routes.is_some_and(|r| r.contains_key(o));
    match signal_outcome(value) {
        Some(o) if o == outcome::OK || o == outcome::REJECTED || routed(&o) => Ok(o),
        _ => {
            let mut accepted = vec!["approve".to_string(), "reject".to_string()];
            accepted.extend(
                routes
                    .into_iter()
                    .flat_map(|r| r.keys())
                    .filter(|o| {
                        ![outcome::OK, outcome::REJECTED, outcome::FAILED].contains(&o.as_str())
                    })
                    .cloned(),
            );
            Err(accepted)
        }
    }
}

/// Maps a signal value to an outcome: approve → `ok`, reject → `rejected`, else the value
/// itself when it is a valid outcome name other than `failed`; `None` for anything else.
pub fn signal_outcome(value: &str) -> Option<String> {
    let v = value.trim().to_ascii_lowercase();
    match v.as_str() {
        "" | "approve" | "approved" | "ok" | "yes" => Some(outcome::OK.into()),
        "reject" | "rejected" | "no" | "deny" | "denied" => Some(outcome::REJECTED.into()),
        outcome::FAILED => None,
        other if crate::definition::is_valid_outcome(other) => Some(other.to_string()),
        _ => None,
    }
}

/// Backoff before attempt `failed_attempts + 1`: full jitter under the policy's ceiling.
pub fn backoff_ms(
    policy: &crate::definition::RetryPolicy,
    failed_attempts: u32,
    jitter: f64,
) -> u64 {
    let ceiling = policy.backoff_ceiling(failed_attempts).as_millis() as f64;
    (ceiling * jitter.clamp(0.0, 1.0)) as u64
}

/// Event type names the Lua side writes must be ones the Rust side reads.
pub const LUA_EVENT_TYPES: &[&str] = &[event_type::STEP, event_type::DEAD_LETTER];

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
