//! The hub's shards seen from outside: a real server with two workers, so
//! two shards, and real clients spread across them. What a user relies on
//! must not depend on which worker took a connection: a room spanning both
//! shards gets every message once and in order per sender, presence counts
//! each client once, and a client that stops reading on one shard does not
//! hold up anybody else.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod support;

use happynet::{Broadcast, RoomName};
use serde_json::Value;
use std::collections::HashMap;
use support::{config, start, wait_for_hub, WsClient};
use testkit::ws::RawWsClient;

/// True once the hub reports `n` sessions spread over at least two shards.
fn spread_over_two_shards(h: &Value, n: u64) -> bool {
    let on: Vec<u64> = h["shard_sessions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    h["sessions"] == n && on.iter().filter(|&&s| s > 0).count() >= 2 && on.iter().sum::<u64>() == n
}

#[actix_web::test]
async fn a_room_spanning_two_shards_gets_every_message_once_in_order_per_sender() {
    const CLIENTS: usize = 8;
    const EACH: usize = 25;
    let server = start(config("{}")).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(WsClient::connect(&server, "?room=span").await);
    }
    // actix hands connections to its workers in turn: both shards hold some.
    let health = wait_for_hub(&server, "clients on both shards", |h| {
        spread_over_two_shards(h, CLIENTS as u64)
    })
    .await;
    eprintln!("sessions per shard: {}", health["shard_sessions"]);

    // Every client and the app send interleaved; every message names its
    // sender and its number.
    let hub = server.net.hub();
    for k in 0..EACH {
        for (i, c) in clients.iter_mut().enumerate() {
            c.send_text(&format!("c{i}:{k}")).await;
        }
        hub.do_send(Broadcast::to_room(
            RoomName::new("span").unwrap(),
            format!("app:{k}"),
        ));
    }

    // Each client receives all of it: each sender's messages once, in order.
    let expected = (CLIENTS + 1) * EACH;
    for (me, c) in clients.iter_mut().enumerate() {
        let mut next: HashMap<String, usize> = HashMap::new();
        for _ in 0..expected {
            let text = c.next_text().await;
            let (sender, k) = text.split_once(':').expect("sender:number");
            let k: usize = k.parse().expect("a number");
            let want = next.entry(sender.to_string()).or_insert(0);
            assert_eq!(
                k, *want,
                "client {me}: {sender}'s messages out of order or repeated"
            );
            *want += 1;
        }
        assert_eq!(next.len(), CLIENTS + 1, "client {me} heard from {next:?}");
        assert!(next.values().all(|&n| n == EACH), "client {me}: {next:?}");
    }
    let health = server.health().await;
    assert_eq!(health["hub"]["dropped"], 0, "{health}");
    assert_eq!(
        health["hub"]["deliveries"],
        (CLIENTS * expected) as u64,
        "{health}"
    );
}

