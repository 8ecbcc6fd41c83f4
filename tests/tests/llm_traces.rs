//! The `chat` span of an `llm` step carries the OTel GenAI attributes (system, model, input
//! and output tokens) plus cache hit, fallback and limiter wait, as a child of the step's
//! span, and no span holds the prompt, the reply or the API key. (Its own test binary: the
//! tracing subscriber and the span exporter are process-global.)

use honua_mock_llm::{MockConfig, MockLlm};
use honua_runtime::telemetry::{self, LogFormat, OtlpConfig, OtlpProtocol};
use honua_shared::llm_config::{EndpointConfig, LlmCaching, LlmProviderConfig, ProviderKind};
use honua_shared::status::ProcessStatus;
use honua_tests::otlp::{Receiver, Span, attrs, hex, spans_of};
use honua_tests::*;
use serde_json::json;
use std::collections::HashMap;

const KEY: &str = "sk-honua-TRACE-SENTINEL-31c8e0";

const DEF: &str = r#"
name = "Ask"
version = 1
[[steps]]
name = "Ask"
kind = "llm"
config = { model = "m1", prompt = "tell me about {{input.topic}}", max_tokens = 40 }
"#;

/// The `chat` span under process `pid`'s `step.execute` span.
fn chat_span(all: &[Span], pid: &str) -> Option<Span> {
    let step = spans_of(all, pid).remove("step.execute")?.pop()?;
    all.iter()
        .find(|s| s.parent_span_id == step.span_id && s.name.starts_with("chat"))
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llm_spans_carry_gen_ai_attributes_and_no_content() {
    honua_runtime::install_crypto_provider();
    let receiver = Receiver::default();
    let (addr, server) = receiver.start().await;
    let guard = telemetry::init_with(
        LogFormat::Json,
        Some(OtlpConfig {
            endpoint: format!("http://{addr}"),
            protocol: OtlpProtocol::Grpc,
            service_name: "honua-llm-trace-test".into(),
        }),
    );
    assert!(guard.exporting(), "the OTLP exporter was not installed");

    let redis = RedisServer::start();
    let mock = MockLlm::start(MockConfig::default()).await.unwrap();
    let dir = defs_dir(&[("ask.toml", DEF)]);
    let key_file = dir.path().join("llm.key");
    std::fs::write(&key_file, KEY).unwrap();
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.llm_provider = Some(LlmProviderConfig {
        provider: ProviderKind::OpenaiCompatible,
        openai_compatible: Some(EndpointConfig {
            base_url: Some(mock.base_url()),
            api_key_file: Some(key_file),
            ..Default::default()
        }),
        llm_caching: LlmCaching {
            enabled: true,
            ttl_minutes: 5,
            force: false,
        },
        ..Default::default()
    });
    let f = Fleet::start(cfg, 1, 1).await;

    // The same question twice: the first call reaches the provider, the second is a hit.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = f.submit("Ask", json!({"topic": "volcanoes"})).await;
        assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
        ids.push(id);
    }
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1, "the second call was served from the cache");

    let chats: Vec<Span> = wait_for("both chat spans exported", DEADLINE, || {
        guard.flush();
        let all = receiver.spans();
        let found: Option<Vec<Span>> = ids.iter().map(|id| chat_span(&all, id)).collect();
        async move { found }
    })
    .await;
    let (miss, hit): (HashMap<_, _>, HashMap<_, _>) = (attrs(&chats[0]), attrs(&chats[1]));
    assert_eq!(chats[0].name, "chat m1");
    for a in [&miss, &hit] {
        assert_eq!(a["gen_ai.operation.name"], "chat");
        assert_eq!(a["gen_ai.system"], "openai");
        assert_eq!(a["gen_ai.request.model"], "m1");
        assert_eq!(a["gen_ai.request.max_tokens"], "40");
        assert_eq!(a["gen_ai.response.model"], "m1");
        assert_eq!(a["honua.llm.provider"], "openai_compatible");
        assert_eq!(a["honua.llm.fallback_used"], "false");
        assert_eq!(
            a["gen_ai.usage.input_tokens"],
            reqs[0].prompt_tokens.to_string()
        );
        assert_eq!(
            a["gen_ai.usage.output_tokens"],
            reqs[0].completion_tokens.to_string()
        );
        assert!(a["honua.llm.limiter_wait_ms"].parse::<u64>().is_ok());
    }
    assert_eq!(miss["honua.llm.cache_hit"], "false");
    assert_eq!(hit["honua.llm.cache_hit"], "true");
    assert_eq!(
        hex(&chats[0].trace_id),
        hex(&spans_of(&receiver.spans(), &ids[0])["process.submit"][0].trace_id),
        "the chat span is part of the process's trace"
    );

    // No span anywhere carries the prompt, the reply or the key.
    for s in receiver.spans() {
        let mut text = format!("{} {:?}", s.name, attrs(&s));
        for e in &s.events {
            text.push_str(&format!(" {} {:?}", e.name, e.attributes));
        }
        for needle in ["volcanoes", "echo:", KEY] {
            assert!(
                !text.contains(needle),
                "span {} holds {needle:?}: {text}",
                s.name
            );
        }
    }

    f.stop().await;
    drop(guard);
    server.abort();
}
