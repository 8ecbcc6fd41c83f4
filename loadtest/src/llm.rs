//! LLM-bound: one-step processes whose step is `llm`, against the mock provider
//! (`honua-mock-llm`, in this process, over real HTTP) under a fleet-wide limit.
//!
//! Phase 1, the limiter: W worker processes share one bucket (`requests_per_minute`,
//! `tokens_per_minute`, bursts); processes arrive open-loop at `offered` × the limit, so
//! the bucket is the bottleneck. Counted at the provider (the mock's record of every
//! request's arrival): the most requests and tokens in any sliding window of 1 s and 10 s
//! (and 60 s when the run is long enough) against what the bucket allows in that window
//! (burst + rate × window); the limit used (admitted ÷ (rate × the saturated span)). During
//! the run, every 250 ms: jobs pending per worker (`XPENDING`: its in-flight steps) and
//! each worker's RSS (`/proc/<pid>/status`). Idle RSS is read after the warm-up.
//!
//! Phase 2, memory: one worker process, no limit, a provider that takes
//! `in_flight_latency`; `in_flight` processes at once. The worker's peak RSS is read while
//! its pending jobs (`XPENDING`: steps claimed and not finished) reach `in_flight`.

use crate::crash::Children;
use crate::error::BenchError;
use crate::progress::Progress;
use crate::server::Server;
use crate::throughput::{self, Bench, Fleet, Outcome};
use honua_mock_llm::{Completion, Latency, MockConfig, MockLlm, RecordedRequest};
use honua_scheduler::Processes;
use honua_shared::envelope::{Submission, TraceContext};
use honua_shared::keys::WORKERS_GROUP;
use honua_shared::limiter::LimitSpec;
use honua_shared::llm_config::{EndpointConfig, LlmProviderConfig, ProviderKind};
use honua_shared::store::Store;
use redis::AsyncCommands;
use redis::streams::StreamPendingReply;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const PROCESS_TYPE: &str = "BenchLlm";
const MODEL: &str = "mock-gpt";
/// 100 characters: 25 prompt tokens by the mock's estimate (plus the number).
const PROMPT: &str = "Benchmark call {{input.n}}: summarise the state of the deployment in one short paragraph please.";
/// 280 characters = 70 completion tokens.
const COMPLETION_CHARS: usize = 280;
const MAX_TOKENS: u64 = 100;
const SAMPLE: Duration = Duration::from_millis(250);
const RETENTION_SECS: u64 = 900;

