//! Step retry policy: bounded attempts and capped exponential backoff with full jitter.

use serde::Serialize;
use std::ops::RangeInclusive;
use std::time::Duration;

/// How often a failing step is attempted and how long to wait between attempts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryPolicy {
    /// Total attempts, including the first.
    pub max_attempts: u32,
    #[serde(serialize_with = "super::ser_duration")]
    pub initial_backoff: Duration,
    #[serde(serialize_with = "super::ser_duration")]
    pub max_backoff: Duration,
    pub multiplier: f64,
}

impl RetryPolicy {
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
    pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(60);
    pub const DEFAULT_MULTIPLIER: f64 = 2.0;
    /// Allowed `max_attempts`.
    pub const MAX_ATTEMPTS: RangeInclusive<u32> = 1..=100;
    /// Allowed `multiplier`.
    pub const MULTIPLIER: RangeInclusive<f64> = 1.0..=10.0;
    /// Longest allowed `max_backoff`.
    pub const MAX_BACKOFF_LIMIT: Duration = Duration::from_secs(24 * 3600);

    /// Exponents beyond this are not computed: the ceiling stays where it got to. Every
    /// valid policy reaches `max_backoff` or its last attempt long before.
    const MAX_EXPONENT: u32 = 1024;

    /// The un-jittered cap on the wait after `failed_attempts` failures:
    /// `min(max_backoff, initial_backoff * multiplier^(failed_attempts - 1))`
    /// (`0` is treated as `1`). Non-decreasing in `failed_attempts`, never above
    /// `max_backoff`, and total for any field values.
    pub fn backoff_ceiling(&self, failed_attempts: u32) -> Duration {
        if self.initial_backoff >= self.max_backoff {
            return self.max_backoff;
        }
        // A multiplier outside the validated range (fields are public) acts as 1.
        let m = if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        let max = self.max_backoff.as_nanos() as f64;
        let mut nanos = self.initial_backoff.as_nanos() as f64;
        if m > 1.0 && nanos > 0.0 {
            // Repeated multiplication by m >= 1 never decreases under round-to-nearest,
            // which keeps the ceiling monotone.
            let exponent = failed_attempts.saturating_sub(1).min(Self::MAX_EXPONENT);
            for _ in 0..exponent {
                nanos *= m;
                if nanos >= max {
                    return self.max_backoff;
                }
            }
        }
        // `as` saturates; nanos < max here.
        Duration::from_nanos(nanos as u64).min(self.max_backoff)
    }

    /// The wait before the next attempt after `failed_attempts` failures: uniform in
    /// `[0, backoff_ceiling(failed_attempts)]` ("full jitter").
    pub fn backoff(&self, failed_attempts: u32, rng: &mut impl rand::Rng) -> Duration {
        let ceiling = self.backoff_ceiling(failed_attempts);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

impl Default for RetryPolicy {
    /// The built-in defaults: 3 attempts, 1 s doubling up to 60 s.
    fn default() -> Self {
        Self {
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            initial_backoff: Self::DEFAULT_INITIAL_BACKOFF,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            multiplier: Self::DEFAULT_MULTIPLIER,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy(initial_ms: u64, max_ms: u64, multiplier: f64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
            multiplier,
        }
    }

    /// Valid policies (as loading admits them), plus a few out-of-range ones.
    fn any_policy() -> impl Strategy<Value = RetryPolicy> {
        let max_ms = RetryPolicy::MAX_BACKOFF_LIMIT.as_millis() as u64;
        prop_oneof![
            4 => (0..=max_ms, 0..=max_ms, 1.0..=10.0f64).prop_map(|(a, b, m)| {
                policy(a.min(b), a.max(b), m)
            }),
            1 => (any::<u64>(), any::<u64>(), any::<f64>()).prop_map(|(a, b, m)| RetryPolicy {
                max_attempts: 1,
                initial_backoff: Duration::from_nanos(a),
                max_backoff: Duration::from_nanos(b),
                multiplier: m,
            }),
        ]
    }

    #[test]
    fn doubles_from_initial_up_to_max() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (1..=8).map(|n| p.backoff_ceiling(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.backoff_ceiling(0), p.backoff_ceiling(1));
        assert_eq!(p.backoff_ceiling(u32::MAX), Duration::from_secs(60));
        assert_eq!(
            policy(500, 10_000, 1.0).backoff_ceiling(50),
            Duration::from_millis(500)
        );
        assert_eq!(policy(0, 10_000, 3.0).backoff_ceiling(50), Duration::ZERO);
    }

    #[test]
    fn jitter_spreads_over_the_whole_range() {
        let p = policy(1000, 60_000, 2.0);
        let mut rng = StdRng::seed_from_u64(7);
        let samples: Vec<Duration> = (0..1000).map(|_| p.backoff(3, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(4)));
        assert!(samples.iter().any(|d| *d < Duration::from_secs(1)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(3)));
    }

    proptest! {
        #[test]
        fn backoff_never_above_max_or_ceiling(p in any_policy(), n in any::<u32>(), seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            let b = p.backoff(n, &mut rng);
            prop_assert!(b <= p.max_backoff);
            prop_assert!(b <= p.backoff_ceiling(n));
        }

        #[test]
        fn ceiling_is_monotone_and_capped(p in any_policy(), n in 0..u32::MAX) {
            let c = p.backoff_ceiling(n);
            prop_assert!(c <= p.max_backoff);
            prop_assert!(c <= p.backoff_ceiling(n + 1));
        }

        #[test]
        fn ceiling_is_monotone_over_the_first_attempts(p in any_policy()) {
            let ceilings: Vec<Duration> = (0..=120).map(|n| p.backoff_ceiling(n)).collect();
            prop_assert!(ceilings.windows(2).all(|w| w[0] <= w[1]));
        }

        #[test]
        fn extreme_attempts_do_not_panic(p in any_policy(), seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            for n in [0, 1, 2, 64, 1024, 1025, u32::MAX - 1, u32::MAX] {
                let _ = p.backoff(n, &mut rng);
            }
            prop_assert!(p.backoff_ceiling(u32::MAX) <= p.max_backoff);
        }
    }
}
