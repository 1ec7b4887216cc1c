//! History and recovery end to end: a real server on `127.0.0.1:0`, real
//! protocol clients that drop and come back with their last
//! `epoch:offset`, and the HTTP history route. What the client ends up
//! with is checked message by message: all of them, once, in order — or a
//! `complete:false` with nothing half replayed.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod support;

use futures::future::join_all;
use happynet::{Broadcast, Position, RoomName};
use serde_json::{json, Value};
use support::{config, http_client, start, wait_for_hub, TestServer, WsClient};

fn room(name: &str) -> RoomName {
    RoomName::new(name).unwrap()
}

/// Reads stamped messages of `room` until the one at offset `through`,
/// asserting each follows the previous (`after` is the offset before the
/// first); returns their data.
async fn read_through(c: &mut WsClient, room: &str, after: u64, through: u64) -> Vec<String> {
    let mut got = Vec::new();
    for offset in after + 1..=through {
        let v = c.next_json().await;
        assert_eq!(v["type"], "message", "{v}");
        assert_eq!(v["room"], room, "{v}");
        assert_eq!(v["offset"], offset, "no gap, no repeat: {v}");
        got.push(v["data"].as_str().unwrap().to_owned());
    }
    got
}

/// A broadcast to room `to`, handed to every shard before it returns.
async fn broadcast(server: &TestServer, to: &str, text: String) {
    server
        .net
        .hub()
        .send(Broadcast::to_room(room(to), text))
        .await
        .unwrap();
}

/// Broadcasts `m{from}`..`m{to}` to `feed`, yielding after each, so that
/// whatever runs beside it on this thread (a reconnect) interleaves.
async fn burst(hub: &actix::Addr<happynet::BroadcastHub>, from: u64, to: u64) {
    for i in from..to {
        hub.do_send(Broadcast::to_room(room("feed"), format!("m{i}")));
        tokio::task::yield_now().await;
    }
}

#[actix_web::test]
async fn a_client_that_drops_mid_stream_recovers_all_1000_once_in_order() {
    const TOTAL: u64 = 1000;
    let server = start(config(
        r#"{"network":{"websocket":{"history":{"size":1000}}}}"#,
    ))
    .await;
    let hub = server.net.hub();
    let mut c = WsClient::connect_protocol(&server, "?room=feed").await;
    burst(&hub, 0, 100).await;
    let first = c.next_json().await;
    let epoch = support::assert_message(&first, "feed", 1, json!("m0"));
    let mut have = vec!["m0".to_owned()];
    let mut at = 1;
    let mut replayed = 0;
    // Nine drops in the middle (no close frame: what was on its way is
    // lost with the connection), each followed by a reconnect with the
    // last offset the client has — while the next 100 are being
    // broadcast, so that some reach its shard between its registration
    // and the router's answer (the seam).
    let mut published = 100;
    while published < TOTAL {
        let stop = published - 50;
        have.extend(read_through(&mut c, "feed", at, stop).await);
        at = stop;
        drop(c);
        let query = format!("?room=feed&since={epoch}:{at}");
        let (client, ()) = futures::join!(
            WsClient::connect_protocol(&server, &query),
            burst(&hub, published, published + 100)
        );
        published += 100;
        c = client;
        let recovered = c.next_json().await;
        assert_eq!(recovered["type"], "recovered", "{recovered}");
        assert_eq!(recovered["room"], "feed");
        assert_eq!(recovered["complete"], true, "{recovered}");
        replayed += recovered["replayed"].as_u64().unwrap();
    }
    have.extend(read_through(&mut c, "feed", at, TOTAL).await);

    let want: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    assert_eq!(have, want, "all 1,000, once, in order");
    c.expect_silence(std::time::Duration::from_millis(100))
        .await;
    let health = server.health().await;
    assert_eq!(health["hub"]["replayed"], replayed, "{health}");
    assert_eq!(health["hub"]["history_rooms"], 1, "{health}");
}

