//! What every Honua binary runs on, and nothing about processes: logging and OTLP tracing
//! set-up ([`telemetry`]), the Prometheus recorder and its listener, the hardened HTTP
//! server under the gateway and the worker's metrics ([`http_server`]), the TLS provider,
//! and jittered delays.
//!
//! It stands on `honua-shared` only (for config and metric names); the scheduler and the
//! worker both use it, and it may not depend on either.

#![warn(clippy::print_stdout, clippy::print_stderr)]

pub mod http_server;
pub mod telemetry;

pub use honua_shared::jitter;

/// The async runtime a service runs on: `threads` worker threads (`runtime_threads`; 0:
/// one per CPU the process may use), named `name`.
pub fn build_runtime(name: &str, threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    b.thread_name(name).enable_all().build()
}

/// Installs rustls's ring provider once (reqwest is built without a default provider).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
