//! The hub's safe defaults against hostile and unlucky clients, on a real
//! server with real clients: rooms per client address, presence frames that
//! stay small however many rooms exist, headroom that keeps a reading
//! client from being evicted by a burst of the largest messages, and slow
//! consumers whose connections are aborted (a reset, the kernel's send
//! buffer freed at once) while a graceful shutdown stays graceful.

mod support;

use happynet::actors::liveness::OUTBOUND_HEADROOM_MESSAGES;
use happynet::actors::presence::{PRESENCE_MAX_BYTES, PRESENCE_MAX_ROOMS};
use happynet::actors::ClusterPresence;
use happynet::{Broadcast, Config, RoomName};
use serde_json::Value;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::time::Duration;
use support::{config, start, wait_for_hub, WsClient, WAIT};
use testkit::ws::RawWsClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a join and returns the answer: `joined` or `error`.
async fn try_join(c: &mut WsClient, room: &str) -> Value {
    c.send_text(&serde_json::json!({"type":"join","room":room}).to_string())
        .await;
    loop {
        let v = c.next_json().await;
        if v["type"] == "joined" || v["type"] == "error" {
            return v;
        }
    }
}

// ---------------------------------------------------------------------------
// Rooms per address
// ---------------------------------------------------------------------------

/// One flooding address, IPv6, so that its two hosts in one /64 count as
/// one client (the per-IP key of `network.security`).
const FLOODER: [&str; 2] = ["2001:db8:7:7::1", "2001:db8:7:7::ffff"];
/// Another client, which must still be able to create rooms.
const NEIGHBOUR: &str = "198.51.100.9";

async fn from(server: &support::TestServer, ip: &str, query: &str) -> WsClient {
    WsClient::try_connect_protocol_with(server, query, &[("x-forwarded-for", ip)])
        .await
        .unwrap_or_else(|e| panic!("connect from {ip}: {e}"))
}

