//! The state endpoints ([`crate::state`]): a process's state decoded to JSON, the check of
//! every live process's state, and deleting one process with every reference to it.

use super::auth::Caller;
use super::{ApiError, ApiState, ErrorBody};
use crate::state::{CheckQuery, CheckReport, DeleteReply, StateView};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;

#[utoipa::path(get, path = "/api/processes/{id}/state", params(("id" = String, Path)),
    responses((status = 200, description = "input, outputs and checkpoints decoded from MessagePack; parts that do not decode are listed in `problems`", body = StateView),
              (status = 404, body = ErrorBody)))]
pub(super) async fn process_state(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<StateView>, ApiError> {
    Ok(Json(st.engine.state(&id).await?))
}

/// Query of `GET /api/state/check`.
#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckParams {
    /// Only processes of this type.
    #[serde(rename = "type")]
    pub process_type: Option<String>,
    /// Index entries read for this page, 1-1000 (default 1000); anything else is 400.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/state/check", params(CheckParams),
    responses((status = 200, description = "one page of the check, newest processes first; continue with `nextCursor` until it is null", body = CheckReport),
              (status = 400, body = ErrorBody)))]
pub(super) async fn state_check(
    State(st): State<ApiState>,
    q: Result<Query<CheckParams>, QueryRejection>,
) -> Result<Json<CheckReport>, ApiError> {
    let Query(p) = q?;
    let limit = match p.limit.unwrap_or(1000) {
        n @ 1..=1000 => n,
        n => {
            return Err(ApiError::bad(
                "invalid_query",
                format!("limit must be 1-1000, not {n}"),
            ));
        }
    };
    let q = CheckQuery {
        process_type: p.process_type,
        limit,
        cursor: p.cursor,
    };
    Ok(Json(st.engine.check_states(&q).await?))
}

/// Query of `DELETE /api/processes/{id}`.
#[derive(Debug, Deserialize, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteParams {
    /// Delete an unfinished process too: its running steps are stopped and their jobs
    /// removed (default false: 409).
    pub force: Option<bool>,
}

#[utoipa::path(delete, path = "/api/processes/{id}", params(("id" = String, Path), DeleteParams),
    responses((status = 200, body = DeleteReply), (status = 404, body = ErrorBody),
              (status = 409, description = "`invalid_state`: the process is unfinished and `force` is not true", body = ErrorBody)))]
pub(super) async fn delete_process(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    caller: Option<Extension<Caller>>,
    q: Result<Query<DeleteParams>, QueryRejection>,
) -> Result<Json<DeleteReply>, ApiError> {
    let Query(p) = q?;
    let by = caller.map(|Extension(c)| c.name);
    let force = p.force.unwrap_or(false);
    Ok(Json(st.engine.delete(&id, force, by.as_deref()).await?))
}
