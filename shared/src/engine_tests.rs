//! Unit tests of the pure decisions. Each test loads a definition from TOML, builds or
//! creates a record by hand, feeds events and asserts on the actions; a small simulator
//! applies each transition's `SetStep` / `SetStatus` / `Finish` to the record the way
//! `commit.lua` would, so a whole process life runs without Redis.

use super::*;
use crate::commit::{AckSource, CommitCall, deadline_member, delayed_member};
use crate::definition::{DefinitionSet, Format, RetryPolicy};
use crate::envelope::{Failure, StepResult};
use crate::keys::{Key, Keys, SCHEDULER_GROUP, field};
use crate::record::HISTORY_CAP;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::Arc;

const NOW: u64 = 1_700_000_000_000;
const PID: &str = "p1";
const HOUR: Duration = Duration::from_secs(3600);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// A definition named `T`, version 3; `body` holds the top-level keys (before any table)
/// and the steps.
fn def(body: &str) -> Arc<ProcessDefinition> {
    let text = format!("name = \"T\"\nversion = 3\n{body}");
    let set = DefinitionSet::from_str(&text, Format::Toml, "test", &KindRegistry::builtin())
        .unwrap_or_else(|e| panic!("test definition is invalid: {e}\n{text}"));
    set.latest("T").unwrap().clone()
}

const SEQUENCE: &str = r#"
[[steps]]
name = "A"
kind = "noop"
next = "B"

[[steps]]
name = "B"
kind = "noop"
next = "C"

[[steps]]
name = "C"
kind = "noop"
"#;

/// `Start` fans out to `B0..B{n-1}`, which all route to `Join` (with `join`), then `Done`.
fn fan_in(n: usize, join: &str) -> String {
    let branches: Vec<String> = (0..n).map(|i| format!("\"B{i}\"")).collect();
    let mut text = format!(
        "[[steps]]\nname = \"Start\"\nkind = \"noop\"\nnext = [{}]\n",
        branches.join(", ")
    );
    for i in 0..n {
        text.push_str(&format!(
            "[[steps]]\nname = \"B{i}\"\nkind = \"noop\"\nnext = \"Join\"\n"
        ));
    }
    text.push_str(&format!(
        "[[steps]]\nname = \"Join\"\nkind = \"noop\"\njoin = \"{join}\"\nnext = \"Done\"\n\
         [[steps]]\nname = \"Done\"\nkind = \"noop\"\n"
    ));
    text
}

fn empty_record() -> ProcessRecord {
    ProcessRecord {
        id: PID.into(),
        process_type: String::new(),
        version: 0,
        status: ProcessStatus::Pending,
        rev: 0,
        steps_rev: 0,
        created_ms: 0,
        started_ms: None,
        ended_ms: None,
        updated_ms: None,
        deadline_ms: None,
        paused_ms: None,
        deadline_left_ms: None,
        error: None,
        code: None,
        idempotency_key: None,
        tenant: None,
        trace: None,
        audit: Vec::new(),
        steps: BTreeMap::new(),
    }
}

/// Applies a transition to a record as `commit.lua` does (one revision per commit).
fn apply(rec: &mut ProcessRecord, t: &Transition, now: u64) {
    if t.is_empty() {
        return;
    }
    for a in &t.actions {
        match a {
            Action::Create {
                process_type,
                version,
                idempotency_key,
                trace,
                timeout_ms,
                pending,
                ..
            } => {
                rec.process_type = process_type.clone();
                rec.version = *version;
                rec.created_ms = now;
                if *pending {
                    rec.status = ProcessStatus::Pending;
                } else {
                    rec.status = ProcessStatus::Running;
                    rec.started_ms = Some(now);
                    rec.deadline_ms = Some(now + timeout_ms);
                }
                rec.idempotency_key = idempotency_key.clone();
                rec.trace = trace.clone();
            }
            Action::Start { timeout_ms, .. } => {
                rec.started_ms = Some(now);
                rec.deadline_ms = Some(now + timeout_ms);
            }
            Action::SetStep { step, record } => {
                rec.steps.insert(step.clone(), record.clone());
            }
            Action::SetStatus(s) => rec.status = *s,
            Action::Finish {
                status,
                error,
                code,
                ..
            } => {
                rec.status = *status;
                rec.error = error.clone();
                rec.code = code.clone();
                rec.ended_ms = Some(now);
            }
            Action::Reopen { timeout_ms, .. } => {
                rec.ended_ms = None;
                rec.error = None;
                rec.code = None;
                rec.deadline_ms = Some(now + timeout_ms);
            }
            Action::Audit(list) => rec.audit = list.clone(),
            Action::Pause { deadline_left_ms } => {
                rec.paused_ms = Some(now);
                if deadline_left_ms.is_some() {
                    rec.deadline_left_ms = *deadline_left_ms;
                    rec.deadline_ms = None;
                }
            }
            Action::Resume { deadline_left_ms } => {
                rec.paused_ms = None;
                rec.deadline_left_ms = None;
                if let Some(left) = deadline_left_ms {
                    rec.deadline_ms = Some(now + left);
                }
            }
            Action::Unindex(_)
            | Action::Enqueue(_)
            | Action::EnqueueLater { .. }
            | Action::EventLater { .. }
            | Action::SetInput(_) => {}
        }
    }
    rec.rev += 1;
    rec.updated_ms = Some(now);
}

/// One process, its definition and the decision inputs.
struct Sim {
    def: Arc<ProcessDefinition>,
    kinds: KindRegistry,
    rec: ProcessRecord,
    now_ms: u64,
    jitter: f64,
}

impl Sim {
    /// Loads `body` and creates the process (1 h timeout, no idempotency key, no trace).
    fn start(body: &str) -> (Sim, Transition) {
        let mut sim = Sim {
            def: def(body),
            kinds: KindRegistry::builtin(),
            rec: empty_record(),
            now_ms: NOW,
            jitter: 0.5,
        };
        let t = create(&sim.ctx(), PID, b"{}".to_vec(), None, None, HOUR);
        apply(&mut sim.rec, &t, sim.now_ms);
        (sim, t)
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            def: &self.def,
            kinds: &self.kinds,
            now_ms: self.now_ms,
            jitter: self.jitter,
        }
    }

    /// Decides on `ev` and applies the result.
    fn feed(&mut self, ev: Event) -> Transition {
        let t = on_event(&self.ctx(), &self.rec, &ev);
        apply(&mut self.rec, &t, self.now_ms);
        t
    }

    fn step(&self, step: &str) -> &StepRecord {
        self.rec
            .steps
            .get(step)
            .unwrap_or_else(|| panic!("no record for step {step}"))
    }

    fn token(&self, step: &str) -> String {
        self.step(step).token.clone()
    }

    /// A worker ran the step's current job and committed `result` (`complete.lua` leaves
    /// the step `done`), then the scheduler reads the event.
    fn report(&mut self, step: &str, result: StepResult) -> Transition {
        let r = self.rec.steps.get_mut(step).unwrap();
        assert!(
            matches!(
                r.status,
                StepStatus::Queued | StepStatus::Delayed | StepStatus::Running
            ),
            "step {step} has no job to run: {:?}",
            r.status
        );
        r.status = StepStatus::Done;
        let token = r.token.clone();
        self.feed(step_event(step, &token, result))
    }

    fn ok(&mut self, step: &str) -> Transition {
        self.report(step, ok())
    }
}

fn ok() -> StepResult {
    out("ok")
}

fn out(outcome: &str) -> StepResult {
    StepResult {
        outcome: outcome.into(),
        ..Default::default()
    }
}

fn failure(error: &str, retryable: bool) -> StepResult {
    StepResult {
        outcome: "failed".into(),
        error: Some(error.into()),
        code: Some("handler_error".into()),
        failure: Some(if retryable {
            Failure::Retryable
        } else {
            Failure::Permanent
        }),
    }
}

fn step_event(step: &str, token: &str, result: StepResult) -> Event {
    Event::Step {
        process_id: PID.into(),
        step: step.into(),
        token: token.into(),
        result,
    }
}

fn timer(step: &str, token: &str) -> Event {
    Event::Timer {
        process_id: PID.into(),
        step: step.into(),
        token: token.into(),
    }
}

fn step_timeout(step: &str, token: &str) -> Event {
    Event::StepTimeout {
        process_id: PID.into(),
        step: step.into(),
        token: token.into(),
    }
}

fn signal(name: &str, value: &str) -> Event {
    Event::Signal {
        process_id: PID.into(),
        name: name.into(),
        value: value.into(),
        by: None,
    }
}

fn dead_letter(step: &str, token: &str) -> Event {
    Event::DeadLetter {
        process_id: PID.into(),
        step: step.into(),
        token: token.into(),
        deliveries: 5,
        reason: "delivered 4 times without completing".into(),
    }
}

fn process_timeout() -> Event {
    Event::ProcessTimeout {
        process_id: PID.into(),
    }
}

// Action accessors.

fn enqueued(t: &Transition) -> Vec<&JobEnvelope> {
    t.actions
        .iter()
        .filter_map(|a| match a {
            Action::Enqueue(j) => Some(j),
            _ => None,
        })
        .collect()
}

fn enqueued_steps(t: &Transition) -> Vec<&str> {
    enqueued(t).iter().map(|j| j.step.as_str()).collect()
}

fn later_jobs(t: &Transition) -> Vec<(&JobEnvelope, u64)> {
    t.actions
        .iter()
        .filter_map(|a| match a {
            Action::EnqueueLater { job, delay_ms } => Some((job, *delay_ms)),
            _ => None,
        })
        .collect()
}

fn later_events(t: &Transition) -> Vec<(&Event, u64)> {
    t.actions
        .iter()
        .filter_map(|a| match a {
            Action::EventLater { event, delay_ms } => Some((event, *delay_ms)),
            _ => None,
        })
        .collect()
}

fn set_step<'a>(t: &'a Transition, step: &str) -> Option<&'a StepRecord> {
    t.actions.iter().find_map(|a| match a {
        Action::SetStep { step: s, record } if s == step => Some(record),
        _ => None,
    })
}

fn set_statuses(t: &Transition) -> Vec<ProcessStatus> {
    t.actions
        .iter()
        .filter_map(|a| match a {
            Action::SetStatus(s) => Some(*s),
            _ => None,
        })
        .collect()
}

fn finish_code(t: &Transition) -> Option<&str> {
    t.actions.iter().find_map(|a| match a {
        Action::Finish { code, .. } => code.as_deref(),
        _ => None,
    })
}

fn notes(t: &Transition) -> String {
    t.notes.join("\n")
}

// ---------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------

