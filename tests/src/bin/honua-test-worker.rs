//! A worker binary for the whole-system tests: the built-in kinds plus test kinds that log
//! every execution to `HONUA_TEST_LOG` (one line per event; see `honua_tests::append_log`).
//!
//! - `counter`: counts from its checkpoint (or 0) to `config.total`, sleeping `config.tick_ms`
//!   and checkpointing after every tick; logs `start` with the value it resumed from.
//! - `crash`: logs `start`, then aborts the whole process (a poison job).
//! - `slow`: logs `start`, sleeps `config.ms`, logs `done`.
//! - `llm_crash_once` (when `[llm_provider]` is configured): the `llm` kind, but on the
//!   job's first delivery the process aborts right after the step's provider call completed
//!   (and was checkpointed), before its result is committed.

use async_trait::async_trait;
use honua_runtime::telemetry::{self, LogFormat};
use honua_shared::config::Config;
use honua_worker::{StepContext, StepError, StepHandler, StepOutput};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Kinds {
    log: PathBuf,
    worker: String,
}

struct Counter(Arc<Kinds>);
struct Crash(Arc<Kinds>);
struct Slow(Arc<Kinds>);

fn num(c: &Value, k: &str, default: u64) -> u64 {
    c.get(k).and_then(Value::as_u64).unwrap_or(default)
}

#[async_trait]
impl StepHandler for Counter {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let total = num(&ctx.config, "total", 10);
        let tick = Duration::from_millis(num(&ctx.config, "tick_ms", 50));
        let from = ctx
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("n"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let k = &self.0;
        honua_tests::append_log(&k.log, "start", &ctx.process_id, &ctx.step, &k.worker, from);
        for n in from + 1..=total {
            tokio::time::sleep(tick).await;
            ctx.save_checkpoint(&json!({ "n": n })).await?;
        }
        honua_tests::append_log(&k.log, "done", &ctx.process_id, &ctx.step, &k.worker, total);
        Ok(StepOutput::ok_with(
            json!({ "n": total, "resumed_from": from, "worker": k.worker }),
        ))
    }
}

#[async_trait]
impl StepHandler for Crash {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let k = &self.0;
        honua_tests::append_log(
            &k.log,
            "start",
            &ctx.process_id,
            &ctx.step,
            &k.worker,
            ctx.deliveries,
        );
        std::process::abort();
    }
}

#[async_trait]
impl StepHandler for Slow {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let k = &self.0;
        honua_tests::append_log(
            &k.log,
            "start",
            &ctx.process_id,
            &ctx.step,
            &k.worker,
            ctx.deliveries,
        );
        tokio::time::sleep(Duration::from_millis(num(&ctx.config, "ms", 1000))).await;
        honua_tests::append_log(
            &k.log,
            "done",
            &ctx.process_id,
            &ctx.step,
            &k.worker,
            ctx.deliveries,
        );
        Ok(StepOutput::ok_with(json!({ "worker": k.worker })))
    }
}

struct LlmCrashOnce(honua_worker::llm::LlmStep, Arc<Kinds>);

#[async_trait]
impl StepHandler for LlmCrashOnce {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let (deliveries, pid, step) = (ctx.deliveries, ctx.process_id.clone(), ctx.step.clone());
        let r = self.0.run(ctx).await;
        let k = &self.1;
        honua_tests::append_log(&k.log, "called", &pid, &step, &k.worker, deliveries);
        if deliveries == 1 {
            std::process::abort();
        }
        r
    }
}

/// Registers the test kinds on a registry (also used by in-process tests).
fn register(reg: &mut honua_worker::HandlerRegistry, kinds: Arc<Kinds>) {
    reg.register("counter", |_| Ok(()), Counter(kinds.clone()));
    reg.register("crash", |_| Ok(()), Crash(kinds.clone()));
    reg.register("slow", |_| Ok(()), Slow(kinds));
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_from_env(LogFormat::Json);
    let cfg = Config::load(None, std::env::vars())?;
    let kinds = Arc::new(Kinds {
        log: std::env::var("HONUA_TEST_LOG")
            .unwrap_or_else(|_| "/dev/null".into())
            .into(),
        worker: cfg.worker.id.clone().unwrap_or_default(),
    });
    let mut reg = honua_worker::builtin_handlers(&cfg);
    if let Some(llm) = &cfg.llm_provider {
        let store = honua_shared::store::Store::from_config(&cfg)?;
        let step = honua_worker::llm::LlmStep::new(&cfg, llm, store, &|v| std::env::var(v).ok());
        reg.register(
            "llm_crash_once",
            |c| honua_shared::definition::llm::parse_spec(c).map(|_| ()),
            LlmCrashOnce(step, kinds.clone()),
        );
    }
    register(&mut reg, kinds);
    honua_worker::run_main(cfg, reg, CancellationToken::new()).await
}
