//! Scale-out through Redis: the [`ClusterBridge`] actor, which carries the
//! broadcasts that originate on this node to every other node and back, and
//! shares room occupancy (presence) across the cluster.
//!
//! # Design
//!
//! **One Redis Stream per cluster**, `{prefix}:broadcasts`. Each node
//! `XADD`s the broadcasts that originate locally (`MAXLEN ~
//! stream_max_len`), and reads the stream with a blocking `XREAD` on a
//! connection of its own (a blocking read on a shared, multiplexed
//! connection would stall every other command behind it). Redis work is
//! therefore one `XADD` per broadcast plus about one read per node per
//! batch: proportional to nodes, independent of connections and rooms. A
//! node filters by room locally; a message for a room with no member here
//! costs a hash lookup. There is no subscription per room or per connection.
//!
//! **Entries** have four fields: `node` (the origin: random per process
//! start), `seq` (consecutive per origin), `target` (`all` or a JSON array of
//! room names) and `payload` (the frame's data, verbatim); a binary
//! broadcast has a fifth, `kind` = `binary`, and is delivered as a binary
//! frame (without it an entry is text, so text entries read the same as
//! before binary existed). A node skips its
//! own entries (it delivered them locally before relaying) and tracks the
//! last `seq` of every other origin ([`SeqTracker`]): a jump is a gap of
//! exactly `seq - last - 1` lost messages, logged and counted, even when the
//! stream was trimmed past what was missed. A repeated `seq` (an `XADD`
//! retried after a lost reply) is dropped.
//!
//! **Failures.** Local delivery never depends on Redis: the hub delivers
//! before it relays. Broadcasts for other nodes wait in a bounded
//! [`Outbox`] while the link is down and are flushed in order when it comes
//! back; a full outbox drops its oldest and counts them (`lost_outbound`).
//! The reader resumes `XREAD` from the last id it saw, so entries still in
//! the stream are replayed (`replayed`). The link reconnects with
//! exponential backoff and jitter ([`LinkState`]), reset only once a read
//! has succeeded. Replies are read raw and decoded entry by entry, so an
//! entry that cannot be decoded is skipped and counted (`malformed`), never
//! a broken link. The guarantee, across nodes: at most once, and nothing
//! lost while the outage is shorter than what the sender's outbox holds
//! *and* the stream still holds the entries when the reader is back. Losses
//! beyond that are counted where they can be seen: the sender's outbox
//! overflow (`lost_outbound`), a gap in an origin's sequence once its next
//! entry arrives (`lost_inbound`: overflow, trimming, a Redis that lost
//! data), a full hub mailbox (`dropped_inbound`). A node's last messages
//! before it dies leave no later entry to reveal the gap and are not
//! counted.
//!
//! **Presence.** Every `presence_interval_ms` the bridge writes this node's
//! occupancy to the hash `{prefix}:presence:{node}` (expiring after three
//! intervals, so a dead node drops out by itself), reads the other nodes'
//! hashes (named in the set `{prefix}:nodes`) and tells the hub their totals
//! ([`ClusterPresence`]). Cost: O(nodes + rooms) per interval, nothing per
//! message.
//!
//! The stream, outbox, sequence and link logic are plain structs that take
//! `now` and do no I/O, unit-tested below; the actor is their shell.

use crate::config::{ClusterConfig, ConfigError, NodeIdentity};
use actix::prelude::*;
use actix_web::web::Bytes;
use bytestring::ByteString;
use happynet_actors::backoff::{Backoff, Jitter};
use happynet_actors::hub::{
    ClusterPresence, GetOccupancy, Occupancy, Relay, RelayTarget, SetRelay,
};
use happynet_actors::{Broadcast, BroadcastHub, Payload, RoomName, Target};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// How long one `XREAD` blocks waiting for entries.
pub const READ_BLOCK: Duration = Duration::from_secs(1);

/// How long past [`READ_BLOCK`] a read may stay unanswered before the link
/// is declared dead (a hung server never resets the connection).
pub const READ_GRACE: Duration = Duration::from_secs(2);

/// How long one publishing pipeline (or presence round) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long making a connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long setting the link up may take in all: both connections, naming
/// them, and reading the stream's newest id.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(3);

/// The most entries one publishing pipeline carries.
pub const PUBLISH_BATCH: usize = 256;

/// Origins whose sequence is tracked at once; the least recently heard is
/// forgotten beyond it.
pub const MAX_ORIGINS: usize = 1024;

/// An origin not heard from for this long is forgotten.
pub const ORIGIN_TTL: Duration = Duration::from_secs(600);

/// The most other nodes whose presence is read per interval.
pub const MAX_PRESENCE_NODES: usize = 256;

/// The largest count read from another node's presence hash; larger ones
/// are taken as this.
pub const MAX_PRESENCE_COUNT: usize = 1 << 24;

/// A node's presence hash expires after this many intervals without an
/// update.
pub const PRESENCE_TTL_INTERVALS: u32 = 3;

/// How long [`Leave`] waits to flush the outbox and remove this node's
/// presence.
pub const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the bridge waits for the hub's occupancy.
const HUB_REPLY_TIMEOUT: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------
// Stream ids and entries
// ---------------------------------------------------------------------------

/// A Redis Stream entry id, `<milliseconds>-<sequence>`, ordered as Redis
/// orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    /// The milliseconds part.
    pub ms: u64,
    /// The sequence within that millisecond.
    pub seq: u64,
}

