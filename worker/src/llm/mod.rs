//! The `llm` step kind: a chat completion rendered from the process input and earlier
//! step outputs, sent through the fleet-wide limiter to the configured provider (with
//! retries, a circuit breaker and a fallback provider/model), memoised in the step's
//! checkpoint, cached in Redis for the fleet, charged against token budgets, and written
//! into process state with its model, provider, usage, latency and cost.
//!
//! Its step config is parsed and checked by `honua_shared::definition::llm` when definitions
//! load.

pub mod provider;
pub mod retry;
pub mod tokens;

use crate::handler::{HandlerRegistry, StepContext, StepError, StepHandler, StepOutput};
use crate::limit::{LimitError, LlmLimiter, Permit};
use async_trait::async_trait;
use honua_shared::config::Config;
use honua_shared::definition::llm::{StepSpec, parse_spec, schema};
use honua_shared::limiter::{Asker, BreakerOutcome, BreakerSeen, BreakerSpec, OTHER_SHARE};
use honua_shared::llm_config::{BudgetAction, LlmProviderConfig, ProviderKind};
use honua_shared::llm_store::{BudgetCall, BudgetOver};
use honua_shared::metrics as m;
use honua_shared::store::Store;
use provider::{CallError, CallLimits, ChatRequest, Completion, Endpoint, Message};
use retry::{Backoff, Breaker, Gate, Move, Policy, Progress, Seen};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// One provider + model the step may call.
#[derive(Clone)]
struct Target {
    endpoint: Arc<Endpoint>,
    model: String,
}

impl Target {
    fn provider(&self) -> ProviderKind {
        self.endpoint.kind
    }
    fn bucket(&self) -> String {
        format!("{}/{}", self.provider(), self.model)
    }
}

/// One failed provider call, recorded in the step output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    pub provider: String,
    pub model: String,
    pub error_type: String,
    /// How long the step waited before its next call.
    pub delay_ms: u64,
}

/// A completed call: memoised in the checkpoint and cached in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    pub completion: Completion,
    pub provider: String,
    pub model: String,
    pub fallback_used: bool,
    pub latency_ms: u64,
    pub limiter_wait_ms: u64,
    pub attempts: Vec<AttemptRecord>,
    pub cost_usd: Option<f64>,
}

/// What the checkpoint holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Memo {
    key: String,
    record: CallRecord,
}

/// The `llm` handler.
#[derive(Clone)]
pub struct LlmStep {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: LlmProviderConfig,
    primary: Result<Arc<Endpoint>, String>,
    fallback: Option<Result<Arc<Endpoint>, String>>,
    client: reqwest::Client,
    store: Store,
    limiter: LlmLimiter,
    breakers: Mutex<HashMap<String, Breaker>>,
    usage_ttl: Duration,
    cost: CostCarry,
    /// Tenants named in some bucket's `tenant_shares`: the only `tenant` label values
    /// besides `other` and `none`, so the label's cardinality stays bounded.
    tenants: BTreeSet<String>,
}

/// The `tenant` label of the LLM metrics: a tenant with configured shares, `other` for
/// any other tenant, `none` without one.
fn tenant_label(tenants: &BTreeSet<String>, tenant: Option<&str>) -> String {
    match tenant {
        None => "none".into(),
        Some(t) if tenants.contains(t) => t.to_string(),
        Some(_) => "other".into(),
    }
}

/// Turns per-call costs into whole micro-dollars for `honua_llm_cost_microdollars_total`
/// without losing the fractions: each series (provider, model, process type) keeps the
/// nano-dollars not yet counted, so the counter always equals the summed cost, truncated
/// to the micro-dollar.
#[derive(Default)]
struct CostCarry(Mutex<HashMap<(String, String, String), u64>>);

impl CostCarry {
    /// Adds `usd` and returns the whole micro-dollars to add to the counter now.
    fn add(&self, provider: &str, model: &str, process_type: &str, usd: f64) -> u64 {
        let nanos = (usd * 1e9).round();
        if !(nanos.is_finite() && nanos > 0.0) {
            return 0;
        }
        let mut m = self.0.lock().unwrap();
        let rest = m
            .entry((
                provider.to_string(),
                model.to_string(),
                process_type.to_string(),
            ))
            .or_insert(0);
        let total = *rest + nanos as u64;
        *rest = total % 1000;
        total / 1000
    }
}

