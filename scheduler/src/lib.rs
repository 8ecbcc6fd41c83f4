//! The Honua scheduler: takes submissions, decides every graph transition (joins,
//! conditions, retries, timers, signals, timeouts) and commits it through the store's
//! scripts, and serves the HTTP gateway (the operator API, `/health`, `/metrics`).
//!
//! It stands on `honua-shared` (records, definitions, the engine, the store) and
//! `honua-runtime` (telemetry, the HTTP server); it never runs a step handler and may not
//! depend on the worker.

#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod durable;
pub mod gateway;
pub mod intake;
pub mod ops;
pub mod processes;
pub mod scheduler;
pub mod state;
pub mod submit;
pub mod view;

pub use processes::Processes;
pub use scheduler::Scheduler;
pub use submit::{SubmitError, Submitted};

use honua_shared::config::Config;
use honua_shared::definition::{DefinitionSet, KindRegistry};
use std::sync::Arc;

/// Counts a process that just finished (`status`) in the guide's metrics.
pub fn record_finish(
    process_type: &str,
    status: honua_shared::status::ProcessStatus,
    code: Option<&str>,
    duration_ms: u64,
) {
    use honua_shared::metrics as m;
    use honua_shared::status::ProcessStatus as S;
    let t = process_type.to_string();
    match status {
        S::Completed => {
            metrics::counter!(m::PROCESS_COMPLETED, "process_type" => t.clone()).increment(1)
        }
        S::Failed => metrics::counter!(m::PROCESS_FAILURES, "process_type" => t.clone(),
            "reason" => code.unwrap_or("unknown").to_string())
        .increment(1),
        S::TimedOut => {
            metrics::counter!(m::PROCESS_TIMEOUTS, "process_type" => t.clone()).increment(1)
        }
        S::Cancelled => {
            metrics::counter!(m::PROCESS_CANCELLED, "process_type" => t.clone()).increment(1)
        }
        _ => {}
    }
    metrics::counter!(m::PROCESS_TRANSITIONS, "process_type" => t.clone(), "status" => status.as_str())
        .increment(1);
    metrics::histogram!(m::PROCESS_DURATION, "process_type" => t, "status" => status.as_str())
        .record(duration_ms as f64 / 1000.0);
}

/// Loads the definitions with the kinds `cfg` configures
/// ([`honua_shared::definition::KindRegistry::for_config`]); no handler is constructed.
pub fn load_definitions(cfg: &Config) -> anyhow::Result<(Arc<DefinitionSet>, Arc<KindRegistry>)> {
    let kinds = KindRegistry::for_config(cfg);
    let defs = DefinitionSet::load_dir(&cfg.definitions_dir, &kinds).map_err(|e| {
        anyhow::anyhow!(
            "process definitions in {}: {e}",
            cfg.definitions_dir.display()
        )
    })?;
    Ok((Arc::new(defs), Arc::new(kinds)))
}

/// Logs that acknowledged submissions may be lost on a machine crash when the server has
/// no WAITAOF (`honua-scheduler`, `honua scheduler` and `honua dev` alike).
pub fn warn_if_not_durable(engine: &Processes) {
    if !engine.waitaof {
        tracing::warn!(
            "WAITAOF unavailable (Redis < 7.2 or AOF off): a machine crash can lose about the last second of acknowledged submissions"
        );
    }
}

/// Logs that the API is open when no API keys are configured (`honua-scheduler`,
/// `honua scheduler` and `honua dev` alike).
pub fn warn_if_open(cfg: &Config) {
    if cfg.api.keys.is_empty() {
        tracing::warn!(
            "no API keys configured (api.keys / HONUA_API_KEYS): the API is open to anyone who can reach it"
        );
    }
}

/// Runs the scheduler loops and the gateway until `shutdown` fires (`honua-scheduler`).
pub async fn run_scheduler(
    cfg: Config,
    listener: Option<tokio::net::TcpListener>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    cfg.validate()?;
    let (defs, kinds) = load_definitions(&cfg)?;
    let store = honua_shared::store::Store::from_config(&cfg)?;
    let cfg = Arc::new(cfg);
    let engine = Processes::new(cfg.clone(), store, defs, kinds).await;
    warn_if_not_durable(&engine);
    let listener = match listener {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(cfg.listen_addr()).await?,
    };
    tracing::info!(addr = %listener.local_addr()?, redis = %cfg.redacted_redis_target(), "gateway listening");
    warn_if_open(&cfg);
    let scheduler = Scheduler::new(engine.clone());
    let state = gateway::ApiState {
        engine,
        scheduler: Some(scheduler.stats()),
    };
    let gw = tokio::spawn(gateway::serve_with(state, listener, shutdown.clone()));
    scheduler.run(shutdown).await;
    gw.await??;
    Ok(())
}