#[test]
fn create_enqueues_worker_start_steps_with_distinct_tokens() {
    let d = def(r#"
start = ["A", "B"]

[[steps]]
name = "A"
kind = "noop"

[[steps]]
name = "B"
kind = "noop"
"#);
    let kinds = KindRegistry::builtin();
    let ctx = Ctx {
        def: &d,
        kinds: &kinds,
        now_ms: NOW,
        jitter: 0.5,
    };
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let t = create(
        &ctx,
        PID,
        b"input".to_vec(),
        Some("idem-1".into()),
        Some(tp.into()),
        Duration::from_secs(90),
    );
    assert!(t.actions.contains(&Action::Create {
        process_type: "T".into(),
        version: 3,
        input: b"input".to_vec(),
        idempotency_key: Some("idem-1".into()),
        trace: Some(tp.into()),
        timeout_ms: 90_000,
        pending: false,
        tenant: None,
    }));
    let creates = t
        .actions
        .iter()
        .filter(|a| matches!(a, Action::Create { .. }))
        .count();
    assert_eq!(creates, 1);

    let jobs = enqueued(&t);
    assert_eq!(
        enqueued_steps(&t),
        ["A", "B"],
        "every start step, in start order"
    );
    let tokens: BTreeSet<&str> = jobs.iter().map(|j| j.token.as_str()).collect();
    assert_eq!(tokens.len(), 2, "tokens are distinct: {jobs:?}");
    for job in &jobs {
        assert_eq!(job.process_id, PID);
        assert_eq!((job.attempt, job.visit), (1, 1));
        assert_eq!(job.enqueued_ms, NOW);
        assert_eq!(job.trace.traceparent.as_deref(), Some(tp));
        assert!(!job.token.is_empty());
        let rec = set_step(&t, &job.step).unwrap();
        assert_eq!(rec.status, StepStatus::Queued);
        assert_eq!(
            rec.token, job.token,
            "the record fences the job it enqueued"
        );
        assert_eq!((rec.attempt, rec.visit), (1, 1));
        assert_eq!(rec.queued_ms, Some(NOW));
    }
    assert_eq!(set_statuses(&t), [ProcessStatus::Running]);
    assert!(t.finish().is_none());
    assert!(later_events(&t).is_empty() && later_jobs(&t).is_empty());
}

#[test]
fn create_sleep_start_step_waits_on_a_timer() {
    let (sim, t) = Sim::start(
        r#"
[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "250ms" }
next = "After"

[[steps]]
name = "After"
kind = "noop"
"#,
    );
    assert!(enqueued(&t).is_empty(), "the scheduler runs sleep steps");
    let nap = set_step(&t, "Nap").unwrap();
    assert_eq!(nap.status, StepStatus::Waiting);
    assert_eq!(nap.started_ms, Some(NOW));
    assert_eq!(
        later_events(&t),
        [(&timer("Nap", &nap.token), 250)],
        "a durable timer for the configured duration"
    );
    assert_eq!(set_statuses(&t), [ProcessStatus::Running]);
    assert_eq!(sim.rec.status, ProcessStatus::Running);
}

const APPROVAL: &str = r#"
[[steps]]
name = "Review"
kind = "approval"
timeout = "2h"
next = "Ship"

[steps.on]
rejected = "Fix"

[[steps]]
name = "Ship"
kind = "noop"

[[steps]]
name = "Fix"
kind = "noop"
"#;

#[test]
fn create_approval_start_step_waits_for_approval() {
    let (sim, t) = Sim::start(APPROVAL);
    assert!(enqueued(&t).is_empty());
    let review = set_step(&t, "Review").unwrap();
    assert_eq!(review.status, StepStatus::Waiting);
    assert_eq!(
        later_events(&t),
        [(&step_timeout("Review", &review.token), 2 * 3_600_000)],
        "the approval's step timeout"
    );
    assert_eq!(set_statuses(&t), [ProcessStatus::WaitingForApproval]);
    assert_eq!(sim.rec.status, ProcessStatus::WaitingForApproval);
}

#[test]
fn create_fans_out_to_every_kind_of_start_step() {
    let (sim, t) = Sim::start(
        r#"
start = ["Work", "Nap", "Review"]

[[steps]]
name = "Work"
kind = "noop"

[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "1s" }

[[steps]]
name = "Review"
kind = "approval"
timeout = "30m"
"#,
    );
    assert_eq!(enqueued_steps(&t), ["Work"]);
    let later = later_events(&t);
    assert_eq!(later.len(), 2);
    assert!(later.contains(&(&timer("Nap", &sim.token("Nap")), 1000)));
    assert!(later.contains(&(&step_timeout("Review", &sim.token("Review")), 1_800_000)));
    let tokens: BTreeSet<String> = ["Work", "Nap", "Review"]
        .iter()
        .map(|s| sim.token(s))
        .collect();
    assert_eq!(tokens.len(), 3);
    assert_eq!(
        set_statuses(&t),
        [ProcessStatus::WaitingForApproval],
        "an approval waits while the other branches run"
    );
}

// ---------------------------------------------------------------------------------------
// sequence and stale events
// ---------------------------------------------------------------------------------------

#[test]
fn step_ok_enqueues_the_next_step_and_the_last_completes() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    sim.rec.trace = Some("00-trace-01".into());
    let a_token = sim.token("A");
    let t = sim.ok("A");
    assert_eq!(enqueued_steps(&t), ["B"]);
    assert_eq!(
        enqueued(&t)[0].trace.traceparent.as_deref(),
        Some("00-trace-01"),
        "every job carries the process's trace context"
    );
    let a = set_step(&t, "A").unwrap();
    assert_eq!(a.status, StepStatus::Completed);
    assert_eq!(a.outcome.as_deref(), Some("ok"));
    assert_eq!(a.ended_ms, Some(NOW));
    assert_eq!(a.attempts().len(), 1);
    assert_eq!(a.attempts()[0].outcome, "ok");
    assert_eq!((a.attempts()[0].attempt, a.attempts()[0].visit), (1, 1));
    let b = set_step(&t, "B").unwrap();
    let job = enqueued(&t)[0];
    assert_eq!(b.status, StepStatus::Queued);
    assert_eq!(b.token, job.token);
    assert_ne!(b.token, a_token, "a new token for every job");
    assert_eq!((job.attempt, job.visit), (1, 1));
    assert!(
        set_statuses(&t).is_empty(),
        "still Running: no status write"
    );
    assert!(t.finish().is_none());

    let t = sim.ok("B");
    assert_eq!(enqueued_steps(&t), ["C"]);
    let t = sim.ok("C");
    assert!(enqueued(&t).is_empty());
    assert_eq!(t.finish(), Some((ProcessStatus::Completed, None)));
    assert_eq!(finish_code(&t), None);
    assert_eq!(sim.rec.status, ProcessStatus::Completed);
    let tokens: BTreeSet<String> = ["A", "B", "C"].iter().map(|s| sim.token(s)).collect();
    assert_eq!(tokens.len(), 3, "tokens never repeat across transitions");
}

#[test]
fn stale_or_premature_step_events_change_nothing() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    let token = sim.token("A");

    // The step is still queued: no worker committed it.
    let t = sim.feed(step_event("A", &token, ok()));
    assert!(t.is_empty(), "{t:?}");
    assert!(notes(&t).contains("no longer applies"));

    // A token of another job of the step.
    sim.rec.steps.get_mut("A").unwrap().status = StepStatus::Done;
    let t = sim.feed(step_event("A", "0.9", ok()));
    assert!(t.is_empty(), "{t:?}");

    // Unknown step.
    assert!(sim.feed(step_event("Nope", &token, ok())).is_empty());

    // A running step (reported before `done` was read back) is accepted.
    sim.rec.steps.get_mut("A").unwrap().status = StepStatus::Running;
    let t = sim.feed(step_event("A", &token, ok()));
    assert_eq!(enqueued_steps(&t), ["B"]);

    // The same event again (a redelivery): A is completed now.
    let rev = sim.rec.rev;
    let t = sim.feed(step_event("A", &token, ok()));
    assert!(t.is_empty(), "{t:?}");
    assert_eq!(sim.rec.rev, rev);

    // Other event types with a stale token or on the wrong kind of step.
    let b = sim.token("B");
    assert!(
        sim.feed(timer("B", &b)).is_empty(),
        "B does not wait on a timer"
    );
    assert!(sim.feed(step_timeout("B", &b)).is_empty());
    assert!(sim.feed(dead_letter("B", "0.1")).is_empty());
}

