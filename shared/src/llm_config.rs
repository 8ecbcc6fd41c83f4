//! Configuration of the `llm` step kind (`[llm_provider]` in the TOML file, `llmProvider`
//! at `GET /api/config`), shaped as the operations guide's `LlmProvider` section.
//!
//! API keys never appear here: an endpoint names the environment variable or the secret
//! file that holds its key, and the worker reads it into a [`Secret`], which prints and
//! serializes as `[redacted]`.

use crate::limiter::LimitSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// A provider the `llm` kind can call. Names are accepted as the guide writes them
/// (`Azure`, `OpenAI`) or in snake case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    #[serde(alias = "OpenAI", alias = "OpenAi", alias = "openAI")]
    Openai,
    #[serde(alias = "Azure", alias = "AzureOpenAI", alias = "azure_openai")]
    Azure,
    #[serde(
        alias = "OpenAICompatible",
        alias = "OpenAiCompatible",
        alias = "openaiCompatible"
    )]
    OpenaiCompatible,
    /// Anthropic's Messages API (`POST {base_url}/v1/messages`, `x-api-key`).
    #[serde(alias = "Anthropic", alias = "claude", alias = "Claude")]
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Azure => "azure",
            ProviderKind::OpenaiCompatible => "openai_compatible",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one provider lives and where its key comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointConfig {
    /// OpenAI: default `https://api.openai.com/v1`. Azure: the resource endpoint
    /// (`https://<resource>.openai.azure.com`). OpenAI-compatible (vLLM, Ollama, LocalAI):
    /// required, up to and including `/v1`. Anthropic: default `https://api.anthropic.com`
    /// (calls go to `{base_url}/v1/messages`; a base URL ending in `/v1` is taken as is).
    pub base_url: Option<String>,
    /// Environment variable holding the base URL, read by the worker at start when
    /// `base_url` is not set (e.g. `AZURE_OPENAI_ENDPOINT` from a Kubernetes secret).
    pub base_url_env: Option<String>,
    /// Environment variable holding the API key (e.g. `OPENAI_API_KEY`).
    pub api_key_env: Option<String>,
    /// File holding the API key (e.g. a Kubernetes secret mount); read at worker start.
    pub api_key_file: Option<PathBuf>,
    /// Azure: the `api-version` query parameter. Anthropic: the `anthropic-version` header
    /// (default `2023-06-01`).
    pub api_version: Option<String>,
    /// Azure: deployment name per model (default: the model name itself).
    pub deployments: BTreeMap<String, String>,
}

impl EndpointConfig {
    /// Whether a base URL is given, in the file or through an environment variable.
    fn has_url(&self) -> bool {
        self.base_url.is_some() || self.base_url_env.is_some()
    }
}

/// Model per task class, as the guide's `ModelSelection`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSelection {
    #[serde(alias = "SimpleTask")]
    pub simple_task: String,
    #[serde(alias = "ComplexTask")]
    pub complex_task: String,
    #[serde(alias = "CodeGeneration")]
    pub code_generation: String,
}

impl Default for ModelSelection {
    fn default() -> Self {
        Self {
            simple_task: "gpt-4o-mini".into(),
            complex_task: "gpt-4o".into(),
            code_generation: "gpt-4o".into(),
        }
    }
}

/// A step's task class (`task_class` in its config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskClass {
    SimpleTask,
    ComplexTask,
    CodeGeneration,
}

impl std::str::FromStr for TaskClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "SimpleTask" | "simple_task" | "simpleTask" => Ok(TaskClass::SimpleTask),
            "ComplexTask" | "complex_task" | "complexTask" => Ok(TaskClass::ComplexTask),
            "CodeGeneration" | "code_generation" | "codeGeneration" => {
                Ok(TaskClass::CodeGeneration)
            }
            other => Err(format!(
                "unknown task_class {other:?} (SimpleTask, ComplexTask, CodeGeneration)"
            )),
        }
    }
}

impl ModelSelection {
    pub fn model(&self, class: TaskClass) -> &str {
        match class {
            TaskClass::SimpleTask => &self.simple_task,
            TaskClass::ComplexTask => &self.complex_task,
            TaskClass::CodeGeneration => &self.code_generation,
        }
    }
}

