//! Sequence tracking: the last `seq` heard from every other origin, so that
//! a node skips its own entries, drops repeats (an `XADD` retried after a
//! lost reply) and counts a jump as a gap of exactly `seq - last - 1` lost
//! messages, even when the stream was trimmed past what was missed.
//!
//! With history on, this node's own entries are not skipped: the node
//! delivers them from the stream, like everyone's. Their repeats are
//! dropped by the same rule, on this node's own sequence: the highest own
//! `seq` delivered here, by the stream or by the fallback that delivers
//! locally when the link is lost ([`SeqTracker::claim_own`]), so an
//! entry delivered by the fallback and then found in the stream (the
//! script ran, its reply was lost) is delivered once.

use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Origins whose sequence is tracked at once; the least recently heard is
/// forgotten beyond it.
pub const MAX_ORIGINS: usize = 1024;

/// An origin not heard from for this long is forgotten.
pub const ORIGIN_TTL: Duration = Duration::from_secs(600);

/// What [`SeqTracker::observe`] concluded about an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Published by this node: already delivered locally.
    Own,
    /// New: deliver it. `lost` messages from the same origin were skipped
    /// since the last one seen (a gap in its sequence).
    New {
        /// How many sequence numbers were missed just before this one.
        lost: u64,
    },
    /// Seen already (a resent batch): drop it.
    Duplicate,
}

/// The last sequence number seen from every other origin, in bounded
/// memory: at most [`MAX_ORIGINS`], each forgotten after [`ORIGIN_TTL`]
/// without news *while linked*.
///
/// Origins age only while the link is up ([`pause`](Self::pause) /
/// [`resume`](Self::resume)): a node cannot hear anyone while it is cut
/// off, and forgetting an origin then would make the gap it missed
/// uncountable once it is back.
#[derive(Debug)]
pub struct SeqTracker {
    own: String,
    last: HashMap<String, (u64, Instant)>,
    max_origins: usize,
    paused_since: Option<Instant>,
    /// The highest own `seq` delivered here (see the module docs).
    own_delivered: u64,
}

impl SeqTracker {
    /// A tracker for the node whose origin id is `own`.
    pub fn new(own: impl Into<String>, max_origins: usize) -> Self {
        SeqTracker {
            own: own.into(),
            last: HashMap::new(),
            max_origins: max_origins.max(1),
            paused_since: None,
            own_delivered: 0,
        }
    }

    /// The link went down at `now`: origins stop aging (no sweeping).
    pub fn pause(&mut self, now: Instant) {
        if self.paused_since.is_none() {
            self.paused_since = Some(now);
        }
    }

    /// The link is back at `now`: every origin's age resumes from where it
    /// was when the link went down.
    pub fn resume(&mut self, now: Instant) {
        let Some(since) = self.paused_since.take() else {
            return;
        };
        let offline = now.saturating_duration_since(since);
        for (_, heard) in self.last.values_mut() {
            if let Some(shifted) = heard.checked_add(offline) {
                *heard = shifted;
            }
        }
    }

    /// Classifies entry `seq` from `origin`, read at `now`.
    pub fn observe(&mut self, origin: &str, seq: u64, now: Instant) -> Seen {
        if origin == self.own {
            return Seen::Own;
        }
        if let Some((last, heard)) = self.last.get_mut(origin) {
            if seq <= *last {
                return Seen::Duplicate;
            }
            let lost = seq - *last - 1;
            *last = seq;
            *heard = now;
            return Seen::New { lost };
        }
        // A first entry from an origin: nothing before it is known to be
        // missing (it may have started before we did).
        if self.last.len() >= self.max_origins {
            self.sweep(now);
        }
        if self.last.len() >= self.max_origins {
            if let Some(oldest) = self
                .last
                .iter()
                .min_by_key(|(_, (_, heard))| *heard)
                .map(|(k, _)| k.clone())
            {
                self.last.remove(&oldest);
            }
        }
        self.last.insert(origin.to_owned(), (seq, now));
        Seen::New { lost: 0 }
    }

    /// Classifies a positioned entry (with history on, any entry): as
    /// [`observe`](Self::observe), except
    /// that this node's own are new unless one at or past `seq` was
    /// delivered here already.
    pub fn observe_positioned(&mut self, origin: &str, seq: u64, now: Instant) -> Seen {
        if origin != self.own {
            return self.observe(origin, seq, now);
        }
        if seq <= self.own_delivered {
            return Seen::Duplicate;
        }
        self.own_delivered = seq;
        Seen::New { lost: 0 }
    }

    /// Whether this node's own entry `seq` is still to be delivered here by
    /// the fallback (its copy in the stream was not delivered already: the
    /// script ran and the reader was faster than its reply). If so, it is
    /// marked delivered: its copy in the stream (and every older one) is
    /// then a repeat.
    pub fn claim_own(&mut self, seq: u64) -> bool {
        if seq <= self.own_delivered {
            return false;
        }
        self.own_delivered = seq;
        true
    }

