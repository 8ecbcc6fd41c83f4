//! A faithful OpenAI-compatible mock LLM provider, for tests, `honua dev` and load tests.
//!
//! Endpoints:
//! - `POST /v1/chat/completions` (OpenAI JSON; `stream: true` → SSE `data:` chunks and
//!   `data: [DONE]`, with a final usage chunk when `stream_options.include_usage`);
//! - `POST /openai/deployments/{deployment}/chat/completions?api-version=…` (Azure; the key
//!   comes in the `api-key` header);
//! - `POST /v1/messages` (Anthropic's Messages API: `x-api-key` and `anthropic-version`
//!   headers, top-level `system`, `max_tokens` required; `content[].text` and
//!   `usage.input_tokens`/`output_tokens` in the reply; `stream: true` → SSE events
//!   `message_start`, `content_block_start`, `ping`, `content_block_delta` (`text_delta`),
//!   `content_block_stop`, `message_delta` (`stop_reason`, `usage.output_tokens`),
//!   `message_stop`; errors as `{"type": "error", "error": {"type", "message"}}` with
//!   Anthropic's error types, 529 `overloaded_error` included; rate-limit state in
//!   `anthropic-ratelimit-requests-*`/`-tokens-*` headers with RFC 3339 reset instants);
//! - `GET /v1/models`.
//!
//! Behaviour a client must cope with, all configurable ([`MockConfig`]) or scripted at run
//! time ([`MockLlm::script`]): a latency distribution, 429 with `Retry-After`, 500/503, a
//! hang (no answer until the client times out), a stall in the middle of a stream, and its
//! own sliding-window request/token limit that answers 429 + `Retry-After` when exceeded
//! and sends `x-ratelimit-*` headers on every answer.
//!
//! Token counting (a stated estimate, no tokenizer): a text counts `ceil(chars / 4)` tokens
//! ([`estimate_tokens`]); the prompt counts the sum over its messages' contents; the
//! completion counts its generated text, cut to `max_tokens` (then `finish_reason` is
//! `length`). The limit counts prompt + completion tokens of each admitted request at its
//! arrival.
//!
//! Every request is recorded ([`RecordedRequest`]: arrival instant, path, model, tokens,
//! status, the credential header it saw) so tests count overshoot at the server.

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// Tokens of a text: `ceil(chars / 4)` (OpenAI's rule of thumb for English).
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// How long the mock takes before it answers (before the first chunk when streaming).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    /// Uniformly distributed in `[min, max]`.
    Uniform {
        min: Duration,
        max: Duration,
    },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed(Duration::ZERO)
    }
}

impl Latency {
    fn sample(&self) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } if max > min => {
                min + (max - min).mul_f64(rand::random::<f64>())
            }
            Latency::Uniform { min, .. } => min,
        }
    }
}

/// One scripted answer, consumed by the next request (first in, first out).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Answer normally.
    Ok,
    /// 429 with `Retry-After` (whole seconds, rounded up) and `retry-after-ms`.
    RateLimited { retry_after: Duration },
    /// An error status (500, 503, …) with an OpenAI-style error body.
    Status(u16),
    /// Accept the request and never answer (until the mock stops): a client timeout.
    Hang,
    /// Stream this many content chunks, then stall without ending the stream. A request
    /// without `stream: true` hangs instead.
    StallAfter(usize),
    /// Answer normally after this extra delay.
    Delay(Duration),
    /// This status with a plain-text (not JSON) body about a missing API key, as LiteLLM
    /// answers a request without `Authorization` (a 500).
    PlainAuth(u16),
}

impl Fault {
    /// Parses a fault script: a comma-separated list of `ok`, `429` or `429:<secs>`,
    /// `500`/`503`/any status, `hang`, `stall` or `stall:<chunks>`, `delay:<ms>`,
    /// `auth:<status>` (a plain-text missing-key answer).
    pub fn parse_script(s: &str) -> Result<Vec<Fault>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                let (head, arg) = match t.split_once(':') {
                    Some((h, a)) => (h, Some(a)),
                    None => (t, None),
                };
                let num = |what: &str| -> Result<u64, String> {
                    arg.map(|a| a.parse::<u64>())
                        .transpose()
                        .map_err(|_| format!("fault {t:?}: {what} must be a whole number"))
                        .map(|v| v.unwrap_or(0))
                };
                match head {
                    "ok" => Ok(Fault::Ok),
                    "429" => Ok(Fault::RateLimited {
                        retry_after: Duration::from_secs(if arg.is_some() {
                            num("seconds")?
                        } else {
                            1
                        }),
                    }),
                    "hang" => Ok(Fault::Hang),
                    "stall" => Ok(Fault::StallAfter(if arg.is_some() {
                        num("chunks")? as usize
                    } else {
                        1
                    })),
                    "delay" => Ok(Fault::Delay(Duration::from_millis(num("milliseconds")?))),
                    "auth" => match u16::try_from(num("status")?) {
                        Ok(c) if (400..600).contains(&c) => Ok(Fault::PlainAuth(c)),
                        _ => Err(format!("fault {t:?}: auth needs a 4xx/5xx status")),
                    },
                    code => match code.parse::<u16>() {
                        Ok(c) if (400..600).contains(&c) => Ok(Fault::Status(c)),
                        _ => Err(format!(
                            "unknown fault {t:?}: expected ok, 429[:secs], a 4xx/5xx status, \
                             hang, stall[:chunks], delay:<ms> or auth:<status>"
                        )),
                    },
                }
            })
            .collect()
    }
}

/// What a request looked like, for completion functions.
#[derive(Debug, Clone)]
pub struct ChatRequestView {
    pub model: String,
    /// (role, text content) of each message.
    pub messages: Vec<(String, String)>,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// The whole JSON body (e.g. to look at `response_format`).
    pub body: Value,
}