#[derive(Debug, Clone, Copy)]
pub struct LlmParams {
    pub seconds: f64,
    pub workers: usize,
    pub spec_rpm: u32,
    pub spec_tpm: u64,
    pub burst_requests: u32,
    pub burst_tokens: u64,
    pub provider_latency: Duration,
    /// Arrival rate ÷ the request limit.
    pub offered: f64,
    /// Phase 2: steps in flight in one worker (0: skip).
    pub in_flight: usize,
    pub in_flight_latency: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowCheck {
    pub window_secs: f64,
    pub max_requests: u64,
    pub allowed_requests: f64,
    pub max_tokens: u64,
    pub allowed_tokens: f64,
    /// Requests beyond what the bucket allows in that window (must be 0).
    pub request_overshoot: u64,
    pub token_overshoot: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerSample {
    pub worker: String,
    pub in_flight_max: u64,
    pub in_flight_mean: f64,
    pub rss_idle_mb: Option<f64>,
    pub rss_peak_mb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LlmResult {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u64,
    pub burst_requests: u32,
    pub burst_tokens: u64,
    pub provider_latency_ms: u64,
    pub workers: usize,
    pub processes: usize,
    pub offered_requests_per_minute: f64,
    pub outcome: Outcome,
    /// Requests the provider saw (all answered 200 unless `statuses` says otherwise).
    pub requests: u64,
    pub statuses: BTreeMap<u16, u64>,
    /// First to last request at the provider.
    pub span_secs: f64,
    pub achieved_requests_per_minute: f64,
    pub achieved_tokens_per_minute: f64,
    /// Achieved ÷ limit over the span (the target is ≥ 0.95 under saturation).
    pub request_limit_used: f64,
    pub windows: Vec<WindowCheck>,
    /// Requests the provider admitted in each second since the first (for plots).
    pub requests_per_second: Vec<u64>,
    pub per_worker: Vec<WorkerSample>,
    /// Phase 2: one worker with this many LLM steps in flight.
    pub in_flight_target: usize,
    pub in_flight_reached: u64,
    pub in_flight_rss_mb: Option<f64>,
    pub in_flight_outcome: Option<Outcome>,
}

impl LlmResult {
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let o = &self.outcome;
        if o.failed + o.cancelled + o.timed_out > 0 {
            out.push(format!("llm: {o}"));
        }
        if let Some(o) = &self.in_flight_outcome
            && o.failed + o.cancelled + o.timed_out > 0
        {
            out.push(format!("llm in-flight phase: {o}"));
        }
        out
    }
}

fn definition() -> String {
    format!(
        r#"name = "{PROCESS_TYPE}"
version = 1
description = "Load test: one llm step"

[[steps]]
name = "Ask"
kind = "llm"
config = {{ model = "{MODEL}", prompt = "{PROMPT}", max_tokens = {MAX_TOKENS}, cache = false }}
"#
    )
}

fn provider(base_url: &str, key: &Path, limit: Option<LimitSpec>) -> LlmProviderConfig {
    let mut llm = LlmProviderConfig {
        provider: ProviderKind::OpenaiCompatible,
        openai_compatible: Some(EndpointConfig {
            base_url: Some(base_url.to_string()),
            api_key_file: Some(key.to_path_buf()),
            ..Default::default()
        }),
        // Steps wait for the bucket rather than yield and come back.
        limiter_max_wait_ms: 600_000,
        ..LlmProviderConfig::default()
    };
    if let Some(l) = limit {
        llm.limits.insert(
            format!("{}/{MODEL}", ProviderKind::OpenaiCompatible.as_str()),
            l,
        );
    }
    llm
}

fn submission(n: usize) -> Submission {
    Submission {
        process_type: PROCESS_TYPE.into(),
        version: None,
        input: serde_json::json!({ "n": n }),
        id: None,
        idempotency_key: None,
        tenant: None,
        trace: TraceContext::default(),
    }
}

/// A provider and the engine set up for it; workers are child processes.
struct Setup {
    mock: MockLlm,
    bench: Bench,
    children: Children,
    fleet: Fleet,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn setup(
    server: &Server,
    prefix: &str,
    latency: Duration,
    limit: Option<LimitSpec>,
    max_concurrent_steps: usize,
) -> Result<Setup, BenchError> {
    let mock = MockLlm::start(MockConfig {
        model: MODEL.into(),
        latency: Latency::Fixed(latency),
        completion: Completion::Fixed("y".repeat(COMPLETION_CHARS)),
        ..MockConfig::default()
    })
    .await
    .map_err(BenchError::setup("cannot start the mock LLM provider"))?;
    let dir = tempfile::Builder::new()
        .prefix("honua-loadtest-llm-")
        .tempdir()
        .map_err(BenchError::io("cannot create a temporary directory"))?;
    let key = dir.path().join("api-key");
    std::fs::write(&key, "sk-loadtest").map_err(BenchError::io("cannot write the key file"))?;
    let llm = provider(&mock.base_url(), &key, limit);
    let llm_json = dir.path().join("llm.json");
    std::fs::write(
        &llm_json,
        serde_json::to_string(&llm).map_err(|e| BenchError::Component(e.to_string()))?,
    )
    .map_err(BenchError::io("cannot write the llm config"))?;
    let bench = Bench::prepare_with(server, prefix, &definition(), |cfg| {
        cfg.retention_secs = RETENTION_SECS;
        cfg.worker.max_concurrent_steps = max_concurrent_steps;
        cfg.llm_provider = Some(llm);
    })?;
    let mut children = Children::new(&bench.cfg, &format!("{prefix}-unused"), 0)?;
    children.llm_config = Some(llm_json);
    let shutdown = CancellationToken::new();
    let fleet = match Fleet::start(&bench, 1, 0, &shutdown).await {
        Ok(f) => f,
        Err(e) => {
            shutdown.cancel();
            return Err(e);
        }
    };
    Ok(Setup {
        mock,
        bench,
        children,
        fleet,
        shutdown,
        _dir: dir,
    })
}

impl Setup {
    async fn stop(mut self, server: &Server) -> Result<(), BenchError> {
        self.children.kill_all().await;
        self.shutdown.cancel();
        let (_, stopped) = self.fleet.stop().await;
        self.bench.cleanup(server).await;
        drop(self.mock);
        stopped
    }
}

pub async fn run(server: &Server, prefix: &str, p: LlmParams) -> Result<LlmResult, BenchError> {
    honua_runtime::install_crypto_provider();
    let spec = LimitSpec {
        requests_per_minute: p.spec_rpm,
        tokens_per_minute: p.spec_tpm,
        burst_requests: p.burst_requests,
        burst_tokens: p.burst_tokens,
        ..LimitSpec::default()
    };
    let rate = f64::from(p.spec_rpm) / 60.0 * p.offered;
    let processes = ((rate * p.seconds).round() as usize).max(1);
    eprintln!(
        "llm: {processes} one-step llm processes at {rate:.0}/s against a limit of {} requests/min, provider latency {:?}, {} worker processes ...",
        p.spec_rpm, p.provider_latency, p.workers
    );
    let mut s = setup(
        server,
        &format!("{prefix}-llm"),
        p.provider_latency,
        Some(spec.clone()),
        4096,
    )
    .await?;
    let measured = limiter_phase(&mut s, p, &spec, processes, rate).await;
    let stopped = s.stop(server).await;
    let mut result = measured?;
    stopped?;
    if p.in_flight > 0 {
        eprintln!(
            "llm memory: {} llm steps in flight in one worker (provider latency {:?}) ...",
            p.in_flight, p.in_flight_latency
        );
        let mut s = setup(
            server,
            &format!("{prefix}-llmrss"),
            p.in_flight_latency,
            None,
            p.in_flight + 64,
        )
        .await?;
        let measured = memory_phase(&mut s, p).await;
        let stopped = s.stop(server).await;
        let (reached, rss, outcome) = measured?;
        stopped?;
        result.in_flight_reached = reached;
        result.in_flight_rss_mb = rss;
        result.in_flight_outcome = Some(outcome);
    }
    Ok(result)
}

async fn limiter_phase(
    s: &mut Setup,
    p: LlmParams,
    spec: &LimitSpec,
    processes: usize,
    rate: f64,
) -> Result<LlmResult, BenchError> {
    let store = s.bench.store.clone();
    for _ in 0..p.workers.max(1) {
        s.children.spawn()?;
    }
    let engine = s.bench.engine().await;
    warm_up(&engine, &store, p.workers.max(1)).await?;
    let live = s.children.live();
    let idle: Vec<Option<f64>> = live.iter().map(|(_, pid)| pid.and_then(rss_mb)).collect();
    s.mock.clear_requests();
    let before = throughput::outcome(&store).await?;
    let arriving = tokio::spawn(arrive(
        engine,
        processes,
        Duration::from_secs_f64(1.0 / rate),
    ));
    let mut samples: Vec<Vec<(u64, Option<f64>)>> = vec![Vec::new(); live.len()];
    let deadline = Instant::now()
        + Duration::from_secs_f64(processes as f64 / (f64::from(spec.requests_per_minute) / 60.0))
        + Duration::from_secs(120);
    let mut progress = Progress::new("llm", processes as u64, "processes");
    let done = loop {
        let pending = pending_by_consumer(&store).await?;
        for (i, (id, pid)) in live.iter().enumerate() {
            samples[i].push((pending.get(id).copied().unwrap_or(0), pid.and_then(rss_mb)));
        }
        let done = throughput::outcome(&store).await?.minus(&before);
        progress.update(done.finished(), "");
        if (arriving.is_finished() && done.finished() >= processes as u64)
            || Instant::now() > deadline
        {
            break done;
        }
        tokio::time::sleep(SAMPLE).await;
    };
    progress.finish();
    arriving
        .await
        .map_err(|_| BenchError::Component("submitting panicked".into()))??;
    let reqs = s.mock.requests();
    let mut statuses = BTreeMap::new();
    for r in &reqs {
        *statuses.entry(r.status).or_insert(0) += 1;
    }
    let admitted: Vec<&RecordedRequest> = reqs.iter().filter(|r| r.admitted()).collect();
    let span = match (admitted.first(), admitted.last()) {
        (Some(a), Some(b)) => b.at.duration_since(a.at).as_secs_f64(),
        _ => 0.0,
    };
    let tokens: u64 = admitted.iter().map(|r| r.total_tokens()).sum();
    let minutes = (span / 60.0).max(1e-9);
    let mut windows = Vec::new();
    for w in [1.0, 10.0, 60.0] {
        if w > span {
            continue;
        }
        let window = Duration::from_secs_f64(w);
        let (max_n, max_t) = window_max(&admitted, window);
        let (allowed_n, allowed_t) = (spec.max_requests_in(window), spec.max_tokens_in(window));
        windows.push(WindowCheck {
            window_secs: w,
            max_requests: max_n,
            allowed_requests: allowed_n,
            max_tokens: max_t,
            allowed_tokens: allowed_t,
            request_overshoot: (max_n as f64 - allowed_n.floor()).max(0.0) as u64,
            token_overshoot: (max_t as f64 - allowed_t.floor()).max(0.0) as u64,
        });
    }
    let per_worker = live
        .iter()
        .zip(&samples)
        .zip(&idle)
        .map(|(((id, _), samples), idle)| WorkerSample {
            worker: id.clone(),
            in_flight_max: samples.iter().map(|s| s.0).max().unwrap_or(0),
            in_flight_mean: samples.iter().map(|s| s.0 as f64).sum::<f64>()
                / samples.len().max(1) as f64,
            rss_idle_mb: *idle,
            rss_peak_mb: samples.iter().filter_map(|s| s.1).reduce(f64::max),
        })
        .collect();
    // The first requests ride the burst: the limit used counts after them.
    let steady = admitted.len().saturating_sub(spec.burst_requests as usize) as f64;
    Ok(LlmResult {
        requests_per_minute: spec.requests_per_minute,
        tokens_per_minute: spec.tokens_per_minute,
        burst_requests: spec.burst_requests,
        burst_tokens: spec.burst_tokens,
        provider_latency_ms: p.provider_latency.as_millis() as u64,
        workers: p.workers,
        processes,
        offered_requests_per_minute: rate * 60.0,
        outcome: done,
        requests: reqs.len() as u64,
        statuses,
        span_secs: span,
        achieved_requests_per_minute: admitted.len() as f64 / minutes,
        achieved_tokens_per_minute: tokens as f64 / minutes,
        request_limit_used: steady / minutes / f64::from(spec.requests_per_minute.max(1)),
        windows,
        requests_per_second: per_second(&admitted),
        per_worker,
        in_flight_target: p.in_flight,
        in_flight_reached: 0,
        in_flight_rss_mb: None,
        in_flight_outcome: None,
    })
}

/// One worker, `p.in_flight` processes at once against a slow provider; the worker's RSS
/// once they are all in flight (the peak seen until then).
async fn memory_phase(
    s: &mut Setup,
    p: LlmParams,
) -> Result<(u64, Option<f64>, Outcome), BenchError> {
    let store = s.bench.store.clone();
    s.children.spawn()?;
    let (worker, pid) = s.children.live().remove(0);
    let engine = s.bench.engine().await;
    let before = throughput::outcome(&store).await?;
    let n = p.in_flight;
    let arriving = tokio::spawn(arrive(engine, n, Duration::ZERO));
    let deadline = Instant::now() + p.in_flight_latency + Duration::from_secs(120);
    let mut progress = Progress::new("llm memory", n as u64, "processes finished");
    let (mut reached, mut rss) = (0u64, None::<f64>);
    let done = loop {
        let open = pending_by_consumer(&store)
            .await?
            .get(&worker)
            .copied()
            .unwrap_or(0);
        if open > reached {
            reached = open;
        }
        if let Some(r) = pid.and_then(rss_mb) {
            rss = Some(rss.map_or(r, |m: f64| m.max(r)));
        }
        let done = throughput::outcome(&store).await?.minus(&before);
        progress.update(done.finished(), &format!("{reached} in flight"));
        if (arriving.is_finished() && done.finished() >= n as u64) || Instant::now() > deadline {
            break done;
        }
        tokio::time::sleep(SAMPLE).await;
    };
    progress.finish();
    arriving
        .await
        .map_err(|_| BenchError::Component("submitting panicked".into()))??;
    Ok((reached, rss, done))
}

async fn warm_up(engine: &Processes, store: &Store, n: usize) -> Result<(), BenchError> {
    let target = throughput::outcome(store).await?.finished() + n as u64;
    for i in 0..n {
        engine.create(&submission(usize::MAX - i), None).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while throughput::outcome(store).await?.finished() < target {
        if Instant::now() > deadline {
            return Err(BenchError::Stuck(
                "llm warm-up processes did not finish within 60 s".into(),
            ));
        }
        tokio::time::sleep(throughput::POLL).await;
    }
    Ok(())
}

/// `n` submissions, the i-th at `i × period` (open loop).
async fn arrive(engine: Processes, n: usize, period: Duration) -> Result<(), BenchError> {
    let start = tokio::time::Instant::now();
    let mut set = JoinSet::new();
    for i in 0..n {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let engine = engine.clone();
        set.spawn(async move { engine.create(&submission(i), None).await.map(|_| ()) });
    }
    while let Some(joined) = set.join_next().await {
        joined.map_err(|_| BenchError::Component("a submission panicked".into()))??;
    }
    Ok(())
}

/// Pending jobs per consumer of the job stream (each worker's in-flight steps).
async fn pending_by_consumer(store: &Store) -> Result<BTreeMap<String, u64>, BenchError> {
    let reply: StreamPendingReply = store
        .conn()
        .xpending(store.keys().jobs(), WORKERS_GROUP)
        .await?;
    Ok(match reply {
        StreamPendingReply::Data(d) => d
            .consumers
            .into_iter()
            .map(|c| (c.name, c.pending as u64))
            .collect(),
        _ => BTreeMap::new(),
    })
}

/// Resident set size of process `pid` in MiB (Linux).
fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Requests in each whole second since the first.
fn per_second(admitted: &[&RecordedRequest]) -> Vec<u64> {
    let Some(first) = admitted.first().map(|r| r.at) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for r in admitted {
        let i = r.at.duration_since(first).as_secs() as usize;
        if out.len() <= i {
            out.resize(i + 1, 0);
        }
        out[i] += 1;
    }
    out
}

/// Most requests and tokens in any window of `w` (requests in arrival order).
fn window_max(admitted: &[&RecordedRequest], w: Duration) -> (u64, u64) {
    let (mut max_n, mut max_t, mut tokens, mut j) = (0u64, 0u64, 0u64, 0usize);
    for i in 0..admitted.len() {
        while j < admitted.len() && admitted[j].at.duration_since(admitted[i].at) < w {
            tokens += admitted[j].total_tokens();
            j += 1;
        }
        max_n = max_n.max((j - i) as u64);
        max_t = max_t.max(tokens);
        tokens -= admitted[i].total_tokens();
    }
    (max_n, max_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_llm_definition_loads_with_the_llm_kind() {
        honua_runtime::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k").unwrap();
        std::fs::write(dir.path().join("b.toml"), definition()).unwrap();
        let cfg = honua_shared::config::Config {
            definitions_dir: dir.path().to_path_buf(),
            llm_provider: Some(provider("http://127.0.0.1:1/v1", &key, None)),
            ..Default::default()
        };
        let (defs, _) = honua_scheduler::load_definitions(&cfg).unwrap();
        assert!(defs.latest(PROCESS_TYPE).is_some());
    }

    #[test]
    fn rss_of_this_process_is_read() {
        if std::path::Path::new("/proc/self/status").exists() {
            let mb = rss_mb(std::process::id()).unwrap();
            assert!(mb > 0.0);
        }
    }
}
