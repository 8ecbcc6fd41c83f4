//! Committing step results: each step task hands its result to the completer and ends;
//! the completer commits every result that arrived while its previous `complete.lua` call
//! was in flight in one call (each step still fenced on its own), then settles each step:
//! its metrics and log, its claim out of the in-flight map, its slot freed.

use super::{Inner, claim};
use backon::Retryable;
use honua_shared::commit::FastCommit;
use honua_shared::envelope::StepResult;
use honua_shared::metrics as m;
use honua_shared::status::ProcessStatus;
use honua_shared::status::outcome;
use honua_shared::store::{Completion, Fence, Held, StoreError};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Most step results one `complete.lua` call commits.
const COMPLETE_BATCH: usize = 256;

/// A step result handed to the completer, with what settling its answer needs.
pub(super) struct Completing {
    held: Held,
    output: Option<Vec<u8>>,
    /// The step may have a checkpoint to delete ([`Completion::checkpoint`]).
    checkpoint: bool,
    result: StepResult,
    fast: Option<FastCommit>,
    /// The step's metric labels and duration.
    process_type: String,
    kind: String,
    duration_ms: u64,
    /// The step's span (its log lines) and its slot, held until the answer is settled: a
    /// step counts against `max_concurrent_steps` until its result is committed.
    span: tracing::Span,
    permit: Option<OwnedSemaphorePermit>,
}

/// The `process.transition` span of a transition this worker committed with its step's
/// result (what the scheduler's span is for the transitions it commits): a child of the
/// process's span, closed at once (the commit's time is in the step's span).
fn transition_span(held: &Held, process_type: &str, status: ProcessStatus) {
    let span = tracing::info_span!(
        parent: None,
        "process.transition",
        honua.process_id = %held.job.process_id,
        honua.process_type = %process_type,
        honua.event = honua_shared::envelope::event_type::STEP,
        honua.status = status.as_str(),
        honua.commit = "ok",
        honua.committed_by = "worker",
    );
    honua_runtime::telemetry::set_parent(&span, &held.job.trace);
}

/// The metric handles a committed step updates, for one label set.
#[derive(Clone)]
struct StepHandles {
    /// `m::STEPS` {process_type, kind, outcome}.
    steps: metrics::Counter,
    /// `m::STEP_DURATION` {kind, outcome}.
    duration: metrics::Histogram,
    /// `m::WORKER_TRANSITIONS` {process_type}.
    transitions: metrics::Counter,
}

/// The per-step metric handles of each (process type, kind, outcome) seen, registered on
/// first use: a step's metrics then cost one map look-up instead of three label sets
/// built, hashed and looked up in the recorder's registry. The worker installs the
/// recorder before it counts anything, so no handle is taken from a missing one.
#[derive(Default)]
pub(super) struct StepMetrics(Mutex<HashMap<String, StepHandles>>);

impl StepMetrics {
    fn get(&self, process_type: &str, kind: &str, outcome: &str) -> StepHandles {
        // Label values are names, never containing the separator (a control character).
        let key = format!("{process_type}\u{1f}{kind}\u{1f}{outcome}");
        let mut map = self.0.lock().unwrap();
        if let Some(h) = map.get(&key) {
            return h.clone();
        }
        let labels = [
            ("process_type", process_type.to_string()),
            ("kind", kind.to_string()),
            ("outcome", outcome.to_string()),
        ];
        let h = StepHandles {
            steps: metrics::counter!(m::STEPS, &labels),
            duration: metrics::histogram!(m::STEP_DURATION, &labels[1..]),
            transitions: metrics::counter!(m::WORKER_TRANSITIONS, "process_type" => process_type.to_string()),
        };
        map.insert(key, h.clone());
        h
    }
}

impl Inner {
    /// Hands a step's result to the completer; the step's task ends here, and the
    /// completer settles the step once the commit answers ([`Inner::settle`]).
    pub(super) fn commit(
        &self,
        held: Held,
        (process_type, kind): (String, String),
        (result, fast): (StepResult, Option<FastCommit>),
        (output, checkpoint): (Option<Vec<u8>>, bool),
        duration_ms: u64,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let c = Completing {
            held,
            output,
            checkpoint,
            result,
            fast,
            process_type,
            kind,
            duration_ms,
            span: tracing::Span::current(),
            permit,
        };
        if let Err(mpsc::error::SendError(c)) = self.completions.send(c) {
            self.settle(c, Err("the worker is stopping".into()));
        }
    }