/// The completion text the mock generates.
#[derive(Clone, Default)]
pub enum Completion {
    /// Always this text.
    Fixed(String),
    /// The last user message, prefixed with "echo: ". A request that asks for structured
    /// output (`response_format: {type: json_schema, json_schema: {schema}}`) gets a JSON
    /// instance of that schema instead ([`schema_instance`]), as a provider's structured
    /// output mode would answer.
    #[default]
    Echo,
    /// A function of the request.
    Func(Arc<dyn Fn(&ChatRequestView) -> String + Send + Sync>),
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completion::Fixed(s) => f.debug_tuple("Fixed").field(s).finish(),
            Completion::Echo => f.write_str("Echo"),
            Completion::Func(_) => f.write_str("Func(..)"),
        }
    }
}

/// The mock's own rate limit: at most `max_requests` requests and `max_tokens` tokens
/// (prompt + completion) admitted in any sliding window of `window`. 0 = no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowLimit {
    pub window: Duration,
    pub max_requests: u64,
    pub max_tokens: u64,
}

impl WindowLimit {
    /// A provider-style per-minute limit.
    pub fn per_minute(rpm: u64, tpm: u64) -> Self {
        WindowLimit {
            window: Duration::from_secs(60),
            max_requests: rpm,
            max_tokens: tpm,
        }
    }
}

/// A periodic rate limit: the `every`-th, 2×`every`-th, … chat request (counting every
/// well-formed chat request since the start) answers 429 with `Retry-After`, whatever the
/// window limit says. A scripted fault takes precedence over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EveryNth {
    pub every: u64,
    pub retry_after: Duration,
}

/// Configuration of a [`MockLlm`].
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Reported in answers and `GET /v1/models` (requests may name any model).
    pub model: String,
    pub latency: Latency,
    /// Pause between two stream chunks.
    pub chunk_delay: Duration,
    /// Words per stream chunk.
    pub words_per_chunk: usize,
    pub completion: Completion,
    /// `max_tokens` when the request sets none.
    pub default_max_tokens: u64,
    pub limit: Option<WindowLimit>,
    /// Scripted answers for the first requests.
    pub faults: Vec<Fault>,
    /// Every Nth request answers 429 (`None` or `every` = 0: never).
    pub rate_limit_every: Option<EveryNth>,
    /// When set, requests must carry this key (`Authorization: Bearer` or `api-key`), else 401.
    pub api_key: Option<String>,
    /// Answer like a LiteLLM proxy: `retry-after`, `retry-after-ms` and `x-ratelimit-*`
    /// are sent only under the `llm_provider-` prefix (e.g. `llm_provider-retry-after`).
    pub proxy_headers: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        MockConfig {
            model: "mock-gpt".into(),
            latency: Latency::default(),
            chunk_delay: Duration::from_millis(5),
            words_per_chunk: 2,
            completion: Completion::Echo,
            default_max_tokens: 256,
            limit: None,
            faults: Vec::new(),
            rate_limit_every: None,
            api_key: None,
            proxy_headers: false,
        }
    }
}

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// When it arrived (before latency).
    pub at: Instant,
    pub path: String,
    /// Azure deployment name, when called on the Azure path.
    pub deployment: Option<String>,
    pub api_version: Option<String>,
    pub model: String,
    pub prompt_tokens: u64,
    pub max_tokens: Option<u64>,
    /// Tokens of the generated completion (0 when the request failed).
    pub completion_tokens: u64,
    pub stream: bool,
    /// The status answered (a stalled stream or hang records 200 or 0 respectively: 0 =
    /// never answered).
    pub status: u16,
    /// The `Authorization` header seen, verbatim (to check redaction and key routing).
    pub authorization: Option<String>,
    /// The `api-key` header seen, verbatim.
    pub api_key: Option<String>,
    /// The fault applied, if one was scripted (or the periodic 429 of
    /// [`MockConfig::rate_limit_every`], recorded as [`Fault::RateLimited`]).
    pub fault: Option<Fault>,
    /// The OpenAI `user` field, if sent.
    pub user: Option<String>,
    /// Anthropic: the `x-api-key` header seen, verbatim.
    pub x_api_key: Option<String>,
    /// Anthropic: the `anthropic-version` header seen.
    pub anthropic_version: Option<String>,
    /// Anthropic: the top-level `system` prompt (its text), if sent.
    pub system: Option<String>,
}

impl RecordedRequest {
    /// Tokens this request counts against the mock's limit (prompt + completion).
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
    /// Whether the mock admitted it and answered 200.
    pub fn admitted(&self) -> bool {
        self.status == 200
    }
}

struct Shared {
    cfg: Mutex<MockConfig>,
    faults: Mutex<VecDeque<Fault>>,
    records: Mutex<Vec<RecordedRequest>>,
    /// Admitted requests in the current window: (arrival, tokens).
    window: Mutex<VecDeque<(Instant, u64)>>,
    ids: AtomicU64,
    /// Well-formed chat requests so far (for [`MockConfig::rate_limit_every`]).
    chats: AtomicU64,
    shutdown: watch::Receiver<bool>,
}

