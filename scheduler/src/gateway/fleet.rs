//! The fleet endpoints: the effective configuration, queues, workers, dead letters and
//! their replay, health and readiness, and the Prometheus metrics.

use super::processes::{action_reply, page_limit};
use super::{ActionReply, ApiError, ApiState, ErrorBody};
use crate::intake::DrainReply;
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use utoipa::ToSchema;

fn camel(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// Config fields whose keys the user chose (bucket, model, step and type names): their
/// keys are shown as written, so a copied value means the same in a config file.
const USER_KEYED: [&str; 8] = [
    "limits",
    "prices",
    "max_tokens_by_step",
    "process_types",
    "deployments",
    "process_timeouts",
    "shares",
    "tenantShares",
];

fn camel_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Object(entries) if USER_KEYED.contains(&k.as_str()) => {
                            Value::Object(
                                entries
                                    .into_iter()
                                    .map(|(name, e)| (name, camel_keys(e)))
                                    .collect(),
                            )
                        }
                        v => camel_keys(v),
                    };
                    (camel(&k), v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(camel_keys).collect()),
        other => other,
    }
}

#[utoipa::path(get, path = "/api/config",
    responses((status = 200, description = "the effective configuration, camelCase, secrets redacted")))]
pub(super) async fn config(State(st): State<ApiState>) -> Json<Value> {
    let cfg = &st.engine.cfg;
    let mut v = serde_json::to_value(&**cfg).unwrap_or_default();
    v["redis_url"] = Value::String(cfg.redacted_redis_url());
    v["redis_cluster_nodes"] = json!(cfg.redacted_redis_cluster_nodes());
    v["api"]["keys"] = Value::Array(
        cfg.api
            .keys
            .iter()
            .map(|k| json!({"name": k.name, "role": k.role}))
            .collect(),
    );
    Json(camel_keys(v))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueView {
    pub stream: String,
    pub group: String,
    pub missing: bool,
    pub length: u64,
    pub lag: Option<u64>,
    pub pending: u64,
    pub oldest_pending_ms: Option<u64>,
    pub oldest_pending_age_ms: Option<u64>,
    pub consumers: u64,
}

/// Per stream: one row per partition (the stream's key names it: `…:{3}:jobs`) and, with
/// several partitions, one more per stream with their sum, named with `{*}` for the
/// partition (`…:{*}:jobs`: length, lag and pending summed, the oldest pending entry of
/// any, the most consumers of one).
#[utoipa::path(get, path = "/api/queues", responses((status = 200, body = [QueueView])))]
pub(super) async fn queues(State(st): State<ApiState>) -> Result<Json<Vec<QueueView>>, ApiError> {
    let store = &st.engine.store;
    let now = store.server_time_ms().await?;
    let parts = store.all();
    let mut out = Vec::new();
    let streams = |k: &honua_shared::keys::Keys| {
        [
            (k.submit(), honua_shared::keys::SCHEDULER_GROUP),
            (k.jobs(), honua_shared::keys::WORKERS_GROUP),
            (k.events(), honua_shared::keys::SCHEDULER_GROUP),
            (k.results(), honua_shared::keys::SCHEDULER_GROUP),
        ]
    };
    for part in &parts {
        for (stream, group) in streams(part.keys()) {
            let s = part.stream_stats(&stream, group).await?;
            out.push(QueueView {
                oldest_pending_age_ms: s.oldest_pending_ms.map(|t| now.saturating_sub(t)),
                stream: s.stream,
                group: s.group,
                missing: s.missing,
                length: s.length,
                lag: s.lag,
                pending: s.pending,
                oldest_pending_ms: s.oldest_pending_ms,
                consumers: s.consumers,
            });
        }
    }
    if parts.len() > 1 {
        let per_stream = streams(store.keys()).len();
        let totals: Vec<QueueView> = streams(store.keys())
            .into_iter()
            .enumerate()
            .map(|(i, (stream, group))| {
                let rows: Vec<&QueueView> = out.iter().skip(i).step_by(per_stream).collect();
                let oldest = rows.iter().filter_map(|r| r.oldest_pending_ms).min();
                QueueView {
                    stream: stream.as_str().replacen(
                        &format!("{{{}}}", store.partition()),
                        "{*}",
                        1,
                    ),
                    group: group.to_string(),
                    missing: rows.iter().any(|r| r.missing),
                    length: rows.iter().map(|r| r.length).sum(),
                    lag: rows.iter().map(|r| r.lag).sum(),
                    pending: rows.iter().map(|r| r.pending).sum(),
                    oldest_pending_ms: oldest,
                    oldest_pending_age_ms: oldest.map(|t| now.saturating_sub(t)),
                    consumers: rows.iter().map(|r| r.consumers).max().unwrap_or(0),
                }
            })
            .collect();
        out.extend(totals);
    }
    Ok(Json(out))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerJobView {
    pub entry_id: String,
    pub process_id: String,
    pub step: String,
    pub idle_ms: u64,
    pub deliveries: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerView {
    pub id: String,
    pub last_seen_ms: u64,
    pub last_seen_age_ms: u64,
    pub jobs: Vec<WorkerJobView>,
    /// The Honua version it runs (absent: it registered nothing, e.g. an older worker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Its host name (the pod's name on Kubernetes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// How many steps it runs at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u64>,
    /// When it started (server ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
}

#[utoipa::path(get, path = "/api/workers", responses((status = 200, body = [WorkerView])))]
pub(super) async fn workers(State(st): State<ApiState>) -> Result<Json<Vec<WorkerView>>, ApiError> {
    let now = st.engine.store.server_time_ms().await?;
    let ws = st.engine.store.workers(500).await?;
    Ok(Json(
        ws.into_iter()
            .map(|w| WorkerView {
                version: w.meta.as_ref().map(|m| m.version.clone()),
                host: w.meta.as_ref().map(|m| m.host.clone()),
                concurrency: w.meta.as_ref().map(|m| m.concurrency),
                started_ms: w.meta.as_ref().map(|m| m.started_ms),
                id: w.id,
                last_seen_ms: w.last_seen_ms,
                last_seen_age_ms: now.saturating_sub(w.last_seen_ms),
                jobs: w
                    .jobs
                    .into_iter()
                    .map(|j| WorkerJobView {
                        entry_id: j.entry_id,
                        process_id: j.process_id,
                        step: j.step,
                        idle_ms: j.idle_ms,
                        deliveries: j.deliveries,
                    })
                    .collect(),
            })
            .collect(),
    ))
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterView {
    pub id: String,
    pub process_id: String,
    pub step: String,
    pub deliveries: u64,
    pub reason: String,
    pub dead_ms: Option<u64>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DlqParams {
    /// At most this many, newest first: 1-1000 (default 100); anything else is 400.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/deadletters", params(DlqParams), responses((status = 200, body = [DeadLetterView])))]
pub(super) async fn deadletters(
    State(st): State<ApiState>,
    q: Result<Query<DlqParams>, QueryRejection>,
) -> Result<Json<Vec<DeadLetterView>>, ApiError> {
    let Query(p) = q?;
    let limit = page_limit(p.limit)?;
    // The newest of every partition's dead letters (stream ids are times), newest first.
    let mut entries = Vec::new();
    for part in st.engine.store.all() {
        entries.extend(part.stream_latest(&part.keys().dlq(), limit).await?);
    }
    entries.sort_by_key(|e| std::cmp::Reverse(stream_order(&e.id)));
    entries.truncate(limit);
    Ok(Json(
        entries
            .into_iter()
            .map(|e| DeadLetterView {
                process_id: e.fields.get("pid").unwrap_or("").to_string(),
                step: e.fields.get("step").unwrap_or("").to_string(),
                deliveries: e.fields.num("deliveries").ok().flatten().unwrap_or(0),
                reason: e.fields.get("reason").unwrap_or("").to_string(),
                dead_ms: e.fields.num("dead_ms").ok().flatten(),
                id: e.id,
            })
            .collect(),
    ))
}

#[utoipa::path(post, path = "/api/deadletters/{id}/replay", params(("id" = String, Path, description = "a dead-letter id, `<milliseconds>-<sequence>`")),
    responses((status = 200, body = ActionReply), (status = 400, description = "not a dead-letter id", body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn replay(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<axum::Extension<super::auth::Caller>>,
) -> Result<Json<ActionReply>, ApiError> {
    let store = &st.engine.store;
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no dead letter {id}"),
        )
    };
    if !valid_stream_id(&id) {
        return Err(ApiError::bad(
            "invalid_request",
            format!("{id:?} is not a dead-letter id (<milliseconds>-<sequence>)"),
        ));
    }
    // The first partition that holds a dead letter with this id.
    let mut found = None;
    for part in store.all() {
        if let Some(e) = part.stream_entry(&part.keys().dlq(), &id).await? {
            found = Some((part, e));
            break;
        }
    }
    let (part, entry) = found.ok_or_else(not_found)?;
    let pid = entry.fields.get("pid").unwrap_or("").to_string();
    st.engine
        .retry(&pid, None, None, super::processes::by(&caller))
        .await?;
    part.delete_dead_letter(&id).await?;
    tracing::info!(dead_letter = %id, process_id = %pid, "dead letter replayed");
    action_reply(&st, &pid, vec![]).await
}

/// A stream entry id (`ms-seq`) as a sortable pair; unparsable ids sort first.
fn stream_order(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// A full stream entry id, `<ms>-<seq>`, both parts 64-bit numbers (what Redis accepts).
fn valid_stream_id(id: &str) -> bool {
    let num = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u64>().is_ok()
    };
    id.split_once('-')
        .is_some_and(|(ms, seq)| num(ms) && num(seq))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReply {
    /// Healthy, Degraded (no worker seen lately), Draining (the fleet's intake is drained
    /// for maintenance: `POST /api/admin/drain`) or Unhealthy.
    pub status: String,
    pub checks: std::collections::BTreeMap<String, String>,
}

async fn redis_ok(st: &ApiState) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(2), st.engine.store.ping())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A worker with a heartbeat this recent counts as live in `/health`.
pub(super) const LIVE_WORKER_MS: u64 = 30_000;

#[utoipa::path(get, path = "/health", responses((status = 200, body = HealthReply),
    (status = 401, description = "`api.open_health = false` and no or an unknown bearer token", body = ErrorBody),
    (status = 503, body = HealthReply)))]
pub(super) async fn health(State(st): State<ApiState>) -> Response {
    let mut checks = std::collections::BTreeMap::new();
    let redis = redis_ok(&st).await;
    checks.insert(
        "redis".to_string(),
        if redis { "Healthy" } else { "Unhealthy" }.to_string(),
    );
    let mut healthy = redis;
    let mut degraded = false;
    let mut draining = false;
    if redis {
        // One GET: the intake key exists only while drained.
        draining = st.engine.store.intake().await.ok().flatten().is_some();
        checks.insert(
            "intake".into(),
            if draining { "Draining" } else { "Open" }.into(),
        );
        let now = st.engine.store.server_time_ms().await.unwrap_or(0);
        if let Some(s) = &st.scheduler {
            let tick = s.last_tick_ms.load(Ordering::Relaxed);
            let alive = now.saturating_sub(tick) < 10_000;
            healthy &= alive;
            checks.insert(
                "scheduler".into(),
                if alive { "Healthy" } else { "Unhealthy" }.into(),
            );
        }
        // One ZCOUNT, however many workers and jobs there are: /health may be open.
        let live = st
            .engine
            .store
            .live_workers(now.saturating_sub(LIVE_WORKER_MS - 1))
            .await
            .unwrap_or(0);
        degraded = live == 0;
        checks.insert(
            "workers".into(),
            if live > 0 {
                format!("Healthy ({live} live)")
            } else {
                "Degraded (no worker heartbeat in 30 s)".into()
            },
        );
    }
    let (code, status) = match (healthy, draining, degraded) {
        (false, _, _) => (StatusCode::SERVICE_UNAVAILABLE, "Unhealthy"),
        (true, true, _) => (StatusCode::OK, "Draining"),
        (true, false, true) => (StatusCode::OK, "Degraded"),
        (true, false, false) => (StatusCode::OK, "Healthy"),
    };
    (
        code,
        Json(HealthReply {
            status: status.into(),
            checks,
        }),
    )
        .into_response()
}

#[utoipa::path(get, path = "/health/live", responses((status = 200, description = "the process serves HTTP")))]
pub(super) async fn live() -> Json<Value> {
    Json(json!({"status": "Healthy"}))
}

#[utoipa::path(get, path = "/health/ready", responses((status = 200, description = "Redis is reachable"), (status = 503, body = ErrorBody)))]
pub(super) async fn ready(State(st): State<ApiState>) -> Response {
    if redis_ok(&st).await {
        Json(json!({"status": "Healthy"})).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "redis_unavailable",
            "redis is unreachable",
        )
        .into_response()
    }
}

#[utoipa::path(get, path = "/metrics",
    responses((status = 200, description = "Prometheus text format: this process's metrics and the fleet-wide gauges")))]
