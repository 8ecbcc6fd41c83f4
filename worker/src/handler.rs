//! The step handler trait: how a step kind is implemented in Rust, and what it receives.

use async_trait::async_trait;
use backon::Retryable;
use honua_shared::codec::StateCodec;
use honua_shared::definition::{Executor, KindRegistry};
use honua_shared::envelope::Failure;
use honua_shared::store::{Fence, Held, Store};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What a step ended with.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// `ok`, or a named event the definition routes on.
    pub outcome: String,
    /// Stored as the step's output and visible to later steps.
    pub output: Option<Value>,
}

impl StepOutput {
    pub fn ok() -> Self {
        Self {
            outcome: honua_shared::status::outcome::OK.into(),
            output: None,
        }
    }
    pub fn ok_with(output: Value) -> Self {
        Self {
            outcome: honua_shared::status::outcome::OK.into(),
            output: Some(output),
        }
    }
    pub fn outcome(name: impl Into<String>, output: Option<Value>) -> Self {
        Self {
            outcome: name.into(),
            output,
        }
    }
}

/// Why a step did not succeed, typed by what the engine must do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StepError {
    /// May succeed on another attempt (retry policy with backoff).
    #[error("{0}")]
    Retryable(String),
    /// May succeed, but not before `after` (e.g. a provider's Retry-After).
    #[error("{message} (retry after {after:?})")]
    RetryAfter { after: Duration, message: String },
    /// The step did not do its work: it waited for a shared resource (LLM rate-limit
    /// budget, a paused provider, a spent budget in `pause` mode) and gives its slot back.
    /// It runs again after `after` on an attempt its retry policy does not count, and its
    /// step record says why (outcome `yielded`).
    #[error("{message} (yielding for {after:?})")]
    Yield { after: Duration, message: String },
    /// Will never succeed: no retry; the `failed` route or a Failed process.
    #[error("{0}")]
    Permanent(String),
    /// The step was asked to stop (process cancelled or finished, worker shutting down).
    #[error("step cancelled")]
    Cancelled,
    /// This worker no longer owns the job; nothing it does will be committed.
    #[error("claim is stale")]
    Stale,
}

impl StepError {
    pub fn code(&self) -> &'static str {
        match self {
            StepError::Retryable(_) => "step_error",
            StepError::RetryAfter { .. } => "retry_after",
            StepError::Yield { .. } => "yielded",
            StepError::Permanent(_) => "permanent_error",
            StepError::Cancelled => "cancelled",
            StepError::Stale => "stale_claim",
        }
    }

    /// What the engine does about this error (a cancelled or stale step may run again).
    pub fn failure(&self) -> Failure {
        match self {
            StepError::Retryable(_) | StepError::Cancelled | StepError::Stale => Failure::Retryable,
            StepError::RetryAfter { after, .. } => Failure::RetryAfter(after.as_millis() as u64),
            StepError::Yield { after, .. } => Failure::Yield(after.as_millis() as u64),
            StepError::Permanent(_) => Failure::Permanent,
        }
    }
}

/// Saves a step's intermediate state through the fenced `checkpoint.lua`.
#[derive(Clone)]
pub struct Checkpointer {
    pub(crate) store: Store,
    pub(crate) consumer: Arc<str>,
    pub(crate) held: Held,
    pub(crate) codec: StateCodec,
    pub(crate) cancel: CancellationToken,
    pub(crate) stale: Arc<std::sync::atomic::AtomicBool>,
    /// Set before a save is sent: the step's commit then deletes the checkpoint.
    pub(crate) saved: Arc<std::sync::atomic::AtomicBool>,
}

impl Checkpointer {
    async fn save(&self, value: &Value) -> Result<(), StepError> {
        let blob = self
            .codec
            .encode(value)
            .map_err(|e| StepError::Permanent(format!("checkpoint rejected: {e}")))?;
        self.saved.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = (|| self.store.checkpoint(&self.consumer, &self.held, &blob))
            .retry(crate::redis_backoff(Duration::from_secs(10)))
            .when(honua_shared::store::StoreError::is_retryable)
            .notify(|e, _| tracing::warn!(error = %e, "checkpoint: redis unavailable, retrying"))
            .await;
        match r {
            Ok(Fence::Ok) => Ok(()),
            Ok(Fence::Stale) => {
                self.stale.store(true, std::sync::atomic::Ordering::SeqCst);
                self.cancel.cancel();
                Err(StepError::Stale)
            }
            Ok(Fence::Finished) => {
                self.cancel.cancel();
                Err(StepError::Cancelled)
            }
            Err(e) => Err(StepError::Retryable(format!("checkpoint failed: {e}"))),
        }
    }
}

/// Redis's clock as of a step's claim (`begin.lua` stamps the claim with the server's
/// time), advanced by this process's monotonic clock: the "now" a step uses where the time
/// names shared state (the LLM budget's day), so a worker whose wall clock is off does not
/// charge another day.
#[derive(Debug, Clone, Copy)]
pub struct ServerClock {
    base_ms: u64,
    taken: std::time::Instant,
}

