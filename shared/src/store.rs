//! Redis plumbing: connections, stream reads and typed calls of every script. The only
//! module that names Redis commands; binaries call these methods.
//!
//! Connections: one multiplexed [`ConnectionManager`] (auto-reconnecting) for short commands
//! and scripts; every blocking reader gets its own connection whose response timeout is
//! longer than its `BLOCK` (redis-rs defaults to 500 ms, and a blocking read on a shared
//! multiplexed connection would delay every other command on it).

use crate::envelope::{Event, FieldMap, Fields, JobEnvelope};
use crate::keys::{Key, Keys, SCHEDULER_GROUP, WORKERS_GROUP};
use crate::scripts::Scripts;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Value};
use std::collections::HashMap;
use std::time::Duration;

/// What went wrong talking to Redis, typed by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The group is missing (data loss or a flushed server): recreate it and raise an alert.
    #[error("consumer group {group} on {stream} is missing")]
    NoGroup { stream: String, group: String },
    /// Connection refused/dropped, timeout, loading, failover: retry with backoff.
    #[error("redis unavailable: {0}")]
    Unavailable(#[source] RedisError),
    /// Anything else (a script error, a bad reply): a bug or corrupt data.
    #[error("redis error: {0}")]
    Redis(#[source] RedisError),
    /// This version's function library is not on the server and this user may not load it
    /// (the scheduler loads it at start): retry with backoff.
    #[error("redis function library {library} is not loaded yet")]
    FunctionsNotLoaded { library: String },
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
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::ReadOnly
                )
            )
            || matches!(e.code(), Some("BUSY") | Some("NOREPLICAS"));
        if transient {
            StoreError::Unavailable(e)
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

/// The answer of `begin.lua` for one job.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Begin {
    Ok {
        deliveries: u64,
        process_type: String,
        version: u32,
        step: crate::record::StepRecord,
        data: HashMap<String, Vec<u8>>,
    },
    /// No longer ours (reclaimed meanwhile).
    Lost,
    /// Superseded or the process is over; acknowledged and dropped.
    Obsolete(String),
}

/// One step result to commit with [`Store::complete_many`].
#[derive(Debug, Clone, Copy)]
pub struct Completion<'a> {
    pub held: &'a Held,
    /// The encoded output (`None`: the step wrote none).
    pub output: Option<&'a [u8]>,
    pub result: &'a crate::envelope::StepResult,
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

/// The answer of `reclaim.lua`.
#[derive(Debug, Clone, Default)]
pub struct Reclaimed {
    pub next_cursor: String,
    pub claimed: Vec<(Entry, u64)>,
    /// Pending ids whose entries no longer exist (deleted/trimmed): their payload is lost.
    pub deleted: u64,
    pub dead_lettered: Vec<String>,
}

/// The answer of `commit.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    Ok { now_ms: u64 },
    Conflict,
    Gone,
    Exists,
    Duplicate(String),
}

/// Information about one consumer of a group.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

/// Depth of one stream and its consumer group.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamStats {
    pub stream: String,
    pub group: String,
    /// The stream or its group does not exist (yet).
    pub missing: bool,
    /// Live entries: pending plus not yet delivered. Acknowledged entries awaiting
    /// `trim.lua` are not counted (raw `XLEN` when Redis cannot tell the lag).
    pub length: u64,
    /// Entries not yet delivered to the group (`None` when Redis cannot tell).
    pub lag: Option<u64>,
    /// Delivered, not yet acknowledged.
    pub pending: u64,
    /// Enqueue time (ms) of the oldest pending entry.
    pub oldest_pending_ms: Option<u64>,
    pub consumers: u64,
}

/// A job a worker holds.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldJob {
    pub entry_id: String,
    pub process_id: String,
    pub step: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

/// A worker seen by heartbeat.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    pub id: String,
    pub last_seen_ms: u64,
    pub jobs: Vec<HeldJob>,
}

/// A handle on one deployment's Redis data.
#[derive(Clone)]
pub struct Store {
    keys: Keys,
    client: redis::Client,
    conn: ConnectionManager,
}

