//! The Grafana dashboard and the Prometheus rules in `deploy/` stay in step with the metrics
//! the system declares (`honua_shared::metrics::ALL`) and with the operations guide: its
//! dashboard rows and panels in order, its thresholds and its alert names. No network;
//! `deploy/prometheus/check.sh` runs promtool on the same rules.

use honua_shared::metrics as m;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

const DASHBOARD: &str = "deploy/grafana/honua-process-framework.json";
const RULES: &str = "deploy/prometheus/rules.yml";

/// The guide's dashboard: rows in order, each with its panels in order.
const ROWS: &[(&str, &[&str])] = &[
    (
        "System Health",
        &[
            "Active Processes",
            "Success Rate (1h)",
            "Error Rate (1h)",
            "Average Duration",
        ],
    ),
    (
        "Process Metrics",
        &[
            "Process Starts (rate)",
            "Process Completions (rate)",
            "Process Timeouts",
            "Queue Depth",
        ],
    ),
    (
        "Resource Usage",
        &[
            "CPU Usage",
            "Memory Usage",
            "Redis Memory",
            "Redis Operations",
        ],
    ),
    (
        "LLM API Metrics",
        &[
            "LLM API Calls",
            "LLM Token Usage",
            "LLM API Latency",
            "LLM API Errors",
        ],
    ),
    (
        "Process Type Breakdown",
        &[
            "Deployment Processes",
            "Upgrade Processes",
            "Metadata Processes",
            "GitOps Processes",
            "Benchmark Processes",
        ],
    ),
];

/// The guide's "Common Alerts" (Morning Checklist).
const GUIDE_ALERTS: &[&str] = &[
    "HighProcessFailureRate",
    "ProcessTimeout",
    "RedisConnectionFailure",
    "HighMemoryUsage",
    "LlmApiRateLimit",
];

/// The engine's own alerts on its reliability metrics.
const ENGINE_ALERTS: &[&str] = &[
    "ProcessStuck",
    "QueueLagGrowing",
    "DeadLettersAppearing",
    "StaleCommitSpike",
    "ConsumerGroupRecreated",
    "NoLiveWorkers",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&repo_file(DASHBOARD)).expect("the dashboard is valid JSON")
}

fn rules() -> RuleFile {
    serde_yaml_ng::from_str(&repo_file(RULES)).expect("rules.yml parses as rule groups")
}

/// Top-level panels plus the panels inside collapsed rows, in order.
fn all_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

fn dashboard_exprs(d: &Value) -> Vec<String> {
    all_panels(d)
        .into_iter()
        .filter_map(|p| p["targets"].as_array())
        .flatten()
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect()
}

/// Identifiers of a PromQL expression outside string literals (metric names, functions,
/// label names, keywords).
fn identifiers(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if matches!(c, '"' | '\'' | '`') {
            while let Some(d) = chars.next() {
                if d == '\\' && c != '`' {
                    chars.next();
                } else if d == c {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let mut id = c.to_string();
            while let Some(&d) = chars.peek() {
                if d.is_ascii_alphanumeric() || d == '_' || d == ':' {
                    id.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            out.push(id);
        } else if c.is_ascii_digit() {
            // A number or a duration (`5m`, `1h`): not an identifier.
            while chars
                .peek()
                .is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.')
            {
                chars.next();
            }
        }
    }
    out
}

/// The declared metric an exported series name belongs to: the name itself, or a
/// histogram's `_bucket`/`_sum`/`_count` series of a declared `*_seconds` histogram.
fn declared_metric(name: &str) -> Option<&'static str> {
    if let Some(&d) = m::ALL.iter().find(|&&d| d == name) {
        return Some(d);
    }
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))?;
    m::ALL
        .iter()
        .find(|&&d| d == base && d.ends_with("_seconds"))
        .copied()
}

fn honua_names(exprs: &[String]) -> BTreeSet<String> {
    exprs
        .iter()
        .flat_map(|e| identifiers(e))
        .filter(|id| id.starts_with("honua_"))
        .collect()
}

#[test]
fn identifiers_skip_strings_and_durations() {
    let ids = identifiers(
        r#"sum by (pod) (rate(honua_steps_total{pod=~"honua_fake.*", kind='x'}[5m])) * 60"#,
    );
    assert_eq!(
        ids,
        [
            "sum",
            "by",
            "pod",
            "rate",
            "honua_steps_total",
            "pod",
            "kind"
        ]
    );
    assert_eq!(
        declared_metric("honua_process_duration_seconds_bucket"),
        Some(m::PROCESS_DURATION)
    );
    assert_eq!(declared_metric("honua_steps_total_count"), None);
    assert_eq!(declared_metric("honua_made_up_total"), None);
}