/// A running mock provider on 127.0.0.1. Stops when dropped.
pub struct MockLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl MockLlm {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub async fn start(cfg: MockConfig) -> anyhow::Result<MockLlm> {
        Self::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Binds `addr` and serves until dropped.
    pub async fn start_on(cfg: MockConfig, addr: SocketAddr) -> anyhow::Result<MockLlm> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, shutdown) = watch::channel(false);
        let shared = Arc::new(Shared {
            faults: Mutex::new(cfg.faults.iter().copied().collect()),
            cfg: Mutex::new(cfg),
            records: Mutex::new(Vec::new()),
            window: Mutex::new(VecDeque::new()),
            ids: AtomicU64::new(0),
            chats: AtomicU64::new(0),
            shutdown: shutdown.clone(),
        });
        let app = router(shared.clone());
        let mut sd = shutdown;
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = sd.wait_for(|s| *s).await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "mock llm server stopped");
            }
        });
        Ok(MockLlm {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// e.g. "http://127.0.0.1:PORT/v1" (OpenAI-style base URL).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The Anthropic base URL ("http://127.0.0.1:PORT"); messages go to `/v1/messages`.
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The Azure endpoint ("http://127.0.0.1:PORT"); deployments live under `/openai/deployments`.
    pub fn azure_endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.records.lock().unwrap().clone()
    }

    /// Forgets recorded requests (the limit window is kept).
    pub fn clear_requests(&self) {
        self.shared.records.lock().unwrap().clear();
    }

    /// Appends scripted answers for the next requests.
    pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.faults.lock().unwrap().extend(faults);
    }

    /// Changes the configuration of later requests (scripted faults are not touched).
    pub fn reconfigure(&self, f: impl FnOnce(&mut MockConfig)) {
        f(&mut self.shared.cfg.lock().unwrap());
    }

    /// Stops serving; hung and stalled requests end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// The router (testable without a socket).
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai_chat))
        .route("/chat/completions", post(openai_chat))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(azure_chat),
        )
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .with_state(shared)
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    let model = s.cfg.lock().unwrap().model.clone();
    Json(json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "honua-mock"}]
    }))
}

async fn openai_chat(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    chat(
        s,
        headers,
        body,
        "/v1/chat/completions".into(),
        None,
        None,
        Dialect::Openai,
    )
    .await
}

async fn anthropic_messages(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    chat(
        s,
        headers,
        body,
        "/v1/messages".into(),
        None,
        None,
        Dialect::Anthropic,
    )
    .await
}

/// Which API a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dialect {
    /// OpenAI chat completions (and Azure's deployment paths).
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

async fn azure_chat(
    State(s): State<Arc<Shared>>,
    Path(deployment): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/openai/deployments/{deployment}/chat/completions");
    let Some(version) = q.get("api-version").cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "the api-version query parameter is required",
        );
    };
    chat(
        s,
        headers,
        body,
        path,
        Some(deployment),
        Some(version),
        Dialect::Openai,
    )
    .await
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

/// Anthropic's error type for a status.
fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// An error answer in `dialect`'s format (`kind` is OpenAI's `type`; Anthropic's follows
/// from the status).
fn error_in(dialect: Dialect, status: StatusCode, kind: &str, message: &str) -> Response {
    match dialect {
        Dialect::Openai => error(status, kind, message),
        Dialect::Anthropic => (
            status,
            Json(json!({
                "type": "error",
                "error": {"type": anthropic_error_type(status), "message": message},
            })),
        )
            .into_response(),
    }
}

/// The schema an Anthropic request states in its system prompt (Anthropic has no
/// structured-output mode): the JSON object after the text `JSON schema:`.
pub fn stated_schema(system: &str) -> Option<Value> {
    let at = system.find("JSON schema:")? + "JSON schema:".len();
    let rest = system[at..].trim_start();
    let v = serde_json::Deserializer::from_str(rest)
        .into_iter::<Value>()
        .next()?
        .ok()?;
    v.is_object().then_some(v)
}

/// An instant `d` from now, as Anthropic writes its rate-limit resets (RFC 3339, UTC).
#[expect(
    clippy::disallowed_methods,
    reason = "Anthropic's reset headers are the provider's wall-clock instants"
)]
fn rfc3339_in(d: Duration) -> String {
    humantime::format_rfc3339_millis(SystemTime::now() + d).to_string()
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

#[expect(
    clippy::disallowed_methods,
    reason = "the `created` field of a reply is the provider's wall clock"
)]
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The schema of a structured-output request: `response_format.json_schema.schema` when
/// `response_format.type` is `json_schema`.
pub fn requested_schema(body: &Value) -> Option<&Value> {
    let rf = body.get("response_format")?;
    if rf.get("type").and_then(Value::as_str) != Some("json_schema") {
        return None;
    }
    rf.pointer("/json_schema/schema").filter(|s| s.is_object())
}

/// A deterministic JSON value that satisfies `schema`, for the subset the `llm` step kind
/// validates: `const`, `enum` (its first value), `type` (the first non-null one of a list),
/// objects with every declared property (required or not; nested), arrays of
/// `max(minItems, 1)` items (at most `maxItems`), strings named after their property and
/// padded or cut to `minLength`/`maxLength`, numbers within `minimum`/`maximum` (1 when
/// unbounded), `true` for booleans. A schema without `type` is an object when it has
/// `properties`, an array when it has `items`, else a string. Local `$ref`s are followed,
/// `anyOf`/`oneOf`/`allOf` take their first (non-null) alternative, common `format`s get a
/// valid value, and a `pattern` its first `examples` entry (without one the string may not
/// match: give patterned strings an example).
pub fn schema_instance(schema: &Value) -> Value {
    instance_at(schema, schema, "value", 0)
}

/// `$ref`s are followed this deep (a recursive schema ends in a plain string).
const MAX_REF_DEPTH: usize = 16;

