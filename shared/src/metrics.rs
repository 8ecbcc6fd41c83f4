//! Prometheus metric names (units in the names) and their help texts: the one place they
//! are defined. Labels stay low-cardinality: process type, step kind, outcome, status,
//! stream, reason — never ids, prompts or error text.
//!
//! Fleet-wide gauges (`honua_active_processes`, `honua_queue_*`, `honua_workers_live`,
//! `redis_up`) are sampled from Redis by every scheduler replica, so every replica exports
//! the same value: aggregate them with `max`, not `sum`. Counters are emitted once per event
//! by the replica or worker that caused it: aggregate them with `sum`.

/// Unfinished processes (gauge, from Redis).
pub const ACTIVE_PROCESSES: &str = "honua_active_processes";
/// Age of the oldest unfinished process (gauge, seconds, from Redis): stuck processes.
pub const OLDEST_ACTIVE_AGE: &str = "honua_oldest_active_process_age_seconds";
/// Processes created (counter; label `process_type`).
pub const PROCESS_STARTED: &str = "honua_process_started_total";
/// Processes that completed successfully (counter; `process_type`).
pub const PROCESS_COMPLETED: &str = "honua_process_completed_total";
/// Processes that failed (counter; `process_type`, `reason`: error code).
pub const PROCESS_FAILURES: &str = "honua_process_failures_total";
/// Processes that hit their timeout (counter; `process_type`).
pub const PROCESS_TIMEOUTS: &str = "honua_process_timeouts_total";
/// Processes cancelled by an operator (counter; `process_type`).
pub const PROCESS_CANCELLED: &str = "honua_process_cancelled_total";
/// Start to end of finished processes (histogram, seconds; `process_type`, `status`).
pub const PROCESS_DURATION: &str = "honua_process_duration_seconds";
/// Processes by type and status among those the scheduler saw finish or start (counter of
/// transitions into a status; `process_type`, `status`).
pub const PROCESS_TRANSITIONS: &str = "honua_process_transitions_total";

/// Step executions finished by workers (counter; `process_type`, `kind`, `outcome`).
pub const STEPS: &str = "honua_steps_total";
/// Handler run time (histogram, seconds; `kind`, `outcome`).
pub const STEP_DURATION: &str = "honua_step_duration_seconds";
/// Steps running on this worker (gauge).
pub const WORKER_INFLIGHT: &str = "honua_worker_inflight_steps";
/// Free step slots on this worker (gauge).
pub const WORKER_FREE_SLOTS: &str = "honua_worker_free_slots";

/// Jobs taken over from stopped workers (counter).
pub const RECLAIMS: &str = "honua_reclaims_total";
/// Jobs dead-lettered at max_deliveries (counter).
pub const DEAD_LETTERS: &str = "honua_dead_letters_total";
/// Commits, heartbeats or checkpoints refused because the claim was stale (counter).
pub const STALE_COMMITS: &str = "honua_stale_commits_total";
/// Steps handed back at shutdown (counter).
pub const RELEASES: &str = "honua_releases_total";
/// Pending jobs whose stream entries had been deleted: payload lost (counter).
pub const LOST_PENDING: &str = "honua_lost_pending_entries_total";
/// Consumer groups recreated after NOGROUP (counter; `stream`): possible data loss.
pub const GROUPS_RECREATED: &str = "honua_redis_groups_recreated_total";
/// Entries set aside in the quarantine stream (counter; `stream`).
pub const QUARANTINED: &str = "honua_quarantined_entries_total";
/// Revision conflicts between scheduler replicas (counter).
pub const COMMIT_CONFLICTS: &str = "honua_commit_conflicts_total";

/// Stream length (gauge; `stream`: submit, jobs, events).
pub const QUEUE_LENGTH: &str = "honua_queue_length";
/// Entries not yet delivered to the stream's group (gauge; `stream`). The HPA/KEDA signal.
pub const QUEUE_LAG: &str = "honua_queue_lag";
/// Delivered, unacknowledged entries (gauge; `stream`).
pub const QUEUE_PENDING: &str = "honua_queue_pending";
/// Age of the oldest pending entry (gauge, seconds; `stream`).
pub const QUEUE_OLDEST_PENDING_AGE: &str = "honua_queue_oldest_pending_age_seconds";
/// Workers with a heartbeat in the last 30 s (gauge).
pub const WORKERS_LIVE: &str = "honua_workers_live";
/// 1 when Redis answered the last sample, else 0 (gauge).
pub const REDIS_UP: &str = "redis_up";

/// LLM metrics (emitted by the `llm` step kind).
pub const LLM_TOKENS_USED: &str = "honua_llm_tokens_used_total";
pub const LLM_ERRORS: &str = "honua_llm_errors_total";
pub const LLM_REQUESTS: &str = "honua_llm_requests_total";
pub const LLM_LATENCY: &str = "honua_llm_request_duration_seconds";

/// Every name above, for tests that check dashboards and rules reference only these.
pub const ALL: &[&str] = &[
    ACTIVE_PROCESSES,
    OLDEST_ACTIVE_AGE,
    PROCESS_STARTED,
    PROCESS_COMPLETED,
    PROCESS_FAILURES,
    PROCESS_TIMEOUTS,
    PROCESS_CANCELLED,
    PROCESS_DURATION,
    PROCESS_TRANSITIONS,
    STEPS,
    STEP_DURATION,
    WORKER_INFLIGHT,
    WORKER_FREE_SLOTS,
    RECLAIMS,
    DEAD_LETTERS,
    STALE_COMMITS,
    RELEASES,
    LOST_PENDING,
    GROUPS_RECREATED,
    QUARANTINED,
    COMMIT_CONFLICTS,
    QUEUE_LENGTH,
    QUEUE_LAG,
    QUEUE_PENDING,
    QUEUE_OLDEST_PENDING_AGE,
    WORKERS_LIVE,
    REDIS_UP,
    LLM_TOKENS_USED,
    LLM_ERRORS,
    LLM_REQUESTS,
    LLM_LATENCY,
];
