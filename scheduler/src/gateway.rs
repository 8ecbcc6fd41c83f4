//! The HTTP gateway (default :9090): the operator API of the operations guide.
//! [`router`] builds the whole app without a socket, so it is testable in-process.
//! Every route is listed once in [`ROUTES`] with the role it needs; the same table drives
//! authorization, and a test checks it against the router and the OpenAPI document.

use crate::ops::{ListQuery, OpsError, parse_age};
use crate::processes::Processes;
use crate::submit::{SubmitError, Submitted};
use crate::view::{LlmUsageView, ProcessSummary, ProcessView};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use honua_shared::config::Role;
use honua_shared::envelope::{Submission, TraceContext, valid_id};
use honua_shared::status::ProcessStatus;
use honua_shared::store::StoreError;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use utoipa::{OpenApi, ToSchema};

/// Every route: method, path (axum syntax), and the role it needs (`None`: open, subject to
/// `api.open_health`/`open_metrics` for those paths).
pub const ROUTES: &[(&str, &str, Option<Role>)] = &[
    ("GET", "/health", None),
    ("GET", "/health/live", None),
    ("GET", "/health/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/api/openapi.json", Some(Role::Read)),
    ("POST", "/api/processes", Some(Role::Operate)),
    ("GET", "/api/processes", Some(Role::Read)),
    ("DELETE", "/api/processes", Some(Role::Admin)),
    ("GET", "/api/processes/active", Some(Role::Read)),
    ("GET", "/api/processes/{id}", Some(Role::Read)),
    ("POST", "/api/processes/{id}/cancel", Some(Role::Operate)),
    ("POST", "/api/processes/{id}/retry", Some(Role::Operate)),
    (
        "POST",
        "/api/processes/{id}/retry-current-step",
        Some(Role::Operate),
    ),
    (
        "POST",
        "/api/processes/{id}/signal/{name}",
        Some(Role::Operate),
    ),
    ("GET", "/api/config", Some(Role::Read)),
    ("GET", "/api/queues", Some(Role::Read)),
    ("GET", "/api/workers", Some(Role::Read)),
    ("GET", "/api/deadletters", Some(Role::Read)),
    ("POST", "/api/deadletters/{id}/replay", Some(Role::Admin)),
];

/// An API error: `{"error": code, "detail": message}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

/// The JSON body of every error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }
    fn bad(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": self.code, "detail": self.detail})),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_retryable() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "redis_unavailable",
                "redis is unreachable; retry later",
            )
        } else {
            tracing::error!(error = %e, "redis error in the gateway");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        match e {
            OpsError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            OpsError::Conflict(_) => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", e.to_string())
            }
            OpsError::Invalid(_) => ApiError::bad("invalid_request", e.to_string()),
            OpsError::Corrupt(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "corrupt_record",
                e.to_string(),
            ),
            OpsError::Store(s) => s.into(),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::UnknownType(_) | SubmitError::UnknownVersion(..) => {
                ApiError::bad("unknown_process_type", e.to_string())
            }
            SubmitError::InvalidInput(_) => ApiError::bad("invalid_input", e.to_string()),
            SubmitError::IdTaken(_) => {
                ApiError::new(StatusCode::CONFLICT, "id_taken", e.to_string())
            }
            SubmitError::IdempotencyKeyReused { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                e.to_string(),
            ),
            SubmitError::NotDurable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_durable",
                e.to_string(),
            ),
            SubmitError::Store(s) => s.into(),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(e: BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body exceeds the limit",
            )
        } else {
            ApiError::bad("bad_body", e.body_text())
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad("invalid_query", e.body_text())
    }
}

/// What the gateway serves from: the engine and, when it runs beside one, the scheduler's
/// liveness counters.
#[derive(Clone)]
pub struct ApiState {
    pub engine: Processes,
    pub scheduler: Option<Arc<crate::scheduler::SchedulerStats>>,
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
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubmitReply {
    pub id: String,
    pub process_type: String,
    pub duplicate: bool,
}

#[utoipa::path(post, path = "/api/processes", request_body = SubmitBody,
    responses((status = 201, body = SubmitReply), (status = 200, description = "idempotent repeat: the stored process", body = SubmitReply),
              (status = 400, body = ErrorBody),
              (status = 409, description = "`id_taken`, or `idempotency_key_reused`: the key names a process of another type or input", body = ErrorBody),
              (status = 413, body = ErrorBody), (status = 415, description = "a content type other than application/json or application/x-www-form-urlencoded", body = ErrorBody),
              (status = 503, body = ErrorBody)))]