fn instance_at(root: &Value, schema: &Value, name: &str, depth: usize) -> Value {
    let Some(m) = schema.as_object() else {
        return Value::String(format!("mock {name}"));
    };
    if let Some(r) = m.get("$ref").and_then(Value::as_str) {
        // Local references only (`#/$defs/X`), as the engine resolves them.
        if let Some(target) = r.strip_prefix('#').and_then(|p| root.pointer(p))
            && depth < MAX_REF_DEPTH
        {
            return instance_at(root, target, name, depth + 1);
        }
        return Value::String(format!("mock {name}"));
    }
    if let Some(c) = m.get("const") {
        return c.clone();
    }
    // The first alternative (a non-null one when there is one).
    for k in ["anyOf", "oneOf", "allOf"] {
        if let Some(alts) = m.get(k).and_then(Value::as_array) {
            let pick = alts
                .iter()
                .find(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                .or(alts.first());
            if let Some(a) = pick {
                return instance_at(root, a, name, depth + 1);
            }
        }
    }
    // A string constrained by a pattern: its first example, if it gives one.
    if m.contains_key("pattern")
        && let Some(e) = m
            .get("examples")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
    {
        return e.clone();
    }
    if let Some(f) = m.get("format").and_then(Value::as_str) {
        let v = match f {
            "date-time" => Some("2026-01-01T00:00:00Z"),
            "date" => Some("2026-01-01"),
            "time" => Some("00:00:00Z"),
            "email" => Some("mock@example.com"),
            "uri" | "iri" => Some("https://example.com/mock"),
            "uuid" => Some("00000000-0000-4000-8000-000000000000"),
            "ipv4" => Some("192.0.2.1"),
            "ipv6" => Some("2001:db8::1"),
            "hostname" => Some("mock.example.com"),
            _ => None,
        };
        if let Some(v) = v {
            return Value::String(v.into());
        }
    }
    if let Some(first) = m
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    let ty = match m.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            names
                .iter()
                .find(|t| **t != "null")
                .or(names.first())
                .copied()
                .unwrap_or("string")
        }
        _ if m.contains_key("properties") => "object",
        _ if m.contains_key("items") => "array",
        _ => "string",
    };
    let min = m.get("minimum").and_then(Value::as_f64);
    let max = m.get("maximum").and_then(Value::as_f64);
    let len = |k: &str| m.get(k).and_then(Value::as_u64);
    match ty {
        "object" => {
            let mut out = serde_json::Map::new();
            if let Some(props) = m.get("properties").and_then(Value::as_object) {
                for (k, sub) in props {
                    out.insert(k.clone(), instance_at(root, sub, k, depth));
                }
            }
            // A required name without a declared schema: any value will do.
            for r in m
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !out.contains_key(r) {
                    out.insert(r.to_string(), Value::String(format!("mock {r}")));
                }
            }
            Value::Object(out)
        }
        "array" => {
            let n = len("minItems").unwrap_or(1).max(1);
            let n = len("maxItems").map_or(n, |mx| n.min(mx));
            let item = m.get("items").cloned().unwrap_or(Value::Null);
            let singular = name.strip_suffix('s').unwrap_or(name);
            Value::Array(
                (0..n)
                    .map(|i| instance_at(root, &item, &format!("{singular} {}", i + 1), depth))
                    .collect(),
            )
        }
        "integer" => {
            let lo = min.map(f64::ceil);
            let hi = max.map(f64::floor);
            let v = match (lo, hi) {
                (Some(lo), _) => lo,
                (None, Some(hi)) => hi.min(1.0),
                (None, None) => 1.0,
            };
            json!(v as i64)
        }
        "number" => {
            let v = match (min, max) {
                (Some(lo), Some(hi)) => (lo + hi) / 2.0,
                (Some(lo), None) => lo.max(1.0),
                (None, Some(hi)) => hi.min(1.0),
                (None, None) => 1.0,
            };
            json!(v)
        }
        "boolean" => Value::Bool(true),
        "null" => Value::Null,
        _ => {
            let mut s = format!("mock {name}");
            if let Some(min) = len("minLength") {
                while (s.chars().count() as u64) < min {
                    s.push('.');
                }
            }
            if let Some(max) = len("maxLength") {
                s = s.chars().take(max as usize).collect();
            }
            Value::String(s)
        }
    }
}

/// Cuts `text` to at most `max` tokens (4 chars each); returns (text, cut).
fn cut_to(text: String, max: u64) -> (String, bool) {
    if estimate_tokens(&text) <= max {
        return (text, false);
    }
    (text.chars().take((max * 4) as usize).collect(), true)
}

/// Admission against the sliding window: admitted only if every window of `limit.window`
/// that contains `at` stays within the limit (arrivals can reach this point out of order
/// under load, so the window is kept sorted and checked exactly). Ok(remaining requests,
/// remaining tokens, reset) or Err(retry after).
fn admit(
    s: &Shared,
    limit: &WindowLimit,
    at: Instant,
    tokens: u64,
) -> Result<(u64, u64, Duration), Duration> {
    let mut w = s.window.lock().unwrap();
    let width = limit.window;
    // Entries older than two windows before `at` can no longer matter.
    while w.front().is_some_and(|(t, _)| {
        at.checked_duration_since(*t)
            .is_some_and(|d| d >= 2 * width)
    }) {
        w.pop_front();
    }
    let pos = w.partition_point(|(t, _)| *t <= at);
    // Windows [start, start + width) containing `at`: start in (at - width, at].
    let starts = w
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t <= at && at.duration_since(*t) < width)
        .chain([at]);
    let (mut worst_n, mut worst_t) = (0u64, 0u64);
    for start in starts {
        let (mut n, mut t) = (1u64, tokens);
        for (e, k) in w.iter() {
            if *e >= start && e.duration_since(start) < width {
                n += 1;
                t += k;
            }
        }
        worst_n = worst_n.max(n);
        worst_t = worst_t.max(t);
    }
    let over_requests = limit.max_requests > 0 && worst_n > limit.max_requests;
    let over_tokens = limit.max_tokens > 0 && worst_t > limit.max_tokens;
    // The earliest arrival still in the window ending at `at`.
    let oldest = w
        .iter()
        .map(|(t, _)| *t)
        .find(|t| *t <= at && at.duration_since(*t) < width);
    if over_requests || over_tokens {
        // Not before the oldest arrival of the window leaves it (a provider-style hint).
        return Err(oldest.map_or(width, |t| (t + width).saturating_duration_since(at)));
    }
    w.insert(pos, (at, tokens));
    let (count, used) = w
        .iter()
        .filter(|(t, _)| *t <= at && at.duration_since(*t) < width)
        .fold((0u64, 0u64), |(n, u), (_, k)| (n + 1, u + k));
    let reset = oldest
        .unwrap_or(at)
        .checked_add(width)
        .map_or(width, |r| r.saturating_duration_since(at));
    Ok((
        limit.max_requests.saturating_sub(count),
        limit.max_tokens.saturating_sub(used),
        reset,
    ))
}

