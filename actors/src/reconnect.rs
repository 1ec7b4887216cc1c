//! When a broken link to Redis may try again, and how long its outage
//! lasted: the one reconnect policy of both Redis links, the cluster
//! bridge's (`happynet`'s `realtime::cluster::link`) and the shared rate
//! limiter's ([`crate::shared_limiter::SharedLink`]).
//!
//! A plain state machine: it takes `now` and a random `unit` in `[0, 1)`,
//! and does no I/O. A failure (an attempt to connect that failed, a link
//! that broke, a check that timed out) starts an outage unless one is under
//! way, and says how long to wait before the next attempt: `min` plus full
//! jitter over an exponential ceiling ([`Backoff`]), capped at `max`. A
//! policy with `min == max` ([`Reconnect::fixed`]) waits exactly that long
//! every time, whatever the jitter.
//!
//! Two moments end an outage, and they are kept apart on purpose:
//! [`connected`](Reconnect::connected) says the link is back (and how long
//! it was gone), while only [`healthy`](Reconnect::healthy) — the link has
//! proved itself — sends the next outage back to the shortest wait. A link
//! that dies right after connecting thus keeps backing off instead of
//! retrying at the shortest wait forever.
//!
//! It is generic over the instant type, so the bridge can use tokio's
//! (paused in tests) and the limiter std's.

use crate::backoff::{Backoff, BackoffError};
use std::fmt;
use std::time::Duration;

/// An instant an outage is measured with: std's or tokio's.
pub trait Moment: Copy {
    /// How long after `earlier` this is; zero if it is not after it.
    fn since(self, earlier: Self) -> Duration;
}

impl Moment for std::time::Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

impl Moment for tokio::time::Instant {
    fn since(self, earlier: Self) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

/// The reconnect policy of one link; see the module docs.
#[derive(Debug, Clone)]
pub struct Reconnect<I = std::time::Instant> {
    /// `base` is the shortest wait, `max` the longest.
    backoff: Backoff,
    /// Failures since the link last proved healthy: the backoff's exponent.
    attempt: u32,
    /// When the outage under way began, if there is one.
    down_since: Option<I>,
}

/// What [`Reconnect::failed`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// How long to wait before the next attempt.
    pub wait: Duration,
    /// Whether this failure began an outage (the link had been fine): the
    /// moment worth a log line.
    pub outage_began: bool,
}

/// Why [`Reconnect::try_new`] refused its bounds. [`field`](Self::field)
/// names the argument, so that a configuration reports it under its own key
/// (`network.cluster.reconnect_min_ms`, say): the bounds are judged here
/// and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectError(BackoffError);

impl ReconnectError {
    /// The argument that was wrong: `"min"` or `"max"`.
    pub fn field(&self) -> &'static str {
        match self.0 {
            BackoffError::MaxBelowBase { .. } => "max",
            _ => "min",
        }
    }

    /// What the argument must be, without its name.
    pub fn requirement(&self) -> String {
        match self.0 {
            BackoffError::MaxBelowBase { base, max } => format!(
                "must be >= min ({} ms), got {} ms",
                base.as_millis(),
                max.as_millis()
            ),
            // A zero first wait reconnects in a tight loop against a Redis
            // that is down.
            _ => "must be > 0".to_owned(),
        }
    }
}

impl fmt::Display for ReconnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for ReconnectError {}

impl<I: Moment> Reconnect<I> {
    /// Waits from `min` (plus jitter) growing exponentially, capped at
    /// `max`. `min` must be above zero (a zero wait reconnects in a tight
    /// loop) and `max` at least `min`; the backoff's own constructor judges
    /// both.
    pub fn try_new(min: Duration, max: Duration) -> Result<Self, ReconnectError> {
        Backoff::try_new(min, max)
            .map(Self::with)
            .map_err(ReconnectError)
    }

    /// Waits `gap` after every failure; a zero gap is taken as 1 ms, so
    /// that even a fixed policy never spins.
    pub fn fixed(gap: Duration) -> Self {
        let gap = gap.max(Duration::from_millis(1));
        // Above zero with `max == base`: what `try_new` would accept.
        Self::with(Backoff {
            base: gap,
            max: gap,
        })
    }

    fn with(backoff: Backoff) -> Self {
        Reconnect {
            backoff,
            attempt: 0,
            down_since: None,
        }
    }

