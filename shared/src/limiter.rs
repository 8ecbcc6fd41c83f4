//! The fleet-wide LLM limiter: one bucket per `provider/model`, limiting requests and
//! tokens per minute together, shared by every worker through `llm_limit.lua` (GCRA on the
//! server's clock). The worker side (local `governor` stage, bounded wait, fallback when
//! Redis is unreachable) lives in `honua_worker::limit`.
//!
//! Semantics of a [`LimitSpec`]: a bucket holds `max(burst, 1)` units and refills at the
//! per-minute rate, so in any window of `w` seconds at most `burst + rate/60 * w` requests
//! (and tokens) are admitted. A reservation of more tokens than `burst_tokens` can never be
//! admitted ([`Admission::TooLarge`]): size `burst_tokens` for the largest call
//! (prompt + `max_tokens`).

use crate::scripts::Scripts;
use crate::store::{Result, Store, StoreError};
use std::time::Duration;

/// One bucket's limits, e.g. provider "openai" model "gpt-4o".
/// An omitted field is 0 (unlimited, or no extra burst).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct LimitSpec {
    /// 0 = unlimited.
    pub requests_per_minute: u32,
    /// Input + output tokens; 0 = unlimited.
    pub tokens_per_minute: u64,
    /// Extra requests allowed at once above the steady rate.
    pub burst_requests: u32,
    /// Extra tokens allowed at once above the steady rate; also the largest reservation.
    pub burst_tokens: u64,
}

const MINUTE_US: f64 = 60_000_000.0;

impl LimitSpec {
    /// Neither requests nor tokens are limited: no Redis round trip at all.
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute == 0 && self.tokens_per_minute == 0
    }

    /// A clear message naming the bad field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.tokens_per_minute > 0 && self.burst_tokens == 0 {
            return Err(
                "burstTokens must be at least 1 when tokensPerMinute is set: it bounds \
                 the largest single reservation (prompt + max_tokens)"
                    .into(),
            );
        }
        Ok(())
    }

    /// Requests held by a full bucket.
    pub fn request_capacity(&self) -> u32 {
        self.burst_requests.max(1)
    }

    /// Tokens held by a full bucket: the largest reservation that can ever be admitted.
    pub fn token_capacity(&self) -> u64 {
        self.burst_tokens.max(1)
    }

    /// µs between two requests at the steady rate (0 = unlimited).
    pub fn request_interval_us(&self) -> f64 {
        if self.requests_per_minute == 0 {
            0.0
        } else {
            MINUTE_US / f64::from(self.requests_per_minute)
        }
    }

    /// µs per token at the steady rate (0 = unlimited).
    pub fn token_interval_us(&self) -> f64 {
        if self.tokens_per_minute == 0 {
            0.0
        } else {
            MINUTE_US / self.tokens_per_minute as f64
        }
    }

    /// The most requests any window of `window` may see: `burst + rate * window`.
    pub fn max_requests_in(&self, window: Duration) -> f64 {
        f64::from(self.request_capacity())
            + f64::from(self.requests_per_minute) * window.as_secs_f64() / 60.0
    }

    /// The most tokens any window of `window` may see.
    pub fn max_tokens_in(&self, window: Duration) -> f64 {
        self.token_capacity() as f64 + self.tokens_per_minute as f64 * window.as_secs_f64() / 60.0
    }
}

/// The answer of one `acquire` round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Reserved (booked): send after `wait` (zero = now).
    Granted { wait: Duration },
    /// Not within the caller's max wait; the earliest admission is `wait` from now.
    Wait { wait: Duration, paused: bool },
    /// More tokens than the bucket holds: never admissible.
    TooLarge,
    /// The bucket's fleet-wide circuit breaker is open (or half-open with another worker's
    /// probe in flight) for `wait` more.
    BreakerOpen { wait: Duration },
}

/// What a granted `acquire` learned of the bucket's fleet-wide circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerSeen {
    /// Closed, no failures counted: a success need not report.
    Closed,
    /// Closed with failures counted: a success resets them (one round trip).
    Failing,
    /// This call is the fleet's one half-open probe: report how it went.
    Probe,
}

/// How a call ended, for the fleet-wide circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerOutcome {
    Success,
    /// A 5xx or a timeout.
    Failure,
    /// A probe that was never sent, or ended in an error that says nothing of the provider.
    Abandon,
}

