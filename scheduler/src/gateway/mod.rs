//! The HTTP gateway (default :9090): the operator API of the operations guide.
//! [`router`] builds the whole app without a socket, so it is testable in-process.
//! Every route is listed once in [`ROUTES`] with the role it needs; the same table drives
//! authorization, and a test checks it against the router and the OpenAPI document.
//!
//! The routes and state live here; API keys and roles in [`auth`], the error type in
//! [`error`], the process endpoints in [`processes`], the state tools' (state, check,
//! delete) in [`state`], the fleet's (queues, workers, dead letters, configuration, health,
//! metrics) in [`fleet`].

mod auth;
mod error;
mod fleet;
mod processes;
mod state;
mod ui;

pub use auth::{Caller, required_role, token_hash};
pub use error::{ApiError, ErrorBody};
pub use fleet::{DeadLetterView, DlqParams, HealthReply, QueueView, WorkerJobView, WorkerView};
pub use processes::{
    ActionReply, CancelBody, ListParams, PauseBody, PurgeParams, PurgeReply, RetryBody, SignalBody,
    SubmitBody, SubmitReply,
};
pub use state::{CheckParams, DeleteParams};

// The handlers are named unqualified: in the OpenAPI document a qualified path would
// become the operation's tag.
use auth::authorize;
use fleet::*;
use processes::*;
use state::*;

use crate::intake::DrainReply;
use crate::processes::Processes;
use crate::state::{CheckReport, DeleteReply, RemovedView, StateProblem, StateView};
use crate::view::{LlmUsageView, ProcessSummary, ProcessView};
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use honua_shared::config::Role;
use std::sync::Arc;
use utoipa::OpenApi;

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
    ("DELETE", "/api/processes/{id}", Some(Role::Admin)),
    ("GET", "/api/processes/{id}/state", Some(Role::Read)),
    ("POST", "/api/processes/{id}/cancel", Some(Role::Operate)),
    ("POST", "/api/processes/{id}/retry", Some(Role::Operate)),
    ("POST", "/api/processes/{id}/pause", Some(Role::Operate)),
    ("POST", "/api/processes/{id}/resume", Some(Role::Operate)),
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
    ("GET", "/api/state/check", Some(Role::Read)),
    ("GET", "/api/config", Some(Role::Read)),
    ("GET", "/api/queues", Some(Role::Read)),
    ("GET", "/api/workers", Some(Role::Read)),
    ("GET", "/api/deadletters", Some(Role::Read)),
    ("POST", "/api/deadletters/{id}/replay", Some(Role::Admin)),
    ("POST", "/api/admin/drain", Some(Role::Admin)),
    ("GET", "/api/admin/drain", Some(Role::Read)),
    ("POST", "/api/admin/resume-intake", Some(Role::Admin)),
];

/// What the gateway serves from: [`Processes`] and, when it runs beside one, the scheduler's
/// liveness counters.
#[derive(Clone)]
pub struct ApiState {
    pub engine: Processes,
    pub scheduler: Option<Arc<crate::scheduler::SchedulerStats>>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Honua Process Framework API", description = "The operator API of the operations guide."),
    paths(health, live, ready, prometheus_metrics, openapi_json, submit, list, purge, active, get_process, delete_process,
          process_state, cancel, retry, pause, resume, retry_current_step, signal, state_check, config, queues, workers, deadletters, replay,
          drain, drain_status, resume_intake),
    components(schemas(ErrorBody, SubmitBody, SubmitReply, ProcessSummary, ProcessView, LlmUsageView, PurgeReply, CancelBody,
                       RetryBody, PauseBody, SignalBody, ActionReply, QueueView, WorkerView, WorkerJobView, DeadLetterView, HealthReply,
                       StateView, StateProblem, CheckReport, DeleteReply, RemovedView, DrainReply)),
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
        .route(
            "/api/processes/{id}",
            get(get_process).delete(delete_process),
        )
        .route("/api/processes/{id}/state", get(process_state))
        .route("/api/processes/{id}/cancel", post(cancel))
        .route("/api/processes/{id}/retry", post(retry))
        .route("/api/processes/{id}/pause", post(pause))
        .route("/api/processes/{id}/resume", post(resume))
        .route(
            "/api/processes/{id}/retry-current-step",
            post(retry_current_step),
        )
        .route("/api/processes/{id}/signal/{name}", post(signal))
        .route("/api/state/check", get(state_check))
        .route("/api/config", get(config))
        .route("/api/queues", get(queues))
        .route("/api/workers", get(workers))
        .route("/api/deadletters", get(deadletters))
        .route("/api/deadletters/{id}/replay", post(replay))
        .route("/api/admin/drain", post(drain).get(drain_status))
        .route("/api/admin/resume-intake", post(resume_intake))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn(content_type))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize))
        // The console has its own sessions (cookie, CSRF) instead of bearer tokens.
        .merge(ui::router(state.clone()))
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
    fn query_parameters_are_documented_in_the_query() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let params = |method: &str, path: &str| -> Vec<(String, String)> {
            doc["paths"][path][method]["parameters"]
                .as_array()
                .unwrap_or_else(|| panic!("{method} {path} has no parameters"))
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap().to_string(),
                        p["in"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        let q = |n: &str| (n.to_string(), "query".to_string());
        let path = |n: &str| (n.to_string(), "path".to_string());
        assert!(params("get", "/api/processes").contains(&q("processType")));
        assert!(params("get", "/api/processes").contains(&q("cursor")));
        assert!(params("delete", "/api/processes").contains(&q("olderThan")));
        assert_eq!(params("get", "/api/deadletters"), [q("limit")]);
        assert_eq!(
            params("get", "/api/state/check"),
            [q("type"), q("limit"), q("cursor")]
        );
        assert_eq!(
            params("delete", "/api/processes/{id}"),
            [path("id"), q("force")]
        );
        // Only route templates name path parameters.
        for (p, item) in doc["paths"].as_object().unwrap() {
            for op in item.as_object().unwrap().values() {
                for param in op["parameters"].as_array().into_iter().flatten() {
                    if param["in"] == "path" {
                        let name = param["name"].as_str().unwrap();
                        assert!(
                            p.contains(&format!("{{{name}}}")),
                            "{p}: path parameter {name}"
                        );
                    }
                }
            }
        }
    }
}
