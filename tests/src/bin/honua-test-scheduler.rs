//! A scheduler (with its gateway) in a child process of its own for the whole-system tests,
//! so a test can `kill -9` it: `honua_scheduler::run_scheduler` with the [`Config`] the test
//! built, read as JSON from the file `HONUA_TEST_CONFIG` (scheduler timings have no `HONUA_*`
//! variables). Logs JSON to stdout. It runs until killed (SIGTERM too ends it at once).

use anyhow::Context;
use honua_runtime::telemetry::{self, LogFormat};
use honua_shared::config::Config;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _telemetry = telemetry::init_from_env(LogFormat::Json);
    honua_runtime::install_crypto_provider();
    let path = std::env::var("HONUA_TEST_CONFIG").context("HONUA_TEST_CONFIG")?;
    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    honua_scheduler::run_scheduler(cfg, None, CancellationToken::new()).await
}
