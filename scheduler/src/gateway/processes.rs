//! The process endpoints: submit, list, purge, read, and the operator actions (cancel,
//! retry, retry the current step, signal).

use super::auth::Caller;
use super::{ApiError, ApiState, ErrorBody};
use crate::ops::{ListQuery, parse_age};
use crate::submit::Submitted;
use crate::view::{LlmUsageView, ProcessSummary, ProcessView};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use honua_shared::envelope::{Submission, TraceContext, valid_id};
use honua_shared::record::ProcessRecord;
use honua_shared::status::ProcessStatus;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

/// The acting API key's name, for the audit trail (`None` when the API is open).
pub(super) fn by(caller: &Option<Extension<Caller>>) -> Option<&str> {
    caller.as_ref().map(|Extension(c)| c.name.as_str())
}

fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad("malformed_json", e.to_string()))
}

fn optional_body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, ApiError> {
    let trimmed = bytes.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        Ok(T::default())
    } else {
        json_body(bytes)
    }
}

/// `POST /api/processes` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubmitBody {
    pub process_type: String,
    #[serde(default)]
    pub version: Option<u32>,
    /// A JSON object.
    #[serde(default)]
    pub input: Option<Value>,
    /// A process id of your choosing, `[A-Za-z0-9_-]{1,64}`.
    #[serde(default)]
    pub id: Option<String>,
    /// Same key, same process (also the `Idempotency-Key` header).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Whom the process runs for, `[A-Za-z0-9_-]{1,64}`: stored on the process and
    /// picks its fair share of LLM buckets with tenant shares.
    #[serde(default)]
    pub tenant: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmitReply {
    pub id: String,
    pub process_type: String,
    pub duplicate: bool,
    /// The fleet's intake is drained (`POST /api/admin/drain`): the process is stored
    /// `Pending` and starts when intake resumes. Present only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

#[utoipa::path(post, path = "/api/processes", request_body = SubmitBody,
    responses((status = 201, body = SubmitReply), (status = 200, description = "idempotent repeat: the stored process", body = SubmitReply),
              (status = 400, body = ErrorBody),
              (status = 409, description = "`id_taken`, or `idempotency_key_reused`: the key names a process of another type or input", body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 415, description = "a content type other than application/json or application/x-www-form-urlencoded", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub(super) async fn submit(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: SubmitBody = json_body(&body?)?;
    let idem = b.idempotency_key.or_else(|| {
        headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    for (name, v) in [
        ("id", &b.id),
        ("idempotencyKey", &idem),
        ("tenant", &b.tenant),
    ] {
        if let Some(v) = v
            && !valid_id(v)
        {
            return Err(ApiError::bad(
                "invalid_field",
                format!("{name} must be 1-64 characters of [A-Za-z0-9_-]"),
            ));
        }
    }
    let sub = Submission {
        process_type: b.process_type,
        version: b.version,
        input: b.input.unwrap_or_else(|| json!({})),
        id: b.id,
        idempotency_key: idem,
        tenant: b.tenant,
        trace: TraceContext::from_caller(
            headers.get("traceparent").and_then(|v| v.to_str().ok()),
            None,
        ),
    };
    let (status, reply) = match st.engine.create(&sub, None).await? {
        Submitted::Created(id) => (
            StatusCode::CREATED,
            SubmitReply {
                id,
                process_type: sub.process_type,
                duplicate: false,
                pending: false,
            },
        ),
        Submitted::Pending(id) => (
            StatusCode::CREATED,
            SubmitReply {
                id,
                process_type: sub.process_type,
                duplicate: false,
                pending: true,
            },
        ),
        Submitted::Duplicate { id, process_type } => (
            StatusCode::OK,
            SubmitReply {
                id,
                process_type,
                duplicate: true,
                pending: false,
            },
        ),
    };
    let id = reply.id.clone();
    let mut resp = (status, Json(reply)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/api/processes/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

/// Query of `GET /api/processes`.
#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListParams {
    /// Pending, Running, WaitingForApproval, Completed, Failed, Cancelled, TimedOut.
    pub status: Option<String>,
    /// Only processes that ended (finished statuses) or started (others) within this
    /// long: `30m`, `24h`, `7d`.
    pub since: Option<String>,
    pub process_type: Option<String>,
    /// Page size, 1-1000 (default 100); anything else is 400.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// From the `x-next-cursor` header of the previous page.
    pub cursor: Option<String>,
}

/// A `limit` query parameter: 1-1000, 100 when absent.
pub(super) fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(100) {
        n @ 1..=1000 => Ok(n),
        n => Err(ApiError::bad(
            "invalid_query",
            format!("limit must be 1-1000, not {n}"),
        )),
    }
}

fn status_param(s: &str) -> Result<ProcessStatus, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad("invalid_query", format!("unknown status {s:?}")))
}

async fn list_with(st: &ApiState, q: ListQuery) -> Result<Response, ApiError> {
    let (recs, next) = st.engine.list(&q).await?;
    let now = st.engine.store.server_time_ms().await?;
    let items: Vec<ProcessSummary> = recs.iter().map(|r| ProcessSummary::new(r, now)).collect();
    let mut resp = Json(items).into_response();
    if let Some(c) = next
        && let Ok(v) = HeaderValue::from_str(&c)
    {
        resp.headers_mut().insert("x-next-cursor", v);
    }
    Ok(resp)
}

#[utoipa::path(get, path = "/api/processes", params(ListParams),
    responses((status = 200, description = "newest first; the next page's cursor is in `x-next-cursor`", body = [ProcessSummary]),
              (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    State(st): State<ApiState>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = q?;
    let q = ListQuery {
        status: p.status.as_deref().map(status_param).transpose()?,
        since: p.since.as_deref().map(parse_age).transpose()?,
        process_type: p.process_type,
        limit: page_limit(p.limit)?,
        cursor: p.cursor,
        active: false,
    };
    list_with(&st, q).await
}

#[utoipa::path(get, path = "/api/processes/active",
    responses((status = 200, description = "every unfinished process", body = [ProcessSummary])))]
pub(super) async fn active(State(st): State<ApiState>) -> Result<Response, ApiError> {
    list_with(
        &st,
        ListQuery {
            active: true,
            limit: 1000,
            ..Default::default()
        },
    )
    .await
}

/// Query of `DELETE /api/processes`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PurgeParams {
    /// A finished status: Completed, Failed, Cancelled or TimedOut.
    pub status: String,
    /// Ended longer ago than this: `30d`.
    pub older_than: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PurgeReply {
    pub deleted: u64,
}

#[utoipa::path(delete, path = "/api/processes", params(PurgeParams),
    responses((status = 200, body = PurgeReply), (status = 400, body = ErrorBody)))]
