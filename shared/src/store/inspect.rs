//! Read-mostly operator inspection: queue depths and stream statistics, indexes, workers
//! and the jobs they hold, dead letters and quarantine entries (and removing a replayed dead
//! letter), whole process records with their state blobs, and the scan for everything that
//! references one process (before `delete.lua` removes it). Called by the gateway, the
//! scheduler's metrics and the load tests.

use super::{Entry, Result, Store, StoreError, parse_entries, value_str, value_u64};
use crate::envelope::{FieldMap, JobEnvelope, wire};
use crate::keys::{Key, SCHEDULER_GROUP, WORKERS_GROUP};
use redis::Value;
use std::collections::HashMap;

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
    /// What it registered at start (`None`: an older worker, or unreadable).
    pub meta: Option<WorkerMeta>,
}

/// What a worker registers at start ([`Store::register_worker`]), in the workers info
/// hash ([`crate::keys::Keys::workers_info`]) until it retires.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerMeta {
    /// The Honua version the worker runs.
    pub version: String,
    /// Its host name (the pod's name on Kubernetes).
    pub host: String,
    /// How many steps it runs at once (`worker.max_concurrent_steps`).
    pub concurrency: u64,
    /// When it started (server ms).
    pub started_ms: u64,
}

/// Per process type: how many are unfinished, and how many finished with each status in
/// the last hour and the last day ([`Store::type_counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeCounts {
    pub process_type: String,
    pub active: u64,
    /// (status, last hour, last day) for each finished status, in
    /// [`crate::status::ProcessStatus::ALL`] order.
    pub finished: Vec<(crate::status::ProcessStatus, u64, u64)>,
}

/// One process as stored: the meta, steps and data hashes (all empty when it does not
/// exist; the data blobs undecoded).
#[derive(Debug, Clone, Default)]
pub struct RawProcess {
    pub meta: HashMap<String, String>,
    pub steps: HashMap<String, String>,
    pub data: HashMap<String, Vec<u8>>,
}

/// The entries of one stream that name a process, found by [`Store::references`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRefs {
    /// The stream's consumer group (`None`: no group, or the stream has none yet).
    pub group: Option<String>,
    /// The last entry id the scan covered (`0-0` for an empty stream): `delete.lua` checks
    /// the entries after it itself.
    pub scanned_to: String,
    /// Entries naming the process: pending or not yet delivered (streams with a group) or
    /// any (the dead-letter stream).
    pub ids: Vec<String>,
}

/// Everything outside a process's own keys that names it: delayed jobs and timers, and the
/// live entries of the job, event, results and dead-letter streams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    pub delayed: Vec<String>,
    pub jobs: StreamRefs,
    pub events: StreamRefs,
    pub results: StreamRefs,
    pub dlq: StreamRefs,
}

/// Entries per `XRANGE` and members per `ZSCAN` of the reference scan: each call is short.
const SCAN_BATCH: usize = 500;

impl Store {
    /// The meta, steps and data hashes of each process: one round trip per partition they
    /// live in.
    pub async fn raw_processes(&self, ids: &[&str]) -> Result<Vec<RawProcess>> {
        let mut out: Vec<RawProcess> = ids.iter().map(|_| RawProcess::default()).collect();
        for (part, at) in self.by_partition(ids) {
            let mut pipe = redis::pipe();
            for &i in &at {
                let [meta, steps, data] = part.keys.process_keys(ids[i]);
                pipe.cmd("HGETALL")
                    .arg(meta)
                    .cmd("HGETALL")
                    .arg(steps)
                    .cmd("HGETALL")
                    .arg(data);
            }
            let vals: Vec<Value> = pipe.query_async(&mut part.conn()).await?;
            let mut it = vals.into_iter();
            for &i in &at {
                if let (Some(m), Some(s), Some(d)) = (it.next(), it.next(), it.next()) {
                    out[i] = RawProcess {
                        meta: redis::from_redis_value(m)?,
                        steps: redis::from_redis_value(s)?,
                        data: redis::from_redis_value(d)?,
                    };
                }
            }
        }
        Ok(out)
    }

    /// Finds everything outside the process's own keys that names process `id`: members of
    /// the delayed set (`ZSCAN … MATCH`, verified by decoding), and the entries of the job,
    /// event and results streams from the oldest pending or first undelivered one on, and of
    /// the dead-letter stream, whose process id is `id` (`XRANGE` in batches). Every call is
    /// short; nothing is locked, so `delete.lua` checks what was added after the scan.
    pub async fn references(&self, id: &str) -> Result<References> {
        Ok(References {
            delayed: self.delayed_members_of(id).await?,
            jobs: self
                .stream_refs(&self.keys.jobs(), Some(WORKERS_GROUP), id)
                .await?,
            events: self
                .stream_refs(&self.keys.events(), Some(SCHEDULER_GROUP), id)
                .await?,
            results: self
                .stream_refs(&self.keys.results(), Some(SCHEDULER_GROUP), id)
                .await?,
            dlq: self.stream_refs(&self.keys.dlq(), None, id).await?,
        })
    }

