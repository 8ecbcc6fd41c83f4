//! The JSON view of a process record, as the operations guide reads it (camelCase).

use honua_shared::definition::ProcessDefinition;
use honua_shared::record::{ProcessRecord, StepRecord};
use serde::{Deserialize, Serialize};
use std::time::{Duration, UNIX_EPOCH};
use utoipa::ToSchema;

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
pub const MAX_RFC3339_MS: u64 = 253_402_300_799_999;

/// Unix milliseconds as RFC 3339 (`2025-01-02T03:04:05.678Z`); `None` past year 9999, which
/// only a forged or corrupt record holds (humantime panics on it).
pub fn rfc3339_ms(ms: u64) -> Option<String> {
    (ms <= MAX_RFC3339_MS).then(|| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    })
}

fn ts(ms: Option<u64>) -> Option<String> {
    ms.and_then(rfc3339_ms)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptView {
    pub attempt: u32,
    pub visit: u32,
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<u64>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepView {
    pub name: String,
    pub kind: String,
    pub status: String,
    pub attempt: u32,
    /// Attempts that yielded (waited for LLM rate-limit budget or a paused provider)
    /// instead of running; the retry policy does not count them.
    pub yields: u32,
    pub visits: u32,
    pub deliveries: Option<u64>,
    pub worker: Option<String>,
    pub queued_at: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_ms: Option<u64>,
    pub outcome: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<String>,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessView {
    pub id: String,
    pub process_type: String,
    pub version: u32,
    pub status: String,
    pub current_steps: Vec<String>,
    pub steps: Vec<StepView>,
    pub error_message: Option<String>,
    pub error_code: Option<String>,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub updated_at: Option<String>,
    pub deadline_at: Option<String>,
    /// Seconds from start to end (or to now while running).
    pub duration: Option<f64>,
    pub idempotency_key: Option<String>,
    /// Whom the process runs for (its submission's `tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Operator actions (cancel, retry, retry-current-step), oldest first.
    pub audit: Vec<AuditView>,
    /// LLM usage of the whole process (absent until an `llm` step called a provider).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub llm_usage: Option<LlmUsageView>,
}

/// Tokens and estimated cost the process's `llm` steps were charged (provider usage; the
/// cost from the config's price table, 0 without one).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LlmUsageView {
    pub tokens: u64,
    pub cost_usd: f64,
}

impl LlmUsageView {
    pub fn new(tokens: u64, cost_micro_usd: u64) -> Self {
        LlmUsageView {
            tokens,
            cost_usd: cost_micro_usd as f64 / 1e6,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditView {
    pub at: Option<String>,
    pub action: String,
    pub detail: Option<String>,
    /// The API key that did it (absent when the API is open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// One line of a process listing.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSummary {
    pub id: String,
    pub process_type: String,
    pub version: u32,
    pub status: String,
    pub current_steps: Vec<String>,
    pub error_message: Option<String>,
    pub error_code: Option<String>,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// Seconds from start to end (or to now while running).
    pub duration: Option<f64>,
    /// Whom the process runs for (its submission's `tenant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl ProcessSummary {
    pub fn new(rec: &ProcessRecord, now_ms: u64) -> Self {
        ProcessSummary {
            id: rec.id.clone(),
            process_type: rec.process_type.clone(),
            version: rec.version,
            status: rec.status.to_string(),
            current_steps: rec.active_steps().map(|(n, _)| n.clone()).collect(),
            error_message: rec.error.clone(),
            error_code: rec.code.clone(),
            created_at: ts(Some(rec.created_ms)),
            started_at: ts(rec.started_ms),
            ended_at: ts(rec.ended_ms),
            duration: rec.duration_ms(now_ms).map(|ms| ms as f64 / 1000.0),
            tenant: rec.tenant.clone(),
        }
    }
}

fn step_view(name: &str, kind: &str, r: &StepRecord) -> StepView {
    StepView {
        name: name.to_string(),
        kind: kind.to_string(),
        status: r.status.to_string(),
        attempt: r.attempt,
        yields: r.yields,
        visits: r.visit,
        deliveries: r.deliveries,
        worker: r.worker.clone(),
        queued_at: ts(r.queued_ms),
        started_at: ts(r.started_ms),
        ended_at: ts(r.ended_ms),
        duration_ms: r.duration_ms(),
        outcome: r.outcome.clone(),
        error: r.error.clone(),
        error_code: r.code.clone(),
        attempts: r
            .attempts()
            .iter()
            .map(|a| AttemptView {
                attempt: a.attempt,
                visit: a.visit,
                outcome: a.outcome.clone(),
                error: a.error.clone(),
                error_code: a.code.clone(),
                worker: a.worker.clone(),
                deliveries: a.deliveries,
                started_at: ts(a.started_ms),
                ended_at: ts(a.ended_ms),
                duration_ms: a
                    .ended_ms
                    .zip(a.started_ms)
                    .map(|(e, s)| e.saturating_sub(s)),
            })
            .collect(),
    }
}

impl ProcessView {
    /// Steps in definition order; steps never reached are listed as `idle`.
    pub fn new(rec: &ProcessRecord, def: Option<&ProcessDefinition>, now_ms: u64) -> Self {
        let mut steps = Vec::new();
        match def {
            Some(d) => {
                for s in &d.steps {
                    let r = rec.steps.get(&s.name).cloned().unwrap_or_default();
                    steps.push(step_view(&s.name, &s.kind, &r));
                }
            }
            None => {
                for (n, r) in &rec.steps {
                    steps.push(step_view(n, "", r));
                }
            }
        }
        ProcessView {
            id: rec.id.clone(),
            process_type: rec.process_type.clone(),
            version: rec.version,
            status: rec.status.to_string(),
            current_steps: rec.active_steps().map(|(n, _)| n.clone()).collect(),
            steps,
            error_message: rec.error.clone(),
            error_code: rec.code.clone(),
            created_at: ts(Some(rec.created_ms)),
            started_at: ts(rec.started_ms),
            ended_at: ts(rec.ended_ms),
            updated_at: ts(rec.last_change_ms()),
            deadline_at: ts(rec.deadline_ms),
            duration: rec.duration_ms(now_ms).map(|ms| ms as f64 / 1000.0),
            idempotency_key: rec.idempotency_key.clone(),
            tenant: rec.tenant.clone(),
            audit: rec
                .audit
                .iter()
                .map(|a| AuditView {
                    at: ts(Some(a.at_ms)),
                    action: a.action.clone(),
                    detail: a.detail.clone(),
                    by: a.by.clone(),
                })
                .collect(),
            llm_usage: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_past_year_9999_render_without_panicking() {
        assert_eq!(rfc3339_ms(0).as_deref(), Some("1970-01-01T00:00:00.000Z"));
        assert_eq!(
            rfc3339_ms(MAX_RFC3339_MS).as_deref(),
            Some("9999-12-31T23:59:59.999Z")
        );
        assert_eq!(rfc3339_ms(MAX_RFC3339_MS + 1), None);
        assert_eq!(rfc3339_ms(u64::MAX), None);
    }
}
