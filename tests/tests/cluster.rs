//! Whole-system tests on a local Redis Cluster (three primaries, three replicas): with the
//! deployment's one partition (every key under the hash tag `{0}`, so on one primary and
//! its replica), and with eight partitions spread over the primaries; a primary killed, and
//! a live partition's slot moved to another primary, both under load. Each test starts its
//! own cluster (the failover and resharding tests change its topology).

use honua_shared::config::Config;
use honua_shared::envelope::Submission;
use honua_shared::status::{ProcessStatus, StepStatus};
use honua_tests::*;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `Held`: three steps, the middle one an `http` call to `url`, so workers hold jobs at a
/// kill while the call waits.
fn held(url: &str) -> String {
    format!(
        r#"
name = "Held"
version = 1
[[steps]]
name = "A"
kind = "noop"
next = "B"
[[steps]]
name = "B"
kind = "http"
config = {{ url = "{url}" }}
next = "C"
[[steps]]
name = "C"
kind = "noop"
"#
    )
}

/// An HTTP endpoint (`<base>/hold`) that counts calls and answers them only once
/// `release` is set.
async fn holding_server(release: tokio::sync::watch::Receiver<bool>) -> (String, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/hold",
        axum::routing::post(move || {
            let (calls, mut release) = (counted.clone(), release.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let _ = release.wait_for(|r| *r).await;
                axum::Json(json!({"ok": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, calls)
}

fn cluster_config(cluster: &RedisCluster, dir: &tempfile::TempDir, prefix: &str) -> Config {
    let mut c = test_config(honua_shared::config::DEFAULT_REDIS_URL, dir.path());
    c.redis_cluster_nodes = cluster.seeds();
    c.key_prefix = prefix.into();
    c
}

fn http() -> reqwest::Client {
    honua_runtime::install_crypto_provider();
    reqwest::Client::new()
}

async fn get_json<T: serde::de::DeserializeOwned>(c: &reqwest::Client, url: &str) -> T {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// Posts a submission over HTTP; returns the status code and the body.
async fn post_process(c: &reqwest::Client, f: &Fleet, body: &Value) -> (u16, Value) {
    let r = c
        .post(f.url("/api/processes"))
        .json(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json::<Value>().await.unwrap())
}

/// Submits a process over HTTP (201 expected) and returns its id.
async fn submit(c: &reqwest::Client, f: &Fleet, body: Value) -> String {
    let (status, r) = post_process(c, f, &body).await;
    assert_eq!(status, 201);
    r["id"].as_str().unwrap().to_string()
}

/// The libraries `FUNCTION LIST` shows on node `n` (asked directly, not through the cluster).
fn libraries_on(n: &RedisServer) -> Vec<String> {
    let mut c = n.client().get_connection().unwrap();
    let libs: Vec<std::collections::HashMap<String, redis::Value>> =
        redis::cmd("FUNCTION").arg("LIST").query(&mut c).unwrap();
    libs.iter()
        .filter_map(|l| redis::from_redis_value(l.get("library_name")?.clone()).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_step_fan_out_and_approval_flows_complete_on_a_cluster() {
    let cluster = RedisCluster::start();
    let dir = defs_dir(&[defs::THREE, defs::GATE, defs::FAN]);
    let mut cfg = cluster_config(&cluster, &dir, "flows");
    // A submission is acknowledged once its replica confirms it, or anyway after this long:
    // long enough that a loaded machine's replica always confirms in time here.
    cfg.wait_replicas_timeout_ms = 60_000;
    let f = Fleet::start(cfg, 1, 2).await;
    let c = http();

    // Three steps, submitted over HTTP.
    let id = submit(
        &c,
        &f,
        json!({"processType": "Three", "input": {"who": "cluster"}}),
    )
    .await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
    for s in ["A", "B", "C"] {
        assert_eq!(rec.steps[s].attempts().len(), 1, "{s} ran once");
    }
    // Each step committed once: A's and B's workers with their successors, C's result
    // through the scheduler.
    assert_eq!(rec.steps_rev, 2, "{rec:?}");
    assert_eq!(
        entries_added(f.store(), &f.store().keys().results()).await,
        1
    );

    // Fan-out and join.
    let id = f.submit("Fan", json!({})).await;
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
    let join = &rec.steps["Join"];
    assert_eq!(join.attempts().len(), 1, "join ran exactly once");
    for b in ["A", "B", "C"] {
        assert!(join.queued_ms >= rec.steps[b].ended_ms, "join before {b}");
    }

    // Approval: waits for the signal, then completes.
    let id = f.submit("Gate", json!({})).await;
    wait_for("waiting for approval", DEADLINE, || async {
        f.record(&id)
            .await
            .filter(|r| r.status == ProcessStatus::WaitingForApproval)
    })
    .await;
    let r = c
        .post(f.url(&format!("/api/processes/{id}/signal/review")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
    assert_eq!(rec.steps["Apply"].status, StepStatus::Completed);

    // Submissions made at the same time share their `WAIT`s (one covers every commit its
    // connection had answered when it went out), and each is on the replica when it is
    // acknowledged.
    let home = cluster.primary_of(f.store().keys().submit().as_str());
    let replica = cluster.replica_of(home);
    let waits_on_home = || {
        let mut conn = cluster.nodes[home].client().get_connection().unwrap();
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut conn)
            .unwrap();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_wait:calls="))
            .map_or(0, |rest| {
                rest.split(',').next().unwrap().parse::<usize>().unwrap()
            })
    };
    let before = waits_on_home();
    let mut on_replica = cluster.nodes[replica]
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("READONLY")
        .query_async(&mut on_replica)
        .await
        .unwrap();
    const AT_ONCE: usize = 64;
    let submissions: Vec<_> = (0..AT_ONCE)
        .map(|i| {
            let (engine, keys, mut on_replica) = (
                f.engine.clone(),
                f.store().keys().clone(),
                on_replica.clone(),
            );
            tokio::spawn(async move {
                let sub = Submission {
                    input: json!({"i": i}),
                    ..submission_of("Three")
                };
                let id = engine.create(&sub, None).await.unwrap().id().to_string();
                let on_replica: Option<String> = redis::cmd("HGET")
                    .arg(keys.process(&id))
                    .arg("type")
                    .query_async(&mut on_replica)
                    .await
                    .unwrap();
                (id, on_replica)
            })
        })
        .collect();
    for s in submissions {
        let (id, on_replica) = s.await.unwrap();
        assert_eq!(
            on_replica.as_deref(),
            Some("Three"),
            "{id} was acknowledged before its replica had it"
        );
    }
    let waits = waits_on_home() - before;
    assert!(
        (1..AT_ONCE).contains(&waits),
        "{waits} WAITs for {AT_ONCE} submissions at once"
    );

    // Keyless reads (INFO, TIME, PING) and the stream reads (XINFO) of health and queues.
    let health: Value = get_json(&c, &f.url("/health")).await;
    assert_eq!(health["checks"]["redis"], "Healthy", "{health}");
    let queues: Vec<Value> = get_json(&c, &f.url("/api/queues")).await;
    assert_eq!(queues.len(), 4, "{queues:?}");
    assert!(queues.iter().all(|q| q["missing"] == false), "{queues:?}");
    let info = f.store().server_info().await.unwrap();
    let home = cluster.primary_of(f.store().keys().submit().as_str());
    let run_id: String = {
        let mut conn = cluster.nodes[home].client().get_connection().unwrap();
        let info: String = redis::cmd("INFO").arg("server").query(&mut conn).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        info.run_id, run_id,
        "server info comes from the home primary"
    );

    // The function library is on every node (loaded on the primaries, replicated).
    let lib = honua_shared::scripts::Library::get().name().to_string();
    for n in &cluster.nodes {
        assert!(
            libraries_on(n).contains(&lib),
            "node {} lacks {lib}",
            n.port
        );
    }
    // A primary that lost it (as a node that joins later never had it) gets it back on the
    // first call that misses it, and the process goes on.
    let is_primary = |n: &RedisServer| {
        let mut c = n.client().get_connection().unwrap();
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).unwrap();
        redis::from_redis_value::<String>(role[0].clone()).unwrap() == "master"
    };
    let other = (0..cluster.nodes.len())
        .find(|&i| i != home && is_primary(&cluster.nodes[i]))
        .unwrap();
    for i in [home, other] {
        let mut c = cluster.nodes[i].client().get_connection().unwrap();
        let _: () = redis::cmd("FUNCTION")
            .arg("DELETE")
            .arg(&lib)
            .query(&mut c)
            .unwrap();
        assert!(!libraries_on(&cluster.nodes[i]).contains(&lib));
    }
    let id = f.submit("Three", json!({})).await;
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    for i in [home, other] {
        assert!(
            libraries_on(&cluster.nodes[i]).contains(&lib),
            "not reloaded"
        );
    }
    // A scan over all keys would see one node's: refused.
    let scan: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
        .arg(0)
        .query_async(&mut f.store().conn())
        .await;
    let e = scan.unwrap_err();
    assert_eq!(e.kind(), redis::ErrorKind::InvalidClientConfig, "{e}");
    f.stop().await;
}

/// Submits `Held` with idempotency key `key`, retrying while the cluster fails over (a
/// retried submission that had been stored is answered with the same process).
async fn submit_until_stored(f: &Fleet, key: &str) -> String {
    let sub = Submission {
        process_type: "Held".into(),
        version: None,
        input: json!({"key": key}),
        id: None,
        idempotency_key: Some(key.into()),
        tenant: None,
        trace: Default::default(),
    };
    wait_for("a stored submission", DEADLINE, || async {
        f.engine
            .create(&sub, None)
            .await
            .ok()
            .map(|s| s.id().to_string())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_recovers_when_the_home_primary_is_killed_and_its_replica_promoted() {
    let mut cluster = RedisCluster::start();
    let (release, released) = tokio::sync::watch::channel(false);
    let (base, calls) = holding_server(released).await;
    let dir = defs_dir(&[("held.toml", &held(&format!("{base}/hold")))]);
    let mut cfg = cluster_config(&cluster, &dir, "failover");
    cfg.worker.http_allowlist = vec![format!("{base}/")];
    // Jobs held across the failover are reclaimed, maybe more than once: no dead letters.
    cfg.worker.max_deliveries = 20;
    // After the failover the promoted primary has no replica: every submission then waits
    // this long for one (and is acknowledged anyway).
    cfg.wait_replicas_timeout_ms = 250;
    let f = Fleet::start(cfg, 1, 2).await;
    let home_key = f.store().keys().submit().to_string();
    let home = cluster.primary_of(&home_key);
    let replica = cluster.replica_of(home);

    // A small load in flight: every process's `B` held by a worker. The last submission is
    // acknowledged just before the kill: `wait_replicas` (1 on a cluster) made sure the
    // replica has it, so the promoted replica knows every acknowledged process.
    const BEFORE: usize = 20;
    const AFTER: usize = 10;
    assert_eq!(f.cfg.replicas_to_wait(), 1);
    let mut ids = Vec::new();
    for i in 0..BEFORE - 1 {
        ids.push(submit_until_stored(&f, &format!("before-{i}")).await);
    }
    wait_for("every B called", DEADLINE, || async {
        (calls.load(Ordering::SeqCst) as usize >= BEFORE - 1).then_some(())
    })
    .await;
    let mut in_flight = 0;
    for id in &ids {
        in_flight += usize::from(!f.record(id).await.unwrap().status.is_finished());
    }
    assert_eq!(in_flight, BEFORE - 1, "every B is held at the kill");
    ids.push(submit_until_stored(&f, "before-last").await);
    let killed = std::time::Instant::now();
    cluster.kill9(home);
    let replica_node = cluster.nodes[replica].client();
    let promotion = std::thread::spawn(move || {
        let mut c = replica_node.get_connection().unwrap();
        honua_tests::cluster::poll("the replica's promotion", DEADLINE, || {
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).ok()?;
            let role: String = redis::from_redis_value(role.first()?.clone()).ok()?;
            (role == "master").then(|| killed.elapsed())
        })
    });
    // The held calls return while the slot has no primary: their workers' commits fail and
    // are retried, or their jobs are reclaimed after the lease.
    release.send(true).unwrap();

    // Submissions during the failover are retried until the promoted replica takes them.
    for i in 0..AFTER {
        ids.push(submit_until_stored(&f, &format!("after-{i}")).await);
        if i == 0 {
            eprintln!(
                "first submission stored {} ms after the kill",
                killed.elapsed().as_millis()
            );
        }
    }
    eprintln!(
        "replica promoted {} ms after the kill",
        promotion.join().unwrap().as_millis()
    );
    let promoted = cluster.primary_of(&home_key);
    assert_eq!(promoted, replica, "the replica took over the slot");
    cluster.wait_healthy();

    // Every process completes, each step committed once.
    assert_each_completed_once(&f, &ids, 3).await;
    eprintln!(
        "{} processes in flight at the kill; all {} completed {} ms after it",
        BEFORE,
        ids.len(),
        killed.elapsed().as_millis()
    );
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_complete_on_eight_partitions_spread_over_the_primaries() {
    use honua_shared::partition::partition_of;
    const P: u16 = 8;
    let cluster = RedisCluster::start();
    let dir = defs_dir(&[defs::THREE, defs::GATE, defs::FAN]);
    let mut cfg = cluster_config(&cluster, &dir, "parts");
    cfg.partitions = P;
    let f = Fleet::start(cfg, 1, 2).await;
    let c = http();
    let parts = f.store().all();
    let primaries: std::collections::BTreeSet<usize> = parts
        .iter()
        .map(|s| cluster.primary_of(s.keys().submit().as_str()))
        .collect();
    assert!(primaries.len() >= 2, "partitions on {primaries:?}");

    // Each flow a few times over HTTP, so every kind runs in several partitions.
    let mut ids = Vec::new();
    for t in ["Three", "Fan", "Gate"] {
        for i in 0..6 {
            let id = submit(&c, &f, json!({"processType": t, "input": {"i": i}})).await;
            ids.push((t, id));
        }
    }
    for (_, id) in ids.iter().filter(|(t, _)| *t == "Gate") {
        f.approve(&c, id, "review").await;
    }
    let mut steps = 0u64;
    let mut steps_rev = 0u64;
    let mut used = std::collections::BTreeSet::new();
    for (t, id) in &ids {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{t} {rec:?}");
        // A Gate's approval step is decided by its signal (an event), not a worker.
        steps += rec.steps.len() as u64 - u64::from(*t == "Gate");
        steps_rev += rec.steps_rev;
        used.insert(partition_of(id, P));
    }
    assert!(used.len() >= 4, "processes in partitions {used:?}");
    // Every step committed once: by its worker with its successors, or through its
    // partition's results stream.
    let mut results = 0;
    for s in &parts {
        results += entries_added(s, &s.keys().results()).await;
    }
    assert_eq!(results + steps_rev, steps, "one commit per step");

    // An idempotent resubmission answers the stored process.
    let body = json!({"processType": "Three", "input": {}, "idempotencyKey": "order-8"});
    let (_, first) = post_process(&c, &f, &body).await;
    let (status, again) = post_process(&c, &f, &body).await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], first["id"]);

    let queues: Vec<Value> = get_json(&c, &f.url("/api/queues")).await;
    assert_eq!(queues.len(), 4 * usize::from(P) + 4, "{queues:?}");
    assert!(queues.iter().all(|q| q["missing"] == false), "{queues:?}");
    f.stop().await;
}

/// A steady stream of `Three` submissions from `submitters` concurrent tasks, each with an
/// idempotency key of its own and retried with it until stored (a retried submission that
/// had been stored is answered with the same process), until [`Load::stop`].
struct Load {
    acked: Arc<Mutex<Vec<Acked>>>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(f: &Fleet, submitters: usize) -> Self {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..submitters)
            .map(|t| {
                let (engine, acked, failed, stop) = (
                    f.engine.clone(),
                    acked.clone(),
                    failed.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    for n in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let sub = Submission {
                            process_type: "Three".into(),
                            version: None,
                            input: json!({"n": n}),
                            id: None,
                            idempotency_key: Some(format!("load-{t}-{n}")),
                            tenant: None,
                            trace: Default::default(),
                        };
                        let asked = Instant::now();
                        let end = asked + DEADLINE;
                        let id = loop {
                            match engine.create(&sub, None).await {
                                Ok(s) => break s.id().to_string(),
                                Err(e) => {
                                    assert!(Instant::now() < end, "never stored: {e}");
                                    failed.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                }
                            }
                        };
                        acked.lock().unwrap().push(Acked {
                            id,
                            asked,
                            acked: Instant::now(),
                        });
                    }
                })
            })
            .collect();
        Self {
            acked,
            failed,
            stop,
            tasks,
        }
    }

    /// The processes acknowledged so far, in order.
    fn acked(&self) -> Vec<Acked> {
        self.acked.lock().unwrap().clone()
    }

    /// Waits until `n` more processes of partition `p` (of `parts`) than `since` are
    /// acknowledged.
    async fn wait_acked_in(&self, p: u16, parts: u16, since: usize, n: usize) {
        wait_for("acknowledged submissions", DEADLINE, || async {
            let in_p = self.acked()[since..]
                .iter()
                .filter(|a| honua_shared::partition::partition_of(&a.id, parts) == p)
                .count();
            (in_p >= n).then_some(())
        })
        .await
    }

    /// Stops submitting; returns every acknowledged process and the failed calls.
    async fn stop(self) -> (Vec<Acked>, u64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        (acked, self.failed.load(Ordering::SeqCst))
    }
}

/// One acknowledged submission: its process, when it was first sent and when stored.
#[derive(Clone)]
struct Acked {
    id: String,
    asked: Instant,
    acked: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_partitions_slot_moves_to_another_primary_under_load() {
    const P: u16 = 8;
    /// The partition moved.
    const MOVED: u16 = 5;
    let logged = honua_tests::logged::Logged::install();
    let cluster = RedisCluster::start();
    let dir = defs_dir(&[defs::THREE]);
    let mut cfg = cluster_config(&cluster, &dir, "reshard");
    cfg.partitions = P;
    let f = Fleet::start(cfg, 1, 2).await;
    let home_key = f.store().in_partition(MOVED).keys().submit().to_string();
    let slot = cluster.slot_of(&home_key);
    let from = cluster.primary_of(&home_key);
    let to = *cluster
        .primaries()
        .iter()
        .find(|&&i| i != from)
        .expect("another primary");
    // Older data in the slot (the state of processes no longer indexed), so that moving it
    // takes a while: `FILLER / MIGRATE_BATCH` round trips with the slot half moved.
    const FILLER: usize = 20_000;
    let part = f.store().in_partition(MOVED);
    for chunk in 0..FILLER / 1_000 {
        let mut pipe = redis::pipe();
        for i in chunk * 1_000..(chunk + 1) * 1_000 {
            pipe.hset(part.keys().data(&format!("old-{i}")), "input", "{}")
                .ignore();
        }
        let () = pipe.query_async(&mut part.conn()).await.unwrap();
    }
    let logged_before = logged.counts();

    // Processes of the partition stored, running and finished on `from` before the move.
    let load = Load::start(&f, 4);
    load.wait_acked_in(MOVED, P, 0, 20).await;
    let started = Instant::now();
    let keys = tokio::task::block_in_place(|| cluster.move_slot(slot, from, to));
    let ended = Instant::now();
    assert_eq!(cluster.primary_of(&home_key), to, "the slot moved");
    // The same fleet goes on with the partition on its new primary.
    let after = load.acked().len();
    load.wait_acked_in(MOVED, P, after, 20).await;
    let (acked, failed) = load.stop().await;
    let ids: Vec<String> = acked.iter().map(|a| a.id.clone()).collect();
    assert_each_completed_once(&f, &ids, 3).await;
    // Submissions whose call overlapped the move, and the longest one in its partition.
    let overlapping: Vec<&Acked> = acked
        .iter()
        .filter(|a| a.asked < ended && a.acked > started)
        .collect();
    let longest_moved = overlapping
        .iter()
        .filter(|a| honua_shared::partition::partition_of(&a.id, P) == MOVED)
        .map(|a| (a.acked - a.asked).as_millis())
        .max();
    eprintln!(
        "slot {slot} of partition {MOVED} ({keys} keys) moved in {} ms; {} submissions \
         overlapped the move (the longest in the partition moved took {longest_moved:?} ms), \
         {} in all; {failed} submission calls failed and were retried; logged since the load \
         began: {:?}",
        (ended - started).as_millis(),
        overlapping.len(),
        ids.len(),
        logged.since(&logged_before)
    );
    f.stop().await;
}
