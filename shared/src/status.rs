//! Process and step status strings: the one place they are defined. Lua receives them
//! through the script prelude built from these constants ([`crate::scripts`]).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The status of a process, as the operations guide names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProcessStatus {
    Pending,
    Running,
    WaitingForApproval,
    /// An operator paused it: it starts no new step until resumed.
    Paused,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl ProcessStatus {
    pub const ALL: [ProcessStatus; 8] = [
        Self::Pending,
        Self::Running,
        Self::WaitingForApproval,
        Self::Paused,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::WaitingForApproval => "WaitingForApproval",
            Self::Paused => "Paused",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
            Self::TimedOut => "TimedOut",
        }
    }

    /// Finished processes never change again (except through an explicit retry).
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::TimedOut
        )
    }
}

impl fmt::Display for ProcessStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for ProcessStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// The status of one step inside a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not reached yet (or a join still waiting for inputs).
    #[default]
    Idle,
    /// A job is in the job stream.
    Queued,
    /// A retry is waiting for its backoff in the delayed set.
    Delayed,
    /// A worker runs it.
    Running,
    /// The worker committed a result; the scheduler has not routed it yet.
    Done,
    /// Waiting for a signal or a durable timer (scheduler-side kinds).
    Waiting,
    /// Entered while its process is paused: it starts (or its timer runs again) when the
    /// process resumes.
    Held,
    Completed,
    Failed,
    Cancelled,
}

impl StepStatus {
    pub const ALL: [StepStatus; 10] = [
        Self::Idle,
        Self::Queued,
        Self::Delayed,
        Self::Running,
        Self::Done,
        Self::Waiting,
        Self::Held,
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Queued => "queued",
            Self::Delayed => "delayed",
            Self::Running => "running",
            Self::Done => "done",
            Self::Waiting => "waiting",
            Self::Held => "held",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// A step that still holds the process open.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Queued | Self::Delayed | Self::Running | Self::Done | Self::Waiting | Self::Held
        )
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Outcome names with a meaning to the engine.
pub mod outcome {
    pub const OK: &str = "ok";
    pub const FAILED: &str = "failed";
    pub const REJECTED: &str = "rejected";
    /// An attempt that waited for a shared resource instead of running (history only).
    pub const YIELDED: &str = "yielded";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_serde_agrees() {
        for st in ProcessStatus::ALL {
            assert_eq!(st.as_str().parse::<ProcessStatus>().unwrap(), st);
            assert_eq!(serde_json::to_string(&st).unwrap(), format!("\"{st}\""));
        }
        for st in StepStatus::ALL {
            assert_eq!(serde_json::to_string(&st).unwrap(), format!("\"{st}\""));
        }
        assert!("failed".parse::<ProcessStatus>().is_ok());
        assert!("nope".parse::<ProcessStatus>().is_err());
    }
}