    /// Accounts for a step's commit once it answered, in the step's span: metrics and log,
    /// the claim out of the in-flight map, then the slot freed (`c` dropped).
    fn settle(&self, c: Completing, r: Result<(Fence, bool), String>) {
        let _entered = c.span.enter();
        let (held, result) = (&c.held, &c.result);
        let pid = &held.job.process_id;
        let step = &held.job.step;
        let duration_ms = c.duration_ms;
        match r {
            Ok((Fence::Ok, fast)) => {
                self.stats.committed.fetch_add(1, Ordering::Relaxed);
                let metrics = self
                    .step_metrics
                    .get(&c.process_type, &c.kind, &result.outcome);
                if let (true, Some(f)) = (fast, &c.fast) {
                    self.stats.fast_commits.fetch_add(1, Ordering::Relaxed);
                    metrics.transitions.increment(1);
                    transition_span(held, &c.process_type, f.status);
                }
                metrics.steps.increment(1);
                metrics.duration.record(duration_ms as f64 / 1000.0);
                if result.outcome == outcome::FAILED {
                    warn!(process_id = %pid, step = %step, worker = %self.id, duration_ms, error = result.error.as_deref().unwrap_or(""), "Process {pid} step {step} failed, duration {duration_ms} ms");
                } else {
                    info!(process_id = %pid, step = %step, worker = %self.id, duration_ms, outcome = %result.outcome, "Process {pid} step {step} completed, duration {duration_ms} ms");
                }
            }
            Ok((Fence::Stale, _)) => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(m::STALE_COMMITS).increment(1);
                warn!(process_id = %pid, step = %step, "commit refused: claim is stale (job was reclaimed)");
            }
            Ok((Fence::Finished, _)) => {
                info!(process_id = %pid, step = %step, "commit discarded: process is over")
            }
            Err(e) => {
                error!(error = %e, process_id = %pid, step = %step, "commit failed; the job will be reclaimed and run again")
            }
        }
        self.step_ended(held);
        drop(_entered);
        drop(c.permit);
    }

    /// A step is over (committed, discarded or handed back): its claim leaves the in-flight
    /// map. Its slot is freed by the caller dropping its permit right after.
    pub(super) fn step_ended(&self, held: &Held) {
        self.inflight.lock().unwrap().remove(&claim(held));
        self.slot_gauges();
    }

    /// Commits step results in batches: one `complete.lua` call for every result that
    /// arrived while the previous call was in flight (each step still fenced and committed
    /// on its own inside the script). Stops when `stop` fires, after answering what is
    /// queued.
    pub(super) async fn completer(
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
            // One call per partition (each call's keys share one slot).
            let groups = self
                .store
                .group_by_partition(batch, |c| c.held.job.process_id.as_str());
            for (store, batch) in groups {
                let items: Vec<Completion<'_>> = batch
                    .iter()
                    .map(|c| Completion {
                        held: &c.held,
                        output: c.output.as_deref(),
                        checkpoint: c.checkpoint,
                        result: &c.result,
                        fast: c.fast.as_ref(),
                    })
                    .collect();
                let r = (|| store.complete_many(&self.id, &items))
                    .retry(crate::redis_backoff(Duration::from_secs(60)))
                    .when(StoreError::is_retryable)
                    .notify(
                        |e, _| warn!(error = %e, steps = items.len(), "commit failed; retrying"),
                    )
                    .await;
                drop(items);
                match r {
                    Ok(answers) => {
                        let mut answers = answers.into_iter();
                        for c in batch {
                            let a = answers
                                .next()
                                .ok_or_else(|| "no answer for this step".into());
                            self.settle(c, a);
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for c in batch {
                            self.settle(c, Err(msg.clone()));
                        }
                    }
                }
            }
        }
    }
}