fn manager_config(response_timeout: Duration) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2))
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
        Ok(Self { keys, client, conn })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A multiplexed connection handle for ad-hoc reads (cheap to clone).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// A dedicated connection for blocking reads of up to `block`.
    pub fn blocking(&self, block: Duration) -> Result<ConnectionManager> {
        Ok(ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            manager_config(block + Duration::from_secs(5)),
        )?)
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

    /// `XREADGROUP … >` on a dedicated blocking connection.
    pub async fn read_group(
        &self,
        conn: &mut ConnectionManager,
        stream: &Key,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>> {
        let r: redis::RedisResult<Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
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
            Err(e) if e.code() == Some("NOGROUP") => Err(StoreError::NoGroup {
                stream: stream.to_string(),
                group: group.to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends a submission (what any Redis client may do instead).
    pub async fn submit(&self, fields: &Fields) -> Result<String> {
        self.xadd(&self.keys.submit(), fields).await
    }

    /// Appends an event for the scheduler (signals from the gateway).
    pub async fn send_event(&self, event: &Event) -> Result<String> {
        self.xadd(&self.keys.events(), &event.to_fields()).await
    }

    async fn xadd(&self, stream: &Key, fields: &Fields) -> Result<String> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        Ok(cmd.query_async(&mut self.conn()).await?)
    }

    /// The meta and steps hashes of a process (empty when it does not exist).
    pub async fn load_process(
        &self,
        id: &str,
    ) -> Result<(HashMap<String, String>, HashMap<String, String>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(self.keys.process(id))
            .cmd("HGETALL")
            .arg(self.keys.steps(id));
        Ok(pipe.query_async(&mut self.conn()).await?)
    }

    /// Records of many processes in one round trip, with the server time.
    #[allow(clippy::type_complexity)]
    pub async fn load_processes(
        &self,
        ids: &[&str],
    ) -> Result<(u64, Vec<(HashMap<String, String>, HashMap<String, String>)>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for id in ids {
            pipe.cmd("HGETALL")
                .arg(self.keys.process(id))
                .cmd("HGETALL")
                .arg(self.keys.steps(id));
        }
        let mut vals: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
        let rest = vals.split_off(1);
        let (s, us): (u64, u64) = redis::from_redis_value(vals.remove(0))?;
        let mut out = Vec::with_capacity(ids.len());
        let mut it = rest.into_iter();
        while let (Some(m), Some(st)) = (it.next(), it.next()) {
            out.push((redis::from_redis_value(m)?, redis::from_redis_value(st)?));
        }
        Ok((s * 1000 + us / 1000, out))
    }

    /// The data hash of a process (input, outputs, checkpoints).
    pub async fn load_data(&self, id: &str) -> Result<HashMap<String, Vec<u8>>> {
        Ok(redis::cmd("HGETALL")
            .arg(self.keys.data(id))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Runs `commit.lua`.
    pub async fn commit(&self, call: &crate::engine::CommitCall) -> Result<Commit> {
        let mut inv = Scripts::get().commit.prepare_invoke();
        for k in &call.keys {
            inv.key(k);
        }
        for a in &call.args {
            inv.arg(a.as_slice());
        }
        let r: Vec<Value> = inv.invoke_async(&mut self.conn()).await?;
        parse_commit(r)
    }

    /// Runs `commit.lua` for several transitions in one round trip (one pipeline of
    /// `FCALL`s; each call is still its own atomic, revision-checked function). One answer
    /// per call, in order. The pipeline does not load the library: when it is missing every
    /// answer is an error ([`Store::commit`] loads it and retries).
    pub async fn commit_many(
        &self,
        calls: &[&crate::engine::CommitCall],
    ) -> Result<Vec<Result<Commit>>> {
        if calls.is_empty() {
            return Ok(vec![]);
        }
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for call in calls {
            let mut inv = Scripts::get().commit.prepare_invoke();
            for k in &call.keys {
                inv.key(k);
            }
            for a in &call.args {
                inv.arg(a.as_slice());
            }
            pipe.add_command(inv.cmd());
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
        if replies.len() != calls.len() {
            return Err(reply(
                "commit",
                format!("{} answers to {} calls", replies.len(), calls.len()),
            ));
        }
        Ok(replies
            .into_iter()
            .map(|v| match v {
                Value::ServerError(e) => Err(StoreError::from(RedisError::from(e))),
                Value::Array(r) => parse_commit(r),
                other => Err(reply("commit", format!("reply {other:?}"))),
            })
            .collect())
    }

    /// Runs `begin.lua` for a batch of jobs this consumer just read or reclaimed, each as
    /// (entry id, delivery count the starter saw, job): 1 for a fresh XREADGROUP, the
    /// XAUTOCLAIM count for a reclaim. A job begins only while the PEL still holds exactly
    /// that claim for this consumer ([`Begin::Lost`] otherwise), so one claim starts at most
    /// one execution. `attempt_traces[i]` is the `traceparent` of job i's `step.execute`
    /// span (`None` or missing: not traced); it is kept in the step record for the next
    /// attempt to link to.
    pub async fn begin(
        &self,
        consumer: &str,
        jobs: &[(String, u64, JobEnvelope)],
        attempt_traces: &[Option<String>],
    ) -> Result<Vec<Begin>> {
        if jobs.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = Scripts::get().begin.prepare_invoke();
        inv.key(self.keys.jobs());
        inv.arg(WORKERS_GROUP).arg(consumer);
        for (i, (id, seen, job)) in jobs.iter().enumerate() {
            for k in self.keys.process_keys(&job.process_id) {
                inv.key(k);
            }
            let trace = attempt_traces.get(i).cloned().flatten().unwrap_or_default();
            inv.arg(id)
                .arg(&job.step)
                .arg(&job.token)
                .arg(trace)
                .arg(*seen);
        }
        let replies: Vec<Vec<Value>> = inv.invoke_async(&mut self.conn()).await?;
        replies
            .into_iter()
            .map(|r| {
                let mut it = r.into_iter();
                let tag = it.next().map(|v| value_str(&v)).unwrap_or_default();
                match tag.as_str() {
                    "lost" => Ok(Begin::Lost),
                    "obsolete" => Ok(Begin::Obsolete(
                        it.next().map(|v| value_str(&v)).unwrap_or_default(),
                    )),
                    "ok" => {
                        let deliveries: u64 = redis::from_redis_value(
                            it.next().ok_or_else(|| reply("begin", "short reply"))?,
                        )?;
                        let process_type = it.next().map(|v| value_str(&v)).unwrap_or_default();
                        let version = value_str(&it.next().unwrap_or(Value::Nil))
                            .parse()
                            .unwrap_or(0);
                        let raw = value_str(&it.next().unwrap_or(Value::Nil));
                        let step = serde_json::from_str(&raw)
                            .map_err(|e| reply("begin", format!("step record: {e}")))?;
                        let data: HashMap<String, Vec<u8>> =
                            redis::from_redis_value(it.next().unwrap_or(Value::Nil))?;
                        Ok(Begin::Ok {
                            deliveries,
                            process_type,
                            version,
                            step,
                            data,
                        })
                    }
                    other => Err(reply("begin", format!("status {other:?}"))),
                }
            })
            .collect()
    }

    /// Runs `heartbeat.lua` for every held job; one answer per job.
    pub async fn heartbeat(&self, consumer: &str, held: &[Held]) -> Result<Vec<Fence>> {
        let mut inv = Scripts::get().heartbeat.prepare_invoke();
        inv.key(self.keys.jobs()).key(self.keys.workers());
        inv.arg(WORKERS_GROUP).arg(consumer);
        for h in held {
            inv.key(self.keys.process(&h.job.process_id))
                .key(self.keys.steps(&h.job.process_id));
            inv.arg(&h.entry_id)
                .arg(h.deliveries)
                .arg(&h.job.step)
                .arg(&h.job.token);
        }
        let r: Vec<String> = inv.invoke_async(&mut self.conn()).await?;
        r.iter().map(|s| Fence::parse("heartbeat", s)).collect()
    }

    /// Runs `checkpoint.lua`.
    pub async fn checkpoint(&self, consumer: &str, held: &Held, blob: &[u8]) -> Result<Fence> {
        let [meta, steps, data] = self.keys.process_keys(&held.job.process_id);
        let r: String = Scripts::get()
            .checkpoint
            .key(self.keys.jobs())
            .key(meta)
            .key(steps)
            .key(data)
            .arg(WORKERS_GROUP)
            .arg(consumer)
            .arg(&held.entry_id)
            .arg(held.deliveries)
            .arg(&held.job.step)
            .arg(&held.job.token)
            .arg(blob)
            .invoke_async(&mut self.conn())
            .await?;
        Fence::parse("checkpoint", &r)
    }

    /// Runs `complete.lua` for one step: output, completion event and ack in one step.
    pub async fn complete(
        &self,
        consumer: &str,
        held: &Held,
        output: Option<&[u8]>,
        result: &crate::envelope::StepResult,
    ) -> Result<Fence> {
        let one = [Completion {
            held,
            output,
            result,
        }];
        let mut r = self.complete_many(consumer, &one).await?;
        r.pop().ok_or_else(|| reply("complete", "no answer"))
    }

    /// Runs `complete.lua` for a batch of steps in one call: each step is fenced and
    /// committed on its own (output, completion event, ack); one answer per step, in order.
    pub async fn complete_many(
        &self,
        consumer: &str,
        items: &[Completion<'_>],
    ) -> Result<Vec<Fence>> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = Scripts::get().complete.prepare_invoke();
        inv.key(self.keys.jobs())
            .key(self.keys.results())
            .arg(WORKERS_GROUP)
            .arg(consumer);
        for c in items {
            let job = &c.held.job;
            for k in self.keys.process_keys(&job.process_id) {
                inv.key(k);
            }
            let event = Event::Step {
                process_id: job.process_id.clone(),
                step: job.step.clone(),
                token: job.token.clone(),
                result: c.result.clone(),
            };
            let fields = event.to_fields();
            inv.arg(&c.held.entry_id)
                .arg(c.held.deliveries)
                .arg(&job.step)
                .arg(&job.token)
                .arg(c.output.unwrap_or(b""))
                .arg(fields.len());
            for (k, v) in fields {
                inv.arg(k).arg(v);
            }
        }
        let r: Vec<String> = inv.invoke_async(&mut self.conn()).await?;
        if r.len() != items.len() {
            return Err(reply(
                "complete",
                format!("{} answers for {} steps", r.len(), items.len()),
            ));
        }
        r.iter().map(|s| Fence::parse("complete", s)).collect()
    }

    /// Runs `release.lua`: hands a held job back for another worker at once.
    pub async fn release(&self, consumer: &str, held: &Held) -> Result<Fence> {
        let mut inv = Scripts::get().release.prepare_invoke();
        inv.key(self.keys.jobs())
            .key(self.keys.process(&held.job.process_id))
            .key(self.keys.steps(&held.job.process_id))
            .arg(WORKERS_GROUP)
            .arg(consumer)
            .arg(&held.entry_id)
            .arg(held.deliveries)
            .arg(&held.job.step)
            .arg(&held.job.token);
        for (k, v) in held.job.to_fields() {
            inv.arg(k).arg(v);
        }
        let r: String = inv.invoke_async(&mut self.conn()).await?;
        Fence::parse("release", &r)
    }

    /// Runs one `reclaim.lua` call (one cursor step) on the job stream.
    pub async fn reclaim(
        &self,
        consumer: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
        max_deliveries: u64,
    ) -> Result<Reclaimed> {
        type ClaimedRaw = Vec<(String, u64, Value)>;
        let r: (String, ClaimedRaw, u64, Vec<String>) = Scripts::get()
            .reclaim
            .key(self.keys.jobs())
            .key(self.keys.dlq())
            .key(self.keys.results())
            .arg(WORKERS_GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
            .arg(count.max(1))
            .arg(max_deliveries)
            .arg(100_000)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(Reclaimed {
            next_cursor: r.0,
            claimed: r
                .1
                .into_iter()
                .map(|(id, n, fields)| {
                    (
                        Entry {
                            id,
                            fields: flat_fields(&fields),
                        },
                        n,
                    )
                })
                .collect(),
            deleted: r.2,
            dead_lettered: r.3,
        })
    }

    /// Runs `promote.lua`: moves due delayed entries. Returns (moved, next due ms, now ms).
    pub async fn promote(&self, limit: usize) -> Result<(u64, Option<u64>, u64)> {
        let r: (u64, Option<String>, u64) = Scripts::get()
            .promote
            .key(self.keys.delayed())
            .key(self.keys.jobs())
            .key(self.keys.events())
            .arg(limit.max(1))
            .invoke_async(&mut self.conn())
            .await?;
        Ok((
            r.0,
            r.1.and_then(|s| s.parse::<f64>().ok()).map(|f| f as u64),
            r.2,
        ))
    }

    /// Scheduler side: takes over events or submissions another scheduler left pending.
    /// These are not fenced steps (commits are revision-checked), so a plain XAUTOCLAIM is
    /// enough. Returns the entries and the next cursor.
    pub async fn autoclaim(
        &self,
        stream: &Key,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        cursor: &str,
        count: usize,
    ) -> Result<(String, Vec<Entry>)> {
        let r: (String, Vec<Value>, Value) = redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.conn())
            .await?;
        Ok((r.0, r.1.into_iter().filter_map(parse_entry).collect()))
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
            .await?;
        Fence::parse("drop_entry", &r)
    }

    /// Consumers of the job group with their pending counts and idle times.
    pub async fn job_consumers(&self) -> Result<Vec<ConsumerInfo>> {
        let infos: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.keys.jobs())
            .arg(WORKERS_GROUP)
            .query_async(&mut self.conn())
            .await?;
        Ok(infos
            .into_iter()
            .map(|m| ConsumerInfo {
                name: m.get("name").map(value_str).unwrap_or_default(),
                pending: m.get("pending").map(value_u64).unwrap_or(0),
                idle_ms: m.get("idle").map(value_u64).unwrap_or(0),
            })
            .collect())
    }

    /// Runs `retire_consumer.lua`: deletes the consumer (and its entry in the workers
    /// registry) only if it owns nothing. A worker leaving retires itself with this.
    pub async fn retire_consumer(&self, consumer: &str) -> Result<bool> {
        self.retire_idle_consumer(consumer, Duration::ZERO).await
    }

    /// Runs `retire_consumer.lua` for another worker's consumer: deleted only if it owns
    /// nothing and its worker has not heartbeated for `min_idle` (Redis's clock).
    pub async fn retire_idle_consumer(&self, consumer: &str, min_idle: Duration) -> Result<bool> {
        let r: i64 = Scripts::get()
            .retire_consumer
            .key(self.keys.jobs())
            .key(self.keys.workers())
            .arg(WORKERS_GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(r == 1)
    }

    /// Runs `purge.lua` for each id: deletes those still in the finished `status`.
    pub async fn purge(&self, status: crate::status::ProcessStatus, ids: &[String]) -> Result<u64> {
        let mut n = 0;
        for id in ids {
            let [meta, steps, data] = self.keys.process_keys(id);
            let r: u64 = Scripts::get()
                .purge
                .key(meta)
                .key(steps)
                .key(data)
                .key(self.keys.index_status(status))
                .key(self.keys.index_all())
                .arg(status.as_str())
                .arg(id)
                .invoke_async(&mut self.conn())
                .await?;
            n += r;
        }
        Ok(n)
    }

    /// Whether the server has `WAITAOF` (Redis/Valkey ≥ 7.2) and AOF is on.
    pub async fn supports_waitaof(&self) -> Result<bool> {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut self.conn())
            .await?;
        let aof_on = info.lines().any(|l| l.trim() == "aof_enabled:1");
        let cmd: Value = redis::cmd("COMMAND")
            .arg("INFO")
            .arg("WAITAOF")
            .query_async(&mut self.conn())
            .await?;
        let has = matches!(&cmd, Value::Array(v) if v.iter().any(|x| !matches!(x, Value::Nil)));
        Ok(aof_on && has)
    }

    /// `WAITAOF 1 0 timeout`: the local AOF has fsynced every write made so far on this
    /// connection. Returns false when it timed out.
    pub async fn wait_aof(&self, timeout: Duration) -> Result<bool> {
        let (local, _): (u64, u64) = redis::cmd("WAITAOF")
            .arg(1)
            .arg(0)
            .arg(timeout.as_millis() as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(local >= 1)
    }

    /// Length and pending count of the job stream (queue depth).
    pub async fn job_depth(&self) -> Result<(u64, u64)> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(self.keys.jobs());
        pipe.cmd("XPENDING")
            .arg(self.keys.jobs())
            .arg(WORKERS_GROUP);
        let (len, pending): (u64, Value) = pipe.query_async(&mut self.conn()).await?;
        let pending = match pending {
            Value::Array(v) => v.first().map(value_u64).unwrap_or(0),
            _ => 0,
        };
        Ok((len, pending))
    }

    /// Process ids of one index, newest first.
    pub async fn index(&self, key: &Key, limit: usize) -> Result<Vec<String>> {
        Ok(redis::cmd("ZREVRANGE")
            .arg(key)
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Housekeeping: runs `trim.lua` on the submission, job and event streams, removing
    /// acknowledged entries below every group's oldest pending and last-delivered id (the
    /// scripts acknowledge without deleting). At most `limit` entries per stream per call;
    /// whole stream nodes only, so up to a node's worth of acknowledged entries stays.
    /// Returns how many entries were removed.
    pub async fn trim_streams(&self, limit: usize) -> Result<u64> {
        let mut removed = 0;
        for stream in [
            self.keys.submit(),
            self.keys.jobs(),
            self.keys.events(),
            self.keys.results(),
        ] {
            let (n, _bound): (u64, Option<String>) = Scripts::get()
                .trim
                .key(stream)
                .arg(limit.max(1))
                .invoke_async(&mut self.conn())
                .await?;
            removed += n;
        }
        Ok(removed)
    }

    /// Housekeeping: drops index entries of processes whose records have expired (finished
    /// more than `retention_secs` ago; for `index:all`, created more than the retention plus
    /// the longest allowed process timeout ago) and workers not seen for a day. Returns how
    /// many entries were removed.
    pub async fn trim_indexes(&self, now_ms: u64, retention_secs: u64) -> Result<u64> {
        const DAY_MS: u64 = 24 * 3600 * 1000;
        let cutoff = now_ms.saturating_sub(retention_secs * 1000);
        let longest = crate::definition::MAX_TIMEOUT.as_millis() as u64;
        let mut pipe = redis::pipe();
        let mut trim = |key: Key, before: u64| {
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(format!("({before}"));
        };
        for st in crate::status::ProcessStatus::ALL {
            if st.is_finished() {
                trim(self.keys.index_status(st), cutoff);
            }
        }
        trim(self.keys.index_all(), cutoff.saturating_sub(longest));
        trim(self.keys.workers(), now_ms.saturating_sub(DAY_MS));
        let removed: Vec<u64> = pipe.query_async(&mut self.conn()).await?;
        Ok(removed.iter().sum())
    }

    /// How many processes are unfinished, and when the oldest of them was created.
    pub async fn active_summary(&self) -> Result<(u64, Option<u64>)> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(self.keys.index_active());
        pipe.cmd("ZRANGE")
            .arg(self.keys.index_active())
            .arg(0)
            .arg(0)
            .arg("WITHSCORES");
        let (n, oldest): (u64, Vec<(String, f64)>) = pipe.query_async(&mut self.conn()).await?;
        Ok((n, oldest.first().map(|(_, s)| *s as u64)))
    }

    /// Members of a sorted-set index with scores in `[min, max]`, highest first, paged.
    pub async fn index_page(
        &self,
        key: &Key,
        min: u64,
        max: u64,
        offset: usize,
        count: usize,
    ) -> Result<Vec<(String, u64)>> {
        let raw: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(key)
            .arg(max)
            .arg(min)
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(offset)
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        Ok(raw.into_iter().map(|(m, s)| (m, s as u64)).collect())
    }

    /// Length, group lag, pending count, oldest pending entry and consumer count of a stream.
    pub async fn stream_stats(&self, stream: &Key, group: &str) -> Result<StreamStats> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(stream);
        pipe.cmd("XINFO").arg("GROUPS").arg(stream);
        pipe.cmd("XPENDING").arg(stream).arg(group);
        type Reply = (u64, Vec<HashMap<String, Value>>, Value);
        let r: redis::RedisResult<Reply> = pipe.query_async(&mut self.conn()).await;
        let (length, groups, pending) = match r {
            Ok(v) => v,
            Err(e) if e.code() == Some("ERR") || e.code() == Some("NOGROUP") => {
                return Ok(StreamStats {
                    stream: stream.to_string(),
                    group: group.to_string(),
                    missing: true,
                    ..Default::default()
                });
            }
            Err(e) => return Err(e.into()),
        };
        let g = groups
            .iter()
            .find(|g| g.get("name").map(value_str).as_deref() == Some(group));
        let (count, oldest) = match &pending {
            Value::Array(v) => (
                v.first().map(value_u64).unwrap_or(0),
                v.get(1).map(value_str).filter(|s| !s.is_empty()),
            ),
            _ => (0, None),
        };
        let lag = g
            .and_then(|g| g.get("lag"))
            .filter(|v| !matches!(v, Value::Nil))
            .map(value_u64);
        Ok(StreamStats {
            stream: stream.to_string(),
            group: group.to_string(),
            missing: g.is_none(),
            // Acknowledged entries stay until trim.lua removes them, so the live work is
            // what is pending plus what is not yet delivered (XLEN when Redis cannot tell).
            length: lag.map_or(length, |l| count + l),
            lag,
            pending: count,
            oldest_pending_ms: oldest
                .and_then(|id| id.split('-').next().and_then(|t| t.parse().ok())),
            consumers: g
                .and_then(|g| g.get("consumers"))
                .map(value_u64)
                .unwrap_or(0),
        })
    }

    /// How many workers heartbeat at or after `since_ms` (one `ZCOUNT`, whatever the fleet).
    pub async fn live_workers(&self, since_ms: u64) -> Result<u64> {
        Ok(redis::cmd("ZCOUNT")
            .arg(self.keys.workers())
            .arg(since_ms)
            .arg("+inf")
            .query_async(&mut self.conn())
            .await?)
    }

    /// Workers seen by heartbeat (id, last seen ms) and, per worker, the jobs it holds.
    pub async fn workers(&self, limit: usize) -> Result<Vec<WorkerInfo>> {
        let seen: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
            .arg(self.keys.workers())
            .arg(0)
            .arg(limit.saturating_sub(1))
            .arg("WITHSCORES")
            .query_async(&mut self.conn())
            .await?;
        let mut out = Vec::with_capacity(seen.len());
        for (id, last) in seen {
            let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(self.keys.jobs())
                .arg(WORKERS_GROUP)
                .arg("-")
                .arg("+")
                .arg(100)
                .arg(&id)
                .query_async(&mut self.conn())
                .await
                .unwrap_or_default();
            let mut jobs = Vec::new();
            for (entry, _, idle, deliveries) in pending {
                let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                    .arg(self.keys.jobs())
                    .arg(&entry)
                    .arg(&entry)
                    .query_async(&mut self.conn())
                    .await?;
                if let Some(e) = r.ids.first()
                    && let Ok(job) = JobEnvelope::from_fields(&FieldMap::from_redis(&e.map))
                {
                    jobs.push(HeldJob {
                        entry_id: entry,
                        process_id: job.process_id,
                        step: job.step,
                        idle_ms: idle,
                        deliveries,
                    });
                }
            }
            out.push(WorkerInfo {
                id,
                last_seen_ms: last as u64,
                jobs,
            });
        }
        Ok(out)
    }

    /// `XRANGE`/`XREVRANGE` of a stream between `from` and `to`, at most `count` entries.
    async fn range(
        &self,
        cmd: &str,
        stream: &Key,
        from: &str,
        to: &str,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let r: Value = redis::cmd(cmd)
            .arg(stream)
            .arg(from)
            .arg(to)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn())
            .await?;
        Ok(parse_entries(r))
    }

    /// The newest entries of a stream without a group (dead letters, quarantine).
    pub async fn stream_latest(&self, stream: &Key, count: usize) -> Result<Vec<Entry>> {
        self.range("XREVRANGE", stream, "+", "-", count).await
    }

    /// One entry of a stream by id.
    pub async fn stream_entry(&self, stream: &Key, id: &str) -> Result<Option<Entry>> {
        Ok(self
            .range("XRANGE", stream, id, id, 1)
            .await?
            .into_iter()
            .next())
    }

    /// Removes a replayed entry from a stream without a consumer group (dead letters).
    pub async fn delete_dead_letter(&self, id: &str) -> Result<bool> {
        let n: u64 = redis::cmd("XDEL")
            .arg(self.keys.dlq())
            .arg(id)
            .query_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Entries of a stream (no group), oldest first, for inspection.
    pub async fn stream_entries(&self, stream: &Key, count: usize) -> Result<Vec<Entry>> {
        self.range("XRANGE", stream, "-", "+", count).await
    }
}

fn parse_commit(r: Vec<Value>) -> Result<Commit> {
    let tag = r.first().map(value_str).unwrap_or_default();
    let second = r.get(1).map(value_str);
    Ok(match tag.as_str() {
        "ok" => Commit::Ok {
            now_ms: second.and_then(|s| s.parse().ok()).unwrap_or(0),
        },
        "conflict" => Commit::Conflict,
        "gone" => Commit::Gone,
        "exists" => Commit::Exists,
        "duplicate" => Commit::Duplicate(second.unwrap_or_default()),
        other => return Err(reply("commit", format!("status {other:?}"))),
    })
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
