//! The outbox: broadcasts for the other nodes, numbered and waiting to be
//! published, bounded in count and in bytes.
//!
//! While the link is down they wait here and are flushed in order when it
//! comes back; a full outbox drops its oldest and counts them
//! (`lost_outbound`). Each entry gets its sequence number when it is pushed,
//! so one dropped here is a gap every receiver counts.
//!
//! With history on, every local broadcast waits here *to be sequenced*
//! ([`OutEntry::sequenced`]): published by the sequencer's script (room
//! broadcasts positioned), and delivered on this node only once it is read
//! back from the stream. When
//! the link is lost, [`Outbox::unsequence`] turns every such entry into a
//! plain one (relayed later as before) and hands it to the bridge to be
//! delivered here at once; one the full outbox drops is handed back too
//! ([`Outbox::push_numbered`]), for the same reason.

use happynet_actors::{Payload, RelayTarget};
use std::collections::VecDeque;

/// A broadcast waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutEntry {
    /// Its sequence number (consecutive per origin).
    pub seq: u64,
    /// Who receives it on the other nodes.
    pub target: RelayTarget,
    /// The frame's data.
    pub payload: Payload,
    /// To be published by the sequencer (room broadcasts positioned) and
    /// delivered here only when it is read back; a plain entry is
    /// delivered here before it is queued.
    pub sequenced: bool,
}

/// The broadcasts waiting to be published, oldest first, at most `max`.
///
/// Each gets the next sequence number when it is pushed, so an entry dropped
/// here leaves a gap that every receiver counts as lost. Entries taken by
/// [`Outbox::take`] stay until [`Outbox::acked`] (they were published) or
/// [`Outbox::failed`] (they will be taken again): a pipeline that fails is
/// resent whole, and receivers drop the repeats by sequence.
#[derive(Debug)]
pub struct Outbox {
    max: usize,
    /// The payload bytes the outbox may hold: broadcasts can be large, so a
    /// count alone does not bound memory during an outage.
    max_bytes: usize,
    /// Payload bytes held now (waiting or being sent).
    bytes: usize,
    queue: VecDeque<OutEntry>,
    next_seq: u64,
    in_flight: usize,
    lost: u64,
}

/// What [`Outbox::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued, and the oldest waiting entry was dropped to make room.
    DroppedOldest,
    /// The outbox is full of entries being sent: this one was dropped.
    DroppedNew,
}

impl Outbox {
    /// An empty outbox holding at most `max` entries (at least one) and
    /// `max_bytes` payload bytes.
    pub fn new(max: usize, max_bytes: usize) -> Self {
        Outbox {
            max: max.max(1),
            max_bytes,
            bytes: 0,
            queue: VecDeque::new(),
            next_seq: 1,
            in_flight: 0,
            lost: 0,
        }
    }

    /// Queues a broadcast under the next sequence number, dropping the
    /// oldest entries not being sent while the outbox is over its count or
    /// its bytes. A broadcast that cannot fit beside what is being sent (or
    /// is larger than `max_bytes` on its own) is dropped itself.
    pub fn push(&mut self, target: RelayTarget, payload: Payload) -> Pushed {
        self.push_numbered(target, payload, false).0
    }

    /// [`push`](Self::push), for an entry to be positioned by the sequencer
    /// when `sequenced`; also returns its sequence number and every entry
    /// dropped (the new one too, if it was), so that those to be positioned
    /// can still be delivered on this node.
    pub fn push_numbered(
        &mut self,
        target: RelayTarget,
        payload: Payload,
        sequenced: bool,
    ) -> (Pushed, u64, Vec<OutEntry>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let entry = OutEntry {
            seq,
            target,
            payload,
            sequenced,
        };
        let size = entry.payload.len();
        if size > self.max_bytes {
            // It could never fit: evict nothing for it.
            self.lost += 1;
            return (Pushed::DroppedNew, seq, vec![entry]);
        }
        let mut pushed = Pushed::Queued;
        let mut dropped = Vec::new();
        while self.queue.len() >= self.max || self.bytes.saturating_add(size) > self.max_bytes {
            if self.in_flight >= self.queue.len() {
                // Only entries being sent are left: they stay.
                self.lost += 1;
                dropped.push(entry);
                return (Pushed::DroppedNew, seq, dropped);
            }
            if let Some(old) = self.queue.remove(self.in_flight) {
                self.bytes -= old.payload.len();
                dropped.push(old);
            }
            self.lost += 1;
            pushed = Pushed::DroppedOldest;
        }
        self.bytes += size;
        self.queue.push_back(entry);
        (pushed, seq, dropped)
    }

