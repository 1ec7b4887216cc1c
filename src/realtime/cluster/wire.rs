//! The stream's wire format: entry ids, and the fields of an entry, written
//! for `XADD` ([`add_xadd`]) and read back from raw `XREAD` replies
//! ([`decode_read_reply`]) one entry at a time.
//!
//! An entry has four fields: `node` (the origin: random per process start),
//! `seq` (consecutive per origin), `target` (`all` or a JSON array of room
//! names) and `payload` (the frame's data, verbatim); a binary broadcast has
//! a fifth, `kind` = `binary` (without it an entry is text, so text entries
//! read the same as before binary existed). A room broadcast positioned by
//! the sequencer (history on, see [`super::sequencer`]) has one more,
//! `positions`: `epoch:offset` of each target room, in the target's order,
//! separated by spaces (epochs are printable ASCII without spaces or `:`).
//! Decoding never fails a whole
//! read for one bad entry, and its errors never quote a reply's content.

use super::outbox::OutEntry;
use actix_web::web::Bytes;
use bytestring::ByteString;
use happynet_actors::{Payload, Position, RelayTarget, RoomName, Target};
use std::fmt;

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
    /// decode: the [`SeqTracker`](super::SeqTracker) sees them even when the rest is bad, so a
    /// malformed entry is not also counted as lost.
    pub sender: Option<(String, u64)>,
    /// Who receives it and the frame's data, or why it is malformed.
    pub content: Result<(Target, Payload), String>,
    /// Its position in each of its target rooms (in the target's order),
    /// when the sequencer gave it some.
    pub positions: Option<Vec<Position>>,
}

/// The `positions` field of a positioned entry: each room's `epoch:offset`,
/// in the target's order.
pub fn encode_positions(positions: &[Position]) -> String {
    let texts: Vec<String> = positions.iter().map(Position::to_string).collect();
    texts.join(" ")
}

/// Reads a `positions` field back, checking it has one position per room
/// of `target`.
pub fn decode_positions(text: &str, target: &Target) -> Result<Vec<Position>, String> {
    let rooms = match target {
        Target::Room(_) => 1,
        Target::Rooms(rooms) => rooms.len(),
        Target::All | Target::Session(_) => return Err("positions for no room".to_owned()),
    };
    let positions = text
        .split(' ')
        .map(|p| Position::parse(p).map_err(|e| format!("bad position: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if positions.len() != rooms || positions.iter().any(|p| p.offset == 0) {
        return Err(format!(
            "{} positions for {rooms} rooms (or an offset 0)",
            positions.len()
        ));
    }
    Ok(positions)
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

/// Adds the `XADD` of `entry` to `pipe`: the fields [`decode_entry`] reads
/// back, on `stream`, trimmed to about `max_len` entries. `origin` is this
/// node's origin id.
pub fn add_xadd(
    pipe: &mut redis::Pipeline,
    stream: &str,
    max_len: usize,
    origin: &str,
    entry: &OutEntry,
) {
    pipe.cmd("XADD")
        .arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*")
        .arg("node")
        .arg(origin)
        .arg("seq")
        .arg(entry.seq)
        .arg("target")
        .arg(encode_target(&entry.target))
        .arg("payload")
        .arg(entry.payload.as_bytes());
    if entry.payload.is_binary() {
        pipe.arg("kind").arg(KIND_BINARY);
    }
    pipe.ignore();
}

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
        positions: None,
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
    let has_positions = fields.iter().any(|(n, _)| *n == b"positions");
    if let (true, Ok((target, _))) = (has_positions, &entry.content) {
        match field_text(&fields, "positions").and_then(|t| decode_positions(&t, target)) {
            Ok(positions) => entry.positions = Some(positions),
            Err(e) => entry.content = Err(e),
        }
    }
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
    fn positions_round_trip_and_must_match_the_rooms() {
        let two = Target::Rooms(vec![room("a"), room("b")]);
        let at = |e: &str, o| Position {
            epoch: e.into(),
            offset: o,
        };
        let text = encode_positions(&[at("c1-1", 3), at("c2-4", 9)]);
        assert_eq!(text, "c1-1:3 c2-4:9");
        assert_eq!(
            decode_positions(&text, &two),
            Ok(vec![at("c1-1", 3), at("c2-4", 9)])
        );
        assert!(decode_positions("c1-1:3", &two).is_err());
        assert!(decode_positions("c1-1:3", &Target::All).is_err());
        assert!(decode_positions("c1-1:0", &Target::Room(room("a"))).is_err());
        assert!(decode_positions("c1-1", &Target::Room(room("a"))).is_err());
        let entry = decode_entry(&raw_entry(
            "7-0",
            &[
                (b"node", b"n1"),
                (b"seq", b"1"),
                (b"target", br#"["a","b"]"#),
                (b"payload", b"x"),
                (b"positions", b"c1-1:3 c2-4:9"),
            ],
        ));
        assert_eq!(entry.positions, Some(vec![at("c1-1", 3), at("c2-4", 9)]));
        assert!(entry.content.is_ok());
        let bad = decode_entry(&raw_entry(
            "7-1",
            &[
                (b"node", b"n1"),
                (b"seq", b"2"),
                (b"target", br#"["a"]"#),
                (b"payload", b"x"),
                (b"positions", b"c1-1:3 c2-4:9"),
            ],
        ));
        assert!(bad.content.is_err() && bad.positions.is_none());
        assert_eq!(bad.sender, Some(("n1".to_owned(), 2)), "still not a gap");
        // Unpositioned entries read as before.
        assert_eq!(decode_entry(&good("8-0", "n1", "3")).positions, None);
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
}
