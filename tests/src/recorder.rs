//! A local HTTP server that records every call of the `http` step kind (by the body's
//! `processId`) before answering after a delay: slow steps whose side effects can be
//! counted, to tell how many times a step really ran.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Calls = Arc<Mutex<HashMap<String, u64>>>;

/// The recording server; it runs until the test's runtime stops.
pub struct Recorder {
    base: String,
    calls: Calls,
}

impl Recorder {
    /// Serves `POST /slow/{ms}` on a free loopback port: counts the call, then answers
    /// `{"ok": true}` after `ms` milliseconds.
    pub async fn start() -> Self {
        let calls: Calls = Arc::default();
        let app = Router::new()
            .route("/slow/{ms}", post(slow))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { base, calls }
    }

    /// The allow-list entry for workers.
    pub fn allow(&self) -> String {
        format!("{}/", self.base)
    }

    /// The URL of a call that takes `ms`.
    pub fn url(&self, ms: u64) -> String {
        format!("{}/slow/{ms}", self.base)
    }

    /// How many calls the steps of process `pid` made.
    pub fn calls(&self, pid: &str) -> u64 {
        self.calls.lock().unwrap().get(pid).copied().unwrap_or(0)
    }

    /// Calls per process id.
    pub fn all(&self) -> HashMap<String, u64> {
        self.calls.lock().unwrap().clone()
    }
}

async fn slow(
    State(calls): State<Calls>,
    Path(ms): Path<u64>,
    body: axum::Json<Value>,
) -> axum::Json<Value> {
    let pid = body["processId"].as_str().unwrap_or_default().to_string();
    *calls.lock().unwrap().entry(pid).or_default() += 1;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    axum::Json(json!({"ok": true}))
}

/// A one-step process type `name` whose step `Call` is an `http` call taking `ms`, retried
/// on errors (a refused commit is not an error: it is never retried).
pub fn slow_definition(name: &str, recorder: &Recorder, ms: u64) -> String {
    crate::defs::http_call(
        name,
        "timeout = \"60s\"\nretry = { max_attempts = 3, initial_backoff = \"10ms\", max_backoff = \"20ms\" }",
        &format!("url = \"{}\"", recorder.url(ms)),
    )
}
