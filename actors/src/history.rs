//! Per-room message history: what lets a client that reconnects get what it
//! missed, exactly once and in order, or be told that it cannot.
//!
//! [`History`] is a plain state machine (it takes `now`, does no I/O), owned
//! by the hub's router, which is the one place every room broadcast passes
//! through: [`History::append`] gives each one the room's next **offset**
//! and keeps its stamped frame. Offsets increase by one per room within
//! the room's **epoch**, the string `"{run}-{generation}"`:
//! - `run` is drawn when the process's history is created (a node restart,
//!   or a new `Network` in the same process, gets a new one), because the
//!   history is in memory and does not survive it;
//! - `generation` is new each time a room's record is created, so a room
//!   whose whole history was dropped (expired, or evicted for bytes) and
//!   that starts again from offset 1 has a new epoch too.
//!
//! A client that holds `epoch:offset` ([`Position`]) asks
//! [`History::since`]; the answer is all or nothing ([`Since`]): every
//! message after the offset, or [`Since::Incomplete`] when the epoch differs
//! or the oldest kept message is past `offset + 1`. Nothing is ever half
//! replayed: a client either has every message, or knows it must reload.
//!
//! **Bounds.** Each room keeps at most `size` messages, none older than
//! `ttl`, and the whole node at most `max_bytes`, counting each entry's
//! frame plus [`ENTRY_OVERHEAD`] and each room's record as
//! [`ROOM_OVERHEAD`], so that 10,000 rooms of small messages stay bounded
//! too. When over bytes, the oldest entry of the node goes first, whatever
//! its room: an age-ordered queue of every entry (entries trimmed by `size`
//! leave stale slots in it, which are skipped and compacted away once they
//! outnumber the live ones). A room whose last entry goes is forgotten, and
//! with it its offset counter (hence the new generation). The one entry
//! never evicted for bytes is the one just appended, so the bound is
//! `max_bytes` plus at most one message.
//!
//! **Across nodes.** With history on in a cluster, Redis is the sequencer
//! (the `happynet` crate's `realtime::cluster::sequencer`): a Lua script
//! gives each room broadcast its room's next offset in the room's epoch
//! (a record in Redis, created with a node's candidate epoch when missing,
//! so a flush or an expiry is a new epoch) and appends it to the cluster's
//! one stream in the same atomic step, so stream order is offset order
//! for every room on every node. Every node, the origin too, delivers those
//! messages from the stream, in stream order, and the router keeps each
//! with [`History::insert`] at the position Redis gave it: the same
//! message has the same `epoch:offset` on every node, and a client may
//! recover on any of them. A node that starts reads the stream's
//! positioned entries back into its history (not delivered) before it
//! answers recoveries, so a restarted node recovers too.
//!
//! The guarantee: every position a client holds was issued once, by
//! Redis, and every node that keeps it keeps the same message there. When
//! the link to Redis is down, local delivery does not wait: the node
//! stamps the broadcast itself ([`History::append`], in an epoch of its
//! own, never continuing Redis's), so a recovery across the outage, on any
//! node, is `complete:false` — never a wrong replay. Likewise, a node
//! that missed some of a room's offsets (its link was down, the stream was
//! trimmed) drops what it kept of the room before the gap
//! ([`History::insert`]), so what it replays has no hole.

use crate::rooms::RoomName;
use bytestring::ByteString;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Bytes counted for one kept message besides its frame: the entry in its
/// room's ring (offset, instant, the frame's handle) and its slot in the
/// age-ordered queue, with allocator slack.
pub const ENTRY_OVERHEAD: usize = 96;

/// Bytes counted for one room's record besides its entries: the map slot,
/// its name, its epoch string and ring.
pub const ROOM_OVERHEAD: usize = 160;

/// The most messages a room may keep (`size`); more would make one
/// recovery a burst no client's outbound budget holds.
pub const MAX_SIZE: usize = 100_000;

/// The smallest `max_bytes`: a few of the largest messages.
pub const MIN_MAX_BYTES: usize = 1 << 20;

/// History's limits (`network.websocket.history`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Messages kept per room.
    pub size: usize,
    /// How long a message is kept.
    pub ttl: Duration,
    /// Bytes kept for the whole node (see the module docs for what counts).
    pub max_bytes: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            size: 100,
            ttl: Duration::from_secs(300),
            max_bytes: 64 << 20,
        }
    }
}

/// Why a [`HistoryConfig`] was refused: the field and what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryConfigError {
    field: &'static str,
    requirement: String,
}

