//! Reclaim under real conditions, with slow `http` steps against a recording server that
//! counts every call, real redis-server and worker processes that are paused (SIGSTOP) or
//! cut off from Redis (kill -9 and restart of the server):
//!
//! - one claim (entry id + delivery count) starts at most one execution, even when a paused
//!   worker's reader and its own sweeper both get the same entry on resume;
//! - a saturated fleet still reclaims a frozen worker's jobs within lease + sweep;
//! - a Redis restart does not make live workers' steps reclaimable.

use honua_shared::config::Config;
use honua_shared::keys::WORKERS_GROUP;
use honua_shared::status::{ProcessStatus, StepStatus};
use honua_shared::store::Store;
use honua_tests::recorder::{Recorder, slow_definition};
use honua_tests::*;
use serde_json::json;
use std::time::Duration;

/// A recording server, the one-step `Call` type taking `step_ms` on it, and a scheduler
/// (no in-process workers) with the test config as `tune` leaves it.
async fn setup(
    redis: &RedisServer,
    step_ms: u64,
    tune: impl FnOnce(&mut Config),
) -> (Recorder, tempfile::TempDir, Fleet) {
    let rec = Recorder::start().await;
    let def = slow_definition("Call", &rec, step_ms);
    let dir = defs_dir(&[("call.toml", def.as_str())]);
    let mut cfg = test_config(&redis.url(), dir.path());
    tune(&mut cfg);
    let f = Fleet::start(cfg, 1, 0).await;
    (rec, dir, f)
}

fn spawn(cfg: &Config, rec: &Recorder, id: &str, dir: &tempfile::TempDir) -> WorkerProcess {
    let slots = cfg.worker.max_concurrent_steps.to_string();
    WorkerProcess::spawn_with_env(
        env!("CARGO_BIN_EXE_honua-test-worker"),
        cfg,
        id,
        &dir.path().join("exec.log"),
        &[
            ("HONUA_HTTP_ALLOWLIST", rec.allow().as_str()),
            ("HONUA_MAX_CONCURRENT_STEPS", slots.as_str()),
        ],
    )
}

/// Pending entries of `consumer`: (entry id, idle ms, deliveries).
async fn pending_of(store: &Store, consumer: &str) -> Vec<(String, u64, u64)> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(store.keys().jobs())
        .arg(WORKERS_GROUP)
        .arg("-")
        .arg("+")
        .arg(1000)
        .arg(consumer)
        .query_async(&mut store.conn())
        .await
        .unwrap_or_default();
    rows.into_iter()
        .map(|(id, _, idle, n)| (id, idle, n))
        .collect()
}