impl StreamId {
    /// Parses `ms-seq`; `None` if it is not one.
    pub fn parse(text: &str) -> Option<StreamId> {
        let (ms, seq) = text.split_once('-')?;
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The `target` field of an entry: `all` or a JSON array of room names.
pub fn encode_target(target: &RelayTarget) -> String {
    match target {
        RelayTarget::All => "all".to_owned(),
        RelayTarget::Rooms(rooms) => {
            let names: Vec<&str> = rooms.iter().map(RoomName::as_str).collect();
            serde_json::to_string(&names).unwrap_or_else(|_| "[]".to_owned())
        }
    }
}

/// Reads a `target` field back; a single room becomes [`Target::Room`].
pub fn decode_target(text: &str) -> Result<Target, String> {
    if text == "all" {
        return Ok(Target::All);
    }
    let names: Vec<String> =
        serde_json::from_str(text).map_err(|e| format!("bad target {text:?}: {e}"))?;
    let mut rooms = names
        .iter()
        .map(|n| RoomName::new(n).map_err(|e| format!("bad room {n:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    match rooms.len() {
        0 => Err("empty room list".to_owned()),
        1 => Ok(Target::Room(rooms.remove(0))),
        _ => Ok(Target::Rooms(rooms)),
    }
}

/// One entry read from the stream, decoded as far as it goes.
///
/// Entries are decoded from the raw reply one by one (field names as
/// bytes), so a malformed entry — anything `XADD` accepts, binary field
/// names included — is skipped and counted on its own instead of failing
/// the whole read.
#[derive(Debug, Clone, PartialEq)]
pub struct InEntry {
    /// Its stream id, if it parses (so the reader can move past it).
    pub id: Option<StreamId>,
    /// The node that published it and its sequence number there, if both
    /// decode: the [`SeqTracker`] sees them even when the rest is bad, so a
    /// malformed entry is not also counted as lost.
    pub sender: Option<(String, u64)>,
    /// Who receives it and the frame's data, or why it is malformed.
    pub content: Result<(Target, Payload), String>,
}

/// The most characters of an error message kept for logs, `last_error` and
/// the `/ready` body: a Redis error may quote a whole reply, and with it
/// other people's messages.
pub const MAX_ERROR_CHARS: usize = 200;

/// `error` as text, cut to [`MAX_ERROR_CHARS`] characters (marked `…`).
pub fn short_error(error: impl fmt::Display) -> String {
    let text = error.to_string();
    match text.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// The name of a reply's type, for error messages (never its content).
fn value_kind(value: &redis::Value) -> &'static str {
    use redis::Value as V;
    match value {
        V::Nil => "nil",
        V::Int(_) => "integer",
        V::BulkString(_) => "bulk string",
        V::Array(_) => "array",
        V::SimpleString(_) => "simple string",
        V::Okay => "OK",
        V::Map(_) => "map",
        V::Set(_) => "set",
        V::Double(_) => "double",
        V::Boolean(_) => "boolean",
        V::ServerError(_) => "error",
        _ => "other",
    }
}

/// The bytes of a string reply, `None` for any other type.
fn value_bytes(value: &redis::Value) -> Option<&[u8]> {
    match value {
        redis::Value::BulkString(bytes) => Some(bytes),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// A field of an entry as text.
fn field_text(fields: &[(&[u8], &redis::Value)], name: &str) -> Result<String, String> {
    let value = fields
        .iter()
        .find(|(n, _)| *n == name.as_bytes())
        .map(|(_, v)| *v);
    match value {
        Some(redis::Value::Int(n)) => Ok(n.to_string()),
        Some(v) => match value_bytes(v) {
            Some(bytes) => {
                String::from_utf8(bytes.to_vec()).map_err(|_| format!("field {name} is not UTF-8"))
            }
            None => Err(format!("field {name} is a {}", value_kind(v))),
        },
        None => Err(format!("field {name} is missing")),
    }
}

/// The value of the entry field that marks a binary payload.
pub const KIND_BINARY: &str = "binary";

/// An entry's payload: text (it must be UTF-8) unless `kind` says binary.
fn decode_payload(fields: &[(&[u8], &redis::Value)]) -> Result<Payload, String> {
    let kind = fields.iter().find(|(n, _)| *n == b"kind").map(|(_, v)| *v);
    match kind {
        None => Ok(Payload::Text(ByteString::from(field_text(
            fields, "payload",
        )?))),
        Some(v) if value_bytes(v) == Some(KIND_BINARY.as_bytes()) => {
            let value = fields
                .iter()
                .find(|(n, _)| *n == b"payload")
                .map(|(_, v)| *v)
                .ok_or_else(|| "field payload is missing".to_owned())?;
            match value_bytes(value) {
                Some(bytes) => Ok(Payload::Binary(Bytes::copy_from_slice(bytes))),
                None => Err(format!("field payload is a {}", value_kind(value))),
            }
        }
        Some(_) => Err("field kind is not one this node knows".to_owned()),
    }
}

/// Decodes one raw stream entry, `[id, [name, value, …]]`.
pub fn decode_entry(raw: &redis::Value) -> InEntry {
    let mut entry = InEntry {
        id: None,
        sender: None,
        content: Err(String::new()),
    };
    let redis::Value::Array(parts) = raw else {
        entry.content = Err(format!("an entry is a {}", value_kind(raw)));
        return entry;
    };
    entry.id = parts
        .first()
        .and_then(value_bytes)
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(StreamId::parse);
    if entry.id.is_none() {
        entry.content = Err("bad stream id".to_owned());
        return entry;
    }
    // Field names stay bytes: one that is not UTF-8 is just not one of ours.
    let fields: Vec<(&[u8], &redis::Value)> = match parts.get(1) {
        Some(redis::Value::Array(flat)) => flat
            .chunks_exact(2)
            .filter_map(|kv| Some((value_bytes(&kv[0])?, &kv[1])))
            .collect(),
        Some(redis::Value::Map(pairs)) => pairs
            .iter()
            .filter_map(|(k, v)| Some((value_bytes(k)?, v)))
            .collect(),
        Some(other) => {
            entry.content = Err(format!("the fields are a {}", value_kind(other)));
            return entry;
        }
        None => {
            entry.content = Err("no fields".to_owned());
            return entry;
        }
    };
    let sender = field_text(&fields, "node").and_then(|origin| {
        let seq = field_text(&fields, "seq")?
            .parse::<u64>()
            .map_err(|e| format!("bad seq: {e}"))?;
        Ok((origin, seq))
    });
    entry.content = match sender {
        Ok(sender) => {
            entry.sender = Some(sender);
            field_text(&fields, "target")
                .and_then(|t| decode_target(&t))
                .and_then(|target| Ok((target, decode_payload(&fields)?)))
        }
        Err(e) => Err(e),
    };
    entry
}

/// Decodes a raw `XREAD` reply (RESP2 or RESP3; nil when the block expired
/// with nothing new) into its entries. Only a reply of the wrong shape is an
/// error, and its message never quotes the reply.
pub fn decode_read_reply(reply: &redis::Value) -> Result<Vec<InEntry>, String> {
    let mut out = Vec::new();
    let mut read_entries = |entries: &redis::Value| match entries {
        redis::Value::Array(entries) => {
            out.extend(entries.iter().map(decode_entry));
            Ok(())
        }
        redis::Value::Nil => Ok(()),
        other => Err(format!(
            "XREAD: a stream's entries are a {}",
            value_kind(other)
        )),
    };
    match reply {
        redis::Value::Nil => {}
        redis::Value::Array(streams) => {
            for stream in streams {
                match stream {
                    redis::Value::Array(kv) if kv.len() == 2 => read_entries(&kv[1])?,
                    other => return Err(format!("XREAD: a stream is a {}", value_kind(other))),
                }
            }
        }
        redis::Value::Map(streams) => {
            for (_, entries) in streams {
                read_entries(entries)?;
            }
        }
        other => return Err(format!("XREAD: the reply is a {}", value_kind(other))),
    }
    Ok(out)
}

/// The id of the newest entry from a raw `XREVRANGE … COUNT 1` reply,
/// `0-0` for an empty (or absent) stream. Reads the id only: the newest
/// entry's fields may be anything.
pub fn decode_top_id(reply: &redis::Value) -> Result<StreamId, String> {
    let redis::Value::Array(entries) = reply else {
        return Err(format!("XREVRANGE: the reply is a {}", value_kind(reply)));
    };
    let Some(newest) = entries.first() else {
        return Ok(StreamId::default());
    };
    let id = match newest {
        redis::Value::Array(parts) => parts.first().and_then(value_bytes),
        _ => None,
    };
    id.and_then(|b| std::str::from_utf8(b).ok())
        .and_then(StreamId::parse)
        .ok_or_else(|| "XREVRANGE: the newest entry has no valid id".to_owned())
}

// ---------------------------------------------------------------------------
// Outbox
// ---------------------------------------------------------------------------

/// A broadcast waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutEntry {
    /// Its sequence number (consecutive per origin).
    pub seq: u64,
    /// Who receives it on the other nodes.
    pub target: RelayTarget,
    /// The frame's data.
    pub payload: Payload,
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
        let seq = self.next_seq;
        self.next_seq += 1;
        let size = payload.len();
        if size > self.max_bytes {
            // It could never fit: evict nothing for it.
            self.lost += 1;
            return Pushed::DroppedNew;
        }
        let mut pushed = Pushed::Queued;
        while self.queue.len() >= self.max || self.bytes.saturating_add(size) > self.max_bytes {
            if self.in_flight >= self.queue.len() {
                // Only entries being sent are left: they stay.
                self.lost += 1;
                return Pushed::DroppedNew;
            }
            if let Some(old) = self.queue.remove(self.in_flight) {
                self.bytes -= old.payload.len();
            }
            self.lost += 1;
            pushed = Pushed::DroppedOldest;
        }
        self.bytes += size;
        self.queue.push_back(OutEntry {
            seq,
            target,
            payload,
        });
        pushed
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
}

// ---------------------------------------------------------------------------
// Sequence tracking
// ---------------------------------------------------------------------------

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
}

impl SeqTracker {
    /// A tracker for the node whose origin id is `own`.
    pub fn new(own: impl Into<String>, max_origins: usize) -> Self {
        SeqTracker {
            own: own.into(),
            last: HashMap::new(),
            max_origins: max_origins.max(1),
            paused_since: None,
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

// ---------------------------------------------------------------------------
// The link's state
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not connected; `since` is when it went down (`None`: never up).
    Down { since: Option<Instant> },
    /// A connection attempt is under way.
    Connecting { since: Option<Instant> },
    /// Connected since then.
    Up { since: Instant },
}

/// Whether the bridge is connected, and when to try again when it is not:
/// `reconnect_min` plus full jitter over an exponential ceiling (the shared
/// [`Backoff`]), capped at `reconnect_max`.
#[derive(Debug)]
pub struct LinkState {
    phase: Phase,
    attempt: u32,
    min: Duration,
    max: Duration,
    backoff: Backoff,
    reconnects: u64,
}

impl LinkState {
    /// A link that has never been up.
    pub fn new(reconnect_min: Duration, reconnect_max: Duration) -> Self {
        LinkState {
            phase: Phase::Down { since: None },
            attempt: 0,
            min: reconnect_min,
            max: reconnect_max,
            backoff: Backoff {
                base: reconnect_min,
                max: reconnect_max,
            },
            reconnects: 0,
        }
    }

    /// True while connected.
    pub fn is_up(&self) -> bool {
        matches!(self.phase, Phase::Up { .. })
    }

    /// Since when the link has been down (`None` while up, or if it was
    /// never up).
    pub fn down_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Down { since } | Phase::Connecting { since } => since,
            Phase::Up { .. } => None,
        }
    }

    /// Starts a connection attempt; false if one is under way or the link
    /// is up.
    pub fn start_connect(&mut self) -> bool {
        match self.phase {
            Phase::Down { since } => {
                self.phase = Phase::Connecting { since };
                true
            }
            _ => false,
        }
    }

    /// The attempt succeeded at `now`. Returns how long the link was down,
    /// if it had been up before (a reconnect).
    ///
    /// The backoff is not reset here but by [`healthy`](Self::healthy): a
    /// link that dies right after connecting keeps backing off instead of
    /// retrying at the shortest wait forever.
    pub fn connected(&mut self, now: Instant) -> Option<Duration> {
        let since = self.down_since();
        self.phase = Phase::Up { since: now };
        since.map(|s| {
            self.reconnects += 1;
            now.saturating_duration_since(s)
        })
    }

    /// The link has proved itself (a read came back on it): the next outage
    /// starts backing off from the shortest wait again.
    pub fn healthy(&mut self) {
        if self.is_up() {
            self.attempt = 0;
        }
    }

    /// The attempt failed; returns how long to wait before the next one.
    /// `unit` is a random number in `[0, 1)`.
    pub fn connect_failed(&mut self, unit: f64) -> Duration {
        let since = self.down_since();
        self.phase = Phase::Down { since };
        self.next_wait(unit)
    }

    /// The link broke at `now`; returns how long to wait before
    /// reconnecting, or `None` if it was not up (already handled).
    pub fn lost(&mut self, now: Instant, unit: f64) -> Option<Duration> {
        if !self.is_up() {
            return None;
        }
        self.phase = Phase::Down { since: Some(now) };
        Some(self.next_wait(unit))
    }

    fn next_wait(&mut self, unit: f64) -> Duration {
        let wait = (self.min + self.backoff.delay(self.attempt, unit)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        wait
    }

    /// Times the link came back after being down.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }
}

// ---------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------

/// The hash field of a room's member count (prefixed, so that a room may be
/// called `sessions`).
const ROOM_FIELD: &str = "r:";

/// This node's occupancy as the fields of its presence hash.
pub fn presence_fields(occupancy: &Occupancy) -> Vec<(String, usize)> {
    let mut fields = Vec::with_capacity(occupancy.rooms.len() + 1);
    fields.push(("sessions".to_owned(), occupancy.sessions));
    fields.extend(
        occupancy
            .rooms
            .iter()
            .map(|(room, n)| (format!("{ROOM_FIELD}{room}"), *n)),
    );
    fields
}

/// Adds up the other nodes' presence hashes. Returns the totals and the
/// names whose hash is gone (expired: the node is dead), to be removed from
/// the node set.
pub fn sum_presence(
    nodes: &[String],
    hashes: &[HashMap<String, String>],
) -> (ClusterPresence, Vec<String>) {
    let mut total = ClusterPresence::default();
    let mut dead = Vec::new();
    for (node, hash) in nodes.iter().zip(hashes) {
        if hash.is_empty() {
            dead.push(node.clone());
            continue;
        }
        for (field, value) in hash {
            // Another node's numbers are capped and added saturating: a
            // corrupt hash must not overflow (or dwarf) the totals.
            let Ok(n) = value.parse::<usize>() else {
                continue;
            };
            let n = n.min(MAX_PRESENCE_COUNT);
            if field == "sessions" {
                total.sessions = total.sessions.saturating_add(n);
            } else if let Some(room) = field.strip_prefix(ROOM_FIELD) {
                if let Ok(room) = RoomName::new(room) {
                    let count = total.rooms.entry(room).or_insert(0);
                    *count = count.saturating_add(n);
                }
            }
        }
    }
    (total, dead)
}

// ---------------------------------------------------------------------------
// The actor
// ---------------------------------------------------------------------------

/// The bridge's counters, the result of [`GetClusterStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStats {
    /// This node's name (`network.cluster.node_id` or random).
    pub node: String,
    /// Whether the link to Redis is up.
    pub link_up: bool,
    /// Milliseconds the link has been down (0 while up).
    pub link_down_ms: u64,
    /// Why the link last went down, or why the last attempt failed.
    pub last_error: Option<String>,
    /// Local broadcasts published to the stream.
    pub published: u64,
    /// Broadcasts from other nodes handed to the hub.
    pub received: u64,
    /// This node's own entries read back and skipped.
    pub skipped_own: u64,
    /// Entries read twice (a resent batch) and dropped.
    pub duplicates: u64,
    /// Local broadcasts dropped because the outbox was full.
    pub lost_outbound: u64,
    /// Messages from other nodes never received: the gaps in their
    /// sequences.
    pub lost_inbound: u64,
    /// Received entries that were published while the link was down and
    /// read from the stream after it came back.
    pub replayed: u64,
    /// Entries that could not be decoded (skipped).
    pub malformed: u64,
    /// Remote broadcasts the hub's full mailbox refused.
    pub dropped_inbound: u64,
    /// Times the link came back after being down.
    pub reconnects: u64,
    /// Broadcasts waiting in the outbox now.
    pub outbox: usize,
    /// Other nodes seen in the last presence round.
    pub peers: usize,
    /// Sessions on the other nodes, as of the last presence round.
    pub remote_sessions: usize,
}

/// Sent by `/ready`, `/metrics` and `/status`: the result is the bridge's
/// [`ClusterStats`] as of now.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "ClusterStats")]
pub struct GetClusterStats;

/// Sent by `Network::shutdown`: flush what waits in the outbox, remove this
/// node's presence, and stop (within [`LEAVE_TIMEOUT`]).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct Leave;

/// A batch read from the stream, from the bridge's reader to the bridge.
/// The reply comes once the hub has handled the batch, so the reader reads
/// no faster than the hub delivers.
#[derive(Message)]
#[rtype(result = "()")]
struct Inbound {
    generation: u64,
    entries: Vec<InEntry>,
}

/// After a reconnect: entries up to `top` were in the stream before the
/// link came back.
#[derive(Debug, Clone, Copy)]
struct CatchUp {
    top: StreamId,
    replayed: u64,
    lost: u64,
}

struct Keys {
    stream: String,
    nodes: String,
    prefix: String,
}

impl Keys {
    fn presence(&self, node: &str) -> String {
        format!("{}:presence:{node}", self.prefix)
    }
}

/// The cluster bridge; see the module docs. Started by `Network::start`
/// when `network.cluster` is configured.
pub struct ClusterBridge {
    hub: Addr<BroadcastHub>,
    client: redis::Client,
    node: NodeIdentity,
    keys: Keys,
    stream_max_len: usize,
    read_batch: usize,
    presence_interval: Duration,
    link: LinkState,
    jitter: Jitter,
    /// Bumped whenever the link goes up or down: answers from an older
    /// connection are recognised and ignored.
    generation: u64,
    publisher: Option<MultiplexedConnection>,
    reader: Option<SpawnHandle>,
    flushing: bool,
    /// The presence round in flight, if any.
    presence_round: Option<SpawnHandle>,
    /// Set by [`Leave`]: no more presence rounds.
    leaving: bool,
    outbox: Outbox,
    /// Whether the outbox's overflow was logged since it last drained.
    outbox_warned: bool,
    seqs: SeqTracker,
    /// The last stream id read: where the reader resumes.
    last_id: Option<StreamId>,
    catch_up: Option<CatchUp>,
    stats: ClusterStats,
}

impl ClusterBridge {
    /// A bridge for `config` that hands remote broadcasts to `hub`, for the
    /// node `node` ([`NodeIdentity::new`], decided once so that the alerts
    /// name the node as the bridge does). Start it with `Actor::start`, then
    /// install it as the hub's relay ([`ClusterBridge::start_for`] does both).
    pub fn new(
        config: &ClusterConfig,
        node: NodeIdentity,
        hub: Addr<BroadcastHub>,
    ) -> Result<Self, ConfigError> {
        let client =
            redis::Client::open(config.redis_url.as_str()).map_err(|e| ConfigError::Invalid {
                path: "network.cluster.redis_url".into(),
                message: format!("is not a Redis URL: {e}"),
            })?;
        let jitter = Jitter::new();
        let prefix = config.prefix.clone();
        Ok(ClusterBridge {
            hub,
            client,
            keys: Keys {
                stream: format!("{prefix}:broadcasts"),
                nodes: format!("{prefix}:nodes"),
                prefix,
            },
            stream_max_len: config.stream_max_len,
            read_batch: config.read_batch,
            presence_interval: config.presence_interval.0,
            link: LinkState::new(config.reconnect_min.0, config.reconnect_max.0),
            jitter,
            generation: 0,
            publisher: None,
            reader: None,
            flushing: false,
            presence_round: None,
            leaving: false,
            outbox: Outbox::new(config.outbox_max, config.outbox_max_bytes),
            outbox_warned: false,
            seqs: SeqTracker::new(node.origin.clone(), MAX_ORIGINS),
            last_id: None,
            catch_up: None,
            stats: ClusterStats {
                node: node.name.clone(),
                ..ClusterStats::default()
            },
            node,
        })
    }

    /// Starts a bridge for `config` on the current arbiter and installs it
    /// as `hub`'s relay.
    pub fn start_for(
        config: &ClusterConfig,
        node: NodeIdentity,
        hub: Addr<BroadcastHub>,
    ) -> Result<Addr<ClusterBridge>, ConfigError> {
        let bridge = ClusterBridge::new(config, node, hub.clone())?.start();
        // One message at start-up: do_send is bounded by design.
        hub.do_send(SetRelay(Some(bridge.clone().recipient())));
        Ok(bridge)
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node.name
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if !self.link.start_connect() {
            return;
        }
        let client = self.client.clone();
        let stream = self.keys.stream.clone();
        let name = self.node.name.clone();
        let setup = async move {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(CONNECT_TIMEOUT))
                .set_response_timeout(Some(COMMAND_TIMEOUT));
            let mut publisher = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(short_error)?;
            // The reader's reads block for READ_BLOCK; it has its own
            // deadline (READ_BLOCK + READ_GRACE) instead.
            let mut reader = client
                .get_multiplexed_async_connection_with_config(
                    &config.clone().set_response_timeout(None),
                )
                .await
                .map_err(short_error)?;
            // Named, so that an operator (or a test) can tell them apart
            // in CLIENT LIST.
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("happynet-{name}-pub"))
                .exec_async(&mut publisher)
                .await
                .map_err(short_error)?;
            redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(format!("happynet-{name}-read"))
                .exec_async(&mut reader)
                .await
                .map_err(short_error)?;
            // The newest entry's id now: where a fresh node starts, and
            // the end of what a reconnecting node replays. Read raw and
            // only the id: the entry's fields may be anything.
            let newest: redis::Value = redis::cmd("XREVRANGE")
                .arg(&stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut publisher)
                .await
                .map_err(short_error)?;
            let top = decode_top_id(&newest)?;
            Ok::<_, String>((publisher, reader, top))
        };
        ctx.spawn(
            async move {
                // The reader's connection has no response timeout (its
                // reads have their own deadline), so its setup would wait
                // forever on a server that accepts and never answers: the
                // whole setup has one deadline.
                tokio::time::timeout(SETUP_TIMEOUT, setup)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {SETUP_TIMEOUT:?}")))
            }
            .into_actor(self)
            .map(|result, bridge, ctx| match result {
                Ok((publisher, reader, top)) => bridge.link_up(ctx, publisher, reader, top),
                Err(e) => {
                    let e = short_error(e);
                    let wait = bridge.link.connect_failed(bridge.jitter.unit());
                    let first = bridge.stats.last_error.is_none();
                    bridge.stats.last_error = Some(format!("connect: {e}"));
                    if first {
                        log::warn!(
                            "cluster: cannot reach Redis ({e}); retrying in {wait:?}, broadcasts for other nodes wait in the outbox"
                        );
                    } else {
                        log::debug!("cluster: reconnect failed ({e}); retrying in {wait:?}");
                    }
                    ctx.run_later(wait, |bridge, ctx| bridge.connect(ctx));
                }
            }),
        );
    }

    fn link_up(
        &mut self,
        ctx: &mut Context<Self>,
        publisher: MultiplexedConnection,
        reader: MultiplexedConnection,
        top: StreamId,
    ) {
        let now = Instant::now();
        self.generation += 1;
        let down_for = self.link.connected(now);
        self.seqs.resume(now);
        self.stats.reconnects = self.link.reconnects();
        self.stats.last_error = None;
        self.publisher = Some(publisher);
        let start = match self.last_id {
            Some(last) => {
                self.catch_up = Some(CatchUp {
                    top,
                    replayed: 0,
                    lost: 0,
                });
                last
            }
            None => top,
        };
        self.last_id = Some(start);
        match down_for {
            Some(down_for) => log::info!(
                "cluster: link to Redis back after {down_for:?} (node {}); resuming the stream at {start}, {} broadcasts to flush, {} dropped from the full outbox so far",
                self.node.name,
                self.outbox.len(),
                self.outbox.lost()
            ),
            None => log::info!(
                "cluster: node {} linked to Redis, reading {} from {start}",
                self.node.name,
                self.keys.stream
            ),
        }
        self.outbox_warned = false;
        self.spawn_reader(ctx, reader, start);
        self.flush(ctx);
        self.presence_round(ctx);
    }

    fn link_lost(&mut self, ctx: &mut Context<Self>, why: String) {
        let now = Instant::now();
        let Some(wait) = self.link.lost(now, self.jitter.unit()) else {
            return;
        };
        let why = short_error(why);
        self.seqs.pause(now);
        self.generation += 1;
        if let Some(reader) = self.reader.take() {
            ctx.cancel_future(reader);
        }
        self.publisher = None;
        self.catch_up = None;
        log::warn!(
            "cluster: link to Redis down ({why}); local delivery continues, broadcasts for other nodes wait in the outbox (up to {}); reconnecting in {wait:?}",
            self.outbox.max
        );
        self.stats.last_error = Some(why);
        // The other nodes' numbers are unknown now; show this node's own.
        // One message per outage: do_send is bounded.
        self.hub.do_send(ClusterPresence::default());
        self.stats.peers = 0;
        self.stats.remote_sessions = 0;
        ctx.run_later(wait, |bridge, ctx| bridge.connect(ctx));
    }

    /// Reads the stream from `from` until the link fails; each batch goes
    /// to the bridge as an [`Inbound`] and the next read waits for it to be
    /// delivered.
    fn spawn_reader(
        &mut self,
        ctx: &mut Context<Self>,
        mut conn: MultiplexedConnection,
        from: StreamId,
    ) {
        let generation = self.generation;
        let stream = self.keys.stream.clone();
        let batch = self.read_batch;
        let me = ctx.address();
        let handle = ctx.spawn(
            async move {
                let mut last = from;
                loop {
                    let mut xread = redis::cmd("XREAD");
                    xread
                        .arg("COUNT")
                        .arg(batch)
                        .arg("BLOCK")
                        .arg(READ_BLOCK.as_millis() as u64)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(last.to_string());
                    // Raw: each entry is decoded on its own, so one that is
                    // malformed cannot fail the whole read.
                    let read = xread.query_async::<redis::Value>(&mut conn);
                    let reply = match tokio::time::timeout(READ_BLOCK + READ_GRACE, read).await {
                        Err(_) => {
                            return format!(
                                "no answer to XREAD within {:?}",
                                READ_BLOCK + READ_GRACE
                            )
                        }
                        Ok(Err(e)) => return short_error(format!("XREAD: {e}")),
                        Ok(Ok(reply)) => reply,
                    };
                    let entries = match decode_read_reply(&reply) {
                        Ok(entries) => entries,
                        Err(e) => return e,
                    };
                    for id in entries.iter().filter_map(|e| e.id) {
                        last = last.max(id);
                    }
                    // An empty batch (the block expired) still goes: it
                    // tells a reconnected bridge that it has caught up.
                    if me
                        .send(Inbound {
                            generation,
                            entries,
                        })
                        .await
                        .is_err()
                    {
                        return "the bridge stopped".to_owned();
                    }
                }
            }
            .into_actor(self)
            .map(move |why, bridge, ctx| {
                if bridge.generation == generation {
                    bridge.link_lost(ctx, why);
                }
            }),
        );
        self.reader = Some(handle);
    }

    /// Publishes the oldest waiting broadcasts, one pipeline at a time, in
    /// order.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing || !self.link.is_up() {
            return;
        }
        let Some(mut conn) = self.publisher.clone() else {
            return;
        };
        let batch = self.outbox.take(PUBLISH_BATCH);
        if batch.is_empty() {
            self.outbox_warned = false;
            return;
        }
        self.flushing = true;
        let pipe = self.xadd_pipeline(&batch);
        let generation = self.generation;
        ctx.spawn(
            async move {
                tokio::time::timeout(COMMAND_TIMEOUT, pipe.query_async::<()>(&mut conn)).await
            }
            .into_actor(self)
            .map(move |result, bridge, ctx| {
                bridge.flushing = false;
                match result {
                    Ok(Ok(())) => {
                        bridge.stats.published += bridge.outbox.acked() as u64;
                        bridge.flush(ctx);
                    }
                    Ok(Err(e)) => {
                        bridge.outbox.failed();
                        if bridge.generation == generation {
                            bridge.link_lost(ctx, short_error(format!("XADD: {e}")));
                        } else {
                            bridge.flush(ctx);
                        }
                    }
                    Err(_) => {
                        bridge.outbox.failed();
                        if bridge.generation == generation {
                            bridge.link_lost(
                                ctx,
                                format!("no answer to XADD within {COMMAND_TIMEOUT:?}"),
                            );
                        } else {
                            bridge.flush(ctx);
                        }
                    }
                }
            }),
        );
    }

