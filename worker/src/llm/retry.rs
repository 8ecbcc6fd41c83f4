//! Pure decisions of the provider-call loop: the next move after a failed pass
//! ([`next_move`]: retry, fall back, or stop with a typed step error), the retry delay
//! (exponential with full jitter, `Retry-After` honoured but clamped) and a circuit breaker
//! per provider/model.

use super::provider::CallError;
use crate::handler::StepError;
use crate::limit::LimitError;
use std::time::{Duration, Instant};

/// What one pass of the provider-call loop ended with, when it did not complete.
#[derive(Debug)]
pub enum Seen {
    /// This worker's breaker for the bucket is open (Redis did not gate the call) for
    /// about `wait` more.
    BreakerOpen { wait: Duration },
    /// The rate limiter could not admit the call within the wait bound.
    NotAdmitted,
    /// The rate limiter refused (fleet-wide breaker open, reservation too large) or failed.
    Limiter(LimitError),
    /// The provider call failed; `opened` tells whether this failure opened the breaker.
    CallFailed { error: CallError, opened: bool },
}

/// Where the loop stands when it decides.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// The bucket (`provider/model`) of the target just tried.
    pub bucket: &'a str,
    /// Provider calls made so far, this one included.
    pub calls: u32,
    /// The target just tried is the fallback.
    pub on_fallback: bool,
    /// A fallback provider/model is configured and usable.
    pub has_fallback: bool,
}

impl Progress<'_> {
    fn may_fall_back(&self) -> bool {
        !self.on_fallback && self.has_fallback
    }
}

/// The limits of the loop, from the provider config.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Provider calls allowed after the first.
    pub max_retries: u32,
    /// The longest `Retry-After` waited out inside the step; a longer one yields.
    pub retry_after_max: Duration,
    /// The longest the limiter may make a call wait for admission.
    pub max_wait: Duration,
}

/// What the loop does next.
#[derive(Debug)]
pub enum Move {
    /// Call the same target again after this delay (zero: at once).
    Retry(Duration),
    /// Call the fallback provider/model now.
    Fallback,
    /// End the step with this error: a yield, a permanent failure, the retries spent, or a
    /// cancellation.
    Stop(StepError),
}

/// The next move after `seen`. A retry's delay comes from `backoff`, so each retry's
/// delay is drawn once, when it is decided.
pub fn next_move(
    seen: &Seen,
    at: Progress<'_>,
    policy: &Policy,
    backoff: &mut Backoff,
    rng: &mut impl rand::Rng,
) -> Move {
    let bucket = at.bucket;
    let (error, opened) = match seen {
        Seen::BreakerOpen { wait } | Seen::Limiter(LimitError::BreakerOpen { wait, .. }) => {
            return if at.may_fall_back() {
                Move::Fallback
            } else {
                Move::Stop(StepError::Yield {
                    after: (*wait).max(Duration::from_millis(100)),
                    message: format!("circuit breaker for {bucket} is open"),
                })
            };
        }
        Seen::NotAdmitted => {
            return if at.may_fall_back() {
                Move::Fallback
            } else {
                Move::Stop(StepError::Yield {
                    after: policy.max_wait,
                    message: format!(
                        "waiting for llm rate-limit budget on {bucket}: not admitted within {}",
                        humantime::format_duration(policy.max_wait)
                    ),
                })
            };
        }
        Seen::Limiter(LimitError::Cancelled) => return Move::Stop(StepError::Cancelled),
        Seen::Limiter(e @ LimitError::TooLarge { .. }) => {
            return Move::Stop(StepError::Permanent(e.to_string()));
        }
        Seen::Limiter(e @ LimitError::Store(_)) => {
            return Move::Stop(StepError::Retryable(e.to_string()));
        }
        Seen::CallFailed { error, opened } => (error, *opened),
    };
    let max = policy.retry_after_max;
    // `None`: fall back.
    let delay = match error {
        CallError::Permanent { message, .. } => {
            return Move::Stop(StepError::Permanent(format!(
                "llm call to {bucket} failed: {message}"
            )));
        }
        CallError::RateLimited { retry_after, .. } => {
            if at.may_fall_back() {
                None
            } else if let Some(ra) = retry_after.filter(|ra| *ra > max) {
                return Move::Stop(StepError::Yield {
                    after: ra,
                    message: format!("llm provider {bucket} answered 429"),
                });
            } else {
                Some(backoff.next(*retry_after, max, rng))
            }
        }
        CallError::Server { retry_after, .. } => {
            if opened && at.may_fall_back() {
                None
            } else {
                Some(backoff.next(*retry_after, max, rng))
            }
        }
        CallError::Timeout(_) | CallError::Connection(_) => {
            if opened && at.may_fall_back() {
                None
            } else {
                Some(backoff.next(None, max, rng))
            }
        }
    };
    if at.calls > policy.max_retries {
        let message = format!("llm call failed after {} attempts: {error}", at.calls);
        return Move::Stop(match error {
            CallError::RateLimited { retry_after, .. } => StepError::RetryAfter {
                after: retry_after.unwrap_or(Duration::from_secs(1)).min(max),
                message,
            },
            _ => StepError::Retryable(message),
        });
    }
    match delay {
        Some(d) => Move::Retry(d),
        None => Move::Fallback,
    }
}

