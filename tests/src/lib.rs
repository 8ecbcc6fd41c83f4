//! Test harness: real redis-server processes on free ports, in-process or child-process
//! fleets, and waiting for conditions with a deadline (never a fixed sleep).

pub mod cluster;
pub mod defs;
pub mod llm_load;
pub mod logged;
pub mod otlp;
pub mod recorder;
pub mod webdriver;

use honua_shared::config::Config;
use honua_shared::store::Store;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use cluster::RedisCluster;

/// A generous default deadline: tests run on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// A submission of `process_type` with an empty input and nothing else set.
pub fn submission_of(process_type: &str) -> honua_shared::envelope::Submission {
    honua_shared::envelope::Submission {
        process_type: process_type.into(),
        version: None,
        input: serde_json::json!({}),
        id: None,
        idempotency_key: None,
        tenant: None,
        trace: Default::default(),
    }
}

/// Picks a free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether the server a spawn reached is the one it started.
enum Started {
    Ours,
    NotOurs,
}

/// A private redis-server, killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    aof: bool,
    /// Extra `redis-server` arguments (e.g. `--aclfile <path>`).
    extra_args: Vec<String>,
    /// The user the harness logs in as to see that the server is up (`default` may be off).
    probe_auth: Option<(String, String)>,
    /// Picks the port to try ([`free_port`]; [`cluster::free_cluster_port`] for a node).
    pick_port: fn() -> u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Without persistence.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `appendonly yes`, `appendfsync everysec` when `aof`.
    pub fn start_with(aof: bool) -> Self {
        Self::start_with_options(aof, &[], None)
    }

    /// With extra `redis-server` arguments (`--aclfile <path>`, any `--<directive> <value>`),
    /// and the user and password the harness uses to see that the server is up (needed when
    /// the `default` user is off).
    pub fn start_with_options(
        aof: bool,
        extra_args: &[String],
        probe_auth: Option<(&str, &str)>,
    ) -> Self {
        Self::start_on(free_port, aof, extra_args, probe_auth)
    }

    /// [`RedisServer::start_with_options`] on a port from `pick_port`.
    fn start_on(
        pick_port: fn() -> u16,
        aof: bool,
        extra_args: &[String],
        probe_auth: Option<(&str, &str)>,
    ) -> Self {
        let mut s = Self {
            port: pick_port(),
            dir: tempfile::tempdir().unwrap(),
            aof,
            extra_args: extra_args.to_vec(),
            probe_auth: probe_auth.map(|(u, p)| (u.to_string(), p.to_string())),
            pick_port,
            child: None,
        };
        // A port picked free can be taken before redis-server binds it (by another test's
        // server, a worker's listener): then the server exits and the probe would reach
        // someone else's. Try another port until the server answering is this one.
        for _ in 0..20 {
            match s.spawn() {
                Started::Ours => return s,
                Started::NotOurs => {
                    s.kill9();
                    s.port = (s.pick_port)();
                }
            }
        }
        panic!("redis-server could not get a port of its own in 20 tries");
    }

    fn spawn(&mut self) -> Started {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                if self.aof { "yes" } else { "no" },
            ])
            .args([
                "--appendfsync",
                "everysec",
                "--maxmemory-policy",
                "noeviction",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && matches!(c.try_wait(), Ok(Some(_)))
            {
                // Exited: it could not bind the port.
                return Started::NotOurs;
            }
            let url = match &self.probe_auth {
                Some((user, password)) => self.url_as(user, password),
                None => self.url(),
            };
            if let Ok(c) = redis::Client::open(url.as_str())
                && let Ok(mut conn) = c.get_connection()
                && redis::cmd("PING").query::<String>(&mut conn).is_ok()
            {
                // The server's own pid, when the probe user may read it.
                let info: Option<String> = redis::cmd("INFO").arg("server").query(&mut conn).ok();
                let answering = info.as_deref().and_then(|i| {
                    i.lines()
                        .find_map(|l| l.strip_prefix("process_id:"))
                        .and_then(|v| v.trim().parse::<u32>().ok())
                });
                return match answering {
                    Some(p) if p != pid => Started::NotOurs,
                    _ => Started::Ours,
                };
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            #[expect(
                clippy::disallowed_methods,
                reason = "poll interval of a synchronous wait with a deadline"
            )]
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The URL logging in as `user` (ACL users; the password must be URL-safe, e.g. hex).
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("redis://{user}:{password}@127.0.0.1:{}", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url().as_str()).unwrap()
    }

    /// `kill -9` of the server process.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and data directory (clients hold its URL,
    /// so the port cannot change).
    pub fn restart(&mut self) {
        self.kill9();
        assert!(
            matches!(self.spawn(), Started::Ours),
            "port {} was taken while redis-server was down",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits until `f` returns `Some`, polling; panics with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Job stream entries read by consumer `consumer` of the workers' group (waits until there
/// are some): a consumer that never finishes them, for reclaim and dead-letter tests.
pub async fn take_jobs(st: &Store, consumer: &str) -> Vec<honua_shared::store::Entry> {
    let conn = st.blocking(Duration::from_millis(100)).unwrap();
    wait_for("a job", DEADLINE, || {
        let mut conn = conn.clone();
        async move {
            let e = st
                .read_group(
                    &mut conn,
                    &st.keys().jobs(),
                    honua_shared::keys::WORKERS_GROUP,
                    consumer,
                    10,
                    Duration::from_millis(100),
                )
                .await
                .ok()?;
            (!e.is_empty()).then_some(e)
        }
    })
    .await
}

/// A config with millisecond-scale timings for tests.
pub fn test_config(redis_url: &str, defs_dir: &Path) -> Config {
    let mut c = Config {
        redis_url: redis_url.to_string(),
        key_prefix: "t".into(),
        http_addr: Some("127.0.0.1:0".into()),
        definitions_dir: defs_dir.to_path_buf(),
        ..Config::default()
    };
    c.worker.lease_ms = 1_500;
    c.worker.sweep_ms = 200;
    c.worker.read_block_ms = 200;
    c.worker.shutdown_grace_ms = 2_000;
    c.worker.max_deliveries = 3;
    c.scheduler.read_block_ms = 200;
    c.scheduler.timer_interval_ms = 20;
    c.scheduler.reclaim_idle_ms = 1_000;
    c
}

/// A directory of definitions written from `(file name, text)` pairs.
pub fn defs_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

/// The repository's shipped process definitions.
pub fn shipped_definitions() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../processes")
}

pub fn store(cfg: &Config) -> Store {
    Store::from_config(cfg).unwrap()
}

/// A child `honua-test-worker` (or `honua-test-scheduler`) process, killed on drop.
pub struct WorkerProcess {
    pub id: String,
    /// The worker's JSON log (stdout).
    pub stdout: PathBuf,
    child: Option<Child>,
}

impl WorkerProcess {
    /// Starts the worker binary `bin` (integration tests pass
    /// `env!("CARGO_BIN_EXE_honua-test-worker")`) with `cfg` as `HONUA_*` variables.
    pub fn spawn(bin: &str, cfg: &Config, id: &str, log: &Path) -> Self {
        Self::spawn_with_env(bin, cfg, id, log, &[])
    }

    /// [`WorkerProcess::spawn`] with extra environment variables (e.g. `OTEL_*`).
    pub fn spawn_with_env(
        bin: &str,
        cfg: &Config,
        id: &str,
        log: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let stdout = log.with_file_name(format!("{id}.stdout"));
        let err_file = std::fs::File::create(&stdout).unwrap();
        let child = Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("HONUA_REDIS_URL", &cfg.redis_url)
            .env(
                "HONUA_REDIS_CLUSTER_NODES",
                cfg.redis_cluster_nodes.join(","),
            )
            .env("HONUA_KEY_PREFIX", &cfg.key_prefix)
            .env("HONUA_PARTITIONS", cfg.partitions.to_string())
            .env("HONUA_DEFINITIONS_DIR", &cfg.definitions_dir)
            .env("HONUA_WORKER_ID", id)
            .env("HONUA_LEASE_MS", cfg.worker.lease_ms.to_string())
            .env("HONUA_SWEEP_MS", cfg.worker.sweep_ms.to_string())
            .env(
                "HONUA_MAX_DELIVERIES",
                cfg.worker.max_deliveries.to_string(),
            )
            .env(
                "HONUA_SHUTDOWN_GRACE_MS",
                cfg.worker.shutdown_grace_ms.to_string(),
            )
            .env("HONUA_TEST_LOG", log)
            .env("HONUA_WORKER_METRICS_ADDR", "127.0.0.1:0")
            .envs(env.iter().copied())
            .stdout(err_file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn honua-test-worker");
        Self {
            id: id.to_string(),
            stdout,
            child: Some(child),
        }
    }

    /// Starts the scheduler binary `bin` (integration tests pass
    /// `env!("CARGO_BIN_EXE_honua-test-scheduler")`) with `cfg` as consumer `id`, its gateway
    /// on a free loopback port; its JSON log goes to `<dir>/<id>.stdout`. The handle is the
    /// same as a worker's ([`WorkerProcess::kill9`], [`WorkerProcess::signal`]).
    pub fn spawn_scheduler(bin: &str, cfg: &Config, id: &str, dir: &Path) -> Self {
        let mut cfg = cfg.clone();
        cfg.scheduler.id = Some(id.to_string());
        cfg.http_addr = Some("127.0.0.1:0".into());
        let config = dir.join(format!("{id}.json"));
        std::fs::write(&config, serde_json::to_string(&cfg).unwrap()).unwrap();
        let stdout = dir.join(format!("{id}.stdout"));
        let child = Command::new(bin)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("HONUA_TEST_CONFIG", &config)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn honua-test-scheduler");
        Self {
            id: id.to_string(),
            stdout,
            child: Some(child),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        let _ = send_signal(self.pid(), sig);
    }

    /// SIGSTOP, returning once every thread of the process is stopped: a stop is
    /// asynchronous (the kernel wakes one thread to start the group stop, and on a busy
    /// machine the others may run on until it gets a CPU), so a test that acts right after
    /// the signal would race a process that is still running.
    pub async fn stop(&self) {
        let pid = self.pid();
        self.signal(SIGSTOP);
        wait_for("the worker to stop", DEADLINE, || async move {
            all_threads_stopped(pid).then_some(())
        })
        .await;
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit (after SIGTERM) within `deadline`; returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + deadline;
        let c = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            #[expect(
                clippy::disallowed_methods,
                reason = "poll interval of a synchronous wait with a deadline"
            )]
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            let _ = send_signal(c.id() as i32, SIGCONT);
        }
        self.kill9();
    }
}

