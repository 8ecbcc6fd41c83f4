//! Redis plumbing: connections, stream reads and typed calls of every script. The only
//! module that names Redis commands; binaries call these methods.
//!
//! Connections: one multiplexed [`Conn`] (auto-reconnecting; a standalone server or a Redis
//! Cluster, see [`conn`]) for short commands and scripts; every blocking reader gets its own
//! connection whose response timeout is longer than its `BLOCK` (redis-rs defaults to
//! 500 ms, and a blocking read on a shared multiplexed connection would delay every other
//! command on it).
//!
//! Partitions ([`crate::partition`]): a [`Store`] is the handle of one partition of the
//! deployment ([`Store::in_partition`], [`Store::of`] a process's, [`Store::all`]); the
//! calls named by a process id (loading records and data, events for it, purging it) go to
//! its partition whichever handle makes them, the rest work on the handle's partition.
//!
//! This module owns the [`Store`] handle, its errors, the fence answers and what both
//! services use: opening, readiness, groups, the library, group reads and `drop_entry.lua`.
//! The calls are split by who makes them, each an `impl Store` block of its own:
//! `store/worker.rs` (fenced job scripts), `store/scheduler.rs` (commits, submissions,
//! housekeeping), `store/inspect.rs` (operator and metrics reads), and beside them
//! [`crate::limiter`] and [`crate::llm_store`] (the `llm` step kind).

use crate::config::Config;
use crate::envelope::{FieldMap, JobEnvelope};
use crate::keys::{Key, Keys, SCHEDULER_GROUP, WORKERS_GROUP};
use crate::scripts::Scripts;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::{ErrorKind, RedisError, Value};
use std::time::Duration;
use tracing::warn;

pub mod conn;
mod inspect;
mod scheduler;
mod worker;

pub use conn::Conn;
pub use inspect::{
    HeldJob, RawProcess, References, StreamRefs, StreamStats, TypeCounts, WorkerInfo, WorkerMeta,
};
pub use scheduler::{Commit, DeleteGuard, Deleted, Removed};
pub use worker::{Begin, Completion, ConsumerInfo, Reclaimed};

/// What went wrong talking to Redis, typed by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The group is missing (data loss or a flushed server): recreate it and raise an alert.
    #[error("consumer group {group} on {stream} is missing")]
    NoGroup { stream: String, group: String },
    /// Connection refused/dropped, timeout, loading, failover, a slot being resharded
    /// (`MOVED`/`ASK` the cluster client did not follow, e.g. inside a pipeline; `TRYAGAIN`
    /// for a script whose keys are split between two nodes mid-migration): retry with
    /// backoff.
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] RedisError),
    /// The service's Redis user may not run a command (`NOPERM`): its ACL is older or
    /// narrower than this version needs. Not retried; the caller says which grant is missing.
    #[error("redis user lacks a permission: {0}")]
    NoPermission(#[source] RedisError),
    /// Anything else (a script error, a bad reply): a bug or corrupt data.
    #[error("redis error: {0}")]
    Redis(#[source] RedisError),
    /// This version's function library is not on the server (yet): a user that may not load
    /// it (a worker) waits for the scheduler, which loads it at start; a pipelined call
    /// ([`Store::commit_many`]) is retried one by one, which loads it. Retry with backoff.
    #[error("redis function library {library} is not loaded yet")]
    FunctionsNotLoaded { library: String },
    /// The deployment's keys are laid out in `stored` partitions, this service is
    /// configured with `configured`: a configuration error, retried (the service does not
    /// start) until fixed.
    #[error(
        "the deployment's keys are laid out in {stored} partitions but this service is configured with {configured} (partitions / HONUA_PARTITIONS must be the same for every service)"
    )]
    PartitionCount { stored: u16, configured: u16 },
    #[error("unexpected reply from {script}: {detail}")]
    Reply {
        script: &'static str,
        detail: String,
    },
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_)
                | StoreError::NoGroup { .. }
                | StoreError::FunctionsNotLoaded { .. }
        )
    }
}

impl StoreError {
    /// This error, as [`StoreError::NoGroup`] when it is Redis's `NOGROUP` reply (from a
    /// command or from inside a script) to a call on `group` of `stream`.
    fn for_group(self, stream: &Key, group: &str) -> Self {
        match self {
            StoreError::Redis(e) if e.code() == Some("NOGROUP") => StoreError::NoGroup {
                stream: stream.to_string(),
                group: group.to_string(),
            },
            other => other,
        }
    }
}