impl HistoryConfigError {
    /// The offending field (`size`, `ttl`, `max_bytes`).
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What the field must be.
    pub fn requirement(&self) -> String {
        self.requirement.clone()
    }
}

impl fmt::Display for HistoryConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field, self.requirement)
    }
}

impl std::error::Error for HistoryConfigError {}

impl HistoryConfig {
    /// The one judge of these settings; the config reports an error under
    /// its own key.
    pub fn validate(&self) -> Result<(), HistoryConfigError> {
        let err = |field, requirement: String| Err(HistoryConfigError { field, requirement });
        if !(1..=MAX_SIZE).contains(&self.size) {
            return err("size", format!("must be between 1 and {MAX_SIZE}"));
        }
        if self.ttl.is_zero() {
            return err("ttl", "must be > 0".to_owned());
        }
        if self.max_bytes < MIN_MAX_BYTES {
            return err("max_bytes", format!("must be >= {MIN_MAX_BYTES}"));
        }
        Ok(())
    }
}

/// Where a client is in a room's history: `epoch:offset` on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The room's epoch when the offset was given.
    pub epoch: Arc<str>,
    /// The offset of the last message the client has.
    pub offset: u64,
}

/// Why a `since` could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPosition(String);

impl fmt::Display for BadPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "since must be <epoch>:<offset>: {}", self.0)
    }
}

impl std::error::Error for BadPosition {}

/// The longest epoch accepted from a client (ours are ~30 bytes).
const MAX_EPOCH_BYTES: usize = 64;

impl Position {
    /// Parses `epoch:offset` (as the server sent it: the epoch is printable
    /// ASCII without `:`, the offset a decimal number).
    pub fn parse(s: &str) -> Result<Position, BadPosition> {
        let (epoch, offset) = s
            .rsplit_once(':')
            .ok_or_else(|| BadPosition("no `:`".into()))?;
        if epoch.is_empty() || epoch.len() > MAX_EPOCH_BYTES {
            return Err(BadPosition(format!(
                "the epoch must be 1 to {MAX_EPOCH_BYTES} bytes"
            )));
        }
        if !epoch.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(BadPosition(
                "the epoch must be printable ASCII without `:`".into(),
            ));
        }
        let offset = offset
            .parse::<u64>()
            .map_err(|e| BadPosition(format!("the offset is not a number: {e}")))?;
        Ok(Position {
            epoch: epoch.into(),
            offset,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

/// What a joining client asks to recover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recover {
    /// Every message after this position.
    Since(Position),
    /// The room's last message, if it has one (`"recover":"last"`).
    Last,
}

/// One kept message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Its offset in its room's epoch.
    pub offset: u64,
    /// The frame protocol clients receive for it (`{"type":"message",…}`).
    pub frame: ByteString,
}

/// The answer to [`History::since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// Every message after the position, oldest first (maybe none), and
    /// the room's position after them (`None`: the room has no history).
    Complete {
        /// The messages, in offset order.
        entries: Vec<HistoryEntry>,
        /// The room's last position (the last entry's, or the position
        /// asked for when nothing followed it).
        last: Option<Position>,
    },
    /// The history does not cover the gap, or the epoch is not the room's:
    /// nothing is replayed. `last` is the room's position now, if any.
    Incomplete {
        /// The room's last position.
        last: Option<Position>,
    },
}

struct Entry {
    offset: u64,
    frame: ByteString,
}

impl Entry {
    fn to_history(&self) -> HistoryEntry {
        HistoryEntry {
            offset: self.offset,
            frame: self.frame.clone(),
        }
    }
}

struct Room {
    /// Unique per record, so a recreated room's epoch differs.
    generation: u64,
    epoch: Arc<str>,
    /// Whether this history issued the epoch ([`History::append`]) or was
    /// given it ([`History::insert`]): a local offset must never continue
    /// an epoch someone else numbers.
    local: bool,
    /// The offset the next message gets.
    next: u64,
    ring: VecDeque<Entry>,
}

