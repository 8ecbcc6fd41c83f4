//! A thin client of the OpenAI chat-completions wire format over the workspace's reqwest
//! (rustls, ring): OpenAI (`Authorization: Bearer`), Azure OpenAI (deployment in the path,
//! `api-version`, `api-key` header) and any OpenAI-compatible base URL. Plain JSON replies
//! and SSE streams (`data:` events, `data: [DONE]`, a final usage chunk with
//! `stream_options.include_usage`). Anthropic speaks its Messages API instead
//! (`POST /v1/messages`, `x-api-key` and `anthropic-version` headers, a top-level `system`,
//! `content[].text` and `usage.input_tokens`/`output_tokens` in the reply, SSE events
//! `message_start` / `content_block_delta` / `message_delta` / `message_stop` / `error`).
//! Rate-limit headers of both (`x-ratelimit-*` with reset durations,
//! `anthropic-ratelimit-*` with RFC 3339 reset instants) are read by one table
//! ([`exhausted_for`]). Errors are classified by what the caller must do and never carry
//! the key: provider text is scrubbed of it and truncated.

use honua_shared::llm_config::{EndpointConfig, ProviderKind, Secret};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::{Duration, SystemTime};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What is sent, independent of the provider.
#[derive(Debug, Clone, Serialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: f32,
    /// A JSON schema for structured output (`response_format: json_schema`).
    pub schema: Option<Value>,
    pub stream: bool,
}

/// A finished completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Completion {
    pub text: String,
    pub finish_reason: Option<String>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The provider reported no usage (a stream without a usage chunk): the tokens are the
    /// worker's own count (the model's tokenizer where known, else the estimate).
    #[serde(default)]
    pub usage_estimated: bool,
    /// The model name the provider reported.
    pub model: Option<String>,
    /// The provider's `x-ratelimit-remaining-*` said 0: its window resets after this.
    #[serde(skip)]
    pub exhausted_for: Option<Duration>,
}

/// OpenAI's reset durations: `1s`, `6m0s`, `20ms`, `0.5s`, `1h2m3.5s`.
pub fn parse_reset(v: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = v.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num: f64 = rest[..n].parse().ok()?;
        rest = &rest[n..];
        let (mult, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return None;
        };
        total += num * mult;
        rest = &rest[len..];
    }
    (total.is_finite() && total >= 0.0).then(|| Duration::from_secs_f64(total.min(86_400.0)))
}

/// The prefix under which a proxy (LiteLLM) forwards the upstream provider's headers.
const UPSTREAM_PREFIX: &str = "llm_provider-";

/// A header's value, read as sent or, failing that, under the `llm_provider-` prefix.
fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    get(name).or_else(|| get(&format!("{UPSTREAM_PREFIX}{name}")))
}

/// The longest wait any of `retry-after` (seconds) and `retry-after-ms` asks for, each read
/// as sent and under the `llm_provider-` prefix (a proxy's own hint and the upstream's may
/// differ: the longer one is the one that holds).
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |n: String| h.get(n).and_then(|v| v.to_str().ok()).map(str::trim);
    let mut best: Option<Duration> = None;
    for prefix in ["", UPSTREAM_PREFIX] {
        let secs = get(format!("{prefix}retry-after"))
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        let ms = get(format!("{prefix}retry-after-ms"))
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        for d in [secs, ms].into_iter().flatten() {
            best = Some(best.map_or(d, |b| b.max(d)));
        }
    }
    best
}

/// Whether an error answer is about the credentials, whatever its status and body format
/// (LiteLLM answers a missing `Authorization` header with a plain-text 500).
fn auth_shaped(message: &str, code: &str) -> bool {
    const MARKS: [&str; 9] = [
        "authentication error",
        "authentication failed",
        "unauthorized",
        "invalid api key",
        "incorrect api key",
        "no api key",
        "api key not",
        "authorization header",
        "invalid subscription key",
    ];
    let m = message.to_lowercase();
    code == "invalid_api_key" || MARKS.iter().any(|k| m.contains(k))
}

/// How a credentials failure's message starts (its `error_type` is `auth`).
const AUTH_REFUSED: &str = "provider refused the credentials";

