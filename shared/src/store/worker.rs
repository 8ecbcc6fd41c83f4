//! The worker's calls: the fenced job scripts (`begin`, `heartbeat`, `checkpoint`,
//! `complete`, `release`), the lease sweep (`reclaim`) and retiring consumers. Called by the
//! worker's claim loop and its handlers; every call presents the [`Held`] fence.

use super::{
    Entry, Fence, Held, Result, Store, StoreError, flat_fields, reply, value_str, value_u64,
};
use crate::envelope::{Event, JobEnvelope};
use crate::keys::{WORKERS_GROUP, field};
use crate::scripts::Scripts;
use redis::Value;
use std::collections::HashMap;
use std::time::Duration;

/// The answer of `begin.lua` for one job.
#[derive(Debug, Clone)]
#[expect(
    clippy::large_enum_variant,
    reason = "one Begin per job, moved once; boxing would allocate on the hot path"
)]
pub enum Begin {
    Ok {
        deliveries: u64,
        process_type: String,
        version: u32,
        step: crate::record::StepRecord,
        data: HashMap<String, Vec<u8>>,
        /// The process's tenant (its submission's `tenant`).
        tenant: Option<String>,
        /// The process as this claim began it (meta fields and every step record), when
        /// asked for: what the worker decides the step's successors on.
        snapshot: Option<crate::record::ProcessRecord>,
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
    /// The step may have a checkpoint (its begin saw one, or it saved one): a successful
    /// result then deletes it. `false` saves the delete when there is none.
    pub checkpoint: bool,
    pub result: &'a crate::envelope::StepResult,
    /// The transition the worker decided from this result, to commit with it when the
    /// process is still at the revision it was decided on.
    pub fast: Option<&'a crate::commit::FastCommit>,
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

/// Information about one consumer of a group.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    pub idle_ms: u64,
}

impl Store {
    /// Runs `begin.lua` for a batch of jobs this consumer just read or reclaimed, each as
    /// (entry id, delivery count the starter saw, job): 1 for a fresh XREADGROUP, the
    /// XAUTOCLAIM count for a reclaim. A job begins only while the PEL still holds exactly
    /// that claim for this consumer ([`Begin::Lost`] otherwise), so one claim starts at most
    /// one execution. `attempt_traces[i]` is the `traceparent` of job i's `step.execute`
    /// span (`None` or missing: not traced); it is kept in the step record for the next
    /// attempt to link to. A job whose step `snapshot` names also gets its process's
    /// snapshot ([`Begin::Ok`]'s `snapshot`).
    pub async fn begin(
        &self,
        consumer: &str,
        jobs: &[(String, u64, JobEnvelope)],
        attempt_traces: &[Option<String>],
        snapshot: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<Vec<Begin>> {
        if jobs.is_empty() {
            return Ok(vec![]);
        }
        let mut inv = Scripts::get().begin.prepare_invoke();
        inv.key(self.keys.jobs());
        inv.arg(WORKERS_GROUP).arg(consumer);
        // After the call, in the same round trip: each job's data hash, and its steps hash
        // when its snapshot is asked for (begin.lua says why these are read outside it).
        let mut reads = Vec::with_capacity(jobs.len() * 2);
        let mut asked = Vec::with_capacity(jobs.len());
        for (i, (id, seen, job)) in jobs.iter().enumerate() {
            let [meta, steps, data] = self.keys.process_keys(&job.process_id);
            let mut read = redis::cmd("HGETALL");
            read.arg(&data);
            reads.push(read);
            let snap = snapshot(&job.step);
            if snap {
                let mut read = redis::cmd("HGETALL");
                read.arg(&steps);
                reads.push(read);
            }
            asked.push(snap);
            inv.key(meta).key(steps).key(data);
            let trace = attempt_traces.get(i).cloned().flatten().unwrap_or_default();
            inv.arg(id)
                .arg(&job.step)
                .arg(&job.token)
                .arg(trace)
                .arg(*seen);
        }
        let (replies, read): (Vec<Vec<Value>>, Vec<Value>) = inv
            .invoke_with(&mut self.conn(), reads)
            .await
            .map_err(|e| e.for_group(&self.keys.jobs(), WORKERS_GROUP))?;
        if replies.len() != jobs.len() {
            return Err(reply(
                "begin",
                format!("{} answers to {} jobs", replies.len(), jobs.len()),
            ));
        }
        let mut read = read.into_iter();
        replies
            .into_iter()
            .zip(jobs)
            .zip(asked)
            .map(|((r, (_, _, job)), asked)| {
                let data = read.next().unwrap_or(Value::Nil);
                let steps = if asked { read.next() } else { None };
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
                        let data: HashMap<String, Vec<u8>> = redis::from_redis_value(data)?;
                        let tenant = it.next().map(|v| value_str(&v)).filter(|t| !t.is_empty());
                        let mut meta: HashMap<String, String> = [
                            (field::TYPE, process_type.clone()),
                            (field::VERSION, version.to_string()),
                        ]
                        .into_iter()
                        .chain(
                            [field::STATUS, field::REV, field::TRACE]
                                .into_iter()
                                .zip(it.by_ref().map(|v| value_str(&v))),
                        )
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                        meta.retain(|_, v| !v.is_empty());
                        // Without a snapshot (not asked, or unreadable) the result goes to
                        // the scheduler, as always.
                        let snapshot = match steps {
                            Some(v @ Value::Array(_)) | Some(v @ Value::Map(_)) => {
                                let steps: HashMap<String, String> = redis::from_redis_value(v)?;
                                crate::record::ProcessRecord::parse(&job.process_id, &meta, &steps)
                                    .ok()
                                    .flatten()
                            }
                            _ => None,
                        };
                        Ok(Begin::Ok {
                            deliveries,
                            process_type,
                            version,
                            step,
                            data,
                            tenant,
                            snapshot,
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
        let r: Vec<String> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| e.for_group(&self.keys.jobs(), WORKERS_GROUP))?;
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
            .await
            .map_err(|e| e.for_group(&self.keys.jobs(), WORKERS_GROUP))?;
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
            checkpoint: true,
            result,
            fast: None,
        }];
        let mut r = self.complete_many(consumer, &one).await?;
        r.pop()
            .map(|(fence, _)| fence)
            .ok_or_else(|| reply("complete", "no answer"))
    }

    /// Runs `complete.lua` for a batch of steps in one call: each step is fenced and
    /// committed on its own (output, completion event, ack); one answer per step, in order:
    /// the fence and whether the step's own transition was committed with it (its
    /// [`Completion::fast`] applied: no event for the scheduler).
    pub async fn complete_many(
        &self,
        consumer: &str,
        items: &[Completion<'_>],
    ) -> Result<Vec<(Fence, bool)>> {
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
                .arg(if c.checkpoint { "1" } else { "0" })
                .arg(fields.len());
            for (k, v) in fields {
                inv.arg(k).arg(v);
            }
            match c.fast {
                None => {
                    inv.arg(0);
                }
                Some(f) => {
                    inv.arg(1)
                        .arg(f.revision.rev)
                        .arg(f.revision.steps_rev)
                        .arg(f.steps.len());
                    for (name, rec) in &f.steps {
                        inv.arg(name).arg(rec);
                    }
                    inv.arg(f.jobs.len());
                    for job in &f.jobs {
                        inv.arg(job.len());
                        for (k, v) in job {
                            inv.arg(k).arg(v);
                        }
                    }
                }
            }
        }
        let r: Vec<String> = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| e.for_group(&self.keys.jobs(), WORKERS_GROUP))?;
        if r.len() != items.len() {
            return Err(reply(
                "complete",
                format!("{} answers for {} steps", r.len(), items.len()),
            ));
        }
        r.iter()
            .map(|s| match s.as_str() {
                "fast" => Ok((Fence::Ok, true)),
                s => Ok((Fence::parse("complete", s)?, false)),
            })
            .collect()
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
        let r: String = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| e.for_group(&self.keys.jobs(), WORKERS_GROUP))?;
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
            .await
            .map_err(|e| e.for_group(&self.keys.jobs(), WORKERS_GROUP))?;
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

    /// Consumers of the job group with their pending counts and idle times.
    pub async fn job_consumers(&self) -> Result<Vec<ConsumerInfo>> {
        let infos: Vec<HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(self.keys.jobs())
            .arg(WORKERS_GROUP)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| StoreError::from(e).for_group(&self.keys.jobs(), WORKERS_GROUP))?;
        Ok(infos
            .into_iter()
            .map(|m| ConsumerInfo {
                name: m.get("name").map(value_str).unwrap_or_default(),
                pending: m.get("pending").map(value_u64).unwrap_or(0),
                idle_ms: m.get("idle").map(value_u64).unwrap_or(0),
            })
            .collect())
    }

    /// Registers what this worker is ([`super::WorkerMeta`]) under its consumer name, for
    /// the console and `GET /api/workers`; `retire_consumer.lua` removes it. One `HSET`
    /// on the workers info hash, the only key the worker's Redis user may write it on.
    pub async fn register_worker(&self, consumer: &str, meta: &super::WorkerMeta) -> Result<()> {
        let json = serde_json::to_string(meta).map_err(|e| reply("register", e.to_string()))?;
        let _: i64 = redis::cmd("HSET")
            .arg(self.keys.workers_info())
            .arg(consumer)
            .arg(json)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
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
            .key(self.keys.workers_info())
            .arg(WORKERS_GROUP)
            .arg(consumer)
            .arg(min_idle.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| e.for_group(&self.keys.jobs(), WORKERS_GROUP))?;
        Ok(r == 1)
    }
}
