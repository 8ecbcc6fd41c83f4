//! The web console at `/ui`: server-rendered pages (maud) over the same internal functions
//! the API handlers call, one small script and one style sheet embedded in the binary, and
//! a strict Content-Security-Policy (scripts and styles from `/ui/static/` only).
//!
//! Access follows the API's roles: with API keys configured, `/ui/login` takes a token and
//! sets a session cookie (HMAC-SHA256 signed, expiring, HttpOnly, `SameSite=Strict`,
//! `Secure` behind a TLS proxy); every form that changes something carries a CSRF token
//! bound to the session; a `read` key sees no action and the server refuses actions by the
//! role the equivalent API route needs ([`super::required_role`]). With no keys the console
//! is open, like the API, and says so in a banner. The signing key is `api.session_secret`
//! (`HONUA_SESSION_SECRET`), the same on every gateway replica so that any of them accepts a
//! session and a restart logs nobody out; without it a random key is drawn at start (a
//! warning says so), and sessions last as long as that gateway process.
//!
//! Live regions (`#live`) are re-fetched every 2 s by `console.js` with the
//! `x-console-fragment` header, which makes a page answer with that region only; polling
//! pauses while the tab is hidden.

mod dag;
mod pages;

use super::auth::constant_time_eq;
use super::{ApiError, ApiState, required_role, token_hash};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use honua_shared::config::Role;
use honua_shared::llm_config::Secret;
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const JS: &str = include_str!("console.js");
const CSS: &str = include_str!("console.css");
/// The session cookie's name.
pub const COOKIE: &str = "honua_console";
/// How long a session lasts after login.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// The request header `console.js` sends to get a page's live region only.
const FRAGMENT_HEADER: &str = "x-console-fragment";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's signing key (sessions and CSRF tokens): `api.session_secret`, else drawn
/// when the router is built.
pub(super) struct Console {
    key: ring::hmac::Key,
}

impl Console {
    /// Signs with `secret` (every gateway configured with it accepts the others' sessions),
    /// or with a random key when there is none.
    fn new(secret: Option<&Secret>) -> Self {
        let key = match secret {
            Some(s) => ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.expose().as_bytes()),
            None => {
                let random: [u8; 32] = rand::random();
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &random)
            }
        };
        Console { key }
    }
    fn sign(&self, msg: &[u8]) -> String {
        hex(ring::hmac::sign(&self.key, msg).as_ref())
    }
    fn verify(&self, msg: &[u8], sig_hex: &str) -> bool {
        unhex(sig_hex).is_some_and(|sig| ring::hmac::verify(&self.key, msg, &sig).is_ok())
    }
    /// The CSRF token of a session (`open` when there are no keys).
    fn csrf(&self, session: &str) -> String {
        self.sign(format!("csrf\n{session}").as_bytes())
    }
    /// A session cookie value for key `name`: `hex(expiry\nnonce\nname).hex(hmac)`.
    fn session(&self, name: &str) -> String {
        let exp = now_ms() + SESSION_TTL.as_millis() as u64;
        let nonce = hex(&rand::random::<[u8; 16]>());
        let payload = format!("{exp}\n{nonce}\n{name}");
        format!(
            "{}.{}",
            hex(payload.as_bytes()),
            self.sign(payload.as_bytes())
        )
    }
    /// The key name and nonce of a valid, unexpired session cookie.
    fn open_session(&self, cookie: &str) -> Option<(String, String)> {
        let (p, sig) = cookie.split_once('.')?;
        let payload = String::from_utf8(unhex(p)?).ok()?;
        if !self.verify(payload.as_bytes(), sig) {
            return None;
        }
        let mut parts = payload.splitn(3, '\n');
        let exp: u64 = parts.next()?.parse().ok()?;
        let nonce = parts.next()?.to_string();
        let name = parts.next()?.to_string();
        (exp > now_ms()).then_some((name, nonce))
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "a session cookie's expiry is checked by the gateway that signed it, on its own clock"
)]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Who is looking: the key's name (`None` when the console is open), its role and the CSRF
/// token the forms carry.
#[derive(Debug, Clone)]
pub(super) struct Viewer {
    pub name: Option<String>,
    pub role: Role,
    pub csrf: String,
}

