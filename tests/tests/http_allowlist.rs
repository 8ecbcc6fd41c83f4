//! The `http` step kind's allowlist against real local HTTP servers: the bypasses of a
//! string-prefix check (userinfo that moves the host, dot segments plain or percent-encoded)
//! reach no server, and allowed URLs still work.

use axum::Router;
use axum::http::Uri;
use honua_worker::builtin::{Http, HttpOptions};
use honua_worker::{StepContext, StepError, StepHandler};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

/// A server answering every request with `{"server": name, "path": …}`; returns its port
/// and the paths it was asked for.
async fn server(name: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    let app = Router::new().fallback(move |uri: Uri| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(uri.path().to_string());
            axum::Json(json!({"server": name, "path": uri.path()}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

async fn call(h: &Http, url: &str) -> Result<Value, StepError> {
    let ctx = StepContext::for_test("http", json!({ "url": url }), json!({}));
    h.run(ctx).await.map(|o| o.output.unwrap_or(Value::Null))
}

fn http(allowlist: &[String]) -> Http {
    honua_runtime::install_crypto_provider();
    Http::new(HttpOptions {
        allowlist: allowlist.to_vec(),
        max_response_kb: 64,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_cannot_move_the_call_to_another_port() {
    let (p, p_hits) = server("P").await;
    let (q, q_hits) = server("Q").await;
    let h = http(&[format!("http://127.0.0.1:{p}")]);

    let ok = call(&h, &format!("http://127.0.0.1:{p}/x")).await.unwrap();
    assert_eq!(ok, json!({"server": "P", "path": "/x"}));

    let bypass = format!("http://127.0.0.1:{p}@127.0.0.1:{q}/x");
    let err = call(&h, &bypass).await.unwrap_err();
    assert!(matches!(err, StepError::Permanent(_)), "{err:?}");
    assert!(q_hits.lock().unwrap().is_empty(), "Q was called");
    assert_eq!(*p_hits.lock().unwrap(), vec!["/x".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_cannot_leave_the_allowed_path() {
    let (p, hits) = server("P").await;
    let h = http(&[format!("http://localhost:{p}/api/")]);

    let ok = call(&h, &format!("http://localhost:{p}/api/echo"))
        .await
        .unwrap();
    assert_eq!(ok, json!({"server": "P", "path": "/api/echo"}));
    // Dots that stay inside the prefix are resolved, and the resolved path is called.
    let ok = call(&h, &format!("http://localhost:{p}/api/v1/../v2"))
        .await
        .unwrap();
    assert_eq!(ok["path"], "/api/v2");

    for path in ["/api/../admin", "/api/%2e%2e/admin", "/api/..%2fadmin"] {
        let err = call(&h, &format!("http://localhost:{p}{path}"))
            .await
            .unwrap_err();
        assert!(matches!(err, StepError::Permanent(_)), "{path}: {err:?}");
    }
    let seen = hits.lock().unwrap().clone();
    assert_eq!(seen, vec!["/api/echo".to_string(), "/api/v2".to_string()]);
}
