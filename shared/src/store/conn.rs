//! The two ways to reach a deployment's Redis, behind one [`Conn`] that every call site
//! passes to `query_async`/`invoke_async`:
//!
//! - **standalone** (`redis_url`): one auto-reconnecting [`ConnectionManager`];
//! - **cluster** (`redis_cluster_nodes`): a [`ClusterConnection`] that follows the slot map,
//!   `MOVED`/`ASK` redirections and retries `TRYAGAIN`/`CLUSTERDOWN` and lost connections a
//!   bounded number of times ([`CLUSTER_RETRIES`]), refreshing the slot map, so a failover is
//!   seen as a few failed calls that the loops retry.
//!
//! Commands with keys go where their slot lives (every key of a deployment shares one hash
//! tag, so every script and pipeline stays in one slot). Commands without keys would go to a
//! random or to every node; on a cluster the ones the services send — `PING`, `TIME`,
//! `INFO`, `COMMAND`, `WAIT`, `WAITAOF` — go to the primary that owns the slot of the
//! handle's partition (its "home", the slot of that partition's submission stream key),
//! which is the server whose clock, identity and persistence matter to its calls. `FUNCTION LOAD`/`DELETE`/`FLUSH` go to every
//! primary (the redis crate's own routing: LLM limiter buckets have hash tags of their own
//! and live on any primary), and `FUNCTION LIST` asks every primary and lists a library only
//! when all of them have it, so a primary without it (a new node, a flushed one) makes
//! [`crate::scripts::Library::ensure`] load it again. `SCAN` and `KEYS` would list one
//! node's keys as if they were all: on a cluster they fail with a clear error instead (the
//! services send neither; `ZSCAN` of one key is fine).

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// How often the cluster client retries a command on a redirection, `TRYAGAIN`,
/// `CLUSTERDOWN` or a lost connection before the caller sees the error. With
/// [`CLUSTER_RETRY_WAIT_MS`] the waits add up to about 6 s, more than a failover of a
/// `cluster-node-timeout` of a few seconds needs; the services' loops retry beyond that.
pub const CLUSTER_RETRIES: u32 = 8;
/// The bounds of the cluster client's exponential wait between retries, in ms.
pub const CLUSTER_RETRY_WAIT_MS: (u64, u64) = (50, 1000);

/// One connection handle on the deployment's Redis (cheap to clone).
#[derive(Clone)]
pub enum Conn {
    Standalone(ConnectionManager),
    Cluster {
        conn: ClusterConnection,
        /// The primary that owns the deployment's hash tag.
        home: Route,
    },
}

/// Where a keyless command goes on a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyless {
    /// To the primary of the deployment's slot.
    Home,
    /// `FUNCTION LIST`: every primary, answered with the libraries all of them have.
    EveryPrimaryList,
    /// `SCAN`/`KEYS`: one node's keys only would look like all of them; refused.
    AllKeys,
}

/// The command name, with the subcommand of a container command (`FUNCTION LIST`).
fn command_name(cmd: &Cmd) -> Option<String> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(b) => Some(String::from_utf8_lossy(b).to_ascii_uppercase()),
        _ => None,
    });
    let first = args.next()?;
    Some(match first.as_str() {
        "FUNCTION" => format!("FUNCTION {}", args.next().unwrap_or_default()),
        _ => first,
    })
}

/// How a command without keys is routed on a cluster; `None` for every other command (its
/// keys decide, or the redis crate's own routing does, as for `FUNCTION LOAD`).
fn keyless(cmd: &Cmd) -> Option<Keyless> {
    match command_name(cmd)?.as_str() {
        "PING" | "TIME" | "INFO" | "COMMAND" | "WAIT" | "WAITAOF" => Some(Keyless::Home),
        "FUNCTION LIST" => Some(Keyless::EveryPrimaryList),
        "SCAN" | "KEYS" => Some(Keyless::AllKeys),
        _ => None,
    }
}

impl Conn {
    pub(crate) fn cluster(conn: ClusterConnection, home_key: &[u8]) -> Self {
        Conn::Cluster {
            conn,
            home: Route::with_key(home_key, SlotAddr::Master),
        }
    }

    /// The same connection, with keyless commands going to the primary of `home_key`'s
    /// slot (a partition's handle: its `WAIT` and `TIME` go to its own primary).
    pub(crate) fn rehome(&self, home_key: &[u8]) -> Self {
        match self {
            Conn::Standalone(c) => Conn::Standalone(c.clone()),
            Conn::Cluster { conn, .. } => Conn::cluster(conn.clone(), home_key),
        }
    }
}

