//! The `honua` operator CLI against a live fleet: a real redis-server, the scheduler,
//! workers and the gateway in-process, and the CLI run in-process with its output captured.

use honua::cli::{self, CliArgs};
use honua_shared::config::{ApiKey, Role};
use honua_shared::status::ProcessStatus;
use honua_tests::*;
use serde_json::Value;
use std::time::Duration;

const DEFS: &[(&str, &str)] = &[
    defs::THREE,
    (
        "gate.toml",
        r#"
name = "Gate"
version = 1
[[steps]]
name = "Prepare"
kind = "noop"
next = "Review"
[[steps]]
name = "Review"
kind = "approval"
config = { signal = "review" }
next = "Apply"
[[steps]]
name = "Apply"
kind = "noop"
"#,
    ),
    (
        "boom.toml",
        r#"
name = "Boom"
version = 1
[[steps]]
name = "Boom"
kind = "fail"
config = { message = "boom", permanent = true }
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
];

/// What one `honua` invocation did.
#[derive(Debug)]
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {:?}", self.out, self.err))
    }

    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:#?}");
        self
    }

    #[track_caller]
    fn exits(self, code: i32) -> Self {
        assert_eq!(self.code, code, "{self:#?}");
        self
    }
}

/// Runs `honua --url <url> <args>` in-process with `token` as HONUA_TOKEN.
async fn honua_at(url: &str, token: Option<&str>, args: &[&str]) -> Run {
    let argv = ["honua", "--url", url]
        .into_iter()
        .chain(args.iter().copied());
    let mut a = CliArgs::try_parse_args(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    a.global.token = token.map(str::to_string);
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = cli::run(a, &mut out, &mut err).await;
    Run {
        code,
        out: String::from_utf8(out).unwrap(),
        err: String::from_utf8(err).unwrap(),
    }
}

async fn honua(f: &Fleet, args: &[&str]) -> Run {
    honua_at(&format!("http://{}", f.addr), None, args).await
}

fn config(redis: &RedisServer, dir: &tempfile::TempDir) -> honua_shared::config::Config {
    let mut c = test_config(&redis.url(), dir.path());
    c.custom_step_kinds = vec!["crash".into()];
    c
}

async fn fleet(redis: &RedisServer, dir: &tempfile::TempDir) -> Fleet {
    Fleet::start(config(redis, dir), 1, 1).await
}

/// A server that accepts connections and never answers; aborted on drop.
struct Silent {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        Silent { url, task }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fleet whose definitions add `Hang`: one worker step (an HTTP call to a server that
/// never answers) that holds its job until it is cancelled or re-enqueued.
async fn fleet_with_hang(redis: &RedisServer) -> (Fleet, tempfile::TempDir, Silent) {
    let silent = Silent::start().await;
    let hang = format!(
        r#"
name = "Hang"
version = 1
[[steps]]
name = "Call"
kind = "http"
config = {{ url = "{}/hang", timeout = "1h" }}
"#,
        silent.url
    );
    let mut files = DEFS.to_vec();
    files.push(("hang.toml", &hang));
    let dir = defs_dir(&files);
    let mut cfg = config(redis, &dir);
    cfg.worker.http_allowlist = vec![format!("{}/", silent.url)];
    (Fleet::start(cfg, 1, 1).await, dir, silent)
}

async fn wait_status(f: &Fleet, id: &str, status: ProcessStatus) {
    wait_for(&format!("{id} to be {status}"), DEADLINE, || async {
        f.record(id).await.filter(|r| r.status == status)
    })
    .await;
}

/// Submits `ty` through the CLI and returns the new process id.
async fn submit(f: &Fleet, ty: &str) -> String {
    let r = honua(f, &["submit", ty]).await.ok();
    r.out.trim().to_string()
}

/// The id in the first line of `submit --wait`: `submitted ID; waiting`.
#[track_caller]
fn waited_id(r: &Run) -> String {
    let first = r.out.lines().next().unwrap_or_default();
    first
        .strip_prefix("submitted ")
        .and_then(|l| l.strip_suffix("; waiting"))
        .unwrap_or_else(|| panic!("{r:#?}"))
        .to_string()
}

fn ids(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_ps_and_get() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;

    let r = honua(&f, &["submit", "Three", "--wait"]).await.ok();
    let id = waited_id(&r);
    assert!(
        r.out
            .lines()
            .nth(1)
            .unwrap()
            .starts_with(&format!("{id} Completed in ")),
        "{r:#?}"
    );

    let r = honua(&f, &["submit", "Three", "--wait", "--json"])
        .await
        .ok();
    let view = r.json();
    assert_eq!(view["status"], "Completed");
    let id2 = view["id"].as_str().unwrap().to_string();

    let list = honua(&f, &["ps", "--status", "Completed", "--json"])
        .await
        .ok();
    let listed = list.json();
    assert_eq!(ids(&listed), [id2.as_str(), id.as_str()], "newest first");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "Completed")
    );

    let table = honua(
        &f,
        &[
            "ps",
            "--status",
            "Completed",
            "--since",
            "1h",
            "--type",
            "Three",
        ],
    )
    .await
    .ok();
    let mut lines = table.out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID", "TYPE", "STATUS", "CREATED", "DURATION", "CURRENT", "ERROR"
        ]
    );
    let row = lines
        .find(|l| l.starts_with(&id))
        .expect("row of the process");
    assert!(row.contains("Three") && row.contains("Completed"), "{row}");

    // Paging: the cursor hint continues the listing.
    let page = honua(&f, &["ps", "--status", "Completed", "--limit", "1"])
        .await
        .ok();
    let hint = page.out.lines().last().unwrap();
    let cursor = hint.strip_prefix("more: --cursor ").expect(hint);
    assert!(page.out.contains(&id2));
    let raw_page = honua(
        &f,
        &["ps", "--status", "Completed", "--limit", "1", "--json"],
    )
    .await
    .ok();
    assert_eq!(ids(&raw_page.json()), [id2.as_str()]);
    assert_eq!(
        raw_page.err,
        format!("more: --cursor {cursor}\n"),
        "hint on stderr"
    );
    let next = honua(
        &f,
        &[
            "ps",
            "--status",
            "Completed",
            "--limit",
            "1",
            "--cursor",
            cursor,
            "--json",
        ],
    )
    .await
    .ok();
    assert_eq!(ids(&next.json()), [id.as_str()]);

    let none = honua(&f, &["ps", "--status", "Failed"]).await.ok();
    assert_eq!(none.out, "");
    assert_eq!(none.err, "no processes\n");

    let got = honua(&f, &["get", &id]).await.ok();
    assert!(
        got.out.contains("Status:") && got.out.contains("Completed"),
        "{got:#?}"
    );
    assert!(got.out.contains("Three v1"), "{got:#?}");
    let steps: Vec<&str> = got
        .out
        .lines()
        .skip_while(|l| !l.starts_with("STEP"))
        .collect();
    assert_eq!(
        steps[0].split_whitespace().collect::<Vec<_>>(),
        [
            "STEP", "KIND", "STATUS", "ATTEMPT", "WORKER", "DURATION", "ERROR"
        ]
    );
    for (line, name) in steps[1..].iter().zip(["A", "B", "C"]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[..3], [name, "noop", "completed"], "{line}");
        assert_eq!(cells[4], "worker-0", "{line}");
    }
    assert_eq!(steps.len(), 4, "{got:#?}");
    let raw = honua(&f, &["get", &id, "--json"]).await.ok().json();
    assert_eq!(raw["steps"].as_array().unwrap().len(), 3);

    let missing = honua(&f, &["get", "no-such-process"]).await.exits(3);
    assert_eq!(missing.out, "");
    assert!(
        missing.err.starts_with("error: ") && missing.err.trim_end().ends_with("(not_found)"),
        "{missing:#?}"
    );

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_input_idempotency_and_refusals() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;
    let input = dir.path().join("input.json");
    std::fs::write(&input, r#"{"region": "eu", "n": 3}"#).unwrap();
    let input = input.to_str().unwrap();

    let a = honua(
        &f,
        &[
            "submit",
            "Three",
            "--input",
            input,
            "--idempotency-key",
            "k-1",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(a["duplicate"], false);
    let b = honua(
        &f,
        &[
            "submit",
            "Three",
            "--input",
            input,
            "--idempotency-key",
            "k-1",
        ],
    )
    .await
    .ok();
    assert_eq!(
        b.out,
        format!(
            "{} (existing process for this idempotency key)\n",
            a["id"].as_str().unwrap()
        )
    );
    // The same key with another input is a conflict, not the old process.
    let reused = honua(&f, &["submit", "Three", "--idempotency-key", "k-1"])
        .await
        .exits(4);
    assert!(
        reused.err.trim_end().ends_with("(idempotency_key_reused)"),
        "{reused:#?}"
    );

    // A tenant goes with the submission and shows in `honua get`; a bad one is refused
    // before anything is sent.
    let t = honua(&f, &["submit", "Three", "--tenant", "acme", "--json"])
        .await
        .ok()
        .json();
    let id = t["id"].as_str().unwrap().to_string();
    let shown = honua(&f, &["get", &id]).await.ok();
    assert!(
        shown.out.contains("Tenant:") && shown.out.contains("acme"),
        "{shown:#?}"
    );
    let bad = CliArgs::try_parse_args(["honua", "submit", "Three", "--tenant", "a b"])
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(bad.contains("--tenant"), "{bad}");

    let unknown = honua(&f, &["submit", "NoSuchType"]).await.exits(1);
    assert!(
        unknown.err.trim_end().ends_with("(unknown_process_type)"),
        "{unknown:#?}"
    );

    let not_object = dir.path().join("list.json");
    std::fs::write(&not_object, "[1, 2]").unwrap();
    let bad = honua(
        &f,
        &["submit", "Three", "--input", not_object.to_str().unwrap()],
    )
    .await
    .exits(2);
    assert!(bad.err.contains("must be a JSON object"), "{bad:#?}");
    let gone = honua(&f, &["submit", "Three", "--input", "/no/such/file.json"])
        .await
        .exits(2);
    assert!(gone.err.contains("cannot read input"), "{gone:#?}");

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_of_a_failing_process_exits_1_and_retry_reruns_it() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;

    let r = honua(&f, &["submit", "Boom", "--wait"]).await.exits(1);
    let id = waited_id(&r);
    assert!(r.out.contains(&format!("{id} Failed in ")), "{r:#?}");
    assert!(
        r.err
            .starts_with(&format!("error: process {id} ended Failed: "))
            && r.err.contains("boom"),
        "{r:#?}"
    );
    let got = honua(&f, &["get", &id]).await.ok();
    assert!(
        got.out.contains("Error: ") && got.out.contains("boom"),
        "{got:#?}"
    );

    let patch = dir.path().join("patch.json");
    std::fs::write(&patch, r#"{"fixed": true}"#).unwrap();
    let retried = honua(&f, &["retry", &id, "--patch", patch.to_str().unwrap()])
        .await
        .ok();
    assert!(
        retried.out.starts_with(&format!("retrying {id}: status ")),
        "{retried:#?}"
    );
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Failed, "fails again: permanent");
    assert!(
        rec.audit.iter().any(|a| a.action == "retry"),
        "{:?}",
        rec.audit
    );

    // A Completed process cannot be retried: 409.
    let done = honua(&f, &["submit", "Three", "--wait", "--json"])
        .await
        .ok()
        .json();
    let done = done["id"].as_str().unwrap();
    let conflict = honua(&f, &["retry", done]).await.exits(4);
    assert!(
        conflict.err.trim_end().ends_with("(invalid_state)"),
        "{conflict:#?}"
    );
    honua(&f, &["retry", "no-such-process"]).await.exits(3);

    let not_object = dir.path().join("bad.json");
    std::fs::write(&not_object, "42").unwrap();
    honua(&f, &["retry", &id, "--patch", not_object.to_str().unwrap()])
        .await
        .exits(2);

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_releases_an_approval_gate() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;
    let id = submit(&f, "Gate").await;
    wait_status(&f, &id, ProcessStatus::WaitingForApproval).await;

    let wrong = honua(&f, &["signal", &id, "other"]).await.exits(4);
    assert!(
        wrong.err.contains("no step waiting for signal"),
        "{wrong:#?}"
    );
    // A value the step does not route on (a typo of approve) is refused; the gate waits.
    let typo = honua(&f, &["signal", &id, "review", "--value", "aprove"])
        .await
        .exits(1);
    assert!(
        typo.err.contains("accepted values: approve, reject")
            && typo.err.contains("(invalid_request)"),
        "{typo:#?}"
    );
    assert_eq!(
        f.record(&id).await.unwrap().status,
        ProcessStatus::WaitingForApproval
    );
    let r = honua(&f, &["signal", &id, "review", "--value", "approve"])
        .await
        .ok();
    assert_eq!(r.out, format!("sent signal review=approve to {id}\n"));
    let rec = f.wait_finished(&id).await;
    assert_eq!(rec.status, ProcessStatus::Completed);

    honua(&f, &["signal", "no-such-process", "review"])
        .await
        .exits(3);
    // Finished: nothing waits any more.
    honua(&f, &["signal", &id, "review"]).await.exits(4);

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_retry_step_of_a_running_process() {
    let redis = RedisServer::start();
    let (f, _dir, _silent) = fleet_with_hang(&redis).await;
    let id = submit(&f, "Hang").await;
    wait_for("the call to run", DEADLINE, || async {
        f.record(&id)
            .await
            .filter(|r| r.steps.get("Call").is_some_and(|s| s.worker.is_some()))
    })
    .await;

    let active = honua(&f, &["ps", "--active"]).await.ok();
    assert!(
        active.out.lines().any(|l| l.starts_with(&id)),
        "{active:#?}"
    );

    let r = honua(&f, &["retry-step", &id]).await.ok();
    assert_eq!(r.out, format!("re-enqueued Call of {id}: status Running\n"));

    let r = honua(&f, &["cancel", &id, "--reason", "testing the cli"])
        .await
        .ok();
    assert_eq!(r.out, format!("cancelled {id}: status Cancelled\n"));
    wait_status(&f, &id, ProcessStatus::Cancelled).await;

    let again = honua(&f, &["cancel", &id]).await.exits(4);
    assert!(
        again.err.contains("only unfinished processes"),
        "{again:#?}"
    );
    honua(&f, &["retry-step", &id]).await.exits(4);
    honua(&f, &["cancel", "no-such-process"]).await.exits(3);

    let got = honua(&f, &["get", &id]).await.ok();
    let audit: Vec<&str> = got
        .out
        .lines()
        .skip_while(|l| !l.starts_with("AT"))
        .collect();
    assert!(
        audit.iter().any(|l| l.contains("retry-current-step")),
        "{got:#?}"
    );
    assert!(
        audit
            .iter()
            .any(|l| l.contains("cancel") && l.contains("testing the cli")),
        "{got:#?}"
    );

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_deletes_old_finished_processes() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;
    let done = honua(&f, &["submit", "Three", "--wait", "--json"])
        .await
        .ok()
        .json();
    let id = done["id"].as_str().unwrap().to_string();

    let kept = honua(
        &f,
        &["purge", "--status", "Completed", "--older-than", "30d"],
    )
    .await
    .ok();
    assert_eq!(kept.out, "deleted 0 Completed processes\n");
    honua(&f, &["get", &id]).await.ok();

    let deleted = wait_for("the purge", DEADLINE, || async {
        let r = honua(
            &f,
            &[
                "purge",
                "--status",
                "Completed",
                "--older-than",
                "1ms",
                "--json",
            ],
        )
        .await
        .ok();
        let n = r.json()["deleted"].as_u64().unwrap();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(deleted, 1);
    honua(&f, &["get", &id]).await.exits(3);

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_and_workers() {
    let redis = RedisServer::start();
    let (f, _dir, _silent) = fleet_with_hang(&redis).await;
    let id = submit(&f, "Hang").await;

    let q = honua(&f, &["queues", "--json"]).await.ok().json();
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 4, "{q:?}");
    for s in q {
        for k in [
            "stream",
            "group",
            "missing",
            "length",
            "pending",
            "consumers",
        ] {
            assert!(s.get(k).is_some(), "{k} missing in {s}");
        }
    }
    let table = honua(&f, &["queues"]).await.ok();
    let header: Vec<&str> = table
        .out
        .lines()
        .next()
        .unwrap()
        .split("  ")
        .filter(|c| !c.is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(
        header,
        [
            "STREAM",
            "GROUP",
            "STATE",
            "LENGTH",
            "LAG",
            "PENDING",
            "OLDEST PENDING",
            "CONSUMERS"
        ]
    );
    assert_eq!(table.out.lines().count(), 5, "{table:#?}");

    // The worker holds the call's job.
    let ws = wait_for("the worker to hold the job", DEADLINE, || async {
        let r = honua(&f, &["workers", "--json"]).await.ok();
        let v = r.json();
        let holds = v.as_array().unwrap().iter().any(|w| {
            w["id"] == "worker-0"
                && w["jobs"]
                    .as_array()
                    .is_some_and(|j| j.iter().any(|j| j["processId"] == id.as_str()))
        });
        holds.then_some(v)
    })
    .await;
    assert_eq!(ws.as_array().unwrap().len(), 1);
    let table = honua(&f, &["workers"]).await.ok();
    let lines: Vec<&str> = table.out.lines().collect();
    assert!(
        lines[0].starts_with("WORKER") && lines[0].contains("LAST SEEN"),
        "{table:#?}"
    );
    assert!(
        lines[1].starts_with("worker-0") && lines[1].ends_with(" 1"),
        "{table:#?}"
    );
    let job = lines.iter().find(|l| l.contains(&id)).expect("the job row");
    assert!(job.starts_with("worker-0") && job.contains("Call"), "{job}");

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_and_replays_dead_letters() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let mut cfg = config(&redis, &dir);
    cfg.worker.lease_ms = 800;
    cfg.worker.max_deliveries = 3;
    let log = dir.path().join("exec.log");
    let f = Fleet::start(cfg.clone(), 1, 0).await;

    let empty = honua(&f, &["dlq"]).await.ok();
    assert_eq!(
        (empty.out.as_str(), empty.err.as_str()),
        ("", "no dead letters\n")
    );

    // Each delivery of the poison job kills its worker process; keep one alive.
    let pid = submit(&f, "Poison").await;
    let bin = env!("CARGO_BIN_EXE_honua-test-worker");
    let mut n = 0;
    let mut current = WorkerProcess::spawn(bin, &cfg, "p0", &log);
    wait_for(
        "the poison job to be dead-lettered",
        Duration::from_secs(120),
        || {
            if current.wait_exit(Duration::ZERO).is_some() {
                n += 1;
                current = WorkerProcess::spawn(bin, &cfg, &format!("p{n}"), &log);
            }
            async { f.record(&pid).await.filter(|r| r.status.is_finished()) }
        },
    )
    .await;
    current.kill9();

    let listed = honua(&f, &["dlq", "--json"]).await.ok().json();
    let letters = listed.as_array().unwrap();
    assert_eq!(letters.len(), 1, "{listed}");
    assert_eq!(letters[0]["processId"], pid.as_str());
    let dead_id = letters[0]["id"].as_str().unwrap().to_string();
    let table = honua(&f, &["dlq", "--limit", "10"]).await.ok();
    let row = table.out.lines().nth(1).unwrap();
    assert!(
        row.starts_with(&dead_id) && row.contains(&pid) && row.contains("Crash"),
        "{row}"
    );

    let r = honua(&f, &["dlq", "replay", &dead_id]).await.ok();
    assert!(
        r.out
            .starts_with(&format!("replayed dead letter {dead_id}: retrying {pid}")),
        "{r:#?}"
    );
    let rec = f.record(&pid).await.unwrap();
    assert!(!rec.status.is_finished(), "retried: {:?}", rec.status);
    honua(&f, &["dlq", "replay", &dead_id]).await.exits(3);
    assert!(
        honua(&f, &["dlq", "--json"])
            .await
            .ok()
            .json()
            .as_array()
            .unwrap()
            .is_empty()
    );

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_redis() {
    let mut redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;
    // Healthy once the worker has sent its first heartbeat.
    let r = wait_for("healthy", DEADLINE, || async {
        let r = honua(&f, &["health"]).await;
        (r.code == 0).then_some(r)
    })
    .await;
    assert_eq!(r.out.lines().next(), Some("Healthy"));
    assert!(
        r.out
            .lines()
            .any(|l| l.starts_with("redis") && l.ends_with("Healthy")),
        "{r:#?}"
    );
    let raw = honua(&f, &["health", "--json"]).await.ok().json();
    assert_eq!(raw["status"], "Healthy");

    redis.kill9();
    let r = honua(&f, &["health"]).await.exits(6);
    assert_eq!(r.out.lines().next(), Some("Unhealthy"), "{r:#?}");
    honua(&f, &["ps"]).await.exits(6);

    // Workers and scheduler retry against the dead server; don't wait for them long.
    let _ = tokio::time::timeout(Duration::from_secs(10), f.stop()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_map_to_exit_5() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let url = |f: &Fleet| format!("http://{}", f.addr);
    // The hash the CLI prints is what api.keys takes.
    // Local: no gateway needed, the URL is not even checked.
    let hash = honua_at("not a url", None, &["hash-token", "s3cret-token"])
        .await
        .ok()
        .out
        .trim()
        .to_string();
    assert_eq!(hash.len(), 64);
    let mut cfg = config(&redis, &dir);
    cfg.api.keys = vec![ApiKey {
        name: "reader".into(),
        role: Role::Read,
        sha256: hash,
    }];
    let f = Fleet::start(cfg, 1, 1).await;

    let anon = honua_at(&url(&f), None, &["ps"]).await.exits(5);
    assert!(anon.err.trim_end().ends_with("(unauthorized)"), "{anon:#?}");
    honua_at(&url(&f), Some("wrong"), &["ps"]).await.exits(5);
    honua_at(&url(&f), Some("s3cret-token"), &["ps", "--json"])
        .await
        .ok();
    // Read role: submitting is forbidden.
    honua_at(&url(&f), Some("s3cret-token"), &["submit", "Three"])
        .await
        .exits(5);
    // /health stays open by default.
    wait_for("healthy without a token", DEADLINE, || async {
        (honua_at(&url(&f), None, &["health"]).await.code == 0).then_some(())
    })
    .await;

    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_or_silent_gateways_exit_6() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let r = honua_at(&closed, None, &["ps"]).await.exits(6);
    assert!(
        r.err
            .starts_with(&format!("error: cannot reach {closed}/api/processes")),
        "{r:#?}"
    );
    assert!(r.err.trim_end().ends_with("(unavailable)"), "{r:#?}");
    honua_at(&closed, None, &["health"]).await.exits(6);

    let silent = Silent::start().await;
    let r = honua_at(
        &silent.url,
        None,
        &["get", "p1", "--request-timeout", "300ms"],
    )
    .await
    .exits(6);
    assert!(
        r.err.trim_end().ends_with("within 300ms (timeout)"),
        "{r:#?}"
    );

    let bad = honua_at("not a url", None, &["ps"]).await.exits(2);
    assert!(bad.err.starts_with("error: --url: "), "{bad:#?}");
    let bad = honua_at(&closed, Some("has space"), &["ps"]).await.exits(2);
    assert!(bad.err.contains("HONUA_TOKEN"), "{bad:#?}");
}

/// `honua drain`, `drain --status`, `drain --wait` and `resume-intake`: a held step keeps
/// the fleet from being drained until it ends, a new submission waits Pending, and resuming
/// intake runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_running_steps_and_resume_intake_starts_pending_processes() {
    let redis = RedisServer::start();
    let (f, _dir, _silent) = fleet_with_hang(&redis).await;
    let held = submit(&f, "Hang").await;
    wait_for("the held step to run", DEADLINE, || async {
        f.record(&held).await.filter(|r| {
            r.steps
                .get("Call")
                .is_some_and(|s| s.status == honua_shared::status::StepStatus::Running)
        })
    })
    .await;

    let status = honua(&f, &["drain", "--status"]).await.ok();
    assert!(status.out.starts_with("intake open\n"), "{status:#?}");
    let drained = honua(&f, &["drain"]).await.ok();
    assert!(
        drained.out.starts_with("intake drained since "),
        "{drained:#?}"
    );
    assert!(drained.out.contains("not drained yet"), "{drained:#?}");
    let report = honua(&f, &["--json", "drain", "--status"])
        .await
        .ok()
        .json();
    assert_eq!(report["draining"], Value::Bool(true));
    assert_eq!(report["runningSteps"], 1, "{report}");
    // /health is not Healthy while draining: exit 6, status Draining.
    let health = honua(&f, &["health"]).await.exits(6);
    assert!(health.out.starts_with("Draining\n"), "{health:#?}");

    let timed_out = honua(&f, &["drain", "--wait", "--timeout", "1s"])
        .await
        .exits(1);
    assert!(
        timed_out.err.contains("still 1 step(s) running"),
        "{timed_out:#?}"
    );

    let sent = honua(&f, &["submit", "Three"]).await.ok();
    let pending = sent.out.trim().to_string();
    assert!(
        sent.err.contains("waits Pending until it resumes"),
        "{sent:#?}"
    );
    wait_status(&f, &pending, ProcessStatus::Pending).await;
    let listed = honua(&f, &["--json", "ps", "--status", "Pending"])
        .await
        .ok()
        .json();
    assert_eq!(ids(&listed), [pending.as_str()]);

    // The held step ends (cancelled): the fleet is drained.
    honua(&f, &["cancel", &held]).await.ok();
    let waited = honua(&f, &["drain", "--wait"]).await.ok();
    assert!(
        waited.out.contains("drained: no step is running or queued"),
        "{waited:#?}"
    );
    assert_eq!(
        f.record(&pending).await.unwrap().status,
        ProcessStatus::Pending
    );

    let resumed = honua(&f, &["resume-intake"]).await.ok();
    assert_eq!(
        resumed.out,
        "intake open: 1 Pending process start, oldest first\n"
    );
    assert_eq!(
        f.wait_finished(&pending).await.status,
        ProcessStatus::Completed
    );
    let open = honua(&f, &["drain", "--status"]).await.ok();
    assert!(open.out.starts_with("intake open\n"), "{open:#?}");
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_get_check_and_delete() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;
    let input = dir.path().join("input.json");
    std::fs::write(&input, r#"{"who": "me", "n": 7}"#).unwrap();
    let r = honua(
        &f,
        &[
            "submit",
            "Three",
            "--input",
            input.to_str().unwrap(),
            "--wait",
        ],
    )
    .await
    .ok();
    let three = waited_id(&r);
    let gate = submit(&f, "Gate").await;
    wait_status(&f, &gate, ProcessStatus::WaitingForApproval).await;

    // state get: the decoded input, as a block and as JSON.
    let r = honua(&f, &["state", "get", &three]).await.ok();
    assert!(r.out.contains("Type:") && r.out.contains("Three"), "{r:#?}");
    assert!(r.out.contains("\"who\": \"me\""), "{r:#?}");
    let r = honua(&f, &["--json", "state", "get", &three]).await.ok();
    assert_eq!(r.json()["input"], serde_json::json!({"who": "me", "n": 7}));
    honua(&f, &["state", "get", "no-such"]).await.exits(3);

    // state check: clean, then a corrupt input planted straight into Redis.
    let r = honua(&f, &["state", "check"]).await.ok();
    assert!(r.out.contains("checked 2 processes: 0 problems"), "{r:#?}");
    let _: () = redis::cmd("HSET")
        .arg(f.store().keys().data(&three))
        .arg("input")
        .arg(b"H\x01\x00\xc1".as_slice())
        .query_async(&mut f.store().conn())
        .await
        .unwrap();
    let r = honua(&f, &["state", "check", "--page-size", "1"])
        .await
        .exits(1);
    assert!(
        r.out.contains(&three) && r.out.contains("state_corrupt"),
        "{r:#?}"
    );
    assert!(r.out.contains("checked 2 processes: 1 problem"), "{r:#?}");
    assert!(
        r.err.contains("1 process with corrupt or oversize state"),
        "{r:#?}"
    );
    let r = honua(&f, &["--json", "state", "check"]).await.exits(1);
    let report = r.json();
    assert_eq!(report["problems"][0]["id"], three.as_str());
    assert_eq!(report["problems"][0]["part"], "input");
    honua(&f, &["state", "check", "--type", "Gate"]).await.ok();

    // state delete: a waiting process only with --force; then it is gone.
    let r = honua(&f, &["state", "delete", &gate]).await.exits(4);
    assert!(r.err.contains("force"), "{r:#?}");
    let r = honua(&f, &["state", "delete", &gate, "--force"]).await.ok();
    assert!(
        r.out
            .starts_with(&format!("deleted {gate} (Gate WaitingForApproval, forced)")),
        "{r:#?}"
    );
    honua(&f, &["state", "get", &gate]).await.exits(3);
    honua(&f, &["state", "delete", &gate]).await.exits(3);
    let r = honua(&f, &["--json", "state", "delete", &three]).await.ok();
    assert_eq!(r.json()["status"], "Completed");
    honua(&f, &["state", "check"]).await.ok();
    assert_eq!(
        references_to(f.store(), &three, None).await,
        Vec::<String>::new()
    );
    f.stop().await;
}

/// `honua pause` and `honua resume`: a paused process is listed as Paused and starts no
/// step; resuming runs it to the end; the wrong state is exit 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_a_process() {
    let redis = RedisServer::start();
    let dir = defs_dir(DEFS);
    let f = fleet(&redis, &dir).await;
    let id = submit(&f, "Gate").await;
    wait_status(&f, &id, ProcessStatus::WaitingForApproval).await;
    let r = honua(&f, &["pause", &id, "--reason", "change freeze"])
        .await
        .ok();
    assert_eq!(r.out, format!("paused {id}: status Paused\n"));
    honua(&f, &["pause", &id]).await.exits(4);
    let listed = honua(&f, &["--json", "ps", "--status", "Paused"])
        .await
        .ok()
        .json();
    assert_eq!(ids(&listed), [id.as_str()]);
    // The approval still takes its signal; what follows it waits for the resume.
    honua(&f, &["signal", &id, "review", "--value", "approve"])
        .await
        .ok();
    wait_for("the approval routed to a held step", DEADLINE, || async {
        f.record(&id).await.filter(|r| {
            r.steps
                .get("Apply")
                .is_some_and(|s| s.status == honua_shared::status::StepStatus::Held)
        })
    })
    .await;
    assert_eq!(f.record(&id).await.unwrap().status, ProcessStatus::Paused);
    let r = honua(&f, &["resume", &id]).await.ok();
    assert!(
        r.out.starts_with(&format!("resumed {id}: status ")),
        "{r:#?}"
    );
    assert_eq!(f.wait_finished(&id).await.status, ProcessStatus::Completed);
    honua(&f, &["resume", &id]).await.exits(4);
    f.stop().await;
}
