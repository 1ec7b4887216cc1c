//! The real-time core end to end: a real server on `127.0.0.1:0`, real
//! WebSocket clients, and the behaviour users rely on — rooms, ordering,
//! limits, eviction of silent and slow clients, and graceful shutdown.

mod support;

use awc::ws::{CloseCode, Message};
use futures::future::join_all;
use happynet::{Broadcast, RoomName};
use serde_json::{json, Value};
use std::time::Duration;
use support::{config, start, Received, WsClient, WAIT};

#[actix_web::test]
async fn broadcast_reaches_every_member_of_a_room_and_nobody_outside_it() {
    let server = start(config("{}")).await;
    let mut a1 = WsClient::connect(&server, "?room=a").await;
    let mut a2 = WsClient::connect(&server, "?room=a").await;
    let mut b1 = WsClient::connect(&server, "?room=b").await;

    // App code → one room.
    let n = server
        .net
        .hub()
        .send(Broadcast::to_room(RoomName::new("a").unwrap(), "to a"))
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(a1.next_text().await, "to a");
    assert_eq!(a2.next_text().await, "to a");

    // A client's plain text → its rooms, sender included.
    a2.send_text("hello from a2").await;
    assert_eq!(a1.next_text().await, "hello from a2");
    assert_eq!(a2.next_text().await, "hello from a2");

    // A publish → the room's members, wrapped.
    a1.send_text(r#"{"type":"publish","room":"a","data":{"n":1}}"#)
        .await;
    for c in [&mut a1, &mut a2] {
        let v = c.next_json().await;
        assert_eq!(v, json!({"type":"message","room":"a","data":{"n":1}}));
    }

    // Everyone → everyone, including b1, which has seen nothing until now.
    server.net.hub().do_send(Broadcast::text("Hello, clients!"));
    for c in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(c.next_text().await, "Hello, clients!");
    }
    b1.expect_silence(Duration::from_millis(200)).await;

    // One session.
    let n = server
        .net
        .hub()
        .send(Broadcast::to_session(b1.session, "just you"))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(b1.next_text().await, "just you");
    a1.expect_silence(Duration::from_millis(200)).await;
}

