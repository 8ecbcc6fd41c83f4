//! `honua dev` as a first-time user runs it: the real binary as a child process with its
//! stdout in a file (not a terminal), its own private redis-server, a step held running by
//! an HTTP server that never answers, and Ctrl-C (SIGINT) twice.

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: the machine is shared and loaded.
const DEADLINE: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, failing with `what` after [`DEADLINE`].
async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `honua dev` child; on drop (a failed test) it is killed, and so is its Redis.
struct Dev {
    child: Child,
    stdout: PathBuf,
    redis_port: Option<u16>,
}

impl Dev {
    fn out(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.stdout) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    fn interrupt(&self) {
        let ok = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -INT");
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The private Redis runs in its own process group: stop it through its port.
        if let Some(port) = self.redis_port
            && let Ok(mut c) = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .and_then(|c| c.get_connection())
        {
            let _: redis::RedisResult<()> = redis::cmd("SHUTDOWN").arg("NOSAVE").query(&mut c);
        }
    }
}

fn tmp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("honua-dev-command-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_hang_definition(dir: &Path, silent: &str) {
    std::fs::write(
        dir.join("hang.toml"),
        format!(
            r#"
name = "Hang"
version = 1
[[steps]]
name = "Call"
kind = "http"
config = {{ url = "{silent}/hang", timeout = "1h" }}
"#
        ),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honua_dev_reports_its_scheduler_shows_redis_cli_warns_and_a_second_ctrl_c_hands_back() {
    honua_runtime::install_crypto_provider();
    // An HTTP server that accepts and never answers: the step stays running.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept() {
            held.push(s);
        }
    });
    let dir = tmp_dir();
    let defs = dir.join("processes");
    std::fs::create_dir_all(&defs).unwrap();
    write_hang_definition(&defs, &silent_url);
    let stdout = dir.join("stdout.log");
    let gateway = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_honua"))
        .args(["dev", "--no-examples", "--workers", "1", "--data-dir"])
        .arg(dir.join("data"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("HONUA_HTTP_ADDR", &gateway)
        .env("HONUA_DEFINITIONS_DIR", &defs)
        .env("HONUA_HTTP_ALLOWLIST", format!("{silent_url}/"))
        // Far longer than the test's deadline: only the second Ctrl-C can end the wait.
        .env("HONUA_SHUTDOWN_GRACE_MS", "600000")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn honua dev");
    let mut dev = Dev {
        child,
        stdout,
        redis_port: None,
    };

    // The banner: a ready-to-paste redis-cli line for the private server, and the warning
    // that the API is open.
    let alias = wait_for("the redis-cli line", || async {
        dev.out()
            .lines()
            .find(|l| l.contains("alias redis-cli="))
            .map(str::to_string)
    })
    .await;
    let port: u16 = alias
        .split("redis-cli -p ")
        .nth(1)
        .and_then(|p| p.trim_end_matches('\'').parse().ok())
        .unwrap_or_else(|| panic!("no port in {alias:?}"));
    dev.redis_port = Some(port);
    let mut redis = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut redis).await.unwrap();
    assert_eq!(pong, "PONG", "the line names honua dev's own server");
    wait_for("the open-API warning", || async {
        dev.out()
            .contains("the API is open to anyone who can reach it")
            .then_some(())
    })
    .await;

    // /health checks the scheduler loop, as honua-scheduler's does.
    let http = reqwest::Client::new();
    let base = format!("http://{gateway}");
    let health = wait_for("a Healthy scheduler check", || async {
        let r = http.get(format!("{base}/health")).send().await.ok()?;
        let h: Value = r.json().await.ok()?;
        (h["checks"]["scheduler"] == "Healthy").then_some(h)
    })
    .await;
    assert_eq!(health["checks"]["redis"], "Healthy", "{health}");

    // A step that runs until handed back.
    let r = http
        .post(format!("{base}/api/processes"))
        .json(&serde_json::json!({"processType": "Hang"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("the step to run", || async {
        let r = http
            .get(format!("{base}/api/processes/{id}"))
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        (v["steps"][0]["status"] == "running").then_some(())
    })
    .await;

    // Ctrl-C: it says what it waits for.
    dev.interrupt();
    wait_for("the shutdown message naming the running step", || async {
        let out = dev.out();
        (out.contains("Ctrl-C again hands them back now")
            && out
                .lines()
                .any(|l| l.contains("running step(s)") && l.contains(&format!("{id}/Call"))))
        .then_some(())
    })
    .await;
    // A second Ctrl-C hands the step back at once: honua dev exits long before the
    // 10-minute grace period.
    dev.interrupt();
    let end = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(s) = dev.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < end,
            "honua dev did not exit after the second Ctrl-C"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}\n{}", dev.out());
    dev.redis_port = None;

    // stdout is a file: no colour codes, and each log line shows the process id once.
    let out = dev.out();
    assert!(!out.contains('\x1b'), "ANSI escapes in {out}");
    let started = out
        .lines()
        .find(|l| l.contains(&format!("Process {id} started")))
        .unwrap_or_else(|| panic!("no start line in {out}"));
    assert_eq!(started.matches(&id).count(), 1, "{started}");
    assert!(
        out.contains("step handed back"),
        "the step was handed back: {out}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Starts `honua dev` on the shipped definitions with the examples submitted; returns the
/// child and its gateway's base URL once the banner named its Redis.
async fn dev_on_shipped(dir: &Path, extra: &[&str]) -> (Dev, String) {
    let stdout = dir.join("stdout.log");
    let gateway = format!("127.0.0.1:{}", free_port());
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../processes");
    let child = Command::new(env!("CARGO_BIN_EXE_honua"))
        .args(["dev", "--workers", "2", "--data-dir"])
        .arg(dir.join("data"))
        .args(extra)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("HONUA_HTTP_ADDR", &gateway)
        .env("HONUA_DEFINITIONS_DIR", &shipped)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn honua dev");
    let mut dev = Dev {
        child,
        stdout,
        redis_port: None,
    };
    let alias = wait_for("the redis-cli line", || async {
        dev.out()
            .lines()
            .find(|l| l.contains("alias redis-cli="))
            .map(str::to_string)
    })
    .await;
    dev.redis_port = alias
        .split("redis-cli -p ")
        .nth(1)
        .and_then(|p| p.trim_end_matches('\'').parse().ok());
    (dev, format!("http://{gateway}"))
}

/// Waits for the examples to finish; returns (process type, status) of the last table.
async fn final_statuses(dev: &Dev) -> Vec<(String, String)> {
    let out = wait_for("the examples to finish", || async {
        let out = dev.out();
        out.contains("the examples are done").then_some(out)
    })
    .await;
    let table = out.rsplit("processes at +").next().unwrap();
    table
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_string(), w.next().unwrap().to_string())
        })
        .collect()
}

/// `honua dev --mock-llm`: every shipped type (five with `llm` steps) and the built-in
/// LlmExample run to Completed against the in-process mock, and the gateway's /metrics
/// counts LLM tokens and cost under each type with llm steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honua_dev_with_mock_llm_runs_every_shipped_type_to_completed() {
    honua_runtime::install_crypto_provider();
    let dir = tmp_dir();
    let (dev, base) = dev_on_shipped(&dir, &["--mock-llm"]).await;
    let mut got = final_statuses(&dev).await;
    got.sort();
    let want: Vec<(String, String)> = [
        "Benchmark",
        "Deployment",
        "GitOps",
        "LlmExample",
        "Metadata",
        "Test",
        "Upgrade",
    ]
    .iter()
    .map(|t| (t.to_string(), "Completed".to_string()))
    .collect();
    assert_eq!(got, want, "{}", dev.out());
    assert!(!dev.out().contains("skipped process type"));

    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let sum = |metric: &str, t: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter(|l| l.contains(&format!("process_type=\"{t}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for t in ["Deployment", "Upgrade", "Metadata", "GitOps", "Benchmark"] {
        assert!(
            sum("honua_llm_tokens_used_total", t) > 0.0,
            "{t}: {metrics}"
        );
        // --mock-llm prices the default models, so the cost counter moves too.
        assert!(
            sum("honua_llm_cost_microdollars_total", t) > 0.0,
            "{t}: {metrics}"
        );
    }
    drop(dev);
    std::fs::remove_dir_all(&dir).ok();
}

/// `honua dev` with neither `--mock-llm` nor an `[llm_provider]` (the README's first run):
/// it starts, says which types it left out and how to run them, and runs the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honua_dev_without_a_provider_skips_the_llm_types_and_says_how_to_run_them() {
    let dir = tmp_dir();
    let (dev, _) = dev_on_shipped(&dir, &[]).await;
    let got = final_statuses(&dev).await;
    assert_eq!(got, [("Test".to_string(), "Completed".to_string())]);
    let out = dev.out();
    let line = out
        .lines()
        .find(|l| l.starts_with("honua dev: skipped process type(s)"))
        .unwrap_or_else(|| panic!("no skip warning in {out}"));
    assert!(
        line.contains("Benchmark, Deployment, GitOps, Metadata, Upgrade")
            && line.contains("[llm_provider]")
            && line.contains("--mock-llm"),
        "{line}"
    );
    drop(dev);
    std::fs::remove_dir_all(&dir).ok();
}
