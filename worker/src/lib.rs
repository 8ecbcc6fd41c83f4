//! The stateless Honua worker: claims step jobs from Redis Streams, runs their handlers,
//! heartbeats, checkpoints, reclaims the jobs of stopped workers, and commits each step's
//! result exactly once through fenced scripts ([`runner`]: claim loop, step execution,
//! completer); the built-in kinds ([`builtin`]), the `llm` kind ([`llm`]) with its
//! fleet-wide limiter ([`limit`]), and the handler trait for custom kinds ([`handler`]).
//!
//! It stands on `honua-shared` and `honua-runtime` and may not depend on the scheduler: it
//! learns what to run from the job stream and reports each outcome, through the fenced
//! scripts, on the results stream.

#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod builtin;
pub mod handler;
pub mod limit;
pub mod llm;
pub mod runner;

pub use handler::{HandlerRegistry, ServerClock, StepContext, StepError, StepHandler, StepOutput};
pub use runner::{Worker, WorkerStats};

use std::time::Duration;

/// Jittered exponential backoff for retrying Redis calls that a running step depends on
/// (commit, hand-back, checkpoint), giving up after `total`.
pub(crate) fn redis_backoff(total: Duration) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(2))
        .with_total_delay(Some(total))
        .without_max_times()
}

/// The built-in handlers configured from `cfg`, with kind `llm` when `cfg.llm_provider`
/// is set (API keys read from the process environment or secret files).
pub fn builtin_handlers(cfg: &honua_shared::config::Config) -> HandlerRegistry {
    let mut reg = HandlerRegistry::builtin(builtin::HttpOptions {
        allowlist: cfg.worker.http_allowlist.clone(),
        max_response_kb: cfg.worker.http_max_response_kb,
    });
    llm::register(&mut reg, cfg, &|var| std::env::var(var).ok());
    reg
}

/// What a worker binary's `main` does: validate config, load definitions with the kinds of
/// `handlers`, run until SIGTERM/Ctrl-C (or `shutdown`), then drain and hand back.
pub async fn run_main(
    cfg: honua_shared::config::Config,
    handlers: HandlerRegistry,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    honua_runtime::install_crypto_provider();
    let defs =
        honua_shared::definition::DefinitionSet::load_dir(&cfg.definitions_dir, handlers.kinds())
            .map_err(|e| {
            anyhow::anyhow!(
                "process definitions in {}: {e}",
                cfg.definitions_dir.display()
            )
        })?;
    let store = honua_shared::store::Store::from_config(&cfg)?;
    if !cfg.worker.metrics_addr.is_empty() {
        let addr = cfg.worker.metrics_addr.parse()?;
        let limits = honua_runtime::http_server::Limits::from(&cfg.http_server);
        if let Err(e) =
            honua_runtime::telemetry::serve_worker_metrics(addr, limits, shutdown.clone()).await
        {
            tracing::warn!(error = %e, %addr, "cannot serve worker metrics");
        }
    }
    let hand_back = tokio_util::sync::CancellationToken::new();
    let worker = Worker::new(
        cfg,
        store,
        std::sync::Arc::new(defs),
        std::sync::Arc::new(handlers),
    )
    .with_hand_back(hand_back.clone());
    tokio::spawn(honua_runtime::telemetry::shutdown_signals(
        shutdown.clone(),
        hand_back,
    ));
    worker.run(shutdown).await;
    Ok(())
}
