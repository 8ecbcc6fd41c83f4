//! Prompt templates: `{{input.path}}` (the process input) and `{{steps.Name.path}}` (an
//! earlier step's output), paths of object fields or array indices separated by dots.
//! Strings are inserted as they are, other values as compact JSON. Parsing (at definition
//! load) rejects unknown roots and unclosed braces; rendering rejects missing variables.

use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Var(Var),
}

#[derive(Debug, Clone, PartialEq)]
enum Var {
    Input(Vec<String>),
    Step(String, Vec<String>),
}

impl Var {
    fn name(&self) -> String {
        match self {
            Var::Input(p) if p.is_empty() => "input".into(),
            Var::Input(p) => format!("input.{}", p.join(".")),
            Var::Step(s, p) if p.is_empty() => format!("steps.{s}"),
            Var::Step(s, p) => format!("steps.{s}.{}", p.join(".")),
        }
    }
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed {{{{ in template near {:?}", short(after)))?;
            let expr = after[..close].trim();
            parts.push(Part::Var(parse_var(expr)?));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Self { parts })
    }

    /// The step names the template reads from.
    pub fn steps(&self) -> Vec<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Var(Var::Step(s, _)) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    pub fn render(
        &self,
        input: &Value,
        outputs: &BTreeMap<String, Value>,
    ) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => {
                    let (root, path) = match v {
                        Var::Input(path) => (Some(input), path),
                        Var::Step(s, path) => (outputs.get(s), path),
                    };
                    let value = root
                        .and_then(|r| lookup(r, path))
                        .ok_or_else(|| format!("template variable {} is missing", v.name()))?;
                    match value {
                        Value::String(s) => out.push_str(s),
                        other => out.push_str(&other.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }
}

fn short(s: &str) -> String {
    s.chars().take(30).collect()
}

fn parse_var(expr: &str) -> Result<Var, String> {
    let segs: Vec<&str> = expr.split('.').collect();
    if segs
        .iter()
        .any(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        return Err(format!("template variable {{{{{expr}}}}} is malformed"));
    }
    let path = |from: usize| segs[from..].iter().map(|s| s.to_string()).collect();
    match segs[0] {
        "input" => Ok(Var::Input(path(1))),
        "steps" if segs.len() >= 2 => Ok(Var::Step(segs[1].to_string(), path(2))),
        _ => Err(format!(
            "template variable {{{{{expr}}}}} must start with input. or steps.<Name>"
        )),
    }
}

fn lookup<'a>(root: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut v = root;
    for seg in path {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    (!v.is_null()).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_input_and_step_outputs() {
        let t = Template::parse("Deploy {{input.app}} to {{ input.env.region }}; plan: {{steps.Plan.text}} {{input.tags.1}} {{input.n}}").unwrap();
        assert_eq!(t.steps(), vec!["Plan"]);
        let mut outs = BTreeMap::new();
        outs.insert("Plan".to_string(), json!({"text": "three pods"}));
        let s = t
            .render(
                &json!({"app": "web", "env": {"region": "eu"}, "tags": ["a", "b"], "n": {"x": 1}}),
                &outs,
            )
            .unwrap();
        assert_eq!(s, "Deploy web to eu; plan: three pods b {\"x\":1}");
    }

    #[test]
    fn missing_variables_and_bad_syntax_are_clear_errors() {
        let t = Template::parse("{{input.app}} {{steps.Gone.x}}").unwrap();
        assert_eq!(
            t.render(&json!({"app": "a"}), &BTreeMap::new())
                .unwrap_err(),
            "template variable steps.Gone.x is missing"
        );
        assert_eq!(
            t.render(&json!({}), &BTreeMap::new()).unwrap_err(),
            "template variable input.app is missing"
        );
        assert!(
            Template::parse("{{input.app")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(
            Template::parse("{{env.HOME}}")
                .unwrap_err()
                .contains("must start")
        );
        assert!(
            Template::parse("{{input..x}}")
                .unwrap_err()
                .contains("malformed")
        );
        assert_eq!(
            Template::parse("no vars")
                .unwrap()
                .render(&json!({}), &BTreeMap::new()),
            Ok("no vars".into())
        );
    }
}
