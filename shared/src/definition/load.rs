//! Parsing a definition file and turning it into a validated [`ProcessDefinition`].

use super::{
    DEFAULT_STEP_TIMEOUT, DefinitionError, Join, KindRegistry, LLM_KIND, MAX_STEPS, MAX_TIMEOUT,
    MAX_VISITS_LIMIT, ProcessDefinition, RetryPolicy, StepDef, is_valid_name, is_valid_outcome,
};
use crate::status::outcome;
use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// The syntax of a definition file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Yaml,
}

impl Format {
    /// By extension: `.toml`, `.yaml` or `.yml` (any case).
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "toml" => Some(Format::Toml),
            "yaml" | "yml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcess {
    name: String,
    version: u32,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    timeouts_while_paused: super::PausedTimeouts,
    #[serde(default)]
    start: Option<Targets>,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retry: Option<RawRetry>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    initial_backoff: Option<String>,
    #[serde(default)]
    max_backoff: Option<String>,
    #[serde(default)]
    multiplier: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    kind: String,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retry: Option<RawRetry>,
    #[serde(default)]
    next: Option<Targets>,
    #[serde(default)]
    join: Option<Join>,
    #[serde(default)]
    max_visits: Option<u32>,
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(default)]
    on: BTreeMap<String, Targets>,
}

/// A step name or a list of step names.
struct Targets(Vec<String>);

impl<'de> Deserialize<'de> for Targets {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Targets;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a step name or a list of step names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Targets, E> {
                Ok(Targets(vec![v.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Targets, A::Error> {
                let mut names = Vec::new();
                while let Some(n) = seq.next_element::<String>()? {
                    names.push(n);
                }
                Ok(Targets(names))
            }
        }
        d.deserialize_any(V)
    }
}

impl ProcessDefinition {
    /// Parses and validates one definition. `source` names it in errors (a file path).
    pub fn parse(
        text: &str,
        format: Format,
        source: &str,
        kinds: &KindRegistry,
    ) -> Result<ProcessDefinition, DefinitionError> {
        let raw = parse_raw(text, format, source)?;
        Builder { file: source }.build(raw, kinds)
    }
}

fn parse_raw(text: &str, format: Format, source: &str) -> Result<RawProcess, DefinitionError> {
    match format {
        Format::Toml => toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| {
                let end = span.start.min(text.len());
                1 + text.as_bytes()[..end]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
            });
            DefinitionError::Parse {
                file: source.to_string(),
                line,
                message: e.message().trim_end().to_string(),
            }
        }),
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| {
            let location = e.location();
            let mut message = e.to_string();
            if let Some(loc) = &location {
                let suffix = format!(" at line {} column {}", loc.line(), loc.column());
                if let Some(stripped) = message.strip_suffix(&suffix) {
                    message = stripped.to_string();
                }
            }
            DefinitionError::Parse {
                file: source.to_string(),
                line: location.map(|l| l.line()),
                message,
            }
        }),
    }
}

struct Builder<'a> {
    file: &'a str,
}

