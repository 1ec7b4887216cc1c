//! Property tests on hostile WebSocket clients: random frame sequences,
//! fragmentations, control frames, close frames and control JSON, written
//! on a raw TCP socket (so nothing tidies them first) in random chunks,
//! into a real session of a real server.
//!
//! Each case is a run of valid messages (text or binary, whole or in
//! fragments with pings between them, random control JSON for a protocol
//! client) that ends in one of three ways: a valid close, one protocol
//! violation of a known kind, or random bytes. What must hold:
//! - a valid run gets back exactly its data, in order (plain clients), and
//!   its own close code echoed; a violation gets the close code RFC 6455
//!   §7.4.1 and the README give for it (1002, 1007, 1009); random bytes get
//!   one of the documented codes or a closed connection; then the server
//!   closes the TCP connection, in every case;
//! - every protocol frame a protocol client gets has a documented `type`,
//!   and every error frame a documented `code`;
//! - a bystander in the same room is unaffected: it stays connected and
//!   receives the data of each run in order (all of a valid run, a prefix
//!   of one cut short), nothing else;
//! - no thread panics, and the hub ends with only the bystander.
//!
//! 1,024 cases per run, from a fresh seed each time (printed; set
//! `HOSTILE_WS_SEED` to replay one). `cargo test --test hostile_ws --
//! --nocapture` prints the counts per ending.

#![allow(clippy::unwrap_used)]

mod support;

use happynet::Broadcast;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{RngAlgorithm, TestRng, TestRunner};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use support::{config, start, wait_for_hub, Received, WsClient, WAIT};
use testkit::ws::{client_close, client_frame, RawWsClient, PROTOCOL_HEADER};

const CASES: usize = 1024;
/// `max_message_bytes` for this server: small, so that "too big" is cheap.
const MAX_MESSAGE: usize = 4096;

/// Frame types a protocol client may receive (README, "Server → protocol
/// client"), and the error codes an error frame may carry.
const PROTOCOL_TYPES: &[&str] = &[
    "welcome",
    "joined",
    "left",
    "message",
    "presence",
    "recovered",
    "error",
];
const ERROR_CODES: &[&str] = &[
    "malformed",
    "bad_room",
    "bad_since",
    "not_member",
    "too_many_rooms",
    "server_full",
    "no_room",
    "busy",
];
/// Close codes the server may send a client that sent random bytes
/// (README, "Close codes"); 1008 is the rate limit, set out of reach here.
const DOCUMENTED_CLOSE: &[u16] = &[1002, 1007, 1009];

/// Panics on any thread (a worker, the hub's arbiter), counted by a hook.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// One valid part of a run.
#[derive(Debug, Clone)]
enum Piece {
    /// A data message, in `fragments` pieces (1: one frame), with a ping
    /// between fragments when `pings` is set.
    Data {
        binary: bool,
        bytes: Vec<u8>,
        fragments: usize,
        pings: bool,
    },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// JSON-ish text: a control frame for a protocol client, data for a
    /// plain one.
    Control(String),
}

/// How a run ends.
#[derive(Debug, Clone)]
enum Ending {
    /// A valid close frame with this code (and a short UTF-8 reason).
    Close(u16),
    Violation(Violation),
    /// Random bytes, then the client shuts its sending side.
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Violation {
    /// A data frame with RSV bits (`0x10..=0x70`) set.
    ReservedBits(u8),
    /// Opcode 3–7 or 11–15.
    ReservedOpcode(u8),
    StrayContinuation,
    /// A text frame while a fragmented message is open.
    NewMessageInsideFragmented,
    /// A ping without FIN.
    FragmentedControl,
    /// A ping with 126..=200 payload bytes.
    LongControl(usize),
    /// Text whose bytes stop being UTF-8 at `at`, sent in `fragments`.
    BadUtf8 {
        text: String,
        at: usize,
        fragments: usize,
    },
    /// A message of more than `MAX_MESSAGE` bytes in `fragments`.
    TooBig {
        len: usize,
        fragments: usize,
    },
    CloseOneByte,
    /// A close code that may not appear on the wire.
    CloseBadCode(u16),
    /// A close reason that is not UTF-8.
    CloseBadReason,
    /// A frame without the mask bit.
    Unmasked,
}

impl Violation {
    fn close_code(&self) -> u16 {
        match self {
            Violation::BadUtf8 { .. } | Violation::CloseBadReason => 1007,
            Violation::TooBig { .. } => 1009,
            _ => 1002,
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    protocol: bool,
    pieces: Vec<Piece>,
    ending: Ending,
    /// Where the bytes are cut into separate writes (fractions of the
    /// total, in thousandths).
    cuts: Vec<u16>,
}

/// Text that a protocol client's session treats as data: its first
/// non-blank character is never `{`.
fn data_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9 ,.!?é☃😀]{0,200}",
        Just("x".repeat(MAX_MESSAGE)),
        Just(String::new()),
    ]
}