/// Moves the rate-limit headers under LiteLLM's `llm_provider-` prefix.
fn proxy_prefix(h: &mut HeaderMap) {
    let names: Vec<_> = h
        .keys()
        .filter(|n| {
            let n = n.as_str();
            n == "retry-after"
                || n == "retry-after-ms"
                || n.starts_with("x-ratelimit-")
                || n.starts_with("anthropic-ratelimit-")
        })
        .cloned()
        .collect();
    for n in names {
        let values: Vec<HeaderValue> = h.get_all(&n).iter().cloned().collect();
        h.remove(&n);
        if let Ok(prefixed) =
            axum::http::HeaderName::from_bytes(format!("llm_provider-{n}").as_bytes())
        {
            for v in values {
                h.append(prefixed.clone(), v);
            }
        }
    }
}

fn retry_after_headers(h: &mut HeaderMap, d: Duration) {
    let secs = d.as_millis().div_ceil(1000).max(1);
    h.insert("retry-after", HeaderValue::from(secs as u64));
    h.insert("retry-after-ms", HeaderValue::from(d.as_millis() as u64));
}

async fn chat(
    s: Arc<Shared>,
    headers: HeaderMap,
    body: Bytes,
    path: String,
    deployment: Option<String>,
    api_version: Option<String>,
    dialect: Dialect,
) -> Response {
    let at = Instant::now();
    let cfg = s.cfg.lock().unwrap().clone();
    let mut rec = RecordedRequest {
        at,
        path,
        deployment: deployment.clone(),
        api_version,
        model: String::new(),
        prompt_tokens: 0,
        max_tokens: None,
        completion_tokens: 0,
        stream: false,
        status: 0,
        authorization: header(&headers, "authorization"),
        api_key: header(&headers, "api-key"),
        fault: None,
        user: None,
        x_api_key: header(&headers, "x-api-key"),
        anthropic_version: header(&headers, "anthropic-version"),
        system: None,
    };
    let (status, response) = answer(&s, &cfg, dialect, &body, &mut rec).await;
    rec.status = status;
    s.records.lock().unwrap().push(rec);
    match response {
        Answer::Now(mut resp) => {
            if cfg.proxy_headers {
                proxy_prefix(resp.headers_mut());
            }
            resp
        }
        Answer::Hang => {
            let mut sd = s.shutdown.clone();
            let _ = sd.wait_for(|s| *s).await;
            error_in(
                dialect,
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "mock stopped",
            )
        }
        Answer::Stream {
            chunks,
            stall,
            usage,
            id,
            model,
            finish,
            headers: mut h,
        } => {
            if cfg.proxy_headers {
                proxy_prefix(&mut h);
            }
            match dialect {
                Dialect::Openai => {
                    stream_response(&s, &cfg, chunks, stall, usage, id, model, finish, h)
                }
                Dialect::Anthropic => {
                    anthropic_stream(&s, &cfg, chunks, stall, usage, id, model, finish, h)
                }
            }
        }
    }
}

enum Answer {
    Now(Response),
    Hang,
    Stream {
        chunks: Vec<String>,
        stall: Option<usize>,
        usage: Option<Value>,
        id: String,
        model: String,
        finish: &'static str,
        headers: HeaderMap,
    },
}

