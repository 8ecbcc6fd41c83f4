//! Hostile stream entries: an entry with thousands of fields, written to the submission,
//! event, results or job stream by any Redis client, is quarantined with a bounded summary and
//! acknowledged; it never stops intake, trimming or the reclaim of dead workers' jobs.

use honua_shared::envelope::{MAX_COPIED_FIELDS, MAX_ENTRY_FIELDS, Submission};
use honua_shared::keys::Key;
use honua_shared::status::ProcessStatus;
use honua_tests::*;
use redis::Value;
use serde_json::json;
use std::time::Duration;

/// Fields in each hostile entry: far past what Lua's `unpack` takes (about 8,000 values).
const FIELDS: usize = 5_000;

const DEFS: &[(&str, &str)] = &[defs::THREE, defs::COUNT];

/// `XADD stream * <first> f0 v0 f1 v1 …` with [`FIELDS`] fields in all; returns the id.
async fn xadd_huge(
    store: &honua_shared::store::Store,
    stream: &Key,
    first: &[(&str, &str)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in first {
        cmd.arg(*k).arg(*v);
    }
    for i in 0..FIELDS - first.len() {
        cmd.arg(format!("f{i}")).arg(format!("value-{i}"));
    }
    cmd.query_async(&mut store.conn()).await.unwrap()
}

/// The raw field list of one entry (`None` once it is trimmed away).
async fn raw_entry(
    store: &honua_shared::store::Store,
    stream: &Key,
    id: &str,
) -> Option<Vec<String>> {
    let r: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg(id)
        .arg(id)
        .query_async(&mut store.conn())
        .await
        .unwrap();
    r.into_iter().next().map(|(_, f)| f)
}

/// Is the entry still pending in `group`?
async fn is_pending(
    store: &honua_shared::store::Store,
    stream: &Key,
    group: &str,
    id: &str,
) -> bool {
    let r: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(&mut store.conn())
        .await
        .unwrap();
    matches!(r, Value::Array(v) if !v.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_entries_are_quarantined_and_housekeeping_goes_on() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = test_config(&redis.url(), dir.path());
    cfg.custom_step_kinds = vec!["counter".into()];
    // A poison job would be dead-lettered (reclaim.lua copies its fields) after 2 deliveries.
    cfg.worker.max_deliveries = 2;
    let log = dir.path().join("exec.log");
    let store = store(&cfg);
    let keys = store.keys().clone();
    store.ensure_groups().await.unwrap();
    // Hostile entries first, so each is the oldest entry (and oldest pending) of its stream.
    let streams = [
        (keys.submit(), honua_shared::keys::SCHEDULER_GROUP),
        (keys.events(), honua_shared::keys::SCHEDULER_GROUP),
        (keys.results(), honua_shared::keys::SCHEDULER_GROUP),
        (keys.jobs(), honua_shared::keys::WORKERS_GROUP),
    ];
    // The submission is a valid one followed by junk: only its first fields are read, and
    // a capped entry is refused, never half-read.
    let sneaky: &[(&str, &str)] = &[("v", "1"), ("type", "Three"), ("id", "sneaky")];
    let mut huge = Vec::new();
    for (i, (stream, group)) in streams.iter().enumerate() {
        let first = if i == 0 { sneaky } else { &[] };
        huge.push((
            stream.clone(),
            *group,
            xadd_huge(&store, stream, first).await,
        ));
    }

    // Scheduler in-process, the worker as a process (it is killed below).
    let f = Fleet::start(cfg.clone(), 1, 0).await;
    let mut w1 = WorkerProcess::spawn(env!("CARGO_BIN_EXE_honua-test-worker"), &cfg, "w1", &log);

    // Each hostile entry is set aside with a bounded summary and acknowledged (one script).
    let quarantined = wait_for("four quarantine entries", DEADLINE, || async {
        let q = store.stream_entries(&keys.quarantine(), 10).await.unwrap();
        (q.len() >= huge.len()).then_some(q)
    })
    .await;
    assert_eq!(quarantined.len(), huge.len(), "{quarantined:?}");
    assert!(
        f.record("sneaky").await.is_none(),
        "a capped entry was read"
    );
    for (stream, group, id) in &huge {
        assert!(
            !is_pending(&store, stream, group, id).await,
            "{stream} {id}"
        );
        let q = quarantined
            .iter()
            .find(|e| e.fields.get("entry_id") == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no quarantine entry for {stream} {id}"));
        assert_eq!(q.fields.get("source"), Some(stream.as_str()));
        assert_eq!(
            q.fields.get("fields_total"),
            Some(FIELDS.to_string().as_str())
        );
        assert!(
            q.fields.get("reason").unwrap_or("").contains("5000 fields"),
            "{:?}",
            q.fields.get("reason")
        );
        // The summary: the first fields of the entry, no more.
        assert_eq!(q.fields.get("f0"), Some("value-0"));
        let raw = raw_entry(&store, &keys.quarantine(), &q.id).await.unwrap();
        assert!(
            raw.len() <= 2 * MAX_ENTRY_FIELDS,
            "quarantine entry has {} values",
            raw.len() / 2
        );
    }

    // 50 good submissions through the submission stream, behind the hostile one.
    let mut ids = Vec::new();
    for i in 0..50 {
        let sub = Submission {
            process_type: "Three".into(),
            version: None,
            input: json!({ "i": i }),
            id: Some(format!("good-{i}")),
            idempotency_key: None,
            tenant: None,
            trace: Default::default(),
        };
        store.submit(&sub.to_fields()).await.unwrap();
        ids.push(format!("good-{i}"));
    }
    for id in &ids {
        let rec = f.wait_finished(id).await;
        assert_eq!(rec.status, ProcessStatus::Completed, "{id}");
    }

    // Trimming goes past the hostile entries: each is gone from its stream. (Here the event
    // stream gets no entry after its hostile one — step results go to `results`, and these
    // processes have no signal or timer — so the trim bound, the group's last-delivered id,
    // is that entry itself and nothing below it remains; the entry is acknowledged above.)
    for (stream, _, id) in huge.iter().filter(|(s, _, _)| *s != keys.events()) {
        wait_for(&format!("{stream} trimmed past {id}"), DEADLINE, || async {
            raw_entry(&store, stream, id).await.is_none().then_some(())
        })
        .await;
    }

    // A dead worker's job is reclaimed by another worker.
    let pid = f.submit("Count", json!({})).await;
    wait_for("w1 to start the step", DEADLINE, || async {
        read_log(&log)
            .into_iter()
            .find(|l| l.event == "start" && l.process_id == pid && l.worker == "w1")
    })
    .await;
    w1.kill9();
    let killed_at = f.store().server_time_ms().await.unwrap();
    let _w2 = WorkerProcess::spawn(env!("CARGO_BIN_EXE_honua-test-worker"), &cfg, "w2", &log);
    let claimed = wait_for("w2 to reclaim the step", DEADLINE, || async {
        let rec = f.record(&pid).await?;
        let step = rec.steps.get("Count")?;
        (step.worker.as_deref() == Some("w2")).then(|| step.claimed_ms.unwrap_or(0))
    })
    .await;
    // Reported, not asserted: Redis's clock from kill -9 to the claim (w2's start-up
    // included), against lease + sweep.
    eprintln!(
        "reclaim after kill -9 with hostile entries present: {} ms (lease {} ms + sweep {} ms)",
        claimed.saturating_sub(killed_at),
        cfg.worker.lease_ms,
        cfg.worker.sweep_ms
    );
    assert!(
        f.store()
            .stream_entries(&keys.dlq(), 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing was dead-lettered"
    );
    f.stop().await;
}

/// The scripts alone: `drop_entry.lua` and the dead-letter path of `reclaim.lua` copy a
/// bounded summary of a 5,000-field entry (both failed with "too many results to unpack").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_summarise_oversized_entries() {
    let redis = RedisServer::start();
    let dir = defs_dir(&[]);
    let cfg = test_config(&redis.url(), dir.path());
    let store = store(&cfg);
    let keys = store.keys().clone();
    store.ensure_groups().await.unwrap();
    store.load_scripts().await.unwrap();
    let group = honua_shared::keys::WORKERS_GROUP;
    let jobs = keys.jobs();
    let id = xadd_huge(&store, &jobs, &[]).await;
    let mut conn = store.blocking(Duration::from_millis(100)).unwrap();
    let block = Duration::from_millis(100);
    let read = store
        .read_group(&mut conn, &jobs, group, "c1", 10, block)
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].fields.total(), FIELDS);
    let err = honua_shared::envelope::JobEnvelope::from_fields(&read[0].fields).unwrap_err();
    assert!(err.to_string().contains("5000 fields"), "{err}");

    // Delivered twice with max_deliveries 1: reclaim.lua dead-letters it.
    let r = store
        .reclaim("c2", Duration::ZERO, "0-0", 10, 1)
        .await
        .unwrap();
    assert_eq!(r.dead_lettered, vec![id.clone()]);
    assert!(!is_pending(&store, &jobs, group, &id).await);
    let dlq = store.stream_entries(&keys.dlq(), 10).await.unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].fields.get("job_id"), Some(id.as_str()));
    assert_eq!(dlq[0].fields.get("fields_total"), Some("5000"));
    let raw = raw_entry(&store, &keys.dlq(), &dlq[0].id).await.unwrap();
    assert!(raw.len() <= 2 * MAX_ENTRY_FIELDS, "{} values", raw.len());

    // drop_entry.lua, owner-checked, on a second one.
    let id2 = xadd_huge(&store, &jobs, &[]).await;
    let read = store
        .read_group(&mut conn, &jobs, group, "c1", 10, block)
        .await
        .unwrap();
    assert_eq!(read[0].id, id2);
    let fence = store
        .drop_entry(&jobs, group, &id2, "oversized", Some("c1"))
        .await
        .unwrap();
    assert_eq!(fence, honua_shared::store::Fence::Ok);
    assert!(!is_pending(&store, &jobs, group, &id2).await);
    let q = store.stream_entries(&keys.quarantine(), 10).await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].fields.get("entry_id"), Some(id2.as_str()));
    assert_eq!(q[0].fields.get("fields_total"), Some("5000"));
    assert_eq!(q[0].fields.get("f31"), Some("value-31"));
    assert_eq!(
        q[0].fields.get("f32"),
        None,
        "at most {MAX_COPIED_FIELDS} fields copied"
    );
}