#[test]
fn events_for_a_finished_process_are_ignored() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    let token = sim.token("A");
    sim.rec.steps.get_mut("A").unwrap().status = StepStatus::Done;
    for status in [
        ProcessStatus::Completed,
        ProcessStatus::Failed,
        ProcessStatus::Cancelled,
        ProcessStatus::TimedOut,
    ] {
        sim.rec.status = status;
        for ev in [
            step_event("A", &token, ok()),
            step_event("A", &token, failure("x", true)),
            dead_letter("A", &token),
            timer("A", &token),
            step_timeout("A", &token),
            process_timeout(),
            signal("approval", "approve"),
        ] {
            let t = sim.feed(ev.clone());
            assert!(t.is_empty(), "{status}: {ev:?} gave {t:?}");
            assert!(notes(&t).contains("already"), "{t:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// fan-out / fan-in
// ---------------------------------------------------------------------------------------

#[test]
fn join_all_waits_for_every_inbound_step() {
    let (mut sim, _) = Sim::start(&fan_in(3, "all"));
    let t = sim.ok("Start");
    assert_eq!(enqueued_steps(&t), ["B0", "B1", "B2"]);

    let t = sim.ok("B1");
    assert!(enqueued(&t).is_empty(), "one of three arrived");
    let join = set_step(&t, "Join").expect("the arrival is recorded");
    assert_eq!(join.status, StepStatus::Idle);
    assert_eq!(join.arrived, ["B1"]);
    assert!(t.finish().is_none());

    let t = sim.ok("B0");
    assert!(enqueued(&t).is_empty(), "two of three arrived");
    assert_eq!(set_step(&t, "Join").unwrap().arrived, ["B1", "B0"]);

    let t = sim.ok("B2");
    assert_eq!(
        enqueued_steps(&t),
        ["Join"],
        "the last arrival fires the join"
    );
    let join = set_step(&t, "Join").unwrap();
    assert_eq!(join.status, StepStatus::Queued);
    assert!(join.arrived.is_empty(), "arrivals reset once fired");
    assert_eq!(join.visit, 1);

    let t = sim.ok("Join");
    assert_eq!(enqueued_steps(&t), ["Done"]);
    let t = sim.ok("Done");
    assert_eq!(t.finish(), Some((ProcessStatus::Completed, None)));
}

#[test]
fn join_all_fires_once_whatever_the_order_of_arrival() {
    let orders = [
        ["B0", "B1", "B2"],
        ["B0", "B2", "B1"],
        ["B1", "B0", "B2"],
        ["B1", "B2", "B0"],
        ["B2", "B0", "B1"],
        ["B2", "B1", "B0"],
    ];
    for order in orders {
        let (mut sim, _) = Sim::start(&fan_in(3, "all"));
        sim.ok("Start");
        let fired: Vec<usize> = order
            .iter()
            .enumerate()
            .filter(|(_, b)| enqueued_steps(&sim.ok(b)).contains(&"Join"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(fired, [2], "order {order:?}");
    }
}

#[test]
fn join_any_fires_on_the_first_arrival_and_ignores_arrivals_while_active() {
    let (mut sim, _) = Sim::start(&fan_in(3, "any"));
    sim.ok("Start");
    let t = sim.ok("B1");
    assert_eq!(enqueued_steps(&t), ["Join"]);
    let join_token = sim.token("Join");

    let t = sim.ok("B2");
    assert!(enqueued(&t).is_empty());
    assert!(
        set_step(&t, "Join").is_none(),
        "the active join is left alone"
    );
    assert!(notes(&t).contains("already active"), "{t:?}");
    assert_eq!(sim.token("Join"), join_token);

    // "any" fires on each arrival: once the join is no longer active, B0 runs it again.
    let t = sim.ok("Join");
    assert_eq!(enqueued_steps(&t), ["Done"]);
    let t = sim.ok("B0");
    assert_eq!(enqueued_steps(&t), ["Join"]);
    assert_eq!(set_step(&t, "Join").unwrap().visit, 2);
}

// ---------------------------------------------------------------------------------------
// routing on outcomes
// ---------------------------------------------------------------------------------------

const ROUTED: &str = r#"
[[steps]]
name = "Check"
kind = "noop"
next = "Ship"

[steps.on]
rejected = "Fix"

[[steps]]
name = "Ship"
kind = "noop"

[[steps]]
name = "Fix"
kind = "noop"
"#;

#[test]
fn a_named_outcome_follows_its_route() {
    let (mut sim, _) = Sim::start(ROUTED);
    let t = sim.report("Check", out("rejected"));
    assert_eq!(enqueued_steps(&t), ["Fix"]);
    let check = set_step(&t, "Check").unwrap();
    assert_eq!(check.status, StepStatus::Completed);
    assert_eq!(check.outcome.as_deref(), Some("rejected"));
    assert!(!sim.rec.steps.contains_key("Ship"));

    let (mut sim, _) = Sim::start(ROUTED);
    assert_eq!(enqueued_steps(&sim.ok("Check")), ["Ship"]);
}

#[test]
fn an_unrouted_outcome_ends_the_branch() {
    let (mut sim, _) = Sim::start(ROUTED);
    let t = sim.report("Check", out("skipped"));
    assert!(enqueued(&t).is_empty());
    assert!(notes(&t).contains("no route"), "{t:?}");
    assert_eq!(t.finish(), Some((ProcessStatus::Completed, None)));

    // With another branch still open, the process waits for it.
    let (mut sim, _) = Sim::start(&format!(
        "start = [\"Check\", \"Other\"]\n{ROUTED}\n[[steps]]\nname = \"Other\"\nkind = \"noop\"\n"
    ));
    let t = sim.report("Check", out("skipped"));
    assert!(t.finish().is_none());
    assert!(set_statuses(&t).is_empty());
    let t = sim.ok("Other");
    assert_eq!(t.finish(), Some((ProcessStatus::Completed, None)));
}

// ---------------------------------------------------------------------------------------
// retries and failures
// ---------------------------------------------------------------------------------------

const RETRIED: &str = r#"
[[steps]]
name = "A"
kind = "noop"
retry = { max_attempts = 3, initial_backoff = "1s", max_backoff = "10s", multiplier = 2.0 }
next = "B"

[[steps]]
name = "B"
kind = "noop"
"#;

#[test]
fn a_retryable_failure_is_retried_with_jittered_backoff() {
    let (mut sim, _) = Sim::start(RETRIED);
    let policy = sim.def.step("A").unwrap().retry.clone();
    let first = sim.token("A");

    // Jitter 0: full jitter may pick no delay at all.
    sim.jitter = 0.0;
    let t = sim.report("A", failure("boom", true));
    let later = later_jobs(&t);
    assert_eq!(later.len(), 1, "{t:?}");
    let (job, delay) = later[0];
    assert_eq!(delay, 0);
    assert_eq!((job.step.as_str(), job.attempt, job.visit), ("A", 2, 1));
    assert_ne!(job.token, first, "a retry is a new job with a new token");
    let a = set_step(&t, "A").unwrap();
    assert_eq!(a.status, StepStatus::Delayed);
    assert_eq!(a.token, job.token);
    assert_eq!(a.attempt, 2);
    assert_eq!(a.due_ms, Some(NOW));
    assert_eq!(a.ended_ms, None);
    assert_eq!(a.attempts().len(), 1);
    assert_eq!(a.attempts()[0].outcome, "failed");
    assert_eq!(a.attempts()[0].error.as_deref(), Some("boom"));
    assert_eq!(a.attempts()[0].code.as_deref(), Some("handler_error"));
    assert!(enqueued(&t).is_empty() && t.finish().is_none());
    assert!(set_statuses(&t).is_empty());

    // The old job's late result is fenced out.
    assert!(sim.feed(step_event("A", &first, ok())).is_empty());

    // Jitter 1: the ceiling, which doubles with each failure.
    sim.jitter = 1.0;
    let t = sim.report("A", failure("boom", true));
    let (job, delay) = later_jobs(&t)[0];
    assert_eq!(delay, 2000);
    assert_eq!(delay, policy.backoff_ceiling(2).as_millis() as u64);
    assert_eq!(job.attempt, 3);
    assert_eq!(sim.step("A").due_ms, Some(NOW + 2000));

    // The last attempt succeeds: the process moves on.
    let t = sim.ok("A");
    assert_eq!(enqueued_steps(&t), ["B"]);
    assert_eq!(sim.step("A").attempts().len(), 3);
}

#[test]
fn retry_after_raises_the_delay_and_is_clamped() {
    let delay_for = |jitter: f64, retry_after_ms: Option<u64>| {
        let (mut sim, _) = Sim::start(RETRIED);
        sim.jitter = jitter;
        let t = sim.report(
            "A",
            StepResult {
                failure: Some(retry_after_ms.map_or(Failure::Retryable, Failure::RetryAfter)),
                ..failure("rate limited", true)
            },
        );
        later_jobs(&t)[0].1
    };
    assert_eq!(
        delay_for(0.0, Some(5000)),
        5000,
        "retry-after beats backoff"
    );
    assert_eq!(
        delay_for(1.0, Some(10)),
        1000,
        "backoff beats a short retry-after"
    );
    assert_eq!(delay_for(1.0, None), 1000);
    assert_eq!(
        delay_for(0.0, Some(u64::MAX)),
        MAX_RETRY_AFTER.as_millis() as u64,
        "clamped"
    );
    assert_eq!(
        delay_for(0.0, Some(MAX_RETRY_AFTER.as_millis() as u64 + 1)),
        3_600_000
    );
}

#[test]
fn exhausted_retries_fail_the_process() {
    let (mut sim, _) = Sim::start(RETRIED);
    sim.report("A", failure("boom", true));
    sim.report("A", failure("boom", true));
    let t = sim.report("A", failure("boom", true));
    assert!(later_jobs(&t).is_empty(), "no attempt left");
    assert_eq!(
        t.finish(),
        Some((
            ProcessStatus::Failed,
            Some("step A failed: boom (after 3 attempts)")
        ))
    );
    assert_eq!(finish_code(&t), Some("handler_error"));
    let a = set_step(&t, "A").unwrap();
    assert_eq!(a.status, StepStatus::Failed);
    let attempts: Vec<u32> = a.attempts().iter().map(|h| h.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(sim.rec.status, ProcessStatus::Failed);
    assert_eq!(sim.rec.code.as_deref(), Some("handler_error"));
}

#[test]
fn a_failure_without_error_or_code_gets_defaults() {
    let (mut sim, _) = Sim::start(RETRIED);
    let t = sim.report("A", out("failed"));
    assert_eq!(
        t.finish(),
        Some((ProcessStatus::Failed, Some("step A failed: step failed")))
    );
    assert_eq!(finish_code(&t), Some("step_failed"));
}

#[test]
fn a_permanent_error_is_never_retried() {
    let (mut sim, _) = Sim::start(RETRIED);
    sim.jitter = 1.0;
    let t = sim.report("A", failure("bad input", false));
    assert!(later_jobs(&t).is_empty());
    assert_eq!(
        t.finish(),
        Some((ProcessStatus::Failed, Some("step A failed: bad input")))
    );
    assert_eq!(set_step(&t, "A").unwrap().attempts().len(), 1);
}

const WITH_CLEANUP: &str = r#"
start = ["A", "Side"]

[[steps]]
name = "A"
kind = "noop"
retry = { max_attempts = 2, initial_backoff = "1s", max_backoff = "1s" }
next = "B"

[steps.on]
failed = "Cleanup"

[[steps]]
name = "B"
kind = "noop"

[[steps]]
name = "Cleanup"
kind = "noop"

[[steps]]
name = "Side"
kind = "noop"
"#;

#[test]
fn a_failed_route_is_followed() {
    let (mut sim, _) = Sim::start(WITH_CLEANUP);
    let t = sim.report("A", failure("boom", true));
    assert_eq!(later_jobs(&t).len(), 1, "retries come first");
    let t = sim.report("A", failure("boom", true));
    assert_eq!(enqueued_steps(&t), ["Cleanup"]);
    let a = set_step(&t, "A").unwrap();
    assert_eq!(a.status, StepStatus::Failed);
    assert_eq!(a.error.as_deref(), Some("boom"));
    assert!(t.finish().is_none(), "the failure is handled");
    assert!(!sim.rec.steps.contains_key("B"));

    let (mut sim, _) = Sim::start(WITH_CLEANUP);
    let t = sim.report("A", failure("bad input", false));
    assert_eq!(enqueued_steps(&t), ["Cleanup"], "a permanent error too");
    sim.ok("Side");
    let t = sim.ok("Cleanup");
    assert_eq!(t.finish(), Some((ProcessStatus::Completed, None)));
}

#[test]
fn a_fatal_error_fails_the_process_whatever_the_routes() {
    let (mut sim, _) = Sim::start(WITH_CLEANUP);
    let t = sim.report(
        "A",
        StepResult {
            failure: Some(Failure::Fatal),
            code: Some("corrupt_state".into()),
            ..failure("state does not decode", true)
        },
    );
    assert!(enqueued(&t).is_empty() && later_jobs(&t).is_empty());
    assert_eq!(
        t.finish(),
        Some((
            ProcessStatus::Failed,
            Some("step A failed: state does not decode")
        ))
    );
    assert_eq!(finish_code(&t), Some("corrupt_state"));
    assert_eq!(set_step(&t, "A").unwrap().status, StepStatus::Failed);
    let side = set_step(&t, "Side").unwrap();
    assert_eq!(
        side.status,
        StepStatus::Cancelled,
        "open steps are cancelled"
    );
    assert_eq!(side.ended_ms, Some(NOW));
}

#[test]
fn history_is_capped() {
    let (mut sim, _) = Sim::start(
        r#"
[[steps]]
name = "A"
kind = "noop"
retry = { max_attempts = 20, initial_backoff = "1ms", max_backoff = "1ms" }
"#,
    );
    for _ in 0..12 {
        sim.report("A", failure("again", true));
    }
    let a = sim.step("A");
    assert_eq!(a.attempt, 13);
    assert_eq!(a.attempts().len(), HISTORY_CAP);
    assert_eq!(a.attempts()[0].attempt, 3, "the oldest attempts go first");
    assert_eq!(a.attempts().last().unwrap().attempt, 12);
}

// ---------------------------------------------------------------------------------------
// dead letters, timeouts, timers, signals
// ---------------------------------------------------------------------------------------

#[test]
fn a_dead_letter_fails_the_process() {
    let (mut sim, _) = Sim::start(WITH_CLEANUP);
    let token = sim.token("A");
    assert!(sim.feed(dead_letter("A", "0.7")).is_empty(), "stale token");

    sim.rec.steps.get_mut("A").unwrap().status = StepStatus::Running;
    let t = sim.feed(dead_letter("A", &token));
    let (status, error) = t.finish().unwrap();
    assert_eq!(status, ProcessStatus::Failed);
    assert!(
        error.unwrap().contains("dead-lettered after 5 deliveries"),
        "{error:?}"
    );
    assert_eq!(finish_code(&t), Some("max_deliveries"));
    assert!(enqueued(&t).is_empty(), "no failed route for a dead letter");
    let a = set_step(&t, "A").unwrap();
    assert_eq!(a.status, StepStatus::Failed);
    assert_eq!(a.code.as_deref(), Some("max_deliveries"));
    assert_eq!(set_step(&t, "Side").unwrap().status, StepStatus::Cancelled);
}

#[test]
fn the_process_timeout_cancels_every_active_step() {
    let (mut sim, _) = Sim::start(
        r#"
start = ["Work", "Retry", "Nap", "Review", "Quick"]

[[steps]]
name = "Work"
kind = "noop"

[[steps]]
name = "Retry"
kind = "noop"

[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "1h" }

[[steps]]
name = "Review"
kind = "approval"

[[steps]]
name = "Quick"
kind = "noop"
"#,
    );
    sim.ok("Quick");
    sim.report("Retry", failure("flaky", true));
    assert_eq!(sim.step("Retry").status, StepStatus::Delayed);

    sim.now_ms = NOW + 3_600_000;
    let t = sim.feed(process_timeout());
    let (status, error) = t.finish().unwrap();
    assert_eq!(status, ProcessStatus::TimedOut);
    assert!(error.unwrap().contains("longer than 1h"), "{error:?}");
    assert_eq!(finish_code(&t), Some("process_timeout"));
    for s in ["Work", "Retry", "Nap", "Review"] {
        let r = set_step(&t, s).unwrap_or_else(|| panic!("{s} not written"));
        assert_eq!(r.status, StepStatus::Cancelled, "{s}");
        assert_eq!(r.ended_ms, Some(NOW + 3_600_000), "{s}");
    }
    assert!(
        set_step(&t, "Quick").is_none(),
        "finished steps are left as they are"
    );
    assert_eq!(sim.step("Quick").status, StepStatus::Completed);
    assert!(enqueued(&t).is_empty() && later_events(&t).is_empty());
    assert!(sim.rec.active_steps().next().is_none());
    assert!(sim.feed(process_timeout()).is_empty(), "only once");
}

#[test]
fn a_waiting_approval_times_out() {
    let (mut sim, _) = Sim::start(APPROVAL);
    let token = sim.token("Review");
    assert!(sim.feed(step_timeout("Review", "0.1")).is_empty());
    let t = sim.feed(step_timeout("Review", &token));
    assert_eq!(
        t.finish(),
        Some((
            ProcessStatus::Failed,
            Some("step Review failed: no signal within the step timeout of 2h")
        ))
    );
    assert_eq!(finish_code(&t), Some("step_timeout"));
    assert_eq!(set_step(&t, "Review").unwrap().status, StepStatus::Failed);

    // With a failed route the timeout is handled like any failure.
    let (mut sim, _) = Sim::start(
        r#"
[[steps]]
name = "Review"
kind = "approval"
timeout = "10m"
on = { failed = "Escalate" }

[[steps]]
name = "Escalate"
kind = "noop"
"#,
    );
    let token = sim.token("Review");
    let t = sim.feed(step_timeout("Review", &token));
    assert_eq!(enqueued_steps(&t), ["Escalate"]);
    assert_eq!(set_statuses(&t), [ProcessStatus::Running]);
    assert!(t.finish().is_none());
}

#[test]
fn a_timer_completes_its_sleep_step() {
    let (mut sim, _) = Sim::start(
        r#"
[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "5s" }
next = "After"

[[steps]]
name = "After"
kind = "noop"
"#,
    );
    let token = sim.token("Nap");
    assert!(sim.feed(timer("Nap", "0.3")).is_empty());
    assert!(
        sim.feed(step_event("Nap", &token, ok())).is_empty(),
        "a worker cannot complete a waiting step"
    );
    let t = sim.feed(timer("Nap", &token));
    assert_eq!(enqueued_steps(&t), ["After"]);
    let nap = set_step(&t, "Nap").unwrap();
    assert_eq!(nap.status, StepStatus::Completed);
    assert_eq!(nap.outcome.as_deref(), Some("ok"));
    assert!(sim.feed(timer("Nap", &token)).is_empty(), "fires once");
}

#[test]
fn signals_decide_a_waiting_approval() {
    let named = APPROVAL.replace(
        "timeout = \"2h\"",
        "timeout = \"2h\"\nconfig = { signal = \"review\" }",
    );
    let (mut sim, _) = Sim::start(&named);
    let t = sim.feed(signal("approval", "approve"));
    assert!(t.is_empty(), "nobody waits for that name");
    assert!(notes(&t).contains("no step is waiting"), "{t:?}");

    let t = sim.feed(signal("review", "approve"));
    assert_eq!(enqueued_steps(&t), ["Ship"]);
    assert_eq!(set_statuses(&t), [ProcessStatus::Running]);
    let review = set_step(&t, "Review").unwrap();
    assert_eq!(review.status, StepStatus::Completed);
    assert_eq!(review.outcome.as_deref(), Some("ok"));
    assert!(
        sim.feed(signal("review", "approve")).is_empty(),
        "decided already"
    );

    // The default signal name is `approval`; reject routes on `rejected`.
    let (mut sim, _) = Sim::start(APPROVAL);
    let t = sim.feed(signal("approval", " Reject "));
    assert_eq!(enqueued_steps(&t), ["Fix"]);
    assert_eq!(
        set_step(&t, "Review").unwrap().outcome.as_deref(),
        Some("rejected")
    );

    // A value the step does not route on (a typo of approve) changes nothing: it must not
    // end the branch and complete the process with the remaining steps never run.
    let (mut sim, _) = Sim::start(APPROVAL);
    for v in ["postpone", "aprove"] {
        let t = sim.feed(signal("approval", v));
        assert!(t.is_empty(), "{v}: {t:?}");
        assert!(
            notes(&t).contains("not an outcome step Review routes on"),
            "{t:?}"
        );
    }
    // An outcome of the step's `on` table is taken.
    let routed = APPROVAL.replace("rejected = \"Fix\"", "rejected = \"Fix\"\nhold = \"Fix\"");
    let (mut sim, _) = Sim::start(&routed);
    let t = sim.feed(signal("approval", "hold"));
    assert_eq!(enqueued_steps(&t), ["Fix"]);
    assert_eq!(
        set_step(&t, "Review").unwrap().outcome.as_deref(),
        Some("hold")
    );
}

#[test]
fn signal_route_names_the_accepted_values() {
    let routed = APPROVAL.replace("rejected = \"Fix\"", "rejected = \"Fix\"\nhold = \"Fix\"");
    let (sim, _) = Sim::start(&routed);
    let def = &*sim.def;
    assert_eq!(signal_route(def, "Review", "Approve").as_deref(), Ok("ok"));
    assert_eq!(signal_route(def, "Review", "no").as_deref(), Ok("rejected"));
    assert_eq!(signal_route(def, "Review", "hold").as_deref(), Ok("hold"));
    for v in ["aprove", "LGTM!", "failed"] {
        assert_eq!(
            signal_route(def, "Review", v),
            Err(vec!["approve".into(), "reject".into(), "hold".into()]),
            "{v}"
        );
    }
}

#[test]
fn signal_values_map_to_outcomes() {
    for v in ["", "approve", "Approved", "OK", "yes", "  approve  "] {
        assert_eq!(signal_outcome(v).as_deref(), Some(outcome::OK), "{v:?}");
    }
    for v in ["reject", "REJECTED", "no", "deny", "denied"] {
        assert_eq!(
            signal_outcome(v).as_deref(),
            Some(outcome::REJECTED),
            "{v:?}"
        );
    }
    assert_eq!(
        signal_outcome("needs_changes").as_deref(),
        Some("needs_changes")
    );
    assert_eq!(signal_outcome("LGTM!"), None, "not an outcome name");
    assert_eq!(
        signal_outcome("failed"),
        None,
        "a signal cannot fake a failure"
    );
}

// ---------------------------------------------------------------------------------------
// cycles
// ---------------------------------------------------------------------------------------

#[test]
fn max_visits_bounds_a_cycle() {
    let (mut sim, _) = Sim::start(
        r#"
[[steps]]
name = "A"
kind = "noop"
next = "B"

[[steps]]
name = "B"
kind = "noop"
join = "any"
max_visits = 2
next = "C"

[[steps]]
name = "C"
kind = "noop"
on = { again = "B" }
"#,
    );
    sim.ok("A");
    let first = sim.token("B");
    sim.ok("B");
    let t = sim.report("C", out("again"));
    assert_eq!(enqueued_steps(&t), ["B"]);
    let b = set_step(&t, "B").unwrap();
    assert_eq!((b.visit, b.attempt, b.status), (2, 1, StepStatus::Queued));
    assert_ne!(b.token, first);
    assert_eq!(b.attempts().len(), 1, "history survives a new visit");
    assert_eq!(enqueued(&t)[0].visit, 2);

    sim.ok("B");
    let t = sim.report("C", out("again"));
    assert!(enqueued(&t).is_empty(), "no third visit");
    assert_eq!(
        t.finish(),
        Some((
            ProcessStatus::Failed,
            Some("step B exceeded max_visits (2)")
        ))
    );
    assert_eq!(finish_code(&t), Some("max_visits"));
    assert_eq!(sim.step("B").visit, 2);
}

// ---------------------------------------------------------------------------------------
// backoff and the delayed-set member
// ---------------------------------------------------------------------------------------

#[test]
fn backoff_is_full_jitter_under_the_ceiling() {
    let p = RetryPolicy::default();
    assert_eq!(backoff_ms(&p, 1, 0.0), 0);
    assert_eq!(backoff_ms(&p, 1, 1.0), 1000);
    assert_eq!(backoff_ms(&p, 3, 1.0), 4000);
    assert_eq!(backoff_ms(&p, 3, 0.5), 2000);
    assert_eq!(backoff_ms(&p, 10, 1.0), 60_000, "capped at max_backoff");
    assert_eq!(backoff_ms(&p, 1, 7.0), 1000, "jitter is clamped");
    assert_eq!(backoff_ms(&p, 1, -1.0), 0);
    assert_eq!(backoff_ms(&p, 1, f64::NAN), 0);
}

#[test]
fn deadline_member_is_deterministic_and_names_the_process() {
    assert_eq!(deadline_member(PID), deadline_member(PID));
    assert_ne!(deadline_member(PID), deadline_member("p2"));
    let v: serde_json::Value = serde_json::from_str(&deadline_member(PID)).unwrap();
    assert_eq!(v["k"], "event");
    assert_eq!(
        v["f"],
        serde_json::json!(["v", "1", "t", "process_timeout", "pid", PID])
    );
}

// ---------------------------------------------------------------------------------------
// to_commit
// ---------------------------------------------------------------------------------------

const RETENTION: u64 = 86_400;

fn s(b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap()
}

/// One parsed op: name, KEYS index (1-based) and its arguments.
#[derive(Debug)]
struct Op {
    name: String,
    key: usize,
    args: Vec<String>,
}

/// Parses the ops the way `commit.lua` does; every argument must belong to the header or
/// an op, and every key index must exist.
fn parse_ops(call: &CommitCall) -> Vec<Op> {
    let a: Vec<String> = call.args.iter().map(|b| s(b)).collect();
    let n: usize = a[7].parse().unwrap();
    let mut i = 8;
    let mut ops = Vec::new();
    for _ in 0..n {
        let name = a[i].clone();
        let key: usize = a[i + 1].parse().unwrap();
        assert!(
            (1..=call.keys.len()).contains(&key),
            "op {name} uses key {key}"
        );
        let end = match name.as_str() {
            "hset" | "xadd" => i + 3 + 2 * a[i + 2].parse::<usize>().unwrap(),
            "hdel" => i + 3 + a[i + 2].parse::<usize>().unwrap(),
            "zadd" | "zaddin" | "setex" | "hincrby" => i + 4,
            "hincrbyttl" => i + 5,
            "zrem" | "expire" => i + 3,
            "persist" | "del" | "absent" => i + 2,
            other => panic!("unknown op {other}"),
        };
        let first = if matches!(name.as_str(), "hset" | "xadd" | "hdel") {
            i + 3
        } else {
            i + 2
        };
        ops.push(Op {
            name,
            key,
            args: a[first..end].to_vec(),
        });
        i = end;
    }
    assert_eq!(i, a.len(), "the op count covers every argument");
    ops
}

impl Op {
    fn is(&self, name: &str, call: &CommitCall, key: &Key) -> bool {
        self.name == name && call.keys[self.key - 1] == *key
    }
}

fn find<'a>(ops: &'a [Op], call: &CommitCall, name: &str, key: &Key) -> Vec<&'a Op> {
    ops.iter().filter(|o| o.is(name, call, key)).collect()
}

/// The fields of the (single) hset on `key`, last value winning as in Redis.
fn hset_fields(ops: &[Op], call: &CommitCall, key: &Key) -> BTreeMap<String, String> {
    let sets = find(ops, call, "hset", key);
    assert_eq!(sets.len(), 1, "one hset on {key}");
    sets[0]
        .args
        .chunks(2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

fn assert_keys_share_the_tag(call: &CommitCall, keys: &Keys) {
    assert_eq!(call.keys[0], keys.process(PID), "KEYS[1] is the meta hash");
    for k in &call.keys {
        assert!(k.as_str().starts_with("honua:v2:{0}:"), "{k}");
    }
    let unique: BTreeSet<&Key> = call.keys.iter().collect();
    assert_eq!(unique.len(), call.keys.len(), "no key is passed twice");
}

#[test]
fn create_commit_writes_the_whole_process() {
    let d = def(r#"
start = ["A", "Review"]

[[steps]]
name = "A"
kind = "noop"

[[steps]]
name = "Review"
kind = "approval"
timeout = "1m"
"#);
    let kinds = KindRegistry::builtin();
    let ctx = Ctx {
        def: &d,
        kinds: &kinds,
        now_ms: NOW,
        jitter: 0.5,
    };
    let t = create(
        &ctx,
        PID,
        b"in".to_vec(),
        Some("idem-1".into()),
        None,
        Duration::from_secs(90),
    );
    let keys = Keys::new("honua", 0);
    let call = t.to_commit(
        &keys,
        PID,
        None,
        NOW,
        RETENTION,
        Some(AckSource {
            stream: keys.submit(),
            id: "1-0",
        }),
    );
    assert_keys_share_the_tag(&call, &keys);
    let head: Vec<String> = call.args[..8].iter().map(|b| s(b)).collect();
    assert_eq!(head[0], "create");
    assert_eq!(head[1], "0");
    let idem: usize = head[2].parse().unwrap();
    assert_eq!(call.keys[idem - 1], keys.idempotency("idem-1"));
    let ack: usize = head[3].parse().unwrap();
    assert_eq!(ack, call.keys.len(), "the ack stream is the last key");
    assert_eq!(call.keys[ack - 1], keys.submit());
    assert_eq!(head[4], SCHEDULER_GROUP);
    assert_eq!(head[5], "1-0");

    let ops = parse_ops(&call);
    assert_eq!(ops.len(), head[7].parse::<usize>().unwrap());
    let meta = hset_fields(&ops, &call, &keys.process(PID));
    assert_eq!(meta[field::REV], "1");
    assert_eq!(meta[field::TYPE], "T");
    assert_eq!(meta[field::VERSION], "3");
    assert_eq!(
        meta[field::STATUS],
        "WaitingForApproval",
        "the last status wins"
    );
    assert_eq!(meta[field::CREATED_MS], NOW.to_string());
    assert_eq!(meta[field::DEADLINE_MS], (NOW + 90_000).to_string());
    assert_eq!(meta[field::IDEMPOTENCY_KEY], "idem-1");
    assert!(!meta.contains_key(field::TRACE));
    let steps = hset_fields(&ops, &call, &keys.steps(PID));
    assert_eq!(steps.keys().collect::<Vec<_>>(), ["A", "Review"]);
    let a: StepRecord = serde_json::from_str(&steps["A"]).unwrap();
    assert_eq!(&a, set_step(&t, "A").unwrap());
    assert_eq!(
        hset_fields(&ops, &call, &keys.data(PID))[field::INPUT],
        "in"
    );
    assert_eq!(find(&ops, &call, "zadd", &keys.index_all()).len(), 1);
    assert_eq!(find(&ops, &call, "zadd", &keys.index_active()).len(), 1);
    let setex = find(&ops, &call, "setex", &keys.idempotency("idem-1"));
    assert_eq!(
        setex[0].args,
        [(RETENTION + 90 + 1).to_string(), PID.into()]
    );
    let xadd = find(&ops, &call, "xadd", &keys.jobs());
    assert_eq!(xadd.len(), 1);
    let job_fields: Vec<String> = enqueued(&t)[0]
        .to_fields()
        .into_iter()
        .flat_map(|(k, v)| [k, v])
        .collect();
    assert_eq!(xadd[0].args, job_fields);
    let delayed = find(&ops, &call, "zaddin", &keys.delayed());
    let members: Vec<(&str, &str)> = delayed
        .iter()
        .map(|o| (o.args[0].as_str(), o.args[1].as_str()))
        .collect();
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.contains(&("90000", deadline_member(PID).as_str())));
    let review_timeout = delayed_member(
        "event",
        &step_timeout("Review", &set_step(&t, "Review").unwrap().token).to_fields(),
    );
    assert!(members.contains(&("60000", review_timeout.as_str())));
    assert!(ops.iter().all(|o| o.name != "expire"), "not finished");
}

#[test]
fn update_commit_is_guarded_by_the_revision() {
    let (mut sim, _) = Sim::start(RETRIED);
    sim.rec.rev = 41;
    sim.jitter = 1.0;
    let rev = sim.rec.rev;
    let t = sim.report("A", failure("boom", true));
    let keys = Keys::new("honua", 0);
    let call = t.to_commit(
        &keys,
        PID,
        at(rev),
        NOW,
        RETENTION,
        Some(AckSource {
            stream: keys.events(),
            id: "7-3",
        }),
    );
    assert_keys_share_the_tag(&call, &keys);
    let head: Vec<String> = call.args[..8].iter().map(|b| s(b)).collect();
    assert_eq!(&head[..3], ["update", "41", "0"]);
    assert_eq!(head[3], call.keys.len().to_string());
    assert_eq!(*call.keys.last().unwrap(), keys.events());
    assert_eq!(head[5], "7-3");
    assert_eq!(head[6], "0", "no worker committed on this revision");
    let ops = parse_ops(&call);
    assert_eq!(ops.len(), head[7].parse::<usize>().unwrap());
    let meta = hset_fields(&ops, &call, &keys.process(PID));
    assert_eq!(meta[field::REV], "42");
    assert_eq!(meta[field::UPDATED_MS], NOW.to_string());
    assert!(!meta.contains_key(field::STATUS));
    assert!(ops.iter().all(|o| o.name != "setex" && o.name != "expire"));
    assert!(find(&ops, &call, "zadd", &keys.index_all()).is_empty());

    // The retry waits in the delayed set as a job member.
    let delayed = find(&ops, &call, "zaddin", &keys.delayed());
    assert_eq!(delayed.len(), 1);
    assert_eq!(delayed[0].args[0], "1000");
    let member: serde_json::Value = serde_json::from_str(&delayed[0].args[1]).unwrap();
    assert_eq!(member["k"], "job");
    let (job, _) = later_jobs(&t)[0];
    let flat: Vec<String> = job
        .to_fields()
        .into_iter()
        .flat_map(|(k, v)| [k, v])
        .collect();
    assert_eq!(member["f"], serde_json::json!(flat));

    // Without a source to acknowledge.
    let call = t.to_commit(&keys, PID, at(rev), NOW, RETENTION, None);
    assert_eq!(s(&call.args[3]), "0");
    assert_eq!(s(&call.args[5]), "");
    parse_ops(&call);
}

#[test]
fn finishing_commit_expires_the_process_and_drops_its_deadline() {
    let (mut sim, _) = Sim::start(RETRIED);
    let rev = sim.rec.rev;
    let t = sim.report("A", failure("bad", false));
    assert!(t.finish().is_some());
    let keys = Keys::new("honua", 0);
    let call = t.to_commit(&keys, PID, at(rev), NOW + 5, RETENTION, None);
    assert_keys_share_the_tag(&call, &keys);
    let ops = parse_ops(&call);
    assert_eq!(ops.len(), s(&call.args[7]).parse::<usize>().unwrap());
    let meta = hset_fields(&ops, &call, &keys.process(PID));
    assert_eq!(meta[field::STATUS], "Failed");
    assert_eq!(meta[field::ENDED_MS], (NOW + 5).to_string());
    assert_eq!(meta[field::ERROR], "step A failed: bad");
    assert_eq!(meta[field::CODE], "handler_error");
    for k in keys.process_keys(PID) {
        let expire = find(&ops, &call, "expire", &k);
        assert_eq!(expire.len(), 1, "{k}");
        assert_eq!(expire[0].args, [RETENTION.to_string()]);
    }
    let zrem = find(&ops, &call, "zrem", &keys.delayed());
    assert_eq!(zrem.len(), 1);
    assert_eq!(zrem[0].args, [deadline_member(PID)]);
    assert_eq!(
        find(&ops, &call, "zrem", &keys.index_active())[0].args,
        [PID]
    );
    let by_status = find(
        &ops,
        &call,
        "zadd",
        &keys.index_status(ProcessStatus::Failed),
    );
    assert_eq!(by_status[0].args, [(NOW + 5).to_string(), PID.to_string()]);

    // A completed process too.
    let (mut sim, _) = Sim::start(SEQUENCE);
    sim.ok("A");
    sim.ok("B");
    let rev = sim.rec.rev;
    let t = sim.ok("C");
    let call = t.to_commit(&keys, PID, at(rev), NOW, RETENTION, None);
    let ops = parse_ops(&call);
    // The three process keys (the two counters of finished processes get theirs with
    // their first field: `hincrbyttl`).
    assert_eq!(ops.iter().filter(|o| o.name == "expire").count(), 3);
    assert_eq!(
        find(
            &ops,
            &call,
            "zadd",
            &keys.index_status(ProcessStatus::Completed)
        )
        .len(),
        1
    );
    // Counted for its type in this minute and this hour, and no longer active for it.
    for (k, ttl) in [
        (
            keys.stats_minute(NOW / 60_000),
            crate::keys::STATS_MINUTE_TTL_SECS,
        ),
        (
            keys.stats_hour(NOW / 3_600_000),
            crate::keys::STATS_HOUR_TTL_SECS,
        ),
    ] {
        assert_eq!(
            find(&ops, &call, "hincrbyttl", &k)[0].args,
            ["Completed:T".to_string(), "1".to_string(), ttl.to_string()]
        );
    }
    assert_eq!(
        find(&ops, &call, "zrem", &keys.index_active_type("T"))[0].args,
        [PID]
    );
}

// ---------------------------------------------------------------------------------------
// properties
// ---------------------------------------------------------------------------------------

proptest! {
    /// However the parallel branches arrive (and whatever duplicates follow), the join runs
    /// exactly once, on the last arrival, and the process then completes.
    #[test]
    fn join_all_is_activated_exactly_once(
        order in (2usize..=7).prop_flat_map(|n| Just((0..n).collect::<Vec<_>>()).prop_shuffle()),
        running in proptest::collection::vec(any::<bool>(), 7),
        replay in any::<bool>(),
    ) {
        let n = order.len();
        let (mut sim, _) = Sim::start(&fan_in(n, "all"));
        let t = sim.ok("Start");
        prop_assert_eq!(enqueued(&t).len(), n);
        let mut fired = Vec::new();
        let mut done = Vec::new();
        for (k, &i) in order.iter().enumerate() {
            let step = format!("B{i}");
            let token = sim.token(&step);
            // The worker's `done` may or may not be visible yet when the event is read.
            sim.rec.steps.get_mut(&step).unwrap().status =
                if running[i] { StepStatus::Running } else { StepStatus::Done };
            let t = sim.feed(step_event(&step, &token, ok()));
            let joins = enqueued_steps(&t).iter().filter(|s| **s == "Join").count();
            if joins > 0 {
                fired.push((k, joins));
            }
            prop_assert!(t.finish().is_none());
            done.push((step, token));
            if replay {
                // A redelivered event for a branch already routed.
                for (s, tok) in &done {
                    prop_assert!(sim.feed(step_event(s, tok, ok())).is_empty());
                }
            }
        }
        prop_assert_eq!(fired, vec![(n - 1, 1)]);
        prop_assert_eq!(sim.step("Join").visit, 1);
        sim.ok("Join");
        let t = sim.ok("Done");
        prop_assert_eq!(t.finish(), Some((ProcessStatus::Completed, None)));
    }

    /// The retry delay is the jittered backoff, raised to a clamped `Retry-After`.
    #[test]
    fn retry_delay_is_bounded(
        jitter in 0.0f64..=1.0,
        retry_after in proptest::option::of(any::<u64>()),
    ) {
        let (mut sim, _) = Sim::start(RETRIED);
        sim.jitter = jitter;
        let t = sim.report("A", StepResult { failure: Some(retry_after.map_or(Failure::Retryable, Failure::RetryAfter)), ..failure("x", true) });
        let (_, delay) = later_jobs(&t)[0];
        let cap = MAX_RETRY_AFTER.as_millis() as u64;
        prop_assert!(delay <= cap.max(1000));
        prop_assert!(delay >= retry_after.unwrap_or(0).min(cap));
        prop_assert!(delay >= backoff_ms(&sim.def.step("A").unwrap().retry, 1, jitter));
        prop_assert_eq!(sim.step("A").due_ms, Some(NOW + delay));
    }
}

// ---- operator transitions ----

fn apply_op(sim: &mut Sim, t: &Transition) {
    apply(&mut sim.rec, t, sim.now_ms);
}

#[test]
fn cancel_ends_the_process_and_cancels_open_steps() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    let t = cancel(&sim.ctx(), &sim.rec, Some("operator said so")).unwrap();
    let (status, error) = t.finish().unwrap();
    assert_eq!(status, ProcessStatus::Cancelled);
    assert_eq!(error, Some("operator said so"));
    apply_op(&mut sim, &t);
    assert_eq!(sim.step("A").status, StepStatus::Cancelled);
    assert_eq!(sim.rec.audit.len(), 1);
    assert_eq!(sim.rec.audit[0].action, "cancel");
    assert!(matches!(
        cancel(&sim.ctx(), &sim.rec, None),
        Err(OpError::InvalidState(ProcessStatus::Cancelled, _))
    ));
}

#[test]
fn retry_reruns_from_the_failed_step_keeping_completed_ones() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    sim.ok("A");
    sim.report("B", failure("bad", false));
    assert_eq!(sim.rec.status, ProcessStatus::Failed);
    let a_before = sim.step("A").clone();
    let t = retry(&sim.ctx(), &sim.rec, Duration::from_secs(60), None).unwrap();
    assert!(t.actions.iter().any(|a| matches!(
        a,
        Action::Reopen {
            from: ProcessStatus::Failed,
            timeout_ms: 60_000,
            ..
        }
    )));
    assert_eq!(enqueued_steps(&t), vec!["B"]);
    assert_eq!(enqueued(&t)[0].attempt, 1);
    apply_op(&mut sim, &t);
    assert_eq!(sim.rec.status, ProcessStatus::Running);
    assert_eq!(
        sim.step("A"),
        &a_before,
        "completed steps keep their results"
    );
    assert_eq!(sim.step("B").status, StepStatus::Queued);
    assert_eq!(sim.step("B").visit, 1, "a retry is not a new visit");
    assert!(retry(&sim.ctx(), &sim.rec, Duration::from_secs(60), None).is_err());
    sim.ok("B");
    sim.ok("C");
    assert_eq!(sim.rec.status, ProcessStatus::Completed);
}

#[test]
fn retry_from_a_chosen_step_resets_it_and_downstream_keeping_upstream() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    sim.ok("A");
    sim.ok("B");
    sim.ok("C");
    assert_eq!(sim.rec.status, ProcessStatus::Completed);
    let a_before = sim.step("A").clone();
    let t = retry_from(&sim.ctx(), &sim.rec, "B", Duration::from_secs(60), None).unwrap();
    assert!(t.actions.iter().any(|a| matches!(
        a,
        Action::Reopen {
            from: ProcessStatus::Completed,
            timeout_ms: 60_000,
            process_type,
        } if process_type == "T"
    )));
    assert_eq!(enqueued_steps(&t), vec!["B"]);
    assert_eq!(enqueued(&t)[0].attempt, 1);
    assert!(set_step(&t, "A").is_none(), "upstream is not written");
    let c = set_step(&t, "C").unwrap();
    assert_eq!(c.status, StepStatus::Idle);
    assert_eq!(c.visit, 0, "a retry is not a new visit");
    assert_eq!(c.attempts().len(), 1, "its past attempt is kept");
    assert!(c.token.is_empty() && c.outcome.is_none());
    assert_eq!(set_statuses(&t), [ProcessStatus::Running]);
    let audit = t.actions.iter().find_map(|a| match a {
        Action::Audit(l) => l.last().cloned(),
        _ => None,
    });
    assert_eq!(
        audit.unwrap().detail.as_deref(),
        Some("from step B (chosen)")
    );
    apply_op(&mut sim, &t);
    assert_eq!(sim.step("A"), &a_before, "upstream keeps its result");
    assert_eq!(sim.step("B").status, StepStatus::Queued);
    assert_eq!(sim.step("B").visit, 1);
    // Not while it runs; not from a step the definition lacks.
    assert!(matches!(
        retry_from(&sim.ctx(), &sim.rec, "B", HOUR, None),
        Err(OpError::InvalidState(ProcessStatus::Running, _))
    ));
    sim.ok("B");
    let t = sim.ok("C");
    assert_eq!(t.finish().map(|f| f.0), Some(ProcessStatus::Completed));
    assert_eq!(sim.step("C").visit, 1);
    assert_eq!(sim.step("C").attempts().len(), 2);
    assert!(matches!(
        retry_from(&sim.ctx(), &sim.rec, "Nope", HOUR, None),
        Err(OpError::UnknownStep(s)) if s == "Nope"
    ));
}

#[test]
fn retry_from_a_failed_process_takes_any_step_and_a_patch() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    sim.ok("A");
    sim.report("B", failure("bad", false));
    assert_eq!(sim.rec.status, ProcessStatus::Failed);
    // From the first step: everything runs again.
    let t = retry_from(&sim.ctx(), &sim.rec, "A", HOUR, Some(b"patched".to_vec())).unwrap();
    assert!(t.actions.contains(&Action::SetInput(b"patched".to_vec())));
    assert_eq!(enqueued_steps(&t), vec!["A"]);
    assert_eq!(set_step(&t, "B").unwrap().status, StepStatus::Idle);
    apply_op(&mut sim, &t);
    sim.ok("A");
    sim.ok("B");
    sim.ok("C");
    assert_eq!(sim.rec.status, ProcessStatus::Completed);
    assert_eq!(sim.step("A").attempts().len(), 2);
}

#[test]
fn retry_from_inside_a_loop_keeps_what_the_step_depends_on() {
    // Review rejected routes back to Fix, which routes to Review again.
    let (mut sim, _) = Sim::start(
        r#"
[[steps]]
name = "Fix"
kind = "noop"
next = "Review"
max_visits = 3

[[steps]]
name = "Review"
kind = "noop"
next = "Ship"

[steps.on]
rejected = "Fix"

[[steps]]
name = "Ship"
kind = "noop"
"#,
    );
    sim.ok("Fix");
    sim.ok("Review");
    sim.ok("Ship");
    let t = retry_from(&sim.ctx(), &sim.rec, "Review", HOUR, None).unwrap();
    assert!(
        set_step(&t, "Fix").is_none(),
        "Fix is what Review depends on"
    );
    assert_eq!(set_step(&t, "Ship").unwrap().status, StepStatus::Idle);
    assert_eq!(enqueued_steps(&t), vec!["Review"]);
}

#[test]
fn retry_from_one_branch_keeps_the_other_branches_arrival_at_the_join() {
    let (mut sim, _) = Sim::start(&fan_in(2, "all"));
    sim.ok("Start");
    sim.ok("B0");
    sim.ok("B1");
    sim.ok("Join");
    sim.ok("Done");
    assert_eq!(sim.rec.status, ProcessStatus::Completed);
    let t = retry_from(&sim.ctx(), &sim.rec, "B1", HOUR, None).unwrap();
    assert_eq!(enqueued_steps(&t), vec!["B1"]);
    assert!(set_step(&t, "B0").is_none());
    let join = set_step(&t, "Join").unwrap();
    assert_eq!(join.status, StepStatus::Idle);
    assert_eq!(join.arrived, vec!["B0".to_string()]);
    apply_op(&mut sim, &t);
    let t = sim.ok("B1");
    assert_eq!(
        enqueued_steps(&t),
        vec!["Join"],
        "the join runs once B1 arrives"
    );
    sim.ok("Join");
    sim.ok("Done");
    assert_eq!(sim.rec.status, ProcessStatus::Completed);
}

#[test]
fn retry_current_step_fences_the_old_claim() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    let old_token = sim.token("A");
    let (t, steps) = retry_current_step(&sim.ctx(), &sim.rec).unwrap();
    assert_eq!(steps, vec!["A".to_string()]);
    apply_op(&mut sim, &t);
    assert_ne!(sim.token("A"), old_token);
    let mut done = sim.rec.clone();
    done.steps.get_mut("A").unwrap().status = StepStatus::Done;
    let late = step_event("A", &old_token, ok());
    assert!(on_event(&sim.ctx(), &done, &late).is_empty());
}

fn yielded(wait_ms: u64) -> StepResult {
    StepResult {
        code: Some("yielded".into()),
        failure: Some(Failure::Yield(wait_ms)),
        ..failure("waiting for llm rate-limit budget", true)
    }
}

#[test]
fn a_yield_requeues_without_using_an_attempt() {
    // A allows 2 attempts; 5 yields in a row must not use them up.
    let (mut sim, _) = Sim::start(WITH_CLEANUP);
    for n in 1..=5u32 {
        let t = sim.report("A", yielded(2_000));
        let jobs = later_jobs(&t);
        assert_eq!(jobs.len(), 1, "yield {n} re-queues A");
        assert_eq!(jobs[0].1, 2_000, "after the wait the step asked for");
        let a = sim.step("A");
        assert_eq!(a.status, StepStatus::Delayed);
        assert_eq!((a.attempt, a.yields), (n + 1, n));
        let attempts = a.attempts();
        let last = attempts.last().unwrap();
        assert_eq!(last.outcome, "yielded");
        assert_eq!(last.code.as_deref(), Some("yielded"));
        assert!(t.finish().is_none());
    }
    // The first real failure is attempt 1 of 2: retried.
    let t = sim.report("A", failure("boom", true));
    assert_eq!(later_jobs(&t).len(), 1, "one attempt left");
    assert_eq!(sim.step("A").yields, 5);
    // The second uses the policy up: the failed route is taken.
    let t = sim.report("A", failure("boom", true));
    assert_eq!(enqueued_steps(&t), ["Cleanup"]);
    let attempts = set_step(&t, "A").unwrap().attempts();
    let outcomes: Vec<&str> = attempts.iter().map(|h| h.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        [
            "yielded", "yielded", "yielded", "yielded", "yielded", "failed", "failed"
        ]
    );
}

#[test]
fn a_yield_waits_at_least_the_minimum_and_is_bounded() {
    let (mut sim, _) = Sim::start(WITH_CLEANUP);
    let t = sim.report("A", yielded(0));
    assert_eq!(later_jobs(&t)[0].1, MIN_YIELD_DELAY_MS);
    // Past MAX_YIELDS a yield is an ordinary failed attempt.
    let a = sim.rec.steps.get_mut("A").unwrap();
    (a.attempt, a.yields) = (MAX_YIELDS + 1, MAX_YIELDS);
    let t = sim.report("A", yielded(0));
    assert_eq!(later_jobs(&t).len(), 1, "attempt 1 of 2 failed: retried");
    assert_eq!(sim.step("A").attempts().last().unwrap().outcome, "failed");
    let t = sim.report("A", yielded(0));
    assert_eq!(enqueued_steps(&t), ["Cleanup"]);
}

/// A create while intake is drained stores a Pending process that starts nothing; the
/// ordinary create carries the intake precondition, the pending one does not.
#[test]
fn a_pending_create_starts_nothing_and_only_a_starting_create_checks_intake() {
    let d = def(SEQUENCE);
    let kinds = KindRegistry::builtin();
    let ctx = Ctx {
        def: &d,
        kinds: &kinds,
        now_ms: NOW,
        jitter: 0.5,
    };
    let keys = Keys::new("honua", 0);
    let compile = |t: &Transition| t.to_commit(&keys, PID, None, NOW, RETENTION, None);

    let t = create_pending(&ctx, PID, b"in".to_vec(), Some("k".into()), None, HOUR);
    assert!(enqueued(&t).is_empty());
    assert!(
        t.actions
            .iter()
            .all(|a| !matches!(a, Action::SetStep { .. }))
    );
    let mut rec = empty_record();
    apply(&mut rec, &t, NOW);
    assert_eq!(rec.status, ProcessStatus::Pending);
    assert_eq!(rec.deadline_ms, None, "no deadline before it starts");
    let call = compile(&t);
    let ops = parse_ops(&call);
    assert!(find(&ops, &call, "absent", &keys.intake()).is_empty());
    assert!(find(&ops, &call, "zaddin", &keys.delayed()).is_empty());
    let pending = find(
        &ops,
        &call,
        "zadd",
        &keys.index_status(ProcessStatus::Pending),
    );
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].args, [NOW.to_string(), PID.to_string()]);
    assert_eq!(
        hset_fields(&ops, &call, &keys.process(PID))[field::STATUS],
        "Pending"
    );

    let started = create(&ctx, PID, b"in".to_vec(), None, None, HOUR);
    let call = compile(&started);
    let ops = parse_ops(&call);
    assert_eq!(find(&ops, &call, "absent", &keys.intake()).len(), 1);
    assert!(
        find(
            &ops,
            &call,
            "zadd",
            &keys.index_status(ProcessStatus::Pending)
        )
        .is_empty()
    );
}

