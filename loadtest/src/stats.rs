//! Latency distributions: nearest-rank percentiles and a compact CDF for plots.

use serde::Serialize;

/// A distribution of latencies in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Dist {
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// `[latency_ms, fraction ≤ it]` at 1 % steps, then 0.1 % steps above 99 %.
    pub cdf: Vec<[f64; 2]>,
}

impl Dist {
    /// From samples in milliseconds (any order).
    pub fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let q = |p: f64| percentile(&ms, p);
        let mut cdf: Vec<[f64; 2]> = (0..99)
            .map(|i| [q(i as f64 / 100.0), i as f64 / 100.0])
            .collect();
        cdf.extend((990..=1000).map(|i| [q(i as f64 / 1000.0), i as f64 / 1000.0]));
        Self {
            samples: ms.len(),
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            max_ms: ms[ms.len() - 1],
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            cdf,
        }
    }

    /// `p50 / p90 / p99 / max` in ms.
    pub fn line(&self) -> String {
        if self.samples == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {} / p90 {} / p99 {} / max {} ms ({} samples)",
            short(self.p50_ms),
            short(self.p90_ms),
            short(self.p99_ms),
            short(self.max_ms),
            self.samples
        )
    }
}

/// Nearest rank: the smallest sample with at least `p` of the samples at or below it.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1]
}

/// Milliseconds with as many decimals as they deserve.
pub fn short(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let d = Dist::of((1..=100).rev().map(f64::from).collect());
        assert_eq!(d.samples, 100);
        assert_eq!(d.p50_ms, 50.0);
        assert_eq!(d.p90_ms, 90.0);
        assert_eq!(d.p99_ms, 99.0);
        assert_eq!(d.max_ms, 100.0);
        assert_eq!(d.mean_ms, 50.5);
        assert_eq!(d.cdf.first(), Some(&[1.0, 0.0]));
        assert_eq!(d.cdf.last(), Some(&[100.0, 1.0]));
        assert!(
            d.cdf
                .windows(2)
                .all(|w| w[0][0] <= w[1][0] && w[0][1] < w[1][1])
        );
    }

    #[test]
    fn one_sample_and_none() {
        let d = Dist::of(vec![3.0]);
        assert_eq!((d.p50_ms, d.p99_ms, d.max_ms), (3.0, 3.0, 3.0));
        assert_eq!(Dist::of(Vec::new()).samples, 0);
    }
}