impl Room {
    /// The entries after `since`, oldest first, if this record covers
    /// everything after it: the same epoch, a position it has issued, and
    /// nothing after it trimmed away. `None` otherwise: all or nothing.
    fn after(&self, since: &Position) -> Option<impl Iterator<Item = HistoryEntry> + '_> {
        let oldest = self.ring.front().map_or(self.next, |e| e.offset);
        if *self.epoch != *since.epoch
            || since.offset >= self.next
            || oldest > since.offset.saturating_add(1)
        {
            return None;
        }
        let skip = (since.offset + 1 - oldest) as usize;
        Some(self.ring.iter().skip(skip).map(Entry::to_history))
    }

    fn last(&self) -> Option<Position> {
        (self.next > 1).then(|| Position {
            epoch: self.epoch.clone(),
            offset: self.next - 1,
        })
    }
}

/// A slot in the age-ordered queue: the entry `offset` of the room record
/// `generation` of `room`, appended at `at`.
struct Aged {
    room: RoomName,
    generation: u64,
    offset: u64,
    at: Instant,
}

/// Makes `run` differ between two histories of one process, even created
/// in the same clock tick.
static RUNS: AtomicU64 = AtomicU64::new(0);

fn new_run() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:x}{:04x}",
        nanos ^ (u64::from(std::process::id()) << 40),
        n & 0xffff
    )
}

/// The node's history of every room. See the module docs.
pub struct History {
    config: HistoryConfig,
    run: String,
    next_generation: u64,
    rooms: HashMap<RoomName, Room>,
    /// Every kept entry, oldest first, plus stale slots (see the docs).
    aged: VecDeque<Aged>,
    /// Entries kept (the live slots of `aged`).
    entries: usize,
    /// What is counted against `max_bytes`.
    bytes: usize,
}

fn entry_cost(frame: &ByteString) -> usize {
    frame.len() + ENTRY_OVERHEAD
}

impl History {
    /// An empty history with a new run epoch.
    pub fn new(config: HistoryConfig) -> History {
        History {
            config,
            run: new_run(),
            next_generation: 1,
            rooms: HashMap::new(),
            aged: VecDeque::new(),
            entries: 0,
            bytes: 0,
        }
    }

    /// The limits it keeps to.
    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// Bytes counted against `max_bytes` now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Rooms with a history now.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Messages kept now, over every room.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Gives the next message of `room` its offset, keeps the frame
    /// `frame_for` builds for that position, and returns both. Expired and
    /// over-budget entries go first (see the module docs).
    pub fn append(
        &mut self,
        room: &RoomName,
        now: Instant,
        frame_for: impl FnOnce(&Position) -> ByteString,
    ) -> (Position, ByteString) {
        self.expire(now);
        if self.rooms.get(room).is_some_and(|r| !r.local) {
            // Another epoch's numbering cannot be continued here.
            self.forget(room);
        }
        if !self.rooms.contains_key(room) {
            let generation = self.next_generation;
            let epoch = format!("{}-{generation}", self.run).into();
            self.new_record(room, epoch, 1, true);
        }
        let Some(record) = self.rooms.get(room) else {
            unreachable!("inserted above")
        };
        let position = Position {
            epoch: record.epoch.clone(),
            offset: record.next,
        };
        let frame = frame_for(&position);
        self.keep(room, position.offset, frame.clone(), now);
        (position, frame)
    }

    /// Keeps a message someone else positioned (the cluster's sequencer):
    /// `at` in its room. Another epoch than the room's restarts the room in
    /// that epoch; an offset past the next one leaves a gap the kept
    /// entries cannot be replayed across, so they are dropped and the room
    /// starts again from this one. Returns the frame `frame_for` built, or
    /// `None` for a position the room has already (or has gone past): a
    /// repeat, not to be delivered again.
    pub fn insert(
        &mut self,
        room: &RoomName,
        at: &Position,
        now: Instant,
        frame_for: impl FnOnce(&Position) -> ByteString,
    ) -> Option<ByteString> {
        self.expire(now);
        if at.offset == 0 {
            return None;
        }
        match self.rooms.get(room) {
            Some(r) if r.epoch == at.epoch && at.offset < r.next => return None,
            Some(r) if r.epoch == at.epoch && at.offset == r.next => {}
            Some(_) => self.forget(room),
            None => {}
        }
        if !self.rooms.contains_key(room) {
            self.new_record(room, at.epoch.clone(), at.offset, false);
        }
        let frame = frame_for(at);
        self.keep(room, at.offset, frame.clone(), now);
        Some(frame)
    }

