//! API clients with credentials, the OpenAI client, and the OpenAI-compatible
//! gateway, against the fake upstream speaking OpenAI's API on `127.0.0.1:0`.
//! Each test sets its own environment variable (names never shared), since
//! tests in one binary run in parallel.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;
mod support;

use fake_upstream::{FakeUpstream, Faults};
use futures::StreamExt;
use happynet::gateway::openai::{ChatRequest, OpenAiClient};
use happynet::{Config, HttpError, Network};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use support::{config, http_client, start};

const KEY: &str = "sk-test-5f2c9a";

fn set_key(var: &str) {
    // Each test uses a variable of its own, set before its network starts.
    std::env::set_var(var, KEY);
}

fn openai_net(fake: &FakeUpstream, auth: &str, extra: &str) -> Network {
    Network::start(
        Config::from_json_str(&format!(
            r#"{{"network":{{"api_clients":{{"openai":{{"base_url":"{}",
                "rate_limit":6000,{auth}{extra}}}}}}}}}"#,
            fake.url("")
        ))
        .unwrap(),
    )
    .unwrap()
}

#[actix_web::test]
async fn chat_completion_sends_the_bearer_key_and_returns_the_answer() {
    set_key("HN_TEST_KEY_BEARER");
    let fake = FakeUpstream::start_with_key("fake", Faults::default(), Some(KEY.into()))
        .await
        .unwrap();
    let net = openai_net(&fake, r#""api_key_env":"HN_TEST_KEY_BEARER""#, "");
    let openai = OpenAiClient::new(net.api("openai").unwrap());
    assert_eq!(
        openai.chat_completion("Hello, world!").await.unwrap(),
        "Echo: Hello, world!"
    );
    let full = openai
        .create_chat_completion(&ChatRequest::new("fake-gpt", "two words"))
        .await
        .unwrap();
    let usage = full.usage.unwrap();
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    assert!(usage.completion_tokens > 0);
}

#[actix_web::test]
async fn header_and_query_credentials_reach_the_upstream() {
    set_key("HN_TEST_KEY_HEADER");
    let fake = FakeUpstream::start_with_key("fake", Faults::default(), Some(KEY.into()))
        .await
        .unwrap();
    for auth in [
        r#""auth":{"type":"header","name":"x-api-key","key_env":"HN_TEST_KEY_HEADER"}"#,
        r#""auth":{"type":"query","name":"api_key","key_env":"HN_TEST_KEY_HEADER"}"#,
    ] {
        let net = openai_net(&fake, auth, "");
        let resp = net.api("openai").unwrap().get("/v1/models").send().await;
        assert_eq!(resp.unwrap().status, 200, "with {auth}");
    }
    // And a wrong key is the upstream's 401, not retried.
    std::env::set_var("HN_TEST_KEY_WRONG", "sk-wrong");
    let net = openai_net(&fake, r#""api_key_env":"HN_TEST_KEY_WRONG""#, "");
    let before = fake.requests();
    match net.api("openai").unwrap().get("/v1/models").send().await {
        Err(HttpError::Status { status, .. }) => assert_eq!(status, 401),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.requests(), before + 1);
}

#[actix_web::test]
async fn a_missing_secret_is_a_clear_error_naming_the_variable() {
    let fake = FakeUpstream::start_with_key("fake", Faults::default(), Some(KEY.into()))
        .await
        .unwrap();
    let net = openai_net(&fake, r#""api_key_env":"HN_TEST_KEY_NEVER_SET""#, "");
    let err = OpenAiClient::new(net.api("openai").unwrap())
        .chat_completion("hi")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), "missing_secret");
    assert!(err.to_string().contains("HN_TEST_KEY_NEVER_SET"), "{err}");
    assert_eq!(fake.requests(), 0, "nothing is sent without the credential");
}

#[actix_web::test]
async fn streaming_delivers_every_delta_in_order_and_ends_at_done() {
    set_key("HN_TEST_KEY_STREAM");
    let fake = FakeUpstream::start_with_key(
        "fake",
        Faults {
            stream_chunk_delay_ms: 5,
            ..Faults::default()
        },
        Some(KEY.into()),
    )
    .await
    .unwrap();
    let net = openai_net(&fake, r#""api_key_env":"HN_TEST_KEY_STREAM""#, "");
    let openai = OpenAiClient::new(net.api("openai").unwrap());
    let prompt = "the quick brown fox jumps over the lazy dog";
    let plain = openai.chat_completion(prompt).await.unwrap();

    let mut stream = Box::pin(
        openai
            .stream_chat_completion(&ChatRequest::new("fake-gpt", prompt))
            .await
            .unwrap(),
    );
    let mut text = String::new();
    let mut deltas = 0;
    let mut finished = false;
    while let Some(delta) = stream.next().await {
        let delta = delta.unwrap();
        assert!(!finished, "a delta after the finish");
        if let Some(c) = delta.content {
            text.push_str(&c);
            deltas += 1;
        }
        finished |= delta.finish_reason.is_some();
    }
    assert!(finished, "no finish_reason before [DONE]");
    assert_eq!(text, plain);
    assert!(deltas >= 9, "only {deltas} deltas");
}

#[actix_web::test]
async fn a_429_with_retry_after_is_waited_for_but_insufficient_quota_is_final() {
    set_key("HN_TEST_KEY_429");
    let fake = FakeUpstream::start_with_key(
        "fake",
        Faults {
            fail_next: 1,
            error_status: 429,
            retry_after: Some("1".into()),
            ..Faults::default()
        },
        Some(KEY.into()),
    )
    .await
    .unwrap();
    let net = openai_net(
        &fake,
        r#""api_key_env":"HN_TEST_KEY_429""#,
        r#","retry":{"base_delay":0.01,"max_delay":0.05}"#,
    );
    let openai = OpenAiClient::new(net.api("openai").unwrap());
    let started = Instant::now();
    assert_eq!(openai.chat_completion("hi").await.unwrap(), "Echo: hi");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(fake.requests(), 2);

    fake.set_faults(Faults {
        insufficient_quota: true,
        ..Faults::default()
    });
    let err = openai.chat_completion("hi").await.unwrap_err();
    match &err {
        HttpError::Status { status, .. } => assert_eq!(*status, 429),
        other => panic!("{other:?}"),
    }
    assert_eq!(fake.requests(), 3, "insufficient_quota was retried");
}

#[actix_web::test]
async fn a_stream_is_retried_before_its_first_byte() {
    set_key("HN_TEST_KEY_STREAM_RETRY");
    let fake = FakeUpstream::start_with_key(
        "fake",
        Faults {
            fail_next: 1,
            ..Faults::default()
        },
        Some(KEY.into()),
    )
    .await
    .unwrap();
    let net = openai_net(
        &fake,
        r#""api_key_env":"HN_TEST_KEY_STREAM_RETRY""#,
        r#","retry":{"base_delay":0.01,"max_delay":0.05}"#,
    );
    let openai = OpenAiClient::new(net.api("openai").unwrap());
    let stream = openai
        .stream_chat_completion(&ChatRequest::new("fake-gpt", "again"))
        .await
        .unwrap();
    let text: Vec<String> = stream
        .filter_map(|d| async move { d.unwrap().content })
        .collect()
        .await;
    assert_eq!(text.concat(), "Echo: again");
    assert_eq!(fake.requests(), 2);
}

fn gateway_config(primary: &FakeUpstream, backup: &FakeUpstream, var: &str) -> Config {
    config(&format!(
        r#"{{"network":{{
            "gateway":{{"clients":["openai","backup"],"tokens":["gw-token-1"]}},
            "api_clients":{{
              "openai":{{"base_url":"{}","rate_limit":6000,"api_key_env":"{var}","retry_attempts":0}},
              "backup":{{"base_url":"{}","rate_limit":6000,"api_key_env":"{var}"}}
            }}}}}}"#,
        primary.url(""),
        backup.url("")
    ))
}

