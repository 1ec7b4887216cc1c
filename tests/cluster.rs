//! Scale-out through Redis, end to end: real `redis-server`
//! processes (one per test, on a free port, so a test can kill and restart
//! its own), nodes that are whole happynet servers each on its own thread
//! and actix `System` (so one can be killed without a goodbye), and real
//! WebSocket clients.
//!
//! What is checked: a broadcast from any node reaches every client on every
//! node exactly once; a killed node leaves the others working; a Redis
//! restart loses exactly what the documented guarantee says; a node that
//! lost its link replays what it missed from the stream; a shared rate limit
//! holds across three nodes to within 1%; the Lua GCRA decides exactly as
//! the Rust one; and Redis work stays constant from 10 to 3,000 WebSockets.

use testkit::fake_upstream;
mod support;

use actix::Actor;
use happynet::actors::gcra::{Gcra, Quota};
use happynet::actors::limiter::{Acquire, GetLimiterStats, RateLimiterActor};
use happynet::actors::shared_limiter::{Fallback, GcraScript, SharedLimit};
use happynet::cluster::{ClusterStats, GetClusterStats};
use happynet::Config;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{config, http_client, TestServer, WsClient, WAIT};
use testkit::free_port;
use testkit::redis_server::{self, RedisServer};

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// A happynet server on a thread and actix System of its own: killing it
/// stops its System, dropping every actor and connection without the
/// graceful `Leave`, as a crashed process would.
struct Node {
    server: TestServer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn start(config: Config) -> Node {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = support::start(config).await;
                let handle = server.handle.clone();
                let _ = ready_tx.send(server);
                let _ = stopped.await;
                handle.stop(false).await;
            });
        });
        let server = ready_rx.recv_timeout(WAIT).expect("node started");
        Node {
            server,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn kill(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    async fn stats(&self) -> ClusterStats {
        bridge_stats(&self.server).await
    }

    async fn ready_status(&self) -> u16 {
        http_client()
            .get(self.server.url("/ready"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// One unlabelled sample from `GET /metrics`, parsed by a Prometheus
    /// text parser; `None` when the family is absent.
    async fn metric(&self, name: &str) -> Option<f64> {
        let body = http_client()
            .get(self.server.url("/metrics"))
            .send()
            .await
            .ok()?
            .body()
            .await
            .ok()?;
        let text = String::from_utf8(body.to_vec()).ok()?;
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).ok()?;
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.is_empty())
            .and_then(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => Some(v),
                _ => None,
            })
    }

    /// `GET /status`'s `cluster` section.
    async fn status_cluster(&self) -> serde_json::Value {
        let mut res = http_client()
            .get(self.server.url("/status"))
            .send()
            .await
            .expect("GET /status");
        let v: serde_json::Value = res.json().await.expect("status JSON");
        v["cluster"].clone()
    }

    /// Polls `/ready` until it answers `status`.
    async fn wait_ready(&self, status: u16) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let got = self.ready_status().await;
            if got == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/ready stayed {got}, wanted {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the bridge's counters until `pred` holds.
    async fn wait_stats(&self, what: &str, pred: impl Fn(&ClusterStats) -> bool) -> ClusterStats {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stats = self.stats().await;
            if pred(&stats) {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; last: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `POST /broadcast[?room=…]` with a text body; the status.
    async fn broadcast(&self, room: Option<&str>, text: &str) -> u16 {
        let query = room.map_or(String::new(), |r| format!("?room={r}"));
        http_client()
            .post(self.server.url(&format!("/broadcast{query}")))
            .content_type("text/plain")
            .send_body(text.to_owned())
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }
}

impl std::ops::Deref for Node {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.server
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The cluster bridge's counters on `server`.
async fn bridge_stats(server: &TestServer) -> ClusterStats {
    server
        .net
        .cluster()
        .expect("a cluster node")
        .send(GetClusterStats)
        .await
        .expect("the bridge answers")
}

/// A node's configuration: `cluster` and `network` are extra keys (with a
/// leading comma) for `network.cluster` and `network`.
fn node_config(redis: &RedisServer, cluster: &str, network: &str) -> Config {
    let presence = if cluster.contains("presence_interval_ms") {
        ""
    } else {
        r#","presence_interval_ms":100"#
    };
    config(&format!(
        r#"{{"network":{{
            "websocket":{{"max_connections":4000,"presence_interval":0.05}},
            "cluster":{{"redis_url":"{}","reconnect_min_ms":20,"reconnect_max_ms":200
                        {presence}{cluster}}}{network}}}}}"#,
        redis.url()
    ))
}

async fn start_nodes(redis: &RedisServer, n: usize, cluster: &str, network: &str) -> Vec<Node> {
    let nodes: Vec<Node> = (0..n)
        .map(|_| Node::start(node_config(redis, cluster, network)))
        .collect();
    for node in &nodes {
        node.wait_ready(200).await;
    }
    nodes
}

fn is_presence(text: &str) -> bool {
    text.starts_with(r#"{"type":"presence""#)
}

/// Reads `client` (skipping presence frames) into `seen` until `done`.
async fn collect_until(
    client: &mut WsClient,
    seen: &mut Vec<String>,
    done: impl Fn(&[String]) -> bool,
) {
    while !done(seen) {
        let text = client.next_text().await;
        if !is_presence(&text) {
            seen.push(text);
        }
    }
}

fn has_all(seen: &[String], wanted: &[String]) -> bool {
    wanted.iter().all(|w| seen.contains(w))
}

/// Reads presence frames until one counts `clients` cluster-wide.
async fn wait_presence(client: &mut WsClient, clients: u64) {
    loop {
        let v = client.next_of_type("presence").await;
        if v["clients"] == clients {
            return;
        }
    }
}

fn init_logs() {
    let _ = env_logger::builder().is_test(true).try_init();
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[test]
fn the_cluster_is_off_by_default_and_the_demo_config_turns_it_on() {
    let seed = Config::from_file("tests/fixtures/seed-network.json").expect("seed loads");
    assert!(seed.network.cluster.is_none());
    assert!(Config::embedded().network.cluster.is_none());
    let demo = Config::from_file("examples/cluster.json").expect("the demo's cluster config");
    let cluster = demo.network.cluster.as_ref().expect("a cluster");
    assert_eq!(cluster.redis_url, "redis://127.0.0.1:6379");
    assert_eq!(cluster.prefix, "happynet");
    assert_eq!(cluster.limiter_fallback, Fallback::Local);
    assert_eq!(
        (cluster.stream_max_len, cluster.outbox_max),
        (100_000, 10_000)
    );
    let openai = demo.network.api_client("openai").expect("openai");
    assert!(openai.shared_limit.is_some(), "its rate limit is shared");
}

#[test]
fn bad_cluster_settings_name_their_path() {
    let error = |json: &str| match Config::from_json_str(json) {
        Ok(_) => panic!("accepted: {json}"),
        Err(e) => (e.path().unwrap_or_default().to_owned(), e.to_string()),
    };
    let cases = [
        (r#"{"network":{"cluster":{}}}"#, "network.cluster.redis_url"),
        (
            r#"{"network":{"cluster":{"redis_url":"http://x"}}}"#,
            "network.cluster.redis_url",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","prefix":"a b"}}}"#,
            "network.cluster.prefix",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","node_id":""}}}"#,
            "network.cluster.node_id",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","outbox_max":0}}}"#,
            "network.cluster.outbox_max",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","outbox_max_bytes":0}}}"#,
            "network.cluster.outbox_max_bytes",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","reconnect_min_ms":0}}}"#,
            "network.cluster.reconnect_min_ms",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","reconnect_min_ms":500,"reconnect_max_ms":100}}}"#,
            "network.cluster.reconnect_max_ms",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","limiter_fallback":"maybe"}}}"#,
            "network.cluster.limiter_fallback",
        ),
        (
            r#"{"network":{"cluster":{"redis_url":"redis://h","typo":1}}}"#,
            "network.cluster.typo",
        ),
        (
            r#"{"network":{"security":{"shared_rate_limits":true}}}"#,
            "network.security.shared_rate_limits",
        ),
        (
            r#"{"network":{"api_clients":{"a":{"base_url":"http://x","shared_rate_limit":true}}}}"#,
            "network.api_clients.a.shared_rate_limit",
        ),
    ];
    for (json, path) in cases {
        let (got, message) = error(json);
        assert_eq!(got, path, "{json}: {message}");
    }
}

#[actix_web::test]
async fn a_node_without_redis_is_not_ready_but_delivers_locally() {
    // Nothing listens on this port: the link never comes up.
    let port = free_port();
    let server = support::start(config(&format!(
            r#"{{"network":{{"cluster":{{"redis_url":"redis://127.0.0.1:{port}/","reconnect_max_ms":100}}}}}}"#
        )))
        .await;
    let mut client = WsClient::connect(&server, "").await;
    let mut ready = http_client()
        .get(server.url("/ready"))
        .send()
        .await
        .expect("GET /ready");
    assert_eq!(ready.status().as_u16(), 503);
    let body: serde_json::Value = ready.json().await.expect("JSON");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("cluster link down"),
        "{body}"
    );
    server
        .net
        .hub()
        .send(happynet::Broadcast::text("local"))
        .await
        .expect("hub");
    assert_eq!(client.next_text().await, "local");
    let stats = bridge_stats(&server).await;
    assert!(!stats.link_up);
    assert_eq!(stats.outbox, 1, "waiting for the link: {stats:?}");
}

#[actix_web::test]
async fn ready_requires_link_false_keeps_a_node_ready_without_redis() {
    let port = free_port();
    let server = support::start(config(&format!(
            r#"{{"network":{{"cluster":{{"redis_url":"redis://127.0.0.1:{port}/","reconnect_max_ms":100,"ready_requires_link":false}}}}}}"#
        )))
        .await;
    let ready = http_client()
        .get(server.url("/ready"))
        .send()
        .await
        .expect("GET /ready");
    assert_eq!(ready.status().as_u16(), 200);
    // The link is still reported as down where operators look.
    let stats = bridge_stats(&server).await;
    assert!(!stats.link_up);
}

// ---------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------

#[actix_web::test]
async fn a_broadcast_from_each_node_reaches_every_client_on_every_node_exactly_once() {
    init_logs();
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 3, "", "").await;
    // Per node: two clients in the lobby (the default room), one in `x`.
    let mut lobby = Vec::new();
    let mut xs = Vec::new();
    for node in &nodes {
        lobby.push(WsClient::connect(node, "").await);
        lobby.push(WsClient::connect(node, "").await);
        xs.push(WsClient::connect(node, "?room=x").await);
    }
    let mut seen_lobby: Vec<Vec<String>> = vec![Vec::new(); lobby.len()];
    let mut seen_x: Vec<Vec<String>> = vec![Vec::new(); xs.len()];

    // Everyone, from each node (POST /broadcast).
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(node.broadcast(None, &format!("all-{i}")).await, 202);
    }
    // Room x, from each node.
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(node.broadcast(Some("x"), &format!("x-{i}")).await, 202);
    }
    // A client's text to its room, from each node; its sender sees it too
    // (then the hub has handled and relayed it: the end markers come after).
    for i in 0..nodes.len() {
        let sender = 2 * i;
        let text = format!("t-{i}");
        lobby[sender].send_text(&text).await;
        let wanted = [text];
        collect_until(&mut lobby[sender], &mut seen_lobby[sender], |s| {
            has_all(s, &wanted)
        })
        .await;
    }
    // Last from each node: an end marker. Each origin's messages arrive in
    // order, so a duplicate of anything would arrive before its end marker.
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(node.broadcast(None, &format!("end-{i}")).await, 202);
    }
    let ends: Vec<String> = (0..3).map(|i| format!("end-{i}")).collect();
    let all: Vec<String> = (0..3).map(|i| format!("all-{i}")).collect();
    for (c, seen) in lobby.iter_mut().zip(&mut seen_lobby) {
        collect_until(c, seen, |s| has_all(s, &ends)).await;
    }
    for (c, seen) in xs.iter_mut().zip(&mut seen_x) {
        collect_until(c, seen, |s| has_all(s, &ends)).await;
    }
    let expect = |extra: &str| {
        let mut v: Vec<String> = all.clone();
        v.extend((0..3).map(|i| format!("{extra}-{i}")));
        v.extend(ends.clone());
        v.sort();
        v
    };
    for (k, seen) in seen_lobby.iter_mut().enumerate() {
        seen.sort();
        assert_eq!(*seen, expect("t"), "lobby client {k}");
    }
    for (k, seen) in seen_x.iter_mut().enumerate() {
        seen.sort();
        assert_eq!(*seen, expect("x"), "room-x client {k}");
    }
    for node in &nodes {
        // 12 broadcasts in all, 4 from each node; own entries are read back
        // and skipped, or (room broadcasts with history on, positioned by
        // the sequencer) delivered from the stream.
        let s = node
            .wait_stats("every entry read", |s| {
                s.published == 4 && s.skipped_own + s.positioned_own == 4
            })
            .await;
        assert_eq!(s.received, 8, "{s:?}");
        assert_eq!((s.duplicates, s.lost_inbound, s.lost_outbound), (0, 0, 0));
        // Local delivery plus one relay per local broadcast, nothing more.
        let hub = node.health().await["hub"].clone();
        assert_eq!(hub["relayed"], 4, "{hub}");
    }
}

