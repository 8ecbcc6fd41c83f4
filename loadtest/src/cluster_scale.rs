//! `scale --partitions 1,2,4,8`: the engine on a local Redis Cluster the run starts itself
//! (six nodes on loopback, three primaries with one replica each, AOF on; see
//! [`honua::dev::RedisClusterChildren`]), one point per partition count P: the same line
//! processes run by one scheduler and the workers with `partitions = P`, each point under a
//! key prefix of its own. Per point: steps/s, the CPU each primary used (`INFO cpu` before
//! and after, every node asked directly) and which partitions it holds, Redis CPU per step
//! summed over the primaries, and the spread (max/min primary CPU). After the points, the
//! raw Redis Streams cycle ([`crate::baseline`]) on each primary alone (a stream whose hash
//! tag lives there), so each primary's ceiling is measured in the same run.
//!
//! On one small machine the nodes, the fleet and the load generator share the cores, so
//! steps/s cannot grow with P; what shows scaling is CPU per step staying flat as P grows
//! while the load spreads over the primaries.

use crate::baseline::{self, BaselineParams, BaselineResult};
use crate::error::BenchError;
use crate::server::{self, Server};
use crate::throughput::{self, Bench, Fleet, Shape};
use honua::dev::RedisClusterChildren;
use honua_shared::keys::Keys;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct ClusterScaleParams {
    pub partitions: Vec<u16>,
    pub processes: usize,
    pub workers: usize,
    pub timeout: Duration,
    /// Before each point, move partition slots so that partition `i` lives on primary
    /// `i mod primaries` (as an operator spreads them with `redis-cli --cluster reshard`);
    /// else where the hash tags' slots fall.
    pub spread: bool,
}

/// One primary's share of a point.
#[derive(Debug, Clone, Serialize)]
pub struct PrimaryUse {
    pub port: u16,
    /// The partitions whose hash tag's slot this primary serves.
    pub partitions: Vec<u16>,
    pub cpu_secs: f64,
    /// CPU over the point's wall time (1.0 = one core busy).
    pub busy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterPoint {
    pub partitions: u16,
    pub processes: usize,
    pub steps: usize,
    pub workers: usize,
    pub seconds: f64,
    pub steps_per_sec: f64,
    pub primaries: Vec<PrimaryUse>,
    /// Redis CPU per step, the primaries summed.
    pub primaries_cpu_us_per_step: f64,
    /// The primaries' CPU (summed, cores) while the fleet idled before the point.
    pub idle_primaries_busy: f64,
    /// [`ClusterPoint::primaries_cpu_us_per_step`] less the idle CPU over the point's time.
    pub net_primaries_cpu_us_per_step: f64,
    /// The replicas' CPU per step, summed (replication).
    pub replicas_cpu_us_per_step: f64,
    /// The busiest primary's CPU over the idlest one's.
    pub max_min_primary_cpu: f64,
    pub completed: u64,
    pub anomalies: Vec<String>,
}

/// The raw cycle on one primary.
#[derive(Debug, Clone, Serialize)]
pub struct RawPrimary {
    pub port: u16,
    pub raw: BaselineResult,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterScaleReport {
    pub redis_version: String,
    pub points: Vec<ClusterPoint>,
    pub raw_per_primary: Vec<RawPrimary>,
}

/// How long the idle CPU is measured before each point.
const IDLE_WINDOW: Duration = Duration::from_secs(3);

/// The ports of the primaries.
fn primary_ports(nodes: &[Node]) -> impl Iterator<Item = u16> + '_ {
    nodes.iter().filter(|n| n.primary).map(|n| n.port)
}

/// A node of the cluster, asked directly.
struct Node {
    port: u16,
    url: String,
    primary: bool,
}

pub async fn run(params: ClusterScaleParams) -> anyhow::Result<ClusterScaleReport> {
    let dir = tempfile::Builder::new()
        .prefix("honua-loadtest-cluster-")
        .tempdir()?;
    eprintln!("starting a local cluster (3 primaries, 3 replicas) ...");
    let cluster = RedisClusterChildren::start(dir.path()).await?;
    let result = measure(&cluster, &params).await;
    cluster.stop().await;
    result
}

async fn measure(
    cluster: &RedisClusterChildren,
    params: &ClusterScaleParams,
) -> anyhow::Result<ClusterScaleReport> {
    let mut nodes = Vec::new();
    for n in &cluster.nodes {
        let role: Vec<redis::Value> = redis::cmd("ROLE")
            .query_async(&mut connect(&n.url).await?)
            .await?;
        let role: String =
            redis::from_redis_value(role.first().cloned().unwrap_or(redis::Value::Nil))?;
        nodes.push(Node {
            port: n.port,
            url: n.url.clone(),
            primary: role == "master",
        });
    }
    let first = Server::start(Some(&cluster.nodes[0].url)).await?;
    let redis_version = first.info().await?.version;
    let run_id = format!("lt-{:08x}", rand::random::<u32>());
    let mut points = Vec::new();
    for &p in &params.partitions {
        let prefix = format!("{run_id}-p{p}");
        points.push(point(cluster, &nodes, &first, &prefix, p.max(1), params).await?);
    }
    let mut raw_per_primary = Vec::new();
    for n in nodes.iter().filter(|n| n.primary) {
        // A partition whose hash tag's slot this primary serves.
        let prefix = format!("{run_id}-raw");
        let mut part = None;
        for candidate in 0..1024u16 {
            let key = Keys::new(&format!("{prefix}-raw"), candidate).jobs();
            if owner(&nodes, key.as_str()).await? == n.port {
                part = Some(candidate);
                break;
            }
        }
        let part = part.ok_or_else(|| anyhow::anyhow!("no hash tag on port {}", n.port))?;
        let server = Server::start(Some(&n.url)).await?;
        eprintln!("raw baseline on the primary at port {} ...", n.port);
        let raw = baseline::run_in(
            &server,
            &prefix,
            part,
            BaselineParams {
                jobs: params.processes * Shape::Line.steps(),
                producers: 2,
                consumers: params.workers.max(1),
                batch: 100,
            },
        )
        .await?;
        raw_per_primary.push(RawPrimary { port: n.port, raw });
    }
    Ok(ClusterScaleReport {
        redis_version,
        points,
        raw_per_primary,
    })
}

async fn connect(url: &str) -> Result<redis::aio::MultiplexedConnection, BenchError> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// The port of the primary serving `key`'s slot, as the first node sees it.
async fn owner(nodes: &[Node], key: &str) -> Result<u16, BenchError> {
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut connect(&nodes[0].url).await?)
        .await?;
    owner_as_seen_by(&nodes[0], slot).await
}