/// Starting a Pending process enters its first steps, starts its deadline from now, leaves
/// the pending index and keeps its idempotency key as long as a fresh create would.
#[test]
fn start_enters_the_first_steps_of_a_pending_process_and_nothing_else_starts() {
    let d = def(SEQUENCE);
    let kinds = KindRegistry::builtin();
    let at = |now_ms| Ctx {
        def: &d,
        kinds: &kinds,
        now_ms,
        jitter: 0.5,
    };
    let mut rec = empty_record();
    let t = create_pending(&at(NOW), PID, b"in".to_vec(), Some("k".into()), None, HOUR);
    apply(&mut rec, &t, NOW);
    rec.rev = 1;

    let later = NOW + 60_000;
    let t = start(&at(later), &rec, HOUR).unwrap();
    assert_eq!(enqueued_steps(&t), ["A"]);
    assert_eq!(set_statuses(&t), [ProcessStatus::Running]);
    let keys = Keys::new("honua", 0);
    let call = t.to_commit(&keys, PID, Some(rec.revision()), later, RETENTION, None);
    let ops = parse_ops(&call);
    assert_eq!(
        find(
            &ops,
            &call,
            "zrem",
            &keys.index_status(ProcessStatus::Pending)
        )
        .len(),
        1
    );
    let deadline = find(&ops, &call, "zaddin", &keys.delayed());
    assert_eq!(deadline.len(), 1);
    assert_eq!(deadline[0].args[0], HOUR.as_millis().to_string());
    let idem = find(&ops, &call, "expire", &keys.idempotency("k"));
    assert_eq!(idem.len(), 1);
    assert_eq!(idem[0].args[0], (RETENTION + 3600 + 1).to_string());
    let meta = hset_fields(&ops, &call, &keys.process(PID));
    assert_eq!(meta[field::STARTED_MS], later.to_string());
    assert_eq!(meta[field::DEADLINE_MS], (later + 3_600_000).to_string());

    apply(&mut rec, &t, later);
    assert_eq!(rec.status, ProcessStatus::Running);
    let again = start(&at(later), &rec, HOUR).unwrap_err();
    assert_eq!(
        again,
        OpError::InvalidState(
            ProcessStatus::Running,
            "only a Pending process can be started"
        )
    );
}

