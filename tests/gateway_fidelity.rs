//! Gateway fidelity (`/proxy/{client}/…` and `/v1/…`), checked on the wire
//! with a raw TCP client and a real HTTP client (awc), against the fake
//! upstream (real HTTP; with actix-web's `Compress` for encoded answers) and
//! a canned raw upstream for heads no server library writes:
//!
//! - the request target reaches the upstream byte for byte, and a tail that
//!   climbs above the client's base path is refused with 400;
//! - nothing the caller did wrong counts against the upstream (no breaker
//!   failure, no retry, nothing sent);
//! - bodies keep the framing they arrived with: `/proxy` passes encoded bytes
//!   through with their `Content-Encoding`; `ApiClient` and `/v1` decode and
//!   drop it; the cache keeps each as it should;
//! - hop-by-hop headers (and those named in `Connection`) go neither way,
//!   and header sizes are capped.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;
mod raw_http;
mod support;

use fake_upstream::{FakeUpstream, Faults, StartOptions};
use happynet::actors::{BreakerStats, GetBreakerStats};
use happynet::gateway::{MAX_FORWARDED_HEADER_BYTES, MAX_RESPONSE_HEADER_BYTES};
use happynet::HttpError;
use serde_json::Value;
use std::io::Read;
use support::{config, http_client, start, TestServer};

/// Starts the fake upstream, compressing its answers or not.
async fn fake(compress: bool) -> FakeUpstream {
    FakeUpstream::start_with(
        "fake",
        Faults::default(),
        StartOptions {
            compress,
            ..StartOptions::default()
        },
    )
    .await
    .unwrap()
}

/// A server whose `up` client points at `base_url`, with a breaker that
/// opens after 5 failures of 5, no retries, and `extra` client settings.
async fn server_for(base_url: &str, extra: &str) -> TestServer {
    start(config(&format!(
        r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{base_url}",
            "rate_limit":60000,"retry_attempts":0,
            "breaker":{{"window":5,"minimum_calls":5,"open_duration":30}}{extra}}}}},
            "gateway":{{"clients":["up"]}}}}}}"#
    )))
    .await
}

