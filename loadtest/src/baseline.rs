//! The raw Redis limit: the minimal job cycle the engine performs for every step — `XADD`
//! to a stream, `XREADGROUP` through a consumer group, `XACK` — batched the way a tuned
//! queue would batch it, with no scripts, no state, no fencing. Same server, same run, same
//! payload (a real job envelope) as the engine figure, so their ratio is honest.
//!
//! Producers pipeline `XADD`s in batches; every consumer loops `XREADGROUP COUNT batch`
//! then one `XACK` with all the ids it got. The clock runs from the first `XADD` to the
//! `XACK` that completes the count.

use crate::error::BenchError;
use crate::meter::Meter;
use crate::server::{CommandCost, Server};
use honua_shared::envelope::{Fields, JobEnvelope, TraceContext};
use honua_shared::keys::{Key, Keys, WORKERS_GROUP};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamReadOptions, StreamReadReply};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// How long a consumer's `XREADGROUP` blocks before it looks at the count again.
const BLOCK: Duration = Duration::from_millis(100);
/// A raw run this slow means something is wrong with the server.
const MAX_RUN: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub struct BaselineParams {
    pub jobs: usize,
    pub producers: usize,
    pub consumers: usize,
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineResult {
    pub jobs: usize,
    pub producers: usize,
    pub consumers: usize,
    pub batch: usize,
    /// Bytes of field names and values per entry (one job envelope).
    pub payload_bytes: usize,
    pub seconds: f64,
    pub jobs_per_sec: f64,
    pub redis_cpu_us_per_job: f64,
    /// Redis CPU over the run's wall time (1.0 = one core busy the whole time).
    pub redis_busy: f64,
    /// This process's CPU (producers and consumers) per job; `None` without /proc.
    pub client_cpu_us_per_job: Option<f64>,
    /// Cores the rest of the host kept busy meanwhile (other processes, the kernel).
    pub host_other_busy: Option<f64>,
    /// Where Redis spent its command time, per job, costliest first.
    pub redis_commands: Vec<CommandCost>,
}

/// Runs the raw cycle on a stream of its own (`<prefix>-raw`), deleted afterwards.
pub async fn run(
    server: &Server,
    prefix: &str,
    params: BaselineParams,
) -> Result<BaselineResult, BenchError> {
    run_in(server, prefix, 0, params).await
}

/// [`run`] on the stream of partition `partition` (its hash tag picks a cluster node's slot).
pub async fn run_in(
    server: &Server,
    prefix: &str,
    partition: u16,
    params: BaselineParams,
) -> Result<BaselineResult, BenchError> {
    let stream = Keys::new(&format!("{prefix}-raw"), partition).jobs();
    let mut admin = server.connect(Duration::from_secs(5)).await?;
    let () = admin.del(&stream).await?;
    let () = admin
        .xgroup_create_mkstream(&stream, WORKERS_GROUP, "0")
        .await?;
    let result = measure(server, &mut admin, &stream, params).await;
    let () = admin.del(&stream).await?;
    result
}

async fn measure(
    server: &Server,
    admin: &mut MultiplexedConnection,
    stream: &Key,
    params: BaselineParams,
) -> Result<BaselineResult, BenchError> {
    let fields = job_fields();
    let payload_bytes = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    // Connected before the clock starts.
    let producers = connect_n(server, params.producers, Duration::from_secs(5)).await?;
    let consumers = connect_n(server, params.consumers, BLOCK + Duration::from_secs(5)).await?;
    let acked = Arc::new(AtomicUsize::new(0));
    let meter = Meter::start(admin).await?;
    let mut tasks = JoinSet::new();
    let shares = split(params.jobs, producers.len());
    for (conn, share) in producers.into_iter().zip(shares) {
        let job = Produce {
            stream: stream.clone(),
            fields: fields.clone(),
            jobs: share,
            batch: params.batch,
        };
        tasks.spawn(job.run(conn));
    }
    for (i, conn) in consumers.into_iter().enumerate() {
        let job = Consume {
            stream: stream.clone(),
            consumer: format!("raw-{i}"),
            acked: acked.clone(),
            total: params.jobs,
            batch: params.batch,
        };
        tasks.spawn(job.run(conn));
    }
    let end = join_all(tasks).await?.unwrap_or_else(Instant::now);
    let used = meter.stop(admin, end).await?;
    let seconds = used.seconds;
    let jobs = params.jobs.max(1) as f64;
    Ok(BaselineResult {
        jobs: params.jobs,
        producers: params.producers,
        consumers: params.consumers,
        batch: params.batch,
        payload_bytes,
        seconds,
        jobs_per_sec: jobs / seconds,
        redis_cpu_us_per_job: used.redis_cpu_secs * 1e6 / jobs,
        redis_busy: used.redis_cpu_secs / seconds,
        client_cpu_us_per_job: used.cpu.map(|c| c.total_secs() * 1e6 / jobs),
        host_other_busy: used.host_other_busy,
        redis_commands: used.top_commands(params.jobs, 6),
    })
}

/// `n` (at least one) dedicated connections.
async fn connect_n(
    server: &Server,
    n: usize,
    response_timeout: Duration,
) -> Result<Vec<MultiplexedConnection>, BenchError> {
    let mut out = Vec::with_capacity(n.max(1));
    for _ in 0..n.max(1) {
        out.push(server.connect(response_timeout).await?);
    }
    Ok(out)
}

/// Waits for every task; the first error aborts the others. Returns when the last job was
/// acknowledged.
async fn join_all(
    mut tasks: JoinSet<Result<Option<Instant>, BenchError>>,
) -> Result<Option<Instant>, BenchError> {
    let all = async {
        let mut end = None;
        while let Some(joined) = tasks.join_next().await {
            let done =
                joined.map_err(|_| BenchError::Component("a baseline task panicked".into()))??;
            end = end.max(done);
        }
        Ok(end)
    };
    tokio::time::timeout(MAX_RUN, all).await.map_err(|_| {
        BenchError::Stuck(format!(
            "the raw baseline did not finish within {MAX_RUN:?}"
        ))
    })?
}

/// `total` split into `parts` shares that differ by at most one.
fn split(total: usize, parts: usize) -> Vec<usize> {
    let parts = parts.max(1);
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

/// The fields of a real job envelope, so entries weigh what the engine's jobs weigh.
pub(crate) fn job_fields() -> Fields {
    JobEnvelope {
        process_id: uuid::Uuid::now_v7().to_string(),
        step: "A".into(),
        token: "1.1".into(),
        attempt: 1,
        visit: 1,
        enqueued_ms: 1_700_000_000_000,
        trace: TraceContext::default(),
    }
    .to_fields()
}

struct Produce {
    stream: Key,
    fields: Fields,
    jobs: usize,
    batch: usize,
}

impl Produce {
    /// `XADD`s pipelined `batch` at a time.
    async fn run(self, mut conn: MultiplexedConnection) -> Result<Option<Instant>, BenchError> {
        let mut left = self.jobs;
        while left > 0 {
            let n = left.min(self.batch.max(1));
            let mut pipe = redis::pipe();
            for _ in 0..n {
                pipe.xadd(&self.stream, "*", &self.fields).ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
            left -= n;
        }
        Ok(None)
    }
}

struct Consume {
    stream: Key,
    consumer: String,
    acked: Arc<AtomicUsize>,
    total: usize,
    batch: usize,
}

impl Consume {
    /// `XREADGROUP COUNT batch` then one `XACK` of every id read, until `total` jobs are
    /// acknowledged by all consumers together. The consumer whose `XACK` completes the
    /// count returns the time it did.
    async fn run(self, mut conn: MultiplexedConnection) -> Result<Option<Instant>, BenchError> {
        let opts = StreamReadOptions::default()
            .group(WORKERS_GROUP, &self.consumer)
            .count(self.batch.max(1))
            .block(BLOCK.as_millis() as usize);
        while self.acked.load(Ordering::Acquire) < self.total {
            let reply: Option<StreamReadReply> =
                conn.xread_options(&[&self.stream], &[">"], &opts).await?;
            let ids: Vec<String> = reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .map(|entry| entry.id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            #[expect(
                clippy::disallowed_methods,
                reason = "the raw Redis baseline: plain XREADGROUP/XACK is what it measures"
            )]
            let _: usize = conn.xack(&self.stream, WORKERS_GROUP, &ids).await?;
            let before = self.acked.fetch_add(ids.len(), Ordering::AcqRel);
            if before < self.total && before + ids.len() >= self.total {
                return Ok(Some(Instant::now()));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_shares_the_total_evenly() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(3000, 2), vec![1500, 1500]);
        assert_eq!(split(1, 2), vec![1, 0]);
        assert_eq!(split(5, 0), vec![5]);
    }

    #[test]
    fn the_payload_is_a_readable_job_envelope() {
        let fields = job_fields();
        let map = honua_shared::envelope::FieldMap::from_pairs(fields.clone());
        assert!(JobEnvelope::from_fields(&map).is_ok(), "{fields:?}");
    }
}
