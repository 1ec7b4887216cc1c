//! Alerts end to end (`network.alerts`): a real network whose API client
//! calls the fake upstream (real HTTP, fault injection), a webhook receiver
//! that is a real actix-web server on `127.0.0.1:0`, and WebSocket clients
//! against a real happynet server. The breaker is made to flap for real; what
//! the webhook receives is parsed and checked field by field.
//!
//! Every wait polls a condition with a bounded deadline ([`support::WAIT`]);
//! the alert actor's `evaluations` counter is the sync point for "the rules
//! have looked at the node since".

#![allow(clippy::unwrap_used, clippy::expect_used)]

use testkit::fake_upstream;
mod support;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use fake_upstream::{FakeUpstream, Faults};
use happynet::actors::{BreakerStateKind, GetBreakerStats};
use happynet::ops::alerts::{AlertEvent, AlertRule, AlertState};
use happynet::{Config, Network};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{WsClient, WAIT};

/// How often a poll looks again.
const POLL: Duration = Duration::from_millis(10);

/// Polls `check` until it returns `Some`, failing the test after [`WAIT`].
async fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_web::rt::time::sleep(POLL).await;
    }
}

/// Waits until the rules have judged the node `n` more times, so that
/// anything true now has been seen.
async fn evaluations_pass(net: &Network, n: u64) {
    let start = net.alert_counters().evaluations;
    wait_for("evaluations", || {
        (net.alert_counters().evaluations >= start + n).then_some(())
    })
    .await;
}

fn breaker_events(net: &Network) -> Vec<AlertEvent> {
    net.recent_alerts()
        .into_iter()
        .filter(|e| e.rule == AlertRule::BreakerOpen)
        .collect()
}

/// What the webhook receiver saw: every attempt, and the bodies it accepted
/// with their path-and-query and content type.
#[derive(Default)]
struct Received {
    attempts: usize,
    accepted: Vec<(String, String, Value)>,
}

struct Receiver {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Received>>,
    handle: ServerHandle,
}

/// A webhook receiver that answers `fail_first` attempts with 503 (and
/// every attempt, with `always_fail`), then 204.
async fn start_receiver(fail_first: usize, always_fail: bool) -> Receiver {
    let seen = Arc::new(Mutex::new(Received::default()));
    let state = seen.clone();
    let server = HttpServer::new(move || {
        let state = state.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let state = state.clone();
            async move {
                let mut seen = state.lock().unwrap();
                seen.attempts += 1;
                if always_fail || seen.attempts <= fail_first {
                    return HttpResponse::ServiceUnavailable().finish();
                }
                let content_type = req
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                seen.accepted
                    .push((req.uri().to_string(), content_type, json));
                HttpResponse::NoContent().finish()
            }
        }))
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Receiver { addr, seen, handle }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn breaker_state(net: &Network, name: &str) -> BreakerStateKind {
    let client = net.api(name).unwrap();
    client
        .upstream()
        .breaker()
        .send(GetBreakerStats)
        .await
        .unwrap()
        .state
}

/// Calls `flaky` until its breaker is in `want` (calls an open breaker
/// rejects cost nothing, so this is also how a probe gets through).
async fn drive_breaker_to(net: &Network, want: BreakerStateKind) {
    drive_client_breaker_to(net, "flaky", want).await;
}

/// Calls the API client `name` until its breaker is in `want`.
async fn drive_client_breaker_to(net: &Network, name: &str, want: BreakerStateKind) {
    let client = net.api(name).unwrap();
    let deadline = Instant::now() + WAIT;
    while breaker_state(net, name).await != want {
        assert!(
            Instant::now() < deadline,
            "{name}: breaker never became {want}"
        );
        let _ = client.get("/work").send().await;
        actix_web::rt::time::sleep(POLL).await;
    }
}

fn failing() -> Faults {
    Faults {
        error_rate: 1.0,
        ..Faults::default()
    }
}

/// A network with the API client `flaky` (no retries, a breaker that opens
/// after 4 failures of 4 and probes after 0.2 s with one call) and only the
/// breaker rule, evaluated every 20 ms with a one-minute hold.
fn flaky_network(upstream: &FakeUpstream, webhook: &str) -> Network {
    let json = format!(
        r#"{{"network":{{
            "api_clients":{{"flaky":{{"base_url":"{}","retry_attempts":0,"rate_limit":60000,
                "breaker":{{"window":4,"minimum_calls":4,"failure_rate":0.5,
                    "open_duration":0.2,"half_open_probes":1}}}}}},
            "alerts":{{"interval_ms":20,"hold_ms":60000,"webhook":{webhook},
                "rules":{{"upstream_error_rate":{{"enabled":false}},
                    "slow_consumer_evictions":{{"enabled":false}},
                    "connections_near_max":{{"enabled":false}}}}}}}}}}"#,
        upstream.url("")
    );
    Network::start(Config::from_json_str(&json).unwrap()).unwrap()
}

