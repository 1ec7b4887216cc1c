//! Shared helpers for the integration tests that need happynet itself: a
//! real happynet server on `127.0.0.1:0` and real WebSocket clients (awc).
//! What does not need happynet (the fake upstream, the raw TCP WebSocket
//! client for the cases awc cannot play, `redis-server`) is in `testkit`.
//!
//! Every wait here is bounded by [`WAIT`]: a test that would hang fails with
//! a message instead.

#![allow(dead_code, unreachable_pub, missing_docs)]

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpServer};
use awc::ws;
use futures::{SinkExt, StreamExt};
use happynet::{Config, Network};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use testkit::bench::proc_stats;

/// The longest any single step of a test may take (the raw client's bound
/// too).
pub const WAIT: Duration = testkit::ws::WAIT;

pub struct TestServer {
    pub addr: SocketAddr,
    pub net: Network,
    pub handle: ServerHandle,
}

/// Parses `json` (a `network` object's contents, as in the config file).
pub fn config(json: &str) -> Config {
    Config::from_json_str(json).expect("test config is valid")
}

/// Starts happynet with `config` behind a real actix-web server on
/// `127.0.0.1:0`. Must run inside an actix System (`#[actix_web::test]`).
pub async fn start(config: Config) -> TestServer {
    start_lingering(config, None).await
}

/// Like [`start`], with actix-web's `client_disconnect_timeout` (how long
/// a connection lingers after its response, 1 s by default) set to
/// `linger`: a test that the server closes connections itself sets it far
/// above [`WAIT`], so the linger cannot do it instead.
pub async fn start_lingering(config: Config, linger: Option<Duration>) -> TestServer {
    let net = Network::start(config).expect("network starts");
    let routes = net.configure();
    let gateways = net.configure_gateways();
    let server = HttpServer::new(move || {
        App::new()
            .configure(routes.clone())
            .configure(gateways.clone())
    })
    .workers(2)
    .on_connect(net.on_connect())
    .disable_signals();
    let server = match linger {
        Some(linger) => server.client_disconnect_timeout(linger),
        None => server,
    }
    .bind(("127.0.0.1", 0))
    .expect("bind");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    TestServer { addr, net, handle }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{}", self.addr, query)
    }

    /// The hub's counters, via `/health`.
    pub async fn health(&self) -> Value {
        let mut resp = http_client()
            .get(self.url("/health"))
            .send()
            .await
            .expect("GET /health");
        resp.json::<Value>().await.expect("health JSON")
    }

    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// An awc client with no connection limit (awc's default is 100).
pub fn http_client() -> awc::Client {
    awc::Client::builder()
        .connector(awc::Connector::new().limit(0))
        .timeout(WAIT)
        .finish()
}

type Framed = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

/// A real WebSocket client (awc) connected to a test server: plain (data
/// only) from [`WsClient::connect`], or a protocol client (subprotocol
/// `happynet.v1`) from [`WsClient::connect_protocol`].
pub struct WsClient {
    framed: Framed,
    /// The session id from the welcome frame (protocol clients; 0 for plain
    /// ones, which get no welcome).
    pub session: u64,
    /// Whether to answer pings (a well-behaved client does).
    pub answer_pings: bool,
}

/// What a client saw when it read.
#[derive(Debug)]
pub enum Received {
    Text(String),
    Binary(Vec<u8>),
    Closed(Option<ws::CloseReason>),
}

/// The subprotocol that makes a client a protocol client.
pub const PROTOCOL: &str = testkit::ws::PROTOCOL_HEADER.1;

impl WsClient {
    /// Connects a plain client with `query` (e.g. `"?room=a"`). The hub
    /// registered the session before the `101`, so broadcasts reach it
    /// from the moment this returns.
    pub async fn connect(server: &TestServer, query: &str) -> WsClient {
        Self::try_connect(server, query)
            .await
            .unwrap_or_else(|e| panic!("websocket connect {query}: {e}"))
    }

    pub async fn try_connect(server: &TestServer, query: &str) -> Result<WsClient, String> {
        Self::open(server, query, &[])
            .await
            .map(|(client, _)| client)
    }

    /// Connects a protocol client, checks that the server echoed the
    /// subprotocol and that the first frame is the welcome, and keeps the
    /// session id from it.
    pub async fn connect_protocol(server: &TestServer, query: &str) -> WsClient {
        Self::try_connect_protocol(server, query)
            .await
            .unwrap_or_else(|e| panic!("websocket connect {query}: {e}"))
    }

    pub async fn try_connect_protocol(
        server: &TestServer,
        query: &str,
    ) -> Result<WsClient, String> {
        Self::try_connect_protocol_with(server, query, &[]).await
    }