/// Anthropic's reset instants (RFC 3339: `2025-06-01T12:00:30Z`, fractions and a
/// `+hh:mm`/`-hh:mm` offset accepted): the time left after `now` (zero once passed).
pub fn parse_reset_at(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    // An explicit offset: parse the local time as UTC, then move it by the offset.
    let (stamp, offset_secs) = match v.len().checked_sub(6).map(|i| v.split_at(i)) {
        Some((head, tail))
            if (tail.starts_with('+') || tail.starts_with('-')) && tail.as_bytes()[3] == b':' =>
        {
            let h: i64 = tail[1..3].parse().ok()?;
            let m: i64 = tail[4..6].parse().ok()?;
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (head, sign * (h * 3600 + m * 60))
        }
        _ => (v.strip_suffix(['Z', 'z']).unwrap_or(v), 0),
    };
    let local = humantime::parse_rfc3339_weak(stamp).ok()?;
    let at = if offset_secs >= 0 {
        local.checked_sub(Duration::from_secs(offset_secs as u64))?
    } else {
        local.checked_add(Duration::from_secs(offset_secs.unsigned_abs()))?
    };
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

/// How a provider states when a rate-limit window resets.
#[derive(Debug, Clone, Copy)]
enum Reset {
    /// OpenAI: a duration from now (`6m0s`, [`parse_reset`]).
    In,
    /// Anthropic: an RFC 3339 instant ([`parse_reset_at`]).
    At,
}

/// The rate-limit windows providers report on their answers: (remaining, limit, reset,
/// how the reset is written). Each is also read under the `llm_provider-` prefix.
const WINDOWS: [(&str, &str, &str, Reset); 6] = [
    (
        "x-ratelimit-remaining-requests",
        "x-ratelimit-limit-requests",
        "x-ratelimit-reset-requests",
        Reset::In,
    ),
    (
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-reset-tokens",
        Reset::In,
    ),
    (
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-reset",
        Reset::At,
    ),
    (
        "anthropic-ratelimit-tokens-remaining",
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-reset",
        Reset::At,
    ),
    (
        "anthropic-ratelimit-input-tokens-remaining",
        "anthropic-ratelimit-input-tokens-limit",
        "anthropic-ratelimit-input-tokens-reset",
        Reset::At,
    ),
    (
        "anthropic-ratelimit-output-tokens-remaining",
        "anthropic-ratelimit-output-tokens-limit",
        "anthropic-ratelimit-output-tokens-reset",
        Reset::At,
    ),
];

/// When an answer says a limit is used up (a `remaining` header of [`WINDOWS`] is 0), how
/// long until the last such window resets (1 s when the reset is missing or unreadable;
/// none when every exhausted window has already reset). `now` reads Anthropic's instants.
fn exhausted_for(h: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut d: Option<Duration> = None;
    for (remaining, limit, reset, form) in WINDOWS {
        // Remaining 0 of a limit of 0 means "no limit" on some OpenAI-compatible servers.
        if header(h, remaining) != Some("0") || header(h, limit) == Some("0") {
            continue;
        }
        let r = header(h, reset)
            .and_then(|v| match form {
                Reset::In => parse_reset(v),
                Reset::At => parse_reset_at(v, now),
            })
            .unwrap_or(Duration::from_secs(1));
        d = Some(d.map_or(r, |x| x.max(r)));
    }
    d.filter(|d| !d.is_zero())
}

#[expect(
    clippy::disallowed_methods,
    reason = "Anthropic states its rate-limit resets as wall-clock instants: the time left is read against this machine's clock (the pause it sets is clamped to retry_after_max_secs and only ever delays calls)"
)]
fn wall_clock() -> SystemTime {
    SystemTime::now()
}

/// Why a call failed, by what the caller must do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// 429: pause the bucket, fall back or retry after `retry_after`.
    #[error("rate limited (429): {message}")]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// 5xx: retry with backoff; counts toward the circuit breaker.
    #[error("server error ({status}): {message}")]
    Server {
        status: u16,
        retry_after: Option<Duration>,
        message: String,
    },
    /// The call or the stream took too long; counts toward the circuit breaker.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Connection refused, reset, DNS: retry with backoff.
    #[error("connection failed: {0}")]
    Connection(String),
    /// 400/401/403/404/422, context too long, a malformed reply: never retried.
    #[error("{message}")]
    Permanent {
        status: Option<u16>,
        message: String,
    },
}

impl CallError {
    /// Label of `honua_llm_errors_total{error_type}`.
    pub fn error_type(&self) -> &'static str {
        match self {
            CallError::RateLimited { .. } => "rate_limit",
            CallError::Server { .. } => "server_error",
            CallError::Timeout(_) => "timeout",
            CallError::Connection(_) => "connection",
            CallError::Permanent { message, .. } if message.starts_with(AUTH_REFUSED) => "auth",
            CallError::Permanent { message, .. } if message.contains("context") => "context_length",
            CallError::Permanent { .. } => "invalid_request",
        }
    }

    /// Counts toward the circuit breaker.
    pub fn trips_breaker(&self) -> bool {
        matches!(self, CallError::Server { .. } | CallError::Timeout(_))
    }
}

const OPENAI_URL: &str = "https://api.openai.com/v1";
const ANTHROPIC_URL: &str = "https://api.anthropic.com";
/// The `anthropic-version` header sent unless `api_version` says otherwise.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// One configured provider endpoint with its key.
pub struct Endpoint {
    pub kind: ProviderKind,
    base_url: String,
    api_version: Option<String>,
    deployments: std::collections::BTreeMap<String, String>,
    key: Option<Secret>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("key", &self.key)
            .finish()
    }
}

impl Endpoint {
    /// Reads the key from `api_key_file` or the environment variable `api_key_env` (looked
    /// up through `env`). OpenAI and Azure need a key; OpenAI-compatible servers may not.
    pub fn resolve(
        kind: ProviderKind,
        cfg: Option<&EndpointConfig>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let default = EndpointConfig::default();
        let cfg = cfg.unwrap_or(&default);
        let key = if let Some(path) = &cfg.api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                format!(
                    "cannot read the {kind} api_key_file {}: {}",
                    path.display(),
                    e.kind()
                )
            })?;
            Some(Secret::new(text.trim()))
        } else if let Some(var) = &cfg.api_key_env {
            Some(Secret::new(
                env(var)
                    .map(|v| v.trim().to_string())
                    .ok_or_else(|| format!("the {kind} api key variable {var} is not set"))?,
            ))
        } else {
            None
        };
        if key.is_none() && kind != ProviderKind::OpenaiCompatible {
            return Err(format!(
                "provider {kind} needs an api key: set llm_provider.{kind}.api_key_env or api_key_file"
            ));
        }
        let from_env = match (&cfg.base_url, &cfg.base_url_env) {
            (None, Some(var)) => Some(
                env(var)
                    .map(|v| v.trim().to_string())
                    .filter(|v| v.starts_with("http://") || v.starts_with("https://"))
                    .ok_or_else(|| {
                        format!("the {kind} base_url variable {var} is not set to an http(s) URL")
                    })?,
            ),
            _ => None,
        };
        let base_url = match (kind, cfg.base_url.as_ref().or(from_env.as_ref())) {
            (_, Some(u)) => u.trim_end_matches('/').to_string(),
            (ProviderKind::Openai, None) => OPENAI_URL.into(),
            (ProviderKind::Anthropic, None) => ANTHROPIC_URL.into(),
            _ => return Err(format!("provider {kind} needs a base_url")),
        };
        Ok(Self {
            kind,
            base_url,
            api_version: cfg.api_version.clone(),
            deployments: cfg.deployments.clone(),
            key,
        })
    }

    pub fn secret(&self) -> Option<&Secret> {
        self.key.as_ref()
    }

    fn url(&self, model: &str) -> String {
        match self.kind {
            ProviderKind::Azure => {
                let dep = self.deployments.get(model).map_or(model, String::as_str);
                format!(
                    "{}/openai/deployments/{dep}/chat/completions?api-version={}",
                    self.base_url,
                    self.api_version.as_deref().unwrap_or("2024-10-21")
                )
            }
            // `{base_url}/v1/messages`; a base URL given up to `/v1` is taken as is.
            ProviderKind::Anthropic if self.base_url.ends_with("/v1") => {
                format!("{}/messages", self.base_url)
            }
            ProviderKind::Anthropic => format!("{}/v1/messages", self.base_url),
            _ => format!("{}/chat/completions", self.base_url),
        }
    }

    fn scrub(&self, text: &str) -> String {
        let t = match &self.key {
            Some(k) => k.scrub(text),
            None => text.to_string(),
        };
        let mut t: String = t.chars().take(300).collect();
        if t.len() < text.len() && !t.ends_with('…') && text.chars().count() > 300 {
            t.push('…');
        }
        t
    }
}

