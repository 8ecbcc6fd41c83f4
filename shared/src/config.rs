//! Configuration in layers: compiled-in defaults → TOML file → `HONUA_*` environment →
//! command-line flags (applied by the binaries), then [`Config::validate`] once.
//! Tests build a `Config` as a value; nothing here reads the process environment unless
//! handed it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var} is invalid: {message}")]
    Env { var: &'static str, message: String },
    #[error("config field `{field}` is invalid: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// Whether a submission waits for the AOF fsync (`WAITAOF`, Redis/Valkey ≥ 7.2) before it
/// is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WaitAof {
    /// Use WAITAOF when the server supports it.
    #[default]
    Auto,
    Off,
    /// Refuse submissions when the server lacks WAITAOF or AOF is off.
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Cap on one state blob (input, step output, checkpoint), checked before decoding.
    pub max_state_size_kb: usize,
    /// MessagePack nesting cap (at most 64).
    pub max_depth: usize,
    /// LZ4-compress blobs of 256 bytes or more.
    pub compression: bool,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            max_state_size_kb: 1024,
            max_depth: 32,
            compression: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessFrameworkConfig {
    /// Process timeout when neither the definition nor `process_timeouts` sets one.
    pub default_timeout_minutes: u64,
    /// Per-type overrides (minutes), as the guide's `ProcessTimeouts`.
    pub process_timeouts: BTreeMap<String, u64>,
}

impl Default for ProcessFrameworkConfig {
    fn default() -> Self {
        Self {
            default_timeout_minutes: 60,
            process_timeouts: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// Stable consumer name; defaults to the host name.
    pub id: Option<String>,
    /// How long one blocking read of the submission/event streams waits.
    pub read_block_ms: u64,
    /// Entries read per batch.
    pub batch: usize,
    /// How often due timers and delayed jobs are promoted.
    pub timer_interval_ms: u64,
    /// A scheduler's unacknowledged events idle this long are taken over by another one.
    pub reclaim_idle_ms: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            id: None,
            read_block_ms: 1000,
            batch: 128,
            timer_interval_ms: 50,
            reclaim_idle_ms: 15_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Stable consumer name; defaults to the host name (the pod name on Kubernetes).
    pub id: Option<String>,
    pub max_concurrent_steps: usize,
    /// A job whose worker has not heartbeaten for this long is reclaimed.
    pub lease_ms: u64,
    /// How often each worker looks for jobs to reclaim.
    pub sweep_ms: u64,
    /// Heartbeat period; default a third of the lease, at most one second (a cancelled
    /// process stops its running steps within one heartbeat).
    pub heartbeat_ms: Option<u64>,
    /// Deliveries (Redis's own counter) after which a job is dead-lettered.
    pub max_deliveries: u64,
    /// On SIGTERM, in-flight steps get this long to finish before they are handed back.
    pub shutdown_grace_ms: u64,
    pub read_block_ms: u64,
    /// URL prefixes the `http` step kind may call, compared by scheme, host, port and path
    /// segment (see `allowlist`).
    pub http_allowlist: Vec<String>,
    pub http_max_response_kb: usize,
    /// Where `honua-worker` serves its own `/metrics` (empty: nowhere). Loopback by
    /// default; deployments that scrape it set `0.0.0.0:9091` (the manifests do).
    pub metrics_addr: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            id: None,
            max_concurrent_steps: 32,
            lease_ms: 15_000,
            sweep_ms: 2_000,
            heartbeat_ms: None,
            max_deliveries: 5,
            shutdown_grace_ms: 25_000,
            read_block_ms: 1_000,
            http_allowlist: Vec::new(),
            http_max_response_kb: 1024,
            metrics_addr: "127.0.0.1:9091".into(),
        }
    }
}

impl WorkerConfig {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }

    /// A consumer that owns nothing and whose worker has not heartbeated for this long (two
    /// leases) is deleted by the other workers' sweeps: a killed worker leaves the group.
    pub fn retire_idle(&self) -> Duration {
        2 * self.lease()
    }
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(
            self.heartbeat_ms
                .unwrap_or((self.lease_ms / 3).min(1000))
                .max(1),
        )
    }
}

/// Connection limits of the HTTP servers (the gateway and the worker's `/metrics`): a
/// client that sends slowly or not at all is cut off instead of holding a connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpServerConfig {
    /// A request's line and headers must arrive within this long of the connection's start
    /// or of the request's first byte; otherwise the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A connection with no request in progress is closed after this long; a response
    /// write that makes no progress for this long closes it too.
    pub idle_timeout_ms: u64,
    /// A request body must arrive in full within this long of its headers (408 otherwise).
    pub body_read_timeout_ms: u64,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_read_timeout_ms: 30_000,
            max_connections: 10_000,
        }
    }
}

