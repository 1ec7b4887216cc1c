//! What happynet writes to the log about its callers: the access log never
//! shows a token from a query string, and a start-up warning says when the
//! per-IP guards would exempt every client of a reverse proxy on the same
//! host. This binary installs a logger that records every line (with the
//! thread that wrote it); it has a binary of its own because a process has
//! one logger.

#![allow(clippy::unwrap_used)]

mod support;

use actix_web::{App, HttpServer};
use happynet::{Config, Network};
use std::sync::{Mutex, Once};
use std::thread::ThreadId;
use std::time::Duration;
use support::{config, http_client, TestServer, WAIT};

/// `(thread, level, target, line)` of everything logged.
static LINES: Mutex<Vec<(ThreadId, log::Level, String, String)>> = Mutex::new(Vec::new());

struct Recorder;

impl log::Log for Recorder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LINES.lock().unwrap().push((
            std::thread::current().id(),
            record.level(),
            record.target().to_owned(),
            record.args().to_string(),
        ));
    }
    fn flush(&self) {}
}

fn record_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Recorder).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

/// Lines logged so far that contain `needle`.
fn lines_with(needle: &str) -> Vec<String> {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, _, line)| line.contains(needle))
        .map(|(_, _, _, line)| line.clone())
        .collect()
}

/// Waits (boundedly) until a line containing `needle` was logged.
async fn wait_for_line(needle: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = lines_with(needle);
        if !found.is_empty() {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no log line with {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// happynet behind the access log an app should use.
async fn start_logged(config: Config) -> TestServer {
    let net = Network::start(config).expect("network starts");
    let routes = net.configure();
    let server = HttpServer::new(move || {
        App::new()
            .wrap(happynet::security::access_log())
            .configure(routes.clone())
    })
    .workers(1)
    .on_connect(net.on_connect())
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .expect("bind");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    TestServer { addr, net, handle }
}

#[actix_web::test]
async fn the_access_log_never_shows_a_token_from_a_query_string() {
    record_logs();
    const CANARY: &str = "tok-canary-5f2a9c";
    let server = start_logged(config(&format!(
        r#"{{"network":{{"security":{{"ws_tokens":["{CANARY}"]}}}}}}"#
    )))
    .await;
    let client = http_client();
    // The WebSocket token in the query (here refused: not an upgrade), an
    // encoded parameter name, other secret-looking names, and a Referer
    // that carries one: none may reach the log.
    let paths = [
        format!("/ws?room=lobby&token={CANARY}&marker=m1"),
        format!("/health?%74oken={CANARY}&marker=m2"),
        format!("/health?api_key={CANARY}&access_token={CANARY}&marker=m3"),
    ];
    for path in &paths {
        let resp = client
            .get(server.url(path))
            .insert_header((
                "referer",
                format!("http://app.example/page?token={CANARY}#x"),
            ))
            .send()
            .await
            .expect("request");
        assert!(resp.status().as_u16() < 500, "{path}");
    }
    for marker in ["marker=m1", "marker=m2", "marker=m3"] {
        let lines = wait_for_line(marker).await;
        for line in &lines {
            assert!(!line.contains(CANARY), "the token reached the log: {line}");
            assert!(line.contains("REDACTED"), "{line}");
            assert!(line.contains("app.example/page?token=REDACTED#x"), "{line}");
        }
    }
    // What is not secret is logged as it came.
    let line = &wait_for_line("marker=m1").await[0];
    assert!(
        line.contains("GET /ws?room=lobby&token=REDACTED&marker=m1 HTTP/1.1"),
        "{line}"
    );
    // And nothing anywhere in the log, from any target, has the token.
    let all = LINES.lock().unwrap().clone();
    for (_, _, target, line) in &all {
        assert!(!line.contains(CANARY), "{target}: {line}");
    }
    server.stop().await;
}

/// Starts a network with `security` and returns the warnings this thread
/// logged while it started.
fn start_warnings(security: &str) -> Vec<String> {
    let me = std::thread::current().id();
    let before = LINES.lock().unwrap().len();
    let net = Network::start(config(&format!(
        r#"{{"network":{{"security":{{{security}}}}}}}"#
    )))
    .expect("starts");
    drop(net);
    LINES.lock().unwrap()[before..]
        .iter()
        .filter(|(thread, level, _, _)| *thread == me && *level == log::Level::Warn)
        .map(|(_, _, _, line)| line.clone())
        .collect()
}

#[actix_web::test]
async fn a_start_warns_that_a_local_proxy_would_exempt_everyone_unless_told_otherwise() {
    record_logs();
    let proxy_warning = |warnings: &[String]| {
        warnings
            .iter()
            .any(|w| w.contains("reverse proxy") && w.contains("trust_forwarded_for"))
    };
    // The default: loopback exempt, nobody said why.
    let warnings = start_warnings("");
    assert!(proxy_warning(&warnings), "{warnings:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("network.security.exempt_ips")),
        "{warnings:?}"
    );
    // The operator decided: a proxy that appends X-Forwarded-For, or an
    // exemption written out (even the default one, even none).
    for explicit in [
        r#""trust_forwarded_for":true"#,
        r#""exempt_ips":["127.0.0.0/8","::1"]"#,
        r#""exempt_ips":[]"#,
        // No per-IP guard on: nothing to exempt anyone from.
        r#""max_connections_per_ip":0,"max_tcp_connections_per_ip":0,"connections_per_second":0,"requests_per_second":0"#,
    ] {
        let warnings = start_warnings(explicit);
        assert!(!proxy_warning(&warnings), "{explicit}: {warnings:?}");
    }
}