/// The request body of `kind`: OpenAI JSON (Azure ignores `model`: the deployment is in
/// the path) or Anthropic's Messages body ([`anthropic_body`]).
pub fn body(kind: ProviderKind, model: &str, req: &ChatRequest) -> Value {
    if kind == ProviderKind::Anthropic {
        return anthropic_body(model, req);
    }
    let mut b = json!({
        "model": model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
    });
    if req.stream {
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
    }
    if let Some(schema) = &req.schema {
        // Strict where the schema allows it (the provider then guarantees the shape); the
        // reply is validated either way.
        let strict = honua_shared::definition::llm::schema::strict_compatible(schema);
        b["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": "step_output", "schema": schema, "strict": strict}
        });
    }
    b
}

/// How a schema is asked for where the provider has no structured-output mode (Anthropic):
/// stated in the system prompt; the reply is validated and a violation retried as for any
/// provider. The mock finds the schema as the JSON value after `JSON schema:`.
pub fn schema_instruction(schema: &Value) -> String {
    format!(
        "Reply with one JSON value and nothing else (no prose, no code fence). \
         It must validate against this JSON schema: {schema}"
    )
}

/// Anthropic's Messages body: the system messages (and the schema's instruction) joined
/// into the top-level `system`, the others as `messages`, `max_tokens` (always: Anthropic
/// requires it), `temperature` (Anthropic's range is 0..=1: higher is sent as 1) and
/// `stream`.
pub fn anthropic_body(model: &str, req: &ChatRequest) -> Value {
    let mut system: Vec<String> = req
        .messages
        .iter()
        .filter(|m| m.role == "system")
        .map(|m| m.content.clone())
        .collect();
    if let Some(schema) = &req.schema {
        system.push(schema_instruction(schema));
    }
    let messages: Vec<Value> = req
        .messages
        .iter()
        .filter(|m| m.role != "system")
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    let mut b = json!({
        "model": model,
        "max_tokens": req.max_tokens,
        "messages": messages,
        "temperature": req.temperature.clamp(0.0, 1.0),
    });
    if !system.is_empty() {
        b["system"] = json!(system.join("\n\n"));
    }
    if req.stream {
        b["stream"] = json!(true);
    }
    b
}

/// Limits of one call.
#[derive(Debug, Clone, Copy)]
pub struct CallLimits {
    pub timeout: Duration,
    pub stream_idle: Duration,
    pub max_response_bytes: usize,
    pub retry_after_max: Duration,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireMessage>,
    #[serde(default)]
    delta: Option<WireMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

/// Anthropic's `usage`: input is `input_tokens` plus any prompt-cache tokens (all of them
/// are prompt the model read).
#[derive(Deserialize, Default)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    fn input(&self) -> Option<u64> {
        self.input_tokens.map(|i| {
            i + self.cache_creation_input_tokens.unwrap_or(0)
                + self.cache_read_input_tokens.unwrap_or(0)
        })
    }
}

