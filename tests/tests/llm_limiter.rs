//! The fleet-wide LLM limiter against a real redis-server and the real mock provider over
//! HTTP, with overshoot counted at the server (the mock's records), not at the clients.
//!
//! - `fleet_shares_one_bucket_without_overshoot`: 4 processes (own Redis connections) share
//!   two buckets (one bound by requests, one by tokens, each with its own mock) for 22 s at
//!   saturation; every sliding 1 s window at the mock stays within `burst + rate/60` for
//!   requests and tokens, the mock answers no 429, and ≥ 90 % of the binding limit is used.
//!   Prints the measured figures.
//! - `provider_429_pauses_every_limiter`: one user's 429 + Retry-After pauses all four.
//! - `settle_refunds_unused_tokens`: reserving max_tokens but using fewer lets more through.
//! - `redis_down_falls_back_to_the_local_stage`: acquire keeps working, bounded, logged.

use honua_mock_llm::{
    Completion, Fault, Latency, MockConfig, MockLlm, RecordedRequest, WindowLimit,
};
use honua_shared::keys::Keys;
use honua_shared::limiter::LimitSpec;
use honua_shared::store::Store;
use honua_tests::llm_load::{self, Hooks, LoadReport, LoadSpec};
use honua_tests::{DEADLINE, RedisServer, wait_for};
use honua_worker::limit::LlmLimiter;
use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const BUCKET: &str = "mock/mock-gpt";

fn limiter(redis: &RedisServer, prefix: &str, spec: &LimitSpec) -> LlmLimiter {
    let store = Store::open(&redis.url(), Keys::new(prefix, 0)).unwrap();
    LlmLimiter::new(store, BTreeMap::from([(BUCKET.to_string(), spec.clone())]))
}