    fn xadd_pipeline(&self, batch: &[OutEntry]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        for e in batch {
            pipe.cmd("XADD")
                .arg(&self.keys.stream)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.stream_max_len)
                .arg("*")
                .arg("node")
                .arg(&self.node.origin)
                .arg("seq")
                .arg(e.seq)
                .arg("target")
                .arg(encode_target(&e.target))
                .arg("payload")
                .arg(e.payload.as_bytes());
            if e.payload.is_binary() {
                pipe.arg("kind").arg(KIND_BINARY);
            }
            pipe.ignore();
        }
        pipe
    }

    /// Writes this node's occupancy and reads the others' (see the module
    /// docs).
    fn presence_round(&mut self, ctx: &mut Context<Self>) {
        if self.presence_interval.is_zero()
            || self.presence_round.is_some()
            || self.leaving
            || !self.link.is_up()
        {
            return;
        }
        let Some(mut conn) = self.publisher.clone() else {
            return;
        };
        let hub = self.hub.clone();
        let name = self.node.name.clone();
        let own_key = self.keys.presence(&name);
        let nodes_key = self.keys.nodes.clone();
        let prefix = self.keys.prefix.clone();
        let ttl_ms = (self.presence_interval * PRESENCE_TTL_INTERVALS).as_millis() as u64;
        let round = async move {
            let occupancy = hub
                .send(GetOccupancy)
                .timeout(HUB_REPLY_TIMEOUT)
                .await
                .map_err(|e| format!("hub: {e}"))?;
            let mut pipe = redis::pipe();
            pipe.atomic()
                .del(&own_key)
                .ignore()
                .hset_multiple(&own_key, &presence_fields(&occupancy))
                .ignore()
                .pexpire(&own_key, ttl_ms as i64)
                .ignore()
                .sadd(&nodes_key, &name)
                .ignore()
                .smembers(&nodes_key);
            let (members,): (Vec<String>,) = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("presence: {e}"))?;
            let others: Vec<String> = members
                .into_iter()
                .filter(|m| *m != name)
                .take(MAX_PRESENCE_NODES)
                .collect();
            if others.is_empty() {
                return Ok((ClusterPresence::default(), 0));
            }
            let mut pipe = redis::pipe();
            for other in &others {
                pipe.hgetall(format!("{prefix}:presence:{other}"));
            }
            let hashes: Vec<HashMap<String, String>> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("presence: {e}"))?;
            let (total, dead) = sum_presence(&others, &hashes);
            if !dead.is_empty() {
                let _: Result<(), _> = redis::cmd("SREM")
                    .arg(&nodes_key)
                    .arg(&dead)
                    .query_async(&mut conn)
                    .await;
            }
            Ok::<_, String>((total, others.len() - dead.len()))
        };
        let generation = self.generation;
        let handle = ctx.spawn(
            async move {
                tokio::time::timeout(COMMAND_TIMEOUT, round)
                    .await
                    .unwrap_or_else(|_| Err("presence: no answer in time".to_owned()))
            }
            .into_actor(self)
            .map(move |result, bridge, _| {
                bridge.presence_round = None;
                // A round from before the link dropped would overwrite the
                // reset (link_lost) with stale totals.
                if bridge.generation != generation {
                    return;
                }
                match result {
                    Ok((total, peers)) => {
                        bridge.stats.peers = peers;
                        bridge.stats.remote_sessions = total.sessions;
                        // One per presence interval: do_send is bounded.
                        bridge.hub.do_send(total);
                    }
                    // The reader notices a dead link; this is only logged.
                    Err(e) => log::debug!("cluster: {}", short_error(e)),
                }
            }),
        );
        // Spawned futures first run after this handler returns, so the
        // completion above cannot have cleared the slot yet.
        self.presence_round = Some(handle);
    }

    /// Handles a batch from the reader: skips own and repeated entries,
    /// counts gaps, hands the rest to the hub. Returns the delivery of the
    /// batch's last broadcast, which completes once the hub has handled the
    /// whole batch (its mailbox is FIFO).
    fn on_inbound(&mut self, entries: Vec<InEntry>) -> Option<Broadcast> {
        let now = Instant::now();
        let mut deliveries: Vec<Broadcast> = Vec::new();
        let mut newest = None;
        for entry in entries {
            if let Some(id) = entry.id {
                self.last_id = Some(self.last_id.map_or(id, |l| l.max(id)));
                newest = Some(id);
            }
            // The sequence is tracked even when the rest is malformed: the
            // entry was published, so it is not a gap.
            let seen = entry
                .sender
                .as_ref()
                .map(|(origin, seq)| (origin, *seq, self.seqs.observe(origin, *seq, now)));
            if let Some((origin, seq, Seen::New { lost })) = seen {
                if lost > 0 {
                    self.stats.lost_inbound = self.stats.lost_inbound.saturating_add(lost);
                    if let Some(c) = &mut self.catch_up {
                        c.lost = c.lost.saturating_add(lost);
                    }
                    log::warn!(
                        "cluster: {lost} messages from node {origin} were lost (sequence {}..={}), e.g. trimmed from the stream or dropped from its outbox",
                        seq.saturating_sub(lost),
                        seq.saturating_sub(1)
                    );
                }
            }
            let (target, payload) = match (seen.map(|(_, _, seen)| seen), entry.content) {
                (Some(Seen::New { .. }), Ok(content)) => content,
                (Some(Seen::Own), Ok(_)) => {
                    self.stats.skipped_own += 1;
                    continue;
                }
                (Some(Seen::Duplicate), Ok(_)) => {
                    self.stats.duplicates += 1;
                    continue;
                }
                (_, Err(e)) => {
                    self.stats.malformed += 1;
                    if self.stats.malformed.is_power_of_two() {
                        log::warn!(
                            "cluster: skipped a malformed stream entry ({}); {} so far",
                            short_error(e),
                            self.stats.malformed
                        );
                    }
                    continue;
                }
                // Content decodes only with a sender (decode_entry).
                (None, Ok(_)) => {
                    self.stats.malformed += 1;
                    continue;
                }
            };
            self.stats.received += 1;
            if let Some(c) = &mut self.catch_up {
                if entry.id.is_some_and(|id| id <= c.top) {
                    c.replayed += 1;
                    self.stats.replayed += 1;
                }
            }
            deliveries.push(Broadcast::from_cluster(target, payload));
        }
        if let Some(c) = self.catch_up {
            // Caught up once a read ends past the old top (or comes back
            // empty: the block expired with nothing newer).
            if newest.is_none_or(|id| id >= c.top) {
                self.catch_up = None;
                log::info!(
                    "cluster: caught up after the outage: {} messages replayed from the stream, {} lost",
                    c.replayed,
                    c.lost
                );
            }
        }
        let last = deliveries.pop();
        for broadcast in deliveries {
            // try_send: the hub's mailbox is bounded and a full one must be
            // noticed; the reader waits for each batch (below), so this
            // only fails if the hub is swamped by other senders.
            if self.hub.try_send(broadcast).is_err() {
                self.stats.dropped_inbound += 1;
            }
        }
        last
    }

    fn snapshot(&self) -> ClusterStats {
        let mut stats = self.stats.clone();
        stats.link_up = self.link.is_up();
        stats.link_down_ms = self
            .link
            .down_since()
            .map_or(0, |s| s.elapsed().as_millis() as u64);
        stats.lost_outbound = self.outbox.lost();
        stats.outbox = self.outbox.len();
        stats
    }
}