/// `FUNCTION LIST` asked of every primary (`per_node`: address → reply): the entries of the
/// first reply whose `library_name` every primary lists. A node's error is the answer.
fn libraries_on_every_primary(per_node: Value) -> RedisResult<Value> {
    let Value::Map(nodes) = per_node else {
        return Ok(per_node);
    };
    let name = |lib: &Value| -> Option<Vec<u8>> {
        let fields: Vec<(Value, Value)> = match lib {
            Value::Map(m) => m.clone(),
            Value::Array(flat) => flat
                .chunks(2)
                .filter_map(|p| Some((p.first()?.clone(), p.get(1)?.clone())))
                .collect(),
            _ => return None,
        };
        fields.into_iter().find_map(|(k, v)| {
            let key = redis::from_redis_value::<String>(k).ok()?;
            (key == "library_name")
                .then(|| redis::from_redis_value::<Vec<u8>>(v).ok())
                .flatten()
        })
    };
    let mut replies = Vec::with_capacity(nodes.len());
    for (_, reply) in nodes {
        match reply {
            Value::ServerError(e) => return Err(RedisError::from(e)),
            Value::Array(libs) => replies.push(libs),
            _ => replies.push(vec![]),
        }
    }
    let Some(first) = replies.first() else {
        return Ok(Value::Array(vec![]));
    };
    let everywhere = |n: &Vec<u8>| {
        replies
            .iter()
            .all(|libs| libs.iter().any(|l| name(l).as_ref() == Some(n)))
    };
    Ok(Value::Array(
        first
            .iter()
            .filter(|l| name(l).is_some_and(|n| everywhere(&n)))
            .cloned()
            .collect(),
    ))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster { conn, home } => match keyless(cmd) {
                None => conn.req_packed_command(cmd),
                Some(Keyless::Home) => {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(*home));
                    Box::pin(conn.route_command(cmd.clone(), route))
                }
                Some(Keyless::AllKeys) => Box::pin(async move {
                    Err(RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "not supported on a redis cluster",
                        format!(
                            "{} lists the keys of one node only",
                            command_name(cmd).unwrap_or_default()
                        ),
                    )))
                }),
                Some(Keyless::EveryPrimaryList) => Box::pin(async move {
                    let route = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                    libraries_on_every_primary(conn.route_command(cmd.clone(), route).await?)
                }),
            },
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster { conn, home } => {
                // A pipeline of keyless commands only (`INFO` + `TIME`) would go to a random
                // node; one with keys goes to their slot.
                if pipeline
                    .cmd_iter()
                    .all(|c| keyless(c) == Some(Keyless::Home))
                {
                    let route = SingleNodeRoutingInfo::SpecificNode(*home);
                    Box::pin(conn.route_pipeline(pipeline.clone(), offset, count, route))
                } else {
                    conn.req_packed_commands(pipeline, offset, count)
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyless_commands_are_routed_home_and_keyed_ones_by_their_keys() {
        assert_eq!(keyless(&redis::cmd("TIME")), Some(Keyless::Home));
        assert_eq!(
            keyless(redis::cmd("info").arg("server")),
            Some(Keyless::Home)
        );
        assert_eq!(
            keyless(redis::cmd("FUNCTION").arg("list").arg("LIBRARYNAME")),
            Some(Keyless::EveryPrimaryList)
        );
        assert_eq!(keyless(redis::cmd("FUNCTION").arg("LOAD").arg("x")), None);
        assert_eq!(
            keyless(redis::cmd("SCAN").arg(0).arg("MATCH").arg("*")),
            Some(Keyless::AllKeys)
        );
        assert_eq!(keyless(redis::cmd("XLEN").arg("{0}:jobs")), None);
        assert_eq!(keyless(redis::cmd("FCALL").arg("f").arg(1).arg("k")), None);
    }

    fn lib(name: &str) -> Value {
        Value::Map(vec![
            (
                Value::SimpleString("library_name".into()),
                Value::BulkString(name.as_bytes().to_vec()),
            ),
            (
                Value::SimpleString("engine".into()),
                Value::BulkString(b"LUA".to_vec()),
            ),
        ])
    }

    fn node(addr: &str, libs: Vec<Value>) -> (Value, Value) {
        (
            Value::BulkString(addr.as_bytes().to_vec()),
            Value::Array(libs),
        )
    }

    #[test]
    fn a_library_is_listed_only_when_every_primary_has_it() {
        let all = Value::Map(vec![
            node("a:1", vec![lib("honua_1"), lib("other")]),
            node("b:2", vec![lib("honua_1")]),
        ]);
        assert_eq!(
            libraries_on_every_primary(all).unwrap(),
            Value::Array(vec![lib("honua_1")])
        );
        let one_missing = Value::Map(vec![node("a:1", vec![lib("honua_1")]), node("b:2", vec![])]);
        assert_eq!(
            libraries_on_every_primary(one_missing).unwrap(),
            Value::Array(vec![])
        );
    }
}