/// Signal numbers (Linux).
pub const SIGTERM: i32 = 15;
pub const SIGSTOP: i32 = 19;
pub const SIGCONT: i32 = 18;

/// Sends a signal with kill(1) (the crate forbids unsafe code, so no libc call).
/// Every thread of `pid` is stopped (state `T` or `t` in `/proc/<pid>/task/*/stat`), or
/// the process is gone.
fn all_threads_stopped(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses and may hold any
        // character: read it after the last ')'.
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.trim_start().chars().next());
        matches!(state, Some('T' | 't' | 'Z' | 'X') | None)
    })
}

pub fn send_signal(pid: i32, sig: i32) -> std::io::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other("kill failed"))
    }
}

/// One line of the test workers' execution log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub event: String,
    pub process_id: String,
    pub step: String,
    pub worker: String,
    pub value: u64,
}

/// Reads the execution log the test step kinds append to.
pub fn read_log(path: &Path) -> Vec<LogLine> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let p: Vec<&str> = l.split(' ').collect();
            (p.len() == 5).then(|| LogLine {
                event: p[0].into(),
                process_id: p[1].into(),
                step: p[2].into(),
                worker: p[3].into(),
                value: p[4].parse().unwrap_or(0),
            })
        })
        .collect()
}

/// Appends one line to the execution log (used by the test step kinds).
pub fn append_log(path: &Path, event: &str, pid: &str, step: &str, worker: &str, value: u64) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{event} {pid} {step} {worker} {value}");
    }
}

