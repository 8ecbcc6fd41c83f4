//! Redis ACL users per role, as deployed: `deploy/redis/users.acl.template` rendered by
//! `deploy/scripts/render-redis-acl.sh` (what redis-0's `acl` init container runs) and loaded
//! by a private redis-server with `--aclfile`. A fleet runs with the scheduler/gateway logged
//! in as `honua-scheduler` and worker processes as `honua-worker` (reclaim after kill -9,
//! cancel, retry, purge, signal) without a single ACL denial; `backup-redis.sh` runs as
//! `honua-backup`; the service users are refused FLUSHALL, CONFIG, KEYS and keys outside the
//! prefix; `default` cannot log in; and every command the code sends (directly or inside
//! its Lua scripts) is allowed to the role that sends it (`ACL DRYRUN`).

use honua_shared::status::ProcessStatus;
use honua_tests::*;
use redis::Value;
use serde_json::{Value as Json, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The shipped key prefix (config default): the rules are tested exactly as deployed.
const PREFIX: &str = "honua";
const ROLES: &[&str] = &["admin", "scheduler", "worker", "backup", "keda"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn random_password() -> String {
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A redis-server running the rendered ACL file, with one password per role.
struct AclRedis {
    redis: RedisServer,
    passwords: BTreeMap<&'static str, String>,
    dir: tempfile::TempDir,
}

impl AclRedis {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let passwords: BTreeMap<&'static str, String> =
            ROLES.iter().map(|r| (*r, random_password())).collect();
        let acl = dir.path().join("users.acl");
        let out = render(&acl, &passwords);
        assert!(out.status.success(), "render failed: {out:?}");
        let text = std::fs::read_to_string(&acl).unwrap();
        for pw in passwords.values() {
            assert!(
                !text.contains(pw.as_str()),
                "a plaintext password was rendered"
            );
        }
        let redis = RedisServer::start_with_options(
            false,
            &["--aclfile".into(), acl.to_string_lossy().into_owned()],
            Some(("honua-admin", &passwords["admin"])),
        );
        Self {
            redis,
            passwords,
            dir,
        }
    }

    fn user(role: &str) -> String {
        format!("honua-{role}")
    }

    fn url(&self, role: &str) -> String {
        self.redis.url_as(&Self::user(role), &self.passwords[role])
    }

    fn conn(&self, role: &str) -> redis::Connection {
        redis::Client::open(self.url(role).as_str())
            .unwrap()
            .get_connection()
            .unwrap_or_else(|e| panic!("{role} cannot log in: {e}"))
    }

    /// `ACL LOG` entries (denials) of `user`, as readable lines.
    fn denials(&self, user: &str) -> Vec<String> {
        let log: Vec<BTreeMap<String, Value>> = redis::cmd("ACL")
            .arg("LOG")
            .arg(1000)
            .query(&mut self.conn("admin"))
            .unwrap();
        log.into_iter()
            .filter(|e| e.get("username").map(text).as_deref() == Some(user))
            .map(|e| {
                format!(
                    "{} {} ({})",
                    e.get("reason").map(text).unwrap_or_default(),
                    e.get("object").map(text).unwrap_or_default(),
                    e.get("context").map(text).unwrap_or_default()
                )
            })
            .collect()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// Runs the renderer on the shipped template with `passwords` as REDIS_PASSWORD_<ROLE>.
fn render(out: &Path, passwords: &BTreeMap<&'static str, String>) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("deploy/scripts/render-redis-acl.sh"))
        .arg(root().join("deploy/redis/users.acl.template"))
        .arg(out)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (role, pw) in passwords {
        cmd.env(format!("REDIS_PASSWORD_{}", role.to_uppercase()), pw);
    }
    cmd.output().expect("bash")
}

const DEFS: &[(&str, &str)] = &[
    defs::COUNT,
    defs::THREE,
    defs::GATE,
    (
        "bad.toml",
        r#"
name = "Bad"
version = 1
[[steps]]
name = "Boom"
kind = "fail"
config = { message = "deployment target unreachable", permanent = true }
"#,
    ),
];

fn role_config(
    acl: &AclRedis,
    role: &str,
    dir: &tempfile::TempDir,
) -> honua_shared::config::Config {
    let mut c = test_config(&acl.url(role), dir.path());
    c.key_prefix = PREFIX.into();
    c.custom_step_kinds = vec!["counter".into(), "crash".into(), "slow".into()];
    c
}

fn starts(log: &Path, pid: &str) -> Vec<LogLine> {
    read_log(log)
        .into_iter()
        .filter(|l| l.event == "start" && l.process_id == pid)
        .collect()
}

async fn checkpoint_n(f: &Fleet, pid: &str) -> Option<u64> {
    let data = f.store().load_data(pid).await.ok()?;
    let v: Json = f.cfg.codec().decode(data.get("ck:Count")?).ok()?;
    v["n"].as_u64()
}

async fn wait_status(f: &Fleet, id: &str, status: ProcessStatus) {
    wait_for(&format!("{id} {status}"), DEADLINE, || async {
        f.record(id).await.filter(|r| r.status == status)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_runs_with_the_scheduler_and_worker_users_without_a_denial() {
    let acl = AclRedis::start();
    let dir = defs_dir(DEFS);
    let sched_cfg = role_config(&acl, "scheduler", &dir);
    let worker_cfg = role_config(&acl, "worker", &dir);
    let log = dir.path().join("exec.log");
    let bin = env!("CARGO_BIN_EXE_honua-test-worker");
    honua_runtime::install_crypto_provider();
    let http = reqwest::Client::new();

    // Scheduler + gateway in-process as honua-scheduler; workers are processes as honua-worker.
    let f = Fleet::start(sched_cfg.clone(), 1, 0).await;
    let mut w1 = WorkerProcess::spawn(bin, &worker_cfg, "w1", &log);

    // Reclaim after kill -9: the step resumes from its checkpoint on w2.
    let counted = f.submit("Count", json!({})).await;
    let saved = wait_for("a few checkpoints", DEADLINE, || async {
        checkpoint_n(&f, &counted).await.filter(|n| *n >= 5)
    })
    .await;
    w1.kill9();
    let _w2 = WorkerProcess::spawn(bin, &worker_cfg, "w2", &log);
    let resumed = wait_for("w2 to resume the step", DEADLINE, || async {
        starts(&log, &counted)
            .into_iter()
            .find(|l| l.worker == "w2")
    })
    .await;
    assert!(resumed.value >= saved, "resumed from {}", resumed.value);
    let rec = f.wait_finished(&counted).await;
    assert_eq!(rec.status, ProcessStatus::Completed, "{:?}", rec.error);
    assert_eq!(rec.steps["Count"].worker.as_deref(), Some("w2"));
    assert_eq!(rec.steps["Count"].deliveries, Some(2), "one reclaim");

    // Plain processes, submitted over HTTP.
    let mut done = vec![counted.clone()];
    for _ in 0..5 {
        let r = http
            .post(f.url("/api/processes"))
            .json(&json!({"processType": "Three"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        done.push(
            r.json::<Json>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .into(),
        );
    }
    for id in &done {
        let rec = f.wait_finished(id).await;
        assert_eq!(
            rec.status,
            ProcessStatus::Completed,
            "{id}: {:?}",
            rec.error
        );
    }

    // Signal: an approval gate is approved and the process completes.
    let approved = f.submit("Gate", json!({})).await;
    wait_status(&f, &approved, ProcessStatus::WaitingForApproval).await;
    // A worker login may write the results stream but not the event stream; a signal it
    // forges there is set aside, not applied (its refusal on `events` is checked in
    // a_hostile_worker_..., as this test counts denials).
    let keys = f.store().keys().clone();
    let forged = honua_shared::envelope::Event::Signal {
        process_id: approved.clone(),
        name: "review".into(),
        value: "approve".into(),
        by: None,
    };
    let mut w = acl.conn("worker");
    let mut xadd = redis::cmd("XADD");
    xadd.arg(keys.results()).arg("*");
    for (k, v) in forged.to_fields() {
        xadd.arg(k).arg(v);
    }
    let forged_id: String = xadd.query(&mut w).unwrap();
    wait_for("the forged signal to be quarantined", DEADLINE, || async {
        let q = f
            .store()
            .stream_entries(&keys.quarantine(), 100)
            .await
            .ok()?;
        q.iter()
            .any(|e| e.fields.get("entry_id") == Some(forged_id.as_str()))
            .then_some(())
    })
    .await;
    assert_eq!(
        f.record(&approved).await.unwrap().status,
        ProcessStatus::WaitingForApproval
    );
    let r = http
        .post(f.url(&format!("/api/processes/{approved}/signal/review")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        f.wait_finished(&approved).await.status,
        ProcessStatus::Completed
    );

    // Cancel.
    let cancelled = f.submit("Gate", json!({})).await;
    wait_status(&f, &cancelled, ProcessStatus::WaitingForApproval).await;
    let r = http
        .post(f.url(&format!("/api/processes/{cancelled}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        f.wait_finished(&cancelled).await.status,
        ProcessStatus::Cancelled
    );

    // Retry: the failed step runs a second time (and fails again: it always does).
    let bad = f.submit("Bad", json!({})).await;
    assert_eq!(f.wait_finished(&bad).await.status, ProcessStatus::Failed);
    let r = http
        .post(f.url(&format!("/api/processes/{bad}/retry")))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = wait_for("the retried step to run again", DEADLINE, || async {
        f.record(&bad)
            .await
            .filter(|r| r.status.is_finished() && r.steps["Boom"].attempts().len() == 2)
    })
    .await;
    assert_eq!(rec.status, ProcessStatus::Failed);

    // The operator reads the gateway serves from Redis.
    for path in ["/health", "/api/queues", "/api/workers", "/api/deadletters"] {
        let r = http.get(f.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}: {}", r.text().await.unwrap());
    }

    // Purge the completed processes once they are a second old.
    let purged = std::sync::atomic::AtomicU64::new(0);
    let want = done.len() as u64 + 1;
    wait_for("the completed processes to be purged", DEADLINE, || async {
        let r = http
            .delete(f.url("/api/processes?status=Completed&olderThan=1s"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let n = r.json::<Json>().await.unwrap()["deleted"].as_u64().unwrap();
        let total = purged.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n;
        (total >= want).then_some(())
    })
    .await;
    assert_eq!(purged.into_inner(), want);
    for id in done.iter().chain([&approved]) {
        assert!(f.record(id).await.is_none(), "{id} was not purged");
    }
    assert!(f.record(&bad).await.is_some(), "Failed is not purged");

    // Not one command of the fleet was refused (ACL LOG records every denial, including
    // ones the code retried or logged and went on).
    for user in ["honua-scheduler", "honua-worker"] {
        let denied = acl.denials(user);
        assert!(denied.is_empty(), "{user} was refused: {denied:#?}");
    }
    f.stop().await;
}

#[test]
fn backup_script_runs_as_the_backup_user() {
    let acl = AclRedis::start();
    let _: () = redis::cmd("SET")
        .arg(format!("{PREFIX}:v2:{{0}}:probe"))
        .arg("x")
        .query(&mut acl.conn("admin"))
        .unwrap();
    let dest = acl.dir.path().join("backups");
    let out = Command::new("bash")
        .arg(root().join("deploy/scripts/backup-redis.sh"))
        .arg(acl.url("backup"))
        .arg(&dest)
        .env("BACKUP_TIMEOUT_SECS", "120")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "backup failed: {stderr}");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dump = std::fs::read(&path).unwrap();
    assert!(dump.starts_with(b"REDIS"), "{path} is not an RDB");
    assert!(
        dump.windows(5).any(|w| w == b"probe"),
        "the dump holds the data"
    );
    assert!(acl.denials("honua-backup").is_empty());
    // The backup user reads no key and changes nothing.
    let mut b = acl.conn("backup");
    for cmd in [
        redis::cmd("GET")
            .arg(format!("{PREFIX}:v2:{{0}}:probe"))
            .clone(),
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("CONFIG").arg("SET").arg("save").arg("").clone(),
        redis::cmd("SHUTDOWN").arg("NOSAVE").clone(),
    ] {
        let e = cmd.query::<Value>(&mut b).unwrap_err();
        assert_eq!(e.code(), Some("NOPERM"), "{e}");
    }
}

#[test]
fn service_users_are_refused_what_they_do_not_need_and_default_cannot_log_in() {
    let acl = AclRedis::start();
    let inside = format!("{PREFIX}:v2:{{0}}:jobs");
    for role in ["scheduler", "worker", "keda"] {
        let mut c = acl.conn(role);
        // DEBUG and MODULE are refused before the ACL check (enable-debug-command and
        // enable-module-command are off); the DRYRUN test checks the ACL refuses them too.
        let refused: Vec<redis::Cmd> = vec![
            redis::cmd("FLUSHALL"),
            redis::cmd("FLUSHDB"),
            redis::cmd("CONFIG").arg("GET").arg("*").clone(),
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("appendonly")
                .arg("no")
                .clone(),
            redis::cmd("KEYS").arg("*").clone(),
            redis::cmd("SCAN").arg(0).clone(),
            redis::cmd("SHUTDOWN").arg("NOSAVE").clone(),
            redis::cmd("ACL").arg("LIST").clone(),
            redis::cmd("ACL").arg("SETUSER").arg("x").clone(),
            redis::cmd("MONITOR"),
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("USER")
                .arg("x")
                .clone(),
            redis::cmd("BGSAVE"),
            redis::cmd("SYNC"),
            redis::cmd("EVAL").arg("return 1").arg(0).clone(),
            redis::cmd("GET").arg("other:key").clone(),
            redis::cmd("SET").arg("other:key").arg("x").clone(),
            redis::cmd("XADD")
                .arg("elsewhere:jobs")
                .arg("*")
                .arg("a")
                .arg("b")
                .clone(),
        ];
        for cmd in refused {
            let e = cmd
                .query::<Value>(&mut c)
                .expect_err(&format!("{role}: {cmd:?} was allowed"));
            assert_eq!(e.code(), Some("NOPERM"), "{role}: {e}");
        }
        // Still logged in and able to do its job afterwards.
        let _: String = redis::cmd("PING").query(&mut c).unwrap();
    }
    // Least privilege inside the prefix: a worker deletes no process and edits no index;
    // KEDA's user only reads.
    let mut w = acl.conn("worker");
    for cmd in [
        redis::cmd("DEL").arg(&inside).clone(),
        redis::cmd("ZREM")
            .arg(format!("{PREFIX}:v2:{{0}}:index:all"))
            .arg("p")
            .clone(),
    ] {
        assert_eq!(
            cmd.query::<Value>(&mut w).unwrap_err().code(),
            Some("NOPERM")
        );
    }
    // The LLM limiter buckets (their own hash tag) and the response cache are under the
    // prefix too: the worker reaches them.
    let keys = honua_shared::keys::Keys::new(PREFIX, 0);
    let [limit, paused] = keys.llm_limit("azure/gpt-4o");
    let _: Value = redis::cmd("HSET")
        .arg(&limit)
        .arg("req_tat")
        .arg(0)
        .query(&mut w)
        .unwrap();
    let _: Value = redis::cmd("PTTL").arg(&paused).query(&mut w).unwrap();
    let _: Value = redis::cmd("HINCRBY")
        .arg(keys.llm_breaker("azure/gpt-4o"))
        .arg("fails")
        .arg(1)
        .query(&mut w)
        .unwrap();
    let _: Value = redis::cmd("SET")
        .arg(keys.llm_cache("ab"))
        .arg("{}")
        .arg("PX")
        .arg(1000)
        .query(&mut w)
        .unwrap();
    let mut k = acl.conn("keda");
    let e = redis::cmd("XADD")
        .arg(&inside)
        .arg("*")
        .arg("a")
        .arg("b")
        .query::<Value>(&mut k)
        .unwrap_err();
    assert_eq!(e.code(), Some("NOPERM"));
    let _: Value = redis::cmd("XLEN").arg(&inside).query(&mut k).unwrap();

    // `default`: no password logs in, no password works, and nothing runs unauthenticated.
    let anon = redis::Client::open(acl.redis.url().as_str()).unwrap();
    let mut c = anon.get_connection().unwrap();
    let e = redis::cmd("PING").query::<String>(&mut c).unwrap_err();
    assert_eq!(e.code(), Some("NOAUTH"), "{e}");
    for pw in ["", "x", &acl.passwords["admin"]] {
        let e = redis::cmd("AUTH")
            .arg("default")
            .arg(pw)
            .query::<String>(&mut c)
            .unwrap_err();
        assert!(
            e.code() == Some("WRONGPASS") || e.to_string().contains("WRONGPASS"),
            "{e}"
        );
    }
    let url = acl.redis.url_as("default", &acl.passwords["admin"]);
    assert!(
        redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .is_err()
    );
    // A role's password does not open another role.
    let cross = acl.redis.url_as("honua-admin", &acl.passwords["worker"]);
    assert!(
        redis::Client::open(cross.as_str())
            .unwrap()
            .get_connection()
            .is_err()
    );

    // redis-0's redis-cli wrapper: `kubectl exec redis-0 -- redis-cli ping` logs in as
    // honua-admin with REDISCLI_AUTH.
    let cli = |args: &[&str]| {
        Command::new(root().join("deploy/k8s/base/redis/redis-cli"))
            .args(["-p", &acl.redis.port.to_string()])
            .args(args)
            .env("REDISCLI_AUTH", &acl.passwords["admin"])
            .output()
            .unwrap()
    };
    let out = cli(&["ping"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "PONG",
        "{out:?}"
    );
    let out = cli(&["ACL", "WHOAMI"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "honua-admin");
}

/// Which role runs each Lua script (a new script fails the test until it is listed here and
/// its commands are allowed in users.acl.template).
const SCRIPT_ROLES: &[(&str, &[&str])] = &[
    ("begin", &["worker"]),
    ("heartbeat", &["worker"]),
    ("checkpoint", &["worker"]),
    ("complete", &["worker"]),
    ("release", &["worker"]),
    ("reclaim", &["worker"]),
    ("retire_consumer", &["worker"]),
    ("llm_limit", &["worker"]),
    ("llm_budget", &["worker"]),
    ("drop_entry", &["worker", "scheduler"]),
    ("commit", &["scheduler"]),
    ("promote", &["scheduler"]),
    ("purge", &["scheduler"]),
    ("delete", &["scheduler"]),
    ("trim", &["scheduler"]),
];

/// Commands the Rust code sends itself (`redis::cmd`/`pipe.cmd` in shared/, scheduler/,
/// worker/), with the roles that send them. Connection commands (PING, COMMAND INFO,
/// WAIT, WAITAOF) come from `+@connection`; FCALL runs every function, FUNCTION LOAD/LIST load the
/// library.
const RUST_COMMANDS: &[(&str, &[&str])] = &[
    ("PING", &["scheduler", "worker", "backup", "keda"]),
    ("TIME", &["scheduler", "worker"]),
    ("INFO", &["scheduler", "worker", "backup"]),
    ("COMMAND INFO", &["scheduler"]),
    ("WAITAOF", &["scheduler"]),
    ("WAIT", &["scheduler"]),
    ("FCALL", &["scheduler", "worker"]),
    ("FUNCTION LIST", &["scheduler", "worker"]),
    ("FUNCTION LOAD", &["scheduler"]),
    ("XGROUP CREATE", &["scheduler", "worker"]),
    ("XREADGROUP", &["scheduler", "worker"]),
    ("XADD", &["scheduler"]),
    ("XAUTOCLAIM", &["scheduler"]),
    ("XINFO CONSUMERS", &["worker"]),
    ("XINFO GROUPS", &["scheduler", "keda"]),
    ("XLEN", &["scheduler", "keda"]),
    ("XPENDING", &["scheduler", "keda"]),
    ("XRANGE", &["scheduler"]),
    ("XREVRANGE", &["scheduler"]),
    ("XDEL", &["scheduler"]),
    ("HGETALL", &["scheduler"]),
    ("HMGET", &["scheduler"]),
    // A worker registers its version and host at start (workers:info).
    ("HSET", &["worker"]),
    ("GET", &["worker", "scheduler"]),
    ("SET", &["worker", "scheduler"]),
    ("DEL", &["scheduler"]),
    ("ZREVRANGE", &["scheduler"]),
    ("ZREMRANGEBYSCORE", &["scheduler"]),
    ("ZCARD", &["scheduler"]),
    ("ZCOUNT", &["scheduler"]),
    ("ZRANGE", &["scheduler"]),
    ("ZREVRANGEBYSCORE", &["scheduler"]),
    ("ZSCAN", &["scheduler"]),
    ("BGSAVE", &["backup"]),
    ("LASTSAVE", &["backup"]),
    ("REPLCONF", &["backup"]),
    ("SYNC", &["backup"]),
    // Sent by the redis crate's cluster client (the slot map), not named in our code.
    ("CLUSTER SLOTS", &["scheduler", "worker", "keda"]),
    // Only `honua dev`'s local cluster starter (and the load test's), against nodes it
    // started itself without ACL users: no role needs it.
    ("CLUSTER INFO", &[]),
];

/// Commands whose first argument names a subcommand.
const CONTAINERS: &[&str] = &[
    "XGROUP", "XINFO", "SCRIPT", "FUNCTION", "COMMAND", "CLIENT", "OBJECT", "CLUSTER",
];

/// `redis.call('NAME', 'SUB'...)` names of a Lua source, with the subcommand for containers.
fn lua_commands(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let calls = src.split("redis.call(").skip(1);
    for part in calls.chain(src.split("redis.pcall(").skip(1)) {
        // Only calls whose command is a literal (a variable command would be a bug here).
        assert!(
            part.starts_with(['\'', '"']),
            "redis.call with a computed command: {}",
            &part[..part.len().min(40)]
        );
        let mut lits = part.split(['\'', '"']);
        let _ = lits.next();
        let Some(name) = lits.next().map(str::to_ascii_uppercase) else {
            continue;
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphabetic()) {
            continue;
        }
        if CONTAINERS.contains(&name.as_str()) {
            let _ = lits.next();
            let sub = lits.next().unwrap_or_default().to_ascii_uppercase();
            out.insert(format!("{name} {sub}"));
        } else {
            out.insert(name);
        }
    }
    out
}

/// `cmd("NAME")` literals of the Rust sources under `dirs`, with the subcommand (the next
/// `.arg("...")`) for containers.
fn rust_commands(dirs: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut files = Vec::new();
    for d in dirs {
        let mut stack = vec![root().join(d)];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") {
                    files.push(path);
                }
            }
        }
    }
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        // Unit tests of a module may use any command against their own server.
        let src = src.split("#[cfg(test)]").next().unwrap();
        for part in src.split("cmd(\"").skip(1) {
            let name = part.split('"').next().unwrap().to_ascii_uppercase();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphabetic()) {
                continue;
            }
            if CONTAINERS.contains(&name.as_str()) {
                let sub = part
                    .split(".arg(\"")
                    .nth(1)
                    .and_then(|s| s.split('"').next())
                    .unwrap_or_default()
                    .to_ascii_uppercase();
                out.insert(format!("{name} {sub}"));
            } else {
                out.insert(name);
            }
        }
    }
    out
}

/// One key of each kind the code uses (`Keys` of the shipped prefix): roles may be allowed a
/// command on some kinds only (the worker's selectors).
fn key_kinds() -> Vec<String> {
    let k = honua_shared::keys::Keys::new(PREFIX, 0);
    let [limit, paused] = k.llm_limit("azure/gpt-4o");
    let mut keys = k.shared();
    keys.extend([
        k.process("p"),
        k.steps("p"),
        k.data("p"),
        k.idempotency("i"),
        k.llm_usage("p"),
        k.llm_type_usage("T", "20260101"),
        k.llm_type_cost("T", "20260101"),
        k.llm_cache("ab"),
        k.workers_info(),
        k.index_active_type("T"),
        k.stats_minute(1),
        k.stats_hour(1),
        limit,
        paused,
        k.llm_breaker("azure/gpt-4o"),
    ]);
    keys.into_iter().map(|k| k.to_string()).collect()
}

/// `ACL DRYRUN user <command> <args>`: the arguments are one key of the deployment, as many
/// as the command's arity needs; allowed when it is allowed on at least one kind of key.
/// Returns None when allowed, else Redis's reason (for the last key tried).
fn dryrun(admin: &mut redis::Connection, user: &str, command: &str) -> Option<String> {
    let words: Vec<&str> = command.split(' ').collect();
    let info: Vec<Value> = redis::cmd("COMMAND")
        .arg("INFO")
        .arg(words.join("|").to_ascii_lowercase())
        .query(admin)
        .unwrap();
    let arity = match info.first() {
        Some(Value::Array(a)) => match a.get(1) {
            Some(Value::Int(n)) => n.unsigned_abs() as usize,
            other => panic!("{command}: arity {other:?}"),
        },
        // Not a command of this server (e.g. WAITAOF before Redis 7.2).
        _ => return None,
    };
    let mut why = None;
    for key in key_kinds() {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("DRYRUN").arg(user);
        if words[0] == "FCALL" {
            cmd.arg("FCALL").arg("f").arg(1).arg(&key);
        } else {
            cmd.arg(&words);
            for _ in words.len()..arity {
                cmd.arg(&key);
            }
        }
        match cmd.query::<Value>(admin) {
            Ok(Value::Okay) => return None,
            Ok(Value::SimpleString(s)) if s == "OK" => return None,
            Ok(other) => why = Some(text(&other)),
            Err(e) => why = Some(e.to_string()),
        }
    }
    why
}

#[test]
fn every_command_the_code_sends_is_allowed_to_the_role_that_sends_it() {
    let acl = AclRedis::start();
    let mut admin = acl.conn("admin");
    let mut needed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();

    // Lua: every script is assigned, and its commands (with the prelude's) are allowed.
    let prelude = std::fs::read_to_string(root().join("shared/lua/prelude.lua")).unwrap();
    for (name, body) in honua_shared::scripts::SOURCES {
        let roles = SCRIPT_ROLES
            .iter()
            .find(|(s, _)| s == name)
            .unwrap_or_else(|| panic!("script {name}: add it to SCRIPT_ROLES and its commands to deploy/redis/users.acl.template"))
            .1;
        let cmds = lua_commands(body);
        assert!(!cmds.is_empty(), "{name}: no redis.call found");
        for role in roles {
            needed
                .entry(role)
                .or_default()
                .extend(cmds.iter().cloned().chain(lua_commands(&prelude)));
        }
    }
    // Rust: every command the code names is in RUST_COMMANDS (so it has roles).
    let sent = rust_commands(&[
        "shared/src",
        "runtime/src",
        "scheduler/src",
        "worker/src",
        "cli/src",
    ]);
    let listed: BTreeSet<String> = RUST_COMMANDS.iter().map(|(c, _)| c.to_string()).collect();
    let unlisted: Vec<&String> = sent.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "commands sent by the code but not in RUST_COMMANDS (add them there and to deploy/redis/users.acl.template): {unlisted:?}"
    );
    for (cmd, roles) in RUST_COMMANDS {
        for role in *roles {
            needed.entry(role).or_default().insert(cmd.to_string());
        }
    }

    let mut refused = Vec::new();
    for (role, cmds) in &needed {
        for cmd in cmds {
            if let Some(why) = dryrun(&mut admin, &AclRedis::user(role), cmd) {
                refused.push(format!("honua-{role}: {cmd}: {why}"));
            }
        }
    }
    assert!(
        refused.is_empty(),
        "allow these in deploy/redis/users.acl.template:\n{}",
        refused.join("\n")
    );
    eprintln!(
        "commands per role: {:#?}",
        needed
            .iter()
            .map(|(r, c)| (r, c.len()))
            .collect::<BTreeMap<_, _>>()
    );

    // Least privilege the other way: nothing dangerous for the service roles.
    for role in ["scheduler", "worker", "backup", "keda"] {
        for cmd in [
            "FLUSHALL",
            "FLUSHDB",
            "CONFIG GET",
            "CONFIG SET",
            "KEYS",
            "SCAN",
            "DEBUG",
            "SHUTDOWN",
            "MODULE LIST",
            "ACL SETUSER",
            "MONITOR",
            "EVAL",
            "EVAL_RO",
            "EVALSHA",
            "SCRIPT LOAD",
            "SCRIPT FLUSH",
            "FUNCTION FLUSH",
            "FUNCTION DELETE",
            "FUNCTION RESTORE",
            "CLIENT KILL",
        ] {
            let why = dryrun(&mut admin, &AclRedis::user(role), cmd);
            assert!(why.is_some(), "honua-{role} may run {cmd}");
        }
    }
    // Only the scheduler loads code (the function library).
    for role in ["worker", "backup", "keda"] {
        let why = dryrun(&mut admin, &AclRedis::user(role), "FUNCTION LOAD");
        assert!(why.is_some(), "honua-{role} may run FUNCTION LOAD");
    }
}

#[test]
fn render_refuses_a_missing_or_weak_required_password_and_disables_optional_users() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("users.acl");
    let mut pw: BTreeMap<&'static str, String> =
        ROLES.iter().map(|r| (*r, random_password())).collect();
    pw.remove("worker");
    let r = render(&out, &pw);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("REDIS_PASSWORD_WORKER"));
    assert!(!out.exists(), "nothing is written on error");
    pw.insert("worker", "short".into());
    let r = render(&out, &pw);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("shorter than 16"));
    pw.insert("worker", random_password());
    pw.remove("keda");
    let r = render(&out, &pw);
    assert!(r.status.success(), "{r:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    let keda = text
        .lines()
        .find(|l| l.starts_with("user honua-keda "))
        .unwrap();
    assert!(keda.contains(" off ") && !keda.contains(" on "), "{keda}");
    assert!(
        text.lines().any(|l| l.starts_with("user default off ")),
        "{text}"
    );
    assert!(!text.contains("@password@") && !text.contains("@prefix@"));
}

/// Runs `cmd` as `conn`'s user and asserts Redis refuses it for lack of permission.
fn refused(conn: &mut redis::Connection, who: &str, cmd: &redis::Cmd) {
    let e = cmd
        .query::<Value>(conn)
        .expect_err(&format!("{who}: {cmd:?} was allowed"));
    assert_eq!(e.code(), Some("NOPERM"), "{who}: {cmd:?}: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_worker_or_scheduler_login_is_refused_forged_writes_and_its_own_lua() {
    use honua_shared::limiter::{Admission, LimitSpec};
    use honua_shared::store::{Store, StoreError};
    let acl = AclRedis::start();
    let keys = honua_shared::keys::Keys::new(PREFIX, 0);
    let mut admin = acl.conn("admin");
    // A process waiting for approval, in the indexes, and a submission in its stream.
    let pid = "p1";
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(keys.process(pid))
        .arg("status")
        .arg("WaitingForApproval")
        .cmd("ZADD")
        .arg(keys.index_active())
        .arg(1)
        .arg(pid)
        .cmd("XADD")
        .arg(keys.submit())
        .arg("*")
        .arg("type")
        .arg("Deployment")
        .arg("input")
        .arg("{\"secret\":1}")
        .query(&mut admin)
        .unwrap();

    // The library is loaded by the scheduler, never by a worker: until then a worker's
    // calls fail with a retryable error.
    let worker = Store::open(&acl.url("worker"), keys.clone()).unwrap();
    let e = worker.load_scripts().await.unwrap_err();
    assert!(
        matches!(e, StoreError::FunctionsNotLoaded { .. }) && e.is_retryable(),
        "{e:?}"
    );
    let scheduler = Store::open(&acl.url("scheduler"), keys.clone()).unwrap();
    scheduler.load_scripts().await.unwrap();
    worker.load_scripts().await.unwrap();

    // The worker does its job through its functions: the LLM limiter and budgets (their
    // writes are allowed by the worker's selectors).
    let spec = LimitSpec {
        requests_per_minute: 60,
        tokens_per_minute: 6_000,
        burst_requests: 1,
        burst_tokens: 100,
        ..LimitSpec::default()
    };
    let got = worker
        .llm_acquire("azure/gpt-4o", &spec, 10, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(matches!(got, Admission::Granted { .. }), "{got:?}");
    worker
        .llm_pause("azure/gpt-4o", Duration::from_millis(10))
        .await
        .unwrap();
    let usage = worker
        .llm_budget(&honua_shared::llm_store::BudgetCall {
            process_id: pid,
            process_type: "Deployment",
            day: "20260101",
            add_tokens: 5,
            add_cost_micro_usd: 1,
            process_cap: 0,
            type_daily_cap: 0,
            process_ttl: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert_eq!(usage.process_tokens, 5);

    // The forged writes of a hostile worker login (the issue's list), each refused.
    let mut w = acl.conn("worker");
    let busy = "local i = 0 while true do i = i + 1 end";
    for cmd in [
        // Read submissions.
        redis::cmd("XRANGE")
            .arg(keys.submit())
            .arg("-")
            .arg("+")
            .clone(),
        redis::cmd("XREAD")
            .arg("STREAMS")
            .arg(keys.submit())
            .arg("0")
            .clone(),
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("scheduler")
            .arg("x")
            .arg("STREAMS")
            .arg(keys.submit())
            .arg(">")
            .clone(),
        // Forge index members.
        redis::cmd("ZADD")
            .arg(keys.index_status(ProcessStatus::Completed))
            .arg(1)
            .arg(pid)
            .clone(),
        redis::cmd("ZADD")
            .arg(keys.index_all())
            .arg(1)
            .arg("forged")
            .clone(),
        redis::cmd("ZREM").arg(keys.index_active()).arg(pid).clone(),
        // Inject a signal (skipping the API's operate role): the event stream is not the
        // worker's.
        {
            let mut c = redis::cmd("XADD");
            c.arg(keys.events()).arg("*");
            let ev = honua_shared::envelope::Event::Signal {
                process_id: pid.into(),
                name: "review".into(),
                value: "approve".into(),
                by: None,
            };
            for (k, v) in ev.to_fields() {
                c.arg(k).arg(v);
            }
            c
        },
        // Forge the counters of finished processes or the per-type active index.
        redis::cmd("HINCRBY")
            .arg(keys.stats_hour(1))
            .arg("Completed:T")
            .arg(1)
            .clone(),
        redis::cmd("ZADD")
            .arg(keys.index_active_type("T"))
            .arg(1)
            .arg(pid)
            .clone(),
        // Delete or rewrite process fields.
        redis::cmd("HDEL")
            .arg(keys.process(pid))
            .arg("status")
            .clone(),
        redis::cmd("HSET")
            .arg(keys.process(pid))
            .arg("status")
            .arg("Completed")
            .clone(),
        redis::cmd("DEL").arg(keys.steps(pid)).clone(),
        // Arbitrary Lua: a busy loop that would block the server for everyone.
        redis::cmd("EVAL").arg(busy).arg(0).clone(),
        redis::cmd("EVAL_RO").arg(busy).arg(0).clone(),
        redis::cmd("SCRIPT").arg("LOAD").arg(busy).clone(),
        redis::cmd("EVALSHA").arg("0".repeat(40)).arg(0).clone(),
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg(format!(
                "#!lua name=evil\nredis.register_function('spin', function() {busy} end)"
            ))
            .clone(),
        redis::cmd("FUNCTION").arg("FLUSH").clone(),
        redis::cmd("FUNCTION")
            .arg("DELETE")
            .arg(honua_shared::scripts::Library::get().name())
            .clone(),
    ] {
        refused(&mut w, "honua-worker", &cmd);
    }
    // The scheduler user loads the library but runs no ad-hoc Lua either.
    let mut s = acl.conn("scheduler");
    for cmd in [
        redis::cmd("EVAL").arg(busy).arg(0).clone(),
        redis::cmd("SCRIPT").arg("LOAD").arg(busy).clone(),
        redis::cmd("FUNCTION").arg("FLUSH").clone(),
    ] {
        refused(&mut s, "honua-scheduler", &cmd);
    }
    // Nothing changed.
    let status: String = redis::cmd("HGET")
        .arg(keys.process(pid))
        .arg("status")
        .query(&mut admin)
        .unwrap();
    assert_eq!(status, "WaitingForApproval");
    let active: Vec<String> = redis::cmd("ZRANGE")
        .arg(keys.index_active())
        .arg(0)
        .arg(-1)
        .query(&mut admin)
        .unwrap();
    assert_eq!(active, vec![pid.to_string()]);
    let forged: u64 = redis::cmd("ZCARD")
        .arg(keys.index_all())
        .query(&mut admin)
        .unwrap();
    assert_eq!(forged, 0);
    let libs: Vec<Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .query(&mut admin)
        .unwrap();
    assert_eq!(libs.len(), 1, "only the honua library is loaded");
}
