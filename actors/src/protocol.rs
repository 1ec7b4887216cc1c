//! The WebSocket wire protocol: what clients may send and what the server sends.
//!
//! There are two kinds of client ([`ClientKind`]). A **plain** client (any
//! WebSocket client that asks for nothing) only exchanges data: every text
//! or binary message it sends is broadcast verbatim to its room, and it
//! receives exactly what is broadcast to it — no frame of the server's own.
//! A **protocol** client offers the subprotocol [`SUBPROTOCOL`]
//! (`happynet.v1`), which the server echoes; for it, a text frame whose
//! first non-blank character is `{` is a JSON control frame (join, leave,
//! publish), any other text or binary frame is data broadcast verbatim to
//! the sender's rooms, and the server sends it JSON frames with a `type`
//! field (welcome, joined, left, message, presence, error) besides the data.
//! Parsing is strict and total: every malformed input maps to a
//! [`ProtocolError`] that the session turns into an error frame, never a
//! panic.

use crate::history::{Position, Recover};
use crate::rooms::{RoomName, SessionId};
use actix_web::web::Bytes;
use bytestring::ByteString;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt;

/// The subprotocol a client offers (`Sec-WebSocket-Protocol`) to receive
/// protocol frames. The server echoes it, so the client knows it will.
pub const SUBPROTOCOL: &str = "happynet.v1";

/// Whether a session gets the server's own frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// Data only, both ways (the default).
    Plain,
    /// Offered [`SUBPROTOCOL`]: welcome, control, presence and error frames.
    Protocol,
}

impl ClientKind {
    /// The kind a client asked for, from the subprotocols it offered (each
    /// `Sec-WebSocket-Protocol` header value, comma-separated).
    pub fn offered<'a>(header_values: impl IntoIterator<Item = &'a str>) -> ClientKind {
        let asked = header_values
            .into_iter()
            .flat_map(|v| v.split(','))
            .any(|p| p.trim() == SUBPROTOCOL);
        if asked {
            ClientKind::Protocol
        } else {
            ClientKind::Plain
        }
    }
}

/// A frame a client sent, parsed.
#[derive(Debug)]
pub enum ClientFrame {
    /// Text data: broadcast verbatim to every room the sender is in.
    Text(ByteString),
    /// Binary data: broadcast verbatim, as binary, to every room the sender
    /// is in.
    Binary(Bytes),
    /// `{"type":"join","room":"r"}`, with `"since":"epoch:offset"` or
    /// `"recover":"last"` to be replayed what the room's history holds.
    Join {
        /// The room to join.
        room: RoomName,
        /// What to recover from the room's history once joined.
        recover: Option<Recover>,
    },
    /// `{"type":"leave","room":"r"}`
    Leave(RoomName),
    /// `{"type":"publish","room":"r","data":…}`: `data` is kept as the exact
    /// JSON text the client sent, so it is never re-serialised.
    Publish {
        /// The room to publish to; the sender must be a member.
        room: RoomName,
        /// The JSON value, verbatim.
        data: Box<RawValue>,
    },
}

impl PartialEq for ClientFrame {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ClientFrame::Text(a), ClientFrame::Text(b)) => a == b,
            (ClientFrame::Binary(a), ClientFrame::Binary(b)) => a == b,
            (
                ClientFrame::Join {
                    room: ra,
                    recover: xa,
                },
                ClientFrame::Join {
                    room: rb,
                    recover: xb,
                },
            ) => ra == rb && xa == xb,
            (ClientFrame::Leave(a), ClientFrame::Leave(b)) => a == b,
            (
                ClientFrame::Publish { room: ra, data: da },
                ClientFrame::Publish { room: rb, data: db },
            ) => ra == rb && da.get() == db.get(),
            _ => false,
        }
    }
}

/// Why a client frame was refused. The session answers with an error frame
/// and keeps the connection open.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The control frame was not valid JSON of a known shape.
    Malformed(String),
    /// The room name was not acceptable.
    BadRoom(String),
    /// A join's `since` or `recover` was not acceptable.
    BadSince(String),
}

