//! Contract tests of the Lua scripts against a real redis-server: ownership and fencing
//! (a reclaimed job's old owner can never heartbeat, checkpoint, commit or hand back),
//! dead-lettering by Redis's delivery counter, and consumer retirement.

use honua_shared::envelope::{JobEnvelope, StepResult};
use honua_shared::keys::WORKERS_GROUP;
use honua_shared::status::StepStatus;
use honua_shared::store::{Begin, Entry, Fence, Held, Store};
use honua_tests::*;
use serde_json::json;
use std::time::Duration;

const DEF: &[(&str, &str)] = &[(
    "one.toml",
    r#"
name = "One"
version = 1
[[steps]]
name = "S"
kind = "noop"
"#,
)];

/// A submission of the `One` type with an empty input.
fn one() -> honua_shared::envelope::Submission {
    submission_of("One")
}

/// The store and the engine (no scheduler loop) of a fleet with the `One` type.
async fn engine_of(redis: &RedisServer) -> (Store, honua_scheduler::Processes, tempfile::TempDir) {
    let dir = defs_dir(DEF);
    let cfg = test_config(&redis.url(), dir.path());
    let (defs, kinds) = honua_scheduler::load_definitions(&cfg).unwrap();
    let st = store(&cfg);
    st.ensure_groups().await.unwrap();
    let engine =
        honua_scheduler::Processes::new(std::sync::Arc::new(cfg), st.clone(), defs, kinds).await;
    (st, engine, dir)
}

/// A process created through the engine (no scheduler or worker running), with its one job
/// read by consumer `a`.
async fn setup(
    redis: &RedisServer,
) -> (Store, Held, honua_scheduler::Processes, tempfile::TempDir) {
    let (st, engine, dir) = engine_of(redis).await;
    let pid = engine.create(&one(), None).await.unwrap().id().to_string();
    let mut conn = st.blocking(Duration::from_millis(100)).unwrap();
    let entries = read_as_a(&st, &mut conn).await;
    assert_eq!(entries.len(), 1);
    let job = JobEnvelope::from_fields(&entries[0].fields).unwrap();
    assert_eq!(job.process_id, pid);
    let begin = st
        .begin(
            "a",
            &[(entries[0].id.clone(), 1, job.clone())],
            &[],
            &|_| false,
        )
        .await
        .unwrap();
    let Begin::Ok { deliveries, .. } = begin[0] else {
        panic!("{begin:?}")
    };
    assert_eq!(deliveries, 1);
    let held = Held {
        entry_id: entries[0].id.clone(),
        deliveries,
        job,
    };
    (st, held, engine, dir)
}

/// New jobs (up to 10) read by consumer `a`.
async fn read_as_a(st: &Store, conn: &mut honua_shared::store::Conn) -> Vec<Entry> {
    st.read_group(
        conn,
        &st.keys().jobs(),
        WORKERS_GROUP,
        "a",
        10,
        Duration::from_millis(100),
    )
    .await
    .unwrap()
}