impl HttpServerConfig {
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        const RANGE: std::ops::RangeInclusive<u64> = 100..=3_600_000;
        let ms = "must be 100..=3600000 (ms)";
        if !RANGE.contains(&self.header_read_timeout_ms) {
            return Err(("http_server.header_read_timeout_ms", ms));
        }
        if !RANGE.contains(&self.idle_timeout_ms) {
            return Err(("http_server.idle_timeout_ms", ms));
        }
        if !RANGE.contains(&self.body_read_timeout_ms) {
            return Err(("http_server.body_read_timeout_ms", ms));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(("http_server.max_connections", "must be 1..=1000000"));
        }
        Ok(())
    }
}

/// What an API key may do. Each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read processes, queues, workers, config.
    Read,
    /// Also submit, cancel, retry, signal.
    Operate,
    /// Also purge and replay dead letters.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "read" => Ok(Role::Read),
            "operate" => Ok(Role::Operate),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?} (read, operate, admin)")),
        }
    }
}

/// One API key: only the SHA-256 of the token is stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    pub role: Role,
    /// Hex SHA-256 of the bearer token (`honua hash-token` prints it). Read in either case
    /// and kept lower-case (tokens are compared by their lower-case hex digest).
    #[serde(deserialize_with = "lowercase")]
    pub sha256: String,
}

fn lowercase<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    String::deserialize(d).map(|s| s.to_ascii_lowercase())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer API keys. With none, the API is open (a warning is logged at start).
    pub keys: Vec<ApiKey>,
    /// `/health*` answers without a token.
    pub open_health: bool,
    /// `/metrics` answers without a token.
    pub open_metrics: bool,
    /// The web console links each process to its trace with this URL, `{trace_id}`
    /// replaced (e.g. `http://jaeger:16686/trace/{trace_id}`); unset: no link.
    pub trace_url_template: Option<String>,
    /// Signs the web console's session cookies and CSRF tokens (HMAC-SHA256): at least
    /// [`SESSION_SECRET_MIN_BYTES`] bytes, the same on every gateway replica, so a session
    /// survives a restart and any replica accepts it. Unset: a random key per gateway start
    /// (a warning is logged). `HONUA_SESSION_SECRET` in the environment.
    pub session_secret: Option<crate::llm_config::Secret>,
}

/// The shortest `api.session_secret` accepted (256 bits as bytes of text).
pub const SESSION_SECRET_MIN_BYTES: usize = 32;

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            open_health: true,
            open_metrics: true,
            trace_url_template: None,
            session_secret: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `redis://[user:password@]host:port[/db]`; `rediss://` for TLS.
    pub redis_url: String,
    /// Seed nodes of a Redis Cluster (`redis://host:port`, any few of its nodes); set, the
    /// services run on the cluster instead of `redis_url` (set only one of the two).
    pub redis_cluster_nodes: Vec<String>,
    /// Separates deployments (and tests) that share one Redis.
    pub key_prefix: String,
    /// How many partitions (hash tags `{0}`…`{P-1}`) the deployment's keys are split into,
    /// 1-[`crate::partition::MAX_PARTITIONS`]: fixed for the life of a deployment's layout
    /// (every service of it must agree; changing it strands processes in partitions the
    /// new count does not map to: see the README on partitions).
    pub partitions: u16,
    /// Gateway listen address. Unset: `0.0.0.0:9090` with API keys, `127.0.0.1:9090`
    /// without (an open API is not exposed by default); see [`Config::listen_addr`].
    pub http_addr: Option<String>,
    /// Directory of process definitions (TOML/YAML).
    pub definitions_dir: PathBuf,
    /// Step kinds registered in Rust by custom worker binaries, so definitions using them
    /// validate in the scheduler too.
    pub custom_step_kinds: Vec<String>,
    /// Finished processes are deleted this long after they end.
    pub retention_secs: u64,
    pub wait_aof: WaitAof,
    /// Replicas that must confirm a submission (`WAIT n`) before it is acknowledged; unset:
    /// 0 on one server, 1 on a cluster (see [`Config::replicas_to_wait`]).
    pub wait_replicas: Option<u32>,
    /// How long a submission waits for them; when fewer confirm in time it is acknowledged
    /// anyway, with a warning.
    pub wait_replicas_timeout_ms: u64,
    pub max_request_body_kb: usize,
    /// Threads of the process's async runtime; 0: one per CPU the process may use (Linux
    /// counts the cgroup's CPU quota, not a pod's request: a pod with no CPU limit gets one
    /// per node core, and threads that outnumber the CPU the process actually gets mostly
    /// wake one another up).
    pub runtime_threads: usize,
    /// Timeouts and connection cap of the gateway and the worker's metrics listener.
    pub http_server: HttpServerConfig,
    pub api: ApiConfig,
    pub state: StateConfig,
    pub process_framework: ProcessFrameworkConfig,
    pub scheduler: SchedulerConfig,
    pub worker: WorkerConfig,
    /// The `llm` step kind (`[llm_provider]`); absent = workers do not register it.
    pub llm_provider: Option<crate::llm_config::LlmProviderConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            redis_url: DEFAULT_REDIS_URL.into(),
            redis_cluster_nodes: Vec::new(),
            key_prefix: "honua".into(),
            partitions: 1,
            http_addr: None,
            definitions_dir: PathBuf::from("processes"),
            custom_step_kinds: Vec::new(),
            retention_secs: 24 * 3600,
            wait_aof: WaitAof::Auto,
            wait_replicas: None,
            wait_replicas_timeout_ms: 1000,
            max_request_body_kb: 1024,
            runtime_threads: 0,
            http_server: HttpServerConfig::default(),
            api: ApiConfig::default(),
            state: StateConfig::default(),
            process_framework: ProcessFrameworkConfig::default(),
            scheduler: SchedulerConfig::default(),
            worker: WorkerConfig::default(),
            llm_provider: None,
        }
    }
}

