//! Whole-system tests with an in-process fleet on a real redis-server.

use honua_shared::envelope::Event;
use honua_shared::status::{ProcessStatus, StepStatus};
use honua_tests::*;
use serde_json::{Value, json};

const DEFS: &[(&str, &str)] = &[
    (
        "three.toml",
        r#"
name = "Three"
version = 1
[[steps]]
name = "A"
kind = "noop"
next = "B"
config = { output = { a = 1 } }
[[steps]]
name = "B"
kind = "noop"
next = "C"
[[steps]]
name = "C"
kind = "noop"
config = { output = { done = true } }
"#,
    ),
    (
        "fan.toml",
        r#"
name = "Fan"
version = 1
[[steps]]
name = "Start"
kind = "noop"
next = ["A", "B", "C"]
[[steps]]
name = "A"
kind = "noop"
next = "Join"
[[steps]]
name = "B"
kind = "noop"
next = "Join"
[[steps]]
name = "C"
kind = "noop"
next = "Join"
[[steps]]
name = "Join"
kind = "noop"
join = "all"
next = "Done"
[[steps]]
name = "Done"
kind = "noop"
"#,
    ),
    (
        "flaky.toml",
        r#"
name = "Flaky"
version = 1
[[steps]]
name = "Boom"
kind = "fail"
retry = { max_attempts = 3, initial_backoff = "10ms", max_backoff = "50ms" }
config = { message = "boom" }
"#,
    ),
    (
        "routed.toml",
        r#"
name = "Routed"
version = 1
[[steps]]
name = "Boom"
kind = "fail"
config = { message = "bad request", permanent = true }
[steps.on]
failed = "Cleanup"
[[steps]]
name = "Cleanup"
kind = "noop"
"#,
    ),
    (
        "gate.toml",
        r#"
name = "Gate"
version = 1
[[steps]]
name = "Prepare"
kind = "noop"
next = "Review"
max_visits = 3
[[steps]]
name = "Review"
kind = "approval"
config = { signal = "review" }
next = "Apply"
[steps.on]
rejected = "Prepare"
[[steps]]
name = "Apply"
kind = "noop"
"#,
    ),
    (
        "slowpoke.toml",
        r#"
name = "Slowpoke"
version = 1
timeout = "300ms"
[[steps]]
name = "Nap"
kind = "sleep"
config = { duration = "1h" }
"#,
    ),
    (
        "fragile.toml",
        r#"
name = "Fragile"
version = 1
[[steps]]
name = "Wait"
kind = "approval"
config = { signal = "go" }
next = "Work"
[[steps]]
name = "Work"
kind = "noop"
"#,
    ),
];

async fn fleet(
    redis: &RedisServer,
    dir: &tempfile::TempDir,
    schedulers: usize,
    workers: usize,
) -> Fleet {
    Fleet::start(test_config(&redis.url(), dir.path()), schedulers, workers).await
}