async fn submit(
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
    for (name, v) in [("id", &b.id), ("idempotencyKey", &idem)] {
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
            },
        ),
        Submitted::Duplicate { id, process_type } => (
            StatusCode::OK,
            SubmitReply {
                id,
                process_type,
                duplicate: true,
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
fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
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
async fn list(
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
async fn active(State(st): State<ApiState>) -> Result<Response, ApiError> {
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
async fn purge(
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
async fn get_process(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ProcessView>, ApiError> {
    let (rec, now) = st.engine.load(&id).await?;
    let def = st.engine.defs.get(&rec.process_type, rec.version);
    let mut view = ProcessView::new(&rec, def.map(|d| &**d), now);
    view.llm_usage = st
        .engine
        .store
        .llm_usage(&id)
        .await?
        .map(|(tokens, cost)| LlmUsageView::new(tokens, cost));
    Ok(Json(view))
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

async fn action_reply(
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
async fn cancel(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<ActionReply>, ApiError> {
    let b: CancelBody = optional_body(&body?)?;
    st.engine.cancel(&id, b.reason.as_deref()).await?;
    action_reply(&st, &id, vec![]).await
}

#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryBody {
    /// Merged into the process input (top-level keys) before the retry.
    #[serde(default)]
    pub state_patch: Option<Value>,
}

#[utoipa::path(post, path = "/api/processes/{id}/retry", params(("id" = String, Path)), request_body = Option<RetryBody>,
    responses((status = 200, body = ActionReply), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn retry(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Json<ActionReply>, ApiError> {
    let b: RetryBody = optional_body(&body?)?;
    st.engine.retry(&id, b.state_patch.as_ref()).await?;
    action_reply(&st, &id, vec![]).await
}

#[utoipa::path(post, path = "/api/processes/{id}/retry-current-step", params(("id" = String, Path)),
    responses((status = 200, body = ActionReply), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn retry_current_step(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<ActionReply>, ApiError> {
    let steps = st.engine.retry_current_step(&id).await?;
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
async fn signal(
    State(st): State<ApiState>,
    Path((id, name)): Path<(String, String)>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let b: SignalBody = optional_body(&body?)?;
    let value = b.value.unwrap_or_else(|| "approve".into());
    st.engine.signal(&id, &name, &value).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "signal": name, "value": value})),
    )
        .into_response())
}

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
const USER_KEYED: [&str; 6] = [
    "limits",
    "prices",
    "max_tokens_by_step",
    "process_types",
    "deployments",
    "process_timeouts",
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
async fn config(State(st): State<ApiState>) -> Json<Value> {
    let cfg = &st.engine.cfg;
    let mut v = serde_json::to_value(&**cfg).unwrap_or_default();
    v["redis_url"] = Value::String(cfg.redacted_redis_url());
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

#[utoipa::path(get, path = "/api/queues", responses((status = 200, body = [QueueView])))]
async fn queues(State(st): State<ApiState>) -> Result<Json<Vec<QueueView>>, ApiError> {
    let store = &st.engine.store;
    let k = store.keys();
    let now = store.server_time_ms().await?;
    let mut out = Vec::new();
    for (stream, group) in [
        (k.submit(), honua_shared::keys::SCHEDULER_GROUP),
        (k.jobs(), honua_shared::keys::WORKERS_GROUP),
        (k.events(), honua_shared::keys::SCHEDULER_GROUP),
        (k.results(), honua_shared::keys::SCHEDULER_GROUP),
    ] {
        let s = store.stream_stats(&stream, group).await?;
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
}

#[utoipa::path(get, path = "/api/workers", responses((status = 200, body = [WorkerView])))]
async fn workers(State(st): State<ApiState>) -> Result<Json<Vec<WorkerView>>, ApiError> {
    let now = st.engine.store.server_time_ms().await?;
    let ws = st.engine.store.workers(500).await?;
    Ok(Json(
        ws.into_iter()
            .map(|w| WorkerView {
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
#[serde(deny_unknown_fields)]
pub struct DlqParams {
    /// At most this many, newest first: 1-1000 (default 100); anything else is 400.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/deadletters", params(DlqParams), responses((status = 200, body = [DeadLetterView])))]
async fn deadletters(
    State(st): State<ApiState>,
    q: Result<Query<DlqParams>, QueryRejection>,
) -> Result<Json<Vec<DeadLetterView>>, ApiError> {
    let Query(p) = q?;
    let store = &st.engine.store;
    let entries = store
        .stream_latest(&store.keys().dlq(), page_limit(p.limit)?)
        .await?;
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
async fn replay(
    State(st): State<ApiState>,
    Path(id): Path<String>,
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
    let entry = store
        .stream_entry(&store.keys().dlq(), &id)
        .await?
        .ok_or_else(not_found)?;
    let pid = entry.fields.get("pid").unwrap_or("").to_string();
    st.engine.retry(&pid, None).await?;
    store.delete_dead_letter(&id).await?;
    tracing::info!(dead_letter = %id, process_id = %pid, "dead letter replayed");
    action_reply(&st, &pid, vec![]).await
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
    /// Healthy, Degraded (no worker seen lately) or Unhealthy.
    pub status: String,
    pub checks: std::collections::BTreeMap<String, String>,
}

async fn redis_ok(st: &ApiState) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(2), st.engine.store.ping())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A worker with a heartbeat this recent counts as live in `/health`.
const LIVE_WORKER_MS: u64 = 30_000;

#[utoipa::path(get, path = "/health", responses((status = 200, body = HealthReply),
    (status = 401, description = "`api.open_health = false` and no or an unknown bearer token", body = ErrorBody),
    (status = 503, body = HealthReply)))]
async fn health(State(st): State<ApiState>) -> Response {
    let mut checks = std::collections::BTreeMap::new();
    let redis = redis_ok(&st).await;
    checks.insert(
        "redis".to_string(),
        if redis { "Healthy" } else { "Unhealthy" }.to_string(),
    );
    let mut healthy = redis;
    let mut degraded = false;
    if redis {
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
    let (code, status) = match (healthy, degraded) {
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "Unhealthy"),
        (true, true) => (StatusCode::OK, "Degraded"),
        (true, false) => (StatusCode::OK, "Healthy"),
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
async fn live() -> Json<Value> {
    Json(json!({"status": "Healthy"}))
}

#[utoipa::path(get, path = "/health/ready", responses((status = 200, description = "Redis is reachable"), (status = 503, body = ErrorBody)))]
async fn ready(State(st): State<ApiState>) -> Response {
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
async fn prometheus_metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        honua_runtime::telemetry::metrics_handle().render(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Honua Process Framework API", description = "The operator API of the operations guide."),
    paths(health, live, ready, prometheus_metrics, openapi_json, submit, list, purge, active, get_process, cancel, retry,
          retry_current_step, signal, config, queues, workers, deadletters, replay),
    components(schemas(ErrorBody, SubmitBody, SubmitReply, ProcessSummary, ProcessView, LlmUsageView, PurgeReply, CancelBody,
                       RetryBody, SignalBody, ActionReply, QueueView, WorkerView, WorkerJobView, DeadLetterView, HealthReply)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        // The answers every protected route can give, whatever the handler: a bad request,
        // no or an unknown token, a role that may not, a body over the cap, Redis down.
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |desc: &str| {
            ResponseBuilder::new()
                .description(desc)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        let common = [
            ("400", "invalid request"),
            ("401", "no or an unknown bearer token"),
            ("403", "the token's role may not do this"),
            (
                "503",
                "Redis is unreachable; retry after the Retry-After delay",
            ),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            let protected = path.starts_with("/api/");
            for op in [&mut item.get, &mut item.post, &mut item.delete]
                .into_iter()
                .flatten()
            {
                let responses = &mut op.responses.responses;
                if protected {
                    for (code, desc) in common {
                        responses
                            .entry(code.to_string())
                            .or_insert_with(|| error(desc).into());
                    }
                }
                if op.request_body.is_some() {
                    responses
                        .entry("413".to_string())
                        .or_insert_with(|| error("the body exceeds max_request_body_kb").into());
                }
            }
            // Every route that changes something checks the content type.
            for op in [&mut item.post, &mut item.delete].into_iter().flatten() {
                op.responses.responses.entry("415".to_string()).or_insert_with(|| {
                    error("a content type other than application/json or application/x-www-form-urlencoded").into()
                });
            }
        }
    }
}

#[utoipa::path(get, path = "/api/openapi.json", responses((status = 200, description = "this document")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// Routes open whatever the configuration: the liveness and readiness probes.
const PROBES: &[&str] = &["/health/live", "/health/ready"];

/// The role a route needs, from [`ROUTES`]; `None` for open routes.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method.as_str() && *p == path)
        .and_then(|(_, _, r)| *r)
}

/// Hex SHA-256 of a token.
pub fn token_hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn authorize(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let api = &st.engine.cfg.api;
    if api.keys.is_empty() {
        return next.run(req).await;
    }
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string());
    let Some(path) = path else {
        // Unknown routes: answer 401 to anonymous callers as for any protected route.
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a bearer token is required",
        )
        .into_response();
    };
    // The Kubernetes probes stay open (they say only "serving" and "Redis reachable");
    // `/health` (fleet details) and `/metrics` follow their flags.
    let open = PROBES.contains(&path.as_str())
        || (path == "/health" && api.open_health)
        || (path == "/metrics" && api.open_metrics);
    let needed = required_role(req.method(), &path);
    if open {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a bearer token is required",
        )
        .into_response();
    };
    let hash = token_hash(token);
    let mut role = None;
    for k in &api.keys {
        if constant_time_eq(hash.as_bytes(), k.sha256.as_bytes()) {
            role = Some(k.role);
        }
    }
    let Some(role) = role else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")
            .into_response();
    };
    if needed.is_some_and(|n| role < n) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token's role may not do that",
        )
        .into_response();
    }
    next.run(req).await
}

/// The content types a request that changes something may have: JSON, and the form type
/// curl sends for `-d` without a header (the operations guide's commands). No header at all
/// is fine (a bodiless POST). `text/plain` and `multipart/form-data` — what a browser form on
/// another site can send without a CORS preflight — are refused with 415.
pub const ACCEPTED_CONTENT_TYPES: &[&str] =
    &["application/json", "application/x-www-form-urlencoded"];

async fn content_type(req: Request, next: Next) -> Response {
    let ct = req.headers().get(header::CONTENT_TYPE);
    if req.method() != Method::GET
        && req.method() != Method::HEAD
        && let Some(ct) = ct
    {
        let mime = ct
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase());
        if !mime.is_some_and(|m| ACCEPTED_CONTENT_TYPES.contains(&m.as_str())) {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "content-type must be {} (or absent)",
                    ACCEPTED_CONTENT_TYPES.join(" or ")
                ),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// The gateway's routes, without the scheduler's liveness check.
pub fn router(engine: Processes) -> Router {
    router_with(ApiState {
        engine,
        scheduler: None,
    })
}

/// The gateway's routes.
pub fn router_with(state: ApiState) -> Router {
    let limit = state.engine.cfg.max_request_body_kb * 1024;
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(prometheus_metrics))
        .route("/api/openapi.json", get(openapi_json))
        .route("/api/processes", post(submit).get(list).delete(purge))
        .route("/api/processes/active", get(active))
        .route("/api/processes/{id}", get(get_process))
        .route("/api/processes/{id}/cancel", post(cancel))
        .route("/api/processes/{id}/retry", post(retry))
        .route(
            "/api/processes/{id}/retry-current-step",
            post(retry_current_step),
        )
        .route("/api/processes/{id}/signal/{name}", post(signal))
        .route("/api/config", get(config))
        .route("/api/queues", get(queues))
        .route("/api/workers", get(workers))
        .route("/api/deadletters", get(deadletters))
        .route("/api/deadletters/{id}/replay", post(replay))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn(content_type))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` fires.
pub async fn serve(
    engine: Processes,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    serve_with(
        ApiState {
            engine,
            scheduler: None,
        },
        listener,
        shutdown,
    )
    .await
}

/// Serves `state` on `listener` until `shutdown` fires.
pub async fn serve_with(
    state: ApiState,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    // The hardened server: header, idle and body timeouts and a connection cap.
    let limits = honua_runtime::http_server::Limits::from(&state.engine.cfg.http_server);
    honua_runtime::http_server::serve(listener, router_with(state), limits, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_every_route_of_the_table() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for (method, path, _) in ROUTES {
            let item = paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} missing from OpenAPI"));
            assert!(
                item.get(method.to_ascii_lowercase()).is_some(),
                "{method} {path} missing"
            );
        }
        let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(
            documented,
            ROUTES.len(),
            "OpenAPI documents a route the table lacks"
        );
    }

    #[test]
    fn roles_and_hashes() {
        assert_eq!(
            required_role(&Method::GET, "/api/processes"),
            Some(Role::Read)
        );
        assert_eq!(
            required_role(&Method::DELETE, "/api/processes"),
            Some(Role::Admin)
        );
        assert_eq!(required_role(&Method::GET, "/health"), None);
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(constant_time_eq(b"ab", b"ab"));
        assert!(!constant_time_eq(b"ab", b"ac"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert_eq!(camel("default_timeout_minutes"), "defaultTimeoutMinutes");
    }

    #[test]
    fn user_chosen_map_keys_are_shown_as_written() {
        let v = camel_keys(json!({
            "llm_provider": {
                "limits": {"openai_compatible/gpt-4o": {"requestsPerMinute": 1}},
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
        assert_eq!(
            l["budgets"]["processTypes"]["my_type"]["maxTokensPerDay"],
            3
        );
    }
}