/// The port of the primary serving `slot`, as node `n` sees it (`CLUSTER SLOTS`:
/// `[[first, last, [host, port, id], replicas…], …]`).
async fn owner_as_seen_by(n: &Node, slot: u16) -> Result<u16, BenchError> {
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut connect(&n.url).await?)
        .await?;
    let int =
        |v: Option<&redis::Value>| v.and_then(|v| redis::from_redis_value::<u16>(v.clone()).ok());
    ranges
        .iter()
        .find(|r| matches!((int(r.first()), int(r.get(1))), (Some(lo), Some(hi)) if (lo..=hi).contains(&slot)))
        .and_then(|r| {
            let node: Vec<redis::Value> = redis::from_redis_value(r.get(2)?.clone()).ok()?;
            int(node.get(1))
        })
        .ok_or(BenchError::Info("a slot owner in CLUSTER SLOTS"))
}

/// Moves the slots of the partitions' hash tags so that partition `i` is served by the
/// `i mod n`-th of the `n` primaries (in port order); returns how many slots moved.
async fn spread(
    nodes: &[Node],
    store: &honua_shared::store::Store,
    partitions: u16,
) -> Result<usize, BenchError> {
    let mut primaries: Vec<&Node> = nodes.iter().filter(|n| n.primary).collect();
    primaries.sort_by_key(|n| n.port);
    let mut moved = 0;
    for part in 0..partitions {
        let key = store.in_partition(part).keys().submit();
        let to = primaries[usize::from(part) % primaries.len()];
        let from = owner(nodes, key.as_str()).await?;
        if from != to.port {
            let from = nodes
                .iter()
                .find(|n| n.port == from)
                .ok_or(BenchError::Info("the slot owner among the nodes"))?;
            move_slot(nodes, key.as_str(), from, to).await?;
            moved += 1;
        }
    }
    Ok(moved)
}

