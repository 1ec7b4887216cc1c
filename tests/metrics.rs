//! `GET /metrics` and `GET /ready` end to end: a scripted scenario on a real
//! server (WebSocket clients, a broadcast, a heartbeat eviction, a normal
//! close and an oversized message; two API clients against the fake
//! upstream with successes, an error status, retried failures, a retry the
//! budget refuses, a rate-limited call and a fallback), then the exposition
//! is parsed by a real Prometheus text parser (`prometheus-parse`) and
//! checked family by family, with the values the scenario implies.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;
mod support;

use actix_web::http::StatusCode;
use awc::ws::{CloseCode, Message};
use fake_upstream::{FakeUpstream, Faults};
use happynet::upstream::Response;
use happynet::{Broadcast, HttpError};
use prometheus_parse::{HistogramCount, Scrape, Value};
use serde_json::Value as Json;
use std::time::Duration;
use support::{config, http_client, start, wait_for_hub, Received, TestServer, WsClient, WAIT};

/// `GET /metrics`, checked for its content type and parsed.
async fn scrape(server: &TestServer) -> Scrape {
    let mut resp = http_client()
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let body = resp.body().await.expect("metrics body");
    let text = String::from_utf8(body.to_vec()).expect("UTF-8 metrics");
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition")
}

/// The one sample of `metric` whose labels include all of `labels`; panics
/// naming what is there when there is not exactly one.
fn sample<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Value {
    let found: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    match found.as_slice() {
        [one] => &one.value,
        _ => {
            let names: Vec<String> = scrape
                .samples
                .iter()
                .map(|s| format!("{}{:?}", s.metric, s.labels))
                .collect();
            panic!(
                "{metric} {labels:?}: {} samples; have {names:#?}",
                found.len()
            )
        }
    }
}

fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels) {
        Value::Counter(v) => *v,
        other => panic!("{metric} {labels:?} is not a counter: {other:?}"),
    }
}

fn gauge(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match sample(scrape, metric, labels) {
        Value::Gauge(v) => *v,
        other => panic!("{metric} {labels:?} is not a gauge: {other:?}"),
    }
}

/// A histogram's cumulative buckets (`+Inf` included), its `_sum` and its
/// `_count`.
fn histogram(
    scrape: &Scrape,
    metric: &str,
    labels: &[(&str, &str)],
) -> (Vec<HistogramCount>, f64, f64) {
    let buckets = match sample(scrape, metric, labels) {
        Value::Histogram(b) => b.clone(),
        other => panic!("{metric} {labels:?} is not a histogram: {other:?}"),
    };
    // The parser does not know `_sum` and `_count` belong to the histogram.
    let untyped = |name: String| match sample(scrape, &name, labels) {
        Value::Untyped(v) => *v,
        other => panic!("{name} {labels:?}: {other:?}"),
    };
    let sum = untyped(format!("{metric}_sum"));
    let count = untyped(format!("{metric}_count"));
    (buckets, sum, count)
}

/// The cumulative count of `buckets` at the bound `le`.
fn at_or_below(buckets: &[HistogramCount], le: f64) -> f64 {
    buckets
        .iter()
        .find(|b| b.less_than == le)
        .map(|b| b.count)
        .unwrap_or_else(|| panic!("no le={le} bucket in {buckets:?}"))
}

/// Checks the shape every histogram must have: 16 bounds and `+Inf`,
/// cumulative counts that never fall, `+Inf` equal to `_count`.
fn assert_well_formed(buckets: &[HistogramCount], count: f64) {
    assert_eq!(buckets.len(), 17, "{buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].less_than < w[1].less_than && w[0].count <= w[1].count),
        "{buckets:?}"
    );
    assert_eq!(at_or_below(buckets, f64::INFINITY), count);
}

