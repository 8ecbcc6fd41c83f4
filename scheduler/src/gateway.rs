//! The HTTP gateway (default :9090): submit a process, read it, signal it, health.
//! [`router`] builds the whole app without a socket, so it is testable in-process.

use crate::submit::{Engine, SubmitError, Submitted};
use crate::view::ProcessView;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use honua_shared::envelope::{Event, Submission, TraceContext, valid_id};
use honua_shared::record::ProcessRecord;
use honua_shared::status::StepStatus;
use honua_shared::store::StoreError;
use serde::Deserialize;
use serde_json::{Value, json};

/// An API error: `{"error": code, "detail": message}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
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

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::UnknownType(_) | SubmitError::UnknownVersion(..) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "unknown_process_type",
                e.to_string(),
            ),
            SubmitError::InvalidInput(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", e.to_string())
            }
            SubmitError::IdTaken(_) => {
                ApiError::new(StatusCode::CONFLICT, "id_taken", e.to_string())
            }
            SubmitError::NotDurable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_durable",
                e.to_string(),
            ),
            SubmitError::Store(s) => s.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SubmitBody {
    process_type: String,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))
}

async fn submit(
    State(engine): State<Engine>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: SubmitBody = json_body(&body)?;
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
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
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
        trace: TraceContext {
            traceparent: headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            tracestate: None,
        },
    };
    let result = engine.create(&sub, None).await?;
    let status = match result {
        Submitted::Created(_) => StatusCode::CREATED,
        Submitted::Duplicate(_) => StatusCode::OK,
    };
    let id = result.id().to_string();
    let location = format!("/api/processes/{id}");
    let mut resp = (
        status,
        Json(json!({"id": id, "processType": sub.process_type, "duplicate": status == StatusCode::OK})),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

async fn load(engine: &Engine, id: &str) -> Result<(ProcessRecord, u64), ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no process {id}"),
        )
    };
    if !valid_id(id) {
        return Err(not_found());
    }
    let (now, mut v) = engine.store.load_processes(&[id]).await?;
    let (meta, steps) = v.remove(0);
    match ProcessRecord::parse(id, &meta, &steps) {
        Ok(Some(r)) => Ok((r, now)),
        Ok(None) => Err(not_found()),
        Err(e) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "corrupt_record",
            e.to_string(),
        )),
    }
}

async fn get_process(
    State(engine): State<Engine>,
    Path(id): Path<String>,
) -> Result<Json<ProcessView>, ApiError> {
    let (rec, now) = load(&engine, &id).await?;
    let def = engine.defs.get(&rec.process_type, rec.version);
    Ok(Json(ProcessView::new(&rec, def.map(|d| &**d), now)))
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    #[serde(default)]
    value: Option<String>,
}

async fn signal(
    State(engine): State<Engine>,
    Path((id, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let b: SignalBody = if body.is_empty() {
        SignalBody::default()
    } else {
        json_body(&body)?
    };
    let (rec, _) = load(&engine, &id).await?;
    let def = engine.defs.get(&rec.process_type, rec.version);
    let waiting = rec.steps.iter().any(|(n, r)| {
        r.status == StepStatus::Waiting
            && def.and_then(|d| d.step(n)).is_some_and(|s| {
                s.kind == "approval"
                    && s.config
                        .get("signal")
                        .and_then(Value::as_str)
                        .unwrap_or("approval")
                        == name
            })
    });
    if !waiting {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_waiting",
            format!(
                "process {id} has no step waiting for signal {name:?} (status {})",
                rec.status
            ),
        ));
    }
    let value = b.value.unwrap_or_else(|| "approve".into());
    engine
        .store
        .send_event(&Event::Signal {
            process_id: id.clone(),
            name: name.clone(),
            value: value.clone(),
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "signal": name, "value": value})),
    )
        .into_response())
}

async fn health(State(engine): State<Engine>) -> Response {
    let redis_ok = tokio::time::timeout(std::time::Duration::from_secs(2), engine.store.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let state = if redis_ok { "Healthy" } else { "Unhealthy" };
    let body = json!({"status": state, "checks": {"redis": state}});
    let code = if redis_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// The gateway's routes.
pub fn router(engine: Engine) -> Router {
    let limit = engine.cfg.max_request_body_kb * 1024;
    Router::new()
        .route("/health", get(health))
        .route("/api/processes", post(submit))
        .route("/api/processes/{id}", get(get_process))
        .route("/api/processes/{id}/signal/{name}", post(signal))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(engine)
}

/// Serves the gateway on `listener` until `shutdown` fires.
pub async fn serve(
    engine: Engine,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(engine))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