/// Most threads `runtime_threads` may ask for.
pub const MAX_RUNTIME_THREADS: usize = 256;

/// `redis_url` when none is configured.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// The gateway's listen address when `http_addr` is unset and API keys are configured.
pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9090";
/// ... and when no API keys are configured: the open API stays on this machine.
pub const DEFAULT_OPEN_HTTP_ADDR: &str = "127.0.0.1:9090";

/// The environment variables read, for the README and `--help`.
pub const ENV_VARS: &[&str] = &[
    "HONUA_CONFIG",
    "HONUA_REDIS_URL",
    "HONUA_REDIS_CLUSTER_NODES",
    "HONUA_KEY_PREFIX",
    "HONUA_PARTITIONS",
    "HONUA_HTTP_ADDR",
    "HONUA_DEFINITIONS_DIR",
    "HONUA_RETENTION_SECS",
    "HONUA_WAIT_AOF",
    "HONUA_WAIT_REPLICAS",
    "HONUA_WORKER_ID",
    "HONUA_SCHEDULER_ID",
    "HONUA_MAX_CONCURRENT_STEPS",
    "HONUA_LEASE_MS",
    "HONUA_SWEEP_MS",
    "HONUA_MAX_DELIVERIES",
    "HONUA_SHUTDOWN_GRACE_MS",
    "HONUA_MAX_STATE_SIZE_KB",
    "HONUA_DEFAULT_TIMEOUT_MINUTES",
    "HONUA_HTTP_ALLOWLIST",
    "HONUA_API_KEYS",
    "HONUA_SESSION_SECRET",
    "HONUA_WORKER_METRICS_ADDR",
    "HONUA_RUNTIME_THREADS",
];

fn parse_env<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse().map_err(|e: T::Err| ConfigError::Env {
        var,
        message: e.to_string(),
    })
}