#[actix_web::test]
async fn binary_broadcasts_cross_the_cluster_as_binary() {
    init_logs();
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 2, "", "").await;
    let mut a = WsClient::connect(&nodes[0], "?room=bin").await;
    let mut b = WsClient::connect(&nodes[1], "?room=bin").await;
    // Bytes that are not UTF-8, so a text path could not carry them.
    let bytes: Vec<u8> = vec![0xff, 0x00, 0xfe, 0x80];

    // A client's binary frame on node 0 reaches its room mate on node 1.
    a.send(awc::ws::Message::Binary(bytes.clone().into())).await;
    assert_eq!(a.next_binary().await, bytes);
    assert_eq!(b.next_binary().await, bytes);

    // POST /broadcast as application/octet-stream on node 1, to the room.
    let status = http_client()
        .post(nodes[1].url("/broadcast?room=bin"))
        .content_type("application/octet-stream")
        .send_body(vec![1u8, 2, 3])
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0);
    assert_eq!(status, 202);
    assert_eq!(b.next_binary().await, [1, 2, 3]);
    assert_eq!(a.next_binary().await, [1, 2, 3]);

    // App code on node 0, to everyone; then text still arrives as text.
    nodes[0]
        .net
        .hub()
        .do_send(happynet::Broadcast::binary(vec![0xc0, 0xaf]));
    assert_eq!(b.next_binary().await, [0xc0, 0xaf]);
    assert_eq!(nodes[0].broadcast(None, "text after").await, 202);
    assert_eq!(b.next_text().await, "text after");
    // Node 0 published three entries, node 1 one; each read all four
    // (its own room broadcasts are delivered from the stream: history on).
    for (node, own) in nodes.iter().zip([3, 1]) {
        let s = node
            .wait_stats("every entry read", |s| {
                s.skipped_own + s.positioned_own == own && s.received == 4 - own
            })
            .await;
        assert_eq!(s.malformed, 0, "{s:?}");
    }
}

