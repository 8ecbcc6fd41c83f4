//! A deployment of four partitions on one redis-server: the flows complete, processes
//! spread over the partitions and live where their id maps, idempotent resubmission finds
//! the stored process, lookups by id, merged lists with their per-partition cursor, the
//! queues report, a stream submission written to the wrong partition is quarantined, and a
//! drain, its resume and a purge cover every partition;
//! a killed worker's steps in every partition are reclaimed and resume from their
//! checkpoints; a scheduler process killed under load leaves its partitions' pending
//! entries to the other, and every process completes once.

use honua_shared::envelope::Submission;
use honua_shared::partition::partition_of;
use honua_shared::status::{ProcessStatus, StepStatus};
use honua_tests::*;
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

const P: u16 = 4;

fn http() -> reqwest::Client {
    honua_runtime::install_crypto_provider();
    reqwest::Client::new()
}

async fn get_json(c: &reqwest::Client, url: &str) -> Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

async fn get_text(c: &reqwest::Client, url: &str) -> String {
    c.get(url).send().await.unwrap().text().await.unwrap()
}

async fn submit(c: &reqwest::Client, f: &Fleet, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut r = c.post(f.url("/api/processes")).json(&body);
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_complete_across_four_partitions() {
    let redis = RedisServer::start();
    let dir = defs_dir(&[defs::THREE, defs::GATE, defs::FAN]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.partitions = P;
    let f = Fleet::start(cfg, 2, 2).await;
    let c = http();

    // Three-step processes over HTTP, spread over every partition, each in the partition
    // its id maps to.
    let mut ids = Vec::new();
    for i in 0..24 {
        let (status, body) = submit(
            &c,
            &f,
            json!({"processType": "Three", "input": {"n": i}}),
            None,
        )
        .await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let mut per_partition: BTreeMap<u16, usize> = BTreeMap::new();
    for id in &ids {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
        let p = partition_of(id, P);
        *per_partition.entry(p).or_default() += 1;
        let keys = f.store().keys().in_shard(p);
        let exists: bool = redis::cmd("EXISTS")
            .arg(keys.process(id))
            .query_async(&mut f.store().conn())
            .await
            .unwrap();
        assert!(exists, "{id} lives in partition {p}");
    }
    assert_eq!(per_partition.len(), usize::from(P), "{per_partition:?}");

    // Fan-out and join, and the approval flow (its signal goes to the process's partition).
    let fans: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(f.submit("Fan", json!({})).await);
        }
        v
    };
    for id in &fans {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
        assert_eq!(rec.steps["Join"].attempts().len(), 1, "join ran once");
    }
    let gates: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(f.submit("Gate", json!({})).await);
        }
        v
    };
    for id in &gates {
        f.approve(&c, id, "review").await;
    }
    for id in &gates {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
        assert_eq!(rec.steps["Apply"].status, StepStatus::Completed);
    }

    // Lookups by id go to the id's partition.
    for id in ids.iter().chain(&gates) {
        let v = get_json(&c, &f.url(&format!("/api/processes/{id}"))).await;
        assert_eq!(v["status"], "Completed", "{v}");
    }

    // Idempotent resubmission: the same id, from the key's partition.
    let body = json!({"processType": "Three", "input": {"n": "idem"}});
    let (s1, first) = submit(&c, &f, body.clone(), Some("order-42")).await;
    let (s2, again) = submit(&c, &f, body, Some("order-42")).await;
    assert_eq!((s1, s2), (201, 200), "{first} {again}");
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["duplicate"], true);
    let id = first["id"].as_str().unwrap();
    assert_eq!(partition_of(id, P), partition_of("order-42", P));
    // An id and a key of two partitions cannot share a slot: refused.
    let (theirs, key) = (0..100)
        .map(|i| (format!("mine-{i}"), format!("key-{i}")))
        .find(|(i, k)| partition_of(i, P) != partition_of(k, P))
        .unwrap();
    let (s, e) = submit(
        &c,
        &f,
        json!({"processType": "Three", "input": {}, "id": theirs}),
        Some(&key),
    )
    .await;
    assert_eq!(s, 400, "{e}");

    // The merged list: every process once, newest first, through the per-partition cursor.
    let total = ids.len() + fans.len() + gates.len() + 1;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            None => f.url("/api/processes?limit=5"),
            Some(cur) => f.url(&format!("/api/processes?limit=5&cursor={cur}")),
        };
        let r = c.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let next = r
            .headers()
            .get("x-next-cursor")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<Value> = r.json().await.unwrap();
        seen.extend(page.iter().map(|p| {
            (
                p["createdAt"].as_str().unwrap_or_default().to_string(),
                p["id"].as_str().unwrap().to_string(),
            )
        }));
        match next {
            Some(n) => {
                assert_eq!(n.split(',').count(), usize::from(P), "{n}");
                cursor = Some(n);
            }
            None => break,
        }
        assert!(seen.len() <= total, "the listing repeats: {seen:?}");
    }
    let unique: BTreeSet<&String> = seen.iter().map(|(_, id)| id).collect();
    assert_eq!(unique.len(), total, "{seen:?}");
    assert_eq!(seen.len(), total);
    let times: Vec<&String> = seen.iter().map(|(t, _)| t).collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    // A cursor of another shape is refused.
    let r = c
        .get(f.url("/api/processes?cursor=12:0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // Queues: four streams per partition, then their totals.
    let queues = get_json(&c, &f.url("/api/queues")).await;
    let queues = queues.as_array().unwrap();
    assert_eq!(queues.len(), 4 * usize::from(P) + 4, "{queues:?}");
    for p in 0..P {
        assert!(
            queues.iter().any(|q| q["stream"]
                .as_str()
                .unwrap()
                .ends_with(&format!("{{{p}}}:jobs"))),
            "{queues:?}"
        );
    }
    assert!(
        queues
            .iter()
            .any(|q| q["stream"].as_str().unwrap().ends_with("{*}:jobs")),
        "{queues:?}"
    );

    // Straight into Redis: an entry in the partition its id maps to is created; one in
    // another partition is quarantined there, with the partition to use.
    let mine = (0..100)
        .map(|i| format!("stream-{i}"))
        .find(|id| partition_of(id, P) == 1)
        .unwrap();
    let stray = (0..100)
        .map(|i| format!("stray-{i}"))
        .find(|id| partition_of(id, P) == 3)
        .unwrap();
    let one = f.store().in_partition(1);
    for id in [&mine, &stray] {
        let _: String = redis::cmd("XADD")
            .arg(one.keys().submit())
            .arg("*")
            .arg("type")
            .arg("Three")
            .arg("id")
            .arg(id)
            .arg("input")
            .arg("{}")
            .query_async(&mut one.conn())
            .await
            .unwrap();
    }
    assert_eq!(
        f.wait_finished(&mine).await.status,
        ProcessStatus::Completed
    );
    let quarantined = wait_for("the stray entry quarantined", DEADLINE, || async {
        let q = one
            .stream_latest(&one.keys().quarantine(), 10)
            .await
            .unwrap();
        q.into_iter()
            .find(|e| e.fields.get("id") == Some(stray.as_str()))
    })
    .await;
    let reason = quarantined
        .fields
        .get("reason")
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("partition 3"), "{reason}");
    assert!(f.record(&stray).await.is_none(), "never created");

    // The console sums the partitions: the overview's per-type row counts every completed
    // Three (as the merged API list does), and the quarantine page shows the stray entry.
    let threes = get_json(
        &c,
        &f.url("/api/processes?status=Completed&processType=Three&limit=500"),
    )
    .await;
    let threes = threes.as_array().unwrap().len();
    assert!(threes > usize::from(P), "{threes}");
    let page = c
        .get(f.url("/ui/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let row = page
        .split("<tr ")
        .find(|r| r.starts_with("data-type=\"Three\""))
        .unwrap_or_else(|| panic!("no row for Three in {page}"));
    assert!(
        row.contains(&format!("data-completed-hour=\"{threes}\"")),
        "{threes} completed: {}",
        &row[..row.len().min(300)]
    );
    let page = get_text(&c, &f.url("/ui/quarantine")).await;
    assert!(
        page.contains(&stray),
        "the stray entry on the quarantine page"
    );

    // A drain holds new processes Pending in every partition; resuming starts them all.
    let r = c.post(f.url("/api/admin/drain")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(f.submit("Three", json!({})).await);
    }
    let spread: BTreeSet<u16> = held.iter().map(|id| partition_of(id, P)).collect();
    for id in &held {
        let rec = f.record(id).await.unwrap();
        assert_eq!(rec.status, ProcessStatus::Pending, "{rec:?}");
    }
    let report = get_json(&c, &f.url("/api/admin/drain")).await;
    assert_eq!(report["draining"], true, "{report}");
    assert_eq!(report["pendingProcesses"], held.len(), "{report}");
    let r = c
        .post(f.url("/api/admin/resume-intake"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut last_end = 0;
    for id in &held {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed);
        last_end = last_end.max(rec.ended_ms.unwrap_or_default());
    }
    eprintln!("drained processes in partitions {spread:?}");

    // Purge covers every partition (once every process ended more than 1 ms ago).
    wait_for("1 ms past the last end", DEADLINE, || async {
        let now = f.store().server_time_ms().await.ok()?;
        (now > last_end + 1).then_some(())
    })
    .await;
    let completed = total + 1 + held.len();
    let r = c
        .delete(f.url("/api/processes?status=Completed&olderThan=1ms"))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["deleted"], completed, "{body}");
    let left = get_json(&c, &f.url("/api/processes?status=Completed")).await;
    assert_eq!(left.as_array().unwrap().len(), 0, "{left}");

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_steps_in_every_partition_are_reclaimed() {
    let redis = RedisServer::start();
    // `Count` with 200 ticks (10 s): w1 is killed long before any step could finish.
    let long = defs::COUNT.1.replace("total = 40", "total = 200");
    assert_ne!(long, defs::COUNT.1);
    let dir = defs_dir(&[("count.toml", &long)]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.partitions = P;
    cfg.custom_step_kinds = vec!["counter".into()];
    let log = dir.path().join("exec.log");
    let spawn =
        |id: &str| WorkerProcess::spawn(env!("CARGO_BIN_EXE_honua-test-worker"), &cfg, id, &log);
    // Scheduler in-process, workers as processes; two counting steps per partition.
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let mut w1 = spawn("w1");
    let mut ids = Vec::new();
    for p in 0..P {
        let mine = (0..1000)
            .map(|i| format!("count-{i}"))
            .filter(|id| partition_of(id, P) == p)
            .take(2);
        for id in mine {
            let sub = Submission {
                process_type: "Count".into(),
                version: None,
                input: json!({}),
                id: Some(id.clone()),
                idempotency_key: None,
                tenant: None,
                trace: Default::default(),
            };
            f.engine.create(&sub, None).await.unwrap();
            ids.push(id);
        }
    }
    let checkpoint = |id: String| {
        let f = &f;
        async move {
            let data = f.store().load_data(&id).await.ok()?;
            let v: Value = f.cfg.codec().decode(data.get("ck:Count")?).ok()?;
            v["n"].as_u64()
        }
    };
    for id in &ids {
        wait_for("w1 checkpointing every step", DEADLINE, || async {
            checkpoint(id.clone()).await.filter(|n| *n >= 3)
        })
        .await;
    }
    w1.kill9();
    let _w2 = spawn("w2");
    for id in &ids {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{rec:?}");
        let step = &rec.steps["Count"];
        assert_eq!(step.worker.as_deref(), Some("w2"), "{id}");
        assert_eq!(step.deliveries, Some(2), "{id}: one reclaim");
        let out: Value = f
            .cfg
            .codec()
            .decode(&f.store().load_data(id).await.unwrap()["out:Count"])
            .unwrap();
        assert!(out["resumed_from"].as_u64().unwrap() >= 3, "{out}");
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_with_another_partition_count_does_not_start() {
    let redis = RedisServer::start();
    let dir = defs_dir(&[defs::THREE]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.partitions = P;
    let store = honua_tests::store(&cfg);
    store.check_partition_count().await.unwrap();
    let stored: String = redis::cmd("GET")
        .arg(store.keys().partition_count())
        .query_async(&mut store.conn())
        .await
        .unwrap();
    assert_eq!(stored, P.to_string());
    // The same count again is fine; another is refused, naming both.
    store.check_partition_count().await.unwrap();
    let other = honua_tests::store(&honua_shared::config::Config {
        partitions: 2,
        ..cfg.clone()
    });
    let e = other.check_partition_count().await.unwrap_err();
    assert!(
        matches!(
            e,
            honua_shared::store::StoreError::PartitionCount {
                stored: 4,
                configured: 2
            }
        ),
        "{e}"
    );
    // Such a scheduler waits (and says why) instead of starting.
    let stop = tokio_util::sync::CancellationToken::new();
    let ready = {
        let stop = stop.clone();
        tokio::spawn(async move {
            other
                .wait_ready(
                    honua_shared::store::Service::Scheduler,
                    stop.cancelled_owned(),
                )
                .await
        })
    };
    // Partition 0's groups are created just before the check: once they exist it has
    // reached it (and every attempt fails the same way).
    wait_for("the groups of partition 0", DEADLINE, || async {
        let n: u64 = redis::cmd("EXISTS")
            .arg(store.keys().results())
            .query_async(&mut store.conn())
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    stop.cancel();
    assert!(!ready.await.unwrap(), "not ready with the wrong count");
}

/// A process type's daily LLM token budget counts the whole deployment, whichever
/// partitions its processes live in: the day's counters are in partition 0, each process's
/// usage in its own partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_types_daily_llm_budget_counts_every_partition() {
    use honua_shared::llm_store::{BudgetCall, BudgetOver};
    let redis = RedisServer::start();
    let dir = defs_dir(&[defs::THREE]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.partitions = P;
    let store = honua_tests::store(&cfg);
    store.load_scripts().await.unwrap();
    // One process id in each partition, 0 last.
    let ids: Vec<String> = [1, 2, 3, 0]
        .iter()
        .map(|&p| {
            (0..1000)
                .map(|i| format!("budget-{i}"))
                .find(|id| partition_of(id, P) == p)
                .unwrap()
        })
        .collect();
    let charge = |id: &str| {
        let store = store.clone();
        let id = id.to_string();
        async move {
            store
                .llm_budget(&BudgetCall {
                    process_id: &id,
                    process_type: "Three",
                    day: "20261204",
                    add_tokens: 40,
                    add_cost_micro_usd: 7,
                    process_cap: 100,
                    type_daily_cap: 150,
                    process_ttl: std::time::Duration::from_secs(60),
                })
                .await
                .unwrap()
        }
    };
    // 40 tokens per process: the type reaches 150 with the fourth, though no partition
    // holds more than 40 of them.
    let mut seen = Vec::new();
    for id in &ids {
        let u = charge(id).await;
        assert_eq!(u.process_tokens, 40, "{id}");
        seen.push((u.type_tokens_today, u.over));
    }
    assert_eq!(
        seen,
        [
            (40, BudgetOver::No),
            (80, BudgetOver::No),
            (120, BudgetOver::No),
            (160, BudgetOver::TypeDaily)
        ]
    );
    // Each process's usage is in its own partition; the day's totals in partition 0.
    for id in &ids {
        assert_eq!(store.llm_usage(id).await.unwrap(), Some((40, 7)), "{id}");
    }
    let zero = store.in_partition(0);
    assert_eq!(
        zero.llm_usage_on(&["Three"], "20261204").await.unwrap(),
        [(160, 28)]
    );
    // A process's own cap still applies on its partition.
    charge(&ids[0]).await;
    let u = charge(&ids[0]).await;
    assert_eq!((u.process_tokens, u.over), (120, BudgetOver::Process));
}

/// How many entries of the scheduler group's submission, event and result streams of every
/// partition consumer `consumer` holds (read, not yet acknowledged).
async fn held_by(f: &Fleet, consumer: &str) -> u64 {
    let mut n = 0;
    for s in f.store().all() {
        let k = s.keys();
        for stream in [k.submit(), k.events(), k.results()] {
            let consumers: Vec<std::collections::HashMap<String, redis::Value>> =
                redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(&stream)
                    .arg(honua_shared::keys::SCHEDULER_GROUP)
                    .query_async(&mut s.conn())
                    .await
                    .unwrap_or_default();
            for c in consumers {
                let name = c
                    .get("name")
                    .cloned()
                    .map(redis::from_redis_value::<String>);
                if matches!(name, Some(Ok(ref name)) if name == consumer) {
                    n += c
                        .get("pending")
                        .cloned()
                        .and_then(|v| redis::from_redis_value::<u64>(v).ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_schedulers_pending_entries_are_taken_over_by_the_other() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    let redis = RedisServer::start();
    let dir = defs_dir(&[defs::THREE]);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.partitions = P;
    // The gateway's engine and two workers in-process, two scheduler processes.
    let f = Fleet::start(cfg.clone(), 0, 2).await;
    let bin = env!("CARGO_BIN_EXE_honua-test-scheduler");
    let mut a = WorkerProcess::spawn_scheduler(bin, &cfg, "scheduler-a", dir.path());
    let _b = WorkerProcess::spawn_scheduler(bin, &cfg, "scheduler-b", dir.path());

    // A steady stream of submissions, each straight into its partition's stream (so the
    // schedulers store them), one every 10 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = tokio::spawn({
        let (store, stop, sent) = (f.store().clone(), stop.clone(), sent.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for n in 0.. {
                tick.tick().await;
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let id = format!("s-{n}");
                let sub = Submission {
                    process_type: "Three".into(),
                    version: None,
                    input: json!({"n": n}),
                    id: Some(id.clone()),
                    idempotency_key: None,
                    tenant: None,
                    trace: Default::default(),
                };
                store.of(&id).submit(&sub.to_fields()).await.unwrap();
                sent.lock().unwrap().push(id);
            }
        }
    });
    let sent_count = || sent.lock().unwrap().len();
    wait_for("processes under way", DEADLINE, || async {
        (sent_count() >= 50).then_some(())
    })
    .await;
    let first = sent.lock().unwrap()[0].clone();
    f.wait_finished(&first).await;

    // Kill `a` at a moment it holds entries: stopped, it reads and acknowledges nothing
    // more, so what it holds then is what it leaves behind.
    let held = wait_for("scheduler-a holding entries", DEADLINE, || async {
        a.stop().await;
        let n = held_by(&f, "scheduler-a").await;
        if n == 0 {
            a.signal(SIGCONT);
        }
        (n > 0).then_some(n)
    })
    .await;
    a.kill9();
    let killed = Instant::now();
    let at_kill = sent_count();
    wait_for("scheduler-a's entries taken over", DEADLINE, || async {
        (held_by(&f, "scheduler-a").await == 0).then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    // The load goes on with one scheduler.
    wait_for("more submissions", DEADLINE, || async {
        (sent_count() >= at_kill + 100).then_some(())
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    // Every process completes, each step committed once.
    let ids = sent.lock().unwrap().clone();
    assert_each_completed_once(&f, &ids, 3).await;
    let done = killed.elapsed();
    eprintln!(
        "scheduler-a killed holding {held} entries with {at_kill} submissions sent; the \
         other took them over within {} ms; all {} processes completed {} ms after the kill",
        takeover.as_millis(),
        ids.len(),
        done.as_millis()
    );
    f.stop().await;
}
