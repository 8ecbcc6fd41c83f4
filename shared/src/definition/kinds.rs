//! Step kinds: which exist, who runs them and how their `config` is validated.

use super::{MAX_TIMEOUT, is_valid_name, is_valid_outcome};
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// The kind of LLM steps: registered only when the config has an `[llm_provider]`.
pub const LLM_KIND: &str = "llm";

/// Checks a step's `config` (always a JSON object); the message names the bad key.
pub type KindValidator = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// Who runs steps of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// A worker claims the job from the job stream.
    Worker,
    /// The scheduler handles it itself (timers, signals).
    Scheduler,
}

#[derive(Clone)]
struct Kind {
    executor: Executor,
    validator: KindValidator,
}

/// The step kinds definitions may use. Cheap to clone.
#[derive(Clone, Default)]
pub struct KindRegistry {
    kinds: BTreeMap<String, Kind>,
}

impl KindRegistry {
    /// A registry with no kinds.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in kinds: `noop`, `fail`, `http` (workers) and `sleep`, `approval`
    /// (scheduler).
    pub fn builtin() -> Self {
        let mut r = Self::new();
        r.register("noop", Executor::Worker, validate_noop)
            .register("fail", Executor::Worker, validate_fail)
            .register("http", Executor::Worker, validate_http)
            .register("sleep", Executor::Scheduler, validate_sleep)
            .register("approval", Executor::Scheduler, validate_approval);
        r
    }

    /// The kinds a deployment configured by `cfg` may use, without constructing any
    /// handler: the built-ins, `llm` when `[llm_provider]` is set (its config checked by
    /// [`super::llm::parse_spec`]), and each of `custom_step_kinds` as a worker kind whose
    /// config only the worker that implements it checks.
    pub fn for_config(cfg: &crate::config::Config) -> Self {
        let mut r = Self::builtin();
        if cfg.llm_provider.is_some() {
            r.register(LLM_KIND, Executor::Worker, |c: &Value| {
                super::llm::parse_spec(c).map(|_| ())
            });
        }
        for k in &cfg.custom_step_kinds {
            if !r.contains(k) {
                r.register(k, Executor::Worker, |_: &Value| Ok(()));
            }
        }
        r
    }

    /// Adds kind `name`, replacing any kind of that name.
    pub fn register(
        &mut self,
        name: impl Into<String>,
        executor: Executor,
        validator: impl Fn(&Value) -> Result<(), String> + Send + Sync + 'static,
    ) -> &mut Self {
        self.kinds.insert(
            name.into(),
            Kind {
                executor,
                validator: Arc::new(validator),
            },
        );
        self
    }

    /// Who runs `kind`; `None` for an unknown kind.
    pub fn executor(&self, kind: &str) -> Option<Executor> {
        self.kinds.get(kind).map(|k| k.executor)
    }

    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// Runs the validator of `kind` on `config`; an unknown kind is an error too.
    pub fn validate(&self, kind: &str, config: &Value) -> Result<(), String> {
        match self.kinds.get(kind) {
            Some(k) => (k.validator)(config),
            None => Err(format!("unknown step kind `{kind}`")),
        }
    }

    /// Known kind names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }
}

impl fmt::Debug for KindRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.kinds.iter().map(|(n, k)| (n, k.executor)))
            .finish()
    }
}

/// The config as an object with only `allowed` keys.
fn object<'a>(config: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, String> {
    let map = config
        .as_object()
        .ok_or_else(|| "config must be a table".to_string())?;
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) if allowed.is_empty() => Err(format!("unknown key `{k}` (this kind takes none)")),
        Some(k) => Err(format!(
            "unknown key `{k}` (allowed: {})",
            allowed.join(", ")
        )),
        None => Ok(map),
    }
}

fn opt_str<'a>(map: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{key}` must be a string")),
    }
}

fn duration(map: &Map<String, Value>, key: &str, allow_zero: bool) -> Result<(), String> {
    let Some(s) = opt_str(map, key)? else {
        return Ok(());
    };
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("`{key}`: invalid duration `{s}`: {e}"))?;
    if (d.is_zero() && !allow_zero) || d > MAX_TIMEOUT {
        return Err(format!(
            "`{key}` must be {} and at most 7d",
            if allow_zero {
                "at least 0s"
            } else {
                "above 0s"
            }
        ));
    }
    Ok(())
}

fn validate_noop(config: &Value) -> Result<(), String> {
    let map = object(config, &["outcome", "output"])?;
    match opt_str(map, "outcome")? {
        Some(o) if !is_valid_outcome(o) => Err(format!(
            "`outcome` `{o}` must be ok, failed or match [a-z][a-z0-9_]{{0,31}}"
        )),
        _ => Ok(()),
    }
}

fn validate_fail(config: &Value) -> Result<(), String> {
    let map = object(config, &["message", "permanent"])?;
    opt_str(map, "message")?;
    match map.get("permanent") {
        None | Some(Value::Bool(_)) => Ok(()),
        Some(_) => Err("`permanent` must be a boolean".into()),
    }
}