impl LlmStep {
    /// Reads the provider keys (through `env` for `api_key_env`); a missing key is logged
    /// here and fails each step with a clear permanent error.
    pub fn new(
        cfg: &Config,
        llm: &LlmProviderConfig,
        store: Store,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Self {
        honua_runtime::install_crypto_provider();
        let resolve = |k: ProviderKind| {
            let r = Endpoint::resolve(k, llm.endpoint(k), env).map(Arc::new);
            if let Err(e) = &r {
                tracing::error!(provider = %k, error = %e, "llm provider is not usable");
            }
            r
        };
        let primary = resolve(llm.provider);
        let fallback = llm.fallback_provider.map(resolve);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .unwrap_or_default();
        let limiter =
            LlmLimiter::new(store.clone(), llm.limits.clone()).with_fleet_breaker(BreakerSpec {
                failures: llm.breaker_failures,
                open: Duration::from_secs(llm.breaker_open_secs),
                // The probe's claim lasts as long as its call may.
                probe_lease: Duration::from_secs(llm.request_timeout_secs + 5),
            });
        Self {
            inner: Arc::new(Inner {
                cfg: llm.clone(),
                primary,
                fallback,
                client,
                store,
                limiter,
                breakers: Mutex::new(HashMap::new()),
                usage_ttl: Duration::from_secs(cfg.retention_secs + 7 * 86_400),
                cost: CostCarry::default(),
                tenants: llm
                    .limits
                    .values()
                    .flat_map(|s| s.tenant_shares.keys())
                    .filter(|t| *t != OTHER_SHARE)
                    .cloned()
                    .collect(),
            }),
        }
    }
}

/// Registers kind `llm` on `reg` when `cfg.llm_provider` is set.
pub fn register(reg: &mut HandlerRegistry, cfg: &Config, env: &dyn Fn(&str) -> Option<String>) {
    let Some(llm) = &cfg.llm_provider else {
        return;
    };
    let store = match Store::from_config(cfg) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "llm step kind not registered: bad redis_url");
            return;
        }
    };
    reg.register(
        "llm",
        |c: &Value| parse_spec(c).map(|_| ()),
        LlmStep::new(cfg, llm, store, env),
    );
}

