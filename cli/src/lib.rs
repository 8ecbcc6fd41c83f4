//! The `honua` command, the one crate that stands on the scheduler, the worker and the mock
//! LLM together: the operator CLI ([`cli`]: `status`, `list`, `retry`, … over the
//! gateway's HTTP API), and [`dev`] (`honua dev` runs Redis, the scheduler, the gateway,
//! workers and optionally the mock LLM on one machine). `honua scheduler` and
//! `honua worker` run the same code as `honua-scheduler` and `honua-worker`.
//!
//! Nothing else may depend on this crate.

pub mod cli;
pub mod dev;