impl Actor for ClusterBridge {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // As in the hub: no timers when dropped outside a runtime.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.connect(ctx);
        if !self.presence_interval.is_zero() {
            ctx.run_interval(self.presence_interval, |bridge, ctx| {
                bridge.presence_round(ctx)
            });
        }
        ctx.run_interval(ORIGIN_TTL / 4, |bridge, _| {
            bridge.seqs.sweep(Instant::now())
        });
    }
}

impl Handler<Relay> for ClusterBridge {
    type Result = ();

    fn handle(&mut self, msg: Relay, ctx: &mut Self::Context) {
        // Nobody to deliver to anywhere; published, it would only be a
        // malformed entry on every other node.
        if matches!(&msg.target, RelayTarget::Rooms(rooms) if rooms.is_empty()) {
            return;
        }
        match self.outbox.push(msg.target, msg.payload) {
            Pushed::Queued => {}
            Pushed::DroppedOldest | Pushed::DroppedNew => {
                if !self.outbox_warned {
                    self.outbox_warned = true;
                    log::warn!(
                        "cluster: outbox full ({} broadcasts or {} bytes); dropping the oldest broadcasts meant for other nodes until the link catches up",
                        self.outbox.max,
                        self.outbox.max_bytes
                    );
                }
            }
        }
        self.flush(ctx);
    }
}