#[actix_web::test]
async fn presence_counts_each_client_once_whichever_shard_it_is_on() {
    let server = start(config(
        r#"{"network":{"websocket":{"presence_interval":0.05}}}"#,
    ))
    .await;
    let mut watcher = WsClient::connect_protocol(&server, "?presence=1&room=w").await;
    let mut others = Vec::new();
    for i in 0..6 {
        let room = if i % 2 == 0 { "even" } else { "odd" };
        others.push(WsClient::connect(&server, &format!("?room={room}")).await);
    }
    wait_for_hub(&server, "clients on both shards", |h| {
        spread_over_two_shards(h, 7)
    })
    .await;
    // The room table is the node's: the counts are whole, not a shard's
    // half nor twice over.
    loop {
        let v = watcher.next_of_type("presence").await;
        if v["clients"] == 7 {
            assert_eq!(v["rooms"]["even"], 3, "{v}");
            assert_eq!(v["rooms"]["odd"], 3, "{v}");
            assert_eq!(v["rooms"]["w"], 1, "{v}");
            break;
        }
        assert!(v["clients"].as_u64() < Some(7), "counted twice: {v}");
    }
    // A join on one shard is counted in the other shard's joined frame.
    let mut a = WsClient::connect_protocol(&server, "?room=solo").await;
    let mut b = WsClient::connect_protocol(&server, "?room=elsewhere").await;
    a.join("both").await;
    b.send_text(r#"{"type":"join","room":"both"}"#).await;
    let joined = b.next_of_type("joined").await;
    assert_eq!(joined["members"], 2, "{joined}");
}

#[actix_web::test]
async fn a_client_that_stops_reading_on_one_shard_holds_up_nobody() {
    const PAYLOAD: usize = 4096;
    const READERS: usize = 5;
    let server = start(config(
        r#"{"network":{"websocket":{"max_outbound_bytes":262144,"max_message_bytes":16384}}}"#,
    ))
    .await;
    // Connects and never reads another byte.
    let _jammed = RawWsClient::connect(server.addr, "", 4096).await;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        readers.push(WsClient::connect(&server, "").await);
    }
    wait_for_hub(&server, "readers on both shards", |h| {
        spread_over_two_shards(h, READERS as u64 + 1)
    })
    .await;

    // Broadcast until the jammed client is evicted: every reader, on
    // either shard, keeps receiving each broadcast in turn meanwhile.
    let hub = server.net.hub();
    let mut sent = 0;
    for round in 0.. {
        assert!(round < 200, "the jammed client was never evicted");
        for _ in 0..32 {
            let text = format!("{sent:08}{}", "x".repeat(PAYLOAD - 8));
            hub.send(Broadcast::text(text)).await.unwrap();
            for r in readers.iter_mut() {
                let got = r.next_text().await;
                assert_eq!(got[..8].parse::<usize>().unwrap(), sent);
            }
            sent += 1;
        }
        if server.health().await["hub"]["evicted_slow_consumer"] == 1 {
            break;
        }
    }
    let health = server.health().await;
    assert_eq!(health["hub"]["sessions"], READERS as u64, "{health}");
    hub.do_send(Broadcast::text("after"));
    for r in readers.iter_mut() {
        assert_eq!(r.next_text().await, "after");
    }
}

/// The sessions each shard's table has room for, from `/health`.
fn shard_capacity(health: &Value) -> Vec<u64> {
    health["hub"]["shard_session_capacity"]
        .as_array()
        .expect("shard_session_capacity in /health")
        .iter()
        .filter_map(Value::as_u64)
        .collect()
}

#[actix_web::test]
async fn after_every_client_leaves_the_shards_give_their_tables_back() {
    // Enough that a table sized for them is above the most an empty shard
    // keeps (see happynet_actors::capacity), few enough for a debug build.
    const CLIENTS: usize = 700;
    let server = start(config("{}")).await;
    for round in 0..2 {
        let mut clients = Vec::with_capacity(CLIENTS);
        for _ in 0..CLIENTS {
            clients.push(RawWsClient::connect(server.addr, "", 65536).await);
        }
        let full = wait_for_hub(&server, "every client registered", |h| {
            spread_over_two_shards(h, CLIENTS as u64)
        })
        .await;
        // Each shard has grown past what an empty one may keep: else this
        // test could not tell a shard that shrinks from one that does not.
        let held = shard_capacity(&full);
        assert!(
            held.iter()
                .all(|&c| c > happynet::actors::capacity::ceiling(0) as u64),
            "round {round}: {full}"
        );

        drop(clients);
        // Every shard's own count, not just the node's: the node's is read
        // after the shards answered, so it can reach 0 while the answer of
        // a shard that removed its last sessions just after is stale.
        let empty = wait_for_hub(&server, "every session gone", |h| {
            h["sessions"] == 0
                && h["shard_sessions"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|n| n == 0))
        })
        .await;
        // Each shard is back to its floor, not sized for the crowd that left.
        for cap in shard_capacity(&empty) {
            assert!(
                cap <= happynet::actors::capacity::ceiling(0) as u64,
                "round {round}: a shard still holds room for {cap} sessions: {empty}"
            );
        }
        assert_eq!(empty["hub"]["rooms"], 0, "{empty}");
    }
    // And the hub works as before for whoever comes next.
    let mut a = WsClient::connect(&server, "?room=after").await;
    let mut b = WsClient::connect(&server, "?room=after").await;
    a.send_text("still here").await;
    assert_eq!(b.next_text().await, "still here");
    assert_eq!(a.next_text().await, "still here");
}