fn room_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::from("lobby")),
        "[a-z]{1,8}".prop_map(Value::from),
        "[ -~]{0,80}".prop_map(Value::from),
        Just(Value::from("x".repeat(300))),
        Just(Value::from(7)),
        Just(Value::Null),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[ -~é☃]{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,5}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Control JSON: the documented types with random (often wrong) fields,
/// unknown types, and text that is not JSON at all.
fn control_text() -> impl Strategy<Value = String> {
    let typ = prop_oneof![
        Just(Value::from("join")),
        Just(Value::from("leave")),
        Just(Value::from("publish")),
        Just(Value::from("welcome")),
        "[a-z]{0,8}".prop_map(Value::from),
        Just(Value::from(1)),
    ];
    let object = (
        prop::option::of(typ),
        prop::option::of(room_name()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
    )
        .prop_map(|(typ, room, data, extra)| {
            let mut m = serde_json::Map::new();
            if let Some(t) = typ {
                m.insert("type".into(), t);
            }
            if let Some(r) = room {
                m.insert("room".into(), r);
            }
            if let Some(d) = data {
                m.insert("data".into(), d);
            }
            if let Some(e) = extra {
                m.insert("since".into(), e);
            }
            Value::Object(m).to_string()
        });
    prop_oneof![
        4 => object,
        1 => "\\{[ -~]{0,40}",
        1 => "[ \t]{0,3}\\{\"type\":\"join\",\"room\":[ -~]{0,10}",
    ]
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        6 => (data_text(), 1..5usize, any::<bool>()).prop_map(|(t, fragments, pings)| Piece::Data {
            binary: false,
            bytes: t.into_bytes(),
            fragments,
            pings,
        }),
        3 => (prop::collection::vec(any::<u8>(), 0..300), 1..5usize, any::<bool>()).prop_map(
            |(bytes, fragments, pings)| Piece::Data { binary: true, bytes, fragments, pings }
        ),
        1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Piece::Ping),
        1 => prop::collection::vec(any::<u8>(), 0..=125).prop_map(Piece::Pong),
        3 => control_text().prop_map(Piece::Control),
    ]
}

fn violation() -> impl Strategy<Value = Violation> {
    prop_oneof![
        (1..8u8).prop_map(|r| Violation::ReservedBits(r << 4)),
        prop_oneof![3..8u8, 11..16u8].prop_map(Violation::ReservedOpcode),
        Just(Violation::StrayContinuation),
        Just(Violation::NewMessageInsideFragmented),
        Just(Violation::FragmentedControl),
        (126..=200usize).prop_map(Violation::LongControl),
        ("[a-z☃]{0,40}", 0..40usize, 1..4usize).prop_map(|(text, at, fragments)| {
            let at = at.min(text.len());
            Violation::BadUtf8 {
                text,
                at,
                fragments,
            }
        }),
        (MAX_MESSAGE + 1..MAX_MESSAGE + 600, 1..4usize)
            .prop_map(|(len, fragments)| Violation::TooBig { len, fragments }),
        Just(Violation::CloseOneByte),
        prop_oneof![
            0..1000u16,
            1004..1007u16,
            Just(1015u16),
            1016..3000u16,
            5000..=u16::MAX
        ]
        .prop_map(Violation::CloseBadCode),
        Just(Violation::CloseBadReason),
        Just(Violation::Unmasked),
    ]
}