/// Scrapes until `pred` holds, or panics after [`WAIT`]: for gauges that
/// settle a moment after the event (a session's connection slot is released
/// when its actor stops, just after the hub counted the eviction).
async fn scrape_until(server: &TestServer, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let scrape = scrape(server).await;
        if pred(&scrape) {
            return scrape;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(server: &TestServer) -> (u16, Json) {
    let mut resp = http_client()
        .get(server.url("/ready"))
        .send()
        .await
        .expect("GET /ready");
    let body = resp.json::<Json>().await.expect("ready JSON");
    (resp.status().as_u16(), body)
}

#[actix_web::test]
async fn a_scripted_scenario_shows_up_in_the_metrics_and_ready_follows_shutdown() {
    let fake = FakeUpstream::start("a", Faults::default()).await.unwrap();
    let base = fake.url("");
    // `up` retries twice, fast, and its limiter admits exactly 8 attempts
    // (one more token a minute: none arrives during the test). `stingy`
    // may retry but its budget allows no retry at all.
    let server = start(config(&format!(
        r#"{{"network":{{
            "websocket":{{"heartbeat_interval":0.1,"client_timeout":0.4,"max_message_bytes":1024}},
            "api_clients":{{
                "up":{{"base_url":"{base}","rate_limit":1,"rate_burst":8,
                    "retry_attempts":2,"retry":{{"base_delay":0.001,"max_delay":0.002}},
                    "breaker":{{"window":100,"minimum_calls":100}}}},
                "stingy":{{"base_url":"{base}","retry_attempts":1,
                    "retry":{{"base_delay":0.001,"max_delay":0.002,
                        "budget_ratio":0,"budget_min_per_second":0}}}}
            }}
        }}}}"#
    )))
    .await;
    let (status, body) = ready(&server).await;
    assert_eq!(
        (status, &body),
        (200, &serde_json::json!({ "ready": true }))
    );

    // Four clients, one broadcast to all of them.
    let mut stays = WsClient::connect(&server, "").await;
    let mut leaver = WsClient::connect(&server, "").await;
    let mut oversize = WsClient::connect(&server, "").await;
    let mut silent = WsClient::connect(&server, "").await;
    silent.answer_pings = false;
    let recipients = server
        .net
        .hub()
        .send(Broadcast::text("hello"))
        .await
        .unwrap();
    assert_eq!(recipients, 4);
    for client in [&mut stays, &mut leaver, &mut oversize, &mut silent] {
        assert_eq!(client.next_text().await, "hello");
    }

    // The silent one is evicted by the heartbeat while the others answer
    // pings; `stays` keeps answering until the shutdown closes it.
    let keep_answering = |mut c: WsClient, limit: Duration| {
        actix_web::rt::spawn(async move {
            let got = c.recv_within(limit).await;
            (c, got)
        })
    };
    let stays = keep_answering(stays, WAIT);
    let leaver = keep_answering(leaver, Duration::from_secs(1));
    let oversize = keep_answering(oversize, Duration::from_secs(1));
    let reason = silent.expect_close().await;
    assert_eq!(reason.description.as_deref(), Some("heartbeat timeout"));
    let (mut leaver, got_l) = leaver.await.unwrap();
    let (mut oversize, got_o) = oversize.await.unwrap();
    assert!(got_l.is_none() && got_o.is_none(), "{got_l:?} {got_o:?}");

    // One client leaves normally, one sends a message over the limit.
    leaver
        .send(Message::Close(Some(CloseCode::Normal.into())))
        .await;
    oversize.send_text(&"x".repeat(2048)).await;
    assert_eq!(oversize.expect_close().await.code, CloseCode::Size);
    let health = wait_for_hub(&server, "the eviction and the two closes", |hub| {
        hub["evicted_heartbeat"] == 1
            && hub["closed"]["normal"] == 1
            && hub["closed"]["too_big"] == 1
            && hub["sessions"] == 1
    })
    .await;

    // `up`: two successes; an error status that is not retried (500); one
    // retried twice and still failing (503 × 3); one that fails once and
    // then succeeds; then a call the rate limit refuses (8 attempts made,
    // burst 8) and one whose fallback answers for the refused call.
    let api = server.net.api("up").unwrap();
    for _ in 0..2 {
        assert_eq!(api.get("/ok").send().await.unwrap().status, 200);
    }
    let failed = api
        .get("/fail")
        .header("x-fault-status", "500")
        .send()
        .await;
    assert!(
        matches!(failed, Err(HttpError::Status { .. })),
        "{failed:?}"
    );
    let failed = api
        .get("/busy")
        .header("x-fault-status", "503")
        .send()
        .await;
    match failed {
        Err(HttpError::Status { response, .. }) => assert_eq!(response.attempts, 3),
        other => panic!("{other:?}"),
    }
    fake.set_faults(Faults {
        fail_next: 1,
        ..Faults::default()
    });
    let recovered = api.get("/recover").send().await.unwrap();
    assert_eq!((recovered.status.as_u16(), recovered.attempts), (200, 2));
    let limited = api.get("/x").wait_for_rate_limit(false).send().await;
    assert!(
        matches!(limited, Err(HttpError::RateLimited { .. })),
        "{limited:?}"
    );
    let fell_back = api
        .get("/x")
        .wait_for_rate_limit(false)
        .fallback(Response::new(StatusCode::OK, "later"))
        .send()
        .await
        .unwrap();
    assert!(fell_back.from_fallback);

    // `stingy`: a 503 it would retry, but its budget says no.
    let stingy = server.net.api("stingy").unwrap();
    let failed = stingy
        .get("/busy")
        .header("x-fault-status", "503")
        .send()
        .await;
    match failed {
        Err(HttpError::Status { response, .. }) => assert_eq!(response.attempts, 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.requests(), 9);

    let m = scrape_until(&server, "the closed sessions' slots", |m| {
        gauge(m, "happynet_ws_connections", &[]) == 1.0
    })
    .await;

    // The hub.
    assert_eq!(gauge(&m, "happynet_ws_sessions", &[]), 1.0);
    assert_eq!(gauge(&m, "happynet_ws_rooms", &[]), 1.0);
    assert_eq!(counter(&m, "happynet_ws_sessions_opened_total", &[]), 4.0);
    let closed = |reason| {
        counter(
            &m,
            "happynet_ws_sessions_closed_total",
            &[("reason", reason)],
        )
    };
    for (reason, n) in [
        ("normal", 1.0),
        ("too_big", 1.0),
        ("heartbeat", 1.0),
        ("rate", 0.0),
        ("invalid", 0.0),
        ("protocol", 0.0),
        ("error", 0.0),
        ("slow_consumer", 0.0),
        ("shutdown", 0.0),
    ] {
        assert_eq!(closed(reason), n, "{reason}");
    }
    assert_eq!(counter(&m, "happynet_ws_broadcasts_total", &[]), 1.0);
    let deliveries = counter(&m, "happynet_ws_deliveries_total", &[]);
    assert!(deliveries >= 4.0, "deliveries {deliveries}");
    assert_eq!(Some(deliveries), health["hub"]["deliveries"].as_f64());
    assert_eq!(gauge(&m, "happynet_hub_queued_broadcasts", &[]), 0.0);
    let (buckets, sum, count) = histogram(&m, "happynet_ws_broadcast_duration_seconds", &[]);
    assert_eq!(count, 1.0, "one broadcast");
    assert_well_formed(&buckets, count);
    assert!(sum > 0.0 && sum < 10.0, "{sum}");
    assert_eq!(at_or_below(&buckets, 10.0), 1.0);
    assert_eq!(gauge(&m, "happynet_shutting_down", &[]), 0.0);

    // `up`: pool, breaker, limiter.
    let up = [("upstream", "up")];
    let endpoint = base.trim_end_matches('/');
    assert_eq!(
        counter(
            &m,
            "happynet_upstream_sent_total",
            &[("upstream", "up"), ("endpoint", endpoint)]
        ),
        8.0
    );
    assert_eq!(gauge(&m, "happynet_upstream_in_flight", &up), 0.0);
    assert_eq!(
        counter(&m, "happynet_upstream_rejected_overloaded_total", &up),
        0.0
    );
    assert_eq!(counter(&m, "happynet_breaker_calls_total", &up), 8.0);
    // 500, 503 × 3, and the first 503 of the recovered call.
    assert_eq!(counter(&m, "happynet_breaker_failures_total", &up), 5.0);
    assert_eq!(counter(&m, "happynet_breaker_rejections_total", &up), 0.0);
    let state = |s| {
        gauge(
            &m,
            "happynet_breaker_state",
            &[("upstream", "up"), ("state", s)],
        )
    };
    assert_eq!(
        (state("closed"), state("open"), state("half_open")),
        (1.0, 0.0, 0.0)
    );
    assert_eq!(counter(&m, "happynet_limiter_granted_total", &up), 8.0);
    assert_eq!(counter(&m, "happynet_limiter_denied_total", &up), 2.0);

    // `up`: its calls, by outcome and status class, retries, latency.
    let requests = |upstream, outcome| {
        counter(
            &m,
            "happynet_upstream_requests_total",
            &[("upstream", upstream), ("outcome", outcome)],
        )
    };
    for (outcome, n) in [
        ("ok", 3.0),
        ("status", 2.0),
        ("rate_limited", 1.0),
        ("fallback", 1.0),
        ("cache_hit", 0.0),
        ("cancelled", 0.0),
        ("timeout", 0.0),
        ("connect", 0.0),
        ("breaker_open", 0.0),
        ("overloaded", 0.0),
    ] {
        assert_eq!(requests("up", outcome), n, "up {outcome}");
    }
    let responses = |upstream, class| {
        counter(
            &m,
            "happynet_upstream_responses_total",
            &[("upstream", upstream), ("class", class)],
        )
    };
    for (class, n) in [
        ("1xx", 0.0),
        ("2xx", 3.0),
        ("3xx", 0.0),
        ("4xx", 0.0),
        ("5xx", 5.0),
    ] {
        assert_eq!(responses("up", class), n, "up {class}");
    }
    assert_eq!(counter(&m, "happynet_upstream_retries_total", &up), 3.0);
    assert_eq!(
        counter(&m, "happynet_upstream_retry_budget_exhausted_total", &up),
        0.0
    );
    let (buckets, sum, count) = histogram(&m, "happynet_upstream_request_duration_seconds", &up);
    assert_eq!(count, 7.0, "every call but none from the cache");
    assert_well_formed(&buckets, count);
    assert_eq!(at_or_below(&buckets, 10.0), 7.0, "all well under 10 s");
    assert!(sum > 0.0 && sum < 70.0, "{sum}");

    // `stingy`: one call, one 503, a retry wanted and refused.
    let stingy = [("upstream", "stingy")];
    assert_eq!(requests("stingy", "status"), 1.0);
    assert_eq!(requests("stingy", "ok"), 0.0);
    assert_eq!(responses("stingy", "5xx"), 1.0);
    assert_eq!(counter(&m, "happynet_upstream_retries_total", &stingy), 0.0);
    assert_eq!(
        counter(
            &m,
            "happynet_upstream_retry_budget_exhausted_total",
            &stingy
        ),
        1.0
    );
    let (_, _, count) = histogram(&m, "happynet_upstream_request_duration_seconds", &stingy);
    assert_eq!(count, 1.0);

    // The guards refused nothing.
    assert_eq!(
        counter(
            &m,
            "happynet_security_refusals_total",
            &[("reason", "rate_limited")]
        ),
        0.0
    );

    // Readiness follows a graceful shutdown, which closes the last session
    // (and stops the hub, so its families are gone from later scrapes).
    server.net.shutdown().await;
    let (status, body) = ready(&server).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_eq!(body["reason"], "shutting down");
    let (_stays, got) = stays.await.unwrap();
    assert!(matches!(got, Some(Received::Closed(_))), "{got:?}");
    let m = scrape(&server).await;
    assert_eq!(gauge(&m, "happynet_shutting_down", &[]), 1.0);
    server.stop().await;
}

