//! Process definitions: named, versioned graphs of steps declared in TOML or YAML files.
//!
//! A file declares one process type (both formats share one schema, unknown fields are
//! rejected):
//!
//! ```toml
//! name = "Deployment"          # [A-Za-z][A-Za-z0-9_-]{0,63}
//! version = 1                  # >= 1
//! description = "..."          # optional
//! timeout = "3h"               # optional process timeout
//! timeouts_while_paused = "stop" # "stop" (default): a paused process's deadline, durable
//!                              # timers and step timeouts wait; "count": wall-clock
//! start = "Validate"           # optional step name or list; default: the first step
//!
//! [defaults]                   # optional, for steps that do not set them
//! timeout = "5m"
//! retry = { max_attempts = 3, initial_backoff = "1s", max_backoff = "1m", multiplier = 2.0 }
//!
//! [[steps]]
//! name = "Validate"            # unique within the process, same rule as process names
//! kind = "noop"                # a kind known to the [`KindRegistry`]
//! timeout = "30s"              # optional
//! retry = { max_attempts = 5 } # optional, any subset of the fields
//! next = "Review"              # optional shorthand for `on.ok` (name or list)
//! join = "all"                 # "all" (default) | "any": how several inbound edges fire it
//! max_visits = 3               # optional bound, required somewhere on every cycle
//! config = { outcome = "ok" }  # kind-specific, checked by the kind's validator
//!
//! [steps.on]                   # outcome -> step name or list (a list fans out)
//! failed = "Rollback"
//! ```
//!
//! A step ends with an outcome (`ok`, `failed` or a named event `[a-z][a-z0-9_]{0,31}`);
//! an outcome without a route ends that branch. Loading ([`DefinitionSet::load_dir`],
//! [`ProcessDefinition::parse`]) validates everything once and stops at the first error,
//! which names the file and the step ([`DefinitionError`]). The loaded model is immutable
//! and shared as `Arc<ProcessDefinition>`.

mod error;
mod kinds;
pub mod llm;
mod load;
mod retry;
mod set;

pub use error::DefinitionError;
pub use kinds::{Executor, KindRegistry, KindValidator, LLM_KIND};
pub use load::Format;
pub use retry::RetryPolicy;
pub use set::DefinitionSet;

use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::time::Duration;

/// Most steps a process type may declare.
pub const MAX_STEPS: usize = 256;
/// Longest step or process timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Step timeout when neither the step nor `[defaults]` sets one.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Largest `max_visits` a step may declare.
pub const MAX_VISITS_LIMIT: u32 = 10_000;

/// A validated process type: its steps and the routes between them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessDefinition {
    pub name: String,
    pub version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Process timeout declared by the file, if any.
    #[serde(serialize_with = "ser_opt_duration")]
    pub timeout: Option<Duration>,
    /// Whether the process timeout, durable timers and step timeouts wait while the
    /// process is paused.
    pub timeouts_while_paused: PausedTimeouts,
    /// Steps that run when the process starts (several run in parallel).
    pub start: Vec<String>,
    /// Steps in declaration order.
    pub steps: Vec<StepDef>,
    /// Step name -> index in `steps`.
    #[serde(skip)]
    index: BTreeMap<String, usize>,
    /// Step name -> distinct steps with an edge into it, in declaration order.
    #[serde(skip)]
    inbound: BTreeMap<String, Vec<String>>,
}

impl ProcessDefinition {
    /// The step called `name`.
    pub fn step(&self, name: &str) -> Option<&StepDef> {
        self.index.get(name).map(|&i| &self.steps[i])
    }

    /// The distinct steps with any edge into `name` (empty for start-only steps and
    /// unknown names), in declaration order.
    pub fn inbound(&self, name: &str) -> &[String] {
        self.inbound.get(name).map_or(&[], Vec::as_slice)
    }

    /// The steps that `outcome` of `step` routes to; empty when that ends the branch.
    pub fn targets(&self, step: &str, outcome: &str) -> &[String] {
        self.step(step)
            .and_then(|s| s.routes.get(outcome))
            .map_or(&[], Vec::as_slice)
    }

    /// Builds the lookup tables; `steps` must already be validated.
    fn new(
        name: String,
        version: u32,
        description: Option<String>,
        timeout: Option<Duration>,
        start: Vec<String>,
        steps: Vec<StepDef>,
    ) -> Self {
        let index = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let mut inbound: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for s in &steps {
            for target in s.routes.values().flatten() {
                let sources = inbound.entry(target.clone()).or_default();
                if !sources.contains(&s.name) {
                    sources.push(s.name.clone());
                }
            }
        }
        Self {
            name,
            version,
            description,
            timeout,
            timeouts_while_paused: PausedTimeouts::default(),
            start,
            steps,
            index,
            inbound,
        }
    }
}

/// What a pause does to a process's clocks (`timeouts_while_paused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PausedTimeouts {
    /// The deadline, durable timers and step timeouts stop while paused and go on with the
    /// time they had left when the process resumes.
    #[default]
    Stop,
    /// They keep counting (wall-clock): a timer may fire and a deadline expire while paused.
    Count,
}

/// One step of a process type, with defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDef {
    pub name: String,
    pub kind: String,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Outcome -> target steps (`next` is stored as `ok`). Never holds an empty list.
    pub routes: BTreeMap<String, Vec<String>>,
    pub join: Join,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_visits: Option<u32>,
    /// Kind-specific settings; always a JSON object (`{}` when the file has none).
    pub config: serde_json::Value,
}

/// How a step with several inbound edges fires.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Join {
    /// Waits until every inbound step has routed to it.
    #[default]
    All,
    /// Fires on each arrival.
    Any,
}

/// `true` for a valid process or step name: `[A-Za-z][A-Za-z0-9_-]{0,63}`.
pub fn is_valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `true` for a valid outcome name: `[a-z][a-z0-9_]{0,31}` (includes `ok` and `failed`).
pub fn is_valid_outcome(s: &str) -> bool {
    let mut chars = s.chars();
    s.len() <= 32
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Durations are shown in humantime form (`"5m"`, `"200ms"`).
fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

fn ser_opt_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_outcomes() {
        assert!(is_valid_name("Deploy_infra-2"));
        assert!(is_valid_name(&"a".repeat(64)));
        assert!(!is_valid_name(&"a".repeat(65)));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("2fast"));
        assert!(!is_valid_name("has space"));
        assert!(!is_valid_name("ünï"));
        assert!(is_valid_outcome("ok"));
        assert!(is_valid_outcome("failed"));
        assert!(is_valid_outcome("needs_review2"));
        assert!(!is_valid_outcome("Rejected"));
        assert!(!is_valid_outcome("_x"));
        assert!(!is_valid_outcome(&"a".repeat(33)));
    }
}
