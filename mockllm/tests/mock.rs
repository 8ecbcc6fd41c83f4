//! The mock provider over real HTTP: OpenAI and Azure shapes, streaming, scripted faults,
//! its own window limit, and the records tests rely on.

use honua_mock_llm::{Completion, EveryNth, Fault, Latency, MockConfig, MockLlm, WindowLimit};
use serde_json::{Value, json};
use std::time::Duration;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn body(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": content}
        ],
        "max_tokens": max_tokens,
    })
}

#[tokio::test]
async fn chat_completion_reports_usage_and_records_the_request() {
    let mock = MockLlm::start(MockConfig {
        completion: Completion::Fixed("hello there".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let r = client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .bearer_auth("sk-sentinel")
        .json(&body("abcdefgh", 50))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(v["choices"][0]["message"]["content"], "hello there");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // "be brief" = 2 tokens, "abcdefgh" = 2, "hello there" = 3 (ceil(chars / 4)).
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 7);
    let recs = mock.requests();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].authorization.as_deref(), Some("Bearer sk-sentinel"));
    assert_eq!(recs[0].max_tokens, Some(50));
    assert_eq!(recs[0].total_tokens(), 7);
    assert!(recs[0].admitted());
}

#[tokio::test]
async fn max_tokens_cuts_the_completion() {
    let mock = MockLlm::start(MockConfig {
        completion: Completion::Fixed("z".repeat(400)),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let v: Value = client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&body("q", 10))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn azure_path_needs_api_version_and_checks_the_key() {
    let mock = MockLlm::start(MockConfig {
        api_key: Some("azure-key".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let url = |q: &str| {
        format!(
            "{}/openai/deployments/my-gpt/chat/completions{q}",
            mock.azure_endpoint()
        )
    };
    let c = client();
    let r = c
        .post(url("?api-version=2024-10-21"))
        .header("api-key", "azure-key")
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["model"], "my-gpt");
    let r = c
        .post(url("?api-version=2024-10-21"))
        .header("api-key", "wrong")
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(url(""))
        .header("api-key", "azure-key")
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let recs = mock.requests();
    assert_eq!(recs[0].deployment.as_deref(), Some("my-gpt"));
    assert_eq!(recs[0].api_version.as_deref(), Some("2024-10-21"));
    assert_eq!(recs[0].api_key.as_deref(), Some("azure-key"));
    assert_eq!(recs[1].status, 401);
}

#[tokio::test]
async fn streaming_sends_chunks_usage_and_done() {
    let mock = MockLlm::start(MockConfig {
        completion: Completion::Fixed("one two three four five".into()),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let mut b = body("hi", 100);
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let r = client()
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "one two three four five");
    assert!(chunks.len() >= 4, "several chunks: {}", chunks.len());
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert!(mock.requests()[0].stream);
}

#[tokio::test]
async fn scripted_faults_in_order() {
    let mock = MockLlm::start(MockConfig::default()).await.unwrap();
    mock.script([
        Fault::RateLimited {
            retry_after: Duration::from_millis(2500),
        },
        Fault::Status(500),
        Fault::Status(503),
        Fault::Ok,
    ]);
    let c = client();
    let send = || {
        c.post(format!("{}/chat/completions", mock.base_url()))
            .json(&body("hi", 5))
            .send()
    };
    let r = send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    assert_eq!(r.headers()["retry-after-ms"], "2500");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_exceeded");
    assert_eq!(send().await.unwrap().status(), 500);
    assert_eq!(send().await.unwrap().status(), 503);
    assert_eq!(send().await.unwrap().status(), 200);
    assert_eq!(send().await.unwrap().status(), 200);
    let statuses: Vec<u16> = mock.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 500, 503, 200, 200]);
}

#[tokio::test]
async fn every_nth_request_answers_429_and_a_scripted_fault_comes_first() {
    let mock = MockLlm::start(MockConfig {
        rate_limit_every: Some(EveryNth {
            every: 3,
            retry_after: Duration::from_millis(400),
        }),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let c = client();
    let send = || {
        c.post(format!("{}/chat/completions", mock.base_url()))
            .json(&body("hi", 5))
            .send()
    };
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            assert_eq!(r.headers()["retry-after-ms"], "400");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["error"]["type"], "rate_limit_exceeded");
        }
    }
    assert_eq!(statuses, vec![200, 200, 429, 200, 200, 429, 200]);
    let recs = mock.requests();
    assert_eq!(
        recs[2].fault,
        Some(Fault::RateLimited {
            retry_after: Duration::from_millis(400)
        })
    );
    assert_eq!(recs[3].fault, None);
    // A scripted answer takes the 9th request; the count goes on underneath it.
    assert_eq!(send().await.unwrap().status(), 200); // 8th
    mock.script([Fault::Status(503)]);
    assert_eq!(send().await.unwrap().status(), 503); // 9th: scripted, not the periodic 429
    assert_eq!(send().await.unwrap().status(), 200); // 10th
    assert_eq!(send().await.unwrap().status(), 200); // 11th
    assert_eq!(send().await.unwrap().status(), 429); // 12th
    // every = 0 turns it off.
    mock.reconfigure(|c| c.rate_limit_every.as_mut().unwrap().every = 0);
    for _ in 0..4 {
        assert_eq!(send().await.unwrap().status(), 200);
    }
    mock.stop().await;
}

#[tokio::test]
async fn hang_times_the_client_out_and_a_stream_can_stall() {
    let mock = MockLlm::start(MockConfig::default()).await.unwrap();
    mock.script([Fault::Hang, Fault::StallAfter(1)]);
    let c = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!("{}/chat/completions", mock.base_url());
    let e = c.post(&url).json(&body("hi", 5)).send().await.unwrap_err();
    assert!(e.is_timeout(), "{e}");
    // The stall: headers and a first chunk arrive, then nothing until the client gives up.
    let mut b = body("one two three four five six", 50);
    b["stream"] = json!(true);
    let c = client();
    let mut r = c.post(&url).json(&b).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("data: "));
    let next = tokio::time::timeout(Duration::from_millis(500), r.chunk()).await;
    assert!(next.is_err(), "the stream should stall");
    let recs = mock.requests();
    assert_eq!(recs[0].status, 0, "a hang is never answered");
    assert_eq!(recs[0].fault, Some(Fault::Hang));
    mock.stop().await;
}

#[tokio::test]
async fn own_window_limit_answers_429_with_retry_after_and_headers() {
    let mock = MockLlm::start(MockConfig {
        latency: Latency::Fixed(Duration::ZERO),
        completion: Completion::Fixed("ok".into()),
        limit: Some(WindowLimit {
            window: Duration::from_secs(60),
            max_requests: 3,
            max_tokens: 1_000,
        }),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let c = client();
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = c
            .post(format!("{}/chat/completions", mock.base_url()))
            .json(&body("hi", 5))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        remaining.push(
            r.headers()["x-ratelimit-remaining-requests"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    }
    assert_eq!(remaining, vec!["2", "1", "0"]);
    let r = c
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&body("hi", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    let recs = mock.requests();
    assert_eq!(recs.iter().filter(|r| r.admitted()).count(), 3);
    assert_eq!(recs[3].status, 429);
    assert_eq!(recs[3].completion_tokens, 0);
}

#[tokio::test]
async fn bad_requests_are_clear_errors_and_models_are_listed() {
    let mock = MockLlm::start(MockConfig::default()).await.unwrap();
    let c = client();
    let r = c
        .post(format!("{}/chat/completions", mock.base_url()))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = c
        .post(format!("{}/chat/completions", mock.base_url()))
        .json(&json!({"model": "m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("messages"));
    let v: Value = c
        .get(format!("{}/models", mock.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "mock-gpt");
}
