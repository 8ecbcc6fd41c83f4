//! Running one step: its span, the handler (with the step's timeout, cancellation and
//! checkpointer), the result it becomes, and what happens to it: committed, discarded
//! (stale claim, process over) or handed back (shutdown).

use super::{Inner, Stop, StopCell};
use crate::handler::{Checkpointer, ServerClock, StepContext, StepError, StepHandler, StepOutput};
use backon::Retryable;
use futures::FutureExt;
use honua_shared::codec::{CodecError, StateCodec};
use honua_shared::commit::FastCommit;
use honua_shared::engine::{self, Ctx};
use honua_shared::envelope::Event;
use honua_shared::envelope::{Failure, StepResult};
use honua_shared::keys::field;
use honua_shared::metrics as m;
use honua_shared::record::ProcessRecord;
use honua_shared::status::outcome;
use honua_shared::store::{Fence, Held, StoreError};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, warn};

/// What `begin.lua` told of a claimed job's process.
pub(super) struct Begun {
    pub process_type: String,
    pub version: u32,
    pub tenant: Option<String>,
    /// Redis's clock as of the claim.
    pub clock: ServerClock,
    /// The process as the claim began it, when asked for ([`honua_shared::definition::DefinitionSet::may_route`]).
    pub snapshot: Option<ProcessRecord>,
}

impl Inner {
    /// The transition that follows from `result`, decided here as the scheduler would
    /// decide it, when it is one the worker may commit with the result itself (step records
    /// and jobs enqueued now: [`Transition::to_fast`]). `None` leaves it to the scheduler.
    fn successors(&self, held: &Held, begun: &Begun, result: &StepResult) -> Option<FastCommit> {
        let rec = begun.snapshot.as_ref()?;
        let def = self.defs.get(&begun.process_type, begun.version)?;
        let ctx = Ctx {
            def,
            kinds: self.handlers.kinds(),
            now_ms: begun.clock.now_ms(),
            jitter: rand::random(),
        };
        let event = Event::Step {
            process_id: held.job.process_id.clone(),
            step: held.job.step.clone(),
            token: held.job.token.clone(),
            result: result.clone(),
        };
        engine::on_event(&ctx, rec, &event).to_fast(rec.revision(), rec.status)
    }

    /// Runs one claimed step in its span. Not an `async fn`: the future it returns holds
    /// the step's arguments once (in `execute_in_span`'s state), not a second copy around it,
    /// and every step's task is moved in memory as a whole (spawned, then finished).
    pub(super) fn execute(
        self: Arc<Self>,
        span: tracing::Span,
        held: Held,
        begun: Begun,
        data: HashMap<String, Vec<u8>>,
        (cancel, stop): (CancellationToken, Arc<StopCell>),
        permit: Option<OwnedSemaphorePermit>,
    ) -> impl Future<Output = ()> + Send + 'static {
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
        self.execute_in_span(held, begun, data, cancel, stop, permit)
            .instrument(span)
    }

    /// Runs the step and commits or discards its result. `permit` is its slot: freed when
    /// this returns, or, for a result handed to the completer, once that is committed.
    async fn execute_in_span(
        self: Arc<Self>,
        held: Held,
        begun: Begun,
        data: HashMap<String, Vec<u8>>,
        cancel: CancellationToken,
        stop: Arc<StopCell>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let started = Instant::now();
        let stale_flag = Arc::new(AtomicBool::new(false));
        // Whether the step may have a checkpoint when it ends: one its begin saw, or one it
        // saves (set before each save is sent). Only then does the commit delete it.
        let checkpointed = Arc::new(AtomicBool::new(data.contains_key(&format!(
            "{}{}",
            field::CHECKPOINT_PREFIX,
            held.job.step
        ))));
        let (process_type, version) = (begun.process_type.as_str(), begun.version);
        let (result, output) = self
            .run_step(
                &held,
                (process_type, begun.tenant.clone(), begun.clock),
                version,
                data,
                cancel.clone(),
                (stale_flag.clone(), checkpointed.clone()),
            )
            .await;
        tracing::Span::current().record("honua.outcome", result.outcome.as_str());
        if stale_flag.load(Ordering::SeqCst) {
            stop.stop(Stop::Stale);
        }
        let pid = &held.job.process_id;
        let step = &held.job.step;
        match stop.finish() {
            Stop::Stale => {
                info!(process_id = %pid, step = %step, "result discarded: claim is stale");
            }
            Stop::Finished => {
                info!(process_id = %pid, step = %step, "result discarded: process is over");
            }
            Stop::Shutdown => self.release(&held).await,
            Stop::Running | Stop::Finishing => {
                let duration_ms = started.elapsed().as_millis() as u64;
                let kind = self
                    .defs
                    .get(process_type, version)
                    .and_then(|d| d.step(&held.job.step).map(|s| s.kind.clone()))
                    .unwrap_or_default();
                let fast = self.successors(&held, &begun, &result);
                // The completer settles the step (its claim leaves the in-flight map and its
                // slot is freed once the commit answers): this task ends here.
                self.commit(
                    held,
                    (begun.process_type, kind),
                    (result, fast),
                    (output, checkpointed.load(Ordering::SeqCst)),
                    duration_ms,
                    permit,
                );
                return;
            }
        }
        self.step_ended(&held);
        drop(permit);
    }

    async fn release(&self, held: &Held) {
        let store = self.store.of(&held.job.process_id);
        let r = (|| store.release(&self.id, held))
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

    /// Runs the handler; returns the result to commit and the encoded output.
    async fn run_step(
        &self,
        held: &Held,
        (process_type, tenant, clock): (&str, Option<String>, ServerClock),
        version: u32,
        data: HashMap<String, Vec<u8>>,
        cancel: CancellationToken,
        (stale, checkpointed): (Arc<AtomicBool>, Arc<AtomicBool>),
    ) -> (StepResult, Option<Vec<u8>>) {
        let job = &held.job;
        let fail = |error: String, code: &str, failure: Failure| StepResult {
            outcome: outcome::FAILED.into(),
            error: Some(error),
            code: Some(code.into()),
            failure: Some(failure),
        };
        let Some(def) = self.defs.get(process_type, version) else {
            return (
                fail(
                    format!(
                        "definition {process_type} v{version} is not loaded on worker {}",
                        self.id
                    ),
                    "definition_missing",
                    Failure::Retryable,
                ),
                None,
            );
        };
        let Some(step_def) = def.step(&job.step) else {
            return (
                fail(
                    format!("step {} is not in {process_type} v{version}", job.step),
                    "definition_mismatch",
                    Failure::Fatal,
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
                    Failure::Fatal,
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
                        Failure::Fatal,
                    ),
                    None,
                );
            }
        };
        let ctx = StepContext {
            process_id: job.process_id.clone(),
            process_type: process_type.to_string(),
            tenant,
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
            clock,
            checkpointer: Some(Checkpointer {
                store: self.store.of(&held.job.process_id),
                consumer: self.id.clone(),
                held: held.clone(),
                codec: self.codec,
                cancel: cancel.clone(),
                stale,
                saved: checkpointed,
            }),
        };
        let timeout = step_def.timeout;
        if cancel.is_cancelled() {
            // Stopped while waiting for a slot: the handler never starts.
            return (
                fail("step cancelled".into(), "cancelled", Failure::Retryable),
                None,
            );
        }
        // The handler runs in the step's task, inside its span (its own spans join the
        // trace).
        let r = match run_handler(handler.as_ref(), ctx, timeout, &cancel).await {
            Ok(r) => r,
            Err(Interrupted::Cancelled) => {
                return (
                    fail("step cancelled".into(), "cancelled", Failure::Retryable),
                    None,
                );
            }
            Err(Interrupted::TimedOut) => {
                return (
                    fail(
                        format!(
                            "step timed out after {}",
                            humantime::format_duration(timeout)
                        ),
                        "step_timeout",
                        Failure::Retryable,
                    ),
                    None,
                );
            }
            Err(Interrupted::Panicked) => {
                return (
                    fail(
                        "step handler panicked".into(),
                        "handler_panic",
                        Failure::Retryable,
                    ),
                    None,
                );
            }
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
                            fail(
                                format!("step output rejected: {e}"),
                                e.code(),
                                Failure::Permanent,
                            ),
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
            Err(e) => (fail(e.to_string(), e.code(), e.failure()), None),
        }
    }
}