#[test]
fn dashboard_and_rules_reference_only_declared_metrics() {
    let d = dashboard();
    let r = rules();
    let mut exprs = dashboard_exprs(&d);
    let dashboard_count = exprs.len();
    assert!(
        dashboard_count >= 25,
        "only {dashboard_count} dashboard queries found"
    );
    exprs.extend(
        r.groups
            .iter()
            .flat_map(|g| g.rules.iter().map(|x| x.expr.clone())),
    );

    let names = honua_names(&exprs);
    let undeclared: Vec<&String> = names
        .iter()
        .filter(|n| declared_metric(n).is_none())
        .collect();
    assert!(
        undeclared.is_empty(),
        "not in honua_shared::metrics::ALL: {undeclared:?}"
    );
    // Not vacuous: the extraction finds the guide's core metrics.
    for expected in [
        m::ACTIVE_PROCESSES,
        m::PROCESS_STARTED,
        m::PROCESS_COMPLETED,
        m::PROCESS_FAILURES,
        m::PROCESS_TIMEOUTS,
        m::PROCESS_TRANSITIONS,
        m::QUEUE_LAG,
        m::QUEUE_PENDING,
        m::LLM_ERRORS,
    ] {
        assert!(names.contains(expected), "no query uses {expected}");
    }

    // Recorded series in our namespace must be declared names too (the duration recording
    // reuses the histogram's base name so the guide's plain queries work).
    for rec in r
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .filter_map(|x| x.record.as_deref())
    {
        if rec.starts_with("honua_") {
            assert!(
                m::ALL.contains(&rec),
                "recording rule {rec} is not a declared name"
            );
        }
    }
    let recorded: Vec<&str> = r
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .filter_map(|x| x.record.as_deref())
        .collect();
    assert!(recorded.contains(&m::PROCESS_DURATION), "{recorded:?}");
}

#[test]
fn dashboard_has_the_guides_rows_panels_and_thresholds() {
    let d = dashboard();
    assert_eq!(d["uid"], "honua-process-framework");
    assert_eq!(d["title"], "Honua Process Framework");
    let vars = d["templating"]["list"].as_array().expect("templating");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "no datasource variable"
    );

    // Rows in order, each followed by its panels in order.
    let mut layout: Vec<(String, Vec<String>)> = Vec::new();
    for p in all_panels(&d) {
        let title = p["title"].as_str().unwrap_or_default().to_string();
        if p["type"] == "row" {
            layout.push((title, Vec::new()));
        } else {
            let row = layout.last_mut().expect("a panel above the first row");
            row.1.push(title);
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "panel {:?} ignores the datasource variable",
                p["title"]
            );
        }
    }
    let want: Vec<(String, Vec<String>)> = ROWS
        .iter()
        .map(|(r, ps)| (r.to_string(), ps.iter().map(|p| p.to_string()).collect()))
        .collect();
    assert_eq!(layout, want);

    // The guide's alert thresholds on the System Health stats.
    let steps = |title: &str| -> Vec<(String, Option<f64>)> {
        let p = all_panels(&d)
            .into_iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("no panel {title}"));
        p["fieldConfig"]["defaults"]["thresholds"]["steps"]
            .as_array()
            .expect("threshold steps")
            .iter()
            .map(|s| {
                (
                    s["color"].as_str().unwrap().to_string(),
                    s["value"].as_f64(),
                )
            })
            .collect()
    };
    let s = |c: &str, v: Option<f64>| (c.to_string(), v);
    assert_eq!(
        steps("Success Rate (1h)"),
        [
            s("red", None),
            s("orange", Some(80.0)),
            s("green", Some(90.0))
        ]
    );
    assert_eq!(
        steps("Error Rate (1h)"),
        [
            s("green", None),
            s("orange", Some(10.0)),
            s("red", Some(20.0))
        ]
    );
}

#[test]
fn rules_contain_the_guides_alerts_with_severity_and_runbook_text() {
    let r = rules();
    let alerts: Vec<&Rule> = r
        .groups
        .iter()
        .flat_map(|g| &g.rules)
        .filter(|x| x.alert.is_some())
        .collect();
    let names: BTreeSet<&str> = alerts.iter().filter_map(|a| a.alert.as_deref()).collect();
    for want in GUIDE_ALERTS.iter().chain(ENGINE_ALERTS) {
        assert!(names.contains(want), "no alert {want} in {RULES}");
    }
    for a in &alerts {
        let name = a.alert.as_deref().unwrap();
        assert!(a.record.is_none(), "{name}: both alert and record");
        assert!(a.for_.is_some(), "{name}: no `for:`");
        let severity = a.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("warning" | "critical")),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                a.annotations.get(key).is_some_and(|t| !t.trim().is_empty()),
                "{name}: no {key} annotation"
            );
        }
        assert!(
            a.annotations["description"].contains("OPERATIONS_GUIDE.md"),
            "{name}: the description does not point at the operations guide"
        );
    }
    // The guide's failure thresholds: warning above 10%, critical above 20%.
    let failure: BTreeMap<&str, &str> = alerts
        .iter()
        .filter(|a| a.alert.as_deref() == Some("HighProcessFailureRate"))
        .map(|a| (a.labels["severity"].as_str(), a.expr.as_str()))
        .collect();
    assert!(
        failure["warning"].contains("> 0.10"),
        "{}",
        failure["warning"]
    );
    assert!(
        failure["critical"].contains("> 0.20"),
        "{}",
        failure["critical"]
    );
    for g in &r.groups {
        assert!(!g.name.is_empty(), "a rule group without a name");
    }
}

/// `deploy/prometheus/smoke.sh` runs the `honua` binary cargo builds, wherever
/// CARGO_TARGET_DIR puts it (an absolute or a relative directory), not `target/debug`.
#[test]
fn the_prometheus_smoke_test_runs_the_binary_in_the_cargo_target_dir() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (target, want) in [
        (
            dir.path().to_string_lossy().into_owned(),
            dir.path().join("debug/honua"),
        ),
        ("elsewhere".to_string(), root.join("elsewhere/debug/honua")),
    ] {
        let out = std::process::Command::new("bash")
            .arg(root.join("deploy/prometheus/smoke.sh"))
            .arg("--print-binary")
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want.to_string_lossy(),
            "CARGO_TARGET_DIR={target}"
        );
    }
}