fn http() -> reqwest::Client {
    honua_runtime::install_crypto_provider();
    reqwest::Client::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_step_process_runs_end_to_end_over_http() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 2).await;
    let c = http();
    let r = c
        .post(f.url("/api/processes"))
        .json(&json!({"processType": "Three", "input": {"who": "test"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(location, format!("/api/processes/{id}"));
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
    for s in ["A", "B", "C"] {
        let st = &rec.steps[s];
        assert_eq!(st.status, StepStatus::Completed);
        assert_eq!(st.attempts().len(), 1, "{s} ran once");
        assert_eq!(st.attempt, 1);
    }
    // B was enqueued only after A committed.
    assert!(rec.steps["B"].queued_ms >= rec.steps["A"].ended_ms);
    // A's and B's workers enqueued the next step with their results (the fast path); only
    // C's result, which finishes the process, went to the scheduler as an event.
    assert_eq!(rec.steps_rev, 2, "{rec:?}");
    assert_eq!(
        entries_added(f.store(), &f.store().keys().results()).await,
        1
    );
    // Outputs are stored as MessagePack state blobs.
    let data = f.store().load_data(&id).await.unwrap();
    let out: Value = f.cfg.codec().decode(&data["out:C"]).unwrap();
    assert_eq!(out, json!({"done": true}));
    let input: Value = f.cfg.codec().decode(&data["input"]).unwrap();
    assert_eq!(input, json!({"who": "test"}));
    // The gateway's view.
    let v: Value = c
        .get(f.url(&location))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "Completed");
    assert_eq!(v["processType"], "Three");
    assert_eq!(v["steps"].as_array().unwrap().len(), 3);
    assert_eq!(v["steps"][0]["attempts"].as_array().unwrap().len(), 1);
    assert!(v["duration"].as_f64().unwrap() >= 0.0);
    assert!(v["currentSteps"].as_array().unwrap().is_empty());
    assert!(v["errorMessage"].is_null());
    // Finished records expire after the retention period.
    let ttl: i64 = redis::cmd("TTL")
        .arg(f.store().keys().process(&id))
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= f.cfg.retention_secs as i64, "ttl {ttl}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_and_join_waits_for_every_branch() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 2).await;
    let id = f.submit("Fan", json!({})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    let join = &rec.steps["Join"];
    assert_eq!(join.attempts().len(), 1, "join ran exactly once");
    for b in ["A", "B", "C"] {
        assert!(
            join.queued_ms >= rec.steps[b].ended_ms,
            "join queued before {b} ended"
        );
    }
    assert_eq!(rec.steps["Done"].status, StepStatus::Completed);
    // Start's worker fanned out itself; of the branches, those whose worker decided on a
    // state another branch had changed meanwhile went to the scheduler instead.
    assert!(rec.steps_rev >= 1, "{rec:?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_submission_over_http_and_redis() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 1).await;
    let c = http();
    let post = || {
        c.post(f.url("/api/processes"))
            .header("Idempotency-Key", "order-42")
            .json(&json!({"processType": "Three"}))
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(first.status(), 201);
    let id1 = first.json::<Value>().await.unwrap()["id"].clone();
    let second = post().await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(second.json::<Value>().await.unwrap()["id"], id1);

    // Through the submit stream, as any Redis client would.
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stream = f.store().keys().submit();
    for _ in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(&[
                "type",
                "Three",
                "id",
                "from-redis",
                "idempotency_key",
                "k-7",
                "input",
                r#"{"x":1}"#,
            ])
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let rec = f.wait_finished("from-redis").await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    // A bad submission is set aside with its reason, not retried forever.
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(&["type", "NoSuchType"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let q = wait_for("quarantined submission", DEADLINE, || async {
        let e = f
            .store()
            .stream_entries(&f.store().keys().quarantine(), 10)
            .await
            .ok()?;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert!(
        q[0].fields
            .get("reason")
            .unwrap()
            .contains("unknown process type")
    );
    // Wait until the submit stream is fully consumed, then count processes.
    wait_for("submissions consumed", DEADLINE, || async {
        let s = f
            .store()
            .stream_stats(&stream, honua_shared::keys::SCHEDULER_GROUP)
            .await
            .ok()?;
        (s.length == 0).then_some(())
    })
    .await;
    let all: u64 = redis::cmd("ZCARD")
        .arg(f.store().keys().index_all())
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    assert_eq!(all, 2, "one process per idempotency key");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_never_enqueue_a_step_twice() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 2, 2).await;
    let n = 150;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(f.submit("Fan", json!({})).await);
    }
    for id in &ids {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
        for (name, s) in &rec.steps {
            assert_eq!(
                s.attempts().len(),
                1,
                "{id} step {name} ran {} times",
                s.attempts().len()
            );
        }
    }
    // Six steps per process: exactly 6n jobs ever entered the job stream.
    let added = entries_added(f.store(), &f.store().keys().jobs()).await;
    assert_eq!(added, 6 * n as u64);
    assert_eq!(f.committed(), 6 * n as u64);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_then_the_process_fails() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 1).await;
    let id = f.submit("Flaky", json!({})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    let boom = &rec.steps["Boom"];
    assert_eq!(boom.attempts().len(), 3, "three attempts");
    assert_eq!(boom.attempt, 3);
    let msg = rec.error.unwrap();
    assert!(
        msg.contains("Boom") && msg.contains("boom") && msg.contains("3 attempts"),
        "{msg}"
    );
    assert_eq!(rec.code.as_deref(), Some("step_error"));

    // A permanent error is not retried and follows the `failed` route.
    let id = f.submit("Routed", json!({})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    assert_eq!(rec.steps["Boom"].attempts().len(), 1);
    assert_eq!(rec.steps["Boom"].status, StepStatus::Failed);
    assert_eq!(rec.steps["Cleanup"].status, StepStatus::Completed);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_gate_waits_for_signals_and_routes_rejection() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 1).await;
    let c = http();
    let id = f.submit("Gate", json!({})).await;
    let waiting = || async {
        f.record(&id)
            .await
            .filter(|r| r.status == ProcessStatus::WaitingForApproval)
    };
    let rec = wait_for("waiting for approval", DEADLINE, waiting).await;
    assert_eq!(rec.steps["Prepare"].visit, 1);
    let wrong = c
        .post(f.url(&format!("/api/processes/{id}/signal/other")))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 409);
    let r = c
        .post(f.url(&format!("/api/processes/{id}/signal/review")))
        .json(&json!({"value": "reject"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Rejection loops back to Prepare, then waits again.
    let rec = wait_for("second review", DEADLINE, || async {
        f.record(&id).await.filter(|r| {
            r.status == ProcessStatus::WaitingForApproval && r.steps["Prepare"].visit == 2
        })
    })
    .await;
    assert_eq!(rec.steps["Review"].visit, 2);
    let r = c
        .post(f.url(&format!("/api/processes/{id}/signal/review")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    assert_eq!(rec.steps["Apply"].status, StepStatus::Completed);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_timeout_ends_in_timed_out() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 1).await;
    let id = f.submit("Slowpoke", json!({})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::TimedOut);
    assert_eq!(rec.code.as_deref(), Some("process_timeout"));
    assert!(rec.error.unwrap().contains("timeout exceeded"));
    assert_eq!(rec.steps["Nap"].status, StepStatus::Cancelled);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_quarantines_the_process_not_the_worker() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 1).await;
    let mut conn = f.store().conn();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("garbage", b"{not msgpack".to_vec(), "state_corrupt"),
        (
            "deep",
            {
                let mut b = vec![b'H', 1, 0];
                b.extend(std::iter::repeat_n(0x91u8, 5000));
                b.push(0xc0);
                b
            },
            "state_corrupt",
        ),
        ("version", vec![b'H', 99, 0, 0xc0], "state_unknown_version"),
        (
            "huge",
            {
                let mut b = vec![b'H', 1, 0];
                b.extend(std::iter::repeat_n(0xc0u8, 2 * 1024 * 1024));
                b
            },
            "state_too_large",
        ),
    ];
    for (name, blob, code) in cases {
        let id = f.submit("Fragile", json!({})).await;
        wait_for("waiting", DEADLINE, || async {
            f.record(&id)
                .await
                .filter(|r| r.status == ProcessStatus::WaitingForApproval)
        })
        .await;
        let _: () = redis::cmd("HSET")
            .arg(f.store().keys().data(&id))
            .arg("input")
            .arg(blob)
            .query_async(&mut conn)
            .await
            .unwrap();
        f.store()
            .send_event(&Event::Signal {
                process_id: id.clone(),
                name: "go".into(),
                value: "approve".into(),
                by: None,
            })
            .await
            .unwrap();
        let rec = f.wait_finished(&id).await;
        assert_eq!(rec.status, ProcessStatus::Failed, "{name}");
        assert_eq!(rec.code.as_deref(), Some(code), "{name}: {:?}", rec.error);
        assert!(rec.error.unwrap().contains("unreadable"), "{name}");
        assert_eq!(
            rec.steps["Work"].attempts().len(),
            1,
            "{name}: not redelivered"
        );
    }
    // The worker is still healthy.
    let id = f.submit("Three", json!({})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rejects_bad_input_and_reports_redis_outages() {
    let mut redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir, 1, 1).await;
    let c = http();
    let h = c.get(f.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), 200);
    // Degraded until the worker's first heartbeat; redis is what this test is about.
    let h = h.json::<Value>().await.unwrap();
    assert!(h["status"] == "Healthy" || h["status"] == "Degraded", "{h}");
    assert_eq!(h["checks"]["redis"], "Healthy", "{h}");
    let cases = [
        ("{not json", 400, "malformed_json"),
        (r#"{"processType":"Nope"}"#, 400, "unknown_process_type"),
        (
            r#"{"processType":"Three","bogus":1}"#,
            400,
            "malformed_json",
        ),
        (
            r#"{"processType":"Three","input":[1]}"#,
            400,
            "invalid_input",
        ),
        (
            r#"{"processType":"Three","id":"a/b"}"#,
            400,
            "invalid_field",
        ),
    ];
    for (body, status, code) in cases {
        let r = c
            .post(f.url("/api/processes"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], code, "{body}");
    }
    let big = format!(
        r#"{{"processType":"Three","input":{{"s":"{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    // On a client of its own: the server answers 413 before reading the whole body and
    // closes that connection, which a shared pool could hand to the next request.
    let r = http()
        .post(f.url("/api/processes"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = c.get(f.url("/api/processes/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    redis.kill9();
    let h = c.get(f.url("/health")).send().await.unwrap();
    assert_eq!(h.status(), 503);
    assert_eq!(
        h.json::<Value>().await.unwrap()["checks"]["redis"],
        "Unhealthy"
    );
    let r = c
        .post(f.url("/api/processes"))
        .json(&json!({"processType": "Three"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));

    redis.restart();
    let h = wait_for("healthy again", DEADLINE, || async {
        let r = c.get(f.url("/health")).send().await.ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_eq!(h.status(), 200);
    // Nothing was persisted (no AOF here), so the fleet must recreate its groups and work.
    let id = wait_for("submission after restart", DEADLINE, || async {
        let r = c
            .post(f.url("/api/processes"))
            .json(&json!({"processType": "Three"}))
            .send()
            .await
            .ok()?;
        if r.status() != 201 {
            return None;
        }
        Some(r.json::<Value>().await.ok()?["id"].as_str()?.to_string())
    })
    .await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    f.stop().await;
}

/// A submission waiting for a replica (`WAIT`: one is asked for, none is there, so the
/// server holds the call until its timeout) blocks only the submissions' own connection:
/// the engine's other calls, on the shared one, are answered meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_waiting_for_a_replica_holds_up_no_other_call() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.wait_replicas = Some(1);
    cfg.wait_replicas_timeout_ms = 120_000;
    let f = Fleet::start(cfg, 0, 0).await;
    let engine = f.engine.clone();
    let submission =
        tokio::spawn(async move { engine.create(&submission_of("Three"), None).await });
    let watch = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    wait_for(
        "the submission's WAIT blocked on the server",
        DEADLINE,
        || {
            let mut watch = watch.clone();
            async move {
                let clients: String = redis::cmd("CLIENT")
                    .arg("LIST")
                    .query_async(&mut watch)
                    .await
                    .unwrap();
                clients
                    .lines()
                    .any(|l| l.contains("cmd=wait"))
                    .then_some(())
            }
        },
    )
    .await;
    // On a shared connection this would wait behind the WAIT (and time out).
    f.store().server_time_ms().await.unwrap();
    let (meta, _) = f.store().load_process("not-there").await.unwrap();
    assert!(meta.is_empty());
    assert!(
        !submission.is_finished(),
        "the other calls were answered while the WAIT still held its connection"
    );
    submission.abort();
}
