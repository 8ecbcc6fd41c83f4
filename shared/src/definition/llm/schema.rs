//! A small JSON-schema validator for structured LLM output: `type` (one or a list),
//! `properties`, `required`, `additionalProperties` (bool), `items`, `enum`, `const`,
//! `minimum`/`maximum`, `minLength`/`maxLength`, `minItems`/`maxItems`. Other keywords are
//! rejected when the definition loads, so a schema never silently checks less than it says.

use serde_json::Value;

const KNOWN: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "description",
    "title",
    "$schema",
];
const TYPES: &[&str] = &[
    "object", "array", "string", "integer", "number", "boolean", "null",
];

/// Checks that `schema` uses only the supported keywords, well-formed.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    check_at(schema, "#")
}

fn check_at(s: &Value, at: &str) -> Result<(), String> {
    let m = s
        .as_object()
        .ok_or_else(|| format!("schema at {at} must be an object"))?;
    for (k, v) in m {
        if !KNOWN.contains(&k.as_str()) {
            return Err(format!("schema keyword {k:?} at {at} is not supported"));
        }
        match k.as_str() {
            "type" => {
                let names: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                for n in names {
                    if !n.as_str().is_some_and(|n| TYPES.contains(&n)) {
                        return Err(format!("schema type {n} at {at} is not a JSON type"));
                    }
                }
            }
            "properties" => {
                let p = v
                    .as_object()
                    .ok_or_else(|| format!("properties at {at} must be an object"))?;
                for (name, sub) in p {
                    check_at(sub, &format!("{at}/properties/{name}"))?;
                }
            }
            "items" => check_at(v, &format!("{at}/items"))?,
            "required" if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) => {
                return Err(format!("required at {at} must be a list of names"));
            }
            "additionalProperties" if !v.is_boolean() => {
                return Err(format!(
                    "additionalProperties at {at} must be true or false"
                ));
            }
            "enum" if !v.is_array() => return Err(format!("enum at {at} must be a list")),
            "minimum" | "maximum" if !v.is_number() => {
                return Err(format!("{k} at {at} must be a number"));
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" if !v.is_u64() => {
                return Err(format!("{k} at {at} must be a non-negative integer"));
            }
            _ => {}
        }
    }
    Ok(())
}

fn type_ok(name: &str, v: &Value) -> bool {
    match name {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

/// Validates `v` against a checked schema; the error names the JSON pointer of the
/// first violation.
pub fn validate(schema: &Value, v: &Value) -> Result<(), String> {
    validate_at(schema, v, "")
}

fn validate_at(s: &Value, v: &Value, at: &str) -> Result<(), String> {
    let here = if at.is_empty() { "/" } else { at };
    let Some(m) = s.as_object() else {
        return Ok(());
    };
    if let Some(t) = m.get("type") {
        let ok = match t {
            Value::Array(a) => a.iter().filter_map(Value::as_str).any(|n| type_ok(n, v)),
            Value::String(n) => type_ok(n, v),
            _ => true,
        };
        if !ok {
            return Err(format!("at {here}: expected {t}, got {}", kind(v)));
        }
    }
    if let Some(e) = m.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        return Err(format!(
            "at {here}: value is not one of {}",
            Value::Array(e.clone())
        ));
    }
    if let Some(c) = m.get("const")
        && c != v
    {
        return Err(format!("at {here}: value must be {c}"));
    }
    if let Some(n) = v.as_f64() {
        if let Some(min) = m.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            return Err(format!("at {here}: {n} is below the minimum {min}"));
        }
        if let Some(max) = m.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            return Err(format!("at {here}: {n} is above the maximum {max}"));
        }
    }
    if let Some(st) = v.as_str() {
        let len = st.chars().count() as u64;
        if m.get("minLength")
            .and_then(Value::as_u64)
            .is_some_and(|l| len < l)
        {
            return Err(format!("at {here}: string is shorter than minLength"));
        }
        if m.get("maxLength")
            .and_then(Value::as_u64)
            .is_some_and(|l| len > l)
        {
            return Err(format!("at {here}: string is longer than maxLength"));
        }
    }
    if let Some(arr) = v.as_array() {
        let len = arr.len() as u64;
        if m.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|l| len < l)
        {
            return Err(format!("at {here}: fewer items than minItems"));
        }
        if m.get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|l| len > l)
        {
            return Err(format!("at {here}: more items than maxItems"));
        }
        if let Some(items) = m.get("items") {
            for (i, item) in arr.iter().enumerate() {
                validate_at(items, item, &format!("{at}/{i}"))?;
            }
        }
    }
    if let Some(obj) = v.as_object() {
        if let Some(req) = m.get("required").and_then(Value::as_array) {
            for name in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(name) {
                    return Err(format!("at {here}: required property {name:?} is missing"));
                }
            }
        }
        let props = m.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => validate_at(sub, val, &format!("{at}/{k}"))?,
                None if m.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("at {here}: property {k:?} is not allowed"));
                }
                None => {}
            }
        }
    }
    Ok(())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
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
        assert!(e.contains("\"score\" is missing"), "{e}");
        let e = validate(&s, &json!({"verdict": "maybe", "score": 1})).unwrap_err();
        assert!(e.starts_with("at /verdict"), "{e}");
        let e = validate(&s, &json!({"verdict": "reject", "score": 11})).unwrap_err();
        assert!(e.contains("maximum"), "{e}");
        let e = validate(&s, &json!({"verdict": "reject", "score": 1, "x": 1})).unwrap_err();
        assert!(e.contains("not allowed"), "{e}");
        let e = validate(
            &s,
            &json!({"verdict": "reject", "score": 1, "notes": ["a", 2]}),
        )
        .unwrap_err();
        assert!(e.starts_with("at /notes/1"), "{e}");
        assert!(validate(&s, &json!([1])).is_err());
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        assert!(check_schema(&json!({"type": "object", "patternProperties": {}})).is_err());
        assert!(check_schema(&json!({"type": "decimal"})).is_err());
        assert!(check_schema(&json!({"properties": {"a": {"minLength": -1}}})).is_err());
        assert!(check_schema(&json!("string")).is_err());
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