impl ProtocolError {
    /// A short machine-readable code for the error frame.
    pub fn code(&self) -> &'static str {
        match self {
            ProtocolError::Malformed(_) => "malformed",
            ProtocolError::BadRoom(_) => "bad_room",
            ProtocolError::BadSince(_) => "bad_since",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Malformed(why) => write!(f, "malformed control frame: {why}"),
            ProtocolError::BadRoom(why) => write!(f, "bad room: {why}"),
            ProtocolError::BadSince(why) => write!(f, "bad since: {why}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// The shape every control frame shares. A plain struct rather than a
/// tagged enum: serde buffers tagged enums, and `RawValue` cannot be read from
/// a buffer, so `data` would lose its verbatim text.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Control<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    /// `join` only: `epoch:offset` of the last message the client has.
    #[serde(borrow, default)]
    since: Option<std::borrow::Cow<'a, str>>,
    /// `join` only: `"last"`, the room's last message.
    #[serde(borrow, default)]
    recover: Option<std::borrow::Cow<'a, str>>,
}

/// What a join asks to recover, from its `since` and `recover` (the query
/// of `/ws` takes the same two).
pub fn recover_of(
    since: Option<&str>,
    recover: Option<&str>,
) -> Result<Option<Recover>, ProtocolError> {
    match (since, recover) {
        (None, None) => Ok(None),
        (Some(since), None) => Position::parse(since)
            .map(|p| Some(Recover::Since(p)))
            .map_err(|e| ProtocolError::BadSince(e.to_string())),
        (None, Some("last")) => Ok(Some(Recover::Last)),
        (None, Some(other)) => Err(ProtocolError::BadSince(format!(
            "recover must be \"last\", got {other:?}"
        ))),
        (Some(_), Some(_)) => Err(ProtocolError::BadSince(
            "give since or recover, not both".into(),
        )),
    }
}

fn room(name: &str) -> Result<RoomName, ProtocolError> {
    RoomName::new(name).map_err(|e| ProtocolError::BadRoom(e.to_string()))
}

/// Parses one text frame from a protocol client. (A plain client's text is
/// always [`ClientFrame::Text`]: nothing it sends is parsed.)
pub fn parse_client_text(text: ByteString) -> Result<ClientFrame, ProtocolError> {
    if !text.trim_start().starts_with('{') {
        return Ok(ClientFrame::Text(text));
    }
    let control: Control<'_> =
        serde_json::from_str(&text).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let need_room = |room: Option<std::borrow::Cow<'_, str>>| match room {
        Some(r) => self::room(&r),
        None => Err(ProtocolError::Malformed("missing field `room`".into())),
    };
    if control.kind != "join" && (control.since.is_some() || control.recover.is_some()) {
        return Err(ProtocolError::Malformed(
            "only `join` takes `since` or `recover`".into(),
        ));
    }
    match (&*control.kind, control.data) {
        ("join", None) => Ok(ClientFrame::Join {
            room: need_room(control.room)?,
            recover: recover_of(control.since.as_deref(), control.recover.as_deref())?,
        }),
        ("leave", None) => Ok(ClientFrame::Leave(need_room(control.room)?)),
        ("publish", Some(data)) => Ok(ClientFrame::Publish {
            room: need_room(control.room)?,
            data,
        }),
        ("publish", None) => Err(ProtocolError::Malformed("missing field `data`".into())),
        ("join" | "leave", Some(_)) => Err(ProtocolError::Malformed(format!(
            "`{}` takes no `data`",
            control.kind
        ))),
        (other, _) => Err(ProtocolError::Malformed(format!(
            "unknown type `{other}`; expected join, leave or publish"
        ))),
    }
}

fn json_string(s: &str) -> String {
    // Serialising a &str cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// `{"type":"message","room":…,"data":…}`: what room members receive for a
/// publish. `room` is `null` for a message sent to everyone.
pub fn message_frame(room: Option<&RoomName>, data: &RawValue) -> ByteString {
    let room = room.map_or_else(|| "null".to_owned(), |r| json_string(r.as_str()));
    format!(
        r#"{{"type":"message","room":{room},"data":{}}}"#,
        data.get()
    )
    .into()
}

/// `{"type":"message","room":…,"offset":…,"epoch":…,"data":…}`: what
/// protocol clients receive for a room's message once history is on
/// ([`crate::history`]). `data` is the message: a publish's (or
/// [`message_frame`]'s) JSON value itself, spliced, when `payload` is this
/// room's message frame; any other text as a JSON string; binary as base64
/// with `"binary":true`.
pub fn stamped_frame(
    room: &RoomName,
    at: &Position,
    payload: &crate::messages::Payload,
) -> ByteString {
    use crate::messages::Payload;
    let room_json = json_string(room.as_str());
    let head = format!(
        r#"{{"type":"message","room":{room_json},"offset":{},"epoch":{}"#,
        at.offset,
        json_string(&at.epoch)
    );
    match payload {
        Payload::Text(text) => match message_data(&room_json, text) {
            Some(data) => format!(r#"{head},"data":{data}}}"#),
            None => format!(r#"{head},"data":{}}}"#, json_string(text)),
        },
        Payload::Binary(bytes) => {
            format!(r#"{head},"binary":true,"data":"{}"}}"#, base64(bytes))
        }
    }
    .into()
}

/// The `data` of `text` when it is exactly [`message_frame`]'s output for
/// the room whose JSON name is `room_json`, and that data is valid JSON (a
/// plain client may send text that only looks like one).
fn message_data<'t>(room_json: &str, text: &'t str) -> Option<&'t str> {
    let rest = text.strip_prefix(r#"{"type":"message","room":"#)?;
    let rest = rest.strip_prefix(room_json)?;
    let data = rest.strip_prefix(r#","data":"#)?.strip_suffix('}')?;
    serde_json::from_str::<&RawValue>(data).ok()?;
    Some(data)
}

/// Standard base64 with padding (RFC 4648 §4), for binary data in a JSON
/// frame.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `{"type":"recovered","room":…,"complete":true,"replayed":n}` before the
/// `n` replayed messages, or `{"type":"recovered","room":…,"complete":false}`
/// when the history did not cover what the client missed (it should reload).
pub fn recovered_frame(room: &RoomName, replayed: Option<usize>) -> ByteString {
    let room = json_string(room.as_str());
    match replayed {
        Some(n) => {
            format!(r#"{{"type":"recovered","room":{room},"complete":true,"replayed":{n}}}"#)
        }
        None => format!(r#"{{"type":"recovered","room":{room},"complete":false}}"#),
    }
    .into()
}

/// `{"type":"welcome","session":…,"rooms":[…]}`: the first frame a protocol
/// client receives. The hub has registered the session before its `101`
/// went out, so a client need not wait for it before relying on broadcasts
/// reaching it; it says which session id and rooms it has.
pub fn welcome_frame(session: SessionId, rooms: &[RoomName]) -> ByteString {
    let rooms: Vec<String> = rooms.iter().map(|r| json_string(r.as_str())).collect();
    format!(
        r#"{{"type":"welcome","session":{session},"rooms":[{}]}}"#,
        rooms.join(",")
    )
    .into()
}

/// `{"type":"joined","room":…,"members":n}`
pub fn joined_frame(room: &RoomName, members: usize) -> ByteString {
    format!(
        r#"{{"type":"joined","room":{},"members":{members}}}"#,
        json_string(room.as_str())
    )
    .into()
}

/// `{"type":"left","room":…}`
pub fn left_frame(room: &RoomName) -> ByteString {
    format!(r#"{{"type":"left","room":{}}}"#, json_string(room.as_str())).into()
}

/// `{"type":"error","code":…,"message":…}`
pub fn error_frame(code: &str, message: &str) -> ByteString {
    format!(
        r#"{{"type":"error","code":{},"message":{}}}"#,
        json_string(code),
        json_string(message)
    )
    .into()
}

/// What a protocol client is told when its message met a full mailbox (the
/// session's to the hub, or a shard's to the router) and was dropped.
pub fn busy_frame() -> ByteString {
    error_frame("busy", "the server is overloaded; your message was dropped")
}

/// The close reason (with 1013) that tells a plain client the same: it
/// cannot be told in a frame.
pub const BUSY_CLOSE_REASON: &str = "server overloaded";

/// `{"type":"presence","clients":n,"rooms":{"lobby":n,…}}`, sent to sessions
/// that asked for presence (`/ws?presence=1`).
pub fn presence_frame<'a>(
    clients: usize,
    rooms: impl Iterator<Item = (&'a RoomName, usize)>,
) -> ByteString {
    let rooms: Vec<String> = rooms
        .map(|(r, n)| format!("{}:{n}", json_string(r.as_str())))
        .collect();
    format!(
        r#"{{"type":"presence","clients":{clients},"rooms":{{{}}}}}"#,
        rooms.join(",")
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(s: &str) -> Result<ClientFrame, ProtocolError> {
        parse_client_text(ByteString::from(s.to_owned()))
    }

    #[test]
    fn the_kind_is_protocol_only_when_the_subprotocol_is_offered() {
        assert_eq!(ClientKind::offered([]), ClientKind::Plain);
        assert_eq!(ClientKind::offered(["happynet"]), ClientKind::Plain);
        assert_eq!(ClientKind::offered(["happynet.v10"]), ClientKind::Plain);
        assert_eq!(
            ClientKind::offered(["happynet, happynet.v1"]),
            ClientKind::Protocol
        );
        assert_eq!(
            ClientKind::offered(["token.abc", " happynet.v1 "]),
            ClientKind::Protocol
        );
    }

    #[test]
    fn plain_text_is_text_verbatim() {
        assert_eq!(
            parse("  hello {not json"),
            Ok(ClientFrame::Text("  hello {not json".into()))
        );
    }

    #[test]
    fn control_frames_parse() {
        assert_eq!(
            parse(r#"{"type":"join","room":"r1"}"#),
            Ok(ClientFrame::Join {
                room: RoomName::new("r1").unwrap(),
                recover: None
            })
        );
        assert_eq!(
            parse(r#" {"room":"r1","type":"leave"}"#),
            Ok(ClientFrame::Leave(RoomName::new("r1").unwrap()))
        );
        match parse(r#"{"type":"publish","room":"r","data":{"a":[1,2]}}"#) {
            Ok(ClientFrame::Publish { room, data }) => {
                assert_eq!(room.as_str(), "r");
                assert_eq!(data.get(), r#"{"a":[1,2]}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_control_frames_are_errors_not_panics() {
        for bad in [
            "{",
            "{}",
            r#"{"type":"dance"}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":7}"#,
            r#"{"type":"join","room":"r","extra":1}"#,
            r#"{"type":"publish","room":"r"}"#,
            "{\"type\":\"join\",\"room\":\"r\"} trailing",
        ] {
            assert!(
                matches!(parse(bad), Err(ProtocolError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(r#"{"type":"join","room":""}"#),
            Err(ProtocolError::BadRoom(_))
        ));
    }

    #[test]
    fn joins_take_since_or_recover_last() {
        match parse(r#"{"type":"join","room":"r","since":"e-1:41"}"#) {
            Ok(ClientFrame::Join {
                recover: Some(Recover::Since(p)),
                ..
            }) => assert_eq!((&*p.epoch, p.offset), ("e-1", 41)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            parse(r#"{"type":"join","room":"r","recover":"last"}"#),
            Ok(ClientFrame::Join {
                recover: Some(Recover::Last),
                ..
            })
        ));
        for bad in [
            r#"{"type":"join","room":"r","since":"nope"}"#,
            r#"{"type":"join","room":"r","recover":"all"}"#,
            r#"{"type":"join","room":"r","since":"e:1","recover":"last"}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(ProtocolError::BadSince(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse(r#"{"type":"leave","room":"r","since":"e:1"}"#),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn stamped_frames_carry_the_data_as_json() {
        use crate::messages::Payload;
        let r = RoomName::new("r \"q\"").unwrap();
        let at = Position {
            epoch: "e-1".into(),
            offset: 7,
        };
        let v: Value =
            serde_json::from_str(&stamped_frame(&r, &at, &Payload::Text("hi \"x\"".into())))
                .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"message","room":"r \"q\"","offset":7,"epoch":"e-1","data":"hi \"x\""})
        );
        // This room's message frame: its data spliced, not quoted.
        let data = RawValue::from_string(r#"{"n":[1,2]}"#.into()).unwrap();
        let framed = Payload::Text(message_frame(Some(&r), &data));
        let v: Value = serde_json::from_str(&stamped_frame(&r, &at, &framed)).unwrap();
        assert_eq!(v["data"], serde_json::json!({"n":[1,2]}));
        // Another room's, or one that only looks like it: a string.
        let other = RoomName::new("o").unwrap();
        let v: Value = serde_json::from_str(&stamped_frame(&other, &at, &framed)).unwrap();
        assert_eq!(v["data"], framed_text(&framed));
        let fake = Payload::Text(r#"{"type":"message","room":"o","data":1,"x":}"#.into());
        let v: Value = serde_json::from_str(&stamped_frame(&other, &at, &fake)).unwrap();
        assert_eq!(v["data"], framed_text(&fake));
        // Binary: base64.
        for (bytes, b64) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"\x00\xff\xfe\x01", "AP/+AQ=="),
        ] {
            let v: Value = serde_json::from_str(&stamped_frame(
                &r,
                &at,
                &Payload::Binary(Bytes::copy_from_slice(bytes)),
            ))
            .unwrap();
            assert_eq!(v["binary"], true);
            assert_eq!(v["data"], b64);
        }
        let v: Value = serde_json::from_str(&recovered_frame(&r, Some(3))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"recovered","room":"r \"q\"","complete":true,"replayed":3})
        );
        let v: Value = serde_json::from_str(&recovered_frame(&r, None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"recovered","room":"r \"q\"","complete":false})
        );
    }

    fn framed_text(p: &crate::messages::Payload) -> String {
        String::from_utf8(p.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn server_frames_are_valid_json() {
        let r = RoomName::new("r \"quoted\"").unwrap();
        let data = RawValue::from_string("[1,\"two\"]".into()).unwrap();
        let v: Value = serde_json::from_str(&message_frame(Some(&r), &data)).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["room"], "r \"quoted\"");
        assert_eq!(v["data"][1], "two");
        let v: Value = serde_json::from_str(&message_frame(None, &data)).unwrap();
        assert!(v["room"].is_null());

        let v: Value = serde_json::from_str(&welcome_frame(7, std::slice::from_ref(&r))).unwrap();
        assert_eq!(v["session"], 7);
        assert_eq!(v["rooms"][0], "r \"quoted\"");
        let v: Value = serde_json::from_str(&error_frame("x", "a \"b\"\n")).unwrap();
        assert_eq!(v["message"], "a \"b\"\n");
        let v: Value = serde_json::from_str(&joined_frame(&r, 3)).unwrap();
        assert_eq!(v["members"], 3);
        let v: Value = serde_json::from_str(&left_frame(&r)).unwrap();
        assert_eq!(v["type"], "left");
        let v: Value =
            serde_json::from_str(&presence_frame(5, [(&r, 2usize)].into_iter())).unwrap();
        assert_eq!(v["clients"], 5);
        assert_eq!(v["rooms"]["r \"quoted\""], 2);
    }
}