/// The shared response cache (`llmCaching`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LlmCaching {
    pub enabled: bool,
    pub ttl_minutes: u64,
    /// Cache even when the temperature is above 0 (non-deterministic replies).
    pub force: bool,
}

impl Default for LlmCaching {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_minutes: 60,
            force: false,
        }
    }
}

/// What happens when a token budget is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BudgetAction {
    /// The step fails permanently (no retry).
    #[default]
    Fail,
    /// The step yields and is re-queued after `pause_minutes` (each pause uses one attempt
    /// of the step's retry policy).
    Pause,
}

/// Token budget of one process type.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TypeBudget {
    /// Tokens one process of this type may use (overrides `budgets.max_tokens_per_process`).
    pub max_tokens_per_process: Option<u64>,
    /// Tokens all processes of this type may use per UTC day.
    pub max_tokens_per_day: Option<u64>,
    /// Overrides `budgets.action`.
    pub action: Option<BudgetAction>,
}

/// Token budgets, checked before every provider call against the usage recorded in Redis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetsConfig {
    /// Tokens any one process may use (none: unlimited).
    pub max_tokens_per_process: Option<u64>,
    pub action: BudgetAction,
    /// How long a paused step waits before it checks again.
    pub pause_minutes: u64,
    /// Per process type (the definition's name).
    pub process_types: BTreeMap<String, TypeBudget>,
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        Self {
            max_tokens_per_process: None,
            action: BudgetAction::Fail,
            pause_minutes: 30,
            process_types: BTreeMap::new(),
        }
    }
}

/// Price of one model, in USD per 1000 tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Price {
    pub input_per_1k: f64,
    pub output_per_1k: f64,
}

/// `[llm_provider]`: present = workers register the `llm` step kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LlmProviderConfig {
    pub provider: ProviderKind,
    /// Used when the primary's bucket cannot admit a call within `limiter_max_wait_ms`,
    /// when it answers 429, or while its circuit breaker is open.
    pub fallback_provider: Option<ProviderKind>,
    pub openai: Option<EndpointConfig>,
    pub azure: Option<EndpointConfig>,
    pub openai_compatible: Option<EndpointConfig>,
    pub anthropic: Option<EndpointConfig>,
    pub model_selection: ModelSelection,
    /// Models on the fallback provider (default: `model_selection`).
    pub fallback_model_selection: Option<ModelSelection>,
    pub default_max_tokens: u32,
    /// Per step name, as the guide's `MaxTokensByStep`.
    pub max_tokens_by_step: BTreeMap<String, u32>,
    pub temperature: f32,
    pub llm_caching: LlmCaching,
    /// Fleet-wide limits per bucket `provider/model` (e.g. `azure/gpt-4o`).
    pub limits: BTreeMap<String, LimitSpec>,
    /// How long a call waits for its bucket before it falls back or yields.
    pub limiter_max_wait_ms: u64,
    /// Bound on one provider call (streaming or not).
    pub request_timeout_secs: u64,
    /// A stream that delivers nothing for this long is treated as a timeout.
    pub stream_idle_timeout_secs: u64,
    /// Calls whose `max_tokens` is at least this stream their reply (0: always stream).
    pub stream_min_max_tokens: u32,
    /// Provider calls per step execution beyond the first (429, 5xx, timeouts).
    pub max_retries: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// A provider's `Retry-After` is honoured up to this; longer waits yield the step.
    pub retry_after_max_secs: u64,
    /// Consecutive 5xx/timeouts that open a provider/model's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker stays open before one probe is let through.
    pub breaker_open_secs: u64,
    pub budgets: BudgetsConfig,
    /// Per model name.
    pub prices: BTreeMap<String, Price>,
    /// Cap on a reply body.
    pub max_response_kb: usize,
}

