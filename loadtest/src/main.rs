//! `honua-loadtest`: how fast the engine runs steps, next to the raw Redis Streams limit
//! measured on the same server in the same run.
//!
//! ```text
//! honua-loadtest throughput [--processes N] [--workers W] [--schedulers S] [--no-baseline]
//! honua-loadtest baseline   [--jobs N] [--consumers C]
//! honua-loadtest latency    [--seconds S] [--workers W] [--no-baseline]
//! honua-loadtest crash      [--seconds S] [--rate R] [--step-ms D] [--kills K] [--workers W] [--lease-ms L --sweep-ms S]
//!                           [--nemesis kill,stop,redis] [--fault-ms F]
//! honua-loadtest scale      [--processes N] [--workers-list 1,2,4]
//! honua-loadtest scale      --partitions 1,2,4,8 [--processes N] [--workers W]   (a local Redis Cluster)
//! honua-loadtest llm        [--seconds S] [--rpm N] [--burst N] [--latency-ms L] [--workers W] [--in-flight N]
//! honua-loadtest console    [--processes N] [--renders R]
//! honua-loadtest all        (every scenario above but console, one report)
//!   common: [--quick] [--json FILE] [--redis-url URL]
//! ```
//!
//! Without `--redis-url` a private redis-server (AOF on, `appendfsync everysec`) is started
//! in a temporary directory and stopped at the end. Build in release for real numbers:
//! `cargo run --release -p honua-loadtest -- all --json bench.json`.

mod baseline;
mod child;
mod cluster_scale;
mod component;
mod console;
mod cputime;
mod crash;
mod error;
mod latency;
mod llm;
mod meter;
mod progress;
mod report;
mod server;
mod stats;
mod throughput;

use anyhow::Context;
use baseline::BaselineParams;
use clap::{Args, Parser, Subcommand};
use crash::CrashParams;
use latency::LatencyParams;
use report::{AT_50_PROCESSES, AT_1000_STEPS, CRASH_2S, CRASH_DEFAULT, Report, ScalePoint};
use server::Server;
use std::path::PathBuf;
use std::time::Duration;
use throughput::{EngineParams, Shape};

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
    /// Dispatch and end-to-end latency at fixed arrival rates (1,000 steps/s; 50 processes/s)
    Latency(LatencyArgs),
    /// kill -9 random worker processes during a run (default lease, then a 2 s lease)
    Crash(CrashArgs),
    /// Throughput with 1, 2 and 4 workers, each next to the raw cycle with as many consumers;
    /// with --partitions, on a local Redis Cluster by partition count
    Scale(ScaleArgs),
    /// LLM-bound: llm steps against the mock provider under a fleet-wide limit; worker RSS
    Llm(LlmArgs),
    /// The web console's list, detail and overview pages with many processes in Redis
    Console(ConsoleArgs),
    /// Every scenario (baseline + throughput, scale, latency, crash, llm) in one report
    All(AllArgs),
    /// A worker in a child process (used by the crash scenario)
    #[command(hide = true)]
    WorkerChild(child::ChildArgs),
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
struct ConsoleArgs {
    #[command(flatten)]
    common: Common,
    /// Processes to seed, half of them finished [default: 100000, 2000 with --quick]
    #[arg(long, value_name = "N")]
    processes: Option<usize>,
    /// Timed renders of each page [default: 200, 20 with --quick]
    #[arg(long, value_name = "R")]
    renders: Option<usize>,
    /// Concurrent seeding tasks
    #[arg(long, value_name = "N", default_value_t = 32)]
    seeders: usize,
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
    /// The process type's graph: `line` (A → B → C) or `dag` (A → {B, C} → D, a join)
    #[arg(long, value_enum, default_value_t = Shape::Line)]
    shape: Shape,
    /// Bytes of output each step writes (its process's state grows by that much per step)
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    output_bytes: usize,
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

#[derive(Debug, Args)]
struct LatencyArgs {
    #[command(flatten)]
    common: Common,
    /// Arrival window of each run [default: 10 (1,000 steps/s) and 20 (50 processes/s); 1 with --quick]
    #[arg(long, value_name = "SECS")]
    seconds: Option<f64>,
    /// In-process workers
    #[arg(long, value_name = "W", default_value_t = 2)]
    workers: usize,
    /// Skip the raw XADD → XREADGROUP delivery latency
    #[arg(long)]
    no_baseline: bool,
}

#[derive(Debug, Args)]
struct CrashArgs {
    #[command(flatten)]
    common: Common,
    /// Arrival window [default: 20 with the default lease, 10 with a 2 s lease; 4 with --quick]
    #[arg(long, value_name = "SECS")]
    seconds: Option<f64>,
    /// Processes submitted per second
    #[arg(long, value_name = "R", default_value_t = 300.0)]
    rate: f64,
    /// Faults injected during each run: workers killed (and replaced), paused, or Redis
    /// restarts [default: 3; 1 with --quick]
    #[arg(long, value_name = "K")]
    kills: Option<usize>,
    /// The faults: `kill` (kill -9 a worker), `stop` (SIGSTOP a worker for --fault-ms),
    /// `redis` (kill -9 redis-server, restart after --fault-ms); a list runs each in turn
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "kill"
    )]
    nemesis: Vec<crash::Nemesis>,
    /// How long a pause or a Redis outage lasts [default: 2 × lease]
    #[arg(long, value_name = "MS")]
    fault_ms: Option<u64>,
    /// Worker processes
    #[arg(long, value_name = "W", default_value_t = 2)]
    workers: usize,
    /// How long each step takes (so that a kill finds steps running)
    #[arg(long, value_name = "MS", default_value_t = 50)]
    step_ms: u64,
    /// One run with this lease instead of the default and 2 s runs
    #[arg(long, value_name = "MS", requires = "sweep_ms")]
    lease_ms: Option<u64>,
    /// Sweep interval of that run
    #[arg(long, value_name = "MS", requires = "lease_ms")]
    sweep_ms: Option<u64>,
}

