//! The web console (`/ui`) in a real headless Chromium (Debian's `chromium` driven through
//! `chromedriver`) against a live fleet: a real redis-server, a scheduler with its gateway,
//! workers, the mock LLM provider for the Deployment's `llm` steps and an in-test HTTP
//! endpoint for a step that fails until its input is patched.
//!
//! One fleet and one browser serve the whole binary (start-up dominates its wall time):
//! log in with a token; a submitted Test completes on the list without a reload; a
//! Deployment at its review gate is approved with the button and reaches Completed; a
//! failed process is retried from its failed step with a state patch (audited under the
//! key's name), then, completed, from a step chosen in its definition's list; failed
//! processes are retried in bulk; the overview counts each type's processes (active,
//! completed and failed in the last hour and day); the workers page shows the version each
//! worker registered; a Deployment rejected at its gate
//! takes its rejection path; a stuck step is retried under a new claim; running processes
//! are cancelled in bulk and then purged in bulk; the DAG shows every step of each
//! definition; a `read` token sees no action and a forged POST is refused (403), as is one
//! without the CSRF token. Each page passes axe-core (no serious or critical violation) and
//! is photographed.
//!
//! Needs `chromium`, `chromium-driver` (scripts/test.sh installs them) and axe-core
//! (`HONUA_AXE_JS`, or `target/axe/package/axe.min.js`; scripts/test.sh fetches the pinned
//! npm package). Screenshots go to `HONUA_CONSOLE_SCREENSHOTS` or
//! `target/console-screenshots`.

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use honua_mock_llm::{MockConfig, MockLlm};
use honua_shared::config::{ApiKey, Role};
use honua_shared::llm_config::{EndpointConfig, LlmProviderConfig, ProviderKind};
use honua_shared::status::StepStatus;
use honua_tests::webdriver::{Driver, Session};
use honua_tests::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The `Fixable` type: its `Call` step posts to the in-test endpoint, which answers 400
/// (a permanent failure) unless the input has `fixed: true`.
fn fixable(base: &str) -> String {
    format!(
        r#"
name = "Fixable"
version = 1
[[steps]]
name = "Prepare"
kind = "noop"
next = "Call"
[[steps]]
name = "Call"
kind = "http"
retry = {{ max_attempts = 1 }}
config = {{ url = "{base}/fixable" }}
next = "Finish"
[[steps]]
name = "Finish"
kind = "noop"
"#
    )
}

/// The `Hang` type: its `Wait` step posts to the in-test endpoint, which answers only when
/// the test releases it, so the process stays Running at `Wait`.
fn hang(base: &str) -> String {
    format!(
        r#"
name = "Hang"
version = 1
[[steps]]
name = "Wait"
kind = "http"
timeout = "5m"
retry = {{ max_attempts = 1 }}
config = {{ url = "{base}/hang" }}
"#
    )
}