fn ending() -> impl Strategy<Value = Ending> {
    prop_oneof![
        4 => prop_oneof![1000..=1003u16, 1007..=1014u16, 3000..=4999u16].prop_map(Ending::Close),
        5 => violation().prop_map(Ending::Violation),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Ending::Garbage),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        prop::collection::vec(piece(), 0..8),
        ending(),
        prop::collection::vec(0..1000u16, 0..6),
    )
        .prop_map(|(protocol, pieces, ending, cuts)| Case {
            protocol,
            pieces,
            ending,
            cuts,
        })
}

/// `bytes` cut into `n` frames' payloads (the last may be empty only when
/// all are).
fn split(bytes: &[u8], n: usize) -> Vec<&[u8]> {
    let n = n.max(1);
    let step = bytes.len().div_ceil(n).max(1);
    let mut parts: Vec<&[u8]> = bytes.chunks(step).collect();
    if parts.is_empty() {
        parts.push(&[]);
    }
    parts
}

/// A whole message as frames: first with `opcode`, then continuations, FIN
/// on the last; pings between when asked.
fn message_frames(opcode: u8, bytes: &[u8], fragments: usize, pings: bool, out: &mut Vec<u8>) {
    let parts = split(bytes, fragments);
    let last = parts.len() - 1;
    for (i, part) in parts.iter().enumerate() {
        let op = if i == 0 { opcode } else { 0x0 };
        let fin = if i == last { 0x80 } else { 0 };
        out.extend(client_frame(fin | op, part));
        if pings && i != last {
            out.extend(client_frame(0x89, b"between"));
        }
    }
}

/// What a case sends, and what the server is to make of it.
struct Plan {
    bytes: Vec<u8>,
    /// Data the case's complete messages carry, in order: what the
    /// bystander (and, for a plain valid run, the sender) receives.
    data: Vec<Received>,
    /// Payloads of the pings, whose pongs a valid run gets back.
    pings: usize,
}

fn plan(case: &Case) -> Plan {
    let mut bytes = Vec::new();
    let mut data = Vec::new();
    let mut pings = 0;
    for piece in &case.pieces {
        match piece {
            Piece::Data {
                binary,
                bytes: payload,
                fragments,
                pings: between,
            } => {
                let opcode = if *binary { 0x2 } else { 0x1 };
                message_frames(opcode, payload, *fragments, *between, &mut bytes);
                if *between {
                    pings += split(payload, *fragments).len() - 1;
                }
                data.push(if *binary {
                    Received::Binary(payload.clone())
                } else {
                    Received::Text(String::from_utf8(payload.clone()).unwrap())
                });
            }
            Piece::Ping(p) => {
                bytes.extend(client_frame(0x89, p));
                pings += 1;
            }
            Piece::Pong(p) => bytes.extend(client_frame(0x8a, p)),
            Piece::Control(text) => {
                bytes.extend(client_frame(0x81, text.as_bytes()));
                if !case.protocol {
                    // To a plain client's session, JSON is just data.
                    data.push(Received::Text(text.clone()));
                }
            }
        }
    }
    match &case.ending {
        Ending::Close(code) => bytes.extend(client_close(*code, "bye ☃".as_bytes())),
        Ending::Garbage(g) => {
            bytes.extend_from_slice(g);
            // Random bytes now and then spell a valid frame (a run in
            // ~300 does): what they spell is data like any other.
            data.extend(data_frames_in(g));
        }
        Ending::Violation(v) => bytes.extend(violation_bytes(v)),
    }
    Plan { bytes, data, pings }
}

/// The whole unfragmented data messages at the start of `bytes`, read as a
/// server reads client frames (pings and pongs between them skipped), up to
/// the first frame that is anything else.
fn data_frames_in(mut bytes: &[u8]) -> Vec<Received> {
    let mut out = Vec::new();
    while let [b0, b1, ref rest @ ..] = *bytes {
        let (len, rest) = match b1 & 0x7f {
            126 if rest.len() >= 2 => (
                u64::from(u16::from_be_bytes([rest[0], rest[1]])),
                &rest[2..],
            ),
            127 if rest.len() >= 8 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&rest[..8]);
                (u64::from_be_bytes(n), &rest[8..])
            }
            126 | 127 => break,
            n => (u64::from(n), rest),
        };
        let (fin, rsv, opcode) = (b0 & 0x80 != 0, b0 & 0x70, b0 & 0x0f);
        if b1 & 0x80 == 0 || rsv != 0 || !fin || len > MAX_MESSAGE as u64 {
            break;
        }
        let len = len as usize;
        if rest.len() < 4 + len {
            break;
        }
        let mask = &rest[..4];
        let payload: Vec<u8> = rest[4..4 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        match opcode {
            0x1 => match String::from_utf8(payload) {
                Ok(text) => out.push(Received::Text(text)),
                Err(_) => break,
            },
            0x2 => out.push(Received::Binary(payload)),
            0x9 | 0xa if len <= 125 => {}
            _ => break,
        }
        bytes = &rest[4 + len..];
    }
    out
}

