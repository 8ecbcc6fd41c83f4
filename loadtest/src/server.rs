//! The Redis server under test: a private redis-server (AOF on, `appendfsync everysec`)
//! started in a temporary directory, or an existing one given by URL. Also reads what the
//! report needs from it: CPU time (`INFO cpu`), version and persistence settings.

use crate::error::BenchError;
use honua::dev::RedisChild;
use redis::InfoDict;
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A running server and how it was obtained.
pub struct Server {
    pub url: String,
    /// Taken out while [`Server::crash_and_restart`] runs.
    child: std::sync::Mutex<Option<RedisChild>>,
    private: bool,
    // Removed (with the AOF files) when the server is dropped, after the child.
    _dir: Option<tempfile::TempDir>,
}

/// Facts about the server, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    /// "private" (started by this run) or "external".
    pub origin: &'static str,
    pub version: String,
    pub aof_enabled: bool,
    /// `appendfsync` when `CONFIG GET` is allowed (managed servers often refuse it).
    pub appendfsync: Option<String>,
}

impl Server {
    /// Uses `url` when given, else starts a private redis-server.
    pub async fn start(url: Option<&str>) -> Result<Self, BenchError> {
        if let Some(url) = url {
            return Ok(Self {
                url: url.to_string(),
                child: std::sync::Mutex::new(None),
                private: false,
                _dir: None,
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("honua-loadtest-")
            .tempdir()
            .map_err(BenchError::io("cannot create a temporary directory"))?;
        let child = RedisChild::start(&dir.path().join("redis"))
            .await
            .map_err(BenchError::setup("cannot start a private redis-server"))?;
        Ok(Self {
            url: child.url.clone(),
            child: std::sync::Mutex::new(Some(child)),
            private: true,
            _dir: Some(dir),
        })
    }

    pub fn is_private(&self) -> bool {
        self.private
    }

    /// `kill -9` of a private server, `down` without it, then a restart from its AOF.
    pub async fn crash_and_restart(&self, down: Duration) -> Result<(), BenchError> {
        let taken = self.child.lock().unwrap().take();
        let Some(mut child) = taken else {
            return Err(BenchError::Component(
                "only a private server can be restarted (no --redis-url)".into(),
            ));
        };
        let r = child.crash_and_restart(down).await;
        *self.child.lock().unwrap() = Some(child);
        r.map_err(|e| BenchError::Component(format!("restarting redis-server failed: {e}")))
    }

    /// A dedicated connection; `response_timeout` must exceed any `BLOCK` used on it.
    pub async fn connect(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, BenchError> {
        let client = redis::Client::open(self.url.as_str())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(response_timeout));
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    pub async fn info(&self) -> Result<ServerInfo, BenchError> {
        let mut conn = self.connect(Duration::from_secs(5)).await?;
        let server: InfoDict = redis::cmd("INFO")
            .arg("server")
            .arg("persistence")
            .query_async(&mut conn)
            .await?;
        let version = server
            .get::<String>("redis_version")
            .ok_or(BenchError::Info("redis_version"))?;
        let aof_enabled = server.get::<u8>("aof_enabled").unwrap_or(0) == 1;
        let appendfsync: Option<(String, String)> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendfsync")
            .query_async(&mut conn)
            .await
            .ok();
        Ok(ServerInfo {
            origin: if self.is_private() {
                "private"
            } else {
                "external"
            },
            version,
            aof_enabled,
            appendfsync: appendfsync.map(|(_, v)| v),
        })
    }

    pub async fn stop(self) {
        let child = self.child.lock().unwrap().take();
        if let Some(child) = child {
            child.stop().await;
        }
    }
}

/// Seconds of CPU the server has used (`used_cpu_sys` + `used_cpu_user`), all clients
/// together: on an external server, other clients' load counts too.
pub async fn cpu_seconds(conn: &mut MultiplexedConnection) -> Result<f64, BenchError> {
    let info: InfoDict = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    let sys = info
        .get::<f64>("used_cpu_sys")
        .ok_or(BenchError::Info("used_cpu_sys"))?;
    let user = info
        .get::<f64>("used_cpu_user")
        .ok_or(BenchError::Info("used_cpu_user"))?;
    Ok(sys + user)
}

/// Calls and microseconds of every command since the server started (`INFO commandstats`).
/// Commands a script runs count on their own line and inside the script's `evalsha`.
#[derive(Debug, Clone, Default)]
pub struct CommandStats(BTreeMap<String, (u64, u64)>);

/// One command's share of a run, per operation (step or job).
#[derive(Debug, Clone, Serialize)]
pub struct CommandCost {
    pub command: String,
    pub calls_per_op: f64,
    pub usec_per_op: f64,
}

pub async fn command_stats(conn: &mut MultiplexedConnection) -> Result<CommandStats, BenchError> {
    let text: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(CommandStats::parse(&text))
}

impl CommandStats {
    /// Reads lines like `cmdstat_xadd:calls=3,usec=12,usec_per_call=4.00,...`.
    fn parse(text: &str) -> Self {
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some((name, fields)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
                out.insert(name.to_string(), (calls, usec));
            }
        }
        Self(out)
    }

    /// The `n` commands that took the most server time since `earlier`, per operation.
    pub fn top_since(&self, earlier: &CommandStats, ops: usize, n: usize) -> Vec<CommandCost> {
        let ops = ops.max(1) as f64;
        let mut costs: Vec<CommandCost> = self
            .0
            .iter()
            .filter_map(|(name, (calls, usec))| {
                let (calls0, usec0) = earlier.0.get(name).copied().unwrap_or((0, 0));
                let calls = calls.saturating_sub(calls0);
                (calls > 0).then(|| CommandCost {
                    command: name.clone(),
                    calls_per_op: calls as f64 / ops,
                    usec_per_op: usec.saturating_sub(usec0) as f64 / ops,
                })
            })
            .collect();
        costs.sort_by(|a, b| b.usec_per_op.total_cmp(&a.usec_per_op));
        costs.truncate(n);
        costs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_stats_are_parsed_and_diffed_per_operation() {
        let before = CommandStats::parse(
            "# Commandstats\r\ncmdstat_xadd:calls=10,usec=40,usec_per_call=4.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let after = CommandStats::parse(
            "# Commandstats\r\ncmdstat_xadd:calls=30,usec=100,usec_per_call=3.33\r\ncmdstat_evalsha:calls=10,usec=500,usec_per_call=50.00\r\ncmdstat_ping:calls=0,usec=0\r\n",
        );
        let top = after.top_since(&before, 10, 5);
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].command, "evalsha");
        assert_eq!(top[0].usec_per_op, 50.0);
        assert_eq!(top[1].command, "xadd");
        assert_eq!(top[1].calls_per_op, 2.0);
        assert_eq!(top[1].usec_per_op, 6.0);
    }
}
