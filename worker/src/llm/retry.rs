//! Pure decisions of the provider-call loop: the retry delay (exponential with full
//! jitter, `Retry-After` honoured but clamped) and a circuit breaker per provider/model.

use std::time::{Duration, Instant};

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