#[derive(Debug, Args)]
struct ScaleArgs {
    #[command(flatten)]
    common: Common,
    /// Processes per point [default: 3000, 100 with --quick]
    #[arg(long, value_name = "N")]
    processes: Option<usize>,
    /// Worker counts [default: 1,2,4; 1,2 with --quick]
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    workers_list: Vec<usize>,
    /// Partition counts: run on a local Redis Cluster (six nodes the run starts) instead,
    /// one point per count, with Redis CPU per primary and the raw cycle on each primary
    #[arg(long, value_name = "LIST", value_delimiter = ',', conflicts_with_all = ["workers_list", "redis_url"])]
    partitions: Vec<u16>,
    /// Workers of every cluster point
    #[arg(long, value_name = "W", default_value_t = 2)]
    workers: usize,
    /// Cluster points: leave each partition where its hash tag's slot falls, instead of
    /// moving the slots so that the primaries take turns (partition i on primary i mod 3)
    #[arg(long, requires = "partitions")]
    no_spread: bool,
}

#[derive(Debug, Args)]
struct LlmArgs {
    #[command(flatten)]
    common: Common,
    /// Arrival window [default: 20, 3 with --quick]
    #[arg(long, value_name = "SECS")]
    seconds: Option<f64>,
    /// The fleet-wide limit, requests per minute (tokens: 200 per request)
    #[arg(long, value_name = "N", default_value_t = 6000)]
    rpm: u32,
    /// Burst above the steady rate, requests (tokens: 200 per request)
    #[arg(long, value_name = "N", default_value_t = 20)]
    burst: u32,
    /// Provider latency of each call
    #[arg(long, value_name = "MS", default_value_t = 200)]
    latency_ms: u64,
    /// Worker processes
    #[arg(long, value_name = "W", default_value_t = 2)]
    workers: usize,
    /// LLM steps in flight in one worker for the memory figure (0: skip) [default: 1000, 100 with --quick]
    #[arg(long, value_name = "N")]
    in_flight: Option<usize>,
    /// Provider latency while they are in flight [default: 10000, 3000 with --quick]
    #[arg(long, value_name = "MS")]
    in_flight_latency_ms: Option<u64>,
}

