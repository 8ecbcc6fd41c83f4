//! `honua-worker`: a stateless worker with the built-in step kinds.

use clap::Parser;
use honua_runtime::telemetry::{self, LogFormat};
use honua_shared::config::Config;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Honua worker")]
struct Args {
    /// Config file (TOML); also HONUA_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Consumer name (overrides HONUA_WORKER_ID; default: worker-<hostname>).
    #[arg(long)]
    id: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(id) = args.id {
        cfg.worker.id = Some(id);
    }
    // Validated before the runtime is built from it (run_main validates again).
    cfg.validate()?;
    let runtime = honua_runtime::build_runtime("honua-worker", cfg.runtime_threads)?;
    runtime.block_on(async move {
        let _telemetry = telemetry::init_from_env(LogFormat::Json);
        let handlers = honua_worker::builtin_handlers(&cfg);
        honua_worker::run_main(cfg, handlers, CancellationToken::new()).await
    })
}
