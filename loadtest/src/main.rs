//! `honua-loadtest`: how fast the engine runs steps, next to the raw Redis Streams limit
//! measured on the same server in the same run.
//!
//! ```text
//! honua-loadtest throughput [--processes N] [--workers W] [--schedulers S] [--quick] [--json FILE] [--redis-url URL] [--no-baseline]
//! honua-loadtest baseline [--jobs N] [--consumers C] [--quick] [--json FILE] [--redis-url URL]
//! ```
//!
//! Without `--redis-url` a private redis-server (AOF on, `appendfsync everysec`) is started
//! in a temporary directory and stopped at the end. Build in release for real numbers:
//! `cargo run --release -p honua-loadtest -- throughput`.

mod baseline;
mod component;
mod cputime;
mod error;
mod meter;
mod report;
mod server;
mod throughput;

use anyhow::Context;
use baseline::BaselineParams;
use clap::{Args, Parser, Subcommand};
use report::Report;
use server::Server;
use std::path::PathBuf;
use std::time::Duration;
use throughput::EngineParams;

/// Raw baseline: producers, each pipelining `XADD`s by `RAW_BATCH`.
const RAW_PRODUCERS: usize = 2;
/// Raw baseline: `XADD` pipeline length and `XREADGROUP COUNT`.
const RAW_BATCH: usize = 100;

#[derive(Debug, Parser)]
#[command(name = "honua-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Engine throughput (3-step noop processes), after the raw baseline unless --no-baseline
    Throughput(ThroughputArgs),
    /// The raw Redis Streams job cycle alone (XADD, XREADGROUP, XACK)
    Baseline(BaselineArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// A small run for CI smoke tests (100 processes, 300 raw jobs); explicit sizes win
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to FILE
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Use this server instead of a private redis-server (keys get a unique prefix)
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
}

#[derive(Debug, Args)]
struct ThroughputArgs {
    #[command(flatten)]
    common: Common,
    /// Processes to run [default: 1000, 100 with --quick]
    #[arg(long, value_name = "N")]
    processes: Option<usize>,
    /// In-process schedulers (the engine allows any number)
    #[arg(long, value_name = "S", default_value_t = 1)]
    schedulers: usize,
    /// In-process workers (the raw baseline uses as many consumers)
    #[arg(long, value_name = "W", default_value_t = 2)]
    workers: usize,
    /// worker.max_concurrent_steps of every worker
    #[arg(long, value_name = "N", default_value_t = 64)]
    max_concurrent_steps: usize,
    /// Concurrent submitting tasks
    #[arg(long, value_name = "N", default_value_t = 32)]
    submitters: usize,
    /// Fail when the processes have not all finished after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    timeout_secs: u64,
    /// Skip the raw baseline
    #[arg(long)]
    no_baseline: bool,
}

#[derive(Debug, Args)]
struct BaselineArgs {
    #[command(flatten)]
    common: Common,
    /// Jobs to cycle [default: 3000, 300 with --quick]
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Consumers (each XREADGROUP COUNT 100 + one XACK)
    #[arg(long, value_name = "C", default_value_t = 2)]
    consumers: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("lt-main")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(run(cli.command))
}

/// Engine logs at `warn` and above go to stderr (`RUST_LOG` overrides).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn run(command: Command) -> anyhow::Result<()> {
    let common = match &command {
        Command::Throughput(a) => &a.common,
        Command::Baseline(a) => &a.common,
    };
    let server = Server::start(common.redis_url.as_deref()).await?;
    let report = run_on(&server, &command).await;
    server.stop().await;
    let report = report?;
    print!("{}", report.summary());
    if let Some(path) = &common.json {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the results")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let problems = report.problems();
    if !problems.is_empty() {
        anyhow::bail!("the engine run had problems: {}", problems.join("; "));
    }
    Ok(())
}

async fn run_on(server: &Server, command: &Command) -> anyhow::Result<Report> {
    let prefix = format!("lt-{:08x}", rand::random::<u32>());
    let info = server.info().await.context("cannot read INFO")?;
    if !server.is_private() {
        eprintln!("using {} with key prefix {prefix}", server.url);
    }
    match command {
        Command::Baseline(a) => {
            let jobs = a.jobs.unwrap_or(if a.common.quick { 300 } else { 3000 });
            let baseline = raw(server, &prefix, raw_params(jobs, a.consumers)).await?;
            let mut report = Report::new("baseline", a.common.quick, info);
            report.set_results(Some(baseline), None);
            Ok(report)
        }
        Command::Throughput(a) => {
            let params = engine_params(a);
            let baseline = if a.no_baseline {
                None
            } else {
                // As many raw jobs as the engine runs steps, as many consumers as workers.
                let jobs = params.processes * throughput::STEPS_PER_PROCESS;
                Some(raw(server, &prefix, raw_params(jobs, params.workers)).await?)
            };
            eprintln!(
                "engine: {} processes, {} scheduler(s), {} workers ...",
                params.processes, params.schedulers, params.workers
            );
            let engine = throughput::run(server, &prefix, params)
                .await
                .context("the engine throughput run failed")?;
            let mut report = Report::new("throughput", a.common.quick, info);
            report.set_results(baseline, Some(engine));
            Ok(report)
        }
    }
}

fn engine_params(a: &ThroughputArgs) -> EngineParams {
    EngineParams {
        processes: a
            .processes
            .unwrap_or(if a.common.quick { 100 } else { 1000 }),
        schedulers: a.schedulers.max(1),
        workers: a.workers.max(1),
        max_concurrent_steps: a.max_concurrent_steps,
        submitters: a.submitters.max(1),
        timeout: Duration::from_secs(a.timeout_secs),
    }
}

fn raw_params(jobs: usize, consumers: usize) -> BaselineParams {
    BaselineParams {
        jobs,
        producers: RAW_PRODUCERS,
        consumers: consumers.max(1),
        batch: RAW_BATCH,
    }
}

async fn raw(
    server: &Server,
    prefix: &str,
    params: BaselineParams,
) -> anyhow::Result<baseline::BaselineResult> {
    eprintln!(
        "raw baseline: {} jobs, {} producers, {} consumers ...",
        params.jobs, params.producers, params.consumers
    );
    baseline::run(server, prefix, params)
        .await
        .context("the raw baseline failed")
}