#[actix_web::test]
async fn the_gateway_speaks_openai_to_a_real_http_client() {
    set_key("HN_TEST_KEY_GATEWAY");
    let primary = FakeUpstream::start_with_key("primary", Faults::default(), Some(KEY.into()))
        .await
        .unwrap();
    let backup = FakeUpstream::start_with_key("backup", Faults::default(), Some(KEY.into()))
        .await
        .unwrap();
    let server = start(gateway_config(&primary, &backup, "HN_TEST_KEY_GATEWAY")).await;
    let client = http_client();
    let url = server.url("/v1/chat/completions");
    let body = json!({"model":"fake-gpt","messages":[{"role":"user","content":"Hello there"}]});

    // As the official SDKs do: Bearer token, JSON body.
    let mut resp = client
        .post(&url)
        .bearer_auth("gw-token-1")
        .send_json(&body)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "Echo: Hello there");

    // The caller's token is the gateway's, never forwarded; a wrong one is 401.
    let resp = client
        .post(&url)
        .bearer_auth("nope")
        .send_json(&body)
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = client.post(&url).send_json(&body).await.unwrap();
    assert_eq!(resp.status(), 401);

    // stream: true → server-sent events, parsed as an SDK would.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let mut resp = client
        .post(&url)
        .bearer_auth("gw-token-1")
        .send_json(&streamed)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let raw = resp.body().limit(1 << 20).await.unwrap();
    let mut parser = happynet::gateway::sse::SseParser::new();
    let events = parser.push(&raw).unwrap();
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Echo: Hello there");

    let mut resp = client
        .get(server.url("/v1/models"))
        .bearer_auth("gw-token-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["data"][0]["id"],
        "fake-gpt"
    );
}

#[actix_web::test]
async fn the_gateway_falls_back_to_the_second_client_when_the_first_fails() {
    set_key("HN_TEST_KEY_FALLBACK");
    let primary = FakeUpstream::start_with_key(
        "primary",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
        Some(KEY.into()),
    )
    .await
    .unwrap();
    let backup = FakeUpstream::start_with_key("backup", Faults::default(), Some(KEY.into()))
        .await
        .unwrap();
    let server = start(gateway_config(&primary, &backup, "HN_TEST_KEY_FALLBACK")).await;
    let client = http_client();
    for stream in [false, true] {
        let resp = client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth("gw-token-1")
            .send_json(
                &json!({"model":"m","stream":stream,"messages":[{"role":"user","content":"x"}]}),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "stream={stream}");
        assert_eq!(resp.headers().get("x-upstream").unwrap(), "backup");
    }
    assert_eq!(primary.requests(), 2);
    assert_eq!(backup.requests(), 2);
}