/// Cancelling a Pending process finishes it and takes it off the pending index, so intake
/// never starts it.
#[test]
fn cancelling_a_pending_process_takes_it_off_the_pending_index() {
    let d = def(SEQUENCE);
    let kinds = KindRegistry::builtin();
    let ctx = Ctx {
        def: &d,
        kinds: &kinds,
        now_ms: NOW,
        jitter: 0.5,
    };
    let mut rec = empty_record();
    apply(
        &mut rec,
        &create_pending(&ctx, PID, b"in".to_vec(), None, None, HOUR),
        NOW,
    );
    rec.rev = 1;
    let t = cancel(&ctx, &rec, None).unwrap();
    assert_eq!(finish_code(&t), Some("cancelled"));
    let keys = Keys::new("honua", 0);
    let call = t.to_commit(&keys, PID, at(1), NOW, RETENTION, None);
    let ops = parse_ops(&call);
    assert_eq!(
        find(
            &ops,
            &call,
            "zrem",
            &keys.index_status(ProcessStatus::Pending)
        )
        .len(),
        1
    );
    assert!(enqueued(&t).is_empty());
}

// ---------------------------------------------------------------------------------------
// pause and resume
// ---------------------------------------------------------------------------------------

impl Sim {
    fn pause(&mut self, hand_back: bool) -> Transition {
        let t = pause(&self.ctx(), &self.rec, hand_back, Some("maintenance")).unwrap();
        apply(&mut self.rec, &t, self.now_ms);
        t
    }