async fn breaker(server: &TestServer) -> BreakerStats {
    server
        .net
        .api("up")
        .unwrap()
        .upstream()
        .breaker()
        .send(GetBreakerStats)
        .await
        .unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn unbrotli(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::Decompressor::new(bytes, 4096)
        .read_to_end(&mut out)
        .expect("valid brotli");
    out
}

#[actix_web::test]
async fn the_request_target_reaches_the_upstream_byte_for_byte() {
    let fake = fake(false).await;
    let server = server_for(&fake.url("/base"), "").await;
    for (target, upstream_sees) in [
        (
            "/proxy/up/search/hello%20world",
            "/base/search/hello%20world",
        ),
        (
            "/proxy/up/a%2Fb/%41%7e/caf%C3%A9?q=a%20b&r=%2F&e=&x=1+2&q=again",
            "/base/a%2Fb/%41%7e/caf%C3%A9?q=a%20b&r=%2F&e=&x=1+2&q=again",
        ),
        (
            "/proxy/up/~u/!$&'()*+,;=:@/x?%3F=%26",
            "/base/~u/!$&'()*+,;=:@/x?%3F=%26",
        ),
        ("/proxy/up/", "/base/"),
        ("/proxy/up/?only=query", "/base/?only=query"),
        // Dots that do not climb are data, not dot segments.
        ("/proxy/up/a/../b", "/base/a/../b"),
        (
            "/proxy/up/..x/x../.well-known/...",
            "/base/..x/x../.well-known/...",
        ),
    ] {
        let resp = raw_http::get(server.addr, target, &[]).await;
        assert_eq!(resp.status, 200, "{target}: {:?}", resp.body);
        assert_eq!(resp.json()["path"], upstream_sees, "{target}");
    }
    // Many such requests: every one answered, and the breaker saw only
    // successes (on main, 15 of them opened it for everyone).
    let client = http_client();
    for _ in 0..20 {
        let resp = client
            .get(server.url("/proxy/up/search/hello%20world"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let b = breaker(&server).await;
    assert_eq!(b.failures, 0, "{b:?}");
    assert_eq!(b.opened, 0, "{b:?}");
}

#[actix_web::test]
async fn a_tail_that_climbs_above_the_base_path_is_refused() {
    let fake = fake(false).await;
    let server = server_for(&fake.url("/base"), "").await;
    for target in [
        "/proxy/up/..",
        "/proxy/up/../admin",
        "/proxy/up/a/../../admin",
        "/proxy/up/./../admin",
        "/proxy/up/%2e%2e/admin",
        "/proxy/up/%2E%2E/admin",
        "/proxy/up/%2E./admin",
        "/proxy/up/.%2e/admin",
        "/proxy/up/..%2fadmin",
        "/proxy/up/a/..%2F..%2Fadmin",
        "/proxy/up/..%5cadmin",
        "/proxy/up/%252e%252e/admin",
        "/proxy/up/..;/admin",
        "/proxy/up/..?q=1",
    ] {
        let resp = raw_http::get(server.addr, target, &[]).await;
        assert_eq!(resp.status, 400, "{target}");
        assert_eq!(resp.json()["error"], "invalid_request", "{target}");
    }
    assert_eq!(fake.requests(), 0, "nothing climbing was sent");
    let b = breaker(&server).await;
    assert_eq!((b.calls, b.failures), (0, 0), "{b:?}");
}

#[actix_web::test]
async fn caller_mistakes_never_count_against_the_upstream() {
    let fake = fake(false).await;
    let server = server_for(&fake.url(""), "").await;
    let api = server.net.api("up").unwrap();
    let client = http_client();
    let big = "x".repeat(MAX_FORWARDED_HEADER_BYTES);
    // Well past the breaker's 5 calls: none of these may open it.
    for _ in 0..10 {
        // A path the app built wrong: refused before any attempt.
        match api.get("/hello world").send().await {
            Err(HttpError::InvalidRequest { .. }) => {}
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
        let resp = raw_http::get(server.addr, "/proxy/up/%2e%2e/x", &[]).await;
        assert_eq!(resp.status, 400);
        // A caller's headers over the cap: 431, nothing forwarded.
        let resp = client
            .get(server.url("/proxy/up/x"))
            .insert_header(("x-big", big.as_str()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 431);
        // TRACE would echo the credential the gateway adds.
        let resp = raw_http::request(
            server.addr,
            &format!("TRACE /proxy/up/x HTTP/1.1\r\nHost: {}", server.addr),
            b"",
        )
        .await;
        assert_eq!(resp.status, 405);
    }
    assert_eq!(fake.requests(), 0);
    let b = breaker(&server).await;
    assert_eq!((b.calls, b.failures, b.opened), (0, 0, 0), "{b:?}");
    // And the upstream is still there for everyone.
    let resp = client.get(server.url("/proxy/up/x")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let stats = api.upstream().call_stats();
    assert_eq!(stats.retries, 0);
}

#[actix_web::test]
async fn header_sizes_are_capped_with_the_blame_where_it_belongs() {
    let fake = fake(false).await;
    let server = server_for(&fake.url(""), "").await;
    let client = http_client();
    // The caller's side: just under the cap passes, over it is 431.
    let fits = "x".repeat(MAX_FORWARDED_HEADER_BYTES - 512);
    let resp = client
        .get(server.url("/proxy/up/x"))
        .insert_header(("x-big", fits.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let over = "x".repeat(MAX_FORWARDED_HEADER_BYTES);
    let resp = client
        .get(server.url("/proxy/up/x"))
        .insert_header(("x-big", over.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(fake.requests(), 1);

    // The upstream's side: a head under the cap passes through, over it is
    // the upstream's fault: 502, and a failure for its breaker.
    let resp = raw_http::get(server.addr, "/proxy/up/x", &["x-fault-header-bytes: 1000"]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-fault-padding").map(str::len), Some(1000));
    let over = MAX_RESPONSE_HEADER_BYTES.to_string();
    let resp = raw_http::get(
        server.addr,
        "/proxy/up/x",
        &[&format!("x-fault-header-bytes: {over}")],
    )
    .await;
    assert_eq!(resp.status, 502, "{:?}", resp.json());
    assert_eq!(resp.json()["error"], "transport");
    assert!(!resp.has_header("x-fault-padding"));
    assert_eq!(breaker(&server).await.failures, 1);
}

#[actix_web::test]
async fn hop_by_hop_headers_are_removed_in_both_directions() {
    // Towards the upstream: the standard ones and those the caller's
    // `Connection` names.
    let fake = fake(false).await;
    let server = server_for(&fake.url(""), "").await;
    let resp = raw_http::get(
        server.addr,
        "/proxy/up/x",
        &[
            "Keep-Alive: timeout=5",
            "TE: trailers",
            "Proxy-Authorization: Basic c2VjcmV0",
            "Proxy-Connection: keep-alive",
            "X-Request-Id: named-in-connection",
            "X-Hop-Two: also-named",
            "Connection: keep-alive, X-Request-Id",
            "Connection: x-hop-two",
            "X-End-To-End: kept",
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    let echo = resp.json();
    let names: Vec<&str> = echo["header_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for hop in [
        "connection",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "x-request-id",
        "x-hop-two",
    ] {
        assert!(!names.contains(&hop), "{hop} was forwarded: {names:?}");
    }
    assert!(names.contains(&"x-end-to-end"), "{names:?}");

    // From the upstream: a head no server library would write.
    let canned = b"HTTP/1.1 200 OK\r\n\
        Content-Type: text/plain\r\n\
        Connection: keep-alive, X-Hop-Secret\r\n\
        X-Hop-Secret: internal\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Authenticate: Basic\r\n\
        Trailer: x-checksum\r\n\
        Upgrade: h2c\r\n\
        X-End-To-End: kept\r\n\
        Content-Length: 2\r\n\r\nok"
        .to_vec();
    let upstream = raw_http::canned_upstream(canned, 1).await;
    let server = server_for(&format!("http://{upstream}"), "").await;
    let resp = raw_http::get(server.addr, "/proxy/up/x", &[]).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"ok");
    assert_eq!(resp.header("x-end-to-end"), Some("kept"));
    for hop in [
        "x-hop-secret",
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "upgrade",
    ] {
        assert!(!resp.has_header(hop), "{hop} came back: {:?}", resp.headers);
    }
}

#[actix_web::test]
async fn the_proxy_passes_encoded_bodies_through_with_their_encoding() {
    let fake = fake(true).await;
    let server = server_for(&fake.url(""), "").await;
    for (encoding, decode) in [("gzip", gunzip as fn(&[u8]) -> Vec<u8>), ("br", unbrotli)] {
        // On the wire: the upstream's encoded bytes, its Content-Encoding,
        // and a Content-Length that counts those bytes.
        let resp = raw_http::get(
            server.addr,
            "/proxy/up/enc?x=1",
            &[&format!("Accept-Encoding: {encoding}")],
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-encoding"), Some(encoding));
        if let Some(len) = resp.header("content-length") {
            assert_eq!(len.parse::<usize>().unwrap(), resp.body.len());
        }
        if encoding == "gzip" {
            assert_eq!(&resp.body[..2], &[0x1f, 0x8b], "gzip magic");
        }
        let echo: Value = serde_json::from_slice(&decode(&resp.body)).unwrap();
        assert_eq!(echo["path"], "/enc?x=1");

        // A client that decodes (awc) gets the JSON.
        let mut resp = http_client()
            .get(server.url("/proxy/up/enc?x=2"))
            .insert_header(("accept-encoding", encoding))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let echo: Value = resp.json().await.unwrap();
        assert_eq!(echo["path"], "/enc?x=2");
    }
    // A caller that accepts no encoding gets none.
    let resp = raw_http::get(server.addr, "/proxy/up/plain", &[]).await;
    assert!(!resp.has_header("content-encoding"), "{:?}", resp.headers);
    assert_eq!(resp.json()["path"], "/plain");
}

#[actix_web::test]
async fn api_client_and_v1_answers_are_decoded_without_their_encoding() {
    let fake = fake(true).await;
    let server = server_for(&fake.url(""), "").await;
    let api = server.net.api("up").unwrap();
    let resp = api.get("/decoded").send().await.unwrap();
    assert_eq!(resp.json::<Value>().unwrap()["path"], "/decoded");
    assert!(!resp.headers.contains_key("content-encoding"), "{resp:?}");
    if let Some(len) = resp.headers.get("content-length") {
        assert_eq!(len.to_str().unwrap(), resp.body.len().to_string());
    }

    // `/v1` builds its own answer from the decoded body, error answers
    // included: whatever the upstream's encoding, the caller gets identity.
    let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    for accept in ["gzip", "br", "identity"] {
        for status in [None, Some(400), Some(503)] {
            fake.set_faults(Faults {
                fail_next: u32::from(status.is_some()),
                error_status: status.unwrap_or(0),
                ..Faults::default()
            });
            let resp = raw_http::request(
                server.addr,
                &format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
                     Content-Type: application/json\r\nAccept-Encoding: {accept}"
                ),
                chat,
            )
            .await;
            assert_eq!(resp.status, status.unwrap_or(200), "{accept}");
            assert!(!resp.has_header("content-encoding"), "{:?}", resp.headers);
            let body = resp.json();
            if status.is_some() {
                assert!(body["error"]["message"].is_string(), "{body}");
            } else {
                assert_eq!(body["object"], "chat.completion");
            }
        }
    }
}

#[actix_web::test]
async fn the_cache_keeps_decoded_and_passed_through_answers_apart() {
    let fake = fake(true).await;
    let server = server_for(&fake.url(""), r#","cache":{}"#).await;
    let api = server.net.api("up").unwrap();
    let expected: Value = serde_json::json!({"id": "k", "version": 1});

    // The app's answer: decoded, stored decoded.
    for from_cache in [false, true] {
        let resp = api.get("/cache/k").send().await.unwrap();
        assert_eq!(resp.from_cache, from_cache);
        assert!(!resp.headers.contains_key("content-encoding"), "{resp:?}");
        assert_eq!(resp.json::<Value>().unwrap(), expected);
    }
    assert_eq!(fake.requests(), 1);

    // The proxy's: passed through encoded, stored per accepted encoding,
    // served from the cache the same.
    for (encoding, decode) in [("gzip", gunzip as fn(&[u8]) -> Vec<u8>), ("br", unbrotli)] {
        let before = fake.requests();
        for _ in 0..2 {
            let resp = raw_http::get(
                server.addr,
                "/proxy/up/cache/k",
                &[&format!("Accept-Encoding: {encoding}")],
            )
            .await;
            assert_eq!(resp.status, 200);
            assert_eq!(resp.header("content-encoding"), Some(encoding));
            let body: Value = serde_json::from_slice(&decode(&resp.body)).unwrap();
            assert_eq!(body, expected);
        }
        assert_eq!(fake.requests(), before + 1, "{encoding}: second from cache");
    }
    // Identity for a caller that accepts nothing, not a cached encoding.
    let resp = raw_http::get(server.addr, "/proxy/up/cache/k", &[]).await;
    assert!(!resp.has_header("content-encoding"), "{:?}", resp.headers);
    assert_eq!(resp.json(), expected);
    // And the app's entry was never replaced by an encoded one.
    let resp = api.get("/cache/k").send().await.unwrap();
    assert!(resp.from_cache);
    assert_eq!(resp.json::<Value>().unwrap(), expected);
}

#[actix_web::test]
async fn a_head_answer_keeps_the_length_a_get_would_have() {
    let fake = fake(false).await;
    let server = server_for(&fake.url(""), "").await;
    let direct = raw_http::request(fake.addr, "HEAD /cache/k HTTP/1.1\r\nHost: x", b"").await;
    let proxied = raw_http::request(
        server.addr,
        "HEAD /proxy/up/cache/k HTTP/1.1\r\nHost: x",
        b"",
    )
    .await;
    assert_eq!(proxied.status, 200);
    let length = direct.header("content-length").unwrap();
    assert_ne!(length, "0");
    assert_eq!(proxied.header("content-length"), Some(length));
    assert!(proxied.body.is_empty(), "{:?}", proxied.body);
    assert_eq!(proxied.header("etag"), direct.header("etag"));
    // On a kept-alive connection too: the next request is answered.
    let client = http_client();
    for _ in 0..2 {
        let resp = client
            .head(server.url("/proxy/up/cache/k"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers().get("content-length").unwrap(), length);
    }
    let resp = client.get(server.url("/proxy/up/cache/k")).send().await;
    assert_eq!(resp.unwrap().status(), 200);
}
