//! What can stop a benchmark, typed by where it comes from. `main` wraps these in anyhow.

use honua_scheduler::SubmitError;
use honua_shared::config::ConfigError;
use honua_shared::store::StoreError;

/// A boxed error from an API that returns `anyhow::Error` (kept as a source chain).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("redis command failed")]
    Redis(#[from] redis::RedisError),
    #[error("store call failed")]
    Store(#[from] StoreError),
    #[error("submission refused")]
    Submit(#[from] SubmitError),
    #[error("invalid benchmark config")]
    Config(#[from] ConfigError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Setup {
        context: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("INFO reply has no {0}")]
    Info(&'static str),
    /// The run did not finish in time; the message holds the progress seen.
    #[error("{0}")]
    Stuck(String),
    /// A component (scheduler, worker, benchmark task) stopped abnormally.
    #[error("{0}")]
    Component(String),
}

impl BenchError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }

    pub fn setup(context: &'static str) -> impl FnOnce(anyhow::Error) -> Self {
        move |e| Self::Setup {
            context,
            source: e.into(),
        }
    }
}