    fn resume(&mut self) -> Transition {
        let t = resume(&self.ctx(), &self.rec).unwrap();
        apply(&mut self.rec, &t, self.now_ms);
        t
    }
}

fn paused_action(t: &Transition) -> Option<Option<u64>> {
    t.actions.iter().find_map(|a| match a {
        Action::Pause { deadline_left_ms } => Some(*deadline_left_ms),
        _ => None,
    })
}

/// A queued step is held (its job fenced out by a new token) and starts on resume; the
/// deadline stops while paused and runs on with what it had left.
#[test]
fn pause_holds_queued_steps_and_stops_the_deadline_until_resume() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    let queued = sim.token("A");
    sim.now_ms += 60_000;
    let t = sim.pause(false);
    assert_eq!(set_statuses(&t), [ProcessStatus::Paused]);
    assert!(enqueued(&t).is_empty());
    assert_eq!(
        paused_action(&t),
        Some(Some(HOUR.as_millis() as u64 - 60_000))
    );
    assert_eq!(sim.step("A").status, StepStatus::Held);
    assert_ne!(sim.token("A"), queued, "the queued job is fenced out");
    assert_eq!(sim.rec.deadline_ms, None);
    assert!(sim.rec.audit.iter().any(|a| a.action == "pause"));
    // The stale job's result changes nothing.
    let stale = sim.feed(step_event("A", &queued, ok()));
    assert!(stale.is_empty(), "{stale:?}");
    // The process timeout that was due cannot fire while paused.
    sim.now_ms += 2 * 3_600_000;
    assert!(sim.feed(process_timeout()).is_empty());
    assert!(matches!(
        pause(&sim.ctx(), &sim.rec, false, None),
        Err(OpError::InvalidState(ProcessStatus::Paused, _))
    ));
    assert!(retry_current_step(&sim.ctx(), &sim.rec).is_err());

    let t = sim.resume();
    assert_eq!(enqueued_steps(&t), ["A"]);
    assert_eq!(set_statuses(&t), [ProcessStatus::Running]);
    assert_eq!(
        sim.rec.deadline_ms,
        Some(sim.now_ms + HOUR.as_millis() as u64 - 60_000),
        "the deadline goes on with what it had left"
    );
    assert_eq!(sim.step("A").status, StepStatus::Queued);
    // The timeout event of the first deadline, if it still arrives, is not due.
    assert!(sim.feed(process_timeout()).is_empty());
    sim.ok("A");
    sim.ok("B");
    let t = sim.ok("C");
    assert_eq!(t.finish().map(|f| f.0), Some(ProcessStatus::Completed));
}