#[actix_web::test]
async fn join_and_leave_change_what_a_client_receives() {
    let server = start(config("{}")).await;
    let mut c = WsClient::connect(&server, "").await;
    let mut other = WsClient::connect(&server, "?room=news").await;

    c.join("news").await;
    other.send_text("headline").await;
    assert_eq!(other.next_text().await, "headline");
    assert_eq!(c.next_text().await, "headline");

    c.send_text(r#"{"type":"leave","room":"news"}"#).await;
    assert_eq!(c.next_of_type("left").await["room"], "news");
    other.send_text("second").await;
    assert_eq!(other.next_text().await, "second");
    c.expect_silence(Duration::from_millis(200)).await;

    // Publishing to a room you are not in is refused, politely.
    c.send_text(r#"{"type":"publish","room":"news","data":1}"#)
        .await;
    assert_eq!(c.next_of_type("error").await["code"], "not_member");
}

#[actix_web::test]
async fn five_hundred_clients_each_receive_a_hundred_broadcasts_in_order() {
    const CLIENTS: usize = 500;
    const BROADCASTS: usize = 100;
    let server = start(config("{}")).await;
    let clients = join_all((0..CLIENTS).map(|_| WsClient::connect(&server, ""))).await;
    let hub = server.net.hub();
    for i in 0..BROADCASTS {
        hub.do_send(Broadcast::text(format!("m{i}")));
    }
    let results = join_all(clients.into_iter().map(|mut c| async move {
        let mut got = Vec::with_capacity(BROADCASTS);
        while got.len() < BROADCASTS {
            got.push(c.next_text().await);
        }
        (c, got)
    }))
    .await;
    let expected: Vec<String> = (0..BROADCASTS).map(|i| format!("m{i}")).collect();
    for (_, got) in &results {
        assert_eq!(got, &expected);
    }
    let health = server.health().await;
    assert_eq!(health["hub"]["evicted_slow_consumer"], 0);
    assert_eq!(health["hub"]["sessions"], CLIENTS);
}

#[actix_web::test]
async fn a_client_that_never_answers_pings_is_evicted_and_one_that_does_is_not() {
    let server = start(config(
        r#"{"network":{"websocket":{"heartbeat_interval":0.1,"client_timeout":0.4}}}"#,
    ))
    .await;
    let mut silent = WsClient::connect(&server, "").await;
    silent.answer_pings = false;
    let mut alive = WsClient::connect(&server, "").await;

    // The well-behaved client keeps answering while we wait for the close.
    let alive_task = actix_web::rt::spawn(async move {
        let got = alive.recv_within(Duration::from_secs(1)).await;
        (alive, got)
    });
    let reason = silent.expect_close().await;
    assert_eq!(reason.code, CloseCode::Policy);
    assert_eq!(reason.description.as_deref(), Some("heartbeat timeout"));

    let (mut alive, got) = alive_task.await.unwrap();
    assert!(got.is_none(), "the live client received {got:?}");
    server.net.hub().do_send(Broadcast::text("still here"));
    assert_eq!(alive.next_text().await, "still here");
    let health = server.health().await;
    assert_eq!(health["hub"]["evicted_heartbeat"], 1);
    assert_eq!(health["hub"]["sessions"], 1);
}

#[actix_web::test]
async fn a_frame_over_the_limit_gets_close_1009() {
    let server = start(config("{}")).await;
    let mut c = WsClient::connect(&server, "").await;
    let mut bystander = WsClient::connect(&server, "").await;
    c.send_text(&"x".repeat(100 * 1024)).await;
    let reason = c.expect_close().await;
    assert_eq!(reason.code, CloseCode::Size);
    support::wait_for_hub(&server, "the close counted as too big", |hub| {
        hub["closed"]["too_big"] == 1
    })
    .await;
    // Nobody else was harmed, and nothing was broadcast.
    server.net.hub().do_send(Broadcast::text("ok"));
    assert_eq!(bystander.next_text().await, "ok");
}

#[actix_web::test]
async fn a_fragmented_message_is_reassembled_and_limited_as_a_whole() {
    use actix_http::ws::Item;
    let server = start(config(
        r#"{"network":{"websocket":{"max_message_bytes":1024}}}"#,
    ))
    .await;
    let mut c = WsClient::connect(&server, "").await;
    c.send(Message::Continuation(Item::FirstText("hel".into())))
        .await;
    c.send(Message::Continuation(Item::Last("lo".into()))).await;
    assert_eq!(c.next_text().await, "hello");

    // Each fragment is small; together they exceed the limit.
    c.send(Message::Continuation(Item::FirstText(
        "x".repeat(600).into(),
    )))
    .await;
    c.send(Message::Continuation(Item::Last("y".repeat(600).into())))
        .await;
    assert_eq!(c.expect_close().await.code, CloseCode::Size);
}

#[actix_web::test]
async fn sending_faster_than_the_rate_gets_close_1008() {
    let server = start(config(
        r#"{"network":{"websocket":{"max_messages_per_second":5,"message_burst":10}}}"#,
    ))
    .await;
    let mut spammer = WsClient::connect(&server, "?room=solo").await;
    let mut listener = WsClient::connect(&server, "?room=solo").await;
    for i in 0..30 {
        spammer.send_text(&format!("spam {i}")).await;
    }
    assert_eq!(spammer.expect_close().await.code, CloseCode::Policy);
    let health = support::wait_for_hub(&server, "the close counted as rate", |hub| {
        hub["closed"]["rate"] == 1
    })
    .await;
    assert_eq!(health["hub"]["closed"]["too_big"], 0);
    // The burst went through before the limit applied (one or two more may
    // have been earned while sending); nothing after the limit did.
    let mut heard = Vec::new();
    while let Some(Received::Text(t)) = listener.recv_within(Duration::from_millis(300)).await {
        heard.push(t);
    }
    assert!((10..=12).contains(&heard.len()), "heard {heard:?}");
    for (i, t) in heard.iter().enumerate() {
        assert_eq!(t, &format!("spam {i}"));
    }
}

#[actix_web::test]
async fn the_connection_over_max_connections_gets_503() {
    const MAX: usize = 1000;
    let server = start(config(&format!(
        r#"{{"network":{{"websocket":{{"max_connections":{MAX}}}}}}}"#
    )))
    .await;
    let mut clients = join_all((0..MAX).map(|_| WsClient::connect(&server, ""))).await;
    let refused = WsClient::try_connect(&server, "").await.err();
    assert_eq!(refused.as_deref(), Some("status 503 Service Unavailable"));

    // A slot frees when a client leaves.
    let mut leaving = clients.pop().unwrap();
    leaving.send(Message::Close(None)).await;
    let _ = leaving.recv().await;
    drop(leaving);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match WsClient::try_connect(&server, "").await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e, "status 503 Service Unavailable");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
}

#[actix_web::test]
async fn malformed_control_frames_get_an_error_frame_and_the_connection_survives() {
    let server = start(config("{}")).await;
    let mut c = WsClient::connect(&server, "").await;
    for bad in [
        "{not json",
        r#"{"type":"dance"}"#,
        r#"{"type":"join"}"#,
        r#"{"type":"join","room":""}"#,
    ] {
        c.send_text(bad).await;
        let v: Value = c.next_json().await;
        assert_eq!(v["type"], "error", "for {bad}: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    c.send(Message::Binary("bin".into())).await;
    assert_eq!(c.next_json().await["code"], "unsupported");
    // Still connected and working.
    c.join("after-errors").await;
    c.send_text("still fine").await;
    assert_eq!(c.next_text().await, "still fine");
}

#[actix_web::test]
async fn a_bad_room_in_the_upgrade_is_a_400() {
    let server = start(config("{}")).await;
    let long = "r".repeat(65);
    let err = WsClient::try_connect(&server, &format!("?room={long}"))
        .await
        .err();
    assert_eq!(err.as_deref(), Some("status 400 Bad Request"));
}

#[actix_web::test]
async fn presence_frames_count_clients_for_those_who_ask() {
    let server = start(config(
        r#"{"network":{"websocket":{"presence_interval":0.05}}}"#,
    ))
    .await;
    let mut watcher = WsClient::connect(&server, "?presence=1").await;
    let mut quiet = WsClient::connect(&server, "?room=x").await;
    let _third = WsClient::connect(&server, "?room=x").await;
    loop {
        let v = watcher.next_of_type("presence").await;
        if v["clients"] == 3 {
            assert_eq!(v["rooms"]["x"], 2);
            assert_eq!(v["rooms"]["lobby"], 1);
            break;
        }
    }
    quiet.expect_silence(Duration::from_millis(200)).await;
}

#[actix_web::test]
async fn graceful_shutdown_sends_1001_to_every_client() {
    let server = start(config("{}")).await;
    let mut clients = join_all((0..20).map(|_| WsClient::connect(&server, ""))).await;
    let closed = server.net.shutdown().await;
    assert_eq!(closed, 20);
    for c in &mut clients {
        assert_eq!(c.expect_close().await.code, CloseCode::Away);
    }
    // New upgrades are refused once shutdown has begun.
    let err = WsClient::try_connect(&server, "").await.err();
    assert_eq!(err.as_deref(), Some("status 503 Service Unavailable"));
}

#[actix_web::test]
async fn presence_frames_add_the_other_nodes_counts() {
    use happynet::actors::ClusterPresence;
    let server = start(config(
        r#"{"network":{"websocket":{"presence_interval":0.05}}}"#,
    ))
    .await;
    let mut watcher = WsClient::connect(&server, "?presence=1&room=x").await;
    // What a cluster bridge reports for the other nodes: 5 more clients,
    // 2 of them in room x, 3 in a room that only exists elsewhere.
    server.net.hub().do_send(ClusterPresence {
        sessions: 5,
        rooms: [
            (RoomName::new("x").unwrap(), 2),
            (RoomName::new("far").unwrap(), 3),
        ]
        .into_iter()
        .collect(),
    });
    loop {
        let v = watcher.next_of_type("presence").await;
        if v["clients"] == 6 {
            assert_eq!(v["rooms"]["x"], 3);
            assert_eq!(v["rooms"]["far"], 3);
            break;
        }
    }
}
