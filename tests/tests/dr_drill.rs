//! The operations guide's monthly DR drill ("Disaster Recovery Testing"), on one machine:
//! a fleet with processes in flight (some parked at an approval gate, some mid-sequence)
//! → `deploy/scripts/backup-redis.sh` against the live Redis URL → everything killed →
//! `deploy/scripts/restore-redis.sh` into a fresh data directory → a new redis-server with
//! AOF on and a new fleet → every process acknowledged before the backup completes.
//! Prints the restore figures (no timing assertions: the machine is shared).

use honua_shared::status::{ProcessStatus, StepStatus};
use honua_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEFS: &[(&str, &str)] = &[
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
        "chain.toml",
        r#"
name = "Chain"
version = 1
[[steps]]
name = "One"
kind = "noop"
next = "Two"
[[steps]]
name = "Two"
kind = "sleep"
config = { duration = "10s" }
next = "Three"
[[steps]]
name = "Three"
kind = "noop"
next = "Four"
[[steps]]
name = "Four"
kind = "noop"
"#,
    ),
];

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/scripts")
        .join(name)
}

/// Runs a deploy script; returns its stdout's last line, panics with its stderr on failure.
fn run_script(name: &str, args: &[&Path]) -> String {
    let out = Command::new("bash")
        .arg(script(name))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed: {stderr}");
    eprintln!("{stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// The restored server: AOF on (as in deploy/k8s), on the prepared data directory.
struct RestoredRedis {
    port: u16,
    child: Child,
}

impl RestoredRedis {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", "", "--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let s = Self { port, child };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(c) = redis::Client::open(s.url().as_str())
                && let Ok(mut conn) = c.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                let info: String = redis::cmd("INFO")
                    .arg("persistence")
                    .query(&mut conn)
                    .unwrap();
                if info.contains("loading:0") {
                    return s;
                }
            }
            assert!(Instant::now() < deadline, "restored redis did not start");
            #[expect(
                clippy::disallowed_methods,
                reason = "poll interval of a synchronous wait with a deadline"
            )]
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
    fn dbsize(&self) -> u64 {
        let mut c = redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("DBSIZE").query(&mut c).unwrap()
    }
}