impl Handler<Inbound> for ClusterBridge {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Inbound, _: &mut Self::Context) -> Self::Result {
        if msg.generation != self.generation {
            return Box::pin(async {});
        }
        // A read came back on this connection: it works.
        self.link.healthy();
        let last = self.on_inbound(msg.entries);
        let hub = self.hub.clone();
        // send (not try_send) for the last one: waiting for its answer is
        // the reader's back-pressure.
        Box::pin(async move {
            if let Some(last) = last {
                let _ = hub.send(last).await;
            }
        })
    }
}

impl Handler<GetClusterStats> for ClusterBridge {
    type Result = MessageResult<GetClusterStats>;

    fn handle(&mut self, _: GetClusterStats, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.snapshot())
    }
}

impl Handler<Leave> for ClusterBridge {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: Leave, ctx: &mut Self::Context) -> Self::Result {
        // No more relays: the hub is shutting down too. No more presence
        // either: a round still waiting for the hub is dropped before it
        // writes (one already written is ordered before the DEL below, on
        // the same connection).
        self.hub.do_send(SetRelay(None));
        self.leaving = true;
        if let Some(round) = self.presence_round.take() {
            ctx.cancel_future(round);
        }
        let conn = self.publisher.clone().filter(|_| self.link.is_up());
        let waiting = self.outbox.drain_waiting();
        let mut pipe = self.xadd_pipeline(&waiting);
        pipe.del(self.keys.presence(&self.node.name))
            .ignore()
            .srem(&self.keys.nodes, &self.node.name)
            .ignore();
        let flushed = waiting.len();
        if let Some(reader) = self.reader.take() {
            ctx.cancel_future(reader);
        }
        Box::pin(
            async move {
                let Some(mut conn) = conn else {
                    return Err("the link is down".to_owned());
                };
                match tokio::time::timeout(LEAVE_TIMEOUT, pipe.query_async::<()>(&mut conn)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {LEAVE_TIMEOUT:?}")),
                }
            }
            .into_actor(self)
            .map(move |result, bridge, ctx| {
                match result {
                    Ok(()) => {
                        bridge.stats.published += flushed as u64;
                        log::info!(
                            "cluster: node {} left the cluster ({flushed} queued broadcasts flushed)",
                            bridge.node.name
                        );
                    }
                    Err(e) => {
                        bridge.outbox.lost += flushed as u64;
                        log::warn!(
                            "cluster: node {} left without flushing {flushed} queued broadcasts ({e})",
                            bridge.node.name
                        );
                    }
                }
                ctx.stop();
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).expect("valid room")
    }

    fn text(s: &str) -> Payload {
        Payload::Text(ByteString::from(s.to_owned()))
    }

    #[test]
    fn stream_ids_parse_print_and_order_like_redis() {
        let a = StreamId::parse("1700000000000-0").expect("id");
        let b = StreamId::parse("1700000000000-1").expect("id");
        let c = StreamId::parse("1700000000001-0").expect("id");
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-1");
        assert_eq!(StreamId::parse("0-0"), Some(StreamId::default()));
        assert_eq!(StreamId::parse("12"), None);
        assert_eq!(StreamId::parse("a-1"), None);
    }

    #[test]
    fn targets_round_trip() {
        assert_eq!(encode_target(&RelayTarget::All), "all");
        assert_eq!(decode_target("all"), Ok(Target::All));
        let one = encode_target(&RelayTarget::Rooms(vec![room("lobby")]));
        assert_eq!(one, r#"["lobby"]"#);
        assert_eq!(decode_target(&one), Ok(Target::Room(room("lobby"))));
        let two = encode_target(&RelayTarget::Rooms(vec![room("a"), room("b")]));
        assert_eq!(
            decode_target(&two),
            Ok(Target::Rooms(vec![room("a"), room("b")]))
        );
        assert!(decode_target("[]").is_err());
        assert!(decode_target("nonsense").is_err());
        assert!(decode_target(r#"[""]"#).is_err(), "an empty room name");
    }

    fn bulk(s: &[u8]) -> redis::Value {
        redis::Value::BulkString(s.to_vec())
    }

    /// A raw entry as Redis sends it: `[id, [name, value, …]]`.
    fn raw_entry(id: &str, fields: &[(&[u8], &[u8])]) -> redis::Value {
        let flat = fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect();
        redis::Value::Array(vec![bulk(id.as_bytes()), redis::Value::Array(flat)])
    }

    fn good(id: &str, node: &str, seq: &str) -> redis::Value {
        raw_entry(
            id,
            &[
                (b"node", node.as_bytes()),
                (b"seq", seq.as_bytes()),
                (b"target", b"all"),
                (b"payload", b"hello"),
            ],
        )
    }

    #[test]
    fn entries_decode_or_say_why_not() {
        let entry = decode_entry(&good("5-1", "n1", "7"));
        assert_eq!(entry.id, Some(StreamId { ms: 5, seq: 1 }));
        assert_eq!(entry.sender, Some(("n1".to_owned(), 7)));
        assert_eq!(entry.content, Ok((Target::All, text("hello"))));

        let no_seq = decode_entry(&raw_entry("5-2", &[(b"node", b"n1")]));
        assert!(no_seq.id.is_some(), "the reader can still move past it");
        assert_eq!(no_seq.sender, None);
        assert_eq!(no_seq.content, Err("field seq is missing".to_owned()));

        // A good sender with a bad target: the tracker still sees the seq.
        let bad_target = decode_entry(&raw_entry(
            "5-3",
            &[(b"node", b"n1"), (b"seq", b"8"), (b"target", b"[]")],
        ));
        assert_eq!(bad_target.sender, Some(("n1".to_owned(), 8)));
        assert!(bad_target.content.is_err());

        // Binary field names and values are just not ours.
        let binary = decode_entry(&raw_entry("5-4", &[(b"\xff", b"x")]));
        assert_eq!(binary.id, Some(StreamId { ms: 5, seq: 4 }));
        assert_eq!(binary.content, Err("field node is missing".to_owned()));
        let binary_payload = decode_entry(&raw_entry(
            "5-5",
            &[
                (b"node", b"n1"),
                (b"seq", b"9"),
                (b"target", b"all"),
                (b"payload", b"\xff"),
            ],
        ));
        assert_eq!(binary_payload.sender, Some(("n1".to_owned(), 9)));
        assert_eq!(
            binary_payload.content,
            Err("field payload is not UTF-8".to_owned())
        );
        // With `kind` = binary the same bytes are a binary payload, and an
        // unknown kind is malformed rather than guessed at.
        let binary_kind = decode_entry(&raw_entry(
            "5-6",
            &[
                (b"node", b"n1"),
                (b"seq", b"10"),
                (b"target", b"all"),
                (b"payload", b"\xff\x00"),
                (b"kind", b"binary"),
            ],
        ));
        assert_eq!(
            binary_kind.content,
            Ok((
                Target::All,
                Payload::Binary(Bytes::from_static(b"\xff\x00"))
            ))
        );
        let unknown_kind = decode_entry(&raw_entry(
            "5-7",
            &[
                (b"node", b"n1"),
                (b"seq", b"11"),
                (b"target", b"all"),
                (b"payload", b"x"),
                (b"kind", b"video"),
            ],
        ));
        assert!(unknown_kind.content.is_err());
        let not_an_entry = decode_entry(&redis::Value::Int(3));
        assert_eq!((not_an_entry.id, not_an_entry.sender), (None, None));
    }

    #[test]
    fn a_malformed_entry_does_not_fail_the_read() {
        let stream = |entries: Vec<redis::Value>| {
            redis::Value::Array(vec![redis::Value::Array(vec![
                bulk(b"happynet:broadcasts"),
                redis::Value::Array(entries),
            ])])
        };
        let reply = stream(vec![
            raw_entry("1-0", &[(b"\xff", b"x")]),
            good("2-0", "n1", "1"),
        ]);
        let entries = decode_read_reply(&reply).expect("the read decodes");
        assert_eq!(entries.len(), 2);
        assert!(entries[0].content.is_err());
        assert_eq!(entries[1].content, Ok((Target::All, text("hello"))));
        // RESP3 shape, and the nil of an expired block.
        let resp3 = redis::Value::Map(vec![(
            bulk(b"happynet:broadcasts"),
            redis::Value::Array(vec![good("3-0", "n1", "2")]),
        )]);
        assert_eq!(decode_read_reply(&resp3).map(|e| e.len()), Ok(1));
        assert_eq!(decode_read_reply(&redis::Value::Nil), Ok(Vec::new()));
        // A reply of the wrong shape is an error that quotes nothing.
        let secret = bulk(b"a private message");
        let err = decode_read_reply(&secret).expect_err("not a reply");
        assert!(!err.contains("private"), "{err}");
    }

    #[test]
    fn the_top_id_is_read_without_the_entry() {
        let reply = redis::Value::Array(vec![raw_entry("9-3", &[(b"\xff", b"\xfe")])]);
        assert_eq!(decode_top_id(&reply), Ok(StreamId { ms: 9, seq: 3 }));
        assert_eq!(
            decode_top_id(&redis::Value::Array(Vec::new())),
            Ok(StreamId::default())
        );
        assert!(decode_top_id(&redis::Value::Nil).is_err());
    }

    #[test]
    fn errors_are_cut_short() {
        assert_eq!(short_error("short"), "short");
        let long = "é".repeat(MAX_ERROR_CHARS + 50);
        let cut = short_error(&long);
        assert_eq!(cut.chars().count(), MAX_ERROR_CHARS + 1);
        assert!(cut.ends_with('…'));
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
    fn the_link_backs_off_with_jitter_and_reports_downtime() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut l = LinkState::new(ms(100), ms(1000));
        assert!(!l.is_up());
        assert!(l.start_connect());
        assert!(!l.start_connect(), "one attempt at a time");
        // First attempt fails: min + jitter over base × 2^0.
        assert_eq!(l.connect_failed(0.0), ms(100));
        assert!(l.start_connect());
        assert_eq!(l.connect_failed(0.5), ms(200)); // 100 + 0.5 × 200
        assert!(l.start_connect());
        assert_eq!(l.connected(t0), None, "never up before: not a reconnect");
        assert!(l.is_up());
        l.healthy();
        assert_eq!(l.lost(t0 + ms(10), 0.99), Some(ms(199)), "attempts reset");
        assert_eq!(l.lost(t0 + ms(10), 0.0), None, "already down");
        assert_eq!(l.down_since(), Some(t0 + ms(10)));
        for _ in 0..10 {
            assert!(l.start_connect());
            assert!(l.connect_failed(0.99) <= ms(1000), "capped");
        }
        assert!(l.start_connect());
        assert_eq!(l.connected(t0 + ms(510)), Some(ms(500)));
        assert_eq!(l.reconnects(), 1);
    }

    #[test]
    fn a_link_that_dies_at_once_keeps_backing_off() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut l = LinkState::new(ms(100), ms(10_000));
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
    fn remote_numbers_cannot_overflow() {
        let t0 = Instant::now();
        let mut t = SeqTracker::new("me", 10);
        t.observe("a", 1, t0);
        assert_eq!(
            t.observe("a", u64::MAX, t0),
            Seen::New { lost: u64::MAX - 2 }
        );
        assert_eq!(t.observe("a", u64::MAX, t0), Seen::Duplicate);
        let huge = |n: &str| {
            [("sessions", n), ("r:lobby", n)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let max = usize::MAX.to_string();
        let nodes = vec!["a".to_owned(), "b".to_owned()];
        let (total, _) = sum_presence(&nodes, &[huge(&max), huge(&max)]);
        assert_eq!(total.sessions, 2 * MAX_PRESENCE_COUNT);
        assert_eq!(total.rooms[&room("lobby")], 2 * MAX_PRESENCE_COUNT);
    }

    #[test]
    fn presence_adds_up_the_other_nodes_and_finds_the_dead() {
        let fields = presence_fields(&Occupancy {
            sessions: 3,
            rooms: vec![(room("lobby"), 2), (room("sessions"), 1)],
        });
        assert_eq!(fields[0], ("sessions".to_owned(), 3));
        let as_hash = |f: &[(String, usize)]| {
            f.iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        let other = as_hash(&presence_fields(&Occupancy {
            sessions: 1,
            rooms: vec![(room("lobby"), 1)],
        }));
        let nodes = vec!["a".to_owned(), "b".to_owned(), "gone".to_owned()];
        let (total, dead) = sum_presence(&nodes, &[as_hash(&fields), other, HashMap::new()]);
        assert_eq!(total.sessions, 4);
        assert_eq!(total.rooms[&room("lobby")], 3);
        assert_eq!(total.rooms[&room("sessions")], 1);
        assert_eq!(dead, vec!["gone".to_owned()]);
    }
}
