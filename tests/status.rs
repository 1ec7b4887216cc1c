//! `GET /status` end to end: a scripted scenario on a real server
//! (WebSocket clients in two rooms, broadcasts, a client leaving, an API
//! client against the fake upstream with a rate-limited call), checked
//! against what the scenario did and against `/health` and `/metrics`; and
//! the per-IP request limiter in front of it.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;
mod support;

use fake_upstream::{FakeUpstream, Faults};
use happynet::{Broadcast, HttpError, RoomName};
use serde_json::Value;
use std::time::Duration;
use support::{config, http_client, start, TestServer, WsClient, WAIT};

/// `GET /status`, checked for its headers, as JSON.
async fn status(server: &TestServer) -> Value {
    let mut resp = http_client()
        .get(server.url("/status"))
        .send()
        .await
        .expect("GET /status");
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(header("cache-control"), "no-store");
    resp.json::<Value>().await.expect("status JSON")
}

/// Polls `/status` until `pred` holds, or panics after [`WAIT`].
async fn status_until(server: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = status(server).await;
        if pred(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; last status: {s}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn status_reports_what_a_scripted_scenario_did() {
    let fake = FakeUpstream::start("a", Faults::default()).await.unwrap();
    let base = fake.url("");
    let server = start(config(&format!(
        r#"{{"network":{{
            "api_clients":{{"up":{{"base_url":"{base}","rate_limit":60,"rate_burst":2,
                "retry_attempts":0}}}}
        }}}}"#
    )))
    .await;

    // Three clients: two in lobby, one in games.
    let mut a = WsClient::connect(&server, "").await;
    let mut b = WsClient::connect(&server, "").await;
    let mut c = WsClient::connect(&server, "?room=games").await;
    let before = status(&server).await;
    assert_eq!(before["connections"], 3);
    assert_eq!(before["sessions"], 3);
    assert_eq!(before["rooms"]["count"], 2);
    assert_eq!(
        before["rooms"]["busiest"],
        serde_json::json!([{"room": "lobby", "members": 2}, {"room": "games", "members": 1}])
    );

    // One broadcast to everyone (3 deliveries), one to lobby (2).
    let hub = server.net.hub();
    assert_eq!(hub.send(Broadcast::text("all")).await.unwrap(), 3);
    let lobby = RoomName::new("lobby").unwrap();
    assert_eq!(
        hub.send(Broadcast::to_room(lobby, "lobby")).await.unwrap(),
        2
    );
    for client in [&mut a, &mut b] {
        assert_eq!(client.next_text().await, "all");
        assert_eq!(client.next_text().await, "lobby");
    }
    assert_eq!(c.next_text().await, "all");

    // The API client: two calls, then one the limiter refuses (burst 2).
    let api = server.net.api("up").unwrap();
    for _ in 0..2 {
        assert_eq!(api.get("/ok").send().await.unwrap().status, 200);
    }
    let limited = api.get("/x").wait_for_rate_limit(false).send().await;
    assert!(
        matches!(limited, Err(HttpError::RateLimited { .. })),
        "{limited:?}"
    );

    let after = status(&server).await;
    let delta = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    assert_eq!(delta("deliveries_total"), 5, "{before}\n{after}");
    assert_eq!(delta("broadcasts_total"), 2);
    assert!(after["time_ms"].as_u64() >= before["time_ms"].as_u64());
    assert!(after["uptime_ms"].as_u64().is_some());
    assert_eq!(after["max_connections"], 1000);
    assert_eq!(after["shutting_down"], false);
    assert_eq!(after["evictions"]["heartbeat"], 0);
    assert_eq!(after["cluster"], Value::Null);
    assert_eq!(after["alerts"], serde_json::json!([]));
    assert_eq!(after["security"]["refusals"]["rate_limited"], 0);

    let ups = after["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 1, "{after}");
    let up = &ups[0];
    assert_eq!(up["name"], "up");
    assert_eq!(up["breaker"]["state"], "closed");
    assert_eq!(up["breaker"]["calls"], 2);
    assert_eq!(up["breaker"]["failures"], 0);
    assert_eq!(up["limiter"]["granted"], 2);
    assert_eq!(up["limiter"]["denied"], 1);
    assert_eq!(up["pool"]["sent_total"], 2);
    assert_eq!(up["pool"]["in_flight"], 0);
    assert!(up["cache"].is_null(), "no cache configured: {up}");
    assert_eq!(fake.requests(), 2);

    // The same numbers as /health (both come from the hub's counters).
    let health = server.health().await;
    assert_eq!(health["hub"]["deliveries"], after["deliveries_total"]);

    // A client leaves: the count follows, and its room disappears.
    drop(c);
    let gone = status_until(&server, "the games client to leave", |s| {
        s["connections"] == 2 && s["sessions"] == 2
    })
    .await;
    assert_eq!(gone["rooms"]["count"], 1);
    assert_eq!(
        gone["rooms"]["busiest"],
        serde_json::json!([{"room": "lobby", "members": 2}])
    );

    server.net.shutdown().await;
    let closing = status(&server).await;
    assert_eq!(closing["shutting_down"], true);
    server.stop().await;
}

