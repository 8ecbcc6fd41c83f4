//! Whole-system tests of the operator API (`honua_scheduler::gateway`, `ops`) against a live
//! fleet on a real redis-server: the operations guide's curl commands, cancel and retry
//! with real workers and an in-test HTTP endpoint, purge, bearer-key roles, error bodies,
//! the OpenAPI document, queues, dead letters and replay, health, and the state tools
//! (decoded state, the check, deleting a process with every reference to it).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use honua_shared::config::{ApiKey, Role};
use honua_shared::envelope::JobEnvelope;
use honua_shared::status::ProcessStatus;
use honua_tests::*;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const DEFS: &[(&str, &str)] = &[
    (
        "ok.toml",
        r#"
name = "Ok"
version = 1
[[steps]]
name = "Only"
kind = "noop"
"#,
    ),
    (
        "other.toml",
        r#"
name = "Other"
version = 1
[[steps]]
name = "Only"
kind = "noop"
"#,
    ),
    (
        "bad.toml",
        r#"
name = "Bad"
version = 1
[[steps]]
name = "Boom"
kind = "fail"
config = { message = "deployment target unreachable", permanent = true }
"#,
    ),
    defs::GATE,
];

fn http() -> reqwest::Client {
    honua_runtime::install_crypto_provider();
    reqwest::Client::new()
}

/// Status and JSON body of a response (`Null` when the body is not JSON).
async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

async fn get_json(c: &reqwest::Client, url: &str) -> (u16, Value) {
    json_of(c.get(url).send().await.unwrap()).await
}

async fn post_json(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    json_of(c.post(url).json(&body).send().await.unwrap()).await
}

/// One key per role: `read-token` (dashboard), `operate-token` (oncall), `admin-token`
/// (platform).
fn role_keys() -> Vec<ApiKey> {
    let token_hash = honua_scheduler::gateway::token_hash;
    vec![
        ApiKey {
            name: "dashboard".into(),
            role: Role::Read,
            sha256: token_hash("read-token"),
        },
        ApiKey {
            name: "oncall".into(),
            role: Role::Operate,
            sha256: token_hash("operate-token"),
        },
        ApiKey {
            name: "platform".into(),
            role: Role::Admin,
            sha256: token_hash("admin-token"),
        },
    ]
}

/// Asserts the shape every error body has: `{"error": code, "detail": text}`.
fn assert_error_body(body: &Value, what: &str) {
    assert!(body["error"].is_string(), "{what}: no error code in {body}");
    assert!(body["detail"].is_string(), "{what}: no detail in {body}");
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not an array: {list}"))
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_status(f: &Fleet, id: &str, status: ProcessStatus) {
    wait_for(&format!("{id} {status}"), DEADLINE, || async {
        f.record(id).await.filter(|r| r.status == status)
    })
    .await;
}

/// Sets a flag when dropped: records that a request handler's future was dropped (the
/// client went away) rather than finished.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What the in-test endpoint saw.
#[derive(Clone, Default)]
struct Probe {
    calls: Arc<AtomicU32>,
    /// The first hanging request's future was dropped.
    dropped: Arc<AtomicBool>,
}

impl Probe {
    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
    fn dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// An HTTP server for `http` steps:
/// - `/hang` never answers;
/// - `/hang-once` never answers its first call, then answers 200;
/// - `/fixable` answers 400 unless the posted `input.fixed` is `true`.
async fn serve(probe: Probe) -> String {
    async fn hang_forever(p: &Probe) -> Response {
        let _flag = DropFlag(p.dropped.clone());
        std::future::pending::<()>().await;
        StatusCode::OK.into_response()
    }
    let app = Router::new()
        .route(
            "/hang",
            post(|State(p): State<Probe>| async move {
                p.calls.fetch_add(1, Ordering::SeqCst);
                hang_forever(&p).await
            }),
        )
        .route(
            "/hang-once",
            post(|State(p): State<Probe>| async move {
                if p.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    hang_forever(&p).await
                } else {
                    axum::Json(json!({"ok": true})).into_response()
                }
            }),
        )
        .route(
            "/fixable",
            post(
                |State(p): State<Probe>, body: axum::Json<Value>| async move {
                    p.calls.fetch_add(1, Ordering::SeqCst);
                    if body["input"]["fixed"] == json!(true) {
                        axum::Json(json!({"fixed": true})).into_response()
                    } else {
                        StatusCode::BAD_REQUEST.into_response()
                    }
                },
            ),
        )
        .with_state(probe);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// A fleet whose definitions call the in-test server at `base`.
async fn http_fleet(
    redis: &RedisServer,
    base: &str,
    defs: &[(&str, String)],
) -> (Fleet, tempfile::TempDir) {
    let dir = defs_dir(
        &defs
            .iter()
            .map(|(n, t)| (*n, t.as_str()))
            .collect::<Vec<_>>(),
    );
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.worker.http_allowlist = vec![format!("{base}/")];
    (Fleet::start(cfg, 1, 1).await, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_checks_list_failed_completed_and_active_processes() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    let failed = f.submit("Bad", json!({})).await;
    let mut completed = Vec::new();
    for _ in 0..3 {
        completed.push(f.submit("Ok", json!({})).await);
    }
    let other = f.submit("Other", json!({})).await;
    let gate = f.submit("Gate", json!({})).await;
    assert_eq!(f.wait_finished(&failed).await.status, ProcessStatus::Failed);
    for id in completed.iter().chain([&other]) {
        assert_eq!(f.wait_finished(id).await.status, ProcessStatus::Completed);
    }
    wait_status(&f, &gate, ProcessStatus::WaitingForApproval).await;

    // curl ".../api/processes?status=Failed&since=24h" | jq
    let (code, list) = get_json(&c, &f.url("/api/processes?status=Failed&since=24h")).await;
    assert_eq!(code, 200, "{list}");
    let ids = ids_of(&list);
    assert!(ids.contains(&failed), "{list}");
    assert!(!ids.iter().any(|i| completed.contains(i)), "{list}");
    let item = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == json!(failed))
        .unwrap();
    assert_eq!(item["status"], "Failed");
    assert_eq!(item["processType"], "Bad");
    let msg = item["errorMessage"].as_str().expect("errorMessage");
    assert!(msg.contains("deployment target unreachable"), "{msg}");
    assert!(item["duration"].as_f64().unwrap() >= 0.0, "{item}");
    // jq 'group_by(.errorMessage) | map({error: .[0].errorMessage, count: length})'
    for p in list.as_array().unwrap() {
        for field in ["errorMessage", "processType", "status", "duration"] {
            assert!(p.get(field).is_some(), "{field} missing from {p}");
        }
    }

    // curl ".../api/processes?status=Failed&since=7d" | jq > failed_processes.json
    let (code, week) = get_json(&c, &f.url("/api/processes?status=Failed&since=7d")).await;
    assert_eq!(code, 200, "{week}");
    assert_eq!(ids_of(&week), vec![failed.clone()]);

    // curl ".../api/processes?status=Completed&since=24h" | jq
    let (code, list) = get_json(&c, &f.url("/api/processes?status=Completed&since=24h")).await;
    assert_eq!(code, 200, "{list}");
    let ids = ids_of(&list);
    for id in completed.iter().chain([&other]) {
        assert!(ids.contains(id), "{id} missing from {list}");
    }
    assert!(!ids.contains(&failed), "{list}");
    assert!(!ids.contains(&gate), "{list}");
    for p in list.as_array().unwrap() {
        assert_eq!(p["status"], "Completed");
        assert!(p["errorMessage"].is_null(), "{p}");
        assert!(p["duration"].as_f64().unwrap() >= 0.0, "{p}");
    }

    // curl .../api/processes/active | jq '. | length'
    let (code, active) = get_json(&c, &f.url("/api/processes/active")).await;
    assert_eq!(code, 200, "{active}");
    assert_eq!(ids_of(&active), vec![gate.clone()], "{active}");
    assert_eq!(active[0]["status"], "WaitingForApproval");
    assert_eq!(active[0]["currentSteps"], json!(["Review"]));

    // processType= filter.
    let (code, list) = get_json(&c, &f.url("/api/processes?processType=Other")).await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(ids_of(&list), vec![other.clone()]);
    let (_, list) = get_json(
        &c,
        &f.url("/api/processes?status=Completed&since=24h&processType=Ok"),
    )
    .await;
    let got: HashSet<String> = ids_of(&list).into_iter().collect();
    assert_eq!(got, completed.iter().cloned().collect::<HashSet<_>>());

    // Paging: limit=1 and x-next-cursor walk every item once.
    let all: HashSet<String> = completed.iter().chain([&other]).cloned().collect();
    let seen = list_all(&c, &f, "status=Completed&limit=1").await;
    assert_eq!(
        seen.len(),
        all.len(),
        "pages overlap or miss items: {seen:?}"
    );
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), all);

    // A process created between two pages neither repeats nor hides an item.
    let r = c.get(f.url("/api/processes?limit=1")).send().await.unwrap();
    let cur = r.headers()["x-next-cursor"].to_str().unwrap().to_string();
    let first = ids_of(&r.json::<Value>().await.unwrap());
    let newer = f.submit("Ok", json!({})).await;
    let r = c
        .get(f.url(&format!("/api/processes?limit=1&cursor={cur}")))
        .send()
        .await
        .unwrap();
    let second = ids_of(&r.json::<Value>().await.unwrap());
    assert_eq!(second.len(), 1);
    assert_ne!(first, second, "the second page repeats the first");
    assert_ne!(
        second[0], newer,
        "a newer process leaked into an older page"
    );

    // A filter that matches nothing in the newest pages still leads to older matches.
    for _ in 0..25 {
        f.submit("Ok", json!({})).await;
    }
    let found = list_all(&c, &f, "processType=Other&limit=1").await;
    assert_eq!(found, vec![other.clone()]);
    f.stop().await;
}