#[derive(Debug, Args)]
struct AllArgs {
    #[command(flatten)]
    common: Common,
}

/// Sweep interval of the 2 s-lease crash run.
const SHORT_SWEEP_MS: u64 = 500;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    let runtime =
        honua_runtime::build_runtime("lt-main", 0).context("cannot start the tokio runtime")?;
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
        Command::Latency(a) => &a.common,
        Command::Crash(a) => &a.common,
        Command::Scale(a) if !a.partitions.is_empty() => return cluster_scale_run(a).await,
        Command::Scale(a) => &a.common,
        Command::Llm(a) => &a.common,
        Command::Console(a) => &a.common,
        Command::All(a) => &a.common,
        Command::WorkerChild(a) => return child::run(a.clone()).await,
    };
    let server = Server::start(common.redis_url.as_deref()).await?;
    // Boxed: the scenarios' configs make it a large future.
    let report = Box::pin(run_on(&server, &command)).await;
    server.stop().await;
    let mut report = report?;
    report.finish();
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
            let mut report = Report::new("throughput", a.common.quick, info);
            throughput_into(
                &mut report,
                server,
                &prefix,
                engine_params(a),
                !a.no_baseline,
            )
            .await?;
            Ok(report)
        }
        Command::Latency(a) => {
            let mut report = Report::new("latency", a.common.quick, info);
            let runs = latency_runs(a.common.quick, a.seconds, a.workers, !a.no_baseline);
            latency_into(&mut report, server, &prefix, &runs).await?;
            Ok(report)
        }
        Command::Crash(a) => {
            let mut report = Report::new("crash", a.common.quick, info);
            crash_into(&mut report, server, &prefix, &crash_runs(a)).await?;
            Ok(report)
        }
        Command::Scale(a) => {
            let mut report = Report::new("scale", a.common.quick, info);
            let processes = a
                .processes
                .unwrap_or(if a.common.quick { 100 } else { 3000 });
            let workers = scale_workers(a.common.quick, &a.workers_list);
            scale_into(&mut report, server, &prefix, processes, &workers).await?;
            Ok(report)
        }
        Command::All(a) => {
            let quick = a.common.quick;
            let mut report = Report::new("all", quick, info);
            let tp = ThroughputArgs {
                common: Common {
                    quick,
                    json: None,
                    redis_url: None,
                },
                // Long enough (30,000 steps, and as many raw jobs) that start-up and the
                // raw run's first batches do not weigh on the rates.
                processes: Some(if quick { 100 } else { 10_000 }),
                schedulers: 1,
                workers: 2,
                max_concurrent_steps: 64,
                submitters: 32,
                timeout_secs: 600,
                no_baseline: false,
                shape: Shape::Line,
                output_bytes: 0,
            };
            throughput_into(&mut report, server, &prefix, engine_params(&tp), true).await?;
            let processes = if quick { 100 } else { 3000 };
            // The fan-out/join shape next to the line, so the slow path stays measured.
            let dag_processes = if quick { 100 } else { 10_000 };
            let dag = point(
                server,
                &format!("{prefix}-dag"),
                dag_processes,
                2,
                Shape::Dag,
            )
            .await?;
            report.dag = Some(dag);
            scale_into(
                &mut report,
                server,
                &prefix,
                processes,
                &scale_workers(quick, &[]),
            )
            .await?;
            latency_into(
                &mut report,
                server,
                &prefix,
                &latency_runs(quick, None, 2, true),
            )
            .await?;
            let crash = CrashArgs {
                common: tp.common,
                seconds: None,
                rate: 300.0,
                kills: None,
                nemesis: vec![crash::Nemesis::Kill],
                fault_ms: None,
                workers: 2,
                step_ms: 50,
                lease_ms: None,
                sweep_ms: None,
            };
            crash_into(&mut report, server, &prefix, &crash_runs(&crash)).await?;
            let llm = LlmArgs {
                common: crash.common,
                seconds: None,
                rpm: 6000,
                burst: 20,
                latency_ms: 200,
                workers: 2,
                in_flight: None,
                in_flight_latency_ms: None,
            };
            report.llm = Some(
                llm::run(server, &prefix, llm_params(&llm))
                    .await
                    .context("the llm run failed")?,
            );
            Ok(report)
        }
        Command::Llm(a) => {
            let mut report = Report::new("llm", a.common.quick, info);
            report.llm = Some(
                llm::run(server, &prefix, llm_params(a))
                    .await
                    .context("the llm run failed")?,
            );
            Ok(report)
        }
        Command::Console(a) => {
            let quick = a.common.quick;
            let mut report = Report::new("console", quick, info);
            let params = console::ConsoleParams {
                processes: a
                    .processes
                    .unwrap_or(if quick { 2_000 } else { 100_000 })
                    .max(2),
                renders: a.renders.unwrap_or(if quick { 20 } else { 200 }).max(1),
                seeders: a.seeders.max(1),
            };
            report.console = Some(
                console::run(server, &prefix, params)
                    .await
                    .context("the console run failed")?,
            );
            Ok(report)
        }
        Command::WorkerChild(_) => unreachable!("handled before a server is started"),
    }
}