impl Default for LlmProviderConfig {
    fn default() -> Self {
        Self {
            provider: ProviderKind::Openai,
            fallback_provider: None,
            openai: None,
            azure: None,
            openai_compatible: None,
            anthropic: None,
            model_selection: ModelSelection::default(),
            fallback_model_selection: None,
            default_max_tokens: 2000,
            max_tokens_by_step: BTreeMap::new(),
            temperature: 0.0,
            llm_caching: LlmCaching::default(),
            limits: BTreeMap::new(),
            limiter_max_wait_ms: 5_000,
            request_timeout_secs: 120,
            stream_idle_timeout_secs: 30,
            stream_min_max_tokens: 2000,
            max_retries: 4,
            retry_initial_ms: 500,
            retry_max_ms: 20_000,
            retry_after_max_secs: 60,
            breaker_failures: 5,
            breaker_open_secs: 30,
            budgets: BudgetsConfig::default(),
            prices: BTreeMap::new(),
            max_response_kb: 4096,
        }
    }
}

impl LlmProviderConfig {
    pub fn endpoint(&self, kind: ProviderKind) -> Option<&EndpointConfig> {
        match kind {
            ProviderKind::Openai => self.openai.as_ref(),
            ProviderKind::Azure => self.azure.as_ref(),
            ProviderKind::OpenaiCompatible => self.openai_compatible.as_ref(),
            ProviderKind::Anthropic => self.anthropic.as_ref(),
        }
    }

    /// A clear message naming the bad field (relative to `llm_provider`).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for kind in std::iter::once(self.provider).chain(self.fallback_provider) {
            let ep = self.endpoint(kind);
            match kind {
                ProviderKind::OpenaiCompatible if !ep.is_some_and(EndpointConfig::has_url) => {
                    return Err((
                        "llm_provider.openai_compatible.base_url",
                        "required for the openai_compatible provider (or base_url_env)".into(),
                    ));
                }
                ProviderKind::Azure
                    if !ep.is_some_and(EndpointConfig::has_url)
                        || ep.and_then(|e| e.api_version.as_ref()).is_none() =>
                {
                    return Err((
                        "llm_provider.azure",
                        "base_url (the resource endpoint) or base_url_env, and api_version, are required"
                            .into(),
                    ));
                }
                _ => {}
            }
        }
        for ep in [
            &self.openai,
            &self.azure,
            &self.openai_compatible,
            &self.anthropic,
        ]
        .into_iter()
        .flatten()
        {
            if let Some(u) = &ep.base_url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                return Err((
                    "llm_provider.base_url",
                    format!("{u:?} is not an http(s) URL"),
                ));
            }
            if let Some(v) = &ep.api_key_env
                && v.is_empty()
            {
                return Err(("llm_provider.api_key_env", "must not be empty".into()));
            }
            if let Some(v) = &ep.base_url_env
                && v.is_empty()
            {
                return Err(("llm_provider.base_url_env", "must not be empty".into()));
            }
        }
        if let Some(v) = self.anthropic.as_ref().and_then(|e| e.api_version.as_ref())
            && (v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err((
                "llm_provider.anthropic.api_version",
                format!("{v:?} is not an anthropic-version header value (e.g. 2023-06-01)"),
            ));
        }
        if self.default_max_tokens == 0 || self.max_tokens_by_step.values().any(|m| *m == 0) {
            return Err((
                "llm_provider.default_max_tokens",
                "max tokens must be > 0".into(),
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(("llm_provider.temperature", "must be 0.0..=2.0".into()));
        }
        if self.llm_caching.enabled && self.llm_caching.ttl_minutes == 0 {
            return Err(("llm_provider.llm_caching.ttl_minutes", "must be > 0".into()));
        }
        for (bucket, spec) in &self.limits {
            if !bucket.contains('/') {
                return Err((
                    "llm_provider.limits",
                    format!("bucket {bucket:?} must be named provider/model"),
                ));
            }
            spec.validate()
                .map_err(|m| ("llm_provider.limits", format!("{bucket}: {m}")))?;
        }
        if self.request_timeout_secs == 0 || self.stream_idle_timeout_secs == 0 {
            return Err((
                "llm_provider.request_timeout_secs",
                "request_timeout_secs and stream_idle_timeout_secs must be > 0".into(),
            ));
        }
        if self.max_retries > 20 {
            return Err(("llm_provider.max_retries", "must be at most 20".into()));
        }
        if self.retry_initial_ms == 0 || self.retry_max_ms < self.retry_initial_ms {
            return Err((
                "llm_provider.retry_initial_ms",
                "must be > 0 and at most retry_max_ms".into(),
            ));
        }
        if self.breaker_failures == 0 || self.breaker_open_secs == 0 {
            return Err((
                "llm_provider.breaker_failures",
                "breaker_failures and breaker_open_secs must be > 0".into(),
            ));
        }
        let max_pause = crate::engine::MAX_RETRY_AFTER.as_secs() / 60;
        if !(1..=max_pause).contains(&self.budgets.pause_minutes) {
            return Err((
                "llm_provider.budgets.pause_minutes",
                format!("must be 1..={max_pause} (the engine's cap on a retry delay)"),
            ));
        }
        for p in self.prices.values() {
            if !(p.input_per_1k >= 0.0 && p.output_per_1k >= 0.0) {
                return Err(("llm_provider.prices", "prices must be >= 0".into()));
            }
        }
        if !(1..=64 * 1024).contains(&self.max_response_kb) {
            return Err(("llm_provider.max_response_kb", "must be 1..=65536".into()));
        }
        Ok(())
    }
}