pub(super) async fn purge(
    State(st): State<ApiState>,
    q: Result<Query<PurgeParams>, QueryRejection>,
) -> Result<Json<PurgeReply>, ApiError> {
    let Query(p) = q?;
    let status = status_param(&p.status)?;
    let age = parse_age(&p.older_than)?;
    let deleted = st.engine.purge(status, age).await?;
    Ok(Json(PurgeReply { deleted }))
}

#[utoipa::path(get, path = "/api/processes/{id}", params(("id" = String, Path)),
    responses((status = 200, body = ProcessView), (status = 404, body = ErrorBody)))]
pub(super) async fn get_process(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ProcessView>, ApiError> {
    Ok(Json(process_view(&st, &id).await?.0))
}

/// The view of process `id` (with its LLM usage) and the record it was made from.
pub(super) async fn process_view(
    st: &ApiState,
    id: &str,
) -> Result<(ProcessView, ProcessRecord), ApiError> {
    let (rec, now) = st.engine.load(id).await?;
    let def = st.engine.defs.get(&rec.process_type, rec.version);
    let mut view = ProcessView::new(&rec, def.map(|d| &**d), now);
    view.llm_usage = st
        .engine
        .store
        .llm_usage(id)
        .await?
        .map(|(tokens, cost)| LlmUsageView::new(tokens, cost));
    Ok((view, rec))
}

#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActionReply {
    pub id: String,
    pub status: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
}