/// Without hand-back a running step finishes and commits while paused; its successor is
/// held. With hand-back the running claim is fenced out and runs again on resume.
#[test]
fn running_steps_finish_while_paused_unless_handed_back() {
    let (mut sim, _) = Sim::start(SEQUENCE);
    sim.rec.steps.get_mut("A").unwrap().status = StepStatus::Running;
    sim.pause(false);
    assert_eq!(sim.step("A").status, StepStatus::Running);
    let t = sim.ok("A");
    assert!(enqueued(&t).is_empty(), "nothing starts while paused");
    assert!(set_statuses(&t).is_empty(), "still Paused");
    assert_eq!(sim.rec.status, ProcessStatus::Paused);
    assert_eq!(sim.step("A").status, StepStatus::Completed);
    assert_eq!(sim.step("B").status, StepStatus::Held);
    let t = sim.resume();
    assert_eq!(enqueued_steps(&t), ["B"]);

    let (mut sim, _) = Sim::start(SEQUENCE);
    sim.rec.steps.get_mut("A").unwrap().status = StepStatus::Running;
    let running = sim.token("A");
    let t = sim.pause(true);
    assert!(notes(&t).contains("handed back"), "{}", notes(&t));
    assert_eq!(sim.step("A").status, StepStatus::Held);
    assert!(
        sim.feed(step_event("A", &running, ok())).is_empty(),
        "its commit is stale"
    );
    let t = sim.resume();
    assert_eq!(enqueued_steps(&t), ["A"]);
    assert_eq!(
        enqueued(&t)[0].attempt,
        1,
        "a handed-back run is no failed attempt"
    );
}

