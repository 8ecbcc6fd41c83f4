//! The gateway's error type: every failure as `{"error": code, "detail": message}` with
//! its HTTP status, and how the errors of the layers below map to it.

use crate::ops::OpsError;
use crate::submit::SubmitError;
use axum::Json;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use honua_shared::store::StoreError;
use serde::Serialize;
use serde_json::json;
use utoipa::ToSchema;

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
    pub(super) fn bad(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }
    pub(super) fn detail(&self) -> &str {
        &self.detail
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
            SubmitError::Partition(_) | SubmitError::WrongPartition { .. } => {
                ApiError::bad("invalid_input", e.to_string())
            }
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
