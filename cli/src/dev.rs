//! `honua dev`: the whole system on one machine — a private redis-server (AOF on) unless
//! `HONUA_REDIS_URL` or `HONUA_REDIS_CLUSTER_NODES` is set, the scheduler, the gateway and N in-process workers; submits the
//! example processes, shows their progress, and serves :9090 until Ctrl-C. With
//! `--mock-llm` it also runs the mock OpenAI-compatible provider (`honua-mock-llm`) in
//! process and configures the `llm` step kind to call it, so LLM steps run without a paid
//! API.

use honua_mock_llm::{EveryNth, Latency, MockConfig, MockLlm};
use honua_scheduler::Processes;
use honua_shared::config::Config;
use honua_shared::definition::{
    DefinitionError, DefinitionSet, Format, KindRegistry, ProcessDefinition,
};
use honua_shared::envelope::{Event, Submission, TraceContext};
use honua_shared::llm_config::{EndpointConfig, LlmProviderConfig, Price, ProviderKind};
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
    /// Run the mock LLM provider and point the `llm` kind at it (`--mock-llm`).
    pub mock_llm: Option<MockLlmOptions>,
    /// Fired by a second Ctrl-C: the workers hand their running steps back at once.
    pub hand_back: CancellationToken,
}

/// `honua dev --mock-llm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockLlmOptions {
    /// Every Nth request to the mock answers 429 + `Retry-After` (0: never), so the
    /// rate-limit handling and `honua_llm_errors_total{error_type="rate_limit"}` see use.
    pub rate_limit_every: u64,
}

impl Default for MockLlmOptions {
    fn default() -> Self {
        Self {
            rate_limit_every: 5,
        }
    }
}

/// The API key `honua dev --mock-llm` gives the mock and the `llm` kind (a dummy: the mock
/// only checks that the worker sends what it was configured with).
pub const MOCK_LLM_API_KEY: &str = "sk-honua-dev-mock-llm";

/// The smallest example of kind `llm`, which `--mock-llm` adds to the loaded definitions
/// (built in, not in `processes/`, so a deployment does not ship it).
pub const LLM_EXAMPLE: &str = include_str!("dev/llm_example.toml");
const LLM_EXAMPLE_SOURCE: &str = "honua dev --mock-llm (built-in LlmExample)";

/// Starts the mock provider on a free loopback port and sets `cfg.llm_provider` to an
/// OpenAI-compatible provider at it, its key in a file under `data_dir`. An
/// `[llm_provider]` already configured is an error: `--mock-llm` would silently replace it.
pub async fn start_mock_llm(
    cfg: &mut Config,
    opts: MockLlmOptions,
    data_dir: &Path,
) -> anyhow::Result<MockLlm> {
    if let Some(llm) = &cfg.llm_provider {
        anyhow::bail!(
            "--mock-llm: the config already has an [llm_provider] section (provider {}); \
             remove it to use the mock, or drop --mock-llm to use that provider",
            llm.provider
        );
    }
    std::fs::create_dir_all(data_dir)?;
    let key_file = data_dir.join("mock-llm.key");
    std::fs::write(&key_file, MOCK_LLM_API_KEY)?;
    let mock = MockLlm::start(MockConfig {
        latency: Latency::Uniform {
            min: Duration::from_millis(20),
            max: Duration::from_millis(80),
        },
        rate_limit_every: (opts.rate_limit_every > 0).then_some(EveryNth {
            every: opts.rate_limit_every,
            retry_after: Duration::from_millis(500),
        }),
        api_key: Some(MOCK_LLM_API_KEY.into()),
        ..MockConfig::default()
    })
    .await?;
    cfg.llm_provider = Some(LlmProviderConfig {
        provider: ProviderKind::OpenaiCompatible,
        openai_compatible: Some(EndpointConfig {
            base_url: Some(mock.base_url()),
            api_key_file: Some(key_file),
            ..EndpointConfig::default()
        }),
        prices: mock_prices(),
        ..LlmProviderConfig::default()
    });
    Ok(mock)
}

/// OpenAI's list prices of the default `model_selection` models, so that under
/// `--mock-llm` the cost counter (`honua_llm_cost_microdollars_total`) and each process's
/// `llmUsage.costUsd` show what the same tokens would cost.
fn mock_prices() -> std::collections::BTreeMap<String, Price> {
    let price = |input_per_1k, output_per_1k| Price {
        input_per_1k,
        output_per_1k,
    };
    [
        ("gpt-4o".to_string(), price(0.0025, 0.01)),
        ("gpt-4o-mini".to_string(), price(0.00015, 0.0006)),
    ]
    .into()
}

