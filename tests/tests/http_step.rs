//! The `http` step kind against a real HTTP server: success output, retry on 5xx and 429
//! (Retry-After honoured), no retry on 4xx, response size cap, allow-list.

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use honua_shared::status::{ProcessStatus, StepStatus};
use honua_tests::*;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

async fn serve() -> (String, Arc<AtomicU32>) {
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let calls = flaky_calls.clone();
    let app = Router::new()
        .route(
            "/echo",
            post(|body: axum::Json<Value>| async move {
                axum::Json(json!({"seen_step": body["step"], "seen_input": body["input"]}))
            }),
        )
        .route(
            "/flaky",
            post(move || {
                let calls = calls.clone();
                async move {
                    match calls.fetch_add(1, Ordering::SeqCst) {
                        0 => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                        1 => {
                            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")]).into_response()
                        }
                        _ => axum::Json(json!({"ok": true})).into_response(),
                    }
                }
            }),
        )
        .route("/bad", post(|| async { StatusCode::BAD_REQUEST }))
        .route(
            "/big",
            post(|| async { axum::Json(json!({"s": "x".repeat(4096)})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, flaky_calls)
}

fn def(name: &str, url: &str, extra: &str) -> String {
    defs::http_call(
        name,
        r#"retry = { max_attempts = 4, initial_backoff = "10ms", max_backoff = "20ms" }"#,
        &format!(r#"url = "{url}"{extra}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_steps_call_allow_listed_endpoints_with_typed_errors() {
    let (base, flaky_calls) = serve().await;
    let files = [
        ("echo.toml", def("Echo", &format!("{base}/echo"), "")),
        ("flaky.toml", def("Flaky", &format!("{base}/flaky"), "")),
        ("bad.toml", def("Bad", &format!("{base}/bad"), "")),
        (
            "big.toml",
            def("Big", &format!("{base}/big"), ", max_response_kb = 1"),
        ),
        (
            "outside.toml",
            def("Outside", "http://127.0.0.1:9/elsewhere", ""),
        ),
    ];
    let dir = defs_dir(
        &files
            .iter()
            .map(|(n, t)| (*n, t.as_str()))
            .collect::<Vec<_>>(),
    );
    let redis = RedisServer::start();
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.worker.http_allowlist = vec![format!("{base}/")];
    let f = Fleet::start(cfg, 1, 1).await;

    let id = f.submit("Echo", json!({"region": "eu"})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{:?}", rec.error);
    let out: Value = f
        .cfg
        .codec()
        .decode(&f.store().load_data(&id).await.unwrap()["out:Call"])
        .unwrap();
    assert_eq!(
        out,
        json!({"seen_step": "Call", "seen_input": {"region": "eu"}})
    );

    let id = f.submit("Flaky", json!({})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{:?}", rec.error);
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 3, "503, 429, then 200");
    assert_eq!(rec.steps["Call"].attempts().len(), 3);

    for (t, code_word) in [
        ("Bad", "400"),
        ("Big", "exceeds"),
        ("Outside", "http_allowlist"),
    ] {
        let id = f.submit(t, json!({})).await;
        let rec = f.wait_finished(&id).await;
        assert_eq!(rec.status, ProcessStatus::Failed, "{t}");
        assert_eq!(rec.steps["Call"].status, StepStatus::Failed);
        assert_eq!(
            rec.steps["Call"].attempts().len(),
            1,
            "{t}: permanent errors are not retried"
        );
        assert!(
            rec.error.as_ref().unwrap().contains(code_word),
            "{t}: {:?}",
            rec.error
        );
    }
    f.stop().await;
}
