//! Failure tests with worker *processes*: kill -9, SIGSTOP (zombie), poison jobs, SIGTERM
//! hand-back, and kill -9 of redis-server itself.

use honua_shared::status::ProcessStatus;
use honua_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const DEFS: &[(&str, &str)] = &[
    defs::COUNT,
    (
        "long.toml",
        r#"
name = "Long"
version = 1
[[steps]]
name = "Count"
kind = "counter"
timeout = "5m"
config = { total = 200, tick_ms = 50 }
"#,
    ),
    (
        "nap.toml",
        r#"
name = "Nap"
version = 1
[[steps]]
name = "Slow"
kind = "slow"
config = { ms = 3000 }
"#,
    ),
    (
        "poison.toml",
        r#"
name = "Poison"
version = 1
[[steps]]
name = "Crash"
kind = "crash"
"#,
    ),
    defs::THREE,
];

fn config(redis: &RedisServer, dir: &tempfile::TempDir) -> honua_shared::config::Config {
    let mut c = test_config(&redis.url(), dir.path());
    c.custom_step_kinds = vec!["counter".into(), "crash".into(), "slow".into()];
    c
}

fn spawn(cfg: &honua_shared::config::Config, id: &str, log: &std::path::Path) -> WorkerProcess {
    WorkerProcess::spawn(env!("CARGO_BIN_EXE_honua-test-worker"), cfg, id, log)
}

fn starts(log: &std::path::Path, pid: &str) -> Vec<LogLine> {
    read_log(log)
        .into_iter()
        .filter(|l| l.event == "start" && l.process_id == pid)
        .collect()
}