#[actix_web::test]
async fn status_is_behind_the_per_ip_limiter_and_metrics_is_not() {
    // Loopback is exempt by default; exempt nothing so the limit applies.
    let server = start(config(
        r#"{"network":{"security":{"exempt_ips":[],"requests_per_second":1,"request_burst":2}}}"#,
    ))
    .await;
    let get = |path: &'static str| {
        let url = server.url(path);
        async move { http_client().get(url).send().await.unwrap().status() }
    };
    assert_eq!(get("/status").await, 200);
    assert_eq!(get("/status").await, 200);
    assert_eq!(get("/status").await, 429);
    for _ in 0..5 {
        assert_eq!(get("/metrics").await, 200);
    }
    // Once the limiter lets one through again (1 per second), the refusal
    // is on the page.
    let deadline = tokio::time::Instant::now() + WAIT;
    let s = loop {
        let mut resp = http_client()
            .get(server.url("/status"))
            .send()
            .await
            .unwrap();
        if resp.status() == 200 {
            break resp.json::<Value>().await.unwrap();
        }
        assert_eq!(resp.status(), 429);
        assert!(tokio::time::Instant::now() < deadline, "never let through");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The third request above and any refused while polling.
    assert!(
        s["security"]["refusals"]["rate_limited"].as_u64().unwrap() >= 1,
        "{s}"
    );
    server.stop().await;
}

#[actix_web::test]
async fn with_websocket_tokens_status_shows_no_room_names() {
    let server = start(config(
        r#"{"network":{"security":{"ws_tokens":["t0k3n-for-tests"]}}}"#,
    ))
    .await;
    let _member = WsClient::connect(&server, "?room=dm-alice-bob&token=t0k3n-for-tests").await;
    let s = status_until(&server, "the session registered", |s| s["sessions"] == 1).await;
    // The count is there; who talks in which room is not.
    assert_eq!(s["rooms"]["count"], 1);
    assert_eq!(s["rooms"]["busiest"], serde_json::json!([]));
    assert!(!s.to_string().contains("dm-alice-bob"), "{s}");
}

#[actix_web::test]
async fn a_flood_of_status_requests_costs_the_hub_one_snapshot_per_interval() {
    const FLOOD: usize = 50;
    const INTERVAL_SECS: u64 = 1;
    let server = start(config(&format!(
        r#"{{"network":{{"security":{{"snapshot_interval":{INTERVAL_SECS}}}}}}}"#
    )))
    .await;
    assert_eq!(status(&server).await["broadcasts_total"], 0);
    assert_eq!(server.net.snapshots_taken().status, 1);

    // Broadcast after that snapshot: no answer may be older than its
    // request, so every one of the flood must count it.
    server
        .net
        .hub()
        .send(Broadcast::text("counted"))
        .await
        .expect("hub");
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..FLOOD).map(|_| status(&server))).await;
    let elapsed = started.elapsed();
    for a in &answers {
        assert_eq!(a["broadcasts_total"], 1, "{a}");
    }
    // Snapshots caused by the flood begin at least an interval apart
    // within its `elapsed`: one shared fresh snapshot, plus at most one per
    // interval the flood took to arrive.
    let taken = server.net.snapshots_taken().status;
    let bound = 2 + elapsed.as_secs() / INTERVAL_SECS;
    assert!(
        (2..=bound).contains(&taken),
        "{FLOOD} requests over {elapsed:?} took {taken} snapshots (at most {bound})"
    );
    assert_eq!(server.net.snapshots_taken().metrics, 0);
}
