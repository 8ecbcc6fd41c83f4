//! A local Redis Cluster for whole-system tests: six `redis-server --cluster-enabled yes`
//! nodes ([`RedisServer`]s on free loopback ports), three primaries with one replica each,
//! created with `redis-cli --cluster create`, killed and removed on drop.

use crate::RedisServer;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node may not answer before the others fail it over. Short, so a failover
/// test is quick; long enough that a loaded 2-core machine does not trigger one.
pub const NODE_TIMEOUT_MS: u64 = 2_000;

/// A free loopback port below 55535 whose cluster bus port (`port + 10000`) is free too.
/// (Both can still be taken before the node binds them: then the node exits and
/// [`RedisServer`] tries another port.)
pub fn free_cluster_port() -> u16 {
    loop {
        let port = crate::free_port();
        if port < 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisServer {
    /// A cluster-enabled node, not yet part of a cluster.
    fn start_cluster_node() -> Self {
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            // A replica takes over however long it was cut off (it never is here).
            "--cluster-replica-validity-factor",
            "0",
        ]
        .map(String::from)
        .to_vec();
        Self::start_on(free_cluster_port, false, &args, None)
    }
}

/// Polls `f` until it returns `Some`; panics with `what` after `deadline` (the synchronous
/// [`crate::wait_for`]).
pub fn poll<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        #[expect(
            clippy::disallowed_methods,
            reason = "poll interval of a synchronous wait with a deadline"
        )]
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three primaries and three replicas.
pub struct RedisCluster {
    /// Every node started; a killed one stays in place (with no process).
    pub nodes: Vec<RedisServer>,
    killed: Vec<usize>,
}

impl RedisCluster {
    /// Starts six nodes, creates the cluster and waits until every node sees every slot
    /// served (`cluster_state:ok`) and every replica is in sync with its primary.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..6).map(|_| RedisServer::start_cluster_node()).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli must be installed");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self {
            nodes,
            killed: Vec::new(),
        };
        cluster.wait_healthy();
        cluster
    }

    /// Seed URLs of every node (any of them will do for a client).
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    fn live(&self) -> impl Iterator<Item = (usize, &RedisServer)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.killed.contains(i))
    }

    fn query<T: redis::FromRedisValue>(node: &RedisServer, cmd: &redis::Cmd) -> Option<T> {
        let mut c = node.client().get_connection().ok()?;
        cmd.query(&mut c).ok()
    }

    /// Waits until every live node reports `cluster_state:ok` with all 16384 slots served,
    /// and every live replica's link to its primary is up.
    pub fn wait_healthy(&self) {
        poll("a healthy cluster", crate::DEADLINE, || {
            self.live()
                .all(|(_, n)| {
                    let info: String =
                        Self::query(n, redis::cmd("CLUSTER").arg("INFO")).unwrap_or_default();
                    let repl: String =
                        Self::query(n, redis::cmd("INFO").arg("replication")).unwrap_or_default();
                    info.contains("cluster_state:ok")
                        && info.contains("cluster_slots_ok:16384")
                        && (repl.contains("role:master") || repl.contains("master_link_status:up"))
                })
                .then_some(())
        })
    }

    /// The index of the node serving `key`'s slot as primary, as the live nodes agree.
    pub fn primary_of(&self, key: &str) -> usize {
        poll("the primary of a key", crate::DEADLINE, || {
            let mut owners = self.live().map(|(_, n)| {
                let slot: u16 = Self::query(n, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))?;
                // `[[first, last, [host, port, id], replicas…], …]`
                let ranges: Vec<Vec<redis::Value>> =
                    Self::query(n, redis::cmd("CLUSTER").arg("SLOTS"))?;
                let range = ranges.into_iter().find(|r| {
                    let bound = |i: usize| {
                        r.get(i)
                            .and_then(|v| redis::from_redis_value::<u16>(v.clone()).ok())
                    };
                    matches!((bound(0), bound(1)), (Some(lo), Some(hi)) if (lo..=hi).contains(&slot))
                })?;
                let primary: Vec<redis::Value> =
                    redis::from_redis_value(range.get(2)?.clone()).ok()?;
                let port: u16 = redis::from_redis_value(primary.get(1)?.clone()).ok()?;
                self.live().find(|(_, n)| n.port == port).map(|(i, _)| i)
            });
            let first = owners.next()??;
            owners.all(|o| o == Some(first)).then_some(first)
        })
    }

    /// The index of the replica of primary `i`.
    pub fn replica_of(&self, i: usize) -> usize {
        let id: String = poll("a node id", crate::DEADLINE, || {
            Self::query(&self.nodes[i], redis::cmd("CLUSTER").arg("MYID"))
        });
        poll("a replica", crate::DEADLINE, || {
            let replicas: Vec<String> = Self::query(
                &self.nodes[i],
                redis::cmd("CLUSTER").arg("REPLICAS").arg(&id),
            )?;
            let port = replicas
                .first()?
                .split_whitespace()
                .nth(1)?
                .split(['@', ':'])
                .nth(1)?
                .parse::<u16>()
                .ok()?;
            self.live().find(|(_, n)| n.port == port).map(|(j, _)| j)
        })
    }

    /// `kill -9` of node `i`; it stays down.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
        self.killed.push(i);
    }
}
