//! The `honua` operator commands: the gateway's HTTP API from a terminal or a script.
//!
//! Every command is one HTTP request (a few for `submit --wait`) to `--url` (env
//! `HONUA_URL`, default `http://127.0.0.1:9090`), with `Authorization: Bearer
//! $HONUA_TOKEN` when that variable is set. The token is read from the environment only,
//! never from a flag, so it stays out of shell history and `ps`. Output is an aligned
//! table, or with `--json` the response body exactly as the gateway sent it.
//!
//! [`run`] takes the parsed arguments and two writers, so tests drive it in-process and
//! read what it printed; `src/bin/honua.rs` only parses the command line and calls it.
//!
//! # Exit codes
//!
//! Scripts can rely on these (also printed by `honua --help`):
//!
//! - **0** success.
//! - **1** the request failed: any other HTTP error (400, 413, 422, 429, 500, ...), a reply
//!   that is not the expected JSON, or `submit --wait` ended other than Completed (or gave
//!   up waiting after `--timeout`), or `state check` found a corrupt or oversize record.
//! - **2** usage error: clap's own (unknown flag, bad value), an unreadable or non-object
//!   `--input`/`--patch` file, a bad `--url` or `HONUA_TOKEN`.
//! - **3** not found (404).
//! - **4** conflict: not allowed in the process's current state (409).
//! - **5** unauthorized or forbidden (401, 403).
//! - **6** unavailable: 503 (and 502/504 from a proxy in front), connection refused or
//!   reset, timeout; `health` whenever the status is not Healthy (Degraded included).

//!
//! # Modules
//!
//! - `args`: the command line (clap types and value parsers).
//! - `client`: HTTP requests to the gateway and its replies, decoded into typed views.
//! - `render`: tables and text printed from those views.
//! - `commands`: [`run`] and each command's requests and output.
//! - `error`: [`Exit`] statuses and [`CliError`].

mod args;
mod client;
mod commands;
mod error;
mod render;

pub use args::{
    AFTER_HELP, CliArgs, Command, DEFAULT_URL, DlqAction, DlqArgs, GlobalOpts, PsArgs, StateAction,
    StateArgs, SubmitArgs, duration_param, parse_duration_arg,
};
pub use client::endpoint;
pub use commands::run;
pub use error::{CliError, Exit};
pub use render::{Table, clean, fmt_duration_ms};
