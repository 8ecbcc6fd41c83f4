//! `honua`: the operator command. `honua dev` runs the whole system on one machine;
//! `honua scheduler` and `honua worker` run one role each.

use clap::{Parser, Subcommand};
use honua_scheduler::dev::{self, DevOptions};
use honua_shared::config::Config;
use honua_worker::telemetry::{self, LogFormat};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Honua Process Framework")]
struct Cli {
    /// Config file (TOML); also HONUA_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything on one machine: private Redis (unless HONUA_REDIS_URL is set), scheduler,
    /// gateway on :9090 and in-process workers; submits the example processes.
    Dev {
        /// In-process workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Where the private Redis keeps its AOF.
        #[arg(long, default_value = ".honua-dev")]
        data_dir: PathBuf,
        /// Don't submit the example processes.
        #[arg(long)]
        no_examples: bool,
        /// Leave approval steps waiting for your signal.
        #[arg(long)]
        no_auto_approve: bool,
    },
    /// The scheduler loops and the HTTP gateway (as honua-scheduler).
    Scheduler,
    /// A worker with the built-in step kinds (as honua-worker).
    Worker,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    honua_worker::install_crypto_provider();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let redis_from_env = env
        .iter()
        .find(|(k, _)| k == "HONUA_REDIS_URL")
        .map(|(_, v)| v.clone());
    let cfg = Config::load(cli.config.as_deref(), env)?;
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        telemetry::shutdown_signal().await;
        s.cancel();
    });
    match cli.cmd {
        Cmd::Dev {
            workers,
            data_dir,
            no_examples,
            no_auto_approve,
        } => {
            telemetry::init(LogFormat::Human);
            let opts = DevOptions {
                workers,
                data_dir,
                submit_examples: !no_examples,
                auto_approve: !no_auto_approve,
                redis_url: redis_from_env,
            };
            dev::run(cfg, opts, shutdown).await
        }
        Cmd::Scheduler => {
            telemetry::init(LogFormat::Json);
            honua_scheduler::run_scheduler(cfg, None, shutdown).await
        }
        Cmd::Worker => {
            telemetry::init(LogFormat::Json);
            let handlers = honua_worker::builtin_handlers(&cfg);
            honua_worker::run_main(cfg, handlers, shutdown).await
        }
    }
}