impl Drop for RestoredRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends the `review` approval; `true` once accepted (or the process already finished),
/// `false` while it has not reached the gate yet (409: no step waiting for the signal).
async fn approve(f: &Fleet, c: &reqwest::Client, id: &str) -> bool {
    let r = c
        .post(f.url(&format!("/api/processes/{id}/signal/review")))
        .json(&serde_json::json!({"value": "approve"}))
        .send()
        .await
        .unwrap();
    match r.status().as_u16() {
        202 => true,
        409 => f.record(id).await.is_some_and(|r| r.status.is_finished()),
        other => panic!("signal {id}: unexpected {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dr_drill_backup_kill_restore_resumes_every_acknowledged_process() {
    let dir = defs_dir(DEFS);
    let mut redis = RedisServer::start_with(true);
    let cfg = test_config(&redis.url(), dir.path());
    let f = Fleet::start(cfg, 1, 2).await;

    // In flight: gates parked at (or on their way to) the approval; chains mid-sequence on a
    // 10 s durable timer (a sorted-set entry the restore must bring back), the last ones
    // submitted just before the backup.
    let mut gates = Vec::new();
    let mut chains = Vec::new();
    for i in 0..40 {
        gates.push(f.submit("Gate", serde_json::json!({"n": i})).await);
        chains.push(f.submit("Chain", serde_json::json!({"n": i})).await);
    }
    let parked = wait_for("some gates to park at the approval", DEADLINE, || async {
        let mut n = 0;
        for id in &gates {
            if f.record(id).await.map(|r| r.status) == Some(ProcessStatus::WaitingForApproval) {
                n += 1;
            }
        }
        (n >= 10).then_some(n)
    })
    .await;
    // A last burst, so the backup also catches chains that have barely started.
    for i in 40..60 {
        chains.push(f.submit("Chain", serde_json::json!({"n": i})).await);
    }
    let acked: Vec<String> = gates.iter().chain(chains.iter()).cloned().collect();

    // Backup against the live server's URL, as the CronJob does, while work continues.
    let backups = tempfile::tempdir().unwrap();
    let url = redis.url();
    let t_backup = Instant::now();
    let backup = tokio::task::spawn_blocking({
        let dest = backups.path().to_path_buf();
        move || run_script("backup-redis.sh", &[Path::new(&url), &dest])
    });
    tokio::pin!(backup);
    // Submissions acknowledged while the backup runs are "at risk": the dump may or may not
    // hold them (it is the server's state when `redis-cli --rdb` fetched it).
    let mut during = Vec::new();
    let dump = loop {
        tokio::select! {
            r = &mut backup => break r.unwrap(),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                during.push(f.submit("Chain", serde_json::json!({"during": during.len()})).await);
            }
        }
    };
    let backup_secs = t_backup.elapsed().as_secs_f64();
    let mut finished_at_backup = 0;
    let mut sleeping_at_backup = 0;
    for id in &chains {
        match f.record(id).await {
            Some(r) if r.status.is_finished() => finished_at_backup += 1,
            Some(r)
                if r.steps
                    .get("Two")
                    .is_some_and(|s| s.status != StepStatus::Idle) =>
            {
                sleeping_at_backup += 1
            }
            _ => {}
        }
    }
    assert!(Path::new(&dump).is_file(), "no dump at {dump}");

    // Disaster: the fleet and Redis are gone, with Redis's data directory.
    f.stop().await;
    redis.kill9();
    drop(redis);

    // Restore into a fresh data directory, start Redis on it, then a new fleet.
    let data = tempfile::tempdir().unwrap();
    let t_restore = Instant::now();
    let keys = tokio::task::spawn_blocking({
        let (dump, data) = (PathBuf::from(&dump), data.path().to_path_buf());
        move || run_script("restore-redis.sh", &[&dump, &data])
    })
    .await
    .unwrap();
    let restored = RestoredRedis::start(data.path());
    let restore_secs = t_restore.elapsed().as_secs_f64();
    let keys: u64 = keys.trim().parse().unwrap();
    assert!(keys > 0, "restore loaded no keys");
    assert_eq!(
        restored.dbsize(),
        keys,
        "the AOF-on server sees the restored keys"
    );

    let t_fleet = Instant::now();
    let f = Fleet::start(test_config(&restored.url(), dir.path()), 1, 2).await;
    let mut missing = Vec::new();
    for id in &acked {
        if f.record(id).await.is_none() {
            missing.push(id.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged before the backup but not in it: {missing:?}"
    );
    let c = reqwest::Client::new();
    for id in &gates {
        wait_for("the gate to accept its approval", DEADLINE, || async {
            approve(&f, &c, id).await.then_some(())
        })
        .await;
    }
    let mut during_in_dump = Vec::new();
    for id in &during {
        if f.record(id).await.is_some() {
            during_in_dump.push(id.clone());
        }
    }
    let mut resumed = 0;
    for id in acked.iter().chain(&during_in_dump) {
        let rec = f.wait_finished(id).await;
        assert_eq!(
            rec.status,
            ProcessStatus::Completed,
            "{id}: {:?}",
            rec.error
        );
        resumed += 1;
    }
    let recovery_secs = t_fleet.elapsed().as_secs_f64();
    // And the restored system takes new work (the drill's "can execute a new process").
    let fresh = f
        .submit("Chain", serde_json::json!({"after": "restore"}))
        .await;
    assert_eq!(
        f.wait_finished(&fresh).await.status,
        ProcessStatus::Completed
    );
    f.stop().await;

    eprintln!(
        "DR drill: {} processes acknowledged before the backup ({} gates, {} parked at the \
         approval, {sleeping_at_backup} chains at or past their 10 s timer, {finished_at_backup} finished at \
         backup time); backup {backup_secs:.2}s; restore \
         (restore-redis.sh + redis start) {restore_secs:.2}s, {keys} keys; \
         {resumed}/{} completed after the restore in {recovery_secs:.2}s, 0 lost; at risk: \
         {} acknowledged during the backup, {} of them in the dump (and completed)",
        acked.len(),
        gates.len(),
        parked,
        acked.len() + during_in_dump.len(),
        during.len(),
        during_in_dump.len()
    );
}
