//! The Honua protocol, shared by the scheduler, the workers, the gateway and any client:
//! typed hash-tagged keys ([`keys`]), the stream envelopes and their wire names
//! ([`envelope`]), the state codec, process definitions and step-kind validation
//! ([`definition`]), the pure transition decisions ([`engine`]) and their compilation into
//! script op codes ([`commit`]), the Lua scripts loaded as one Redis Functions library
//! ([`scripts`]), the Redis store split by caller ([`store`]: plumbing, the worker's fenced
//! scripts, the scheduler's commits, operator inspection), and layered configuration.
//!
//! Every other crate stands on this one; it depends on none of them, runs no step handler,
//! serves no HTTP, and reads no local clock (`shared/clippy.toml`): decisions take the time
//! they are given, which is Redis's.

#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod allowlist;
pub mod codec;
pub mod commit;
pub mod config;
pub mod definition;
pub mod engine;
pub mod envelope;
pub mod keys;
pub mod limiter;
pub mod llm_config;
pub mod llm_store;
pub mod metrics;
pub mod partition;
pub mod record;
pub mod scripts;
pub mod status;
pub mod store;

/// A random duration in [d/2, d] (jitter for backoffs and periodic loops).
pub fn jitter(d: std::time::Duration) -> std::time::Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}