#[actix_web::test]
async fn a_killed_node_leaves_the_others_working_and_drops_out_of_presence() {
    init_logs();
    let redis = RedisServer::start();
    let mut nodes = start_nodes(&redis, 3, "", "").await;
    let mut c0 = WsClient::connect_protocol(&nodes[0], "?presence=1").await;
    let mut c1 = WsClient::connect(&nodes[1], "").await;
    let _c2 = WsClient::connect(&nodes[2], "").await;
    // Presence is cluster-wide: node 0's client counts all three.
    wait_presence(&mut c0, 3).await;

    nodes[2].kill();
    for (i, node) in nodes.iter().take(2).enumerate() {
        assert_eq!(node.broadcast(None, &format!("after-{i}")).await, 202);
    }
    let wanted = ["after-0".to_owned(), "after-1".to_owned()];
    for c in [&mut c0, &mut c1] {
        let mut seen = Vec::new();
        collect_until(c, &mut seen, |s| has_all(s, &wanted)).await;
        seen.sort();
        assert_eq!(seen, wanted);
    }
    // The dead node's presence expires (three intervals) and it is counted
    // no more.
    wait_presence(&mut c0, 2).await;
    for node in nodes.iter().take(2) {
        assert_eq!(node.ready_status().await, 200);
        node.wait_stats("one peer left", |s| s.link_up && s.peers == 1)
            .await;
    }
}