/// Every id a `limit=1` listing yields, following `x-next-cursor` (pages may be empty).
async fn list_all(c: &reqwest::Client, f: &Fleet, query: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let mut url = f.url(&format!("/api/processes?{query}"));
        if let Some(cur) = &cursor {
            url = format!("{url}&cursor={cur}");
        }
        let r = c.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        cursor = r
            .headers()
            .get("x-next-cursor")
            .map(|v| v.to_str().unwrap().to_string());
        let page = ids_of(&r.json::<Value>().await.unwrap());
        assert!(page.len() <= 1, "limit=1 gave {page:?}");
        seen.extend(page);
        if cursor.is_none() {
            return seen;
        }
    }
    panic!("paging did not end: {seen:?}");
}

fn hang_def(name: &str, url: &str) -> String {
    defs::http_call(name, r#"timeout = "10m""#, &format!(r#"url = "{url}""#))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_the_running_step_on_its_worker() {
    let probe = Probe::default();
    let base = serve(probe.clone()).await;
    let redis = RedisServer::start();
    let (f, _dir) = http_fleet(
        &redis,
        &base,
        &[("hang.toml", hang_def("Hang", &format!("{base}/hang")))],
    )
    .await;
    let c = http();
    let id = f.submit("Hang", json!({})).await;
    wait_for("the endpoint called", DEADLINE, || async {
        (probe.calls() == 1).then_some(())
    })
    .await;
    let held = |f: &Fleet| {
        let c = c.clone();
        let url = f.url("/api/workers");
        let id = id.clone();
        async move {
            let (code, ws) = get_json(&c, &url).await;
            assert_eq!(code, 200, "{ws}");
            ws.as_array()
                .unwrap()
                .iter()
                .flat_map(|w| w["jobs"].as_array().unwrap().clone())
                .any(|j| j["processId"] == json!(id))
        }
    };
    // The worker holds the job while the call hangs.
    wait_for("the job shown held", DEADLINE, || async {
        held(&f).await.then_some(())
    })
    .await;

    // curl -X POST ".../api/processes/${PROCESS_ID}/cancel"
    let r = c
        .post(f.url(&format!("/api/processes/{id}/cancel")))
        .send()
        .await
        .unwrap();
    let (code, body) = json_of(r).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "Cancelled");
    assert_eq!(body["id"], json!(id));
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
    assert_eq!(view["status"], "Cancelled");
    assert!(
        view["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "cancel"),
        "{view}"
    );

    // The worker's handler is cancelled: the in-flight request is dropped, and the job is
    // no longer held.
    wait_for("the hanging request dropped", DEADLINE, || async {
        probe.dropped().then_some(())
    })
    .await;
    wait_for("no job held for the process", DEADLINE, || async {
        (!held(&f).await).then_some(())
    })
    .await;
    assert_eq!(probe.calls(), 1, "the cancelled step is not called again");

    let r = c
        .post(f.url(&format!("/api/processes/{id}/cancel")))
        .send()
        .await
        .unwrap();
    let (code, body) = json_of(r).await;
    assert_eq!(code, 409, "{body}");
    assert_error_body(&body, "second cancel");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_resumes_from_the_failed_step_with_a_state_patch() {
    let probe = Probe::default();
    let base = serve(probe.clone()).await;
    let redis = RedisServer::start();
    let def = format!(
        r#"
name = "Fixable"
version = 1
[[steps]]
name = "A"
kind = "noop"
next = "B"
[[steps]]
name = "B"
kind = "http"
next = "C"
config = {{ url = "{base}/fixable" }}
[[steps]]
name = "C"
kind = "noop"
"#
    );
    let (f, _dir) = http_fleet(&redis, &base, &[("fixable.toml", def)]).await;
    let c = http();
    let id = f.submit("Fixable", json!({"region": "eu"})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Failed, "{rec:?}");
    assert!(rec.error.as_deref().unwrap().contains("400"), "{rec:?}");
    assert_eq!(probe.calls(), 1, "a 4xx is permanent: not retried");

    let url = f.url(&format!("/api/processes/{id}/retry"));
    let (code, body) = post_json(&c, &url, json!({"statePatch": {"fixed": true}})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["id"], json!(id));
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
    assert_eq!(probe.calls(), 2);

    let (code, view) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
    assert_eq!(code, 200);
    assert_eq!(view["status"], "Completed");
    assert!(view["errorMessage"].is_null(), "{view}");
    // curl ".../api/processes/${PROCESS_ID}" | jq '.duration'
    assert!(view["duration"].as_f64().unwrap() >= 0.0, "{view}");
    let attempts = |step: &str| {
        view["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == step)
            .unwrap_or_else(|| panic!("no step {step} in {view}"))["attempts"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(attempts("A"), 1, "A is not re-run: {view}");
    assert_eq!(attempts("B"), 2, "{view}");
    assert_eq!(attempts("C"), 1, "{view}");
    assert!(
        view["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "retry"),
        "{view}"
    );
    // The patch was merged into the input, keeping the other keys.
    let input: Value = f
        .cfg
        .codec()
        .decode(&f.store().load_data(&id).await.unwrap()["input"])
        .unwrap();
    assert_eq!(input, json!({"region": "eu", "fixed": true}));

    let (code, body) = post_json(&c, &url, json!({})).await;
    assert_eq!(code, 409, "{body}");
    assert_error_body(&body, "retry of a completed process");

    // From a chosen step, a Completed process runs again: B and what follows it; A, which
    // B depends on, keeps its result.
    let (code, body) = post_json(&c, &url, json!({"fromStep": "B"})).await;
    assert_eq!(code, 200, "{body}");
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
    assert_eq!(probe.calls(), 3);
    let counts: Vec<usize> = ["A", "B", "C"]
        .iter()
        .map(|s| rec.steps[*s].attempts().len())
        .collect();
    assert_eq!(counts, [1, 3, 2], "{rec:?}");
    let audit = rec.audit.last().unwrap();
    assert_eq!(
        (audit.action.as_str(), audit.detail.as_deref()),
        ("retry", Some("from step B (chosen)"))
    );
    // A step the definition lacks: 400, nothing changes.
    let (code, body) = post_json(&c, &url, json!({"fromStep": "Nope"})).await;
    assert_eq!(code, 400, "{body}");
    assert_error_body(&body, "retry from an unknown step");
    assert_eq!(f.record(&id).await.unwrap().rev, rec.rev);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_current_step_fences_a_stuck_claim_and_runs_it_again() {
    let probe = Probe::default();
    let base = serve(probe.clone()).await;
    let redis = RedisServer::start();
    let (f, _dir) = http_fleet(
        &redis,
        &base,
        &[(
            "stuck.toml",
            hang_def("Stuck", &format!("{base}/hang-once")),
        )],
    )
    .await;
    let c = http();
    let id = f.submit("Stuck", json!({})).await;
    wait_for("the first call", DEADLINE, || async {
        (probe.calls() == 1).then_some(())
    })
    .await;
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
    assert_eq!(view["status"], "Running", "{view}");

    // curl -X POST ".../api/processes/${PROCESS_ID}/retry-current-step"
    let (code, body) = post_json(
        &c,
        &f.url(&format!("/api/processes/{id}/retry-current-step")),
        json!(null),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["steps"], json!(["Call"]));
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
    assert_eq!(probe.calls(), 2);
    // The old claim was fenced out, so its worker cancelled the hanging call.
    wait_for("the first request dropped", DEADLINE, || async {
        probe.dropped().then_some(())
    })
    .await;
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
    assert!(
        view["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "retry-current-step"),
        "{view}"
    );
    // Nothing left to retry once finished.
    let r = c
        .post(f.url(&format!("/api/processes/{id}/retry-current-step")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_old_finished_processes_only() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    let gate = f.submit("Gate", json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(f.submit("Ok", json!({})).await);
    }
    for id in &ids {
        assert_eq!(f.wait_finished(id).await.status, ProcessStatus::Completed);
    }
    wait_status(&f, &gate, ProcessStatus::WaitingForApproval).await;

    // curl -X DELETE ".../api/processes?status=Completed&olderThan=30d"
    let purge = |q: &'static str| {
        let c = c.clone();
        let url = f.url(&format!("/api/processes?{q}"));
        async move { json_of(c.delete(url).send().await.unwrap()).await }
    };
    let (code, body) = purge("status=Completed&olderThan=30d").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, json!({"deleted": 0}), "nothing is 30 days old");
    // Once they are over a second old, all three go (possibly over several calls).
    let deleted = AtomicU64::new(0);
    wait_for("three purged", DEADLINE, || async {
        let (code, body) = purge("status=Completed&olderThan=1s").await;
        assert_eq!(code, 200, "{body}");
        let n = deleted.fetch_add(body["deleted"].as_u64().unwrap(), Ordering::SeqCst);
        (n + body["deleted"].as_u64().unwrap() >= 3).then_some(())
    })
    .await;
    assert_eq!(deleted.load(Ordering::SeqCst), 3);
    for id in &ids {
        let (code, body) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
        assert_eq!(code, 404, "{id}: {body}");
        assert_error_body(&body, "purged process");
    }
    let (code, view) = get_json(&c, &f.url(&format!("/api/processes/{gate}"))).await;
    assert_eq!(code, 200);
    assert_eq!(view["status"], "WaitingForApproval");
    let (_, list) = get_json(&c, &f.url("/api/processes?status=Completed")).await;
    assert_eq!(list, json!([]));

    for q in [
        "status=Running&olderThan=1s",
        "status=WaitingForApproval&olderThan=1s",
        "status=Completed&olderThan=soon",
        "status=Completed",
        "olderThan=1s",
    ] {
        let (code, body) = purge(q).await;
        assert_eq!(code, 400, "{q}: {body}");
        assert_error_body(&body, q);
    }
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{gate}"))).await;
    assert_eq!(view["status"], "WaitingForApproval");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_keys_enforce_roles() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.api.keys = role_keys();
    let f = Fleet::start(cfg, 1, 1).await;
    let c = http();
    let list = f.url("/api/processes");
    let send = |req: reqwest::RequestBuilder, token: Option<&str>| {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        async move { req.send().await.unwrap() }
    };

    // No token, a malformed header, or an unknown token: 401 with a challenge.
    for (req, what) in [
        (send(c.get(&list), None).await, "no token"),
        (
            send(c.get(&list).header("authorization", "Basic eDp5"), None).await,
            "basic auth",
        ),
        (send(c.get(&list), Some("guess")).await, "unknown token"),
        (
            send(c.post(&list).json(&json!({"processType": "Ok"})), None).await,
            "anonymous submit",
        ),
    ] {
        assert_eq!(req.status(), 401, "{what}");
        assert_eq!(req.headers()["www-authenticate"], "Bearer", "{what}");
        let (_, body) = json_of(req).await;
        assert_error_body(&body, what);
    }

    // read: may list, may not submit.
    let r = send(c.get(&list), Some("read-token")).await;
    assert_eq!(r.status(), 200);
    let r = send(
        c.post(&list).json(&json!({"processType": "Ok"})),
        Some("read-token"),
    )
    .await;
    let (code, body) = json_of(r).await;
    assert_eq!(code, 403, "{body}");
    assert_error_body(&body, "read submit");

    // operate: may submit, may not purge.
    let r = send(
        c.post(&list).json(&json!({"processType": "Ok"})),
        Some("operate-token"),
    )
    .await;
    let (code, body) = json_of(r).await;
    assert_eq!(code, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let purge = || c.delete(format!("{list}?status=Completed&olderThan=30d"));
    let r = send(purge(), Some("operate-token")).await;
    assert_eq!(r.status(), 403);

    // admin: may purge.
    let r = send(purge(), Some("admin-token")).await;
    let (code, body) = json_of(r).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["deleted"], 0);

    // Health stays open for probes.
    for path in ["/health", "/health/live", "/health/ready"] {
        let r = send(c.get(f.url(path)), None).await;
        assert_eq!(r.status(), 200, "{path}");
    }

    // Existence is not revealed without a token.
    let unknown = f.url("/api/processes/no-such-process");
    let r = send(c.get(&unknown), None).await;
    assert_eq!(r.status(), 401);
    let r = send(c.get(&unknown), Some("read-token")).await;
    let (code, body) = json_of(r).await;
    assert_eq!(code, 404, "{body}");
    assert_error_body(&body, "unknown process");
    let r = send(
        c.get(f.url(&format!("/api/processes/{id}"))),
        Some("read-token"),
    )
    .await;
    assert_eq!(r.status(), 200);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_json_errors() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    let done = f.submit("Ok", json!({})).await;
    assert_eq!(
        f.wait_finished(&done).await.status,
        ProcessStatus::Completed
    );
    let gate = f.submit("Gate", json!({})).await;
    wait_status(&f, &gate, ProcessStatus::WaitingForApproval).await;

    let check = |r: reqwest::Response, status: u16, code: Option<&'static str>, what: String| async move {
        let (got, body) = json_of(r).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_error_body(&body, &what);
        if let Some(code) = code {
            assert_eq!(body["error"], code, "{what}");
        }
    };

    for (body, code) in [
        ("{not json", "malformed_json"),
        (r#"{"processType":"Nope"}"#, "unknown_process_type"),
        (r#"{"processType":"Ok","bogus":1}"#, "malformed_json"),
        (r#"{"input":{}}"#, "malformed_json"),
        (r#"{"processType":"Ok","input":"x"}"#, "invalid_input"),
    ] {
        let r = c
            .post(f.url("/api/processes"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        check(r, 400, Some(code), body.to_string()).await;
    }

    for q in [
        "since=yesterday",
        "status=Finished",
        "limit=many",
        "sort=age",
        "cursor=garbage",
    ] {
        let r = c
            .get(f.url(&format!("/api/processes?{q}")))
            .send()
            .await
            .unwrap();
        check(r, 400, None, q.to_string()).await;
    }
    let r = c.get(f.url("/api/deadletters?x=1")).send().await.unwrap();
    check(r, 400, Some("invalid_query"), "deadletters query".into()).await;

    let r = c
        .post(f.url(&format!("/api/processes/{done}/cancel")))
        .send()
        .await
        .unwrap();
    check(r, 409, Some("invalid_state"), "cancel completed".into()).await;
    let r = c
        .post(f.url(&format!("/api/processes/{done}/retry-current-step")))
        .send()
        .await
        .unwrap();
    check(
        r,
        409,
        Some("invalid_state"),
        "retry-current-step completed".into(),
    )
    .await;
    let r = c
        .post(f.url(&format!("/api/processes/{gate}/retry")))
        .send()
        .await
        .unwrap();
    check(r, 409, Some("invalid_state"), "retry waiting".into()).await;

    // curl -X POST ".../api/processes/${PROCESS_ID}/retry" (no body) re-runs a failed
    // process; and curl -d sends JSON as a form, which is accepted.
    let r = c
        .post(f.url("/api/processes"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"processType":"Bad"}"#)
        .send()
        .await
        .unwrap();
    let (code, body) = json_of(r).await;
    assert_eq!(code, 201, "{body}");
    let bad = body["id"].as_str().unwrap().to_string();
    assert_eq!(f.wait_finished(&bad).await.status, ProcessStatus::Failed);
    let r = c
        .post(f.url(&format!("/api/processes/{bad}/retry")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = wait_for("the retried run to fail again", DEADLINE, || async {
        f.record(&bad)
            .await
            .filter(|r| r.status == ProcessStatus::Failed && r.steps["Boom"].attempts().len() == 2)
    })
    .await;
    assert_eq!(rec.audit.len(), 1, "{rec:?}");
    for (method, path) in [
        ("GET", "/api/processes/nope-123"),
        ("POST", "/api/processes/nope-123/cancel"),
        ("POST", "/api/processes/nope-123/retry"),
        ("POST", "/api/processes/nope-123/retry-current-step"),
        ("POST", "/api/processes/nope-123/signal/review"),
        ("POST", "/api/deadletters/1-0/replay"),
        ("GET", "/api/no-such-route"),
    ] {
        let r = c
            .request(method.parse().unwrap(), f.url(path))
            .send()
            .await
            .unwrap();
        check(r, 404, None, format!("{method} {path}")).await;
    }
    let r = c.put(f.url("/api/processes")).send().await.unwrap();
    check(r, 405, None, "PUT".into()).await;

    // A body over the limit (1 MiB by default).
    let big = format!(
        r#"{{"processType":"Ok","input":{{"s":"{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    // The server answers 413 and closes the connection without reading the rest of the
    // body, so the client can see a reset while it is still uploading instead of the
    // answer: that race is the client's, so a transport error is retried (never a status).
    // Its own client, so the closed connection never goes back into `c`'s pool (a later
    // request reusing it would meet a broken pipe).
    let once = http();
    let mut tries = 0;
    let r = loop {
        tries += 1;
        match once
            .post(f.url("/api/processes"))
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
        {
            Ok(r) => break r,
            Err(_) if tries < 5 => continue,
            Err(e) => panic!("2 MiB body: no answer after {tries} tries: {e}"),
        }
    };
    check(r, 413, Some("body_too_large"), "2 MiB body".into()).await;

    // Signals: an unknown value, malformed JSON, and a signal nobody waits for.
    let sig = f.url(&format!("/api/processes/{gate}/signal/review"));
    let r = c
        .post(&sig)
        .json(&json!({"value": "LGTM!"}))
        .send()
        .await
        .unwrap();
    check(r, 400, Some("invalid_request"), "LGTM!".into()).await;
    let r = c.post(&sig).body("{").send().await.unwrap();
    check(r, 400, Some("malformed_json"), "signal body".into()).await;
    let r = c
        .post(f.url(&format!("/api/processes/{gate}/signal/deploy")))
        .send()
        .await
        .unwrap();
    check(r, 409, None, "wrong signal".into()).await;
    let r = c
        .post(f.url(&format!("/api/processes/{gate}/retry")))
        .json(&json!({"statePatch": [1]}))
        .send()
        .await
        .unwrap();
    check(r, 400, None, "array patch".into()).await;
    // The gate is untouched by all of that.
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{gate}"))).await;
    assert_eq!(view["status"], "WaitingForApproval");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_and_config_describe_the_running_gateway() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    // A nopass user accepts any password, so the URL can carry one to be redacted.
    let url = format!("redis://default:s3cret-pw@127.0.0.1:{}", redis.port);
    let mut cfg = test_config(&url, dir.path());
    cfg.api.keys = vec![ApiKey {
        name: "dashboard".into(),
        role: Role::Read,
        sha256: honua_scheduler::gateway::token_hash("read-token"),
    }];
    let f = Fleet::start(cfg, 1, 0).await;
    let c = http();

    let r = c
        .get(f.url("/api/openapi.json"))
        .bearer_auth("read-token")
        .send()
        .await
        .unwrap();
    let (code, doc) = json_of(r).await;
    assert_eq!(code, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for (method, path, _) in honua_scheduler::gateway::ROUTES {
        assert!(
            doc["paths"][*path]
                .get(method.to_ascii_lowercase())
                .is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }

    // curl ".../api/config" | jq '.processFramework.defaultTimeoutMinutes'
    let r = c
        .get(f.url("/api/config"))
        .bearer_auth("read-token")
        .send()
        .await
        .unwrap();
    let (code, cfg) = json_of(r).await;
    assert_eq!(code, 200);
    assert_eq!(
        cfg["processFramework"]["defaultTimeoutMinutes"], 60,
        "{cfg}"
    );
    assert_eq!(
        cfg["redisUrl"],
        format!("redis://default:***@127.0.0.1:{}", redis.port)
    );
    assert_eq!(
        cfg["api"]["keys"],
        json!([{"name": "dashboard", "role": "read"}])
    );
    let text = cfg.to_string();
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert!(
        !text.contains(&honua_scheduler::gateway::token_hash("read-token")),
        "{text}"
    );
    assert_eq!(cfg["worker"]["maxDeliveries"], 3, "{cfg}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 0).await;
    let c = http();
    let st = f.store();
    st.ensure_groups().await.unwrap();
    let id = f.submit("Ok", json!({})).await;

    // A fake consumer takes the job and never finishes it.
    let entries = take_jobs(st, "fake").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(
        JobEnvelope::from_fields(&entries[0].fields)
            .unwrap()
            .process_id,
        id
    );
    let (code, queues) = get_json(&c, &f.url("/api/queues")).await;
    assert_eq!(code, 200, "{queues}");
    let queues = queues.as_array().unwrap();
    assert_eq!(queues.len(), 4, "{queues:?}");
    for q in queues {
        for field in ["stream", "length", "pending", "lag"] {
            assert!(q.get(field).is_some(), "{field} missing from {q}");
        }
    }
    let jobs = queues
        .iter()
        .find(|q| q["stream"] == json!(st.keys().jobs().to_string()))
        .unwrap_or_else(|| panic!("no job stream in {queues:?}"));
    assert_eq!(jobs["pending"], 1, "{jobs}");
    assert_eq!(jobs["lag"], 0, "{jobs}");

    // A second delivery exceeds max_deliveries 1: dead-lettered.
    let r = st
        .reclaim("other", Duration::ZERO, "0-0", 10, 1)
        .await
        .unwrap();
    assert_eq!(r.dead_lettered.len(), 1, "{r:?}");
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    assert_eq!(rec.code.as_deref(), Some("max_deliveries"), "{rec:?}");
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
    assert_eq!(view["errorCode"], "max_deliveries");

    let (code, dlq) = get_json(&c, &f.url("/api/deadletters")).await;
    assert_eq!(code, 200, "{dlq}");
    let dlq = dlq.as_array().unwrap().clone();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let dead = &dlq[0];
    assert_eq!(dead["processId"], json!(id));
    assert_eq!(dead["step"], "Only");
    // The reclaim that found it over the limit was not a run: one delivery ran.
    assert_eq!(dead["deliveries"], 1, "{dead}");
    assert!(
        dead["reason"].as_str().unwrap().contains("max_deliveries"),
        "{dead}"
    );
    let dead_id = dead["id"].as_str().unwrap().to_string();

    let replay = f.url(&format!("/api/deadletters/{dead_id}/replay"));
    let (code, body) = json_of(c.post(&replay).send().await.unwrap()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["id"], json!(id));
    assert_eq!(body["status"], "Running");
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
    assert_eq!(view["status"], "Running", "{view}");
    assert_eq!(view["steps"][0]["status"], "queued", "{view}");
    assert_eq!(view["currentSteps"], json!(["Only"]));
    let (_, dlq) = get_json(&c, &f.url("/api/deadletters")).await;
    assert_eq!(dlq, json!([]));
    let (code, body) = json_of(c.post(&replay).send().await.unwrap()).await;
    assert_eq!(code, 404, "{body}");
    assert_error_body(&body, "second replay");
    // The replayed job is back in the stream for a worker.
    let (_, queues) = get_json(&c, &f.url("/api/queues")).await;
    let jobs = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["stream"] == json!(st.keys().jobs().to_string()))
        .unwrap()
        .clone();
    assert_eq!(jobs["lag"], 1, "{jobs}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_redis_and_readiness() {
    let mut redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    // curl .../health → {"status":"Healthy","checks":{"redis":"Healthy",...}}
    let (code, h) = get_json(&c, &f.url("/health")).await;
    assert_eq!(code, 200, "{h}");
    assert!(h["status"] == "Healthy" || h["status"] == "Degraded", "{h}");
    assert_eq!(h["checks"]["redis"], "Healthy", "{h}");
    // Once the worker has heartbeaten, nothing is degraded.
    wait_for("healthy with a live worker", DEADLINE, || async {
        let (_, h) = get_json(&c, &f.url("/health")).await;
        (h["status"] == "Healthy").then_some(())
    })
    .await;
    let (code, _) = get_json(&c, &f.url("/health/live")).await;
    assert_eq!(code, 200);
    let (code, _) = get_json(&c, &f.url("/health/ready")).await;
    assert_eq!(code, 200);

    redis.kill9();
    let r = c.get(f.url("/health/ready")).send().await.unwrap();
    assert!(r.headers().contains_key("retry-after"));
    let (code, body) = json_of(r).await;
    assert_eq!(code, 503, "{body}");
    assert_error_body(&body, "ready without redis");
    let (code, h) = get_json(&c, &f.url("/health")).await;
    assert_eq!(code, 503, "{h}");
    assert_eq!(h["checks"]["redis"], "Unhealthy");
    let (code, _) = get_json(&c, &f.url("/health/live")).await;
    assert_eq!(code, 200, "liveness does not depend on redis");
    f.stop().await;
}

// ---------------------------------------------------------------------------------------
// Hardening (issue 12): bad input is refused at the door and changes nothing.
// ---------------------------------------------------------------------------------------

/// `GateOn`: [`defs::GATE`] whose approval step also routes outcome `hold` to step `Hold`.
fn gate_on() -> String {
    let text = defs::GATE
        .1
        .replace("name = \"Gate\"", "name = \"GateOn\"")
        .replace(
            "next = \"Apply\"",
            "next = \"Apply\"\non = { hold = \"Hold\" }",
        );
    format!("{text}[[steps]]\nname = \"Hold\"\nkind = \"noop\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_value_the_step_does_not_route_on_is_refused_and_changes_nothing() {
    let redis = RedisServer::start();
    let gate_on = gate_on();
    let mut files = DEFS.to_vec();
    files.push(("gate_on.toml", &gate_on));
    let dir = defs_dir(&files);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    let gate = f.submit("Gate", json!({})).await;
    wait_status(&f, &gate, ProcessStatus::WaitingForApproval).await;
    let events = f.store().keys().events();
    let sent_before = entries_added(f.store(), &events).await;

    // A typo of approve, and an outcome name the step has no route for.
    let sig = f.url(&format!("/api/processes/{gate}/signal/review"));
    for value in ["aprove", "hold", "needs_changes"] {
        let (code, body) = post_json(&c, &sig, json!({ "value": value })).await;
        assert_eq!(code, 400, "{value}: {body}");
        assert_eq!(body["error"], "invalid_request", "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("approve, reject"),
            "names the accepted values: {detail}"
        );
        assert!(detail.contains(value), "{detail}");
    }
    // Nothing was sent to the scheduler, and the gate still waits.
    assert_eq!(entries_added(f.store(), &events).await, sent_before);
    let rec = f.record(&gate).await.unwrap();
    assert_eq!(rec.status, ProcessStatus::WaitingForApproval);
    assert!(!rec.steps.contains_key("Apply"), "{rec:?}");

    // approve still releases it, and the remaining step runs.
    let (code, body) = post_json(&c, &sig, json!({"value": "approve"})).await;
    assert_eq!(code, 202, "{body}");
    let rec = f.wait_finished(&gate).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    assert_eq!(
        rec.steps["Apply"].status,
        honua_shared::status::StepStatus::Completed
    );

    // A name in the step's `on` table is accepted and followed; the error names it too.
    let on = f.submit("GateOn", json!({})).await;
    wait_status(&f, &on, ProcessStatus::WaitingForApproval).await;
    let sig = f.url(&format!("/api/processes/{on}/signal/review"));
    let (code, body) = post_json(&c, &sig, json!({"value": "aprove"})).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .ends_with("approve, reject, hold"),
        "{body}"
    );
    let (code, body) = post_json(&c, &sig, json!({"value": "hold"})).await;
    assert_eq!(code, 202, "{body}");
    let rec = f.wait_finished(&on).await;
    assert_eq!(
        rec.steps["Hold"].status,
        honua_shared::status::StepStatus::Completed
    );
    assert!(!rec.steps.contains_key("Apply"), "{rec:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_idempotency_key_answers_the_stored_process_or_409() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 0).await;
    let c = http();
    let url = f.url("/api/processes");
    let body = json!({"processType": "Ok", "input": {"n": 1}, "idempotencyKey": "order-7"});
    let (code, first) = post_json(&c, &url, body.clone()).await;
    assert_eq!(code, 201, "{first}");
    let id = first["id"].as_str().unwrap().to_string();

    // The same request again (key in the body or the header): the stored process.
    let (code, again) = post_json(&c, &url, body.clone()).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(
        again,
        json!({"id": id, "processType": "Ok", "duplicate": true})
    );
    let r = c
        .post(&url)
        .header("idempotency-key", "order-7")
        .json(&json!({"processType": "Ok", "input": {"n": 1}}))
        .send()
        .await
        .unwrap();
    let (code, again) = json_of(r).await;
    assert_eq!((code, &again["id"]), (200, &json!(id)), "{again}");

    // Another type or another input under the same key: a client bug, made visible.
    for (other, differs) in [
        (
            json!({"processType": "Other", "input": {"n": 1}, "idempotencyKey": "order-7"}),
            "processType",
        ),
        (
            json!({"processType": "Ok", "input": {"n": 2}, "idempotencyKey": "order-7"}),
            "input",
        ),
        (
            json!({"processType": "Ok", "idempotencyKey": "order-7"}),
            "input",
        ),
    ] {
        let (code, err) = post_json(&c, &url, other.clone()).await;
        assert_eq!(code, 409, "{other}: {err}");
        assert_eq!(err["error"], "idempotency_key_reused", "{err}");
        let detail = err["detail"].as_str().unwrap();
        assert!(detail.contains(&id) && detail.contains(differs), "{detail}");
    }
    // Through the submission stream (the scheduler consumes it): set aside with its reason.
    let reused = honua_shared::envelope::Submission {
        process_type: "Other".into(),
        version: None,
        input: json!({"n": 1}),
        id: None,
        idempotency_key: Some("order-7".into()),
        tenant: None,
        trace: Default::default(),
    };
    let keys = f.store().keys();
    xadd_submission(f.store(), &reused).await;
    let q = wait_for("the reused key quarantined", DEADLINE, || async {
        let e = f
            .store()
            .stream_entries(&keys.quarantine(), 10)
            .await
            .ok()?;
        e.into_iter().next()
    })
    .await;
    let reason = q.fields.get("reason").unwrap();
    assert!(
        reason.contains("idempotency key order-7") && reason.contains(&id),
        "{reason}"
    );
    // Nothing new was created.
    let (_, list) = get_json(&c, &url).await;
    assert_eq!(ids_of(&list), [id.as_str()]);
    f.stop().await;
}

/// Writes `sub` to the submission stream as any Redis client would.
async fn xadd_submission(
    store: &honua_shared::store::Store,
    sub: &honua_shared::envelope::Submission,
) {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(store.keys().submit()).arg("*");
    for (k, v) in sub.to_fields() {
        xadd.arg(k).arg(v);
    }
    let _: String = xadd.query_async(&mut store.conn()).await.unwrap();
}

/// `{"a": {"a": ... 1}}`, `levels` objects deep.
fn nested(levels: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..levels {
        v = json!({ "a": v });
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_deep_input_is_refused_at_submission_and_a_bad_traceparent_is_dropped() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.state.max_depth = 8;
    let f = Fleet::start(cfg, 1, 1).await;
    let c = http();
    let url = f.url("/api/processes");

    // Over HTTP: 400, and no process.
    let (code, body) = post_json(&c, &url, json!({"processType": "Ok", "input": nested(12)})).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"], "invalid_input", "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("deeper than 8"),
        "{body}"
    );
    // Within the depth: accepted and run.
    let (code, body) = post_json(&c, &url, json!({"processType": "Ok", "input": nested(6)})).await;
    assert_eq!(code, 201, "{body}");
    let ok = body["id"].as_str().unwrap().to_string();
    assert_eq!(f.wait_finished(&ok).await.status, ProcessStatus::Completed);

    // Through the submission stream: quarantined, no process.
    let keys = f.store().keys();
    let deep = honua_shared::envelope::Submission {
        process_type: "Ok".into(),
        version: None,
        input: nested(12),
        id: Some("too-deep".into()),
        idempotency_key: None,
        tenant: None,
        trace: Default::default(),
    };
    xadd_submission(f.store(), &deep).await;
    let quarantined = wait_for("the deep submission quarantined", DEADLINE, || async {
        let n: u64 = redis::cmd("XLEN")
            .arg(keys.quarantine())
            .query_async(&mut f.store().conn())
            .await
            .unwrap();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(quarantined, 1);
    assert!(f.record("too-deep").await.is_none(), "no process for it");

    // A traceparent is kept only in the W3C format; a longer one is not copied anywhere.
    let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let long = format!("{good}-{}", "f".repeat(8 * 1024));
    let mut stored = Vec::new();
    for tp in [good.to_string(), long] {
        let r = c
            .post(&url)
            .header("traceparent", &tp)
            .json(&json!({"processType": "Ok"}))
            .send()
            .await
            .unwrap();
        let (code, body) = json_of(r).await;
        assert_eq!(code, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        stored.push(f.wait_finished(&id).await.trace);
    }
    assert_eq!(stored, [Some(good.to_string()), None]);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_page_sizes_cursors_and_dead_letter_ids_are_400() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    let done = f.submit("Ok", json!({})).await;
    f.wait_finished(&done).await;

    for q in [
        "/api/processes?limit=0",
        "/api/processes?limit=1001",
        "/api/processes?limit=-1",
        "/api/processes?cursor=18446744073709551615:18446744073709551615",
        "/api/processes?cursor=1:18446744073709551615",
        "/api/processes?cursor=18446744073709551615:0",
        "/api/deadletters?limit=0",
    ] {
        let (code, body) = get_json(&c, &f.url(q)).await;
        assert_eq!(code, 400, "{q}: {body}");
        assert_error_body(&body, q);
    }
    let (code, page) = get_json(&c, &f.url("/api/processes?limit=1")).await;
    assert_eq!((code, ids_of(&page)), (200, vec![done.clone()]));

    for id in [
        "--",
        "1-",
        "-1",
        "99999999999999999999",
        "99999999999999999999-0",
        "1-99999999999999999999",
        "bogus",
        "1",
    ] {
        let (code, body) = post_json(
            &c,
            &f.url(&format!("/api/deadletters/{id}/replay")),
            json!({}),
        )
        .await;
        assert_eq!(code, 400, "{id}: {body}");
        assert_eq!(body["error"], "invalid_request", "{id}: {body}");
    }
    // A well-formed id that is not there is still 404.
    let (code, body) = post_json(&c, &f.url("/api/deadletters/1-0/replay"), json!({})).await;
    assert_eq!(code, 404, "{body}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_past_year_9999_do_not_break_the_views() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    let id = f.submit("Ok", json!({})).await;
    f.wait_finished(&id).await;
    // What any Redis writer could leave: year ~33,000 and u64::MAX.
    let _: () = redis::cmd("HSET")
        .arg(f.store().keys().process(&id))
        .arg(honua_shared::keys::field::CREATED_MS)
        .arg(1_000_000_000_000_000u64)
        .arg(honua_shared::keys::field::DEADLINE_MS)
        .arg(u64::MAX)
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    let (code, list) = get_json(&c, &f.url("/api/processes")).await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(ids_of(&list), [id.as_str()]);
    assert_eq!(list[0]["createdAt"], Value::Null, "{list}");
    let (code, view) = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
    assert_eq!(code, 200, "{view}");
    assert_eq!(view["deadlineAt"], Value::Null, "{view}");
    assert!(view["endedAt"].is_string(), "{view}");
    f.stop().await;
}

/// Sum of `calls` over Redis's `INFO commandstats`, leaving out INFO and CONFIG.
async fn redis_calls(store: &honua_shared::store::Store) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut store.conn())
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|l| !l.starts_with("info:") && !l.starts_with("config"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_can_be_closed_and_answers_with_a_constant_number_of_redis_calls() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.api.keys = vec![ApiKey {
        name: "dashboard".into(),
        role: Role::Read,
        sha256: honua_scheduler::gateway::token_hash("read-token"),
    }];
    cfg.api.open_health = false;
    // The gateway alone: nothing else talks to Redis while /health is measured.
    let f = Fleet::start(cfg, 0, 0).await;
    let c = http();

    let r = c.get(f.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 401, "open_health = false closes /health");
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    // The Kubernetes probes stay open.
    for probe in ["/health/live", "/health/ready"] {
        let (code, body) = get_json(&c, &f.url(probe)).await;
        assert_eq!(code, 200, "{probe}: {body}");
    }

    // 200 workers with fresh heartbeats: /health costs the same few calls as with none.
    let now = f.store().server_time_ms().await.unwrap();
    let mut zadd = redis::cmd("ZADD");
    zadd.arg(f.store().keys().workers());
    for i in 0..200 {
        zadd.arg(now).arg(format!("w-{i}"));
    }
    let _: u64 = zadd.query_async(&mut f.store().conn()).await.unwrap();
    let before = redis_calls(f.store()).await;
    let r = c
        .get(f.url("/health"))
        .bearer_auth("read-token")
        .send()
        .await
        .unwrap();
    let (code, h) = json_of(r).await;
    let calls = redis_calls(f.store()).await - before;
    assert_eq!(code, 200, "{h}");
    assert_eq!(h["checks"]["workers"], "Healthy (200 live)", "{h}");
    assert!(
        calls <= 5,
        "/health made {calls} Redis calls for 200 workers"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_routes_refuse_text_plain_and_multipart_bodies() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let c = http();
    let url = f.url("/api/processes");
    let gate = f.submit("Gate", json!({})).await;
    wait_status(&f, &gate, ProcessStatus::WaitingForApproval).await;
    let body = r#"{"processType":"Ok"}"#;

    // What a form on another site can post without a preflight.
    for ct in [
        "text/plain",
        "text/plain;charset=UTF-8",
        "multipart/form-data; boundary=x",
        "application/xml",
    ] {
        for target in [url.clone(), f.url(&format!("/api/processes/{gate}/cancel"))] {
            let r = c
                .post(&target)
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            let (code, err) = json_of(r).await;
            assert_eq!(code, 415, "{ct} {target}: {err}");
            assert_eq!(err["error"], "unsupported_media_type", "{err}");
        }
    }
    let (_, list) = get_json(&c, &url).await;
    assert_eq!(ids_of(&list), [gate.as_str()], "nothing was created");
    assert_eq!(
        f.record(&gate).await.unwrap().status,
        ProcessStatus::WaitingForApproval
    );

    // JSON (with a charset) and the guide's bare `curl -d` (a form type) are accepted.
    for ct in [
        "application/json; charset=utf-8",
        "application/x-www-form-urlencoded",
        "Application/JSON",
    ] {
        let r = c
            .post(&url)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        let (code, b) = json_of(r).await;
        assert_eq!(code, 201, "{ct}: {b}");
    }
    f.stop().await;
}

/// The guide's maintenance window without scaling to zero: a drain holds every new process
/// Pending (over HTTP and over the submission stream) while the running ones go on to
/// their end, `/health` says Draining, only an admin key may drain or resume, a Pending
/// process can be cancelled, and resuming intake starts the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_holds_new_processes_pending_until_intake_resumes() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.api.keys = role_keys();
    let f = Fleet::start(cfg, 1, 1).await;
    let c = http();
    let post = |path: &str, token: &str, body: Value| {
        let req = c.post(f.url(path)).bearer_auth(token).json(&body);
        async move { json_of(req.send().await.unwrap()).await }
    };
    let get = |path: &str, token: &str| {
        let req = c.get(f.url(path)).bearer_auth(token);
        async move { json_of(req.send().await.unwrap()).await }
    };

    // A process already running (waiting at its gate) before the drain.
    let gated = f.submit("Gate", json!({})).await;
    wait_status(&f, &gated, ProcessStatus::WaitingForApproval).await;

    for token in ["read-token", "operate-token"] {
        let (code, body) = post("/api/admin/drain", token, json!({})).await;
        assert_eq!(code, 403, "{token}: {body}");
        let (code, _) = post("/api/admin/resume-intake", token, json!({})).await;
        assert_eq!(code, 403, "{token}");
    }
    let (code, body) = get("/api/admin/drain", "read-token").await;
    assert_eq!((code, &body["draining"]), (200, &json!(false)), "{body}");

    let (code, drained) = post("/api/admin/drain", "admin-token", json!({})).await;
    assert_eq!(code, 200, "{drained}");
    assert_eq!(drained["draining"], json!(true));
    assert_eq!(drained["by"], json!("platform"));
    let since = drained["sinceMs"].as_u64().unwrap();
    // The gate holds no step: nothing runs or waits for a worker.
    assert_eq!(drained["drained"], json!(true), "{drained}");
    let (_, again) = post("/api/admin/drain", "admin-token", json!({})).await;
    assert_eq!(
        again["sinceMs"].as_u64(),
        Some(since),
        "a second drain keeps the first"
    );
    let (code, health) = get("/health", "read-token").await;
    assert_eq!(
        (code, &health["status"], &health["checks"]["intake"]),
        (200, &json!("Draining"), &json!("Draining")),
        "{health}"
    );

    // Submissions are accepted and acknowledged, and wait Pending.
    let (code, by_http) = post(
        "/api/processes",
        "operate-token",
        json!({"processType": "Ok", "input": {"n": 1}}),
    )
    .await;
    assert_eq!(code, 201, "{by_http}");
    assert_eq!(by_http["pending"], json!(true), "{by_http}");
    let by_http = by_http["id"].as_str().unwrap().to_string();
    let mut sub = honua_shared::envelope::Submission {
        process_type: "Ok".into(),
        version: None,
        input: json!({}),
        id: Some("from-the-stream".into()),
        idempotency_key: None,
        tenant: None,
        trace: Default::default(),
    };
    xadd_submission(f.store(), &sub).await;
    sub.id = Some("cancelled-while-pending".into());
    xadd_submission(f.store(), &sub).await;
    for id in [
        by_http.as_str(),
        "from-the-stream",
        "cancelled-while-pending",
    ] {
        wait_status(&f, id, ProcessStatus::Pending).await;
    }
    let (code, body) = post(
        "/api/processes/cancelled-while-pending/cancel",
        "operate-token",
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{body}");

    // Running work goes on: the gate is approved and its process completes meanwhile.
    let (code, body) = post(
        &format!("/api/processes/{gated}/signal/review"),
        "operate-token",
        json!({"value": "approve"}),
    )
    .await;
    assert_eq!(code, 202, "{body}");
    let gate_done = f.wait_finished(&gated).await;
    assert_eq!(gate_done.status, ProcessStatus::Completed);
    for id in [by_http.as_str(), "from-the-stream"] {
        let rec = f.record(id).await.unwrap();
        assert_eq!(rec.status, ProcessStatus::Pending, "{id}");
        assert!(rec.steps.is_empty(), "{id} started a step: {:?}", rec.steps);
        assert_eq!(rec.deadline_ms, None, "{id}: no deadline while Pending");
    }
    // Gate's two steps are the only jobs ever queued.
    assert_eq!(entries_added(f.store(), &f.store().keys().jobs()).await, 1);
    let (_, report) = get("/api/admin/drain", "read-token").await;
    assert_eq!(report["pendingProcesses"], json!(2), "{report}");
    assert_eq!(report["runningSteps"], json!(0), "{report}");
    let (_, list) = get("/api/processes?status=Pending", "read-token").await;
    let mut listed = ids_of(&list);
    listed.sort();
    let mut expected = vec![by_http.clone(), "from-the-stream".to_string()];
    expected.sort();
    assert_eq!(listed, expected, "{list}");
    wait_for("the draining gauge", DEADLINE, || async {
        let text = c
            .get(f.url("/metrics"))
            .bearer_auth("read-token")
            .send()
            .await
            .ok()?;
        let text = text.text().await.ok()?;
        (text.contains("honua_intake_draining 1") && text.contains("honua_pending_processes 2"))
            .then_some(())
    })
    .await;

    let (code, resumed) = post("/api/admin/resume-intake", "admin-token", json!({})).await;
    assert_eq!(code, 200, "{resumed}");
    assert_eq!(resumed["draining"], json!(false));
    for id in [by_http.as_str(), "from-the-stream"] {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{id}");
        // Started after intake resumed, not when it was submitted.
        let started = rec.started_ms.unwrap();
        let gate_end = gate_done.ended_ms.unwrap();
        assert!(
            started >= gate_end,
            "{id} started at {started}, before the gate ended at {gate_end}"
        );
    }
    let cancelled = f.record("cancelled-while-pending").await.unwrap();
    assert_eq!(cancelled.status, ProcessStatus::Cancelled);
    assert!(
        cancelled.steps.is_empty(),
        "a cancelled Pending process never starts"
    );
    assert!(f.store().pending_processes(10).await.unwrap().is_empty());
    let (_, health) = get("/health", "read-token").await;
    assert_ne!(health["status"], json!("Draining"), "{health}");
    f.stop().await;
}

/// Issue 19's state tools over the API: the state decoded, the check finding a planted
/// corrupt blob, and deleting processes (finished, waiting, running on a worker, sleeping on
/// a durable timer) with the roles, the 409 without force, and no reference left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_tools_read_check_and_delete_processes() {
    let probe = Probe::default();
    let base = serve(probe.clone()).await;
    let redis = RedisServer::start();
    let mut files: Vec<(&str, String)> = DEFS.iter().map(|(n, t)| (*n, t.to_string())).collect();
    files.push(("hang.toml", hang_def("Hang", &format!("{base}/hang"))));
    files.push((
        "out.toml",
        "name = \"Out\"\nversion = 1\n[[steps]]\nname = \"Only\"\nkind = \"noop\"\nconfig = { output = { n = 1 } }\n".into(),
    ));
    files.push((
        "nap.toml",
        "name = \"Nap\"\nversion = 1\n[[steps]]\nname = \"Nap\"\nkind = \"sleep\"\nconfig = { duration = \"1h\" }\n".into(),
    ));
    let dir = defs_dir(
        &files
            .iter()
            .map(|(n, t)| (*n, t.as_str()))
            .collect::<Vec<_>>(),
    );
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.worker.http_allowlist = vec![format!("{base}/")];
    cfg.api.keys = role_keys();
    let f = Fleet::start(cfg, 1, 1).await;
    let c = http();
    let get = |path: String, token: &'static str| {
        let req = c.get(f.url(&path)).bearer_auth(token);
        async move { json_of(req.send().await.unwrap()).await }
    };
    let delete = |path: String, token: &'static str| {
        let req = c.delete(f.url(&path)).bearer_auth(token);
        async move { json_of(req.send().await.unwrap()).await }
    };

    // state: the input and the outputs, decoded.
    let ok = f.submit("Out", json!({"who": "me"})).await;
    let other = f.submit("Other", json!({})).await;
    for id in [&ok, &other] {
        assert_eq!(f.wait_finished(id).await.status, ProcessStatus::Completed);
    }
    let (code, state) = get(format!("/api/processes/{ok}/state"), "read-token").await;
    assert_eq!(code, 200, "{state}");
    assert_eq!(state["input"], json!({"who": "me"}));
    assert_eq!(state["processType"], "Out");
    assert_eq!(state["status"], "Completed");
    assert_eq!(state["outputs"], json!({"Only": {"n": 1}}), "{state}");
    assert_eq!(state["problems"], json!([]));
    let (code, body) = get("/api/processes/no-such/state".into(), "read-token").await;
    assert_eq!(code, 404, "{body}");
    assert_error_body(&body, "state of an unknown process");

    // check: nothing wrong, then a corrupt output planted in Redis.
    let (code, report) = get("/api/state/check".into(), "read-token").await;
    assert_eq!(code, 200, "{report}");
    assert!(report["checked"].as_u64().unwrap() >= 2, "{report}");
    assert_eq!(report["problems"], json!([]));
    let _: () = redis::cmd("HSET")
        .arg(f.store().keys().data(&ok))
        .arg("out:Only")
        .arg(b"\x00not a state blob".as_slice())
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    let (code, report) = get("/api/state/check".into(), "read-token").await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(
        report["problems"],
        json!([{"id": ok, "processType": "Out", "part": "out:Only", "code": "state_corrupt",
                "reason": "state blob has no Honua header"}])
    );
    let (_, report) = get("/api/state/check?type=Other".into(), "read-token").await;
    assert_eq!(report["checked"], 1, "{report}");
    assert_eq!(report["problems"], json!([]));
    // Paged: one process per page, the problem found on one of them.
    let mut cursor: Option<String> = None;
    let (mut pages, mut problems) = (0, 0);
    loop {
        let q = cursor.map_or(String::new(), |c| format!("&cursor={c}"));
        let (code, page) = get(format!("/api/state/check?limit=1{q}"), "read-token").await;
        assert_eq!(code, 200, "{page}");
        pages += 1;
        problems += page["problems"].as_array().unwrap().len();
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 10, "paging did not end");
    }
    assert!(
        pages >= 2 && problems == 1,
        "{pages} pages, {problems} problems"
    );
    let (code, state) = get(format!("/api/processes/{ok}/state"), "read-token").await;
    assert_eq!(code, 200);
    assert_eq!(state["problems"][0]["part"], "out:Only", "{state}");
    for q in ["limit=0", "limit=1001", "cursor=bogus", "kind=x"] {
        let (code, body) = get(format!("/api/state/check?{q}"), "read-token").await;
        assert_eq!(code, 400, "{q}: {body}");
        assert_error_body(&body, q);
    }

    // delete: admin only.
    for token in ["read-token", "operate-token"] {
        let (code, body) = delete(format!("/api/processes/{ok}"), token).await;
        assert_eq!(code, 403, "{token}: {body}");
    }
    let (code, body) = delete(format!("/api/processes/{ok}"), "admin-token").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "Completed");
    assert_eq!(body["forced"], false);
    assert_eq!(
        references_to(f.store(), &ok, None).await,
        Vec::<String>::new()
    );
    let (code, _) = get(format!("/api/processes/{ok}"), "read-token").await;
    assert_eq!(code, 404);
    let (code, body) = delete(format!("/api/processes/{ok}"), "admin-token").await;
    assert_eq!(code, 404, "deleting twice: {body}");
    let (_, report) = get("/api/state/check".into(), "read-token").await;
    assert_eq!(report["problems"], json!([]), "the corrupt process is gone");

    // A running process (its job held by the worker, an idempotency key): 409 without
    // force, then with force its worker is stopped and nothing refers to it any more.
    let r = c
        .post(f.url("/api/processes"))
        .bearer_auth("operate-token")
        .header("Idempotency-Key", "hang-1")
        .json(&json!({"processType": "Hang"}))
        .send()
        .await
        .unwrap();
    let (code, body) = json_of(r).await;
    assert_eq!(code, 201, "{body}");
    let hang = body["id"].as_str().unwrap().to_string();
    wait_for("the endpoint called", DEADLINE, || async {
        (probe.calls() == 1).then_some(())
    })
    .await;
    let (code, body) = delete(format!("/api/processes/{hang}"), "admin-token").await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "invalid_state");
    assert!(body["detail"].as_str().unwrap().contains("force"), "{body}");
    let (code, view) = get(format!("/api/processes/{hang}"), "read-token").await;
    assert_eq!((code, view["status"].clone()), (200, json!("Running")));
    let (code, body) = delete(format!("/api/processes/{hang}?force=false"), "admin-token").await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = delete(format!("/api/processes/{hang}?force=true"), "admin-token").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "Running");
    assert_eq!(body["forced"], true);
    assert_eq!(body["removed"]["jobs"], 1, "{body}");
    assert_eq!(
        references_to(f.store(), &hang, Some("hang-1")).await,
        Vec::<String>::new()
    );
    wait_for("the running step stopped", DEADLINE, || async {
        probe.dropped().then_some(())
    })
    .await;
    assert_eq!(probe.calls(), 1);

    // A sleeping process (a durable timer in the delayed set) and one waiting for approval.
    let nap = f.submit("Nap", json!({})).await;
    let gate = f.submit("Gate", json!({})).await;
    wait_for("the timer set", DEADLINE, || async {
        let (_, v) = get(format!("/api/processes/{nap}"), "read-token").await;
        (v["currentSteps"] == json!(["Nap"]) && v["steps"][0]["status"] != "queued").then_some(())
    })
    .await;
    wait_status(&f, &gate, ProcessStatus::WaitingForApproval).await;
    for (id, status) in [(&nap, "Running"), (&gate, "WaitingForApproval")] {
        let (code, _) = delete(format!("/api/processes/{id}"), "admin-token").await;
        assert_eq!(code, 409, "{id}");
        let (code, body) = delete(format!("/api/processes/{id}?force=true"), "admin-token").await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["status"], status);
        assert_eq!(
            references_to(f.store(), id, None).await,
            Vec::<String>::new()
        );
    }
    // Bad query: 400; an id that cannot exist: 404.
    let (code, body) = delete(format!("/api/processes/{other}?force=maybe"), "admin-token").await;
    assert_eq!(code, 400, "{body}");
    let (code, _) = delete("/api/processes/bad%20id".into(), "admin-token").await;
    assert_eq!(code, 404);
    // The other process and the engine are untouched.
    let (code, _) = get(format!("/api/processes/{other}/state"), "read-token").await;
    assert_eq!(code, 200);
    let id = f.submit("Ok", json!({})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    f.stop().await;
}

/// Issue 19's pause and resume against a live fleet, across a restart of the scheduler,
/// gateway and worker: a paused process's durable timer stops (its old timer fires and
/// changes nothing) and goes on after resume; a running step handed back is stopped on its
/// worker and runs again on resume; only Running processes pause, only Paused ones resume.
/// A drain set before the restart also holds across it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_hold_across_a_restart_of_the_fleet() {
    let probe = Probe::default();
    let base = serve(probe.clone()).await;
    let redis = RedisServer::start();
    let nap = r#"
name = "Nap"
version = 1
[[steps]]
name = "Start"
kind = "noop"
next = "Nap"
[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "2s" }
next = "After"
[[steps]]
name = "After"
kind = "noop"
"#;
    let (f, dir) = http_fleet(
        &redis,
        &base,
        &[
            ("nap.toml", nap.to_string()),
            (
                "stuck.toml",
                hang_def("Stuck", &format!("{base}/hang-once")),
            ),
            ("ok.toml", DEFS[0].1.to_string()),
        ],
    )
    .await;
    let c = http();
    let post = |url: String, body: Value| {
        let req = c.post(url).json(&body);
        async move { json_of(req.send().await.unwrap()).await }
    };

    // A sleeping process: paused, its timer stops.
    let napping = f.submit("Nap", json!({})).await;
    wait_for("the nap to start", DEADLINE, || async {
        f.record(&napping).await.filter(|r| {
            r.steps
                .get("Nap")
                .is_some_and(|s| s.status == honua_shared::status::StepStatus::Waiting)
        })
    })
    .await;
    let (code, body) = post(
        f.url(&format!("/api/processes/{napping}/pause")),
        json!({"reason": "maintenance"}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "Paused");
    let (code, again) = post(f.url(&format!("/api/processes/{napping}/pause")), json!({})).await;
    assert_eq!(code, 409, "pausing twice: {again}");
    let (code, _) = post(
        f.url(&format!("/api/processes/{napping}/retry-current-step")),
        json!(null),
    )
    .await;
    assert_eq!(code, 409, "a paused process starts no step");

    // A hanging call: paused with hand-back, its worker stops it.
    let stuck = f.submit("Stuck", json!({})).await;
    wait_for("the first call", DEADLINE, || async {
        (probe.calls() == 1).then_some(())
    })
    .await;
    let (code, body) = post(
        f.url(&format!("/api/processes/{stuck}/pause")),
        json!({"handBack": true}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    wait_for(
        "the handed-back call dropped on its worker",
        DEADLINE,
        || async { probe.dropped().then_some(()) },
    )
    .await;

    // And a drain with one process held Pending.
    let (code, _) = post(f.url("/api/admin/drain"), json!({})).await;
    assert_eq!(code, 200);
    let pending = f.submit("Ok", json!({})).await;
    wait_status(&f, &pending, ProcessStatus::Pending).await;

    // Restart everything but Redis.
    let cfg = f.cfg.clone();
    f.stop().await;
    let f = Fleet::start(cfg, 1, 1).await;

    // The nap's old timer fires (it was due 2 s after the nap began) and changes nothing.
    let events = f.store().keys().events();
    let due = f.record(&napping).await.unwrap().paused_ms.unwrap() + 2_000;
    wait_for("the old timer to fire and be handled", DEADLINE, || async {
        let now = f.store().server_time_ms().await.ok()?;
        let delayed: u64 = redis::cmd("ZCARD")
            .arg(f.store().keys().delayed())
            .query_async(&mut f.store().conn())
            .await
            .ok()?;
        let stats = f
            .store()
            .stream_stats(&events, honua_shared::keys::SCHEDULER_GROUP)
            .await
            .ok()?;
        // Both processes are paused (their deadlines stopped) and the Pending one has no
        // deadline yet, so once the timer fired the delayed set is empty.
        (now > due && delayed == 0 && stats.pending == 0 && stats.lag == Some(0)).then_some(())
    })
    .await;
    let rec = f.record(&napping).await.unwrap();
    assert_eq!(rec.status, ProcessStatus::Paused);
    assert_eq!(
        rec.steps["Nap"].status,
        honua_shared::status::StepStatus::Held
    );
    assert!(
        !rec.steps.contains_key("After"),
        "nothing after the nap started"
    );
    assert!(rec.deadline_left_ms.is_some() && rec.deadline_ms.is_none());
    assert_eq!(
        f.record(&stuck).await.unwrap().status,
        ProcessStatus::Paused
    );
    assert_eq!(
        probe.calls(),
        1,
        "the handed-back step waits for the resume"
    );
    assert_eq!(
        f.record(&pending).await.unwrap().status,
        ProcessStatus::Pending
    );
    let (_, list) = get_json(&c, &f.url("/api/processes?status=Paused")).await;
    let mut listed = ids_of(&list);
    listed.sort();
    let mut expected = vec![napping.clone(), stuck.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    let (_, health) = get_json(&c, &f.url("/health")).await;
    assert_eq!(health["status"], "Draining", "{health}");

    // Resume: the nap goes on with what it had left, the handed-back call runs again.
    for id in [&napping, &stuck] {
        let (code, body) = post(f.url(&format!("/api/processes/{id}/resume")), json!({})).await;
        assert_eq!(code, 200, "{body}");
    }
    let (code, _) = post(
        f.url(&format!("/api/processes/{napping}/resume")),
        json!({}),
    )
    .await;
    assert_eq!(code, 409, "resuming a process that is not paused");
    for id in [&napping, &stuck] {
        assert_eq!(
            f.wait_finished(id).await.status,
            ProcessStatus::Completed,
            "{id}"
        );
    }
    assert_eq!(probe.calls(), 2);
    let (_, view) = get_json(&c, &f.url(&format!("/api/processes/{napping}"))).await;
    let actions: Vec<&str> = view["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["pause", "resume"], "{view}");
    let (code, _) = post(f.url("/api/admin/resume-intake"), json!({})).await;
    assert_eq!(code, 200);
    assert_eq!(
        f.wait_finished(&pending).await.status,
        ProcessStatus::Completed
    );
    f.stop().await;
    drop(dir);
}

/// A submission's `tenant` (HTTP body or submission stream) is stored on the process and
/// shown in its view and in lists; a tenant that is not an id is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_of_a_submission_is_kept_and_shown() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 0).await;
    let c = http();
    let url = f.url("/api/processes");
    let (code, created) = post_json(
        &c,
        &url,
        json!({"processType": "Ok", "id": "p-acme", "tenant": "acme"}),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let (_, view) = get_json(&c, &f.url("/api/processes/p-acme")).await;
    assert_eq!(view["tenant"], "acme", "{view}");
    let (meta, steps) = f.store().load_process("p-acme").await.unwrap();
    let rec = honua_shared::record::ProcessRecord::parse("p-acme", &meta, &steps)
        .unwrap()
        .unwrap();
    assert_eq!(rec.tenant.as_deref(), Some("acme"));
    // Without one, no tenant.
    let (code, _) = post_json(&c, &url, json!({"processType": "Ok", "id": "p-none"})).await;
    assert_eq!(code, 201);
    let (_, view) = get_json(&c, &f.url("/api/processes/p-none")).await;
    assert!(view.get("tenant").is_none(), "{view}");
    // Through the submission stream.
    let sub = honua_shared::envelope::Submission {
        process_type: "Ok".into(),
        version: None,
        input: json!({}),
        id: Some("p-stream".into()),
        idempotency_key: None,
        tenant: Some("globex".into()),
        trace: Default::default(),
    };
    xadd_submission(f.store(), &sub).await;
    let (_, view) = wait_for("the streamed submission", DEADLINE, || async {
        let (code, v) = get_json(&c, &f.url("/api/processes/p-stream")).await;
        (code == 200).then_some((code, v))
    })
    .await;
    assert_eq!(view["tenant"], "globex", "{view}");
    // Lists carry it too.
    let (_, list) = get_json(&c, &url).await;
    let acme = list
        .as_array()
        .and_then(|items| items.iter().find(|p| p["id"] == "p-acme"))
        .unwrap_or_else(|| panic!("p-acme not listed: {list}"));
    assert_eq!(acme["tenant"], "acme", "{list}");
    // Not an id: 400, nothing created.
    for bad in ["has space", "", &"x".repeat(65), "ä"] {
        let (code, err) = post_json(
            &c,
            &url,
            json!({"processType": "Ok", "id": "p-bad", "tenant": bad}),
        )
        .await;
        assert_eq!(code, 400, "{bad:?}: {err}");
        assert!(err["detail"].as_str().unwrap().contains("tenant"), "{err}");
    }
    let (code, _) = get_json(&c, &f.url("/api/processes/p-bad")).await;
    assert_eq!(code, 404);
    f.stop().await;
}