pub(super) async fn prometheus_metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        honua_runtime::telemetry::metrics_handle().render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_keys_are_camel_case() {
        assert_eq!(camel("default_timeout_minutes"), "defaultTimeoutMinutes");
    }

    #[test]
    fn user_chosen_map_keys_are_shown_as_written() {
        let v = camel_keys(json!({
            "llm_provider": {
                "limits": {"openai_compatible/gpt-4o": {"requestsPerMinute": 1,
                    "shares": {"my_type": {"weight": 3, "minRpm": 1}},
                    "tenantShares": {"acme_corp": {"weight": 2}}}},
                "max_tokens_by_step": {"validate_requirements": 5},
                "budgets": {"process_types": {"my_type": {"max_tokens_per_day": 3}}},
            }
        }));
        let l = &v["llmProvider"];
        assert_eq!(
            l["limits"]["openai_compatible/gpt-4o"]["requestsPerMinute"],
            1
        );
        assert_eq!(l["maxTokensByStep"]["validate_requirements"], 5);
        let bucket = &l["limits"]["openai_compatible/gpt-4o"];
        assert_eq!(bucket["shares"]["my_type"]["minRpm"], 1);
        assert_eq!(bucket["tenantShares"]["acme_corp"]["weight"], 2);
        assert_eq!(
            l["budgets"]["processTypes"]["my_type"]["maxTokensPerDay"],
            3
        );
    }
}