#[actix_web::test]
async fn a_graceful_shutdown_leaves_presence_at_once() {
    init_logs();
    let redis = RedisServer::start();
    let nodes = start_nodes(&redis, 2, "", "").await;
    let name = nodes[0].stats().await.node;
    let mut admin = redis.conn();
    let key = format!("happynet:presence:{name}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !redis::cmd("EXISTS")
        .arg(&key)
        .query::<bool>(&mut admin)
        .unwrap()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no presence for {name}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nodes[0].server.net.shutdown().await;
    // Gone now, not three presence intervals from now.
    let exists: bool = redis::cmd("EXISTS").arg(&key).query(&mut admin).unwrap();
    let member: bool = redis::cmd("SISMEMBER")
        .arg("happynet:nodes")
        .arg(&name)
        .query(&mut admin)
        .unwrap();
    assert!(!exists && !member, "the node left the presence set at once");
    assert_eq!(nodes[1].ready_status().await, 200);
}

// ---------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------

/// Two nodes, a client on each, and a first broadcast from node 0 seen on
/// node 1 (so node 1 tracks node 0's sequence).
async fn two_linked_nodes(redis: &RedisServer, cluster: &str) -> (Vec<Node>, WsClient, WsClient) {
    let nodes = start_nodes(redis, 2, cluster, "").await;
    let mut a = WsClient::connect(&nodes[0], "").await;
    let mut b = WsClient::connect(&nodes[1], "").await;
    assert_eq!(nodes[0].broadcast(None, "warm-up").await, 202);
    assert_eq!(a.next_text().await, "warm-up");
    assert_eq!(b.next_text().await, "warm-up");
    // Acknowledged too: a reply lost with a killed Redis would have it
    // resent (and dropped as a repeat by node 1), blurring the counts.
    nodes[0]
        .wait_stats("the warm-up acknowledged", |s| s.published == 1)
        .await;
    (nodes, a, b)
}

#[actix_web::test]
async fn a_redis_restart_loses_nothing_the_outbox_can_hold() {
    init_logs();
    let mut redis = RedisServer::start();
    let (nodes, mut a, mut b) = two_linked_nodes(&redis, "").await;

    redis.kill();
    for node in &nodes {
        node.wait_ready(503).await;
    }
    // Published during the outage: local clients get them at once.
    const DURING: usize = 20;
    for i in 0..DURING {
        assert_eq!(nodes[0].broadcast(None, &format!("during-{i}")).await, 202);
        assert_eq!(a.next_text().await, format!("during-{i}"));
    }
    let s = nodes[0].stats().await;
    assert!(!s.link_up);
    assert_eq!((s.outbox, s.lost_outbound), (DURING, 0), "{s:?}");
    // What an operator sees meanwhile: /metrics and /status agree.
    assert_eq!(nodes[0].metric("happynet_cluster_link_up").await, Some(0.0));
    assert_eq!(
        nodes[0].metric("happynet_cluster_outbox").await,
        Some(DURING as f64)
    );
    let status = nodes[0].status_cluster().await;
    assert_eq!(status["link_up"], false, "{status}");
    assert_eq!(status["outbox"], DURING, "{status}");

    redis.restart();
    for node in &nodes {
        node.wait_ready(200).await;
    }
    // Flushed in order from the outbox when the link came back.
    for i in 0..DURING {
        assert_eq!(b.next_text().await, format!("during-{i}"));
    }
    assert_eq!(nodes[0].broadcast(None, "after").await, 202);
    assert_eq!(b.next_text().await, "after");
    let s0 = nodes[0]
        .wait_stats("all published", |s| s.published == 22)
        .await;
    let s1 = nodes[1].stats().await;
    assert_eq!((s0.lost_outbound, s0.outbox), (0, 0), "{s0:?}");
    assert_eq!(
        (s1.received, s1.lost_inbound, s1.duplicates),
        (22, 0, 0),
        "{s1:?}"
    );
    assert!(s0.reconnects >= 1 && s1.reconnects >= 1);
    assert_eq!(nodes[0].metric("happynet_cluster_link_up").await, Some(1.0));
    assert_eq!(
        nodes[1].metric("happynet_cluster_received_total").await,
        Some(22.0)
    );
}

#[actix_web::test]
async fn an_outage_longer_than_the_outbox_loses_exactly_the_overflow_and_says_so() {
    init_logs();
    let mut redis = RedisServer::start();
    const OUTBOX: usize = 5;
    let (nodes, mut a, mut b) =
        two_linked_nodes(&redis, &format!(r#","outbox_max":{OUTBOX}"#)).await;

    redis.kill();
    nodes[0].wait_ready(503).await;
    const DURING: usize = 8;
    for i in 0..DURING {
        assert_eq!(nodes[0].broadcast(None, &format!("during-{i}")).await, 202);
        assert_eq!(a.next_text().await, format!("during-{i}"));
    }
    redis.restart();
    for node in &nodes {
        node.wait_ready(200).await;
    }
    // The oldest three were dropped; the newest five arrive, in order.
    for i in DURING - OUTBOX..DURING {
        assert_eq!(b.next_text().await, format!("during-{i}"));
    }
    let s0 = nodes[0].stats().await;
    assert_eq!(s0.lost_outbound, (DURING - OUTBOX) as u64, "{s0:?}");
    // The receiver sees the gap in node 0's sequence: exactly as many.
    let s1 = nodes[1]
        .wait_stats("the gap counted", |s| s.received == 1 + OUTBOX as u64)
        .await;
    assert_eq!(s1.lost_inbound, (DURING - OUTBOX) as u64, "{s1:?}");
}

#[actix_web::test]
async fn a_node_that_lost_its_link_replays_what_it_missed_from_the_stream() {
    init_logs();
    let redis = RedisServer::start();
    let (nodes, mut a, mut b) = two_linked_nodes(&redis, "").await;
    let name = nodes[1].stats().await.node;
    let mut admin = redis.conn();
    // Node 1 cannot reconnect while Redis accepts no new clients; node 0
    // keeps the connections it has.
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    let ids: Vec<String> = clients
        .lines()
        .filter(|l| l.contains(&format!("name=happynet-{name}-")))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 2, "node 1's publishing and reading connections");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(clients.lines().count() - ids.len())
        .query(&mut admin)
        .unwrap();
    for id in ids {
        let _: () = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query(&mut admin)
            .unwrap();
    }
    nodes[1].wait_ready(503).await;
    assert_eq!(nodes[0].ready_status().await, 200);

    const MISSED: usize = 10;
    for i in 0..MISSED {
        assert_eq!(nodes[0].broadcast(None, &format!("missed-{i}")).await, 202);
        assert_eq!(a.next_text().await, format!("missed-{i}"));
    }
    // Node 0's client has them all, but the bridge publishes after the
    // local fan-out has begun: wait until it says all of them are in the
    // stream (the warm-up message was the first).
    nodes[0]
        .wait_stats("the missed ones published", |s| {
            s.published == 1 + MISSED as u64
        })
        .await;
    let len: usize = redis::cmd("XLEN")
        .arg("happynet:broadcasts")
        .query(&mut admin)
        .unwrap();
    assert_eq!(len, 1 + MISSED, "published while node 1 was away");

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxclients")
        .arg(10_000)
        .query(&mut admin)
        .unwrap();
    nodes[1].wait_ready(200).await;
    for i in 0..MISSED {
        assert_eq!(b.next_text().await, format!("missed-{i}"));
    }
    let s1 = nodes[1].stats().await;
    assert_eq!(s1.replayed, MISSED as u64, "{s1:?}");
    assert_eq!((s1.lost_inbound, s1.duplicates), (0, 0));
}

/// `XADD`s `fields` (any bytes) to the cluster's stream with a plain Redis
/// connection, as a foreign or broken writer would.
fn xadd_raw(admin: &mut redis::Connection, fields: &[(&[u8], &[u8])]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg("happynet:broadcasts").arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    let _: String = cmd.query(admin).expect("XADD");
}

#[actix_web::test]
async fn a_malformed_entry_is_skipped_and_counted_and_the_link_stays_up() {
    init_logs();
    let redis = RedisServer::start();
    let (nodes, _a, mut b) = two_linked_nodes(&redis, "").await;
    let mut admin = redis.conn();

    // A field name that is not UTF-8: once, this failed every node's reads.
    xadd_raw(&mut admin, &[(b"\xff", b"x")]);
    // While it is the newest entry, a fresh node can still link up.
    let fresh = Node::start(node_config(&redis, "", ""));
    fresh.wait_ready(200).await;

    assert_eq!(nodes[0].broadcast(None, "after-binary").await, 202);
    let mut seen = Vec::new();
    collect_until(&mut b, &mut seen, |s| !s.is_empty()).await;
    assert_eq!(seen, ["after-binary"]);
    let s1 = nodes[1]
        .wait_stats("the good entry received", |s| s.received == 2)
        .await;
    assert_eq!(s1.malformed, 1, "{s1:?}");
    assert!(s1.link_up && s1.last_error.is_none(), "{s1:?}");
    assert_eq!((s1.reconnects, s1.lost_inbound), (0, 0), "{s1:?}");
    assert_eq!(nodes[1].ready_status().await, 200);
    let s2 = fresh
        .wait_stats("the fresh node reads past it", |s| s.received == 1)
        .await;
    assert_eq!((s2.malformed, s2.reconnects), (0, 0), "it started after it");

    // A good origin and sequence with a bad target (an empty room list):
    // skipped as malformed, but its sequence is no gap.
    let entry = |seq: &'static [u8], target: &'static [u8], payload: &'static [u8]| {
        [
            (&b"node"[..], &b"foreign"[..]),
            (b"seq", seq),
            (b"target", target),
            (b"payload", payload),
        ]
    };
    xadd_raw(&mut admin, &entry(b"1", b"all", b"foreign-1"));
    xadd_raw(&mut admin, &entry(b"2", b"[]", b"foreign-2"));
    xadd_raw(&mut admin, &entry(b"3", b"all", b"foreign-3"));
    let mut seen = Vec::new();
    collect_until(&mut b, &mut seen, |s| s.len() >= 2).await;
    assert_eq!(seen, ["foreign-1", "foreign-3"]);
    let s1 = nodes[1]
        .wait_stats("the foreign entries counted", |s| s.malformed == 2)
        .await;
    assert_eq!(
        (s1.received, s1.lost_inbound, s1.reconnects),
        (4, 0, 0),
        "{s1:?}"
    );
    assert!(s1.link_up, "{s1:?}");
    assert_eq!(nodes[1].ready_status().await, 200);
}

// ---------------------------------------------------------------------------
// Shared rate limits
// ---------------------------------------------------------------------------

/// Property: with random quotas and request times, the Lua script on a real
/// Redis (given the same `now`) decides exactly as [`Gcra::check`], wait
/// included, and its key expires when the Rust state becomes idle.
#[actix_web::test]
async fn the_lua_gcra_decides_exactly_as_the_rust_one() {
    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let script = GcraScript::new();
    let mut rng = happynet::actors::backoff::Jitter::with_seed(0x5EED_CAFE);
    // The explicit clock starts a day ahead (keys expire on the script's
    // clock, so none expires in real time during the test), with a
    // nanosecond part close to a second so that the carries are exercised.
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let epoch = Duration::new(unix_now.as_secs() + 86_400, 999_999_000);
    for case in 0..20 {
        let rate = 1.0 + (rng.next_u64() % 3000) as f64 / 7.0;
        let burst = 1 + (rng.next_u64() % 8) as u32;
        let quota = Quota::per_second(rate, burst).unwrap();
        let key = format!("case-{case}");
        let t0 = Instant::now();
        let mut offset = Duration::ZERO;
        let mut gcra = Gcra::new();
        for step in 0..200 {
            offset += Duration::from_nanos(rng.next_u64() % 5_000_000);
            let want = gcra.check(&quota, t0 + offset);
            let got = script
                .check(&mut conn, &key, &quota, Some(epoch + offset))
                .await
                .unwrap();
            assert_eq!(
                got, want,
                "case {case} step {step} rate {rate} burst {burst}"
            );
        }
        // The key expires (on the script's clock) once the Rust state is
        // idle, and at most two milliseconds after.
        let expire_ms: u64 = redis::cmd("PEXPIRETIME")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let expires = t0 + (Duration::from_millis(expire_ms) - epoch);
        assert!(gcra.is_idle(expires), "case {case}: expires while busy");
        assert!(
            !gcra.is_idle(expires - Duration::from_millis(2))
                || expires <= t0 + offset + Duration::from_millis(2),
            "case {case}: expires too late"
        );
    }
}

#[actix_web::test]
async fn a_shared_limit_across_three_nodes_admits_the_configured_rate_within_one_percent() {
    init_logs();
    let redis = RedisServer::start();
    const RATE: f64 = 1000.0;
    // A burst of 100 ms' worth: a load generator that stalls for less
    // than that (two cores, other tests beside it) loses no capacity.
    const BURST: u32 = 100;
    const RUN: Duration = Duration::from_secs(4);
    let quota = Quota::per_second(RATE, BURST).unwrap();
    // Three nodes' limiters, each on an arbiter (thread) of its own, with
    // its own connection; "deny" so that no decision is made locally.
    let arbiters: Vec<actix::Arbiter> = (0..3).map(|_| actix::Arbiter::new()).collect();
    let limiters: Vec<_> = arbiters
        .iter()
        .map(|arbiter| {
            let limit = SharedLimit::new(
                &redis.url(),
                "t",
                Fallback::Deny,
                Duration::from_millis(200),
            )
            .unwrap();
            RateLimiterActor::start_in_arbiter(&arbiter.handle(), move |_| {
                RateLimiterActor::new("api", quota, 1000).with_shared(limit)
            })
        })
        .collect();
    // Each limiter's connection is up once it has decided a request.
    for l in &limiters {
        let _ = l
            .send(Acquire {
                key: "warm-up".into(),
            })
            .await
            .unwrap();
        assert_eq!(l.send(GetLimiterStats).await.unwrap().shared, 1);
    }
    // Every node asks as fast as it can, eight requests in flight each,
    // noting when its first and last grants came back.
    let deadline = Instant::now() + RUN;
    let workers = limiters.iter().flat_map(|l| {
        (0..8).map(move |_| {
            let l = l.clone();
            async move {
                let mut granted = 0u64;
                let mut first_last: Option<(Instant, Instant)> = None;
                while Instant::now() < deadline {
                    if let Ok(Ok(())) = l
                        .send(Acquire {
                            key: "shared-key".into(),
                        })
                        .await
                    {
                        granted += 1;
                        let now = Instant::now();
                        first_last = Some(first_last.map_or((now, now), |(f, _)| (f, now)));
                    }
                }
                (granted, first_last)
            }
        })
    });
    let results = futures::future::join_all(workers).await;
    let granted: u64 = results.iter().map(|(g, _)| g).sum();
    let first = results
        .iter()
        .filter_map(|(_, fl)| fl.map(|f| f.0))
        .min()
        .unwrap();
    let last = results
        .iter()
        .filter_map(|(_, fl)| fl.map(|f| f.1))
        .max()
        .unwrap();
    // The burst at the first grant, then one per interval until the last.
    let elapsed = last - first;
    let expected = f64::from(BURST) + elapsed.as_secs_f64() * RATE;
    let error = (granted as f64 - expected).abs() / expected;
    let mut asked = 0;
    for l in &limiters {
        let s = l.send(GetLimiterStats).await.unwrap();
        assert_eq!(s.fallbacks, 0, "every decision came from Redis: {s:?}");
        assert!(s.granted > 0, "every node was admitted some: {s:?}");
        asked += s.granted + s.denied;
    }
    println!(
        "shared limit: {granted} granted of {asked} asked in {elapsed:?}, expected {expected:.0} ({:.3}% off)",
        error * 100.0
    );
    assert!(
        error <= 0.01,
        "{granted} granted, expected {expected:.0} ({:.2}% off)",
        error * 100.0
    );
    for a in arbiters {
        a.stop();
    }
}

#[actix_web::test]
async fn an_api_clients_shared_rate_limit_holds_across_three_nodes() {
    init_logs();
    let redis = RedisServer::start();
    let fake = fake_upstream::FakeUpstream::start("a", fake_upstream::Faults::default())
        .await
        .unwrap();
    // A burst of 5 and then one call a minute, for the whole cluster.
    const BURST: usize = 5;
    let nodes = start_nodes(
        &redis,
        3,
        "",
        &format!(
            r#","api_clients":{{"up":{{"base_url":"{}","rate_limit":1,"rate_burst":{BURST},
                "retry_attempts":0,"shared_rate_limit":true}}}}"#,
            fake.url("")
        ),
    )
    .await;
    // Every node asks for the whole burst, one after the other.
    let mut ok = 0;
    let mut limited = 0;
    for node in &nodes {
        let api = node.net.api("up").expect("api client");
        for _ in 0..BURST {
            match api.get("/x").send().await {
                Ok(_) => ok += 1,
                Err(happynet::HttpError::RateLimited { .. }) => limited += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    }
    // Per node it would have been 3 × 5 calls; shared, it is 5.
    assert_eq!((ok, limited), (BURST, 2 * BURST));
    assert_eq!(fake.requests(), BURST as u64);
}

#[actix_web::test]
async fn shared_per_ip_limits_hold_across_the_cluster() {
    init_logs();
    let redis = RedisServer::start();
    // One request per second per IP with a burst of 10: per node that would
    // be 30 admitted at once across three nodes; shared, 10.
    let nodes = start_nodes(
        &redis,
        3,
        "",
        r#","security":{"requests_per_second":1,"request_burst":10,"exempt_ips":[],"shared_rate_limits":true}"#,
    )
    .await;
    let started = Instant::now();
    let mut admitted = 0;
    for _ in 0..15 {
        for node in &nodes {
            match node.broadcast(None, "x").await {
                202 => admitted += 1,
                429 => {}
                other => panic!("unexpected status {other}"),
            }
        }
    }
    let bound = 10 + started.elapsed().as_secs() + 1;
    assert!(
        (10..=bound).contains(&admitted),
        "{admitted} admitted across three nodes, the shared limit allows {bound}"
    );
}

// ---------------------------------------------------------------------------
// Redis work
// ---------------------------------------------------------------------------

/// Raises this process's open-files soft limit to `need` (up to the hard
/// limit) with `prlimit`, the test having no unsafe code to call
/// `setrlimit` itself.
fn ensure_open_files(need: u64) {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default();
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (soft, hard) = (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    );
    if soft >= need {
        return;
    }
    let _ = Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    assert!(
        hard >= need,
        "this test needs {need} open files; the hard limit is {hard} (raise `ulimit -n`)"
    );
}

struct Work {
    clients: u64,
    xadd: u64,
    xread: u64,
    total: u64,
}

/// Redis's connected clients and commands so far, read on one admin
/// connection (so that the reading itself opens no new ones).
fn redis_work(admin: &mut redis::Connection) -> Work {
    let clients = redis_server::info(admin, "clients");
    let stats = redis_server::info(admin, "stats");
    let commands = redis_server::info(admin, "commandstats");
    let calls = |c: &str| {
        commands
            .get(&format!("cmdstat_{c}"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Work {
        clients: clients["connected_clients"]
            .parse()
            .expect("connected_clients"),
        xadd: calls("xadd"),
        xread: calls("xread"),
        total: stats["total_commands_processed"]
            .parse()
            .expect("total_commands_processed"),
    }
}

/// Sends `n` broadcasts from node 0, each once node 1 has received the
/// previous one, and returns the connected clients and Redis's commands per
/// broadcast: XADD, XREAD, and every command.
async fn work_per_broadcast(
    admin: &mut redis::Connection,
    nodes: &[Node],
    n: u64,
) -> (u64, f64, f64, f64) {
    let before = redis_work(admin);
    let received = nodes[1].stats().await.received;
    for i in 0..n {
        assert_eq!(nodes[0].broadcast(None, "tick").await, 202);
        nodes[1]
            .wait_stats("the broadcast relayed", |s| s.received > received + i)
            .await;
    }
    let after = redis_work(admin);
    assert_eq!(before.clients, after.clients);
    let per = |a: u64, b: u64| (b - a) as f64 / n as f64;
    (
        after.clients,
        per(before.xadd, after.xadd),
        per(before.xread, after.xread),
        per(before.total, after.total),
    )
}

#[actix_web::test]
async fn redis_work_stays_constant_from_10_to_3000_websockets() {
    init_logs();
    ensure_open_files(8_000);
    let redis = RedisServer::start();
    // Presence off: its cost is per interval, not per message or
    // connection, and would blur the per-broadcast figures.
    let nodes = start_nodes(&redis, 2, r#","presence_interval_ms":0"#, "").await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(WsClient::connect(&nodes[i % 2], "").await);
    }
    const N: u64 = 30;
    let mut admin = redis.conn();
    let small = work_per_broadcast(&mut admin, &nodes, N).await;

    while clients.len() < 3000 {
        let batch = (clients.len()..clients.len() + 100)
            .map(|i| WsClient::connect(&nodes[i % 2], ""))
            .collect::<Vec<_>>();
        clients.extend(futures::future::join_all(batch).await);
    }
    let large = work_per_broadcast(&mut admin, &nodes, N).await;
    println!(
        "Redis per broadcast, 10 vs 3000 WebSockets: clients {} vs {}, XADD {:.2} vs {:.2}, XREAD {:.2} vs {:.2}, all commands {:.2} vs {:.2}",
        small.0, large.0, small.1, large.1, small.2, large.2, small.3, large.3
    );
    assert_eq!(
        small.0, large.0,
        "Redis connections do not grow with WebSockets"
    );
    assert_eq!((small.1, large.1), (1.0, 1.0), "one XADD per broadcast");
    // Each node reads each entry once: about one XREAD per node per
    // broadcast when they come one at a time (plus the odd empty read when
    // a one-second block expires).
    assert!(small.2 <= 2.2 && large.2 <= 2.2, "{small:?} vs {large:?}");
    assert!(large.3 <= small.3 + 0.5, "{small:?} vs {large:?}");
    drop(clients);
}

// ---------------------------------------------------------------------------
// History across nodes: Redis positions every room broadcast
// ---------------------------------------------------------------------------

/// A node with history on (`size` messages per room), presence frames
/// rare enough not to matter. `prefix` is the test's own: a Redis killed
/// by one test frees its port for another test's Redis, which a node
/// reconnecting must not take for its cluster.
fn history_node_config(redis: &RedisServer, size: usize, prefix: &str) -> Config {
    history_node_config_with(redis, size, prefix, "")
}

/// [`history_node_config`] with `websocket` extra keys (with a leading
/// comma) for `network.websocket`.
fn history_node_config_with(
    redis: &RedisServer,
    size: usize,
    prefix: &str,
    websocket: &str,
) -> Config {
    config(&format!(
        r#"{{"network":{{
            "websocket":{{"max_connections":4000,"history":{{"size":{size}}}{websocket}}},
            "cluster":{{"redis_url":"{}","reconnect_min_ms":20,"reconnect_max_ms":200,
                        "presence_interval_ms":1000,"prefix":"{prefix}"}}}}}}"#,
        redis.url()
    ))
}

