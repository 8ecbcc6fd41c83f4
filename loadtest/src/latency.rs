//! Latency at a fixed arrival rate: three-step `noop` processes submitted open-loop (each
//! at its scheduled time, whether or not earlier ones have finished) to 1 scheduler and W
//! workers.
//!
//! - **Dispatch latency** of a step: `queued_ms` → `started_ms` of its step record. Both
//!   are Redis `TIME` (one clock): `queued_ms` is read by the scheduler before it decides
//!   and commits the transition that enqueues the step (so the figure includes that
//!   commit), `started_ms` by `begin.lua` when a worker claims it.
//! - **End to end** of a process: `created_ms` → `ended_ms` of its record (the submission's
//!   `TIME` → the scheduler's `TIME` before the commit that finishes it).
//!
//! The records hold whole milliseconds (Redis `TIME` floored), so each figure is within
//! ±1 ms of the true one; the report says so. The raw floor next to it — `XADD` to
//! `XREADGROUP` delivery of bare entries at the same rate on the same server — is measured
//! in microseconds on the host clock.

use crate::baseline::job_fields;
use crate::error::BenchError;
use crate::meter::Meter;
use crate::progress::Progress;
use crate::server::Server;
use crate::stats::Dist;
use crate::throughput::{
    self, Bench, Fleet, Health, Outcome, PerComponent, STEPS_PER_PROCESS, submission,
};
use honua_scheduler::Processes;
use honua_shared::keys::{Keys, WORKERS_GROUP};
use honua_shared::record::ProcessRecord;
use redis::AsyncCommands;
use redis::streams::{StreamReadOptions, StreamReadReply};
use serde::Serialize;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Records read per round trip.
const READ_BATCH: usize = 200;
/// Finished records must outlive the run until they are read.
const RETENTION_SECS: u64 = 900;

#[derive(Debug, Clone, Copy)]
pub struct LatencyParams {
    pub label: &'static str,
    pub processes_per_sec: f64,
    pub seconds: f64,
    pub workers: usize,
    /// Also measure the raw `XADD` → `XREADGROUP` floor at the same step rate.
    pub raw: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    pub label: &'static str,
    pub target_processes_per_sec: f64,
    pub target_steps_per_sec: f64,
    pub processes: usize,
    pub schedulers: usize,
    pub workers: usize,
    /// Processes submitted ÷ the arrival window actually taken.
    pub achieved_processes_per_sec: f64,
    /// Step record time stamps are whole milliseconds: figures are ±this.
    pub resolution_ms: f64,
    /// Step enqueued → started (claimed by a worker), every step.
    pub dispatch: Dist,
    /// Process created → finished.
    pub end_to_end: Dist,
    /// Parts of end to end: a step started → ended (claim, handler, commit).
    pub execution: Dist,
    /// Parts of end to end: a step ended → the next step queued or the process finished
    /// (the scheduler reading the completion event and committing the transition).
    pub handoff: Dist,
    /// Bare entries, `XADD` → delivered by `XREADGROUP`, at the same step rate (µs-precise).
    pub raw_delivery: Option<Dist>,
    pub redis_cpu_us_per_step: f64,
    pub redis_busy: f64,
    /// Where Redis spent its command time, per step, costliest first.
    pub redis_commands: Vec<crate::server::CommandCost>,
    pub busy: Option<PerComponent>,
    pub host_other_busy: Option<f64>,
    pub outcome: Outcome,
    pub health: Health,
}

pub async fn run(
    server: &Server,
    prefix: &str,
    params: LatencyParams,
) -> Result<LatencyResult, BenchError> {
    let processes = ((params.processes_per_sec * params.seconds).round() as usize).max(1);
    let raw_delivery = if params.raw {
        let rate = params.processes_per_sec * STEPS_PER_PROCESS as f64;
        let jobs = ((rate * params.seconds.min(5.0)).round() as usize).max(10);
        eprintln!(
            "raw delivery latency: {jobs} entries at {rate:.0}/s ({})",
            params.label
        );
        Some(raw_delivery(server, prefix, rate, jobs).await?)
    } else {
        None
    };
    eprintln!(
        "latency {}: {processes} processes at {}/s, 1 scheduler, {} workers ...",
        params.label, params.processes_per_sec, params.workers
    );
    let bench = Bench::prepare(server, prefix, "noop", |cfg| {
        cfg.retention_secs = RETENTION_SECS;
    })?;
    let shutdown = CancellationToken::new();
    let fleet = match Fleet::start(&bench, 1, params.workers, &shutdown).await {
        Ok(f) => f,
        Err(e) => {
            shutdown.cancel();
            return Err(e);
        }
    };
    let measured = measure(server, &bench, params, processes).await;
    shutdown.cancel();
    let (stats, stopped) = fleet.stop().await;
    let total = processes + throughput::warm_up_processes(params.workers);
    let health = throughput::health(&bench.store, stats, total * STEPS_PER_PROCESS).await;
    bench.cleanup(server).await;
    let mut result = measured?;
    stopped?;
    result.health = health?;
    result.raw_delivery = raw_delivery;
    Ok(result)
}