    async fn delayed_members_of(&self, id: &str) -> Result<Vec<String>> {
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            // Process ids are `[A-Za-z0-9_-]`: nothing in them is a glob character.
            let (next, page): (u64, Vec<(String, f64)>) = redis::cmd("ZSCAN")
                .arg(self.keys.delayed())
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{id}*"))
                .arg("COUNT")
                .arg(SCAN_BATCH)
                .query_async(&mut self.conn())
                .await?;
            out.extend(
                page.into_iter()
                    .map(|(m, _)| m)
                    .filter(|m| crate::commit::delayed_member_process(m).as_deref() == Some(id)),
            );
            if next == 0 {
                break;
            }
            cursor = next;
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    async fn stream_refs(&self, stream: &Key, group: Option<&str>, id: &str) -> Result<StreamRefs> {
        let last: Vec<Entry> = self.range("XREVRANGE", stream, "+", "-", 1).await?;
        let Some(end) = last.into_iter().next().map(|e| e.id) else {
            return Ok(StreamRefs {
                group: None,
                scanned_to: "0-0".into(),
                ids: vec![],
            });
        };
        // Where live entries start: the oldest pending one, else the first undelivered.
        let mut start = "-".to_string();
        let mut has_group = false;
        if let Some(g) = group {
            let groups: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(stream)
                .query_async(&mut self.conn())
                .await?;
            if let Some(info) = groups
                .iter()
                .find(|i| i.get("name").map(value_str).as_deref() == Some(g))
            {
                has_group = true;
                let delivered = info
                    .get("last-delivered-id")
                    .map(value_str)
                    .unwrap_or_default();
                let pending: Value = redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(g)
                    .query_async(&mut self.conn())
                    .await?;
                let oldest = match &pending {
                    Value::Array(v) if v.first().map(value_u64).unwrap_or(0) > 0 => {
                        v.get(1).map(value_str).filter(|s| !s.is_empty())
                    }
                    _ => None,
                };
                // Pending entries were delivered, so the oldest one comes first.
                start = match oldest {
                    Some(o) => o,
                    None if delivered.is_empty() => "-".into(),
                    None => format!("({delivered}"),
                };
            }
        }
        let mut ids = Vec::new();
        loop {
            let page = self
                .range("XRANGE", stream, &start, &end, SCAN_BATCH)
                .await?;
            let n = page.len();
            for e in &page {
                if e.fields.get(wire::PROCESS_ID) == Some(id) {
                    ids.push(e.id.clone());
                }
            }
            match page.last() {
                Some(e) if n == SCAN_BATCH && e.id != end => start = format!("({}", e.id),
                _ => break,
            }
        }
        Ok(StreamRefs {
            group: has_group.then(|| group.unwrap_or_default().to_string()),
            scanned_to: end,
            ids,
        })
    }

    /// Length and pending count of the job stream (queue depth).
    pub async fn job_depth(&self) -> Result<(u64, u64)> {
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(self.keys.jobs());
        pipe.cmd("XPENDING")
            .arg(self.keys.jobs())
            .arg(WORKERS_GROUP);
        let (len, pending): (u64, Value) = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| StoreError::from(e).for_group(&self.keys.jobs(), WORKERS_GROUP))?;
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

    /// The process an idempotency key names, if any (one `GET`, in the partition the key
    /// maps to).
    pub async fn idempotent_process(&self, idem: &str) -> Result<Option<String>> {
        Ok(redis::cmd("GET")
            .arg(self.keys_of(idem).idempotency(idem))
            .query_async(&mut self.conn())
            .await?)
    }

    /// How many members of the score index `key` fall in each `[from, to)` range: one
    /// pipelined `ZCOUNT` per range (O(log n) each), for counts over time windows of the
    /// time-scored process indexes.
    pub async fn index_counts(&self, key: &Key, ranges: &[(u64, u64)]) -> Result<Vec<u64>> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (from, to) in ranges {
            pipe.cmd("ZCOUNT").arg(key).arg(*from).arg(format!("({to}"));
        }
        Ok(pipe.query_async(&mut self.conn()).await?)
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

    /// Per process type in `types`: its unfinished processes (`ZCARD` of its active
    /// index) and the processes finished with each status in the hour and the day up to
    /// `now_ms`, summed from the counters the finishing commits keep: the minute buckets of
    /// the last hour, and for the day the hour buckets from 23 hours before the current
    /// hour plus the minute buckets before that, back to exactly 24 hours ago. One
    /// pipelined round trip of at most `types` + 144 reads, whatever the traffic.
    pub async fn type_counts(&self, types: &[&str], now_ms: u64) -> Result<Vec<TypeCounts>> {
        use crate::status::ProcessStatus;
        const MIN: u64 = 60_000;
        const HOUR: u64 = 3_600_000;
        let minute = now_ms / MIN;
        let hour = now_ms / HOUR;
        // The minutes of the last hour (the current one included: 60 buckets).
        let last_hour: Vec<u64> = (minute.saturating_sub(59)..=minute).collect();
        // The day: whole hours from `hour - 23` (the current one partial), then the minutes
        // from 24 hours ago up to where hour `hour - 23` starts.
        let first_hour = hour.saturating_sub(23);
        let hours: Vec<u64> = (first_hour..=hour).collect();
        let day_start = (now_ms.saturating_sub(24 * HOUR)) / MIN + 1;
        let edge: Vec<u64> = (day_start..first_hour * (HOUR / MIN)).collect();
        let mut pipe = redis::pipe();
        for t in types {
            pipe.cmd("ZCARD").arg(self.keys.index_active_type(t));
        }
        for m in last_hour.iter().chain(&edge) {
            pipe.cmd("HGETALL").arg(self.keys.stats_minute(*m));
        }
        for h in &hours {
            pipe.cmd("HGETALL").arg(self.keys.stats_hour(*h));
        }
        let mut replies: Vec<Value> = pipe.query_async(&mut self.conn()).await?;
        let buckets = replies.split_off(types.len());
        let (minutes, hour_buckets) = buckets.split_at(last_hour.len() + edge.len());
        let (hour_minutes, edge_minutes) = minutes.split_at(last_hour.len());
        // Sums of `<Status>:<type>` fields over a set of buckets.
        let sum = |set: &[&[Value]]| {
            let mut out: HashMap<String, u64> = HashMap::new();
            for bucket in set.iter().flat_map(|b| b.iter()) {
                // RESP2 answers a flat list, RESP3 a map.
                let pairs: Vec<(&Value, &Value)> = match bucket {
                    Value::Array(v) => v.chunks_exact(2).map(|kv| (&kv[0], &kv[1])).collect(),
                    Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
                    _ => Vec::new(),
                };
                for (k, v) in pairs {
                    *out.entry(value_str(k)).or_default() += value_u64(v);
                }
            }
            out
        };
        let in_hour = sum(&[hour_minutes]);
        let in_day = sum(&[edge_minutes, hour_buckets]);
        Ok(types
            .iter()
            .zip(&replies)
            .map(|(t, active)| TypeCounts {
                process_type: t.to_string(),
                active: value_u64(active),
                finished: ProcessStatus::ALL
                    .into_iter()
                    .filter(|s| s.is_finished())
                    .map(|s| {
                        let f = crate::keys::stats_field(s, t);
                        (
                            s,
                            in_hour.get(&f).copied().unwrap_or(0),
                            in_day.get(&f).copied().unwrap_or(0),
                        )
                    })
                    .collect(),
            })
            .collect())
    }

    /// What the workers `ids` registered at start, in order (`None` where a worker
    /// registered nothing or its entry is unreadable): one `HMGET`.
    pub async fn worker_meta(&self, ids: &[&str]) -> Result<Vec<Option<WorkerMeta>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.keys.workers_info())
            .arg(ids)
            .query_async(&mut self.conn())
            .await?;
        Ok(raw
            .into_iter()
            .map(|r| r.and_then(|j| serde_json::from_str(&j).ok()))
            .collect())
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
        let parts = self.all();
        for (id, last) in seen {
            let mut jobs = Vec::new();
            // The jobs it holds in every partition (a worker heartbeats in partition 0
            // whatever it holds, and in each partition it holds jobs in).
            for part in &parts {
                let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                    .arg(part.keys.jobs())
                    .arg(WORKERS_GROUP)
                    .arg("-")
                    .arg("+")
                    .arg(100)
                    .arg(&id)
                    .query_async(&mut part.conn())
                    .await
                    .unwrap_or_default();
                for (entry, _, idle, deliveries) in pending {
                    let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                        .arg(part.keys.jobs())
                        .arg(&entry)
                        .arg(&entry)
                        .query_async(&mut part.conn())
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
            }
            out.push(WorkerInfo {
                id,
                last_seen_ms: last as u64,
                jobs,
                meta: None,
            });
        }
        let ids: Vec<&str> = out.iter().map(|w| w.id.as_str()).collect();
        let metas = self.worker_meta(&ids).await?;
        for (w, m) in out.iter_mut().zip(metas) {
            w.meta = m;
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
