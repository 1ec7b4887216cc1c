//! `Upstream::call_stats`, the per-upstream call counters behind
//! `/metrics`, for the endings the scripted scenario in `tests/metrics.rs`
//! does not reach: fresh cache hits (counted, not timed), a caller that gives
//! up (cancelled), an attempt that times out, and connect errors that are
//! retried without any response to count. Real servers on `127.0.0.1`: the
//! fake upstream, and a port nothing listens on.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;

use fake_upstream::{FakeUpstream, Faults};
use happynet::upstream::{CallOutcome, CallStats};
use happynet::{ApiClient, Config, HttpError, Network};
use std::time::Duration;

/// The longest a condition is polled for.
const WAIT: Duration = Duration::from_secs(20);

/// A network with one API client `up` at `base_url`; `extra` adds settings.
fn net(base_url: &str, extra: &str) -> Network {
    Network::start(
        Config::from_json_str(&format!(
            r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{base_url}",
                "rate_limit":600000{extra}}}}}}}}}"#
        ))
        .unwrap(),
    )
    .unwrap()
}

/// Polls the client's counters until `pred` holds, or panics after [`WAIT`].
async fn stats_until(api: &ApiClient, what: &str, pred: impl Fn(&CallStats) -> bool) -> CallStats {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = api.upstream().call_stats();
        if pred(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn class(stats: &CallStats, class: &str) -> u64 {
    stats
        .responses_by_class()
        .find(|(c, _)| *c == class)
        .map(|(_, n)| n)
        .unwrap()
}

#[actix_web::test]
async fn fresh_cache_hits_are_counted_but_not_timed() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = net(&fake.url(""), r#","retry_attempts":0,"cache":{}"#);
    let api = net.api("up").unwrap();
    for _ in 0..4 {
        api.get("/cache/a?cc=max-age%3D60").send().await.unwrap();
    }
    assert_eq!(fake.requests(), 1);
    let stats = api.upstream().call_stats();
    assert_eq!(stats.requests(CallOutcome::Ok), 1);
    assert_eq!(stats.requests(CallOutcome::CacheHit), 3);
    assert_eq!(stats.latency.count(), 1, "only the miss is timed");
    assert_eq!(class(&stats, "2xx"), 1);
    assert_eq!(stats.retries, 0);
}

#[actix_web::test]
async fn a_caller_that_gives_up_is_counted_as_cancelled() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = net(&fake.url(""), r#","timeout":30"#);
    let api = net.api("up").unwrap();
    let call = api
        .get("/slow")
        .header("x-fault-latency-ms", "10000")
        .send();
    let gave_up = tokio::time::timeout(Duration::from_millis(100), call).await;
    assert!(gave_up.is_err(), "the slow call answered: {gave_up:?}");
    // The arbiter notices the hang-up on its own schedule.
    let stats = stats_until(&api, "the cancellation", |s| {
        s.requests(CallOutcome::Cancelled) == 1
    })
    .await;
    assert_eq!(stats.latency.count(), 0, "cancelled calls are not timed");
    let total: u64 = stats.requests_by_outcome().map(|(_, n)| n).sum();
    assert_eq!(total, 1);
}

#[actix_web::test]
async fn an_attempt_timeout_ends_the_call_as_timeout() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let net = net(&fake.url(""), r#","timeout":0.1,"retry_attempts":0"#);
    let api = net.api("up").unwrap();
    let slow = api
        .get("/slow")
        .header("x-fault-latency-ms", "5000")
        .send()
        .await;
    assert!(matches!(slow, Err(HttpError::Timeout { .. })), "{slow:?}");
    let stats = api.upstream().call_stats();
    assert_eq!(stats.requests(CallOutcome::Timeout), 1);
    assert_eq!(stats.latency.count(), 1);
    assert!(stats.latency.sum_seconds() >= 0.1, "{stats:?}");
    assert_eq!(stats.responses_by_class().map(|(_, n)| n).sum::<u64>(), 0);
}

#[actix_web::test]
async fn connect_errors_are_retried_and_count_no_response() {
    // A port that was just free: nothing listens there.
    let port = testkit::free_port();
    let net = net(
        &format!("http://127.0.0.1:{port}"),
        r#","retry_attempts":2,"retry":{"base_delay":0.001,"max_delay":0.002}"#,
    );
    let api = net.api("up").unwrap();
    let failed = api.get("/x").send().await;
    assert!(
        matches!(failed, Err(HttpError::Connect { .. })),
        "{failed:?}"
    );
    let stats = api.upstream().call_stats();
    assert_eq!(stats.requests(CallOutcome::Connect), 1);
    assert_eq!(stats.retries, 2);
    assert_eq!(stats.retry_budget_exhausted, 0);
    assert_eq!(stats.responses_by_class().map(|(_, n)| n).sum::<u64>(), 0);
    assert_eq!(stats.latency.count(), 1);
}
