//! The scheduler's calls: submissions and events (also appended by the gateway and any
//! client), process records, revision-checked commits (`commit.lua`), the delay queue,
//! taking over another scheduler's pending entries, purges and deleting one process
//! (`delete.lua`), durability waits and stream and index housekeeping. Called by the
//! scheduler crate (loops, submissions, operator ops).

use super::{Entry, Result, Store, StoreError, parse_entry, reply, value_str};
use crate::envelope::{Event, Fields};
use crate::keys::{Key, field};
use crate::scripts::Scripts;
use redis::{RedisError, Value};
use std::collections::HashMap;
use std::time::Duration;

/// What `delete.lua` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// The process (in `status`) and every reference to it are gone.
    Deleted { status: String, removed: Removed },
    /// There was no record; stray references to the id (if any) were removed.
    Missing { removed: Removed },
    /// Unfinished (`status`) and not forced: nothing changed.
    Running { status: String },
    /// The record changed since it was read, or too many entries arrived since the scan:
    /// read and scan again.
    Changed,
}

/// The references `delete.lua` removed, by where they were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    /// Queued or pending jobs (acknowledged and deleted).
    pub jobs: u64,
    /// Events (timers, signals, timeouts) not yet applied.
    pub events: u64,
    /// Step results and dead-letter notices not yet applied.
    pub results: u64,
    pub dead_letters: u64,
    /// Delayed jobs and timers.
    pub delayed: u64,
}

/// What the caller of [`Store::delete_process`] read of the record: `delete.lua` refuses
/// (with [`Deleted::Changed`]) when either has changed since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteGuard {
    /// The `rev` field, `None` when there was no record.
    pub rev: Option<String>,
    /// The steps hash's `steps_rev` field ([`field::STEPS_REV`]), `None` before the first
    /// transition a worker committed.
    pub steps_rev: Option<String>,
    pub idempotency_key: Option<String>,
    /// The process type, whose per-type active index the delete leaves too.
    pub process_type: Option<String>,
}

impl DeleteGuard {
    /// What a delete checks, from the meta and steps hashes just read.
    pub fn of(meta: &HashMap<String, String>, steps: &HashMap<String, String>) -> Self {
        Self {
            rev: meta.get(field::REV).cloned(),
            steps_rev: steps.get(field::STEPS_REV).cloned(),
            idempotency_key: meta.get(field::IDEMPOTENCY_KEY).cloned(),
            process_type: meta.get(field::TYPE).cloned(),
        }
    }
}

/// The answer of `commit.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    Ok,
    Conflict,
    Gone,
    Exists,
    Duplicate(String),
    /// The transition starts steps and the fleet's intake is drained: nothing was written.
    Closed,
}

impl Store {
    /// Appends a submission (what any Redis client may do instead).
    pub async fn submit(&self, fields: &Fields) -> Result<String> {
        self.xadd(&self.keys.submit(), fields).await
    }

    /// Appends an event for the scheduler (signals from the gateway), to the events stream
    /// of the partition its process lives in.
    pub async fn send_event(&self, event: &Event) -> Result<String> {
        let events = self.keys_of(event.process_id()).events();
        self.xadd(&events, &event.to_fields()).await
    }