impl Config {
    /// Defaults, then the file (if any), then the given environment.
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("HONUA_"))
            .collect();
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get("HONUA_CONFIG").map(PathBuf::from));
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path,
                    message: e.to_string(),
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(&env)?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        for (k, v) in env {
            match k.as_str() {
                "HONUA_REDIS_URL" => self.redis_url = v.clone(),
                "HONUA_REDIS_CLUSTER_NODES" => self.redis_cluster_nodes = comma_list(v),
                "HONUA_KEY_PREFIX" => self.key_prefix = v.clone(),
                "HONUA_PARTITIONS" => self.partitions = parse_env("HONUA_PARTITIONS", v)?,
                "HONUA_RUNTIME_THREADS" => {
                    self.runtime_threads = parse_env("HONUA_RUNTIME_THREADS", v)?
                }
                "HONUA_HTTP_ADDR" => self.http_addr = Some(v.clone()),
                "HONUA_DEFINITIONS_DIR" => self.definitions_dir = PathBuf::from(v),
                "HONUA_RETENTION_SECS" => {
                    self.retention_secs = parse_env("HONUA_RETENTION_SECS", v)?
                }
                "HONUA_WAIT_REPLICAS" => {
                    self.wait_replicas = Some(parse_env("HONUA_WAIT_REPLICAS", v)?)
                }
                "HONUA_WAIT_AOF" => {
                    self.wait_aof = match v.as_str() {
                        "auto" => WaitAof::Auto,
                        "off" => WaitAof::Off,
                        "required" => WaitAof::Required,
                        _ => {
                            return Err(ConfigError::Env {
                                var: "HONUA_WAIT_AOF",
                                message: "expected auto, off or required".into(),
                            });
                        }
                    }
                }
                "HONUA_WORKER_ID" => self.worker.id = Some(v.clone()),
                "HONUA_SCHEDULER_ID" => self.scheduler.id = Some(v.clone()),
                "HONUA_MAX_CONCURRENT_STEPS" => {
                    self.worker.max_concurrent_steps = parse_env("HONUA_MAX_CONCURRENT_STEPS", v)?
                }
                "HONUA_LEASE_MS" => self.worker.lease_ms = parse_env("HONUA_LEASE_MS", v)?,
                "HONUA_SWEEP_MS" => self.worker.sweep_ms = parse_env("HONUA_SWEEP_MS", v)?,
                "HONUA_MAX_DELIVERIES" => {
                    self.worker.max_deliveries = parse_env("HONUA_MAX_DELIVERIES", v)?
                }
                "HONUA_SHUTDOWN_GRACE_MS" => {
                    self.worker.shutdown_grace_ms = parse_env("HONUA_SHUTDOWN_GRACE_MS", v)?
                }
                "HONUA_MAX_STATE_SIZE_KB" => {
                    self.state.max_state_size_kb = parse_env("HONUA_MAX_STATE_SIZE_KB", v)?
                }
                "HONUA_DEFAULT_TIMEOUT_MINUTES" => {
                    self.process_framework.default_timeout_minutes =
                        parse_env("HONUA_DEFAULT_TIMEOUT_MINUTES", v)?
                }
                "HONUA_WORKER_METRICS_ADDR" => self.worker.metrics_addr = v.clone(),
                "HONUA_API_KEYS" => {
                    self.api.keys = parse_api_keys(v).map_err(|message| ConfigError::Env {
                        var: "HONUA_API_KEYS",
                        message,
                    })?
                }
                "HONUA_HTTP_ALLOWLIST" => self.worker.http_allowlist = comma_list(v),
                "HONUA_SESSION_SECRET" => {
                    self.api.session_secret = Some(crate::llm_config::Secret::new(v.clone()))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Checks every field once; the message names the bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(field: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                field,
                message: message.into(),
            })
        }
        if redis::Client::open(self.redis_url.as_str()).is_err() {
            return bad("redis_url", "not a redis:// or rediss:// URL");
        }
        if !self.redis_cluster_nodes.is_empty() {
            if self.redis_url != DEFAULT_REDIS_URL {
                return bad(
                    "redis_cluster_nodes",
                    "set either redis_url (one server) or redis_cluster_nodes (a cluster), not both",
                );
            }
            if let Some(n) = self
                .redis_cluster_nodes
                .iter()
                .find(|n| redis::Client::open(n.as_str()).is_err())
            {
                return bad(
                    "redis_cluster_nodes",
                    format!("{} is not a redis:// or rediss:// URL", redact_url(n)),
                );
            }
        }
        if !crate::envelope::valid_id(&self.key_prefix) {
            return bad("key_prefix", "must be 1-64 characters of [A-Za-z0-9_-]");
        }
        if self.runtime_threads > MAX_RUNTIME_THREADS {
            return bad(
                "runtime_threads",
                format!("must be 0 (one per CPU) to {MAX_RUNTIME_THREADS}"),
            );
        }
        if !(1..=crate::partition::MAX_PARTITIONS).contains(&self.partitions) {
            return bad(
                "partitions",
                format!(
                    "must be 1-{} (and never changed for a live deployment)",
                    crate::partition::MAX_PARTITIONS
                ),
            );
        }
        if self
            .http_addr
            .as_ref()
            .is_some_and(|a| a.parse::<std::net::SocketAddr>().is_err())
        {
            return bad("http_addr", "must be host:port with an IP address");
        }
        if self.retention_secs < 60 {
            return bad("retention_secs", "must be at least 60");
        }
        if !(1..=64 * 1024).contains(&self.max_request_body_kb) {
            return bad("max_request_body_kb", "must be 1..=65536");
        }
        if let Err((field, message)) = self.http_server.validate() {
            return bad(field, message);
        }
        if !(1..=64 * 1024).contains(&self.state.max_state_size_kb) {
            return bad("state.max_state_size_kb", "must be 1..=65536");
        }
        if !(1..=crate::codec::MAX_DEPTH_CEILING).contains(&self.state.max_depth) {
            return bad("state.max_depth", "must be 1..=64");
        }
        // As long as a definition's `timeout` may be (7 days): a deadline stays a
        // timestamp every view can render.
        let max_minutes = crate::definition::MAX_TIMEOUT.as_secs() / 60;
        let minutes_ok = |m: u64| (1..=max_minutes).contains(&m);
        if !minutes_ok(self.process_framework.default_timeout_minutes) {
            return bad(
                "process_framework.default_timeout_minutes",
                format!("must be 1..={max_minutes} (7 days)"),
            );
        }
        if !self
            .process_framework
            .process_timeouts
            .values()
            .all(|m| minutes_ok(*m))
        {
            return bad(
                "process_framework.process_timeouts",
                format!("minutes must be 1..={max_minutes} (7 days)"),
            );
        }
        let s = &self.scheduler;
        if !(1..=10_000).contains(&s.batch) {
            return bad("scheduler.batch", "must be 1..=10000");
        }
        if s.timer_interval_ms == 0 || s.read_block_ms == 0 || s.reclaim_idle_ms < 100 {
            return bad(
                "scheduler",
                "timer_interval_ms and read_block_ms must be > 0, reclaim_idle_ms >= 100",
            );
        }
        let w = &self.worker;
        if !(1..=100_000).contains(&w.max_concurrent_steps) {
            return bad("worker.max_concurrent_steps", "must be 1..=100000");
        }
        if w.lease_ms < 100 {
            return bad("worker.lease_ms", "must be at least 100");
        }
        if w.heartbeat().as_millis() as u64 * 2 > w.lease_ms {
            return bad("worker.heartbeat_ms", "must be at most half of lease_ms");
        }
        if w.sweep_ms == 0 || w.read_block_ms == 0 {
            return bad("worker.sweep_ms", "sweep_ms and read_block_ms must be > 0");
        }
        if w.max_deliveries == 0 {
            return bad("worker.max_deliveries", "must be at least 1");
        }
        for id in [&w.id, &s.id].into_iter().flatten() {
            if !crate::envelope::valid_id(id) {
                return bad("worker.id", "ids must be 1-64 characters of [A-Za-z0-9_-]");
            }
        }
        if !w.metrics_addr.is_empty() && w.metrics_addr.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "worker.metrics_addr",
                "must be empty or host:port with an IP address",
            );
        }
        for k in &self.api.keys {
            if k.sha256.len() != 64
                || !k
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return bad(
                    "api.keys",
                    format!("key {:?}: sha256 must be 64 lower-case hex digits", k.name),
                );
            }
        }
        if let Some(secret) = &self.api.session_secret
            && secret.expose().len() < SESSION_SECRET_MIN_BYTES
        {
            return bad(
                "api.session_secret",
                format!(
                    "must be at least {SESSION_SECRET_MIN_BYTES} bytes (e.g. `openssl rand -hex 32`)"
                ),
            );
        }
        if let Err(e) = crate::allowlist::UrlAllowlist::parse(&w.http_allowlist) {
            return bad("worker.http_allowlist", e.to_string());
        }
        if let Some(llm) = &self.llm_provider {
            llm.validate()
                .map_err(|(field, message)| ConfigError::Invalid { field, message })?;
        }
        Ok(())
    }

    /// Where the gateway listens: `http_addr` when set; else all interfaces with API keys
    /// configured, and only the loopback interface without (the API is open then).
    pub fn listen_addr(&self) -> String {
        match &self.http_addr {
            Some(a) => a.clone(),
            None if self.api.keys.is_empty() => DEFAULT_OPEN_HTTP_ADDR.into(),
            None => DEFAULT_HTTP_ADDR.into(),
        }
    }

    /// How many replicas a submission waits for: `wait_replicas`, else 0 on one server and
    /// 1 on a cluster (whose failover promotes a replica: without the wait, a submission
    /// acknowledged just before its primary died can be missing on the promoted replica).
    pub fn replicas_to_wait(&self) -> u32 {
        self.wait_replicas
            .unwrap_or(u32::from(!self.redis_cluster_nodes.is_empty()))
    }

    /// Process timeout for a type: the override, else the definition's, else the default.
    pub fn process_timeout(
        &self,
        process_type: &str,
        from_definition: Option<Duration>,
    ) -> Duration {
        if let Some(m) = self.process_framework.process_timeouts.get(process_type) {
            return Duration::from_secs(m * 60);
        }
        from_definition.unwrap_or(Duration::from_secs(
            self.process_framework.default_timeout_minutes * 60,
        ))
    }

    pub fn codec(&self) -> crate::codec::StateCodec {
        crate::codec::StateCodec::new(
            self.state.max_state_size_kb * 1024,
            self.state.max_depth,
            self.state.compression,
        )
    }

    /// The Redis URL with any password replaced, for logs and the config endpoint.
    pub fn redacted_redis_url(&self) -> String {
        redact_url(&self.redis_url)
    }

    /// The cluster's seed nodes with any password replaced.
    pub fn redacted_redis_cluster_nodes(&self) -> Vec<String> {
        self.redis_cluster_nodes
            .iter()
            .map(|n| redact_url(n))
            .collect()
    }

    /// Where the services connect, for logs: the URL, or the cluster's seed nodes.
    pub fn redacted_redis_target(&self) -> String {
        match self.redis_cluster_nodes.is_empty() {
            true => self.redacted_redis_url(),
            false => format!("cluster {}", self.redacted_redis_cluster_nodes().join(",")),
        }
    }
}

