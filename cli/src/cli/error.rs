//! Exit statuses and the typed errors of the operator commands: what a script can tell
//! from `$?` ([`Exit`]) and why a command failed ([`CliError`]), each error mapped to
//! its exit status.

use super::render::clean;
use std::time::Duration;

/// What a script can tell from the exit status. See the [exit codes](super#exit-codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Success = 0,
    Failed = 1,
    Usage = 2,
    NotFound = 3,
    Conflict = 4,
    Unauthorized = 5,
    Unavailable = 6,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The exit status for an HTTP status code.
    pub fn from_http(status: u16) -> Exit {
        match status {
            200..=299 => Exit::Success,
            401 | 403 => Exit::Unauthorized,
            404 => Exit::NotFound,
            409 => Exit::Conflict,
            502..=504 => Exit::Unavailable,
            _ => Exit::Failed,
        }
    }
}

/// Why a command failed, typed by the exit status it maps to ([`CliError::exit`]).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    /// The gateway answered with an error status; `detail (code)` from its JSON body.
    #[error("{detail} ({code})")]
    Api {
        status: u16,
        code: String,
        detail: String,
    },
    #[error("cannot reach {url}: {} (unavailable)", root_cause(source))]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no answer from {url} within {} (timeout)", humantime::format_duration(*after))]
    Timeout { url: String, after: Duration },
    #[error("unexpected response from {url}: {detail}")]
    BadResponse { url: String, detail: String },
    /// The requests succeeded but the outcome is a failure (`submit --wait`).
    #[error("{0}")]
    Failed(String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Usage(_) => Exit::Usage,
            CliError::Api { status, .. } => match Exit::from_http(*status) {
                Exit::Success => Exit::Failed,
                e => e,
            },
            CliError::Unreachable { .. } | CliError::Timeout { .. } => Exit::Unavailable,
            CliError::BadResponse { .. } | CliError::Failed(_) | CliError::Output(_) => {
                Exit::Failed
            }
        }
    }

    /// Worth asking again (while `submit --wait` polls).
    pub(super) fn is_transient(&self) -> bool {
        self.exit() == Exit::Unavailable
    }
}

/// The innermost error's message, on one line.
pub(super) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    clean(&cur.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_http_status() {
        let cases = [
            (200, Exit::Success),
            (201, Exit::Success),
            (202, Exit::Success),
            (400, Exit::Failed),
            (401, Exit::Unauthorized),
            (403, Exit::Unauthorized),
            (404, Exit::NotFound),
            (409, Exit::Conflict),
            (413, Exit::Failed),
            (422, Exit::Failed),
            (429, Exit::Failed),
            (500, Exit::Failed),
            (502, Exit::Unavailable),
            (503, Exit::Unavailable),
            (504, Exit::Unavailable),
        ];
        for (status, exit) in cases {
            assert_eq!(Exit::from_http(status), exit, "{status}");
        }
        let codes: Vec<i32> = [
            Exit::Success,
            Exit::Failed,
            Exit::Usage,
            Exit::NotFound,
            Exit::Conflict,
            Exit::Unauthorized,
            Exit::Unavailable,
        ]
        .iter()
        .map(|e| e.code())
        .collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6]);
    }
}