/// Exponential delays (backon's builder: `initial * 2^n` capped at `max`) with full
/// jitter: each delay is uniform in `[0, base]`.
pub struct Backoff {
    inner: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        use backon::BackoffBuilder;
        let inner = backon::ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times()
            .build();
        Self { inner }
    }

    /// The next delay: full jitter of the exponential step, or the provider's
    /// `Retry-After` (clamped to `retry_after_max`) plus up to 10 % jitter so the fleet
    /// does not return at one instant.
    pub fn next(
        &mut self,
        retry_after: Option<Duration>,
        retry_after_max: Duration,
        rng: &mut impl rand::Rng,
    ) -> Duration {
        let base = self.inner.next().unwrap_or(Duration::from_secs(1));
        match retry_after {
            Some(ra) => {
                let ra = ra.min(retry_after_max);
                ra + ra.mul_f64(rng.random_range(0.0..=0.1))
            }
            None => base.mul_f64(rng.random_range(0.0..=1.0)),
        }
    }
}

/// A circuit breaker's answer for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Closed: call.
    Closed,
    /// Open long enough: this call is the one half-open probe.
    Probe,
    /// Open: do not call (use the fallback).
    Open,
}

/// Circuit breaker of one provider/model: `threshold` consecutive 5xx/timeouts open it for
/// `open_for`; then one probe is let through; its success closes it, its failure reopens it.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            open_for,
            failures: 0,
            open_until: None,
            probing: false,
        }
    }

    pub fn gate(&mut self, now: Instant) -> Gate {
        match self.open_until {
            None => Gate::Closed,
            Some(until) if now < until || self.probing => Gate::Open,
            Some(_) => {
                self.probing = true;
                Gate::Probe
            }
        }
    }

    pub fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|u| now < u || self.probing)
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// A 5xx or timeout; returns true when this opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures += 1;
        if self.probing || (self.open_until.is_none() && self.failures >= self.threshold) {
            self.probing = false;
            self.open_until = Some(now + self.open_for);
            return true;
        }
        false
    }

    /// A probe that ended without a verdict (e.g. cancelled): let another one through.
    pub fn probe_abandoned(&mut self) {
        self.probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn full_jitter_stays_within_the_exponential_bound_and_varies() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let caps = [100u64, 200, 400, 800, 1000, 1000];
        let delays: Vec<Duration> = caps
            .iter()
            .map(|_| b.next(None, Duration::from_secs(60), &mut rng))
            .collect();
        for (d, cap) in delays.iter().zip(caps) {
            assert!(*d <= Duration::from_millis(cap), "{d:?} > {cap}");
        }
        let mut sorted = delays.clone();
        sorted.dedup();
        assert!(sorted.len() > 1, "jitter must vary: {delays:?}");
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d = b.next(
            Some(Duration::from_secs(3)),
            Duration::from_secs(60),
            &mut rng,
        );
        assert!(d >= Duration::from_secs(3) && d <= Duration::from_millis(3300));
        let d = b.next(
            Some(Duration::from_secs(3600)),
            Duration::from_secs(10),
            &mut rng,
        );
        assert!(d >= Duration::from_secs(10) && d <= Duration::from_secs(11));
    }

    const BUCKET: &str = "openai/gpt-4o-mini";

    fn policy() -> Policy {
        Policy {
            max_retries: 3,
            retry_after_max: Duration::from_secs(60),
            max_wait: Duration::from_secs(5),
        }
    }

    /// The `calls`-th call of the primary (`on_fallback` false) or the fallback, with or
    /// without a usable fallback configured.
    fn at(calls: u32, on_fallback: bool, has_fallback: bool) -> Progress<'static> {
        Progress {
            bucket: BUCKET,
            calls,
            on_fallback,
            has_fallback,
        }
    }

    fn decide(seen: Seen, at: Progress<'_>) -> Move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        next_move(&seen, at, &policy(), &mut b, &mut rng)
    }

    fn call_failed(error: CallError, opened: bool) -> Seen {
        Seen::CallFailed { error, opened }
    }

    fn rate_limited(retry_after: Option<Duration>) -> CallError {
        CallError::RateLimited {
            retry_after,
            message: "slow down".into(),
        }
    }

    fn server(retry_after: Option<Duration>) -> CallError {
        CallError::Server {
            status: 503,
            retry_after,
            message: "unavailable".into(),
        }
    }

    #[test]
    fn an_open_breaker_falls_back_once_then_yields() {
        let wait = Duration::from_secs(30);
        for seen in [
            || Seen::BreakerOpen {
                wait: Duration::from_secs(30),
            },
            || {
                Seen::Limiter(LimitError::BreakerOpen {
                    bucket: BUCKET.into(),
                    wait: Duration::from_secs(30),
                })
            },
        ] {
            assert!(matches!(decide(seen(), at(0, false, true)), Move::Fallback));
            for at in [at(0, true, true), at(0, false, false)] {
                match decide(seen(), at) {
                    Move::Stop(StepError::Yield { after, message }) => {
                        assert_eq!(after, wait);
                        assert_eq!(message, format!("circuit breaker for {BUCKET} is open"));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // A breaker about to close still yields for a moment, not zero.
        let soon = Seen::BreakerOpen {
            wait: Duration::from_millis(5),
        };
        assert!(matches!(
            decide(soon, at(0, false, false)),
            Move::Stop(StepError::Yield { after, .. }) if after == Duration::from_millis(100)
        ));
    }

    #[test]
    fn no_admission_falls_back_once_then_yields_for_the_wait_bound() {
        assert!(matches!(
            decide(Seen::NotAdmitted, at(0, false, true)),
            Move::Fallback
        ));
        match decide(Seen::NotAdmitted, at(0, true, true)) {
            Move::Stop(StepError::Yield { after, message }) => {
                assert_eq!(after, policy().max_wait);
                assert!(message.contains("not admitted within 5s"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn limiter_refusals_stop_the_step_typed() {
        assert!(matches!(
            decide(Seen::Limiter(LimitError::Cancelled), at(0, false, true)),
            Move::Stop(StepError::Cancelled)
        ));
        let too_large = LimitError::TooLarge {
            bucket: BUCKET.into(),
            tokens: 10,
            capacity: 5,
        };
        assert!(matches!(
            decide(Seen::Limiter(too_large), at(0, false, true)),
            Move::Stop(StepError::Permanent(_))
        ));
        let store = LimitError::Store(honua_shared::store::StoreError::FunctionsNotLoaded {
            library: "honua".into(),
        });
        assert!(matches!(
            decide(Seen::Limiter(store), at(0, false, true)),
            Move::Stop(StepError::Retryable(_))
        ));
    }

    #[test]
    fn a_permanent_provider_error_never_retries_or_falls_back() {
        let e = CallError::Permanent {
            status: Some(400),
            message: "bad request".into(),
        };
        match decide(call_failed(e, false), at(1, false, true)) {
            Move::Stop(StepError::Permanent(m)) => {
                assert_eq!(m, format!("llm call to {BUCKET} failed: bad request"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_429_falls_back_first_then_retries_after_its_retry_after() {
        let ra = Some(Duration::from_secs(2));
        assert!(matches!(
            decide(call_failed(rate_limited(ra), false), at(1, false, true)),
            Move::Fallback
        ));
        for at in [at(1, true, true), at(1, false, false)] {
            match decide(call_failed(rate_limited(ra), false), at) {
                Move::Retry(d) => {
                    assert!(d >= Duration::from_secs(2) && d <= Duration::from_millis(2200))
                }
                other => panic!("{other:?}"),
            }
        }
        // Without Retry-After: the jittered backoff.
        assert!(matches!(
            decide(call_failed(rate_limited(None), false), at(1, true, true)),
            Move::Retry(d) if d <= Duration::from_millis(100)
        ));
    }

    #[test]
    fn a_429_asking_for_longer_than_the_clamp_yields_for_what_it_asked() {
        let ra = Duration::from_secs(600);
        for calls in [1, 10] {
            match decide(
                call_failed(rate_limited(Some(ra)), false),
                at(calls, true, true),
            ) {
                Move::Stop(StepError::Yield { after, message }) => {
                    assert_eq!(after, ra);
                    assert_eq!(message, format!("llm provider {BUCKET} answered 429"));
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn server_errors_and_timeouts_fall_back_only_when_they_opened_the_breaker() {
        for error in [
            || server(None),
            || CallError::Timeout("slow".into()),
            || CallError::Connection("refused".into()),
        ] {
            assert!(matches!(
                decide(call_failed(error(), true), at(1, false, true)),
                Move::Fallback
            ));
            assert!(matches!(
                decide(call_failed(error(), false), at(1, false, true)),
                Move::Retry(d) if d <= Duration::from_millis(100)
            ));
            assert!(matches!(
                decide(call_failed(error(), true), at(1, true, true)),
                Move::Retry(_)
            ));
        }
        // A 503's Retry-After is honoured.
        assert!(matches!(
            decide(call_failed(server(Some(Duration::from_secs(4))), false), at(1, false, false)),
            Move::Retry(d) if d >= Duration::from_secs(4)
        ));
    }

    #[test]
    fn past_max_retries_the_step_fails_retryable() {
        // `max_retries` 3: the fourth call may still be retried, the fifth not.
        assert!(matches!(
            decide(call_failed(server(None), false), at(3, false, false)),
            Move::Retry(_)
        ));
        match decide(call_failed(server(None), false), at(4, false, false)) {
            Move::Stop(StepError::Retryable(m)) => assert_eq!(
                m,
                "llm call failed after 4 attempts: server error (503): unavailable"
            ),
            other => panic!("{other:?}"),
        }
        // Even a move to the fallback ends there.
        assert!(matches!(
            decide(call_failed(server(None), true), at(4, false, true)),
            Move::Stop(StepError::Retryable(_))
        ));
        // A spent 429 keeps its Retry-After (clamped), 1 s without one.
        for (ra, want) in [
            (Some(Duration::from_secs(7)), Duration::from_secs(7)),
            (None, Duration::from_secs(1)),
        ] {
            assert!(matches!(
                decide(call_failed(rate_limited(ra), false), at(4, false, true)),
                Move::Stop(StepError::RetryAfter { after, .. }) if after == want
            ));
        }
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let t0 = Instant::now();
        let mut br = Breaker::new(3, Duration::from_secs(10));
        assert_eq!(br.gate(t0), Gate::Closed);
        assert!(!br.failure(t0));
        assert!(!br.failure(t0));
        br.success();
        assert!(!br.failure(t0));
        assert!(!br.failure(t0));
        assert!(br.failure(t0), "third consecutive failure opens");
        assert_eq!(br.gate(t0), Gate::Open);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(br.gate(later), Gate::Probe);
        assert_eq!(br.gate(later), Gate::Open, "one probe at a time");
        assert!(br.failure(later), "a failed probe reopens");
        assert_eq!(br.gate(later), Gate::Open);
        let much_later = later + Duration::from_secs(11);
        assert_eq!(br.gate(much_later), Gate::Probe);
        br.success();
        assert_eq!(br.gate(much_later), Gate::Closed);
    }
}