#[actix_web::test]
async fn one_address_flooding_joins_hits_its_room_quota_and_others_still_create_rooms() {
    const QUOTA: usize = 10;
    let server = start(config(&format!(
        r#"{{"network":{{"websocket":{{"max_rooms_per_ip":{QUOTA},"max_rooms_per_session":4}},
            "security":{{"trust_forwarded_for":true,"exempt_ips":[]}}}}}}"#
    )))
    .await;
    // The neighbour creates the room everyone starts in.
    let mut neighbour = from(&server, NEIGHBOUR, "?room=square").await;
    // Six flooding sessions from one /64, each trying its 3 other rooms.
    let mut flood = Vec::new();
    for i in 0..6 {
        flood.push(from(&server, FLOODER[i % 2], "?room=square").await);
    }
    let (mut created, mut refused) = (Vec::new(), 0);
    for (s, c) in flood.iter_mut().enumerate() {
        for r in 0..3 {
            let room = format!("flood-{s}-{r}");
            let v = try_join(c, &room).await;
            if v["type"] == "joined" {
                created.push((s, room));
            } else {
                assert_eq!(v["code"], "too_many_rooms", "{v}");
                assert!(
                    v["message"].as_str().unwrap().contains("your address"),
                    "{v}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((created.len(), refused), (QUOTA, 18 - QUOTA));
    assert_eq!(server.health().await["hub"]["rooms"], 1 + QUOTA);

    // The flooder may still join a room that exists.
    assert_eq!(try_join(&mut flood[5], "square").await["type"], "joined");
    // Its neighbour is not affected: it creates rooms of its own.
    for r in 0..3 {
        let v = try_join(&mut neighbour, &format!("mine-{r}")).await;
        assert_eq!(v["type"], "joined", "{v}");
    }
    // A room the flooder created and leaves disappears, and frees its
    // quota for a new one.
    let (s, room) = created[0].clone();
    flood[s]
        .send_text(&serde_json::json!({"type":"leave","room":room}).to_string())
        .await;
    assert_eq!(flood[s].next_of_type("left").await["room"], room.as_str());
    assert_eq!(
        try_join(&mut flood[s], "flood-again").await["type"],
        "joined"
    );
    // And the quota holds again for every host of that /64.
    let v = try_join(&mut flood[5], "flood-one-more").await;
    assert_eq!(v["code"], "too_many_rooms", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("your address"),
        "{v}"
    );
}

#[actix_web::test]
async fn exempt_addresses_are_not_counted_per_address() {
    // Loopback is exempt by default: the quota does not apply to it (the
    // per-session quota and max_rooms still do).
    let server = start(config(
        r#"{"network":{"websocket":{"max_rooms_per_ip":2,"max_rooms_per_session":8}}}"#,
    ))
    .await;
    let mut c = WsClient::connect_protocol(&server, "?room=a").await;
    for r in 0..5 {
        let v = try_join(&mut c, &format!("more-{r}")).await;
        assert_eq!(v["type"], "joined", "{v}");
    }
}

// ---------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn presence_with_ten_thousand_rooms_lists_the_busiest_within_the_byte_bound() {
    const REMOTE_ROOMS: usize = 10_000;
    let server = start(config(
        r#"{"network":{"websocket":{"presence_interval":0.05}}}"#,
    ))
    .await;
    let mut watcher = WsClient::connect_protocol(&server, "?presence=1&room=x").await;
    let _local = WsClient::connect(&server, "?room=local-only").await;
    // What a cluster bridge reports for the other nodes: 10,000 rooms with
    // 1 to 50 members, one giant room, and more members in room x.
    let mut rooms: HashMap<RoomName, usize> = (0..REMOTE_ROOMS)
        .map(|i| {
            (
                RoomName::new(&format!("remote-{i:05}")).unwrap(),
                1 + i % 50,
            )
        })
        .collect();
    rooms.insert(RoomName::new("giant").unwrap(), 1000);
    rooms.insert(RoomName::new("x").unwrap(), 499);
    let remote_sessions = 40_000;
    server.net.hub().do_send(ClusterPresence {
        sessions: remote_sessions,
        rooms: rooms.clone(),
    });
    let (frame, v) = loop {
        let text = watcher.next_text().await;
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] == "presence" && v["clients"] == 2 + remote_sessions {
            break (text, v);
        }
    };
    assert!(
        frame.len() <= PRESENCE_MAX_BYTES,
        "a presence frame of {} bytes",
        frame.len()
    );
    let listed = v["rooms"].as_object().unwrap();
    assert_eq!(listed.len(), PRESENCE_MAX_ROOMS);
    // Every room is counted: listed plus `more` (10,000 remote, giant, x,
    // local-only).
    assert_eq!(
        v["more"].as_u64().unwrap() as usize + listed.len(),
        REMOTE_ROOMS + 3
    );
    // The biggest first, merged with this node's members.
    assert_eq!(listed["giant"], 1000);
    assert_eq!(listed["x"], 500);
    assert!(frame.find("\"giant\"").unwrap() < frame.find("\"x\"").unwrap());
    // The rest are the 50-member rooms: nothing smaller was listed first.
    let smallest = listed.values().filter_map(Value::as_u64).min().unwrap();
    assert_eq!(smallest, 50);
    assert!(!listed.contains_key("local-only"));
}

// ---------------------------------------------------------------------------
// Headroom for the largest messages
// ---------------------------------------------------------------------------

/// The smallest `max_outbound_bytes` the config accepts with messages of up
/// to `max_message` bytes, found by asking the validator (bisection over a
/// range the answer must lie in, so the loop is bounded).
fn smallest_accepted_outbound(max_message: usize) -> usize {
    let accepts = |outbound: usize| {
        Config::from_json_str(&format!(
            r#"{{"network":{{"websocket":{{"max_message_bytes":{max_message},
                "max_outbound_bytes":{outbound}}}}}}}"#
        ))
        .is_ok()
    };
    let (mut refused, mut accepted) = (0, 64 * max_message);
    assert!(accepts(accepted));
    while accepted - refused > 1 {
        let mid = refused + (accepted - refused) / 2;
        if accepts(mid) {
            accepted = mid;
        } else {
            refused = mid;
        }
    }
    accepted
}

