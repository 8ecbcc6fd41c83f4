//! A worker in a child process of its own (`honua-loadtest worker-child`), so the crash
//! scenario can `kill -9` it: the engine's `Worker` with the built-in kinds plus `probe`,
//! which counts its executions in a hash of the run (`HINCRBY <probe key>
//! <process id>:<step> 1`, a count that survives the kill), and per claim in a second one
//! (`HINCRBY <probe key>:claims <process id>:<step>:<delivery count> 1`), then takes
//! `--probe-ms`, so that a kill finds steps running.

use anyhow::Context;
use async_trait::async_trait;
use honua_shared::config::Config;
use honua_shared::definition::DefinitionSet;
use honua_shared::store::Store;
use honua_worker::{StepContext, StepError, StepHandler, StepOutput, Worker};
use redis::aio::ConnectionManager;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The step kind whose executions are counted.
pub const PROBE_KIND: &str = "probe";

/// What the parent passes to a child worker.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    #[arg(long)]
    pub redis_url: String,
    #[arg(long)]
    pub key_prefix: String,
    #[arg(long)]
    pub definitions_dir: PathBuf,
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub lease_ms: u64,
    #[arg(long)]
    pub sweep_ms: u64,
    #[arg(long)]
    pub max_concurrent_steps: usize,
    /// The hash that counts executions of `probe` steps.
    #[arg(long)]
    pub probe_key: String,
    /// How long each `probe` step takes after counting itself.
    #[arg(long, default_value_t = 0)]
    pub probe_ms: u64,
    /// `[llm_provider]` as JSON: the worker registers the `llm` kind.
    #[arg(long)]
    pub llm_config: Option<PathBuf>,
}

impl ChildArgs {
    /// The arguments for a child worker of the run configured by `cfg`.
    pub fn of(cfg: &Config, id: &str, probe_key: &str, probe_ms: u64) -> Self {
        Self {
            redis_url: cfg.redis_url.clone(),
            key_prefix: cfg.key_prefix.clone(),
            definitions_dir: cfg.definitions_dir.clone(),
            id: id.to_string(),
            lease_ms: cfg.worker.lease_ms,
            sweep_ms: cfg.worker.sweep_ms,
            max_concurrent_steps: cfg.worker.max_concurrent_steps,
            probe_key: probe_key.to_string(),
            probe_ms,
            llm_config: None,
        }
    }

    pub fn to_args(&self) -> Vec<String> {
        vec![
            "worker-child".into(),
            "--redis-url".into(),
            self.redis_url.clone(),
            "--key-prefix".into(),
            self.key_prefix.clone(),
            "--definitions-dir".into(),
            self.definitions_dir.display().to_string(),
            "--id".into(),
            self.id.clone(),
            "--lease-ms".into(),
            self.lease_ms.to_string(),
            "--sweep-ms".into(),
            self.sweep_ms.to_string(),
            "--max-concurrent-steps".into(),
            self.max_concurrent_steps.to_string(),
            "--probe-key".into(),
            self.probe_key.clone(),
            "--probe-ms".into(),
            self.probe_ms.to_string(),
        ]
        .into_iter()
        .chain(
            self.llm_config
                .iter()
                .flat_map(|p| ["--llm-config".to_string(), p.display().to_string()]),
        )
        .collect()
    }
}

/// The hash that counts `probe` executions per claim (process, step, delivery count).
pub fn claims_key(probe_key: &str) -> String {
    format!("{probe_key}:claims")
}

/// Counts its executions, takes `duration`, then succeeds.
struct Probe {
    /// Reconnects by itself after a Redis restart (the redis nemesis).
    conn: ConnectionManager,
    key: String,
    duration: Duration,
}

#[async_trait]
impl StepHandler for Probe {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let field = format!("{}:{}", ctx.process_id, ctx.step);
        let claim = format!("{field}:{}", ctx.deliveries);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hincr(&self.key, field, 1)
            .hincr(claims_key(&self.key), claim, 1);
        // After a Redis restart the connection fails its first command, then reconnects:
        // a failed count is not a failed step (it would add an attempt to the record).
        let mut tries = 0;
        loop {
            tries += 1;
            match pipe.query_async::<(i64, i64)>(&mut self.conn.clone()).await {
                Ok(_) => break,
                Err(e) if tries >= 50 => {
                    return Err(StepError::Retryable(format!("probe count failed: {e}")));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        if !self.duration.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(self.duration) => {}
                () = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
            }
        }
        Ok(StepOutput::ok())
    }
}

/// Runs the worker until it is killed (the parent ends it with SIGKILL).
pub async fn run(args: ChildArgs) -> anyhow::Result<()> {
    honua_runtime::install_crypto_provider();
    let mut cfg = Config {
        redis_url: args.redis_url.clone(),
        key_prefix: args.key_prefix.clone(),
        definitions_dir: args.definitions_dir.clone(),
        ..Config::default()
    };
    cfg.worker.id = Some(args.id.clone());
    cfg.worker.lease_ms = args.lease_ms;
    cfg.worker.sweep_ms = args.sweep_ms;
    cfg.worker.max_concurrent_steps = args.max_concurrent_steps;
    cfg.worker.metrics_addr = String::new();
    if let Some(path) = &args.llm_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        cfg.llm_provider = Some(
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not an llm_provider config", path.display()))?,
        );
    }
    cfg.validate()?;
    let conn = redis::Client::open(cfg.redis_url.as_str())?
        .get_connection_manager()
        .await
        .context("the probe cannot connect")?;
    let mut handlers = honua_worker::builtin_handlers(&cfg);
    handlers.register(
        PROBE_KIND,
        |_| Ok(()),
        Probe {
            conn,
            key: args.probe_key.clone(),
            duration: Duration::from_millis(args.probe_ms),
        },
    );
    let defs = DefinitionSet::load_dir(&cfg.definitions_dir, handlers.kinds())
        .with_context(|| format!("definitions in {}", cfg.definitions_dir.display()))?;
    let store = Store::from_config(&cfg)?;
    let worker = Worker::new(cfg, store, Arc::new(defs), Arc::new(handlers));
    worker.run(CancellationToken::new()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        WorkerChild(ChildArgs),
    }

    #[test]
    fn child_arguments_survive_the_command_line() {
        let mut cfg = Config {
            redis_url: "redis://127.0.0.1:7001".into(),
            key_prefix: "lt-1".into(),
            definitions_dir: PathBuf::from("defs dir"),
            ..Config::default()
        };
        cfg.worker.lease_ms = 2000;
        cfg.worker.sweep_ms = 500;
        let args = ChildArgs::of(&cfg, "lt-child-3", "lt-1-probe", 50);
        let argv = std::iter::once("honua-loadtest".to_string()).chain(args.to_args());
        let Cmd::WorkerChild(parsed) = Cli::try_parse_from(argv).unwrap().cmd;
        assert_eq!(parsed.redis_url, cfg.redis_url);
        assert_eq!(parsed.definitions_dir, cfg.definitions_dir);
        assert_eq!(parsed.id, "lt-child-3");
        assert_eq!((parsed.lease_ms, parsed.sweep_ms), (2000, 500));
        assert_eq!(parsed.max_concurrent_steps, cfg.worker.max_concurrent_steps);
        assert_eq!(
            (parsed.probe_key.as_str(), parsed.probe_ms),
            ("lt-1-probe", 50)
        );
    }
}