/// Moves the slot of `key` from primary `from` to primary `to` the way `redis-cli
/// --cluster reshard` moves a slot (`SETSLOT IMPORTING`/`MIGRATING`, `MIGRATE` of its keys
/// in batches, `SETSLOT NODE` on every primary), then waits until every node agrees.
async fn move_slot(nodes: &[Node], key: &str, from: &Node, to: &Node) -> Result<(), BenchError> {
    let mut src = connect(&from.url).await?;
    let mut dst = connect(&to.url).await?;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut src)
        .await?;
    let src_id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut src)
        .await?;
    let dst_id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut dst)
        .await?;
    let setslot = |state: &str, id: &str| {
        let mut c = redis::cmd("CLUSTER");
        c.arg("SETSLOT").arg(slot).arg(state).arg(id);
        c
    };
    let () = setslot("IMPORTING", &src_id).query_async(&mut dst).await?;
    let () = setslot("MIGRATING", &dst_id).query_async(&mut src).await?;
    loop {
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query_async(&mut src)
            .await?;
        if keys.is_empty() {
            break;
        }
        let () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to.port)
            .arg("")
            .arg(0)
            .arg(10_000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut src)
            .await?;
    }
    let () = setslot("NODE", &dst_id).query_async(&mut dst).await?;
    let () = setslot("NODE", &dst_id).query_async(&mut src).await?;
    for n in nodes
        .iter()
        .filter(|n| n.primary && n.port != from.port && n.port != to.port)
    {
        let () = setslot("NODE", &dst_id)
            .query_async(&mut connect(&n.url).await?)
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut agreed = true;
        for n in nodes {
            agreed &= owner_as_seen_by(n, slot).await? == to.port;
        }
        if agreed {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Stuck(format!(
                "slot {slot} moved to port {}, but not every node agrees after 30 s",
                to.port
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seconds of CPU of every node, by port.
async fn cpu(nodes: &[Node]) -> Result<BTreeMap<u16, f64>, BenchError> {
    let mut out = BTreeMap::new();
    for n in nodes {
        out.insert(
            n.port,
            server::cpu_seconds(&mut connect(&n.url).await?).await?,
        );
    }
    Ok(out)
}

async fn point(
    cluster: &RedisClusterChildren,
    nodes: &[Node],
    first: &Server,
    prefix: &str,
    partitions: u16,
    params: &ClusterScaleParams,
) -> anyhow::Result<ClusterPoint> {
    let seeds = cluster.seeds();
    let bench = Bench::prepare_with(first, prefix, &Shape::Line.definition("noop"), |cfg| {
        cfg.redis_url = honua_shared::config::DEFAULT_REDIS_URL.into();
        cfg.redis_cluster_nodes = seeds;
        cfg.partitions = partitions;
        cfg.worker.max_concurrent_steps = 64;
    })?;
    if params.spread {
        let moved = spread(nodes, &bench.store, partitions).await?;
        if moved > 0 {
            eprintln!("moved {moved} partition slot(s) so the primaries take turns");
        }
    }
    let mut held: BTreeMap<u16, Vec<u16>> = BTreeMap::new();
    for part in 0..partitions {
        let key = bench.store.in_partition(part).keys().submit();
        held.entry(owner(nodes, key.as_str()).await?)
            .or_default()
            .push(part);
    }
    let shutdown = CancellationToken::new();
    let fleet = match Fleet::start(&bench, 1, params.workers, &shutdown).await {
        Ok(f) => f,
        Err(e) => {
            shutdown.cancel();
            return Err(e.into());
        }
    };
    let measured = async {
        let engine = bench.engine().await;
        throughput::warm_up(&engine, throughput::warm_up_processes(params.workers)).await?;
        let before = throughput::outcome(&bench.store).await?;
        eprintln!(
            "{partitions} partition(s): {} processes, 1 scheduler, {} workers ...",
            params.processes, params.workers
        );
        // The fleet's fixed cost: the primaries' CPU while it idles (timer, takeover and
        // intake loops and reads per partition, the workers' sweeps).
        let idle_before = cpu(nodes).await?;
        tokio::time::sleep(IDLE_WINDOW).await;
        let idle_after = cpu(nodes).await?;
        let idle: f64 = primary_ports(nodes)
            .map(|p| idle_after[&p] - idle_before[&p])
            .sum::<f64>()
            / IDLE_WINDOW.as_secs_f64();
        let cpu_before = cpu(nodes).await?;
        let start = Instant::now();
        let (done, _) = throughput::submit_and_wait(
            engine,
            before,
            params.processes,
            32,
            params.timeout,
            format!("cluster, {partitions} partition(s)"),
        )
        .await?;
        let seconds = start.elapsed().as_secs_f64();
        let cpu_after = cpu(nodes).await?;
        Ok::<_, BenchError>((done, seconds, cpu_before, cpu_after, idle))
    }
    .await;
    shutdown.cancel();
    let (stats, stopped) = fleet.stop().await;
    let total = params.processes + throughput::warm_up_processes(params.workers);
    let health = throughput::health(&bench.store, stats, total * Shape::Line.steps()).await?;
    let (done, seconds, before, after, idle) = measured?;
    stopped?;
    let steps = params.processes * Shape::Line.steps();
    let used = |port: u16| after[&port] - before[&port];
    let primaries: Vec<PrimaryUse> = nodes
        .iter()
        .filter(|n| n.primary)
        .map(|n| PrimaryUse {
            port: n.port,
            partitions: held.get(&n.port).cloned().unwrap_or_default(),
            cpu_secs: used(n.port),
            busy: used(n.port) / seconds,
        })
        .collect();
    let per_step = 1e6 / steps.max(1) as f64;
    let primaries_cpu: f64 = primaries.iter().map(|p| p.cpu_secs).sum();
    let replicas_cpu: f64 = nodes
        .iter()
        .filter(|n| !n.primary)
        .map(|n| used(n.port))
        .sum();
    let max = primaries.iter().map(|p| p.cpu_secs).fold(0.0, f64::max);
    let min = primaries
        .iter()
        .map(|p| p.cpu_secs)
        .fold(f64::INFINITY, f64::min);
    Ok(ClusterPoint {
        partitions,
        processes: params.processes,
        steps,
        workers: params.workers,
        seconds,
        steps_per_sec: steps as f64 / seconds,
        primaries,
        primaries_cpu_us_per_step: primaries_cpu * per_step,
        idle_primaries_busy: idle,
        net_primaries_cpu_us_per_step: (primaries_cpu - idle * seconds).max(0.0) * per_step,
        replicas_cpu_us_per_step: replicas_cpu * per_step,
        max_min_primary_cpu: max / min.max(1e-9),
        completed: done.completed,
        anomalies: health.anomalies(),
    })
}

impl ClusterScaleReport {
    /// The report as text: one line per point, the primaries' CPU, and the raw cycle.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Redis Cluster scale (redis {}, 3 primaries + 3 replicas on this host)",
            self.redis_version
        );
        let _ = writeln!(
            s,
            "{:>3} {:>9} {:>14} {:>10} {:>10} {:>14} {:>8}  primaries: port [partitions] CPU s (busy)",
            "P", "steps/s", "prim µs/step", "idle busy", "net µs", "repl µs/step", "max/min"
        );
        for p in &self.points {
            let prim: Vec<String> = p
                .primaries
                .iter()
                .map(|u| {
                    format!(
                        "{} {:?} {:.2} ({:.0}%)",
                        u.port,
                        u.partitions,
                        u.cpu_secs,
                        u.busy * 100.0
                    )
                })
                .collect();
            let _ = writeln!(
                s,
                "{:>3} {:>9.0} {:>14.1} {:>10.3} {:>10.1} {:>14.1} {:>8.2}  {}",
                p.partitions,
                p.steps_per_sec,
                p.primaries_cpu_us_per_step,
                p.idle_primaries_busy,
                p.net_primaries_cpu_us_per_step,
                p.replicas_cpu_us_per_step,
                p.max_min_primary_cpu,
                prim.join("; ")
            );
            if !p.anomalies.is_empty() {
                let _ = writeln!(s, "    anomalies: {}", p.anomalies.join("; "));
            }
        }
        for r in &self.raw_per_primary {
            let _ = writeln!(
                s,
                "raw cycle on primary {}: {:.0} jobs/s, {:.1} µs Redis CPU per job ({:.0}% busy)",
                r.port,
                r.raw.jobs_per_sec,
                r.raw.redis_cpu_us_per_job,
                r.raw.redis_busy * 100.0
            );
        }
        s
    }
}