#[actix_web::test]
async fn a_flapping_breaker_fires_once_and_resolves_once_at_the_webhook() {
    let upstream = FakeUpstream::start("flaky", failing()).await.unwrap();
    // The first POST is refused: the webhook is retried like any upstream.
    let receiver = start_receiver(1, false).await;
    let webhook = format!(
        r#"{{"url":"http://{}/hooks/alerts?team=net","timeout_ms":2000,"retry_attempts":3}}"#,
        receiver.addr
    );
    let net = flaky_network(&upstream, &webhook);
    let started = unix_millis();

    // Open: fires.
    drive_breaker_to(&net, BreakerStateKind::Open).await;
    wait_for("the firing event", || {
        (breaker_events(&net).len() == 1).then_some(())
    })
    .await;
    // Recover, a probe closes it: resolves.
    upstream.set_faults(Faults::default());
    drive_breaker_to(&net, BreakerStateKind::Closed).await;
    wait_for("the resolved event", || {
        (breaker_events(&net).len() == 2).then_some(())
    })
    .await;
    // Flap twice more within the hold: open (held back), closed, open, closed.
    for _ in 0..2 {
        let suppressed = net.alert_counters().suppressed;
        upstream.set_faults(failing());
        drive_breaker_to(&net, BreakerStateKind::Open).await;
        wait_for("the reopening to be held back", || {
            (net.alert_counters().suppressed > suppressed).then_some(())
        })
        .await;
        upstream.set_faults(Faults::default());
        drive_breaker_to(&net, BreakerStateKind::Closed).await;
    }
    evaluations_pass(&net, 2).await;

    let events = breaker_events(&net);
    let states: Vec<AlertState> = events.iter().map(|e| e.state).collect();
    assert_eq!(states, [AlertState::Firing, AlertState::Resolved]);
    let counters = net.alert_counters();
    assert_eq!((counters.fired, counters.resolved), (1, 1));
    assert_eq!(counters.suppressed, 2);

    // The webhook got exactly those two, once each, as JSON.
    wait_for("both POSTs", || {
        (net.alert_counters().webhook_sent == 2).then_some(())
    })
    .await;
    let (attempts, mut accepted) = {
        let seen = receiver.seen.lock().unwrap();
        (seen.attempts, seen.accepted.clone())
    };
    assert_eq!(attempts, 3, "one refused attempt, retried, then one");
    assert_eq!(accepted.len(), 2);
    // POSTs are independent: order them as the events were made.
    accepted.sort_by_key(|(_, _, body)| body["id"].as_u64());
    for ((uri, content_type, body), (event, state)) in accepted
        .iter()
        .zip(events.iter().zip(["firing", "resolved"]))
    {
        assert_eq!(uri, "/hooks/alerts?team=net");
        assert_eq!(content_type, "application/json");
        assert_eq!(body["rule"], "breaker_open");
        assert_eq!(body["subject"], "flaky");
        assert_eq!(body["state"], state);
        assert_eq!(body["id"], event.id);
        assert_eq!(body["threshold"], 1.0);
        assert!(body["value"].is_number());
        let at = body["at"].as_u64().unwrap();
        assert!(at >= started && at <= unix_millis(), "at = {at}");
        assert!(body["message"].as_str().unwrap().contains("flaky"));
        // Receivers dedupe on (node, run, id).
        assert_eq!(body["node"], event.node.as_str());
        assert!(!event.node.is_empty());
        assert_eq!(body["run"], event.run.as_str());
        assert_eq!(event.run, happynet::ops::alerts::run_id());
        assert_eq!(body.as_object().unwrap().len(), 10, "{body}");
    }
    assert_eq!(accepted[0].2["value"], 1.0, "opened once");
    assert_eq!(net.alert_counters().webhook_failed, 0);
    // /metrics says the same, through a real Prometheus text parser.
    let text = happynet::ops::metrics::render(net.probes()).await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let sample = |name: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        sample("happynet_alert_events_total", ("state", "firing")),
        Some(1.0)
    );
    assert_eq!(
        sample("happynet_alert_events_total", ("state", "resolved")),
        Some(1.0)
    );
    assert_eq!(
        sample("happynet_alert_webhook_posts_total", ("outcome", "sent")),
        Some(2.0)
    );
    receiver.handle.stop(false).await;
}

