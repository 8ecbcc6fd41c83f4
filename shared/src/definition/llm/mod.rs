//! The `llm` step kind's `config`, parsed and checked when definitions load (by the
//! scheduler and the worker alike) and read by the worker's `llm` handler.
//!
//! ```toml
//! [[steps]]
//! name = "GenerateInfrastructureCode"
//! kind = "llm"
//! config = { task_class = "CodeGeneration",            # or model = "gpt-4o"
//!            system = "You write Terraform.",
//!            prompt = "Cloud {{input.cloud}}; plan: {{steps.Plan.text}}",
//!            max_tokens = 4000, temperature = 0.0, stream = true, timeout = "5m",
//!            schema = { type = "object", required = ["code"] },  # structured output
//!            cache = true, fallback_model = "gpt-4o-mini" }
//! ```

pub mod schema;
pub mod template;

use crate::llm_config::TaskClass;
use serde_json::Value;
use std::time::Duration;
use template::Template;

/// A step's parsed `config`.
#[derive(Debug, Clone)]
pub struct StepSpec {
    pub model: Option<String>,
    pub task_class: TaskClass,
    pub system: Option<Template>,
    pub prompt: Template,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub stream: Option<bool>,
    pub schema: Option<Value>,
    pub cache: Option<bool>,
    pub fallback_model: Option<String>,
    pub timeout: Option<Duration>,
}

const KEYS: &[&str] = &[
    "model",
    "task_class",
    "system",
    "prompt",
    "max_tokens",
    "temperature",
    "stream",
    "schema",
    "cache",
    "fallback_model",
    "timeout",
];

/// Parses and checks a step's config; the message names the field.
pub fn parse_spec(c: &Value) -> Result<StepSpec, String> {
    let obj = c
        .as_object()
        .ok_or("llm step config must be a table with at least `prompt`")?;
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown llm config field {k:?} (expected one of {})",
            KEYS.join(", ")
        ));
    }
    let str_field = |k: &str| -> Result<Option<String>, String> {
        match obj.get(k) {
            None => Ok(None),
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(format!("llm config `{k}` must be a non-empty string")),
        }
    };
    let prompt = str_field("prompt")?.ok_or("llm config needs `prompt` (the user message)")?;
    let prompt = Template::parse(&prompt).map_err(|e| format!("llm config `prompt`: {e}"))?;
    let system = str_field("system")?
        .map(|s| Template::parse(&s).map_err(|e| format!("llm config `system`: {e}")))
        .transpose()?;
    let model = str_field("model")?;
    let task_class = match str_field("task_class")? {
        Some(t) if model.is_some() => {
            return Err(format!(
                "llm config sets both `model` and `task_class` ({t}): choose one"
            ));
        }
        Some(t) => t.parse()?,
        None => TaskClass::ComplexTask,
    };
    let max_tokens = match obj.get("max_tokens") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| (1..=1_000_000).contains(n))
                .ok_or("llm config `max_tokens` must be 1..=1000000")? as u32,
        ),
    };
    let temperature = match obj.get("temperature") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|t| (0.0..=2.0).contains(t))
                .ok_or("llm config `temperature` must be 0.0..=2.0")? as f32,
        ),
    };
    let bool_field = |k: &str| -> Result<Option<bool>, String> {
        match obj.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(format!("llm config `{k}` must be true or false")),
        }
    };
    let schema = match obj.get("schema") {
        None => None,
        Some(s) => {
            schema::check_schema(s).map_err(|e| format!("llm config `schema`: {e}"))?;
            Some(s.clone())
        }
    };
    let timeout = str_field("timeout")?
        .map(|t| {
            humantime::parse_duration(&t)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("llm config `timeout` {t:?} is not a duration"))
        })
        .transpose()?;
    Ok(StepSpec {
        model,
        task_class,
        system,
        prompt,
        max_tokens,
        temperature,
        stream: bool_field("stream")?,
        schema,
        cache: bool_field("cache")?,
        fallback_model: str_field("fallback_model")?,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spec_validation_names_the_field() {
        let ok = parse_spec(&json!({
            "task_class": "SimpleTask",
            "system": "be brief",
            "prompt": "hi {{input.who}}",
            "max_tokens": 50,
            "schema": {"type": "object"},
            "timeout": "30s"
        }))
        .unwrap();
        assert_eq!(ok.task_class, TaskClass::SimpleTask);
        assert_eq!(ok.timeout, Some(Duration::from_secs(30)));
        for (bad, needle) in [
            (json!({}), "`prompt`"),
            (
                json!({"prompt": "x", "model": "m", "task_class": "SimpleTask"}),
                "both",
            ),
            (json!({"prompt": "x", "task_class": "Huge"}), "task_class"),
            (json!({"prompt": "{{secrets.x}}"}), "prompt"),
            (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
            (json!({"prompt": "x", "temperatur": 1}), "temperatur"),
            (json!({"prompt": "x", "schema": {"oneOf": []}}), "schema"),
            (json!({"prompt": "x", "timeout": "soon"}), "timeout"),
        ] {
            let e = parse_spec(&bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
