//! Property tests on hostile callers of `/proxy/{client}/…`: random methods,
//! request targets (dot segments in every encoding, stray and broken
//! percent escapes, bytes outside ASCII, very long ones) and headers
//! (hop-by-hop ones, names a `Connection` header lists, huge values), sent
//! on a raw TCP socket so nothing normalises them first.
//!
//! For every request: the server answers (no panic, no hang) with a status
//! happynet documents. When the fake upstream answers (its echo), it got the
//! target byte for byte under the client's base path, and none of the
//! hop-by-hop headers. After all of them: the upstream's breaker has seen no
//! failure and an ordinary caller is served at once — no caller's mistake
//! counted against the upstream.
//!
//! 512 cases; the run prints how many got each status
//! (`cargo test --test hostile_proxy -- --nocapture`).

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;

use actix_web::{App, HttpServer};
use fake_upstream::{FakeUpstream, Faults};
use happynet::actors::{BreakerStats, GetBreakerStats};
use happynet::{Config, Network};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::Duration;

/// The longest one request may take before the test fails: well past the
/// body deadline below, which ends a request whose body never comes.
const WAIT: Duration = Duration::from_secs(5);

/// Statuses happynet itself answers a bad caller with (the README's route
/// tables): the request line or a header is malformed (400), the tail
/// climbs above the base path (400), the method is refused (405), the body
/// never came (408: a `transfer-encoding: chunked` the caller did not
/// follow, within `request_body_timeout`), the body or target is too long
/// (413, 414), the headers are too big (431).
const CALLER_ERRORS: &[u16] = &[400, 405, 408, 413, 414, 431];

/// Headers that describe one hop and must never reach the upstream.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

struct Servers {
    happynet: SocketAddr,
    net: Network,
}

/// Starts the fake upstream and happynet (its client `up` points at the
/// fake's `/base`) on a System of their own, on a thread of their own, so
/// that the test's blocking sockets never stall them.
fn start_servers() -> Servers {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let system = actix::System::new();
        system.block_on(async move {
            let fake = FakeUpstream::start("fake", Faults::default())
                .await
                .unwrap();
            let config = Config::from_json_str(&format!(
                r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{}",
                    "rate_limit":6000000,"retry_attempts":0,
                    "breaker":{{"window":5,"minimum_calls":5,"open_duration":30}}}}}},
                    "security":{{"requests_per_second":0,"request_body_timeout":1}},
                    "gateway":{{"clients":["up"]}}}}}}"#,
                fake.url("/base")
            ))
            .unwrap();
            let net = Network::start(config).unwrap();
            let routes = net.configure();
            let gateways = net.configure_gateways();
            let server = HttpServer::new(move || {
                App::new()
                    .configure(routes.clone())
                    .configure(gateways.clone())
            })
            .workers(1)
            .on_connect(net.on_connect())
            .disable_signals()
            .bind(("127.0.0.1", 0))
            .unwrap();
            let addr = server.addrs()[0];
            actix_web::rt::spawn(server.run());
            tx.send(Servers {
                happynet: addr,
                net,
            })
            .unwrap();
            // Serve until the test process ends.
            std::future::pending::<()>().await;
            drop(fake);
        });
    });
    rx.recv_timeout(WAIT).expect("servers started")
}

/// One path segment a hostile caller might write.
fn segment() -> impl Strategy<Value = Vec<u8>> {
    let fixed = prop_oneof![
        Just(&b".."[..]),
        Just(&b"."[..]),
        Just(&b"%2e%2e"[..]),
        Just(&b"%2E."[..]),
        Just(&b".%2e"[..]),
        Just(&b"%252e%252e"[..]),
        Just(&b"..%2f"[..]),
        Just(&b"..%5c"[..]),
        Just(&b"..;"[..]),
        Just(&b"\\.."[..]),
        Just(&b"%2f"[..]),
        Just(&b"%00"[..]),
        Just(&b"%zz"[..]),
        Just(&b"%"[..]),
        Just(&b"%4"[..]),
        Just(&b"hello%20world"[..]),
        Just(&b"a+b"[..]),
        Just(&b"caf\xc3\xa9"[..]),
        Just(&b"\xff\xfe"[..]),
        Just(&b"sp ace"[..]),
        Just(&b"tab\t"[..]),
        Just(&b"q?x=1&y=%41"[..]),
        Just(&b"frag#x"[..]),
        Just(&b""[..]),
    ]
    .prop_map(<[u8]>::to_vec);
    prop_oneof![
        4 => fixed,
        2 => "[A-Za-z0-9._~!$&'()*+,;=:@-]{1,12}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 1..8),
        1 => (1usize..20_000).prop_map(|n| vec![b'x'; n]),
    ]
}

fn target() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(segment(), 0..6),
        prop::option::of("[A-Za-z0-9=&%._-]{0,40}"),
    )
        .prop_map(|(segments, query)| {
            let mut t = segments.join(&b'/');
            if let Some(q) = query {
                t.push(b'?');
                t.extend_from_slice(q.as_bytes());
            }
            t
        })
}

fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
    let name = prop_oneof![
        3 => prop::sample::select(HOP_BY_HOP).prop_map(str::to_owned),
        1 => Just("host".to_owned()),
        1 => Just("content-length".to_owned()),
        1 => Just("transfer-encoding".to_owned()),
        1 => Just("expect".to_owned()),
        // Not `x-fault-…`: those ask the fake upstream to fail on purpose.
        4 => "x-[a-z0-9-]{1,16}",
        1 => "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}",
        1 => "[ -~]{1,8}",
    ];
    let value = prop_oneof![
        4 => "[ -~]{0,40}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..16),
        1 => (1usize..70_000).prop_map(|n| vec![b'v'; n]),
        1 => "x-[a-z]{1,8}(, x-[a-z]{1,8}){0,3}".prop_map(String::into_bytes),
    ];
    (name, value)
}