/// The fleet-wide circuit breaker's settings (`breaker_failures`, `breaker_open_secs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSpec {
    pub failures: u32,
    pub open: Duration,
    /// How long a half-open probe holds its claim (the call's timeout).
    pub probe_lease: Duration,
}

fn f(x: f64) -> String {
    format!("{x:.6}")
}

fn parse_reply(r: (i64, i64, String)) -> Result<Admission> {
    parse_breaker_reply(r).map(|(a, _)| a)
}

fn parse_breaker_reply(r: (i64, i64, String)) -> Result<(Admission, BreakerSeen)> {
    let (ok, wait_us, reason) = r;
    let wait = Duration::from_micros(wait_us.max(0) as u64);
    let seen = match (ok, reason.as_str()) {
        (1, "failing") => BreakerSeen::Failing,
        (1, "probe") => BreakerSeen::Probe,
        _ => BreakerSeen::Closed,
    };
    let admission = match (ok, reason.as_str()) {
        (1, "ok" | "failing" | "probe") => Ok(Admission::Granted { wait }),
        (0, "breaker_open") => Ok(Admission::BreakerOpen { wait }),
        (0, "rate") => Ok(Admission::Wait {
            wait,
            paused: false,
        }),
        (0, "paused") => Ok(Admission::Wait { wait, paused: true }),
        (0, "too_large") => Ok(Admission::TooLarge),
        _ => Err(StoreError::Reply {
            script: "llm_limit",
            detail: format!("{ok} {wait_us} {reason:?}"),
        }),
    };
    admission.map(|a| (a, seen))
}

impl Store {
    /// One round trip: reserve 1 request + `tokens` on `bucket`, booking the earliest slot
    /// when it lies within `max_wait` (the caller must then sleep the returned wait before
    /// sending), or learn when the earliest slot is.
    pub async fn llm_acquire(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        tokens: u64,
        max_wait: Duration,
    ) -> Result<Admission> {
        self.llm_acquire_gated(bucket, spec, tokens, max_wait, None)
            .await
            .map(|(a, _)| a)
    }

    /// As [`Store::llm_acquire`], in the same round trip also passing the bucket's
    /// fleet-wide circuit breaker when `probe_lease` is given (an open breaker refuses;
    /// a half-open one admits exactly one probe fleet-wide, holding the claim for
    /// `probe_lease`).
    pub async fn llm_acquire_gated(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        tokens: u64,
        max_wait: Duration,
        probe_lease: Option<Duration>,
    ) -> Result<(Admission, BreakerSeen)> {
        let keys = self.keys().llm_limit(bucket);
        let req_t = spec.request_interval_us();
        let tok_t = spec.token_interval_us();
        let mut call = Scripts::get().llm_limit.key(&keys[0]);
        call.key(&keys[1]);
        if probe_lease.is_some() {
            call.key(self.keys().llm_breaker(bucket));
        }
        call.arg("acquire")
            .arg(f(req_t))
            .arg(f(req_t * f64::from(spec.request_capacity())))
            .arg(f(tok_t))
            .arg(f(tok_t * spec.token_capacity() as f64))
            .arg(tokens)
            .arg(max_wait.as_micros() as u64);
        if let Some(lease) = probe_lease {
            call.arg(lease.as_micros() as u64);
        }
        let r: (i64, i64, String) = call.invoke_async(&mut self.conn()).await?;
        parse_breaker_reply(r)
    }

