//! Liveness and slow-consumer policy, and the small shared record behind it.
//!
//! The hub owns liveness, not the session: actix-web-actors drives a session
//! actor from its socket's write path, so a client that stops reading freezes
//! its actor, timers and all (actix-web#2441). A session therefore cannot be
//! trusted to evict itself. Instead every session shares a [`SessionLink`] with
//! the hub: the session stamps it whenever the client sends anything and
//! subtracts what it has handed to the socket writer; the hub adds what it
//! queues. The hub's one heartbeat timer and its delivery path read the link
//! and ask [`EvictionPolicy`] — plain code that takes `now` — what to do.

use crate::delivery::DeliveryQueue;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How many frames a session's queue holds unless its config says
/// otherwise (`websocket.session_mailbox_capacity` does, in the server).
pub const DEFAULT_MAX_QUEUED_FRAMES: usize = 1024;

/// What it costs to hold one queued message for a session beyond its payload:
/// the boxed envelope, the queue node and the shared-payload handle. Counting
/// it keeps a flood of tiny messages inside the same byte cap as a few big ones.
pub const PER_MESSAGE_OVERHEAD: usize = 128;

/// The most that the frame a client receives for a message adds to that
/// message's own bytes: a `POST /broadcast` JSON body `{"data":…}` of
/// `max_message_bytes` becomes `{"type":"message","room":…,"data":…}` with a
/// room name from the query of up to 64 bytes, each of which may be escaped
/// to two (the largest case, 155 bytes; a client's publish becomes a frame
/// no longer than itself). Rounded up for headroom.
pub const MAX_ENVELOPE_BYTES: usize = 256;

/// How many of the largest frames `max_outbound_bytes` must hold at once,
/// none of them delivered yet (see [`EvictionPolicy::min_outbound_bytes`]).
pub const OUTBOUND_HEADROOM_MESSAGES: usize = 4;

/// State shared between one session and the hub, updated without messages so
/// that a frozen session still reads as frozen.
///
/// Each side writes its own field: the session stamps `last_seen` and adds
/// to `released`; the hub only reads them — `last_seen` once per heartbeat,
/// `released` only when its own upper bound on the backlog nears the cap
/// (see [`OutboundBudget`]). So the fan-out path does not pull a cache line
/// from another core for every delivery.
#[derive(Debug)]
pub struct SessionLink {
    epoch: Instant,
    last_seen_ms: AtomicU64,
    released: AtomicU64,
    /// Why the session closed itself, set by the session before it stops
    /// and read by the hub when the session's `Disconnect` arrives (see
    /// [`ClosedBy`]). Written once per session, so it costs nothing on
    /// the message path.
    close_reason: AtomicU8,
    /// Set by the session once its actor has started and sized its mailbox.
    /// Until then the hub registered it (before its `101`) but its mailbox
    /// holds only actix's default 16, so a full mailbox is not yet a sign of
    /// a slow consumer. Read by the hub only when a mailbox is full.
    started: AtomicBool,
    /// Set by the session just before it writes its close frame: from
    /// then on nothing more is queued for it (see [`crate::delivery`]).
    closing: AtomicBool,
    /// The frames the hub has queued for the session's socket.
    queue: DeliveryQueue,
}

/// Why a session ended its own connection, as the hub counts it in
/// `HubStats::closed`. Evictions the hub decides itself (heartbeat, slow
/// consumer, shutdown) are counted where they are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ClosedBy {
    /// The client closed, or the connection ended without a close frame.
    Normal = 0,
    /// A frame or message over the size limit (1009).
    TooBig = 1,
    /// The inbound message rate was exceeded (1008).
    Rate = 2,
    /// Text that is not UTF-8, or a malformed protocol frame (1007).
    Invalid = 3,
    /// A WebSocket protocol violation (1002).
    Protocol = 4,
    /// A socket or stream error.
    Error = 5,
}

impl ClosedBy {
    fn from_u8(v: u8) -> ClosedBy {
        match v {
            1 => ClosedBy::TooBig,
            2 => ClosedBy::Rate,
            3 => ClosedBy::Invalid,
            4 => ClosedBy::Protocol,
            5 => ClosedBy::Error,
            _ => ClosedBy::Normal,
        }
    }
}

impl SessionLink {
    /// A link for a session that was last heard from at `now`. `epoch` is the
    /// hub's fixed reference point, so times fit in an atomic integer.
    pub fn new(epoch: Instant, now: Instant) -> Self {
        let link = SessionLink {
            epoch,
            last_seen_ms: AtomicU64::new(0),
            released: AtomicU64::new(0),
            close_reason: AtomicU8::new(ClosedBy::Normal as u8),
            started: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            queue: DeliveryQueue::new(DEFAULT_MAX_QUEUED_FRAMES),
        };
        link.touch(now);
        link
    }

