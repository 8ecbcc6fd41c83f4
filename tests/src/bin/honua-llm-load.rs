//! `honua-llm-load '<LoadSpec JSON or array of them>'`: one limiter user (own process, own
//! Redis connection, one limiter for all its buckets) for the LLM limiter tests; prints its
//! [`honua_tests::llm_load::LoadReport`]s as a JSON array, one per spec.

use honua_shared::keys::Keys;
use honua_shared::store::Store;
use honua_tests::llm_load::{self, LoadSpec};
use honua_worker::limit::LlmLimiter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    honua_runtime::install_crypto_provider();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let arg = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: honua-llm-load '<LoadSpec JSON>'"))?;
    let specs: Vec<LoadSpec> = match serde_json::from_str::<serde_json::Value>(&arg)? {
        v @ serde_json::Value::Array(_) => serde_json::from_value(v)?,
        v => vec![serde_json::from_value(v)?],
    };
    let first = specs
        .first()
        .ok_or_else(|| anyhow::anyhow!("no load spec given"))?;
    let store = Store::open(&first.redis_url, Keys::new(&first.prefix, 0))?;
    let limiter = LlmLimiter::new(
        store,
        specs
            .iter()
            .map(|s| (s.bucket.clone(), s.spec.clone()))
            .collect(),
    );
    let runs = specs.iter().map(|s| {
        let limiter = limiter.clone();
        async move { llm_load::run(s, limiter, llm_load::Hooks::default()).await }
    });
    let reports = futures::future::join_all(runs).await;
    println!("{}", serde_json::to_string(&reports)?);
    Ok(())
}
