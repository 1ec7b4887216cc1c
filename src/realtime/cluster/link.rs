//! The link's state: whether the bridge is connected to Redis, since when
//! it has been down, and when to try again.
//!
//! The waits are the reconnect policy both Redis links share
//! ([`happynet_actors::reconnect`]): `reconnect_min` plus full jitter over
//! an exponential ceiling, capped at `reconnect_max`, reset only once a read
//! has succeeded on the new connection ([`LinkState::healthy`]). What this
//! adds is the bridge's view: one attempt at a time, and downtime counted
//! from the loss of a link that was up (a node that has never reached Redis
//! has no downtime and no reconnects to report).

use happynet_actors::reconnect::Reconnect;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not connected.
    Down,
    /// A connection attempt is under way.
    Connecting,
    /// Connected.
    Up,
}

/// Whether the bridge is connected, and when to try again when it is not.
#[derive(Debug)]
pub struct LinkState {
    phase: Phase,
    /// Whether the link has ever been up: downtime and reconnects count
    /// from its first loss.
    ever_up: bool,
    reconnect: Reconnect<Instant>,
    reconnects: u64,
}

impl LinkState {
    /// A link that has never been up, reconnecting by `reconnect`
    /// (`ClusterConfig::reconnect`, which judged its bounds).
    pub fn new(reconnect: Reconnect<Instant>) -> Self {
        LinkState {
            phase: Phase::Down,
            ever_up: false,
            reconnect,
            reconnects: 0,
        }
    }

    /// True while connected.
    pub fn is_up(&self) -> bool {
        self.phase == Phase::Up
    }

    /// Since when the link has been down (`None` while up, or if it was
    /// never up).
    pub fn down_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Up => None,
            _ if !self.ever_up => None,
            _ => self.reconnect.down_since(),
        }
    }

    /// Starts a connection attempt; false if one is under way or the link
    /// is up.
    pub fn start_connect(&mut self) -> bool {
        if self.phase != Phase::Down {
            return false;
        }
        self.phase = Phase::Connecting;
        true
    }

    /// The attempt succeeded at `now`. Returns how long the link was down,
    /// if it had been up before (a reconnect).
    ///
    /// The backoff is not reset here but by [`healthy`](Self::healthy): a
    /// link that dies right after connecting keeps backing off instead of
    /// retrying at the shortest wait forever.
    pub fn connected(&mut self, now: Instant) -> Option<Duration> {
        self.phase = Phase::Up;
        let down_for = self.reconnect.connected(now);
        if !std::mem::replace(&mut self.ever_up, true) {
            return None;
        }
        down_for.inspect(|_| self.reconnects += 1)
    }

    /// The link has proved itself (a read came back on it): the next outage
    /// starts backing off from the shortest wait again.
    pub fn healthy(&mut self) {
        if self.is_up() {
            self.reconnect.healthy();
        }
    }

    /// The attempt failed at `now`; returns how long to wait before the
    /// next one. `unit` is a random number in `[0, 1)`.
    pub fn connect_failed(&mut self, now: Instant, unit: f64) -> Duration {
        self.phase = Phase::Down;
        self.reconnect.failed(now, unit).wait
    }

    /// The link broke at `now`; returns how long to wait before
    /// reconnecting, or `None` if it was not up (already handled).
    pub fn lost(&mut self, now: Instant, unit: f64) -> Option<Duration> {
        if !self.is_up() {
            return None;
        }
        self.phase = Phase::Down;
        Some(self.reconnect.failed(now, unit).wait)
    }

    /// Times the link came back after being down.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_backs_off_with_jitter_and_reports_downtime() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut l = LinkState::new(Reconnect::try_new(ms(100), ms(1000)).expect("valid"));
        assert!(!l.is_up());
        assert!(l.start_connect());
        assert!(!l.start_connect(), "one attempt at a time");
        // First attempt fails: min + jitter over base × 2^0.
        assert_eq!(l.connect_failed(t0, 0.0), ms(100));
        assert!(l.start_connect());
        assert_eq!(l.connect_failed(t0, 0.5), ms(200)); // 100 + 0.5 × 200
        assert!(l.start_connect());
        assert_eq!(l.down_since(), None, "never up: no downtime yet");
        assert_eq!(l.connected(t0), None, "never up before: not a reconnect");
        assert!(l.is_up());
        l.healthy();
        assert_eq!(l.lost(t0 + ms(10), 0.99), Some(ms(199)), "attempts reset");
        assert_eq!(l.lost(t0 + ms(10), 0.0), None, "already down");
        assert_eq!(l.down_since(), Some(t0 + ms(10)));
        for _ in 0..10 {
            assert!(l.start_connect());
            assert!(l.connect_failed(t0 + ms(20), 0.99) <= ms(1000), "capped");
        }
        assert!(l.start_connect());
        assert_eq!(l.connected(t0 + ms(510)), Some(ms(500)));
        assert_eq!(l.reconnects(), 1);
    }

    #[test]
    fn a_link_that_dies_at_once_keeps_backing_off() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut l = LinkState::new(Reconnect::try_new(ms(100), ms(10_000)).expect("valid"));
        let mut waits = Vec::new();
        for i in 0..5 {
            assert!(l.start_connect());
            l.connected(t0 + ms(i));
            // Dies before a single read came back: no reset.
            waits.push(l.lost(t0 + ms(i), 0.99).expect("was up"));
        }
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{waits:?}");
        // Once a read succeeds, the next outage starts from the bottom.
        assert!(l.start_connect());
        l.connected(t0);
        l.healthy();
        assert_eq!(l.lost(t0, 0.99), Some(ms(199)));
    }
}