async fn start_history_nodes(
    redis: &RedisServer,
    n: usize,
    size: usize,
    prefix: &str,
) -> Vec<Node> {
    start_history_nodes_with(redis, n, size, prefix, "").await
}

async fn start_history_nodes_with(
    redis: &RedisServer,
    n: usize,
    size: usize,
    prefix: &str,
    websocket: &str,
) -> Vec<Node> {
    let nodes: Vec<Node> = (0..n)
        .map(|_| Node::start(history_node_config_with(redis, size, prefix, websocket)))
        .collect();
    for node in &nodes {
        node.wait_ready(200).await;
    }
    nodes
}

fn feed() -> happynet::RoomName {
    happynet::RoomName::new("feed").expect("a room name")
}

/// The next frame that is not a presence frame, as JSON.
async fn next_frame(c: &mut WsClient) -> serde_json::Value {
    loop {
        let v = c.next_json().await;
        if v["type"] != "presence" {
            return v;
        }
    }
}

/// Reads `feed`'s messages after `after` through `through`, each exactly
/// the next offset of `epoch`; returns their data.
async fn read_feed(c: &mut WsClient, epoch: &str, after: u64, through: u64) -> Vec<String> {
    let mut got = Vec::new();
    for offset in after + 1..=through {
        let v = next_frame(c).await;
        assert_eq!(v["type"], "message", "{v}");
        assert_eq!(v["room"], "feed", "{v}");
        assert_eq!(v["epoch"], epoch, "one epoch, cluster-wide: {v}");
        assert_eq!(v["offset"], offset, "no gap, no repeat: {v}");
        got.push(v["data"].as_str().expect("text data").to_owned());
    }
    got
}