async fn answer(
    s: &Shared,
    cfg: &MockConfig,
    dialect: Dialect,
    body: &[u8],
    rec: &mut RecordedRequest,
) -> (u16, Answer) {
    let now = |r: Response| (r.status().as_u16(), Answer::Now(r));
    let error = |status, kind: &str, message: &str| error_in(dialect, status, kind, message);
    let anthropic = dialect == Dialect::Anthropic;
    if let Some(key) = &cfg.api_key {
        let bearer = rec
            .authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer "));
        let seen = if anthropic {
            rec.x_api_key.as_deref()
        } else if rec.deployment.is_some() {
            rec.api_key.as_deref()
        } else {
            bearer.or(rec.api_key.as_deref())
        };
        if seen != Some(key.as_str()) {
            return now(error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                if anthropic {
                    "invalid x-api-key"
                } else {
                    "incorrect api key provided"
                },
            ));
        }
    }
    if anthropic && rec.anthropic_version.is_none() {
        return now(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version: header is required",
        ));
    }
    let req: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return now(error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the body must be a JSON object",
            ));
        }
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return now(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "'messages' is a required property",
        ));
    };
    if anthropic && req.get("max_tokens").and_then(Value::as_u64).is_none() {
        return now(error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "max_tokens: Field required",
        ));
    }
    // Anthropic: the system prompt is top-level (a string or text blocks).
    rec.system = req.get("system").map(text_of).filter(|_| anthropic);
    let messages: Vec<(String, String)> = rec
        .system
        .iter()
        .map(|sys| ("system".to_string(), sys.clone()))
        .chain(messages.iter().map(|m| {
            (
                m.get("role")
                    .and_then(Value::as_str)
                    .unwrap_or("user")
                    .to_string(),
                m.get("content").map(text_of).unwrap_or_default(),
            )
        }))
        .collect();
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| rec.deployment.clone())
        .unwrap_or_else(|| cfg.model.clone());
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_tokens = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64);
    // Anthropic always reports usage in its stream.
    let include_usage = anthropic
        || req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    rec.model = model.clone();
    rec.user = req.get("user").and_then(Value::as_str).map(str::to_string);
    rec.stream = stream;
    rec.max_tokens = max_tokens;
    rec.prompt_tokens = messages.iter().map(|(_, c)| estimate_tokens(c)).sum();

    // A scripted fault comes first, then the periodic 429.
    let nth = s.chats.fetch_add(1, Ordering::Relaxed) + 1;
    let fault = s.faults.lock().unwrap().pop_front().or_else(|| {
        cfg.rate_limit_every
            .filter(|p| p.every > 0 && nth.is_multiple_of(p.every))
            .map(|p| Fault::RateLimited {
                retry_after: p.retry_after,
            })
    });
    rec.fault = fault;
    let mut extra_delay = Duration::ZERO;
    let mut stall = None;
    match fault {
        None | Some(Fault::Ok) => {}
        Some(Fault::Delay(d)) => extra_delay = d,
        Some(Fault::RateLimited { retry_after }) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "rate limit reached (scripted); please retry later",
            );
            retry_after_headers(r.headers_mut(), retry_after);
            if anthropic {
                spent_headers(r.headers_mut(), retry_after);
            }
            return now(r);
        }
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            tokio::time::sleep(cfg.latency.sample()).await;
            return now(error(status, "server_error", "scripted failure"));
        }
        Some(Fault::PlainAuth(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return now((
                status,
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; charset=utf-8",
                )],
                "Authentication Error, No api key passed in.",
            )
                .into_response());
        }
        Some(Fault::Hang) => return (0, Answer::Hang),
        Some(Fault::StallAfter(n)) => {
            if !stream {
                return (0, Answer::Hang);
            }
            stall = Some(n);
        }
    }

    let view = ChatRequestView {
        model: model.clone(),
        messages,
        max_tokens,
        stream,
        body: req.clone(),
    };
    let text = match &cfg.completion {
        Completion::Fixed(t) => t.clone(),
        Completion::Echo if requested_schema(&view.body).is_some() && !anthropic => {
            let schema = requested_schema(&view.body).unwrap_or(&Value::Null);
            schema_instance(schema).to_string()
        }
        Completion::Echo if rec.system.as_deref().and_then(stated_schema).is_some() => {
            let schema = rec.system.as_deref().and_then(stated_schema);
            schema_instance(schema.as_ref().unwrap_or(&Value::Null)).to_string()
        }
        Completion::Echo => {
            let last = view
                .messages
                .iter()
                .rev()
                .find(|(r, _)| r == "user")
                .map(|(_, c)| c.as_str())
                .unwrap_or("");
            format!("echo: {last}")
        }
        Completion::Func(f) => f(&view),
    };
    let (text, cut) = cut_to(text, max_tokens.unwrap_or(cfg.default_max_tokens));
    let completion_tokens = estimate_tokens(&text);
    let total = rec.prompt_tokens + completion_tokens;

    // The mock's own limit, counted at arrival.
    let mut h = HeaderMap::new();
    if let Some(limit) = &cfg.limit {
        match admit(s, limit, rec.at, total) {
            Ok((rem_req, rem_tok, reset)) if anthropic => {
                let at = rfc3339_in(reset);
                for (kind, max, rem) in [
                    ("requests", limit.max_requests, rem_req),
                    ("tokens", limit.max_tokens, rem_tok),
                ] {
                    // Anthropic reports only the limits that exist.
                    if max == 0 {
                        continue;
                    }
                    let name = |what: &str| {
                        axum::http::HeaderName::from_bytes(
                            format!("anthropic-ratelimit-{kind}-{what}").as_bytes(),
                        )
                        .expect("a valid header name")
                    };
                    h.insert(name("limit"), max.into());
                    h.insert(name("remaining"), rem.into());
                    if let Ok(v) = HeaderValue::from_str(&at) {
                        h.insert(name("reset"), v);
                    }
                }
            }
            Ok((rem_req, rem_tok, reset)) => {
                h.insert("x-ratelimit-limit-requests", limit.max_requests.into());
                h.insert("x-ratelimit-remaining-requests", rem_req.into());
                h.insert("x-ratelimit-limit-tokens", limit.max_tokens.into());
                h.insert("x-ratelimit-remaining-tokens", rem_tok.into());
                let reset = format!("{:.3}s", reset.as_secs_f64());
                if let Ok(v) = HeaderValue::from_str(&reset) {
                    h.insert("x-ratelimit-reset-requests", v.clone());
                    h.insert("x-ratelimit-reset-tokens", v);
                }
            }
            Err(retry) => {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    "rate limit reached for requests or tokens; please retry later",
                );
                retry_after_headers(r.headers_mut(), retry);
                if anthropic {
                    spent_headers(r.headers_mut(), retry);
                } else {
                    r.headers_mut()
                        .insert("x-ratelimit-remaining-requests", 0u64.into());
                }
                return now(r);
            }
        }
    }
    rec.completion_tokens = completion_tokens;

    tokio::time::sleep(cfg.latency.sample() + extra_delay).await;
    let n = s.ids.fetch_add(1, Ordering::Relaxed);
    let (id, usage, finish) = if anthropic {
        (
            format!("msg_mock_{n}"),
            json!({"input_tokens": rec.prompt_tokens, "output_tokens": completion_tokens}),
            if cut { "max_tokens" } else { "end_turn" },
        )
    } else {
        (
            format!("chatcmpl-mock-{n}"),
            json!({
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": total,
            }),
            if cut { "length" } else { "stop" },
        )
    };
    if stream {
        let words: Vec<&str> = text.split_inclusive(' ').collect();
        let mut chunks: Vec<String> = words
            .chunks(cfg.words_per_chunk.max(1))
            .map(|c| c.concat())
            .collect();
        chunks.push(String::new()); // the finish chunk
        return (
            200,
            Answer::Stream {
                chunks,
                stall,
                usage: include_usage.then_some(usage),
                id,
                model,
                finish,
                headers: h,
            },
        );
    }
    if anthropic {
        let body = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": finish,
            "stop_sequence": null,
            "usage": usage,
        });
        let mut r = Json(body).into_response();
        r.headers_mut().extend(h);
        return now(r);
    }
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": unix_now(),
        "model": model,
        "system_fingerprint": "fp_honua_mock",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": usage,
    });
    let mut r = Json(body).into_response();
    r.headers_mut().extend(h);
    now(r)
}