/// The non-empty, trimmed entries of a comma-separated list.
fn comma_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// `name:role:sha256hex` entries separated by commas.
fn parse_api_keys(v: &str) -> Result<Vec<ApiKey>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let mut parts = entry.splitn(3, ':');
            let (Some(name), Some(role), Some(sha)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err("expected name:role:sha256hex entries".to_string());
            };
            Ok(ApiKey {
                name: name.to_string(),
                role: role.parse()?,
                sha256: sha.to_ascii_lowercase(),
            })
        })
        .collect()
}

/// The Redis URL rebuilt from what the client parses out of it, with the password as `***`
/// wherever the URL carried it (userinfo, or `?pass=` of a `redis+unix://` URL). A lone user
/// name without a password is shown as `***` too (it may be a misplaced password); other
/// query parameters are left out. An unparsable URL is not echoed at all.
pub fn redact_url(url: &str) -> String {
    use redis::{ConnectionAddr, IntoConnectionInfo};
    let Ok(info) = url.into_connection_info() else {
        return "[unparsable redis url]".to_string();
    };
    let r = info.redis_settings();
    let user = match (r.username(), r.password()) {
        (Some(u), Some(_)) => Some(format!("{u}:***")),
        (None, Some(_)) => Some(":***".to_string()),
        (Some(_), None) => Some("***".to_string()),
        (None, None) => None,
    };
    let host = |h: &str, port: u16| match h.contains(':') {
        true => format!("[{h}]:{port}"),
        false => format!("{h}:{port}"),
    };
    let db = match r.db() {
        0 => String::new(),
        n => format!("/{n}"),
    };
    let at = user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
    match info.addr() {
        ConnectionAddr::Tcp(h, port) => format!("redis://{at}{}{db}", host(h, *port)),
        ConnectionAddr::TcpTls {
            host: h,
            port,
            insecure,
            ..
        } => format!(
            "rediss://{at}{}{db}{}",
            host(h, *port),
            if *insecure { "#insecure" } else { "" }
        ),
        ConnectionAddr::Unix(path) => {
            let mut q = Vec::new();
            if r.db() != 0 {
                q.push(format!("db={}", r.db()));
            }
            match (r.username(), r.password()) {
                (Some(u), Some(_)) => q.push(format!("user={u}&pass=***")),
                (None, Some(_)) => q.push("pass=***".into()),
                (Some(_), None) => q.push("user=***".into()),
                (None, None) => {}
            }
            let q = match q.is_empty() {
                true => String::new(),
                false => format!("?{}", q.join("&")),
            };
            format!("redis+unix://{}{q}", path.display())
        }
        // A kind of address this code does not know: show nothing of it.
        _ => "[redis url]".to_string(),
    }
}