/// `m{from}`..`m{to}` to `feed`: even ones by app code on `node`, odd ones
/// through its `POST /broadcast`.
async fn feed_burst(node: &Node, from: u64, to: u64) {
    let hub = node.net.hub();
    for i in from..to {
        if i % 2 == 0 {
            hub.do_send(happynet::Broadcast::to_room(feed(), format!("m{i}")));
        } else {
            assert_eq!(node.broadcast(Some("feed"), &format!("m{i}")).await, 202);
        }
    }
}

#[actix_web::test]
async fn a_client_that_drops_on_one_node_recovers_all_1000_on_another_once_in_order() {
    init_logs();
    const TOTAL: u64 = 1000;
    let redis = RedisServer::start();
    let nodes = start_history_nodes(&redis, 2, 1000, "across").await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut c = WsClient::connect_protocol(a, "?room=feed").await;
    // Published on node B (app code and POST /broadcast), and by node A's
    // own app code: all of it positioned by Redis.
    feed_burst(b, 0, 400).await;
    let first = next_frame(&mut c).await;
    let epoch = support::assert_message(&first, "feed", 1, serde_json::json!("m0"));
    let mut have = vec!["m0".to_owned()];
    have.extend(read_feed(&mut c, &epoch, 1, 250).await);
    // Drops in the middle (no close frame): what was on its way is lost
    // with the connection. It reconnects to node B while the rest is being
    // published, partly on node A.
    drop(c);
    let query = format!("?room=feed&since={epoch}:250");
    let (client, (), ()) = futures::join!(
        WsClient::connect_protocol(b, &query),
        feed_burst(b, 400, 700),
        feed_burst(a, 700, TOTAL),
    );
    let mut c = client;
    let recovered = next_frame(&mut c).await;
    assert_eq!(recovered["type"], "recovered", "{recovered}");
    assert_eq!(recovered["complete"], true, "{recovered}");
    have.extend(read_feed(&mut c, &epoch, 250, TOTAL).await);
    let mut want: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    // Two publishers at once: the order is the stream's, the same for
    // everyone; compare as sets of once-each, and the order by offset
    // (read_feed checked every offset follows the last).
    let mut sorted = have.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want, "all 1,000, once each");
    // Live continues at the seam: the next one is offset 1001, once.
    feed_burst(a, TOTAL, TOTAL + 1).await;
    let next = next_frame(&mut c).await;
    support::assert_message(
        &next,
        "feed",
        TOTAL + 1,
        serde_json::json!(format!("m{TOTAL}")),
    );
    c.expect_silence(Duration::from_millis(100)).await;

    // What recovering 1,000 on another node costs: connect to `recovered`
    // and to the last replayed message.
    let started = Instant::now();
    let mut late = WsClient::connect_protocol(b, &format!("?room=feed&since={epoch}:1")).await;
    let recovered = next_frame(&mut late).await;
    let to_frame = started.elapsed();
    assert_eq!(recovered["complete"], true, "{recovered}");
    assert_eq!(recovered["replayed"], TOTAL, "{recovered}");
    read_feed(&mut late, &epoch, 1, TOTAL + 1).await;
    eprintln!(
        "recovering {TOTAL} across nodes: {to_frame:?} to the recovered frame, {:?} to the last message",
        started.elapsed()
    );
}

#[actix_web::test]
async fn the_same_message_has_the_same_epoch_and_offset_on_every_node() {
    init_logs();
    let redis = RedisServer::start();
    let nodes = start_history_nodes(&redis, 3, 100, "same").await;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(WsClient::connect_protocol(node, "?room=feed").await);
    }
    // Every node publishes at once: the stream decides one order.
    futures::join!(
        feed_burst(&nodes[0], 0, 30),
        feed_burst(&nodes[1], 30, 60),
        feed_burst(&nodes[2], 60, 90),
    );
    let mut frames = Vec::new();
    for c in &mut clients {
        let mut got = Vec::new();
        for _ in 0..90 {
            let v = next_frame(c).await;
            assert_eq!(v["type"], "message", "{v}");
            got.push(v);
        }
        frames.push(got);
    }
    assert_eq!(
        frames[0], frames[1],
        "node 0 and node 1 agree frame by frame"
    );
    assert_eq!(
        frames[0], frames[2],
        "node 0 and node 2 agree frame by frame"
    );
    let offsets: Vec<u64> = frames[0]
        .iter()
        .map(|v| v["offset"].as_u64().expect("an offset"))
        .collect();
    assert_eq!(offsets, (1..=90).collect::<Vec<_>>());
    for node in &nodes {
        let s = node.stats().await;
        assert_eq!((s.positioned_own, s.received), (30, 60), "{s:?}");
        assert_eq!((s.unpositioned, s.duplicates, s.malformed), (0, 0, 0));
        // Each broadcast counted once by each hub, its own ones as relayed.
        let hub = node.health().await["hub"].clone();
        assert_eq!(
            (&hub["broadcasts"], &hub["from_cluster"], &hub["relayed"]),
            (&90.into(), &60.into(), &30.into()),
            "{hub}"
        );
    }
}