fn sha256_hex(v: &Value) -> String {
    let mut h = Sha256::new();
    h.update(v.to_string().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache / memo key of a request to one target.
fn request_key(provider: ProviderKind, model: &str, req: &ChatRequest) -> String {
    sha256_hex(&json!({
        "provider": provider.as_str(),
        "model": model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "schema": req.schema,
    }))
}

/// The UTC day a budget charge counts for. It names a key the budget script touches, so it
/// is chosen before the call: on Redis's clock (as of the step's claim), not this machine's.
fn budget_day(clock: &crate::handler::ServerClock) -> String {
    utc_day(clock.now_ms() / 1000)
}

pub use honua_shared::llm_store::utc_day;

fn cost(cfg: &LlmProviderConfig, model: &str, c: &Completion) -> Option<f64> {
    let p = cfg.prices.get(model)?;
    Some(
        c.input_tokens as f64 / 1000.0 * p.input_per_1k
            + c.output_tokens as f64 / 1000.0 * p.output_per_1k,
    )
}

async fn sleep_or_cancel(d: Duration, ctx: &StepContext) -> Result<(), StepError> {
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = ctx.cancel.cancelled() => Err(StepError::Cancelled),
    }
}

impl Inner {
    fn tenant(&self, ctx: &StepContext) -> String {
        tenant_label(&self.tenants, ctx.tenant.as_deref())
    }

    fn endpoint(&self, fallback: bool) -> Option<Result<Arc<Endpoint>, String>> {
        if fallback {
            self.fallback.clone()
        } else {
            Some(self.primary.clone())
        }
    }

    fn gate(&self, bucket: &str) -> Gate {
        let mut b = self.breakers.lock().unwrap();
        b.entry(bucket.to_string())
            .or_insert_with(|| {
                Breaker::new(
                    self.cfg.breaker_failures,
                    Duration::from_secs(self.cfg.breaker_open_secs),
                )
            })
            .gate(Instant::now())
    }

    /// A probe that was never sent, or whose error says nothing of the provider: another
    /// call may probe (locally, and fleet-wide when Redis gated it).
    async fn breaker_abandon(&self, bucket: &str, seen: Option<BreakerSeen>) {
        if seen == Some(BreakerSeen::Probe) {
            self.limiter
                .breaker_report(bucket, BreakerOutcome::Abandon, true)
                .await;
        } else {
            self.breaker(bucket, Breaker::probe_abandoned);
        }
    }

    fn breaker<R>(&self, bucket: &str, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let mut b = self.breakers.lock().unwrap();
        f(b.entry(bucket.to_string()).or_insert_with(|| {
            Breaker::new(
                self.cfg.breaker_failures,
                Duration::from_secs(self.cfg.breaker_open_secs),
            )
        }))
    }

    /// Budget check (`add` = 0) or charge for the step's process.
    async fn budget(
        &self,
        ctx: &StepContext,
        add: u64,
        cost_usd: f64,
    ) -> Result<(BudgetOver, BudgetAction), StepError> {
        let b = &self.cfg.budgets;
        let t = b.process_types.get(&ctx.process_type);
        let process_cap = t
            .and_then(|t| t.max_tokens_per_process)
            .or(b.max_tokens_per_process)
            .unwrap_or(0);
        let type_cap = t.and_then(|t| t.max_tokens_per_day).unwrap_or(0);
        let action = t.and_then(|t| t.action).unwrap_or(b.action);
        if process_cap == 0 && type_cap == 0 && add == 0 {
            return Ok((BudgetOver::No, action));
        }
        let day = budget_day(&ctx.clock);
        let call = BudgetCall {
            process_id: &ctx.process_id,
            process_type: &ctx.process_type,
            day: &day,
            add_tokens: add,
            add_cost_micro_usd: (cost_usd * 1e6).round().max(0.0) as u64,
            process_cap,
            type_daily_cap: type_cap,
            process_ttl: self.usage_ttl,
        };
        let usage = self
            .store
            .of(&ctx.process_id)
            .llm_budget(&call)
            .await
            .map_err(|e| StepError::Retryable(format!("llm budget check failed: {e}")))?;
        Ok((usage.over, action))
    }

    async fn check_budget(&self, ctx: &StepContext) -> Result<(), StepError> {
        let (over, action) = self.budget(ctx, 0, 0.0).await?;
        let what = match over {
            BudgetOver::No => return Ok(()),
            BudgetOver::Process => format!("process {}", ctx.process_id),
            BudgetOver::TypeDaily => format!("process type {} today", ctx.process_type),
        };
        metrics::counter!(m::LLM_ERRORS, "provider" => "none", "model" => "none", "error_type" => "budget_exceeded").increment(1);
        match action {
            BudgetAction::Fail => Err(StepError::Permanent(format!(
                "llm token budget of {what} is spent (action fail)"
            ))),
            BudgetAction::Pause => {
                let after = Duration::from_secs(self.cfg.budgets.pause_minutes * 60);
                Err(StepError::Yield {
                    after,
                    message: format!(
                        "llm token budget of {what} is spent: step paused for {}",
                        humantime::format_duration(after)
                    ),
                })
            }
        }
    }

    /// Admission of one call: the limiter (with the fleet-wide breaker in its round trip),
    /// then this worker's breaker when Redis did not gate the call. What the loop saw
    /// instead when the call may not go out.
    async fn admit(
        &self,
        ctx: &StepContext,
        bucket: &str,
        estimate: u64,
        limiter_wait: &mut Duration,
    ) -> Result<(Permit, Gate), Seen> {
        let max_wait = Duration::from_millis(self.cfg.limiter_max_wait_ms);
        let asked = Instant::now();
        // The fleet-wide breaker is checked in the limiter's round trip; the local one
        // decides only when Redis did not answer.
        // The call is charged to its process type's and tenant's fair shares.
        let asker = Asker::new(ctx.process_type.clone(), ctx.tenant.clone());
        match self
            .limiter
            .acquire_as(bucket, Some(&asker), estimate, max_wait, &ctx.cancel)
            .await
        {
            Ok(Some(p)) => {
                let gate = match p.fleet_breaker() {
                    Some(BreakerSeen::Probe) => Gate::Probe,
                    Some(_) => Gate::Closed,
                    None => self.gate(bucket),
                };
                if gate == Gate::Open {
                    if let Err(e) = p.release().await {
                        tracing::warn!(%bucket, error = %e, "llm limiter release failed");
                    }
                    return Err(Seen::BreakerOpen {
                        wait: Duration::from_secs(self.cfg.breaker_open_secs),
                    });
                }
                Ok((p, gate))
            }
            Ok(None) => {
                *limiter_wait += asked.elapsed();
                Err(Seen::NotAdmitted)
            }
            Err(e) => Err(Seen::Limiter(e)),
        }
    }

    /// After a completed call: settle the reservation with the real usage, close the
    /// breakers, and pause the bucket fleet-wide when the provider says its window is spent.
    async fn after_success(
        &self,
        bucket: &str,
        permit: Permit,
        c: &Completion,
        retry_after_max: Duration,
    ) {
        let seen = permit.fleet_breaker();
        if let Err(e) = permit.settle(c.input_tokens + c.output_tokens).await {
            tracing::warn!(%bucket, error = %e, "llm limiter settle failed; reservation stands");
        }
        self.breaker(bucket, Breaker::success);
        if matches!(seen, Some(BreakerSeen::Probe | BreakerSeen::Failing)) {
            let probe = seen == Some(BreakerSeen::Probe);
            self.limiter
                .breaker_report(bucket, BreakerOutcome::Success, probe)
                .await;
        }
        if let Some(d) = c.exhausted_for {
            // The provider says its window is used up: hold the whole fleet
            // off this bucket until it resets instead of collecting 429s.
            let d = d.min(retry_after_max);
            tracing::info!(%bucket, pause_ms = d.as_millis() as u64, "provider rate limit exhausted: pausing the bucket");
            if let Err(pe) = self.limiter.pause(bucket, d).await {
                tracing::warn!(%bucket, error = %pe, "cannot pause the llm bucket");
            }
        }
    }

    /// After a failed call: settle the reservation (a timed-out call keeps it), count the
    /// failure on the breakers (or abandon a probe the error says nothing about), and pause
    /// the bucket on a 429. Returns whether this failure opened the breaker.
    async fn after_failure(
        &self,
        bucket: &str,
        permit: Permit,
        gate: Gate,
        e: &CallError,
        calls: u32,
    ) -> bool {
        let seen = permit.fleet_breaker();
        let et = e.error_type();
        if matches!(e, CallError::Timeout(_)) {
            drop(permit); // the provider may have done the work: the reservation stands
        } else if let Err(se) = permit.settle(0).await {
            tracing::warn!(%bucket, error = %se, "llm limiter settle failed");
        }
        let opened = if e.trips_breaker() {
            let local = self.breaker(bucket, |b| b.failure(Instant::now()));
            if seen.is_some() {
                let probe = gate == Gate::Probe;
                self.limiter
                    .breaker_report(bucket, BreakerOutcome::Failure, probe)
                    .await
                    .is_some()
            } else {
                local
            }
        } else {
            if gate == Gate::Probe {
                self.breaker_abandon(bucket, seen).await;
            }
            false
        };
        tracing::warn!(%bucket, error_type = et, error = %e, call = calls, "llm call failed");
        if let CallError::RateLimited { retry_after, .. } = e {
            let pause = retry_after.unwrap_or(Duration::from_secs(1));
            if let Err(pe) = self.limiter.pause(bucket, pause).await {
                tracing::warn!(%bucket, error = %pe, "cannot pause the llm bucket");
            }
        }
        opened
    }

    /// The provider-call loop: limiter, breaker, retries, fallback.
    async fn call(
        &self,
        ctx: &StepContext,
        req: &ChatRequest,
        primary_model: &str,
        fallback_model: &str,
        limits: CallLimits,
    ) -> Result<CallRecord, StepError> {
        let cfg = &self.cfg;
        let mut backoff = Backoff::new(
            Duration::from_millis(cfg.retry_initial_ms),
            Duration::from_millis(cfg.retry_max_ms),
        );
        let retry_after_max = Duration::from_secs(cfg.retry_after_max_secs);
        let max_wait = Duration::from_millis(cfg.limiter_max_wait_ms);
        // The prompt's tokens for the current target's model (counted with its tokenizer
        // where the encoding is known, else estimated); recounted if a fallback changes
        // the model.
        let mut prompt: Option<(String, tokens::PromptTokens)> = None;
        let mut attempts: Vec<AttemptRecord> = Vec::new();
        let mut limiter_wait = Duration::ZERO;
        let mut on_fallback = false;
        let mut calls = 0u32;
        let has_fallback = self.fallback.as_ref().is_some_and(Result::is_ok);
        let policy = Policy {
            max_retries: cfg.max_retries,
            retry_after_max,
            max_wait,
        };
        // Each pass either calls the provider (bounded by max_retries) or moves to the
        // fallback (at most once), so the loop is bounded.
        loop {
            let endpoint = match self.endpoint(on_fallback) {
                Some(Ok(e)) => e,
                Some(Err(msg)) => return Err(StepError::Permanent(msg)),
                None => unreachable_fallback()?,
            };
            let target = Target {
                endpoint,
                model: if on_fallback {
                    fallback_model.to_string()
                } else {
                    primary_model.to_string()
                },
            };
            let prompt_tokens = match &prompt {
                Some((m, p)) if *m == target.model => *p,
                _ => {
                    let p = tokens::prompt_tokens_async(&target.model, &req.messages).await;
                    prompt = Some((target.model.clone(), p));
                    p
                }
            };
            let estimate = prompt_tokens.tokens + u64::from(req.max_tokens);
            let bucket = target.bucket();
            // One pass: admission (limiter, breaker) and one provider call; what it saw
            // when it did not complete.
            let saw: Seen = 'pass: {
                let (permit, gate) =
                    match self.admit(ctx, &bucket, estimate, &mut limiter_wait).await {
                        Ok(admitted) => admitted,
                        Err(saw) => break 'pass saw,
                    };
                limiter_wait += permit.waited();
                let seen = permit.fleet_breaker();
                calls += 1;
                let (provider, model) = (target.provider().as_str(), target.model.clone());
                let started = Instant::now();
                let r = tokio::select! {
                    r = provider::call(&self.client, &target.endpoint, &target.model, req, &limits)
                        .instrument(tracing::info_span!("llm_call", provider, model = %target.model, call = calls, stream = req.stream)) => r,
                    _ = ctx.cancel.cancelled() => {
                        if gate == Gate::Probe {
                            self.breaker_abandon(&bucket, seen).await;
                        }
                        return Err(StepError::Cancelled);
                    }
                };
                let latency = started.elapsed();
                metrics::histogram!(m::LLM_LATENCY, "provider" => provider, "model" => model.clone())
                    .record(latency.as_secs_f64());
                match r {
                    Ok(mut c) => {
                        if c.usage_estimated {
                            // No usage in the reply: the prompt as counted for the reservation,
                            // the reply with the same tokenizer where it is loaded.
                            c.input_tokens = prompt_tokens.tokens;
                            c.output_tokens = tokens::text_tokens(&target.model, &c.text);
                        }
                        metrics::counter!(m::LLM_REQUESTS, "provider" => provider, "model" => model.clone(), "outcome" => "ok", "process_type" => ctx.process_type.clone(), "tenant" => self.tenant(ctx)).increment(1);
                        self.after_success(&bucket, permit, &c, retry_after_max)
                            .await;
                        let cost_usd = cost(cfg, &target.model, &c);
                        return Ok(CallRecord {
                            provider: provider.to_string(),
                            model: target.model.clone(),
                            fallback_used: on_fallback,
                            latency_ms: latency.as_millis() as u64,
                            limiter_wait_ms: limiter_wait.as_millis() as u64,
                            attempts,
                            cost_usd,
                            completion: c,
                        });
                    }
                    Err(e) => {
                        let et = e.error_type();
                        metrics::counter!(m::LLM_REQUESTS, "provider" => provider, "model" => model.clone(), "outcome" => et, "process_type" => ctx.process_type.clone(), "tenant" => self.tenant(ctx)).increment(1);
                        metrics::counter!(m::LLM_ERRORS, "provider" => provider, "model" => model.clone(), "error_type" => et).increment(1);
                        let opened = self.after_failure(&bucket, permit, gate, &e, calls).await;
                        Seen::CallFailed { error: e, opened }
                    }
                }
            };
            let at = Progress {
                bucket: &bucket,
                calls,
                on_fallback,
                has_fallback,
            };
            let next = retry::next_move(&saw, at, &policy, &mut backoff, &mut rand::rng());
            if let Seen::CallFailed { error, .. } = &saw {
                let delay = match next {
                    Move::Retry(d) => d,
                    _ => Duration::ZERO,
                };
                attempts.push(attempt(
                    &target,
                    error.error_type(),
                    delay.as_millis() as u64,
                ));
            }
            match next {
                Move::Stop(e) => return Err(e),
                Move::Fallback => {
                    match saw {
                        Seen::BreakerOpen { .. }
                        | Seen::Limiter(LimitError::BreakerOpen { .. }) => {
                            tracing::info!(%bucket, "circuit breaker open: using the fallback provider");
                        }
                        Seen::NotAdmitted => {
                            tracing::info!(%bucket, "rate-limit bucket cannot admit within the wait bound: using the fallback provider");
                        }
                        Seen::Limiter(_) | Seen::CallFailed { .. } => {}
                    }
                    on_fallback = true;
                }
                Move::Retry(delay) => {
                    if !delay.is_zero() {
                        sleep_or_cancel(delay, ctx).await?;
                    }
                }
            }
        }
    }
}

