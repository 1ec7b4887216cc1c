//! The cluster's sequencer, with history on: Redis gives every room
//! broadcast its position in each of its rooms, cluster-wide, in the same
//! atomic step that appends it to the stream, so that stream order is
//! offset order for every room on every node.
//!
//! One Lua script ([`SCRIPT`]) publishes a whole batch of the outbox, in
//! order. For an entry to be positioned it takes, per target room, the
//! room's record `{prefix}:room:{room}` (a hash: `epoch`, `offset`),
//! creating it with the candidate epoch the node passes when it is missing,
//! `HINCRBY offset 1`, and refreshes its expiry ([`record_ttl`]); then it
//! `XADD`s one entry (`MAXLEN ~`) with the usual fields plus `positions`.
//! Plain entries (broadcasts to everyone, and room broadcasts that were
//! delivered locally while the link was down) are `XADD`ed as they are,
//! in their turn, so the stream keeps the node's one order. A
//! record that expired or was flushed is created again with a new
//! candidate: a new epoch, and recoveries from the old one say
//! `complete:false`, which is right. Room names are keys as they are:
//! Redis keys are binary-safe, and a [`RoomName`] (no control characters,
//! at most 64 bytes) under the `{prefix}:room:` prefix names nothing else.
//! The script declares every key it touches, but touches the stream and
//! several room records at once: it needs one Redis (or one shard), as
//! the rest of the cluster's design does.
//!
//! A batch is one `EVALSHA` (the script is loaded when the link comes up,
//! and sent whole if the server answers `NOSCRIPT`), so a failure runs
//! either none of it or, reply lost, all of it: never half. Besides the
//! script this file has [`Unconfirmed`], the published entries not yet read
//! back, which the bridge delivers itself when the link is lost before
//! they come back from the stream, and [`Held`], what waits behind them.

