//! The generic cell rate algorithm (GCRA) as a plain state machine.
//!
//! GCRA is the token bucket expressed with a single timestamp per key: the
//! *theoretical arrival time* (TAT) of the next request. It admits `burst`
//! requests at once and then one per `interval`, never more than
//! `burst + elapsed / interval` over any stretch of time. It does no I/O and
//! reads no clock: every call takes `now`, so tests drive it with plain values
//! and actors feed it from `tokio::time::Instant` (which tests can pause).
//!
//! It is used for each WebSocket session's inbound message rate and is the core
//! of the keyed `RateLimiterActor`.
//!
//! # Why not `governor`
//!
//! `governor` is the field's GCRA crate, and it was weighed as the state
//! machine inside `RateLimiterActor`. We keep these ~100 lines because
//! governor's API does not offer four things the actor needs:
//!
//! - **refunds**: a grant whose request was never sent (breaker refusal, a
//!   full bulkhead, a caller that hung up) is given back with
//!   [`Gcra::refund`], which needs the TAT an admission left. governor's
//!   state is private (`StateSnapshot` can be read through middleware, not
//!   written back), so an admission cannot be undone;
//! - **`now` as an argument**: [`Gcra::check`] takes the instant, so the
//!   actor feeds it `tokio::time::Instant` and tests that pause tokio time
//!   drive it exactly. governor reads its own `Clock`; its
//!   `FakeRelativeClock` is a second clock beside tokio's, which paused-time
//!   tests would have to advance by hand in step;
//! - **the same formula in Redis**: `shared_limiter` runs this algorithm as a
//!   Lua script, and a test holds the two equal decision by decision;
//!   governor's arithmetic (integer nanoseconds inside its `Nanos`, cells per
//!   `NonZeroU32` period) is not ours to mirror, and would change under us;
//! - **the rates people write**: `rate_limit` is requests per minute as a
//!   float (`0.5` is one every two minutes); governor's `Quota` is built
//!   from whole cells per period. The Retry-After we answer is
//!   `Decision::Deny`'s `retry_after`, governor's `NotUntil::wait_time_from`
//!   would give the same, so that alone would not decide it.

use std::time::{Duration, Instant};

/// A rate: `burst` requests at once, then one every `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    interval: Duration,
    burst: u32,
}

/// The longest a [`Quota`] may make a key wait or remember: its
/// `interval × burst`. About a hundred years: no real limit comes near it,
/// and it keeps `now + interval × burst` far from overflowing an `Instant`
/// (a rate of `1e-18` per minute would otherwise panic in the arithmetic).
pub const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The error returned by [`Quota::new`] and [`Quota::per_second`] for a rate
/// that cannot be honoured. [`QuotaError::field`] says which argument was
/// wrong, so that a configuration can report it under its own key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaError {
    /// The rate was zero, negative or not a number.
    NonPositiveRate,
    /// The rate was so high that its interval rounds to zero (more than one
    /// request per nanosecond).
    RateTooHigh,
    /// The rate was so low that one interval exceeds [`MAX_SPAN`].
    RateTooLow,
    /// The burst was zero: nothing could ever be admitted.
    ZeroBurst,
    /// `interval × burst` exceeds [`MAX_SPAN`].
    BurstTooLarge,
}

impl QuotaError {
    /// The argument that was wrong: `"rate"` or `"burst"`.
    pub fn field(&self) -> &'static str {
        match self {
            QuotaError::NonPositiveRate | QuotaError::RateTooHigh | QuotaError::RateTooLow => {
                "rate"
            }
            QuotaError::ZeroBurst | QuotaError::BurstTooLarge => "burst",
        }
    }

    /// What the argument must be, without its name: `"must be > 0"`.
    pub fn requirement(&self) -> String {
        match self {
            QuotaError::NonPositiveRate => "must be > 0".to_owned(),
            QuotaError::RateTooHigh => "must be at most one per nanosecond".to_owned(),
            QuotaError::RateTooLow => format!(
                "is too low: the time between two requests must be within {} s",
                MAX_SPAN.as_secs()
            ),
            QuotaError::ZeroBurst => "must be >= 1".to_owned(),
            QuotaError::BurstTooLarge => format!(
                "is too large: burst / rate must be within {} s",
                MAX_SPAN.as_secs()
            ),
        }
    }
}