fn validate_sleep(config: &Value) -> Result<(), String> {
    let map = object(config, &["duration"])?;
    if !map.contains_key("duration") {
        return Err("`duration` is required".into());
    }
    duration(map, "duration", true)
}

fn validate_approval(config: &Value) -> Result<(), String> {
    let map = object(config, &["signal"])?;
    match opt_str(map, "signal")? {
        Some(s) if !is_valid_name(s) => Err(format!(
            "`signal` `{s}` must match [A-Za-z][A-Za-z0-9_-]{{0,63}}"
        )),
        _ => Ok(()),
    }
}

fn validate_http(config: &Value) -> Result<(), String> {
    let map = object(config, &["url", "timeout", "max_response_kb"])?;
    let url = opt_str(map, "url")?.ok_or("`url` is required")?;
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    if rest.is_none_or(str::is_empty) {
        return Err(format!("`url` `{url}` must start with http:// or https://"));
    }
    duration(map, "timeout", false)?;
    match map.get("max_response_kb") {
        None => Ok(()),
        Some(v) if v.as_u64().is_some_and(|k| (1..=65536).contains(&k)) => Ok(()),
        Some(_) => Err("`max_response_kb` must be an integer in 1..=65536".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(kind: &str, config: Value) {
        let r = KindRegistry::builtin();
        assert_eq!(r.validate(kind, &config), Ok(()), "{kind} {config}");
    }

    fn bad(kind: &str, config: Value) {
        let r = KindRegistry::builtin();
        assert!(r.validate(kind, &config).is_err(), "{kind} {config}");
    }

    #[test]
    fn builtin_kinds_and_executors() {
        let r = KindRegistry::builtin();
        assert_eq!(
            r.names().collect::<Vec<_>>(),
            ["approval", "fail", "http", "noop", "sleep"]
        );
        assert_eq!(r.executor("noop"), Some(Executor::Worker));
        assert_eq!(r.executor("fail"), Some(Executor::Worker));
        assert_eq!(r.executor("http"), Some(Executor::Worker));
        assert_eq!(r.executor("sleep"), Some(Executor::Scheduler));
        assert_eq!(r.executor("approval"), Some(Executor::Scheduler));
        assert_eq!(r.executor("llm"), None);
        assert!(r.validate("llm", &json!({})).is_err());
    }

    #[test]
    fn builtin_validators() {
        ok("noop", json!({}));
        ok(
            "noop",
            json!({"outcome": "rejected", "output": {"a": [1, 2]}}),
        );
        bad("noop", json!({"outcome": "Bad Outcome"}));
        bad("noop", json!({"outcome": 3}));
        bad("noop", json!({"extra": 1}));
        bad("noop", json!("not a table"));
        ok("fail", json!({"message": "boom", "permanent": true}));
        bad("fail", json!({"permanent": "yes"}));
        bad("fail", json!({"message": 1}));
        ok("sleep", json!({"duration": "200ms"}));
        bad("sleep", json!({}));
        bad("sleep", json!({"duration": "soon"}));
        bad("sleep", json!({"duration": "8days"}));
        ok("approval", json!({}));
        ok("approval", json!({"signal": "review"}));
        bad("approval", json!({"signal": "not valid"}));
        ok(
            "http",
            json!({"url": "https://example.com/x", "timeout": "10s", "max_response_kb": 64}),
        );
        ok("http", json!({"url": "http://localhost:8080"}));
        bad("http", json!({}));
        bad("http", json!({"url": "ftp://example.com"}));
        bad("http", json!({"url": "https://"}));
        bad("http", json!({"url": "https://x", "timeout": "0s"}));
        bad("http", json!({"url": "https://x", "max_response_kb": 0}));
        bad(
            "http",
            json!({"url": "https://x", "max_response_kb": 65537}),
        );
        bad("http", json!({"url": "https://x", "max_response_kb": 1.5}));
        bad("http", json!({"url": "https://x", "method": "GET"}));
    }

    #[test]
    fn custom_kinds_register_and_replace() {
        let mut r = KindRegistry::builtin();
        r.register("llm", Executor::Worker, |c: &Value| {
            if c.get("model").is_some() {
                Ok(())
            } else {
                Err("`model` is required".into())
            }
        });
        assert_eq!(r.executor("llm"), Some(Executor::Worker));
        assert!(r.validate("llm", &json!({"model": "m"})).is_ok());
        assert!(r.validate("llm", &json!({})).is_err());
        type BoxedValidator = Box<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;
        let boxed: BoxedValidator = Box::new(|_| Ok(()));
        r.register(String::from("noop"), Executor::Scheduler, boxed);
        assert_eq!(r.executor("noop"), Some(Executor::Scheduler));
        assert!(r.validate("noop", &json!({"anything": 1})).is_ok());
        assert!(format!("{r:?}").contains("llm"));
    }
}
