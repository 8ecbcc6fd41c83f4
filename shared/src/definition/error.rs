//! Why a definition file was rejected. Every variant names the file (and the step when
//! there is one); callers match on the variant, never on the message.

use std::path::PathBuf;

/// A definition file (or directory) that cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DefinitionError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("no process definition files (*.toml, *.yaml, *.yml) in {}", dir.display())]
    EmptyDir { dir: PathBuf },

    #[error("{file}: parse error{}: {message}", at_line(line))]
    Parse {
        file: String,
        line: Option<usize>,
        message: String,
    },

    #[error("{file}: invalid {what} name `{name}`: must match [A-Za-z][A-Za-z0-9_-]{{0,63}}")]
    InvalidName {
        file: String,
        /// `process` or `step`.
        what: &'static str,
        name: String,
    },

    #[error("{file}: version must be at least 1")]
    InvalidVersion { file: String },

    #[error("{file}: a process needs at least one step")]
    NoSteps { file: String },

    #[error("{file}: {count} steps, at most {max} allowed")]
    TooManySteps {
        file: String,
        count: usize,
        max: usize,
    },

    #[error("{file}: step `{step}` is declared twice")]
    DuplicateStep { file: String, step: String },

    #[error("{file}: step `{step}` has unknown kind `{kind}` (known kinds: {})", known.join(", "))]
    UnknownKind {
        file: String,
        step: String,
        kind: String,
        known: Vec<String>,
    },

    /// An `llm` step where the config has no `[llm_provider]` section: the `llm` kind exists
    /// only with a provider to call.
    #[error(
        "{file}: process `{process}` step `{step}` is an `llm` step, which needs an [llm_provider] section in the config (provider, endpoint and key; see the README's LLM section), or run `honua dev --mock-llm` to use the built-in mock provider"
    )]
    NeedsLlmProvider {
        file: String,
        process: String,
        step: String,
    },

    #[error(
        "{file}: step `{step}`: its template reads `steps.{read}`, but `{read}` is not a step that runs before `{step}`"
    )]
    TemplateStep {
        file: String,
        step: String,
        read: String,
    },

    #[error("{file}: step `{step}`: invalid config for kind `{kind}`: {message}")]
    InvalidConfig {
        file: String,
        step: String,
        kind: String,
        message: String,
    },

    #[error(
        "{file}{}: invalid duration `{value}` for `{field}`: {message}",
        in_step(step)
    )]
    BadDuration {
        file: String,
        step: Option<String>,
        field: String,
        value: String,
        message: String,
    },

    #[error("{file}{}: `{field}` {message}", in_step(step))]
    OutOfBounds {
        file: String,
        step: Option<String>,
        field: String,
        message: String,
    },

    #[error("{file}: step `{step}` sets both `next` and `on.ok`")]
    NextAndOnOk { file: String, step: String },

    #[error(
        "{file}: step `{step}`: invalid outcome name `{outcome}`: must be ok, failed or match [a-z][a-z0-9_]{{0,31}}"
    )]
    InvalidOutcome {
        file: String,
        step: String,
        outcome: String,
    },

    #[error("{file}{}: `{field}` is an empty list", in_step(step))]
    EmptyTargets {
        file: String,
        step: Option<String>,
        field: String,
    },

    #[error("{file}{}: `{field}` names `{target}` twice", in_step(step))]
    DuplicateTarget {
        file: String,
        step: Option<String>,
        field: String,
        target: String,
    },

    #[error("{file}: step `{step}` routes outcome `{outcome}` to unknown step `{target}`")]
    DanglingEdge {
        file: String,
        step: String,
        outcome: String,
        target: String,
    },

    #[error("{file}: start names unknown step `{step}`")]
    UnknownStart { file: String, step: String },

    #[error("{file}: step `{step}` is not reachable from the start steps")]
    Unreachable { file: String, step: String },

    #[error("{file}: cycle {} has no step with max_visits", cycle(steps))]
    UnboundedCycle { file: String, steps: Vec<String> },

    #[error(
        "{file}: step `{step}` joins all its inputs but `{input}` is only reached after `{step}` itself; use join = \"any\""
    )]
    JoinOnLoop {
        file: String,
        step: String,
        input: String,
    },

    #[error("process `{name}` version {version} is defined in both {first} and {second}")]
    DuplicateDefinition {
        name: String,
        version: u32,
        first: String,
        second: String,
    },
}

fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

fn in_step(step: &Option<String>) -> String {
    step.as_ref()
        .map(|s| format!(": step `{s}`"))
        .unwrap_or_default()
}

/// `A -> B -> A`.
fn cycle(steps: &[String]) -> String {
    let mut s = steps.join(" -> ");
    if let Some(first) = steps.first() {
        s.push_str(" -> ");
        s.push_str(first);
    }
    s
}