/// `max_connections: 2`, ratio 0.5: one WebSocket fires the rule.
fn connections_config(webhook: &str) -> Config {
    support::config(&format!(
        r#"{{"network":{{"websocket":{{"max_connections":2}},
            "alerts":{{"interval_ms":20,"hold_ms":0,"webhook":{webhook},
                "rules":{{"connections_near_max":{{"ratio":0.5}}}}}}}}}}"#
    ))
}

fn connection_states(net: &Network) -> Vec<AlertState> {
    net.recent_alerts()
        .iter()
        .filter(|e| e.rule == AlertRule::ConnectionsNearMax)
        .map(|e| e.state)
        .collect()
}

/// Reads what arrives on `stream` (non-blocking) until it holds `needle`.
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    stream.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    wait_for(needle, || {
        let mut buf = [0u8; 4096];
        if let Ok(n) = stream.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        text.contains(needle).then(|| text.into_owned())
    })
    .await
}

/// Answers the request on `stream` with 204 and closes the connection.
fn answer_204(mut stream: TcpStream) {
    stream.set_nonblocking(false).unwrap();
    stream
        .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
        .unwrap();
}

#[actix_web::test]
async fn a_webhook_that_does_not_answer_delays_nothing_and_the_next_event_waits() {
    // Accepts connections (the kernel's backlog does) and answers only when
    // the test says so.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    silent.set_nonblocking(true).unwrap();
    let webhook = format!(
        r#"{{"url":"http://{}/hook","timeout_ms":60000,"retry_attempts":0,"max_in_flight":1}}"#,
        silent.local_addr().unwrap()
    );
    let server = support::start(connections_config(&webhook)).await;
    let net = server.net.clone();
    let t0 = Instant::now();

    let client = WsClient::connect(&server, "").await;
    wait_for("the firing event", || {
        (connection_states(&net) == [AlertState::Firing]).then_some(())
    })
    .await;
    let mut first = wait_for("the first POST", || silent.accept().ok()).await.0;
    drop(client);
    wait_for("the resolved event", || {
        (connection_states(&net) == [AlertState::Firing, AlertState::Resolved]).then_some(())
    })
    .await;
    // Both events came while the first POST still hangs (it would take a
    // minute to time out).
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    // The second waits in the queue (one slot, and its rule and subject
    // have a POST out): nothing else was sent, nothing dropped.
    evaluations_pass(&net, 3).await;
    assert!(silent.accept().is_err(), "a second POST went out");
    let c = net.alert_counters();
    assert_eq!(
        (c.webhook_sent, c.webhook_failed, c.webhook_dropped),
        (0, 0, 0)
    );

    // Once the first is answered, the waiting one goes out.
    read_until(&mut first, r#""state":"firing""#).await;
    answer_204(first);
    let mut second = wait_for("the second POST", || silent.accept().ok()).await.0;
    let request = read_until(&mut second, r#""state":"resolved""#).await;
    assert!(request.starts_with("POST /hook "), "{request}");
    answer_204(second);
    wait_for("both POSTs sent", || {
        (net.alert_counters().webhook_sent == 2).then_some(())
    })
    .await;
    assert_eq!(net.alert_counters().webhook_dropped, 0);
    server.stop().await;
}

/// A network with six API clients on a failing upstream, each with a
/// breaker that opens on its first failure and stays open a minute, only
/// the breaker rule, evaluated every 1.5 s, and at most 2 webhook POSTs out.
fn six_breakers_network(upstream: &FakeUpstream, receiver: &Receiver) -> Network {
    let clients: Vec<String> = (1..=6)
        .map(|i| {
            format!(
                r#""c{i}":{{"base_url":"{}","retry_attempts":0,"rate_limit":60000,
                    "breaker":{{"window":1,"minimum_calls":1,"failure_rate":0.5,
                        "open_duration":60,"half_open_probes":1}}}}"#,
                upstream.url("")
            )
        })
        .collect();
    let json = format!(
        r#"{{"network":{{"api_clients":{{{}}},
            "alerts":{{"interval_ms":1500,"hold_ms":60000,
                "webhook":{{"url":"http://{}/hook","max_in_flight":2}},
                "rules":{{"upstream_error_rate":{{"enabled":false}},
                    "slow_consumer_evictions":{{"enabled":false}},
                    "connections_near_max":{{"enabled":false}}}}}}}}}}"#,
        clients.join(","),
        receiver.addr
    );
    Network::start(Config::from_json_str(&json).unwrap()).unwrap()
}

