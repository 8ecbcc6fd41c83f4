//! A thin client of the OpenAI chat-completions wire format over the workspace's reqwest
//! (rustls, ring): OpenAI (`Authorization: Bearer`), Azure OpenAI (deployment in the path,
//! `api-version`, `api-key` header) and any OpenAI-compatible base URL. Plain JSON replies
//! and SSE streams (`data:` events, `data: [DONE]`, a final usage chunk with
//! `stream_options.include_usage`). Errors are classified by what the caller must do and
//! never carry the key: provider text is scrubbed of it and truncated.

use honua_shared::llm_config::{EndpointConfig, ProviderKind, Secret};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

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

/// When a success says a limit is used up (`x-ratelimit-remaining-requests` or `-tokens`
/// is 0), how long until it resets.
fn exhausted_for(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let val = |name: &str| header(h, name);
    // Remaining 0 of a limit of 0 means "no limit" on some OpenAI-compatible servers.
    let zero = |kind: &str| {
        val(&format!("x-ratelimit-remaining-{kind}")) == Some("0")
            && val(&format!("x-ratelimit-limit-{kind}")) != Some("0")
    };
    let reset = |name: &str| {
        header(h, name)
            .and_then(parse_reset)
            .unwrap_or(Duration::from_secs(1))
    };
    let mut d: Option<Duration> = None;
    if zero("requests") {
        d = Some(reset("x-ratelimit-reset-requests"));
    }
    if zero("tokens") {
        let t = reset("x-ratelimit-reset-tokens");
        d = Some(d.map_or(t, |x| x.max(t)));
    }
    d
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

/// The request body (OpenAI JSON). Azure ignores `model` (the deployment is in the path).
pub fn body(model: &str, req: &ChatRequest) -> Value {
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
    let retry_after =
        retry_after(headers).map(|d| d.min(limits.retry_after_max.max(Duration::from_secs(3600))));
    let text = String::from_utf8_lossy(body);
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| text.trim().to_string());
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/code")
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
        s if s == 401 || s == 403 || auth_shaped(&message, &code) => CallError::Permanent {
            status: Some(s),
            message: format!("{AUTH_REFUSED} ({s}): {message}"),
        },
        s @ (408 | 500..=599) => CallError::Server {
            status: s,
            retry_after,
            message,
        },
        s => {
            let context = code == "context_length_exceeded" || message.contains("context length");
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
        .json(&body(model, req));
    if let Some(k) = &ep.key {
        let mut v = match ep.kind {
            ProviderKind::Azure => reqwest::header::HeaderValue::from_str(k.expose()),
            _ => reqwest::header::HeaderValue::from_str(&format!("Bearer {}", k.expose())),
        }
        .map_err(|_| CallError::Permanent {
            status: None,
            message: format!("the {} api key is not a valid header value", ep.kind),
        })?;
        v.set_sensitive(true);
        let name = match ep.kind {
            ProviderKind::Azure => "api-key",
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
    let mut sse = SseState::default();
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
        c.exhausted_for = exhausted_for(&headers);
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
        exhausted_for: exhausted_for(&headers),
    })
}

/// Incremental SSE parsing: complete lines are consumed from the buffer as they arrive.
#[derive(Default)]
struct SseState {
    text: String,
    finish_reason: Option<String>,
    usage: Option<(u64, u64)>,
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

    fn finish(self, messages: &[Message]) -> Result<Completion, CallError> {
        if !self.done && self.finish_reason.is_none() {
            return Err(CallError::Connection(
                "the reply stream ended before it was complete".into(),
            ));
        }
        let (input_tokens, output_tokens, usage_estimated) = match self.usage {
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
        assert_eq!(exhausted_for(&h), Some(Duration::from_millis(2500)));
        h.insert("x-ratelimit-remaining-tokens", "10".parse().unwrap());
        assert_eq!(exhausted_for(&h), None);
        h.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        h.insert("x-ratelimit-limit-requests", "0".parse().unwrap());
        assert_eq!(exhausted_for(&h), None, "a limit of 0 is no limit");
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
}