async fn measure(
    server: &Server,
    bench: &Bench,
    params: LatencyParams,
    processes: usize,
) -> Result<LatencyResult, BenchError> {
    let store = &bench.store;
    let engine = bench.engine().await;
    let mut admin = server.connect(Duration::from_secs(5)).await?;
    throughput::warm_up(&engine, throughput::warm_up_processes(params.workers)).await?;
    let before = throughput::outcome(store).await?;
    let meter = Meter::start(&mut admin).await?;
    let period = Duration::from_secs_f64(1.0 / params.processes_per_sec);
    let arriving = tokio::spawn(arrive(engine, processes, period));
    let timeout = Duration::from_secs_f64(params.seconds) + Duration::from_secs(120);
    let mut progress = Progress::new(
        format!("latency {}", params.label),
        processes as u64,
        "processes",
    );
    let (done, (window, ids)) = throughput::wait_finished(
        store,
        before,
        processes as u64,
        arriving,
        timeout,
        &mut progress,
    )
    .await?;
    let used = meter.stop(&mut admin, Instant::now()).await?;
    let steps = (processes * STEPS_PER_PROCESS) as f64;
    let lat = read_latencies(bench, &ids).await?;
    Ok(LatencyResult {
        label: params.label,
        target_processes_per_sec: params.processes_per_sec,
        target_steps_per_sec: params.processes_per_sec * STEPS_PER_PROCESS as f64,
        processes,
        schedulers: 1,
        workers: params.workers,
        achieved_processes_per_sec: processes as f64 / window.as_secs_f64().max(1e-9),
        resolution_ms: 1.0,
        dispatch: lat.dispatch,
        end_to_end: lat.end_to_end,
        execution: lat.execution,
        handoff: lat.handoff,
        raw_delivery: None,
        redis_cpu_us_per_step: used.redis_cpu_secs * 1e6 / steps,
        redis_busy: used.redis_cpu_secs / used.seconds,
        redis_commands: used.top_commands(processes * STEPS_PER_PROCESS, 8),
        busy: used
            .cpu
            .map(|c| PerComponent::scaled(c, 1.0 / used.seconds)),
        host_other_busy: used.host_other_busy,
        outcome: done,
        health: Health::default(),
    })
}

/// Submits `n` processes, the i-th at `i × period` after the start, each from its own task
/// (open loop). Returns the arrival window (first to last submission acknowledged) and
/// the ids.
async fn arrive(
    engine: Processes,
    n: usize,
    period: Duration,
) -> Result<(Duration, Vec<String>), BenchError> {
    let start = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let engine = engine.clone();
        set.spawn(async move {
            let id = engine.create(&submission(), None).await?;
            Ok::<String, BenchError>(id.id().to_string())
        });
    }
    let mut ids = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        ids.push(joined.map_err(|_| BenchError::Component("a submission panicked".into()))??);
    }
    Ok((start.elapsed(), ids))
}

/// What the records say about where the time goes.
pub(crate) struct Latencies {
    dispatch: Dist,
    end_to_end: Dist,
    execution: Dist,
    handoff: Dist,
}

