//! A load client for the LLM limiter tests: tasks that acquire from an
//! [`honua_worker::limit::LlmLimiter`], call an OpenAI-compatible endpoint (the mock), pause
//! the bucket on a 429 and settle each permit with the real usage. Used in-process and by
//! the `honua-llm-load` binary (one limiter per process).

use honua_shared::limiter::{Asker, LimitSpec};
use honua_worker::limit::{LimiterStats, LlmLimiter};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What one load client does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadSpec {
    pub redis_url: String,
    pub prefix: String,
    pub bucket: String,
    pub spec: LimitSpec,
    /// e.g. "http://127.0.0.1:PORT/v1".
    pub base_url: String,
    pub concurrency: usize,
    pub duration_ms: u64,
    /// Prompt length in characters (the mock counts ceil(chars / 4) tokens).
    pub prompt_chars: usize,
    pub max_tokens: u64,
    pub max_wait_ms: u64,
    /// Reconcile each permit with the response's usage.
    pub settle: bool,
    /// A label sent as the OpenAI `user` field, so the mock can tell clients apart.
    pub user: String,
    /// The process type the calls are charged to (fair shares); empty: none.
    #[serde(default)]
    pub process_type: String,
    /// The tenant the calls are charged to (fair shares).
    #[serde(default)]
    pub tenant: Option<String>,
}

/// What one load client saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub granted: u64,
    pub not_within_wait: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub tokens_used: u64,
    pub acquires: u64,
    pub acquire_round_trips: u64,
    pub settle_round_trips: u64,
    pub pause_round_trips: u64,
    pub fallbacks: u64,
    /// `acquire` calls of the whole limiter that ended "not within the wait bound".
    pub timeouts: u64,
    /// Redis round trips of those.
    pub refused_round_trips: u64,
}

impl LoadReport {
    fn add_stats(&mut self, s: LimiterStats) {
        self.acquires = s.acquires;
        self.acquire_round_trips = s.acquire_round_trips;
        self.settle_round_trips = s.settle_round_trips;
        self.pause_round_trips = s.pause_round_trips;
        self.fallbacks = s.fallbacks;
        self.timeouts = s.timeouts;
        self.refused_round_trips = s.refused_round_trips;
    }
}

/// The answer of one call.
#[derive(Debug, Clone)]
pub struct CallResult {
    pub status: u16,
    /// `usage.total_tokens` of a 200.
    pub total_tokens: u64,
    /// `Retry-After` of a 429 (`retry-after-ms` preferred).
    pub retry_after: Option<Duration>,
}

/// One chat completion call.
pub async fn call(
    client: &reqwest::Client,
    base_url: &str,
    prompt: &str,
    max_tokens: u64,
    user: &str,
) -> reqwest::Result<CallResult> {
    let resp = client
        .post(format!("{base_url}/chat/completions"))
        .bearer_auth("sk-load-test")
        .json(&json!({
            "model": "mock-gpt",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "user": user,
        }))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let h = resp.headers();
    let num = |name: &str| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let retry_after = num("retry-after-ms")
        .map(Duration::from_millis)
        .or_else(|| num("retry-after").map(Duration::from_secs));
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let total_tokens = body
        .pointer("/usage/total_tokens")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    Ok(CallResult {
        status,
        total_tokens,
        retry_after,
    })
}

/// Called with the request label right after each admission.
pub type OnGrant = Arc<dyn Fn(&str) + Send + Sync>;
/// Called after a 429 paused the bucket: (before the pause call, after it, pause length).
pub type OnPause = Arc<dyn Fn(Instant, Instant, Duration) + Send + Sync>;

/// Observers of a load run (in-process tests).
#[derive(Clone, Default)]
pub struct Hooks {
    /// Called with the request label right after each admission, before the call.
    pub on_grant: Option<OnGrant>,
    /// Called after a 429 paused the bucket: (before the pause call, after it, pause length).
    pub on_pause: Option<OnPause>,
}

/// Runs `spec.concurrency` tasks against `limiter` until `spec.duration_ms` has passed.
pub async fn run(spec: &LoadSpec, limiter: LlmLimiter, hooks: Hooks) -> LoadReport {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client");
    // Open the connections first (as a long-running worker has them), so the first calls
    // do not pay connection set-up between admission and arrival.
    let warm =
        (0..spec.concurrency).map(|_| client.get(format!("{}/models", spec.base_url)).send());
    for r in futures::future::join_all(warm).await {
        let _ = r.map(|r| r.status());
    }
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let cancel = CancellationToken::new();
    let end = Instant::now() + Duration::from_millis(spec.duration_ms);
    let prompt = "x".repeat(spec.prompt_chars);
    let reserve = (spec.prompt_chars as u64).div_ceil(4) + spec.max_tokens;
    let mut tasks = Vec::new();
    for task in 0..spec.concurrency {
        let (limiter, client, report, cancel, spec, prompt, hooks) = (
            limiter.clone(),
            client.clone(),
            report.clone(),
            cancel.clone(),
            spec.clone(),
            prompt.clone(),
            hooks.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let left = end.saturating_duration_since(Instant::now());
                let wait = Duration::from_millis(spec.max_wait_ms).min(left);
                let asker = Asker::new(spec.process_type.clone(), spec.tenant.clone());
                let permit = match limiter
                    .acquire_as(&spec.bucket, Some(&asker), reserve, wait, &cancel)
                    .await
                {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        report.lock().unwrap().not_within_wait += 1;
                        if wait < Duration::from_millis(spec.max_wait_ms) {
                            break; // the run ends before the next slot
                        }
                        continue;
                    }
                    Err(e) => panic!("acquire: {e}"),
                };
                if Instant::now() >= end {
                    // Too late to send: give the reservation back.
                    let _ = permit.release().await;
                    break;
                }
                n += 1;
                let label = format!("{}-{task}-{n}", spec.user);
                if let Some(f) = &hooks.on_grant {
                    f(&label);
                }
                report.lock().unwrap().granted += 1;
                match call(&client, &spec.base_url, &prompt, spec.max_tokens, &label).await {
                    Ok(r) => {
                        {
                            let mut rep = report.lock().unwrap();
                            *rep.statuses.entry(r.status).or_default() += 1;
                            rep.tokens_used += r.total_tokens;
                        }
                        if r.status == 429 {
                            let ra = r.retry_after.unwrap_or(Duration::from_secs(1));
                            let before = Instant::now();
                            limiter.pause(&spec.bucket, ra).await.expect("pause");
                            if let Some(f) = &hooks.on_pause {
                                f(before, Instant::now(), ra);
                            }
                        }
                        if spec.settle {
                            // A refused call used no tokens.
                            let _ = permit.settle(r.total_tokens).await;
                        }
                    }
                    Err(_) => {
                        report.lock().unwrap().transport_errors += 1;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
    let mut r = report.lock().unwrap().clone();
    r.add_stats(limiter.stats());
    r
}
