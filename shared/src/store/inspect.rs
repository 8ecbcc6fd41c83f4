//! Read-mostly operator inspection: queue depths and stream statistics, indexes, workers
//! and the jobs they hold, dead letters and quarantine entries (and removing a replayed dead
//! letter). Called by the gateway, the scheduler's metrics and the load tests.

use super::{Entry, Result, Store, StoreError, parse_entries, value_str, value_u64};
use crate::envelope::{FieldMap, JobEnvelope};
use crate::keys::{Key, WORKERS_GROUP};
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
}

impl Store {
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