fn violation_bytes(v: &Violation) -> Vec<u8> {
    let mut out = Vec::new();
    match v {
        Violation::ReservedBits(rsv) => out.extend(client_frame(0x80 | rsv | 0x1, b"rsv")),
        Violation::ReservedOpcode(op) => out.extend(client_frame(0x80 | op, b"op")),
        Violation::StrayContinuation => out.extend(client_frame(0x80, b"stray")),
        Violation::NewMessageInsideFragmented => {
            out.extend(client_frame(0x01, b"open"));
            out.extend(client_frame(0x81, b"another"));
        }
        Violation::FragmentedControl => out.extend(client_frame(0x09, b"half")),
        Violation::LongControl(n) => out.extend(client_frame(0x89, &vec![b'p'; *n])),
        Violation::BadUtf8 {
            text,
            at,
            fragments,
        } => {
            let mut payload = text.as_bytes().to_vec();
            // 0xff is never UTF-8, whatever precedes it.
            payload.insert(*at, 0xff);
            message_frames(0x1, &payload, *fragments, false, &mut out);
        }
        Violation::TooBig { len, fragments } => {
            message_frames(0x2, &vec![7u8; *len], *fragments, false, &mut out)
        }
        Violation::CloseOneByte => out.extend(client_frame(0x88, &[3])),
        Violation::CloseBadCode(code) => out.extend(client_close(*code, b"")),
        Violation::CloseBadReason => out.extend(client_close(1000, b"\xc3\x28")),
        Violation::Unmasked => out.extend_from_slice(&[0x81, 0x02, b'n', b'o']),
    }
    out
}

/// Everything the server sent the raw client, up to the end of the stream.
struct Reply {
    data: Vec<Received>,
    protocol_frames: Vec<Value>,
    pongs: usize,
    close: Option<u16>,
    /// The stream ended with a reset rather than a close.
    reset: bool,
}

async fn read_reply(raw: &mut RawWsClient, protocol: bool) -> Reply {
    let mut reply = Reply {
        data: Vec::new(),
        protocol_frames: Vec::new(),
        pongs: 0,
        close: None,
        reset: false,
    };
    loop {
        match raw.try_read_frame().await {
            Ok(None) => return reply,
            Err(_) => {
                reply.reset = true;
                return reply;
            }
            Ok(Some(frame)) => match frame.opcode() {
                0x1 => {
                    let text = String::from_utf8(frame.payload).expect("server text is UTF-8");
                    match serde_json::from_str::<Value>(&text) {
                        Ok(v) if protocol && v.get("type").is_some() => {
                            reply.protocol_frames.push(v)
                        }
                        _ => reply.data.push(Received::Text(text)),
                    }
                }
                0x2 => reply.data.push(Received::Binary(frame.payload)),
                0x8 => {
                    assert!(reply.close.is_none(), "two close frames");
                    reply.close = frame.close_code();
                }
                0xa => reply.pongs += 1,
                0x9 => {} // a heartbeat; not within a case's time
                op => panic!("server sent opcode {op:#x}"),
            },
        }
    }
}

fn same(a: &Received, b: &Received) -> bool {
    match (a, b) {
        (Received::Text(x), Received::Text(y)) => x == y,
        (Received::Binary(x), Received::Binary(y)) => x == y,
        _ => false,
    }
}

/// A stamped room message, as the data it carries.
#[derive(Debug)]
enum Unstamped {
    /// Text (a JSON string) or binary (base64) data.
    Data(Received),
    /// A publish's JSON value, when it is not a string.
    Json(Value),
}