/// Loads the definitions. Without an `[llm_provider]` (and without `--mock-llm`), the
/// process types with `llm` steps are left out with a warning that says how to run them,
/// so the first `honua dev` on a fresh checkout still runs the rest; every other error in
/// a definition still stops it.
fn load_definitions(cfg: &Config) -> anyhow::Result<(Arc<DefinitionSet>, Arc<KindRegistry>)> {
    if cfg.llm_provider.is_some() {
        return honua_scheduler::load_definitions(cfg);
    }
    let kinds = KindRegistry::for_config(cfg);
    let (defs, skipped) = DefinitionSet::load_dir_without_llm(&cfg.definitions_dir, &kinds)
        .map_err(|e| {
            anyhow::anyhow!(
                "process definitions in {}: {e}",
                cfg.definitions_dir.display()
            )
        })?;
    if let Some(msg) = skipped_message(&skipped) {
        println!("honua dev: {msg}");
        tracing::warn!("{msg}");
    }
    Ok((Arc::new(defs), Arc::new(kinds)))
}

/// The warning for process types left out for want of an `[llm_provider]`.
fn skipped_message(skipped: &[DefinitionError]) -> Option<String> {
    let names: Vec<&str> = skipped
        .iter()
        .filter_map(|e| match e {
            DefinitionError::NeedsLlmProvider { process, .. } => Some(process.as_str()),
            _ => None,
        })
        .collect();
    (!names.is_empty()).then(|| {
        format!(
            "skipped process type(s) {}: they have llm steps and the config has no [llm_provider]; \
             run `honua dev --mock-llm` (scripts/dev.sh --mock-llm) to run them against the built-in \
             mock provider, or configure [llm_provider] (README, LLM steps)",
            names.join(", ")
        )
    })
}

/// Adds [`LLM_EXAMPLE`] to `defs` unless the definitions directory already has a process
/// type of that name (the user's wins). Returns whether it was added.
fn add_llm_example(defs: &mut DefinitionSet, kinds: &KindRegistry) -> anyhow::Result<bool> {
    let def = ProcessDefinition::parse(LLM_EXAMPLE, Format::Toml, LLM_EXAMPLE_SOURCE, kinds)?;
    if defs.latest(&def.name).is_some() {
        return Ok(false);
    }
    defs.insert(def, LLM_EXAMPLE_SOURCE)?;
    Ok(true)
}

/// A redis-server child process, killed on drop.
pub struct RedisChild {
    pub url: String,
    pub port: u16,
    child: tokio::process::Child,
    dir: std::path::PathBuf,
    /// Extra `redis-server` arguments (a cluster node's).
    extra: Vec<String>,
}