#[expect(
    clippy::too_many_arguments,
    reason = "the pieces of one streamed reply"
)]
fn stream_response(
    s: &Shared,
    cfg: &MockConfig,
    chunks: Vec<String>,
    stall: Option<usize>,
    usage: Option<Value>,
    id: String,
    model: String,
    finish: &'static str,
    headers: HeaderMap,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let delay = cfg.chunk_delay;
    let mut shutdown = s.shutdown.clone();
    tokio::spawn(async move {
        let created = unix_now();
        let last = chunks.len() - 1;
        for (i, text) in chunks.into_iter().enumerate() {
            if stall == Some(i) {
                // Stall: keep the connection open, send nothing more.
                let _ = shutdown.wait_for(|s| *s).await;
                return;
            }
            let delta = if i == 0 {
                json!({"role": "assistant", "content": text})
            } else if i == last {
                json!({})
            } else {
                json!({"content": text})
            };
            let finish = if i == last {
                json!(finish)
            } else {
                Value::Null
            };
            let chunk = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            });
            if tx
                .send(Ok(Bytes::from(format!("data: {chunk}\n\n"))))
                .await
                .is_err()
            {
                return;
            }
            if i != last {
                tokio::time::sleep(delay).await;
            }
        }
        if let Some(usage) = usage {
            let chunk = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": usage,
            });
            let _ = tx.send(Ok(Bytes::from(format!("data: {chunk}\n\n")))).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    sse_response(rx, headers)
}

/// A `text/event-stream` response streaming what the sender task puts in `rx`.
fn sse_response(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    headers: HeaderMap,
) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.extend(headers);
    r
}

/// Anthropic's headers on a 429: the requests window is spent until `d` from now.
fn spent_headers(h: &mut HeaderMap, d: Duration) {
    h.insert("anthropic-ratelimit-requests-remaining", 0u64.into());
    if let Ok(v) = HeaderValue::from_str(&rfc3339_in(d)) {
        h.insert("anthropic-ratelimit-requests-reset", v);
    }
}