/// An in-process fleet: schedulers (with gateways) and workers on one Redis.
pub struct Fleet {
    pub cfg: Config,
    pub engine: honua_scheduler::Processes,
    pub addr: std::net::SocketAddr,
    pub worker_stats: Vec<std::sync::Arc<honua_worker::WorkerStats>>,
    shutdown: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts `schedulers` schedulers (the first one's gateway is `addr`) and `workers`
    /// workers with the built-in step kinds.
    pub async fn start(cfg: Config, schedulers: usize, workers: usize) -> Self {
        use std::sync::Arc;
        cfg.validate().unwrap();
        honua_runtime::install_crypto_provider();
        let handlers = honua_worker::builtin_handlers(&cfg);
        let (defs, kinds) = honua_scheduler::load_definitions(&cfg).unwrap();
        let handlers = Arc::new(handlers);
        let st = store(&cfg);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let cfg_arc = Arc::new(cfg.clone());
        let engine = honua_scheduler::Processes::new(
            cfg_arc.clone(),
            st.clone(),
            defs.clone(),
            kinds.clone(),
        )
        .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tasks = Vec::new();
        let (e, s) = (engine.clone(), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            let _ = honua_scheduler::gateway::serve(e, listener, s).await;
        }));
        for i in 0..schedulers {
            let mut c = cfg.clone();
            c.scheduler.id = Some(format!("scheduler-{i}"));
            let e = honua_scheduler::Processes::new(
                Arc::new(c),
                st.clone(),
                defs.clone(),
                kinds.clone(),
            )
            .await;
            tasks.push(tokio::spawn(
                honua_scheduler::Scheduler::new(e).run(shutdown.clone()),
            ));
        }
        let mut worker_stats = Vec::new();
        for i in 0..workers {
            let mut c = cfg.clone();
            c.worker.id = Some(format!("worker-{i}"));
            let w = honua_worker::Worker::new(c, st.clone(), defs.clone(), handlers.clone());
            worker_stats.push(w.stats());
            tasks.push(tokio::spawn(w.run(shutdown.clone())));
        }
        Fleet {
            cfg,
            engine,
            addr,
            worker_stats,
            shutdown,
            tasks,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn store(&self) -> &Store {
        &self.engine.store
    }

    /// Submits through the engine (as the gateway does); returns the process id.
    pub async fn submit(&self, process_type: &str, input: serde_json::Value) -> String {
        let sub = honua_shared::envelope::Submission {
            input,
            ..submission_of(process_type)
        };
        self.engine
            .create(&sub, None)
            .await
            .unwrap()
            .id()
            .to_string()
    }

    pub async fn record(&self, id: &str) -> Option<honua_shared::record::ProcessRecord> {
        let (meta, steps) = self.store().load_process(id).await.ok()?;
        honua_shared::record::ProcessRecord::parse(id, &meta, &steps).ok()?
    }

    /// Waits until the process is finished and returns its record.
    pub async fn wait_finished(&self, id: &str) -> honua_shared::record::ProcessRecord {
        let end = Instant::now() + DEADLINE;
        loop {
            let rec = self.record(id).await;
            if let Some(r) = rec.as_ref().filter(|r| r.status.is_finished()) {
                return r.clone();
            }
            assert!(
                Instant::now() < end,
                "process {id} did not finish: {rec:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until process `id` waits for approval, then sends it signal `name` through
    /// the gateway (202).
    pub async fn approve(&self, c: &reqwest::Client, id: &str, name: &str) {
        wait_for("waiting for approval", DEADLINE, || async {
            self.record(id)
                .await
                .filter(|r| r.status == honua_shared::status::ProcessStatus::WaitingForApproval)
        })
        .await;
        let r = c
            .post(self.url(&format!("/api/processes/{id}/signal/{name}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "signal {name} to {id}");
    }

    pub fn committed(&self) -> u64 {
        self.worker_stats
            .iter()
            .map(|s| s.committed.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Waits until every process in `ids` has finished and checks that each completed with
/// every step committed once (`steps` steps each): by its worker with its successors (the
/// process's `steps_rev`), or through its partition's results stream.
pub async fn assert_each_completed_once(f: &Fleet, ids: &[String], steps: u64) {
    let mut steps_rev = 0;
    for id in ids {
        let rec = f.wait_finished(id).await;
        assert_eq!(
            rec.status,
            honua_shared::status::ProcessStatus::Completed,
            "{rec:?}"
        );
        steps_rev += rec.steps_rev;
    }
    let mut results = 0;
    for s in f.store().all() {
        results += entries_added(&s, &s.keys().results()).await;
    }
    let want = steps * ids.len() as u64;
    assert_eq!(
        results + steps_rev,
        want,
        "duplicate step commits: {}",
        (results + steps_rev).saturating_sub(want)
    );
    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "one process per submission");
}

/// `XINFO STREAM` field `entries-added`: how many entries a stream ever received.
pub async fn entries_added(store: &Store, key: &honua_shared::keys::Key) -> u64 {
    let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(&mut store.conn())
        .await
        .unwrap();
    match info.get("entries-added") {
        Some(redis::Value::Int(n)) => *n as u64,
        other => panic!("entries-added missing: {other:?}"),
    }
}

/// Everything in Redis that still names process `id`, as readable strings (empty once it is
/// deleted): key names containing it (`SCAN`), members of the indexes and the delayed set
/// that name it, its idempotency key (`idem` is the key it was submitted with), and live
/// entries naming it (`pid`) in the job, event and results streams (pending, or not yet
/// delivered to the group) and in the dead-letter stream. Acknowledged entries awaiting the
/// periodic trim and the quarantine stream (a record of rejected input) are not references.
pub async fn references_to(store: &Store, id: &str, idem: Option<&str>) -> Vec<String> {
    use honua_shared::keys::{SCHEDULER_GROUP, WORKERS_GROUP};
    let keys = store.keys();
    let mut conn = store.conn();
    let mut scanned = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("*{id}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        scanned.extend(page);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // SCAN's order follows the server's hash table, not insertion: sort, so two calls compare.
    scanned.sort();
    let mut out: Vec<String> = scanned.into_iter().map(|k| format!("key {k}")).collect();
    if let Some(k) = idem {
        let v: Option<String> = redis::cmd("GET")
            .arg(keys.idempotency(k))
            .query_async(&mut conn)
            .await
            .unwrap();
        if v.as_deref() == Some(id) {
            out.push(format!("idempotency key {k}"));
        }
    }
    let mut zsets = vec![keys.index_all(), keys.index_active(), keys.delayed()];
    zsets.extend(
        honua_shared::status::ProcessStatus::ALL
            .into_iter()
            .map(|s| keys.index_status(s)),
    );
    for z in zsets {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(&z)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        for m in members.into_iter().filter(|m| m == id || m.contains(id)) {
            out.push(format!("{z} member {m}"));
        }
    }
    for (stream, group) in [
        (keys.jobs(), Some(WORKERS_GROUP)),
        (keys.events(), Some(SCHEDULER_GROUP)),
        (keys.results(), Some(SCHEDULER_GROUP)),
        (keys.dlq(), None),
    ] {
        let entries = store.stream_entries(&stream, 100_000).await.unwrap();
        let (pending, delivered): (Vec<String>, String) = match group {
            Some(g) => {
                let p: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg(g)
                    .arg("-")
                    .arg("+")
                    .arg(100_000)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                let groups: Vec<std::collections::HashMap<String, redis::Value>> =
                    redis::cmd("XINFO")
                        .arg("GROUPS")
                        .arg(&stream)
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default();
                let last = groups
                    .iter()
                    .find(|i| {
                        i.get("name")
                            .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                            .as_deref()
                            == Some(g)
                    })
                    .and_then(|i| i.get("last-delivered-id"))
                    .map(|v| redis::from_redis_value::<String>(v.clone()).unwrap())
                    .unwrap_or_else(|| "0-0".into());
                (p.into_iter().map(|e| e.0).collect(), last)
            }
            None => (vec![], "0-0".into()),
        };
        let after = |a: &str, b: &str| {
            let n = |s: &str| {
                let (ms, seq) = s.split_once('-').unwrap();
                (ms.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
            };
            n(a) > n(b)
        };
        for e in entries {
            let live = group.is_none() || pending.contains(&e.id) || after(&e.id, &delivered);
            if live && e.fields.get(honua_shared::envelope::wire::PROCESS_ID) == Some(id) {
                out.push(format!("{stream} entry {}", e.id));
            }
        }
    }
    out
}
