//! The flood and abuse guards of `network.security`, against a real server:
//! per-IP caps and rates (one address refused while another is served —
//! clients bind to different loopback source addresses, 127.0.0.2 and
//! 127.0.0.1), WebSocket tokens and the origin allow-list (refused before
//! the upgrade), and the slowloris deadlines on request heads and bodies.
//!
//! Loopback is exempt from the per-IP limits by default, so every test that
//! exercises them sets `"exempt_ips": []`.

mod support;

use awc::ws;
use futures::{SinkExt, StreamExt};
use happynet::{Config, Network};
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use support::{config, TestServer, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The address whose limits the tests exhaust.
const ABUSER: &str = "127.0.0.2";
/// Another client, which must stay unaffected.
const BYSTANDER: &str = "127.0.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

/// Starts happynet the way an application should, with the embedding
/// helper (`happynet::server`): it installs `on_connect` and the
/// request-head deadline from `network.security`, which these tests check.
async fn start(config: Config) -> TestServer {
    let net = Network::start(config).expect("network starts");
    let server = happynet::server::Server::new(&net)
        .workers(2)
        .bind(("127.0.0.1", 0))
        .expect("bind");
    let addr = server.addrs()[0];
    let handle = server.handle();
    // No shutdown signal: the test ends the server (and its System).
    actix_web::rt::spawn(server.run_until(std::future::pending()));
    TestServer { addr, net, handle }
}

/// `{"network":{"security":{…}}}` with loopback not exempt.
fn security(json: &str) -> Config {
    let extra = if json.is_empty() {
        String::new()
    } else {
        format!(",{json}")
    };
    config(&format!(
        r#"{{"network":{{"security":{{"exempt_ips":[]{extra}}}}}}}"#
    ))
}

/// An HTTP client whose connections come from `source`.
fn client_from(source: &str) -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().limit(0).local_address(ip(source)))
        .timeout(WAIT)
        .finish()
}

type Framed = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

/// A plain WebSocket from `source`, once upgraded (the hub registered the
/// session before the `101`); `Err` carries the refusal's status.
async fn ws_from(server: &TestServer, source: &str, query: &str) -> Result<Framed, String> {
    let (_, framed) = client_from(source)
        .ws(server.ws_url(query))
        .connect()
        .await
        .map_err(|e| match e {
            awc::error::WsClientError::InvalidResponseStatus(s) => format!("status {}", s.as_u16()),
            other => other.to_string(),
        })?;
    Ok(framed)
}

/// A raw TCP connection from `source` to the server.
async fn tcp_from(server: &TestServer, source: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(ip(source), 0))
        .expect("bind the source address");
    socket.connect(server.addr).await.expect("connect")
}