impl RedisChild {
    /// Starts `redis-server` on a free port with AOF on, its data under `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        Self::start_on(port, dir, &[]).await
    }

    /// [`RedisChild::start`] on `port`, with extra `redis-server` arguments.
    async fn start_on(port: u16, dir: &Path, extra: &[String]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let child = Self::spawn(port, dir, extra).await?;
        Ok(Self {
            url: format!("redis://127.0.0.1:{port}"),
            child,
            port,
            dir: dir.to_path_buf(),
            extra: extra.to_vec(),
        })
    }

    /// `kill -9` of the server, `down` without it, then the server again on the same port
    /// and data (a crash and restart from the AOF).
    pub async fn crash_and_restart(&mut self, down: Duration) -> anyhow::Result<()> {
        let _ = self.child.kill().await;
        tokio::time::sleep(down).await;
        self.child = Self::spawn(self.port, &self.dir, &self.extra).await?;
        Ok(())
    }

    async fn spawn(
        port: u16,
        dir: &Path,
        extra: &[String],
    ) -> anyhow::Result<tokio::process::Child> {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
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
        Ok(child)
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The `redis-cli` arguments that make a cluster of the nodes on loopback `ports`, one
/// replica per primary (six nodes: three primaries).
pub fn cluster_create_args(ports: impl IntoIterator<Item = u16>) -> Vec<String> {
    let mut args = vec!["--cluster".to_string(), "create".to_string()];
    args.extend(ports.into_iter().map(|p| format!("127.0.0.1:{p}")));
    args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
    args
}

/// Whether a cluster node is ready, from its `CLUSTER INFO` and `INFO replication`: the
/// cluster is ok with every slot served, and the node is a primary or a replica whose link
/// to its primary is up.
pub fn cluster_node_ready(cluster_info: &str, replication_info: &str) -> bool {
    cluster_info.contains("cluster_state:ok")
        && cluster_info.contains("cluster_slots_ok:16384")
        && (replication_info.contains("role:master")
            || replication_info.contains("master_link_status:up"))
}

/// A local Redis Cluster: six [`RedisChild`] nodes with `--cluster-enabled yes` on free
/// loopback ports (each with its cluster bus port, `port + 10000`, free too), three
/// primaries with one replica each, created with `redis-cli --cluster create`; what
/// `scripts/cluster.sh` starts, for programs (the load test's `scale --partitions`).
pub struct RedisClusterChildren {
    pub nodes: Vec<RedisChild>,
}

impl RedisClusterChildren {
    /// Starts the nodes with their data under `dir`, creates the cluster and waits until
    /// every node reports `cluster_state:ok` and every replica is in sync.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let extra: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ]
        .map(String::from)
        .to_vec();
        let mut nodes = Vec::new();
        while nodes.len() < 6 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            if port >= 55_535 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err()
            {
                continue;
            }
            let node_dir = dir.join(port.to_string());
            nodes.push(RedisChild::start_on(port, &node_dir, &extra).await?);
        }
        let out = tokio::process::Command::new("redis-cli")
            .args(cluster_create_args(nodes.iter().map(|n| n.port)))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| anyhow::anyhow!("cannot run redis-cli ({e}); install redis-tools"))?;
        if !out.status.success() {
            anyhow::bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for n in &nodes {
            let client = redis::Client::open(n.url.as_str())?;
            let ask = |cmd: redis::Cmd| {
                let client = client.clone();
                async move {
                    let mut c = client.get_multiplexed_async_connection().await.ok()?;
                    cmd.query_async::<String>(&mut c).await.ok()
                }
            };
            loop {
                let cluster = ask(redis::cmd("CLUSTER").arg("INFO").clone()).await;
                let replication = ask(redis::cmd("INFO").arg("replication").clone()).await;
                if let (Some(c), Some(r)) = (cluster, replication)
                    && cluster_node_ready(&c, &r)
                {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    anyhow::bail!("the cluster is not ok on port {}", n.port);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Self { nodes })
    }

    /// Seed URLs of every node (`redis_cluster_nodes`).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    pub async fn stop(self) {
        for n in self.nodes {
            n.stop().await;
        }
    }
}

/// What `honua dev` submits for each process type: a request in the shape the type's
/// prompts describe (any JSON object works: the `llm` steps quote the whole input).
fn example_input(process_type: &str) -> serde_json::Value {
    use serde_json::json;
    match process_type {
        "Deployment" => json!({
            "application": "honua-server",
            "environment": "dev",
            "cloud": "aws",
            "region": "eu-west-1",
            "requirements": "OGC API Features and Tiles for 20 req/s, PostGIS 16, raster tiles cached in S3"
        }),
        "Upgrade" => json!({
            "deployment": "honua-server-dev",
            "from_version": "2.3.1",
            "to_version": "2.4.0",
            "release_notes": "STAC API 1.0 search; tile cache key includes the style version; migration 0042 adds a GiST index"
        }),
        "Metadata" => json!({
            "collection": "orthophotos-2024",
            "files": ["ortho_2024_tile_001.tif", "ortho_2024_tile_001.tif.aux.xml"],
            "gdalinfo": "Driver: GTiff; Size is 10000, 10000; EPSG:25832; Pixel Size = (0.2,-0.2); Upper Left (500000, 5600000)"
        }),
        "GitOps" => json!({
            "repository": "https://git.example.com/platform/honua-config",
            "revision": "8f3c2a1",
            "diff": "values.yaml: replicas 2 -> 3; ingress.yaml: add host tiles.example.com"
        }),
        "Benchmark" => json!({
            "target": "honua-server-staging",
            "scenario": "OGC API Features /items, bbox queries, 200 virtual users, 10 min",
            "results": {"throughput_rps": 812, "p50_ms": 41, "p95_ms": 160, "p99_ms": 420, "errors": 0.002},
            "baseline": {"throughput_rps": 840, "p50_ms": 39, "p95_ms": 150, "p99_ms": 380, "errors": 0.001}
        }),
        _ => json!({ "example": process_type, "environment": "dev" }),
    }
}

