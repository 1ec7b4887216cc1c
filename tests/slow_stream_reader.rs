//! A streamed answer (server-sent events through `/v1`) whose reader stops
//! reading: after `network.gateway.stream_write_timeout` the upstream call is
//! ended, so its connection and its bulkhead slot go to the next caller at
//! once, and `/metrics` counts it. The reader is a raw TCP socket with a
//! small receive buffer that reads the response head and then nothing.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;
mod raw_http;
mod support;

use fake_upstream::{FakeUpstream, Faults};
use std::time::{Duration, Instant};
use support::{config, http_client, start, TestServer, WAIT};
use tokio::io::AsyncWriteExt;

const STALLS: &str = r#"happynet_upstream_stream_write_timeouts_total{upstream="up"}"#;

/// The value of `STALLS` in `/metrics` (0 while absent).
async fn stalls(server: &TestServer) -> u64 {
    let mut resp = http_client()
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    let text = String::from_utf8(resp.body().await.unwrap().to_vec()).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(STALLS))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// A chat request whose streamed answer has one event per word of `words`.
fn chat_body(words: usize, stream: bool) -> String {
    let prompt = vec!["word"; words].join(" ");
    format!(
        r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    )
}

/// Connects with a small receive buffer (so the stall shows at once, not
/// after the kernel has taken megabytes), sends a streamed chat request
/// and reads until the first event has arrived.
async fn stalled_reader(server: &TestServer, body: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let seen = raw_http::read_until(&mut stream, b"data: ").await;
    assert!(
        seen.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    stream
}

#[actix_web::test]
async fn a_reader_that_stops_reading_gives_back_the_slot_and_is_counted() {
    // Every event carries 64 KiB of SSE comment: 200 events are far more
    // than the socket buffers, the server's write buffer and the pool's
    // chunk queue hold together, so the pool must wait on the reader.
    let fake = FakeUpstream::start(
        "fake",
        Faults {
            stream_padding_bytes: 64 * 1024,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let server = start(config(&format!(
        r#"{{"network":{{
            "websocket":{{"socket_send_buffer":16384}},
            "gateway":{{"clients":["up"],"stream_write_timeout":0.3}},
            "api_clients":{{"up":{{"base_url":"{}","rate_limit":60000,
                "max_connections":1,"bulkhead":{{"max_in_flight":1,"max_queue":0}},
                "max_response_bytes":1073741824}}}}}}}}"#,
        fake.url("")
    )))
    .await;
    let pool_in_flight = || async {
        let api = server.net.api("up").unwrap();
        let stats = api
            .upstream()
            .pool()
            .send(happynet::actors::pool::GetPoolStats)
            .await
            .unwrap();
        stats.in_flight
    };

    let mut reader = stalled_reader(&server, &chat_body(200, true)).await;
    assert_eq!(pool_in_flight().await, 1, "the stream holds the only slot");

    // The write timeout fires once the buffers are full; wait for its count
    // (bounded), not for a guessed time.
    let started = Instant::now();
    while stalls(&server).await == 0 {
        assert!(
            started.elapsed() < WAIT,
            "the stalled stream was never cut off"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stalls(&server).await, 1);

    // The slot and the one connection are free: the next caller is served at
    // once (with max_queue 0, a held slot would be an immediate 503).
    assert_eq!(pool_in_flight().await, 0);
    let mut resp = http_client()
        .post(server.url("/v1/chat/completions"))
        .content_type("application/json")
        .send_body(chat_body(3, false))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Echo: word word word"
    );

    // The stalled reader, when it reads again, finds its stream cut off: no
    // final event and no terminating chunk, so it cannot mistake the
    // truncated answer for a whole one.
    let rest = raw_http::read_to_end(&mut reader).await;
    assert!(
        !rest.windows(12).any(|w| w == b"data: [DONE]"),
        "a cut-off stream must not end as if complete"
    );
    assert!(!rest.ends_with(b"0\r\n\r\n"), "no terminating chunk");
    assert_eq!(stalls(&server).await, 1);
}

#[actix_web::test]
async fn a_reader_that_keeps_reading_gets_the_whole_stream() {
    let fake = FakeUpstream::start(
        "fake",
        Faults {
            stream_padding_bytes: 16 * 1024,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let server = start(config(&format!(
        r#"{{"network":{{
            "gateway":{{"clients":["up"],"stream_write_timeout":0.3}},
            "api_clients":{{"up":{{"base_url":"{}","rate_limit":60000,
                "max_response_bytes":1073741824}}}}}}}}"#,
        fake.url("")
    )))
    .await;
    let body = chat_body(100, true);
    let resp = raw_http::request(
        server.addr,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json",
        body.as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.chunked_complete, Some(true));
    assert!(resp.body.ends_with(b"data: [DONE]\n\n"));
    assert_eq!(stalls(&server).await, 0);
}
