//! `honua-scheduler`: the scheduler loops and the HTTP gateway.

use clap::Parser;
use honua_runtime::telemetry::{self, LogFormat};
use honua_shared::config::Config;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Honua scheduler and HTTP gateway")]
struct Args {
    /// Config file (TOML); also HONUA_CONFIG.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address (overrides HONUA_HTTP_ADDR).
    #[arg(long)]
    http_addr: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(a) = args.http_addr {
        cfg.http_addr = Some(a);
    }
    // Validated before the runtime is built from it (run_scheduler validates again).
    cfg.validate()?;
    let runtime = honua_runtime::build_runtime("honua-scheduler", cfg.runtime_threads)?;
    runtime.block_on(async move {
        let _telemetry = telemetry::init_from_env(LogFormat::Json);
        honua_runtime::install_crypto_provider();
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        tokio::spawn(async move {
            telemetry::shutdown_signal().await;
            s.cancel();
        });
        honua_scheduler::run_scheduler(cfg, None, shutdown).await
    })
}