/// Max requests and tokens the mock admitted in any sliding window of `w`.
fn window_max(admitted: &[&RecordedRequest], w: Duration) -> (u64, u64) {
    let (mut max_n, mut max_t) = (0u64, 0u64);
    let mut j = 0;
    let mut tokens = 0u64;
    for i in 0..admitted.len() {
        // Window [admitted[i].at, admitted[i].at + w).
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

/// What the mock saw for one bucket.
struct Observed {
    admitted: usize,
    refused: usize,
    max_req: u64,
    max_tok: u64,
    /// Max per window after the first 2 s (the start uses the full burst).
    steady_max: (u64, u64),
    over_windows: usize,
    rpm: f64,
    tpm: f64,
    req_share: f64,
    tok_share: f64,
}

fn observe(mock: &MockLlm, spec: &LimitSpec, window: Duration) -> Observed {
    let records = mock.requests();
    let refused = records.iter().filter(|r| r.status == 429).count();
    let mut admitted: Vec<&RecordedRequest> = records.iter().filter(|r| r.admitted()).collect();
    admitted.sort_by_key(|r| r.at);
    assert!(admitted.len() > 100, "too few requests: {}", admitted.len());
    let (max_req, max_tok) = window_max(&admitted, window);
    let steady: Vec<&RecordedRequest> = admitted
        .iter()
        .copied()
        .filter(|r| r.at.duration_since(admitted[0].at) >= Duration::from_secs(2))
        .collect();
    let steady_max = window_max(&steady, window);
    let span = admitted
        .last()
        .unwrap()
        .at
        .duration_since(admitted[0].at)
        .as_secs_f64();
    let n = admitted.len() as f64;
    let tokens: u64 = admitted.iter().map(|r| r.total_tokens()).sum();
    // Every window, counted independently of the mock's own limiter.
    let mut over_windows = 0;
    for (i, r) in admitted.iter().enumerate() {
        let (mut c, mut t) = (0u64, 0u64);
        for s in &admitted[i..] {
            if s.at.duration_since(r.at) >= window {
                break;
            }
            c += 1;
            t += s.total_tokens();
        }
        if c as f64 > spec.max_requests_in(window) || t as f64 > spec.max_tokens_in(window) {
            over_windows += 1;
        }
    }
    // Share of the most the limit allows over the whole run, burst included.
    let whole = Duration::from_secs_f64(span);
    Observed {
        admitted: admitted.len(),
        refused,
        max_req,
        max_tok,
        steady_max,
        over_windows,
        rpm: n / span * 60.0,
        tpm: tokens as f64 / span * 60.0,
        req_share: n / spec.max_requests_in(whole),
        tok_share: tokens as f64 / spec.max_tokens_in(whole),
    }
}

async fn window_mock(spec: &LimitSpec, window: Duration) -> MockLlm {
    // The mock enforces exactly what the bucket promises: burst + rate over the window.
    MockLlm::start(MockConfig {
        latency: Latency::Uniform {
            min: Duration::from_millis(5),
            max: Duration::from_millis(40),
        },
        // 280 chars = 70 tokens; with a 100-char prompt (25 tokens) each call uses 95 tokens
        // of its 125-token reservation.
        completion: Completion::Fixed("y".repeat(280)),
        limit: Some(WindowLimit {
            window,
            max_requests: spec.max_requests_in(window) as u64,
            max_tokens: spec.max_tokens_in(window) as u64,
        }),
        ..MockConfig::default()
    })
    .await
    .unwrap()
}

/// Two buckets at once, each with its own mock: one bound by requests, one by tokens.
/// The two fleet tests below saturate both cores for many seconds and check arrivals at the
/// mock against the exact sliding-window bound; run concurrently on a loaded 2-core machine
/// they delay each other's calls into bunches. They take turns.
static FLEET_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_shares_one_bucket_without_overshoot() {
    let _turn = FLEET_TESTS.lock().await;
    honua_runtime::install_crypto_provider();
    let redis = RedisServer::start();
    let window = Duration::from_secs(1);
    let buckets = [
        (
            "requests-bound",
            "mock/req",
            LimitSpec {
                requests_per_minute: 600,
                tokens_per_minute: 60_000,
                burst_requests: 10,
                burst_tokens: 2_000,
                ..LimitSpec::default()
            },
        ),
        (
            "tokens-bound",
            "mock/tok",
            LimitSpec {
                requests_per_minute: 6_000,
                tokens_per_minute: 48_000,
                burst_requests: 20,
                // Eight calls' worth: transit jitter between admission and arrival (a
                // client process not scheduled for a few hundred ms on a loaded machine)
                // bunches arrivals, and the burst is the slack that absorbs it.
                burst_tokens: 800,
                ..LimitSpec::default()
            },
        ),
    ];
    let mut mocks = Vec::new();
    for (_, _, spec) in &buckets {
        mocks.push(window_mock(spec, window).await);
    }

    let workers = 4;
    let tasks = 4;
    let duration = Duration::from_secs(22);
    let mut children = Vec::new();
    for i in 0..workers {
        let loads: Vec<LoadSpec> = buckets
            .iter()
            .zip(&mocks)
            .map(|((_, bucket, spec), mock)| LoadSpec {
                redis_url: redis.url(),
                prefix: "fleet".into(),
                bucket: bucket.to_string(),
                spec: spec.clone(),
                base_url: mock.base_url(),
                concurrency: tasks,
                duration_ms: duration.as_millis() as u64,
                prompt_chars: 100,
                max_tokens: 100,
                max_wait_ms: 2_000,
                settle: true,
                user: format!("w{i}"),
                process_type: String::new(),
                tenant: None,
            })
            .collect();
        let child = Command::new(env!("CARGO_BIN_EXE_honua-llm-load"))
            .arg(serde_json::to_string(&loads).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        children.push(child);
    }
    // One report per process and bucket; the round-trip counters are per process.
    let mut reports: Vec<Vec<LoadReport>> = Vec::new();
    for child in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "load process failed: {:?}",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        reports.push(serde_json::from_str(text.trim()).expect("load reports"));
    }
    let sum = |f: fn(&LoadReport) -> u64| reports.iter().map(|r| f(&r[0])).sum::<u64>();
    let granted: u64 = reports.iter().flatten().map(|r| r.granted).sum();
    let refused = sum(|r| r.timeouts);
    let refused_rt = sum(|r| r.refused_round_trips);
    let (acquire_rt, settle_rt, fallbacks) = (
        sum(|r| r.acquire_round_trips),
        sum(|r| r.settle_round_trips),
        sum(|r| r.fallbacks),
    );
    println!(
        "LIMITER REPORT {workers} processes x {tasks} tasks per bucket, {duration:?}, \
         windows of {window:?}; redis round trips: acquire {acquire_rt} + settle {settle_rt} \
         for {granted} calls = {:.2} per call; of these, {refused_rt} were made by {refused} \
         acquires answered \"not within the wait bound\" (the clients retry at once), so \
         per admitted call: {:.2}; local fallbacks {fallbacks}",
        (acquire_rt + settle_rt) as f64 / granted.max(1) as f64,
        (acquire_rt - refused_rt + settle_rt) as f64 / granted.max(1) as f64,
    );
    for ((name, _, spec), mock) in buckets.iter().zip(&mocks) {
        let o = observe(mock, spec, window);
        println!(
            "  {name}: configured rpm {} (burst {}) tpm {} (burst {}) => per window <= {} req, <= {} tok\n    \
             observed: {} calls; max per window {} req, {} tok (after the first 2 s: {} req, \
             {} tok); mean rpm {:.1}, tpm {:.1}\n    \
             overshoot: windows over the bound {}, mock 429s {}; share of the limit used: \
             requests {:.1}%, tokens {:.1}%",
            spec.requests_per_minute,
            spec.burst_requests,
            spec.tokens_per_minute,
            spec.burst_tokens,
            spec.max_requests_in(window),
            spec.max_tokens_in(window),
            o.admitted,
            o.max_req,
            o.max_tok,
            o.steady_max.0,
            o.steady_max.1,
            o.rpm,
            o.tpm,
            o.over_windows,
            o.refused,
            o.req_share * 100.0,
            o.tok_share * 100.0,
        );
        assert_eq!(
            o.over_windows, 0,
            "{name}: windows over the limit at the mock"
        );
        assert_eq!(
            o.refused, 0,
            "{name}: the mock refused requests over its limit"
        );
        let binding = o.req_share.max(o.tok_share);
        assert!(
            binding >= 0.9,
            "{name}: only {:.1}% of the binding limit used",
            binding * 100.0
        );
    }
    assert_eq!(fallbacks, 0, "redis was up the whole time");
    for r in reports.iter().flatten() {
        assert!(r.granted > 0, "a worker starved: {r:?}");
        assert_eq!(r.transport_errors, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_429_pauses_every_limiter() {
    let _turn = FLEET_TESTS.lock().await;
    honua_runtime::install_crypto_provider();
    let redis = RedisServer::start();
    let spec = LimitSpec {
        requests_per_minute: 600,
        tokens_per_minute: 0,
        burst_requests: 5,
        burst_tokens: 0,
        ..LimitSpec::default()
    };
    let mock = MockLlm::start(MockConfig {
        latency: Latency::Fixed(Duration::from_millis(5)),
        completion: Completion::Fixed("ok".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    // Request 31 gets a 429 asking for a 2 s pause.
    let mut faults = vec![Fault::Ok; 30];
    faults.push(Fault::RateLimited {
        retry_after: Duration::from_secs(2),
    });
    mock.script(faults);

    let granted_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let pauses: Arc<Mutex<Vec<(Instant, Instant, Duration)>>> = Arc::default();
    let g = granted_at.clone();
    let p = pauses.clone();
    let hooks = Hooks {
        on_grant: Some(Arc::new(move |label: &str| {
            g.lock().unwrap().insert(label.to_string(), Instant::now());
        })),
        on_pause: Some(Arc::new(move |a, b, d| p.lock().unwrap().push((a, b, d)))),
    };
    let mut runs = Vec::new();
    for i in 0..4 {
        let load = LoadSpec {
            redis_url: redis.url(),
            prefix: "pause".into(),
            bucket: BUCKET.into(),
            spec: spec.clone(),
            base_url: mock.base_url(),
            concurrency: 2,
            duration_ms: 8_000,
            prompt_chars: 20,
            max_tokens: 10,
            max_wait_ms: 1_000,
            settle: true,
            user: format!("u{i}"),
            process_type: String::new(),
            tenant: None,
        };
        // Each user has its own limiter and Redis connection.
        let lim = limiter(&redis, "pause", &spec);
        let hooks = hooks.clone();
        runs.push(tokio::spawn(async move {
            llm_load::run(&load, lim, hooks).await
        }));
    }
    let mut reports = Vec::new();
    for r in runs {
        reports.push(r.await.unwrap());
    }
    let pauses = pauses.lock().unwrap().clone();
    assert_eq!(pauses.len(), 1, "exactly one 429 was scripted");
    let (before, after, len) = pauses[0];
    let granted_at = granted_at.lock().unwrap();
    let records = mock.requests();
    // During the pause (from when it was set until it ends) the mock sees only calls that
    // were admitted before it was set (already in flight).
    let mut in_window = 0;
    for r in records
        .iter()
        .filter(|r| r.at >= after && r.at < before + len)
    {
        in_window += 1;
        let label = r.user.as_deref().unwrap();
        assert!(
            granted_at[label] < after,
            "{label} was admitted during the pause and reached the provider"
        );
    }
    // Traffic resumed after the pause, from every user.
    let resumed: Vec<&RecordedRequest> = records.iter().filter(|r| r.at >= before + len).collect();
    for i in 0..4 {
        let u = format!("u{i}-");
        assert!(
            resumed
                .iter()
                .any(|r| r.user.as_deref().unwrap().starts_with(&u)),
            "user {i} did not resume after the pause"
        );
    }
    // Before the pause all four were sending.
    let before_pause: Vec<&RecordedRequest> = records.iter().filter(|r| r.at < before).collect();
    assert!(before_pause.len() >= 30);
    let pause_rt: u64 = reports.iter().map(|r| r.pause_round_trips).sum();
    assert_eq!(pause_rt, 1);
    println!(
        "PAUSE REPORT pause {len:?}: {in_window} in-flight calls arrived while paused, {} after",
        resumed.len()
    );
}

#[tokio::test]
async fn settle_refunds_unused_tokens() {
    honua_runtime::install_crypto_provider();
    let redis = RedisServer::start();
    // 1 token/s refill: the bucket's 300 tokens decide everything within the test.
    let spec = LimitSpec {
        requests_per_minute: 0,
        tokens_per_minute: 60,
        burst_requests: 0,
        burst_tokens: 300,
        ..LimitSpec::default()
    };
    let mock = MockLlm::start(MockConfig {
        completion: Completion::Fixed("ok".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let client = reqwest::Client::new();
    let cancel = CancellationToken::new();
    // Prompt 40 chars = 10 tokens + max_tokens 90 = 100 reserved; the call uses 11.
    let prompt = "p".repeat(40);
    let reserve = 100;

    let mut admitted = HashMap::new();
    for (settle, prefix) in [(false, "nosettle"), (true, "settle")] {
        let lim = limiter(&redis, prefix, &spec);
        let mut n = 0u32;
        while let Some(permit) = lim
            .acquire(BUCKET, reserve, Duration::ZERO, &cancel)
            .await
            .unwrap()
        {
            let r = llm_load::call(&client, &mock.base_url(), &prompt, 90, prefix)
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.total_tokens, 11);
            if settle {
                permit.settle(r.total_tokens).await.unwrap();
            } else {
                drop(permit);
            }
            n += 1;
            assert!(n < 1_000, "the bucket never filled");
        }
        admitted.insert(settle, n);
    }
    // Without refunds 3 reservations of 100 fill the bucket; with refunds each call costs
    // 11, so (300 - 100) / 11 + 1 = 19 fit (a token or two may refill meanwhile).
    assert!(admitted[&false] <= 4, "{admitted:?}");
    assert!(admitted[&true] >= 18, "{admitted:?}");
    println!(
        "SETTLE REPORT admitted without refunds {}, with refunds {}",
        admitted[&false], admitted[&true]
    );
}

/// Captures log output for one test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn redis_down_falls_back_to_the_local_stage() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut redis = RedisServer::start();
    let spec = LimitSpec {
        requests_per_minute: 60,
        tokens_per_minute: 0,
        burst_requests: 3,
        burst_tokens: 0,
        ..LimitSpec::default()
    };
    let lim = limiter(&redis, "down", &spec);
    let cancel = CancellationToken::new();
    let p = lim
        .acquire(BUCKET, 10, Duration::from_secs(5), &cancel)
        .await
        .unwrap()
        .expect("admitted while redis is up");
    assert!(p.fleet_wide());
    p.settle(10).await.unwrap();

    redis.kill9();
    let p = lim
        .acquire(BUCKET, 10, Duration::from_secs(5), &cancel)
        .await
        .unwrap()
        .expect("admitted by the local stage while redis is down");
    assert!(!p.fleet_wide());
    // The local stage still limits: its burst of 3 is used up quickly at 1/s.
    let mut granted = 2;
    for _ in 0..20 {
        if lim
            .acquire(BUCKET, 10, Duration::ZERO, &cancel)
            .await
            .unwrap()
            .is_some()
        {
            granted += 1;
        }
    }
    assert!(granted < 22, "the local stage did not limit: {granted}");
    // A provider pause holds locally without Redis.
    lim.pause(BUCKET, Duration::from_secs(30)).await.unwrap();
    assert!(
        lim.acquire(BUCKET, 10, Duration::ZERO, &cancel)
            .await
            .unwrap()
            .is_none()
    );
    // Cancellation ends a wait promptly.
    cancel.cancel();
    let e = lim
        .acquire(BUCKET, 10, Duration::from_secs(60), &cancel)
        .await
        .unwrap_err();
    assert!(matches!(e, honua_worker::limit::LimitError::Cancelled));
    let stats = lim.stats();
    assert!(stats.fallbacks >= 1, "{stats:?}");
    let text = wait_for("the fallback log line", DEADLINE, || {
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        async move { text.contains("redis unreachable").then_some(text) }
    })
    .await;
    assert!(text.contains("local stage"), "{text}");
}

/// The script's contract, one call at a time against a real server.
#[tokio::test]
async fn script_books_pauses_and_refuses_what_never_fits() {
    use honua_shared::limiter::Admission;
    let redis = RedisServer::start();
    let store = Store::open(&redis.url(), Keys::new("contract", 0)).unwrap();
    let keys = store.keys().llm_limit("a/{b}");
    assert!(keys[0].as_str().contains("{llm:a/_b_}"), "{}", keys[0]);
    assert!(keys[1].as_str().contains("{llm:a/_b_}"));
    // 1 request per second, bucket of 1; 600 tokens/min, bucket of 100.
    let spec = LimitSpec {
        requests_per_minute: 60,
        tokens_per_minute: 600,
        burst_requests: 1,
        burst_tokens: 100,
        ..LimitSpec::default()
    };
    let b = "a/{b}";
    assert_eq!(
        store
            .llm_acquire(b, &spec, 101, Duration::from_secs(60))
            .await
            .unwrap(),
        Admission::TooLarge
    );
    assert_eq!(
        store
            .llm_acquire(b, &spec, 10, Duration::ZERO)
            .await
            .unwrap(),
        Admission::Granted {
            wait: Duration::ZERO
        }
    );
    // Full: not now, and no booking without a wait bound.
    let Admission::Wait { wait, paused } = store
        .llm_acquire(b, &spec, 10, Duration::ZERO)
        .await
        .unwrap()
    else {
        panic!("expected a wait")
    };
    assert!(!paused && wait > Duration::ZERO && wait <= Duration::from_secs(1));
    // With a bound, the slot is booked.
    let Admission::Granted { wait: booked } = store
        .llm_acquire(b, &spec, 10, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("expected a booking")
    };
    assert!(booked > Duration::ZERO);
    // The next slot is one interval later; giving the booking back frees it again.
    let Admission::Wait { wait: later, .. } = store
        .llm_acquire(b, &spec, 10, Duration::ZERO)
        .await
        .unwrap()
    else {
        panic!("expected a wait")
    };
    assert!(later > booked, "{later:?} > {booked:?}");
    assert!(store.llm_settle(b, &spec, 10, 0, true, &[]).await.unwrap());
    let Admission::Wait { wait: freed, .. } = store
        .llm_acquire(b, &spec, 10, Duration::ZERO)
        .await
        .unwrap()
    else {
        panic!("expected a wait")
    };
    assert!(freed < later, "{freed:?} < {later:?}");
    // Nothing to reconcile: no round trip.
    assert!(
        !store
            .llm_settle(b, &spec, 10, 10, false, &[])
            .await
            .unwrap()
    );
    // A pause only grows, and holds every acquire.
    let long = store.llm_pause(b, Duration::from_secs(30)).await.unwrap();
    let after_short = store.llm_pause(b, Duration::from_secs(1)).await.unwrap();
    assert!(after_short > Duration::from_secs(2) && after_short <= long);
    let Admission::Wait { paused, .. } = store
        .llm_acquire(b, &spec, 10, Duration::from_secs(5))
        .await
        .unwrap()
    else {
        panic!("expected the pause")
    };
    assert!(paused);
    // Confirm after a booked wait sees the pause and gives the slot back.
    assert!(
        store
            .llm_confirm(b, &spec, 10, &[])
            .await
            .unwrap()
            .is_some()
    );
    // Bad input is a clear script error, not a silent grant.
    let mut conn = store.conn();
    let e = honua_shared::scripts::Scripts::get()
        .llm_limit
        .key(&keys[0])
        .key(&keys[1])
        .arg("nonsense")
        .invoke_async::<redis::Value>(&mut conn)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown mode"), "{e}");
}

/// The fleet-wide circuit breaker in `llm_limit.lua`: failures counted across callers open
/// it, an open breaker refuses in the acquire round trip, half-open admits exactly one
/// probe (whoever asks), an abandoned probe frees the claim, a successful one closes it.
#[tokio::test]
async fn breaker_script_opens_admits_one_probe_and_closes() {
    use honua_shared::limiter::{Admission, BreakerOutcome, BreakerSeen, BreakerSpec};
    let redis = RedisServer::start();
    let a = Store::open(&redis.url(), Keys::new("brk", 0)).unwrap();
    let b = Store::open(&redis.url(), Keys::new("brk", 0)).unwrap();
    let spec = LimitSpec::default();
    let brk = BreakerSpec {
        failures: 2,
        open: Duration::from_millis(300),
        probe_lease: Duration::from_secs(60),
    };
    let lease = Some(brk.probe_lease);
    let granted = Admission::Granted {
        wait: Duration::ZERO,
    };
    let acq = |s: &Store| {
        let s = s.clone();
        let spec = spec.clone();
        async move {
            s.llm_acquire_gated(BUCKET, &spec, 1, Duration::ZERO, lease)
                .await
                .unwrap()
        }
    };
    assert_eq!(acq(&a).await, (granted, BreakerSeen::Closed));
    let report = |s: &Store, o: BreakerOutcome, probe: bool| {
        let s = s.clone();
        async move { s.llm_breaker(BUCKET, &brk, o, probe).await.unwrap() }
    };
    assert_eq!(report(&a, BreakerOutcome::Failure, false).await, None);
    assert_eq!(acq(&b).await, (granted, BreakerSeen::Failing));
    // The second failure, from another caller, opens it for everyone.
    assert!(report(&b, BreakerOutcome::Failure, false).await.is_some());
    assert!(matches!(acq(&a).await.0, Admission::BreakerOpen { .. }));
    // Half-open: exactly one probe, whichever caller asks first.
    wait_for("the breaker to admit a probe", DEADLINE, || async {
        match acq(&a).await {
            (Admission::Granted { .. }, BreakerSeen::Probe) => Some(()),
            (Admission::BreakerOpen { .. }, _) => None,
            other => panic!("{other:?}"),
        }
    })
    .await;
    for s in [&a, &b, &a, &b] {
        assert!(matches!(acq(s).await.0, Admission::BreakerOpen { .. }));
    }
    // An abandoned probe lets another caller probe.
    report(&a, BreakerOutcome::Abandon, true).await;
    assert_eq!(acq(&b).await, (granted, BreakerSeen::Probe));
    // A successful probe closes it.
    assert_eq!(report(&b, BreakerOutcome::Success, true).await, None);
    assert_eq!(acq(&a).await, (granted, BreakerSeen::Closed));
}

/// One `acquire` round trip of `asker` booking up to far ahead: the booked wait, or `None`
/// when refused (its share is over its fair rate at the bucket's next slot).
async fn ask(
    store: &Store,
    bucket: &str,
    spec: &LimitSpec,
    asker: &honua_shared::limiter::Asker,
) -> Option<Duration> {
    use honua_shared::limiter::Admission;
    match store
        .llm_acquire_as(
            bucket,
            spec,
            Some(asker),
            1,
            Duration::from_secs(100_000),
            None,
        )
        .await
        .unwrap()
        .0
    {
        Admission::Granted { wait } => Some(wait),
        Admission::Wait { paused: false, .. } => None,
        other => panic!("unexpected {other:?}"),
    }
}

/// Asks in turns (one ask of each asker per round, `rounds` rounds), every call booking far
/// ahead, so the whole pattern runs at one instant of the bucket's clock: deterministic.
/// Returns the grants per asker and the latest booked slot.
async fn in_turns(
    store: &Store,
    bucket: &str,
    spec: &LimitSpec,
    askers: &[honua_shared::limiter::Asker],
    rounds: usize,
) -> (Vec<u64>, Duration) {
    let mut grants = vec![0u64; askers.len()];
    let mut last = Duration::ZERO;
    for _ in 0..rounds {
        for (i, a) in askers.iter().enumerate() {
            if let Some(w) = ask(store, bucket, spec, a).await {
                grants[i] += 1;
                last = last.max(w);
            }
        }
    }
    (grants, last)
}

/// The fair-share accounting of `llm_limit.lua`, called directly (no workers, no mock):
/// weights split a saturated bucket, a lone share gets all of it, a reserved minimum and a
/// maximum hold, tenant shares split the same way, every slot of the bucket is used, a
/// share's unused booking is refunded to it, and an idle share's capacity returns once it
/// has not asked for the window.
#[tokio::test]
async fn script_splits_a_bucket_into_fair_shares() {
    use honua_shared::limiter::{Asker, ShareSpec};
    let redis = RedisServer::start();
    let store = Store::open(&redis.url(), Keys::new("shares", 0)).unwrap();
    let share = |weight, min_rpm, max_rpm| ShareSpec {
        weight,
        min_rpm,
        max_rpm,
    };
    // 1 request per second, burst 4: a slot per second of the bucket's clock.
    let base = LimitSpec {
        requests_per_minute: 60,
        burst_requests: 4,
        ..LimitSpec::default()
    };
    let typed = |shares: &[(&str, ShareSpec)]| {
        let mut s = base.clone();
        s.shares = shares
            .iter()
            .map(|(n, sh)| (n.to_string(), sh.clone()))
            .collect();
        s
    };
    let deployment = Asker::new("Deployment", None);
    let benchmark = Asker::new("Benchmark", None);
    let both = [deployment.clone(), benchmark.clone()];
    // Every granted call holds one slot of the bucket, and the slots follow each other
    // without a hole: the last booking lies within the last burst of the grants' slots,
    // (grants - burst) to (grants - 1) intervals ahead (less the time the asks took, well
    // under one interval).
    let full = |grants: &[u64], last: Duration| {
        let total: u64 = grants.iter().sum();
        let (lo, hi) = ((total - 4) as f64 - 1.0, (total - 1) as f64 + 0.01);
        assert!(
            (lo..=hi).contains(&last.as_secs_f64()),
            "{total} grants, last slot {last:?}: the bucket was not used in full"
        );
    };
    let ratio = |grants: &[u64]| grants[0] as f64 / grants.iter().sum::<u64>() as f64;

    // Weights 3:1, both asking all the time: 75 % / 25 %.
    let spec = typed(&[
        ("Deployment", share(3, 0, 0)),
        ("Benchmark", share(1, 0, 0)),
    ]);
    let (g, last) = in_turns(&store, "m/weights", &spec, &both, 400).await;
    println!("SHARES weights 3:1 -> {g:?} ({:.1}%)", ratio(&g) * 100.0);
    assert!((ratio(&g) - 0.75).abs() < 0.02, "{g:?}");
    full(&g, last);

    // Alone, either gets every slot.
    for who in &both {
        let bucket = format!("m/alone-{}", who.process_type);
        let (g, last) = in_turns(&store, &bucket, &spec, std::slice::from_ref(who), 200).await;
        assert_eq!(g, [200], "{} alone", who.process_type);
        full(&g, last);
    }

    // A reserved minimum above the weighted share: Benchmark at weight 1 would get 15 rpm,
    // its min_rpm reserves 30 of the 60.
    let spec = typed(&[
        ("Deployment", share(3, 0, 0)),
        ("Benchmark", share(1, 30, 0)),
    ]);
    let (g, last) = in_turns(&store, "m/min", &spec, &both, 400).await;
    println!("SHARES min 30 of 60 rpm -> {g:?}");
    assert!((ratio(&g) - 0.5).abs() < 0.02, "{g:?}");
    full(&g, last);

    // A maximum below the weighted share: Deployment capped at 15 rpm, the rest goes to
    // Benchmark (work-conserving), the bucket still used in full.
    let spec = typed(&[
        ("Deployment", share(3, 0, 15)),
        ("Benchmark", share(1, 0, 0)),
    ]);
    let (g, last) = in_turns(&store, "m/max", &spec, &both, 400).await;
    println!("SHARES max 15 of 60 rpm -> {g:?}");
    assert!((ratio(&g) - 0.25).abs() < 0.02, "{g:?}");
    full(&g, last);

    // Unlisted types share `*`; tenants split the same way (acme 3, everyone else 1).
    let mut spec = base.clone();
    spec.tenant_shares = [("acme".to_string(), share(3, 0, 0))].into();
    let tenants = [
        Asker::new("Upgrade", Some("acme".into())),
        Asker::new("Upgrade", Some("globex".into())),
    ];
    let (g, last) = in_turns(&store, "m/tenants", &spec, &tenants, 400).await;
    println!("SHARES tenants 3:1 -> {g:?}");
    assert!((ratio(&g) - 0.75).abs() < 0.02, "{g:?}");
    full(&g, last);

    // A booking given back is refunded to its share too.
    let spec = typed(&[("Deployment", share(3, 0, 0))]);
    let b = "m/refund";
    assert!(ask(&store, b, &spec, &deployment).await.is_some());
    let before = share_field(&store, b, "t:Deployment:rt")
        .await
        .expect("the share's tat");
    let fields = spec.share_fields(&deployment);
    assert_eq!(fields, ["t:Deployment"]);
    assert!(
        store
            .llm_settle(b, &spec, 1, 0, true, &fields)
            .await
            .unwrap()
    );
    let after = share_field(&store, b, "t:Deployment:rt")
        .await
        .unwrap_or(0.0);
    assert!(after < before, "{after} < {before}");

    // Work-conserving: a share that stopped asking leaves the split once the window has
    // passed since its last ask (and booked slot); then the other is charged the whole
    // bucket's interval again.
    let mut spec = typed(&[
        ("Deployment", share(3, 0, 0)),
        ("Benchmark", share(1, 0, 0)),
    ]);
    spec.requests_per_minute = 60_000; // slots 1 ms apart: Benchmark's booking is near
    spec.share_window_ms = 200;
    let b = "m/idle";
    assert!(ask(&store, b, &spec, &benchmark).await.is_some());
    assert!(ask(&store, b, &spec, &deployment).await.is_some());
    // While Benchmark is active Deployment runs at 3/4 of the bucket: 1000 µs / 0.75.
    let shared_ri = share_field(&store, b, "t:Deployment:ri").await.unwrap();
    assert!((shared_ri - 1000.0 / 0.75).abs() < 1.0, "{shared_ri}");
    wait_for("Deployment alone gets the whole bucket", DEADLINE, || {
        let (store, spec, d) = (store.clone(), spec.clone(), deployment.clone());
        async move {
            ask(&store, b, &spec, &d).await;
            let ri = share_field(&store, b, "t:Deployment:ri").await?;
            ((ri - 1000.0).abs() < 1.0).then_some(())
        }
    })
    .await;
}

/// A field of a bucket's limiter hash, as a number.
async fn share_field(store: &Store, bucket: &str, field: &str) -> Option<f64> {
    let hash = store.keys().llm_limit(bucket)[0].clone();
    redis::cmd("HGET")
        .arg(hash.as_str())
        .arg(field)
        .query_async::<Option<f64>>(&mut store.conn())
        .await
        .unwrap()
}

/// Runs one `honua-llm-load` process per entry of `per_process` (each its own limiter and
/// Redis connection, all its loads at once) and returns their reports.
async fn run_fleet(per_process: Vec<Vec<LoadSpec>>) -> Vec<Vec<LoadReport>> {
    let mut children = Vec::new();
    for loads in per_process {
        let child = Command::new(env!("CARGO_BIN_EXE_honua-llm-load"))
            .arg(serde_json::to_string(&loads).unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        children.push(child);
    }
    let mut reports = Vec::new();
    for child in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "load process failed: {:?}",
            out.status
        );
        let text = String::from_utf8_lossy(&out.stdout);
        reports.push(serde_json::from_str(text.trim()).expect("load reports"));
    }
    reports
}

/// Fair shares across a fleet: 2 load processes (own limiters and Redis connections), each
/// running Deployment and Benchmark calls at once against one bucket and the real mock.
/// Admissions are counted by the limiters (granted on the Redis clock), not as arrivals
/// at the mock, whose timing is noisy on a loaded machine; the mock still checks that no
/// window exceeds the bucket's bound.
/// - weights 3:1, both saturating: 75 % / 25 % (± 5 %) of the admissions;
/// - Benchmark alone (Deployment never asks): >= 90 % of the limit, as without shares;
/// - Benchmark with min_rpm half the bucket while Deployment (weight 3) saturates: 50 % (± 5 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_fair_shares_split_a_saturated_bucket() {
    use honua_shared::limiter::ShareSpec;
    let _turn = FLEET_TESTS.lock().await;
    honua_runtime::install_crypto_provider();
    let redis = RedisServer::start();
    let window = Duration::from_secs(1);
    // Bound by requests; the token limit is far away (the mock checks both).
    let base = LimitSpec {
        requests_per_minute: 1_200,
        tokens_per_minute: 10_000_000,
        burst_requests: 10,
        burst_tokens: 100_000,
        ..LimitSpec::default()
    };
    let share = |weight, min_rpm| ShareSpec {
        weight,
        min_rpm,
        max_rpm: 0,
    };
    let duration = Duration::from_secs(12);
    let load = |prefix: &str, spec: &LimitSpec, mock: &MockLlm, ty: &str, p: usize| LoadSpec {
        redis_url: redis.url(),
        prefix: prefix.into(),
        bucket: BUCKET.into(),
        spec: spec.clone(),
        base_url: mock.base_url(),
        concurrency: 4,
        duration_ms: duration.as_millis() as u64,
        prompt_chars: 100,
        max_tokens: 100,
        max_wait_ms: 2_000,
        settle: true,
        user: format!("{ty}{p}"),
        process_type: ty.into(),
        tenant: None,
    };
    let granted = |reports: &[Vec<LoadReport>], i: usize| -> u64 {
        reports
            .iter()
            .map(|r| r.get(i).map_or(0, |r| r.granted))
            .sum()
    };
    let no_overshoot = |mock: &MockLlm, spec: &LimitSpec, what: &str| {
        let o = observe(mock, spec, window);
        assert_eq!(
            o.over_windows, 0,
            "{what}: windows over the limit at the mock"
        );
        assert_eq!(o.refused, 0, "{what}: the mock refused requests");
        o
    };

    // Weights 3:1.
    let mut spec = base.clone();
    spec.shares = [
        ("Deployment".to_string(), share(3, 0)),
        ("Benchmark".to_string(), share(1, 0)),
    ]
    .into();
    let mock = window_mock(&spec, window).await;
    let reports = run_fleet(
        (0..2)
            .map(|p| {
                vec![
                    load("w", &spec, &mock, "Deployment", p),
                    load("w", &spec, &mock, "Benchmark", p),
                ]
            })
            .collect(),
    )
    .await;
    let (d, b) = (granted(&reports, 0), granted(&reports, 1));
    let o = no_overshoot(&mock, &spec, "weights");
    let d_share = d as f64 / (d + b) as f64;
    println!(
        "FAIR SHARES weights 3:1: Deployment {d}, Benchmark {b} admitted = {:.1}% / {:.1}%; \
         {:.1}% of the limit used",
        d_share * 100.0,
        (1.0 - d_share) * 100.0,
        o.req_share * 100.0
    );
    assert!(
        (d_share - 0.75).abs() <= 0.05,
        "Deployment got {:.1}%",
        d_share * 100.0
    );
    assert!(
        o.req_share >= 0.9,
        "only {:.1}% of the limit used",
        o.req_share * 100.0
    );

    // Benchmark alone: the whole bucket.
    let mock = window_mock(&spec, window).await;
    let reports = run_fleet(
        (0..2)
            .map(|p| vec![load("alone", &spec, &mock, "Benchmark", p)])
            .collect(),
    )
    .await;
    let o = no_overshoot(&mock, &spec, "alone");
    println!(
        "FAIR SHARES Benchmark alone: {} admitted, {:.1}% of the limit used",
        granted(&reports, 0),
        o.req_share * 100.0
    );
    assert!(
        o.req_share >= 0.9,
        "alone: only {:.1}% of the limit used",
        o.req_share * 100.0
    );

    // A reserved minimum of half the bucket for Benchmark (weight 1 would give it 25 %).
    let mut spec = base.clone();
    spec.shares = [
        ("Deployment".to_string(), share(3, 0)),
        ("Benchmark".to_string(), share(1, 600)),
    ]
    .into();
    let mock = window_mock(&spec, window).await;
    let reports = run_fleet(
        (0..2)
            .map(|p| {
                vec![
                    load("min", &spec, &mock, "Deployment", p),
                    load("min", &spec, &mock, "Benchmark", p),
                ]
            })
            .collect(),
    )
    .await;
    let (d, b) = (granted(&reports, 0), granted(&reports, 1));
    let o = no_overshoot(&mock, &spec, "min");
    let b_share = b as f64 / (d + b) as f64;
    println!(
        "FAIR SHARES Benchmark min_rpm 600 of 1200: Deployment {d}, Benchmark {b} = \
         {:.1}% for Benchmark; {:.1}% of the limit used",
        b_share * 100.0,
        o.req_share * 100.0
    );
    assert!(
        (b_share - 0.5).abs() <= 0.05,
        "Benchmark got {:.1}%",
        b_share * 100.0
    );
}