#[derive(Deserialize)]
struct AnthropicBlock {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct AnthropicMessage {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Vec<AnthropicBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

/// What an Anthropic error `type` (in an error body or a stream's `error` event) asks of
/// the caller: `rate_limit_error` is a 429, `overloaded_error` (529) and `api_error` are
/// server errors, `authentication_error`/`permission_error` refuse the credentials, the
/// request errors are permanent; an unknown type is treated as a server error.
fn anthropic_error(kind: &str, message: String, retry_after: Option<Duration>) -> CallError {
    match kind {
        "rate_limit_error" => CallError::RateLimited {
            retry_after,
            message,
        },
        "authentication_error" | "permission_error" => CallError::Permanent {
            status: None,
            message: format!("{AUTH_REFUSED} ({kind}): {message}"),
        },
        "invalid_request_error" | "request_too_large" | "not_found_error" => {
            let context = message.contains("prompt is too long");
            CallError::Permanent {
                status: None,
                message: if context {
                    format!("context too long ({kind}): {message}")
                } else {
                    format!("provider answered {kind}: {message}")
                },
            }
        }
        "overloaded_error" => CallError::Server {
            status: 529,
            retry_after,
            message,
        },
        _ => CallError::Server {
            status: 500,
            retry_after,
            message,
        },
    }
}

/// A non-streamed Anthropic reply: the text blocks joined, `stop_reason` as the finish
/// reason (`end_turn`, `max_tokens`, `stop_sequence`, as Anthropic writes it).
fn anthropic_completion(buf: &[u8], messages: &[Message]) -> Result<Completion, CallError> {
    let r: AnthropicMessage = serde_json::from_slice(buf).map_err(|e| CallError::Permanent {
        status: None,
        message: format!("provider reply is not an anthropic message: {e}"),
    })?;
    let text: String = r
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect();
    let usage = r
        .usage
        .as_ref()
        .and_then(|u| u.input().zip(u.output_tokens));
    let (input_tokens, output_tokens, usage_estimated) = match usage {
        Some((i, o)) => (i, o, false),
        None => (
            estimate_tokens(messages),
            (text.chars().count() as u64).div_ceil(4),
            true,
        ),
    };
    Ok(Completion {
        text,
        finish_reason: r.stop_reason,
        input_tokens,
        output_tokens,
        usage_estimated,
        model: r.model,
        exhausted_for: None,
    })
}

/// The stated token estimate for models without a known encoding (see `llm::tokens`):
/// ⌈chars/4⌉ plus 4 per message.
pub fn estimate_tokens(messages: &[Message]) -> u64 {
    messages
        .iter()
        .map(|m| (m.content.chars().count() as u64).div_ceil(4) + 4)
        .sum()
}

fn classify_status(
    ep: &Endpoint,
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
    limits: &CallLimits,
) -> CallError {
    let retry_after = retry_after(headers)
        // A 429 without a retry hint: the reset of the window it says is spent.
        .or_else(|| {
            (status == reqwest::StatusCode::TOO_MANY_REQUESTS)
                .then(|| exhausted_for(headers, wall_clock()))
                .flatten()
        })
        .map(|d| d.min(limits.retry_after_max.max(Duration::from_secs(3600))));
    let text = String::from_utf8_lossy(body);
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| text.trim().to_string());
    // OpenAI's `error.code`; Anthropic's `error.type` (OpenAI's `type` says less).
    let code_at = if ep.kind == ProviderKind::Anthropic {
        "/error/type"
    } else {
        "/error/code"
    };
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer(code_at)
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_default();
    let message = ep.scrub(&message);
    match status.as_u16() {
        429 => CallError::RateLimited {
            retry_after,
            message,
        },
        s if s == 401
            || s == 403
            || auth_shaped(&message, &code)
            || matches!(code.as_str(), "authentication_error" | "permission_error") =>
        {
            CallError::Permanent {
                status: Some(s),
                message: format!("{AUTH_REFUSED} ({s}): {message}"),
            }
        }
        // Anthropic's 529 (overloaded) is among the 5xx.
        s @ (408 | 500..=599) => CallError::Server {
            status: s,
            retry_after,
            message,
        },
        s => {
            // Anthropic: 400 `invalid_request_error` "prompt is too long: … tokens > … maximum".
            let context = code == "context_length_exceeded"
                || message.contains("context length")
                || message.contains("prompt is too long");
            CallError::Permanent {
                status: Some(s),
                message: if context {
                    format!("context too long ({s}): {message}")
                } else {
                    format!("provider answered {s}: {message}")
                },
            }
        }
    }
}

fn transport(e: reqwest::Error, limits: &CallLimits) -> CallError {
    let e = e.without_url();
    if e.is_timeout() {
        CallError::Timeout(format!("no reply within {:?}", limits.timeout))
    } else if e.is_connect() {
        CallError::Connection("cannot connect to the provider".into())
    } else {
        // reqwest's message names neither headers nor the key.
        CallError::Connection(format!("provider request failed: {e}"))
    }
}

/// Sends one chat completion. Cancel by dropping the future.
pub async fn call(
    client: &reqwest::Client,
    ep: &Endpoint,
    model: &str,
    req: &ChatRequest,
    limits: &CallLimits,
) -> Result<Completion, CallError> {
    let mut rb = client
        .post(ep.url(model))
        .timeout(limits.timeout)
        .json(&body(ep.kind, model, req));
    if ep.kind == ProviderKind::Anthropic {
        let version = ep.api_version.as_deref().unwrap_or(ANTHROPIC_VERSION);
        rb = rb.header("anthropic-version", version);
    }
    if let Some(k) = &ep.key {
        let mut v = match ep.kind {
            ProviderKind::Azure | ProviderKind::Anthropic => {
                reqwest::header::HeaderValue::from_str(k.expose())
            }
            _ => reqwest::header::HeaderValue::from_str(&format!("Bearer {}", k.expose())),
        }
        .map_err(|_| CallError::Permanent {
            status: None,
            message: format!("the {} api key is not a valid header value", ep.kind),
        })?;
        v.set_sensitive(true);
        let name = match ep.kind {
            ProviderKind::Azure => "api-key",
            ProviderKind::Anthropic => "x-api-key",
            _ => "authorization",
        };
        rb = rb.header(name, v);
    }
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let mut resp = rb.send().await.map_err(|e| transport(e, limits))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let is_sse = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut buf: Vec<u8> = Vec::new();
    let mut sse = SseState {
        anthropic: ep.kind == ProviderKind::Anthropic,
        ..SseState::default()
    };
    loop {
        let idle = limits
            .stream_idle
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
            Err(_) => {
                return Err(CallError::Timeout(
                    if tokio::time::Instant::now() >= deadline {
                        format!("no complete reply within {:?}", limits.timeout)
                    } else {
                        format!("the reply stalled for {:?}", limits.stream_idle)
                    },
                ));
            }
            Ok(r) => r.map_err(|e| transport(e, limits))?,
        };
        let Some(chunk) = chunk else { break };
        if buf.len() + chunk.len() > limits.max_response_bytes {
            return Err(CallError::Permanent {
                status: None,
                message: format!(
                    "provider reply exceeds {} KiB",
                    limits.max_response_bytes / 1024
                ),
            });
        }
        buf.extend_from_slice(&chunk);
        if status.is_success() && is_sse {
            sse.feed(&mut buf)?;
            if sse.done {
                break;
            }
        }
    }
    if !status.is_success() {
        return Err(classify_status(ep, status, &headers, &buf, limits));
    }
    if is_sse {
        sse.feed(&mut buf)?;
        let mut c = sse.finish(&req.messages)?;
        c.exhausted_for = exhausted_for(&headers, wall_clock());
        return Ok(c);
    }
    if ep.kind == ProviderKind::Anthropic {
        let mut c = anthropic_completion(&buf, &req.messages)?;
        c.exhausted_for = exhausted_for(&headers, wall_clock());
        return Ok(c);
    }
    let r: WireResponse = serde_json::from_slice(&buf).map_err(|e| CallError::Permanent {
        status: None,
        message: format!("provider reply is not a chat completion: {e}"),
    })?;
    let choice = r.choices.into_iter().next();
    let (text, finish_reason) = match choice {
        Some(c) => (
            c.message.and_then(|m| m.content).unwrap_or_default(),
            c.finish_reason,
        ),
        None => {
            return Err(CallError::Permanent {
                status: None,
                message: "provider reply has no choices".into(),
            });
        }
    };
    let (input_tokens, output_tokens, usage_estimated) = match r.usage {
        Some(u) => (u.prompt_tokens, u.completion_tokens, false),
        None => (
            estimate_tokens(&req.messages),
            (text.chars().count() as u64).div_ceil(4),
            true,
        ),
    };
    Ok(Completion {
        text,
        finish_reason,
        input_tokens,
        output_tokens,
        usage_estimated,
        model: r.model,
        exhausted_for: exhausted_for(&headers, wall_clock()),
    })
}

