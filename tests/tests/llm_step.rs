//! The `llm` step kind against the mock provider over real HTTP, with a real redis-server:
//! usage recorded, retries with visible jitter, fallback under a 429 storm and a 5xx
//! streak, the shared cache, no second provider call after a reclaim, budgets, secrets that
//! never leak, and a call lasting 3× the lease that is not reclaimed; the same for the
//! Anthropic provider (usage, fleet-wide 429 pause, exhausted-window pause, fallback across
//! provider kinds, key scrubbing).

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use honua_mock_llm::{Fault, Latency, MockConfig, MockLlm};
use honua_shared::config::Config;
use honua_shared::llm_config::{
    BudgetAction, EndpointConfig, LlmCaching, LlmProviderConfig, Price, ProviderKind, TypeBudget,
};
use honua_shared::status::{ProcessStatus, StepStatus};
use honua_tests::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SENTINEL: &str = "sk-honua-SENTINEL-7f3a9c1e55d04b2a";

/// One llm step `Ask`, then (when `follow`) a streaming `Follow` that reads Ask's text.
fn def(name: &str, ask_extra: &str, follow: bool) -> String {
    let mut s = format!(
        r#"
name = "{name}"
version = 1
[defaults]
retry = {{ max_attempts = 2, initial_backoff = "10ms", max_backoff = "20ms" }}
[[steps]]
name = "Ask"
kind = "llm"
config = {{ model = "m1", prompt = "hello {{{{input.who}}}}", max_tokens = 50{ask_extra} }}
"#
    );
    if follow {
        s.push_str(
            r#"next = "Follow"
[[steps]]
name = "Follow"
kind = "llm"
config = { model = "m1", system = "be brief", prompt = "you said: {{steps.Ask.text}}", stream = true, max_tokens = 50 }
"#,
        );
    }
    s
}

fn key_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("llm.key");
    std::fs::write(&p, format!("{SENTINEL}\n")).unwrap();
    p
}

/// Primary: the OpenAI-compatible `primary`; fallback (when given): `openai` at `fallback`.
fn llm_cfg(primary: &str, fallback: Option<&str>, key: &Path) -> LlmProviderConfig {
    LlmProviderConfig {
        provider: ProviderKind::OpenaiCompatible,
        openai_compatible: Some(EndpointConfig {
            base_url: Some(primary.to_string()),
            api_key_file: Some(key.to_path_buf()),
            ..Default::default()
        }),
        fallback_provider: fallback.map(|_| ProviderKind::Openai),
        openai: fallback.map(|f| EndpointConfig {
            base_url: Some(f.to_string()),
            api_key_file: Some(key.to_path_buf()),
            ..Default::default()
        }),
        retry_initial_ms: 100,
        retry_max_ms: 1000,
        limiter_max_wait_ms: 300,
        request_timeout_secs: 30,
        ..Default::default()
    }
}

/// A limit the tests never reach: it only makes the bucket fleet-wide (shared in Redis).
fn roomy_limit() -> honua_shared::limiter::LimitSpec {
    honua_shared::limiter::LimitSpec {
        requests_per_minute: 6000,
        tokens_per_minute: 1_000_000,
        burst_requests: 100,
        burst_tokens: 100_000,
        ..Default::default()
    }
}

async fn mock() -> MockLlm {
    MockLlm::start(MockConfig::default()).await.unwrap()
}