fn unreachable_fallback() -> Result<Arc<Endpoint>, StepError> {
    Err(StepError::Permanent(
        "no fallback provider is configured".into(),
    ))
}

fn attempt(t: &Target, et: &str, delay_ms: u64) -> AttemptRecord {
    AttemptRecord {
        provider: t.provider().as_str().to_string(),
        model: t.model.clone(),
        error_type: et.to_string(),
        delay_ms,
    }
}

/// The OTel GenAI `gen_ai.system` value of a provider.
fn gen_ai_system(provider: &str) -> &str {
    match provider {
        "azure" => "az.ai.openai",
        // An OpenAI-compatible server speaks OpenAI's API.
        "openai" | "openai_compatible" => "openai",
        other => other,
    }
}

/// Puts the step's result on its `chat` span: the OTel GenAI attributes plus cache hit,
/// fallback and limiter wait. Never the prompt or the reply.
fn record_span(span: &tracing::Span, r: &Result<StepOutput, StepError>) {
    let out = match r {
        Ok(o) => o.output.as_ref(),
        Err(e) => {
            span.record("error.type", e.code());
            span.record("otel.status_code", "ERROR");
            return;
        }
    };
    let Some(o) = out else { return };
    let text = |k: &str| o[k].as_str().unwrap_or_default().to_string();
    let model = text("model");
    let provider = text("provider");
    span.record("gen_ai.system", gen_ai_system(&provider));
    span.record("gen_ai.response.model", model.as_str());
    span.record("honua.llm.provider", provider.as_str());
    for (field, k) in [
        ("gen_ai.usage.input_tokens", "inputTokens"),
        ("gen_ai.usage.output_tokens", "outputTokens"),
    ] {
        if let Some(n) = o["usage"][k].as_u64() {
            span.record(field, n);
        }
    }
    for (field, k) in [
        ("honua.llm.cache_hit", "cacheHit"),
        ("honua.llm.fallback_used", "fallbackUsed"),
        ("honua.llm.memoised", "memoised"),
    ] {
        span.record(field, o[k].as_bool().unwrap_or(false));
    }
    if let Some(ms) = o["limiterWaitMs"].as_u64() {
        span.record("honua.llm.limiter_wait_ms", ms);
    }
}