    /// The highest own `seq` delivered here, by the stream or the fallback.
    pub fn own_delivered(&self) -> u64 {
        self.own_delivered
    }

    /// Forgets origins not heard from for [`ORIGIN_TTL`] of linked time;
    /// does nothing while paused.
    pub fn sweep(&mut self, now: Instant) {
        if self.paused_since.is_some() {
            return;
        }
        self.last
            .retain(|_, (_, heard)| now.saturating_duration_since(*heard) < ORIGIN_TTL);
    }

    /// Origins tracked now.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True if no origin is tracked.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_skips_own_and_repeats_and_counts_gaps_exactly() {
        let t0 = Instant::now();
        let mut t = SeqTracker::new("me", 10);
        assert_eq!(t.observe("me", 1, t0), Seen::Own);
        assert_eq!(t.observe("a", 5, t0), Seen::New { lost: 0 });
        assert_eq!(t.observe("a", 6, t0), Seen::New { lost: 0 });
        assert_eq!(t.observe("a", 6, t0), Seen::Duplicate);
        assert_eq!(t.observe("a", 4, t0), Seen::Duplicate);
        assert_eq!(t.observe("a", 10, t0), Seen::New { lost: 3 });
        assert_eq!(t.observe("b", 1, t0), Seen::New { lost: 0 });
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn own_positioned_entries_are_delivered_once_whichever_way_comes_first() {
        let t0 = Instant::now();
        let mut t = SeqTracker::new("me", 10);
        assert_eq!(t.observe_positioned("me", 1, t0), Seen::New { lost: 0 });
        assert_eq!(t.observe_positioned("me", 1, t0), Seen::Duplicate);
        // The link was lost with 2 and 3 unconfirmed: delivered locally;
        // the script had run for 2, so it is in the stream too.
        assert!(t.claim_own(2));
        assert!(t.claim_own(3));
        assert_eq!(t.observe_positioned("me", 2, t0), Seen::Duplicate);
        // Read back before the link was lost: not delivered again.
        assert_eq!(t.observe_positioned("me", 4, t0), Seen::New { lost: 0 });
        assert!(!t.claim_own(4));
        assert!(!t.claim_own(3));
        assert_eq!(t.observe_positioned("me", 5, t0), Seen::New { lost: 0 });
        // Plain own entries are still skipped, others' tracked as before.
        assert_eq!(t.observe("me", 6, t0), Seen::Own);
        assert_eq!(t.observe_positioned("a", 7, t0), Seen::New { lost: 0 });
        assert_eq!(t.observe("a", 7, t0), Seen::Duplicate);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_tracker_is_bounded_and_forgets_silent_origins() {
        let t0 = Instant::now();
        let mut t = SeqTracker::new("me", 2);
        t.observe("a", 1, t0);
        t.observe("b", 1, t0 + Duration::from_secs(1));
        // Full: the least recently heard ("a") makes room.
        t.observe("c", 1, t0 + Duration::from_secs(2));
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.observe("a", 9, t0 + Duration::from_secs(3)),
            Seen::New { lost: 0 },
            "a forgotten origin starts afresh"
        );
        t.sweep(t0 + Duration::from_secs(2) + ORIGIN_TTL);
        assert_eq!(t.len(), 1, "only a, heard at 3 s, is left");
    }

    #[test]
    fn origins_do_not_age_while_the_link_is_down() {
        let t0 = Instant::now();
        let mut t = SeqTracker::new("me", 10);
        t.observe("a", 5, t0);
        t.pause(t0 + Duration::from_secs(1));
        // Down for twice the TTL: nothing is forgotten.
        t.sweep(t0 + ORIGIN_TTL * 2);
        assert_eq!(t.len(), 1);
        t.resume(t0 + ORIGIN_TTL * 2);
        t.sweep(t0 + ORIGIN_TTL * 2 + Duration::from_secs(1));
        assert_eq!(t.len(), 1, "only 2 s of linked time have passed");
        assert_eq!(
            t.observe("a", 9, t0 + ORIGIN_TTL * 2 + Duration::from_secs(2)),
            Seen::New { lost: 3 },
            "the gap is still counted"
        );
        // Linked time does age it.
        t.sweep(t0 + ORIGIN_TTL * 3 + Duration::from_secs(3));
        assert!(t.is_empty());
    }

    #[test]
    fn remote_sequence_numbers_cannot_overflow() {
        let t0 = Instant::now();
        let mut t = SeqTracker::new("me", 10);
        t.observe("a", 1, t0);
        assert_eq!(
            t.observe("a", u64::MAX, t0),
            Seen::New { lost: u64::MAX - 2 }
        );
        assert_eq!(t.observe("a", u64::MAX, t0), Seen::Duplicate);
    }
}
