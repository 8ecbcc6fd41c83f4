//! API keys and roles: which role each route needs ([`super::ROUTES`]) and the middleware
//! that checks a request's bearer token against the configured key hashes.

use super::{ApiError, ApiState, ROUTES};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use honua_shared::config::Role;
use sha2::{Digest, Sha256};

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

/// The API key a request was authorized with (a request extension; absent when the API is
/// open): who did it, for the log lines of admin actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key's configured name.
    pub name: String,
    pub role: Role,
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) async fn authorize(
    State(st): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
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
    let mut caller = None;
    for k in &api.keys {
        if constant_time_eq(hash.as_bytes(), k.sha256.as_bytes()) {
            caller = Some(Caller {
                name: k.name.clone(),
                role: k.role,
            });
        }
    }
    let Some(caller) = caller else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token")
            .into_response();
    };
    if needed.is_some_and(|n| caller.role < n) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token's role may not do that",
        )
        .into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