    /// Up to `n` of the oldest entries to publish now; none while a batch
    /// is already out.
    pub fn take(&mut self, n: usize) -> Vec<OutEntry> {
        if self.in_flight > 0 {
            return Vec::new();
        }
        self.in_flight = n.min(self.queue.len());
        self.queue.iter().take(self.in_flight).cloned().collect()
    }

    /// The batch from [`take`](Self::take) was published.
    pub fn acked(&mut self) -> usize {
        let n = self.in_flight;
        let sent: usize = self.queue.drain(..n).map(|e| e.payload.len()).sum();
        self.bytes -= sent;
        self.in_flight = 0;
        n
    }

    /// The batch from [`take`](Self::take) failed; it will be taken again.
    pub fn failed(&mut self) {
        self.in_flight = 0;
    }

    /// Every entry not being sent, for a last flush (the outbox is
    /// emptied of them).
    pub fn drain_waiting(&mut self) -> Vec<OutEntry> {
        let waiting: Vec<OutEntry> = self.queue.drain(self.in_flight..).collect();
        self.bytes -= waiting.iter().map(|e| e.payload.len()).sum::<usize>();
        waiting
    }

    /// Copies of the entries waiting to be positioned (being sent or not)
    /// that are older than `seq`, oldest first. A full outbox dropped own
    /// broadcast `seq`, which is delivered here at once: these must come
    /// first, here too (their copies in the stream are then repeats).
    pub fn sequenced_before(&self, seq: u64) -> Vec<OutEntry> {
        self.queue
            .iter()
            .filter(|e| e.sequenced && e.seq < seq)
            .cloned()
            .collect()
    }

    /// Turns every entry waiting to be positioned (being sent or not) into
    /// a plain one, and returns them, oldest first: the link is lost, so
    /// they are delivered here now and relayed plain later.
    pub fn unsequence(&mut self) -> Vec<OutEntry> {
        let mut turned = Vec::new();
        for entry in self.queue.iter_mut().filter(|e| e.sequenced) {
            entry.sequenced = false;
            turned.push(entry.clone());
        }
        turned
    }

    /// The sequence number of the newest entry pushed (0 before the
    /// first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Payload bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries waiting or being sent.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True if nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Entries dropped because the outbox was full, ever.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// The most entries it holds.
    pub fn max(&self) -> usize {
        self.max
    }

    /// The most payload bytes it holds.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Counts `n` entries taken out by [`drain_waiting`](Self::drain_waiting)
    /// that could not be published after all.
    pub fn count_lost(&mut self, n: u64) {
        self.lost = self.lost.saturating_add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytestring::ByteString;

    fn text(s: &str) -> Payload {
        Payload::Text(ByteString::from(s.to_owned()))
    }

    #[test]
    fn what_waits_to_be_positioned_before_a_dropped_entry_is_found_in_order() {
        let mut o = Outbox::new(4, usize::MAX);
        o.push_numbered(RelayTarget::All, text("1"), true);
        o.push_numbered(RelayTarget::All, text("2"), false);
        o.push_numbered(RelayTarget::All, text("3"), true);
        // 1..=3 are being sent; 4 waits; 5 drops 4 (the oldest not in flight).
        assert_eq!(o.take(3).len(), 3);
        assert_eq!(
            o.push_numbered(RelayTarget::All, text("4"), true).0,
            Pushed::Queued
        );
        let (pushed, _, dropped) = o.push_numbered(RelayTarget::All, text("5"), true);
        assert_eq!(pushed, Pushed::DroppedOldest);
        assert_eq!(dropped.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4]);
        let before: Vec<u64> = o.sequenced_before(4).iter().map(|e| e.seq).collect();
        assert_eq!(before, vec![1, 3], "in flight and positioned, oldest first");
        assert!(o.sequenced_before(1).is_empty());
        // Only entries being sent left: the new one is dropped, and what
        // is older is still found.
        let mut o = Outbox::new(2, usize::MAX);
        o.push_numbered(RelayTarget::All, text("1"), true);
        o.push_numbered(RelayTarget::All, text("2"), true);
        assert_eq!(o.take(2).len(), 2);
        let (pushed, seq, dropped) = o.push_numbered(RelayTarget::All, text("3"), true);
        assert_eq!((pushed, seq, dropped.len()), (Pushed::DroppedNew, 3, 1));
        let before: Vec<u64> = o.sequenced_before(3).iter().map(|e| e.seq).collect();
        assert_eq!(before, vec![1, 2]);
    }