    /// Lets the hub queue up to `max` frames for the session (see
    /// [`crate::delivery`]).
    pub fn with_max_queued(mut self, max: usize) -> Self {
        self.queue = DeliveryQueue::new(max);
        self
    }

    /// The frames queued for the session's socket.
    pub fn queue(&self) -> &DeliveryQueue {
        &self.queue
    }

    /// Session side: it is about to write its close frame.
    pub fn mark_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Whether the session has begun writing its close frame.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
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

    /// Session side: `cost` more bytes were handed to the socket writer (or
    /// dropped with the message that carried them).
    pub fn release(&self, cost: usize) {
        self.released.fetch_add(cost as u64, Ordering::Release);
    }

    /// Everything the session has released so far.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Acquire)
    }

    /// Session side: records why it is closing its connection.
    pub fn set_close_reason(&self, why: ClosedBy) {
        self.close_reason.store(why as u8, Ordering::Relaxed);
    }

    /// Session side: its actor has started and its mailbox has its
    /// configured capacity.
    pub fn mark_started(&self) {
        self.started.store(true, Ordering::Release);
    }

    /// Whether the session's actor has started (see [`SessionLink`]).
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Why the session closed (`Normal` unless it said otherwise).
    pub fn close_reason(&self) -> ClosedBy {
        ClosedBy::from_u8(self.close_reason.load(Ordering::Relaxed))
    }
}

/// The hub's account of one session's undelivered bytes: a plain state
/// machine. `sent` counts what the hub queued; `released_seen` is the last
/// value read from the session's [`SessionLink::released`], which only
/// grows, so `sent - released_seen` is an upper bound on the true backlog.
/// While that bound fits the cap, a delivery is admitted without reading the
/// session's counter at all; only near the cap is the counter re-read. The
/// true backlog therefore never exceeds the cap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboundBudget {
    sent: u64,
    released_seen: u64,
    peak: u64,
}

impl OutboundBudget {
    /// The upper bound on bytes queued and not yet released.
    pub fn backlog(&self) -> u64 {
        self.sent - self.released_seen
    }

    /// The largest backlog bound seen.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Charges `cost` if the backlog stays within `cap`, reading the
    /// session's released counter (`released`) only when needed. Returns
    /// false — nothing charged — for a slow consumer.
    pub fn try_charge(&mut self, cost: usize, cap: usize, released: impl FnOnce() -> u64) -> bool {
        let cost = cost as u64;
        let cap = cap as u64;
        if self.backlog() + cost > cap {
            self.released_seen = released().clamp(self.released_seen, self.sent);
            if self.backlog() + cost > cap {
                return false;
            }
        }
        self.sent += cost;
        self.peak = self.peak.max(self.backlog());
        true
    }

    /// Takes back a charge whose message was never queued.
    pub fn refund(&mut self, cost: usize) {
        self.sent -= (cost as u64).min(self.backlog());
    }
}

