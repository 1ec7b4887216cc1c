//! A latency histogram with a fixed footprint, for the fan-out benchmark.
//!
//! Every delivery the load generator sees is one sample, so a run at 5,000
//! clients records over a million of them; keeping them all would make the
//! load generator's own memory and sorting part of the measurement. Instead
//! samples land in counters: 1 µs buckets below 100 ms (where the targets
//! are) and 1 ms buckets up to 120 s (anything later is clamped into the last
//! bucket, and the exact maximum is kept aside). Quantiles are read back as
//! the midpoint of the bucket they fall in.

/// Latencies below this many microseconds get a bucket per microsecond.
const FINE_LIMIT_US: usize = 100_000;
/// Latencies below this many milliseconds get a bucket per millisecond.
const COARSE_LIMIT_MS: usize = 120_000;

/// Counts of latencies; see the module docs.
pub struct LatencyHistogram {
    fine: Vec<u32>,
    coarse: Vec<u32>,
    count: u64,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram (about 880 KB of counters, allocated once).
    pub fn new() -> Self {
        LatencyHistogram {
            fine: vec![0; FINE_LIMIT_US],
            coarse: vec![0; COARSE_LIMIT_MS],
            count: 0,
            max_ns: 0,
        }
    }

    /// Forgets every sample, keeping the allocation.
    pub fn clear(&mut self) {
        self.fine.fill(0);
        self.coarse.fill(0);
        self.count = 0;
        self.max_ns = 0;
    }

    /// Records one latency.
    pub fn record(&mut self, ns: u64) {
        let us = (ns / 1_000) as usize;
        let slot = if us < FINE_LIMIT_US {
            &mut self.fine[us]
        } else {
            let ms = ((ns / 1_000_000) as usize).min(COARSE_LIMIT_MS - 1);
            &mut self.coarse[ms]
        };
        *slot = slot.saturating_add(1);
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
    }

    /// The latency at or below which a fraction `q` of the samples lie, in
    /// milliseconds; NaN when there are no samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return f64::NAN;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (us, &n) in self.fine.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return (us as f64 + 0.5) / 1_000.0;
            }
        }
        for (ms, &n) in self.coarse.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return ms as f64 + 0.5;
            }
        }
        self.max_ms()
    }

    /// The largest latency recorded, in milliseconds; NaN when empty.
    pub fn max_ms(&self) -> f64 {
        if self.count == 0 {
            f64::NAN
        } else {
            self.max_ns as f64 / 1e6
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        let mut h = LatencyHistogram::new();
        for us in 1..=100u64 {
            h.record(us * 1_000 + 300);
        }
        h.record(2_500_000_000); // 2.5 s: a coarse bucket
        assert!((h.quantile_ms(0.50) - 0.0515).abs() < 1e-9); // rank 51 of 101
        assert!((h.quantile_ms(0.99) - 0.1005).abs() < 1e-9);
        assert!((h.quantile_ms(1.0) - 2_500.5).abs() < 1e-9);
        assert!((h.max_ms() - 2_500.0).abs() < 1e-9);
        h.clear();
        assert!(h.quantile_ms(0.5).is_nan());
    }
}