/// Incremental SSE parsing: complete lines are consumed from the buffer as they arrive.
#[derive(Default)]
struct SseState {
    /// Anthropic's events (else OpenAI chunks).
    anthropic: bool,
    text: String,
    finish_reason: Option<String>,
    usage: Option<(u64, u64)>,
    /// Anthropic: `message_start` states the input, `message_delta` the output.
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    model: Option<String>,
    done: bool,
}

impl SseState {
    fn feed(&mut self, buf: &mut Vec<u8>) -> Result<(), CallError> {
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let Some(data) = line.strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                self.done = true;
                continue;
            }
            if data.is_empty() {
                continue;
            }
            let ev: Value = serde_json::from_str(data).map_err(|e| CallError::Permanent {
                status: None,
                message: format!("provider stream event is not JSON: {e}"),
            })?;
            if self.anthropic {
                self.anthropic_event(&ev)?;
                continue;
            }
            if let Some(err) = ev.get("error") {
                let msg = err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("stream error");
                return Err(CallError::Server {
                    status: 500,
                    retry_after: None,
                    message: format!(
                        "error event in stream: {}",
                        msg.chars().take(300).collect::<String>()
                    ),
                });
            }
            let r: WireResponse = serde_json::from_value(ev).map_err(|e| CallError::Permanent {
                status: None,
                message: format!("provider stream event is not a chunk: {e}"),
            })?;
            if r.model.is_some() {
                self.model = r.model;
            }
            if let Some(u) = r.usage {
                self.usage = Some((u.prompt_tokens, u.completion_tokens));
            }
            for c in r.choices {
                if let Some(t) = c.delta.and_then(|d| d.content) {
                    self.text.push_str(&t);
                }
                if c.finish_reason.is_some() {
                    self.finish_reason = c.finish_reason;
                }
            }
        }
        Ok(())
    }

    /// One Anthropic event, by its `type` (the `event:` line repeats it): `message_start`
    /// (model, input tokens), `content_block_delta` (`text_delta` text), `message_delta`
    /// (`stop_reason`, cumulative output tokens), `message_stop`, `error`; `ping` and the
    /// block start/stop events carry nothing needed.
    fn anthropic_event(&mut self, ev: &Value) -> Result<(), CallError> {
        let usage = |v: Option<&Value>| {
            v.and_then(|u| serde_json::from_value::<AnthropicUsage>(u.clone()).ok())
                .unwrap_or_default()
        };
        match ev.get("type").and_then(Value::as_str).unwrap_or_default() {
            "message_start" => {
                let m = ev.get("message");
                if let Some(model) = m.and_then(|m| m.get("model")).and_then(Value::as_str) {
                    self.model = Some(model.to_string());
                }
                let u = usage(m.and_then(|m| m.get("usage")));
                self.input_tokens = u.input().or(self.input_tokens);
                self.output_tokens = u.output_tokens.or(self.output_tokens);
            }
            "content_block_delta" => {
                let d = ev.get("delta");
                if d.and_then(|d| d.get("type")).and_then(Value::as_str) == Some("text_delta")
                    && let Some(t) = d.and_then(|d| d.get("text")).and_then(Value::as_str)
                {
                    self.text.push_str(t);
                }
            }
            "message_delta" => {
                if let Some(r) = ev.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.finish_reason = Some(r.to_string());
                }
                let u = usage(ev.get("usage"));
                self.input_tokens = u.input().or(self.input_tokens);
                self.output_tokens = u.output_tokens.or(self.output_tokens);
            }
            "message_stop" => self.done = true,
            "error" => {
                let kind = ev
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error");
                let msg = ev
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("stream error");
                return Err(anthropic_error(
                    kind,
                    format!(
                        "error event in stream: {}",
                        msg.chars().take(300).collect::<String>()
                    ),
                    None,
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self, messages: &[Message]) -> Result<Completion, CallError> {
        // Anthropic's stream is complete at `message_stop`; OpenAI's at `[DONE]` or with a
        // finish reason.
        if !self.done && (self.anthropic || self.finish_reason.is_none()) {
            return Err(CallError::Connection(
                "the reply stream ended before it was complete".into(),
            ));
        }
        let usage = self
            .usage
            .or_else(|| self.input_tokens.zip(self.output_tokens));
        let (input_tokens, output_tokens, usage_estimated) = match usage {
            Some((i, o)) => (i, o, false),
            None => (
                estimate_tokens(messages),
                (self.text.chars().count() as u64).div_ceil(4),
                true,
            ),
        };
        Ok(Completion {
            text: self.text,
            finish_reason: self.finish_reason,
            input_tokens,
            output_tokens,
            usage_estimated,
            model: self.model,
            exhausted_for: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(kind: ProviderKind, key: Option<&str>) -> Endpoint {
        Endpoint {
            kind,
            base_url: "http://h/v1".into(),
            api_version: Some("2024-10-21".into()),
            deployments: [("gpt-4o".to_string(), "prod-4o".to_string())].into(),
            key: key.map(Secret::new),
        }
    }

    #[test]
    fn urls_per_provider() {
        assert_eq!(
            ep(ProviderKind::Openai, None).url("m"),
            "http://h/v1/chat/completions"
        );
        assert_eq!(
            ep(ProviderKind::Azure, None).url("gpt-4o"),
            "http://h/v1/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
        );
    }

    #[test]
    fn key_resolution_and_debug_redaction() {
        let env = |v: &str| (v == "K").then(|| "sk-sentinel-42".to_string());
        let cfg = EndpointConfig {
            api_key_env: Some("K".into()),
            ..Default::default()
        };
        let e = Endpoint::resolve(ProviderKind::Openai, Some(&cfg), &env).unwrap();
        assert!(!format!("{e:?}").contains("sentinel"));
        let missing = EndpointConfig {
            api_key_env: Some("NOPE".into()),
            ..Default::default()
        };
        let err = Endpoint::resolve(ProviderKind::Openai, Some(&missing), &env).unwrap_err();
        assert!(err.contains("NOPE"), "{err}");
        assert!(Endpoint::resolve(ProviderKind::Openai, None, &env).is_err());
        assert!(Endpoint::resolve(ProviderKind::OpenaiCompatible, None, &env).is_err());
    }

    #[test]
    fn the_base_url_may_come_from_the_environment() {
        let env = |v: &str| match v {
            "K" => Some("sk-sentinel-42".to_string()),
            "ENDPOINT" => Some(" https://res.openai.azure.com/ \n".to_string()),
            "BAD" => Some("res.openai.azure.com".to_string()),
            _ => None,
        };
        let cfg = |var: &str| EndpointConfig {
            base_url_env: Some(var.into()),
            api_key_env: Some("K".into()),
            api_version: Some("2024-10-21".into()),
            ..Default::default()
        };
        let e = Endpoint::resolve(ProviderKind::Azure, Some(&cfg("ENDPOINT")), &env).unwrap();
        assert_eq!(e.base_url, "https://res.openai.azure.com");
        for var in ["BAD", "UNSET"] {
            let err = Endpoint::resolve(ProviderKind::Azure, Some(&cfg(var)), &env).unwrap_err();
            assert!(err.contains(var) && err.contains("base_url"), "{err}");
        }
        // A base_url in the file wins over the variable.
        let file = EndpointConfig {
            base_url: Some("https://file.example".into()),
            ..cfg("UNSET")
        };
        let e = Endpoint::resolve(ProviderKind::Azure, Some(&file), &env).unwrap();
        assert_eq!(e.base_url, "https://file.example");
    }

    #[test]
    fn classification_and_scrubbing() {
        let e = ep(ProviderKind::Openai, Some("sk-sentinel-42"));
        let limits = CallLimits {
            timeout: Duration::from_secs(1),
            stream_idle: Duration::from_secs(1),
            max_response_bytes: 1024,
            retry_after_max: Duration::from_secs(60),
        };
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        let c = |s: u16, body: &str, h: &reqwest::header::HeaderMap| {
            classify_status(
                &e,
                reqwest::StatusCode::from_u16(s).unwrap(),
                h,
                body.as_bytes(),
                &limits,
            )
        };
        assert_eq!(
            c(429, "{\"error\":{\"message\":\"slow down\"}}", &h),
            CallError::RateLimited {
                retry_after: Some(Duration::from_secs(2)),
                message: "slow down".into()
            }
        );
        assert!(matches!(
            c(503, "oops", &h),
            CallError::Server { status: 503, .. }
        ));
        let p = c(
            401,
            "{\"error\":{\"message\":\"Incorrect API key provided: sk-sentinel-42\"}}",
            &h,
        );
        assert_eq!(p.error_type(), "auth");
        assert!(!p.to_string().contains("sentinel"), "{p}");
        // A shortened echo of the key (8+ characters of it) is scrubbed too.
        let p = c(
            401,
            "{\"error\":{\"message\":\"Incorrect API key provided: sk-senti*****-42\"}}",
            &h,
        );
        assert!(!p.to_string().contains("sk-senti"), "{p}");
        let p = c(
            400,
            "{\"error\":{\"message\":\"too long\",\"code\":\"context_length_exceeded\"}}",
            &h,
        );
        assert_eq!(p.error_type(), "context_length");
    }

    #[test]
    fn ratelimit_headers() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(parse_reset("1.500s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_reset("soon"), None);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-ratelimit-remaining-requests", "3".parse().unwrap());
        h.insert("x-ratelimit-remaining-tokens", "0".parse().unwrap());
        h.insert("x-ratelimit-reset-tokens", "2.5s".parse().unwrap());
        assert_eq!(
            exhausted_for(&h, wall_clock()),
            Some(Duration::from_millis(2500))
        );
        h.insert("x-ratelimit-remaining-tokens", "10".parse().unwrap());
        assert_eq!(exhausted_for(&h, wall_clock()), None);
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-limit-requests", "0".parse().unwrap());
        assert_eq!(
            exhausted_for(&h, wall_clock()),
            None,
            "a limit of 0 is no limit"
        );
    }

    #[test]
    fn sse_chunks_accumulate_with_usage() {
        let mut s = SseState::default();
        let mut buf = b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\nda".to_vec();
        s.feed(&mut buf).unwrap();
        assert_eq!(buf, b"da");
        buf.extend_from_slice(b"ta: [DONE]\n\n");
        s.feed(&mut buf).unwrap();
        assert!(s.done);
        let c = s.finish(&[]).unwrap();
        assert_eq!(c.text, "Hello");
        assert_eq!((c.input_tokens, c.output_tokens), (5, 2));
        assert!(!c.usage_estimated);
        let truncated = SseState::default();
        assert!(matches!(
            truncated.finish(&[]),
            Err(CallError::Connection(_))
        ));
    }
    #[test]
    fn anthropic_url_headers_and_body() {
        let mut e = ep(ProviderKind::Anthropic, Some("sk-ant-sentinel-42"));
        e.base_url = "http://h".into();
        assert_eq!(e.url("claude"), "http://h/v1/messages");
        e.base_url = "http://h/v1".into();
        assert_eq!(
            e.url("claude"),
            "http://h/v1/messages",
            "a base URL up to /v1"
        );
        let env = |_: &str| None;
        let cfg = EndpointConfig {
            api_key_file: None,
            ..Default::default()
        };
        let err = Endpoint::resolve(ProviderKind::Anthropic, Some(&cfg), &env).unwrap_err();
        assert!(err.contains("needs an api key"), "{err}");
        let env = |v: &str| (v == "K").then(|| "sk-ant-sentinel-42".to_string());
        let cfg = EndpointConfig {
            api_key_env: Some("K".into()),
            ..Default::default()
        };
        let r = Endpoint::resolve(ProviderKind::Anthropic, Some(&cfg), &env).unwrap();
        assert_eq!(r.base_url, ANTHROPIC_URL);
        assert!(!format!("{r:?}").contains("sentinel"));

        let schema = json!({"type": "object", "required": ["ok"]});
        let req = ChatRequest {
            messages: vec![
                Message {
                    role: "system".into(),
                    content: "be brief".into(),
                },
                Message {
                    role: "user".into(),
                    content: "hi".into(),
                },
            ],
            max_tokens: 77,
            temperature: 1.5,
            schema: Some(schema.clone()),
            stream: true,
        };
        let b = body(ProviderKind::Anthropic, "claude", &req);
        assert_eq!(b["model"], "claude");
        assert_eq!(b["max_tokens"], 77);
        assert_eq!(b["temperature"], 1.0, "Anthropic's range is 0..=1");
        assert_eq!(b["stream"], true);
        assert_eq!(b["messages"], json!([{"role": "user", "content": "hi"}]));
        let system = b["system"].as_str().unwrap();
        assert!(system.starts_with("be brief\n\n"), "{system}");
        assert!(
            system.contains(&format!("JSON schema: {schema}")),
            "{system}"
        );
        assert!(b.get("response_format").is_none() && b.get("stream_options").is_none());
        // OpenAI keeps its body: system in messages, the native structured-output mode.
        let o = body(ProviderKind::Openai, "m", &req);
        assert_eq!(o["messages"][0]["role"], "system");
        assert!(o["response_format"]["json_schema"]["schema"].is_object());
    }

    #[test]
    fn rfc3339_resets() {
        let now = at_unix(1_750_000_000);
        // 2025-06-15T15:06:40Z is 1_750_000_000.
        assert_eq!(
            parse_reset_at("2025-06-15T15:07:10Z", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_reset_at("2025-06-15T15:06:41.500Z", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_reset_at("2025-06-15T17:07:10+02:00", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_reset_at("2025-06-15T14:07:10-01:00", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_reset_at("2025-06-15T15:00:00Z", now),
            Some(Duration::ZERO),
            "a reset in the past"
        );
        assert_eq!(parse_reset_at("in a minute", now), None);
        assert_eq!(parse_reset_at("", now), None);
    }

    fn at_unix(secs: u64) -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn anthropic_ratelimit_headers_pause_until_the_latest_reset() {
        let now = at_unix(1_750_000_000);
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "3".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-requests-reset",
            "2025-06-15T15:06:50Z".parse().unwrap(),
        );
        assert_eq!(exhausted_for(&h, now), None, "requests remain");
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "0".parse().unwrap(),
        );
        assert_eq!(exhausted_for(&h, now), Some(Duration::from_secs(10)));
        // Input tokens spent for longer: the longest reset holds.
        h.insert(
            "anthropic-ratelimit-input-tokens-remaining",
            "0".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-input-tokens-reset",
            "2025-06-15T15:07:40Z".parse().unwrap(),
        );
        assert_eq!(exhausted_for(&h, now), Some(Duration::from_secs(60)));
        // Output tokens spent with an unreadable reset: 1 s, shorter than the rest.
        h.insert(
            "anthropic-ratelimit-output-tokens-remaining",
            "0".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-output-tokens-reset",
            "soon".parse().unwrap(),
        );
        assert_eq!(exhausted_for(&h, now), Some(Duration::from_secs(60)));
        // Windows that have all reset already: no pause.
        let later = at_unix(1_750_000_100);
        let mut g = reqwest::header::HeaderMap::new();
        g.insert("anthropic-ratelimit-tokens-remaining", "0".parse().unwrap());
        g.insert(
            "anthropic-ratelimit-tokens-reset",
            "2025-06-15T15:07:40Z".parse().unwrap(),
        );
        assert_eq!(exhausted_for(&g, later), None);
        assert_eq!(exhausted_for(&g, now), Some(Duration::from_secs(60)));
        // Forwarded by a proxy under the `llm_provider-` prefix.
        let mut p = reqwest::header::HeaderMap::new();
        p.insert(
            "llm_provider-anthropic-ratelimit-tokens-remaining",
            "0".parse().unwrap(),
        );
        p.insert(
            "llm_provider-anthropic-ratelimit-tokens-reset",
            "2025-06-15T15:07:00Z".parse().unwrap(),
        );
        assert_eq!(exhausted_for(&p, now), Some(Duration::from_secs(20)));
    }

    #[test]
    fn anthropic_errors_are_classified() {
        let e = ep(ProviderKind::Anthropic, Some("sk-ant-sentinel-42"));
        let limits = CallLimits {
            timeout: Duration::from_secs(1),
            stream_idle: Duration::from_secs(1),
            max_response_bytes: 1024,
            retry_after_max: Duration::from_secs(60),
        };
        let none = reqwest::header::HeaderMap::new();
        let c = |s: u16, kind: &str, msg: &str, h: &reqwest::header::HeaderMap| {
            let body = json!({"type": "error", "error": {"type": kind, "message": msg}});
            classify_status(
                &e,
                reqwest::StatusCode::from_u16(s).unwrap(),
                h,
                body.to_string().as_bytes(),
                &limits,
            )
        };
        let overloaded = c(529, "overloaded_error", "Overloaded", &none);
        assert!(matches!(overloaded, CallError::Server { status: 529, .. }));
        assert!(overloaded.trips_breaker());
        assert!(matches!(
            c(500, "api_error", "boom", &none),
            CallError::Server { status: 500, .. }
        ));
        for (s, kind) in [(401, "authentication_error"), (403, "permission_error")] {
            let p = c(s, kind, "invalid x-api-key sk-ant-sentinel-42", &none);
            assert_eq!(p.error_type(), "auth", "{p}");
            assert!(!p.to_string().contains("sentinel"), "{p}");
        }
        // A permission error under another status is still about the credentials.
        assert_eq!(c(400, "permission_error", "no", &none).error_type(), "auth");
        let bad = c(
            400,
            "invalid_request_error",
            "messages: field required",
            &none,
        );
        assert!(matches!(
            bad,
            CallError::Permanent {
                status: Some(400),
                ..
            }
        ));
        assert_eq!(bad.error_type(), "invalid_request");
        assert_eq!(
            c(
                400,
                "invalid_request_error",
                "prompt is too long: 210000 tokens > 200000 maximum",
                &none
            )
            .error_type(),
            "context_length"
        );
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(
            c(429, "rate_limit_error", "slow down", &h),
            CallError::RateLimited {
                retry_after: Some(Duration::from_secs(7)),
                message: "slow down".into()
            }
        );
        // Without retry-after, the reset of the spent window is the hint.
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "0".parse().unwrap(),
        );
        let reset = humantime::format_rfc3339(wall_clock() + Duration::from_secs(40)).to_string();
        h.insert("anthropic-ratelimit-requests-reset", reset.parse().unwrap());
        match c(429, "rate_limit_error", "slow down", &h) {
            CallError::RateLimited {
                retry_after: Some(d),
                ..
            } => assert!(
                d > Duration::from_secs(30) && d <= Duration::from_secs(40),
                "{d:?}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn anthropic_replies_parse() {
        let body = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Hel"}, {"type": "tool_use", "id": "t"}, {"type": "text", "text": "lo"}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 12, "cache_read_input_tokens": 3, "cache_creation_input_tokens": null, "output_tokens": 4},
        });
        let c = anthropic_completion(body.to_string().as_bytes(), &[]).unwrap();
        assert_eq!(c.text, "Hello");
        assert_eq!((c.input_tokens, c.output_tokens), (15, 4));
        assert!(!c.usage_estimated);
        assert_eq!(c.finish_reason.as_deref(), Some("end_turn"));
        assert_eq!(c.model.as_deref(), Some("claude-x"));
        let no_usage = json!({"content": [{"type": "text", "text": "abcdefgh"}]});
        let c = anthropic_completion(no_usage.to_string().as_bytes(), &[]).unwrap();
        assert!(c.usage_estimated);
        assert_eq!(c.output_tokens, 2);
        assert!(matches!(
            anthropic_completion(b"[1]", &[]),
            Err(CallError::Permanent { .. })
        ));
    }

    fn anthropic_sse() -> SseState {
        SseState {
            anthropic: true,
            ..SseState::default()
        }
    }

    #[test]
    fn anthropic_sse_events_accumulate_with_usage() {
        let stream = concat!(
            "event: message_start\n",
            "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-x\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
            "event: content_block_start\n",
            "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: ping\n",
            "data: {\"type\":\"ping\"}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
            "event: content_block_delta\n",
            "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
            "event: content_block_stop\n",
            "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: message_delta\n",
            "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n",
            "event: message_stop\n",
            "data: {\"type\":\"message_stop\"}\n\n",
        );
        // Fed in pieces that split lines and events anywhere.
        let mut s = anthropic_sse();
        let mut buf = Vec::new();
        for piece in stream.as_bytes().chunks(17) {
            buf.extend_from_slice(piece);
            s.feed(&mut buf).unwrap();
        }
        assert!(s.done);
        let c = s.finish(&[]).unwrap();
        assert_eq!(c.text, "Hello");
        assert_eq!((c.input_tokens, c.output_tokens), (25, 9));
        assert!(!c.usage_estimated);
        assert_eq!(c.finish_reason.as_deref(), Some("max_tokens"));
        assert_eq!(c.model.as_deref(), Some("claude-x"));

        // Without message_stop the reply is incomplete, even with a stop reason.
        let cut = stream.split("event: message_stop").next().unwrap();
        let mut s = anthropic_sse();
        let mut buf = cut.as_bytes().to_vec();
        s.feed(&mut buf).unwrap();
        assert!(matches!(s.finish(&[]), Err(CallError::Connection(_))));
    }

    #[test]
    fn anthropic_sse_error_events_are_classified() {
        let ev = |kind: &str| {
            format!(
                "event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"{kind}\",\"message\":\"m\"}}}}\n\n"
            )
            .into_bytes()
        };
        let run = |kind: &str| anthropic_sse().feed(&mut ev(kind)).unwrap_err();
        assert!(matches!(
            run("overloaded_error"),
            CallError::Server { status: 529, .. }
        ));
        assert!(matches!(
            run("api_error"),
            CallError::Server { status: 500, .. }
        ));
        assert!(matches!(
            run("rate_limit_error"),
            CallError::RateLimited { .. }
        ));
        assert_eq!(run("authentication_error").error_type(), "auth");
        assert_eq!(run("invalid_request_error").error_type(), "invalid_request");
    }
}