#[async_trait]
impl StepHandler for LlmStep {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        use tracing::field::Empty;
        let spec = parse_spec(&ctx.config).map_err(StepError::Permanent)?;
        let primary_model = spec.model.clone().unwrap_or_else(|| {
            self.inner
                .cfg
                .model_selection
                .model(spec.task_class)
                .to_string()
        });
        // The name is fixed when the span starts: OTel GenAI's `{operation} {request.model}`.
        let span = tracing::info_span!(
            "chat",
            otel.name = format!("chat {primary_model}"),
            otel.status_code = Empty,
            "gen_ai.operation.name" = "chat",
            "gen_ai.system" = Empty,
            "gen_ai.request.model" = primary_model.as_str(),
            "gen_ai.request.max_tokens" = Empty,
            "gen_ai.response.model" = Empty,
            "gen_ai.usage.input_tokens" = Empty,
            "gen_ai.usage.output_tokens" = Empty,
            "honua.llm.provider" = Empty,
            "honua.llm.cache_hit" = Empty,
            "honua.llm.fallback_used" = Empty,
            "honua.llm.memoised" = Empty,
            "honua.llm.limiter_wait_ms" = Empty,
            "error.type" = Empty,
        );
        let r = self
            .execute(ctx, spec, primary_model)
            .instrument(span.clone())
            .await;
        record_span(&span, &r);
        r
    }
}