impl From<RedisError> for StoreError {
    fn from(e: RedisError) -> Self {
        let transient = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                ErrorKind::Server(
                    redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::Moved
                        | redis::ServerErrorKind::Ask
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::ReadOnly
                )
            )
            || matches!(e.code(), Some("BUSY") | Some("NOREPLICAS"));
        if transient {
            StoreError::Unavailable(e)
        } else if e.code() == Some("NOPERM") {
            StoreError::NoPermission(e)
        } else {
            StoreError::Redis(e)
        }
    }
}

impl From<redis::ParsingError> for StoreError {
    fn from(e: redis::ParsingError) -> Self {
        StoreError::Reply {
            script: "reply",
            detail: e.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

fn reply(script: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Reply {
        script,
        detail: detail.into(),
    }
}

/// One stream entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub fields: FieldMap,
}

/// A job this worker holds: the fence it must present on every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub entry_id: String,
    pub deliveries: u64,
    pub job: JobEnvelope,
}

/// The answer of an owner- and fence-checked call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    Ok,
    /// Someone else owns the job now: stop, never commit.
    Stale,
    /// The process is over (cancelled, failed, timed out, deleted): stop.
    Finished,
}

impl Fence {
    fn parse(script: &'static str, s: &str) -> Result<Self> {
        match s {
            "ok" => Ok(Fence::Ok),
            "stale" => Ok(Fence::Stale),
            "finished" => Ok(Fence::Finished),
            other => Err(reply(script, format!("status {other:?}"))),
        }
    }
}

/// The Redis server's identity and clock, as [`Store::server_info`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub run_id: String,
    /// Whole seconds, as `INFO` reports them (so a start time derived from it is late by
    /// under a second: holding off from it errs on the safe side).
    pub uptime_ms: u64,
    pub now_ms: u64,
}

/// A handle on one deployment's Redis data, and on one of its partitions: [`Store::keys`]
/// are that partition's (a handle opened on a deployment starts on partition 0), and the
/// calls that name no process (stream reads, sweeps, indexes) work on it. Every handle
/// knows the deployment's partition count: [`Store::of`] gives the handle of the partition
/// a process lives in, [`Store::all`] one per partition; all of them share the client and
/// the multiplexed connection (on a cluster, keyless commands go to the primary of the
/// handle's partition).
#[derive(Clone)]
pub struct Store {
    keys: Keys,
    partitions: u16,
    client: Client,
    conn: Conn,
}

/// What [`Store::blocking`] opens its connections with.
#[derive(Clone)]
enum Client {
    Standalone(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// Which service [`Store::wait_ready`] waits for: what it needs of Redis before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Every consumer group ([`Store::ensure_groups`]) and the function library (loaded when
    /// missing).
    Scheduler,
    /// The workers' group on the job stream ([`Store::ensure_job_group`]: a worker's Redis
    /// user reaches no other stream) and the function library (loaded by the scheduler).
    Worker,
}

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
}

/// A new cluster connection (its own connection to each node) with this response timeout,
/// routing keyless commands to the primary of `keys`' slot; connects on first use.
fn cluster_conn(client: &ClusterClient, keys: &Keys, response_timeout: Duration) -> Conn {
    let config = ClusterConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(response_timeout);
    Conn::cluster(
        client.get_pending_async_connection_with_config(config),
        keys.submit().as_str().as_bytes(),
    )
}

impl Store {
    /// Connects lazily: a Redis that is down at start is not an error here; calls fail with
    /// [`StoreError::Unavailable`] until it is back.
    pub fn open(url: &str, keys: Keys) -> Result<Self> {
        let client = redis::Client::open(url).map_err(StoreError::Redis)?;
        let conn = ConnectionManager::new_lazy_with_config(
            client.clone(),
            manager_config(Duration::from_secs(5)),
        )?;
        Ok(Self {
            keys,
            partitions: 1,
            client: Client::Standalone(client),
            conn: Conn::Standalone(conn),
        })
    }

    /// Opens the store on a Redis Cluster reached through any of the `nodes` (seed URLs, all
    /// with the same user and password, used for every node). Connects lazily, like
    /// [`Store::open`]; the slot map is read on the first call and again after a
    /// redirection or a lost node.
    pub fn open_cluster(nodes: &[String], keys: Keys) -> Result<Self> {
        let (min_wait, max_wait) = conn::CLUSTER_RETRY_WAIT_MS;
        let client = ClusterClient::builder(nodes.iter().map(String::as_str))
            .retries(conn::CLUSTER_RETRIES)
            .min_retry_wait(min_wait)
            .max_retry_wait(max_wait)
            .build()
            .map_err(StoreError::Redis)?;
        Ok(Self {
            conn: cluster_conn(&client, &keys, Duration::from_secs(5)),
            keys,
            partitions: 1,
            client: Client::Cluster(Box::new(client)),
        })
    }

