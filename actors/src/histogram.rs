//! A fixed-bucket latency histogram: what the hub keeps for broadcast
//! latency and each upstream keeps for call latency, exposed as Prometheus
//! histograms by `happynet::ops::metrics`.
//!
//! It is plain data owned by one actor (or behind one lock), so observing is
//! a bucket search over a dozen bounds and two additions: no atomics, no
//! allocation. The bounds are fixed at compile time, the same for every
//! histogram, so that dashboards can compare them and the memory is bounded.

use serde::Serialize;
use std::time::Duration;

/// The upper bounds of the buckets, in seconds (the Prometheus convention).
/// From 50 µs (one local fan-out) to 10 s (a slow upstream); anything slower
/// lands only in the implicit `+Inf` bucket.
pub const LATENCY_BOUNDS_SECONDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Counts of observations per bucket, their sum and their number.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Histogram {
    /// Observations at or below each bound of [`LATENCY_BOUNDS_SECONDS`]
    /// (not cumulative; see [`Histogram::cumulative`]).
    buckets: [u64; 16],
    /// The sum of all observations, in nanoseconds.
    sum_nanos: u128,
    /// How many observations there were.
    count: u64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&mut self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = LATENCY_BOUNDS_SECONDS.iter().position(|&b| secs <= b) {
            self.buckets[i] += 1;
        }
        self.sum_nanos += took.as_nanos();
        self.count += 1;
    }

    /// How many observations there were.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The sum of all observations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_nanos as f64 / 1e9
    }

    /// `(upper bound in seconds, observations at or below it)` for every
    /// bound, cumulative as Prometheus expects; the `+Inf` bucket is
    /// [`Histogram::count`].
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut running = 0;
        LATENCY_BOUNDS_SECONDS
            .iter()
            .zip(self.buckets.iter())
            .map(move |(&bound, &n)| {
                running += n;
                (bound, running)
            })
    }

    /// Adds `other`'s observations to this one (e.g. to sum per-thread
    /// histograms).
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.sum_nanos += other.sum_nanos;
        self.count += other.count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(50)); // exactly on a bound: that bucket
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60)); // only +Inf
        let cum: Vec<(f64, u64)> = h.cumulative().collect();
        assert_eq!(cum[0], (0.000_05, 1));
        assert_eq!(cum[1], (0.000_1, 2));
        assert_eq!(cum[5].1, 2, "2.5 ms bucket excludes the 3 ms call");
        assert_eq!(cum[6], (0.005, 3));
        assert_eq!(cum[15], (10.0, 3));
        assert_eq!(h.count(), 4);
        assert!((h.sum_seconds() - 60.003_101).abs() < 1e-9);
    }

    #[test]
    fn merge_adds_counts_and_sums() {
        let mut a = Histogram::default();
        a.observe(Duration::from_millis(1));
        let mut b = Histogram::default();
        b.observe(Duration::from_millis(1));
        b.observe(Duration::from_millis(20));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.cumulative().nth(4), Some((0.001, 2)));
        assert_eq!(a.cumulative().nth(8), Some((0.025, 3)));
    }
}