async fn throughput_into(
    report: &mut Report,
    server: &Server,
    prefix: &str,
    params: EngineParams,
    with_baseline: bool,
) -> anyhow::Result<()> {
    let baseline = if with_baseline {
        // As many raw jobs as the engine runs steps, as many consumers as workers.
        let jobs = params.processes * params.shape.steps();
        Some(raw(server, prefix, raw_params(jobs, params.workers)).await?)
    } else {
        None
    };
    eprintln!(
        "engine: {} processes ({:?} shape), {} scheduler(s), {} workers ...",
        params.processes, params.shape, params.schedulers, params.workers
    );
    let engine = throughput::run(server, &format!("{prefix}-tp"), params)
        .await
        .context("the engine throughput run failed")?;
    report.set_results(baseline, Some(engine));
    Ok(())
}

fn llm_params(a: &LlmArgs) -> llm::LlmParams {
    let quick = a.common.quick;
    llm::LlmParams {
        seconds: a.seconds.unwrap_or(if quick { 3.0 } else { 20.0 }),
        workers: a.workers.max(1),
        spec_rpm: a.rpm.max(1),
        spec_tpm: u64::from(a.rpm.max(1)) * 200,
        burst_requests: a.burst,
        burst_tokens: u64::from(a.burst.max(1)) * 200,
        provider_latency: Duration::from_millis(a.latency_ms),
        offered: 1.5,
        in_flight: a.in_flight.unwrap_or(if quick { 100 } else { 1000 }),
        in_flight_latency: Duration::from_millis(a.in_flight_latency_ms.unwrap_or(if quick {
            3000
        } else {
            10_000
        })),
    }
}

fn scale_workers(quick: bool, list: &[usize]) -> Vec<usize> {
    if !list.is_empty() {
        list.to_vec()
    } else if quick {
        vec![1, 2]
    } else {
        vec![1, 2, 4]
    }
}

async fn scale_into(
    report: &mut Report,
    server: &Server,
    prefix: &str,
    processes: usize,
    workers: &[usize],
) -> anyhow::Result<()> {
    for &w in workers {
        let p = point(
            server,
            &format!("{prefix}-scale{w}"),
            processes,
            w,
            Shape::Line,
        )
        .await?;
        report.scale.push(p);
    }
    Ok(())
}

/// One engine run of `shape` with 1 scheduler and `workers` workers, after a raw run
/// with as many consumers and as many jobs as the engine runs steps.
async fn point(
    server: &Server,
    prefix: &str,
    processes: usize,
    workers: usize,
    shape: Shape,
) -> anyhow::Result<ScalePoint> {
    let w = workers.max(1);
    let raw = raw(server, prefix, raw_params(processes * shape.steps(), w)).await?;
    eprintln!("{shape:?} shape: {processes} processes, 1 scheduler, {w} workers ...");
    let params = EngineParams {
        processes,
        schedulers: 1,
        workers: w,
        max_concurrent_steps: 64,
        submitters: 32,
        timeout: Duration::from_secs(600),
        shape,
        output_bytes: 0,
    };
    let engine = throughput::run(server, prefix, params)
        .await
        .with_context(|| format!("the {shape:?} run with {w} workers failed"))?;
    Ok(ScalePoint {
        workers: w,
        ratio_to_raw: engine.steps_per_sec / raw.jobs_per_sec,
        raw,
        engine,
    })
}