#[actix_web::test]
async fn a_burst_beyond_max_in_flight_all_reaches_a_healthy_webhook() {
    let upstream = FakeUpstream::start("burst", failing()).await.unwrap();
    let receiver = start_receiver(0, false).await;
    let net = six_breakers_network(&upstream, &receiver);
    // Open all six well before the first look (1.5 s after the start), so
    // that one look makes six events: three times `max_in_flight`.
    for i in 1..=6 {
        drive_client_breaker_to(&net, &format!("c{i}"), BreakerStateKind::Open).await;
    }
    let events = wait_for("six firing events", || {
        let events = breaker_events(&net);
        (events.len() == 6).then_some(events)
    })
    .await;
    assert!(
        events.iter().all(|e| e.at == events[0].at),
        "not one look: {:?}",
        events.iter().map(|e| e.at).collect::<Vec<_>>()
    );
    wait_for("six POSTs sent", || {
        (net.alert_counters().webhook_sent == 6).then_some(())
    })
    .await;
    let c = net.alert_counters();
    assert_eq!((c.webhook_failed, c.webhook_dropped), (0, 0));
    let mut got: Vec<(u64, String)> = receiver
        .seen
        .lock()
        .unwrap()
        .accepted
        .iter()
        .map(|(_, _, body)| {
            (
                body["id"].as_u64().unwrap(),
                body["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(u64, String)> = events.iter().map(|e| (e.id, e.subject.clone())).collect();
    assert_eq!(got, want);
    receiver.handle.stop(false).await;
}

#[actix_web::test]
async fn a_failing_webhook_is_counted_and_delays_nothing() {
    let receiver = start_receiver(0, true).await;
    let webhook = format!(
        r#"{{"url":"http://{}/hook","timeout_ms":1000,"retry_attempts":2}}"#,
        receiver.addr
    );
    let server = support::start(connections_config(&webhook)).await;
    let net = server.net.clone();

    let client = WsClient::connect(&server, "").await;
    wait_for("the firing event", || {
        (connection_states(&net) == [AlertState::Firing]).then_some(())
    })
    .await;
    drop(client);
    wait_for("the resolved event", || {
        (connection_states(&net).len() == 2).then_some(())
    })
    .await;
    // Each POST was tried three times (the first and two retries), then
    // counted as failed.
    wait_for("both POSTs to fail", || {
        (net.alert_counters().webhook_failed == 2).then_some(())
    })
    .await;
    assert_eq!(receiver.seen.lock().unwrap().attempts, 6);
    assert_eq!(net.alert_counters().webhook_sent, 0);
    server.stop().await;
    receiver.handle.stop(false).await;
}

#[test]
fn the_seed_loads_unchanged_with_alerts_on_and_the_webhook_off() {
    let seed = Config::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seed-network.json"
    ))
    .unwrap();
    let alerts = &seed.network.alerts;
    assert!(alerts.enabled);
    assert_eq!(
        (
            alerts.interval.as_millis(),
            alerts.hold.as_millis(),
            alerts.history
        ),
        (1000, 60_000, 50)
    );
    assert!(alerts.webhook.url.is_none());
    assert!(alerts.webhook_upstream(&seed.network).is_none());
    let r = &alerts.rules;
    assert!(r.breaker_open.enabled && r.upstream_error_rate.enabled);
    assert_eq!(r.upstream_error_rate.threshold, 0.5);
    assert_eq!(r.upstream_error_rate.window.as_millis(), 60_000);
    assert_eq!(r.upstream_error_rate.min_calls, 20);
    assert_eq!(r.slow_consumer_evictions.per_minute, 10);
    assert_eq!(r.connections_near_max.ratio, 0.9);
}

#[test]
fn the_webhook_is_an_upstream_with_its_own_timeouts() {
    let config = Config::from_json_str(
        r#"{"network":{"alerts":{"webhook":{"url":"https://hooks.example.com/a/b?k=v",
            "timeout_ms":1500,"retry_attempts":2,"max_in_flight":3,
            "headers":{"x-team":"net"}}}}}"#,
    )
    .unwrap();
    let w = config
        .network
        .alerts
        .webhook_upstream(&config.network)
        .unwrap();
    assert_eq!(w.endpoints, ["https://hooks.example.com"]);
    assert_eq!(w.timeout, Duration::from_millis(1500));
    assert_eq!(w.deadline, Duration::from_millis(4500));
    assert_eq!((w.retry_attempts, w.max_in_flight), (2, 3));
    assert_eq!(w.headers, [("x-team".to_owned(), "net".to_owned())]);
}

