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

use crate::backoff::Backoff;
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
    min: Duration,
    max: Duration,
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

impl<I: Moment> Reconnect<I> {
    /// Waits from `min` (plus jitter) growing exponentially, capped at
    /// `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Reconnect {
            min,
            max,
            backoff: Backoff { base: min, max },
            attempt: 0,
            down_since: None,
        }
    }

    /// Waits `gap` after every failure.
    pub fn fixed(gap: Duration) -> Self {
        Self::new(gap, gap)
    }

    /// An attempt failed, or the link broke, at `now`: begins an outage if
    /// none is under way, and says how long to wait before trying again.
    pub fn failed(&mut self, now: I, unit: f64) -> Retry {
        let outage_began = self.down_since.is_none();
        if outage_began {
            self.down_since = Some(now);
        }
        let wait = self
            .min
            .saturating_add(self.backoff.delay(self.attempt, unit))
            .min(self.max);
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

    #[test]
    fn waits_grow_with_jitter_and_are_capped() {
        let t0 = Instant::now();
        let mut r = Reconnect::new(ms(100), ms(1000));
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
        let mut r = Reconnect::new(ms(100), ms(1000));
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
        let mut r = Reconnect::new(ms(100), ms(10_000));
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
        let mut r: Reconnect<tokio::time::Instant> = Reconnect::new(ms(10), ms(20));
        r.failed(t0, 0.0);
        assert_eq!(r.connected(t0 + ms(3)), Some(ms(3)));
    }
}