    async fn xadd(&self, stream: &Key, fields: &Fields) -> Result<String> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        Ok(cmd.query_async(&mut self.conn()).await?)
    }

    /// The meta and steps hashes of a process (empty when it does not exist), from the
    /// partition it lives in.
    pub async fn load_process(
        &self,
        id: &str,
    ) -> Result<(HashMap<String, String>, HashMap<String, String>)> {
        let keys = self.keys_of(id);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(keys.process(id))
            .cmd("HGETALL")
            .arg(keys.steps(id));
        Ok(pipe.query_async(&mut self.conn()).await?)
    }

    /// Records of many processes, with the server time (of this handle's partition's
    /// server): one round trip per partition they live in.
    pub async fn load_processes(
        &self,
        ids: &[&str],
    ) -> Result<(u64, Vec<(HashMap<String, String>, HashMap<String, String>)>)> {
        type Record = (HashMap<String, String>, HashMap<String, String>);
        let mut out: Vec<Record> = vec![Default::default(); ids.len()];
        let mut now = None;
        for (part, at) in self.by_partition(ids) {
            let home = part.partition() == self.partition();
            let mut pipe = redis::pipe();
            if home {
                pipe.cmd("TIME");
            }
            for &i in &at {
                pipe.cmd("HGETALL")
                    .arg(part.keys.process(ids[i]))
                    .cmd("HGETALL")
                    .arg(part.keys.steps(ids[i]));
            }
            let mut vals: Vec<Value> = pipe.query_async(&mut part.conn()).await?;
            let rest = if home {
                let rest = vals.split_off(1);
                let (s, us): (u64, u64) = redis::from_redis_value(vals.remove(0))?;
                now = Some(s * 1000 + us / 1000);
                rest
            } else {
                vals
            };
            let mut it = rest.into_iter();
            for &i in &at {
                if let (Some(m), Some(st)) = (it.next(), it.next()) {
                    out[i] = (redis::from_redis_value(m)?, redis::from_redis_value(st)?);
                }
            }
        }
        let now = match now {
            Some(n) => n,
            None => self.server_time_ms().await?,
        };
        Ok((now, out))
    }

    /// The data hash of a process (input, outputs, checkpoints), from its partition.
    pub async fn load_data(&self, id: &str) -> Result<HashMap<String, Vec<u8>>> {
        Ok(redis::cmd("HGETALL")
            .arg(self.keys_of(id).data(id))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Runs `commit.lua`.
    pub async fn commit(&self, call: &crate::commit::CommitCall) -> Result<Commit> {
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
    /// answer is [`StoreError::FunctionsNotLoaded`] ([`Store::commit`] loads it and retries).
    pub async fn commit_many(
        &self,
        calls: &[&crate::commit::CommitCall],
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
                Value::ServerError(e) => Err(crate::scripts::function_error(RedisError::from(e))),
                Value::Array(r) => parse_commit(r),
                other => Err(reply("commit", format!("reply {other:?}"))),
            })
            .collect())
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
            .await
            .map_err(|e| StoreError::from(e).for_group(stream, group))?;
        Ok((r.0, r.1.into_iter().filter_map(parse_entry).collect()))
    }

    /// Runs `purge.lua` for each id (in the partition it lives in): deletes those still in
    /// the finished `status`.
    pub async fn purge(&self, status: crate::status::ProcessStatus, ids: &[String]) -> Result<u64> {
        let mut n = 0;
        for id in ids {
            let keys = self.keys_of(id);
            let [meta, steps, data] = keys.process_keys(id);
            let r: u64 = Scripts::get()
                .purge
                .key(meta)
                .key(steps)
                .key(data)
                .key(keys.index_status(status))
                .key(keys.index_all())
                .arg(status.as_str())
                .arg(id)
                .invoke_async(&mut self.conn())
                .await?;
            n += r;
        }
        Ok(n)
    }

    /// Drains the fleet's intake: sets the intake key to `state` unless it is set already.
    /// True when this call set it.
    pub async fn drain_intake(&self, state: &str) -> Result<bool> {
        let set: Option<String> = redis::cmd("SET")
            .arg(self.keys.intake())
            .arg(state)
            .arg("NX")
            .query_async(&mut self.conn())
            .await?;
        Ok(set.is_some())
    }

    /// Opens the fleet's intake. True when it was drained.
    pub async fn resume_intake(&self) -> Result<bool> {
        let n: u64 = redis::cmd("DEL")
            .arg(self.keys.intake())
            .query_async(&mut self.conn())
            .await?;
        Ok(n > 0)
    }

    /// The intake key's value while the intake is drained.
    pub async fn intake(&self) -> Result<Option<String>> {
        Ok(redis::cmd("GET")
            .arg(self.keys.intake())
            .query_async(&mut self.conn())
            .await?)
    }

    /// The oldest `limit` Pending processes (created while intake was drained).
    pub async fn pending_processes(&self, limit: usize) -> Result<Vec<String>> {
        Ok(redis::cmd("ZRANGE")
            .arg(
                self.keys
                    .index_status(crate::status::ProcessStatus::Pending),
            )
            .arg(0)
            .arg(limit.saturating_sub(1))
            .query_async(&mut self.conn())
            .await?)
    }

    /// How many processes are Pending (intake drained) or Paused: `status`'s index.
    pub async fn status_count(&self, status: crate::status::ProcessStatus) -> Result<u64> {
        Ok(redis::cmd("ZCARD")
            .arg(self.keys.index_status(status))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Runs `delete.lua`: removes process `id`, its keys, its index entries, its idempotency
    /// key and the references `refs` found ([`Store::references`]) plus those added since,
    /// at most `tail_max` per stream. An unfinished process only with `force`.
    pub async fn delete_process(
        &self,
        id: &str,
        guard: &DeleteGuard,
        refs: &super::References,
        force: bool,
        tail_max: usize,
    ) -> Result<Deleted> {
        let k = &self.keys;
        let [meta, steps, data] = k.process_keys(id);
        let mut indexes = vec![k.index_all(), k.index_active()];
        indexes.extend(
            crate::status::ProcessStatus::ALL
                .into_iter()
                .map(|s| k.index_status(s)),
        );
        indexes.extend(
            guard
                .process_type
                .as_deref()
                .map(|t| k.index_active_type(t)),
        );
        let mut inv = Scripts::get().delete.prepare_invoke();
        inv.key(meta)
            .key(steps)
            .key(data)
            .key(k.llm_usage(id))
            .key(k.delayed())
            .key(k.jobs())
            .key(k.events())
            .key(k.results())
            .key(k.dlq());
        for i in &indexes {
            inv.key(i);
        }
        if let Some(idem) = &guard.idempotency_key {
            inv.key(k.idempotency(idem));
        }
        inv.arg(id)
            .arg(guard.rev.as_deref().unwrap_or(""))
            .arg(guard.idempotency_key.as_deref().unwrap_or(""))
            .arg(if force { "1" } else { "0" })
            .arg(tail_max.max(1))
            .arg(indexes.len())
            .arg(guard.steps_rev.as_deref().unwrap_or(""))
            .arg(refs.delayed.len());
        for m in &refs.delayed {
            inv.arg(m);
        }
        for s in [&refs.jobs, &refs.events, &refs.results, &refs.dlq] {
            inv.arg(s.group.as_deref().unwrap_or(""))
                .arg(&s.scanned_to)
                .arg(s.ids.len());
            for e in &s.ids {
                inv.arg(e);
            }
        }
        let r: Vec<Value> = inv.invoke_async(&mut self.conn()).await?;
        let tag = r.first().map(value_str).unwrap_or_default();
        let status = r.get(1).map(value_str).unwrap_or_default();
        let n = |i: usize| r.get(i).map(super::value_u64).unwrap_or(0);
        let removed = Removed {
            jobs: n(2),
            events: n(3),
            results: n(4),
            dead_letters: n(5),
            delayed: n(6),
        };
        Ok(match tag.as_str() {
            "deleted" => Deleted::Deleted { status, removed },
            "missing" => Deleted::Missing { removed },
            "running" => Deleted::Running { status },
            "changed" => Deleted::Changed,
            other => return Err(reply("delete", format!("status {other:?}"))),
        })
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

    /// `WAIT replicas timeout`: how many replicas have every write made so far on this
    /// connection (on a cluster, the connection to the deployment's primary).
    pub async fn wait_replicas(&self, replicas: u32, timeout: Duration) -> Result<u32> {
        Ok(redis::cmd("WAIT")
            .arg(replicas)
            .arg(timeout.as_millis() as u64)
            .query_async(&mut self.conn())
            .await?)
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
}

fn parse_commit(r: Vec<Value>) -> Result<Commit> {
    let tag = r.first().map(value_str).unwrap_or_default();
    let second = r.get(1).map(value_str);
    Ok(match tag.as_str() {
        "ok" => Commit::Ok,
        "conflict" => Commit::Conflict,
        "gone" => Commit::Gone,
        "exists" => Commit::Exists,
        "duplicate" => Commit::Duplicate(second.unwrap_or_default()),
        "closed" => Commit::Closed,
        other => return Err(reply("commit", format!("status {other:?}"))),
    })
}