/// Why a handler's run ended without its result.
#[derive(Debug, PartialEq)]
enum Interrupted {
    Cancelled,
    TimedOut,
    Panicked,
}

/// Runs a handler to its result, bounded by `timeout` and `cancel`. It runs in the caller's
/// task, not one of its own (a spawn per step was a measurable share of a worker's CPU): a
/// panic is caught here, and stopping it drops its future, as aborting its task did.
async fn run_handler(
    handler: &dyn StepHandler,
    ctx: StepContext,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Result<StepOutput, StepError>, Interrupted> {
    let run = AssertUnwindSafe(handler.run(ctx)).catch_unwind();
    tokio::select! {
        r = tokio::time::timeout(timeout, run) => match r {
            Err(_) => Err(Interrupted::TimedOut),
            Ok(Err(_)) => Err(Interrupted::Panicked),
            Ok(Ok(r)) => Ok(r),
        },
        _ = cancel.cancelled() => Err(Interrupted::Cancelled),
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
    use async_trait::async_trait;

    /// Does what its step's config says: `panic`, `hang` (never returns) or return its input.
    struct Scripted;

    #[async_trait]
    impl StepHandler for Scripted {
        async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
            match ctx.config["do"].as_str() {
                Some("panic") => panic!("a handler bug"),
                Some("hang") => std::future::pending().await,
                _ => Ok(StepOutput::ok_with(ctx.input)),
            }
        }
    }

    async fn run(
        what: &str,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<Result<StepOutput, StepError>, Interrupted> {
        let ctx = StepContext::for_test(
            "scripted",
            serde_json::json!({ "do": what }),
            serde_json::json!({ "n": 1 }),
        );
        run_handler(&Scripted, ctx, timeout, cancel).await
    }

    #[tokio::test]
    async fn a_handler_that_returns_gives_its_result() {
        let r = run("return", Duration::from_secs(60), &CancellationToken::new()).await;
        assert_eq!(
            r.unwrap().unwrap().output,
            Some(serde_json::json!({ "n": 1 }))
        );
    }

    #[tokio::test]
    async fn a_panicking_handler_is_caught_in_the_step_task() {
        let r = run("panic", Duration::from_secs(60), &CancellationToken::new()).await;
        assert_eq!(r.err(), Some(Interrupted::Panicked));
    }

    #[tokio::test]
    async fn a_handler_past_its_timeout_is_dropped() {
        let r = run("hang", Duration::from_millis(20), &CancellationToken::new()).await;
        assert_eq!(r.err(), Some(Interrupted::TimedOut));
    }

    #[tokio::test]
    async fn cancelling_drops_a_running_handler() {
        let cancel = CancellationToken::new();
        let stopper = cancel.clone();
        let r = tokio::join!(
            run("hang", Duration::from_secs(3600), &cancel),
            async move { stopper.cancel() }
        )
        .0;
        assert_eq!(r.err(), Some(Interrupted::Cancelled));
    }
}