/// Dispatch latency of every step, end-to-end latency of every process, and the parts of
/// the latter: execution (started → ended) and hand-off (a step ended → the next one
/// queued, or the process finished: the scheduler's reaction), from the records.
pub(crate) async fn read_latencies(bench: &Bench, ids: &[String]) -> Result<Latencies, BenchError> {
    let mut dispatch = Vec::with_capacity(ids.len() * STEPS_PER_PROCESS);
    let mut execution = Vec::with_capacity(ids.len() * STEPS_PER_PROCESS);
    let mut handoff = Vec::with_capacity(ids.len() * STEPS_PER_PROCESS);
    let mut e2e = Vec::with_capacity(ids.len());
    for rec in read_records(bench, ids).await? {
        if let Some(end) = rec.ended_ms {
            e2e.push(end.saturating_sub(rec.created_ms) as f64);
        }
        let mut steps: Vec<_> = rec.steps.values().collect();
        steps.sort_by_key(|s| s.queued_ms);
        for (i, step) in steps.iter().enumerate() {
            if let (Some(q), Some(s)) = (step.queued_ms, step.started_ms) {
                dispatch.push(s.saturating_sub(q) as f64);
            }
            if let (Some(s), Some(e)) = (step.started_ms, step.ended_ms) {
                execution.push(e.saturating_sub(s) as f64);
            }
            let next = match steps.get(i + 1) {
                Some(n) => n.queued_ms,
                None => rec.ended_ms,
            };
            if let (Some(e), Some(n)) = (step.ended_ms, next) {
                handoff.push(n.saturating_sub(e) as f64);
            }
        }
    }
    Ok(Latencies {
        dispatch: Dist::of(dispatch),
        end_to_end: Dist::of(e2e),
        execution: Dist::of(execution),
        handoff: Dist::of(handoff),
    })
}

/// The records of `ids` (those that still exist), a batch per round trip.
pub(crate) async fn read_records(
    bench: &Bench,
    ids: &[String],
) -> Result<Vec<ProcessRecord>, BenchError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(READ_BATCH) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (_, raw) = bench.store.load_processes(&refs).await?;
        for (id, (meta, steps)) in chunk.iter().zip(raw) {
            match ProcessRecord::parse(id, &meta, &steps) {
                Ok(Some(rec)) => out.push(rec),
                Ok(None) => {}
                Err(e) => {
                    return Err(BenchError::Component(format!(
                        "process {id} record is unreadable: {e}"
                    )));
                }
            }
        }
    }
    Ok(out)
}

#[expect(
    clippy::disallowed_methods,
    reason = "send and receive times are taken on this one machine"
)]
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The raw floor: one producer `XADD`s `jobs` entries (a job envelope plus its send time)
/// at `rate` a second; one consumer `XREADGROUP COUNT 100 BLOCK` + `XACK`s them and records
/// delivery time − send time.
async fn raw_delivery(
    server: &Server,
    prefix: &str,
    rate: f64,
    jobs: usize,
) -> Result<Dist, BenchError> {
    let stream = Keys::new(&format!("{prefix}-rawlat"), 0).jobs();
    let mut admin = server.connect(Duration::from_secs(5)).await?;
    let () = admin.del(&stream).await?;
    let () = admin
        .xgroup_create_mkstream(&stream, WORKERS_GROUP, "0")
        .await?;
    let mut producer = server.connect(Duration::from_secs(5)).await?;
    let mut consumer = server.connect(Duration::from_secs(5)).await?;
    let fields = job_fields();
    let consume = {
        let stream = stream.clone();
        tokio::spawn(async move {
            let opts = StreamReadOptions::default()
                .group(WORKERS_GROUP, "rawlat")
                .count(100)
                .block(100);
            let mut lat = Vec::with_capacity(jobs);
            let deadline = Instant::now()
                + Duration::from_secs(60)
                + Duration::from_secs_f64(jobs as f64 / rate);
            while lat.len() < jobs && Instant::now() < deadline {
                let reply: Option<StreamReadReply> =
                    consumer.xread_options(&[&stream], &[">"], &opts).await?;
                let now = now_us();
                let mut ids = Vec::new();
                for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                    if let Some(sent) = entry.get::<u64>("sent_us") {
                        lat.push(now.saturating_sub(sent) as f64 / 1000.0);
                    }
                    ids.push(entry.id);
                }
                if !ids.is_empty() {
                    #[expect(
                        clippy::disallowed_methods,
                        reason = "the raw Redis baseline: plain XREADGROUP/XACK is what it measures"
                    )]
                    let _: usize = consumer.xack(&stream, WORKERS_GROUP, &ids).await?;
                }
            }
            Ok::<_, BenchError>(lat)
        })
    };
    let start = tokio::time::Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate);
    for i in 0..jobs {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let mut f = fields.clone();
        f.push(("sent_us".into(), now_us().to_string()));
        let _: String = producer.xadd(&stream, "*", &f).await?;
    }
    let lat = consume
        .await
        .map_err(|_| BenchError::Component("the raw consumer panicked".into()))??;
    let () = admin.del(&stream).await?;
    Ok(Dist::of(lat))
}