/// The name an admin action is recorded under: the API key's name, or `anonymous` when
/// the API is open.
fn actor(caller: Option<axum::Extension<super::auth::Caller>>) -> String {
    caller.map_or_else(|| "anonymous".to_string(), |c| c.0.name)
}

#[utoipa::path(post, path = "/api/admin/drain", responses(
    (status = 200, description = "intake is drained (idempotent): new processes are created Pending; the counts say what is still in flight", body = DrainReply),
    (status = 503, body = ErrorBody)))]
pub(super) async fn drain(
    State(st): State<ApiState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
) -> Result<Json<DrainReply>, ApiError> {
    Ok(Json(st.engine.drain(&actor(caller)).await?))
}

#[utoipa::path(get, path = "/api/admin/drain", responses(
    (status = 200, description = "whether intake is drained, and what is still in flight", body = DrainReply),
    (status = 503, body = ErrorBody)))]
pub(super) async fn drain_status(State(st): State<ApiState>) -> Result<Json<DrainReply>, ApiError> {
    Ok(Json(st.engine.intake_report().await?))
}

#[utoipa::path(post, path = "/api/admin/resume-intake", responses(
    (status = 200, description = "intake is open (idempotent): the schedulers start the Pending processes, oldest first", body = DrainReply),
    (status = 503, body = ErrorBody)))]
pub(super) async fn resume_intake(
    State(st): State<ApiState>,
    caller: Option<axum::Extension<super::auth::Caller>>,
) -> Result<Json<DrainReply>, ApiError> {
    Ok(Json(st.engine.resume_intake(&actor(caller)).await?))
}