impl std::fmt::Display for QuotaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for QuotaError {}

impl Quota {
    /// `count` requests per `period`, with bursts of up to `burst`. Every
    /// value that would make the limiter's arithmetic overflow is refused
    /// (see [`QuotaError`]); what this accepts never panics later.
    pub fn new(count: f64, period: Duration, burst: u32) -> Result<Self, QuotaError> {
        if !(count.is_finite() && count > 0.0) || period.is_zero() {
            return Err(QuotaError::NonPositiveRate);
        }
        if burst == 0 {
            return Err(QuotaError::ZeroBurst);
        }
        // Nanoseconds are the clock's grain: a shorter interval would round
        // to one that admits more (or, at zero, everything).
        if period.as_nanos() as f64 / count < 1.0 {
            return Err(QuotaError::RateTooHigh);
        }
        // What `Duration::div_f64` computes, but checked: it panics when the
        // quotient does not fit.
        let interval = Duration::try_from_secs_f64(period.as_secs_f64() / count)
            .ok()
            .filter(|i| *i <= MAX_SPAN)
            .ok_or(QuotaError::RateTooLow)?;
        interval
            .checked_mul(burst)
            .filter(|span| *span <= MAX_SPAN)
            .ok_or(QuotaError::BurstTooLarge)?;
        Ok(Quota { interval, burst })
    }

    /// `rate` requests per second, with bursts of up to `burst`.
    pub fn per_second(rate: f64, burst: u32) -> Result<Self, QuotaError> {
        Self::new(rate, Duration::from_secs(1), burst)
    }

    /// The time between two admissions once the burst is spent.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// How many requests may pass at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// How far ahead of `now` the TAT may run before requests are refused.
    fn tolerance(&self) -> Duration {
        self.interval * self.burst
    }
}

/// What [`Gcra::check`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request may pass.
    Allow,
    /// The request must wait: it would pass at `now + retry_after`.
    Deny {
        /// How long until one request would be admitted.
        retry_after: Duration,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// The GCRA state of one key: the theoretical arrival time of the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    tat: Option<Instant>,
}

impl Default for Gcra {
    fn default() -> Self {
        Self::new()
    }
}

impl Gcra {
    /// A key that has seen no request: the whole burst is available.
    pub fn new() -> Self {
        Gcra { tat: None }
    }

    /// Admits one request at `now` under `quota`, or says how long to wait.
    /// A denied request does not consume capacity.
    pub fn check(&mut self, quota: &Quota, now: Instant) -> Decision {
        let tat = self.tat.map_or(now, |t| t.max(now));
        let new_tat = tat + quota.interval;
        let horizon = now + quota.tolerance();
        if new_tat <= horizon {
            self.tat = Some(new_tat);
            Decision::Allow
        } else {
            Decision::Deny {
                retry_after: new_tat - horizon,
            }
        }
    }

    /// The theoretical arrival time: after an admission, what identifies it
    /// for [`Gcra::refund`]. `None` for a key that has seen no request.
    pub fn tat(&self) -> Option<Instant> {
        self.tat
    }

    /// Gives back the admission that left the TAT at `granted_tat`, for a
    /// request that was never sent. Only the latest admission can be given
    /// back (the TAT is still `granted_tat`): that is exactly "as if it had
    /// not happened". An older one is not refunded, since later decisions
    /// were made on top of it and the state without it is not recoverable
    /// from one timestamp; refusing is the safe side (the limit is never
    /// exceeded, a refund is merely missed). Returns whether it refunded.
    ///
    /// Refund each admission at most once (a `limiter::Grant` does): after a
    /// refund the next admission leaves the TAT where the refunded one did.
    pub fn refund(&mut self, quota: &Quota, granted_tat: Instant) -> bool {
        if self.tat != Some(granted_tat) {
            return false;
        }
        // Before the first admission the TAT is at most `now`, which is the
        // same as unset; an underflow (an `Instant` near its origin) is too.
        self.tat = granted_tat.checked_sub(quota.interval);
        true
    }