    /// A new, empty record for `room` in `epoch`, whose next offset is
    /// `next`.
    fn new_record(&mut self, room: &RoomName, epoch: Arc<str>, next: u64, local: bool) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.rooms.insert(
            room.clone(),
            Room {
                generation,
                epoch,
                local,
                next,
                ring: VecDeque::new(),
            },
        );
        self.bytes += ROOM_OVERHEAD;
    }

    /// Drops `room`'s record and entries (their slots in `aged` go stale).
    fn forget(&mut self, room: &RoomName) {
        if let Some(old) = self.rooms.remove(room) {
            let freed: usize = old.ring.iter().map(|e| entry_cost(&e.frame)).sum();
            self.bytes -= freed + ROOM_OVERHEAD;
            self.entries -= old.ring.len();
        }
    }

    /// Keeps `frame` as the message at `offset` of `room`'s record (which
    /// exists, and whose next offset it is), then trims to the bounds.
    fn keep(&mut self, room: &RoomName, offset: u64, frame: ByteString, now: Instant) {
        let size = self.config.size;
        let Some(record) = self.rooms.get_mut(room) else {
            return;
        };
        record.next = offset + 1;
        self.bytes += entry_cost(&frame);
        self.entries += 1;
        record.ring.push_back(Entry { offset, frame });
        self.aged.push_back(Aged {
            room: room.clone(),
            generation: record.generation,
            offset,
            at: now,
        });
        if record.ring.len() > size {
            // Its slot in `aged` goes stale; skipped when reached.
            if let Some(old) = record.ring.pop_front() {
                self.bytes -= entry_cost(&old.frame);
                self.entries -= 1;
            }
        }
        while self.bytes > self.config.max_bytes && self.evict_oldest(1) {}
        self.compact();
    }

    /// Drops every entry older than `ttl` (and the rooms left empty).
    pub fn expire(&mut self, now: Instant) {
        while let Some(front) = self.aged.front() {
            if now.saturating_duration_since(front.at) < self.config.ttl {
                break;
            }
            self.pop_aged();
        }
        self.compact();
    }

    /// Evicts the oldest live entry, unless fewer than `keep` entries would
    /// be left. Returns whether one was evicted.
    fn evict_oldest(&mut self, keep: usize) -> bool {
        while self.entries > keep {
            if self.pop_aged() {
                return true;
            }
        }
        false
    }

    /// Pops the front slot of `aged`, and its entry if the slot is live.
    /// Returns whether an entry went.
    fn pop_aged(&mut self) -> bool {
        let Some(slot) = self.aged.pop_front() else {
            return false;
        };
        let Some(record) = self.rooms.get_mut(&slot.room) else {
            return false;
        };
        let live = record.generation == slot.generation
            && record.ring.front().is_some_and(|e| e.offset == slot.offset);
        if !live {
            return false;
        }
        if let Some(old) = record.ring.pop_front() {
            self.bytes -= entry_cost(&old.frame);
            self.entries -= 1;
        }
        if record.ring.is_empty() {
            self.rooms.remove(&slot.room);
            self.bytes -= ROOM_OVERHEAD;
        }
        true
    }

    /// Rebuilds `aged` without its stale slots once they outnumber the
    /// live ones, so it stays within twice the entries kept.
    fn compact(&mut self) {
        if self.aged.len() <= 2 * self.entries + 64 {
            return;
        }
        let rooms = &self.rooms;
        self.aged.retain(|slot| {
            rooms.get(&slot.room).is_some_and(|r| {
                r.generation == slot.generation
                    && r.ring.front().is_some_and(|e| e.offset <= slot.offset)
            })
        });
    }

    /// Every message of `room` after `since`, or [`Since::Incomplete`]: all
    /// or nothing. At most `limit` entries: more than that missed is
    /// incomplete too (a page of the HTTP route says so itself).
    pub fn since(&self, room: &RoomName, since: &Position, limit: usize) -> Since {
        let Some(record) = self.rooms.get(room) else {
            return Since::Incomplete { last: None };
        };
        let last = record.last();
        let Some(after) = record.after(since) else {
            return Since::Incomplete { last };
        };
        let missed = record.next - 1 - since.offset;
        if missed > limit as u64 {
            return Since::Incomplete { last };
        }
        let entries = after.collect();
        Since::Complete { entries, last }
    }

    /// The last `n` messages of `room`, oldest first, and its position.
    pub fn last(&self, room: &RoomName, n: usize) -> (Vec<HistoryEntry>, Option<Position>) {
        let Some(record) = self.rooms.get(room) else {
            return (Vec::new(), None);
        };
        let skip = record.ring.len().saturating_sub(n);
        let entries = record
            .ring
            .iter()
            .skip(skip)
            .map(Entry::to_history)
            .collect();
        (entries, record.last())
    }

    /// The first `limit` messages of `room` after `since` (the page the
    /// HTTP route and `Network::history` return), with whether the history
    /// covers the gap: `complete` is false when the epoch differs or the
    /// oldest kept message is past `since + 1`, and then no entry is given.
    pub fn page(&self, room: &RoomName, since: &Position, limit: usize) -> Page {
        let Some(record) = self.rooms.get(room) else {
            return Page::default();
        };
        let last = record.last();
        let Some(after) = record.after(since) else {
            return Page {
                complete: false,
                entries: Vec::new(),
                last,
            };
        };
        let entries = after.take(limit).collect();
        Page {
            complete: true,
            entries,
            last,
        }
    }
}

