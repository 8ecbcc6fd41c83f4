//! Structured LLM output: JSON Schema Draft 2020-12, with the `jsonschema` crate. A step's
//! schema is compiled (and checked against the Draft 2020-12 meta-schema) when its
//! definition loads, and every reply is validated against it, `format` included. Only local
//! references (`$ref` into the schema's own `$defs`) resolve: there is no remote retrieval.
//! [`strict_compatible`] says whether a schema fits OpenAI's strict structured-output mode.

use serde_json::Value;

fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    if !schema.is_object() {
        return Err("the schema must be a JSON object".into());
    }
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                format!("not a valid Draft 2020-12 schema: {e}")
            } else {
                format!("not a valid Draft 2020-12 schema at {at}: {e}")
            }
        })
}

/// Checks that `schema` is a valid Draft 2020-12 schema that compiles (every `$ref`
/// resolves, every `pattern` is a valid regular expression).
pub fn check_schema(schema: &Value) -> Result<(), String> {
    compile(schema).map(|_| ())
}

/// Validates `v` against `schema`; the error names the first failing location
/// (`at /path: reason`).
pub fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    let validator = compile(schema)?;
    match validator.iter_errors(v).next() {
        None => Ok(()),
        Some(e) => {
            let at = e.instance_path().to_string();
            Err(format!("at {}: {e}", if at.is_empty() { "/" } else { &at }))
        }
    }
}

/// Whether OpenAI's strict structured-output mode accepts `schema` as it is: every object
/// schema (at any depth, `$defs` included) closes `additionalProperties` and requires all
/// of its properties. Otherwise the schema is sent non-strict and the reply is still
/// validated here (and the step retried on a violation).
pub fn strict_compatible(schema: &Value) -> bool {
    match schema {
        Value::Object(m) => {
            let is_object = m.get("type").and_then(Value::as_str) == Some("object")
                || m.contains_key("properties");
            if is_object {
                if m.get("additionalProperties") != Some(&Value::Bool(false)) {
                    return false;
                }
                let props: Vec<&String> = m
                    .get("properties")
                    .and_then(Value::as_object)
                    .map(|p| p.keys().collect())
                    .unwrap_or_default();
                let required: Vec<&str> = m
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if props.iter().any(|p| !required.contains(&p.as_str())) {
                    return false;
                }
            }
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "enum" | "const" | "examples" | "default"))
                .all(|(_, v)| strict_compatible(v))
        }
        Value::Array(items) => items.iter().all(strict_compatible),
        _ => true,
    }
}