/// A secret (an API key): `Debug`, `Display` and `Serialize` print `[redacted]`; only
/// [`Secret::expose`] gives the value, for the one header that carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Replaces every part of `text` (e.g. a provider's error body) that is a piece of the
    /// secret of [`Secret::SCRUB_MIN`] or more bytes (a provider may echo a key shortened or
    /// cut, `sk-…abcd1234`), or the whole secret when it is shorter than that (and at least
    /// 4 bytes). Each overlapping run of such pieces becomes one `[redacted]`.
    pub fn scrub(&self, text: &str) -> String {
        let key = self.0.as_bytes();
        if key.len() < Self::SCRUB_MIN {
            if key.len() < 4 {
                return text.to_string();
            }
            return text.replace(&self.0, "[redacted]");
        }
        let windows: std::collections::HashSet<&[u8]> = key.windows(Self::SCRUB_MIN).collect();
        let t = text.as_bytes();
        // Byte ranges to redact, merged as they are found (starts only grow).
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for (i, w) in t.windows(Self::SCRUB_MIN).enumerate() {
            if !windows.contains(w) {
                continue;
            }
            let (start, end) = (i, i + Self::SCRUB_MIN);
            match ranges.last_mut() {
                Some(last) if start <= last.1 => last.1 = end,
                _ => ranges.push((start, end)),
            }
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (mut start, mut end) in ranges {
            // A non-ASCII secret could match inside a character: widen to whole characters.
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            while !text.is_char_boundary(end) {
                end += 1;
            }
            if start < at {
                start = at;
            }
            out.push_str(&text[at..start]);
            out.push_str("[redacted]");
            at = end.max(at);
        }
        out.push_str(&text[at..]);
        out
    }

    /// The shortest piece of a secret that [`Secret::scrub`] removes.
    pub const SCRUB_MIN: usize = 8;
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// Read from a configuration file as a plain string (never written back: it serializes
/// redacted).
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("sk-sentinel-123");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "sk-sentinel-123");
        assert_eq!(s.scrub("bad key sk-sentinel-123!"), "bad key [redacted]!");
    }

    #[test]
    fn scrub_removes_any_piece_of_eight_or_more_bytes() {
        let s = Secret::new("sk-proj-0123456789abcdefXYZ");
        // Shortened as providers echo it, cut at both ends, and twice.
        assert_eq!(
            s.scrub("Incorrect API key provided: sk-proj-****************cdefXYZ."),
            "Incorrect API key provided: [redacted]****************cdefXYZ."
        );
        assert_eq!(s.scrub("key 3456789abc is bad"), "key [redacted] is bad");
        assert_eq!(
            s.scrub("a 0123456789 b 89abcdefXY c"),
            "a [redacted] b [redacted] c"
        );
        // Seven bytes of it are not enough to be taken for it.
        assert_eq!(s.scrub("id 0123456"), "id 0123456");
        // Non-ASCII text around a match stays valid UTF-8.
        assert_eq!(s.scrub("é0123456789é"), "é[redacted]é");
        let u = Secret::new("clé-secrète-très-longue");
        assert_eq!(u.scrub("x secrète-très y"), "x [redacted] y");
    }

    #[test]
    fn guide_names_parse() {
        let c: LlmProviderConfig = toml::from_str(
            "provider = \"Azure\"\nfallback_provider = \"OpenAI\"\n\
             [azure]\nbase_url = \"https://x.openai.azure.com\"\napi_version = \"2024-10-21\"\n\
             [model_selection]\nSimpleTask = \"gpt-35-turbo\"\n",
        )
        .unwrap();
        assert_eq!(c.provider, ProviderKind::Azure);
        assert_eq!(c.fallback_provider, Some(ProviderKind::Openai));
        assert_eq!(c.model_selection.simple_task, "gpt-35-turbo");
        assert_eq!(c.model_selection.complex_task, "gpt-4o");
        c.validate().unwrap();
        assert_eq!("CodeGeneration".parse(), Ok(TaskClass::CodeGeneration));
        assert!("Huge".parse::<TaskClass>().is_err());
    }

    /// The README's Anthropic example.
    #[test]
    fn anthropic_parses_as_primary_or_fallback() {
        let c: LlmProviderConfig = toml::from_str(
            r#"
provider = "anthropic"
fallback_provider = "openai"
model_selection = { simple_task = "claude-haiku-4-5", complex_task = "claude-sonnet-4-5", code_generation = "claude-sonnet-4-5" }
fallback_model_selection = { simple_task = "gpt-4o-mini", complex_task = "gpt-4o", code_generation = "gpt-4o" }
limits = { "anthropic/claude-sonnet-4-5" = { requestsPerMinute = 50, tokensPerMinute = 30000, burstTokens = 8000 } }
prices = { "claude-sonnet-4-5" = { input_per_1k = 0.003, output_per_1k = 0.015 } }
[anthropic]
api_key_env = "ANTHROPIC_API_KEY"
[openai]
api_key_env = "OPENAI_API_KEY"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.provider, ProviderKind::Anthropic);
        assert_eq!(c.provider.as_str(), "anthropic");
        assert!(c.endpoint(ProviderKind::Anthropic).is_some());
        let c: LlmProviderConfig =
            toml::from_str("provider = \"OpenAI\"\nfallback_provider = \"Anthropic\"\n").unwrap();
        assert_eq!(c.fallback_provider, Some(ProviderKind::Anthropic));
        let bad: LlmProviderConfig = toml::from_str(
            "provider = \"anthropic\"\n[anthropic]\nbase_url = \"api.anthropic.com\"\n",
        )
        .unwrap();
        assert_eq!(bad.validate().unwrap_err().0, "llm_provider.base_url");
    }

    #[test]
    fn the_readme_example_parses() {
        let c: LlmProviderConfig = toml::from_str(
            r#"
provider = "azure"
fallback_provider = "openai"
default_max_tokens = 2000
max_tokens_by_step = { ValidateRequirements = 500 }
temperature = 0.0
model_selection = { simple_task = "gpt-4o-mini", complex_task = "gpt-4o", code_generation = "gpt-4o" }
llm_caching = { enabled = true, ttl_minutes = 60 }
limits = { "azure/gpt-4o" = { requestsPerMinute = 60, tokensPerMinute = 90000, burstRequests = 5, burstTokens = 8000 } }
budgets = { max_tokens_per_process = 200000, action = "fail", process_types = { Benchmark = { max_tokens_per_day = 5000000, action = "pause" } } }
prices = { "gpt-4o" = { input_per_1k = 0.0025, output_per_1k = 0.01 } }
[azure]
base_url = "https://myresource.openai.azure.com"
api_version = "2024-10-21"
deployments = { "gpt-4o" = "prod-gpt4o" }
api_key_file = "/run/secrets/azure-openai"
[openai]
api_key_env = "OPENAI_API_KEY"
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits["azure/gpt-4o"].tokens_per_minute, 90_000);
        assert_eq!(
            c.budgets.process_types["Benchmark"].action,
            Some(BudgetAction::Pause)
        );
    }

    #[test]
    fn validation_names_the_field() {
        let c = LlmProviderConfig {
            provider: ProviderKind::OpenaiCompatible,
            ..Default::default()
        };
        assert_eq!(
            c.validate().unwrap_err().0,
            "llm_provider.openai_compatible.base_url"
        );
        let c = LlmProviderConfig {
            temperature: 3.0,
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().0, "llm_provider.temperature");
        let mut c = LlmProviderConfig::default();
        c.limits.insert(
            "gpt-4o".into(),
            LimitSpec {
                requests_per_minute: 1,
                tokens_per_minute: 0,
                burst_requests: 0,
                burst_tokens: 0,
                ..LimitSpec::default()
            },
        );
        assert_eq!(c.validate().unwrap_err().0, "llm_provider.limits");
    }

    #[test]
    fn bucket_shares_parse_as_the_readme_writes_them_and_are_validated() {
        let c: LlmProviderConfig = toml::from_str(
            r#"
provider = "openai"
[limits."openai/gpt-4o"]
requestsPerMinute = 60
shares = { Deployment = { weight = 3, min_rpm = 10 }, Benchmark = { weight = 1, max_rpm = 40 }, "*" = { weight = 2 } }
tenant_shares = { acme = { weight = 2 } }
share_window_ms = 5000
"#,
        )
        .unwrap();
        c.validate().unwrap();
        let spec = &c.limits["openai/gpt-4o"];
        assert_eq!(spec.shares["Deployment"].min_rpm, 10);
        assert_eq!(spec.shares["Benchmark"].max_rpm, 40);
        assert_eq!(spec.shares["*"].weight, 2);
        assert_eq!(spec.tenant_shares["acme"].weight, 2);
        assert_eq!(spec.share_window(), std::time::Duration::from_secs(5));
        // Shown camelCased, map keys as written.
        let v = serde_json::to_value(spec).unwrap();
        assert_eq!(v["shares"]["Deployment"]["minRpm"], 10);
        assert_eq!(v["tenantShares"]["acme"]["weight"], 2);
        // Reserved minimums above the bucket's rate are refused at load, naming the bucket.
        let mut bad = c.clone();
        bad.limits
            .get_mut("openai/gpt-4o")
            .unwrap()
            .shares
            .get_mut("Deployment")
            .unwrap()
            .min_rpm = 100;
        let (field, msg) = bad.validate().unwrap_err();
        assert_eq!(field, "llm_provider.limits");
        assert!(msg.starts_with("openai/gpt-4o: shares"), "{msg}");
        // A misspelt share field is an error.
        let e = toml::from_str::<LlmProviderConfig>(
            r#"
provider = "openai"
limits = { "openai/gpt-4o" = { requestsPerMinute = 60, shares = { A = { weigth = 2 } } } }
"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("weigth"), "{e}");
    }

    #[test]
    fn a_limits_entry_may_omit_fields_which_mean_unlimited() {
        let c: LlmProviderConfig = toml::from_str(
            r#"
provider = "openai"
limits = { "openai/gpt-4o" = { requestsPerMinute = 60 }, "openai/o1" = {} }
"#,
        )
        .unwrap();
        c.validate().unwrap();
        let spec = &c.limits["openai/gpt-4o"];
        assert_eq!(spec.requests_per_minute, 60);
        assert_eq!(
            (
                spec.tokens_per_minute,
                spec.burst_requests,
                spec.burst_tokens
            ),
            (0, 0, 0)
        );
        assert!(c.limits["openai/o1"].is_unlimited());
        // A misspelt field is an error, not a silently unlimited bucket.
        let e = toml::from_str::<LlmProviderConfig>(
            r#"
provider = "openai"
limits = { "openai/gpt-4o" = { requests_per_minute = 60 } }
"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("requests_per_minute"), "{e}");
    }
}
