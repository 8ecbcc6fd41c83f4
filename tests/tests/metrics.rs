//! `/metrics`: the guide's metric names are exported in the Prometheus text format and move
//! as processes run. (Its own test binary: the recorder is per process.)

use honua_shared::metrics as m;
use honua_shared::status::ProcessStatus;
use honua_tests::*;
use serde_json::json;
use std::collections::HashMap;

const DEFS: &[(&str, &str)] = &[
    (
        "metered.toml",
        r#"
name = "Metered"
version = 1
[[steps]]
name = "A"
kind = "noop"
next = "B"
[[steps]]
name = "B"
kind = "noop"
"#,
    ),
    (
        "broken.toml",
        r#"
name = "Broken"
version = 1
[[steps]]
name = "A"
kind = "fail"
config = { permanent = true, message = "no" }
"#,
    ),
];

/// Parses the text format into `series → value` (series = name plus sorted labels).
fn parse(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let key = match series.split_once('{') {
            None => series.to_string(),
            Some((name, labels)) => {
                let mut l: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                l.sort();
                format!("{name}{{{}}}", l.join(","))
            }
        };
        out.insert(key, value);
    }
    out
}

async fn scrape(f: &Fleet) -> HashMap<String, f64> {
    let r = reqwest::get(f.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    parse(&r.text().await.unwrap())
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_processes_run() {
    honua_runtime::install_crypto_provider();
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = Fleet::start(test_config(&redis.url(), dir.path()), 1, 1).await;
    let before = scrape(&f).await;
    let n = 5;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(f.submit("Metered", json!({})).await);
    }
    let failed = f.submit("Broken", json!({})).await;
    for id in &ids {
        assert_eq!(f.wait_finished(id).await.status, ProcessStatus::Completed);
    }
    assert_eq!(f.wait_finished(&failed).await.status, ProcessStatus::Failed);
    // Gauges are sampled every 5 s: wait for a sample that saw the workers.
    let after = wait_for("a fleet sample", DEADLINE, || async {
        let m = scrape(&f).await;
        (get(&m, m::REDIS_UP) == 1.0 && get(&m, m::WORKERS_LIVE) >= 1.0).then_some(m)
    })
    .await;
    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(
        delta(&format!(
            "{}{{process_type=\"Metered\"}}",
            m::PROCESS_STARTED
        )),
        n as f64
    );
    assert_eq!(
        delta(&format!(
            "{}{{process_type=\"Metered\"}}",
            m::PROCESS_COMPLETED
        )),
        n as f64
    );
    assert_eq!(
        delta(&format!(
            "{}{{process_type=\"Broken\",reason=\"permanent_error\"}}",
            m::PROCESS_FAILURES
        )),
        1.0
    );
    assert_eq!(
        delta(&format!(
            "{}{{kind=\"noop\",outcome=\"ok\",process_type=\"Metered\"}}",
            m::STEPS
        )),
        2.0 * n as f64
    );
    // A's result enqueued B in the worker's own commit; B's finished the process (the
    // scheduler's).
    assert_eq!(
        delta(&format!(
            "{}{{process_type=\"Metered\"}}",
            m::WORKER_TRANSITIONS
        )),
        n as f64
    );
    // Histograms have buckets (the guide's histogram_quantile query needs them).
    assert!(
        after
            .keys()
            .any(|k| k.starts_with(&format!("{}_bucket", m::PROCESS_DURATION))),
        "no duration buckets"
    );
    assert_eq!(
        delta(&format!(
            "{}_count{{process_type=\"Metered\",status=\"Completed\"}}",
            m::PROCESS_DURATION
        )),
        n as f64
    );
    // Fleet-wide gauges from Redis.
    assert_eq!(get(&after, m::ACTIVE_PROCESSES), 0.0);
    for stream in ["submit", "jobs", "events"] {
        assert!(
            after.contains_key(&format!("{}{{stream=\"{stream}\"}}", m::QUEUE_LAG)),
            "{stream}"
        );
        assert!(after.contains_key(&format!("{}{{stream=\"{stream}\"}}", m::QUEUE_PENDING)));
    }
    // Every exported honua_* family is a declared name (no ad-hoc metrics).
    for key in after.keys().filter(|k| k.starts_with("honua_")) {
        let name = key.split('{').next().unwrap();
        let base = name
            .trim_end_matches("_bucket")
            .trim_end_matches("_sum")
            .trim_end_matches("_count");
        assert!(
            m::ALL.contains(&base) || m::ALL.contains(&name),
            "undeclared metric {name}"
        );
    }
    f.stop().await;
}
