//! The HTTP client of the operator commands: one request to the gateway ([`Api`]), its
//! reply ([`Reply`], decoded into the gateway's own response types), errors from status
//! codes and transport failures, and the reply types the gateway builds in `gateway.rs`,
//! mirrored here for decoding.
//!
//! Processes decode into [`honua_scheduler::view`]'s types, the state tools' replies into
//! [`honua_scheduler::state`]'s. The other replies
//! ([`SubmitReply`], [`ActionReply`], ...) are built in the gateway module, so they are
//! mirrored here: the fields the commands read, under the gateway's names; their tests
//! decode what the gateway's own types serialise to.

use super::args::{GlobalOpts, parse_url};
use super::error::{CliError, root_cause};
use super::render::{clean, truncate};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// The error of a non-2xx reply: the gateway's `{"error", "detail"}` when it is that,
/// else the status line and the start of the body (a proxy's page, say).
pub(super) fn api_error(r: &Reply) -> CliError {
    let parsed: Option<(String, String)> = r.decode::<ErrorBody>().ok().map(|b| {
        let detail = b.detail.unwrap_or_else(|| b.error.clone());
        (b.error, detail)
    });
    let (code, detail) = parsed.unwrap_or_else(|| {
        let reason = reqwest::StatusCode::from_u16(r.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error");
        let text = String::from_utf8_lossy(&r.body);
        let text = text.trim();
        let detail = if text.is_empty() {
            format!("HTTP {} {reason}", r.status)
        } else {
            format!("HTTP {} {reason}: {}", r.status, truncate(text, 200))
        };
        (format!("http_{}", r.status), detail)
    });
    CliError::Api {
        status: r.status,
        code: clean(&code),
        detail: clean(&detail),
    }
}

/// One response, whatever its status.
pub(super) struct Reply {
    pub(super) url: String,
    pub(super) status: u16,
    pub(super) next_cursor: Option<String>,
    pub(super) body: Vec<u8>,
}

impl Reply {
    pub(super) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as a `T`: a body that is not JSON, or JSON of another shape, is a
    /// [`CliError::BadResponse`].
    pub(super) fn decode<T: DeserializeOwned>(&self) -> Result<T, CliError> {
        serde_json::from_slice(&self.body).map_err(|e| CliError::BadResponse {
            url: self.url.clone(),
            detail: if e.is_data() {
                format!("not the expected JSON: {e}")
            } else {
                format!("not JSON: {e}")
            },
        })
    }
}

pub(super) struct Api {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
    timeout: Duration,
}

impl Api {
    pub(super) fn new(g: &GlobalOpts) -> Result<Self, CliError> {
        if let Some(t) = &g.token
            && !t.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(CliError::Usage(
                "HONUA_TOKEN must be printable ASCII without spaces".into(),
            ));
        }
        let base = parse_url(&g.url).map_err(|e| CliError::Usage(format!("--url: {e}")))?;
        honua_runtime::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(g.request_timeout)
            .connect_timeout(g.request_timeout)
            .user_agent(concat!("honua-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CliError::Failed(format!("cannot set up the HTTP client: {e}")))?;
        Ok(Api {
            http,
            base,
            token: g.token.clone(),
            timeout: g.request_timeout,
        })
    }

    /// The base URL plus `segments`, each percent-encoded as one path segment.
    pub(super) fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Url {
        endpoint(&self.base, segments, query)
    }

    /// Sends the request and reads the whole reply, whatever its status.
    pub(super) async fn call(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, CliError> {
        let shown = url.to_string();
        let mut rb = self.http.request(method, url);
        if let Some(t) = &self.token {
            rb = rb.bearer_auth(t);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let transport = |e: reqwest::Error| self.transport_error(&shown, e);
        let resp = rb.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let next_cursor = resp
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp.bytes().await.map_err(transport)?.to_vec();
        Ok(Reply {
            url: shown.clone(),
            status,
            next_cursor,
            body,
        })
    }

    /// As [`Api::call`], with a non-2xx reply turned into an error.
    pub(super) async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Reply, CliError> {
        let r = self.call(method, url, body, headers).await?;
        if r.is_success() {
            Ok(r)
        } else {
            Err(api_error(&r))
        }
    }

    pub(super) async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<Reply, CliError> {
        self.send(Method::GET, self.url(segments, query), None, &[])
            .await
    }

    pub(super) async fn post(
        &self,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Reply, CliError> {
        self.send(Method::POST, self.url(segments, &[]), body, &[])
            .await
    }

    fn transport_error(&self, url: &str, e: reqwest::Error) -> CliError {
        if e.is_timeout() {
            CliError::Timeout {
                url: url.to_string(),
                after: self.timeout,
            }
        } else if e.is_builder() {
            CliError::Usage(format!("cannot build the request to {url}: {e}"))
        } else if e.is_redirect() {
            CliError::Failed(format!("{url}: {}", root_cause(&e)))
        } else {
            CliError::Unreachable {
                url: url.to_string(),
                source: e,
            }
        }
    }
}

/// `base` plus `segments` (each percent-encoded as one segment) and `query`.
pub fn endpoint(base: &Url, segments: &[&str], query: &[(&str, String)]) -> Url {
    let mut u = base.clone();
    if let Ok(mut path) = u.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    if !query.is_empty() {
        u.query_pairs_mut()
            .extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
    }
    u
}

// ---------------------------------------------------------------------------------------
// Replies built in the gateway module, mirrored: the fields the commands read.

/// The body of every gateway error (`gateway::ErrorBody`). Another server's JSON error
/// may lack `detail`; the code stands in for it then.
#[derive(Debug, Deserialize)]
pub(super) struct ErrorBody {
    pub(super) error: String,
    pub(super) detail: Option<String>,
}

/// `POST /api/processes` (`gateway::SubmitReply`).
#[derive(Debug, Deserialize)]
pub(super) struct SubmitReply {
    pub(super) id: String,
    pub(super) duplicate: bool,
    /// Intake is drained: the process waits Pending.
    #[serde(default)]
    pub(super) pending: bool,
}

/// Cancel, retry, retry-current-step and dead-letter replay (`gateway::ActionReply`).
#[derive(Debug, Deserialize)]
pub(super) struct ActionReply {
    pub(super) id: String,
    pub(super) status: String,
    /// The re-enqueued steps (retry-current-step); the gateway leaves an empty list out.
    #[serde(default)]
    pub(super) steps: Vec<String>,
}

/// `POST /api/processes/{id}/signal/{name}` (`{"id", "signal", "value"}`, built with
/// `json!` in the gateway).
#[derive(Debug, Deserialize)]
pub(super) struct SignalReply {
    pub(super) value: String,
}

/// `DELETE /api/processes` (`gateway::PurgeReply`).
#[derive(Debug, Deserialize)]
pub(super) struct PurgeReply {
    pub(super) deleted: u64,
}

/// One stream of `GET /api/queues` (`gateway::QueueView`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct QueueView {
    pub(super) stream: String,
    pub(super) group: String,
    pub(super) missing: bool,
    pub(super) length: u64,
    pub(super) lag: Option<u64>,
    pub(super) pending: u64,
    pub(super) oldest_pending_age_ms: Option<u64>,
    pub(super) consumers: u64,
}

/// One worker of `GET /api/workers` (`gateway::WorkerView`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkerView {
    pub(super) id: String,
    pub(super) last_seen_age_ms: u64,
    pub(super) jobs: Vec<WorkerJobView>,
}

/// A job a worker holds (`gateway::WorkerJobView`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WorkerJobView {
    pub(super) entry_id: String,
    pub(super) process_id: String,
    pub(super) step: String,
    pub(super) idle_ms: u64,
    pub(super) deliveries: u64,
}

/// One dead letter of `GET /api/deadletters` (`gateway::DeadLetterView`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeadLetterView {
    pub(super) id: String,
    pub(super) process_id: String,
    pub(super) step: String,
    pub(super) deliveries: u64,
    pub(super) reason: String,
    pub(super) dead_ms: Option<u64>,
}

/// `GET /health` (`gateway::HealthReply`). A bare `{"status"}` (no checks) is accepted.
#[derive(Debug, Deserialize)]
pub(super) struct HealthReply {
    pub(super) status: String,
    #[serde(default)]
    pub(super) checks: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Exit;
    use honua_scheduler::gateway;
    use honua_scheduler::view::{
        AttemptView, AuditView, LlmUsageView, ProcessSummary, ProcessView, StepView,
    };
    use serde::Serialize;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            url: "http://x/".into(),
            status,
            next_cursor: None,
            body: body.as_bytes().to_vec(),
        }
    }

    /// What the gateway sends for `value`, decoded as the CLI decodes it.
    fn sent<T: DeserializeOwned>(value: &impl Serialize) -> T {
        let body = serde_json::to_string(value).unwrap();
        reply(200, &body)
            .decode()
            .unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    #[test]
    fn api_errors_print_detail_and_code() {
        let e = api_error(&reply(
            404,
            r#"{"error":"not_found","detail":"no process p1"}"#,
        ));
        assert_eq!(e.to_string(), "no process p1 (not_found)");
        assert_eq!(e.exit(), Exit::NotFound);
        let e = api_error(&reply(409, r#"{"error":"invalid_state","detail":"a\nb"}"#));
        assert_eq!(e.to_string(), "a b (invalid_state)");
        assert_eq!(e.exit(), Exit::Conflict);
        let e = api_error(&reply(400, r#"{"error":"bad_thing"}"#));
        assert_eq!(e.to_string(), "bad_thing (bad_thing)");
        let e = api_error(&reply(502, "<html>bad gateway</html>"));
        assert_eq!(
            e.to_string(),
            "HTTP 502 Bad Gateway: <html>bad gateway</html> (http_502)"
        );
        assert_eq!(e.exit(), Exit::Unavailable);
        let e = api_error(&reply(500, ""));
        assert_eq!(e.to_string(), "HTTP 500 Internal Server Error (http_500)");
        assert_eq!(e.exit(), Exit::Failed);
        // A 2xx that is nonetheless treated as an error never exits 0.
        assert_eq!(api_error(&reply(200, "{}")).exit(), Exit::Failed);
    }

    #[test]
    fn bodies_that_are_not_the_expected_json_are_bad_responses() {
        let e = reply(200, "<html>").decode::<PurgeReply>().unwrap_err();
        assert!(e.to_string().contains(": not JSON: "), "{e}");
        let e = reply(200, r#"{"gone":1}"#)
            .decode::<PurgeReply>()
            .unwrap_err();
        assert!(e.to_string().contains(": not the expected JSON: "), "{e}");
        assert_eq!(e.exit(), Exit::Failed);
    }

    #[test]
    fn the_mirrored_replies_decode_what_the_gateway_sends() {
        let e: ErrorBody = sent(&gateway::ErrorBody {
            error: "not_found".into(),
            detail: "no process p1".into(),
        });
        assert_eq!(
            (e.error.as_str(), e.detail.as_deref()),
            ("not_found", Some("no process p1"))
        );
        let s: SubmitReply = sent(&gateway::SubmitReply {
            id: "p1".into(),
            process_type: "T".into(),
            duplicate: true,
            pending: false,
        });
        assert_eq!((s.id.as_str(), s.duplicate), ("p1", true));
        for steps in [vec![], vec!["A".to_string(), "B".to_string()]] {
            let a: ActionReply = sent(&gateway::ActionReply {
                id: "p1".into(),
                status: "Running".into(),
                steps: steps.clone(),
            });
            assert_eq!((a.id.as_str(), a.status.as_str()), ("p1", "Running"));
            assert_eq!(a.steps, steps);
        }
        let v: SignalReply =
            sent(&serde_json::json!({"id": "p1", "signal": "s", "value": "reject"}));
        assert_eq!(v.value, "reject");
        let p: PurgeReply = sent(&gateway::PurgeReply { deleted: 3 });
        assert_eq!(p.deleted, 3);
        let q: QueueView = sent(&gateway::QueueView {
            stream: "s".into(),
            group: "g".into(),
            missing: true,
            length: 1,
            lag: Some(2),
            pending: 3,
            oldest_pending_ms: Some(4),
            oldest_pending_age_ms: Some(5),
            consumers: 6,
        });
        assert_eq!(
            (
                q.stream.as_str(),
                q.group.as_str(),
                q.missing,
                q.length,
                q.lag,
                q.pending
            ),
            ("s", "g", true, 1, Some(2), 3)
        );
        assert_eq!((q.oldest_pending_age_ms, q.consumers), (Some(5), 6));
        let w: WorkerView = sent(&gateway::WorkerView {
            id: "w1".into(),
            last_seen_ms: 10,
            last_seen_age_ms: 7,
            jobs: vec![gateway::WorkerJobView {
                entry_id: "1-0".into(),
                process_id: "p1".into(),
                step: "A".into(),
                idle_ms: 8,
                deliveries: 9,
            }],
            version: Some("0.1.0".into()),
            host: Some("pod-1".into()),
            concurrency: Some(16),
            started_ms: Some(5),
        });
        assert_eq!((w.id.as_str(), w.last_seen_age_ms), ("w1", 7));
        let j = &w.jobs[0];
        assert_eq!(
            (
                j.entry_id.as_str(),
                j.process_id.as_str(),
                j.step.as_str(),
                j.idle_ms,
                j.deliveries
            ),
            ("1-0", "p1", "A", 8, 9)
        );
        let d: DeadLetterView = sent(&gateway::DeadLetterView {
            id: "1-0".into(),
            process_id: "p1".into(),
            step: "A".into(),
            deliveries: 4,
            reason: "poison".into(),
            dead_ms: Some(11),
        });
        assert_eq!(
            (
                d.id.as_str(),
                d.process_id.as_str(),
                d.step.as_str(),
                d.deliveries,
                d.reason.as_str(),
                d.dead_ms
            ),
            ("1-0", "p1", "A", 4, "poison", Some(11))
        );
        let checks: BTreeMap<String, String> =
            [("redis".to_string(), "Healthy".to_string())].into();
        let h: HealthReply = sent(&gateway::HealthReply {
            status: "Degraded".into(),
            checks: checks.clone(),
        });
        assert_eq!((h.status.as_str(), h.checks), ("Degraded", checks));
    }

    /// Decoding a view and serialising it again gives back what the gateway sent.
    #[test]
    fn process_views_decode_what_they_serialise() {
        let attempt = |error: Option<&str>| AttemptView {
            attempt: 1,
            visit: 1,
            outcome: "failed".into(),
            error: error.map(str::to_string),
            error_code: error.map(|_| "boom".to_string()),
            worker: error.map(|_| "w1".to_string()),
            deliveries: error.map(|_| 2),
            started_at: Some("2025-01-02T03:04:05.678Z".into()),
            ended_at: None,
            duration_ms: None,
        };
        let step = || StepView {
            name: "A".into(),
            kind: "noop".into(),
            status: "Completed".into(),
            attempt: 2,
            yields: 1,
            visits: 1,
            deliveries: Some(1),
            worker: Some("w1".into()),
            queued_at: None,
            started_at: Some("2025-01-02T03:04:05.678Z".into()),
            ended_at: Some("2025-01-02T03:04:06.000Z".into()),
            duration_ms: Some(322),
            outcome: Some("next".into()),
            error: None,
            error_code: None,
            attempts: vec![attempt(Some("bad")), attempt(None)],
        };
        for llm_usage in [None, Some(LlmUsageView::new(12, 3_400))] {
            let view = ProcessView {
                id: "p1".into(),
                process_type: "T".into(),
                version: 3,
                status: "Failed".into(),
                current_steps: vec!["B".into()],
                steps: vec![step()],
                error_message: Some("bad".into()),
                error_code: Some("boom".into()),
                created_at: Some("2025-01-02T03:04:05.000Z".into()),
                started_at: None,
                ended_at: None,
                updated_at: None,
                deadline_at: None,
                duration: Some(1.5),
                idempotency_key: Some("k".into()),
                tenant: Some("acme".into()),
                audit: vec![AuditView {
                    at: Some("2025-01-02T03:04:07.000Z".into()),
                    action: "retry".into(),
                    detail: None,
                    by: Some("oncall".into()),
                }],
                llm_usage,
            };
            let sent = serde_json::to_value(&view).unwrap();
            let decoded: ProcessView = serde_json::from_value(sent.clone()).unwrap();
            assert_eq!(serde_json::to_value(&decoded).unwrap(), sent);
        }
        let summary = ProcessSummary {
            id: "p1".into(),
            process_type: "T".into(),
            version: 1,
            status: "Running".into(),
            current_steps: vec!["A".into()],
            error_message: None,
            error_code: None,
            created_at: Some("2025-01-02T03:04:05.000Z".into()),
            started_at: None,
            ended_at: None,
            duration: None,
            tenant: Some("acme".into()),
        };
        let sent = serde_json::to_value(&summary).unwrap();
        let decoded: ProcessSummary = serde_json::from_value(sent.clone()).unwrap();
        assert_eq!(serde_json::to_value(&decoded).unwrap(), sent);
    }

    #[test]
    fn endpoints_encode_each_segment() {
        let base = parse_url("http://127.0.0.1:9090").unwrap();
        let u = endpoint(&base, &["api", "processes", "p-1", "signal", "a/b?c"], &[]);
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:9090/api/processes/p-1/signal/a%2Fb%3Fc"
        );
        let prefixed = parse_url("https://gw.example/honua/").unwrap();
        let u = endpoint(
            &prefixed,
            &["api", "processes"],
            &[("status", "Completed".into()), ("olderThan", "30d".into())],
        );
        assert_eq!(
            u.as_str(),
            "https://gw.example/honua/api/processes?status=Completed&olderThan=30d"
        );
    }
}