pub(super) async fn action_reply(
    st: &ApiState,
    id: &str,
    steps: Vec<String>,
) -> Result<Json<ActionReply>, ApiError> {
    let (rec, _) = st.engine.load(id).await?;
    Ok(Json(ActionReply {
        id: id.to_string(),
        status: rec.status.to_string(),
        steps,
    }))
}

#[utoipa::path(post, path = "/api/processes/{id}/cancel", params(("id" = String, Path)), request_body = Option<CancelBody>,
    responses((status = 200, body = ActionReply), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn cancel(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<ActionReply>, ApiError> {
    let b: CancelBody = optional_body(&body?)?;
    st.engine
        .cancel(&id, b.reason.as_deref(), by(&caller))
        .await?;
    action_reply(&st, &id, vec![]).await
}

#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PauseBody {
    /// Fence out the running steps now (their workers stop them at the next heartbeat and
    /// their commits are refused); they run again on resume. Default: let them finish.
    #[serde(default)]
    pub hand_back: bool,
    /// Recorded in the audit trail.
    #[serde(default)]
    pub reason: Option<String>,
}

#[utoipa::path(post, path = "/api/processes/{id}/pause", params(("id" = String, Path)), request_body = Option<PauseBody>,
    responses((status = 200, body = ActionReply), (status = 404, body = ErrorBody), (status = 409, description = "not Running or WaitingForApproval", body = ErrorBody)))]
pub(super) async fn pause(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<ActionReply>, ApiError> {
    let b: PauseBody = optional_body(&body?)?;
    st.engine
        .pause(&id, b.hand_back, b.reason.as_deref(), by(&caller))
        .await?;
    action_reply(&st, &id, vec![]).await
}

#[utoipa::path(post, path = "/api/processes/{id}/resume", params(("id" = String, Path)),
    responses((status = 200, body = ActionReply), (status = 404, body = ErrorBody), (status = 409, description = "not Paused", body = ErrorBody)))]
pub(super) async fn resume(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
) -> Result<Json<ActionReply>, ApiError> {
    st.engine.resume(&id, by(&caller)).await?;
    action_reply(&st, &id, vec![]).await
}

#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBody {
    /// Merged into the process input (top-level keys) before the retry.
    #[serde(default)]
    pub state_patch: Option<Value>,
    /// Retry from this step of the definition instead of the failed one: it and every step
    /// downstream of it run again, the steps it depends on keep their results. A Completed
    /// process may be retried this way too. Unknown step: 400.
    #[serde(default)]
    pub from_step: Option<String>,
}

#[utoipa::path(post, path = "/api/processes/{id}/retry", params(("id" = String, Path)), request_body = Option<RetryBody>,
    responses((status = 200, body = ActionReply), (status = 400, description = "a bad statePatch, or fromStep names no step of the definition", body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, description = "not in a state that can be retried", body = ErrorBody)))]
pub(super) async fn retry(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<ActionReply>, ApiError> {
    let b: RetryBody = optional_body(&body?)?;
    st.engine
        .retry(
            &id,
            b.from_step.as_deref(),
            b.state_patch.as_ref(),
            by(&caller),
        )
        .await?;
    action_reply(&st, &id, vec![]).await
}

#[utoipa::path(post, path = "/api/processes/{id}/retry-current-step", params(("id" = String, Path)),
    responses((status = 200, body = ActionReply), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn retry_current_step(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
) -> Result<Json<ActionReply>, ApiError> {
    let steps = st.engine.retry_current_step(&id, by(&caller)).await?;
    action_reply(&st, &id, steps).await
}

#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// `approve` (default), `reject`, or an outcome name the definition routes on.
    #[serde(default)]
    pub value: Option<String>,
}

#[utoipa::path(post, path = "/api/processes/{id}/signal/{name}", params(("id" = String, Path), ("name" = String, Path)),
    request_body = Option<SignalBody>,
    responses((status = 202, description = "delivered to the scheduler"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn signal(
    State(st): State<ApiState>,
    Path((id, name)): Path<(String, String)>,
    caller: Option<Extension<Caller>>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: SignalBody = optional_body(&body?)?;
    let value = b.value.unwrap_or_else(|| "approve".into());
    st.engine.signal(&id, &name, &value, by(&caller)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "signal": name, "value": value})),
    )
        .into_response())
}