    /// [`try_connect_protocol`](Self::try_connect_protocol) with extra
    /// request headers (e.g. `X-Forwarded-For`, for a server that trusts it).
    pub async fn try_connect_protocol_with(
        server: &TestServer,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<WsClient, String> {
        let (mut client, echoed) = Self::open_with(server, query, &[PROTOCOL], headers).await?;
        assert_eq!(echoed.as_deref(), Some(PROTOCOL), "subprotocol echoed");
        let welcome = client.next_json().await;
        assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
        client.session = welcome["session"].as_u64().expect("session id");
        Ok(client)
    }

    /// Upgrades offering `protocols`; returns the client and the
    /// subprotocol the server echoed.
    pub async fn open(
        server: &TestServer,
        query: &str,
        protocols: &[&str],
    ) -> Result<(WsClient, Option<String>), String> {
        Self::open_with(server, query, protocols, &[]).await
    }

    /// [`open`](Self::open) with extra request headers.
    pub async fn open_with(
        server: &TestServer,
        query: &str,
        protocols: &[&str],
        headers: &[(&str, &str)],
    ) -> Result<(WsClient, Option<String>), String> {
        let mut request = http_client()
            .ws(server.ws_url(query))
            .max_frame_size(1 << 20);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if !protocols.is_empty() {
            request = request.protocols(protocols);
        }
        let (resp, framed) = request.connect().await.map_err(|e| match e {
            awc::error::WsClientError::InvalidResponseStatus(s) => format!("status {s}"),
            other => other.to_string(),
        })?;
        let echoed = resp
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let client = WsClient {
            framed,
            session: 0,
            answer_pings: true,
        };
        Ok((client, echoed))
    }

    pub async fn send_text(&mut self, text: &str) {
        self.framed
            .send(ws::Message::Text(text.to_owned().into()))
            .await
            .expect("send text");
    }

    pub async fn send(&mut self, msg: ws::Message) {
        self.framed.send(msg).await.expect("send");
    }

    /// The next text frame or close, answering pings on the way (if
    /// `answer_pings`). Panics after [`WAIT`].
    pub async fn recv(&mut self) -> Received {
        match self.recv_within(WAIT).await {
            Some(r) => r,
            None => panic!("session {}: nothing received within {WAIT:?}", self.session),
        }
    }

    /// Like [`recv`](Self::recv) but returns `None` after `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.framed.next())
                .await
                .ok()?;
            match frame {
                None => return Some(Received::Closed(None)),
                Some(Err(e)) => panic!("session {}: protocol error {e}", self.session),
                Some(Ok(ws::Frame::Text(bytes))) => {
                    return Some(Received::Text(
                        String::from_utf8(bytes.to_vec()).expect("utf-8 text"),
                    ))
                }
                Some(Ok(ws::Frame::Binary(bytes))) => {
                    return Some(Received::Binary(bytes.to_vec()))
                }
                Some(Ok(ws::Frame::Close(reason))) => return Some(Received::Closed(reason)),
                Some(Ok(ws::Frame::Ping(p))) => {
                    if self.answer_pings {
                        let _ = self.framed.send(ws::Message::Pong(p)).await;
                    }
                }
                Some(Ok(_)) => {}
            }
        }
    }

    /// The next text frame; panics on anything else.
    pub async fn next_text(&mut self) -> String {
        match self.recv().await {
            Received::Text(t) => t,
            other => panic!("session {}: expected text, got {other:?}", self.session),
        }
    }

    /// The next binary frame; panics on anything else.
    pub async fn next_binary(&mut self) -> Vec<u8> {
        match self.recv().await {
            Received::Binary(b) => b,
            other => panic!("session {}: expected binary, got {other:?}", self.session),
        }
    }

    pub async fn next_json(&mut self) -> Value {
        let text = self.next_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// The next frame, a room's stamped message (history on): asserts its
    /// room, offset and data exactly and returns its epoch, which must be a
    /// non-empty string.
    pub async fn next_message(&mut self, room: &str, offset: u64, data: Value) -> String {
        let v = self.next_json().await;
        assert_message(&v, room, offset, data)
    }

    /// Skips frames until one whose `type` is `kind` (e.g. presence frames).
    pub async fn next_of_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.next_json().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Waits for the server's close frame and returns it.
    pub async fn expect_close(&mut self) -> ws::CloseReason {
        loop {
            match self.recv().await {
                Received::Closed(Some(reason)) => return reason,
                Received::Closed(None) => {
                    panic!("session {}: closed without a close frame", self.session)
                }
                Received::Text(_) | Received::Binary(_) => {}
            }
        }
    }

    /// Asserts nothing but pings arrives within `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        if let Some(r) = self.recv_within(quiet).await {
            panic!("session {}: expected nothing, got {r:?}", self.session);
        }
    }

    pub async fn join(&mut self, room: &str) {
        self.send_text(&format!(r#"{{"type":"join","room":"{room}"}}"#))
            .await;
        let v = self.next_of_type("joined").await;
        assert_eq!(v["room"], room);
    }
}

/// Polls `/health` until `pred` holds for the hub counters, or panics after
/// [`WAIT`]. This synchronises on the server's own state, not on time.
pub async fn wait_for_hub(server: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let health = server.health().await;
        if pred(&health["hub"]) {
            return health;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; last health: {health}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident set size of this process, in bytes (0 if `/proc` cannot tell).
pub fn rss_bytes() -> usize {
    proc_stats::rss_kib(std::process::id()).map_or(0, |kib| kib as usize * 1024)
}

/// Asserts `v` is `{"type":"message","room":room,"offset":offset,"epoch":…,
/// "data":data}` and nothing else; returns the epoch.
pub fn assert_message(v: &Value, room: &str, offset: u64, data: Value) -> String {
    let epoch = v["epoch"]
        .as_str()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| panic!("no epoch in {v}"))
        .to_owned();
    assert_eq!(
        *v,
        serde_json::json!({"type":"message","room":room,"offset":offset,"epoch":epoch,"data":data}),
    );
    epoch
}