#[actix_web::test]
async fn a_join_with_since_replays_too_and_recover_last_gives_the_last_message() {
    let server = start(config("{}")).await;
    for i in 1..=5 {
        broadcast(&server, "news", format!("n{i}")).await;
    }
    let page = server.net.history(room("news"), None, 1).await.unwrap();
    let last = page.last.unwrap();
    assert_eq!(last.offset, 5);
    let since = Position {
        epoch: last.epoch.clone(),
        offset: 2,
    };

    let mut c = WsClient::connect_protocol(&server, "").await;
    c.send_text(&format!(
        r#"{{"type":"join","room":"news","since":"{since}"}}"#
    ))
    .await;
    assert_eq!(c.next_of_type("joined").await["room"], "news");
    let v = c.next_json().await;
    assert_eq!(
        v,
        json!({"type":"recovered","room":"news","complete":true,"replayed":3})
    );
    assert_eq!(read_through(&mut c, "news", 2, 5).await, ["n3", "n4", "n5"]);
    // And live from there.
    broadcast(&server, "news", "n6".into()).await;
    assert_eq!(read_through(&mut c, "news", 5, 6).await, ["n6"]);

    // recover=last: only the last message, then live.
    let mut d = WsClient::connect_protocol(&server, "?room=news&recover=last").await;
    let v = d.next_json().await;
    assert_eq!(
        v,
        json!({"type":"recovered","room":"news","complete":true,"replayed":1})
    );
    assert_eq!(read_through(&mut d, "news", 5, 6).await, ["n6"]);
    // Of a room with no history: complete, nothing.
    let mut e = WsClient::connect_protocol(&server, "?room=empty&recover=last").await;
    let v = e.next_json().await;
    assert_eq!(
        v,
        json!({"type":"recovered","room":"empty","complete":true,"replayed":0})
    );
    e.expect_silence(std::time::Duration::from_millis(100))
        .await;
}

#[actix_web::test]
async fn a_restarted_node_has_a_new_epoch_and_recovery_says_complete_false() {
    let server = start(config("{}")).await;
    let mut c = WsClient::connect_protocol(&server, "?room=r").await;
    broadcast(&server, "r", "before".into()).await;
    let epoch = c.next_message("r", 1, json!("before")).await;
    drop(c);
    server.stop().await;

    // A new Network in the same process: a new run, a new epoch, though
    // the room gets offset 1 again.
    let server = start(config("{}")).await;
    broadcast(&server, "r", "after-1".into()).await;
    let mut c = WsClient::connect_protocol(&server, &format!("?room=r&since={epoch}:1")).await;
    let v = c.next_json().await;
    assert_eq!(v, json!({"type":"recovered","room":"r","complete":false}));
    // Nothing replayed: the next frame is the next live message.
    broadcast(&server, "r", "after-2".into()).await;
    let new_epoch = c.next_message("r", 2, json!("after-2")).await;
    assert_ne!(new_epoch, epoch);
    let health = server.health().await;
    assert_eq!(health["hub"]["replayed"], 0, "{health}");
    assert_eq!(health["hub"]["recoveries_incomplete"], 1, "{health}");
}

#[actix_web::test]
async fn a_gap_longer_than_the_history_is_complete_false_with_nothing_half_replayed() {
    let server = start(config(
        r#"{"network":{"websocket":{"history":{"size":10}}}}"#,
    ))
    .await;
    let mut c = WsClient::connect_protocol(&server, "?room=g").await;
    for i in 1..=5 {
        broadcast(&server, "g", format!("g{i}")).await;
    }
    let epoch = support::assert_message(&c.next_json().await, "g", 1, json!("g1"));
    read_through(&mut c, "g", 1, 5).await;
    drop(c);
    // 11 more: offset 6 is gone from a 10-message history.
    for i in 6..=16 {
        broadcast(&server, "g", format!("g{i}")).await;
    }
    let mut c = WsClient::connect_protocol(&server, &format!("?room=g&since={epoch}:5")).await;
    let v = c.next_json().await;
    assert_eq!(v, json!({"type":"recovered","room":"g","complete":false}));
    broadcast(&server, "g", "g17".into()).await;
    c.next_message("g", 17, json!("g17")).await;
    // One message later, the same gap is covered.
    let mut d = WsClient::connect_protocol(&server, &format!("?room=g&since={epoch}:7")).await;
    let v = d.next_json().await;
    assert_eq!(
        v,
        json!({"type":"recovered","room":"g","complete":true,"replayed":10})
    );
    assert_eq!(read_through(&mut d, "g", 7, 17).await.len(), 10);
}

