//! An upstream key never appears in a log line or an error string. This
//! binary installs a logger that records every line at every level (actix
//! and awc included) while calls succeed and fail in every way the pipeline
//! knows; then it looks for the key. It has a binary of its own because a
//! process has one logger.

#![allow(clippy::unwrap_used)]

use testkit::fake_upstream;

use fake_upstream::{FakeUpstream, Faults};
use happynet::{Config, Network};
use std::sync::Mutex;

const KEY: &str = "sk-leak-canary-7d41e0";

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Recorder;

impl log::Log for Recorder {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {} {}", record.level(), record.target(), record.args());
        LINES.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

#[actix_web::test]
async fn the_key_never_appears_in_logs_or_errors() {
    log::set_logger(&Recorder).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    std::env::set_var("HN_LEAK_KEY", KEY);

    let fake = FakeUpstream::start_with_key("fake", Faults::default(), Some(KEY.into()))
        .await
        .unwrap();
    let dead_port = testkit::free_port();
    let net = Network::start(
        Config::from_json_str(&format!(
            r#"{{"network":{{"api_clients":{{
                "query":{{"base_url":"{url}","rate_limit":600000,"deadline":0.5,
                          "auth":{{"type":"query","name":"api_key","key_env":"HN_LEAK_KEY"}}}},
                "bearer":{{"base_url":"{url}","rate_limit":600000,"deadline":0.5,
                          "api_key_env":"HN_LEAK_KEY"}},
                "dead":{{"base_url":"http://127.0.0.1:{dead_port}","rate_limit":600000,
                          "api_key_env":"HN_LEAK_KEY","retry_attempts":1,
                          "retry":{{"base_delay":0.001,"max_delay":0.002}}}}
            }}}}}}"#,
            url = fake.url("")
        ))
        .unwrap(),
    )
    .unwrap();

    let mut errors = Vec::new();
    for client in ["query", "bearer"] {
        let api = net.api(client).unwrap();
        // Success, then every failure the fake can produce.
        assert_eq!(api.get("/v1/models").send().await.unwrap().status, 200);
        for (header, value) in [
            ("x-fault-status", "503"),
            ("x-fault-reset", "1"),
            ("x-fault-hang", "1"),
            ("x-fault-status", "401"),
        ] {
            let result = api.get("/v1/models").header(header, value).send().await;
            errors.push(format!("{:?}", result.as_ref().err()));
            if let Err(e) = result {
                errors.push(e.to_string());
            }
        }
    }
    let err = net
        .api("dead")
        .unwrap()
        .get("/v1/models")
        .send()
        .await
        .unwrap_err();
    errors.push(format!("{err:?}"));
    errors.push(err.to_string());

    let lines = LINES.lock().unwrap().clone();
    assert!(
        lines.len() > 10,
        "the recorder saw only {} lines",
        lines.len()
    );
    for line in lines.iter().chain(&errors) {
        assert!(!line.contains(KEY), "the key leaked: {line}");
    }
}
