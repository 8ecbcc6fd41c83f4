//! `honua-mock-llm`: the mock OpenAI-compatible (and Anthropic, at `/v1/messages`) provider
//! as a standalone server.
//!
//! ```text
//! honua-mock-llm --port 8089 --latency-ms 50..200 --rpm 600 --tpm 100000 --faults 429:2,500,ok \
//!     --rate-limit-every 10
//! ```

use clap::Parser;
use honua_mock_llm::{EveryNth, Fault, Latency, MockConfig, MockLlm, WindowLimit};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "honua-mock-llm",
    about = "A mock OpenAI-compatible and Anthropic LLM provider"
)]
struct Args {
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1", env = "HONUA_MOCK_LLM_HOST")]
    host: std::net::IpAddr,
    /// Port to bind (0 = any free port).
    #[arg(long, default_value_t = 8089, env = "HONUA_MOCK_LLM_PORT")]
    port: u16,
    /// Latency before answering: `N` ms, or `MIN..MAX` ms (uniform).
    #[arg(long, default_value = "0")]
    latency_ms: String,
    /// Requests per minute the mock admits before answering 429 (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    rpm: u64,
    /// Tokens (prompt + completion) per minute the mock admits (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    tpm: u64,
    /// Length of the sliding window the rpm/tpm limits are counted over.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Scripted answers for the first requests, e.g. `429:2,500,503,hang,stall:3,ok`.
    #[arg(long, default_value = "")]
    faults: String,
    /// Every Nth chat request answers 429 with `Retry-After` (0 = never).
    #[arg(long, default_value_t = 0)]
    rate_limit_every: u64,
    /// The `Retry-After` of those 429s.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    rate_limit_retry_after: Duration,
    /// Model name reported by `GET /v1/models`.
    #[arg(long, default_value = "mock-gpt")]
    model: String,
    /// Send `retry-after`, `retry-after-ms` and `x-ratelimit-*` only under LiteLLM's
    /// `llm_provider-` prefix, as a proxy in front of a provider does.
    #[arg(long)]
    proxy_headers: bool,
}

fn parse_latency(s: &str) -> Result<Latency, String> {
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| format!("--latency-ms {s:?}: expected N or MIN..MAX milliseconds"))
    };
    match s.split_once("..") {
        Some((a, b)) => {
            let (min, max) = (ms(a)?, ms(b)?);
            if max < min {
                return Err(format!("--latency-ms {s:?}: MAX is below MIN"));
            }
            Ok(Latency::Uniform { min, max })
        }
        None => Ok(Latency::Fixed(ms(s)?)),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let latency = parse_latency(&args.latency_ms).map_err(anyhow::Error::msg)?;
    let faults = Fault::parse_script(&args.faults).map_err(anyhow::Error::msg)?;
    let limit = (args.rpm > 0 || args.tpm > 0).then_some(WindowLimit {
        window: args.window,
        max_requests: args.rpm,
        max_tokens: args.tpm,
    });
    let cfg = MockConfig {
        model: args.model,
        latency,
        limit,
        faults,
        rate_limit_every: (args.rate_limit_every > 0).then_some(EveryNth {
            every: args.rate_limit_every,
            retry_after: args.rate_limit_retry_after,
        }),
        proxy_headers: args.proxy_headers,
        ..MockConfig::default()
    };
    let mock = MockLlm::start_on(cfg, SocketAddr::new(args.host, args.port)).await?;
    println!("honua-mock-llm listening on {}", mock.base_url());
    tokio::signal::ctrl_c().await?;
    mock.stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_flag_parses() {
        assert_eq!(
            parse_latency("50").unwrap(),
            Latency::Fixed(Duration::from_millis(50))
        );
        assert_eq!(
            parse_latency("10..20").unwrap(),
            Latency::Uniform {
                min: Duration::from_millis(10),
                max: Duration::from_millis(20)
            }
        );
        assert!(parse_latency("20..10").is_err());
        assert!(parse_latency("x").is_err());
    }
}