/// This machine's host name (the pod's name on Kubernetes), when the kernel tells it.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// A stable default consumer name: the host name, else a random one.
pub fn default_instance_id(kind: &str) -> String {
    let host = host_name().filter(|h| crate::envelope::valid_id(h));
    match host {
        Some(h) => format!("{kind}-{h}"),
        None => format!("{kind}-{}", uuid::Uuid::now_v7().simple()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The config with one `HONUA_*` variable set, which must load and validate.
    fn valid_with(var: &str, value: &str) -> Config {
        let c = Config::load(None, env(&[(var, value)])).unwrap();
        c.validate().unwrap();
        c
    }

    /// Asserts that `c` fails validation naming `field`.
    fn assert_invalid(c: &Config, field: &str) {
        match c.validate() {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }

    #[test]
    fn partitions_default_to_one_and_are_validated() {
        assert_eq!(Config::default().partitions, 1);
        assert_eq!(valid_with("HONUA_PARTITIONS", "8").partitions, 8);
        for bad in [0, crate::partition::MAX_PARTITIONS + 1] {
            let c = Config {
                partitions: bad,
                ..Config::default()
            };
            assert_invalid(&c, "partitions");
        }
        assert!(Config::load(None, env(&[("HONUA_PARTITIONS", "many")])).is_err());
    }

    #[test]
    fn runtime_threads_default_to_one_per_cpu_and_are_validated() {
        assert_eq!(Config::default().runtime_threads, 0);
        assert_eq!(valid_with("HONUA_RUNTIME_THREADS", "1").runtime_threads, 1);
        let c = Config {
            runtime_threads: MAX_RUNTIME_THREADS + 1,
            ..Config::default()
        };
        assert_invalid(&c, "runtime_threads");
        assert!(Config::load(None, env(&[("HONUA_RUNTIME_THREADS", "-1")])).is_err());
    }

    #[test]
    fn cluster_nodes_come_from_the_env_and_exclude_a_redis_url() {
        let c = Config::load(
            None,
            env(&[(
                "HONUA_REDIS_CLUSTER_NODES",
                "redis://u:pw@10.0.0.1:7000, redis://10.0.0.2:7001,",
            )]),
        )
        .unwrap();
        assert_eq!(
            c.redis_cluster_nodes,
            ["redis://u:pw@10.0.0.1:7000", "redis://10.0.0.2:7001"]
        );
        c.validate().unwrap();
        assert_eq!(c.replicas_to_wait(), 1, "a cluster waits for one replica");
        assert_eq!(Config::default().replicas_to_wait(), 0);
        assert_eq!(
            c.redacted_redis_target(),
            "cluster redis://u:***@10.0.0.1:7000,redis://10.0.0.2:7001"
        );

        let both = Config::load(
            None,
            env(&[
                ("HONUA_REDIS_CLUSTER_NODES", "redis://10.0.0.1:7000"),
                ("HONUA_REDIS_URL", "redis://10.0.0.9:6379"),
            ]),
        )
        .unwrap();
        match both.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "redis_cluster_nodes");
                assert!(message.contains("not both"), "{message}");
            }
            other => panic!("both accepted: {other:?}"),
        }

        let bad = Config {
            redis_cluster_nodes: vec!["10.0.0.1:7000 pw=secret".into()],
            ..Config::default()
        };
        match bad.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "redis_cluster_nodes");
                assert!(!message.contains("secret"), "{message}");
            }
            other => panic!("bad node accepted: {other:?}"),
        }
    }

    #[test]
    fn session_secret_comes_from_file_or_env_is_redacted_and_has_a_minimum_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("honua.toml");
        let long = "0123456789abcdef0123456789abcdef";
        std::fs::write(&path, format!("[api]\nsession_secret = \"{long}\"\n")).unwrap();
        let c = Config::load(Some(&path), env(&[])).unwrap();
        c.validate().unwrap();
        assert_eq!(c.api.session_secret.as_ref().unwrap().expose(), long);
        // Never shown: not in Debug, nor in what the config endpoint serializes.
        assert!(!format!("{c:?}").contains(long));
        assert!(!serde_json::to_string(&c).unwrap().contains(long));
        // The environment beats the file.
        let env_secret = "fedcba9876543210fedcba9876543210-env";
        let c = Config::load(Some(&path), env(&[("HONUA_SESSION_SECRET", env_secret)])).unwrap();
        assert_eq!(c.api.session_secret.as_ref().unwrap().expose(), env_secret);
        // Too short: refused, naming the field, without the value.
        let c = Config::load(None, env(&[("HONUA_SESSION_SECRET", "short-secret")])).unwrap();
        match c.validate() {
            Err(ConfigError::Invalid { field, message }) => {
                assert_eq!(field, "api.session_secret");
                assert!(!message.contains("short-secret"), "{message}");
            }
            other => panic!("a short secret was accepted: {other:?}"),
        }
    }

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("honua.toml");
        std::fs::write(
            &path,
            "key_prefix = \"fromfile\"\n[worker]\nlease_ms = 9000\nmax_deliveries = 7\n",
        )
        .unwrap();
        let cfg = Config::load(
            Some(&path),
            env(&[("HONUA_LEASE_MS", "6000"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(cfg.key_prefix, "fromfile");
        assert_eq!(cfg.worker.lease_ms, 6000, "env beats file");
        assert_eq!(cfg.worker.max_deliveries, 7, "file beats default");
        assert_eq!(cfg.worker.sweep_ms, 2000, "default kept");
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_file_fields_and_bad_env_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "leese_ms = 1\n").unwrap();
        assert!(matches!(
            Config::load(Some(&path), env(&[])),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::load(None, env(&[("HONUA_LEASE_MS", "soon")])),
            Err(ConfigError::Env {
                var: "HONUA_LEASE_MS",
                ..
            })
        ));
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = Config::default();
        c.worker.lease_ms = 1000;
        c.worker.heartbeat_ms = Some(900);
        assert_invalid(&c, "worker.heartbeat_ms");
        let mut c = Config::default();
        c.state.max_depth = 1024;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.http_server.body_read_timeout_ms = 0;
        match c.validate() {
            Err(ConfigError::Invalid { field, .. }) => {
                assert_eq!(field, "http_server.body_read_timeout_ms")
            }
            other => panic!("{other:?}"),
        }
        let mut c = Config::default();
        c.http_server.max_connections = 0;
        assert!(c.validate().is_err());
        // A huge timeout would put the deadline past year 9999.
        for (minutes, ok) in [(10_080, true), (10_081, false), (u64::MAX / 60, false)] {
            let mut c = Config::default();
            c.process_framework.default_timeout_minutes = minutes;
            assert_eq!(c.validate().is_ok(), ok, "{minutes}");
            let mut c = Config::default();
            c.process_framework
                .process_timeouts
                .insert("X".into(), minutes);
            match c.validate() {
                Ok(()) => assert!(ok),
                Err(ConfigError::Invalid { field, .. }) => {
                    assert!(!ok);
                    assert_eq!(field, "process_framework.process_timeouts")
                }
                Err(e) => panic!("{e}"),
            }
        }
        let c = Config {
            http_addr: Some("nowhere".into()),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn an_open_api_listens_on_loopback_unless_told_otherwise() {
        let key = ApiKey {
            name: "ops".into(),
            role: Role::Admin,
            sha256: "a".repeat(64),
        };
        let mut c = Config::default();
        assert_eq!(c.listen_addr(), "127.0.0.1:9090", "no keys: loopback");
        c.api.keys = vec![key.clone()];
        assert_eq!(c.listen_addr(), "0.0.0.0:9090", "keys: every interface");
        // An explicit address (file or HONUA_HTTP_ADDR, as the k8s manifests set) wins.
        let env = [("HONUA_HTTP_ADDR".to_string(), "0.0.0.0:9191".to_string())];
        let c = Config::load(None, env).unwrap();
        assert!(c.api.keys.is_empty());
        assert_eq!(c.listen_addr(), "0.0.0.0:9191");
        c.validate().unwrap();
    }

    #[test]
    fn process_timeout_precedence() {
        let mut c = Config::default();
        assert_eq!(c.process_timeout("X", None), Duration::from_secs(3600));
        assert_eq!(
            c.process_timeout("X", Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        c.process_framework.process_timeouts.insert("X".into(), 2);
        assert_eq!(
            c.process_timeout("X", Some(Duration::from_secs(5))),
            Duration::from_secs(120)
        );
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://u:secret@h:1/0"), "redis://u:***@h:1");
        assert_eq!(redact_url("redis://u:secret@h:1/2"), "redis://u:***@h:1/2");
        assert_eq!(redact_url("redis://secret@h:1"), "redis://***@h:1");
        assert_eq!(redact_url("redis://:secret@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(
            redact_url("redis://u:secret@[::1]:6380"),
            "redis://u:***@[::1]:6380"
        );
        assert_eq!(redact_url("not a url secret"), "[unparsable redis url]");
    }

    #[test]
    fn redacts_the_password_of_a_unix_socket_url() {
        for (url, want) in [
            (
                "redis+unix:///run/redis.sock?pass=s3cret-pw",
                "redis+unix:///run/redis.sock?pass=***",
            ),
            (
                "redis+unix:///run/redis.sock?db=2&user=honua-worker&pass=s3cret-pw",
                "redis+unix:///run/redis.sock?db=2&user=honua-worker&pass=***",
            ),
            (
                "unix:///run/redis.sock?pass=s3cret-pw",
                "redis+unix:///run/redis.sock?pass=***",
            ),
            (
                "redis+unix:///run/redis.sock",
                "redis+unix:///run/redis.sock",
            ),
        ] {
            let c = Config {
                redis_url: url.into(),
                ..Config::default()
            };
            c.validate().unwrap();
            let shown = c.redacted_redis_url();
            assert_eq!(shown, want);
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    #[test]
    fn an_upper_case_api_key_hash_is_read_lower_case_and_rejected_when_built_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("honua.toml");
        let hash = "AB".repeat(32);
        std::fs::write(
            &path,
            format!(
                "[api]\nkeys = [{{ name = \"oncall\", role = \"operate\", sha256 = \"{hash}\" }}]\n"
            ),
        )
        .unwrap();
        let cfg = Config::load(Some(&path), env(&[])).unwrap();
        assert_eq!(cfg.api.keys[0].sha256, "ab".repeat(32));
        cfg.validate().unwrap();
        // Built as a value (not read from a file or env): refused, naming the field.
        let mut c = Config::default();
        c.api.keys.push(ApiKey {
            name: "oncall".into(),
            role: cfg.api.keys[0].role,
            sha256: hash,
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("api.keys") && e.contains("lower-case"), "{e}");
    }
}