fn latency_runs(
    quick: bool,
    seconds: Option<f64>,
    workers: usize,
    raw: bool,
) -> Vec<LatencyParams> {
    let secs = |full: f64| seconds.unwrap_or(if quick { 1.0 } else { full });
    vec![
        LatencyParams {
            label: AT_1000_STEPS,
            processes_per_sec: 1000.0 / throughput::STEPS_PER_PROCESS as f64,
            seconds: secs(10.0),
            workers: workers.max(1),
            raw,
        },
        LatencyParams {
            label: AT_50_PROCESSES,
            processes_per_sec: 50.0,
            seconds: secs(20.0),
            workers: workers.max(1),
            raw,
        },
    ]
}

async fn latency_into(
    report: &mut Report,
    server: &Server,
    prefix: &str,
    runs: &[LatencyParams],
) -> anyhow::Result<()> {
    for (i, p) in runs.iter().enumerate() {
        let r = latency::run(server, &format!("{prefix}-lat{i}"), *p)
            .await
            .with_context(|| format!("the latency run at {} failed", p.label))?;
        report.latency.push(r);
    }
    Ok(())
}

fn crash_runs(a: &CrashArgs) -> Vec<CrashParams> {
    let quick = a.common.quick;
    let kills = a.kills.unwrap_or(if quick { 1 } else { 3 });
    let run = |label, lease_ms, sweep_ms, full: f64, nemesis| CrashParams {
        label,
        lease_ms,
        sweep_ms,
        workers: a.workers.max(2),
        kills,
        processes_per_sec: a.rate,
        step_ms: a.step_ms,
        seconds: a.seconds.unwrap_or(if quick { 4.0 } else { full }),
        nemesis,
        fault_ms: a.fault_ms,
    };
    let mut runs = Vec::new();
    for &n in &a.nemesis {
        match (a.lease_ms, a.sweep_ms) {
            (Some(l), Some(s)) => runs.push(run("custom lease", Some(l), Some(s), 10.0, n)),
            _ if quick => runs.push(run(CRASH_2S, Some(2000), Some(SHORT_SWEEP_MS), 10.0, n)),
            _ => {
                runs.push(run(CRASH_DEFAULT, None, None, 20.0, n));
                runs.push(run(CRASH_2S, Some(2000), Some(SHORT_SWEEP_MS), 10.0, n));
            }
        }
    }
    runs
}

async fn crash_into(
    report: &mut Report,
    server: &Server,
    prefix: &str,
    runs: &[CrashParams],
) -> anyhow::Result<()> {
    for (i, p) in runs.iter().enumerate() {
        let r = crash::run(server, &format!("{prefix}-crash{i}"), *p)
            .await
            .with_context(|| format!("the crash run ({}) failed", p.label))?;
        report.crash.push(r);
    }
    Ok(())
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
        shape: a.shape,
        output_bytes: a.output_bytes,
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

/// `scale --partitions`: the points on a local Redis Cluster, printed and written as JSON.
async fn cluster_scale_run(a: &ScaleArgs) -> anyhow::Result<()> {
    let params = cluster_scale::ClusterScaleParams {
        partitions: a.partitions.clone(),
        processes: a
            .processes
            .unwrap_or(if a.common.quick { 100 } else { 3000 }),
        workers: a.workers.max(1),
        timeout: Duration::from_secs(600),
        spread: !a.no_spread,
    };
    let report = cluster_scale::run(params).await?;
    print!("{}", report.summary());
    if let Some(path) = &a.common.json {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the results")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let problems: Vec<String> = report
        .points
        .iter()
        .flat_map(|p| {
            p.anomalies
                .iter()
                .map(move |a| format!("P={}: {a}", p.partitions))
        })
        .collect();
    if !problems.is_empty() {
        anyhow::bail!("the engine run had problems: {}", problems.join("; "));
    }
    Ok(())
}