async fn serve_fixable(calls: Arc<AtomicU32>, release: Arc<tokio::sync::Notify>) -> String {
    let hang = move || {
        let release = release.clone();
        async move {
            release.notified().await;
            axum::Json(json!({})).into_response()
        }
    };
    let app = Router::new().route("/hang", post(hang)).route(
        "/fixable",
        post(move |body: axum::Json<Value>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if body["input"]["fixed"] == json!(true) {
                axum::Json(json!({"fixed": true})).into_response()
            } else {
                StatusCode::BAD_REQUEST.into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

fn keys() -> Vec<ApiKey> {
    let h = honua_scheduler::gateway::token_hash;
    vec![
        ApiKey {
            name: "dashboard".into(),
            role: Role::Read,
            sha256: h("read-token"),
        },
        ApiKey {
            name: "oncall".into(),
            role: Role::Operate,
            sha256: h("operate-token"),
        },
        ApiKey {
            name: "platform".into(),
            role: Role::Admin,
            sha256: h("admin-token"),
        },
    ]
}

fn repo_target() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

fn axe_source() -> String {
    let path = std::env::var("HONUA_AXE_JS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_target().join("axe/package/axe.min.js"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "axe-core not found at {} ({e}): run scripts/test.sh, or `npm pack axe-core@4.10.3` \
             and unpack it into target/axe",
            path.display()
        )
    })
}

/// The browser, the fleet and what the checks need.
struct Ctx {
    fleet: Fleet,
    browser: Session,
    axe: String,
    shots: PathBuf,
    http: reqwest::Client,
}

impl Ctx {
    fn ui(&self, path: &str) -> String {
        self.fleet.url(path)
    }

    /// Submits through the API as the admin key; returns the process id.
    async fn submit(&self, process_type: &str, input: Value) -> String {
        self.submit_traced(process_type, input, None).await
    }

    /// Submits with the caller's W3C `traceparent`, if any.
    async fn submit_traced(
        &self,
        process_type: &str,
        input: Value,
        traceparent: Option<&str>,
    ) -> String {
        let mut req = self
            .http
            .post(self.fleet.url("/api/processes"))
            .bearer_auth("admin-token");
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        let r: Value = req
            .json(&json!({"processType": process_type, "input": input}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("submit: {r}"))
            .to_string()
    }

    /// No serious or critical axe-core violation on the current page, and a screenshot.
    async fn check_page(&self, name: &str) {
        self.browser.execute(&self.axe, json!([])).await;
        let found = self
            .browser
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, {resultTypes: ['violations']}).then(r => done(
                   r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
                     .map(v => v.id + ' (' + v.impact + '): ' + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '))
                 ), e => done(['axe failed: ' + e]));",
                json!([]),
            )
            .await;
        let found: Vec<String> = serde_json::from_value(found).unwrap();
        assert!(
            found.is_empty(),
            "accessibility violations on {name}: {found:#?}"
        );
        self.browser
            .screenshot(&self.shots.join(format!("{name}.png")))
            .await;
    }

    /// Waits until the text of `css` (on the live page, without reloading) is `want`.
    async fn wait_text(&self, what: &str, css: &str, want: &str) {
        let script = format!(
            "const e = document.querySelector({}); return !!e && e.textContent.trim() === {};",
            json!(css),
            json!(want)
        );
        self.browser.wait_true(what, &script, DEADLINE).await;
    }

    /// Logs the browser in with `token` (from a clean cookie jar).
    async fn login(&self, token: &str) {
        self.browser.delete_cookies().await;
        self.browser.goto(&self.ui("/ui")).await;
        let input = self.browser.wait_element("#token", DEADLINE).await;
        assert!(self.browser.current_url().await.ends_with("/ui/login"));
        self.browser.type_text(&input, token).await;
        let button = self
            .browser
            .wait_element("form button[type=submit]", DEADLINE)
            .await;
        self.browser.click(&button).await;
        self.wait_text("the overview after login", "main h1", "Overview")
            .await;
    }

    /// Opens process `id`'s page and waits (live, without reloading) for `status`.
    async fn open_process(&self, id: &str, status: &str) {
        self.browser
            .goto(&self.ui(&format!("/ui/processes/{id}")))
            .await;
        self.wait_text(&format!("process {id} {status}"), "#status .badge", status)
            .await;
    }

    /// Checks and photographs (as `shot`) the confirmation page open in the browser,
    /// confirms, and waits on the process page for `status`.
    async fn confirm(&self, shot: &str, status: &str) {
        self.confirm_only(shot).await;
        self.wait_text(&format!("{status} after {shot}"), "#status .badge", status)
            .await;
    }

    /// Checks and photographs (as `shot`) the confirmation page open in the browser, and
    /// confirms.
    async fn confirm_only(&self, shot: &str) {
        self.wait_text("the confirmation", "main h1", "Confirm")
            .await;
        self.check_page(shot).await;
        self.click("#confirm").await;
    }

    /// Clicks the first element matching `css`, waiting for it.
    async fn click(&self, css: &str) {
        let e = self.browser.wait_element(css, DEADLINE).await;
        self.browser.click(&e).await;
    }

    /// The step names the DAG on the current page draws, in document order.
    async fn dag_steps(&self, svg: &str) -> Vec<String> {
        let v = self
            .browser
            .execute(
                "return Array.from(document.querySelectorAll(arguments[0] + ' g.node')).map(g => g.getAttribute('data-step'));",
                json!([svg]),
            )
            .await;
        serde_json::from_value(v).unwrap()
    }
}

const FORM: &str = "application/x-www-form-urlencoded";

/// An `application/x-www-form-urlencoded` body.
fn form_body(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The CSRF token of the first form on `page`.
fn csrf_of(page: &str) -> String {
    page.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("no CSRF token on the page: {page}"))
        .to_string()
}

/// A console session of `token` outside the browser: its cookie and its CSRF token.
async fn session_of(ctx: &Ctx, token: &str) -> (String, String) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .post(ctx.ui("/ui/login"))
        .header(reqwest::header::CONTENT_TYPE, FORM)
        .body(form_body(&[("token", token)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let set = r.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="] {
        assert!(set.contains(attr), "{set} lacks {attr}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let page = http
        .get(ctx.ui("/ui"))
        .header(reqwest::header::COOKIE, &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (cookie, csrf_of(&page))
}

/// The status of a POST of `form` to process `id`'s action route, with session `cookie`.
async fn post_action(
    fleet: &Fleet,
    cookie: Option<&str>,
    id: &str,
    form: &[(&str, &str)],
) -> StatusCode {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut req = http
        .post(fleet.url(&format!("/ui/processes/{id}/action")))
        .header(reqwest::header::CONTENT_TYPE, FORM);
    if let Some(c) = cookie {
        req = req.header(reqwest::header::COOKIE, c);
    }
    req.body(form_body(form)).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_headless_chromium() {
    let redis = RedisServer::start();
    let calls = Arc::new(AtomicU32::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let base = serve_fixable(calls.clone(), release.clone()).await;
    let (fixable_def, hang_def) = (fixable(&base), hang(&base));
    let defs = defs_dir(&[
        ("fixable.toml", fixable_def.as_str()),
        ("hang.toml", hang_def.as_str()),
    ]);
    for f in ["deployment.toml", "test.toml"] {
        std::fs::copy(shipped_definitions().join(f), defs.path().join(f)).unwrap();
    }
    let llm = MockLlm::start(MockConfig::default()).await.unwrap();
    let mut cfg = test_config(&redis.url(), defs.path());
    cfg.worker.http_allowlist = vec![format!("{base}/")];
    cfg.api.keys = keys();
    cfg.api.trace_url_template = Some("http://tracing.example/trace/{trace_id}".into());
    cfg.llm_provider = Some(LlmProviderConfig {
        provider: ProviderKind::OpenaiCompatible,
        openai_compatible: Some(EndpointConfig {
            base_url: Some(llm.base_url()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let fleet = Fleet::start(cfg, 1, 2).await;
    let driver = Driver::start().await;
    let browser = driver.session(1280, 900).await;
    let shots = std::env::var("HONUA_CONSOLE_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_target().join("console-screenshots"));
    std::fs::create_dir_all(&shots).unwrap();
    let ctx = Ctx {
        fleet,
        browser,
        axe: axe_source(),
        shots,
        http: reqwest::Client::new(),
    };

    // Without a session every page leads to the login page, which passes axe too.
    ctx.browser.goto(&ctx.ui("/ui/processes")).await;
    ctx.browser.wait_element("#token", DEADLINE).await;
    ctx.check_page("login").await;

    // Log in; the page says who is acting.
    ctx.login("admin-token").await;
    let who = ctx.browser.wait_element(".who span", DEADLINE).await;
    assert_eq!(ctx.browser.text(&who).await, "platform (admin)");

    live_list(&ctx).await;
    let deployment = approve_deployment(&ctx).await;
    let fixed = retry_failed_step(&ctx).await;
    retry_from_chosen_step(&ctx, &fixed).await;
    bulk_retry(&ctx).await;
    other_pages(&ctx, &deployment).await;
    reject_deployment(&ctx).await;
    let hung = retry_current_step(&ctx).await;
    bulk_cancel_and_purge(&ctx, &hung, &release).await;
    read_role_is_refused(&ctx).await;

    ctx.browser.quit().await;
    drop(driver);
    ctx.fleet.stop().await;
}

/// A Test submitted while the list is open appears there and reaches Completed without a
/// reload (the page's marker survives).
async fn live_list(ctx: &Ctx) {
    ctx.browser.goto(&ctx.ui("/ui/processes")).await;
    ctx.browser.wait_element("table.list", DEADLINE).await;
    ctx.browser
        .execute("window.__noReload = 'still here';", json!([]))
        .await;
    let id = ctx.submit("Test", json!({})).await;
    ctx.wait_text(
        "the Test on the list, Completed",
        &format!("tr[data-id='{id}'] .badge"),
        "Completed",
    )
    .await;
    let marker = ctx
        .browser
        .execute("return window.__noReload;", json!([]))
        .await;
    assert_eq!(marker, json!("still here"), "the page was reloaded");
    ctx.check_page("processes").await;
}

/// A Deployment waits at its review gate; Approve (confirmed) takes it to Completed, seen
/// live on its page. Its DAG draws every step of the definition.
async fn approve_deployment(ctx: &Ctx) -> String {
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let id = ctx
        .submit_traced(
            "Deployment",
            json!({"app": "honua", "environment": "staging"}),
            Some(&format!("00-{trace_id}-00f067aa0ba902b7-01")),
        )
        .await;
    ctx.open_process(&id, "WaitingForApproval").await;
    let def = ctx.fleet.engine.defs.get("Deployment", 1).unwrap().clone();
    let want: Vec<String> = def.steps.iter().map(|s| s.name.clone()).collect();
    assert_eq!(ctx.dag_steps("svg.dag").await, want);
    let waiting = ctx
        .browser
        .execute(
            "return document.querySelector('g.node[data-step=ReviewInfrastructure]').getAttribute('data-status');",
            json!([]),
        )
        .await;
    assert_eq!(waiting, json!(StepStatus::Waiting.as_str()));
    let trace = ctx
        .browser
        .wait_element("dd a[rel=noopener]", DEADLINE)
        .await;
    let href = ctx.browser.attr(&trace, "href").await.unwrap();
    assert_eq!(href, format!("http://tracing.example/trace/{trace_id}"));
    ctx.check_page("process-waiting").await;

    ctx.click("a[data-action=approve]").await;
    ctx.confirm("confirm-approve", "Completed").await;
    let rec = ctx.fleet.record(&id).await.unwrap();
    assert_eq!(rec.status.as_str(), "Completed");
    let review = &rec.steps["ReviewInfrastructure"];
    assert_eq!(review.outcome.as_deref(), Some("ok"), "{review:?}");
    let audit = rec.audit.last().unwrap();
    assert_eq!(
        (audit.action.as_str(), audit.by.as_deref()),
        ("signal review", Some("platform"))
    );
    id
}

/// Two failed Fixables, retried in bulk from the filtered list: the confirmation states
/// the count, and both run again (and fail again: their input is unchanged).
async fn bulk_retry(ctx: &Ctx) {
    let ids = [
        ctx.submit("Fixable", json!({"fixed": false})).await,
        ctx.submit("Fixable", json!({"fixed": false})).await,
    ];
    for id in &ids {
        assert_eq!(ctx.fleet.wait_finished(id).await.status.as_str(), "Failed");
    }
    // The one retried before is Completed: the filter takes only the Failed ones.
    ctx.browser
        .goto(&ctx.ui("/ui/processes?status=Failed&type=Fixable"))
        .await;
    ctx.click("details.bulk summary").await;
    ctx.click("button[name=action][value=retry]").await;
    ctx.wait_text("the count", "p.confirm strong", "2").await;
    ctx.check_page("confirm-bulk").await;
    ctx.click("form button.danger").await;
    ctx.wait_text("the bulk result", "p.done", "Retried 2 of 2 processes.")
        .await;
    for id in &ids {
        let rec = wait_for("the bulk retry to run again", DEADLINE, || async {
            ctx.fleet
                .record(id)
                .await
                .filter(|r| r.status.is_finished() && r.steps["Call"].attempts().len() == 2)
        })
        .await;
        let audit = rec.audit.last().unwrap();
        assert_eq!(
            (audit.action.as_str(), audit.by.as_deref()),
            ("retry", Some("platform"))
        );
    }
}

/// A process failed at its `Call` step is retried from that step with a state patch; it
/// completes, the endpoint saw both calls, and the audit names the acting key. Returns its
/// id.
async fn retry_failed_step(ctx: &Ctx) -> String {
    let id = ctx.submit("Fixable", json!({"fixed": false})).await;
    ctx.open_process(&id, "Failed").await;
    let rec = ctx.fleet.record(&id).await.unwrap();
    assert_eq!(rec.steps["Call"].status, StepStatus::Failed);
    assert_eq!(rec.steps["Prepare"].status, StepStatus::Completed);
    let prepared_at = rec.steps["Prepare"].ended_ms;
    ctx.check_page("process-failed").await;

    ctx.click("a[data-action=retry-step]").await;
    let patch = ctx.browser.wait_element("#patch", DEADLINE).await;
    ctx.browser.type_text(&patch, r#"{"fixed": true}"#).await;
    ctx.confirm("confirm-retry", "Completed").await;
    let rec = ctx.fleet.record(&id).await.unwrap();
    assert_eq!(rec.status.as_str(), "Completed");
    // From the failed step: Prepare did not run again.
    assert_eq!(rec.steps["Prepare"].ended_ms, prepared_at);
    assert_eq!(rec.steps["Prepare"].attempts().len(), 1);
    assert_eq!(calls_of(ctx, &id).await, 2);
    let audit = rec.audit.last().unwrap();
    assert_eq!(audit.action, "retry");
    assert_eq!(audit.by.as_deref(), Some("platform"));
    ctx.wait_text(
        "the audit row",
        "#audit + table tbody tr td:nth-child(3)",
        "platform",
    )
    .await;
    id
}

/// The Completed Fixable is retried from a step chosen in the list of its definition's
/// steps (confirmed): `Call` and `Finish` run again, `Prepare` keeps its result, and the
/// audit names the key and the step.
async fn retry_from_chosen_step(ctx: &Ctx, id: &str) {
    ctx.open_process(id, "Completed").await;
    let before = ctx.fleet.record(id).await.unwrap();
    let options = ctx
        .browser
        .execute(
            "return Array.from(document.querySelectorAll('#from-step option')).map(o => o.value);",
            json!([]),
        )
        .await;
    assert_eq!(options, json!(["Prepare", "Call", "Finish"]));
    // Chosen and submitted in one script: the live region may be redrawn in between.
    ctx.browser
        .execute(
            "const s = document.querySelector('#from-step'); s.value = 'Call'; \
             s.form.querySelector('button[data-action=retry-from]').click();",
            json!([]),
        )
        .await;
    ctx.confirm_only("confirm-retry-from").await;
    let rec = wait_for("the retry from Call to finish", DEADLINE, || async {
        ctx.fleet
            .record(id)
            .await
            .filter(|r| r.status.is_finished() && r.steps["Finish"].attempts().len() == 2)
    })
    .await;
    assert_eq!(rec.status.as_str(), "Completed", "{rec:?}");
    assert_eq!(rec.steps["Call"].attempts().len(), 3);
    assert_eq!(rec.steps["Prepare"], before.steps["Prepare"]);
    let audit = rec.audit.last().unwrap();
    assert_eq!(
        (
            audit.action.as_str(),
            audit.by.as_deref(),
            audit.detail.as_deref()
        ),
        ("retry", Some("platform"), Some("from step Call (chosen)"))
    );
    ctx.wait_text("Completed again", "#status .badge", "Completed")
        .await;
}

/// A Deployment rejected at its review gate (confirmed) routes back to
/// GenerateInfrastructureCode, which runs a second visit, and waits for review again; the
/// audit names the key.
async fn reject_deployment(ctx: &Ctx) {
    let id = ctx
        .submit("Deployment", json!({"app": "honua", "environment": "dev"}))
        .await;
    ctx.open_process(&id, "WaitingForApproval").await;
    ctx.click("a[data-action=reject]").await;
    ctx.confirm_only("confirm-reject").await;
    let rec = wait_for("the rejection path to run", DEADLINE, || async {
        ctx.fleet.record(&id).await.filter(|r| {
            r.status.as_str() == "WaitingForApproval"
                && r.steps["GenerateInfrastructureCode"].visit == 2
        })
    })
    .await;
    assert_eq!(
        rec.steps["ReviewInfrastructure"].status,
        StepStatus::Waiting,
        "{rec:?}"
    );
    let audit = rec.audit.last().unwrap();
    assert_eq!(
        (audit.action.as_str(), audit.by.as_deref()),
        ("signal review", Some("platform"))
    );
    assert!(
        rec.steps
            .get("DeployInfrastructure")
            .is_none_or(|s| s.attempts().is_empty()),
        "{rec:?}"
    );
}

/// A Hang stuck at its `Wait` step: Retry current step (confirmed) fences the claim and
/// runs the step again under a new claim, audited under the key's name. Returns its id.
async fn retry_current_step(ctx: &Ctx) -> String {
    let id = ctx.submit("Hang", json!({})).await;
    let before = wait_for("Hang's Wait step to run", DEADLINE, || async {
        ctx.fleet.record(&id).await.filter(|r| {
            r.steps
                .get("Wait")
                .is_some_and(|s| s.status == StepStatus::Running)
        })
    })
    .await;
    let token = before.steps["Wait"].token.clone();
    ctx.open_process(&id, "Running").await;
    ctx.click("a[data-action=retry-current-step]").await;
    ctx.confirm_only("confirm-retry-current-step").await;
    // A new claim (a new token: the old one can no longer commit) runs the step again.
    let rec = wait_for("Wait to run again under a new claim", DEADLINE, || async {
        ctx.fleet.record(&id).await.filter(|r| {
            r.steps["Wait"].token != token && r.steps["Wait"].status == StepStatus::Running
        })
    })
    .await;
    let audit = rec.audit.last().unwrap();
    assert_eq!(
        (audit.action.as_str(), audit.by.as_deref()),
        ("retry-current-step", Some("platform"))
    );
    id
}

/// Two running Hangs are cancelled in bulk from the filtered list (the confirmation states
/// the count), then purged in bulk as Cancelled processes that ended more than 1 ms ago:
/// the confirmation counts them and their records are gone.
async fn bulk_cancel_and_purge(ctx: &Ctx, first: &str, release: &tokio::sync::Notify) {
    let ids = [first.to_string(), ctx.submit("Hang", json!({})).await];
    wait_for("both Hangs running", DEADLINE, || async {
        let mut running = 0;
        for id in &ids {
            if ctx.fleet.record(id).await?.status.as_str() == "Running" {
                running += 1;
            }
        }
        (running == 2).then_some(())
    })
    .await;
    ctx.browser
        .goto(&ctx.ui("/ui/processes?status=Running&type=Hang"))
        .await;
    ctx.click("details.bulk summary").await;
    ctx.click("button[name=action][value=cancel]").await;
    ctx.wait_text("the count", "p.confirm strong", "2").await;
    ctx.click("form button.danger").await;
    ctx.wait_text("the bulk result", "p.done", "Cancelled 2 of 2 processes.")
        .await;
    for id in &ids {
        let rec = ctx.fleet.wait_finished(id).await;
        assert_eq!(rec.status.as_str(), "Cancelled");
        let audit = rec.audit.last().unwrap();
        assert_eq!(
            (audit.action.as_str(), audit.by.as_deref()),
            ("cancel", Some("platform"))
        );
    }
    // The hung calls (the fenced first attempt too) answer now: the workers are free.
    release.notify_waiters();

    // No other process of this fleet was cancelled: the purge takes exactly these two.
    ctx.browser.goto(&ctx.ui("/ui/processes")).await;
    ctx.click("details.bulk summary").await;
    ctx.browser
        .wait_element("details.bulk input[name=older]", DEADLINE)
        .await;
    ctx.browser
        .execute(
            "const f = document.querySelector('details.bulk input[name=action][value=purge]').form;
             f.querySelector('select[name=status]').value = 'Cancelled';
             f.querySelector('input[name=older]').value = '1ms';",
            json!([]),
        )
        .await;
    ctx.click("details.bulk input[name=action][value=purge] ~ button")
        .await;
    ctx.wait_text("the purge count", "p.confirm strong", "2")
        .await;
    ctx.check_page("confirm-purge").await;
    ctx.click("form button.danger").await;
    ctx.wait_text("the purge result", "p.done", "Purged 2 processes.")
        .await;
    for id in &ids {
        assert!(ctx.fleet.record(id).await.is_none(), "{id} still there");
    }
}

/// How many `Call` attempts the process made (each one called the endpoint once).
async fn calls_of(ctx: &Ctx, id: &str) -> usize {
    let rec = ctx.fleet.record(id).await.unwrap();
    rec.steps["Call"].attempts().len()
}

/// The overview (with the Deployment's LLM tokens of the day), processes, dead letters,
/// quarantine, workers and definitions render and pass axe; a worker is live; the
/// definitions page draws every step of every definition.
async fn other_pages(ctx: &Ctx, deployment: &str) {
    // The overview counts what ran: the Test, the Deployment, the Fixables and the LLM
    // tokens the Deployment's steps were charged today.
    ctx.browser.goto(&ctx.ui("/ui")).await;
    ctx.wait_text(
        "the Deployment's LLM tokens",
        "#llm ~ table tbody th",
        "Deployment",
    )
    .await;
    let tokens = ctx
        .browser
        .wait_element("#llm ~ table tbody td", DEADLINE)
        .await;
    let tokens: u64 = ctx.browser.text(&tokens).await.parse().unwrap();
    // The only Deployment so far charged them all.
    let (charged, _) = ctx
        .fleet
        .store()
        .llm_usage(deployment)
        .await
        .unwrap()
        .unwrap();
    assert!(charged > 0);
    assert_eq!(tokens, charged);
    // Per type: the one Test completed; the Fixables failed five times (one, then two
    // retried in bulk that failed again) and completed twice (the patched one, then its
    // retry from a chosen step); none of them is unfinished.
    // (active, completed last hour, last day, failed or timed out last hour, last day).
    let row = |t: &str| {
        format!(
            "(function() {{ const r = document.querySelector(\"#per-type tr[data-type='{t}']\"); \
             return r ? [r.dataset.active, r.dataset.completedHour, r.dataset.completedDay, \
             r.dataset.failedHour, r.dataset.failedDay] : null; }})()"
        )
    };
    ctx.browser
        .wait_true(
            "the Test's row on the overview",
            &format!("const v = {}; return !!v && v[1] === '1';", row("Test")),
            DEADLINE,
        )
        .await;
    for (t, want) in [
        ("Test", json!(["0", "1", "1", "0", "0"])),
        ("Fixable", json!(["0", "2", "2", "5", "5"])),
    ] {
        let got = ctx
            .browser
            .execute(&format!("return {};", row(t)), json!([]))
            .await;
        assert_eq!(got, want, "{t}");
    }
    ctx.check_page("overview").await;
    for (path, title, name) in [
        ("/ui/processes", "Processes", "processes"),
        ("/ui/deadletters", "Dead letters", "deadletters"),
        ("/ui/quarantine", "Quarantine", "quarantine"),
        ("/ui/workers", "Workers", "workers"),
        ("/ui/definitions", "Definitions", "definitions"),
    ] {
        ctx.browser.goto(&ctx.ui(path)).await;
        ctx.wait_text(title, "main h1", title).await;
        if name == "workers" {
            ctx.wait_text("a live worker", "#live tbody tr td:nth-child(3)", "yes")
                .await;
            // Each worker registered the version it runs.
            ctx.wait_text(
                "the worker's version",
                "#live tbody tr td.version",
                env!("CARGO_PKG_VERSION"),
            )
            .await;
        }
        ctx.check_page(name).await;
    }
    ctx.browser.goto(&ctx.ui("/ui/definitions")).await;
    for def in ctx.fleet.engine.defs.iter() {
        let svg = format!("#def-{}-{} ~ .dag svg", def.name, def.version);
        let want: Vec<String> = def.steps.iter().map(|s| s.name.clone()).collect();
        assert_eq!(ctx.dag_steps(&svg).await, want, "{}", def.name);
    }
}

/// A `read` key sees a waiting Deployment without any action, and the server refuses a
/// forged approval (403) whatever the CSRF token; an `operate` session's POST without the
/// CSRF token is refused too, and with it goes through.
async fn read_role_is_refused(ctx: &Ctx) {
    let id = ctx
        .submit("Deployment", json!({"app": "honua", "environment": "dev"}))
        .await;
    ctx.login("read-token").await;
    ctx.open_process(&id, "WaitingForApproval").await;
    assert!(ctx.browser.find_all("a[data-action]").await.is_empty());
    assert!(ctx.browser.find_all(".actions").await.is_empty());
    ctx.browser.goto(&ctx.ui("/ui/processes")).await;
    ctx.browser.wait_element("table.list", DEADLINE).await;
    assert!(ctx.browser.find_all("details.bulk").await.is_empty());
    // The confirmation page itself is refused.
    ctx.browser
        .goto(&ctx.ui(&format!("/ui/processes/{id}/confirm?action=approve")))
        .await;
    ctx.wait_text("the refusal", "main h1", "Forbidden").await;

    let (read_cookie, read_csrf) = session_of(ctx, "read-token").await;
    let approve = [("action", "approve"), ("csrf", read_csrf.as_str())];
    assert_eq!(
        post_action(&ctx.fleet, Some(&read_cookie), &id, &approve).await,
        StatusCode::FORBIDDEN
    );
    let (op_cookie, op_csrf) = session_of(ctx, "operate-token").await;
    assert_eq!(
        post_action(&ctx.fleet, Some(&op_cookie), &id, &[("action", "approve")]).await,
        StatusCode::FORBIDDEN,
        "no CSRF token"
    );
    assert_eq!(
        post_action(
            &ctx.fleet,
            Some(&op_cookie),
            &id,
            &[("action", "approve"), ("csrf", &read_csrf)]
        )
        .await,
        StatusCode::FORBIDDEN,
        "another session's CSRF token"
    );
    let rec = ctx.fleet.record(&id).await.unwrap();
    assert_eq!(rec.status.as_str(), "WaitingForApproval");
    // The same form with the operate session's own token goes through.
    assert_eq!(
        post_action(
            &ctx.fleet,
            Some(&op_cookie),
            &id,
            &[("action", "approve"), ("csrf", &op_csrf)]
        )
        .await,
        StatusCode::SEE_OTHER
    );
    let rec = ctx.fleet.wait_finished(&id).await;
    assert_eq!(rec.status.as_str(), "Completed");
    // No session at all: refused too.
    assert_eq!(
        post_action(
            &ctx.fleet,
            Some("honua_console=forged.00"),
            &id,
            &[("action", "cancel")]
        )
        .await,
        StatusCode::UNAUTHORIZED
    );
}

/// Without API keys the console is open like the API and says so; its pages carry the
/// strict CSP; a form still needs the page's CSRF token (a cross-site form cannot read it).
/// A dead letter is listed and replayed from the console. (No workers: a fake consumer
/// holds a job until its redelivery dead-letters it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_console_without_keys() {
    let redis = RedisServer::start();
    let defs = defs_dir(&[defs::GATE, defs::THREE]);
    let fleet = Fleet::start(test_config(&redis.url(), defs.path()), 1, 0).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http.get(fleet.url("/ui/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()[reqwest::header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_string();
    for d in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(d), "{csp} lacks {d}");
    }
    let page = r.text().await.unwrap();
    assert!(page.contains("No API keys are configured"), "{page}");
    assert!(
        !page.contains("<script>") && !page.contains(" style="),
        "inline script or style"
    );
    let js = http
        .get(fleet.url("/ui/static/console.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        js.headers()[reqwest::header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    // The login page sends an open console to the overview.
    let r = http.get(fleet.url("/ui/login")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);

    let id = fleet.submit("Gate", json!({})).await;
    assert_eq!(
        post_action(&fleet, None, &id, &[("action", "cancel")]).await,
        StatusCode::FORBIDDEN
    );
    // The open console has no logout form: the CSRF token is on the action pages.
    assert!(!page.contains("name=\"csrf\""));
    let confirm = http
        .get(fleet.url(&format!("/ui/processes/{id}/confirm?action=cancel")))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = csrf_of(&confirm);
    assert_eq!(
        post_action(&fleet, None, &id, &[("action", "cancel"), ("csrf", &csrf)]).await,
        StatusCode::SEE_OTHER
    );
    let rec = fleet.wait_finished(&id).await;
    assert_eq!(rec.status.as_str(), "Cancelled");
    assert_eq!(rec.audit.last().unwrap().by, None);

    replay_a_dead_letter(&fleet, &http).await;
    fleet.stop().await;
}

async fn replay_a_dead_letter(fleet: &Fleet, http: &reqwest::Client) {
    let st = fleet.store();
    let id = fleet.submit("Three", json!({})).await;
    assert_eq!(take_jobs(st, "fake").await.len(), 1);
    let r = st
        .reclaim("other", std::time::Duration::ZERO, "0-0", 10, 1)
        .await
        .unwrap();
    assert_eq!(r.dead_lettered.len(), 1, "{r:?}");
    assert_eq!(fleet.wait_finished(&id).await.status.as_str(), "Failed");

    let get = |path: String| async move {
        http.get(fleet.url(&path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let list = get("/ui/deadletters".into()).await;
    assert!(list.contains(&format!("/ui/processes/{id}")), "{list}");
    let confirm = get("/ui/deadletters/confirm".into()).await;
    assert!(
        confirm.contains("Replay <strong>1</strong> dead letter"),
        "{confirm}"
    );
    let r = http
        .post(fleet.url("/ui/deadletters/replay"))
        .header(reqwest::header::CONTENT_TYPE, FORM)
        .body(form_body(&[("csrf", &csrf_of(&confirm))]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let done = r.text().await.unwrap();
    assert!(done.contains("Replayed 1 of 1 dead letter(s)."), "{done}");
    assert!(
        st.stream_latest(&st.keys().dlq(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    let rec = fleet.record(&id).await.unwrap();
    assert_eq!(rec.status.as_str(), "Running");
    assert_eq!(rec.audit.last().unwrap().action, "retry");
}