#[actix_web::test]
async fn a_restarted_node_backfills_from_the_stream_and_recovers_complete() {
    init_logs();
    let redis = RedisServer::start();
    let mut nodes = start_history_nodes(&redis, 2, 100, "restart").await;
    let mut c = WsClient::connect_protocol(&nodes[0], "?room=feed").await;
    feed_burst(&nodes[0], 0, 10).await;
    let first = next_frame(&mut c).await;
    let epoch = support::assert_message(&first, "feed", 1, serde_json::json!("m0"));
    read_feed(&mut c, &epoch, 1, 10).await;
    // Node A dies (no goodbye); meanwhile B publishes 20 more.
    nodes[0].kill();
    drop(c);
    feed_burst(&nodes[1], 10, 30).await;
    nodes[1]
        .wait_stats("B's published", |s| s.positioned_own == 20)
        .await;
    // A new process on the same Redis: its history is read back from the
    // stream, so the client that comes back with its position has it all.
    nodes[0] = Node::start(history_node_config(&redis, 100, "restart"));
    nodes[0].wait_ready(200).await;
    let mut c =
        WsClient::connect_protocol(&nodes[0], &format!("?room=feed&since={epoch}:10")).await;
    let recovered = next_frame(&mut c).await;
    assert_eq!(recovered["type"], "recovered", "{recovered}");
    assert_eq!(recovered["complete"], true, "{recovered}");
    assert_eq!(recovered["replayed"], 20, "{recovered}");
    let got = read_feed(&mut c, &epoch, 10, 30).await;
    assert_eq!(got, (10..30).map(|i| format!("m{i}")).collect::<Vec<_>>());
    // And live on from there, on the new process.
    feed_burst(&nodes[1], 30, 31).await;
    support::assert_message(
        &next_frame(&mut c).await,
        "feed",
        31,
        serde_json::json!("m30"),
    );
    let s = nodes[0].stats().await;
    assert_eq!(s.backfilled, 30, "{s:?}");
}

#[actix_web::test]
async fn a_flushed_redis_starts_a_new_epoch_and_recovery_says_complete_false() {
    init_logs();
    let redis = RedisServer::start();
    let nodes = start_history_nodes(&redis, 2, 100, "flush").await;
    let mut c = WsClient::connect_protocol(&nodes[0], "?room=feed").await;
    feed_burst(&nodes[1], 0, 5).await;
    let first = next_frame(&mut c).await;
    let epoch = support::assert_message(&first, "feed", 1, serde_json::json!("m0"));
    read_feed(&mut c, &epoch, 1, 5).await;
    drop(c);
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.conn())
        .expect("FLUSHALL");
    feed_burst(&nodes[1], 5, 8).await;
    // The room's record is gone: offsets start again, in a new epoch.
    let mut live = WsClient::connect_protocol(&nodes[1], "?room=feed").await;
    feed_burst(&nodes[1], 8, 9).await;
    // (m6 and m7 may still be on their way as it joins.)
    let v = loop {
        let v = next_frame(&mut live).await;
        if v["data"] == "m8" {
            break v;
        }
    };
    assert_eq!(v["offset"], 4, "{v}");
    assert_ne!(v["epoch"], epoch.as_str(), "{v}");
    for node in &nodes {
        let mut c = WsClient::connect_protocol(node, &format!("?room=feed&since={epoch}:5")).await;
        let recovered = next_frame(&mut c).await;
        assert_eq!(recovered["type"], "recovered", "{recovered}");
        assert_eq!(recovered["complete"], false, "{recovered}");
        c.expect_silence(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn with_redis_down_room_delivery_goes_on_and_recovery_across_it_is_complete_false() {
    init_logs();
    let mut redis = RedisServer::start();
    let nodes = start_history_nodes(&redis, 2, 100, "down").await;
    let mut c = WsClient::connect_protocol(&nodes[0], "?room=feed").await;
    feed_burst(&nodes[0], 0, 5).await;
    let first = next_frame(&mut c).await;
    let epoch = support::assert_message(&first, "feed", 1, serde_json::json!("m0"));
    read_feed(&mut c, &epoch, 1, 5).await;

    redis.kill();
    nodes[0].wait_ready(503).await;
    // Delivered here at once, numbered by the node itself in an epoch of
    // its own: no client can take them for offsets 6.. of Redis's epoch.
    feed_burst(&nodes[0], 5, 10).await;
    let v = next_frame(&mut c).await;
    assert_eq!(v["data"], "m5", "{v}");
    let local = v["epoch"].as_str().expect("an epoch").to_owned();
    assert_ne!(local, epoch, "{v}");
    read_feed_in(&mut c, &local, v["offset"].as_u64().expect("an offset"), 4).await;
    assert!(nodes[0].stats().await.unpositioned >= 5);
    let hub = nodes[0].health().await["hub"].clone();
    assert_eq!(hub["broadcasts"], 10, "counted once each: {hub}");

    // A client that left before the outage cannot be told a complete
    // story: complete:false, nothing replayed.
    let mut back =
        WsClient::connect_protocol(&nodes[0], &format!("?room=feed&since={epoch}:5")).await;
    let recovered = next_frame(&mut back).await;
    assert_eq!(recovered["type"], "recovered", "{recovered}");
    assert_eq!(recovered["complete"], false, "{recovered}");
    back.expect_silence(Duration::from_millis(100)).await;

    // Redis back (empty): the outage's messages reach node B, relayed
    // plain, and room messages are positioned by Redis again.
    redis.restart();
    for node in &nodes {
        node.wait_ready(200).await;
    }
    let mut b = WsClient::connect_protocol(&nodes[1], "?room=feed").await;
    feed_burst(&nodes[0], 10, 11).await;
    let on_a = next_frame(&mut c).await;
    let on_b = next_frame(&mut b).await;
    assert_eq!(on_a["data"], "m10");
    assert_eq!(on_a, on_b, "one position, cluster-wide, again");
    assert_ne!(on_a["epoch"], local.as_str());
}

/// Reads `n` more messages of `feed` in `epoch` after `after`.
async fn read_feed_in(c: &mut WsClient, epoch: &str, after: u64, n: u64) {
    read_feed(c, epoch, after, after + n).await;
}

/// Blocks `redis` for `ms` with a busy Lua script on a thread of its own
/// (every other client's command waits behind it); returns once Redis has
/// stopped answering another connection's `PING`.
fn block_redis(redis: &RedisServer, ms: u64) -> std::thread::JoinHandle<()> {
    let mut busy = redis.conn();
    // Connected first: a connection made while Redis is busy cannot say
    // hello.
    let mut probe = redis.conn();
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("read timeout");
    let blocker = std::thread::spawn(move || {
        let script = "local t0 = redis.call('TIME') \
            local function ms(t) return t[1] * 1000 + math.floor(t[2] / 1000) end \
            while ms(redis.call('TIME')) - ms(t0) < tonumber(ARGV[1]) do end return 1";
        let _: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .arg(ms)
            .query(&mut busy);
    });
    let deadline = Instant::now() + WAIT;
    while redis::cmd("PING").query::<String>(&mut probe).is_ok() {
        assert!(Instant::now() < deadline, "Redis never got busy");
    }
    blocker
}

#[actix_web::test]
async fn a_script_whose_reply_was_lost_is_delivered_once_everywhere() {
    init_logs();
    let redis = RedisServer::start();
    let nodes = start_history_nodes(&redis, 2, 100, "lost-reply").await;
    let mut a = WsClient::connect_protocol(&nodes[0], "?room=feed").await;
    let mut b = WsClient::connect_protocol(&nodes[1], "?room=feed").await;
    feed_burst(&nodes[0], 0, 1).await;
    let epoch = support::assert_message(
        &next_frame(&mut a).await,
        "feed",
        1,
        serde_json::json!("m0"),
    );
    support::assert_message(
        &next_frame(&mut b).await,
        "feed",
        1,
        serde_json::json!("m0"),
    );

    // Redis is stuck for longer than node A waits for an answer: m1's
    // script is sent, and its reply never comes in time. Node A delivers
    // m1 itself at once; Redis runs the script when it is free again.
    let blocker = block_redis(&redis, 3500);
    feed_burst(&nodes[0], 1, 2).await;
    let v = next_frame(&mut a).await;
    assert_eq!(v["data"], "m1", "{v}");
    assert_ne!(v["epoch"], epoch.as_str(), "numbered locally: {v}");
    blocker.join().expect("the blocker");
    for node in &nodes {
        node.wait_stats("linked again", |s| s.link_up && s.reconnects >= 1)
            .await;
    }
    feed_burst(&nodes[0], 2, 3).await;
    // Node A: m2 next — the positioned copy of m1 it reads back is a
    // repeat of what it delivered itself.
    let v = next_frame(&mut a).await;
    assert_eq!(v["data"], "m2", "m1 once on node A: {v}");
    // Node B: m1 (positioned by the script that ran late, or plain), once,
    // then m2.
    let v = next_frame(&mut b).await;
    assert_eq!(v["data"], "m1", "{v}");
    let v = next_frame(&mut b).await;
    assert_eq!(v["data"], "m2", "m1 once on node B: {v}");
    a.expect_silence(Duration::from_millis(100)).await;
    b.expect_silence(Duration::from_millis(100)).await;
    // The race did happen: Redis ran the script it had received once it
    // was free (a command already read is executed), so node A read back a
    // positioned m1 and dropped it as a repeat of its own delivery, and
    // node B dropped the plain copy relayed after the reconnect.
    let s = nodes[0].stats().await;
    assert_eq!((s.unpositioned, s.duplicates), (1, 1), "{s:?}");
    let s = nodes[1].stats().await;
    assert_eq!(s.duplicates, 1, "{s:?}");
}

/// What a protocol client reads, in order, until it has `n` data frames:
/// a room message's data, or a broadcast's text as it is (the hub's own
/// frames, presence among them, are skipped).
async fn read_data(c: &mut WsClient, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let text = c.next_text().await;
        if let Some(data) = data_of(&text) {
            got.push(data);
        }
    }
    got
}

/// The data a frame carries (see [`read_data`]); `None` for the hub's own.
fn data_of(text: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) if v["type"] == "message" => Some(v["data"].as_str().expect("text data").to_owned()),
        Ok(v) if v.get("type").is_some() => None,
        _ => Some(text.to_owned()),
    }
}