/// Runs everything until `shutdown` fires.
pub async fn run(
    mut cfg: Config,
    opts: DevOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Before Redis starts: a config conflict should not leave a server behind.
    let mock = match opts.mock_llm {
        Some(m) => Some(start_mock_llm(&mut cfg, m, &opts.data_dir).await?),
        None => None,
    };
    let redis = match &opts.redis_url {
        Some(url) => {
            cfg.redis_url = url.clone();
            None
        }
        // `HONUA_REDIS_CLUSTER_NODES` (e.g. from scripts/cluster.sh): run on that cluster.
        None if !cfg.redis_cluster_nodes.is_empty() => None,
        None => {
            let r = RedisChild::start(&opts.data_dir.join("redis")).await?;
            cfg.redis_url = r.url.clone();
            Some(r)
        }
    };
    cfg.validate()?;
    println!("honua dev: redis {}", cfg.redacted_redis_target());
    let handlers = honua_worker::builtin_handlers(&cfg);
    let (mut defs, kinds) = load_definitions(&cfg)?;
    if let (Some(mock), Some(m)) = (&mock, opts.mock_llm) {
        let every = match m.rate_limit_every {
            0 => String::new(),
            n => format!("; 1 request in {n} answers 429"),
        };
        println!(
            "honua dev: mock llm on {} (openai_compatible{every})",
            mock.base_url()
        );
        let mut set = Arc::unwrap_or_clone(defs);
        if add_llm_example(&mut set, &kinds)? {
            println!("honua dev: added the built-in LlmExample process type (kind llm)");
        }
        defs = Arc::new(set);
    }
    let handlers = Arc::new(handlers);
    let store = Store::from_config(&cfg)?;
    store.ensure_groups().await?;
    store.load_scripts().await?;
    let cfg = Arc::new(cfg);
    let engine = Processes::new(cfg.clone(), store.clone(), defs.clone(), kinds.clone()).await;
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr()).await?;
    let gateway_port = listener.local_addr()?.port();
    println!("honua dev: gateway on http://{}", listener.local_addr()?);
    if let Some(r) = &redis {
        println!(
            "honua dev: redis-cli for this server (paste it once): alias redis-cli='redis-cli -p {}'",
            r.port
        );
    }
    honua_scheduler::warn_if_open(&cfg);
    honua_scheduler::warn_if_not_durable(&engine);
    // The gateway's /health checks the scheduler loop, as in honua-scheduler.
    let scheduler = honua_scheduler::Scheduler::new(engine.clone());
    let state = honua_scheduler::gateway::ApiState {
        engine: engine.clone(),
        scheduler: Some(scheduler.stats()),
    };
    let mut tasks = vec![
        tokio::spawn(
            honua_scheduler::gateway::serve_with(state, listener, shutdown.clone()).map_unit(),
        ),
        tokio::spawn(scheduler.run(shutdown.clone())),
    ];
    for i in 0..opts.workers.max(1) {
        let mut wcfg = (*cfg).clone();
        wcfg.worker.id = Some(format!("dev-worker-{i}"));
        let w = honua_worker::Worker::new(wcfg, store.clone(), defs.clone(), handlers.clone())
            .with_hand_back(opts.hand_back.clone());
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
                tenant: None,
                trace: TraceContext::default(),
            };
            let s = engine.create(&sub, None).await?;
            println!("submitted {name:<12} {}", s.id());
            ids.push(s.id().to_string());
        }
        progress(&engine, &ids, opts.auto_approve, gateway_port, &shutdown).await;
        println!("honua dev: the examples are done; still serving until Ctrl-C");
        println!(
            "  try: curl -s -X POST localhost:{gateway_port}/api/processes -H 'content-type: application/json' -d '{{\"processType\":\"Test\"}}'"
        );
    }
    shutdown.cancelled().await;
    println!(
        "honua dev: stopping; running steps get up to {} to finish (Ctrl-C again hands them back now)",
        humantime::format_duration(Duration::from_millis(cfg.worker.shutdown_grace_ms))
    );
    for t in tasks {
        let _ = t.await;
    }
    if let Some(r) = redis {
        r.stop().await;
    }
    if let Some(m) = mock {
        m.stop().await;
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
    engine: &Processes,
    ids: &[String],
    auto_approve: bool,
    gateway_port: u16,
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
                        "{} waits for signal {signal:?}: curl -X POST localhost:{gateway_port}/api/processes/{id}/signal/{signal}",
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
                                by: None,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_is_ready_with_every_slot_served_and_its_replica_link_up() {
        let ok = "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\n";
        assert!(cluster_node_ready(ok, "# Replication\r\nrole:master\r\n"));
        assert!(cluster_node_ready(
            ok,
            "role:slave\r\nmaster_link_status:up\r\n"
        ));
        assert!(!cluster_node_ready(
            ok,
            "role:slave\r\nmaster_link_status:down\r\n"
        ));
        let partial = "cluster_state:ok\r\ncluster_slots_ok:16000\r\n";
        assert!(!cluster_node_ready(partial, "role:master\r\n"));
        assert!(!cluster_node_ready(
            "cluster_state:fail\r\n",
            "role:master\r\n"
        ));
        assert_eq!(
            cluster_create_args([7000, 7001]),
            [
                "--cluster",
                "create",
                "127.0.0.1:7000",
                "127.0.0.1:7001",
                "--cluster-replicas",
                "1",
                "--cluster-yes"
            ]
        );
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "honua-dev-test-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn mock_llm_refuses_a_configured_provider() {
        let dir = tmp_dir("refuse");
        let mut cfg = Config {
            llm_provider: Some(LlmProviderConfig::default()),
            ..Config::default()
        };
        let before = cfg.llm_provider.clone();
        let e = start_mock_llm(&mut cfg, MockLlmOptions::default(), &dir)
            .await
            .err()
            .expect("a configured provider is an error");
        let msg = e.to_string();
        assert!(msg.contains("--mock-llm"), "{msg}");
        assert!(msg.contains("[llm_provider]"), "{msg}");
        assert_eq!(cfg.llm_provider, before, "the config is left alone");
        std::fs::remove_dir_all(dir).ok();
    }

    #[tokio::test]
    async fn mock_llm_configures_the_llm_kind_and_the_example_loads() {
        honua_runtime::install_crypto_provider();
        let dir = tmp_dir("mock");
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../processes");
        let mut cfg = Config {
            definitions_dir: shipped.clone(),
            ..Config::default()
        };

        // Without a provider there is no `llm` kind: a definition with an llm step names the
        // missing config, and `honua dev` leaves the shipped llm types out with a warning.
        let handlers = honua_worker::builtin_handlers(&cfg);
        assert!(!handlers.kinds().contains("llm"));
        let e = DefinitionSet::from_str(LLM_EXAMPLE, Format::Toml, "x", handlers.kinds())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs an [llm_provider] section"), "{e}");
        let e = honua_scheduler::load_definitions(&cfg)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[llm_provider]") && e.contains("--mock-llm") && e.contains("Benchmark"),
            "{e}"
        );
        let (defs, _) = load_definitions(&cfg).unwrap();
        assert_eq!(defs.names().collect::<Vec<_>>(), ["Test"]);

        let mock = start_mock_llm(
            &mut cfg,
            MockLlmOptions {
                rate_limit_every: 2,
            },
            &dir,
        )
        .await
        .unwrap();
        cfg.validate().unwrap();
        let llm = cfg.llm_provider.as_ref().unwrap();
        assert_eq!(llm.provider, ProviderKind::OpenaiCompatible);
        let ep = llm.openai_compatible.as_ref().unwrap();
        assert_eq!(ep.base_url.as_deref(), Some(mock.base_url().as_str()));
        assert!(mock.base_url().starts_with("http://127.0.0.1:"));
        let key_file = ep.api_key_file.as_ref().unwrap();
        assert_eq!(std::fs::read_to_string(key_file).unwrap(), MOCK_LLM_API_KEY);

        // The shipped definitions plus the example load with the kinds the workers register.
        let handlers = honua_worker::builtin_handlers(&cfg);
        assert!(handlers.kinds().contains("llm"));
        let (defs, kinds) = honua_scheduler::load_definitions(&cfg).unwrap();
        let shipped_count = defs.len();
        assert_eq!(shipped_count, 6, "every shipped type loads with a provider");
        let (same, _) = load_definitions(&cfg).unwrap();
        assert_eq!(same.len(), shipped_count);
        let mut set = Arc::unwrap_or_clone(defs);
        assert!(add_llm_example(&mut set, &kinds).unwrap());
        assert_eq!(set.len(), shipped_count + 1);
        let ex = set.latest("LlmExample").unwrap();
        assert!(ex.step("Summarize").is_some_and(|s| s.kind == "llm"));
        // Added once: a type of that name already loaded wins.
        assert!(!add_llm_example(&mut set, &kinds).unwrap());

        // The mock checks the key, and answers 429 + Retry-After to every 2nd request.
        let client = reqwest::Client::new();
        let body = serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
        let url = format!("{}/chat/completions", mock.base_url());
        let r = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 401, "no key");
        let send = || {
            client
                .post(&url)
                .bearer_auth(MOCK_LLM_API_KEY)
                .json(&body)
                .send()
        };
        assert_eq!(send().await.unwrap().status(), 200);
        let r = send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key("retry-after"));
        assert_eq!(send().await.unwrap().status(), 200);
        mock.stop().await;
        std::fs::remove_dir_all(dir).ok();
    }
}