/// Concurrent requests in the flood tests: far more than one snapshot's
/// worth.
const FLOOD: usize = 50;

#[actix_web::test]
async fn a_flood_of_scrapes_costs_the_hub_one_snapshot_per_interval() {
    const INTERVAL_SECS: u64 = 1;
    let server = start(config(&format!(
        r#"{{"network":{{"security":{{"snapshot_interval":{INTERVAL_SECS}}}}}}}"#
    )))
    .await;
    let first = scrape(&server).await;
    assert_eq!(counter(&first, "happynet_ws_broadcasts_total", &[]), 0.0);
    assert_eq!(server.net.snapshots_taken().metrics, 1);

    // A broadcast after that snapshot: every answer below must show it, as
    // no answer may be older than its request.
    server
        .net
        .hub()
        .send(Broadcast::text("counted"))
        .await
        .expect("hub");
    let started = std::time::Instant::now();
    let scrapes = futures::future::join_all((0..FLOOD).map(|_| scrape(&server))).await;
    let elapsed = started.elapsed();
    for s in &scrapes {
        assert_eq!(counter(s, "happynet_ws_broadcasts_total", &[]), 1.0);
    }
    // The flood shared one fresh snapshot. The snapshots it caused begin
    // at least an interval apart within its `elapsed`, so even a machine
    // slow enough to spread it over several intervals took at most one
    // more per interval.
    let taken = server.net.snapshots_taken().metrics;
    let bound = 2 + elapsed.as_secs() / INTERVAL_SECS;
    assert!(
        (2..=bound).contains(&taken),
        "{FLOOD} scrapes over {elapsed:?} took {taken} snapshots (at most {bound})"
    );
    // /status has a gate of its own, untouched by scrapes.
    assert_eq!(server.net.snapshots_taken().status, 0);
}