/// A retry back-off decided while paused, and a sleep timer running at the pause, wait on
/// resume for what they had left.
#[test]
fn back_offs_and_timers_keep_what_they_had_left() {
    let (mut sim, _) = Sim::start(RETRIED);
    sim.rec.steps.get_mut("A").unwrap().status = StepStatus::Running;
    sim.pause(false);
    sim.jitter = 1.0;
    let t = sim.report("A", failure("boom", true));
    assert!(later_jobs(&t).is_empty(), "no retry is queued while paused");
    let held = sim.step("A").clone();
    assert_eq!(held.status, StepStatus::Held);
    let left = held.held_delay_ms.expect("the back-off is kept");
    assert!(left > 0);
    let t = sim.resume();
    let later = later_jobs(&t);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].1, left);
    assert_eq!(later[0].0.attempt, 2);

    let nap = r#"
[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "10m" }
next = "After"

[[steps]]
name = "After"
kind = "noop"
"#;
    let (mut sim, _) = Sim::start(nap);
    let napping = sim.token("Nap");
    sim.now_ms += 4 * 60_000;
    sim.pause(false);
    assert_eq!(sim.step("Nap").status, StepStatus::Held);
    assert_eq!(sim.step("Nap").held_delay_ms, Some(6 * 60_000));
    sim.now_ms += 3_600_000;
    assert!(
        sim.feed(timer("Nap", &napping)).is_empty(),
        "its old timer is stale"
    );
    let t = sim.resume();
    let timers = later_events(&t);
    assert_eq!(timers.len(), 1);
    assert_eq!(
        timers[0].1,
        6 * 60_000,
        "the timer goes on with what it had left"
    );
    let token = sim.token("Nap");
    let t = sim.feed(timer("Nap", &token));
    assert_eq!(enqueued_steps(&t), ["After"]);
}

/// With `timeouts_while_paused = "count"` the clocks keep running: the deadline is not
/// stopped and a timer that fires while paused ends its step, its successor held.
#[test]
fn wall_clock_timeouts_keep_counting_while_paused() {
    let nap = r#"
timeouts_while_paused = "count"

[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "10m" }
next = "After"

[[steps]]
name = "After"
kind = "noop"
"#;
    let (mut sim, _) = Sim::start(nap);
    let napping = sim.token("Nap");
    let t = sim.pause(false);
    assert_eq!(paused_action(&t), Some(None), "the deadline keeps running");
    assert!(sim.rec.deadline_ms.is_some());
    assert_eq!(sim.step("Nap").status, StepStatus::Waiting);
    sim.now_ms += 10 * 60_000;
    let t = sim.feed(timer("Nap", &napping));
    assert!(enqueued(&t).is_empty());
    assert_eq!(sim.step("After").status, StepStatus::Held);
    sim.now_ms += 2 * 3_600_000;
    let t = sim.feed(process_timeout());
    assert_eq!(t.finish().map(|f| f.0), Some(ProcessStatus::TimedOut));
    assert!(
        t.actions.contains(&Action::Unindex(ProcessStatus::Paused)),
        "a paused process that ends leaves the paused index"
    );
}

/// An approval keeps waiting for its signal while paused (its timeout stops); the signal is
/// accepted and routes to a held step; cancelling a paused process leaves the index.
#[test]
fn an_approval_takes_its_signal_while_paused_and_a_paused_process_can_be_cancelled() {
    let (mut sim, _) = Sim::start(APPROVAL);
    let waiting = sim.token("Review");
    sim.now_ms += 30 * 60_000;
    sim.pause(false);
    assert_eq!(sim.rec.status, ProcessStatus::Paused);
    assert_eq!(sim.step("Review").status, StepStatus::Waiting);
    assert_ne!(sim.token("Review"), waiting, "its timeout is fenced out");
    assert_eq!(sim.step("Review").held_delay_ms, Some(90 * 60_000));
    assert!(sim.feed(step_timeout("Review", &waiting)).is_empty());
    let t = sim.feed(signal("approval", "approve"));
    assert!(enqueued(&t).is_empty());
    assert_eq!(sim.step("Ship").status, StepStatus::Held);
    let t = cancel(&sim.ctx(), &sim.rec, None).unwrap();
    assert!(t.actions.contains(&Action::Unindex(ProcessStatus::Paused)));
    assert_eq!(finish_code(&t), Some("cancelled"));
    apply(&mut sim.rec, &t, sim.now_ms);
    assert_eq!(sim.step("Ship").status, StepStatus::Cancelled);

    // Resumed without a signal: the timeout runs again with what it had left.
    let (mut sim, _) = Sim::start(APPROVAL);
    sim.now_ms += 30 * 60_000;
    sim.pause(false);
    sim.now_ms += 5 * 3_600_000;
    let t = sim.resume();
    assert_eq!(set_statuses(&t), [ProcessStatus::WaitingForApproval]);
    let timeouts = later_events(&t);
    assert_eq!(timeouts.len(), 1);
    assert_eq!(timeouts[0].1, 90 * 60_000);
}

/// A revision no worker committed on (scheduler commits only).
fn at(rev: u64) -> Option<crate::record::Revision> {
    Some(crate::record::Revision { rev, steps_rev: 0 })
}
