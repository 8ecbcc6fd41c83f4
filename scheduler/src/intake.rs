//! Draining the fleet's intake for maintenance: while drained, submissions are still
//! accepted, acknowledged and stored, but as `Pending` processes that start no step (the
//! create that would start steps is refused by `commit.lua` while the intake key exists, so
//! no create races past a drain); processes already running go on to their end or their
//! next wait. Resuming intake lets every scheduler start the Pending processes, oldest first.

use crate::processes::Processes;
use honua_shared::keys::WORKERS_GROUP;
use honua_shared::status::ProcessStatus;
use honua_shared::store::StoreError;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

/// How often each scheduler looks for Pending processes to start once intake is open.
pub const START_POLL: Duration = Duration::from_millis(500);
/// Pending processes one scheduler starts per poll.
pub const START_BATCH: usize = 200;

/// What the intake key holds while drained.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Drained {
    since_ms: u64,
    by: String,
}

/// The fleet's intake and the work still in flight (`POST /api/admin/drain`,
/// `POST /api/admin/resume-intake`, `GET /api/admin/drain`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainReply {
    /// New processes are created `Pending` and start no step.
    pub draining: bool,
    /// When the drain was set (server ms).
    pub since_ms: Option<u64>,
    /// The API key name (or `anonymous`) that set it.
    pub by: Option<String>,
    /// Step jobs delivered to a worker and not yet committed.
    pub running_steps: u64,
    /// Step jobs waiting for a worker.
    pub queued_steps: u64,
    /// Processes created while drained, waiting for intake to resume.
    pub pending_processes: u64,
    /// Unfinished processes, Pending ones included (those waiting at an approval, a timer or
    /// a retry back-off hold no step).
    pub active_processes: u64,
    /// No step is running or queued: maintenance can begin (draining only).
    pub drained: bool,
}

impl Processes {
    /// Drains the intake (idempotent: a second drain keeps the first one's time and name),
    /// in every partition (each partition's creates check its own intake key).
    pub async fn drain(&self, by: &str) -> Result<DrainReply, StoreError> {
        let now = self.store.server_time_ms().await?;
        let state = serde_json::to_string(&Drained {
            since_ms: now,
            by: by.to_string(),
        })
        .unwrap_or_default();
        let mut set = false;
        for part in self.store.all() {
            set |= part.drain_intake(&state).await?;
        }
        if set {
            tracing::warn!(by = %by, "intake drained: new processes are created Pending until intake resumes");
        }
        self.intake_report().await
    }

    /// Opens the intake of every partition: the schedulers start the Pending processes,
    /// oldest first.
    pub async fn resume_intake(&self, by: &str) -> Result<DrainReply, StoreError> {
        let mut resumed = false;
        for part in self.store.all() {
            resumed |= part.resume_intake().await?;
        }
        if resumed {
            tracing::warn!(by = %by, "intake resumed: Pending processes start");
        }
        self.intake_report().await
    }

    /// Whether intake is drained (in any partition), and what is still in flight in all of
    /// them.
    pub async fn intake_report(&self) -> Result<DrainReply, StoreError> {
        let mut state = None;
        let (mut running, mut queued, mut active, mut pending_processes) = (0, 0, 0, 0);
        for part in self.store.all() {
            if state.is_none() {
                state = part.intake().await?;
            }
            let jobs = part
                .stream_stats(&part.keys().jobs(), WORKERS_GROUP)
                .await?;
            running += jobs.pending;
            queued += jobs.lag.unwrap_or(jobs.length.saturating_sub(jobs.pending));
            active += part.active_summary().await?.0;
            pending_processes += part.status_count(ProcessStatus::Pending).await?;
        }
        let drained: Option<Drained> = state.as_deref().map(|s| {
            serde_json::from_str(s).unwrap_or(Drained {
                since_ms: 0,
                by: "unknown".into(),
            })
        });
        Ok(DrainReply {
            draining: drained.is_some(),
            since_ms: drained.as_ref().map(|d| d.since_ms),
            by: drained.map(|d| d.by),
            running_steps: running,
            queued_steps: queued,
            pending_processes,
            active_processes: active,
            drained: state.is_some() && running == 0 && queued == 0,
        })
    }

    /// Starts up to [`START_BATCH`] Pending processes, oldest first, while intake is open;
    /// returns how many this call started.
    pub async fn start_pending(&self) -> Result<usize, StoreError> {
        if self.store.intake().await?.is_some() {
            return Ok(0);
        }
        let ids = self.store.pending_processes(START_BATCH).await?;
        let mut started = 0;
        for id in ids {
            match self.start(&id).await {
                Ok(true) => started += 1,
                Ok(false) => {}
                Err(crate::ops::OpsError::Store(e)) => return Err(e),
                // Gone meanwhile (purged, deleted) or unreadable: leave it to the operator;
                // it stays listed as Pending.
                Err(e) => {
                    tracing::warn!(process_id = %id, error = %e, "a Pending process could not be started")
                }
            }
        }
        Ok(started)
    }

    /// The scheduler's loop that starts Pending processes once intake is open.
    pub async fn run_intake(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(START_POLL) => {}
            }
            match self.start_pending().await {
                Ok(n) if n > 0 => tracing::info!(started = n, "Pending processes started"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "looking for Pending processes failed"),
            }
        }
    }
}
