//! Traces across attempts: a retried attempt and an attempt reclaimed after its worker was
//! killed (-9) are linked to the attempt before them, so the crash shows up in the trace.
//! The scheduler runs in this process (traced); the workers are `honua-test-worker`
//! processes exporting to the same in-test OTLP receiver. (Its own test binary: the
//! tracing subscriber and the span exporter are process-global.)

use honua_runtime::telemetry::{self, LogFormat, OtlpConfig, OtlpProtocol};
use honua_shared::status::ProcessStatus;
use honua_tests::otlp::{Receiver, Span, attrs, hex, spans_of};
use honua_tests::*;
use serde_json::json;

const DEFS: &[(&str, &str)] = &[
    defs::COUNT,
    (
        "flaky.toml",
        r#"
name = "Flaky"
version = 1
[[steps]]
name = "Fail"
kind = "fail"
retry = { max_attempts = 2, initial_backoff = "100ms", max_backoff = "100ms" }
"#,
    ),
];

/// The span id in a W3C `traceparent` (`00-<trace>-<span>-<flags>`).
fn span_id_of(traceparent: &str) -> &str {
    traceparent.split('-').nth(2).unwrap_or_default()
}

fn links(s: &Span) -> Vec<(String, String)> {
    s.links
        .iter()
        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_and_reclaimed_attempts_link_to_the_attempt_before() {
    honua_runtime::install_crypto_provider();
    let receiver = Receiver::default();
    let (addr, server) = receiver.start().await;
    let endpoint = format!("http://{addr}");
    let guard = telemetry::init_with(
        LogFormat::Json,
        Some(OtlpConfig {
            endpoint: endpoint.clone(),
            protocol: OtlpProtocol::Grpc,
            service_name: "honua-scheduler-test".into(),
        }),
    );
    assert!(guard.exporting(), "the OTLP exporter was not installed");

    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.custom_step_kinds = vec!["counter".into()];
    let log = dir.path().join("exec.log");
    let otel_env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_SERVICE_NAME", "honua-worker-test"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let spawn = |id: &str| {
        WorkerProcess::spawn_with_env(
            env!("CARGO_BIN_EXE_honua-test-worker"),
            &cfg,
            id,
            &log,
            &otel_env,
        )
    };
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let mut w1 = spawn("w1");

    // Retry: both attempts run (and are exported) on w1; the second links to the first.
    let flaky = f.submit("Flaky", json!({})).await;
    assert_eq!(f.wait_finished(&flaky).await.status, ProcessStatus::Failed);
    let attempts = wait_for("both attempts of Flaky exported", DEADLINE, || {
        guard.flush();
        let mut steps = spans_of(&receiver.spans(), &flaky)
            .remove("step.execute")
            .unwrap_or_default();
        steps.sort_by_key(|s| attrs(s)["honua.attempt"].clone());
        async move { (steps.len() == 2).then_some(steps) }
    })
    .await;
    let (first, second) = (&attempts[0], &attempts[1]);
    assert_eq!(attrs(first)["honua.attempt"], "1");
    assert_eq!(attrs(second)["honua.attempt"], "2");
    assert!(links(first).is_empty(), "a first attempt links nowhere");
    assert_eq!(
        links(second),
        [(hex(&first.trace_id), hex(&first.span_id))],
        "the retried attempt links to attempt 1"
    );
    assert_eq!(hex(&first.trace_id), hex(&second.trace_id), "one trace");

    // Reclaim: w1 is killed mid-step; w2 takes the job over after the lease. w1's span is
    // never exported (the process died), but w2's span links to it by the context `begin`
    // stored in the step record, and it counts the second delivery.
    let pid = f.submit("Count", json!({})).await;
    wait_for("w1 to start Count", DEADLINE, || async {
        read_log(&log)
            .into_iter()
            .find(|l| l.event == "start" && l.process_id == pid && l.worker == "w1")
    })
    .await;
    let first_trace = wait_for(
        "w1's attempt context in the step record",
        DEADLINE,
        || async {
            f.record(&pid)
                .await
                .and_then(|r| r.steps.get("Count")?.attempt_trace.clone())
        },
    )
    .await;
    w1.kill9();
    let _w2 = spawn("w2");
    let rec = f.wait_finished(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    let step = &rec.steps["Count"];
    assert_eq!(step.worker.as_deref(), Some("w2"));
    assert_eq!(step.deliveries, Some(2), "one reclaim");
    assert_eq!(
        step.previous_attempt_trace.as_deref(),
        Some(first_trace.as_str())
    );
    let retaken = wait_for("w2's attempt exported", DEADLINE, || {
        guard.flush();
        let s = spans_of(&receiver.spans(), &pid)
            .remove("step.execute")
            .unwrap_or_default()
            .into_iter()
            .find(|s| attrs(s)["honua.worker"] == "w2");
        async move { s }
    })
    .await;
    let a = attrs(&retaken);
    assert_eq!(a["honua.deliveries"], "2");
    assert_eq!(a["honua.outcome"], "ok");
    let submit = &spans_of(&receiver.spans(), &pid)["process.submit"][0];
    assert_eq!(hex(&retaken.trace_id), hex(&submit.trace_id), "one trace");
    assert_eq!(hex(&retaken.parent_span_id), hex(&submit.span_id));
    assert_eq!(
        links(&retaken),
        [(hex(&submit.trace_id), span_id_of(&first_trace).to_string())],
        "the reclaimed attempt links to the killed worker's attempt"
    );
    assert!(
        retaken.events.iter().any(|e| e.name == "reclaimed"),
        "the reclaimed attempt says so: {:?}",
        retaken.events
    );

    f.stop().await;
    drop(guard);
    server.abort();
}