    /// True when the key has recovered its whole burst at `now`, so forgetting
    /// it changes nothing: this is what lets keyed limiters evict idle keys.
    pub fn is_idle(&self, now: Instant) -> bool {
        self.tat.is_none_or(|t| t <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn admits_the_burst_at_once_then_one_per_interval() {
        let q = Quota::per_second(10.0, 3).unwrap();
        let t0 = Instant::now();
        let mut g = Gcra::new();
        for _ in 0..3 {
            assert_eq!(g.check(&q, t0), Decision::Allow);
        }
        assert_eq!(
            g.check(&q, t0),
            Decision::Deny {
                retry_after: ms(100)
            }
        );
        // Just before the interval: still refused, and the wait shrinks.
        assert_eq!(
            g.check(&q, t0 + ms(99)),
            Decision::Deny { retry_after: ms(1) }
        );
        assert_eq!(g.check(&q, t0 + ms(100)), Decision::Allow);
        assert!(!g.check(&q, t0 + ms(100)).is_allowed());
    }

    #[test]
    fn a_denied_request_costs_nothing() {
        let q = Quota::per_second(1.0, 1).unwrap();
        let t0 = Instant::now();
        let mut g = Gcra::new();
        assert!(g.check(&q, t0).is_allowed());
        for i in 0..100 {
            assert!(!g.check(&q, t0 + ms(i * 5)).is_allowed());
        }
        assert!(g.check(&q, t0 + ms(1000)).is_allowed());
    }

    #[test]
    fn a_refund_undoes_exactly_the_latest_admission() {
        let q = Quota::per_second(10.0, 2).unwrap(); // 100 ms, burst 2
        let t0 = Instant::now();
        let mut g = Gcra::new();
        assert!(g.check(&q, t0).is_allowed());
        assert!(g.check(&q, t0).is_allowed());
        let second = g.tat().unwrap();
        assert!(!g.check(&q, t0).is_allowed(), "the burst is spent");
        // The second request never went out: its unit comes back at once.
        assert!(g.refund(&q, second));
        assert!(!g.refund(&q, second), "a grant is refunded once");
        assert!(g.check(&q, t0 + ms(1)).is_allowed());
        assert!(!g.check(&q, t0 + ms(1)).is_allowed());
        // An older admission with newer ones on top is not refunded.
        let mut g = Gcra::new();
        g.check(&q, t0);
        let first = g.tat().unwrap();
        g.check(&q, t0);
        assert!(!g.refund(&q, first));
        assert!(!g.check(&q, t0).is_allowed());
        // A lone admission refunded leaves the key as if never seen.
        let mut g = Gcra::new();
        g.check(&q, t0);
        assert!(g.refund(&q, g.tat().unwrap()));
        assert!(g.is_idle(t0));
    }

    /// Property: with refunds of the latest admission mixed in, the
    /// requests admitted and *kept* (not refunded) in `[t0, t]` never exceed
    /// `burst + (t - t0) / interval`: a refund never lets the limit be beaten.
    #[test]
    fn refunds_never_let_kept_requests_beat_the_rate() {
        let mut rng = crate::backoff::Jitter::with_seed(0xC0FF_EE00_0000_0001);
        let mut next = move || rng.next_u64();
        for case in 0..200 {
            let rate = 1.0 + (next() % 1000) as f64;
            let burst = 1 + (next() % 20) as u32;
            let q = Quota::per_second(rate, burst).unwrap();
            let t0 = Instant::now();
            let mut g = Gcra::new();
            let mut now = t0;
            let mut kept: Vec<Instant> = Vec::new();
            let mut last: Option<Instant> = None;
            for _ in 0..2000 {
                now += Duration::from_micros(next() % 5_000);
                if g.check(&q, now).is_allowed() {
                    kept.push(now);
                    last = g.tat();
                }
                // Now and then the latest (or an older) grant is given back.
                if next() % 3 == 0 {
                    if let Some(tat) = last.take() {
                        if g.refund(&q, tat) {
                            kept.pop();
                        }
                    }
                }
                let elapsed = now - t0;
                let bound = burst as f64 + elapsed.as_secs_f64() / q.interval().as_secs_f64();
                // Every window that ends now, too: not only from t0.
                for (i, start) in kept.iter().enumerate().rev().take(64) {
                    let n = (kept.len() - i) as f64;
                    let w = (now - *start).as_secs_f64() / q.interval().as_secs_f64();
                    assert!(
                        n <= burst as f64 + w + 1e-9,
                        "case {case}: {n} kept in a window allowing {}",
                        burst as f64 + w
                    );
                }
                assert!(kept.len() as f64 <= bound + 1e-9, "case {case}");
            }
        }
    }

    #[test]
    fn idle_once_the_burst_has_recovered() {
        let q = Quota::per_second(10.0, 5).unwrap();
        let t0 = Instant::now();
        let mut g = Gcra::new();
        assert!(g.is_idle(t0));
        for _ in 0..5 {
            g.check(&q, t0);
        }
        assert!(!g.is_idle(t0 + ms(499)));
        assert!(g.is_idle(t0 + ms(500)));
    }

    #[test]
    fn rejects_rates_that_cannot_be_honoured() {
        assert_eq!(Quota::per_second(0.0, 1), Err(QuotaError::NonPositiveRate));
        assert_eq!(
            Quota::per_second(f64::NAN, 1),
            Err(QuotaError::NonPositiveRate)
        );
        assert_eq!(Quota::per_second(1.0, 0), Err(QuotaError::ZeroBurst));
        assert_eq!(Quota::per_second(2e9, 1), Err(QuotaError::RateTooHigh));
        // One per 6e19 s: `Duration::div_f64` would have panicked.
        assert_eq!(
            Quota::new(1e-18, Duration::from_secs(60), 1),
            Err(QuotaError::RateTooLow)
        );
        assert_eq!(
            Quota::per_second(1e-9, u32::MAX),
            Err(QuotaError::BurstTooLarge)
        );
        assert_eq!(QuotaError::ZeroBurst.field(), "burst");
        assert_eq!(QuotaError::RateTooLow.field(), "rate");
        assert_eq!(QuotaError::NonPositiveRate.to_string(), "rate must be > 0");
    }

    /// Property: over any run of request times, the number admitted in
    /// `[t0, t]` never exceeds `burst + (t - t0) / interval`. A small
    /// deterministic generator stands in for a property-testing crate.
    #[test]
    fn never_admits_more_than_rate_times_time_plus_burst() {
        // The crate's own xorshift64* (Jitter), seeded: deterministic cases.
        let mut rng = crate::backoff::Jitter::with_seed(0x9E37_79B9_7F4A_7C15);
        let mut next = move || rng.next_u64();
        for case in 0..200 {
            let rate = 1.0 + (next() % 1000) as f64;
            let burst = 1 + (next() % 20) as u32;
            let q = Quota::per_second(rate, burst).unwrap();
            let t0 = Instant::now();
            let mut g = Gcra::new();
            let mut now = t0;
            let mut admitted = 0u64;
            for _ in 0..2000 {
                now += Duration::from_micros(next() % 5_000);
                if g.check(&q, now).is_allowed() {
                    admitted += 1;
                }
                let elapsed = now - t0;
                let bound = burst as f64 + elapsed.as_secs_f64() / q.interval().as_secs_f64();
                assert!(
                    admitted as f64 <= bound + 1e-9,
                    "case {case}: admitted {admitted} > bound {bound}"
                );
            }
        }
    }
}