/// Processes whose `Call` step is running on `worker`.
async fn running_on(f: &Fleet, ids: &[String], worker: &str) -> Vec<String> {
    let mut out = Vec::new();
    for id in ids {
        if let Some(r) = f.record(id).await
            && let Some(s) = r.steps.get("Call")
            && s.status == StepStatus::Running
            && s.worker.as_deref() == Some(worker)
        {
            out.push(id.clone());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_delivered_to_a_paused_worker_runs_once_on_resume() {
    let redis = RedisServer::start();
    let (rec, dir, f) = setup(&redis, 300, |c| c.worker.lease_ms = 1_000).await;
    let cfg = f.cfg.clone();
    let w1 = spawn(&cfg, &rec, "w1", &dir);
    // w1's first heartbeat registers it; its reader starts with it.
    wait_for("w1 to start", DEADLINE, || async {
        let w = f.store().workers(10).await.ok()?;
        w.iter().any(|w| w.id == "w1").then_some(())
    })
    .await;
    // Freeze w1 while it is blocked in XREADGROUP (it almost always is: it has no work and
    // blocks for a second per read); Redis then delivers the next job to the frozen read.
    // A freeze that falls between two reads leaves the job undelivered: run it and try
    // again with a new process.
    let mut tries = 0;
    let pid = loop {
        tries += 1;
        assert!(tries <= 20, "never froze w1 inside its blocking read");
        w1.stop().await;
        let pid = f.submit("Call", json!({})).await;
        wait_for("the job to be enqueued", DEADLINE, || async {
            let r = f.record(&pid).await?;
            let s = r.steps.get("Call")?;
            (s.status == StepStatus::Queued).then_some(())
        })
        .await;
        let delivered = !pending_of(f.store(), "w1").await.is_empty();
        if delivered {
            break pid;
        }
        w1.signal(SIGCONT);
        f.wait_finished(&pid).await;
    };
    // The delivered entry ages past the lease while w1 is frozen: on resume, both w1's
    // reader (holding the read reply, delivery count 1) and w1's sweeper (idle > lease)
    // get it.
    let lease = cfg.worker.lease_ms;
    wait_for("the delivery to age past the lease", DEADLINE, || async {
        let p = pending_of(f.store(), "w1").await;
        p.iter()
            .all(|(_, idle, _)| *idle > lease + 2 * cfg.worker.sweep_ms)
            .then_some(())
    })
    .await;
    w1.signal(SIGCONT);
    let r = f.wait_finished(&pid).await;
    assert_eq!(r.status, ProcessStatus::Completed, "{:?}", r.error);
    let step = &r.steps["Call"];
    assert_eq!(
        rec.calls(&pid),
        1,
        "one claim ran once (deliveries {:?}, history {:?})",
        step.deliveries,
        step.attempts()
    );
    assert_eq!(step.attempts().len(), 1, "{:?}", step.attempts());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_fleet_reclaims_a_frozen_workers_jobs_within_the_lease() {
    let redis = RedisServer::start();
    let (rec, dir, f) = setup(&redis, 1_500, |c| c.worker.max_concurrent_steps = 4).await;
    let cfg = f.cfg.clone();
    let w1 = spawn(&cfg, &rec, "w1", &dir);
    let w2 = spawn(&cfg, &rec, "w2", &dir);
    let w3 = spawn(&cfg, &rec, "w3", &dir);
    // Far more work than the fleet's 12 slots: the live workers stay saturated for the
    // whole test (60 × 1.5 s on 8 live slots is over 10 s of backlog).
    let mut ids = Vec::new();
    for _ in 0..60 {
        ids.push(f.submit("Call", json!({})).await);
    }
    let held = wait_for("w3 to run a full set of steps", DEADLINE, || async {
        let r = running_on(&f, &ids, "w3").await;
        (r.len() == cfg.worker.max_concurrent_steps).then_some(r)
    })
    .await;
    w3.stop().await;
    let frozen_at = f.store().server_time_ms().await.unwrap();
    // What w3 really holds once frozen (a commit may have landed just before the stop).
    let held: Vec<String> = running_on(&f, &held, "w3").await;
    assert!(!held.is_empty());
    let backlog = f
        .store()
        .stream_stats(&f.store().keys().jobs(), WORKERS_GROUP)
        .await
        .unwrap()
        .lag
        .unwrap_or(0);
    assert!(backlog >= 8, "the fleet is saturated (lag {backlog})");
    // The claim is due one lease after w3's last heartbeat and a sweep later; the slack of
    // another lease absorbs a loaded machine (this binary's tests run 10 worker processes
    // at once), and still fails the old behaviour by far: a saturated fleet then reclaimed
    // only once its backlog drained, over 10 s after the freeze.
    let bound = 2 * cfg.worker.lease_ms + cfg.worker.sweep_ms + 1_000;
    for pid in &held {
        let claimed = wait_for("another worker to claim w3's job", DEADLINE, || async {
            let r = f.record(pid).await?;
            let s = r.steps.get("Call")?;
            (s.worker.as_deref() != Some("w3")).then_some(s.claimed_ms)
        })
        .await
        .expect("claimed_ms of a claimed step");
        let after = claimed.saturating_sub(frozen_at);
        assert!(
            after <= bound,
            "{pid}: claimed {after} ms after the freeze (bound 2 × lease + sweep + 1 s = {bound} ms)"
        );
    }
    w3.signal(SIGCONT);
    for id in &ids {
        let r = f.wait_finished(id).await;
        assert_eq!(r.status, ProcessStatus::Completed, "{id}: {:?}", r.error);
    }
    drop((w1, w2));
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_does_not_reclaim_live_workers_steps() {
    let mut redis = RedisServer::start_with(true);
    // Steps outlast the outage (2 × lease) and the restart, so every one is mid-call while
    // Redis is away and after it is back.
    let (rec, dir, f) = setup(&redis, 8_000, |c| c.worker.max_concurrent_steps = 4).await;
    let cfg = f.cfg.clone();
    let _w1 = spawn(&cfg, &rec, "w1", &dir);
    let _w2 = spawn(&cfg, &rec, "w2", &dir);
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(f.submit("Call", json!({})).await);
    }
    wait_for("every step to be mid-call", DEADLINE, || async {
        ids.iter().all(|id| rec.calls(id) == 1).then_some(())
    })
    .await;
    redis.kill9();
    // The fault itself: Redis stays down for two leases, longer than any lease, so every
    // pending entry looks idle past the lease once the server is back.
    tokio::time::sleep(Duration::from_millis(2 * cfg.worker.lease_ms)).await;
    redis.restart();
    for id in &ids {
        let r = f.wait_finished(id).await;
        assert_eq!(r.status, ProcessStatus::Completed, "{id}: {:?}", r.error);
        let s = &r.steps["Call"];
        assert_eq!(
            s.deliveries,
            Some(1),
            "{id}: a live worker's step was reclaimed after the restart ({:?})",
            s.attempts()
        );
        assert_eq!(rec.calls(id), 1, "{id}: the step ran again");
    }
    f.stop().await;
}
