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
/// Processes deleted by an operator (`state delete`; counter; `process_type`, `forced`).
pub const PROCESSES_DELETED: &str = "honua_processes_deleted_total";
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
/// Step results committed with their successors by the worker (no scheduler round; a
/// subset of `honua_steps_total`) (counter, `process_type`).
pub const WORKER_TRANSITIONS: &str = "honua_worker_transitions_total";
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

/// Live entries of a stream: pending + not yet delivered (gauge; `stream`: submit, jobs,
/// events, results). Acknowledged entries awaiting the periodic trim are not counted.
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
/// 1 while the fleet's intake is drained (`POST /api/admin/drain`), else 0 (gauge).
pub const INTAKE_DRAINING: &str = "honua_intake_draining";
/// Processes created while intake was drained, not yet started (gauge).
pub const PENDING_PROCESSES: &str = "honua_pending_processes";
/// Processes an operator paused (gauge).
pub const PAUSED_PROCESSES: &str = "honua_paused_processes";

/// LLM metrics (emitted by the `llm` step kind).
/// Tokens of completed calls, input plus output (counter; `provider`, `model`,
/// `process_type`, `tenant`: a tenant named in some bucket's `tenant_shares`, `other`, or
/// `none`).
pub const LLM_TOKENS_USED: &str = "honua_llm_tokens_used_total";
pub const LLM_ERRORS: &str = "honua_llm_errors_total";
/// Provider calls (counter; `provider`, `model`, `outcome`, `process_type`, `tenant` as on
/// the tokens counter).
pub const LLM_REQUESTS: &str = "honua_llm_requests_total";
pub const LLM_LATENCY: &str = "honua_llm_request_duration_seconds";
/// Time an LLM call waited for the fleet-wide limiter (histogram, seconds; `bucket`:
/// provider/model, `outcome`: granted, timeout, cancelled).
pub const LLM_LIMITER_WAIT: &str = "honua_llm_limiter_wait_seconds";
/// LLM calls held back by rate limits (counter; `bucket`, `source`: `limiter` = not admitted
/// within the wait bound, `provider` = the provider answered 429 and the bucket was paused).
pub const LLM_RATE_LIMITED: &str = "honua_llm_rate_limited_total";
/// Limiter admissions decided by the local stage alone because Redis was unreachable
/// (counter; `bucket`).
pub const LLM_LIMITER_FALLBACK: &str = "honua_llm_limiter_local_fallback_total";

/// Estimated LLM spend from the config's price table (counter, micro-USD; `provider`,
/// `model`, `process_type`): divide by 1e6 for dollars.
pub const LLM_COST_MICRO_USD: &str = "honua_llm_cost_microdollars_total";
/// Lookups of the shared LLM response cache (counter; `result`: hit, miss).
pub const LLM_CACHE: &str = "honua_llm_cache_lookups_total";

/// Every name above, for tests that check dashboards and rules reference only these.
pub const ALL: &[&str] = &[
    ACTIVE_PROCESSES,
    OLDEST_ACTIVE_AGE,
    PROCESS_STARTED,
    PROCESS_COMPLETED,
    PROCESS_FAILURES,
    PROCESS_TIMEOUTS,
    PROCESS_CANCELLED,
    PROCESSES_DELETED,
    PROCESS_DURATION,
    PROCESS_TRANSITIONS,
    STEPS,
    STEP_DURATION,
    WORKER_INFLIGHT,
    WORKER_FREE_SLOTS,
    RECLAIMS,
    DEAD_LETTERS,
    STALE_COMMITS,
    WORKER_TRANSITIONS,
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
    INTAKE_DRAINING,
    PENDING_PROCESSES,
    PAUSED_PROCESSES,
    LLM_TOKENS_USED,
    LLM_ERRORS,
    LLM_REQUESTS,
    LLM_LATENCY,
    LLM_COST_MICRO_USD,
    LLM_CACHE,
    LLM_LIMITER_WAIT,
    LLM_RATE_LIMITED,
    LLM_LIMITER_FALLBACK,
];