async fn output(f: &Fleet, id: &str, step: &str) -> Value {
    let data = f.store().load_data(id).await.unwrap();
    f.cfg
        .codec()
        .decode(&data[&format!("out:{step}")])
        .unwrap_or_else(|e| panic!("no output of {step}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_steps_complete_with_usage_recorded() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", true))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = llm_cfg(&m.base_url(), None, &key_file(tmp.path()));
    llm.prices.insert(
        "m1".into(),
        Price {
            input_per_1k: 1.0,
            output_per_1k: 2.0,
        },
    );
    llm.limits
        .insert("openai_compatible/m1".into(), roomy_limit());
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;
    let id = f.submit("L", json!({"who": "ana"})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:#?}");

    let reqs = m.requests();
    assert_eq!(reqs.len(), 2, "one provider call per step");
    assert!(!reqs[0].stream && reqs[1].stream, "Follow streams");
    let ask = output(&f, &id, "Ask").await;
    assert_eq!(ask["text"], "echo: hello ana");
    assert_eq!(ask["model"], "m1");
    assert_eq!(ask["provider"], "openai_compatible");
    assert_eq!(ask["usage"]["inputTokens"], reqs[0].prompt_tokens);
    assert_eq!(ask["usage"]["outputTokens"], reqs[0].completion_tokens);
    assert_eq!(ask["usage"]["estimated"], false);
    assert_eq!(ask["cacheHit"], false);
    assert_eq!(ask["fallbackUsed"], false);
    assert_eq!(ask["memoised"], false);
    assert!(ask["latencyMs"].is_u64() && ask["limiterWaitMs"].is_u64());
    let expected_cost =
        reqs[0].prompt_tokens as f64 / 1000.0 + 2.0 * reqs[0].completion_tokens as f64 / 1000.0;
    assert!((ask["costUsd"].as_f64().unwrap() - expected_cost).abs() < 1e-9);
    let follow = output(&f, &id, "Follow").await;
    assert_eq!(follow["text"], "echo: you said: echo: hello ana");
    assert_eq!(
        follow["usage"]["outputTokens"], reqs[1].completion_tokens,
        "usage from the stream's final chunk"
    );
    assert_eq!(follow["usage"]["estimated"], false);

    // The usage is charged to the process in Redis (budgets read it).
    let tokens: u64 = redis::cmd("HGET")
        .arg(f.store().keys().llm_usage(&id))
        .arg("tokens")
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    assert_eq!(tokens, reqs.iter().map(|r| r.total_tokens()).sum::<u64>());
    // ... and the process record shows it with the cost from the price table.
    let view: Value = reqwest::get(f.url(&format!("/api/processes/{id}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["llmUsage"]["tokens"], tokens);
    let cost: f64 = reqs
        .iter()
        .map(|r| r.prompt_tokens as f64 / 1000.0 + 2.0 * r.completion_tokens as f64 / 1000.0)
        .sum();
    let shown = view["llmUsage"]["costUsd"].as_f64().unwrap();
    assert!((shown - cost).abs() < 1e-5, "{shown} vs {cost}");
    assert_eq!(view["steps"][0]["yields"], 0);

    // The effective config shows the section, camelCase, with no key in it.
    let cfg_json: Value = reqwest::get(f.url("/api/config"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg_json["llmProvider"]["provider"], "openai_compatible");
    // User-chosen map keys (buckets, models) are shown as written, fields camelCase.
    assert_eq!(
        cfg_json["llmProvider"]["limits"]["openai_compatible/m1"]["requestsPerMinute"], 6000,
        "{}",
        cfg_json["llmProvider"]
    );
    assert_eq!(cfg_json["llmProvider"]["prices"]["m1"]["inputPer1k"], 1.0);
    assert!(!cfg_json.to_string().contains(SENTINEL));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_with_visible_jitter() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.llm_provider = Some(llm_cfg(&m.base_url(), None, &key_file(tmp.path())));
    let f = Fleet::start(cfg, 1, 1).await;
    let mut delays = Vec::new();
    for run in 0..3 {
        let before = m.requests().len();
        m.script([Fault::Status(500), Fault::Status(503)]);
        let id = f.submit("L", json!({"who": format!("run{run}")})).await;
        let rec = f.wait_finished(&id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{rec:#?}");
        assert_eq!(rec.steps["Ask"].attempt, 1, "retried inside the step");
        let reqs = &m.requests()[before..];
        let statuses: Vec<u16> = reqs.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![500, 503, 200]);
        let out = output(&f, &id, "Ask").await;
        let attempts = out["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2);
        for (i, a) in attempts.iter().enumerate() {
            assert_eq!(a["errorType"], "server_error");
            let d = a["delayMs"].as_u64().unwrap();
            // Full jitter: uniform in [0, 100 ms · 2^i].
            assert!(d <= 100 << i, "delay {d} ms above the exponential bound");
            // The provider saw the retry no earlier than the recorded delay.
            let gap = reqs[i + 1].at - reqs[i].at;
            assert!(gap >= Duration::from_millis(d), "{gap:?} < {d} ms");
            delays.push(d);
        }
    }
    let mut distinct = delays.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 1, "jittered delays must vary: {delays:?}");
    eprintln!("retry delays (ms) over three runs: {delays:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_falls_back_and_pauses_the_bucket_fleet_wide() {
    let redis = RedisServer::start();
    let primary = mock().await;
    let fallback = mock().await;
    primary.script(vec![
        Fault::RateLimited {
            retry_after: Duration::from_secs(30)
        };
        20
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = llm_cfg(
        &primary.base_url(),
        Some(&fallback.base_url()),
        &key_file(tmp.path()),
    );
    // A fleet-wide bucket for the primary, so its 429 pause is shared through Redis.
    llm.limits
        .insert("openai_compatible/m1".into(), roomy_limit());
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 2).await;
    let first = f.submit("L", json!({"who": "a"})).await;
    assert_eq!(
        f.wait_finished(&first).await.status,
        ProcessStatus::Completed
    );
    let out = output(&f, &first, "Ask").await;
    assert_eq!(out["fallbackUsed"], true);
    assert_eq!(out["provider"], "openai");
    assert_eq!(out["attempts"][0]["errorType"], "rate_limit");
    assert_eq!(primary.requests().len(), 1);
    // The primary's bucket is paused for 30 s: later calls go to the fallback without
    // touching the primary, whichever worker runs them.
    let ids = [
        f.submit("L", json!({"who": "b"})).await,
        f.submit("L", json!({"who": "c"})).await,
    ];
    for id in &ids {
        assert_eq!(f.wait_finished(id).await.status, ProcessStatus::Completed);
        let out = output(&f, id, "Ask").await;
        assert_eq!(out["fallbackUsed"], true);
        assert!(out["attempts"].as_array().unwrap().is_empty(), "{out}");
    }
    assert_eq!(
        primary.requests().len(),
        1,
        "the pause kept calls off the primary"
    );
    let fb = fallback.requests();
    assert_eq!(fb.len(), 3);
    assert!(fb.iter().all(|r| r.status == 200));
    assert_eq!(
        fb[0].authorization.as_deref(),
        Some(format!("Bearer {SENTINEL}").as_str()),
        "the fallback's key is sent as a bearer token"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_streak_opens_the_breaker_and_falls_back() {
    let redis = RedisServer::start();
    let primary = mock().await;
    let fallback = mock().await;
    primary.script(vec![Fault::Status(502); 10]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = llm_cfg(
        &primary.base_url(),
        Some(&fallback.base_url()),
        &key_file(tmp.path()),
    );
    llm.breaker_failures = 2;
    llm.breaker_open_secs = 600;
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;
    let first = f.submit("L", json!({"who": "a"})).await;
    assert_eq!(
        f.wait_finished(&first).await.status,
        ProcessStatus::Completed
    );
    let out = output(&f, &first, "Ask").await;
    assert_eq!(out["fallbackUsed"], true);
    let types: Vec<&str> = out["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["errorType"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["server_error", "server_error"]);
    assert_eq!(primary.requests().len(), 2);
    // The breaker is open: the next step goes straight to the fallback.
    let second = f.submit("L", json!({"who": "b"})).await;
    assert_eq!(
        f.wait_finished(&second).await.status,
        ProcessStatus::Completed
    );
    assert_eq!(output(&f, &second, "Ask").await["fallbackUsed"], true);
    assert_eq!(
        primary.requests().len(),
        2,
        "no call while the breaker is open"
    );
    assert_eq!(fallback.requests().len(), 2);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_calls_hit_the_shared_cache() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[
        ("l.toml", &def("L", "", false)),
        ("hot.toml", &def("Hot", ", temperature = 0.7", false)),
    ]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = llm_cfg(&m.base_url(), None, &key_file(tmp.path()));
    llm.llm_caching = LlmCaching {
        enabled: true,
        ttl_minutes: 5,
        force: false,
    };
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 2).await;
    let a = f.submit("L", json!({"who": "same"})).await;
    f.wait_finished(&a).await;
    let b = f.submit("L", json!({"who": "same"})).await;
    assert_eq!(f.wait_finished(&b).await.status, ProcessStatus::Completed);
    assert_eq!(
        m.requests().len(),
        1,
        "the identical call was served from the cache"
    );
    let (oa, ob) = (output(&f, &a, "Ask").await, output(&f, &b, "Ask").await);
    assert_eq!(oa["cacheHit"], false);
    assert_eq!(ob["cacheHit"], true);
    assert_eq!(oa["text"], ob["text"]);
    let c = f.submit("L", json!({"who": "other"})).await;
    f.wait_finished(&c).await;
    assert_eq!(m.requests().len(), 2, "a different prompt misses");
    // Non-deterministic settings are not cached unless forced.
    for _ in 0..2 {
        let h = f.submit("Hot", json!({"who": "same"})).await;
        f.wait_finished(&h).await;
    }
    assert_eq!(m.requests().len(), 4);
    f.stop().await;
}

/// A child `honua-test-worker` configured through a TOML file (the `[llm_provider]`
/// section has no environment form).
struct TestWorker {
    child: Child,
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_worker(cfg_toml: &str, dir: &Path, id: &str, log: &Path, rust_log: &str) -> TestWorker {
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, cfg_toml).unwrap();
    let stdout = dir.join(format!("{id}.stdout"));
    let child = Command::new(env!("CARGO_BIN_EXE_honua-test-worker"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", rust_log)
        .env("HONUA_CONFIG", &path)
        .env("HONUA_WORKER_ID", id)
        .env("HONUA_TEST_LOG", log)
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(dir.join(format!("{id}.stderr"))).unwrap())
        .spawn()
        .expect("spawn honua-test-worker");
    TestWorker { child }
}

fn worker_toml(cfg: &Config, llm_section: &str) -> String {
    format!(
        r#"redis_url = "{}"
key_prefix = "{}"
definitions_dir = "{}"
[worker]
lease_ms = {}
sweep_ms = 200
read_block_ms = 200
max_deliveries = 5
shutdown_grace_ms = 2000
metrics_addr = ""
{llm_section}
"#,
        cfg.redis_url,
        cfg.key_prefix,
        cfg.definitions_dir.display(),
        cfg.worker.lease_ms
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_step_whose_call_completed_does_not_call_again() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let def = r#"
name = "Crash"
version = 1
[[steps]]
name = "Ask"
kind = "llm_crash_once"
config = { model = "m1", prompt = "hello {{input.who}}", max_tokens = 50 }
"#;
    let dir = defs_dir(&[("c.toml", def)]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.worker.lease_ms = 1000;
    cfg.custom_step_kinds = vec!["llm_crash_once".into()];
    let key = key_file(tmp.path());
    let section = format!(
        "[llm_provider]\nprovider = \"openai_compatible\"\n[llm_provider.openai_compatible]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
        m.base_url(),
        key.display()
    );
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let log = tmp.path().join("exec.log");
    let mut w1 = spawn_worker(&worker_toml(&cfg, &section), tmp.path(), "w1", &log, "info");
    let id = f.submit("Crash", json!({"who": "bo"})).await;
    wait_for("the first worker to crash after its call", DEADLINE, || {
        let exited = w1.child.try_wait().ok().flatten().is_some();
        async move { exited.then_some(()) }
    })
    .await;
    assert_eq!(m.requests().len(), 1);
    let _w2 = spawn_worker(&worker_toml(&cfg, &section), tmp.path(), "w2", &log, "info");
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:#?}");
    assert!(rec.steps["Ask"].deliveries.unwrap_or(0) >= 2, "{rec:#?}");
    assert_eq!(m.requests().len(), 1, "the provider was not called again");
    let out = output(&f, &id, "Ask").await;
    assert_eq!(out["memoised"], true);
    assert_eq!(out["text"], "echo: hello bo");
    let called: Vec<_> = read_log(&log)
        .into_iter()
        .filter(|l| l.event == "called")
        .collect();
    assert_eq!(called.len(), 2, "{called:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spent_budgets_fail_or_pause_as_configured() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[
        ("f.toml", &def("BudgetFail", "", true)),
        ("p.toml", &def("BudgetPause", "", true)),
    ]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = llm_cfg(&m.base_url(), None, &key_file(tmp.path()));
    llm.budgets.max_tokens_per_process = Some(3);
    llm.budgets.action = BudgetAction::Fail;
    llm.budgets.pause_minutes = 10;
    llm.budgets.process_types.insert(
        "BudgetPause".into(),
        TypeBudget {
            action: Some(BudgetAction::Pause),
            ..Default::default()
        },
    );
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;

    let failing = f.submit("BudgetFail", json!({"who": "cy"})).await;
    let rec = f.wait_finished(&failing).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    let err = rec.steps["Follow"].error.clone().unwrap_or_default();
    assert!(
        err.contains("budget") && err.contains("action fail"),
        "{err}"
    );
    assert_eq!(
        rec.steps["Follow"].attempt, 1,
        "a spent budget is not retried"
    );
    assert_eq!(m.requests().len(), 1, "only Ask called the provider");

    let paused = f.submit("BudgetPause", json!({"who": "cy"})).await;
    let step = wait_for("the Follow step to pause", DEADLINE, || async {
        let rec = f.record(&paused).await?;
        let s = rec.steps.get("Follow")?.clone();
        (s.status == StepStatus::Delayed).then_some((rec, s))
    })
    .await;
    let (rec, s) = step;
    assert_eq!(
        rec.status,
        ProcessStatus::Running,
        "a paused process is not failed"
    );
    let err = s.error.clone().unwrap_or_default();
    assert!(err.contains("paused for 10m"), "{err}");
    assert_eq!(s.yields, 1, "a pause is a yield, not an attempt");
    assert_eq!(s.attempts().last().unwrap().outcome, "yielded");
    assert_eq!(m.requests().len(), 2);
    f.stop().await;
}

/// A step that cannot get rate-limit budget within the wait bound yields: it gives its
/// slot back and runs again later on an attempt its retry policy does not count, so even
/// with `max_attempts = 1` it completes once the bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_waiting_for_budget_yields_without_using_its_attempts() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let one_shot = r#"
name = "OneShot"
version = 1
[[steps]]
name = "Ask"
kind = "llm"
retry = { max_attempts = 1 }
config = { model = "m1", prompt = "hello {{input.who}}", max_tokens = 20 }
"#;
    let dir = defs_dir(&[("o.toml", one_shot)]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = llm_cfg(&m.base_url(), None, &key_file(tmp.path()));
    // One request every 2 s, no burst beyond it; a step waits at most 300 ms.
    llm.limits.insert(
        "openai_compatible/m1".into(),
        serde_json::from_value(json!({"requestsPerMinute": 30, "tokensPerMinute": 0, "burstRequests": 1, "burstTokens": 0})).unwrap(),
    );
    llm.limiter_max_wait_ms = 300;
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;
    let ids = [
        f.submit("OneShot", json!({"who": "a"})).await,
        f.submit("OneShot", json!({"who": "b"})).await,
        f.submit("OneShot", json!({"who": "c"})).await,
    ];
    let mut yields = 0;
    for id in &ids {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{rec:#?}");
        let ask = &rec.steps["Ask"];
        yields += ask.yields;
        let failed = ask
            .attempts()
            .iter()
            .filter(|h| h.outcome == "failed")
            .count();
        assert_eq!(
            failed,
            0,
            "a yield is never a failed attempt: {:?}",
            ask.attempts()
        );
        for h in ask.attempts().iter().filter(|h| h.outcome == "yielded") {
            let e = h.error.clone().unwrap_or_default();
            assert!(e.contains("waiting for llm rate-limit budget"), "{e}");
        }
    }
    assert!(
        yields >= 2,
        "three calls in a bucket of one per 2 s must wait: {yields}"
    );
    assert_eq!(m.requests().len(), 3, "one provider call per step");
    f.stop().await;
}

/// Answers every chat call with 401 and an error text that echoes the credential header,
/// as some providers do.
async fn hostile_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = Router::new().route(
        "/openai/deployments/{dep}/chat/completions",
        post(move |headers: HeaderMap| {
            let s = s.clone();
            async move {
                let key = headers
                    .get("api-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                s.lock().unwrap().push(key.clone());
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": {
                        "message": format!("Incorrect API key provided: {key}"),
                        "type": "invalid_request_error"}})),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, seen)
}

/// Every key and value of the Redis server, as bytes.
async fn dump_redis(conn: &mut honua_shared::store::Conn) -> Vec<u8> {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
    let mut all = Vec::new();
    for k in keys {
        all.extend_from_slice(&k);
        let t: String = redis::cmd("TYPE").arg(&k).query_async(conn).await.unwrap();
        let v: redis::Value = match t.as_str() {
            "string" => redis::cmd("GET").arg(&k).query_async(conn).await.unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&k)
                .query_async(conn)
                .await
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(&k)
                .query_async(conn)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&k)
                .arg(0)
                .arg(-1)
                .query_async(conn)
                .await
                .unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(&k)
                .arg("-")
                .arg("+")
                .query_async(conn)
                .await
                .unwrap(),
            other => panic!("unexpected key type {other}"),
        };
        all.extend_from_slice(format!("{v:?}").as_bytes());
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_key_never_leaks_into_logs_redis_or_errors() {
    let redis = RedisServer::start();
    let m = MockLlm::start(MockConfig {
        api_key: Some(SENTINEL.into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let (hostile, seen) = hostile_server().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", true))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let key = key_file(tmp.path());
    // Primary OpenAI at the mock; fallback Azure at the hostile server.
    let section = format!(
        "[llm_provider]\nprovider = \"OpenAI\"\nfallback_provider = \"Azure\"\n\
         retry_initial_ms = 20\nretry_max_ms = 100\n\
         [llm_provider.openai]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\
         [llm_provider.azure]\nbase_url = \"{hostile}\"\napi_version = \"2024-10-21\"\napi_key_file = \"{}\"\n",
        m.base_url(),
        key.display(),
        key.display()
    );
    let mut llm = LlmProviderConfig {
        provider: ProviderKind::Openai,
        ..Default::default()
    };
    llm.openai = Some(EndpointConfig {
        base_url: Some(m.base_url()),
        api_key_file: Some(key.clone()),
        ..Default::default()
    });
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let log = tmp.path().join("exec.log");
    let w = spawn_worker(
        &worker_toml(&cfg, &section),
        tmp.path(),
        "wk",
        &log,
        "trace",
    );

    let ok = f.submit("L", json!({"who": "dee"})).await;
    assert_eq!(f.wait_finished(&ok).await.status, ProcessStatus::Completed);
    assert_eq!(
        m.requests()[0].authorization.as_deref(),
        Some(format!("Bearer {SENTINEL}").as_str()),
        "the key was sent (so a leak would be possible)"
    );
    // A 429 moves the call to the fallback, whose 401 echoes the key in its error text.
    m.script([Fault::RateLimited {
        retry_after: Duration::from_secs(1),
    }]);
    let bad = f.submit("L", json!({"who": "eve"})).await;
    let rec = f.wait_finished(&bad).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    assert_eq!(seen.lock().unwrap().as_slice(), [SENTINEL.to_string()]);
    let err = rec.steps["Ask"].error.clone().unwrap_or_default();
    assert!(err.contains("401") && err.contains("[redacted]"), "{err}");

    // Error output: the gateway's view of both processes.
    for id in [&ok, &bad] {
        let body = reqwest::get(f.url(&format!("/api/processes/{id}")))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!body.contains(SENTINEL), "{body}");
    }
    let cfg_body = reqwest::get(f.url("/api/config"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!cfg_body.contains(SENTINEL));
    // Redis: every key and value.
    let all = dump_redis(&mut f.store().conn()).await;
    assert!(all.len() > 1000, "the dump has content");
    assert!(!contains(&all, SENTINEL), "the key is in Redis");
    // Logs at trace level (every crate).
    drop(w);
    let logs = std::fs::read_to_string(tmp.path().join("wk.stdout")).unwrap()
        + &std::fs::read_to_string(tmp.path().join("wk.stderr")).unwrap();
    assert!(
        logs.contains("llm call failed"),
        "the worker logged the failures"
    );
    assert!(!logs.contains(SENTINEL), "the key is in the worker's log");
    eprintln!(
        "worker log: {} lines, {} bytes; redis dump: {} bytes",
        logs.lines().count(),
        logs.len(),
        all.len()
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_lasting_three_leases_is_not_reclaimed() {
    let redis = RedisServer::start();
    let m = MockLlm::start(MockConfig {
        latency: Latency::Fixed(Duration::from_millis(3_000)),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.worker.lease_ms = 1_000;
    cfg.llm_provider = Some(llm_cfg(&m.base_url(), None, &key_file(tmp.path())));
    let f = Fleet::start(cfg, 1, 2).await;
    let id = f.submit("L", json!({"who": "fay"})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:#?}");
    assert_eq!(m.requests().len(), 1, "one call, never repeated");
    let step = &rec.steps["Ask"];
    assert_eq!(step.deliveries, Some(1), "never reclaimed: {step:#?}");
    assert_eq!(step.attempt, 1);
    let out = output(&f, &id, "Ask").await;
    assert!(out["latencyMs"].as_u64().unwrap() >= 3_000);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_is_validated_and_a_violation_is_retried() {
    let redis = RedisServer::start();
    // Valid JSON for "good", a reply missing `score` for anything else.
    let m = MockLlm::start(MockConfig {
        completion: honua_mock_llm::Completion::Func(Arc::new(|r| {
            assert!(
                r.body["response_format"]["json_schema"]["schema"].is_object(),
                "the schema is sent"
            );
            let last = r
                .messages
                .last()
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
            if last.contains("good") {
                "```json\n{\"verdict\": \"approve\", \"score\": 7}\n```".into()
            } else {
                "{\"verdict\": \"approve\"}".into()
            }
        })),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let schema = r#", schema = { type = "object", required = ["verdict", "score"], properties = { verdict = { type = "string", enum = ["approve", "reject"] }, score = { type = "integer", minimum = 0, maximum = 10 } } }"#;
    let dir = defs_dir(&[("s.toml", &def("S", schema, false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.llm_provider = Some(llm_cfg(&m.base_url(), None, &key_file(tmp.path())));
    let f = Fleet::start(cfg, 1, 1).await;
    let good = f.submit("S", json!({"who": "good"})).await;
    assert_eq!(
        f.wait_finished(&good).await.status,
        ProcessStatus::Completed
    );
    let out = output(&f, &good, "Ask").await;
    assert_eq!(out["json"], json!({"verdict": "approve", "score": 7}));

    let bad = f.submit("S", json!({"who": "bad"})).await;
    let rec = f.wait_finished(&bad).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    let step = &rec.steps["Ask"];
    assert_eq!(step.attempt, 2, "the retry policy saw a retryable failure");
    let err = step.error.clone().unwrap_or_default();
    assert!(
        err.contains("violates the output schema")
            && err.contains("\"score\" is a required property"),
        "{err}"
    );
    assert_eq!(
        m.requests().len(),
        3,
        "the retry asked the provider again instead of reusing the bad reply"
    );
    f.stop().await;
}

/// Issue 19's complete structured outputs: a schema with `$ref` into `$defs`, `anyOf` and
/// `pattern` loads, is sent in strict mode (it closes every object and requires every
/// property), a conforming reply completes, and one that breaks the `$ref`'d pattern is
/// retried and fails naming the location.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_with_refs_and_alternatives_is_sent_strict_and_enforced() {
    let redis = RedisServer::start();
    let m = MockLlm::start(MockConfig {
        completion: honua_mock_llm::Completion::Func(Arc::new(|r| {
            let js = &r.body["response_format"]["json_schema"];
            assert_eq!(
                js["strict"],
                json!(true),
                "a strict-compatible schema: {js}"
            );
            assert!(
                js["schema"]["$defs"]["Region"].is_object(),
                "sent whole: {js}"
            );
            let last = r
                .messages
                .last()
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
            if last.contains("good") {
                r#"{"target": "eu-west-1", "change": {"scale": 2}}"#.into()
            } else {
                r#"{"target": "EU-WEST", "change": null}"#.into()
            }
        })),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let schema = r##", schema = { type = "object", additionalProperties = false, required = ["target", "change"], "$defs" = { Region = { type = "string", pattern = "^[a-z]{2}-[a-z]+-[0-9]$" } }, properties = { target = { "$ref" = "#/$defs/Region" }, change = { anyOf = [{ type = "object", additionalProperties = false, required = ["scale"], properties = { scale = { type = "integer", minimum = 1 } } }, { type = "null" }] } } }"##;
    let dir = defs_dir(&[("s.toml", &def("S", schema, false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.llm_provider = Some(llm_cfg(&m.base_url(), None, &key_file(tmp.path())));
    let f = Fleet::start(cfg, 1, 1).await;
    let good = f.submit("S", json!({"who": "good"})).await;
    assert_eq!(
        f.wait_finished(&good).await.status,
        ProcessStatus::Completed
    );
    let out = output(&f, &good, "Ask").await;
    assert_eq!(
        out["json"],
        json!({"target": "eu-west-1", "change": {"scale": 2}})
    );

    let bad = f.submit("S", json!({"who": "bad"})).await;
    let rec = f.wait_finished(&bad).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    let step = &rec.steps["Ask"];
    assert_eq!(step.attempt, 2, "a violation is retried");
    let err = step.error.clone().unwrap_or_default();
    assert!(
        err.contains("violates the output schema") && err.contains("at /target"),
        "{err}"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_deployments_and_a_stalled_stream_that_is_retried() {
    let redis = RedisServer::start();
    let m = MockLlm::start(MockConfig {
        api_key: Some(SENTINEL.into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    m.script([Fault::StallAfter(1)]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("a.toml", &def("A", ", stream = true", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let llm = LlmProviderConfig {
        provider: ProviderKind::Azure,
        azure: Some(EndpointConfig {
            base_url: Some(m.azure_endpoint()),
            api_version: Some("2024-10-21".into()),
            deployments: [("m1".to_string(), "prod-m1".to_string())].into(),
            api_key_file: Some(key_file(tmp.path())),
            ..Default::default()
        }),
        stream_idle_timeout_secs: 1,
        retry_initial_ms: 20,
        retry_max_ms: 100,
        ..Default::default()
    };
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;
    let id = f.submit("A", json!({"who": "gus"})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    let reqs = m.requests();
    assert_eq!(
        reqs.len(),
        2,
        "the stalled stream was abandoned and retried"
    );
    for r in &reqs {
        assert_eq!(r.deployment.as_deref(), Some("prod-m1"));
        assert_eq!(r.api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(r.api_key.as_deref(), Some(SENTINEL));
        assert!(r.stream);
    }
    let out = output(&f, &id, "Ask").await;
    assert_eq!(out["provider"], "azure");
    assert_eq!(out["text"], "echo: hello gus");
    assert_eq!(out["attempts"][0]["errorType"], "timeout");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_process_stops_a_hanging_call_at_once() {
    let redis = RedisServer::start();
    let m = mock().await;
    m.script([Fault::Hang]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.worker.max_concurrent_steps = 1;
    let mut llm = llm_cfg(&m.base_url(), None, &key_file(tmp.path()));
    llm.request_timeout_secs = 3600;
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;
    let hung = f.submit("L", json!({"who": "hal"})).await;
    wait_for("the provider to receive the call", DEADLINE, || {
        let n = m.requests().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let r = reqwest::Client::new()
        .post(f.url(&format!("/api/processes/{hung}/cancel")))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        f.wait_finished(&hung).await.status,
        ProcessStatus::Cancelled
    );
    // The worker's only slot is free again long before the call's 1 h timeout.
    let next = f.submit("L", json!({"who": "ida"})).await;
    assert_eq!(
        f.wait_finished(&next).await.status,
        ProcessStatus::Completed
    );
    assert_eq!(m.requests().len(), 2);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_provider_window_pauses_the_bucket_before_any_429() {
    exhausted_window_pauses_before_any_429(false).await;
}

/// The same through a LiteLLM-style proxy, whose 200 says the window is used up only in
/// `llm_provider-x-ratelimit-*` headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_exhausted_window_with_prefixed_headers_pauses_before_any_429() {
    exhausted_window_pauses_before_any_429(true).await;
}

async fn exhausted_window_pauses_before_any_429(proxy_headers: bool) {
    let redis = RedisServer::start();
    let primary = MockLlm::start(MockConfig {
        limit: Some(honua_mock_llm::WindowLimit {
            window: Duration::from_secs(60),
            max_requests: 2,
            max_tokens: 0,
        }),
        proxy_headers,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let fallback = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = llm_cfg(
        &primary.base_url(),
        Some(&fallback.base_url()),
        &key_file(tmp.path()),
    );
    llm.limits
        .insert("openai_compatible/m1".into(), roomy_limit());
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 2).await;
    let mut outs = Vec::new();
    for who in ["a", "b", "c"] {
        let id = f.submit("L", json!({ "who": who })).await;
        assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
        outs.push(output(&f, &id, "Ask").await);
    }
    let used: Vec<bool> = outs.iter().map(|o| o["fallbackUsed"] == true).collect();
    assert_eq!(used, vec![false, false, true]);
    let statuses: Vec<u16> = primary.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200], "the primary never answered 429");
    assert_eq!(fallback.requests().len(), 1);
    f.stop().await;
}

/// A fleet of 2 workers whose primary answered the first call 429 asking for
/// `retry_after`, so that call fell back; with `limited`, the primary's bucket has a
/// `limits` entry.
struct AfterA429 {
    primary: MockLlm,
    f: Fleet,
    _keep: (RedisServer, MockLlm, tempfile::TempDir, tempfile::TempDir),
}

/// What a fleet of [`WithFallback::start`] needs kept alive.
struct WithFallback {
    fallback: MockLlm,
    tmp: tempfile::TempDir,
    dir: tempfile::TempDir,
}

impl WithFallback {
    /// A fleet of 2 workers running type `L` on `primary`, falling back to a fresh mock,
    /// with a provider's Retry-After honoured up to 120 s, and what `tweak` adds.
    async fn start(
        redis: &RedisServer,
        primary: &MockLlm,
        tweak: impl FnOnce(&mut LlmProviderConfig),
    ) -> (Fleet, Self) {
        let fallback = mock().await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
        let mut cfg = test_config(&redis.url(), dir.path());
        let mut llm = llm_cfg(
            &primary.base_url(),
            Some(&fallback.base_url()),
            &key_file(tmp.path()),
        );
        llm.retry_after_max_secs = 120;
        tweak(&mut llm);
        cfg.llm_provider = Some(llm);
        let f = Fleet::start(cfg, 1, 2).await;
        (f, WithFallback { fallback, tmp, dir })
    }
}

impl AfterA429 {
    async fn start(primary: MockConfig, retry_after: Duration, limited: bool) -> Self {
        let redis = RedisServer::start();
        let primary = MockLlm::start(primary).await.unwrap();
        primary.script([Fault::RateLimited { retry_after }]);
        let (f, keep) = WithFallback::start(&redis, &primary, |llm| {
            if limited {
                llm.limits
                    .insert("openai_compatible/m1".into(), roomy_limit());
            }
        })
        .await;
        let first = f.submit("L", json!({"who": "a"})).await;
        assert_eq!(
            f.wait_finished(&first).await.status,
            ProcessStatus::Completed
        );
        assert_eq!(output(&f, &first, "Ask").await["fallbackUsed"], true);
        AfterA429 {
            primary,
            f,
            _keep: (redis, keep.fallback, keep.tmp, keep.dir),
        }
    }

    /// Later calls all go to the fallback: the primary saw only the first.
    async fn later_calls_fall_back(self, n: usize) {
        for i in 0..n {
            let id = self
                .f
                .submit("L", json!({ "who": format!("later{i}") }))
                .await;
            assert_eq!(
                self.f.wait_finished(&id).await.status,
                ProcessStatus::Completed
            );
            let out = output(&self.f, &id, "Ask").await;
            assert_eq!(out["fallbackUsed"], true, "{out}");
        }
        assert_eq!(
            self.primary.requests().len(),
            1,
            "the pause kept calls off the primary"
        );
        self.f.stop().await;
    }
}

/// A LiteLLM-style proxy forwards the provider's rate-limit headers only under the
/// `llm_provider-` prefix: its 429 pauses the bucket fleet-wide for the whole prefixed
/// `retry-after` (not the 1 s default), and later calls go to the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_429_with_only_prefixed_headers_pauses_for_its_retry_after() {
    let proxy = MockConfig {
        proxy_headers: true,
        ..MockConfig::default()
    };
    let t = AfterA429::start(proxy, Duration::from_secs(60), true).await;
    // The fleet-wide pause lasts the prefixed retry-after (60 s), not a 1 s default.
    let pause_key = &t.f.store().keys().llm_limit("openai_compatible/m1")[1];
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(pause_key)
        .query_async(&mut t.f.store().conn())
        .await
        .unwrap();
    assert!(ttl_ms > 30_000, "pause of {ttl_ms} ms");
    t.later_calls_fall_back(2).await;
}

/// A 429 on a bucket with no `limits` entry still pauses it for the whole fleet: the
/// worker that saw it, the other worker, and any other limiter on the same Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_an_unlimited_bucket_fleet_wide() {
    let t = AfterA429::start(MockConfig::default(), Duration::from_secs(30), false).await;
    // Another limiter (another worker process) sees the pause through Redis.
    let other = honua_worker::limit::LlmLimiter::new(t.f.store().clone(), Default::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let got = other
        .acquire(
            "openai_compatible/m1",
            10,
            Duration::from_millis(200),
            &cancel,
        )
        .await
        .unwrap();
    assert!(
        got.is_none(),
        "an unlimited bucket admitted a call while paused"
    );
    assert!(
        other
            .acquire("openai_compatible/other", 10, Duration::ZERO, &cancel)
            .await
            .unwrap()
            .is_some(),
        "an unpaused unlimited bucket admits at once"
    );
    t.later_calls_fall_back(4).await;
}

/// A plain-text 500 about a missing key (LiteLLM without `Authorization`) is a
/// credentials failure: permanent, never retried as a server error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_auth_500_is_permanent() {
    let redis = RedisServer::start();
    let primary = mock().await;
    primary.script([Fault::PlainAuth(500)]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.llm_provider = Some(llm_cfg(&primary.base_url(), None, &key_file(tmp.path())));
    let f = Fleet::start(cfg, 1, 1).await;
    let id = f.submit("L", json!({"who": "a"})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Failed, "{rec:#?}");
    assert_eq!(primary.requests().len(), 1, "not retried");
    let err = format!("{:?}", rec.steps["Ask"]);
    assert!(err.contains("refused the credentials"), "{err}");
    f.stop().await;
}

/// `honua_llm_cost_microdollars_total` adds up exactly: 13.5 µ$ calls are not rounded one
/// by one (a worker process, scraped at its metrics port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_counter_matches_the_summed_cost() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let key = key_file(tmp.path());
    // The scheduler only needs to know the `llm` kind; the worker process calls.
    cfg.llm_provider = Some(llm_cfg(&m.base_url(), None, &key));
    let section = format!(
        "[llm_provider]\nprovider = \"openai_compatible\"\nprices = {{ m1 = {{ input_per_1k = 0.0045, output_per_1k = 0.0 }} }}\n[llm_provider.openai_compatible]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
        m.base_url(),
        key.display()
    );
    let port = free_port();
    let toml = worker_toml(&cfg, &section).replace(
        "metrics_addr = \"\"",
        &format!("metrics_addr = \"127.0.0.1:{port}\""),
    );
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let log = tmp.path().join("exec.log");
    let _w = spawn_worker(&toml, tmp.path(), "w1", &log, "info");
    for i in 0..8 {
        // "hello ab00i": 11 characters = 3 prompt tokens = 13.5 µ$.
        let id = f.submit("L", json!({ "who": format!("ab00{i}") })).await;
        assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    }
    let reqs = m.requests();
    assert_eq!(reqs.len(), 8);
    let nanos: u64 = reqs.iter().map(|r| r.prompt_tokens * 4500).sum();
    assert_eq!(nanos, 8 * 13_500, "each call costs 13.5 µ$");
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted: f64 = body
        .lines()
        .filter(|l| l.starts_with("honua_llm_cost_microdollars_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, (nanos / 1000) as f64, "{body}");
    f.stop().await;
}

/// The submission's tenant reaches the `llm` step of a worker process: its calls are
/// charged to the process type's and tenant's shares of the bucket (the share state in the
/// bucket's hash), and the request and token counters carry a bounded `tenant` label (a
/// tenant with shares by name, any other as `other`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_reaches_the_llm_limiter_and_the_metrics() {
    let redis = RedisServer::start();
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let key = key_file(tmp.path());
    cfg.llm_provider = Some(llm_cfg(&m.base_url(), None, &key));
    let section = format!(
        "[llm_provider]\nprovider = \"openai_compatible\"\n[llm_provider.openai_compatible]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\
         [llm_provider.limits.\"openai_compatible/m1\"]\nrequestsPerMinute = 6000\nburstRequests = 100\n\
         shares = {{ L = {{ weight = 3 }} }}\ntenant_shares = {{ acme = {{ weight = 2, min_rpm = 10 }} }}\n",
        m.base_url(),
        key.display()
    );
    let port = free_port();
    let toml = worker_toml(&cfg, &section).replace(
        "metrics_addr = \"\"",
        &format!("metrics_addr = \"127.0.0.1:{port}\""),
    );
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let log = tmp.path().join("exec.log");
    let _w = spawn_worker(&toml, tmp.path(), "w1", &log, "info");
    let c = reqwest::Client::new();
    for (id, tenant) in [("p-acme", "acme"), ("p-zeta", "zeta")] {
        let r = c
            .post(f.url("/api/processes"))
            .json(&json!({"processType": "L", "id": id, "tenant": tenant, "input": {"who": id}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(f.wait_finished(id).await.status, ProcessStatus::Completed);
    }
    // The calls were charged to their shares (each share's state in the bucket's hash).
    let hash = f.store().keys().llm_limit("openai_compatible/m1")[0].clone();
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(hash.as_str())
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    for want in ["t:L:seen", "n:acme:seen", "n:*:seen"] {
        assert!(fields.iter().any(|k| k == want), "{want} in {fields:?}");
    }
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let has = |metric: &str, tenant: &str| {
        body.lines().any(|l| {
            l.starts_with(&format!("{metric}{{"))
                && l.contains(&format!("tenant=\"{tenant}\""))
                && l.contains("process_type=\"L\"")
        })
    };
    for metric in ["honua_llm_requests_total", "honua_llm_tokens_used_total"] {
        assert!(has(metric, "acme"), "{metric} for acme: {body}");
        assert!(has(metric, "other"), "{metric} for other tenants: {body}");
        assert!(!has(metric, "zeta"), "unbounded tenant label: {body}");
    }
    f.stop().await;
}

/// The circuit breaker is fleet-wide: 4 worker processes (each with its own local breaker)
/// against a primary in a 5xx streak. Once the breaker opens, the primary sees at most one
/// probe per `breaker_open_secs` from the whole fleet, and the steps go to the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_streak_opens_one_breaker_for_the_whole_fleet() {
    const OPEN_SECS: u64 = 2;
    let redis = RedisServer::start();
    let primary = mock().await;
    primary.script(vec![Fault::Status(502); 10_000]);
    let fallback = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let key = key_file(tmp.path());
    cfg.llm_provider = Some(llm_cfg(
        &primary.base_url(),
        Some(&fallback.base_url()),
        &key,
    ));
    let section = format!(
        "[llm_provider]\nprovider = \"openai_compatible\"\nfallback_provider = \"openai\"\n\
         breaker_failures = 2\nbreaker_open_secs = {OPEN_SECS}\nretry_initial_ms = 10\n\
         retry_max_ms = 50\nrequest_timeout_secs = 10\n\
         [llm_provider.openai_compatible]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n\
         [llm_provider.openai]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
        primary.base_url(),
        key.display(),
        fallback.base_url(),
        key.display()
    );
    let toml =
        worker_toml(&cfg, &section).replace("[worker]\n", "[worker]\nmax_concurrent_steps = 1\n");
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let log = tmp.path().join("exec.log");
    let _workers: Vec<TestWorker> = (0..4)
        .map(|i| spawn_worker(&toml, tmp.path(), &format!("w{i}"), &log, "info"))
        .collect();
    // Rounds of 4 steps until the run spans several open spells.
    let start = std::time::Instant::now();
    let mut done = 0;
    while start.elapsed() < Duration::from_secs(4 * OPEN_SECS + 1) {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(f.submit("L", json!({ "who": format!("s{done}") })).await);
            done += 1;
        }
        for id in &ids {
            assert_eq!(f.wait_finished(id).await.status, ProcessStatus::Completed);
        }
    }
    let run = start.elapsed();
    let mut at: Vec<std::time::Instant> = primary.requests().iter().map(|r| r.at).collect();
    at.sort();
    // The opening burst: 2 failures, plus at most the other 3 workers' calls already in
    // flight (one step per worker); any later call is a probe, the first one no earlier
    // than OPEN_SECS after the opening.
    let burst = at
        .iter()
        .take_while(|t| **t - at[0] < Duration::from_millis(OPEN_SECS * 500))
        .count();
    assert!((2..=5).contains(&burst), "opening burst of {burst}");
    let probes = &at[burst..];
    assert!(!probes.is_empty(), "the fleet never probed the primary");
    for pair in at[burst - 1..].windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(OPEN_SECS * 800),
            "two primary calls {gap:?} apart while the breaker was open: {:?}",
            at.iter().map(|t| *t - at[0]).collect::<Vec<_>>()
        );
    }
    let bound = run.as_secs() / OPEN_SECS + 1;
    assert!(
        probes.len() as u64 <= bound,
        "{} probes in {run:?}",
        probes.len()
    );
    assert_eq!(
        fallback.requests().len(),
        done,
        "every step ended on the fallback"
    );
    eprintln!(
        "FLEET BREAKER: {done} steps in {run:?}; primary saw {} calls ({} after the opening \
         burst, bound {bound}) at {:?}, fallback {}",
        at.len(),
        probes.len(),
        at.iter().map(|t| *t - at[0]).collect::<Vec<_>>(),
        fallback.requests().len()
    );
    f.stop().await;
}

/// The shipped process types do real LLM work: every type in `processes/` runs to
/// Completed against the mock over HTTP (the review gate approved), each `llm` step asked
/// with its output schema on the model its task class selects, its reply validating against
/// that schema, and the per-type token and cost counters of the worker that ran them moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_process_types_run_their_llm_steps_to_completed() {
    use honua_shared::definition::LLM_KIND;
    use honua_shared::definition::llm::{parse_spec, schema};
    use honua_shared::envelope::Event;
    use honua_shared::llm_config::ModelSelection;

    let redis = RedisServer::start();
    // The default completion: an instance of the request's schema, as structured output.
    let m = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = test_config(&redis.url(), &shipped_definitions());
    let key = key_file(tmp.path());
    cfg.llm_provider = Some(llm_cfg(&m.base_url(), None, &key));
    let section = format!(
        "[llm_provider]\nprovider = \"openai_compatible\"\n\
         prices = {{ \"gpt-4o\" = {{ input_per_1k = 0.0025, output_per_1k = 0.01 }}, \"gpt-4o-mini\" = {{ input_per_1k = 0.00015, output_per_1k = 0.0006 }} }}\n\
         [llm_provider.openai_compatible]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
        m.base_url(),
        key.display()
    );
    let port = free_port();
    let toml = worker_toml(&cfg, &section).replace(
        "metrics_addr = \"\"",
        &format!("metrics_addr = \"127.0.0.1:{port}\""),
    );
    let f = Fleet::start(cfg, 1, 0).await;
    let _w = spawn_worker(
        &toml,
        tmp.path(),
        "w1",
        &tmp.path().join("exec.log"),
        "info",
    );

    let types: Vec<String> = f.engine.defs.names().map(str::to_string).collect();
    assert_eq!(
        types,
        [
            "Benchmark",
            "Deployment",
            "GitOps",
            "Metadata",
            "Test",
            "Upgrade"
        ]
    );
    // Any input object works: the prompts quote the whole request.
    let mut ids = Vec::new();
    for t in &types {
        ids.push((t.clone(), f.submit(t, json!({})).await));
    }
    for (t, id) in &ids {
        let rec = wait_for("finish or wait for review", DEADLINE, || async {
            let r = f.record(id).await?;
            if r.status == ProcessStatus::WaitingForApproval {
                f.store()
                    .send_event(&Event::Signal {
                        process_id: id.clone(),
                        name: "review".into(),
                        value: "approve".into(),
                        by: None,
                    })
                    .await
                    .ok();
                return None;
            }
            r.status.is_finished().then_some(r)
        })
        .await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{t}: {rec:#?}");
    }

    // Each llm step: the schema was sent, the reply validates, the model is the task class's.
    let models = ModelSelection::default();
    let mut llm_steps = 0;
    for (t, id) in &ids {
        let def = f.engine.defs.latest(t).unwrap();
        for s in def.steps.iter().filter(|s| s.kind == LLM_KIND) {
            llm_steps += 1;
            let spec = parse_spec(&s.config).unwrap();
            let want = spec
                .schema
                .as_ref()
                .expect("every shipped llm step has a schema");
            let out = output(&f, id, &s.name).await;
            let got = &out["json"];
            schema::validate(want, got).unwrap_or_else(|e| panic!("{t}/{}: {e}: {got}", s.name));
            assert_eq!(
                schema::extract_json(out["text"].as_str().unwrap()).unwrap(),
                *got
            );
            assert_eq!(
                out["model"],
                models.model(spec.task_class),
                "{t}/{}",
                s.name
            );
            assert!(
                out["costUsd"].as_f64().unwrap() > 0.0,
                "{t}/{}: {out}",
                s.name
            );
        }
    }
    assert_eq!(llm_steps, 8);
    let reqs = m.requests();
    assert_eq!(reqs.len(), llm_steps, "one call per llm step");
    assert!(reqs.iter().all(|r| r.status == 200));

    // The per-type LLM series of the worker's /metrics.
    let body = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sum = |metric: &str, t: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter(|l| l.contains(&format!("process_type=\"{t}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for t in ["Deployment", "Upgrade", "Metadata", "GitOps", "Benchmark"] {
        assert!(sum("honua_llm_tokens_used_total", t) > 0.0, "{t}: {body}");
        assert!(
            sum("honua_llm_cost_microdollars_total", t) > 0.0,
            "{t}: {body}"
        );
    }
    assert_eq!(sum("honua_llm_tokens_used_total", "Test"), 0.0);
    let tokens: f64 = ["Deployment", "Upgrade", "Metadata", "GitOps", "Benchmark"]
        .iter()
        .map(|t| sum("honua_llm_tokens_used_total", t))
        .sum();
    assert_eq!(
        tokens,
        reqs.iter().map(|r| r.total_tokens()).sum::<u64>() as f64,
        "every token is counted under its process type"
    );
    f.stop().await;
}

/// An endpoint at `url` with the sentinel key.
fn endpoint_at(url: &str, key: &Path) -> EndpointConfig {
    EndpointConfig {
        base_url: Some(url.to_string()),
        api_key_file: Some(key.to_path_buf()),
        ..Default::default()
    }
}

/// Primary `primary` at `primary_url`, fallback (when given) `fallback` at its URL; one of
/// them is Anthropic, the other OpenAI-compatible.
fn mixed_cfg(
    primary: (ProviderKind, &str),
    fallback: Option<(ProviderKind, &str)>,
    key: &Path,
) -> LlmProviderConfig {
    let mut llm = LlmProviderConfig {
        provider: primary.0,
        fallback_provider: fallback.map(|f| f.0),
        retry_initial_ms: 100,
        retry_max_ms: 1000,
        limiter_max_wait_ms: 300,
        request_timeout_secs: 30,
        ..Default::default()
    };
    for (kind, url) in std::iter::once(primary).chain(fallback) {
        match kind {
            ProviderKind::Anthropic => llm.anthropic = Some(endpoint_at(url, key)),
            ProviderKind::OpenaiCompatible => {
                llm.openai_compatible = Some(endpoint_at(url, key));
            }
            other => panic!("not used here: {other}"),
        }
    }
    llm
}

/// An `llm` step against `provider = "anthropic"` (the mock's Messages API): the key goes
/// in `x-api-key`, the system prompt top-level, `max_tokens` always; usage and cost are
/// recorded for a plain and a streamed reply; a schema stated in the system prompt is
/// answered with matching JSON; `GET /api/config` shows the provider without its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_steps_complete_with_usage_recorded() {
    let redis = RedisServer::start();
    let m = MockLlm::start(MockConfig {
        api_key: Some(SENTINEL.into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let schema = r#", schema = { type = "object", required = ["verdict", "score"], additionalProperties = false, properties = { verdict = { type = "string", enum = ["approve", "reject"] }, score = { type = "integer", minimum = 3, maximum = 10 } } }"#;
    let dir = defs_dir(&[
        ("l.toml", &def("L", "", true)),
        ("s.toml", &def("S", schema, false)),
    ]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = mixed_cfg(
        (ProviderKind::Anthropic, &m.anthropic_base_url()),
        None,
        &key_file(tmp.path()),
    );
    llm.prices.insert(
        "m1".into(),
        Price {
            input_per_1k: 3.0,
            output_per_1k: 15.0,
        },
    );
    llm.limits.insert("anthropic/m1".into(), roomy_limit());
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;
    let id = f.submit("L", json!({"who": "ana"})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:#?}");

    let reqs = m.requests();
    assert_eq!(reqs.len(), 2, "one provider call per step");
    for r in &reqs {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.x_api_key.as_deref(),
            Some(SENTINEL),
            "the key in x-api-key"
        );
        assert_eq!(r.authorization, None, "no bearer token to Anthropic");
        assert_eq!(r.anthropic_version.as_deref(), Some("2023-06-01"));
        assert_eq!(r.max_tokens, Some(50));
    }
    assert!(!reqs[0].stream && reqs[1].stream, "Follow streams");
    assert_eq!(reqs[0].system, None);
    assert_eq!(
        reqs[1].system.as_deref(),
        Some("be brief"),
        "top-level system"
    );
    let ask = output(&f, &id, "Ask").await;
    assert_eq!(ask["text"], "echo: hello ana");
    assert_eq!(ask["provider"], "anthropic");
    assert_eq!(ask["model"], "m1");
    assert_eq!(ask["finishReason"], "end_turn");
    assert_eq!(ask["usage"]["inputTokens"], reqs[0].prompt_tokens);
    assert_eq!(ask["usage"]["outputTokens"], reqs[0].completion_tokens);
    assert_eq!(ask["usage"]["estimated"], false);
    let expected_cost = 3.0 * reqs[0].prompt_tokens as f64 / 1000.0
        + 15.0 * reqs[0].completion_tokens as f64 / 1000.0;
    assert!((ask["costUsd"].as_f64().unwrap() - expected_cost).abs() < 1e-9);
    let follow = output(&f, &id, "Follow").await;
    assert_eq!(follow["text"], "echo: you said: echo: hello ana");
    assert_eq!(
        follow["usage"]["inputTokens"], reqs[1].prompt_tokens,
        "input tokens from message_start"
    );
    assert_eq!(
        follow["usage"]["outputTokens"], reqs[1].completion_tokens,
        "output tokens from message_delta"
    );
    assert_eq!(follow["usage"]["estimated"], false);
    assert_eq!(follow["finishReason"], "end_turn");
    let tokens: u64 = redis::cmd("HGET")
        .arg(f.store().keys().llm_usage(&id))
        .arg("tokens")
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    assert_eq!(tokens, reqs.iter().map(|r| r.total_tokens()).sum::<u64>());

    // Structured output: the schema goes in the system prompt, the reply is validated.
    let s = f.submit("S", json!({"who": "sam"})).await;
    assert_eq!(f.wait_finished(&s).await.status, ProcessStatus::Completed);
    let out = output(&f, &s, "Ask").await;
    assert_eq!(
        out["json"],
        json!({"verdict": "approve", "score": 3}),
        "{out}"
    );
    let sent = m
        .requests()
        .last()
        .unwrap()
        .system
        .clone()
        .unwrap_or_default();
    assert!(sent.contains("JSON schema:"), "{sent}");

    let cfg_body = reqwest::get(f.url("/api/config"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let cfg_json: Value = serde_json::from_str(&cfg_body).unwrap();
    assert_eq!(cfg_json["llmProvider"]["provider"], "anthropic");
    assert_eq!(
        cfg_json["llmProvider"]["anthropic"]["baseUrl"],
        m.anthropic_base_url()
    );
    assert!(!cfg_body.contains(SENTINEL));
    f.stop().await;
}

/// A 429 with `retry-after` from the Anthropic primary (no `limits` entry for its bucket)
/// pauses `anthropic/m1` for the whole fleet: another limiter on the same Redis is refused,
/// and later calls go to the OpenAI-compatible fallback without touching the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_429_pauses_the_bucket_fleet_wide() {
    let redis = RedisServer::start();
    let primary = mock().await;
    primary.script([Fault::RateLimited {
        retry_after: Duration::from_secs(30),
    }]);
    let fallback = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = mixed_cfg(
        (ProviderKind::Anthropic, &primary.anthropic_base_url()),
        Some((ProviderKind::OpenaiCompatible, &fallback.base_url())),
        &key_file(tmp.path()),
    );
    llm.retry_after_max_secs = 120;
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 2).await;
    let first = f.submit("L", json!({"who": "a"})).await;
    assert_eq!(
        f.wait_finished(&first).await.status,
        ProcessStatus::Completed
    );
    let out = output(&f, &first, "Ask").await;
    assert_eq!(out["fallbackUsed"], true);
    assert_eq!(out["provider"], "openai_compatible");
    assert_eq!(out["attempts"][0]["provider"], "anthropic");
    assert_eq!(out["attempts"][0]["errorType"], "rate_limit");
    let seen = primary.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/messages");
    assert_eq!(seen[0].status, 429);
    // The pause lasts the provider's retry-after (30 s), not a 1 s default.
    let pause_key = &f.store().keys().llm_limit("anthropic/m1")[1];
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(pause_key)
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    assert!(ttl_ms > 20_000, "pause of {ttl_ms} ms");
    let other = honua_worker::limit::LlmLimiter::new(f.store().clone(), Default::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let got = other
        .acquire("anthropic/m1", 10, Duration::from_millis(200), &cancel)
        .await
        .unwrap();
    assert!(
        got.is_none(),
        "another limiter admitted a call while paused"
    );
    for i in 0..3 {
        let id = f.submit("L", json!({ "who": format!("later{i}") })).await;
        assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
        let out = output(&f, &id, "Ask").await;
        assert_eq!(out["fallbackUsed"], true, "{out}");
        assert!(out["attempts"].as_array().unwrap().is_empty(), "{out}");
    }
    assert_eq!(
        primary.requests().len(),
        1,
        "the pause kept calls off the primary"
    );
    f.stop().await;
}

/// An Anthropic answer whose `anthropic-ratelimit-requests-remaining` is 0 pauses the
/// bucket until its RFC 3339 reset: the next call goes to the fallback before any 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_anthropic_window_pauses_the_bucket_before_any_429() {
    let redis = RedisServer::start();
    let primary = MockLlm::start(MockConfig {
        limit: Some(honua_mock_llm::WindowLimit {
            window: Duration::from_secs(60),
            max_requests: 2,
            max_tokens: 0,
        }),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let fallback = mock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.llm_provider = Some(mixed_cfg(
        (ProviderKind::Anthropic, &primary.anthropic_base_url()),
        Some((ProviderKind::OpenaiCompatible, &fallback.base_url())),
        &key_file(tmp.path()),
    ));
    let f = Fleet::start(cfg, 1, 2).await;
    let mut used = Vec::new();
    for who in ["a", "b", "c"] {
        let id = f.submit("L", json!({ "who": who })).await;
        assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
        used.push(output(&f, &id, "Ask").await["fallbackUsed"] == true);
    }
    assert_eq!(used, vec![false, false, true]);
    let statuses: Vec<u16> = primary.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200], "the primary never answered 429");
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&f.store().keys().llm_limit("anthropic/m1")[1])
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    assert!(
        ttl_ms > 30_000,
        "paused until the reset, ~60 s: {ttl_ms} ms"
    );
    f.stop().await;
}

/// Fallback between providers of different kinds, both ways: an Anthropic primary
/// answering 529 (overloaded) opens its breaker and the OpenAI-compatible fallback
/// answers; an OpenAI-compatible primary answering 429 moves the call to an Anthropic
/// fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_crosses_provider_kinds_both_ways() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key_file(tmp.path());
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);

    // Anthropic → OpenAI-compatible on 529.
    let anthropic = mock().await;
    anthropic.script(vec![Fault::Status(529); 10]);
    let openai = mock().await;
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url(), dir.path());
    let mut llm = mixed_cfg(
        (ProviderKind::Anthropic, &anthropic.anthropic_base_url()),
        Some((ProviderKind::OpenaiCompatible, &openai.base_url())),
        &key,
    );
    llm.breaker_failures = 2;
    llm.breaker_open_secs = 600;
    cfg.llm_provider = Some(llm);
    let f = Fleet::start(cfg, 1, 1).await;
    let id = f.submit("L", json!({"who": "a"})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    let out = output(&f, &id, "Ask").await;
    assert_eq!(out["fallbackUsed"], true);
    assert_eq!(out["provider"], "openai_compatible");
    assert_eq!(out["text"], "echo: hello a");
    let types: Vec<(&str, &str)> = out["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["provider"].as_str().unwrap(),
                a["errorType"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        types,
        vec![("anthropic", "server_error"), ("anthropic", "server_error")]
    );
    let statuses: Vec<u16> = anthropic.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![529, 529]);
    assert_eq!(openai.requests().len(), 1);
    f.stop().await;

    // OpenAI-compatible → Anthropic on 429.
    let openai = mock().await;
    openai.script([Fault::RateLimited {
        retry_after: Duration::from_secs(1),
    }]);
    let anthropic = mock().await;
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.llm_provider = Some(mixed_cfg(
        (ProviderKind::OpenaiCompatible, &openai.base_url()),
        Some((ProviderKind::Anthropic, &anthropic.anthropic_base_url())),
        &key,
    ));
    let f = Fleet::start(cfg, 1, 1).await;
    let id = f.submit("L", json!({"who": "b"})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    let out = output(&f, &id, "Ask").await;
    assert_eq!(out["fallbackUsed"], true);
    assert_eq!(out["provider"], "anthropic");
    assert_eq!(out["text"], "echo: hello b");
    assert_eq!(out["attempts"][0]["errorType"], "rate_limit");
    let seen = anthropic.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/v1/messages");
    assert_eq!(seen[0].x_api_key.as_deref(), Some(SENTINEL));
    f.stop().await;
}

/// An Anthropic server that answers the first call and then refuses the key with a 401
/// `authentication_error` whose text echoes the `x-api-key` it saw.
async fn hostile_anthropic() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = Router::new().route(
        "/v1/messages",
        post(move |headers: HeaderMap| {
            let s = s.clone();
            async move {
                let key = headers
                    .get("x-api-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let n = {
                    let mut seen = s.lock().unwrap();
                    seen.push(key.clone());
                    seen.len()
                };
                if n == 1 {
                    return axum::Json(json!({
                        "id": "msg_1", "type": "message", "role": "assistant", "model": "m1",
                        "content": [{"type": "text", "text": "fine"}],
                        "stop_reason": "end_turn", "stop_sequence": null,
                        "usage": {"input_tokens": 3, "output_tokens": 1},
                    }))
                    .into_response();
                }
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"type": "error", "error": {
                        "type": "authentication_error",
                        "message": format!("invalid x-api-key: {key}")}})),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, seen)
}

/// The Anthropic key (a worker process logging at trace level) never appears in its log,
/// in the step's error (the provider echoed it), in the gateway's views or in Redis; the
/// refused key is a permanent `auth` failure, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_key_never_leaks_into_logs_redis_or_errors() {
    let redis = RedisServer::start();
    let (hostile, seen) = hostile_anthropic().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = defs_dir(&[("l.toml", &def("L", "", false))]);
    let mut cfg = test_config(&redis.url(), dir.path());
    let key = key_file(tmp.path());
    cfg.llm_provider = Some(mixed_cfg((ProviderKind::Anthropic, &hostile), None, &key));
    let section = format!(
        "[llm_provider]\nprovider = \"Anthropic\"\nretry_initial_ms = 20\nretry_max_ms = 100\n\
         [llm_provider.anthropic]\nbase_url = \"{hostile}\"\napi_key_file = \"{}\"\n",
        key.display()
    );
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let log = tmp.path().join("exec.log");
    let w = spawn_worker(
        &worker_toml(&cfg, &section),
        tmp.path(),
        "wk",
        &log,
        "trace",
    );
    let ok = f.submit("L", json!({"who": "dee"})).await;
    assert_eq!(f.wait_finished(&ok).await.status, ProcessStatus::Completed);
    assert_eq!(output(&f, &ok, "Ask").await["text"], "fine");
    let bad = f.submit("L", json!({"who": "eve"})).await;
    let rec = f.wait_finished(&bad).await;
    assert_eq!(rec.status, ProcessStatus::Failed, "{rec:#?}");
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [SENTINEL.to_string(), SENTINEL.to_string()],
        "the key was sent (so a leak would be possible), and the refusal not retried"
    );
    let err = rec.steps["Ask"].error.clone().unwrap_or_default();
    assert!(
        err.contains("refused the credentials") && err.contains("[redacted]"),
        "{err}"
    );
    assert!(!err.contains(SENTINEL), "{err}");
    for id in [&ok, &bad] {
        let body = reqwest::get(f.url(&format!("/api/processes/{id}")))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!body.contains(SENTINEL), "{body}");
    }
    let cfg_body = reqwest::get(f.url("/api/config"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(cfg_body.contains("\"anthropic\""), "{cfg_body}");
    assert!(!cfg_body.contains(SENTINEL));
    let all = dump_redis(&mut f.store().conn()).await;
    assert!(all.len() > 1000, "the dump has content");
    assert!(!contains(&all, SENTINEL), "the key is in Redis");
    drop(w);
    let logs = std::fs::read_to_string(tmp.path().join("wk.stdout")).unwrap()
        + &std::fs::read_to_string(tmp.path().join("wk.stderr")).unwrap();
    assert!(
        logs.contains("llm call failed"),
        "the worker logged the failure"
    );
    assert!(!logs.contains(SENTINEL), "the key is in the worker's log");
    f.stop().await;
}

/// The attributes of the console overview's row of `bucket` (`data-*` name → value).
async fn limiter_row(f: &Fleet, bucket: &str) -> Option<Vec<(String, String)>> {
    let page = reqwest::get(f.url("/ui")).await.ok()?.text().await.ok()?;
    let start = page.find(&format!("<tr data-bucket=\"{bucket}\""))?;
    let tag = &page[start..start + page[start..].find('>')?];
    Some(
        tag.split(" data-")
            .skip(1)
            .filter_map(|a| {
                let (k, v) = a.split_once("=\"")?;
                Some((k.to_string(), v.trim_end_matches('"').to_string()))
            })
            .collect(),
    )
}

fn attr<'a>(row: &'a [(String, String)], name: &str) -> &'a str {
    row.iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// The console's overview shows each LLM bucket's limiter state read from Redis: after a
/// call the bucket holds a non-zero fill (1 rpm and 1 tpm make it drain over minutes, far
/// longer than the test), and after the provider's 429 it is paused. The day's LLM spend
/// and each process's per-step usage and cost are shown too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_overview_shows_the_limiter_state() {
    let redis = RedisServer::start();
    let primary = mock().await;
    let bucket = "openai_compatible/m1";
    let limit = honua_shared::limiter::LimitSpec {
        requests_per_minute: 1,
        tokens_per_minute: 1,
        burst_requests: 10,
        burst_tokens: 100_000,
        ..Default::default()
    };
    let price = Price {
        input_per_1k: 1.0,
        output_per_1k: 2.0,
    };
    let (f, _keep) = WithFallback::start(&redis, &primary, |llm| {
        llm.limits.insert(bucket.into(), limit);
        llm.prices.insert("m1".into(), price);
    })
    .await;
    let before = limiter_row(&f, bucket).await.expect("the bucket's row");
    assert_eq!(attr(&before, "req-fill"), "0.000", "{before:?}");
    assert_eq!(attr(&before, "paused"), "no");

    let first = f.submit("L", json!({"who": "a"})).await;
    assert_eq!(
        f.wait_finished(&first).await.status,
        ProcessStatus::Completed
    );
    assert_eq!(output(&f, &first, "Ask").await["fallbackUsed"], false);
    let row = limiter_row(&f, bucket).await.unwrap();
    let req: f64 = attr(&row, "req-fill").parse().unwrap();
    let tok: f64 = attr(&row, "tok-fill").parse().unwrap();
    // One request (it drains at 1 per minute) and the call's tokens (1 per minute).
    assert!(req > 0.0 && req <= 1.0, "{row:?}");
    let used = primary.requests()[0].total_tokens() as f64;
    assert!(tok > 0.0 && tok <= used, "{row:?} vs {used} tokens");
    assert_eq!(attr(&row, "paused"), "no");

    primary.script([Fault::RateLimited {
        retry_after: Duration::from_secs(60),
    }]);
    let id = f.submit("L", json!({"who": "b"})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    assert_eq!(output(&f, &id, "Ask").await["fallbackUsed"], true);
    let row = limiter_row(&f, bucket).await.unwrap();
    assert_eq!(attr(&row, "paused"), "yes", "{row:?}");
    let page = reqwest::get(f.url("/ui"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("LLM limiter"), "{page}");

    // The day's spend of the type (and in total) is what the two processes were charged,
    // and each process page shows its llm step's usage and cost.
    let mut charged = 0;
    for id in [&first, &id] {
        let (tokens, micro) = f.store().llm_usage(id).await.unwrap().unwrap();
        assert!(tokens > 0 && micro > 0, "{tokens} {micro}");
        charged += micro;
        let detail = reqwest::get(f.url(&format!("/ui/processes/{id}")))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let want = format!("<tr data-step=\"Ask\" data-tokens=\"{tokens}\">");
        assert!(detail.contains(&want), "{want} not in {detail}");
    }
    let spend = format!("<tr data-micro-usd=\"{charged}\"><th scope=\"row\">L</th>");
    assert!(page.contains(&spend), "{spend} not in {page}");
    let total = format!("<tr id=\"llm-total\" data-micro-usd=\"{charged}\">");
    assert!(page.contains(&total), "{total} not in {page}");
    f.stop().await;
}