impl LlmStep {
    async fn execute(
        &self,
        ctx: StepContext,
        spec: StepSpec,
        primary_model: String,
    ) -> Result<StepOutput, StepError> {
        let inner = &*self.inner;
        let cfg = &inner.cfg;
        let mut messages = Vec::new();
        if let Some(s) = &spec.system {
            messages.push(Message {
                role: "system".into(),
                content: s
                    .render(&ctx.input, &ctx.outputs)
                    .map_err(StepError::Permanent)?,
            });
        }
        messages.push(Message {
            role: "user".into(),
            content: spec
                .prompt
                .render(&ctx.input, &ctx.outputs)
                .map_err(StepError::Permanent)?,
        });
        let primary = cfg.provider;
        let fallback_model = spec.fallback_model.clone().unwrap_or_else(|| {
            match (&spec.model, &cfg.fallback_model_selection) {
                (None, Some(sel)) => sel.model(spec.task_class).to_string(),
                _ => primary_model.clone(),
            }
        });
        let max_tokens = spec
            .max_tokens
            .or_else(|| cfg.max_tokens_by_step.get(&ctx.step).copied())
            .unwrap_or(cfg.default_max_tokens);
        let temperature = spec.temperature.unwrap_or(cfg.temperature);
        tracing::Span::current().record("gen_ai.request.max_tokens", max_tokens);
        let req = ChatRequest {
            messages,
            max_tokens,
            temperature,
            schema: spec.schema.clone(),
            stream: spec
                .stream
                .unwrap_or(max_tokens >= cfg.stream_min_max_tokens),
        };
        let key = request_key(primary, &primary_model, &req);
        let fb_key = cfg
            .fallback_provider
            .map(|p| request_key(p, &fallback_model, &req));
        let caching = cfg.llm_caching.enabled
            && spec.cache != Some(false)
            && (temperature == 0.0 || cfg.llm_caching.force || spec.cache == Some(true));
        let memo = ctx
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("llm"))
            .and_then(|v| serde_json::from_value::<Memo>(v.clone()).ok())
            .filter(|m| m.key == key);
        let (record, memoised, cache_hit) = if let Some(m) = memo {
            tracing::info!(process_id = %ctx.process_id, step = %ctx.step, "llm call already completed: using the checkpointed reply");
            (m.record, true, false)
        } else {
            let mut hit = None;
            if caching {
                for k in std::iter::once(&key).chain(fb_key.as_ref()) {
                    match inner.store.llm_cache_get(k).await {
                        Ok(Some(s)) => {
                            if let Ok(r) = serde_json::from_str::<CallRecord>(&s) {
                                hit = Some(r);
                                break;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::warn!(error = %e, "llm cache read failed"),
                    }
                }
            }
            match hit {
                Some(r) => (r, false, true),
                None => {
                    inner.check_budget(&ctx).await?;
                    let timeout = spec
                        .timeout
                        .unwrap_or(Duration::from_secs(cfg.request_timeout_secs))
                        .min(ctx.timeout);
                    let limits = CallLimits {
                        timeout,
                        stream_idle: Duration::from_secs(cfg.stream_idle_timeout_secs),
                        max_response_bytes: cfg.max_response_kb * 1024,
                        retry_after_max: Duration::from_secs(cfg.retry_after_max_secs),
                    };
                    let r = inner
                        .call(&ctx, &req, &primary_model, &fallback_model, limits)
                        .await?;
                    let c = &r.completion;
                    let tokens = c.input_tokens + c.output_tokens;
                    let labels = [
                        ("provider", r.provider.clone()),
                        ("model", r.model.clone()),
                        ("process_type", ctx.process_type.clone()),
                    ];
                    let tenant = [("tenant", inner.tenant(&ctx))];
                    let with_tenant: Vec<_> = labels.iter().chain(&tenant).cloned().collect();
                    metrics::counter!(m::LLM_TOKENS_USED, &with_tenant).increment(tokens);
                    if let Some(usd) = r.cost_usd {
                        let micro = inner
                            .cost
                            .add(&r.provider, &r.model, &ctx.process_type, usd);
                        metrics::counter!(m::LLM_COST_MICRO_USD, &labels).increment(micro);
                    }
                    if let Err(e) = inner.budget(&ctx, tokens, r.cost_usd.unwrap_or(0.0)).await {
                        tracing::warn!(error = %e, "llm usage not recorded for budgets");
                    }
                    ctx.save_checkpoint(
                        &json!({"llm": Memo { key: key.clone(), record: r.clone() }}),
                    )
                    .await?;
                    (r, false, false)
                }
            }
        };
        if caching {
            metrics::counter!(m::LLM_CACHE, "result" => if cache_hit { "hit" } else { "miss" })
                .increment(1);
        }
        let c = &record.completion;
        let structured = match &spec.schema {
            None => None,
            Some(s) => {
                let checked =
                    schema::extract_json(&c.text).and_then(|v| schema::validate(s, &v).map(|()| v));
                match checked {
                    Ok(v) => Some(v),
                    Err(e) => {
                        metrics::counter!(m::LLM_ERRORS, "provider" => record.provider.clone(), "model" => record.model.clone(), "error_type" => "schema_violation").increment(1);
                        // The next attempt must ask again, not reuse this reply.
                        if !cache_hit {
                            ctx.save_checkpoint(&json!({"llm": null})).await?;
                        }
                        return Err(StepError::Retryable(format!(
                            "llm reply violates the output schema: {e}"
                        )));
                    }
                }
            }
        };
        if caching && !cache_hit && !memoised {
            let k = if record.fallback_used {
                fb_key.as_ref().unwrap_or(&key)
            } else {
                &key
            };
            let ttl = Duration::from_secs(cfg.llm_caching.ttl_minutes * 60);
            if let Ok(s) = serde_json::to_string(&record)
                && let Err(e) = inner.store.llm_cache_put(k, &s, ttl).await
            {
                tracing::warn!(error = %e, "llm cache write failed");
            }
        }
        let mut out = json!({
            "text": c.text,
            "model": record.model,
            "provider": record.provider,
            "usage": {
                "inputTokens": c.input_tokens,
                "outputTokens": c.output_tokens,
                "totalTokens": c.input_tokens + c.output_tokens,
                "estimated": c.usage_estimated,
            },
            "latencyMs": record.latency_ms,
            "cacheHit": cache_hit,
            "fallbackUsed": record.fallback_used,
            "limiterWaitMs": record.limiter_wait_ms,
            "memoised": memoised,
            "costUsd": record.cost_usd,
            "finishReason": c.finish_reason,
            "attempts": record.attempts,
        });
        if let Some(v) = structured {
            out["json"] = v;
        }
        Ok(StepOutput::ok_with(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_counter_carries_fractions_of_a_micro_dollar() {
        let c = CostCarry::default();
        // 13.5 µ$ per call: 50 calls are 675 µ$, not 50 × 13 or 50 × 14.
        let counted: u64 = (0..50).map(|_| c.add("p", "m", "T", 13.5e-6)).sum();
        assert_eq!(counted, 675);
        // Each series carries its own remainder.
        assert_eq!(c.add("p", "other", "T", 0.4e-6), 0);
        assert_eq!(c.add("p", "other", "U", 0.4e-6), 0);
        assert_eq!(c.add("p", "other", "T", 0.6e-6), 1);
    }

    #[test]
    fn the_budget_day_is_the_servers_not_this_machines() {
        // A claim stamped by a server at the first second of 2026 counts for that day, and
        // one a minute before it for the day before, whatever this machine's clock says.
        let clock = crate::handler::ServerClock::at(1_767_225_600_000);
        assert_eq!(budget_day(&clock), "20260101");
        let clock = crate::handler::ServerClock::at(1_767_225_540_000);
        assert_eq!(budget_day(&clock), "20251231");
    }

    #[test]
    fn utc_days() {
        assert_eq!(utc_day(0), "19700101");
        assert_eq!(utc_day(951_782_400), "20000229");
        assert_eq!(utc_day(1_767_225_599), "20251231");
        assert_eq!(utc_day(1_767_225_600), "20260101");
    }

    #[test]
    fn request_keys_cover_provider_model_messages_and_parameters() {
        let req = ChatRequest {
            messages: vec![Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: 10,
            temperature: 0.0,
            schema: None,
            stream: false,
        };
        let k = request_key(ProviderKind::Openai, "m", &req);
        assert_eq!(k, request_key(ProviderKind::Openai, "m", &req));
        assert_ne!(k, request_key(ProviderKind::Azure, "m", &req));
        assert_ne!(k, request_key(ProviderKind::Openai, "n", &req));
        let streamed = ChatRequest {
            stream: true,
            ..req.clone()
        };
        assert_eq!(
            k,
            request_key(ProviderKind::Openai, "m", &streamed),
            "streaming is not a parameter of the reply"
        );
        let hotter = ChatRequest {
            temperature: 0.5,
            ..req
        };
        assert_ne!(k, request_key(ProviderKind::Openai, "m", &hotter));
    }
}
