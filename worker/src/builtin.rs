//! Built-in worker-side step kinds: `noop`, `fail` and `http`.

use crate::handler::{StepContext, StepError, StepHandler, StepOutput};
use async_trait::async_trait;
use honua_shared::allowlist::UrlAllowlist;
use serde_json::{Value, json};
use std::time::Duration;

/// Returns `config.outcome` (default `ok`) with `config.output` as its output.
pub struct Noop;

#[async_trait]
impl StepHandler for Noop {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let outcome = ctx
            .config
            .get("outcome")
            .and_then(Value::as_str)
            .unwrap_or(honua_shared::status::outcome::OK);
        Ok(StepOutput::outcome(
            outcome,
            ctx.config.get("output").cloned(),
        ))
    }
}

/// Fails with `config.message`; permanent when `config.permanent` is true (a test aid).
pub struct Fail;

#[async_trait]
impl StepHandler for Fail {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let message = ctx
            .config
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("step failed (kind fail)")
            .to_string();
        if ctx.config.get("permanent").and_then(Value::as_bool) == Some(true) {
            Err(StepError::Permanent(message))
        } else {
            Err(StepError::Retryable(message))
        }
    }
}

/// Options of the `http` kind from the worker config.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// URL prefixes a step may call; empty means none.
    pub allowlist: Vec<String>,
    pub max_response_kb: usize,
}

/// POSTs `{processId, processType, step, attempt, input, outputs}` as JSON to `config.url`
/// (which must match an allow-listed prefix by scheme, host, port and path segment; see
/// `honua_shared::allowlist`); a 2xx JSON body becomes the output.
/// 429 and 5xx are retryable (Retry-After honoured), other 4xx permanent.
pub struct Http {
    client: reqwest::Client,
    opts: HttpOptions,
    allowlist: UrlAllowlist,
}

impl Http {
    pub fn new(opts: HttpOptions) -> Self {
        honua_runtime::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_default();
        // Config validation parses the same entries, so this fails only for options built
        // by hand: then nothing is allowed.
        let allowlist = UrlAllowlist::parse(&opts.allowlist).unwrap_or_else(|e| {
            tracing::error!(error = %e, "invalid http allowlist; the http step may call nothing");
            UrlAllowlist::default()
        });
        Self {
            client,
            opts,
            allowlist,
        }
    }
}

/// Parses `Retry-After` (delta-seconds form), clamped to an hour.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = v.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}

#[async_trait]
impl StepHandler for Http {
    async fn run(&self, ctx: StepContext) -> Result<StepOutput, StepError> {
        let url = ctx
            .config
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| StepError::Permanent("http step has no url".into()))?;
        // The parsed URL is what is called, so what was checked is what is sent.
        let url = self
            .allowlist
            .check(url)
            .map_err(|e| StepError::Permanent(e.to_string()))?;
        let timeout = ctx
            .config
            .get("timeout")
            .and_then(Value::as_str)
            .and_then(|s| humantime::parse_duration(s).ok())
            .unwrap_or(ctx.timeout);
        let cap = ctx
            .config
            .get("max_response_kb")
            .and_then(Value::as_u64)
            .map(|k| k as usize)
            .unwrap_or(self.opts.max_response_kb)
            * 1024;
        let body = json!({
            "processId": ctx.process_id,
            "processType": ctx.process_type,
            "step": ctx.step,
            "attempt": ctx.attempt,
            "input": ctx.input,
            "outputs": ctx.outputs,
        });
        let send = self.client.post(url).timeout(timeout).json(&body).send();
        let mut resp = tokio::select! {
            r = send => r.map_err(|e| {
                if e.is_timeout() {
                    StepError::Retryable(format!("http call timed out after {timeout:?}"))
                } else {
                    StepError::Retryable(format!("http call failed: {}", e.without_url()))
                }
            })?,
            _ = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
        };
        let status = resp.status();
        if status.as_u16() == 429 {
            let after = retry_after(resp.headers()).unwrap_or(Duration::from_secs(1));
            return Err(StepError::RetryAfter {
                after,
                message: "http endpoint answered 429".into(),
            });
        }
        if status.is_server_error() {
            return match retry_after(resp.headers()) {
                Some(after) => Err(StepError::RetryAfter {
                    after,
                    message: format!("http endpoint answered {status}"),
                }),
                None => Err(StepError::Retryable(format!(
                    "http endpoint answered {status}"
                ))),
            };
        }
        if !status.is_success() {
            return Err(StepError::Permanent(format!(
                "http endpoint answered {status}"
            )));
        }
        let mut buf = Vec::new();
        loop {
            let chunk = tokio::select! {
                c = resp.chunk() => c.map_err(|e| StepError::Retryable(format!("http body: {}", e.without_url())))?,
                _ = ctx.cancel.cancelled() => return Err(StepError::Cancelled),
            };
            let Some(chunk) = chunk else { break };
            if buf.len() + chunk.len() > cap {
                return Err(StepError::Permanent(format!(
                    "http response exceeds {} KiB",
                    cap / 1024
                )));
            }
            buf.extend_from_slice(&chunk);
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            return Ok(StepOutput::ok());
        }
        let v: Value = serde_json::from_slice(&buf)
            .map_err(|e| StepError::Permanent(format!("http response is not JSON: {e}")))?;
        Ok(StepOutput::ok_with(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn noop_returns_configured_outcome() {
        let ctx = StepContext::for_test(
            "noop",
            json!({"outcome": "skip", "output": {"a": 1}}),
            json!({}),
        );
        let out = Noop.run(ctx).await.unwrap();
        assert_eq!(out.outcome, "skip");
        assert_eq!(out.output, Some(json!({"a": 1})));
        let out = Noop
            .run(StepContext::for_test("noop", json!({}), json!({})))
            .await
            .unwrap();
        assert_eq!(out, StepOutput::ok());
    }

    #[tokio::test]
    async fn fail_is_permanent_only_when_asked() {
        let e = Fail
            .run(StepContext::for_test(
                "fail",
                json!({"permanent": true, "message": "m"}),
                json!({}),
            ))
            .await
            .unwrap_err();
        assert_eq!(e, StepError::Permanent("m".into()));
        let e = Fail
            .run(StepContext::for_test("fail", json!({}), json!({})))
            .await
            .unwrap_err();
        assert!(matches!(e, StepError::Retryable(_)));
    }

    #[tokio::test]
    async fn http_refuses_urls_outside_the_allowlist() {
        let h = Http::new(HttpOptions {
            allowlist: vec!["http://127.0.0.1:1/ok/".into()],
            max_response_kb: 1,
        });
        let ctx = StepContext::for_test(
            "http",
            json!({"url": "http://127.0.0.1:1/other"}),
            json!({}),
        );
        assert!(matches!(h.run(ctx).await, Err(StepError::Permanent(_))));
    }

    #[test]
    fn retry_after_is_parsed_and_clamped() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(reqwest::header::RETRY_AFTER, "999999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3600)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