/// What the hub should do with a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Healthy: keep it.
    Keep,
    /// Nothing heard within the client timeout: close it.
    Silent,
    /// Its undelivered bytes would exceed the cap (see [`OutboundBudget`]):
    /// it is not reading; close it.
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

    /// The cost charged against the cap for a message of `payload_len` bytes.
    pub fn cost_of(payload_len: usize) -> usize {
        payload_len + PER_MESSAGE_OVERHEAD
    }

    /// The smallest `max_outbound_bytes` that is safe with messages of up
    /// to `max_message_bytes`: room for [`OUTBOUND_HEADROOM_MESSAGES`]
    /// frames of the largest kind (message, envelope and per-message
    /// overhead), none of them delivered yet.
    ///
    /// Why four. A session's budget is released only when its actor runs and
    /// hands the frame to the socket writer; the hub charges it when it
    /// queues. Between two runs of a healthy receiver's actor (its worker
    /// thread busy with other sessions) the hub may queue several frames:
    /// a burst of messages from the room, plus the presence frame and a
    /// reply of its own, each at most this size (presence frames are bounded
    /// by `max_message_bytes`, see [`crate::presence`]). With a cap of one
    /// frame (`max_outbound_bytes == max_message_bytes`, which used to be
    /// accepted) the first largest message evicted every receiver; with
    /// four, a reader survives any four such frames arriving at once, and
    /// only a backlog that keeps growing — a client not reading — reaches
    /// the cap. Saturates rather than overflow.
    pub fn min_outbound_bytes(max_message_bytes: usize) -> usize {
        max_message_bytes
            .saturating_add(MAX_ENVELOPE_BYTES + PER_MESSAGE_OVERHEAD)
            .saturating_mul(OUTBOUND_HEADROOM_MESSAGES)
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
    fn link_tracks_release_and_last_seen() {
        let t0 = Instant::now();
        let link = SessionLink::new(t0, t0);
        link.release(300);
        link.release(200);
        assert_eq!(link.released(), 500);
        link.touch(t0 + Duration::from_millis(1500));
        assert_eq!(link.last_seen(), t0 + Duration::from_millis(1500));
    }

    #[test]
    fn the_budget_reads_the_session_only_near_the_cap() {
        let mut b = OutboundBudget::default();
        let mut reads = 0;
        // 9 × 100 bytes fit a 1000-byte cap on the bound alone.
        for _ in 0..9 {
            assert!(b.try_charge(100, 1000, || {
                reads += 1;
                0
            }));
        }
        assert_eq!(reads, 0);
        // The 11th would cross the bound: the session is asked, has released
        // 500, so it fits.
        assert!(b.try_charge(100, 1000, || 0));
        assert!(b.try_charge(100, 1000, || {
            reads += 1;
            500
        }));
        assert_eq!(reads, 1);
        assert_eq!(b.backlog(), 600);
        // A session that released nothing more is refused at the cap, and a
        // refused charge costs nothing.
        for _ in 0..4 {
            assert!(b.try_charge(100, 1000, || 500));
        }
        assert!(!b.try_charge(1, 1000, || 500));
        assert_eq!(b.backlog(), 1000);
        assert_eq!(b.peak(), 1000);
        b.refund(100);
        assert_eq!(b.backlog(), 900);
    }

    /// Property: whatever the interleaving of charges and releases, the
    /// true backlog (charged minus actually released) never exceeds the cap.
    #[test]
    fn the_true_backlog_never_exceeds_the_cap() {
        // The crate's own xorshift64* (Jitter), seeded: deterministic cases.
        let mut rng = crate::backoff::Jitter::with_seed(0x2545_F491_4F6C_DD1D);
        let mut next = move || rng.next_u64();
        for _ in 0..100 {
            let cap = 1000 + (next() % 10_000) as usize;
            let mut b = OutboundBudget::default();
            let (mut charged, mut released) = (0u64, 0u64);
            for _ in 0..5_000 {
                if next() % 3 == 0 {
                    released += (next() % (charged - released + 1)).min(charged - released);
                } else {
                    let cost = 1 + (next() % 700) as usize;
                    if b.try_charge(cost, cap, || released) {
                        charged += cost as u64;
                    }
                }
                assert!(charged - released <= cap as u64);
                assert!(
                    b.backlog() >= charged - released,
                    "the bound is an upper bound"
                );
            }
        }
    }

    #[test]
    fn the_envelope_bound_covers_the_largest_wrapped_message() {
        use crate::protocol::{message_frame, parse_client_text, ClientFrame};
        use crate::rooms::{RoomName, MAX_ROOM_NAME_BYTES};
        use serde_json::value::RawValue;
        let max_message = 4096;
        // POST /broadcast?room=… with a JSON body of exactly max_message
        // bytes, the room name all quotes (each escaped to two bytes).
        let room = RoomName::new(&"\"".repeat(MAX_ROOM_NAME_BYTES)).unwrap();
        let data = format!("\"{}\"", "x".repeat(max_message - r#"{"data":""}"#.len()));
        let body = format!(r#"{{"data":{data}}}"#);
        assert_eq!(body.len(), max_message);
        let raw = RawValue::from_string(data).unwrap();
        let frame = message_frame(Some(&room), &raw);
        assert!(
            frame.len() <= max_message + MAX_ENVELOPE_BYTES,
            "{}",
            frame.len()
        );
        // A client's publish of max_message bytes: the frame is no longer.
        let escaped = serde_json::to_string(room.as_str()).unwrap();
        let head = format!(r#"{{"type":"publish","room":{escaped},"data":""#);
        let publish = format!("{head}{}\"}}", "y".repeat(max_message - head.len() - 2));
        assert_eq!(publish.len(), max_message);
        match parse_client_text(publish.into()) {
            Ok(ClientFrame::Publish { room, data }) => {
                assert!(message_frame(Some(&room), &data).len() <= max_message);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_smallest_safe_cap_holds_a_burst_of_the_largest_frames() {
        for max_message in [1, 1000, 64 << 10, 1 << 20] {
            let cap = EvictionPolicy::min_outbound_bytes(max_message);
            let largest = EvictionPolicy::cost_of(max_message + MAX_ENVELOPE_BYTES);
            let mut b = OutboundBudget::default();
            for _ in 0..OUTBOUND_HEADROOM_MESSAGES {
                assert!(b.try_charge(largest, cap, || 0), "{max_message}");
            }
            // It is a bound, not a blank cheque: one more is refused.
            assert!(!b.try_charge(largest, cap, || 0));
        }
        // The default (64 KiB messages, 1 MiB cap) is safe.
        assert!(EvictionPolicy::min_outbound_bytes(64 << 10) <= 1 << 20);
        assert_eq!(EvictionPolicy::min_outbound_bytes(usize::MAX), usize::MAX);
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