    /// An attempt failed, or the link broke, at `now`: begins an outage if
    /// none is under way, and says how long to wait before trying again.
    pub fn failed(&mut self, now: I, unit: f64) -> Retry {
        let outage_began = self.down_since.is_none();
        if outage_began {
            self.down_since = Some(now);
        }
        let wait = self
            .backoff
            .base
            .saturating_add(self.backoff.delay(self.attempt, unit))
            .min(self.backoff.max);
        self.attempt = self.attempt.saturating_add(1);
        Retry { wait, outage_began }
    }

    /// The link is back at `now`: ends the outage, if there was one, and
    /// says how long it lasted. The waits do not start from the shortest
    /// again until [`healthy`](Self::healthy).
    pub fn connected(&mut self, now: I) -> Option<Duration> {
        self.down_since.take().map(|since| now.since(since))
    }

    /// The link has proved itself: the next outage starts from the
    /// shortest wait.
    pub fn healthy(&mut self) {
        self.attempt = 0;
    }

    /// When the outage under way began (`None` when there is none).
    pub fn down_since(&self) -> Option<I> {
        self.down_since
    }

    /// True during an outage: from a failure until [`connected`](Self::connected).
    pub fn is_down(&self) -> bool {
        self.down_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(min: Duration, max: Duration) -> Reconnect {
        Reconnect::try_new(min, max).expect("valid bounds")
    }

    #[test]
    fn bad_bounds_are_refused_by_name() {
        let zero = Reconnect::<Instant>::try_new(ms(0), ms(10)).unwrap_err();
        assert_eq!(
            (zero.field(), zero.requirement().as_str()),
            ("min", "must be > 0")
        );
        let below = Reconnect::<Instant>::try_new(ms(100), ms(50)).unwrap_err();
        assert_eq!(below.field(), "max");
        assert_eq!(below.requirement(), "must be >= min (100 ms), got 50 ms");
        assert!(Reconnect::<Instant>::try_new(ms(100), ms(100)).is_ok());
    }

    #[test]
    fn a_fixed_policy_never_waits_zero() {
        let mut r = Reconnect::fixed(ms(0));
        assert_eq!(r.failed(Instant::now(), 0.5).wait, ms(1));
    }

    #[test]
    fn waits_grow_with_jitter_and_are_capped() {
        let t0 = Instant::now();
        let mut r = policy(ms(100), ms(1000));
        // min + unit × base × 2^attempt.
        assert_eq!(r.failed(t0, 0.0).wait, ms(100));
        assert_eq!(r.failed(t0, 0.5).wait, ms(200));
        assert_eq!(r.failed(t0, 0.5).wait, ms(300));
        for _ in 0..20 {
            assert!(r.failed(t0, 0.99).wait <= ms(1000), "capped");
        }
        assert_eq!(r.failed(t0, 0.99).wait, ms(1000));
    }

    #[test]
    fn an_outage_begins_once_and_ends_on_connect() {
        let t0 = Instant::now();
        let mut r = policy(ms(100), ms(1000));
        assert!(!r.is_down());
        assert_eq!(r.connected(t0), None, "no outage: nothing to report");
        assert!(r.failed(t0, 0.0).outage_began);
        assert!(!r.failed(t0 + ms(5), 0.0).outage_began, "the same outage");
        assert_eq!(r.down_since(), Some(t0));
        assert_eq!(r.connected(t0 + ms(700)), Some(ms(700)));
        assert!(!r.is_down());
        assert!(r.failed(t0 + ms(800), 0.0).outage_began, "a new one");
    }

    #[test]
    fn only_a_healthy_link_starts_from_the_shortest_wait_again() {
        let t0 = Instant::now();
        let mut r = policy(ms(100), ms(10_000));
        let mut waits = Vec::new();
        for _ in 0..5 {
            waits.push(r.failed(t0, 0.99).wait);
            // Connected, but it died before proving itself.
            r.connected(t0);
        }
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        r.healthy();
        assert_eq!(r.failed(t0, 0.99).wait, ms(199));
    }

    #[test]
    fn a_fixed_policy_always_waits_its_gap() {
        let t0 = Instant::now();
        let mut r = Reconnect::fixed(ms(250));
        for unit in [0.0, 0.5, 0.99, 0.0, 0.99] {
            assert_eq!(r.failed(t0, unit).wait, ms(250));
        }
    }

    #[test]
    fn works_on_tokio_instants() {
        let t0 = tokio::time::Instant::now();
        let mut r: Reconnect<tokio::time::Instant> =
            Reconnect::try_new(ms(10), ms(20)).expect("valid bounds");
        r.failed(t0, 0.0);
        assert_eq!(r.connected(t0 + ms(3)), Some(ms(3)));
    }
}