#[actix_web::test]
async fn recovery_needs_the_protocol_and_a_well_formed_since() {
    let server = start(config("{}")).await;
    for (query, protocol, error) in [
        ("?since=e-1:1", false, "recovery_needs_protocol"),
        ("?recover=last", false, "recovery_needs_protocol"),
        ("?since=nope", true, "bad_since"),
        ("?since=e:1&recover=last", true, "bad_since"),
        ("?recover=everything", true, "bad_since"),
    ] {
        let mut req = http_client()
            .get(server.url(&format!("/ws{query}")))
            .insert_header(("connection", "upgrade"))
            .insert_header(("upgrade", "websocket"))
            .insert_header(("sec-websocket-version", "13"))
            .insert_header(("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="));
        if protocol {
            req = req.insert_header(("sec-websocket-protocol", support::PROTOCOL));
        }
        let mut resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 400, "{query}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], error, "{query}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

async fn get(server: &TestServer, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = http_client().get(server.url(path));
    if let Some(t) = token {
        req = req.insert_header(("authorization", format!("Bearer {t}")));
    }
    let mut resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    (status, body)
}

#[actix_web::test]
async fn the_history_route_pages_behind_the_broadcast_token() {
    let server = start(config(
        r#"{"network":{"security":{"broadcast_tokens":["bc"]}}}"#,
    ))
    .await;
    for i in 1..=150 {
        broadcast(&server, "h", format!("h{i}")).await;
    }
    // The broadcast token, and only it.
    let (status, body) = get(&server, "/rooms/h/history", None).await;
    assert_eq!((status, &body["error"]), (401, &json!("token_required")));
    let (status, _) = get(&server, "/rooms/h/history", Some("wrong")).await;
    assert_eq!(status, 401);

    // No since: the last `limit` (default 100), oldest first.
    let (status, body) = get(&server, "/rooms/h/history", Some("bc")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["room"], &body["complete"]),
        (&json!("h"), &json!(true))
    );
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 100);
    // The history keeps 100 a room by default: 51..=150.
    assert_eq!(messages[0]["offset"], 51);
    assert_eq!(messages[99]["data"], "h150");
    let last = body["last"].as_str().unwrap().to_owned();
    let epoch = last.rsplit_once(':').unwrap().0.to_owned();
    assert_eq!(last, format!("{epoch}:150"));

    // since + limit: the page after it.
    let (status, body) = get(
        &server,
        &format!("/rooms/h/history?since={epoch}:60&limit=3"),
        Some("bc"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let offsets: Vec<&Value> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["offset"])
        .collect();
    assert_eq!(offsets, [&json!(61), &json!(62), &json!(63)]);
    // A since the history no longer covers: incomplete, nothing.
    let (_, body) = get(
        &server,
        &format!("/rooms/h/history?since={epoch}:10"),
        Some("bc"),
    )
    .await;
    assert_eq!(
        (&body["complete"], &body["messages"]),
        (&json!(false), &json!([]))
    );
    // Bad input: clear 400s.
    for (query, error) in [
        ("?since=garbage", "bad_since"),
        ("?limit=0", "bad_limit"),
        ("?limit=10001", "bad_limit"),
        ("?limit=many", "bad_query"),
        ("?until=1", "bad_query"),
    ] {
        let (status, body) = get(&server, &format!("/rooms/h/history{query}"), Some("bc")).await;
        assert_eq!(
            (status, &body["error"]),
            (400, &json!(error)),
            "{query}: {body}"
        );
    }
    let long = "r".repeat(65);
    let (status, body) = get(&server, &format!("/rooms/{long}/history"), Some("bc")).await;
    assert_eq!((status, &body["error"]), (400, &json!("bad_room")));
    // The largest limit is accepted.
    let (status, _) = get(&server, "/rooms/h/history?limit=10000", Some("bc")).await;
    assert_eq!(status, 200);
}

#[actix_web::test]
async fn history_stays_within_max_bytes_under_10000_rooms_times_size() {
    const ROOMS: usize = 10_000;
    const SIZE: usize = 10;
    const MAX_BYTES: usize = 1 << 20;
    let server = start(config(&format!(
        r#"{{"network":{{"websocket":{{"history":{{"size":{SIZE},"max_bytes":{MAX_BYTES}}}}}}}}}"#
    )))
    .await;
    let hub = server.net.hub();
    let payload = "p".repeat(100);
    let mut peak = 0;
    for round in 0..SIZE {
        join_all((0..ROOMS).map(|r| {
            hub.send(Broadcast::to_room(
                room(&format!("room-{r}")),
                payload.clone(),
            ))
        }))
        .await;
        let health = server.health().await;
        let bytes = health["hub"]["history_bytes"].as_u64().unwrap() as usize;
        assert!(bytes <= MAX_BYTES, "round {round}: {bytes} > {MAX_BYTES}");
        peak = peak.max(bytes);
    }
    // It was full (the bound did the work), and it holds the newest.
    assert!(peak > MAX_BYTES / 2, "{peak}");
    let health = wait_for_hub(&server, "history counted", |hub| {
        hub["history_rooms"].as_u64().is_some_and(|n| n > 0)
    })
    .await;
    let rooms = health["hub"]["history_rooms"].as_u64().unwrap() as usize;
    assert!(rooms < ROOMS, "the oldest rooms were evicted: {rooms}");
    let page = server
        .net
        .history(room(&format!("room-{}", ROOMS - 1)), None, 100)
        .await
        .unwrap();
    // Its older messages went with the oldest of every room (and with
    // them its record: the one left is offset 1 of a new epoch).
    assert_eq!(page.entries.len(), 1, "the newest message is kept");
    assert_eq!(page.last.map(|p| p.offset), Some(1));
    let page = server.net.history(room("room-0"), None, 100).await.unwrap();
    assert!(page.entries.is_empty() && page.last.is_none());
}

#[actix_web::test]
async fn a_replay_the_clients_outbound_budget_cannot_hold_is_complete_false_not_an_eviction() {
    // 4 × (1024 + 384) bytes of outbound budget; a replay may take half.
    let server = start(config(
        r#"{"network":{"websocket":{"max_message_bytes":1024,"max_outbound_bytes":5632,
            "history":{"size":1000}}}}"#,
    ))
    .await;
    for i in 0..200 {
        broadcast(&server, "big", format!("{i:0>100}")).await;
    }
    let page = server.net.history(room("big"), None, 1).await.unwrap();
    let epoch = page.last.unwrap().epoch;
    let mut c = WsClient::connect_protocol(&server, &format!("?room=big&since={epoch}:0")).await;
    let v = c.next_json().await;
    assert_eq!(v, json!({"type":"recovered","room":"big","complete":false}));
    // Still connected, and live from the next offset.
    broadcast(&server, "big", "next".into()).await;
    c.next_message("big", 201, json!("next")).await;
    // A gap it can hold is replayed.
    let mut d = WsClient::connect_protocol(&server, &format!("?room=big&since={epoch}:195")).await;
    let v = d.next_json().await;
    assert_eq!(
        v,
        json!({"type":"recovered","room":"big","complete":true,"replayed":6})
    );
    let health = server.health().await;
    assert_eq!(health["hub"]["evicted_slow_consumer"], 0, "{health}");
}
