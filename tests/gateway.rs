//! The gateway route `/proxy/{client}/{tail…}` driven by a real HTTP client
//! (awc) against a real happynet server and the fake upstream: what passes
//! through, and the status, `Retry-After` and JSON body of each failure.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;
mod support;

use fake_upstream::{FakeUpstream, Faults};
use serde_json::Value;
use support::{config, http_client, start};

fn gateway_config(fake: &FakeUpstream, extra: &str) -> happynet::Config {
    config(&format!(
        r#"{{"network":{{"api_clients":{{"up":{{"base_url":"{}"{extra}}}}}}}}}"#,
        fake.url("")
    ))
}

#[actix_web::test]
async fn requests_pass_through_with_path_query_headers_and_body() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let server = start(gateway_config(&fake, r#","rate_limit":6000"#)).await;
    let mut resp = http_client()
        .post(server.url("/proxy/up/v1/items?limit=2"))
        .insert_header(("authorization", "Bearer caller-token"))
        .content_type("application/json")
        .send_body(r#"{"a":1}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("x-upstream").unwrap(), "fake");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/v1/items?limit=2");
    assert_eq!(body["body_bytes"], 7);
    assert_eq!(body["headers"]["authorization"], "Bearer caller-token");

    // An upstream error status is passed on as it is.
    let resp = http_client()
        .get(server.url("/proxy/up/x"))
        .insert_header(("x-fault-status", "404"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[actix_web::test]
async fn an_unknown_client_is_a_404_naming_it() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let server = start(gateway_config(&fake, "")).await;
    let mut resp = http_client()
        .get(server.url("/proxy/nope/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("api_clients.nope"));
}

#[actix_web::test]
async fn over_the_rate_is_429_with_retry_after() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let server = start(gateway_config(&fake, r#","rate_limit":60,"rate_burst":1"#)).await;
    let client = http_client();
    assert_eq!(
        client
            .get(server.url("/proxy/up/a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut resp = client.get(server.url("/proxy/up/a")).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["upstream"], "up");
    assert_eq!(fake.requests(), 1);
}

#[actix_web::test]
async fn an_open_breaker_is_503_with_retry_after() {
    let fake = FakeUpstream::start(
        "fake",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
    )
    .await
    .unwrap();
    let server = start(gateway_config(
        &fake,
        r#","rate_limit":6000,"retry_attempts":0,
           "breaker":{"window":2,"minimum_calls":2,"open_duration":30}"#,
    ))
    .await;
    let client = http_client();
    for _ in 0..2 {
        // The upstream's own 503 passes through while the breaker is closed.
        assert_eq!(
            client
                .get(server.url("/proxy/up/a"))
                .send()
                .await
                .unwrap()
                .status(),
            503
        );
    }
    let mut resp = client.get(server.url("/proxy/up/a")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((29..=30).contains(&retry_after), "{retry_after}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "breaker_open");
    assert_eq!(fake.requests(), 2);
}

#[actix_web::test]
async fn a_hung_upstream_is_504_at_the_deadline_and_a_reset_is_502() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let server = start(gateway_config(
        &fake,
        r#","rate_limit":6000,"deadline":0.5"#,
    ))
    .await;
    let client = http_client();
    let started = std::time::Instant::now();
    let mut resp = client
        .get(server.url("/proxy/up/slow"))
        .insert_header(("x-fault-hang", "1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    // Deadline 0.5 s; the rest is slack for a loaded machine (the hang
    // itself would last 120 s).
    assert!(started.elapsed() < std::time::Duration::from_millis(1500));
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "timeout");

    let mut resp = client
        .get(server.url("/proxy/up/reset"))
        .insert_header(("x-fault-reset", "1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "transport");
}

#[actix_web::test]
async fn with_gateway_tokens_the_proxy_requires_one_and_never_forwards_it() {
    let fake = FakeUpstream::start("fake", Faults::default())
        .await
        .unwrap();
    let server = start(config(&format!(
        r#"{{"network":{{"gateway":{{"tokens":["gw-secret"]}},
            "api_clients":{{"up":{{"base_url":"{}","rate_limit":6000}}}}}}}}"#,
        fake.url("")
    )))
    .await;
    let client = http_client();
    let resp = client.get(server.url("/proxy/up/x")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(fake.requests(), 0);
    let mut resp = client
        .get(server.url("/proxy/up/x"))
        .bearer_auth("gw-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(body["headers"]["authorization"].is_null(), "{body}");
}