#[test]
fn bad_alert_settings_name_their_path() {
    let cases = [
        (
            r#"{"rules":{"upstream_error_rate":{"threshold":1.5}}}"#,
            "network.alerts.rules.upstream_error_rate.threshold",
        ),
        (
            r#"{"rules":{"upstream_error_rate":{"min_calls":0}}}"#,
            "network.alerts.rules.upstream_error_rate.min_calls",
        ),
        (
            r#"{"rules":{"upstream_error_rate":{"window_ms":0}}}"#,
            "network.alerts.rules.upstream_error_rate.window_ms",
        ),
        (
            r#"{"rules":{"connections_near_max":{"ratio":0}}}"#,
            "network.alerts.rules.connections_near_max.ratio",
        ),
        (
            r#"{"rules":{"slow_consumer_evictions":{"per_minute":0}}}"#,
            "network.alerts.rules.slow_consumer_evictions.per_minute",
        ),
        (r#"{"interval_ms":0}"#, "network.alerts.interval_ms"),
        // Longer than the evictions window (a minute)…
        (r#"{"interval_ms":60001}"#, "network.alerts.interval_ms"),
        // …or than the error-rate window: the window would stretch.
        (
            r#"{"interval_ms":5000,"rules":{"upstream_error_rate":{"window_ms":4000}}}"#,
            "network.alerts.interval_ms",
        ),
        (r#"{"hold_ms":86400001}"#, "network.alerts.hold_ms"),
        (r#"{"history":0}"#, "network.alerts.history"),
        (
            r#"{"webhook":{"url":"ftp://x/y"}}"#,
            "network.alerts.webhook.url",
        ),
        (
            r#"{"webhook":{"url":"not a url"}}"#,
            "network.alerts.webhook.url",
        ),
        (
            r#"{"webhook":{"max_in_flight":0}}"#,
            "network.alerts.webhook.max_in_flight",
        ),
        (
            r#"{"webhook":{"headers":{"bad header":"x"}}}"#,
            "network.alerts.webhook.headers.bad header",
        ),
        (
            r#"{"webhook":{"auth":{"type":"bearer","key_env":""}}}"#,
            "network.alerts.webhook.auth.key_env",
        ),
        (
            r#"{"rules":{"breaker_open":{"enabeld":true}}}"#,
            "network.alerts.rules.breaker_open",
        ),
    ];
    for (alerts, path) in cases {
        let json = format!(r#"{{"network":{{"alerts":{alerts}}}}}"#);
        let err = Config::from_json_str(&json).unwrap_err();
        assert!(
            err.path().unwrap().starts_with(path),
            "{alerts}: {err} (path {:?})",
            err.path()
        );
    }
}

/// A node of a cluster without `node_id` is named once: its alert events
/// carry the name `/status` shows as `cluster.node` (the bridge's random
/// one), not the host name. No Redis is needed: nothing listens at the
/// configured URL, and the bridge answers for its link all the same.
#[actix_web::test]
async fn alerts_and_status_name_a_cluster_node_alike() {
    let nowhere = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = nowhere.local_addr().unwrap().port();
    drop(nowhere);
    let server = support::start(support::config(&format!(
        r#"{{"network":{{"websocket":{{"max_connections":2}},
            "cluster":{{"redis_url":"redis://127.0.0.1:{port}/","reconnect_max_ms":100}},
            "alerts":{{"interval_ms":20,"hold_ms":0,
                "rules":{{"connections_near_max":{{"ratio":0.5}}}}}}}}}}"#
    )))
    .await;
    let net = server.net.clone();
    let _client = WsClient::connect(&server, "").await;
    let event = wait_for("the firing event", || {
        net.recent_alerts()
            .into_iter()
            .find(|e| e.rule == AlertRule::ConnectionsNearMax)
    })
    .await;
    let mut res = awc::Client::new()
        .get(format!("http://{}/status", server.addr))
        .send()
        .await
        .unwrap();
    let status: Value = res.json().await.unwrap();
    let node = status["cluster"]["node"].as_str().unwrap();
    assert_eq!(event.node, node);
    assert_eq!(node.len(), 16, "the bridge's random name: {node}");
}