#[derive(Debug, Clone)]
struct HostileRequest {
    method: String,
    target: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

fn hostile_request() -> impl Strategy<Value = HostileRequest> {
    let method = prop_oneof![
        4 => prop::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH"][..]).prop_map(str::to_owned),
        1 => prop::sample::select(&["HEAD", "OPTIONS", "TRACE", "CONNECT"][..]).prop_map(str::to_owned),
        1 => "[A-Z]{1,10}",
    ];
    (
        method,
        target(),
        prop::collection::vec(header(), 0..6),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(method, target, headers, body)| HostileRequest {
            method,
            target,
            headers,
            body,
        })
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Sends `req` to `/proxy/up/<target>` and reads until the server closes.
/// `None` when the server closed without a status line (it may, for a head
/// it cannot parse).
fn send(addr: SocketAddr, req: &HostileRequest) -> Option<Answer> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let mut head = Vec::new();
    head.extend_from_slice(req.method.as_bytes());
    head.extend_from_slice(b" /proxy/up/");
    head.extend_from_slice(&req.target);
    head.extend_from_slice(b" HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n");
    for (name, value) in &req.headers {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(format!("content-length: {}\r\n\r\n", req.body.len()).as_bytes());
    // The server may answer and close before reading it all: not an error.
    let _ = stream
        .write_all(&head)
        .and_then(|()| stream.write_all(&req.body));
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        // A reset after the answer (the server closed with our bytes
        // unread) still leaves the answer in `raw`.
        assert!(
            e.kind() == std::io::ErrorKind::ConnectionReset,
            "no answer within {WAIT:?}: {e}"
        );
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    // Only this answer's body: a target with a line break in it can make
    // the bytes sent two requests, and the server then answers both.
    let body = &raw[end + 4..];
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(body.len())
        .min(body.len());
    Some(Answer {
        status,
        headers,
        body: body[..length].to_vec(),
    })
}

/// The target the upstream must see for `target`: its base path, then the
/// tail and query exactly as sent. A fragment is never part of a request
/// target (RFC 9112 §3.2); actix-http's parser drops one, and so the
/// upstream never sees it.
fn expected_upstream_path(target: &[u8]) -> String {
    let end = target
        .iter()
        .position(|&b| b == b'#')
        .unwrap_or(target.len());
    format!("/base/{}", String::from_utf8_lossy(&target[..end]))
}

fn breaker(net: &Network) -> BreakerStats {
    let breaker = net.api("up").unwrap().upstream().breaker().clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let system = actix::System::new();
        let snapshot = system.block_on(async move { breaker.send(GetBreakerStats).await });
        let _ = tx.send(snapshot);
    });
    rx.recv_timeout(WAIT).unwrap().unwrap()
}

#[test]
fn hostile_proxy_requests_get_documented_answers_and_never_hurt_the_upstream() {
    let servers = start_servers();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let statuses = std::cell::RefCell::new(BTreeMap::<u16, u32>::new());
    let result = runner.run(&hostile_request(), |req| {
        let Some(answer) = send(servers.happynet, &req) else {
            *statuses.borrow_mut().entry(0).or_default() += 1;
            return Ok(());
        };
        *statuses.borrow_mut().entry(answer.status).or_default() += 1;
        if (200..300).contains(&answer.status) && answer.status != 204 && req.method != "HEAD" {
            // The fake upstream's echo: what reached it.
            let echo: serde_json::Value = serde_json::from_slice(&answer.body).map_err(|e| {
                TestCaseError::fail(format!(
                    "not the echo ({e}): {:?}\n{}",
                    answer.headers,
                    String::from_utf8_lossy(&answer.body)
                ))
            })?;
            prop_assert_eq!(
                echo["path"].as_str().unwrap_or_default(),
                expected_upstream_path(&req.target),
                "the target reached the upstream changed"
            );
            let sent: Vec<&str> = echo["header_names"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            for name in HOP_BY_HOP {
                prop_assert!(!sent.contains(name), "{} reached the upstream", name);
            }
        } else {
            prop_assert!(
                (200..300).contains(&answer.status) || CALLER_ERRORS.contains(&answer.status),
                "an undocumented answer {} to {:?} {:?}: {}",
                answer.status,
                req.method,
                String::from_utf8_lossy(&req.target),
                String::from_utf8_lossy(&answer.body)
            );
        }
        for (name, _) in &answer.headers {
            prop_assert!(
                !HOP_BY_HOP[1..].contains(&name.as_str()),
                "{} came back to the caller",
                name
            );
        }
        Ok(())
    });
    println!(
        "hostile /proxy requests by status (0: closed without an answer): {:?}",
        statuses.borrow()
    );
    if let Err(e) = result {
        panic!("{e}");
    }

    // No caller's mistake reached the upstream's books, and an ordinary
    // caller is served at once.
    let b = breaker(&servers.net);
    assert_eq!(b.failures, 0, "{b:?}");
    let ok = send(
        servers.happynet,
        &HostileRequest {
            method: "GET".into(),
            target: b"after/all/that?x=1".to_vec(),
            headers: Vec::new(),
            body: Vec::new(),
        },
    )
    .expect("an answer");
    assert_eq!(ok.status, 200);
}
