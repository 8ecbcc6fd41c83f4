//! `honua`: the operator command. `honua dev` runs the whole system on one machine;
//! `honua scheduler` and `honua worker` run one role each; the other subcommands (`ps`,
//! `get`, `submit`, ...) talk to a gateway over HTTP ([`honua::cli`], which
//! documents their exit codes).

use clap::{Parser, Subcommand};
use honua::cli::{self, CliArgs};
use honua::dev::{self, DevOptions, MockLlmOptions};
use honua_runtime::telemetry::{self, LogFormat};
use honua_shared::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Honua Process Framework", after_help = cli::AFTER_HELP)]
struct Cli {
    /// Config file (TOML); also HONUA_CONFIG.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Options of the operator commands.
    #[command(flatten)]
    ops: cli::GlobalOpts,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Role(Role),
    #[command(flatten)]
    Ops(cli::Command),
}

/// The roles that run the system (they read the config).
#[derive(Subcommand)]
enum Role {
    /// Everything on one machine: private Redis (unless HONUA_REDIS_URL is set), scheduler,
    /// gateway on :9090 and in-process workers; submits the example processes.
    Dev {
        /// In-process workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Where the private Redis keeps its AOF.
        #[arg(long, default_value = ".honua-dev")]
        data_dir: PathBuf,
        /// Don't submit the example processes.
        #[arg(long)]
        no_examples: bool,
        /// Leave approval steps waiting for your signal.
        #[arg(long)]
        no_auto_approve: bool,
        /// Run LLM steps without a paid API: start the mock OpenAI-compatible provider in
        /// process, point the `llm` step kind at it and add the example process type
        /// LlmExample. An error when the config has an [llm_provider] section.
        #[arg(long)]
        mock_llm: bool,
        /// With --mock-llm: every Nth request to the mock answers 429 with Retry-After
        /// (0 = never).
        #[arg(long, value_name = "N", default_value_t = MockLlmOptions::default().rate_limit_every, requires = "mock_llm")]
        mock_llm_429_every: u64,
    },
    /// The scheduler loops and the HTTP gateway (as honua-scheduler).
    Scheduler,
    /// A worker with the built-in step kinds (as honua-worker).
    Worker,
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let role = match cli.cmd {
        Cmd::Role(role) => role,
        Cmd::Ops(command) => {
            let mut global = cli.ops;
            global.token = std::env::var("HONUA_TOKEN").ok().filter(|t| !t.is_empty());
            let args = CliArgs { global, command };
            let runtime = honua_runtime::build_runtime("honua", 0)?;
            let code = runtime.block_on(cli::run(
                args,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            ));
            return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
        }
    };
    honua_runtime::install_crypto_provider();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let redis_from_env = env
        .iter()
        .find(|(k, _)| k == "HONUA_REDIS_URL")
        .map(|(_, v)| v.clone());
    let cfg = Config::load(cli.config.as_deref(), env)?;
    // Validated before the runtime is built from it, as the services' binaries do (each
    // role validates again, `dev` once it has filled in its Redis).
    cfg.validate()?;
    let runtime = honua_runtime::build_runtime("honua", cfg.runtime_threads)?;
    runtime.block_on(run_role(role, cfg, redis_from_env))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs one role on the runtime `runtime_threads` sized.
async fn run_role(role: Role, cfg: Config, redis_from_env: Option<String>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let hand_back = CancellationToken::new();
    tokio::spawn(telemetry::shutdown_signals(
        shutdown.clone(),
        hand_back.clone(),
    ));
    match role {
        Role::Dev {
            workers,
            data_dir,
            no_examples,
            no_auto_approve,
            mock_llm,
            mock_llm_429_every,
        } => {
            let _telemetry = telemetry::init_from_env(LogFormat::Human);
            let opts = DevOptions {
                workers,
                data_dir,
                submit_examples: !no_examples,
                auto_approve: !no_auto_approve,
                redis_url: redis_from_env,
                mock_llm: mock_llm.then_some(MockLlmOptions {
                    rate_limit_every: mock_llm_429_every,
                }),
                hand_back,
            };
            dev::run(cfg, opts, shutdown).await?
        }
        Role::Scheduler => {
            let _telemetry = telemetry::init_from_env(LogFormat::Json);
            honua_scheduler::run_scheduler(cfg, None, shutdown).await?
        }
        Role::Worker => {
            let _telemetry = telemetry::init_from_env(LogFormat::Json);
            let handlers = honua_worker::builtin_handlers(&cfg);
            honua_worker::run_main(cfg, handlers, shutdown).await?
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn roles_and_operator_commands_parse() {
        let cli = Cli::try_parse_from(["honua", "dev", "--workers", "3"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Role(Role::Dev { workers: 3, .. })));
        let cli = Cli::try_parse_from(["honua", "dev", "--mock-llm"]).unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Role(Role::Dev {
                mock_llm: true,
                mock_llm_429_every: 5,
                ..
            })
        ));
        let cli = Cli::try_parse_from(["honua", "dev", "--mock-llm", "--mock-llm-429-every", "0"])
            .unwrap();
        assert!(matches!(
            cli.cmd,
            Cmd::Role(Role::Dev {
                mock_llm_429_every: 0,
                ..
            })
        ));
        // The 429 rate only means something with the mock.
        assert!(Cli::try_parse_from(["honua", "dev", "--mock-llm-429-every", "3"]).is_err());
        let cli = Cli::try_parse_from(["honua", "--url", "http://h:1", "ps", "--json"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Ops(cli::Command::Ps(_))));
        assert!(cli.ops.json);
        assert_eq!(cli.ops.url, "http://h:1");
    }
}
