//! The upstream stack end to end: `HttpClient`/`ApiClient` through
//! limiter → breaker → pool against the fake upstream (a real HTTP server with
//! fault injection) on `127.0.0.1:0`. Every test counts what actually reached
//! the upstream, so "retried", "not retried" and "rejected fast" are facts,
//! not timings alone.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;
mod support;

use actix_web::http::StatusCode;
use fake_upstream::{FakeUpstream, Faults};
use futures::future::join_all;
use happynet::{Config, HttpError, Network, Response};
use std::time::{Duration, Instant};

fn network(json: String) -> Network {
    Network::start(Config::from_json_str(&json).unwrap()).unwrap()
}

/// A network with one API client `up` over `endpoints`, plus `extra` keys.
fn with_client(endpoints: &[&FakeUpstream], extra: &str) -> Network {
    let base = endpoints[0].url("");
    let more: Vec<String> = endpoints[1..]
        .iter()
        .map(|e| format!("\"{}\"", e.url("")))
        .collect();
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(",{extra}")
    };
    network(format!(
        r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{base}","endpoints":[{}],
            "rate_limit":60000{extra}}}}}}}}}"#,
        more.join(",")
    ))
}

fn faults(f: impl FnOnce(&mut Faults)) -> Faults {
    let mut faults = Faults::default();
    f(&mut faults);
    faults
}

#[actix_web::test]
async fn the_python_usage_works_with_any_url() {
    let fake = FakeUpstream::start("plain", Faults::default())
        .await
        .unwrap();
    let net = network("{}".into());
    let client = net.http();
    let resp = client.get(&fake.url("/data?x=1")).send().await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["path"], "/data?x=1");
    assert_eq!(resp.attempts, 1);
    assert!(matches!(
        client.get("ftp://nope/x").send().await,
        Err(HttpError::InvalidRequest { .. })
    ));
}

#[actix_web::test]
async fn retries_succeed_after_transient_503s() {
    let fake = FakeUpstream::start("a", faults(|f| f.fail_next = 2))
        .await
        .unwrap();
    let net = with_client(&[&fake], r#""retry":{"base_delay":0.01,"max_delay":0.05}"#);
    let resp = net.api("up").unwrap().get("/thing").send().await.unwrap();
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.attempts, 3);
    assert_eq!(fake.requests(), 3);
}

