//! OTLP traces: one trace per process across the gateway, the scheduler and the workers.
//! An in-test OTLP/gRPC receiver collects the spans of an in-process fleet. (Its own test
//! binary: the tracing subscriber and the span exporter are process-global.)

use honua_mock_llm::{MockConfig, MockLlm};
use honua_runtime::telemetry::{self, LogFormat, OtlpConfig, OtlpProtocol};
use honua_shared::llm_config::{EndpointConfig, LlmProviderConfig, ProviderKind};
use honua_tests::otlp::{Receiver, Span, attrs, hex, spans_of};
use honua_tests::*;
use serde_json::json;
use std::collections::HashMap;

const DEFS: &[(&str, &str)] = &[(
    "traced.toml",
    r#"
name = "Traced"
version = 1
[[steps]]
name = "A"
kind = "noop"
next = "B"
[[steps]]
name = "B"
kind = "noop"
"#,
)];

/// A secret-looking input value that must appear in no span.
const SECRET: &str = "sk-never-in-a-span-4242";

async fn post(f: &Fleet, traceparent: Option<&str>) -> String {
    let mut req = reqwest::Client::new()
        .post(f.url("/api/processes"))
        .json(&json!({"processType": "Traced", "input": {"apiKey": SECRET}}));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 201);
    let body: serde_json::Value = r.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_per_process_across_gateway_scheduler_and_workers() {
    honua_runtime::install_crypto_provider();
    let receiver = Receiver::default();
    let (addr, server) = receiver.start().await;

    let guard = telemetry::init_with(
        LogFormat::Json,
        Some(OtlpConfig {
            endpoint: format!("http://{addr}"),
            protocol: OtlpProtocol::Grpc,
            service_name: "honua-traces-test".into(),
        }),
    );
    assert!(guard.exporting(), "the OTLP exporter was not installed");

    let redis = RedisServer::start();
    let defs = defs_dir(DEFS);
    std::fs::copy(
        shipped_definitions().join("deployment.toml"),
        defs.path().join("deployment.toml"),
    )
    .unwrap();
    // The Deployment's `llm` steps call the mock provider (their `chat` spans are children
    // of the step's span and carry no process id, so the checks below skip them).
    let llm = MockLlm::start(MockConfig::default()).await.unwrap();
    let mut cfg = test_config(&redis.url(), defs.path());
    cfg.llm_provider = Some(LlmProviderConfig {
        provider: ProviderKind::OpenaiCompatible,
        openai_compatible: Some(EndpointConfig {
            base_url: Some(llm.base_url()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let fleet = Fleet::start(cfg, 1, 2).await;

    // Without a traceparent: the submission starts a new trace.
    let root_pid = post(&fleet, None).await;
    // With one: the process joins the caller's trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let child_pid = post(&fleet, Some(&format!("00-{caller_trace}-{caller_span}-01"))).await;
    for pid in [&root_pid, &child_pid] {
        let rec = fleet.wait_finished(pid).await;
        assert_eq!(rec.status.as_str(), "Completed");
    }

    // Every span of both processes: one submit, two steps, and a transition per step.
    let complete = |all: &[Span], pid: &str| {
        let by = spans_of(all, pid);
        let n = |name: &str| by.get(name).map_or(0, Vec::len);
        n("process.submit") == 1 && n("step.execute") >= 2 && n("process.transition") >= 2
    };
    let all = wait_for("the spans of both processes", DEADLINE, || {
        guard.flush();
        let all = receiver.spans.lock().unwrap().clone();
        let ok = complete(&all, &root_pid) && complete(&all, &child_pid);
        async move { ok.then_some(all) }
    })
    .await;
    assert!(
        receiver
            .services
            .lock()
            .unwrap()
            .iter()
            .all(|s| s == "honua-traces-test")
    );

    for pid in [&root_pid, &child_pid] {
        let by = spans_of(&all, pid);
        let submit = &by["process.submit"][0];
        let trace = hex(&submit.trace_id);
        let process_span = hex(&submit.span_id);
        let a = attrs(submit);
        assert_eq!(a["honua.process_type"], "Traced");

        // The submit span's context is the process's stored traceparent.
        let rec = fleet.record(pid).await.unwrap();
        assert_eq!(
            rec.trace.as_deref(),
            Some(format!("00-{trace}-{process_span}-01").as_str()),
            "stored traceparent of {pid}"
        );

        // One trace id for the process; steps and transitions are children of the
        // process span.
        for name in ["step.execute", "process.transition"] {
            for s in &by[name] {
                assert_eq!(
                    hex(&s.trace_id),
                    trace,
                    "{name} span of {pid} in another trace"
                );
                assert_eq!(
                    hex(&s.parent_span_id),
                    process_span,
                    "{name} span of {pid} not a child of process.submit"
                );
            }
        }

        let mut steps: Vec<String> = by["step.execute"]
            .iter()
            .map(|s| {
                let a = attrs(s);
                for key in [
                    "honua.process_type",
                    "honua.step",
                    "honua.attempt",
                    "honua.deliveries",
                    "honua.worker",
                    "honua.outcome",
                ] {
                    assert!(a.contains_key(key), "step.execute lacks {key}: {a:?}");
                }
                assert_eq!(a["honua.process_type"], "Traced");
                assert_eq!(a["honua.outcome"], "ok");
                assert_eq!(a["honua.attempt"], "1");
                assert_eq!(a["honua.deliveries"], "1");
                assert!(a["honua.worker"].starts_with("worker-"));
                a["honua.step"].clone()
            })
            .collect();
        steps.sort();
        assert_eq!(steps, ["A", "B"]);

        let transitions: Vec<HashMap<String, String>> =
            by["process.transition"].iter().map(attrs).collect();
        for a in &transitions {
            assert_eq!(a["honua.process_type"], "Traced");
            assert_eq!(a["honua.event"], "step");
            assert!(a.contains_key("honua.status"), "{a:?}");
        }
        assert!(
            transitions
                .iter()
                .any(|a| a["honua.status"] == "Completed" && a["honua.commit"] == "ok"),
            "no transition to Completed: {transitions:?}"
        );
    }

    // Without a traceparent the submit span is a root; with one it is the caller's child.
    let root_submit = &spans_of(&all, &root_pid)["process.submit"][0];
    assert!(root_submit.parent_span_id.is_empty());
    assert_ne!(hex(&root_submit.trace_id), caller_trace);
    let child_submit = &spans_of(&all, &child_pid)["process.submit"][0];
    assert_eq!(hex(&child_submit.trace_id), caller_trace);
    assert_eq!(hex(&child_submit.parent_span_id), caller_span);
    assert_ne!(
        hex(&root_submit.trace_id),
        hex(&child_submit.trace_id),
        "two processes share a trace"
    );

    // No input value reaches a span (attributes or events).
    for s in &all {
        let text = format!("{s:?}");
        assert!(!text.contains(SECRET), "input leaked into span {}", s.name);
    }

    deployment_is_one_trace(&fleet, &guard, &receiver).await;

    fleet.stop().await;
    drop(guard);
    server.abort();
}

/// The shipped Deployment process (review gate approved over the API) is one trace: the
/// submit span is the root, every worker step and every scheduler transition its child.
/// The tree is printed (run with `--nocapture`) for the record.
async fn deployment_is_one_trace(
    fleet: &Fleet,
    guard: &telemetry::TelemetryGuard,
    receiver: &Receiver,
) {
    let http = reqwest::Client::new();
    let r = http
        .post(fleet.url("/api/processes"))
        .json(&json!({"processType": "Deployment", "input": {"app": "shop"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pid = r.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the review gate to take the approval", DEADLINE, || async {
        let r = http
            .post(fleet.url(&format!("/api/processes/{pid}/signal/review")))
            .json(&json!({"value": "approve"}))
            .send()
            .await
            .unwrap();
        (r.status() == 202).then_some(())
    })
    .await;
    let rec = fleet.wait_finished(&pid).await;
    assert_eq!(rec.status.as_str(), "Completed");
    let worker_steps = [
        "ConfigureObservability",
        "GenerateInfrastructureCode",
        "ValidateDeployment",
        "ValidateDeploymentRequirements",
    ];
    let spans = wait_for("every span of the Deployment", DEADLINE, || {
        guard.flush();
        let by = spans_of(&receiver.spans.lock().unwrap(), &pid);
        let done = by.get("step.execute").map_or(0, Vec::len) == worker_steps.len()
            && by.get("process.transition").is_some_and(|t| {
                t.iter()
                    .any(|s| attrs(s).get("honua.status").map(String::as_str) == Some("Completed"))
            });
        let all: Vec<Span> = by.into_values().flatten().collect();
        async move { done.then_some(all) }
    })
    .await;
    let root = spans.iter().find(|s| s.name == "process.submit").unwrap();
    let mut steps: Vec<String> = Vec::new();
    for s in &spans {
        assert_eq!(
            hex(&s.trace_id),
            hex(&root.trace_id),
            "{} in another trace",
            s.name
        );
        if s.name != "process.submit" {
            assert_eq!(
                hex(&s.parent_span_id),
                hex(&root.span_id),
                "{} not under the root",
                s.name
            );
        }
        if s.name == "step.execute" {
            steps.push(attrs(s)["honua.step"].clone());
        }
    }
    steps.sort();
    assert_eq!(steps, worker_steps);

    let mut children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name != "process.submit")
        .collect();
    children.sort_by_key(|s| s.start_time_unix_nano);
    let ms = |s: &Span| (s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano)) / 1_000_000;
    let at = |s: &Span| {
        (s.start_time_unix_nano
            .saturating_sub(root.start_time_unix_nano))
            / 1_000_000
    };
    let mut tree = format!(
        "trace {} (Deployment {pid})\nprocess.submit {} ms\n",
        hex(&root.trace_id),
        ms(root)
    );
    for s in children {
        let a = attrs(s);
        let what = match s.name.as_str() {
            "step.execute" => format!(
                "{} attempt {} on {} -> {}",
                a["honua.step"], a["honua.attempt"], a["honua.worker"], a["honua.outcome"]
            ),
            _ => format!(
                "{} -> {}",
                a.get("honua.event").map_or("", String::as_str),
                a.get("honua.status").map_or("", String::as_str)
            ),
        };
        tree.push_str(&format!(
            "  +{:>5} ms {} {what} ({} ms)\n",
            at(s),
            s.name,
            ms(s)
        ));
    }
    eprintln!("{tree}");
}
