//! The Honua protocol, shared by the scheduler, the workers, the gateway and any client:
//! typed hash-tagged keys, the stream envelopes, the state codec, process definitions and
//! the pure decisions over them, the Lua scripts, configuration and Redis plumbing.

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
pub mod record;
pub mod scripts;
pub mod status;
pub mod store;

/// A random duration in [d/2, d] (jitter for backoffs and periodic loops).
pub fn jitter(d: std::time::Duration) -> std::time::Duration {
    let half = d / 2;
    half + half.mul_f64(rand::random::<f64>())
}