/// The JSON value in a reply: the whole text, or the body of a ```json fence.
pub fn extract_json(text: &str) -> Result<Value, String> {
    let t = text.trim();
    if let Ok(v) = serde_json::from_str(t) {
        return Ok(v);
    }
    let inner = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|s| s.strip_suffix("```"))
        .map(str::trim);
    match inner {
        Some(body) => serde_json::from_str(body).map_err(|e| format!("reply is not JSON: {e}")),
        None => serde_json::from_str::<Value>(t).map_err(|e| format!("reply is not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["verdict", "score"],
            "additionalProperties": false,
            "properties": {
                "verdict": {"type": "string", "enum": ["approve", "reject"]},
                "score": {"type": "integer", "minimum": 0, "maximum": 10},
                "notes": {"type": "array", "items": {"type": "string"}, "maxItems": 2}
            }
        })
    }

    #[test]
    fn accepts_and_rejects_with_a_pointer() {
        let s = schema();
        check_schema(&s).unwrap();
        validate(&s, &json!({"verdict": "approve", "score": 7})).unwrap();
        let e = validate(&s, &json!({"verdict": "approve"})).unwrap_err();
        assert!(e.contains("\"score\" is a required property"), "{e}");
        let e = validate(&s, &json!({"verdict": "maybe", "score": 1})).unwrap_err();
        assert!(e.starts_with("at /verdict"), "{e}");
        let e = validate(&s, &json!({"verdict": "reject", "score": 11})).unwrap_err();
        assert!(e.contains("maximum"), "{e}");
        let e = validate(&s, &json!({"verdict": "reject", "score": 1, "x": 1})).unwrap_err();
        assert!(e.contains("Additional properties are not allowed"), "{e}");
        let e = validate(
            &s,
            &json!({"verdict": "reject", "score": 1, "notes": ["a", 2]}),
        )
        .unwrap_err();
        assert!(e.starts_with("at /notes/1"), "{e}");
        assert!(validate(&s, &json!([1])).is_err());
    }

    /// What OpenAI structured-output schemas use, and the old subset refused: `$ref` into
    /// `$defs`, `anyOf`/`oneOf`, `pattern`, `format`.
    #[test]
    fn refs_alternatives_patterns_and_formats_are_enforced() {
        let s = json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["target", "change"],
            "$defs": {
                "Region": {"type": "string", "pattern": "^[a-z]{2}-[a-z]+-[0-9]$"}
            },
            "properties": {
                "target": {"$ref": "#/$defs/Region"},
                "change": {"anyOf": [
                    {"type": "object", "additionalProperties": false, "required": ["scale"],
                     "properties": {"scale": {"type": "integer", "minimum": 1}}},
                    {"type": "object", "additionalProperties": false, "required": ["at"],
                     "properties": {"at": {"type": "string", "format": "date-time"}}}
                ]},
                "contact": {"oneOf": [{"type": "string", "format": "email"}, {"type": "null"}]}
            }
        });
        check_schema(&s).unwrap();
        validate(&s, &json!({"target": "eu-west-1", "change": {"scale": 3}})).unwrap();
        validate(
            &s,
            &json!({"target": "us-east-2", "change": {"at": "2026-12-04T06:00:00Z"}, "contact": null}),
        )
        .unwrap();
        let e = validate(&s, &json!({"target": "EU-WEST-1", "change": {"scale": 3}})).unwrap_err();
        assert!(e.starts_with("at /target"), "the pattern through $ref: {e}");
        let e = validate(&s, &json!({"target": "eu-west-1", "change": {"scale": 0}})).unwrap_err();
        assert!(e.starts_with("at /change"), "neither anyOf branch: {e}");
        let e = validate(
            &s,
            &json!({"target": "eu-west-1", "change": {"at": "tomorrow"}}),
        )
        .unwrap_err();
        assert!(e.starts_with("at /change"), "format is checked: {e}");
        let e = validate(
            &s,
            &json!({"target": "eu-west-1", "change": {"scale": 1}, "contact": "not an address"}),
        )
        .unwrap_err();
        assert!(e.starts_with("at /contact"), "{e}");
    }

    #[test]
    fn invalid_schemas_are_refused_when_the_definition_loads() {
        assert!(check_schema(&json!({"type": "decimal"})).is_err());
        assert!(check_schema(&json!({"properties": {"a": {"minLength": -1}}})).is_err());
        assert!(check_schema(&json!("string")).is_err());
        let e = check_schema(&json!({"$ref": "#/$defs/Missing"})).unwrap_err();
        assert!(e.contains("Missing"), "{e}");
        assert!(check_schema(&json!({"type": "string", "pattern": "(unclosed"})).is_err());
        // Remote references are never fetched.
        assert!(check_schema(&json!({"$ref": "https://example.com/schema.json"})).is_err());
    }

    #[test]
    fn strict_mode_needs_closed_objects_that_require_every_property() {
        assert!(!strict_compatible(&schema()), "notes is optional");
        let mut s = schema();
        s["required"] = json!(["verdict", "score", "notes"]);
        assert!(strict_compatible(&s));
        s["properties"]["extra"] =
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]});
        s["required"] = json!(["verdict", "score", "notes", "extra"]);
        assert!(!strict_compatible(&s), "a nested object left open");
        s["properties"]["extra"]["additionalProperties"] = json!(false);
        assert!(strict_compatible(&s));
    }

    #[test]
    fn extracts_fenced_json() {
        assert_eq!(extract_json(" {\"a\":1} ").unwrap(), json!({"a": 1}));
        assert_eq!(
            extract_json("```json\n{\"a\":1}\n```").unwrap(),
            json!({"a": 1})
        );
        assert!(extract_json("sure! here it is").is_err());
    }
}