#[actix_web::test]
async fn a_reading_client_survives_a_burst_of_the_largest_messages_at_the_smallest_cap() {
    const MAX_MESSAGE: usize = 16 * 1024;
    let cap = smallest_accepted_outbound(MAX_MESSAGE);
    let server = start(config(&format!(
        r#"{{"network":{{"websocket":{{"max_message_bytes":{MAX_MESSAGE},
            "max_outbound_bytes":{cap}}}}}}}"#
    )))
    .await;
    // The largest frame a message of MAX_MESSAGE bytes becomes: a
    // `POST /broadcast?room=…` JSON body `{"data":"…"}` of exactly
    // MAX_MESSAGE bytes, to a room whose 64-byte name escapes to 128.
    let name = "\"".repeat(64);
    let room = RoomName::new(&name).unwrap();
    let data = format!("\"{}\"", "x".repeat(MAX_MESSAGE - r#"{"data":""}"#.len()));
    let raw = serde_json::value::RawValue::from_string(data.clone()).unwrap();
    let mut reader = WsClient::connect_protocol(&server, "").await;
    assert_eq!(try_join(&mut reader, &name).await["type"], "joined");

    // The burst: queued back to back, before the reader's session can run.
    let hub = server.net.hub();
    for _ in 0..OUTBOUND_HEADROOM_MESSAGES {
        hub.do_send(Broadcast::message(Some(room.clone()), &raw));
    }
    for i in 0..OUTBOUND_HEADROOM_MESSAGES {
        let v = reader.next_json().await;
        assert_eq!(v["type"], "message", "frame {i}");
        assert_eq!(v["data"].as_str().unwrap().len(), data.len() - 2);
    }
    let health = server.health().await;
    assert_eq!(health["hub"]["evicted_slow_consumer"], 0, "{health}");
    assert_eq!(health["hub"]["dropped"], 0, "{health}");
    // Still connected, still served.
    hub.do_send(Broadcast::text("after the burst"));
    assert_eq!(reader.next_text().await, "after the burst");
}

// ---------------------------------------------------------------------------
// Aborted slow consumers, graceful shutdown
// ---------------------------------------------------------------------------

/// The server's side of the TCP connection from local port `client_port`
/// to `server_port` on 127.0.0.1, from `/proc/net/tcp`: its state (hex, as
/// the kernel prints it) and how many bytes it still holds to send.
fn server_socket(server_port: u16, client_port: u16) -> Option<(String, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{server_port:04X}");
    let remote = format!("0100007F:{client_port:04X}");
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && f[1] == local && f[2] == remote {
            let tx = f[4].split(':').next()?;
            Some((f[3].to_owned(), u64::from_str_radix(tx, 16).ok()?))
        } else {
            None
        }
    })
}

/// Reads until the connection ends, at most `limit` bytes; returns how it
/// ended: `Ok(bytes)` for a clean end of stream, or the read error.
async fn read_to_end(stream: &mut tokio::net::TcpStream, limit: usize) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    while total <= limit {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => panic!("the connection stayed open for {WAIT:?}"),
            Ok(Ok(0)) => return Ok(total),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return Err(e),
        }
    }
    panic!("read {total} bytes and the connection is still open");
}