/// A client may send its messages as fast as it can (not closed with 1008).
const CLIENTS_MAY_FLOOD: &str = r#","max_messages_per_second":100000,"message_burst":10000"#;

fn publish(room: &str, data: &str) -> String {
    format!(r#"{{"type":"publish","room":"{room}","data":"{data}"}}"#)
}

#[actix_web::test]
async fn a_senders_room_messages_and_broadcasts_to_everyone_keep_their_order_on_every_node() {
    init_logs();
    const N: usize = 200;
    let redis = RedisServer::start();
    let nodes = start_history_nodes_with(&redis, 2, 1000, "order", CLIENTS_MAY_FLOOD).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ra = WsClient::connect_protocol(a, "?room=feed").await;
    let mut rb = WsClient::connect_protocol(b, "?room=feed").await;
    let mut talker = WsClient::connect_protocol(a, "?room=feed").await;
    // One sender on node A (app code and POST /broadcast, one after the
    // other) in turn to the room, to everyone, and to `ra` alone; and a
    // client there publishing to the room meanwhile.
    let hub = a.net.hub();
    let mut to_all_members = Vec::new();
    let mut to_ra = Vec::new();
    let mut from_talker = Vec::new();
    for i in 0..N {
        let m = format!("a{i}");
        match i % 5 {
            0 => hub.do_send(happynet::Broadcast::to_room(feed(), m.clone())),
            1 => hub.do_send(happynet::Broadcast::text(m.clone())),
            2 => assert_eq!(a.broadcast(Some("feed"), &m).await, 202),
            3 => assert_eq!(a.broadcast(None, &m).await, 202),
            _ => hub.do_send(happynet::Broadcast::to_session(ra.session, m.clone())),
        }
        if i % 5 != 4 {
            to_all_members.push(m.clone());
        }
        to_ra.push(m);
        let c = format!("c{i}");
        talker.send_text(&publish("feed", &c)).await;
        from_talker.push(c);
    }
    // Every receiver sees each sender's messages in send order, each once.
    let only = |got: &[String], prefix: char| -> Vec<String> {
        got.iter()
            .filter(|m| m.starts_with(prefix))
            .cloned()
            .collect()
    };
    for (who, client, from_a) in [
        ("a member on node A", &mut ra, &to_ra),
        ("a member on node B", &mut rb, &to_all_members),
        ("the talker", &mut talker, &to_all_members),
    ] {
        let got = read_data(client, from_a.len() + N).await;
        assert_eq!(&only(&got, 'a'), from_a, "{who}: node A's sender in order");
        assert_eq!(only(&got, 'c'), from_talker, "{who}: the talker in order");
        client.expect_silence(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn a_client_that_sends_room_messages_and_closes_at_once_reaches_every_member() {
    init_logs();
    const N: usize = 50;
    let redis = RedisServer::start();
    let nodes = start_history_nodes_with(&redis, 2, 1000, "close", CLIENTS_MAY_FLOOD).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ra = WsClient::connect_protocol(a, "?room=feed").await;
    let mut rb = WsClient::connect_protocol(b, "?room=feed").await;
    let mut talker = WsClient::connect_protocol(a, "?room=feed").await;
    let sent: Vec<String> = (0..N).map(|i| format!("c{i}")).collect();
    for c in &sent {
        talker.send_text(&publish("feed", c)).await;
    }
    talker.send(awc::ws::Message::Close(None)).await;
    // Its own echoes come before its close frame: the flush waited for
    // them to come back from Redis.
    let mut echoed = Vec::new();
    loop {
        match talker.recv().await {
            support::Received::Text(t) => echoed.extend(data_of(&t)),
            support::Received::Closed(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(echoed, sent, "every echo before the close");
    for member in [&mut ra, &mut rb] {
        assert_eq!(read_data(member, N).await, sent);
        member.expect_silence(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn with_redis_down_a_senders_messages_keep_their_order_and_arrive_once_everywhere() {
    init_logs();
    let mut redis = RedisServer::start();
    let nodes = start_history_nodes(&redis, 2, 100, "down-order").await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut ra = WsClient::connect_protocol(a, "?room=feed").await;
    let mut rb = WsClient::connect_protocol(b, "?room=feed").await;
    let hub = a.net.hub();
    let ra_session = ra.session;
    // To the room, to everyone, to `ra` alone, in turn.
    let burst = |from: usize, to: usize| {
        let mut everyone = Vec::new();
        let mut to_ra = Vec::new();
        for i in from..to {
            let m = format!("a{i}");
            match i % 3 {
                0 => hub.do_send(happynet::Broadcast::to_room(feed(), m.clone())),
                1 => hub.do_send(happynet::Broadcast::text(m.clone())),
                _ => hub.do_send(happynet::Broadcast::to_session(ra_session, m.clone())),
            }
            if i % 3 != 2 {
                everyone.push(m.clone());
            }
            to_ra.push(m);
        }
        (everyone, to_ra)
    };

    redis.kill();
    a.wait_ready(503).await;
    // Delivered on node A at once, in order.
    let (everyone, to_ra) = burst(0, 30);
    assert_eq!(read_data(&mut ra, to_ra.len()).await, to_ra);
    ra.expect_silence(Duration::from_millis(100)).await;

    // Redis back: node B gets them relayed plain, in order; node A does
    // not deliver the copies it reads back again.
    redis.restart();
    for node in &nodes {
        node.wait_ready(200).await;
    }
    assert_eq!(read_data(&mut rb, everyone.len()).await, everyone);
    // And through the stream again, in order on both.
    let (everyone, to_ra) = burst(30, 60);
    assert_eq!(read_data(&mut ra, to_ra.len()).await, to_ra);
    assert_eq!(read_data(&mut rb, everyone.len()).await, everyone);
    ra.expect_silence(Duration::from_millis(100)).await;
    rb.expect_silence(Duration::from_millis(100)).await;
}