impl Builder<'_> {
    fn build(
        &self,
        raw: RawProcess,
        kinds: &KindRegistry,
    ) -> Result<ProcessDefinition, DefinitionError> {
        let file = || self.file.to_string();
        if !is_valid_name(&raw.name) {
            return Err(DefinitionError::InvalidName {
                file: file(),
                what: "process",
                name: raw.name,
            });
        }
        if raw.version == 0 {
            return Err(DefinitionError::InvalidVersion { file: file() });
        }
        let timeout = raw
            .timeout
            .as_deref()
            .map(|t| self.timeout(None, "timeout", t))
            .transpose()?;
        if raw.steps.is_empty() {
            return Err(DefinitionError::NoSteps { file: file() });
        }
        if raw.steps.len() > MAX_STEPS {
            return Err(DefinitionError::TooManySteps {
                file: file(),
                count: raw.steps.len(),
                max: MAX_STEPS,
            });
        }

        let defaults = raw.defaults.unwrap_or(RawDefaults {
            timeout: None,
            retry: None,
        });
        let default_timeout = match &defaults.timeout {
            Some(t) => self.timeout(None, "defaults.timeout", t)?,
            None => DEFAULT_STEP_TIMEOUT,
        };
        let default_retry = match &defaults.retry {
            Some(r) => self.merge_retry(None, "defaults.retry", r, &RetryPolicy::default())?,
            None => RetryPolicy::default(),
        };

        let mut steps: Vec<StepDef> = Vec::with_capacity(raw.steps.len());
        for s in raw.steps {
            let step = self.step(s, kinds, &raw.name, default_timeout, &default_retry, &steps)?;
            steps.push(step);
        }
        let names: BTreeSet<&str> = steps.iter().map(|s| s.name.as_str()).collect();

        let start = match raw.start {
            Some(Targets(start)) => {
                self.target_list(None, "start", &start)?;
                if let Some(unknown) = start.iter().find(|s| !names.contains(s.as_str())) {
                    return Err(DefinitionError::UnknownStart {
                        file: file(),
                        step: unknown.clone(),
                    });
                }
                start
            }
            None => vec![steps[0].name.clone()],
        };

        for s in &steps {
            for (out, targets) in &s.routes {
                if let Some(t) = targets.iter().find(|t| !names.contains(t.as_str())) {
                    return Err(DefinitionError::DanglingEdge {
                        file: file(),
                        step: s.name.clone(),
                        outcome: out.clone(),
                        target: t.clone(),
                    });
                }
            }
        }
        self.check_reachable(&start, &steps)?;
        self.check_cycles(&steps)?;
        self.check_joins(&steps)?;
        self.check_templates(&steps)?;

        let mut def = ProcessDefinition::new(
            raw.name,
            raw.version,
            raw.description,
            timeout,
            start,
            steps,
        );
        def.timeouts_while_paused = raw.timeouts_while_paused;
        Ok(def)
    }

    fn step(
        &self,
        s: RawStep,
        kinds: &KindRegistry,
        process: &str,
        default_timeout: Duration,
        default_retry: &RetryPolicy,
        earlier: &[StepDef],
    ) -> Result<StepDef, DefinitionError> {
        let file = || self.file.to_string();
        if !is_valid_name(&s.name) {
            return Err(DefinitionError::InvalidName {
                file: file(),
                what: "step",
                name: s.name,
            });
        }
        if earlier.iter().any(|e| e.name == s.name) {
            return Err(DefinitionError::DuplicateStep {
                file: file(),
                step: s.name,
            });
        }
        let step = Some(s.name.as_str());
        if s.kind == LLM_KIND && !kinds.contains(LLM_KIND) {
            return Err(DefinitionError::NeedsLlmProvider {
                file: file(),
                process: process.to_string(),
                step: s.name,
            });
        }
        if !kinds.contains(&s.kind) {
            return Err(DefinitionError::UnknownKind {
                file: file(),
                step: s.name,
                kind: s.kind,
                known: kinds.names().map(str::to_string).collect(),
            });
        }
        let config = s
            .config
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        let checked = if config.is_object() {
            kinds.validate(&s.kind, &config)
        } else {
            Err("config must be a table".to_string())
        };
        if let Err(message) = checked {
            return Err(DefinitionError::InvalidConfig {
                file: file(),
                step: s.name,
                kind: s.kind,
                message,
            });
        }
        let timeout = match &s.timeout {
            Some(t) => self.timeout(step, "timeout", t)?,
            None => default_timeout,
        };
        let retry = match &s.retry {
            Some(r) => self.merge_retry(step, "retry", r, default_retry)?,
            None => default_retry.clone(),
        };
        if retry.initial_backoff > retry.max_backoff {
            return Err(self.out_of_bounds(
                step,
                "retry.initial_backoff",
                format!(
                    "({}) must not exceed retry.max_backoff ({})",
                    humantime::format_duration(retry.initial_backoff),
                    humantime::format_duration(retry.max_backoff)
                ),
            ));
        }
        if let Some(v) = s.max_visits
            && !(1..=MAX_VISITS_LIMIT).contains(&v)
        {
            return Err(self.out_of_bounds(
                step,
                "max_visits",
                format!("is {v}, must be in 1..={MAX_VISITS_LIMIT}"),
            ));
        }

        let mut routes = BTreeMap::new();
        if let Some(Targets(next)) = s.next {
            if s.on.contains_key(outcome::OK) {
                return Err(DefinitionError::NextAndOnOk {
                    file: file(),
                    step: s.name,
                });
            }
            self.target_list(step, "next", &next)?;
            routes.insert(outcome::OK.to_string(), next);
        }
        for (out, Targets(targets)) in s.on {
            if !is_valid_outcome(&out) {
                return Err(DefinitionError::InvalidOutcome {
                    file: file(),
                    step: s.name,
                    outcome: out,
                });
            }
            self.target_list(step, &format!("on.{out}"), &targets)?;
            routes.insert(out, targets);
        }

        Ok(StepDef {
            name: s.name,
            kind: s.kind,
            timeout,
            retry,
            routes,
            join: s.join.unwrap_or_default(),
            max_visits: s.max_visits,
            config,
        })
    }

    /// Every `{{steps.<Name>…}}` an `llm` step's templates read names a step from which
    /// that step is reachable, so the output can exist when it renders (a loop may still
    /// reach it first from elsewhere: then rendering names the missing variable).
    fn check_templates(&self, steps: &[StepDef]) -> Result<(), DefinitionError> {
        let mut preds: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for s in steps {
            for t in s.routes.values().flatten() {
                preds.entry(t.as_str()).or_default().push(s.name.as_str());
            }
        }
        for s in steps.iter().filter(|s| s.kind == LLM_KIND) {
            // The kind's validator accepted this config.
            let Ok(spec) = super::llm::parse_spec(&s.config) else {
                continue;
            };
            let mut before = BTreeSet::new();
            let mut queue: VecDeque<&str> = VecDeque::from([s.name.as_str()]);
            while let Some(n) = queue.pop_front() {
                for &p in preds.get(n).into_iter().flatten() {
                    if before.insert(p) {
                        queue.push_back(p);
                    }
                }
            }
            let read = spec
                .prompt
                .steps()
                .into_iter()
                .chain(spec.system.as_ref().map(|t| t.steps()).unwrap_or_default());
            for r in read {
                if !before.contains(r) {
                    return Err(DefinitionError::TemplateStep {
                        file: self.file.to_string(),
                        step: s.name.clone(),
                        read: r.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// A non-empty list without repeats.
    fn target_list(
        &self,
        step: Option<&str>,
        field: &str,
        targets: &[String],
    ) -> Result<(), DefinitionError> {
        if targets.is_empty() {
            return Err(DefinitionError::EmptyTargets {
                file: self.file.to_string(),
                step: step.map(str::to_string),
                field: field.to_string(),
            });
        }
        for (i, t) in targets.iter().enumerate() {
            if targets[..i].contains(t) {
                return Err(DefinitionError::DuplicateTarget {
                    file: self.file.to_string(),
                    step: step.map(str::to_string),
                    field: field.to_string(),
                    target: t.clone(),
                });
            }
        }
        Ok(())
    }

    fn duration(
        &self,
        step: Option<&str>,
        field: &str,
        value: &str,
    ) -> Result<Duration, DefinitionError> {
        humantime::parse_duration(value).map_err(|e| DefinitionError::BadDuration {
            file: self.file.to_string(),
            step: step.map(str::to_string),
            field: field.to_string(),
            value: value.to_string(),
            message: e.to_string(),
        })
    }

    /// A timeout: above zero and at most [`MAX_TIMEOUT`].
    fn timeout(
        &self,
        step: Option<&str>,
        field: &str,
        value: &str,
    ) -> Result<Duration, DefinitionError> {
        let d = self.duration(step, field, value)?;
        if d.is_zero() || d > MAX_TIMEOUT {
            return Err(self.out_of_bounds(
                step,
                field,
                format!("is {value}, must be above 0s and at most 7days"),
            ));
        }
        Ok(d)
    }

    /// `raw` over `base`, each field within its bounds (the order of the two backoffs is
    /// checked on the final step policy).
    fn merge_retry(
        &self,
        step: Option<&str>,
        prefix: &str,
        raw: &RawRetry,
        base: &RetryPolicy,
    ) -> Result<RetryPolicy, DefinitionError> {
        let field = |name: &str| format!("{prefix}.{name}");
        let mut p = base.clone();
        if let Some(n) = raw.max_attempts {
            if !RetryPolicy::MAX_ATTEMPTS.contains(&n) {
                let (lo, hi) = RetryPolicy::MAX_ATTEMPTS.into_inner();
                return Err(self.out_of_bounds(
                    step,
                    &field("max_attempts"),
                    format!("is {n}, must be in {lo}..={hi}"),
                ));
            }
            p.max_attempts = n;
        }
        if let Some(m) = raw.multiplier {
            if !RetryPolicy::MULTIPLIER.contains(&m) {
                let (lo, hi) = RetryPolicy::MULTIPLIER.into_inner();
                return Err(self.out_of_bounds(
                    step,
                    &field("multiplier"),
                    format!("is {m}, must be in {lo:.1}..={hi:.1}"),
                ));
            }
            p.multiplier = m;
        }
        for (name, value, slot) in [
            (
                "initial_backoff",
                &raw.initial_backoff,
                &mut p.initial_backoff,
            ),
            ("max_backoff", &raw.max_backoff, &mut p.max_backoff),
        ] {
            if let Some(v) = value {
                let d = self.duration(step, &field(name), v)?;
                if d > RetryPolicy::MAX_BACKOFF_LIMIT {
                    return Err(self.out_of_bounds(
                        step,
                        &field(name),
                        format!("is {v}, must be at most 24h"),
                    ));
                }
                *slot = d;
            }
        }
        Ok(p)
    }

    fn out_of_bounds(&self, step: Option<&str>, field: &str, message: String) -> DefinitionError {
        DefinitionError::OutOfBounds {
            file: self.file.to_string(),
            step: step.map(str::to_string),
            field: field.to_string(),
            message,
        }
    }

    /// Every step is reachable from a start step (edges already resolved).
    fn check_reachable(&self, start: &[String], steps: &[StepDef]) -> Result<(), DefinitionError> {
        let by_name: BTreeMap<&str, &StepDef> =
            steps.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut seen: BTreeSet<&str> = start.iter().map(String::as_str).collect();
        let mut queue: VecDeque<&str> = seen.iter().copied().collect();
        while let Some(n) = queue.pop_front() {
            for t in by_name[n].routes.values().flatten() {
                if seen.insert(t) {
                    queue.push_back(t);
                }
            }
        }
        match steps.iter().find(|s| !seen.contains(s.name.as_str())) {
            Some(s) => Err(DefinitionError::Unreachable {
                file: self.file.to_string(),
                step: s.name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A `join = "all"` step must not wait for an input that only runs after the join
    /// itself (a back edge of a loop): it would never fire.
    fn check_joins(&self, steps: &[StepDef]) -> Result<(), DefinitionError> {
        let by_name: BTreeMap<&str, &StepDef> =
            steps.iter().map(|s| (s.name.as_str(), s)).collect();
        for join in steps.iter().filter(|s| s.join == Join::All) {
            let inputs: Vec<&str> = steps
                .iter()
                .filter(|s| s.routes.values().flatten().any(|t| *t == join.name))
                .map(|s| s.name.as_str())
                .collect();
            if inputs.len() < 2 {
                continue;
            }
            // Everything reachable from the join.
            let mut seen: BTreeSet<&str> = BTreeSet::new();
            let mut queue: VecDeque<&str> =
                join.routes.values().flatten().map(String::as_str).collect();
            while let Some(n) = queue.pop_front() {
                if seen.insert(n) {
                    queue.extend(by_name[n].routes.values().flatten().map(String::as_str));
                }
            }
            if let Some(input) = inputs.into_iter().find(|i| seen.contains(i)) {
                return Err(DefinitionError::JoinOnLoop {
                    file: self.file.to_string(),
                    step: join.name.clone(),
                    input: input.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Every cycle passes through a step with `max_visits`: the graph without those
    /// steps must be acyclic. Reports the first cycle found, in edge order.
    fn check_cycles(&self, steps: &[StepDef]) -> Result<(), DefinitionError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let index: BTreeMap<&str, usize> = steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let unbounded = |i: usize| steps[i].max_visits.is_none();
        // Reversed, so that popping visits them in edge order.
        let successors = |i: usize| -> Vec<usize> {
            let mut succ: Vec<usize> = steps[i]
                .routes
                .values()
                .flatten()
                .map(|t| index[t.as_str()])
                .filter(|&j| unbounded(j))
                .collect();
            succ.reverse();
            succ
        };
        let mut marks = vec![Mark::New; steps.len()];
        for root in (0..steps.len()).filter(|&i| unbounded(i)) {
            if marks[root] != Mark::New {
                continue;
            }
            // Iterative DFS: the path and, per path entry, the successors still to visit.
            let mut path: Vec<usize> = vec![root];
            let mut pending: Vec<Vec<usize>> = vec![successors(root)];
            marks[root] = Mark::OnPath;
            while let Some(todo) = pending.last_mut() {
                match todo.pop() {
                    Some(next) => match marks[next] {
                        Mark::New => {
                            marks[next] = Mark::OnPath;
                            path.push(next);
                            pending.push(successors(next));
                        }
                        Mark::OnPath => {
                            let from = path.iter().position(|&p| p == next).unwrap_or(0);
                            return Err(DefinitionError::UnboundedCycle {
                                file: self.file.to_string(),
                                steps: path[from..]
                                    .iter()
                                    .map(|&i| steps[i].name.clone())
                                    .collect(),
                            });
                        }
                        Mark::Done => {}
                    },
                    None => {
                        pending.pop();
                        if let Some(done) = path.pop() {
                            marks[done] = Mark::Done;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::Executor;

    fn parse(text: &str) -> Result<ProcessDefinition, DefinitionError> {
        ProcessDefinition::parse(text, Format::Toml, "t.toml", &KindRegistry::builtin())
    }

    fn parse_yaml(text: &str) -> Result<ProcessDefinition, DefinitionError> {
        ProcessDefinition::parse(text, Format::Yaml, "t.yaml", &KindRegistry::builtin())
    }

    /// `name = "P"`, `version = 1` and `body`.
    fn process(body: &str) -> String {
        format!("name = \"P\"\nversion = 1\n{body}")
    }

    /// A valid process with two steps, the second reached from the first with `next`.
    fn two_steps(first_extra: &str, second_extra: &str) -> String {
        process(&format!(
            "[[steps]]\nname = \"A\"\nkind = \"noop\"\nnext = \"B\"\n{first_extra}\n\
             [[steps]]\nname = \"B\"\nkind = \"noop\"\n{second_extra}\n"
        ))
    }

    macro_rules! assert_err {
        ($text:expr, $pat:pat) => {{
            let r = parse(&$text);
            assert!(matches!(r, Err($pat)), "got {r:?} for\n{}", $text);
            let msg = r.unwrap_err().to_string();
            assert!(msg.starts_with("t.toml"), "{msg}");
        }};
    }

    #[test]
    fn minimal_process_gets_the_builtin_defaults() {
        let d = parse(&process("[[steps]]\nname = \"Only\"\nkind = \"noop\"\n")).unwrap();
        assert_eq!(d.start, ["Only"]);
        assert_eq!(d.timeout, None);
        let s = d.step("Only").unwrap();
        assert_eq!(s.timeout, DEFAULT_STEP_TIMEOUT);
        assert_eq!(s.retry, RetryPolicy::default());
        assert_eq!(s.join, Join::All);
        assert_eq!(s.max_visits, None);
        assert_eq!(s.config, serde_json::json!({}));
        assert!(s.routes.is_empty());
        assert!(d.targets("Only", "ok").is_empty());
        assert!(d.inbound("Only").is_empty());
        assert!(d.step("Missing").is_none());
    }

    #[test]
    fn defaults_and_step_settings_merge_field_by_field() {
        let text = process(
            r#"
description = "d"
timeout = "2h"
[defaults]
timeout = "1m"
retry = { initial_backoff = "2s", multiplier = 3 }

[[steps]]
name = "A"
kind = "noop"
retry = { max_attempts = 5, max_backoff = "10s" }
next = ["B", "C"]
[steps.on]
failed = "C"
needs_review = "B"

[[steps]]
name = "B"
kind = "noop"
timeout = "30s"
next = "C"

[[steps]]
name = "C"
kind = "noop"
join = "any"
max_visits = 2
"#,
        );
        let d = parse(&text).unwrap();
        assert_eq!(d.description.as_deref(), Some("d"));
        assert_eq!(d.timeout, Some(Duration::from_secs(7200)));
        let a = d.step("A").unwrap();
        assert_eq!(a.timeout, Duration::from_secs(60));
        assert_eq!(
            a.retry,
            RetryPolicy {
                max_attempts: 5,
                initial_backoff: Duration::from_secs(2),
                max_backoff: Duration::from_secs(10),
                multiplier: 3.0,
            }
        );
        assert_eq!(d.targets("A", "ok"), ["B", "C"]);
        assert_eq!(d.targets("A", "failed"), ["C"]);
        assert_eq!(d.targets("A", "needs_review"), ["B"]);
        assert!(d.targets("A", "other").is_empty());
        let b = d.step("B").unwrap();
        assert_eq!(b.timeout, Duration::from_secs(30));
        assert_eq!(b.retry.max_attempts, RetryPolicy::DEFAULT_MAX_ATTEMPTS);
        assert_eq!(b.retry.max_backoff, RetryPolicy::DEFAULT_MAX_BACKOFF);
        assert_eq!(d.step("C").unwrap().join, Join::Any);
        assert_eq!(d.inbound("C"), ["A", "B"]);
        assert_eq!(d.inbound("B"), ["A"]);
    }

    #[test]
    fn start_may_list_several_steps() {
        let text = process(
            "start = [\"B\", \"A\"]\n[[steps]]\nname = \"A\"\nkind = \"noop\"\n\
             [[steps]]\nname = \"B\"\nkind = \"noop\"\n",
        );
        assert_eq!(parse(&text).unwrap().start, ["B", "A"]);
    }

    #[test]
    fn serializes_durations_in_humantime_form() {
        let d = parse(&two_steps("timeout = \"90s\"", "")).unwrap();
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["steps"][0]["timeout"], "1m 30s");
        assert_eq!(v["steps"][0]["retry"]["initial_backoff"], "1s");
        assert_eq!(v["steps"][0]["routes"]["ok"][0], "B");
        assert_eq!(v["steps"][0]["join"], "all");
        assert!(v["timeout"].is_null());
    }

    #[test]
    fn parse_errors_carry_the_line() {
        let r = parse("name = \"P\"\nversion = 1\n[[steps]]\nname = \"A\"\nkind = \n");
        assert!(
            matches!(r, Err(DefinitionError::Parse { line: Some(5), .. })),
            "{r:?}"
        );
        let r = parse(&two_steps("colour = \"red\"", ""));
        assert!(
            matches!(r, Err(DefinitionError::Parse { line: Some(7), .. })),
            "{r:?}"
        );
        assert!(r.unwrap_err().to_string().contains("colour"));
        assert_err!(
            process("[[steps]]\nname = \"A\"\n"),
            DefinitionError::Parse { .. }
        );
        assert_err!(
            two_steps("join = \"some\"", ""),
            DefinitionError::Parse { .. }
        );
        assert_err!(two_steps("timeout = 30", ""), DefinitionError::Parse { .. });
        assert_err!(
            "name = \"P\"\nversion = -1\n",
            DefinitionError::Parse { .. }
        );
        let r =
            parse_yaml("name: P\nversion: 1\nsteps:\n  - name: A\n    kind: noop\n    bogus: 1\n");
        assert!(
            matches!(r, Err(DefinitionError::Parse { line: Some(6), .. })),
            "{r:?}"
        );
        let msg = r.unwrap_err().to_string();
        assert!(msg.starts_with("t.yaml: parse error at line 6: "), "{msg}");
        assert!(msg.contains("bogus") && !msg.contains("column"), "{msg}");
        let r = parse_yaml("name: P\nversion: [\n");
        assert!(matches!(r, Err(DefinitionError::Parse { .. })), "{r:?}");
    }

    #[test]
    fn invalid_names_and_version() {
        assert_err!(
            "name = \"9lives\"\nversion = 1\n[[steps]]\nname = \"A\"\nkind = \"noop\"\n",
            DefinitionError::InvalidName {
                what: "process",
                ..
            }
        );
        assert_err!(
            process("[[steps]]\nname = \"has space\"\nkind = \"noop\"\n"),
            DefinitionError::InvalidName { what: "step", .. }
        );
        assert_err!(
            "name = \"P\"\nversion = 0\n[[steps]]\nname = \"A\"\nkind = \"noop\"\n",
            DefinitionError::InvalidVersion { .. }
        );
    }

    #[test]
    fn step_count_bounds() {
        assert_err!(process(""), DefinitionError::NoSteps { .. });
        let many: String = (0..=MAX_STEPS)
            .map(|i| format!("[[steps]]\nname = \"S{i}\"\nkind = \"noop\"\n"))
            .collect();
        assert_err!(
            process(&many),
            DefinitionError::TooManySteps { count: 257, .. }
        );
    }

    #[test]
    fn duplicate_step() {
        assert_err!(
            process(
                "[[steps]]\nname = \"A\"\nkind = \"noop\"\n[[steps]]\nname = \"A\"\nkind = \"noop\"\n"
            ),
            DefinitionError::DuplicateStep { .. }
        );
    }

    #[test]
    fn unknown_kind_lists_the_known_ones() {
        let text = two_steps("", "").replace(
            "name = \"B\"\nkind = \"noop\"",
            "name = \"B\"\nkind = \"ocr\"",
        );
        let r = parse(&text);
        let Err(DefinitionError::UnknownKind {
            step, kind, known, ..
        }) = &r
        else {
            panic!("{r:?}");
        };
        assert_eq!((step.as_str(), kind.as_str()), ("B", "ocr"));
        assert_eq!(known, &["approval", "fail", "http", "noop", "sleep"]);
        // A registered kind is accepted.
        let mut kinds = KindRegistry::builtin();
        kinds.register("ocr", Executor::Worker, |_: &serde_json::Value| Ok(()));
        assert!(ProcessDefinition::parse(&text, Format::Toml, "t.toml", &kinds).is_ok());
    }

    #[test]
    fn invalid_kind_config() {
        assert_err!(
            two_steps("config = { outcome = \"Not Valid\" }", ""),
            DefinitionError::InvalidConfig { .. }
        );
        assert_err!(
            two_steps("config = { surprise = 1 }", ""),
            DefinitionError::InvalidConfig { .. }
        );
        assert_err!(
            two_steps("config = 3", ""),
            DefinitionError::InvalidConfig { .. }
        );
        assert_err!(
            process("[[steps]]\nname = \"S\"\nkind = \"sleep\"\n"),
            DefinitionError::InvalidConfig { .. }
        );
        let mut kinds = KindRegistry::builtin();
        kinds.register("strict", Executor::Worker, |_: &serde_json::Value| {
            Err("never".into())
        });
        let r = ProcessDefinition::parse(
            &process("[[steps]]\nname = \"S\"\nkind = \"strict\"\n"),
            Format::Toml,
            "t.toml",
            &kinds,
        );
        assert!(
            matches!(&r, Err(DefinitionError::InvalidConfig { message, .. }) if message == "never")
        );
    }

    #[test]
    fn bad_durations() {
        assert_err!(
            two_steps("timeout = \"soon\"", ""),
            DefinitionError::BadDuration { step: Some(_), .. }
        );
        assert_err!(
            two_steps("retry = { initial_backoff = \"1 parsec\" }", ""),
            DefinitionError::BadDuration { step: Some(_), .. }
        );
        assert_err!(
            format!("timeout = \"3\"\n{}", two_steps("", "")),
            DefinitionError::BadDuration { step: None, .. }
        );
        assert_err!(
            two_steps("", "").replacen("[[steps]]", "[defaults]\ntimeout = \"x\"\n[[steps]]", 1),
            DefinitionError::BadDuration { step: None, .. }
        );
    }

    #[test]
    fn out_of_bounds_retry_timeout_and_visits() {
        for extra in [
            "retry = { max_attempts = 0 }",
            "retry = { max_attempts = 101 }",
            "retry = { multiplier = 0.5 }",
            "retry = { multiplier = 10.5 }",
            "retry = { max_backoff = \"25h\" }",
            "retry = { initial_backoff = \"2m\" }",
            "retry = { initial_backoff = \"10s\", max_backoff = \"5s\" }",
            "timeout = \"0s\"",
            "timeout = \"8days\"",
            "max_visits = 0",
            "max_visits = 10001",
        ] {
            assert_err!(
                two_steps(extra, ""),
                DefinitionError::OutOfBounds { step: Some(_), .. }
            );
        }
        assert_err!(
            format!("timeout = \"8days\"\n{}", two_steps("", "")),
            DefinitionError::OutOfBounds { step: None, .. }
        );
        assert!(
            parse(&two_steps(
                "retry = { max_attempts = 1, multiplier = 1.0 }",
                "timeout = \"7days\""
            ))
            .is_ok()
        );
        assert!(
            parse(&two_steps(
                "retry = { max_attempts = 100, multiplier = 10.0, max_backoff = \"24h\" }",
                ""
            ))
            .is_ok()
        );
    }

    #[test]
    fn defaults_are_checked_per_field_and_per_step() {
        let with_defaults = |defaults: &str, first_extra: &str| {
            two_steps(first_extra, "").replacen(
                "[[steps]]",
                &format!("[defaults]\n{defaults}\n[[steps]]"),
                1,
            )
        };
        assert_err!(
            with_defaults("retry = { max_attempts = 0 }", ""),
            DefinitionError::OutOfBounds { step: None, .. }
        );
        // A long default initial backoff is fine where the step raises max_backoff.
        let text = with_defaults(
            "retry = { initial_backoff = \"2m\" }",
            "retry = { max_backoff = \"5m\" }",
        );
        assert_err!(text, DefinitionError::OutOfBounds { step: Some(_), .. });
        let text = with_defaults(
            "retry = { initial_backoff = \"2m\", max_backoff = \"5m\" }",
            "retry = { max_attempts = 2 }",
        );
        assert_eq!(
            parse(&text).unwrap().steps[1].retry.initial_backoff,
            Duration::from_secs(120)
        );
    }

    #[test]
    fn next_and_on_ok_together() {
        assert_err!(
            two_steps("on = { ok = \"B\" }", ""),
            DefinitionError::NextAndOnOk { .. }
        );
        // `on.ok` alone is the same as `next`.
        let via_on =
            parse(&two_steps("", "").replace("next = \"B\"", "on = { ok = \"B\" }")).unwrap();
        assert_eq!(via_on, parse(&two_steps("", "")).unwrap());
    }

    #[test]
    fn invalid_outcome_and_target_lists() {
        assert_err!(
            two_steps("on = { Rejected = \"B\" }", ""),
            DefinitionError::InvalidOutcome { .. }
        );
        assert_err!(
            two_steps("", "").replace("next = \"B\"", "next = []"),
            DefinitionError::EmptyTargets { step: Some(_), .. }
        );
        assert_err!(
            two_steps("", "").replace("next = \"B\"", "next = [\"B\", \"B\"]"),
            DefinitionError::DuplicateTarget { .. }
        );
        assert_err!(
            format!("start = []\n{}", two_steps("", "")),
            DefinitionError::EmptyTargets { step: None, .. }
        );
    }

    #[test]
    fn dangling_edge_names_step_outcome_and_target() {
        let r = parse(&two_steps("on = { failed = \"Rollback\" }", ""));
        let Err(DefinitionError::DanglingEdge {
            step,
            outcome,
            target,
            ..
        }) = &r
        else {
            panic!("{r:?}");
        };
        assert_eq!(
            (step.as_str(), outcome.as_str(), target.as_str()),
            ("A", "failed", "Rollback")
        );
    }

    #[test]
    fn start_naming_an_unknown_step() {
        let text = process("start = \"Nope\"\n[[steps]]\nname = \"A\"\nkind = \"noop\"\n");
        assert_err!(text, DefinitionError::UnknownStart { .. });
    }

    #[test]
    fn unreachable_step() {
        let text = two_steps("", "").replace("next = \"B\"\n", "");
        let r = parse(&text);
        assert!(
            matches!(&r, Err(DefinitionError::Unreachable { step, .. }) if step == "B"),
            "{r:?}"
        );
        // Reachable through a non-ok outcome is reachable.
        assert!(
            parse(&two_steps("", "").replace("next = \"B\"", "on = { failed = \"B\" }")).is_ok()
        );
        // A second start step makes it reachable.
        assert!(parse(&format!("start = [\"A\", \"B\"]\n{text}")).is_ok());
    }

    #[test]
    fn cycles_need_a_bounded_step() {
        let three = |a: &str, b: &str, c: &str| {
            process(&format!(
                "[[steps]]\nname = \"A\"\nkind = \"noop\"\nnext = \"B\"\n{a}\n\
                 [[steps]]\nname = \"B\"\nkind = \"noop\"\nnext = \"C\"\njoin = \"any\"\n{b}\n\
                 [[steps]]\nname = \"C\"\nkind = \"noop\"\n{c}\n"
            ))
        };
        let r = parse(&three("", "", "on = { retry = \"B\" }"));
        assert!(
            matches!(&r, Err(DefinitionError::UnboundedCycle { steps, .. }) if steps == &["B", "C"]),
            "{r:?}"
        );
        assert!(r.unwrap_err().to_string().contains("B -> C -> B"));
        assert!(parse(&three("", "max_visits = 3", "on = { retry = \"B\" }")).is_ok());
        assert!(parse(&three("", "", "on = { retry = \"B\" }\nmax_visits = 2")).is_ok());
        // A self-loop is a cycle too.
        assert_err!(
            three("", "", "on = { again = \"C\" }"),
            DefinitionError::UnboundedCycle { .. }
        );
        assert!(
            parse(&three(
                "",
                "",
                "on = { again = \"C\" }\nmax_visits = 5\njoin = \"any\""
            ))
            .is_ok()
        );
        // Without join = "any", C would wait for its own arrival forever.
        assert_err!(
            three("", "", "on = { again = \"C\" }\nmax_visits = 5"),
            DefinitionError::JoinOnLoop { .. }
        );
        // Bounding B does not bound the inner C <-> D loop of the same component.
        let text = process(
            "[[steps]]\nname = \"B\"\nkind = \"noop\"\nnext = \"C\"\nmax_visits = 2\n\
             [[steps]]\nname = \"C\"\nkind = \"noop\"\nnext = \"D\"\njoin = \"any\"\n\
             [[steps]]\nname = \"D\"\nkind = \"noop\"\non = { back = \"B\", loop = \"C\" }\n",
        );
        let r = parse(&text);
        assert!(
            matches!(&r, Err(DefinitionError::UnboundedCycle { steps, .. }) if steps == &["C", "D"]),
            "{r:?}"
        );
    }

    #[test]
    fn toml_and_yaml_give_the_same_model() {
        let toml = r#"
name = "Same"
version = 2
description = "both formats"
timeout = "1h"
start = ["A"]

[defaults]
timeout = "2m"
retry = { max_attempts = 4, initial_backoff = "500ms", max_backoff = "30s", multiplier = 1.5 }

[[steps]]
name = "A"
kind = "noop"
max_visits = 2
config = { outcome = "ok", output = { n = 1, tags = ["x", "y"], ratio = 0.5, on = true } }
next = ["B", "C"]

[[steps]]
name = "B"
kind = "approval"
timeout = "1h"
retry = { max_attempts = 1 }
config = { signal = "review" }
next = "D"
[steps.on]
rejected = "A"
failed = ["C"]

[[steps]]
name = "C"
kind = "sleep"
config = { duration = "200ms" }
next = "D"

[[steps]]
name = "D"
kind = "http"
join = "any"
max_visits = 3
config = { url = "https://example.com/hook", max_response_kb = 64 }
"#;
        let yaml = r#"
name: Same
version: 2
description: both formats
timeout: 1h
start: [A]
defaults:
  timeout: 2m
  retry:
    max_attempts: 4
    initial_backoff: 500ms
    max_backoff: 30s
    multiplier: 1.5
steps:
  - name: A
    kind: noop
    max_visits: 2
    config:
      outcome: ok
      output: { n: 1, tags: [x, y], ratio: 0.5, on: true }
    next: [B, C]
  - name: B
    kind: approval
    timeout: 1h
    retry: { max_attempts: 1 }
    config: { signal: review }
    next: D
    on:
      rejected: A
      failed: [C]
  - name: C
    kind: sleep
    config: { duration: 200ms }
    next: D
  - name: D
    kind: http
    join: any
    max_visits: 3
    config: { url: "https://example.com/hook", max_response_kb: 64 }
"#;
        let a = parse(toml).unwrap();
        let b = parse_yaml(yaml).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.step("A").unwrap().max_visits, Some(2));
        assert_eq!(
            a.step("B").unwrap().retry.initial_backoff,
            Duration::from_millis(500)
        );
        assert_eq!(a.inbound("A"), ["B"]);
        assert_eq!(a.inbound("D"), ["B", "C"]);
    }

    #[test]
    fn a_join_all_waiting_for_its_own_loop_is_an_error() {
        let text = r#"
name = "Loop"
version = 1
[[steps]]
name = "A"
kind = "noop"
next = "J"
[[steps]]
name = "J"
kind = "noop"
max_visits = 3
next = "B"
[[steps]]
name = "B"
kind = "noop"
[steps.on]
retry = "J"
"#;
        let r = ProcessDefinition::parse(text, Format::Toml, "loop.toml", &KindRegistry::builtin());
        assert!(
            matches!(&r, Err(DefinitionError::JoinOnLoop { step, input, .. }) if step == "J" && input == "B"),
            "{r:?}"
        );
        let any = text.replace("max_visits = 3", "max_visits = 3\njoin = \"any\"");
        ProcessDefinition::parse(&any, Format::Toml, "loop.toml", &KindRegistry::builtin())
            .unwrap();
    }
}