/// A page of a room's history (see [`History::page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// Whether the history covers everything after the position asked for.
    pub complete: bool,
    /// Up to `limit` messages, oldest first.
    pub entries: Vec<HistoryEntry>,
    /// The room's last position.
    pub last: Option<Position>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn config(size: usize) -> HistoryConfig {
        HistoryConfig {
            size,
            ttl: Duration::from_secs(60),
            max_bytes: 64 << 20,
        }
    }

    fn push(h: &mut History, r: &RoomName, now: Instant, text: &str) -> Position {
        h.append(r, now, |_| ByteString::from(text.to_owned())).0
    }

    fn offsets(s: &Since) -> Option<Vec<u64>> {
        match s {
            Since::Complete { entries, .. } => Some(entries.iter().map(|e| e.offset).collect()),
            Since::Incomplete { .. } => None,
        }
    }

    #[test]
    fn offsets_increase_by_one_per_room_within_its_epoch() {
        let mut h = History::new(config(10));
        let now = Instant::now();
        let (a, b) = (room("a"), room("b"));
        let a1 = push(&mut h, &a, now, "x");
        let a2 = push(&mut h, &a, now, "y");
        let b1 = push(&mut h, &b, now, "z");
        assert_eq!((a1.offset, a2.offset, b1.offset), (1, 2, 1));
        assert_eq!(a1.epoch, a2.epoch);
        assert_ne!(a1.epoch, b1.epoch, "each room record has its generation");
    }

    #[test]
    fn the_frame_builder_sees_the_position_it_is_stamped_with() {
        let mut h = History::new(config(10));
        let r = room("a");
        let (pos, frame) = h.append(&r, Instant::now(), |p| format!("at {p}").into());
        assert_eq!(&*frame, format!("at {}:1", pos.epoch));
        assert_eq!(h.last(&r, 1).0[0].frame, frame);
    }

    #[test]
    fn since_returns_everything_after_the_offset_in_order() {
        let mut h = History::new(config(10));
        let now = Instant::now();
        let r = room("a");
        let first = push(&mut h, &r, now, "m1");
        for i in 2..=5 {
            push(&mut h, &r, now, &format!("m{i}"));
        }
        let s = h.since(&r, &first, 100);
        assert_eq!(offsets(&s), Some(vec![2, 3, 4, 5]));
        let Since::Complete { entries, last } = s else {
            unreachable!()
        };
        assert_eq!(entries[0].frame, "m2");
        assert_eq!(last.unwrap().offset, 5);
        // From before the first message: all of them.
        let zero = Position {
            epoch: first.epoch.clone(),
            offset: 0,
        };
        assert_eq!(offsets(&h.since(&r, &zero, 100)), Some(vec![1, 2, 3, 4, 5]));
        // Up to date: complete, nothing to replay.
        let up = Position {
            epoch: first.epoch.clone(),
            offset: 5,
        };
        assert_eq!(offsets(&h.since(&r, &up, 100)), Some(vec![]));
    }

    #[test]
    fn another_epoch_or_a_future_offset_is_incomplete() {
        let mut h = History::new(config(10));
        let r = room("a");
        let p = push(&mut h, &r, Instant::now(), "m");
        let other = Position {
            epoch: "other-1".into(),
            offset: 0,
        };
        assert_eq!(
            h.since(&r, &other, 100),
            Since::Incomplete {
                last: Some(p.clone())
            }
        );
        let future = Position {
            epoch: p.epoch.clone(),
            offset: 2,
        };
        assert_eq!(offsets(&h.since(&r, &future, 100)), None);
        // A room with no history at all: incomplete, nothing known.
        assert_eq!(
            h.since(&room("b"), &p, 100),
            Since::Incomplete { last: None }
        );
    }

    #[test]
    fn a_new_history_has_a_new_run_epoch() {
        let r = room("a");
        let a = push(&mut History::new(config(10)), &r, Instant::now(), "m");
        let b = push(&mut History::new(config(10)), &r, Instant::now(), "m");
        assert_ne!(a.epoch, b.epoch, "a restart must change the epoch");
    }

    #[test]
    fn a_gap_longer_than_size_is_incomplete_with_nothing_half_replayed() {
        let mut h = History::new(config(3));
        let now = Instant::now();
        let r = room("a");
        let first = push(&mut h, &r, now, "m1");
        for _ in 0..3 {
            push(&mut h, &r, now, "m");
        }
        // Kept: 2, 3, 4. Since 1 is covered; since 0 is not.
        assert_eq!(offsets(&h.since(&r, &first, 100)), Some(vec![2, 3, 4]));
        push(&mut h, &r, now, "m5");
        assert_eq!(offsets(&h.since(&r, &first, 100)), None);
        assert_eq!(h.entries(), 3);
    }

    #[test]
    fn more_missed_than_the_limit_is_incomplete() {
        let mut h = History::new(config(10));
        let r = room("a");
        let first = push(&mut h, &r, Instant::now(), "m");
        for _ in 0..5 {
            push(&mut h, &r, Instant::now(), "m");
        }
        assert_eq!(offsets(&h.since(&r, &first, 4)), None);
        assert_eq!(offsets(&h.since(&r, &first, 5)).map(|v| v.len()), Some(5));
    }

    #[test]
    fn entries_expire_after_ttl_and_an_emptied_room_gets_a_new_epoch() {
        let mut h = History::new(config(10));
        let t0 = Instant::now();
        let r = room("a");
        let p1 = push(&mut h, &r, t0, "old");
        push(&mut h, &r, t0 + Duration::from_secs(30), "newer");
        h.expire(t0 + Duration::from_secs(60));
        // The first is gone: since 0 is incomplete, since 1 complete.
        let zero = Position {
            epoch: p1.epoch.clone(),
            offset: 0,
        };
        assert_eq!(offsets(&h.since(&r, &zero, 100)), None);
        assert_eq!(offsets(&h.since(&r, &p1, 100)), Some(vec![2]));
        h.expire(t0 + Duration::from_secs(90));
        assert_eq!(h.rooms(), 0);
        assert_eq!(h.bytes(), 0);
        let again = push(&mut h, &r, t0 + Duration::from_secs(91), "again");
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, p1.epoch, "offsets restarted: a new epoch");
        assert_eq!(offsets(&h.since(&r, &p1, 100)), None);
    }

    #[test]
    fn over_bytes_the_oldest_entry_of_the_node_goes_first() {
        let frame = "x".repeat(1000);
        let cost = 1000 + ENTRY_OVERHEAD;
        let mut h = History::new(HistoryConfig {
            size: 10_000,
            ttl: Duration::from_secs(60),
            max_bytes: MIN_MAX_BYTES,
        });
        let now = Instant::now();
        let (a, b) = (room("a"), room("b"));
        let a1 = push(&mut h, &a, now, &frame);
        let fits = (MIN_MAX_BYTES - 2 * ROOM_OVERHEAD) / cost;
        for i in 1..fits {
            let r = if i % 2 == 0 { &a } else { &b };
            push(&mut h, r, now, &frame);
        }
        assert_eq!(h.entries(), fits);
        assert!(h.bytes() <= MIN_MAX_BYTES);
        // One more: a's first (the node's oldest) goes, nothing else.
        push(&mut h, &b, now, &frame);
        assert_eq!(h.entries(), fits);
        assert!(h.bytes() <= MIN_MAX_BYTES);
        assert_eq!(offsets(&h.since(&a, &a1, 1000)).map(|v| v[0]), Some(2));
        let a0 = Position {
            epoch: a1.epoch.clone(),
            offset: 0,
        };
        assert_eq!(offsets(&h.since(&a, &a0, 1000)), None);
    }

    #[test]
    fn ten_thousand_rooms_times_size_stay_within_max_bytes() {
        let max_bytes = 8 << 20;
        let mut h = History::new(HistoryConfig {
            size: 100,
            ttl: Duration::from_secs(60),
            max_bytes,
        });
        let now = Instant::now();
        let rooms: Vec<RoomName> = (0..10_000).map(|i| room(&format!("room-{i}"))).collect();
        let frame = "y".repeat(64);
        for round in 0..100 {
            for r in &rooms {
                push(&mut h, r, now, &frame);
                debug_assert!(h.bytes() <= max_bytes, "round {round}");
            }
            assert!(h.bytes() <= max_bytes, "round {round}: {}", h.bytes());
            // The age queue stays within twice what is kept.
            assert!(h.aged.len() <= 2 * h.entries() + 64);
        }
        // What is kept is the newest: the most recent room is complete
        // from some recent offset, and the accounting matches a recount.
        let recount: usize = h
            .rooms
            .values()
            .map(|r| ROOM_OVERHEAD + r.ring.iter().map(|e| entry_cost(&e.frame)).sum::<usize>())
            .sum();
        assert_eq!(recount, h.bytes());
        assert!(h.bytes() > max_bytes - 2 * (64 + ENTRY_OVERHEAD + ROOM_OVERHEAD));
        let entries: usize = h.rooms.values().map(|r| r.ring.len()).sum();
        assert_eq!(entries, h.entries());
    }

    #[test]
    fn size_trimming_leaves_stale_slots_that_compaction_removes() {
        let mut h = History::new(config(2));
        let r = room("a");
        for _ in 0..10_000 {
            push(&mut h, &r, Instant::now(), "m");
        }
        assert_eq!(h.entries(), 2);
        assert!(h.aged.len() <= 2 * 2 + 64, "{}", h.aged.len());
        assert_eq!(h.bytes(), ROOM_OVERHEAD + 2 * (1 + ENTRY_OVERHEAD));
    }

    #[test]
    fn pages_are_limited_and_say_whether_the_gap_is_covered() {
        let mut h = History::new(config(10));
        let r = room("a");
        let first = push(&mut h, &r, Instant::now(), "m");
        for _ in 0..5 {
            push(&mut h, &r, Instant::now(), "m");
        }
        let zero = Position {
            epoch: first.epoch.clone(),
            offset: 0,
        };
        let page = h.page(&r, &zero, 4);
        assert!(page.complete);
        assert_eq!(
            page.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(page.last.as_ref().map(|p| p.offset), Some(6));
        let other = Position {
            epoch: "nope-1".into(),
            offset: 0,
        };
        let page = h.page(&r, &other, 4);
        assert!(!page.complete && page.entries.is_empty());
        let (last, pos) = h.last(&r, 2);
        assert_eq!(
            last.iter().map(|e| e.offset).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert_eq!(pos.unwrap().offset, 6);
    }

    fn at(epoch: &str, offset: u64) -> Position {
        Position {
            epoch: epoch.into(),
            offset,
        }
    }

    fn insert(h: &mut History, r: &RoomName, p: &Position, text: &str) -> bool {
        h.insert(r, p, Instant::now(), |_| ByteString::from(text.to_owned()))
            .is_some()
    }

    #[test]
    fn inserted_positions_are_kept_and_replayed_like_appended_ones() {
        let mut h = History::new(config(10));
        let r = room("a");
        for offset in 41..=45 {
            assert!(insert(&mut h, &r, &at("c1-1", offset), "m"));
        }
        assert_eq!(
            offsets(&h.since(&r, &at("c1-1", 40), 100)),
            Some(vec![41, 42, 43, 44, 45])
        );
        assert_eq!(offsets(&h.since(&r, &at("c1-1", 39), 100)), None);
        assert_eq!(h.last(&r, 1).1, Some(at("c1-1", 45)));
        // The frame builder sees the position it was given.
        let frame = h.insert(&r, &at("c1-1", 46), Instant::now(), |p| {
            format!("at {p}").into()
        });
        assert_eq!(frame.as_deref(), Some("at c1-1:46"));
    }

    #[test]
    fn an_insert_at_a_position_the_room_has_is_a_repeat() {
        let mut h = History::new(config(10));
        let r = room("a");
        assert!(insert(&mut h, &r, &at("c1-1", 1), "m1"));
        assert!(insert(&mut h, &r, &at("c1-1", 2), "m2"));
        assert!(!insert(&mut h, &r, &at("c1-1", 2), "again"));
        assert!(!insert(&mut h, &r, &at("c1-1", 1), "older"));
        assert!(!insert(&mut h, &r, &at("c1-1", 0), "no such offset"));
        assert_eq!(h.entries(), 2);
        assert_eq!(h.last(&r, 1).0[0].frame, "m2");
    }

    #[test]
    fn another_epoch_restarts_the_room_in_it() {
        let mut h = History::new(config(10));
        let r = room("a");
        insert(&mut h, &r, &at("c1-1", 1), "m1");
        insert(&mut h, &r, &at("c1-1", 2), "m2");
        assert!(insert(&mut h, &r, &at("c2-7", 1), "n1"));
        assert_eq!(h.entries(), 1);
        assert_eq!(h.bytes(), ROOM_OVERHEAD + 2 + ENTRY_OVERHEAD);
        assert_eq!(offsets(&h.since(&r, &at("c1-1", 1), 100)), None);
        assert_eq!(offsets(&h.since(&r, &at("c2-7", 0), 100)), Some(vec![1]));
    }

    #[test]
    fn a_gap_in_the_offsets_drops_what_cannot_be_replayed_across_it() {
        let mut h = History::new(config(10));
        let r = room("a");
        insert(&mut h, &r, &at("c1-1", 1), "m1");
        insert(&mut h, &r, &at("c1-1", 2), "m2");
        // Offset 3 never arrived here: nothing before 4 may be replayed.
        assert!(insert(&mut h, &r, &at("c1-1", 4), "m4"));
        assert_eq!(h.entries(), 1);
        assert_eq!(offsets(&h.since(&r, &at("c1-1", 2), 100)), None);
        assert_eq!(offsets(&h.since(&r, &at("c1-1", 3), 100)), Some(vec![4]));
    }

    #[test]
    fn a_local_append_never_continues_an_inserted_epoch() {
        let mut h = History::new(config(10));
        let r = room("a");
        insert(&mut h, &r, &at("c1-1", 7), "m7");
        // The sequencer is out of reach: this node numbers on its own, in
        // an epoch of its own, so no client mistakes it for offset 8.
        let local = push(&mut h, &r, Instant::now(), "local");
        assert_ne!(&*local.epoch, "c1-1");
        assert_eq!(local.offset, 1);
        assert_eq!(offsets(&h.since(&r, &at("c1-1", 7), 100)), None);
        // And the sequencer's next message restarts the room in its epoch.
        assert!(insert(&mut h, &r, &at("c1-1", 9), "m9"));
        assert_eq!(offsets(&h.since(&r, &local, 100)), None);
        assert_eq!(offsets(&h.since(&r, &at("c1-1", 8), 100)), Some(vec![9]));
        // Bytes and entries agree with what is kept, after all of that.
        assert_eq!(h.entries(), 1);
        assert_eq!(h.bytes(), ROOM_OVERHEAD + 2 + ENTRY_OVERHEAD);
    }

    #[test]
    fn inserted_entries_expire_and_are_bounded_like_appended_ones() {
        let mut h = History::new(config(3));
        let t0 = Instant::now();
        let r = room("a");
        for offset in 1..=5 {
            h.insert(&r, &at("c1-1", offset), t0, |_| "m".into());
        }
        assert_eq!(h.entries(), 3);
        h.expire(t0 + Duration::from_secs(60));
        assert_eq!((h.rooms(), h.entries(), h.bytes()), (0, 0, 0));
    }

    #[test]
    fn positions_parse_and_print_and_bad_ones_are_errors() {
        let p = Position::parse("abc-3:42").unwrap();
        assert_eq!((&*p.epoch, p.offset), ("abc-3", 42));
        assert_eq!(p.to_string(), "abc-3:42");
        for bad in [
            "", "abc", ":1", "abc:", "abc:-1", "abc:x", "a b:1", "abc:1.5",
        ] {
            assert!(Position::parse(bad).is_err(), "{bad}");
        }
        assert!(Position::parse(&format!("{}:1", "e".repeat(65))).is_err());
    }

    #[test]
    fn the_config_is_judged_by_its_own_validate() {
        assert_eq!(HistoryConfig::default().validate(), Ok(()));
        let bad = |c: HistoryConfig| c.validate().unwrap_err().field();
        let d = HistoryConfig::default;
        assert_eq!(bad(HistoryConfig { size: 0, ..d() }), "size");
        assert_eq!(
            bad(HistoryConfig {
                size: MAX_SIZE + 1,
                ..d()
            }),
            "size"
        );
        assert_eq!(
            bad(HistoryConfig {
                ttl: Duration::ZERO,
                ..d()
            }),
            "ttl"
        );
        assert_eq!(
            bad(HistoryConfig {
                max_bytes: 1000,
                ..d()
            }),
            "max_bytes"
        );
    }
}