    /// One round trip: reports a call's outcome to the bucket's fleet-wide circuit breaker.
    /// Returns `Some(open for)` when the breaker is (now) open.
    pub async fn llm_breaker(
        &self,
        bucket: &str,
        spec: &BreakerSpec,
        outcome: BreakerOutcome,
        probe: bool,
    ) -> Result<Option<Duration>> {
        let keys = self.keys().llm_limit(bucket);
        let outcome = match outcome {
            BreakerOutcome::Success => "success",
            BreakerOutcome::Failure => "failure",
            BreakerOutcome::Abandon => "abandon",
        };
        let (_, open_us, reason): (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .key(self.keys().llm_breaker(bucket))
            .arg("breaker")
            .arg(outcome)
            .arg(spec.failures.max(1))
            .arg((spec.open.as_millis() as u64).max(1))
            .arg(if probe { "1" } else { "0" })
            .invoke_async(&mut self.conn())
            .await?;
        Ok(matches!(reason.as_str(), "opened" | "open")
            .then(|| Duration::from_micros(open_us.max(0) as u64)))
    }

    /// One round trip: reconcile a reservation of `reserved` tokens with the `actual` usage
    /// (refund or charge the difference), and give the request back when `unused` (a
    /// booked call that was never sent). Skipped (no round trip) when nothing changes;
    /// returns whether a round trip was made.
    pub async fn llm_settle(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        reserved: u64,
        actual: u64,
        unused: bool,
    ) -> Result<bool> {
        let delta = if spec.tokens_per_minute == 0 {
            0
        } else {
            actual as i128 - reserved as i128
        };
        let req_delta = if unused && spec.requests_per_minute > 0 {
            -1
        } else {
            0
        };
        if delta == 0 && req_delta == 0 {
            return Ok(false);
        }
        let keys = self.keys().llm_limit(bucket);
        let r: (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .arg("settle")
            .arg(f(spec.request_interval_us()))
            .arg(req_delta)
            .arg(f(spec.token_interval_us()))
            .arg(delta.to_string())
            .invoke_async(&mut self.conn())
            .await?;
        parse_reply(r)?;
        Ok(true)
    }

    /// One round trip after sleeping until a booked slot: `None` = send; `Some(wait)` = the
    /// bucket was paused meanwhile, the booking was given back and the pause ends in `wait`.
    pub async fn llm_confirm(
        &self,
        bucket: &str,
        spec: &LimitSpec,
        tokens: u64,
    ) -> Result<Option<Duration>> {
        let keys = self.keys().llm_limit(bucket);
        let r: (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .arg("confirm")
            .arg(f(spec.request_interval_us()))
            .arg(f(spec.token_interval_us()))
            .arg(tokens)
            .invoke_async(&mut self.conn())
            .await?;
        match parse_reply(r)? {
            Admission::Granted { .. } => Ok(None),
            Admission::Wait { wait, .. } => Ok(Some(wait)),
            a @ (Admission::TooLarge | Admission::BreakerOpen { .. }) => Err(StoreError::Reply {
                script: "llm_limit",
                detail: format!("{a:?} on confirm"),
            }),
        }
    }

    /// Pauses `bucket` for every worker for `for_` (never shortens a longer pause). Returns
    /// how long the bucket stays paused.
    pub async fn llm_pause(&self, bucket: &str, for_: Duration) -> Result<Duration> {
        let keys = self.keys().llm_limit(bucket);
        let ms = (for_.as_millis() as u64).max(1);
        let (_, remaining_us, _): (i64, i64, String) = Scripts::get()
            .llm_limit
            .key(&keys[0])
            .key(&keys[1])
            .arg("pause")
            .arg(ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(Duration::from_micros(remaining_us.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rpm: u32, tpm: u64, br: u32, bt: u64) -> LimitSpec {
        LimitSpec {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            burst_requests: br,
            burst_tokens: bt,
        }
    }

    #[test]
    fn intervals_and_bounds() {
        let s = spec(600, 60_000, 10, 2_000);
        assert_eq!(s.request_interval_us(), 100_000.0);
        assert_eq!(s.token_interval_us(), 1_000.0);
        assert_eq!(s.max_requests_in(Duration::from_secs(1)), 20.0);
        assert_eq!(s.max_tokens_in(Duration::from_secs(1)), 3_000.0);
        assert!(spec(0, 0, 0, 0).is_unlimited());
        assert_eq!(spec(0, 0, 0, 0).request_interval_us(), 0.0);
    }

    #[test]
    fn validate_names_the_field() {
        assert!(
            spec(600, 60_000, 10, 0)
                .validate()
                .unwrap_err()
                .contains("burstTokens")
        );
        assert!(spec(600, 0, 0, 0).validate().is_ok());
    }

    #[test]
    fn spec_is_camel_case() {
        let v = serde_json::to_value(spec(1, 2, 3, 4)).unwrap();
        assert_eq!(v["requestsPerMinute"], 1);
        assert_eq!(v["burstTokens"], 4);
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse_reply((1, 250, "ok".into())).unwrap(),
            Admission::Granted {
                wait: Duration::from_micros(250)
            }
        );
        assert_eq!(
            parse_reply((0, 1500, "paused".into())).unwrap(),
            Admission::Wait {
                wait: Duration::from_micros(1500),
                paused: true
            }
        );
        assert!(parse_reply((2, 0, "x".into())).is_err());
    }
}