#[actix_web::test]
async fn a_non_idempotent_call_is_not_retried_unless_the_caller_opts_in() {
    let fake = FakeUpstream::start("a", faults(|f| f.fail_next = 1))
        .await
        .unwrap();
    let net = with_client(&[&fake], r#""retry":{"base_delay":0.01,"max_delay":0.05}"#);
    let api = net.api("up").unwrap();
    match api.post("/orders").body("{}").send().await {
        Err(HttpError::Status { status, .. }) => assert_eq!(status, 503),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.requests(), 1);
    fake.set_faults(faults(|f| f.fail_next = 1));
    let resp = api
        .post("/orders")
        .retry_non_idempotent()
        .send()
        .await
        .unwrap();
    assert_eq!(resp.attempts, 2);
    assert_eq!(fake.requests(), 3);
}

#[actix_web::test]
async fn retry_after_is_waited_for_and_not_less() {
    let fake = FakeUpstream::start(
        "a",
        faults(|f| {
            f.fail_next = 1;
            f.retry_after = Some("2".into());
        }),
    )
    .await
    .unwrap();
    let net = with_client(&[&fake], r#""retry":{"base_delay":0.01,"max_delay":0.05}"#);
    let started = Instant::now();
    let resp = net.api("up").unwrap().get("/x").send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.attempts, 2);
    assert!(took >= Duration::from_secs(2), "retried after {took:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[actix_web::test]
async fn a_retry_after_beyond_the_deadline_fails_at_once_with_the_wait() {
    let fake = FakeUpstream::start(
        "a",
        faults(|f| {
            f.error_status = 429;
            f.error_rate = 1.0;
            f.retry_after = Some("30".into());
        }),
    )
    .await
    .unwrap();
    let net = with_client(&[&fake], r#""deadline":2"#);
    let started = Instant::now();
    let err = net.api("up").unwrap().get("/x").send().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    assert_eq!(fake.requests(), 1);
}

#[actix_web::test]
async fn a_failing_endpoint_is_ejected_and_traffic_moves_to_the_healthy_one() {
    let bad = FakeUpstream::start("bad", faults(|f| f.error_rate = 1.0))
        .await
        .unwrap();
    let good = FakeUpstream::start("good", Faults::default())
        .await
        .unwrap();
    let net = with_client(
        &[&bad, &good],
        r#""load_balancing":"round_robin","retry_attempts":3,
           "retry":{"base_delay":0.001,"max_delay":0.005},
           "ejection":{"consecutive_failures":3,"base_ejection":60,"max_ejection":60},
           "breaker":{"window":100,"minimum_calls":100}"#,
    );
    let api = net.api("up").unwrap();
    for _ in 0..40 {
        let resp = api.get("/x").send().await.unwrap();
        assert_eq!(resp.headers.get("x-upstream").unwrap(), "good");
    }
    // Three failures ejected it; nothing went there after that.
    assert_eq!(bad.requests(), 3);
    assert_eq!(good.requests(), 40);
}

#[actix_web::test]
async fn the_breaker_opens_rejects_fast_and_closes_after_a_successful_probe() {
    let fake = FakeUpstream::start("a", faults(|f| f.error_rate = 1.0))
        .await
        .unwrap();
    let net = with_client(
        &[&fake],
        r#""retry_attempts":0,
           "breaker":{"window":4,"minimum_calls":4,"failure_rate":0.5,
                      "open_duration":0.3,"half_open_probes":1}"#,
    );
    let api = net.api("up").unwrap();
    for _ in 0..4 {
        assert!(matches!(
            api.get("/x").send().await,
            Err(HttpError::Status { .. })
        ));
    }
    let started = Instant::now();
    let retry_after = match api.get("/x").send().await {
        Err(HttpError::BreakerOpen { retry_after, .. }) => retry_after,
        other => panic!("{other:?}"),
    };
    assert!(started.elapsed() < Duration::from_millis(50), "not fast");
    assert_eq!(fake.requests(), 4, "an open breaker sent a request");
    assert!(retry_after <= Duration::from_millis(300));

    // The upstream recovers; once the open time is over one probe passes
    // and closes the breaker.
    fake.set_faults(Faults::default());
    actix_web::rt::time::sleep(retry_after + Duration::from_millis(20)).await;
    assert_eq!(api.get("/x").send().await.unwrap().status, 200);
    let state = api
        .upstream()
        .breaker()
        .send(happynet::actors::GetBreakerStats)
        .await
        .unwrap();
    assert_eq!(state.state, happynet::actors::BreakerStateKind::Closed);
    for _ in 0..5 {
        assert_eq!(api.get("/x").send().await.unwrap().status, 200);
    }
}

#[actix_web::test]
async fn the_deadline_bounds_the_total_time_across_retries() {
    let fake = FakeUpstream::start(
        "a",
        faults(|f| {
            f.error_rate = 1.0;
            f.latency_ms = 200;
        }),
    )
    .await
    .unwrap();
    let net = with_client(
        &[&fake],
        r#""retry_attempts":20,"timeout":1,"deadline":1,
           "retry":{"base_delay":0.01,"max_delay":0.02,"budget_min_per_second":100},
           "breaker":{"window":100,"minimum_calls":100}"#,
    );
    let started = Instant::now();
    let err = net.api("up").unwrap().get("/x").send().await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2000), "took {took:?}");
    assert!(
        took >= Duration::from_millis(800),
        "gave up early: {took:?} ({err})"
    );
    assert!(fake.requests() >= 3, "only {} attempts", fake.requests());
}

#[actix_web::test]
async fn a_hung_upstream_never_hangs_the_caller_past_its_deadline() {
    let fake = FakeUpstream::start("a", faults(|f| f.hang_rate = 1.0))
        .await
        .unwrap();
    let net = with_client(&[&fake], r#""timeout":5,"deadline":0.5"#);
    let started = Instant::now();
    let err = net.api("up").unwrap().get("/x").send().await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, HttpError::Timeout { .. }), "{err}");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    assert!(took >= Duration::from_millis(450), "took {took:?}");
    assert!(err.to_string().contains("upstream up"), "{err}");
}

#[actix_web::test]
async fn the_bulkhead_rejects_beyond_its_queue_at_once() {
    let fake = FakeUpstream::start("a", faults(|f| f.latency_ms = 300))
        .await
        .unwrap();
    let net = with_client(&[&fake], r#""bulkhead":{"max_in_flight":2,"max_queue":2}"#);
    let api = net.api("up").unwrap();
    let started = Instant::now();
    let results = join_all((0..10).map(|_| {
        let api = api.clone();
        async move {
            let r = api.get("/x").send().await;
            (r, started.elapsed())
        }
    }))
    .await;
    let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
    let overloaded: Vec<Duration> = results
        .iter()
        .filter(|(r, _)| matches!(r, Err(HttpError::Overloaded { .. })))
        .map(|(_, t)| *t)
        .collect();
    assert_eq!(ok, 4);
    assert_eq!(overloaded.len(), 6);
    assert!(overloaded.iter().all(|t| *t < Duration::from_millis(100)));
    assert_eq!(fake.requests(), 4);
}

#[actix_web::test]
async fn the_rate_limit_is_waited_out_or_reported_with_its_wait() {
    let fake = FakeUpstream::start("a", Faults::default()).await.unwrap();
    let base = fake.url("");
    let net = network(format!(
        r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{base}","rate_limit":60,"rate_burst":2}}}}}}}}"#
    ));
    let api = net.api("up").unwrap();
    for _ in 0..2 {
        api.get("/x").send().await.unwrap();
    }
    match api.get("/x").wait_for_rate_limit(false).send().await {
        Err(HttpError::RateLimited { retry_after, .. }) => {
            assert!(retry_after > Duration::from_millis(900));
            assert!(retry_after <= Duration::from_secs(1));
        }
        other => panic!("{other:?}"),
    }
    let started = Instant::now();
    api.get("/x").send().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(fake.requests(), 3);
}

#[actix_web::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let fake = FakeUpstream::start("a", faults(|f| f.error_rate = 1.0))
        .await
        .unwrap();
    let net = with_client(
        &[&fake],
        r#""retry_attempts":3,
           "retry":{"base_delay":0.001,"max_delay":0.002,"budget_ratio":0.1,
                    "budget_min_per_second":1,"budget_window":10},
           "breaker":{"window":1000,"minimum_calls":1000}"#,
    );
    let api = net.api("up").unwrap();
    for _ in 0..50 {
        assert!(api.get("/x").send().await.is_err());
    }
    // Without a budget: 50 × 4 = 200 requests. With it: 50 plus at most
    // 10% of 50 plus 1/s × 10 s.
    let sent = fake.requests();
    assert!(sent <= 50 + 5 + 10, "{sent} requests reached the upstream");
    assert!(sent > 50, "no retry at all");
}

#[actix_web::test]
async fn a_retry_the_deadline_rules_out_spends_nothing_from_the_budget() {
    let fake = FakeUpstream::start("a", faults(|f| f.error_rate = 1.0))
        .await
        .unwrap();
    // A budget of exactly one retry (no ratio, a reserve of 1/s over 1 s)
    // and a 2 s deadline per call.
    let net = with_client(
        &[&fake],
        r#""retry_attempts":1,"deadline":2,
           "retry":{"base_delay":0.001,"max_delay":0.002,"budget_ratio":0,
                    "budget_min_per_second":1,"budget_window":1},
           "breaker":{"window":1000,"minimum_calls":1000}"#,
    );
    let api = net.api("up").unwrap();
    // Asked to come back in 60 s: the retry cannot fit the deadline, so the
    // call gives up at once and must leave the budget's one token alone.
    let started = Instant::now();
    let refused = api
        .get("/x")
        .header(fake_upstream::FAULT_RETRY_AFTER_HEADER, "60")
        .send()
        .await;
    assert!(refused.is_err());
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(fake.requests(), 1);
    // So the next call that can retry, does.
    assert!(api.get("/x").send().await.is_err());
    assert_eq!(fake.requests(), 3, "the second call's retry was refused");
    let stats = net.api("up").unwrap().upstream().call_stats();
    assert_eq!((stats.retries, stats.retry_budget_exhausted), (1, 0));
}

#[actix_web::test]
async fn a_fallback_answers_when_the_call_finally_fails() {
    let fake = FakeUpstream::start("a", faults(|f| f.error_rate = 1.0))
        .await
        .unwrap();
    let net = with_client(&[&fake], r#""retry_attempts":0"#);
    let api = net.api("up").unwrap();
    let resp = api
        .get("/price")
        .fallback(Response::json_value(
            &serde_json::json!({"price": "cached"}),
        ))
        .send()
        .await
        .unwrap();
    assert!(resp.from_fallback);
    assert_eq!(resp.json::<serde_json::Value>().unwrap()["price"], "cached");

    // A closure sees the error and may decline.
    let err = api
        .get("/price")
        .fallback_with(|e| (e.kind() == "timeout").then(|| Response::new(StatusCode::OK, "")))
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "status");
}

#[actix_web::test]
async fn a_reset_connection_is_a_transport_error_naming_the_upstream() {
    let fake = FakeUpstream::start("a", faults(|f| f.reset_rate = 1.0))
        .await
        .unwrap();
    let net = with_client(&[&fake], "");
    let err = net.api("up").unwrap().get("/x").send().await.unwrap_err();
    assert_eq!(err.kind(), "transport", "{err}");
    assert_eq!(err.upstream(), Some("up"));
}

#[actix_web::test]
async fn a_connect_error_is_retried_then_reported() {
    // A port with nothing listening: bind, note it, close.
    let port = testkit::free_port();
    let net = network(format!(
        r#"{{"network":{{"api_clients":{{"up":{{"base_url":"http://127.0.0.1:{port}",
            "retry_attempts":2,"retry":{{"base_delay":0.001,"max_delay":0.002}}}}}}}}}}"#
    ));
    let err = net.api("up").unwrap().get("/x").send().await.unwrap_err();
    assert_eq!(err.kind(), "connect", "{err}");
}

#[actix_web::test]
async fn a_caller_that_gives_up_stops_the_retries() {
    let fake = FakeUpstream::start(
        "a",
        faults(|f| {
            f.error_rate = 1.0;
            f.latency_ms = 200;
        }),
    )
    .await
    .unwrap();
    let net = with_client(
        &[&fake],
        r#""retry_attempts":5,"retry":{"base_delay":0.05,"max_delay":0.1},
           "breaker":{"window":100,"minimum_calls":100}"#,
    );
    let call = net.api("up").unwrap().get("/x").send();
    // The caller gives up while the first attempt is in flight.
    assert!(tokio::time::timeout(Duration::from_millis(50), call)
        .await
        .is_err());
    // Left alone, the call would retry within ~350 ms; watch for a second.
    actix_web::rt::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.requests(), 1, "retries went on after the caller left");
}