/// Reads a stamped frame `{"type":"message","room":"lobby","offset":…,
/// "epoch":…,"data":…}`: its offset and its data.
fn unstamp(got: &Received) -> (u64, Unstamped) {
    let Received::Text(t) = got else {
        panic!("the bystander got unstamped data: {got:?}");
    };
    let v: Value = serde_json::from_str(t).unwrap_or_else(|e| panic!("{e}: {t}"));
    assert_eq!(
        (&v["type"], &v["room"]),
        (&Value::from("message"), &Value::from("lobby")),
        "{v}"
    );
    assert!(v["epoch"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    let offset = v["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no offset: {v}"));
    let data = match (&v["data"], v.get("binary")) {
        (Value::String(b64), Some(Value::Bool(true))) => {
            Unstamped::Data(Received::Binary(base64_decode(b64)))
        }
        (Value::String(text), None) => Unstamped::Data(Received::Text(text.clone())),
        (_, Some(_)) => panic!("bad binary frame: {v}"),
        (other, None) => Unstamped::Json(other.clone()),
    };
    (offset, data)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        let sextet = ALPHABET
            .iter()
            .position(|&a| a == c)
            .unwrap_or_else(|| panic!("not base64: {s}")) as u32;
        acc = (acc << 6) | sextet;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The bystander's frames up to `marker`.
async fn bystander_until(bystander: &mut WsClient, marker: &str) -> Vec<Received> {
    let mut got = Vec::new();
    loop {
        match bystander.recv().await {
            Received::Text(t) if t == marker => return got,
            Received::Closed(reason) => panic!("the bystander was closed: {reason:?}"),
            other => got.push(other),
        }
    }
}

fn seed() -> [u8; 32] {
    let n: u64 = match std::env::var("HOSTILE_WS_SEED") {
        Ok(s) => s.parse().expect("HOSTILE_WS_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    println!("hostile_ws: seed {n} (HOSTILE_WS_SEED={n} replays this run)");
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&n.to_le_bytes());
    s
}

#[actix_web::test]
async fn hostile_frames_get_documented_close_codes_and_harm_nobody_else() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let server = start(config(&format!(
        r#"{{"network":{{"websocket":{{"max_message_bytes":{MAX_MESSAGE},
            "max_messages_per_second":1000000,"message_burst":1000000,
            "max_rooms_per_session":4}}}}}}"#
    )))
    .await;
    let mut bystander = WsClient::connect_protocol(&server, "").await;

    let mut runner = TestRunner::new_with_rng(
        ProptestConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed()),
    );
    let strategy = case();
    let mut endings: BTreeMap<String, usize> = BTreeMap::new();
    // The lobby's last offset the bystander has seen.
    let mut lobby_offset = 0u64;
    for n in 0..CASES {
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let plan = plan(&case);
        let headers: &[(&str, &str)] = if case.protocol {
            &[PROTOCOL_HEADER]
        } else {
            &[]
        };
        let mut raw = RawWsClient::connect_with(server.addr, "", 1 << 20, headers).await;
        raw.stream.set_nodelay(true).unwrap();

        // The bytes in random writes; a server that has closed may refuse
        // the rest, which is its right.
        let mut cuts: Vec<usize> = case
            .cuts
            .iter()
            .map(|c| plan.bytes.len() * *c as usize / 1000)
            .collect();
        cuts.push(plan.bytes.len());
        cuts.sort_unstable();
        let mut from = 0;
        for to in cuts {
            if raw.write_some(&plan.bytes[from..to]).await.is_err() {
                break;
            }
            from = to;
        }
        if matches!(case.ending, Ending::Garbage(_)) {
            raw.shutdown_write().await;
        }
        let reply = tokio::time::timeout(WAIT * 2, read_reply(&mut raw, case.protocol))
            .await
            .unwrap_or_else(|_| panic!("case {n}: the server kept the connection open\n{case:#?}"));

        let label = match &case.ending {
            Ending::Close(_) => "valid close".to_owned(),
            Ending::Garbage(_) => "random bytes".to_owned(),
            Ending::Violation(v) => format!("{v:?}")
                .split(['(', ' '])
                .next()
                .unwrap()
                .to_owned(),
        };
        *endings.entry(label).or_default() += 1;

        // What the sender got back.
        match &case.ending {
            Ending::Close(code) => {
                assert_eq!(reply.close, Some(*code), "case {n}: close echo\n{case:#?}");
                assert!(
                    !reply.reset,
                    "case {n}: reset after a clean close\n{case:#?}"
                );
                assert_eq!(reply.pongs, plan.pings, "case {n}: pongs\n{case:#?}");
                if !case.protocol {
                    assert_eq!(reply.data.len(), plan.data.len(), "case {n}\n{case:#?}");
                    for (got, sent) in reply.data.iter().zip(&plan.data) {
                        assert!(same(got, sent), "case {n}: echo {got:?} for {sent:?}");
                    }
                }
            }
            Ending::Violation(v) => {
                // A reset may overtake the close frame when the client is
                // still writing the rest of a refused frame; the code, when
                // it arrives, must be the right one.
                match reply.close {
                    Some(code) => assert_eq!(code, v.close_code(), "case {n}\n{case:#?}"),
                    None => assert!(
                        reply.reset && matches!(v, Violation::TooBig { .. }),
                        "case {n}: no close frame\n{case:#?}"
                    ),
                }
            }
            Ending::Garbage(_) => {
                if let Some(code) = reply.close {
                    assert!(
                        DOCUMENTED_CLOSE.contains(&code),
                        "case {n}: close {code} for random bytes\n{case:#?}"
                    );
                }
            }
        }
        for frame in &reply.protocol_frames {
            assert!(
                case.protocol,
                "case {n}: protocol frame {frame} to a plain client"
            );
            let typ = frame["type"].as_str().unwrap_or_default();
            assert!(PROTOCOL_TYPES.contains(&typ), "case {n}: frame {frame}");
            if typ == "error" {
                let code = frame["code"].as_str().unwrap_or_default();
                assert!(ERROR_CODES.contains(&code), "case {n}: error {frame}");
            }
        }
        if !case.protocol {
            for got in &reply.data {
                assert!(
                    plan.data.iter().any(|sent| same(got, sent)),
                    "case {n}: data nobody sent: {got:?}\n{case:?}"
                );
            }
        }

        // The bystander: still connected, and it got this run's data in
        // order — all of it for a plain valid run, never anything else.
        let marker = format!("marker {n}");
        server
            .net
            .hub()
            .send(Broadcast::text(marker.clone()))
            .await
            .unwrap();
        let seen = bystander_until(&mut bystander, &marker).await;
        let mut expected = plan.data.iter();
        for got in &seen {
            // The bystander is a protocol client: the lobby's data comes
            // stamped, and the offsets run on with no gap or repeat over
            // the whole run.
            let (offset, got) = unstamp(got);
            lobby_offset += 1;
            assert_eq!(offset, lobby_offset, "case {n}: {got:?}\n{case:#?}");
            let got = match got {
                // A publish of a JSON value that is not a string.
                Unstamped::Json(_) if case.protocol => continue,
                Unstamped::Json(v) => panic!("case {n}: a publish from a plain client: {v}"),
                Unstamped::Data(got) => got,
            };
            // A publish of a JSON string looks like text data; it is none
            // of the data sent.
            if case.protocol
                && matches!(got, Received::Text(_))
                && !expected.clone().any(|sent| same(&got, sent))
            {
                continue;
            }
            assert!(
                expected.any(|sent| same(&got, sent)),
                "case {n}: the bystander got {got:?} out of order or unsent\n{case:#?}"
            );
        }
        if !case.protocol && matches!(case.ending, Ending::Close(_)) {
            assert_eq!(
                seen.len(),
                plan.data.len(),
                "case {n}: bystander\n{case:#?}"
            );
        }
    }

    println!("hostile_ws: {CASES} cases by ending: {endings:?}");
    // Only the bystander is left, and the server still serves newcomers.
    wait_for_hub(&server, "only the bystander", |hub| hub["sessions"] == 1).await;
    let mut late = WsClient::connect(&server, "").await;
    server.net.hub().do_send(Broadcast::text("still here"));
    assert_eq!(late.next_text().await, "still here");
    assert_eq!(bystander.next_text().await, "still here");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a thread panicked");
    server.stop().await;
}