/// One Anthropic SSE event.
fn sse_event(data: &Value) -> Bytes {
    let kind = data
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// A streamed Anthropic reply: `message_start` (input tokens), one text block in
/// `content_block_delta` events, `message_delta` (stop reason, output tokens),
/// `message_stop`. A stall at chunk `i` stops after `i` deltas.
#[expect(
    clippy::too_many_arguments,
    reason = "the pieces of one streamed reply"
)]
fn anthropic_stream(
    s: &Shared,
    cfg: &MockConfig,
    mut chunks: Vec<String>,
    stall: Option<usize>,
    usage: Option<Value>,
    id: String,
    model: String,
    finish: &'static str,
    headers: HeaderMap,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let delay = cfg.chunk_delay;
    let mut shutdown = s.shutdown.clone();
    // The OpenAI finish chunk has no Anthropic counterpart: message_delta ends the reply.
    if chunks.last().is_some_and(String::is_empty) {
        chunks.pop();
    }
    let usage = usage.unwrap_or(Value::Null);
    tokio::spawn(async move {
        let start = json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1},
            },
        });
        let mut head = vec![
            start,
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "ping"}),
        ];
        for ev in head.drain(..) {
            if tx.send(Ok(sse_event(&ev))).await.is_err() {
                return;
            }
        }
        for (i, text) in chunks.into_iter().enumerate() {
            if stall == Some(i) {
                let _ = shutdown.wait_for(|s| *s).await;
                return;
            }
            let ev = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}});
            if tx.send(Ok(sse_event(&ev))).await.is_err() {
                return;
            }
            tokio::time::sleep(delay).await;
        }
        for ev in [
            json!({"type": "content_block_stop", "index": 0}),
            json!({
                "type": "message_delta",
                "delta": {"stop_reason": finish, "stop_sequence": null},
                "usage": {"output_tokens": usage["output_tokens"]},
            }),
            json!({"type": "message_stop"}),
        ] {
            if tx.send(Ok(sse_event(&ev))).await.is_err() {
                return;
            }
        }
    });
    sse_response(rx, headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_estimate_is_ceil_chars_over_4() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
    }

    #[test]
    fn fault_script_parses_and_rejects() {
        assert_eq!(
            Fault::parse_script("ok, 429:3,500,503,hang,stall:2,delay:10").unwrap(),
            vec![
                Fault::Ok,
                Fault::RateLimited {
                    retry_after: Duration::from_secs(3)
                },
                Fault::Status(500),
                Fault::Status(503),
                Fault::Hang,
                Fault::StallAfter(2),
                Fault::Delay(Duration::from_millis(10)),
            ]
        );
        assert!(Fault::parse_script("boom").unwrap_err().contains("boom"));
        assert!(
            Fault::parse_script("429:x")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(Fault::parse_script("200").is_err());
        assert_eq!(
            Fault::parse_script("auth:500").unwrap(),
            vec![Fault::PlainAuth(500)]
        );
        assert!(Fault::parse_script("auth:200").is_err());
    }

    #[test]
    fn a_schema_instance_satisfies_its_schema() {
        let schema = json!({
            "type": "object",
            "required": ["verdict", "score", "tags", "ratio", "note", "nested"],
            "additionalProperties": false,
            "properties": {
                "verdict": {"type": "string", "enum": ["approve", "reject"]},
                "score": {"type": "integer", "minimum": 3, "maximum": 10},
                "low": {"type": "integer", "maximum": -2},
                "ratio": {"type": "number", "minimum": 0, "maximum": 1},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 2, "maxItems": 3},
                "none": {"type": "array", "maxItems": 0},
                "note": {"type": ["null", "string"], "minLength": 12},
                "kind": {"const": "stac"},
                "ok": {"type": "boolean"},
                "nested": {"properties": {"deep": {"type": "integer"}}, "required": ["deep", "free"]}
            }
        });
        let v = schema_instance(&schema);
        assert_eq!(
            v,
            json!({
                "verdict": "approve",
                "score": 3,
                "low": -2,
                "ratio": 0.5,
                "tags": ["mock t", "mock t"],
                "none": [],
                "note": "mock note...",
                "kind": "stac",
                "ok": true,
                "nested": {"deep": 1, "free": "mock free"}
            })
        );
        assert_eq!(schema_instance(&schema), v, "deterministic");
        let body = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}});
        assert_eq!(requested_schema(&body), Some(&schema));
        assert_eq!(
            requested_schema(&json!({"response_format": {"type": "json_object"}})),
            None
        );
        assert_eq!(requested_schema(&json!({})), None);
    }

    /// What OpenAI structured-output schemas use: the instance validates (Draft 2020-12,
    /// formats checked).
    #[test]
    fn a_schema_instance_follows_refs_alternatives_formats_and_examples() {
        let schema = json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["target", "change", "contact", "when", "id", "items"],
            "$defs": {
                "Region": {"type": "string", "pattern": "^[a-z]{2}-[a-z]+-[0-9]$", "examples": ["eu-west-1"]},
                "Item": {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 2}}}
            },
            "properties": {
                "target": {"$ref": "#/$defs/Region"},
                "change": {"anyOf": [{"type": "null"}, {"type": "object", "required": ["scale"], "properties": {"scale": {"type": "integer", "minimum": 1}}}]},
                "contact": {"oneOf": [{"type": "string", "format": "email"}, {"type": "null"}]},
                "when": {"type": "string", "format": "date-time"},
                "id": {"type": "string", "format": "uuid"},
                "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 2}
            }
        });
        let v = schema_instance(&schema);
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .should_validate_formats(true)
            .build(&schema)
            .unwrap();
        let errors: Vec<String> = validator.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{v}: {errors:?}");
        assert_eq!(v["target"], "eu-west-1");
        assert_eq!(v["items"], json!([{"n": 2}, {"n": 2}]));
    }

    #[test]
    fn a_schema_stated_in_the_system_prompt_is_found() {
        let schema = json!({"type": "object", "required": ["ok"], "properties": {"ok": {"type": "boolean"}}});
        let system = format!(
            "be brief\n\nReply with one JSON value and nothing else. It must validate against this JSON schema: {schema}\nThanks."
        );
        assert_eq!(stated_schema(&system), Some(schema));
        assert_eq!(stated_schema("JSON schema: not json"), None);
        assert_eq!(stated_schema("JSON schema: [1]"), None);
        assert_eq!(stated_schema("no schema here"), None);
        assert_eq!(
            anthropic_error_type(StatusCode::from_u16(529).unwrap()),
            "overloaded_error"
        );
        assert_eq!(
            anthropic_error_type(StatusCode::TOO_MANY_REQUESTS),
            "rate_limit_error"
        );
    }

    #[test]
    fn cut_respects_max_tokens() {
        let (t, cut) = cut_to("a".repeat(100), 10);
        assert!(cut);
        assert_eq!(estimate_tokens(&t), 10);
        let (_, cut) = cut_to("abc".into(), 10);
        assert!(!cut);
    }

    #[test]
    fn window_admits_up_to_the_limit_then_says_when() {
        let (_tx, rx) = watch::channel(false);
        let s = Shared {
            cfg: Mutex::new(MockConfig::default()),
            faults: Mutex::new(VecDeque::new()),
            records: Mutex::new(Vec::new()),
            window: Mutex::new(VecDeque::new()),
            ids: AtomicU64::new(0),
            chats: AtomicU64::new(0),
            shutdown: rx,
        };
        let limit = WindowLimit {
            window: Duration::from_secs(1),
            max_requests: 2,
            max_tokens: 100,
        };
        let t0 = Instant::now();
        assert!(admit(&s, &limit, t0, 10).is_ok());
        assert!(admit(&s, &limit, t0 + Duration::from_millis(100), 10).is_ok());
        let retry = admit(&s, &limit, t0 + Duration::from_millis(200), 10).unwrap_err();
        assert_eq!(retry, Duration::from_millis(800));
        // After the first left the window, one more fits.
        assert!(admit(&s, &limit, t0 + Duration::from_millis(1000), 10).is_ok());
        // Tokens bind too.
        let retry = admit(&s, &limit, t0 + Duration::from_millis(1500), 95).unwrap_err();
        assert!(retry > Duration::ZERO);
        // An arrival that reaches the check late (out of order) is judged by every window
        // containing it: [0.95, 1.95) already holds 1.0 and 1.1 (admitted next).
        assert!(admit(&s, &limit, t0 + Duration::from_millis(1100), 10).is_ok());
        assert!(admit(&s, &limit, t0 + Duration::from_millis(950), 10).is_err());
    }
}