use super::outbox::OutEntry;
use super::wire::{encode_target, KIND_BINARY};
use happynet_actors::{RelayTarget, RoomName};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Publishes a batch; see the module docs. `KEYS[1]` is the stream, then
/// the room records of every positioned entry, in order. `ARGV`: `MAXLEN`,
/// the records' expiry in ms, the candidate epoch, the origin, the number
/// of entries, then per entry `seq`, the number of rooms to position (0:
/// plain), `kind` (empty: text), `target`, `payload`. Returns the number
/// of entries added.
pub const SCRIPT: &str = r#"
local stream = KEYS[1]
local maxlen, ttl, candidate, origin = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local n = tonumber(ARGV[5])
local a, k = 6, 2
for i = 1, n do
  local seq, rooms, kind = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2]
  local fields = {'node', origin, 'seq', seq, 'target', ARGV[a + 3], 'payload', ARGV[a + 4]}
  a = a + 5
  if kind ~= '' then
    fields[#fields + 1] = 'kind'
    fields[#fields + 1] = kind
  end
  if rooms > 0 then
    local positions = {}
    for r = 1, rooms do
      local key = KEYS[k]
      k = k + 1
      local epoch = redis.call('HGET', key, 'epoch')
      if not epoch then
        epoch = candidate
        redis.call('HSET', key, 'epoch', epoch)
      end
      local offset = redis.call('HINCRBY', key, 'offset', 1)
      redis.call('PEXPIRE', key, ttl)
      positions[r] = epoch .. ':' .. offset
    end
    fields[#fields + 1] = 'positions'
    fields[#fields + 1] = table.concat(positions, ' ')
  end
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
end
return n
"#;

/// The shortest a room record lives after its last message: a record
/// must outlive the history every node keeps of it (`ttl`), and a room
/// quiet for a minute losing its epoch is harmless, so short `ttl`s get
/// this much.
pub const RECORD_TTL_FLOOR: Duration = Duration::from_secs(60);

/// How long a room's record lives after its last message.
pub fn record_ttl(history_ttl: Duration) -> Duration {
    history_ttl.max(RECORD_TTL_FLOOR)
}

/// The key of `room`'s record.
pub fn room_key(prefix: &str, room: &RoomName) -> String {
    format!("{prefix}:room:{}", room.as_str())
}

/// A candidate epoch: `c{run}-{n}`, where `run` is drawn once per bridge
/// and `n` counts its batches, so no two candidates are ever the same and
/// none looks like a node-local epoch. At most 38 bytes, printable, no `:`
/// or space.
pub fn candidate_epoch(run: u64, n: u64) -> String {
    format!("c{run:016x}-{n}")
}

/// The keys and arguments of [`SCRIPT`] for `batch`, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptCall {
    /// `KEYS`.
    pub keys: Vec<String>,
    /// `ARGV`.
    pub args: Vec<Vec<u8>>,
}

/// What the script needs besides the batch.
#[derive(Debug, Clone)]
pub struct ScriptContext<'a> {
    /// The cluster's key prefix.
    pub prefix: &'a str,
    /// The stream's key.
    pub stream: &'a str,
    /// Its `MAXLEN ~`.
    pub max_len: usize,
    /// The records' expiry.
    pub record_ttl: Duration,
    /// This node's origin id.
    pub origin: &'a str,
}

/// Builds the call of [`SCRIPT`] for `batch` with the candidate epoch
/// `candidate`.
pub fn script_call(cx: &ScriptContext<'_>, candidate: &str, batch: &[OutEntry]) -> ScriptCall {
    let mut keys = vec![cx.stream.to_owned()];
    let mut args: Vec<Vec<u8>> = vec![
        cx.max_len.to_string().into_bytes(),
        (cx.record_ttl.as_millis().max(1) as u64)
            .to_string()
            .into_bytes(),
        candidate.as_bytes().to_vec(),
        cx.origin.as_bytes().to_vec(),
        batch.len().to_string().into_bytes(),
    ];
    for entry in batch {
        let rooms: &[RoomName] = match (&entry.target, entry.sequenced) {
            (RelayTarget::Rooms(rooms), true) => rooms,
            _ => &[],
        };
        keys.extend(rooms.iter().map(|r| room_key(cx.prefix, r)));
        let kind: &[u8] = if entry.payload.is_binary() {
            KIND_BINARY.as_bytes()
        } else {
            b""
        };
        args.push(entry.seq.to_string().into_bytes());
        args.push(rooms.len().to_string().into_bytes());
        args.push(kind.to_vec());
        args.push(encode_target(&entry.target).into_bytes());
        args.push(entry.payload.as_bytes().to_vec());
    }
    ScriptCall { keys, args }
}

/// This node's sequenced entries (room broadcasts and broadcasts to
/// everyone) that were published and not yet read back from the stream, oldest first, at most `max` (the outbox's
/// `outbox_max`). When the link is lost the bridge delivers them here
/// itself (their copies in the stream are then repeats,
/// [`super::SeqTracker::claim_own`]). One dropped for room (a reader
/// more than `max` entries behind) is still in the stream and delivered
/// when it is read — unless the link is lost first: then it is not
/// delivered on this node (the one loss of this design, and only behind
/// a reader that far behind).
#[derive(Debug)]
pub struct Unconfirmed {
    max: usize,
    entries: VecDeque<OutEntry>,
    /// The highest own `seq` read back: the stream may bring an entry back
    /// before the script's reply says it was published.
    read: u64,
}

impl Unconfirmed {
    /// Empty, holding at most `max` (at least one).
    pub fn new(max: usize) -> Self {
        Unconfirmed {
            max: max.max(1),
            entries: VecDeque::new(),
            read: 0,
        }
    }

    /// `entries` were published; the sequenced ones wait to be read back
    /// (unless they were already).
    pub fn published(&mut self, entries: impl IntoIterator<Item = OutEntry>) {
        let read = self.read;
        for entry in entries.into_iter().filter(|e| e.sequenced && e.seq > read) {
            if self.entries.len() >= self.max {
                self.entries.pop_front();
            }
            self.entries.push_back(entry);
        }
    }

    /// Own entry `seq` was read back: it and every older one are confirmed
    /// (the stream is in publishing order).
    pub fn read_back(&mut self, seq: u64) {
        self.read = self.read.max(seq);
        while self.entries.front().is_some_and(|e| e.seq <= seq) {
            self.entries.pop_front();
        }
    }

    /// Every entry still unconfirmed, oldest first (the link is lost).
    pub fn take(&mut self) -> Vec<OutEntry> {
        self.entries.drain(..).collect()
    }

    /// Entries waiting now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if none waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// What waits for this node's own earlier broadcasts to be delivered here
/// (read back from the stream, or by the fallback): a broadcast to one
/// session, which is never published, and a closing session's flush. Each
/// is held behind the newest own `seq` numbered when it came, and released
/// in order once that `seq` is delivered, or after `wait` (a stalled Redis
/// must not hold a closing session), at most `max` at once (the oldest is
/// released early for room).
#[derive(Debug)]
pub struct Held<T> {
    max: usize,
    wait: Duration,
    /// `(behind, since, item)`, both keys non-decreasing.
    items: VecDeque<(u64, Instant, T)>,
}

impl<T> Held<T> {
    /// Empty, holding at most `max` (at least one) for at most `wait` each.
    pub fn new(max: usize, wait: Duration) -> Self {
        Held {
            max: max.max(1),
            wait,
            items: VecDeque::new(),
        }
    }

    /// Holds `item` behind own `seq` `behind` at `now`, unless the
    /// newest own entry delivered, `delivered`, is there already: then it
    /// is handed back at once (with nothing held before it), as is the
    /// oldest held one when full.
    pub fn hold(&mut self, behind: u64, delivered: u64, now: Instant, item: T) -> Vec<T> {
        let mut out = self.release(delivered, now);
        if self.items.is_empty() && behind <= delivered {
            out.push(item);
            return out;
        }
        if self.items.len() >= self.max {
            out.extend(self.items.pop_front().map(|(_, _, item)| item));
        }
        self.items.push_back((behind, now, item));
        out
    }

    /// The items, oldest first, that are no longer behind anything:
    /// `delivered` reached them, or they waited long enough at `now`.
    pub fn release(&mut self, delivered: u64, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        while let Some((behind, since, _)) = self.items.front() {
            if *behind > delivered && now.saturating_duration_since(*since) < self.wait {
                break;
            }
            out.extend(self.items.pop_front().map(|(_, _, item)| item));
        }
        out
    }

    /// Items held now.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True if none is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytestring::ByteString;
    use happynet_actors::Payload;

    fn room(name: &str) -> RoomName {
        RoomName::new(name).unwrap()
    }

    fn entry(seq: u64, target: RelayTarget, sequenced: bool) -> OutEntry {
        OutEntry {
            seq,
            target,
            payload: Payload::Text(ByteString::from(format!("m{seq}"))),
            sequenced,
        }
    }

    fn text(args: &[Vec<u8>]) -> Vec<String> {
        args.iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    #[test]
    fn a_batch_is_one_call_with_the_rooms_to_position_as_keys_in_order() {
        let cx = ScriptContext {
            prefix: "hn",
            stream: "hn:broadcasts",
            max_len: 1000,
            record_ttl: Duration::from_secs(300),
            origin: "node-1",
        };
        let batch = [
            entry(7, RelayTarget::Rooms(vec![room("a"), room("b c")]), true),
            entry(8, RelayTarget::All, false),
            // Delivered locally during an outage: relayed plain.
            entry(9, RelayTarget::Rooms(vec![room("a")]), false),
            entry(10, RelayTarget::Rooms(vec![room("x:y")]), true),
        ];
        let call = script_call(&cx, "c1-1", &batch);
        assert_eq!(
            call.keys,
            vec!["hn:broadcasts", "hn:room:a", "hn:room:b c", "hn:room:x:y"]
        );
        assert_eq!(
            text(&call.args),
            vec![
                "1000",
                "300000",
                "c1-1",
                "node-1",
                "4", //
                "7",
                "2",
                "",
                r#"["a","b c"]"#,
                "m7", //
                "8",
                "0",
                "",
                "all",
                "m8", //
                "9",
                "0",
                "",
                r#"["a"]"#,
                "m9", //
                "10",
                "1",
                "",
                r#"["x:y"]"#,
                "m10",
            ]
        );
    }

    #[test]
    fn record_ttls_and_candidates() {
        assert_eq!(record_ttl(Duration::from_secs(1)), RECORD_TTL_FLOOR);
        assert_eq!(
            record_ttl(Duration::from_secs(600)),
            Duration::from_secs(600)
        );
        let c = candidate_epoch(u64::MAX, u64::MAX);
        assert!(c.len() <= 64);
        let p = happynet_actors::Position::parse(&format!("{c}:1")).unwrap();
        assert_eq!(&*p.epoch, c);
        assert_ne!(candidate_epoch(1, 2), candidate_epoch(1, 3));
    }

    #[test]
    fn an_entry_read_back_before_its_reply_is_not_unconfirmed() {
        let r = || RelayTarget::Rooms(vec![room("a")]);
        let mut u = Unconfirmed::new(10);
        // The reader got 1 and 2 before the script's reply was handled.
        u.read_back(2);
        u.published([
            entry(1, r(), true),
            entry(2, r(), true),
            entry(3, r(), true),
        ]);
        assert_eq!(u.take().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn unconfirmed_entries_wait_until_read_back_and_are_bounded() {
        let r = || RelayTarget::Rooms(vec![room("a")]);
        let mut u = Unconfirmed::new(3);
        u.published([entry(1, r(), true), entry(2, RelayTarget::All, false)]);
        u.published([entry(3, r(), true), entry(4, r(), true)]);
        assert_eq!(u.len(), 3, "only positioned ones wait");
        u.read_back(3);
        assert_eq!(u.take().iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4]);
        assert!(u.is_empty());
        u.published((5..=9).map(|s| entry(s, r(), true)));
        assert_eq!(u.len(), 3, "the oldest make room: they are in the stream");
        assert_eq!(u.take()[0].seq, 7);
    }

    #[test]
    fn held_items_wait_for_the_own_entries_before_them_in_order() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(2);
        let mut h = Held::new(3, wait);
        // Nothing undelivered before it: at once.
        assert_eq!(h.hold(4, 4, t0, "a"), vec!["a"]);
        assert_eq!(h.hold(6, 4, t0, "b"), Vec::<&str>::new());
        // Behind b (and 7): waits even though 6 would release b alone.
        assert!(h.hold(7, 4, t0, "c").is_empty());
        assert!(h.release(5, t0).is_empty());
        assert_eq!(h.release(6, t0), vec!["b"]);
        // Not overtaking c although nothing is undelivered before it.
        assert!(h.hold(6, 6, t0, "d").is_empty());
        assert_eq!(h.release(7, t0), vec!["c", "d"]);
        assert!(h.is_empty());
    }

    #[test]
    fn held_items_are_bounded_in_time_and_count() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(2);
        let mut h = Held::new(2, wait);
        assert!(h.hold(9, 0, t0, 1).is_empty());
        assert!(h.hold(9, 0, t0 + Duration::from_secs(1), 2).is_empty());
        // Full: the oldest goes early.
        assert_eq!(h.hold(9, 0, t0 + Duration::from_secs(1), 3), vec![1]);
        assert_eq!(h.len(), 2);
        assert!(h.release(0, t0 + Duration::from_millis(2999)).is_empty());
        assert_eq!(h.release(0, t0 + Duration::from_secs(3)), vec![2, 3]);
    }
}