    /// Opens the store of `cfg`'s deployment (its `redis_cluster_nodes`, else its
    /// `redis_url`, its `key_prefix` and its `partitions`), as every service and tool does.
    pub fn from_config(cfg: &Config) -> Result<Self> {
        let keys = Keys::new(&cfg.key_prefix, 0);
        let store = if cfg.redis_cluster_nodes.is_empty() {
            Self::open(&cfg.redis_url, keys)
        } else {
            Self::open_cluster(&cfg.redis_cluster_nodes, keys)
        }?;
        Ok(store.with_partitions(cfg.partitions))
    }

    /// The same store on a deployment of `partitions` partitions (at least 1).
    pub fn with_partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions.max(1);
        self
    }

    /// This handle's partition's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether this is a Redis Cluster (partitions may live on different servers).
    pub fn is_cluster(&self) -> bool {
        matches!(self.client, Client::Cluster(_))
    }

    /// How many partitions the deployment has.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// This handle's partition.
    pub fn partition(&self) -> u16 {
        self.keys.shard()
    }

    /// The handle of partition `p` (same connections).
    pub fn in_partition(&self, p: u16) -> Store {
        if p == self.keys.shard() {
            return self.clone();
        }
        let keys = self.keys.in_shard(p);
        Store {
            conn: self.conn.rehome(keys.submit().as_str().as_bytes()),
            keys,
            partitions: self.partitions,
            client: self.client.clone(),
        }
    }

    /// The partition process `id` lives in.
    pub fn partition_of(&self, id: &str) -> u16 {
        crate::partition::partition_of(id, self.partitions)
    }

    /// The handle of the partition process `id` lives in.
    pub fn of(&self, id: &str) -> Store {
        self.in_partition(self.partition_of(id))
    }

    /// One handle per partition, in order.
    pub fn all(&self) -> Vec<Store> {
        (0..self.partitions).map(|p| self.in_partition(p)).collect()
    }

    /// The keys of the partition process `id` lives in.
    pub fn keys_of(&self, id: &str) -> Keys {
        match self.partition_of(id) {
            p if p == self.keys.shard() => self.keys.clone(),
            p => self.keys.in_shard(p),
        }
    }

    /// `items` grouped by the partition of the process each names (`id`), each group with
    /// its partition's handle, in partition order (one group with one partition), so a
    /// call or pipeline per group stays in one slot.
    pub fn group_by_partition<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        id: impl Fn(&T) -> &str,
    ) -> Vec<(Store, Vec<T>)> {
        let mut groups: std::collections::BTreeMap<u16, Vec<T>> = Default::default();
        for item in items {
            groups
                .entry(self.partition_of(id(&item)))
                .or_default()
                .push(item);
        }
        groups
            .into_iter()
            .map(|(p, items)| (self.in_partition(p), items))
            .collect()
    }

    /// The positions of `ids` grouped by the partition each lives in
    /// ([`Store::group_by_partition`]).
    fn by_partition(&self, ids: &[&str]) -> Vec<(Store, Vec<usize>)> {
        self.group_by_partition(ids.iter().copied().enumerate(), |(_, id)| id)
            .into_iter()
            .map(|(store, at)| (store, at.into_iter().map(|(i, _)| i).collect()))
            .collect()
    }

    /// A multiplexed connection handle for ad-hoc reads (cheap to clone).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// A dedicated connection for blocking reads of up to `block`.
    pub fn blocking(&self, block: Duration) -> Result<Conn> {
        self.own_conn(block + Duration::from_secs(5))
    }

    /// A new connection (to each node, on a cluster) with this response timeout.
    fn own_conn(&self, response_timeout: Duration) -> Result<Conn> {
        Ok(match &self.client {
            Client::Standalone(c) => Conn::Standalone(ConnectionManager::new_lazy_with_config(
                c.clone(),
                manager_config(response_timeout),
            )?),
            Client::Cluster(c) => cluster_conn(c, &self.keys, response_timeout),
        })
    }

    /// The same store on a connection of its own (to each node, on a cluster) with this
    /// response timeout: for calls that block the connection they are sent on (`WAIT`), so
    /// that they hold up no other traffic. Connects on first use.
    pub fn with_own_connection(&self, response_timeout: Duration) -> Result<Self> {
        Ok(Self {
            conn: self.own_conn(response_timeout)?,
            keys: self.keys.clone(),
            partitions: self.partitions,
            client: self.client.clone(),
        })
    }

    pub async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Server time in ms: the only clock decisions use.
    pub async fn server_time_ms(&self) -> Result<u64> {
        let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        Ok(s * 1000 + us / 1000)
    }

    /// The server's run id, uptime and time (`INFO server` and `TIME` in one round trip):
    /// a new run id or a short uptime means a restart or a failover.
    pub async fn server_info(&self) -> Result<ServerInfo> {
        let (info, (s, us)): (String, (u64, u64)) = redis::pipe()
            .cmd("INFO")
            .arg("server")
            .cmd("TIME")
            .query_async(&mut self.conn())
            .await?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let run_id = field("run_id")
            .ok_or_else(|| reply("info", "no run_id"))?
            .to_string();
        let uptime_s: u64 = field("uptime_in_seconds")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| reply("info", "no uptime_in_seconds"))?;
        Ok(ServerInfo {
            run_id,
            uptime_ms: uptime_s * 1000,
            now_ms: s * 1000 + us / 1000,
        })
    }

    /// Makes sure this version's function library is on the server, loading it when missing
    /// (a user refused `FUNCTION LOAD`, i.e. a worker, gets the retryable
    /// [`StoreError::FunctionsNotLoaded`] until the scheduler has loaded it).
    pub async fn load_scripts(&self) -> Result<()> {
        crate::scripts::Library::get()
            .ensure(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Creates the consumer groups if missing (idempotent). Returns how many were created.
    pub async fn ensure_groups(&self) -> Result<usize> {
        let mut created = 0;
        for (stream, group) in [
            (self.keys.jobs(), WORKERS_GROUP),
            (self.keys.submit(), SCHEDULER_GROUP),
            (self.keys.events(), SCHEDULER_GROUP),
            (self.keys.results(), SCHEDULER_GROUP),
        ] {
            if self.ensure_group(&stream, group).await? {
                created += 1;
            }
        }
        Ok(created)
    }

    /// Creates the workers' group on the job stream if missing (a worker's Redis user reaches
    /// no other stream). Returns true when it was missing.
    pub async fn ensure_job_group(&self) -> Result<bool> {
        self.ensure_group(&self.keys.jobs(), WORKERS_GROUP).await
    }

    /// `XGROUP CREATE … 0 MKSTREAM`: a recreated group re-reads whatever the stream still
    /// holds, so nothing still in it is skipped. Returns true when it was missing.
    pub async fn ensure_group(&self, stream: &Key, group: &str) -> Result<bool> {
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until Redis answers and holds what `service` needs before it starts: its
    /// consumer groups and this version's function library. Each failure is logged ("redis
    /// not ready; retrying") and retried after a jittered delay, 100 ms doubling up to 5 s.
    /// Returns true when ready, false when `stop` completed first.
    pub async fn wait_ready(&self, service: Service, stop: impl Future<Output = ()>) -> bool {
        tokio::pin!(stop);
        let mut delay = Duration::from_millis(100);
        loop {
            let ready = async {
                for part in self.all() {
                    match service {
                        Service::Scheduler => {
                            part.ensure_groups().await?;
                            if part.partition() == 0 {
                                part.check_partition_count().await?;
                            }
                        }
                        Service::Worker => {
                            part.ensure_job_group().await?;
                        }
                    }
                }
                self.load_scripts().await
            };
            match ready.await {
                Ok(()) => return true,
                Err(e) => {
                    warn!(error = %e, "redis not ready; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(crate::jitter(delay)) => {}
                        _ = &mut stop => return false,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Records the deployment's partition count in partition 0 when none is recorded yet
    /// (`SET NX`), and fails with [`StoreError::PartitionCount`] when another is.
    pub async fn check_partition_count(&self) -> Result<()> {
        let key = self.keys.in_shard(0).partition_count();
        let (stored,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(self.partitions)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&key)
            .query_async(&mut self.conn())
            .await?;
        match stored.and_then(|s| s.parse::<u16>().ok()) {
            Some(n) if n != self.partitions => Err(StoreError::PartitionCount {
                stored: n,
                configured: self.partitions,
            }),
            _ => Ok(()),
        }
    }

    /// `XREADGROUP … >` on a dedicated blocking connection; a `block` of zero reads without
    /// blocking (what is there now, or nothing).
    pub async fn read_group(
        &self,
        conn: &mut Conn,
        stream: &Key,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        let r: redis::RedisResult<Value> = cmd
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(conn)
            .await;
        match r {
            // `[[stream, entries]]` (RESP2) or `{stream: entries}` (RESP3); nil on timeout.
            Ok(Value::Array(streams)) => Ok(streams
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => kv.pop(),
                    _ => None,
                })
                .flat_map(parse_entries)
                .collect()),
            Ok(Value::Map(streams)) => Ok(streams
                .into_iter()
                .flat_map(|(_, v)| parse_entries(v))
                .collect()),
            Ok(_) => Ok(vec![]),
            Err(e) => Err(StoreError::from(e).for_group(stream, group)),
        }
    }

    /// Runs `drop_entry.lua`: set an unprocessable entry aside (with `reason`) and ack it.
    pub async fn drop_entry(
        &self,
        stream: &Key,
        group: &str,
        id: &str,
        reason: &str,
        owner: Option<&str>,
    ) -> Result<Fence> {
        let r: String = Scripts::get()
            .drop_entry
            .key(stream)
            .key(self.keys.quarantine())
            .arg(group)
            .arg(id)
            .arg(reason)
            .arg(owner.unwrap_or(""))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| e.for_group(stream, group))?;
        Fence::parse("drop_entry", &r)
    }
}

/// The entries of a raw stream reply (`[[id, [field, value, …]], …]`).
fn parse_entries(v: Value) -> Vec<Entry> {
    match v {
        Value::Array(entries) => entries.into_iter().filter_map(parse_entry).collect(),
        _ => vec![],
    }
}

/// One raw stream entry `[id, [field, value, …]]`, reading at most
/// [`crate::envelope::MAX_ENTRY_FIELDS`] of its fields (see [`FieldMap::from_flat`]).
/// `None` for an entry that no longer exists (a nil field list) or a malformed one.
fn parse_entry(v: Value) -> Option<Entry> {
    let Value::Array(mut pair) = v else {
        return None;
    };
    if pair.len() != 2 {
        return None;
    }
    let fields = pair.pop()?;
    if matches!(fields, Value::Nil) {
        return None;
    }
    let id = redis::from_redis_value(pair.pop()?).ok()?;
    Some(Entry {
        id,
        fields: flat_fields(&fields),
    })
}

/// An entry's flat field list (an array in RESP2 and RESP3 alike).
fn flat_fields(v: &Value) -> FieldMap {
    match v {
        Value::Array(flat) => FieldMap::from_flat(flat),
        _ => FieldMap::default(),
    }
}

fn value_str(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        _ => String::new(),
    }
}

fn value_u64(v: &Value) -> u64 {
    match v {
        Value::Int(i) => (*i).max(0) as u64,
        other => value_str(other).parse().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a server reply `-<line>` becomes.
    fn server_error(line: &str) -> StoreError {
        let v = redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).unwrap();
        v.extract_error().unwrap_err().into()
    }

    #[test]
    fn cluster_redirections_and_migrations_are_retried() {
        for line in [
            "MOVED 3999 127.0.0.1:7002",
            "ASK 3999 127.0.0.1:7002",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "CLUSTERDOWN The cluster is down",
            "MASTERDOWN Link with MASTER is down",
            "READONLY You can't write against a read only replica.",
            "LOADING Redis is loading the dataset in memory",
            "BUSY Redis is busy running a script",
            "NOREPLICAS Not enough good replicas to write.",
        ] {
            let e = server_error(line);
            assert!(
                matches!(e, StoreError::Unavailable(_)) && e.is_retryable(),
                "{line}: {e:?}"
            );
        }
    }

    #[test]
    fn script_errors_and_permissions_are_not_retried() {
        for (line, want_perm) in [
            ("ERR user_script:1: bad argument", false),
            (
                "CROSSSLOT Keys in request don't hash to the same slot",
                false,
            ),
            (
                "NOPERM this user has no permissions to run the 'fcall' command",
                true,
            ),
        ] {
            let e = server_error(line);
            assert!(!e.is_retryable(), "{line}: {e:?}");
            assert_eq!(
                matches!(e, StoreError::NoPermission(_)),
                want_perm,
                "{line}"
            );
        }
    }
}
