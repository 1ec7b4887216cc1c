//! `GET /metrics` and `GET /ready` end to end: a scripted scenario on a real
//! server (WebSocket clients, a broadcast, a heartbeat eviction, an API
//! client against the fake upstream with successes, failures and a
//! rate-limited call), then the exposition is parsed by a real Prometheus
//! text parser (`prometheus-parse`) and checked family by family.

#![allow(clippy::unwrap_used)]

#[path = "../examples/support/fake_upstream.rs"]
mod fake_upstream;
mod support;

use fake_upstream::{FakeUpstream, Faults};
use happynet::{Broadcast, HttpError};
use prometheus_parse::{Scrape, Value};
use serde_json::Value as Json;
use std::time::Duration;
use support::{config, http_client, start, wait_for_hub, TestServer, WsClient, WAIT};

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
    let server = start(config(&format!(
        r#"{{"network":{{
            "websocket":{{"heartbeat_interval":0.1,"client_timeout":0.4}},
            "api_clients":{{"up":{{"base_url":"{base}","rate_limit":60,"rate_burst":4,
                "retry_attempts":0,"breaker":{{"window":100,"minimum_calls":100}}}}}}
        }}}}"#
    )))
    .await;
    let (status, body) = ready(&server).await;
    assert_eq!(
        (status, &body),
        (200, &serde_json::json!({ "ready": true }))
    );

    // Three clients, one broadcast to all of them.
    let mut alive_a = WsClient::connect(&server, "").await;
    let mut alive_b = WsClient::connect(&server, "").await;
    let mut silent = WsClient::connect(&server, "").await;
    silent.answer_pings = false;
    let recipients = server
        .net
        .hub()
        .send(Broadcast::text("hello"))
        .await
        .unwrap();
    assert_eq!(recipients, 3);
    for client in [&mut alive_a, &mut alive_b, &mut silent] {
        assert_eq!(client.next_text().await, "hello");
    }

    // The silent one is evicted by the heartbeat while the others answer.
    let keep_answering = |mut c: WsClient| {
        actix_web::rt::spawn(async move {
            let got = c.recv_within(Duration::from_secs(1)).await;
            (c, got)
        })
    };
    let task_a = keep_answering(alive_a);
    let task_b = keep_answering(alive_b);
    let reason = silent.expect_close().await;
    assert_eq!(reason.description.as_deref(), Some("heartbeat timeout"));
    let (_alive_a, got_a) = task_a.await.unwrap();
    let (_alive_b, got_b) = task_b.await.unwrap();
    assert!(got_a.is_none() && got_b.is_none(), "{got_a:?} {got_b:?}");
    let health = wait_for_hub(&server, "the eviction", |hub| {
        hub["evicted_heartbeat"] == 1 && hub["sessions"] == 2
    })
    .await;

    // The API client: two successes, two failures (not retried), then a
    // call the rate limit refuses (burst 4).
    let api = server.net.api("up").unwrap();
    for _ in 0..2 {
        assert_eq!(api.get("/ok").send().await.unwrap().status, 200);
    }
    for _ in 0..2 {
        let failed = api
            .get("/fail")
            .header("x-fault-status", "500")
            .send()
            .await;
        assert!(
            matches!(failed, Err(HttpError::Status { .. })),
            "{failed:?}"
        );
    }
    let limited = api.get("/x").wait_for_rate_limit(false).send().await;
    assert!(
        matches!(limited, Err(HttpError::RateLimited { .. })),
        "{limited:?}"
    );
    assert_eq!(fake.requests(), 4);

    let m = scrape_until(&server, "the evicted session's slot", |m| {
        gauge(m, "happynet_ws_connections", &[]) == 2.0
    })
    .await;

    // The hub.
    assert_eq!(gauge(&m, "happynet_ws_sessions", &[]), 2.0);
    assert_eq!(gauge(&m, "happynet_ws_rooms", &[]), 1.0);
    assert_eq!(counter(&m, "happynet_ws_sessions_opened_total", &[]), 3.0);
    let closed = |reason| {
        counter(
            &m,
            "happynet_ws_sessions_closed_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(closed("heartbeat"), 1.0);
    assert_eq!(closed("slow_consumer"), 0.0);
    assert_eq!(closed("shutdown"), 0.0);
    assert_eq!(closed("client"), 0.0);
    assert_eq!(counter(&m, "happynet_ws_broadcasts_total", &[]), 1.0);
    let deliveries = counter(&m, "happynet_ws_deliveries_total", &[]);
    assert!(deliveries >= 3.0, "deliveries {deliveries}");
    assert_eq!(Some(deliveries), health["hub"]["deliveries"].as_f64());
    assert_eq!(gauge(&m, "happynet_shutting_down", &[]), 0.0);

    // The upstream: pool, breaker, limiter.
    let up = [("upstream", "up")];
    let endpoint = base.trim_end_matches('/');
    assert_eq!(
        counter(
            &m,
            "happynet_upstream_sent_total",
            &[("upstream", "up"), ("endpoint", endpoint)]
        ),
        4.0
    );
    assert_eq!(gauge(&m, "happynet_upstream_in_flight", &up), 0.0);
    assert_eq!(
        counter(&m, "happynet_upstream_rejected_overloaded_total", &up),
        0.0
    );
    assert_eq!(counter(&m, "happynet_breaker_calls_total", &up), 4.0);
    assert_eq!(counter(&m, "happynet_breaker_failures_total", &up), 2.0);
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
    assert_eq!(counter(&m, "happynet_limiter_granted_total", &up), 4.0);
    assert!(counter(&m, "happynet_limiter_denied_total", &up) >= 1.0);

    // The guards refused nothing.
    assert_eq!(
        counter(
            &m,
            "happynet_security_refusals_total",
            &[("reason", "rate_limited")]
        ),
        0.0
    );

    // Readiness follows a graceful shutdown.
    server.net.shutdown().await;
    let (status, body) = ready(&server).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert_eq!(body["reason"], "shutting down");
    let m = scrape(&server).await;
    assert_eq!(gauge(&m, "happynet_shutting_down", &[]), 1.0);
    server.stop().await;
}
