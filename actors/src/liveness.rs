//! Liveness and slow-consumer policy, and the small shared record behind it.
//!
//! The hub owns liveness (DESIGN principle 3): actix-web-actors drives a session
//! actor from its socket's write path, so a client that stops reading freezes
//! its actor, timers and all (actix-web#2441). A session therefore cannot be
//! trusted to evict itself. Instead every session shares a [`SessionLink`] with
//! the hub: the session stamps it whenever the client sends anything and
//! subtracts what it has handed to the socket writer; the hub adds what it
//! queues. The hub's one heartbeat timer and its delivery path read the link
//! and ask [`EvictionPolicy`] — plain code that takes `now` — what to do.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// What it costs to hold one queued message for a session beyond its payload:
/// the boxed envelope, the queue node and the shared-payload handle. Counting
/// it keeps a flood of tiny messages inside the same byte cap as a few big ones.
pub const PER_MESSAGE_OVERHEAD: usize = 128;

/// State shared between one session and the hub, updated without messages so
/// that a frozen session still reads as frozen.
#[derive(Debug)]
pub struct SessionLink {
    epoch: Instant,
    last_seen_ms: AtomicU64,
    queued_bytes: AtomicUsize,
    peak_queued_bytes: AtomicUsize,
}

impl SessionLink {
    /// A link for a session that was last heard from at `now`. `epoch` is the
    /// hub's fixed reference point, so times fit in an atomic integer.
    pub fn new(epoch: Instant, now: Instant) -> Self {
        let link = SessionLink {
            epoch,
            last_seen_ms: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            peak_queued_bytes: AtomicUsize::new(0),
        };
        link.touch(now);
        link
    }

    /// Records that the client sent something at `now`.
    pub fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// When the client last sent anything.
    pub fn last_seen(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed))
    }

    /// Bytes queued for this session and not yet handed to its socket writer.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }

    /// The most bytes ever queued for this session at once.
    pub fn peak_queued_bytes(&self) -> usize {
        self.peak_queued_bytes.load(Ordering::Relaxed)
    }

    /// Hub side: counts `cost` more queued bytes. Only the hub adds, so a
    /// check against [`EvictionPolicy::admits`] followed by this call cannot
    /// race with another adder.
    pub fn add_queued(&self, cost: usize) {
        let now = self.queued_bytes.fetch_add(cost, Ordering::AcqRel) + cost;
        self.peak_queued_bytes.fetch_max(now, Ordering::Relaxed);
    }

    /// Session side: `cost` bytes were handed to the socket writer (or the
    /// message that carried them was dropped).
    pub fn release_queued(&self, cost: usize) {
        self.queued_bytes.fetch_sub(cost, Ordering::AcqRel);
    }
}

/// What the hub should do with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Healthy: keep it.
    Keep,
    /// Nothing heard within the client timeout: close it.
    Silent,
    /// Its undelivered bytes would exceed the cap: it is not reading; close it.
    SlowConsumer,
}

/// The hub's rules for keeping or evicting a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictionPolicy {
    /// A session not heard from for this long is evicted.
    pub client_timeout: Duration,
    /// A session may have at most this many bytes queued and undelivered.
    pub max_outbound_bytes: usize,
}

impl EvictionPolicy {
    /// The heartbeat timer's question: is a session last heard from at
    /// `last_seen` still alive at `now`?
    pub fn liveness(&self, last_seen: Instant, now: Instant) -> Verdict {
        if now.saturating_duration_since(last_seen) > self.client_timeout {
            Verdict::Silent
        } else {
            Verdict::Keep
        }
    }

    /// The delivery path's question: may `cost` more bytes be queued for a
    /// session that already has `queued` undelivered?
    pub fn admits(&self, queued: usize, cost: usize) -> Verdict {
        if queued.saturating_add(cost) > self.max_outbound_bytes {
            Verdict::SlowConsumer
        } else {
            Verdict::Keep
        }
    }

    /// The cost charged against the cap for a message of `payload_len` bytes.
    pub fn cost_of(payload_len: usize) -> usize {
        payload_len + PER_MESSAGE_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> EvictionPolicy {
        EvictionPolicy {
            client_timeout: Duration::from_secs(60),
            max_outbound_bytes: 1000,
        }
    }

    #[test]
    fn silent_only_after_the_timeout_has_fully_passed() {
        let p = policy();
        let t0 = Instant::now();
        assert_eq!(p.liveness(t0, t0), Verdict::Keep);
        assert_eq!(p.liveness(t0, t0 + Duration::from_secs(60)), Verdict::Keep);
        assert_eq!(
            p.liveness(t0, t0 + Duration::from_secs(60) + Duration::from_millis(1)),
            Verdict::Silent
        );
        // A clock that reads earlier than last_seen (a stamp from another
        // thread) is not a timeout.
        assert_eq!(p.liveness(t0 + Duration::from_secs(5), t0), Verdict::Keep);
    }

    #[test]
    fn admits_up_to_the_cap_and_not_a_byte_more() {
        let p = policy();
        assert_eq!(p.admits(0, 1000), Verdict::Keep);
        assert_eq!(p.admits(999, 1), Verdict::Keep);
        assert_eq!(p.admits(1000, 1), Verdict::SlowConsumer);
        assert_eq!(p.admits(0, 1001), Verdict::SlowConsumer);
        assert_eq!(p.admits(usize::MAX, usize::MAX), Verdict::SlowConsumer);
    }

    #[test]
    fn link_tracks_queue_peak_and_last_seen() {
        let t0 = Instant::now();
        let link = SessionLink::new(t0, t0);
        link.add_queued(300);
        link.add_queued(200);
        link.release_queued(300);
        link.add_queued(50);
        assert_eq!(link.queued_bytes(), 250);
        assert_eq!(link.peak_queued_bytes(), 500);
        link.touch(t0 + Duration::from_millis(1500));
        assert_eq!(link.last_seen(), t0 + Duration::from_millis(1500));
    }

    #[test]
    fn a_frozen_session_is_found_by_the_timer_alone() {
        // The session stamps the link, then freezes. Nothing else touches it;
        // the hub's timer still reaches a verdict from the link and `now`.
        let p = policy();
        let t0 = Instant::now();
        let link = SessionLink::new(t0, t0);
        link.touch(t0 + Duration::from_secs(10));
        let mut now = t0;
        let mut evicted_at = None;
        while now < t0 + Duration::from_secs(120) {
            now += Duration::from_secs(30);
            if p.liveness(link.last_seen(), now) == Verdict::Silent {
                evicted_at = Some(now);
                break;
            }
        }
        assert_eq!(evicted_at, Some(t0 + Duration::from_secs(90)));
    }
}
