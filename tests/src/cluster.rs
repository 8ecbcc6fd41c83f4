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

/// Keys per `MIGRATE` when [`RedisCluster::move_slot`] moves a slot (`redis-cli --cluster
/// reshard`'s default `--cluster-pipeline`).
pub const MIGRATE_BATCH: usize = 10;

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
            .args(honua::dev::cluster_create_args(
                nodes.iter().map(|n| n.port),
            ))
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
                    honua::dev::cluster_node_ready(&info, &repl)
                })
                .then_some(())
        })
    }

    /// The port of the primary serving `slot`, as node `n` sees it (`CLUSTER SLOTS`).
    fn owner_port(n: &RedisServer, slot: u16) -> Option<u16> {
        // `[[first, last, [host, port, id], replicas…], …]`
        let ranges: Vec<Vec<redis::Value>> = Self::query(n, redis::cmd("CLUSTER").arg("SLOTS"))?;
        let int = |v: Option<&redis::Value>| {
            v.and_then(|v| redis::from_redis_value::<u16>(v.clone()).ok())
        };
        let range = ranges.into_iter().find(|r| {
            matches!((int(r.first()), int(r.get(1))), (Some(lo), Some(hi)) if (lo..=hi).contains(&slot))
        })?;
        let primary: Vec<redis::Value> = redis::from_redis_value(range.get(2)?.clone()).ok()?;
        int(primary.get(1))
    }

    /// The index of the node serving `key`'s slot as primary, as the live nodes agree.
    pub fn primary_of(&self, key: &str) -> usize {
        let slot = self.slot_of(key);
        poll("the primary of a key", crate::DEADLINE, || {
            let mut owners = self.live().map(|(_, n)| {
                let port = Self::owner_port(n, slot)?;
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

    /// The cluster slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        poll("a key's slot", crate::DEADLINE, || {
            let (_, n) = self.live().next()?;
            Self::query(n, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
        })
    }

    /// The cluster node id of node `i`.
    pub fn id_of(&self, i: usize) -> String {
        poll("a node id", crate::DEADLINE, || {
            Self::query(&self.nodes[i], redis::cmd("CLUSTER").arg("MYID"))
        })
    }

    /// The indexes of the live primaries.
    pub fn primaries(&self) -> Vec<usize> {
        self.live()
            .filter(|(_, n)| {
                let role: Option<Vec<redis::Value>> = Self::query(n, &redis::cmd("ROLE"));
                role.and_then(|r| redis::from_redis_value::<String>(r.first()?.clone()).ok())
                    .is_some_and(|r| r == "master")
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Moves `slot` from primary `from` to primary `to` while clients keep using it, as
    /// `redis-cli --cluster reshard` moves each slot: the target marks it `IMPORTING`, the
    /// source `MIGRATING` (from then on the source answers `ASK` for a key it no longer has
    /// and `TRYAGAIN` for a multi-key call whose keys are split), `MIGRATE` carries its keys
    /// over [`MIGRATE_BATCH`] at a time, and `SETSLOT … NODE` hands it to the target on the
    /// target, the source and every other primary (clients then get `MOVED`). Waits until
    /// every live node agrees, and returns how many keys moved.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) -> usize {
        let (src_id, dst_id) = (self.id_of(from), self.id_of(to));
        let mut src = self.nodes[from].client().get_connection().unwrap();
        let mut dst = self.nodes[to].client().get_connection().unwrap();
        let setslot = |c: &mut redis::Connection, state: &str, id: &str| {
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .query(c)
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state}: {e}"));
        };
        setslot(&mut dst, "IMPORTING", &src_id);
        setslot(&mut src, "MIGRATING", &dst_id);
        let mut moved = 0;
        loop {
            let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(MIGRATE_BATCH)
                .query(&mut src)
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port)
                .arg("")
                .arg(0)
                .arg(10_000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut src)
                .unwrap_or_else(|e| panic!("MIGRATE of slot {slot}: {e}"));
            moved += keys.len();
        }
        setslot(&mut dst, "NODE", &dst_id);
        setslot(&mut src, "NODE", &dst_id);
        for i in self.primaries() {
            if i != from && i != to {
                let mut c = self.nodes[i].client().get_connection().unwrap();
                setslot(&mut c, "NODE", &dst_id);
            }
        }
        poll("every node to see the slot moved", crate::DEADLINE, || {
            self.live()
                .all(|(_, n)| Self::owner_port(n, slot) == Some(self.nodes[to].port))
                .then_some(())
        });
        moved
    }

    /// `kill -9` of node `i`; it stays down.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
        self.killed.push(i);
    }
}