impl Viewer {
    /// May this viewer do what the API route `POST path` allows?
    pub fn may(&self, path: &str) -> bool {
        required_role(&Method::POST, path)
            .or_else(|| required_role(&Method::DELETE, path))
            .is_none_or(|r| self.role >= r)
    }
    /// The acting key's name for the audit trail.
    pub fn by(&self) -> Option<&str> {
        self.name.as_deref()
    }
}

/// The console's routes (merged into the gateway's router, outside the API's bearer check).
pub(super) fn router(state: ApiState) -> Router<ApiState> {
    let api = &state.engine.cfg.api;
    if api.session_secret.is_none() && !api.keys.is_empty() {
        tracing::warn!(
            "api.session_secret is not set: console sessions are signed with a random key, so \
             they end when this gateway restarts and other gateway replicas refuse them \
             (set HONUA_SESSION_SECRET to the same 32+ byte secret on every gateway)"
        );
    }
    let console = Console::new(api.session_secret.as_ref());
    Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/", get(pages::overview))
        .route("/ui/processes", get(pages::processes))
        .route("/ui/processes/{id}", get(pages::detail))
        .route("/ui/processes/{id}/state.json", get(pages::state_json))
        .route("/ui/processes/{id}/confirm", get(pages::confirm_action))
        .route("/ui/processes/{id}/action", post(pages::act))
        .route("/ui/bulk", get(pages::confirm_bulk).post(pages::bulk))
        .route("/ui/deadletters", get(pages::deadletters))
        .route("/ui/deadletters/confirm", get(pages::confirm_replay))
        .route("/ui/deadletters/replay", post(pages::replay))
        .route("/ui/quarantine", get(pages::quarantine))
        .route("/ui/workers", get(pages::workers))
        .route("/ui/definitions", get(pages::definitions))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/static/{file}", get(static_file))
        .route_layer(middleware::from_fn_with_state(state, session))
        .layer(middleware::from_fn(headers))
        .layer(Extension(Arc::new(console)))
}

/// Security headers on every console response.
async fn headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Puts the [`Viewer`] on every request but the login page and the static files; without
/// a valid session a page redirects to the login page and anything else is refused.
async fn session(
    State(st): State<ApiState>,
    Extension(console): Extension<Arc<Console>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if path == "/ui/login" || path.starts_with("/ui/static/") {
        return next.run(req).await;
    }
    let keys = &st.engine.cfg.api.keys;
    let viewer = if keys.is_empty() {
        Some(Viewer {
            name: None,
            role: Role::Admin,
            csrf: console.csrf("open"),
        })
    } else {
        cookie_value(req.headers(), COOKIE)
            .and_then(|c| console.open_session(c))
            .and_then(|(name, nonce)| {
                // The key must still be configured; its role is read from the config.
                let key = keys.iter().find(|k| k.name == name)?;
                Some(Viewer {
                    name: Some(name),
                    role: key.role,
                    csrf: console.csrf(&nonce),
                })
            })
    };
    let Some(viewer) = viewer else {
        if req.method() == Method::GET {
            return Redirect::to("/ui/login").into_response();
        }
        return error_page(None, StatusCode::UNAUTHORIZED, "log in first");
    };
    req.extensions_mut().insert(viewer);
    next.run(req).await
}