/// What a raw HTTP exchange got back.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    /// The head, lower-cased.
    head: String,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(str::trim)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Reads one response: the head, then `content-length` bytes of body (none
/// for a 101).
async fn read_response(stream: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        assert_eq!(
            n,
            1,
            "closed mid-head after {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut response = RawResponse {
        status,
        head,
        body: String::new(),
    };
    if status != 101 {
        let len: usize = response
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        tokio::time::timeout(WAIT, stream.read_exact(&mut body))
            .await
            .expect("body in time")
            .expect("body");
        response.body = String::from_utf8(body).expect("UTF-8 body");
    }
    response
}

/// A WebSocket upgrade request for `/ws{query}` from `source` with extra
/// header lines; returns the response and the open stream (a WebSocket if
/// the status is 101).
async fn upgrade_from(
    server: &TestServer,
    source: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> (RawResponse, TcpStream) {
    let mut stream = tcp_from(server, source).await;
    let req = testkit::ws::upgrade_request(server.addr, &format!("/ws{query}"), headers);
    stream.write_all(req.as_bytes()).await.expect("send");
    (read_response(&mut stream).await, stream)
}

async fn upgrade_status(server: &TestServer, query: &str, headers: &[(&str, &str)]) -> RawResponse {
    upgrade_from(server, BYSTANDER, query, headers).await.0
}

/// `/health`'s open connections and the hub's sessions ever opened.
async fn sessions(server: &TestServer) -> (u64, u64) {
    let health = server.health().await;
    (
        health["connections"].as_u64().expect("connections"),
        health["hub"]["sessions_opened"]
            .as_u64()
            .expect("sessions_opened"),
    )
}

/// `POST /broadcast` from `client`: the status, `Retry-After` and body.
async fn post_broadcast(client: &awc::Client, server: &TestServer) -> (u16, Option<u64>, Value) {
    let mut resp = client
        .post(server.url("/broadcast"))
        .content_type("text/plain")
        .send_body("hello")
        .await
        .expect("POST /broadcast");
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let body = resp.json::<Value>().await.expect("JSON body");
    (resp.status().as_u16(), retry_after, body)
}

#[actix_web::test]
async fn the_websocket_over_the_per_ip_cap_gets_429_while_another_ip_connects() {
    let server = start(security(r#""max_connections_per_ip":3"#)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(ws_from(&server, ABUSER, "").await.expect("under the cap"));
    }

    let (refused, _) = upgrade_from(&server, ABUSER, "", &[]).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.json()["error"], "too_many_connections_from_ip");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(server.net.security().stats().upgrades_over_ip_cap, 1);

    // Another address is unaffected, up to its own cap.
    let mut other = Vec::new();
    for _ in 0..3 {
        other.push(ws_from(&server, BYSTANDER, "").await.expect("another IP"));
    }
    assert_eq!(server.net.open_connections(), 6);
    assert_eq!(server.net.security().stats().ips_with_websockets, 2);

    // The cap is released when a connection ends.
    let mut leaving = held.pop().expect("a held connection");
    leaving.send(ws::Message::Close(None)).await.expect("close");
    drop(leaving);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match ws_from(&server, ABUSER, "").await {
            Ok(framed) => {
                held.push(framed);
                break;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                assert_eq!(e, "status 429");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("the slot was never released: {e}"),
        }
    }

    // When every connection has gone, the table is empty again.
    drop(held);
    drop(other);
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.net.security().stats().ips_with_websockets > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "entries left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[actix_web::test]
async fn new_connections_per_second_are_limited_per_ip() {
    let server = start(security(
        r#""connections_per_second":0.1,"connection_burst":2"#,
    ))
    .await;
    let _a = ws_from(&server, ABUSER, "").await.expect("first");
    let _b = ws_from(&server, ABUSER, "").await.expect("second");
    let (refused, _) = upgrade_from(&server, ABUSER, "", &[]).await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.json()["error"], "connection_rate_limited");
    let retry_after: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in whole seconds");
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");

    let _c = ws_from(&server, BYSTANDER, "").await.expect("another IP");
    assert_eq!(server.net.security().stats().upgrades_rate_limited, 1);
}

#[actix_web::test]
async fn api_requests_per_second_are_limited_per_ip_and_health_is_not() {
    let server = start(security(r#""requests_per_second":0.1,"request_burst":3"#)).await;
    let abuser = client_from(ABUSER);
    for i in 0..3 {
        let (status, _, body) = post_broadcast(&abuser, &server).await;
        assert_eq!(status, 202, "request {i}: {body}");
    }
    let (status, retry_after, body) = post_broadcast(&abuser, &server).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "rate_limited");
    let retry_after = retry_after.expect("Retry-After in whole seconds");
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");

    // The gateway routes share the limit; /health is never limited.
    let resp = abuser
        .get(server.url("/v1/models"))
        .send()
        .await
        .expect("GET /v1/models");
    assert_eq!(resp.status(), 429);
    let resp = abuser
        .get(server.url("/health"))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(resp.status(), 200);

    // Another address is served.
    let (status, _, _) = post_broadcast(&client_from(BYSTANDER), &server).await;
    assert_eq!(status, 202);
    assert_eq!(server.net.security().stats().requests_rate_limited, 2);
}

#[actix_web::test]
async fn behind_a_trusted_proxy_the_last_forwarded_for_entry_is_the_client() {
    let server = start(security(
        r#""requests_per_second":0.1,"request_burst":1,"trust_forwarded_for":true"#,
    ))
    .await;
    let proxy = client_from(BYSTANDER);
    let post = |forwarded: &'static str| {
        proxy
            .post(server.url("/broadcast"))
            .insert_header(("X-Forwarded-For", forwarded))
            .content_type("text/plain")
            .send_body("hello")
    };
    // The client may write anything first; the proxy appends the truth.
    assert_eq!(post("10.9.9.9, 203.0.113.7").await.unwrap().status(), 202);
    assert_eq!(post("10.9.9.8, 203.0.113.7").await.unwrap().status(), 429);
    assert_eq!(post("203.0.113.8").await.unwrap().status(), 202);
}

#[actix_web::test]
async fn loopback_is_exempt_from_per_ip_limits_by_default() {
    let server = start(config(
        r#"{"network":{"security":{"requests_per_second":0.1,"request_burst":1,"max_connections_per_ip":1}}}"#,
    ))
    .await;
    let client = client_from(ABUSER);
    for _ in 0..5 {
        assert_eq!(post_broadcast(&client, &server).await.0, 202);
    }
    let _a = ws_from(&server, ABUSER, "").await.expect("first");
    let _b = ws_from(&server, ABUSER, "").await.expect("second, exempt");
}

#[actix_web::test]
async fn a_missing_or_wrong_token_is_refused_before_the_upgrade() {
    let server = start(security(r#""ws_tokens":["s3cret-token","other"]"#)).await;

    let missing = upgrade_status(&server, "", &[]).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert_eq!(missing.json()["error"], "token_required");
    assert!(missing.header("www-authenticate").is_some());

    let wrong_query = upgrade_status(&server, "?token=s3cret-tokeN", &[]).await;
    assert_eq!(wrong_query.status, 401);
    assert_eq!(wrong_query.json()["error"], "invalid_token");
    assert!(
        !wrong_query.body.contains("s3cret"),
        "the token is not echoed"
    );

    let wrong_protocol = upgrade_status(
        &server,
        "",
        &[("Sec-WebSocket-Protocol", "happynet, token.nope")],
    )
    .await;
    assert_eq!(wrong_protocol.status, 401);

    let wrong_bearer = upgrade_status(&server, "", &[("Authorization", "Bearer nope")]).await;
    assert_eq!(wrong_bearer.status, 401);

    // A token offered as a subprotocol needs `happynet` beside it, or a
    // browser would fail the handshake.
    let bare = upgrade_status(
        &server,
        "",
        &[("Sec-WebSocket-Protocol", "token.s3cret-token")],
    )
    .await;
    assert_eq!(bare.status, 400);
    assert_eq!(bare.json()["error"], "subprotocol_required");

    // Nothing reached the hub.
    assert_eq!(sessions(&server).await, (0, 0));
    let stats = server.net.security().stats();
    assert_eq!(stats.upgrades_token_required, 1);
    assert_eq!(stats.upgrades_token_invalid, 3);
}

#[actix_web::test]
async fn the_right_token_is_accepted_in_the_query_the_subprotocol_or_a_bearer_header() {
    let server = start(security(r#""ws_tokens":["s3cret-token"]"#)).await;

    let (query, _q) = upgrade_from(&server, BYSTANDER, "?token=s3cret-token&room=blue", &[]).await;
    assert_eq!(query.status, 101, "{query:?}");

    let (protocol, _p) = upgrade_from(
        &server,
        BYSTANDER,
        "",
        &[("Sec-WebSocket-Protocol", "happynet, token.s3cret-token")],
    )
    .await;
    assert_eq!(protocol.status, 101, "{protocol:?}");
    // RFC 6455: the server echoes one protocol the client offered, and not
    // the token.
    assert_eq!(protocol.header("sec-websocket-protocol"), Some("happynet"));

    let (bearer, _b) = upgrade_from(
        &server,
        BYSTANDER,
        "",
        &[("Authorization", "Bearer s3cret-token")],
    )
    .await;
    assert_eq!(bearer.status, 101, "{bearer:?}");

    // And a real protocol client, with the token as a subprotocol beside
    // `happynet.v1` (which may stand in for `happynet`).
    let (resp, mut framed) = client_from(BYSTANDER)
        .ws(server.ws_url(""))
        .protocols(["happynet.v1", "token.s3cret-token"])
        .connect()
        .await
        .expect("awc upgrade with the token");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("happynet.v1")
    );
    match tokio::time::timeout(WAIT, framed.next()).await {
        Ok(Some(Ok(ws::Frame::Text(t)))) => {
            let v: Value = serde_json::from_slice(&t).expect("JSON");
            assert_eq!(v["type"], "welcome");
        }
        other => panic!("no welcome frame: {other:?}"),
    }
    support::wait_for_hub(&server, "four sessions", |hub| hub["sessions"] == 4).await;
}

#[actix_web::test]
async fn a_foreign_origin_is_refused_before_the_upgrade_and_no_origin_is_allowed() {
    let server = start(security(
        r#""allowed_origins":["https://app.example","http://localhost:8080"]"#,
    ))
    .await;
    let foreign = upgrade_status(&server, "", &[("Origin", "https://evil.example")]).await;
    assert_eq!(foreign.status, 403, "{foreign:?}");
    assert_eq!(foreign.json()["error"], "origin_not_allowed");
    let lookalike = upgrade_status(&server, "", &[("Origin", "https://app.example.evil")]).await;
    assert_eq!(lookalike.status, 403);
    assert_eq!(sessions(&server).await, (0, 0));

    // Listed origins (as browsers write them, default port or not) and
    // non-browser clients (no Origin) connect.
    let (listed, _a) =
        upgrade_from(&server, BYSTANDER, "", &[("Origin", "https://App.Example")]).await;
    assert_eq!(listed.status, 101, "{listed:?}");
    let (local, _b) = upgrade_from(
        &server,
        BYSTANDER,
        "",
        &[("Origin", "http://localhost:8080")],
    )
    .await;
    assert_eq!(local.status, 101, "{local:?}");
    let (none, _c) = upgrade_from(&server, BYSTANDER, "", &[]).await;
    assert_eq!(none.status, 101, "{none:?}");
    assert_eq!(server.net.security().stats().upgrades_origin_not_allowed, 2);
}

#[actix_web::test]
async fn a_client_sending_its_headers_one_byte_a_second_is_cut_off() {
    let server = start(security(r#""request_header_timeout":1"#)).await;
    let request = format!(
        "GET /health HTTP/1.1\r\nHost: {}\r\nUser-Agent: slowloris\r\n\r\n",
        server.addr
    );
    let stream = tcp_from(&server, BYSTANDER).await;
    let started = tokio::time::Instant::now();
    let (mut reader, mut writer) = stream.into_split();
    let total = request.len();
    let sender = actix_web::rt::spawn(async move {
        let mut sent = 0;
        for byte in request.bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        sent
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buf)).await {
            Err(_) => panic!("still open after {:?}", started.elapsed()),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
    let elapsed = started.elapsed();
    sender.abort();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_secs(3),
        "closed after {elapsed:?}"
    );
    // Cut off long before the client could finish its ~60-byte head.
    assert!(elapsed < Duration::from_secs(total as u64 / 2));
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 408"),
        "answered {got:?}"
    );
}

#[actix_web::test]
async fn a_body_that_trickles_past_its_deadline_gets_408() {
    let server = start(security(r#""request_body_timeout":1"#)).await;
    let mut stream = tcp_from(&server, BYSTANDER).await;
    let started = tokio::time::Instant::now();
    let head = format!(
        "POST /broadcast HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nhello",
        server.addr
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    let resp = read_response(&mut stream).await;
    let elapsed = started.elapsed();
    assert_eq!(resp.status, 408, "{resp:?}");
    assert_eq!(resp.json()["error"], "request_body_timeout");
    assert!(
        elapsed <= Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    assert_eq!(server.net.security().stats().request_body_timeouts, 1);
    // ...and the connection is closed.
    let mut rest = [0u8; 64];
    let n = tokio::time::timeout(WAIT, stream.read(&mut rest))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "still open");
}

#[actix_web::test]
async fn tcp_connections_over_the_per_ip_cap_are_shut_at_once() {
    let server = start(security(
        r#""max_tcp_connections_per_ip":2,"max_connections_per_ip":1"#,
    ))
    .await;
    // Two kept-alive connections take the abuser's places. Each is answered
    // once first: that proves the server accepted it (and counted it), so
    // the third cannot overtake one of them in the accept queue.
    let mut first = tcp_from(&server, ABUSER).await;
    let mut second = tcp_from(&server, ABUSER).await;
    for held in [&mut first, &mut second] {
        held.write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .expect("request");
        assert_eq!(read_response(held).await.status, 200);
    }

    let mut third = tcp_from(&server, ABUSER).await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), third.read_to_end(&mut got))
        .await
        .expect("shut at once")
        .ok();
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 429"), "answered {got:?}");
    assert!(got.contains("too_many_tcp_connections_from_ip"));

    // Another address is served meanwhile.
    let resp = client_from(BYSTANDER)
        .get(server.url("/health"))
        .send()
        .await
        .expect("GET /health");
    assert_eq!(resp.status(), 200);

    // A closed connection gives its place back.
    drop(first);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut s = tcp_from(&server, ABUSER).await;
        let req = format!("GET /health HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr);
        s.write_all(req.as_bytes()).await.expect("send");
        let mut head = [0u8; 12];
        let n = tokio::time::timeout(WAIT, s.read(&mut head))
            .await
            .expect("an answer")
            .unwrap_or(0);
        if head[..n].starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place never freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn bad_security_settings_are_rejected_with_their_path() {
    for (json, path) in [
        (
            r#"{"max_tracked_ips":0}"#,
            "network.security.max_tracked_ips",
        ),
        (
            r#"{"connections_per_second":-1}"#,
            "network.security.connections_per_second",
        ),
        (
            r#"{"requests_per_second":5,"request_burst":0}"#,
            "network.security.request_burst",
        ),
        (
            r#"{"max_tcp_connections_per_ip":2,"max_connections_per_ip":3}"#,
            "network.security.max_tcp_connections_per_ip",
        ),
        (
            r#"{"ws_tokens":["ok","has space"]}"#,
            "network.security.ws_tokens[1]",
        ),
        (
            r#"{"allowed_origins":["https://example.com/app"]}"#,
            "network.security.allowed_origins[0]",
        ),
        (
            r#"{"exempt_ips":["10.0.0.0/99"]}"#,
            "network.security.exempt_ips[0]",
        ),
        (
            r#"{"broadcast_tokens":["has space"]}"#,
            "network.security.broadcast_tokens[0]",
        ),
        (
            r#"{"status_tokens":[""]}"#,
            "network.security.status_tokens[0]",
        ),
        (
            r#"{"metrics_tokens":["a/b="]}"#,
            "network.security.metrics_tokens[0]",
        ),
        (
            r#"{"snapshot_interval":11}"#,
            "network.security.snapshot_interval",
        ),
        (
            r#"{"snapshot_interval":-1}"#,
            "network.security.snapshot_interval",
        ),
        (r#"{"max_conections_per_ip":3}"#, "network.security"),
    ] {
        let err = Config::from_json_str(&format!(r#"{{"network":{{"security":{json}}}}}"#))
            .expect_err(json);
        assert!(
            err.path().is_some_and(|p| p.starts_with(path)),
            "{json}: {err}"
        );
    }
    // 0 turns a guard off; the defaults are valid.
    Config::from_json_str(
        r#"{"network":{"security":{"max_connections_per_ip":0,"max_tcp_connections_per_ip":0,
            "connections_per_second":0,"requests_per_second":0,"request_header_timeout":0,
            "request_body_timeout":0}}}"#,
    )
    .expect("all guards off");
    let defaults = Config::embedded().network.security;
    assert_eq!(defaults.max_connections_per_ip, 64);
    assert!(defaults.broadcast_tokens.is_empty() && defaults.status_tokens.is_empty());
    assert!(defaults.metrics_tokens.is_empty());
    assert_eq!(defaults.snapshot_interval.0, Duration::from_millis(250));
    assert_eq!(defaults.exempt_ips, None, "unset: loopback, and a warning");
    assert_eq!(defaults.effective_exempt_ips(), ["127.0.0.0/8", "::1"]);
    assert_eq!(defaults.request_header_timeout.0, Duration::from_secs(5));
}

/// A request from the bystander with `headers`: its status and JSON body
/// (`Null` when the body is not JSON).
async fn request_with(
    server: &TestServer,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> (u16, Value) {
    let method = awc::http::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client_from(BYSTANDER).request(method, server.url(path));
    for (name, value) in headers {
        req = req.insert_header((*name, *value));
    }
    let mut resp = req
        .content_type("text/plain")
        .send_body(body)
        .await
        .expect("request");
    let bytes = resp.body().await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (resp.status().as_u16(), json)
}

/// Broadcasts the hub has handled, from `/health`.
async fn broadcasts(server: &TestServer) -> u64 {
    server.health().await["hub"]["broadcasts"]
        .as_u64()
        .expect("hub.broadcasts")
}

#[actix_web::test]
async fn a_cross_site_browser_cannot_broadcast_but_the_same_origin_and_curl_can() {
    let server = start(config(
        r#"{"network":{"security":{"allowed_origins":["https://app.example"]}}}"#,
    ))
    .await;
    let own = format!("http://{}", server.addr);
    let before = broadcasts(&server).await;

    // A page on another site: `text/plain` is a CORS-simple request, so
    // the browser sends it without asking. It must not reach the hub.
    for headers in [
        vec![("origin", "https://evil.example")],
        vec![
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ],
        // Sandboxed frames and file: pages send `Origin: null`.
        vec![("origin", "null")],
        // A browser that says cross-site, whatever else it sends.
        vec![("sec-fetch-site", "cross-site")],
        vec![("origin", own.as_str()), ("sec-fetch-site", "cross-site")],
    ] {
        let (status, body) = request_with(&server, "POST", "/broadcast", &headers, "pwned").await;
        assert_eq!(status, 403, "{headers:?}: {body}");
        assert_eq!(body["error"], "cross_site_request", "{headers:?}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("allowed_origins")),
            "{body}"
        );
    }
    assert_eq!(
        broadcasts(&server).await,
        before,
        "a refused POST was broadcast"
    );

    // The server's own page, an allowed origin (default port written or
    // not), and clients without Origin (curl, SDKs) are served.
    for headers in [
        vec![("origin", own.as_str())],
        vec![("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        vec![("origin", "https://app.example:443")],
        vec![
            ("origin", "https://app.example"),
            ("sec-fetch-site", "cross-site"),
        ],
        vec![],
    ] {
        let (status, body) = request_with(&server, "POST", "/broadcast", &headers, "ok").await;
        assert_eq!(status, 202, "{headers:?}: {body}");
    }
    assert_eq!(broadcasts(&server).await, before + 5);

    // Every state-changing route behind the guard, gateways included; safe
    // methods are not refused (they go on to the route, which answers them).
    for (method, path) in [
        ("POST", "/proxy/nope/x"),
        ("PUT", "/proxy/nope/x"),
        ("PATCH", "/proxy/nope/x"),
        ("DELETE", "/proxy/nope/x"),
        ("POST", "/v1/chat/completions"),
    ] {
        let (status, body) = request_with(
            &server,
            method,
            path,
            &[("origin", "https://evil.example")],
            "{}",
        )
        .await;
        assert_eq!(status, 403, "{method} {path}: {body}");
        assert_eq!(body["error"], "cross_site_request");
    }
    for path in ["/proxy/nope/x", "/status"] {
        let (status, body) = request_with(
            &server,
            "GET",
            path,
            &[("origin", "https://evil.example")],
            "",
        )
        .await;
        assert_ne!(status, 403, "GET {path}: {body}");
    }
    let stats = server.net.security().stats();
    assert_eq!(stats.requests_cross_site, 10);
    let refusals = stats.refusals();
    assert!(
        refusals.contains(&("cross_site_request", 10)),
        "{refusals:?}"
    );
}

#[actix_web::test]
async fn broadcast_needs_its_token_once_one_is_configured() {
    let server = start(config(
        r#"{"network":{"security":{"broadcast_tokens":["bc-old","bc-new"],"ws_tokens":["ws-t"]}}}"#,
    ))
    .await;
    let before = broadcasts(&server).await;
    for (headers, error) in [
        (vec![], "token_required"),
        (vec![("authorization", "Bearer wrong")], "invalid_token"),
        // Another route's token is not this route's.
        (vec![("authorization", "Bearer ws-t")], "invalid_token"),
        (
            vec![("authorization", "Basic YmMtbmV3Og==")],
            "token_required",
        ),
    ] {
        let mut req = client_from(BYSTANDER).post(server.url("/broadcast"));
        for (name, value) in &headers {
            req = req.insert_header((*name, *value));
        }
        let mut resp = req
            .content_type("text/plain")
            .send_body("x")
            .await
            .expect("POST /broadcast");
        assert_eq!(resp.status(), 401, "{headers:?}");
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"happynet\"")
        );
        let body = resp.json::<Value>().await.expect("JSON");
        assert_eq!(body["error"], error, "{headers:?}: {body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("broadcast_tokens")),
            "{body}"
        );
    }
    assert_eq!(broadcasts(&server).await, before);
    for token in ["Bearer bc-old", "bearer bc-new"] {
        let (status, body) = request_with(
            &server,
            "POST",
            "/broadcast",
            &[("authorization", token)],
            "hi",
        )
        .await;
        assert_eq!(status, 202, "{token}: {body}");
    }
    assert_eq!(broadcasts(&server).await, before + 2);
    let stats = server.net.security().stats();
    assert_eq!(
        (stats.requests_token_required, stats.requests_token_invalid),
        (2, 2)
    );
}

#[actix_web::test]
async fn status_and_metrics_take_optional_tokens_of_their_own() {
    // Without tokens both are open (the default).
    let open = start(Config::default()).await;
    for path in ["/status", "/metrics"] {
        let (status, _) = request_with(&open, "GET", path, &[], "").await;
        assert_eq!(status, 200, "{path}");
    }

    let server = start(config(
        r#"{"network":{"security":{"status_tokens":["st-1"],"metrics_tokens":["mt-1"]}}}"#,
    ))
    .await;
    for (path, right, wrong) in [("/status", "st-1", "mt-1"), ("/metrics", "mt-1", "st-1")] {
        let (status, body) = request_with(&server, "GET", path, &[], "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("token_required"))
        );
        let wrong = format!("Bearer {wrong}");
        let (status, body) =
            request_with(&server, "GET", path, &[("authorization", &wrong)], "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_token"))
        );
        let right = format!("Bearer {right}");
        let (status, _) =
            request_with(&server, "GET", path, &[("authorization", &right)], "").await;
        assert_eq!(status, 200, "{path}");
    }
    // Liveness and readiness stay open for load balancers.
    for path in ["/health", "/ready"] {
        let (status, _) = request_with(&server, "GET", path, &[], "").await;
        assert_eq!(status, 200, "{path}");
    }
}