async fn checkpoint_n(f: &Fleet, pid: &str) -> Option<u64> {
    let data = f.store().load_data(pid).await.ok()?;
    let v: Value = f.cfg.codec().decode(data.get("ck:Count")?).ok()?;
    v["n"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_step_resumes_from_its_checkpoint_on_another_worker() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let cfg = config(&redis, &dir);
    let log = dir.path().join("exec.log");
    // Scheduler in-process, workers as processes.
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let mut w1 = spawn(&cfg, "w1", &log);
    let pid = f.submit("Count", json!({})).await;
    wait_for("w1 to start the step", DEADLINE, || async {
        starts(&log, &pid).into_iter().find(|l| l.worker == "w1")
    })
    .await;
    let saved = wait_for("a few checkpoints", DEADLINE, || async {
        checkpoint_n(&f, &pid).await.filter(|n| *n >= 5)
    })
    .await;
    w1.kill9();
    let killed_at = f.store().server_time_ms().await.unwrap();
    let _w2 = spawn(&cfg, "w2", &log);
    let resumed = wait_for("w2 to resume the step", DEADLINE, || async {
        starts(&log, &pid).into_iter().find(|l| l.worker == "w2")
    })
    .await;
    assert!(
        resumed.value >= saved,
        "resumed from {} < saved {saved}",
        resumed.value
    );
    let rec = f.wait_finished(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    let step = &rec.steps["Count"];
    assert_eq!(step.worker.as_deref(), Some("w2"));
    assert_eq!(step.deliveries, Some(2), "one reclaim");
    let data = f.store().load_data(&pid).await.unwrap();
    let out: Value = f.cfg.codec().decode(&data["out:Count"]).unwrap();
    assert_eq!(out["n"], 40);
    assert!(
        !data.contains_key("ck:Count"),
        "the checkpoint is deleted with the step's result"
    );
    assert!(out["resumed_from"].as_u64().unwrap() >= saved);
    // Reported, not asserted: the time from kill -9 to the claim on the other worker, on
    // Redis's clock (lease 1.5 s + sweep 0.2 s here, plus w2's start-up).
    let claimed = step.claimed_ms.unwrap();
    eprintln!(
        "reclaim latency after kill -9: {} ms (lease {} ms, sweep {} ms)",
        claimed.saturating_sub(killed_at),
        cfg.worker.lease_ms,
        cfg.worker.sweep_ms
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_worker_cannot_commit_after_its_job_was_reclaimed() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = config(&redis, &dir);
    cfg.worker.lease_ms = 1000;
    let log = dir.path().join("exec.log");
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let w1 = spawn(&cfg, "w1", &log);
    let pid = f.submit("Nap", json!({})).await;
    wait_for("w1 to start", DEADLINE, || async {
        starts(&log, &pid).into_iter().find(|l| l.worker == "w1")
    })
    .await;
    w1.stop().await;
    let _w2 = spawn(&cfg, "w2", &log);
    let rec = f.wait_finished(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    assert_eq!(rec.steps["Slow"].worker.as_deref(), Some("w2"));
    // Wake the zombie: its heartbeat or its commit meets the fence.
    w1.signal(SIGCONT);
    wait_for("the zombie to hit the fence", DEADLINE, || async {
        w1.log_text().contains("claim is stale").then_some(())
    })
    .await;
    // Nothing changed: the record and the output are w2's, the step ran to one committed attempt, one step event was emitted.
    let after = f.record(&pid).await.unwrap();
    assert_eq!(after.steps["Slow"].worker.as_deref(), Some("w2"));
    assert_eq!(after.steps["Slow"].attempts().len(), 1);
    let out: Value = f
        .cfg
        .codec()
        .decode(&f.store().load_data(&pid).await.unwrap()["out:Slow"])
        .unwrap();
    assert_eq!(out["worker"], "w2");
    assert_eq!(
        entries_added(f.store(), &f.store().keys().results()).await,
        1
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_job_is_dead_lettered_at_exactly_max_deliveries() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = config(&redis, &dir);
    cfg.worker.lease_ms = 800;
    cfg.worker.max_deliveries = 3;
    let log = dir.path().join("exec.log");
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let pid = f.submit("Poison", json!({})).await;
    // Keep one worker process alive: each delivery of the poison job kills it.
    let mut n = 0;
    let mut current = spawn(&cfg, "p0", &log);
    let rec = wait_for("the process to fail", Duration::from_secs(120), || {
        if current.wait_exit(Duration::ZERO).is_some() {
            n += 1;
            current = spawn(&cfg, &format!("p{n}"), &log);
        }
        async { f.record(&pid).await.filter(|r| r.status.is_finished()) }
    })
    .await;
    assert_eq!(rec.status, ProcessStatus::Failed);
    assert_eq!(rec.code.as_deref(), Some("max_deliveries"));
    assert!(
        rec.error.as_ref().unwrap().contains("dead-lettered"),
        "{:?}",
        rec.error
    );
    assert_eq!(
        starts(&log, &pid).len(),
        3,
        "ran exactly max_deliveries times"
    );
    let dlq = f
        .store()
        .stream_entries(&f.store().keys().dlq(), 10)
        .await
        .unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].fields.get("pid"), Some(pid.as_str()));
    assert_eq!(dlq[0].fields.get("deliveries"), Some("3"));
    assert!(
        dlq[0]
            .fields
            .get("reason")
            .unwrap()
            .contains("max_deliveries")
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_running_steps_back_without_waiting_for_the_lease() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = config(&redis, &dir);
    // A lease far longer than the test deadline: only a hand-back lets w2 resume in time.
    cfg.worker.lease_ms = 600_000;
    cfg.worker.shutdown_grace_ms = 300;
    let log = dir.path().join("exec.log");
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let mut w1 = spawn(&cfg, "w1", &log);
    let pid = f.submit("Long", json!({})).await;
    let saved = wait_for("checkpoints", DEADLINE, || async {
        checkpoint_n(&f, &pid).await.filter(|n| *n >= 3)
    })
    .await;
    let _w2 = spawn(&cfg, "w2", &log);
    w1.signal(SIGTERM);
    let status = w1.wait_exit(DEADLINE).expect("w1 exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let resumed = wait_for("w2 to resume", DEADLINE, || async {
        starts(&log, &pid).into_iter().find(|l| l.worker == "w2")
    })
    .await;
    assert!(resumed.value >= saved);
    // w1 owned nothing when it left, so its consumer was deleted.
    let consumers = f.store().job_consumers().await.unwrap();
    assert!(consumers.iter().all(|c| c.name != "w1"), "{consumers:?}");
    let rec = f.wait_finished(&pid).await;
    assert_eq!(rec.status, ProcessStatus::Completed);
    assert_eq!(
        rec.steps["Count"].deliveries,
        Some(1),
        "a hand-back is not a crash"
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_and_restart_loses_no_acknowledged_process() {
    let mut redis = RedisServer::start_with(true);
    let dir = defs_dir(DEFS);
    let cfg = config(&redis, &dir);
    let f = Fleet::start(cfg.clone(), 1, 2).await;
    let c = reqwest::Client::new();
    let submit = || async {
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
    };
    let mut acked = Vec::new();
    for _ in 0..60 {
        acked.push(submit().await.expect("submission before the crash"));
    }
    redis.kill9();
    // While Redis is down, submissions are refused (503), never falsely acknowledged.
    assert!(submit().await.is_none());
    redis.restart();
    for _ in 0..40 {
        acked.push(wait_for("submission after restart", DEADLINE, submit).await);
    }
    for id in &acked {
        let rec = f.wait_finished(id).await;
        assert_eq!(
            rec.status,
            ProcessStatus::Completed,
            "{id}: {:?}",
            rec.error
        );
    }
    f.stop().await;
}

/// A killed worker's consumer (owning nothing) leaves the job group, and the worker leaves
/// the workers list, after two leases without a heartbeat; a live worker stays, even idle
/// (on Redis 7.0 a consumer's `idle` grows while it blocks on an empty stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_consumer_and_registry_entry_go_after_two_leases() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let cfg = config(&redis, &dir);
    let log = dir.path().join("exec.log");
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let store = f.store().clone();
    let seen = |name: &'static str| {
        let store = store.clone();
        async move {
            let consumers = store.job_consumers().await.unwrap();
            let workers = store.workers(100).await.unwrap();
            (
                consumers.iter().any(|c| c.name == name),
                workers.iter().any(|w| w.id == name),
            )
        }
    };
    // w1 runs a process alone (so it has a consumer), then w2 does; w1 is killed owning
    // nothing.
    let mut w1 = spawn(&cfg, "w1", &log);
    let id = f.submit("Three", json!({})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    assert_eq!(seen("w1").await, (true, true));
    w1.kill9();
    let _w2 = spawn(&cfg, "w2", &log);
    let id = f.submit("Three", json!({})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    wait_for("w1 to be retired", DEADLINE, || async {
        (seen("w1").await == (false, false)).then_some(())
    })
    .await;
    // A live worker whose consumer has been idle for more than two leases (Redis 7.0 counts
    // blocking reads of an empty stream as idle) is not retired: it heartbeats.
    wait_for("w2 idle for two leases", DEADLINE, || async {
        store
            .job_consumers()
            .await
            .unwrap()
            .into_iter()
            .find(|c| c.name == "w2" && c.idle_ms > cfg.worker.retire_idle().as_millis() as u64)
    })
    .await;
    assert!(
        !store
            .retire_idle_consumer("w2", cfg.worker.retire_idle())
            .await
            .unwrap()
    );
    assert_eq!(seen("w2").await, (true, true), "the live worker stays");
    f.stop().await;
}