fn ok_result() -> StepResult {
    StepResult {
        outcome: "ok".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_reclaimed_job_fences_out_its_old_owner() {
    let redis = RedisServer::start();
    let (st, held_a, _e, _d) = setup(&redis).await;
    assert_eq!(
        st.heartbeat("a", std::slice::from_ref(&held_a))
            .await
            .unwrap(),
        vec![Fence::Ok]
    );
    // Consumer b reclaims it (lease 0 for the test).
    let r = st.reclaim("b", Duration::ZERO, "0-0", 10, 5).await.unwrap();
    assert_eq!(r.claimed.len(), 1, "{r:?}");
    let (entry, deliveries) = &r.claimed[0];
    assert_eq!(*deliveries, 2, "the reclaim counted as a delivery");
    let job = JobEnvelope::from_fields(&entry.fields).unwrap();
    let begin = st
        .begin(
            "b",
            &[(entry.id.clone(), *deliveries, job.clone())],
            &[],
            &|_| false,
        )
        .await
        .unwrap();
    assert!(
        matches!(begin[0], Begin::Ok { deliveries: 2, .. }),
        "{begin:?}"
    );
    // a is now a zombie: every fenced call is refused and writes nothing.
    assert_eq!(
        st.heartbeat("a", std::slice::from_ref(&held_a))
            .await
            .unwrap(),
        vec![Fence::Stale]
    );
    assert_eq!(
        st.checkpoint("a", &held_a, b"x").await.unwrap(),
        Fence::Stale
    );
    assert_eq!(
        st.complete("a", &held_a, None, &ok_result()).await.unwrap(),
        Fence::Stale
    );
    assert_eq!(st.release("a", &held_a).await.unwrap(), Fence::Stale);
    let events: u64 = redis::cmd("XLEN")
        .arg(st.keys().results())
        .query_async(&mut st.conn())
        .await
        .unwrap();
    assert_eq!(events, 0, "the zombie emitted nothing");
    // A heartbeat with the right owner but an old fence (delivery count) is refused too.
    let held_b = Held {
        entry_id: entry.id.clone(),
        deliveries: 2,
        job,
    };
    let old_fence = Held {
        deliveries: 1,
        ..held_b.clone()
    };
    assert_eq!(
        st.heartbeat("b", &[old_fence]).await.unwrap(),
        vec![Fence::Stale]
    );
    // The owner commits exactly once; a retry of the same commit (its reply was lost)
    // answers ok again and writes nothing; the zombie's commit stays refused.
    assert_eq!(
        st.complete("b", &held_b, Some(b"out"), &ok_result())
            .await
            .unwrap(),
        Fence::Ok
    );
    assert_eq!(
        st.complete("b", &held_b, Some(b"out"), &ok_result())
            .await
            .unwrap(),
        Fence::Ok,
        "a retried commit that landed is not stale"
    );
    assert_eq!(
        st.complete("a", &held_a, None, &ok_result()).await.unwrap(),
        Fence::Stale
    );
    let failed = StepResult {
        outcome: "failed".into(),
        ..Default::default()
    };
    assert_eq!(
        st.complete("b", &held_b, None, &failed).await.unwrap(),
        Fence::Stale,
        "another result under the same claim is not the commit that landed"
    );
    let events: u64 = redis::cmd("XLEN")
        .arg(st.keys().results())
        .query_async(&mut st.conn())
        .await
        .unwrap();
    assert_eq!(events, 1);
    // The job is acknowledged: the job stream holds no live work (the acknowledged entry
    // stays until trim.lua removes it).
    let jobs = st
        .stream_stats(&st.keys().jobs(), WORKERS_GROUP)
        .await
        .unwrap();
    assert_eq!((jobs.length, jobs.pending, jobs.lag), (0, 0, Some(0)));
}

#[tokio::test]
async fn begin_starts_a_claim_only_under_the_delivery_count_its_starter_saw() {
    let redis = RedisServer::start();
    let (st, held, _e, _d) = setup(&redis).await;
    // The same worker's sweeper reclaims the entry its reader got (after a pause): the
    // delivery count is 2 now, so the reader's claim (count 1) can no longer begin.
    let r = st.reclaim("a", Duration::ZERO, "0-0", 10, 5).await.unwrap();
    assert_eq!(r.claimed.len(), 1, "{r:?}");
    assert_eq!(r.claimed[0].1, 2);
    let job = held.job.clone();
    let id = held.entry_id.clone();
    let reader = st
        .begin("a", &[(id.clone(), 1, job.clone())], &[], &|_| false)
        .await;
    assert!(matches!(reader.as_deref(), Ok([Begin::Lost])), "{reader:?}");
    let sweeper = st
        .begin("a", &[(id.clone(), 2, job.clone())], &[], &|_| false)
        .await;
    assert!(
        matches!(sweeper.as_deref(), Ok([Begin::Ok { deliveries: 2, .. }])),
        "{sweeper:?}"
    );
    // A claim that waited before it began (idle 5 s: set with XCLAIM … IDLE, which keeps
    // the delivery count) has its idle time reset by beginning, as a heartbeat does: a
    // sweep with a lease of 4 s finds nothing to reclaim.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(st.keys().jobs())
        .arg(WORKERS_GROUP)
        .arg("a")
        .arg(0)
        .arg(&id)
        .arg("IDLE")
        .arg(5000)
        .arg("JUSTID")
        .query_async(&mut st.conn())
        .await
        .unwrap();
    let again = st
        .begin("a", &[(id.clone(), 2, job.clone())], &[], &|_| false)
        .await;
    assert!(
        matches!(again.as_deref(), Ok([Begin::Ok { deliveries: 2, .. }])),
        "{again:?}"
    );
    let r = st
        .reclaim("a", Duration::from_secs(4), "0-0", 10, 5)
        .await
        .unwrap();
    assert!(r.claimed.is_empty(), "{r:?}");
}

/// Jobs `consumer` reads until it has `n` (10 per read).
async fn read_n(st: &Store, consumer: &str, n: usize) -> Vec<(String, u64, JobEnvelope)> {
    let mut conn = st.blocking(Duration::from_millis(100)).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let entries = st
            .read_group(
                &mut conn,
                &st.keys().jobs(),
                WORKERS_GROUP,
                consumer,
                n - out.len(),
                Duration::from_millis(100),
            )
            .await
            .unwrap();
        assert!(!entries.is_empty(), "{consumer} read {} of {n}", out.len());
        for e in entries {
            out.push((e.id, 1, JobEnvelope::from_fields(&e.fields).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn begin_finds_each_claim_of_a_batch_whatever_else_its_consumer_holds() {
    let redis = RedisServer::start();
    let (st, engine, _d) = engine_of(&redis).await;
    let sub = one();
    // `a` holds 80 jobs; between them lies one that `b` holds.
    for _ in 0..40 {
        engine.create(&sub, None).await.unwrap();
    }
    let mut a = read_n(&st, "a", 40).await;
    engine.create(&sub, None).await.unwrap();
    let b = read_n(&st, "b", 1).await;
    for _ in 0..40 {
        engine.create(&sub, None).await.unwrap();
    }
    a.extend(read_n(&st, "a", 40).await);
    // The batch's id range holds 81 entries, 80 of them `a`'s: more than begin's one range
    // read returns for a batch of three, so it looks the rest up one by one.
    let batch = [a[0].clone(), b[0].clone(), a[79].clone()];
    let r = st.begin("a", &batch, &[], &|_| false).await.unwrap();
    assert!(
        matches!(
            r.as_slice(),
            [Begin::Ok { .. }, Begin::Lost, Begin::Ok { .. }]
        ),
        "{r:?}"
    );
    // A batch of all the rest: one range read covers it; `b`'s claim is still `b`'s.
    let mut batch: Vec<_> = a[1..79].to_vec();
    batch.push(b[0].clone());
    let r = st.begin("a", &batch, &[], &|_| false).await.unwrap();
    assert_eq!(r.len(), 79);
    assert!(
        r[..78].iter().all(|x| matches!(x, Begin::Ok { .. })),
        "{r:?}"
    );
    assert!(matches!(r[78], Begin::Lost), "{:?}", r[78]);
    assert!(matches!(
        st.begin("b", &b, &[], &|_| false).await.unwrap().as_slice(),
        [Begin::Ok { .. }]
    ));
}

#[tokio::test]
async fn delivery_counter_dead_letters_and_consumers_retire_only_when_empty() {
    let redis = RedisServer::start();
    let (st, held, _e, _d) = setup(&redis).await;
    // a owns a pending job: it cannot be retired.
    assert!(!st.retire_consumer("a").await.unwrap());
    // Reclaims raise the counter: 2, 3; at max_deliveries 3 the next one dead-letters it.
    for expected in [2u64, 3] {
        let r = st.reclaim("b", Duration::ZERO, "0-0", 10, 3).await.unwrap();
        assert_eq!(r.claimed.len(), 1);
        assert_eq!(r.claimed[0].1, expected);
    }
    let r = st.reclaim("b", Duration::ZERO, "0-0", 10, 3).await.unwrap();
    assert!(r.claimed.is_empty());
    assert_eq!(r.dead_lettered, vec![held.entry_id.clone()]);
    let dlq = st.stream_entries(&st.keys().dlq(), 10).await.unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].fields.get("deliveries"), Some("3"));
    assert_eq!(dlq[0].fields.get("pid"), Some(held.job.process_id.as_str()));
    let ev = st.stream_entries(&st.keys().results(), 10).await.unwrap();
    assert_eq!(ev[0].fields.get("t"), Some("dead_letter"));
    // Nothing pending any more: both consumers can go.
    assert!(st.retire_consumer("a").await.unwrap());
    assert!(st.retire_consumer("b").await.unwrap());
}

#[tokio::test]
async fn a_released_job_is_requeued_at_once_with_its_fence_kept() {
    let redis = RedisServer::start();
    let (st, held, _e, _d) = setup(&redis).await;
    st.checkpoint("a", &held, b"ck").await.unwrap();
    assert_eq!(st.release("a", &held).await.unwrap(), Fence::Ok);
    let mut conn = st.blocking(Duration::from_millis(100)).unwrap();
    let entries = st
        .read_group(
            &mut conn,
            &st.keys().jobs(),
            WORKERS_GROUP,
            "b",
            10,
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert_eq!(entries.len(), 1);
    let job = JobEnvelope::from_fields(&entries[0].fields).unwrap();
    assert_eq!(job, held.job);
    let begin = st
        .begin("b", &[(entries[0].id.clone(), 1, job)], &[], &|_| false)
        .await
        .unwrap();
    let Begin::Ok {
        data, deliveries, ..
    } = &begin[0]
    else {
        panic!("{begin:?}")
    };
    assert_eq!(*deliveries, 1);
    assert_eq!(data.get("ck:S").map(Vec::as_slice), Some(&b"ck"[..]));
    // The old entry is gone: a is stale.
    assert_eq!(
        st.heartbeat("a", &[held]).await.unwrap(),
        vec![Fence::Stale]
    );
}

#[tokio::test]
async fn housekeeping_trims_only_expired_index_entries() {
    use honua_shared::status::ProcessStatus;
    let redis = RedisServer::start();
    let dir = defs_dir(DEF);
    let st = store(&test_config(&redis.url(), dir.path()));
    let now = st.server_time_ms().await.unwrap();
    let day = 24 * 3600 * 1000;
    let done = st.keys().index_status(ProcessStatus::Completed);
    let active = st.keys().index_active();
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(&done)
        .arg(now - 2 * day)
        .arg("expired")
        .cmd("ZADD")
        .arg(&done)
        .arg(now - 1000)
        .arg("recent")
        .cmd("ZADD")
        .arg(&active)
        .arg(now - 30 * day)
        .arg("long-running")
        .cmd("ZADD")
        .arg(st.keys().workers())
        .arg(now - 2 * day)
        .arg("gone-worker");
    let _: () = pipe.query_async(&mut st.conn()).await.unwrap();
    let removed = st.trim_indexes(now, 24 * 3600).await.unwrap();
    assert_eq!(removed, 2);
    let left: Vec<String> = redis::cmd("ZRANGE")
        .arg(&done)
        .arg(0)
        .arg(-1)
        .query_async(&mut st.conn())
        .await
        .unwrap();
    assert_eq!(left, vec!["recent".to_string()]);
    let active_left: u64 = redis::cmd("ZCARD")
        .arg(&active)
        .query_async(&mut st.conn())
        .await
        .unwrap();
    assert_eq!(active_left, 1, "active processes are never trimmed");
}

#[tokio::test]
async fn a_batch_of_completions_is_fenced_step_by_step() {
    use honua_shared::store::Completion;
    let redis = RedisServer::start();
    let (st, held_1, engine, _d) = setup(&redis).await;
    // A second process whose job `a` also holds.
    let sub = one();
    engine.create(&sub, None).await.unwrap();
    let mut conn = st.blocking(Duration::from_millis(100)).unwrap();
    let entries = read_as_a(&st, &mut conn).await;
    assert_eq!(entries.len(), 1);
    let job = JobEnvelope::from_fields(&entries[0].fields).unwrap();
    st.begin(
        "a",
        &[(entries[0].id.clone(), 1, job.clone())],
        &[],
        &|_| false,
    )
    .await
    .unwrap();
    let held_2 = Held {
        entry_id: entries[0].id.clone(),
        deliveries: 1,
        job,
    };
    let wrong_fence = Held {
        deliveries: 2,
        ..held_2.clone()
    };
    let ok = ok_result();
    let item = |held| Completion {
        held,
        output: Some(b"out"),
        checkpoint: true,
        result: &ok,
        fast: None,
    };
    // One call: the first commits, a wrong fence is refused, a repeat of the first (a
    // retry of a commit that landed) answers ok and writes nothing.
    assert_eq!(
        st.complete_many("a", &[item(&held_1), item(&wrong_fence), item(&held_1)])
            .await
            .unwrap(),
        vec![
            (Fence::Ok, false),
            (Fence::Stale, false),
            (Fence::Ok, false)
        ]
    );
    let xlen = |key| {
        let mut conn = st.conn();
        async move {
            redis::cmd("XLEN")
                .arg(key)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert_eq!(xlen(st.keys().results()).await, 1, "one event per commit");
    let jobs = st
        .stream_stats(&st.keys().jobs(), WORKERS_GROUP)
        .await
        .unwrap();
    assert_eq!(
        (jobs.length, jobs.pending),
        (1, 1),
        "the refused job is still held"
    );
    assert_eq!(
        st.complete_many("a", &[item(&held_2)]).await.unwrap(),
        vec![(Fence::Ok, false)]
    );
    assert_eq!(xlen(st.keys().results()).await, 2);
    let jobs = st
        .stream_stats(&st.keys().jobs(), WORKERS_GROUP)
        .await
        .unwrap();
    assert_eq!((jobs.length, jobs.pending, jobs.lag), (0, 0, Some(0)));
    let data = st.load_data(&held_2.job.process_id).await.unwrap();
    assert_eq!(data.get("out:S").map(Vec::as_slice), Some(&b"out"[..]));
    // The committed step record reads back with the result.
    let pid = &held_2.job.process_id;
    let (meta, steps) = st.load_process(pid).await.unwrap();
    let rec = honua_shared::record::ProcessRecord::parse(pid, &meta, &steps)
        .unwrap()
        .unwrap();
    let s = &rec.steps["S"];
    assert_eq!(s.status, honua_shared::status::StepStatus::Done);
    assert_eq!(s.outcome.as_deref(), Some("ok"));
    assert_eq!(s.token, held_2.job.token);
    assert_eq!(s.worker.as_deref(), Some("a"));
    assert!(s.ended_ms >= s.started_ms && s.ended_ms.is_some());

    // A failure whose text needs escaping reads back intact.
    engine.create(&sub, None).await.unwrap();
    let entries = read_as_a(&st, &mut conn).await;
    let job = JobEnvelope::from_fields(&entries[0].fields).unwrap();
    st.begin(
        "a",
        &[(entries[0].id.clone(), 1, job.clone())],
        &[],
        &|_| false,
    )
    .await
    .unwrap();
    let held_3 = Held {
        entry_id: entries[0].id.clone(),
        deliveries: 1,
        job,
    };
    let error = "bad \"quote\" / back\\slash \u{e9}\n{\"status\":\"running\"}";
    let failed = StepResult {
        outcome: "failed".into(),
        error: Some(error.into()),
        code: Some("E_1".into()),
        ..Default::default()
    };
    let failing = Completion {
        held: &held_3,
        output: None,
        checkpoint: true,
        result: &failed,
        fast: None,
    };
    assert_eq!(
        st.complete_many("a", &[failing]).await.unwrap(),
        vec![(Fence::Ok, false)]
    );
    let pid = &held_3.job.process_id;
    let (meta, steps) = st.load_process(pid).await.unwrap();
    let rec = honua_shared::record::ProcessRecord::parse(pid, &meta, &steps)
        .unwrap()
        .unwrap();
    let s = &rec.steps["S"];
    assert_eq!(s.status, honua_shared::status::StepStatus::Done);
    assert_eq!(s.outcome.as_deref(), Some("failed"));
    assert_eq!(s.error.as_deref(), Some(error));
    assert_eq!(s.code.as_deref(), Some("E_1"));
}

/// Scripts acknowledge without deleting; trim.lua removes acknowledged entries in bulk and
/// never an entry that is pending or not yet delivered to every group (Redis trimming
/// ignores the PEL, so the bound comes from the groups).
#[tokio::test]
async fn trimming_removes_only_entries_every_group_has_acknowledged() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEF);
    let cfg = test_config(&redis.url(), dir.path());
    let st = store(&cfg);
    let mut conn = st.conn();
    // One entry per stream node, so approximate trimming is exact and observable.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stream-node-max-entries")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let jobs = st.keys().jobs();
    let ids = |r: redis::streams::StreamRangeReply| -> Vec<String> {
        r.ids.into_iter().map(|e| e.id).collect()
    };
    let range = || {
        let mut conn = st.conn();
        let jobs = jobs.clone();
        async move {
            ids(redis::cmd("XRANGE")
                .arg(&jobs)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap())
        }
    };
    // No stream, then a stream without a group: nothing may be trimmed.
    assert_eq!(st.trim_streams(1000).await.unwrap(), 0);
    for i in 1..=10 {
        let _: String = redis::cmd("XADD")
            .arg(&jobs)
            .arg(format!("{i}-0"))
            .arg("f")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(st.trim_streams(1000).await.unwrap(), 0);
    st.ensure_groups().await.unwrap();
    // Entries 1..=6 delivered to two groups; 7..=10 never delivered.
    for group in [WORKERS_GROUP, "other"] {
        let _: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&jobs)
            .arg(group)
            .arg("0")
            .query_async(&mut conn)
            .await;
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c")
            .arg("COUNT")
            .arg(6)
            .arg("STREAMS")
            .arg(&jobs)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let ack = |group: &'static str, list: &'static [&'static str]| {
        let mut conn = st.conn();
        let jobs = jobs.clone();
        async move {
            let _: u64 = redis::cmd("XACK")
                .arg(&jobs)
                .arg(group)
                .arg(list)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    let all: Vec<String> = (1..=10).map(|i| format!("{i}-0")).collect();
    // Acknowledged by one group only: nothing goes.
    ack(WORKERS_GROUP, &["1-0", "2-0", "3-0", "5-0"]).await;
    assert_eq!(st.trim_streams(1000).await.unwrap(), 0);
    assert_eq!(range().await, all);
    // Acknowledged by both below the oldest pending entry (4-0): only 1..=3 go; 5-0 is
    // acknowledged too but above a pending entry, so it stays for now.
    ack("other", &["1-0", "2-0", "3-0", "4-0", "5-0", "6-0"]).await;
    assert_eq!(st.trim_streams(1000).await.unwrap(), 3);
    assert_eq!(range().await, all[3..]);
    // The pending entries (4-0, 6-0) acknowledged: everything delivered goes except the
    // last delivered entry (the bound itself); undelivered entries are never touched.
    ack(WORKERS_GROUP, &["4-0", "6-0"]).await;
    assert_eq!(st.trim_streams(1000).await.unwrap(), 2);
    assert_eq!(range().await, all[5..]);
    assert_eq!(st.trim_streams(1000).await.unwrap(), 0);
    let stats = st.stream_stats(&jobs, WORKERS_GROUP).await.unwrap();
    assert_eq!((stats.length, stats.pending, stats.lag), (4, 0, Some(4)));
    // The limit bounds one call's work.
    for group in [WORKERS_GROUP, "other"] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c")
            .arg("STREAMS")
            .arg(&jobs)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        ack(group, &["7-0", "8-0", "9-0", "10-0"]).await;
    }
    assert_eq!(st.trim_streams(2).await.unwrap(), 2);
    assert_eq!(range().await, all[7..]);
}

/// The function library loads on this machine's redis-server (7.0: Lua 5.1 limits of 60
/// upvalues and 200 locals per function, no globals in a library), registers every script,
/// coexists with another version, and comes back by itself after `FUNCTION FLUSH`.
#[tokio::test]
async fn the_function_library_loads_registers_every_script_and_reloads_itself() {
    use honua_shared::scripts::{Library, SOURCES};
    let redis = RedisServer::start();
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let lib = Library::get();
    assert!(lib.name().starts_with("honua_") && lib.name().len() == "honua_".len() + 8);
    assert!(lib.ensure(&mut conn).await.unwrap(), "loaded");
    assert!(!lib.ensure(&mut conn).await.unwrap(), "already there");
    // Another version (another hash) loads beside it: a rolling update runs both.
    let other = lib.text().replace(lib.name(), "honua_00000000");
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&other)
        .query_async(&mut conn)
        .await
        .unwrap();
    let libs: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(libs.len(), 2);
    let ours = libs
        .iter()
        .find(|l| {
            redis::from_redis_value::<String>(l["library_name"].clone()).unwrap() == lib.name()
        })
        .unwrap();
    let functions: Vec<std::collections::HashMap<String, redis::Value>> =
        redis::from_redis_value(ours["functions"].clone()).unwrap();
    let mut names: Vec<String> = functions
        .iter()
        .map(|f| redis::from_redis_value(f["name"].clone()).unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = SOURCES.iter().map(|(n, _)| lib.function_name(n)).collect();
    want.sort();
    assert_eq!(names, want);

    // After FUNCTION FLUSH (or on a fresh server) the next call loads the library again.
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The one reply matched by its text (Redis has no code for it), pinned to this server.
    let e = redis::cmd("FCALL")
        .arg(lib.function_name("trim"))
        .arg(0)
        .query_async::<redis::Value>(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("ERR"));
    assert_eq!(e.detail(), Some(honua_shared::scripts::NOT_FOUND));
    let dir = defs_dir(DEF);
    let st = store(&test_config(&redis.url(), dir.path()));
    st.ensure_job_group().await.unwrap();
    st.retire_consumer("nobody").await.unwrap();
    assert!(lib.is_loaded(&mut conn).await.unwrap());
}

/// `Store::wait_ready` leaves a service's consumer groups and the function library in place,
/// and a wait that cannot succeed ends when its stop signal has fired.
#[tokio::test]
async fn wait_ready_creates_the_groups_and_loads_the_library_or_ends_on_stop() {
    use honua_shared::keys::{Keys, SCHEDULER_GROUP};
    use honua_shared::scripts::Library;
    use honua_shared::store::Service;
    let redis = RedisServer::start();
    let dir = defs_dir(DEF);
    let st = store(&test_config(&redis.url(), dir.path()));
    assert!(
        st.wait_ready(Service::Scheduler, std::future::pending())
            .await
    );
    assert!(Library::get().is_loaded(&mut st.conn()).await.unwrap());
    let k = st.keys();
    for (stream, group) in [
        (k.jobs(), WORKERS_GROUP),
        (k.submit(), SCHEDULER_GROUP),
        (k.events(), SCHEDULER_GROUP),
        (k.results(), SCHEDULER_GROUP),
    ] {
        let stats = st.stream_stats(&stream, group).await.unwrap();
        assert!(!stats.missing, "{stream} {group}");
    }
    // Nothing listens on the port: the first attempt fails, and the stop signal (already
    // fired) ends the wait.
    let down = Store::open(
        &format!("redis://127.0.0.1:{}", free_port()),
        Keys::new("down", 0),
    )
    .unwrap();
    assert!(
        !down
            .wait_ready(Service::Worker, std::future::ready(()))
            .await
    );
}

/// A missing consumer group is [`StoreError::NoGroup`] from every call on it (commands and
/// scripts alike), and a missing function library is [`StoreError::FunctionsNotLoaded`]
/// from every answer of a pipelined commit.
#[tokio::test]
async fn a_missing_group_or_library_is_a_typed_error() {
    use honua_shared::keys::SCHEDULER_GROUP;
    use honua_shared::store::StoreError;
    let redis = RedisServer::start();
    let dir = defs_dir(DEF);
    let st = store(&test_config(&redis.url(), dir.path()));
    st.load_scripts().await.unwrap();
    let no_group = |r: Result<(), StoreError>| match r {
        Err(e @ StoreError::NoGroup { .. }) => assert!(e.is_retryable()),
        other => panic!("not NoGroup: {other:?}"),
    };
    // The streams exist, their groups do not.
    st.ensure_groups().await.unwrap();
    let jobs = st.keys().jobs();
    for (stream, group) in [
        (jobs.clone(), WORKERS_GROUP),
        (st.keys().events(), SCHEDULER_GROUP),
    ] {
        let _: u64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&stream)
            .arg(group)
            .query_async(&mut st.conn())
            .await
            .unwrap();
    }
    no_group(
        st.reclaim("a", Duration::ZERO, "0-0", 10, 5)
            .await
            .map(|_| ()),
    );
    no_group(st.job_consumers().await.map(|_| ()));
    no_group(st.retire_consumer("a").await.map(|_| ()));
    no_group(
        st.drop_entry(&jobs, WORKERS_GROUP, "1-1", "test", Some("a"))
            .await
            .map(|_| ()),
    );
    no_group(
        st.autoclaim(
            &st.keys().events(),
            SCHEDULER_GROUP,
            "s",
            Duration::ZERO,
            "0-0",
            10,
        )
        .await
        .map(|_| ()),
    );

    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut st.conn())
        .await
        .unwrap();
    let call = honua_shared::commit::CommitCall {
        keys: vec![],
        args: vec![],
    };
    let answers = st.commit_many(&[&call, &call]).await.unwrap();
    assert_eq!(answers.len(), 2);
    for a in answers {
        assert!(
            matches!(a, Err(StoreError::FunctionsNotLoaded { .. })),
            "{a:?}"
        );
    }
}

/// The one decide-and-commit path against commit.lua's revision guard: a commit decided on
/// a stale revision loses the race and is decided again from a fresh read, and a change
/// that loses every race gives up after `CONFLICT_BOUND` decisions.
#[tokio::test]
async fn decide_and_commit_decides_again_after_a_lost_race_and_gives_up_at_the_bound() {
    use honua_scheduler::processes::{Answered, CONFLICT_BOUND, Decision};
    use honua_shared::engine::Transition;
    use honua_shared::record::ProcessRecord;
    use honua_shared::store::{Commit, StoreError};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let redis = RedisServer::start();
    let (st, held, processes, _dir) = setup(&redis).await;
    let pid = held.job.process_id.as_str();
    let decided = AtomicUsize::new(0);
    // Decides an empty transition: on a stale revision for the first `stale_for` decisions,
    // then on the one read.
    let decide = |stale_for: usize| {
        let (st, decided) = (&st, &decided);
        move || async move {
            let n = decided.fetch_add(1, Ordering::Relaxed);
            let (now, mut v) = st.load_processes(&[pid]).await?;
            let (meta, steps) = v.remove(0);
            let rec = ProcessRecord::parse(pid, &meta, &steps).unwrap().unwrap();
            let rev = if n < stale_for {
                rec.rev + 1000
            } else {
                rec.rev
            };
            let rev = honua_shared::record::Revision {
                rev,
                steps_rev: rec.steps_rev,
            };
            let call = Transition::default().to_commit(st.keys(), pid, Some(rev), now, 60, None);
            Ok::<_, StoreError>(Decision::<(), ()>::Commit {
                call,
                span: tracing::Span::none(),
                then: (),
            })
        }
    };
    let answer = |(), committed: Result<Commit, StoreError>| {
        Ok(match committed? {
            Commit::Conflict => Answered::Conflict,
            Commit::Ok => Answered::Done(()),
            other => panic!("unexpected answer {other:?}"),
        })
    };

    let rev_before = processes.load(pid).await.unwrap().0.rev;
    let won = processes
        .decide_and_commit(decide(3), answer)
        .await
        .unwrap();
    assert_eq!(won, Some(()));
    assert_eq!(
        decided.load(Ordering::Relaxed),
        4,
        "three lost races, then a win"
    );
    assert_eq!(processes.load(pid).await.unwrap().0.rev, rev_before + 1);

    decided.store(0, Ordering::Relaxed);
    let lost = processes
        .decide_and_commit(decide(usize::MAX), answer)
        .await
        .unwrap();
    assert_eq!(lost, None);
    assert_eq!(decided.load(Ordering::Relaxed), CONFLICT_BOUND);
    assert_eq!(processes.load(pid).await.unwrap().0.rev, rev_before + 1);
}

/// A command the service's Redis user may not run is [`StoreError::NoPermission`] (not a
/// generic Redis error), so the worker can tell an ACL without `+info` from a failing server.
#[tokio::test]
async fn a_command_the_user_may_not_run_is_a_typed_error() {
    use honua_shared::keys::Keys;
    use honua_shared::store::StoreError;
    let redis = RedisServer::start();
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "noinfo", "on", ">pw", "~*", "+@all", "-info"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let st = Store::open(&redis.url_as("noinfo", "pw"), Keys::new("perm", 0)).unwrap();
    st.ping().await.unwrap();
    match st.server_info().await {
        Err(e @ StoreError::NoPermission(_)) => assert!(!e.is_retryable(), "{e}"),
        other => panic!("not NoPermission: {other:?}"),
    }
}

/// commit.lua's intake precondition: while the intake key exists, a create that would start
/// steps writes nothing and leaves its submission unacknowledged (answer `closed`), so no
/// create races past a drain; the same submission is then created Pending and acknowledged.
#[tokio::test]
async fn a_create_that_starts_steps_is_refused_while_intake_is_drained() {
    use honua_shared::commit::AckSource;
    use honua_shared::engine::{self, Ctx};
    use honua_shared::keys::SCHEDULER_GROUP;
    use honua_shared::status::ProcessStatus;
    use honua_shared::store::Commit;

    let redis = RedisServer::start();
    let (st, _held, processes, _dir) = setup(&redis).await;
    let keys = st.keys().clone();
    let sub = honua_shared::envelope::Submission {
        process_type: "One".into(),
        version: None,
        input: json!({}),
        id: Some("p-drained".into()),
        idempotency_key: None,
        tenant: None,
        trace: Default::default(),
    };
    let entry = st.submit(&sub.to_fields()).await.unwrap();
    let mut conn = st.blocking(Duration::from_millis(100)).unwrap();
    let read = st
        .read_group(
            &mut conn,
            &keys.submit(),
            SCHEDULER_GROUP,
            "s",
            10,
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert!(
        st.drain_intake(r#"{"since_ms":1,"by":"test"}"#)
            .await
            .unwrap()
    );

    let def = processes.defs.latest("One").unwrap();
    let now = st.server_time_ms().await.unwrap();
    let ctx = Ctx {
        def,
        kinds: &processes.kinds,
        now_ms: now,
        jitter: 0.5,
    };
    let compile = |t: honua_shared::engine::Transition| {
        t.to_commit(
            &keys,
            "p-drained",
            None,
            now,
            60,
            Some(AckSource {
                stream: keys.submit(),
                id: &entry,
            }),
        )
    };
    let hour = Duration::from_secs(3600);
    let started = compile(engine::create(
        &ctx,
        "p-drained",
        vec![0x80],
        None,
        None,
        hour,
    ));
    assert_eq!(st.commit(&started).await.unwrap(), Commit::Closed);
    let mut c = st.conn();
    let exists: u64 = redis::cmd("EXISTS")
        .arg(keys.process("p-drained"))
        .arg(keys.steps("p-drained"))
        .arg(keys.data("p-drained"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(exists, 0, "a refused create writes nothing");
    assert_eq!(
        entries_added(&st, &keys.jobs()).await,
        1,
        "only setup's job"
    );
    let submissions_pending = |mut c: honua_shared::store::Conn| {
        let key = keys.submit();
        async move {
            let p: Vec<redis::Value> = redis::cmd("XPENDING")
                .arg(key)
                .arg(SCHEDULER_GROUP)
                .arg("-")
                .arg("+")
                .arg(10)
                .query_async(&mut c)
                .await
                .unwrap();
            p.len()
        }
    };
    let pending = submissions_pending(c.clone()).await;
    assert_eq!(pending, 1, "the submission stays pending");

    let held = compile(engine::create_pending(
        &ctx,
        "p-drained",
        vec![0x80],
        None,
        None,
        hour,
    ));
    assert!(matches!(st.commit(&held).await.unwrap(), Commit::Ok));
    let rec = processes.load("p-drained").await.unwrap().0;
    assert_eq!(rec.status, ProcessStatus::Pending);
    assert!(rec.steps.is_empty());
    assert_eq!(st.pending_processes(10).await.unwrap(), ["p-drained"]);
    let pending = submissions_pending(c.clone()).await;
    assert_eq!(pending, 0, "the Pending create acknowledged it");

    // Intake open again: the same create with steps commits.
    assert!(st.resume_intake().await.unwrap());
    assert!(
        !st.resume_intake().await.unwrap(),
        "resuming twice is a no-op"
    );
    let again = engine::create(&ctx, "p-open", vec![0x80], None, None, hour)
        .to_commit(&keys, "p-open", None, now, 60, None);
    assert!(matches!(st.commit(&again).await.unwrap(), Commit::Ok));
}

/// A process created through the engine (idempotency key `key-<id>`), with its first job
/// read (pending) by consumer `a` when `claim`.
async fn created(
    engine: &honua_scheduler::Processes,
    id: &str,
    claim: bool,
) -> Option<(String, JobEnvelope)> {
    let st = &engine.store;
    engine
        .create(
            &honua_shared::envelope::Submission {
                process_type: "One".into(),
                version: None,
                input: json!({"n": 1}),
                id: Some(id.into()),
                idempotency_key: Some(format!("key-{id}")),
                tenant: None,
                trace: Default::default(),
            },
            None,
        )
        .await
        .unwrap();
    if !claim {
        return None;
    }
    let mut conn = st.blocking(Duration::from_millis(100)).unwrap();
    let entries = st
        .read_group(
            &mut conn,
            &st.keys().jobs(),
            WORKERS_GROUP,
            "a",
            1,
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    let e = entries.into_iter().next().unwrap();
    let job = JobEnvelope::from_fields(&e.fields).unwrap();
    assert_eq!(job.process_id, id);
    Some((e.id, job))
}

/// What `delete.lua` needs the caller to have read: the record's rev and idempotency key.
async fn guard(st: &Store, id: &str) -> honua_shared::store::DeleteGuard {
    let (meta, steps) = st.load_process(id).await.unwrap();
    honua_shared::store::DeleteGuard::of(&meta, &steps)
}

#[tokio::test]
async fn delete_removes_a_process_and_every_reference_and_nothing_else() {
    use honua_shared::envelope::Event;
    use honua_shared::store::{Deleted, Removed};
    let redis = RedisServer::start();
    let (st, engine, _dir) = engine_of(&redis).await;
    let keys = st.keys().clone();
    let mut conn = st.conn();
    // p1: its job pending on consumer a; a signal and a step result not yet applied, a dead
    // letter, a delayed timer and its deadline, LLM usage. p2: the same kind of process,
    // its job still queued; it must be untouched.
    let (entry, job) = created(&engine, "p1", true).await.unwrap();
    created(&engine, "p2", false).await;
    let held = Held {
        entry_id: entry.clone(),
        deliveries: 1,
        job,
    };
    st.send_event(&Event::Signal {
        process_id: "p1".into(),
        name: "review".into(),
        value: "approve".into(),
        by: None,
    })
    .await
    .unwrap();
    let _: () = redis::pipe()
        .cmd("XADD")
        .arg(keys.results())
        .arg("*")
        .arg("v")
        .arg("1")
        .arg("t")
        .arg("step")
        .arg("pid")
        .arg("p1")
        .ignore()
        .cmd("XADD")
        .arg(keys.dlq())
        .arg("*")
        .arg("pid")
        .arg("p1")
        .arg("reason")
        .arg("test")
        .ignore()
        .cmd("ZADD")
        .arg(keys.delayed())
        .arg(u64::MAX / 4)
        .arg(json!({"k": "event", "f": ["v", "1", "t", "timer", "pid", "p1"]}).to_string())
        .ignore()
        .cmd("HSET")
        .arg(keys.llm_usage("p1"))
        .arg("tokens")
        .arg(10)
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let before_p2 = references_to(&st, "p2", Some("key-p2")).await;
    assert!(
        before_p2.len() >= 6,
        "p2's keys, indexes, deadline, job and idempotency key: {before_p2:?}"
    );
    assert!(references_to(&st, "p1", Some("key-p1")).await.len() > before_p2.len());

    // Unfinished and not forced: refused, nothing changes.
    let refs = st.references("p1").await.unwrap();
    assert_eq!(refs.jobs.ids, std::slice::from_ref(&entry));
    assert_eq!(refs.delayed.len(), 2, "{refs:?}");
    assert_eq!(
        (
            refs.events.ids.len(),
            refs.results.ids.len(),
            refs.dlq.ids.len()
        ),
        (1, 1, 1)
    );
    let g = guard(&st, "p1").await;
    assert_eq!(g.idempotency_key.as_deref(), Some("key-p1"));
    let r = st
        .delete_process("p1", &g, &refs, false, 100)
        .await
        .unwrap();
    assert_eq!(
        r,
        Deleted::Running {
            status: "Running".into()
        }
    );
    // A stale read of the record: changed, nothing removed.
    let stale = honua_shared::store::DeleteGuard {
        rev: Some("0".into()),
        ..g.clone()
    };
    let r = st
        .delete_process("p1", &stale, &refs, true, 100)
        .await
        .unwrap();
    assert_eq!(r, Deleted::Changed);
    assert!(
        st.load_process("p1")
            .await
            .unwrap()
            .0
            .contains_key("status")
    );

    // An event written after the scan is found by the script itself.
    st.send_event(&Event::Signal {
        process_id: "p1".into(),
        name: "late".into(),
        value: "approve".into(),
        by: None,
    })
    .await
    .unwrap();
    let r = st.delete_process("p1", &g, &refs, true, 100).await.unwrap();
    assert_eq!(
        r,
        Deleted::Deleted {
            status: "Running".into(),
            removed: Removed {
                jobs: 1,
                events: 2,
                results: 1,
                dead_letters: 1,
                delayed: 2,
            }
        }
    );
    assert_eq!(
        references_to(&st, "p1", Some("key-p1")).await,
        Vec::<String>::new()
    );
    // The worker that held the job is fenced out.
    assert_ne!(
        st.heartbeat("a", std::slice::from_ref(&held))
            .await
            .unwrap(),
        vec![Fence::Ok]
    );
    // p2 is untouched.
    assert_eq!(references_to(&st, "p2", Some("key-p2")).await, before_p2);

    // Idempotent on a missing id: nothing to remove, nothing else touched.
    for id in ["p1", "never-was"] {
        let refs = st.references(id).await.unwrap();
        let r = st
            .delete_process(id, &guard(&st, id).await, &refs, false, 100)
            .await
            .unwrap();
        assert_eq!(
            r,
            Deleted::Missing {
                removed: Removed::default()
            },
            "{id}"
        );
    }
    assert_eq!(references_to(&st, "p2", Some("key-p2")).await, before_p2);

    // A stray index entry of a missing process is removed.
    let _: () = redis::cmd("ZADD")
        .arg(keys.index_all())
        .arg(1)
        .arg("p1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let refs = st.references("p1").await.unwrap();
    let r = st
        .delete_process("p1", &guard(&st, "p1").await, &refs, false, 100)
        .await
        .unwrap();
    assert!(matches!(r, Deleted::Missing { .. }), "{r:?}");
    assert_eq!(
        references_to(&st, "p1", Some("key-p1")).await,
        Vec::<String>::new()
    );

    // The same id can be used again: a new process, none of p1's leftovers.
    created(&engine, "p1", false).await;
    let again = references_to(&st, "p1", Some("key-p1")).await;
    assert_eq!(again.len(), before_p2.len(), "{again:?} / {before_p2:?}");
}

#[tokio::test]
async fn delete_asks_for_a_new_scan_when_too_many_entries_arrived_since() {
    use honua_shared::envelope::Event;
    use honua_shared::store::Deleted;
    let redis = RedisServer::start();
    let (st, _held, _e, _d) = setup(&redis).await;
    let (meta_ids, _) = st
        .index_page(&st.keys().index_all(), 0, u64::MAX / 2, 0, 1)
        .await
        .map(|p| (p, ()))
        .unwrap();
    let id = meta_ids[0].0.clone();
    let refs = st.references(&id).await.unwrap();
    for n in 0..3 {
        st.send_event(&Event::Signal {
            process_id: format!("other-{n}"),
            name: "s".into(),
            value: "approve".into(),
            by: None,
        })
        .await
        .unwrap();
    }
    let g = guard(&st, &id).await;
    assert_eq!(
        st.delete_process(&id, &g, &refs, true, 2).await.unwrap(),
        Deleted::Changed
    );
    assert_eq!(
        st.delete_process(&id, &g, &refs, true, 3).await.unwrap(),
        Deleted::Deleted {
            status: "Running".into(),
            removed: honua_shared::store::Removed {
                jobs: 1,
                delayed: 1,
                ..Default::default()
            }
        }
    );
}

/// Creates a `Three` process, reads its first job as consumer `a` and begins it asking for the
/// process's snapshot; returns the claim and the snapshot.
async fn begin_with_snapshot(
    st: &Store,
    engine: &honua_scheduler::Processes,
) -> (Held, honua_shared::record::ProcessRecord) {
    let sub = submission_of("Three");
    let pid = engine.create(&sub, None).await.unwrap().id().to_string();
    let mut conn = st.blocking(Duration::from_millis(100)).unwrap();
    let entries = read_as_a(st, &mut conn).await;
    let (entry, job) = entries
        .iter()
        .map(|e| (e, JobEnvelope::from_fields(&e.fields).unwrap()))
        .find(|(_, j)| j.process_id == pid)
        .unwrap();
    let begun = st
        .begin("a", &[(entry.id.clone(), 1, job.clone())], &[], &|_| true)
        .await
        .unwrap();
    let Some(Begin::Ok {
        snapshot: Some(rec),
        ..
    }) = begun.into_iter().next()
    else {
        panic!("begin gave no snapshot")
    };
    assert_eq!(rec.steps[&job.step].status, StepStatus::Running);
    let held = Held {
        entry_id: entry.id.clone(),
        deliveries: 1,
        job,
    };
    (held, rec)
}

#[tokio::test]
async fn a_worker_commits_a_steps_successors_only_on_the_revision_it_decided_on() {
    use honua_shared::engine::{self, Ctx};
    use honua_shared::envelope::Event;
    use honua_shared::store::{Commit, Completion};
    let redis = RedisServer::start();
    let dir = defs_dir(&[honua_tests::defs::THREE]);
    let cfg = test_config(&redis.url(), dir.path());
    let (defs, kinds) = honua_scheduler::load_definitions(&cfg).unwrap();
    let st = store(&cfg);
    st.ensure_groups().await.unwrap();
    let engine = honua_scheduler::Processes::new(
        std::sync::Arc::new(cfg),
        st.clone(),
        defs.clone(),
        kinds.clone(),
    )
    .await;
    let ok = ok_result();
    // What the worker decides from its snapshot: A completed, B queued and enqueued.
    let decide = |held: &Held, rec: &honua_shared::record::ProcessRecord| {
        let ctx = Ctx {
            def: defs.get("Three", 1).unwrap(),
            kinds: &kinds,
            now_ms: rec.steps["A"].claimed_ms.unwrap() + 1,
            jitter: 0.5,
        };
        let event = Event::Step {
            process_id: held.job.process_id.clone(),
            step: held.job.step.clone(),
            token: held.job.token.clone(),
            result: ok.clone(),
        };
        let t = engine::on_event(&ctx, rec, &event);
        t.to_fast(rec.revision(), rec.status)
            .unwrap_or_else(|| panic!("A's successor is a worker step enqueued now: {t:?}"))
    };
    let (jobs_key, results_key) = (st.keys().jobs(), st.keys().results());
    let jobs_added = || entries_added(&st, &jobs_key);
    let results_added = || entries_added(&st, &results_key);
    let read = |pid: String| {
        let st = st.clone();
        async move {
            let (meta, steps) = st.load_process(&pid).await.unwrap();
            honua_shared::record::ProcessRecord::parse(&pid, &meta, &steps)
                .unwrap()
                .unwrap()
        }
    };

    // Nothing changed since the snapshot: the result and its transition commit together.
    let (held, rec) = begin_with_snapshot(&st, &engine).await;
    let pid = held.job.process_id.clone();
    let fast = decide(&held, &rec);
    let item = Completion {
        held: &held,
        output: None,
        checkpoint: true,
        result: &ok,
        fast: Some(&fast),
    };
    let jobs_before = jobs_added().await;
    assert_eq!(
        st.complete_many("a", &[item]).await.unwrap(),
        vec![(Fence::Ok, true)]
    );
    let after = read(pid.clone()).await;
    assert_eq!(after.steps["A"].status, StepStatus::Completed);
    assert_eq!(after.steps["B"].status, StepStatus::Queued);
    assert_eq!((after.rev, after.steps_rev), (rec.rev, 1));
    // The meta hash's update time stays the create's; the process's last change is the
    // transition's (what the API shows as `updatedAt`).
    assert!(after.updated_ms <= after.steps["B"].queued_ms);
    assert_eq!(after.last_change_ms(), after.steps["B"].queued_ms);
    assert_eq!(jobs_added().await, jobs_before + 1, "B's job");
    assert_eq!(results_added().await, 0, "no event for the scheduler");
    // A scheduler decision made on the state before it loses the race.
    let stale = honua_shared::engine::Transition::default().to_commit(
        st.keys(),
        &pid,
        Some(rec.revision()),
        rec.steps["A"].claimed_ms.unwrap() + 2,
        60,
        None,
    );
    assert_eq!(st.commit(&stale).await.unwrap(), Commit::Conflict);
    // A retry of the landed commit (its answer was lost) answers ok and writes nothing.
    assert_eq!(
        st.complete_many("a", &[item]).await.unwrap(),
        vec![(Fence::Ok, false)]
    );
    assert_eq!(read(pid.clone()).await, after);
    assert_eq!(jobs_added().await, jobs_before + 1);
    assert_eq!(results_added().await, 0);

    // The scheduler committed in between: the transition is not applied, the result goes
    // to the scheduler as an event, to be decided again on what is current.
    let (held, rec) = begin_with_snapshot(&st, &engine).await;
    let pid = held.job.process_id.clone();
    let fast = decide(&held, &rec);
    let between = honua_shared::engine::Transition::default().to_commit(
        st.keys(),
        &pid,
        Some(rec.revision()),
        rec.steps["A"].claimed_ms.unwrap() + 2,
        60,
        None,
    );
    assert!(matches!(st.commit(&between).await.unwrap(), Commit::Ok));
    let jobs_before = jobs_added().await;
    let item = Completion {
        held: &held,
        output: None,
        checkpoint: true,
        result: &ok,
        fast: Some(&fast),
    };
    assert_eq!(
        st.complete_many("a", &[item]).await.unwrap(),
        vec![(Fence::Ok, false)]
    );
    let after = read(pid).await;
    assert_eq!(after.steps["A"].status, StepStatus::Done);
    assert!(!after.steps.contains_key("B"));
    assert_eq!((after.rev, after.steps_rev), (rec.rev + 1, 0));
    assert_eq!(jobs_added().await, jobs_before);
    assert_eq!(results_added().await, 1, "A's result is the scheduler's");
}

/// The per-type counts the console's overview shows: the commit that creates or reopens a
/// process adds it to its type's active index, the one that finishes it removes it and
/// counts it in the minute and hour buckets of its status (with their TTLs); a forced
/// delete leaves the index too. The read sums the last hour from minute buckets and the
/// last day from hour buckets plus the minutes before the first of them.
#[tokio::test]
async fn finishing_commits_count_per_type_and_the_read_sums_the_windows() {
    use honua_shared::keys::{STATS_HOUR_TTL_SECS, STATS_MINUTE_TTL_SECS};
    use honua_shared::status::ProcessStatus;
    let redis = RedisServer::start();
    let (st, engine, _dir) = engine_of(&redis).await;
    let keys = st.keys().clone();
    let counts = |now: u64| {
        let st = st.clone();
        async move {
            let c = st.type_counts(&["One", "Other"], now).await.unwrap();
            assert_eq!(c[1].active, 0);
            assert!(c[1].finished.iter().all(|(_, h, d)| *h == 0 && *d == 0));
            c.into_iter().next().unwrap()
        }
    };
    let of = |c: &honua_shared::store::TypeCounts, s: ProcessStatus| {
        c.finished
            .iter()
            .find(|(st, _, _)| *st == s)
            .map(|(_, h, d)| (*h, *d))
            .unwrap()
    };
    for id in ["p1", "p2", "p3"] {
        created(&engine, id, false).await;
    }
    let now = st.server_time_ms().await.unwrap();
    assert_eq!(counts(now).await.active, 3);

    // Cancelled: no longer active, counted once in the hour and the day.
    engine.cancel("p1", None, None).await.unwrap();
    let now = st.server_time_ms().await.unwrap();
    let c = counts(now).await;
    assert_eq!(c.active, 2);
    assert_eq!(of(&c, ProcessStatus::Cancelled), (1, 1));
    assert_eq!(of(&c, ProcessStatus::Completed), (0, 0));
    // Both buckets expire, after more than the day they serve.
    let mut conn = st.conn();
    for (k, ttl) in [
        (keys.stats_minute(now / 60_000), STATS_MINUTE_TTL_SECS),
        (keys.stats_hour(now / 3_600_000), STATS_HOUR_TTL_SECS),
    ] {
        let left: i64 = redis::cmd("TTL")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(left > 24 * 3600 && left <= ttl as i64, "{k}: ttl {left}");
    }

    // Retried from its step: active again; cancelled again: counted again.
    engine.retry("p1", Some("S"), None, None).await.unwrap();
    assert_eq!(counts(now).await.active, 3);
    engine.cancel("p1", None, None).await.unwrap();
    let now = st.server_time_ms().await.unwrap();
    let c = counts(now).await;
    assert_eq!((c.active, of(&c, ProcessStatus::Cancelled)), (2, (2, 2)));

    // A forced delete of an unfinished process leaves its type's active index.
    let refs = st.references("p2").await.unwrap();
    let g = guard(&st, "p2").await;
    assert_eq!(g.process_type.as_deref(), Some("One"));
    st.delete_process("p2", &g, &refs, true, 100).await.unwrap();
    assert_eq!(counts(now).await.active, 1);

    // The windows, on buckets written by hand at a fixed time: 10:30 of some day.
    let hour_ms = 3_600_000u64;
    let t = 1_800_000_000_000u64 / hour_ms * hour_ms + 30 * 60_000;
    let (m, h) = (t / 60_000, t / hour_ms);
    let mut put = redis::pipe();
    for (k, n) in [
        // In the last hour (and the day, through its hour bucket below).
        (keys.stats_minute(m), 1),
        (keys.stats_minute(m - 59), 2),
        (keys.stats_hour(h), 3),
        // An hour ago: not in the last hour.
        (keys.stats_minute(m - 60), 100),
        // The hour buckets of the day: 23 hours back to the current one.
        (keys.stats_hour(h - 23), 10),
        // The minutes before that hour, within 24 hours (23 h 59 min ago) ...
        (keys.stats_minute((h - 23) * 60 - 29), 20),
        // ... and one just over 24 hours ago, or whose hour is too old: not counted.
        (keys.stats_minute((h - 23) * 60 - 31), 1000),
        (keys.stats_hour(h - 24), 1000),
    ] {
        put.cmd("HINCRBY").arg(k).arg("Failed:One").arg(n).ignore();
    }
    let _: () = put.query_async(&mut conn).await.unwrap();
    let c = counts(t).await;
    assert_eq!(of(&c, ProcessStatus::Failed), (1 + 2, 3 + 10 + 20));
}

/// A worker's registration (version, host, concurrency, start) is read back with the
/// workers list and removed when it retires.
#[tokio::test]
async fn a_worker_registers_what_it_is_and_retiring_removes_it() {
    use honua_shared::store::WorkerMeta;
    let redis = RedisServer::start();
    let (st, _held, _e, _d) = setup(&redis).await;
    let meta = WorkerMeta {
        version: "9.9.9".into(),
        host: "pod-a".into(),
        concurrency: 16,
        started_ms: 1234,
    };
    st.register_worker("a", &meta).await.unwrap();
    st.heartbeat("a", &[]).await.unwrap();
    st.heartbeat("idle", &[]).await.unwrap();
    let ws = st.workers(10).await.unwrap();
    let a = ws.iter().find(|w| w.id == "a").unwrap();
    assert_eq!(a.meta.as_ref(), Some(&meta));
    let idle = ws.iter().find(|w| w.id == "idle").unwrap();
    assert_eq!(idle.meta, None, "registered nothing");
    // `a` owns a job: kept with its registration. The idle one goes.
    assert!(!st.retire_consumer("a").await.unwrap());
    assert_eq!(st.worker_meta(&["a"]).await.unwrap(), vec![Some(meta)]);
    st.register_worker(
        "idle",
        &WorkerMeta {
            version: "1".into(),
            host: "h".into(),
            concurrency: 1,
            started_ms: 1,
        },
    )
    .await
    .unwrap();
    assert!(st.retire_consumer("idle").await.unwrap());
    assert_eq!(st.worker_meta(&["idle"]).await.unwrap(), vec![None]);
    assert!(st.workers(10).await.unwrap().iter().all(|w| w.id != "idle"));
}