    #[test]
    fn the_outbox_numbers_entries_and_drops_the_oldest_when_full() {
        let mut o = Outbox::new(3, usize::MAX);
        for i in 0..3 {
            assert_eq!(
                o.push(RelayTarget::All, text(&i.to_string())),
                Pushed::Queued
            );
        }
        assert_eq!(o.push(RelayTarget::All, text("3")), Pushed::DroppedOldest);
        assert_eq!(o.lost(), 1);
        let batch = o.take(10);
        let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            vec![2, 3, 4],
            "seq 1 was dropped: a gap receivers count"
        );
        // Nothing more while a batch is out; then the batch is resent whole.
        assert!(o.take(10).is_empty());
        o.failed();
        assert_eq!(o.take(2).len(), 2);
        assert_eq!(o.acked(), 2);
        assert_eq!(o.len(), 1);
        assert_eq!(o.take(10)[0].seq, 4);
    }

    #[test]
    fn the_outbox_holds_at_most_max_bytes_of_payload() {
        let mut o = Outbox::new(100, 10);
        assert_eq!(o.push(RelayTarget::All, text("aaaa")), Pushed::Queued);
        assert_eq!(o.push(RelayTarget::All, text("bbbb")), Pushed::Queued);
        assert_eq!(o.bytes(), 8);
        // 8 + 4 > 10: the oldest goes.
        assert_eq!(
            o.push(RelayTarget::All, text("cccc")),
            Pushed::DroppedOldest
        );
        assert_eq!((o.len(), o.bytes(), o.lost()), (2, 8, 1));
        // Larger than the whole bound on its own: only it is dropped.
        assert_eq!(
            o.push(RelayTarget::All, text("0123456789x")),
            Pushed::DroppedNew
        );
        assert_eq!((o.len(), o.bytes(), o.lost()), (2, 8, 2));
        // What is being sent stays, and the bytes follow acks and drains.
        assert_eq!(o.take(1).len(), 1);
        assert_eq!(
            o.push(RelayTarget::All, text("dddd")),
            Pushed::DroppedOldest
        );
        assert_eq!((o.len(), o.bytes()), (2, 8));
        assert_eq!(o.acked(), 1);
        assert_eq!(o.bytes(), 4);
        assert_eq!(o.drain_waiting().len(), 1);
        assert_eq!(o.bytes(), 0);
    }

    #[test]
    fn sequenced_entries_share_the_numbering_and_turn_plain_when_the_link_is_lost() {
        let room = happynet_actors::RoomName::new("r").unwrap();
        let mut o = Outbox::new(10, usize::MAX);
        o.push(RelayTarget::All, text("all"));
        let rooms = || RelayTarget::Rooms(vec![room.clone()]);
        let (pushed, seq, dropped) = o.push_numbered(rooms(), text("a"), true);
        assert_eq!((pushed, seq, dropped), (Pushed::Queued, 2, vec![]));
        assert_eq!(o.take(2).iter().filter(|e| e.sequenced).count(), 1);
        o.push_numbered(rooms(), text("b"), true);
        // Lost: one in flight and one waiting come back, oldest first.
        let turned = o.unsequence();
        assert_eq!(turned.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
        assert!(o.unsequence().is_empty(), "once");
        o.failed();
        assert!(o.take(10).iter().all(|e| !e.sequenced));
    }

    #[test]
    fn what_a_full_outbox_drops_is_handed_back() {
        let mut o = Outbox::new(1, usize::MAX);
        o.push_numbered(RelayTarget::All, text("a"), true);
        let (pushed, _, dropped) = o.push_numbered(RelayTarget::All, text("b"), true);
        assert_eq!(pushed, Pushed::DroppedOldest);
        assert_eq!(dropped.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(o.take(1).len(), 1);
        let (pushed, seq, dropped) = o.push_numbered(RelayTarget::All, text("c"), true);
        assert_eq!((pushed, seq), (Pushed::DroppedNew, 3));
        assert_eq!(dropped.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn a_full_outbox_never_drops_what_is_being_sent() {
        let mut o = Outbox::new(2, usize::MAX);
        o.push(RelayTarget::All, text("a"));
        o.push(RelayTarget::All, text("b"));
        assert_eq!(o.take(2).len(), 2);
        assert_eq!(o.push(RelayTarget::All, text("c")), Pushed::DroppedNew);
        assert_eq!(o.acked(), 2);
        assert!(o.is_empty());
        // Seq 3 ("c") was dropped: the next one is 4.
        o.push(RelayTarget::All, text("d"));
        assert_eq!(o.take(1)[0].seq, 4);
        assert_eq!(o.lost(), 1);
        o.failed();
        assert_eq!(o.drain_waiting().len(), 1);
        assert!(o.is_empty());
    }
}