impl ServerClock {
    /// Server time `base_ms`, read just now.
    pub fn at(base_ms: u64) -> Self {
        Self {
            base_ms,
            taken: std::time::Instant::now(),
        }
    }

    /// Server time `base_ms`, read by a request sent at `sent`: the server read its clock
    /// after `sent`, so this clock runs at most the request's transit time ahead, where one
    /// started on the reply runs behind by the whole round trip and the script's run.
    pub fn sent_at(base_ms: u64, sent: std::time::Instant) -> Self {
        Self {
            base_ms,
            taken: sent,
        }
    }

    /// The server's time now (ms), as far as this process can tell.
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.taken.elapsed().as_millis() as u64
    }
}

/// Everything a handler gets for one execution of one step.
pub struct StepContext {
    pub process_id: String,
    pub process_type: String,
    /// Whom the process runs for (its submission's `tenant`).
    pub tenant: Option<String>,
    pub version: u32,
    pub step: String,
    pub kind: String,
    /// The step's `config` table from the definition.
    pub config: Value,
    pub timeout: Duration,
    pub attempt: u32,
    pub visit: u32,
    /// Redis's delivery counter for this job (> 1 after a reclaim).
    pub deliveries: u64,
    /// The process input.
    pub input: Value,
    /// Outputs of the steps that completed before this one.
    pub outputs: BTreeMap<String, Value>,
    /// The last checkpoint this step saved (after a crash, reclaim or hand-back).
    pub checkpoint: Option<Value>,
    /// Fires when the step must stop (stale claim, process over, shutdown, timeout).
    pub cancel: CancellationToken,
    /// Redis's clock since the claim.
    pub clock: ServerClock,
    pub(crate) checkpointer: Option<Checkpointer>,
}

impl StepContext {
    /// Saves intermediate state; a later execution of this step (on any worker) gets it in
    /// [`StepContext::checkpoint`]. Fails with [`StepError::Stale`] once the claim is lost.
    pub async fn save_checkpoint<T: Serialize>(&self, value: &T) -> Result<(), StepError> {
        let v = serde_json::to_value(value)
            .map_err(|e| StepError::Permanent(format!("checkpoint not serializable: {e}")))?;
        match &self.checkpointer {
            Some(c) => c.save(&v).await,
            None => Ok(()),
        }
    }

    /// A context for unit-testing handlers without Redis (checkpoints are discarded; the
    /// clock is this machine's).
    #[expect(
        clippy::disallowed_methods,
        reason = "a test context has no server whose clock it could read"
    )]
    pub fn for_test(kind: &str, config: Value, input: Value) -> Self {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            process_id: "test".into(),
            process_type: "Test".into(),
            tenant: None,
            version: 1,
            step: "Step".into(),
            kind: kind.into(),
            config,
            timeout: Duration::from_secs(30),
            attempt: 1,
            visit: 1,
            deliveries: 1,
            input,
            outputs: BTreeMap::new(),
            checkpoint: None,
            cancel: CancellationToken::new(),
            clock: ServerClock::at(now_ms),
            checkpointer: None,
        }
    }
}

/// A step kind implemented in Rust. Long calls should watch `ctx.cancel` (the runner also
/// drops the future when it fires) and may checkpoint as they go.
#[async_trait]
pub trait StepHandler: Send + Sync + 'static {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError>;
}

type Validator = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// The step kinds a worker can run, with their definition-time validators.
#[derive(Clone)]
pub struct HandlerRegistry {
    kinds: KindRegistry,
    handlers: HashMap<String, Arc<dyn StepHandler>>,
}

impl HandlerRegistry {
    /// The built-in kinds: `noop`, `fail`, `http` (run here) and `sleep`, `approval` (run
    /// by the scheduler).
    pub fn builtin(http: crate::builtin::HttpOptions) -> Self {
        let mut handlers: HashMap<String, Arc<dyn StepHandler>> = HashMap::new();
        handlers.insert("noop".into(), Arc::new(crate::builtin::Noop));
        handlers.insert("fail".into(), Arc::new(crate::builtin::Fail));
        handlers.insert("http".into(), Arc::new(crate::builtin::Http::new(http)));
        Self {
            kinds: KindRegistry::builtin(),
            handlers,
        }
    }

    /// Registers a custom kind executed by workers.
    pub fn register(
        &mut self,
        kind: &str,
        validator: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
        handler: impl StepHandler,
    ) {
        let v: Validator = Arc::new(validator);
        self.kinds
            .register(kind, Executor::Worker, move |c: &Value| v(c));
        self.handlers.insert(kind.to_string(), Arc::new(handler));
    }

    pub fn kinds(&self) -> &KindRegistry {
        &self.kinds
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn StepHandler>> {
        self.handlers.get(kind).cloned()
    }
}
