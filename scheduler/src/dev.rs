//! `honua dev`: the whole system on one machine — a private redis-server (AOF on) unless
//! `HONUA_REDIS_URL` is set, the scheduler, the gateway and N in-process workers; submits the
//! example processes, shows their progress, and serves :9090 until Ctrl-C.

use crate::submit::Engine;
use honua_shared::config::Config;
use honua_shared::envelope::{Event, Submission, TraceContext};
use honua_shared::keys::Keys;
use honua_shared::record::ProcessRecord;
use honua_shared::status::StepStatus;
use honua_shared::store::Store;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct DevOptions {
    pub workers: usize,
    pub data_dir: PathBuf,
    pub submit_examples: bool,
    pub auto_approve: bool,
    /// Use this Redis instead of starting one.
    pub redis_url: Option<String>,
}

/// A redis-server child process, killed on drop.
pub struct RedisChild {
    pub url: String,
    child: tokio::process::Child,
}

impl RedisChild {
    /// Starts `redis-server` on a free port with AOF on, its data under `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own process group: Ctrl-C reaches honua, which drains the workers before
            // it stops Redis.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start redis-server ({e}); install it (apt-get install redis-server) or set HONUA_REDIS_URL"))?;
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str())?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("redis-server did not answer on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { url, child })
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn example_input(process_type: &str) -> serde_json::Value {
    serde_json::json!({ "example": process_type, "environment": "dev" })
}

/// Runs everything until `shutdown` fires.
pub async fn run(
    mut cfg: Config,
    opts: DevOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let redis = match &opts.redis_url {
        Some(url) => {
            cfg.redis_url = url.clone();
            None
        }
        None => {
            let r = RedisChild::start(&opts.data_dir.join("redis")).await?;
            cfg.redis_url = r.url.clone();
            Some(r)
        }
    };
    cfg.validate()?;
    println!("honua dev: redis {}", cfg.redacted_redis_url());
    let handlers = honua_worker::builtin_handlers(&cfg);
    let (defs, kinds) = crate::load_definitions(&cfg, &handlers)?;
    let handlers = Arc::new(handlers);
    let store = Store::open(&cfg.redis_url, Keys::new(&cfg.key_prefix, 0))?;
    store.ensure_groups().await?;
    store.load_scripts().await?;
    let cfg = Arc::new(cfg);
    let engine = Engine::new(cfg.clone(), store.clone(), defs.clone(), kinds.clone()).await;
    let listener = tokio::net::TcpListener::bind(&cfg.http_addr).await?;
    println!("honua dev: gateway on http://{}", listener.local_addr()?);
    let mut tasks = vec![
        tokio::spawn(crate::gateway::serve(engine.clone(), listener, shutdown.clone()).map_unit()),
        tokio::spawn(crate::Scheduler::new(engine.clone()).run(shutdown.clone())),
    ];
    for i in 0..opts.workers.max(1) {
        let mut wcfg = (*cfg).clone();
        wcfg.worker.id = Some(format!("dev-worker-{i}"));
        let w = honua_worker::Worker::new(wcfg, store.clone(), defs.clone(), handlers.clone());
        tasks.push(tokio::spawn(w.run(shutdown.clone())));
    }
    if opts.submit_examples {
        let mut ids = Vec::new();
        for name in defs.names() {
            let sub = Submission {
                process_type: name.to_string(),
                version: None,
                input: example_input(name),
                id: None,
                idempotency_key: None,
                trace: TraceContext::default(),
            };
            let s = engine.create(&sub, None).await?;
            println!("submitted {name:<12} {}", s.id());
            ids.push(s.id().to_string());
        }
        progress(&engine, &ids, opts.auto_approve, &shutdown).await;
        println!("honua dev: the examples are done; still serving until Ctrl-C");
        println!(
            "  try: curl -s -X POST localhost:{} -H 'content-type: application/json' -d '{{\"processType\":\"Test\"}}'",
            cfg.http_addr
                .rsplit(':')
                .next()
                .unwrap_or("9090")
                .to_string()
                + "/api/processes"
        );
    }
    shutdown.cancelled().await;
    for t in tasks {
        let _ = t.await;
    }
    if let Some(r) = redis {
        r.stop().await;
    }
    Ok(())
}

trait MapUnit {
    fn map_unit(self) -> impl std::future::Future<Output = ()> + Send;
}

impl<F: std::future::Future<Output = std::io::Result<()>> + Send> MapUnit for F {
    async fn map_unit(self) {
        if let Err(e) = self.await {
            tracing::error!(error = %e, "gateway stopped");
        }
    }
}

async fn progress(
    engine: &Engine,
    ids: &[String],
    auto_approve: bool,
    shutdown: &CancellationToken,
) {
    let started = std::time::Instant::now();
    let mut last = String::new();
    let mut approved = std::collections::HashSet::new();
    while !shutdown.is_cancelled() {
        let Ok((_, recs)) = engine
            .store
            .load_processes(&ids.iter().map(String::as_str).collect::<Vec<_>>())
            .await
        else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut table = String::new();
        let mut open = 0;
        for (id, (meta, steps)) in ids.iter().zip(recs) {
            let Ok(Some(r)) = ProcessRecord::parse(id, &meta, &steps) else {
                continue;
            };
            if !r.status.is_finished() {
                open += 1;
            }
            let current: Vec<&str> = r.active_steps().map(|(n, _)| n.as_str()).collect();
            table.push_str(&format!(
                "  {:<12} {:<20} {:<36} {}\n",
                r.process_type,
                r.status.as_str(),
                id,
                current.join(", ")
            ));
            for (step, s) in &r.steps {
                if s.status == StepStatus::Waiting && approved.insert((id.clone(), step.clone())) {
                    let signal = engine
                        .defs
                        .get(&r.process_type, r.version)
                        .and_then(|d| d.step(step).map(|s| s.config.clone()))
                        .and_then(|c| c.get("signal").and_then(|v| v.as_str()).map(str::to_string));
                    let Some(signal) = signal else { continue };
                    println!(
                        "{} waits for signal {signal:?}: curl -X POST localhost:9090/api/processes/{id}/signal/{signal}",
                        r.process_type
                    );
                    if auto_approve {
                        println!(
                            "  (honua dev approves it for you; --no-auto-approve to do it yourself)"
                        );
                        let _ = engine
                            .store
                            .send_event(&Event::Signal {
                                process_id: id.clone(),
                                name: signal,
                                value: "approve".into(),
                            })
                            .await;
                    }
                }
            }
        }
        if table != last {
            println!(
                "processes at +{:.1} s:\n{table}",
                started.elapsed().as_secs_f64()
            );
            last = table;
        }
        if open == 0 {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