/// How a metric is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// `# HELP` text and type of every metric (one line each; the doc comments above say more).
pub const HELP: &[(&str, Kind, &str)] = &[
    (
        ACTIVE_PROCESSES,
        Kind::Gauge,
        "Unfinished processes (fleet-wide, from Redis).",
    ),
    (
        OLDEST_ACTIVE_AGE,
        Kind::Gauge,
        "Age in seconds of the oldest unfinished process (fleet-wide).",
    ),
    (PROCESS_STARTED, Kind::Counter, "Processes created."),
    (
        PROCESS_COMPLETED,
        Kind::Counter,
        "Processes that completed successfully.",
    ),
    (
        PROCESS_FAILURES,
        Kind::Counter,
        "Processes that failed, by error code.",
    ),
    (
        PROCESS_TIMEOUTS,
        Kind::Counter,
        "Processes that hit their timeout.",
    ),
    (
        PROCESS_CANCELLED,
        Kind::Counter,
        "Processes cancelled by an operator.",
    ),
    (
        PROCESSES_DELETED,
        Kind::Counter,
        "Processes deleted by an operator, forced or not.",
    ),
    (
        PROCESS_DURATION,
        Kind::Histogram,
        "Start to end of finished processes, in seconds.",
    ),
    (
        PROCESS_TRANSITIONS,
        Kind::Counter,
        "Transitions of processes into a status.",
    ),
    (
        STEPS,
        Kind::Counter,
        "Step executions finished by workers, by kind and outcome.",
    ),
    (
        STEP_DURATION,
        Kind::Histogram,
        "Step handler run time in seconds.",
    ),
    (
        WORKER_INFLIGHT,
        Kind::Gauge,
        "Steps running on this worker.",
    ),
    (
        WORKER_FREE_SLOTS,
        Kind::Gauge,
        "Free step slots on this worker.",
    ),
    (
        RECLAIMS,
        Kind::Counter,
        "Jobs taken over from stopped workers.",
    ),
    (
        DEAD_LETTERS,
        Kind::Counter,
        "Jobs dead-lettered at max_deliveries.",
    ),
    (
        STALE_COMMITS,
        Kind::Counter,
        "Commits, heartbeats or checkpoints refused because the claim was stale.",
    ),
    (
        WORKER_TRANSITIONS,
        Kind::Counter,
        "Step results committed with their successors by the worker, without the scheduler.",
    ),
    (RELEASES, Kind::Counter, "Steps handed back at shutdown."),
    (
        LOST_PENDING,
        Kind::Counter,
        "Pending jobs whose stream entries had been deleted.",
    ),
    (
        GROUPS_RECREATED,
        Kind::Counter,
        "Consumer groups recreated after NOGROUP.",
    ),
    (
        QUARANTINED,
        Kind::Counter,
        "Entries set aside in the quarantine stream.",
    ),
    (
        COMMIT_CONFLICTS,
        Kind::Counter,
        "Revision conflicts between scheduler replicas.",
    ),
    (
        QUEUE_LENGTH,
        Kind::Gauge,
        "Live entries of a stream: pending plus not yet delivered.",
    ),
    (
        QUEUE_LAG,
        Kind::Gauge,
        "Entries not yet delivered to the stream's consumer group.",
    ),
    (
        QUEUE_PENDING,
        Kind::Gauge,
        "Delivered, unacknowledged stream entries.",
    ),
    (
        QUEUE_OLDEST_PENDING_AGE,
        Kind::Gauge,
        "Age in seconds of the oldest pending stream entry.",
    ),
    (
        WORKERS_LIVE,
        Kind::Gauge,
        "Workers with a heartbeat in the last 30 s.",
    ),
    (
        INTAKE_DRAINING,
        Kind::Gauge,
        "1 while the fleet's intake is drained (new processes wait Pending), else 0.",
    ),
    (
        PENDING_PROCESSES,
        Kind::Gauge,
        "Processes created while intake was drained, not yet started.",
    ),
    (
        PAUSED_PROCESSES,
        Kind::Gauge,
        "Processes an operator paused (they start no new step until resumed).",
    ),
    (
        REDIS_UP,
        Kind::Gauge,
        "1 when Redis answered the last sample, else 0.",
    ),
    (
        LLM_TOKENS_USED,
        Kind::Counter,
        "LLM tokens used (input and output).",
    ),
    (LLM_ERRORS, Kind::Counter, "LLM call errors, by error type."),
    (
        LLM_REQUESTS,
        Kind::Counter,
        "LLM requests sent to providers.",
    ),
    (
        LLM_LATENCY,
        Kind::Histogram,
        "LLM request latency in seconds.",
    ),
    (
        LLM_LIMITER_WAIT,
        Kind::Histogram,
        "Time an LLM call waited for the fleet-wide limiter, in seconds.",
    ),
    (
        LLM_RATE_LIMITED,
        Kind::Counter,
        "LLM calls held back by rate limits.",
    ),
    (
        LLM_LIMITER_FALLBACK,
        Kind::Counter,
        "Limiter admissions decided locally because Redis was unreachable.",
    ),
    (
        LLM_COST_MICRO_USD,
        Kind::Counter,
        "Estimated LLM spend from the configured price table, in micro-USD.",
    ),
    (
        LLM_CACHE,
        Kind::Counter,
        "Lookups of the shared LLM response cache, by result (hit, miss).",
    ),
];

#[cfg(test)]
mod help_tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_a_kind_that_matches_its_name() {
        let named: Vec<&str> = HELP.iter().map(|h| h.0).collect();
        for name in ALL {
            assert!(named.contains(name), "{name} has no entry in HELP");
        }
        assert_eq!(
            named.len(),
            ALL.len(),
            "HELP lists a name that ALL does not"
        );
        for &(name, kind, help) in HELP {
            assert!(!help.is_empty(), "{name}: empty help");
            if name.ends_with("_total") {
                assert_eq!(kind, Kind::Counter, "{name}");
            }
            if kind == Kind::Counter {
                assert!(name.ends_with("_total"), "{name}: counters end in _total");
            }
        }
    }
}