/// `console.js` and `console.css`, embedded in the binary.
async fn static_file(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    let (body, ct) = match file.as_str() {
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        "console.css" => (CSS, "text/css; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, ct),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The page frame: navigation, the open-console banner, the viewer and the content.
pub(super) fn layout(viewer: Option<&Viewer>, title: &str, body: Markup) -> Markup {
    const NAV: &[(&str, &str)] = &[
        ("/ui", "Overview"),
        ("/ui/processes", "Processes"),
        ("/ui/deadletters", "Dead letters"),
        ("/ui/quarantine", "Quarantine"),
        ("/ui/workers", "Workers"),
        ("/ui/definitions", "Definitions"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Honua console" }
                link rel="stylesheet" href="/ui/static/console.css";
                script src="/ui/static/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    span.brand { "Honua" }
                    nav aria-label="Main" {
                        ul {
                            @for (href, label) in NAV {
                                li { a href=(href) aria-current=[(*label == title).then_some("page")] { (label) } }
                            }
                        }
                    }
                    @if let Some(v) = viewer {
                        div.who {
                            @if let Some(n) = &v.name {
                                span { (n) " (" (format!("{:?}", v.role).to_lowercase()) ")" }
                                form method="post" action="/ui/logout" {
                                    input type="hidden" name="csrf" value=(v.csrf);
                                    button.link type="submit" { "Log out" }
                                }
                            }
                        }
                    }
                }
                @if viewer.is_some_and(|v| v.name.is_none()) {
                    p.banner role="status" { "No API keys are configured: this console (like the API) is open to anyone who can reach it." }
                }
                main #main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// An error as a page with its status.
pub(super) fn error_page(viewer: Option<&Viewer>, status: StatusCode, detail: &str) -> Response {
    let body = html! {
        p.error role="alert" { (detail) }
        p { a href="/ui" { "Back to the overview" } }
    };
    let title = status.canonical_reason().unwrap_or("Error");
    (status, layout(viewer, title, body).into_response_html()).into_response()
}

/// A page handler's failure: an API error shown as a page.
pub(super) struct UiError(ApiError);

impl<E: Into<ApiError>> From<E> for UiError {
    fn from(e: E) -> Self {
        UiError(e.into())
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        error_page(None, self.0.status(), self.0.detail())
    }
}

/// The refusal of an action page: 400 for an unknown action (`api_path` `None`), 403
/// when the viewer's role may not do what the API route `api_path` does.
pub(super) fn refuse_page(viewer: &Viewer, api_path: Option<&str>) -> Option<Response> {
    match api_path {
        None => Some(error_page(
            Some(viewer),
            StatusCode::BAD_REQUEST,
            "unknown action",
        )),
        Some(p) if !viewer.may(p) => Some(error_page(
            Some(viewer),
            StatusCode::FORBIDDEN,
            "this key's role may not do that",
        )),
        Some(_) => None,
    }
}

/// The refusal (403) of a form without the session's CSRF token, else [`refuse_page`]'s.
pub(super) fn refuse_form(
    viewer: &Viewer,
    csrf: Option<&str>,
    api_path: Option<&str>,
) -> Option<Response> {
    let ok = csrf.is_some_and(|t| constant_time_eq(t.as_bytes(), viewer.csrf.as_bytes()));
    if !ok {
        return Some(error_page(
            Some(viewer),
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong: reload the page and try again",
        ));
    }
    refuse_page(viewer, api_path)
}

/// Whether the request asks for the live region only.
pub(super) fn wants_fragment(headers: &HeaderMap) -> bool {
    headers.contains_key(FRAGMENT_HEADER)
}

/// A page, or only its live region when `console.js` polls it.
pub(super) fn page(
    viewer: &Viewer,
    headers: &HeaderMap,
    title: &str,
    before: Markup,
    live: Markup,
) -> Response {
    if wants_fragment(headers) {
        return live.into_response_html();
    }
    let body = html! {
        (before)
        div #live data-poll="2000" { (live) }
    };
    layout(Some(viewer), title, body).into_response_html()
}

trait IntoHtml {
    fn into_response_html(self) -> Response;
}

impl IntoHtml for Markup {
    fn into_response_html(self) -> Response {
        (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            self.into_string(),
        )
            .into_response()
    }
}

pub(super) fn html_response(m: Markup) -> Response {
    m.into_response_html()
}

async fn login_page(State(st): State<ApiState>) -> Response {
    if st.engine.cfg.api.keys.is_empty() {
        return Redirect::to("/ui").into_response();
    }
    login_form(None)
}

fn login_form(problem: Option<&str>) -> Response {
    let body = html! {
        form.card method="post" action="/ui/login" {
            @if let Some(p) = problem { p.error role="alert" { (p) } }
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="current-password" required;
            button type="submit" { "Log in" }
        }
    };
    let status = if problem.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    (status, layout(None, "Log in", body).into_response_html()).into_response()
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

async fn login(
    State(st): State<ApiState>,
    Extension(console): Extension<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let hash = token_hash(f.token.trim());
    let keys = &st.engine.cfg.api.keys;
    let Some(key) = keys
        .iter()
        .find(|k| constant_time_eq(k.sha256.as_bytes(), hash.as_bytes()))
    else {
        return login_form(Some("unknown token"));
    };
    // Behind a TLS-terminating proxy the cookie is marked Secure (the gateway speaks plain
    // HTTP itself).
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={}; Path=/ui; Max-Age={}; HttpOnly; SameSite=Strict{}",
        console.session(&key.name),
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    );
    tracing::info!(key = %key.name, "console login");
    let mut resp = Redirect::to("/ui").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(Extension(viewer): Extension<Viewer>, Form(f): Form<CsrfForm>) -> Response {
    if let Some(r) = refuse_form(&viewer, f.csrf.as_deref(), Some("/ui/logout")) {
        return r;
    }
    let mut resp = Redirect::to("/ui/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("honua_console=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_with_the_same_secret_accept_each_others_sessions() {
        let secret = Secret::new("a-shared-session-secret-of-32-bytes!");
        let (a, b) = (Console::new(Some(&secret)), Console::new(Some(&secret)));
        let s = a.session("oncall");
        let (name, nonce) = b.open_session(&s).expect("the other gateway accepts it");
        assert_eq!(name, "oncall");
        assert_eq!(a.csrf(&nonce), b.csrf(&nonce), "and its CSRF token");
        // Another secret, or none (a random key per start), refuses it.
        let other = Secret::new("another-session-secret-of-32-bytes!!");
        assert!(Console::new(Some(&other)).open_session(&s).is_none());
        assert!(Console::new(None).open_session(&s).is_none());
        let (r1, r2) = (Console::new(None), Console::new(None));
        assert!(r2.open_session(&r1.session("oncall")).is_none());
    }

    #[test]
    fn sessions_are_signed_and_expire() {
        let c = Console::new(None);
        let s = c.session("oncall");
        let (name, nonce) = c.open_session(&s).unwrap();
        assert_eq!(name, "oncall");
        assert_eq!(c.csrf(&nonce), c.csrf(&nonce));
        assert_ne!(c.csrf(&nonce), c.csrf("open"));
        // Another key's signature, a changed payload, garbage: refused.
        assert!(Console::new(None).open_session(&s).is_none());
        let (p, sig) = s.split_once('.').unwrap();
        let forged = String::from_utf8(unhex(p).unwrap())
            .unwrap()
            .replace("oncall", "platform");
        assert!(
            c.open_session(&format!("{}.{sig}", hex(forged.as_bytes())))
                .is_none()
        );
        assert!(c.open_session("zz.zz").is_none());
        // An expired one.
        let old = "1\nabcd\noncall";
        let expired = format!("{}.{}", hex(old.as_bytes()), c.sign(old.as_bytes()));
        assert!(c.open_session(&expired).is_none());
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; honua_console=x.y; b=2"),
        );
        assert_eq!(cookie_value(&h, COOKIE), Some("x.y"));
        assert_eq!(cookie_value(&h, "c"), None);
    }
}