/// Polls `/proc/net/tcp` until the server holds no socket for the client
/// on `client_port`, or panics after [`WAIT`] with what it still holds.
async fn wait_until_gone(server_port: u16, client_port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Some((state, tx)) = server_socket(server_port, client_port) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server still holds the connection (state {state}, {tx} bytes unsent)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn an_evicted_slow_consumer_is_reset_and_its_send_buffer_freed_at_once() {
    const PAYLOAD: usize = 4096;
    let server = start(config(
        r#"{"network":{"websocket":{"max_outbound_bytes":262144,"max_message_bytes":16384}}}"#,
    ))
    .await;
    let mut jammed = RawWsClient::connect(server.addr, "", 4096).await;
    let client_port = jammed.stream.local_addr().unwrap().port();
    let mut reader = WsClient::connect_protocol(&server, "").await;
    wait_for_hub(&server, "two sessions", |h| h["sessions"] == 2).await;

    // Broadcast until the jammed client is evicted; the reader keeps up.
    let hub = server.net.hub();
    let text = "x".repeat(PAYLOAD);
    let mut unsent_before = 0;
    for round in 0.. {
        assert!(round < 200, "the jammed client was never evicted");
        for _ in 0..32 {
            hub.send(Broadcast::text(text.clone())).await.unwrap();
            assert_eq!(reader.next_text().await.len(), PAYLOAD);
        }
        if let Some((_, tx)) = server_socket(server.addr.port(), client_port) {
            unsent_before = unsent_before.max(tx);
        }
        if server.health().await["hub"]["evicted_slow_consumer"] == 1 {
            break;
        }
    }
    eprintln!("the server's socket held {unsent_before} bytes unsent before the eviction");
    assert!(
        unsent_before > 0,
        "the jammed client's socket never backed up"
    );

    // Without the client reading a byte, the server's socket is gone.
    wait_until_gone(server.addr.port(), client_port).await;
    // And the client is told with a reset, not an orderly end of stream.
    let end = read_to_end(&mut jammed.stream, 64 << 20).await;
    match end {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a graceful end of stream after {n} bytes, not a reset"),
    }
    // The reader is still served.
    hub.do_send(Broadcast::text("after"));
    assert_eq!(reader.next_text().await, "after");
}

/// Reads WebSocket frames from the server (unmasked) until a close frame;
/// returns its status code.
async fn read_until_close_frame(stream: &mut tokio::net::TcpStream) -> u16 {
    for _ in 0..1000 {
        let mut head = [0u8; 2];
        tokio::time::timeout(WAIT, stream.read_exact(&mut head))
            .await
            .expect("a frame in time")
            .expect("frame header");
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                stream.read_exact(&mut b).await.expect("frame length");
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                stream.read_exact(&mut b).await.expect("frame length");
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        assert!(len < 1 << 20, "a frame of {len} bytes");
        let mut payload = vec![0u8; len as usize];
        stream
            .read_exact(&mut payload)
            .await
            .expect("frame payload");
        if head[0] & 0x0f == 0x8 {
            assert!(payload.len() >= 2, "a close frame without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
    panic!("no close frame in 1000 frames");
}

#[actix_web::test]
async fn graceful_shutdown_closes_readers_cleanly_and_resets_a_jammed_client() {
    let server = start(config(
        r#"{"network":{"websocket":{"shutdown_timeout":1,"max_outbound_bytes":8388608,
            "socket_send_buffer":16384}}}"#,
    ))
    .await;
    let mut calm = RawWsClient::connect(server.addr, "?room=calm", 65536).await;
    let mut jammed = RawWsClient::connect(server.addr, "?room=jam", 4096).await;
    let jammed_port = jammed.stream.local_addr().unwrap().port();
    wait_for_hub(&server, "two sessions", |h| h["sessions"] == 2).await;

    // 1 MiB for the jammed client: far more than its socket buffers hold,
    // well within its cap, so it is not evicted; its session backs up and
    // cannot write the 1001 when shutdown comes.
    let jam = RoomName::new("jam").unwrap();
    let hub = server.net.hub();
    for _ in 0..256 {
        hub.send(Broadcast::to_room(jam.clone(), "j".repeat(4096)))
            .await
            .unwrap();
    }
    let mut backed_up = false;
    for _ in 0..(WAIT.as_millis() / 20) {
        if server_socket(server.addr.port(), jammed_port).is_some_and(|(_, tx)| tx > 0) {
            backed_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(backed_up, "the jammed client's socket never backed up");
    assert_eq!(server.health().await["hub"]["evicted_slow_consumer"], 0);

    let open = server.net.shutdown().await;
    assert_eq!(open, 2);

    // The reading client: 1001, its close answered, then an orderly end of
    // the TCP stream — no reset.
    assert_eq!(read_until_close_frame(&mut calm.stream).await, 1001);
    // A masked close frame with an empty payload.
    calm.stream
        .write_all(&[0x88, 0x80, 1, 2, 3, 4])
        .await
        .unwrap();
    match read_to_end(&mut calm.stream, 1 << 20).await {
        Ok(_) => {}
        Err(e) => panic!("the reading client's connection ended with {e}"),
    }
    // The jammed one could not read its 1001 in shutdown_timeout: it was
    // aborted, and nothing of it is left on the server.
    wait_until_gone(server.addr.port(), jammed_port).await;
    match read_to_end(&mut jammed.stream, 64 << 20).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("a graceful end of stream after {n} bytes, not a reset"),
    }
}
