//! Configuration as the user writes it: the seed file loads unchanged, every
//! extra key has its documented default, and every bad value is an error
//! that names its path.

use happynet::config::{Config, ConfigError};
use std::time::Duration;

fn error_for(json: &str) -> (String, String) {
    match Config::from_json_str(json) {
        Ok(_) => panic!("accepted {json}"),
        Err(e) => (e.path().unwrap_or("").to_owned(), e.to_string()),
    }
}

#[test]
fn the_seed_config_loads_unchanged_with_its_meaning() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/seed-network.json"
    );
    let c = Config::from_file(path).expect("seed loads");
    let n = &c.network;
    assert_eq!(n.http.timeout.0, Duration::from_secs(30));
    assert_eq!(n.http.max_connections, 100);
    assert_eq!(n.http.retry_attempts, 3);
    assert_eq!(n.websocket.heartbeat_interval.0, Duration::from_secs(30));
    assert_eq!(n.websocket.max_connections, 1000);
    let openai = &n.api_clients["openai"];
    assert_eq!(openai.base_url, "https://api.openai.com");
    assert_eq!(openai.rate_limit, 60.0);
    assert_eq!(openai.timeout.unwrap().0, Duration::from_secs(60));
    // Keys the seed leaves out take their documented defaults.
    assert_eq!(n.websocket.client_timeout(), Duration::from_secs(60));
    assert_eq!(n.websocket.max_outbound_bytes, 1 << 20);
    assert_eq!(n.websocket.max_message_bytes, 64 << 10);
    assert_eq!(n.websocket.default_room, "lobby");
    assert_eq!(n.websocket.max_rooms_per_ip, 256);
}

#[test]
fn the_shared_seed_is_the_fixture_and_the_embedded_default() {
    // The fixture is a copy of ../shared/config/seed-network.json; when the
    // shared file is present, make sure the copy has not drifted.
    let fixture = include_str!("fixtures/seed-network.json");
    let shared = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/config/seed-network.json"
    );
    if let Ok(text) = std::fs::read_to_string(shared) {
        assert_eq!(text, fixture);
    }
    assert_eq!(happynet::config::EMBEDDED_DEFAULT, fixture);
    Config::from_json_str(fixture).expect("fixture loads");
}

#[test]
fn an_empty_object_takes_every_default() {
    let c = Config::from_json_str("{}").unwrap();
    assert_eq!(
        c.network.websocket.heartbeat_interval.0,
        Duration::from_secs(30)
    );
    assert!(c.network.api_clients.is_empty());
}

#[test]
fn bad_values_name_their_path() {
    let cases = [
        (
            r#"{"network":{"websocket":{"heartbeat_interval":0}}}"#,
            "network.websocket.heartbeat_interval",
            "must be > 0",
        ),
        (
            r#"{"network":{"websocket":{"heartbeat_interval":-1}}}"#,
            "network.websocket.heartbeat_interval",
            "non-negative number of seconds",
        ),
        (
            r#"{"network":{"websocket":{"heartbeat_interval":"30"}}}"#,
            "network.websocket.heartbeat_interval",
            "invalid type",
        ),
        (
            r#"{"network":{"websocket":{"max_connections":0}}}"#,
            "network.websocket.max_connections",
            "must be >= 1",
        ),
        (
            r#"{"network":{"websocket":{"heartbeat_interval":10,"client_timeout":5}}}"#,
            "network.websocket.client_timeout",
            "must be >= network.websocket.heartbeat_interval",
        ),
        (
            r#"{"network":{"websocket":{"default_room":""}}}"#,
            "network.websocket.default_room",
            "empty",
        ),
        (
            r#"{"network":{"websocket":{"max_outbound_bytes":10}}}"#,
            "network.websocket.max_outbound_bytes",
            "must be >=",
        ),
        // One largest message would fill the whole budget: the first one
        // would evict every reader. Four of them (and their framing) must fit.
        (
            r#"{"network":{"websocket":{"max_message_bytes":65536,"max_outbound_bytes":65536}}}"#,
            "network.websocket.max_outbound_bytes",
            "must be >= 263680: 4 × (network.websocket.max_message_bytes + 384",
        ),
        (
            r#"{"network":{"websocket":{"max_message_bytes":65536,"max_outbound_bytes":263679}}}"#,
            "network.websocket.max_outbound_bytes",
            "must be >= 263680",
        ),
        (
            r#"{"network":{"http":{"timeout":0}}}"#,
            "network.http.timeout",
            "must be > 0",
        ),
        (
            r#"{"network":{"api_clients":{"openai":{"base_url":"ftp://x","rate_limit":60}}}}"#,
            "network.api_clients.openai.base_url",
            "http",
        ),
        (
            r#"{"network":{"api_clients":{"openai":{"base_url":"https://x","rate_limit":0}}}}"#,
            "network.api_clients.openai.rate_limit",
            "must be > 0",
        ),
        (
            r#"{"network":{"api_clients":{"openai":{"rate_limit":1}}}}"#,
            "network.api_clients.openai",
            "missing field `base_url`",
        ),
    ];
    for (json, path, needle) in cases {
        let (got_path, message) = error_for(json);
        assert_eq!(got_path, path, "for {json}: {message}");
        assert!(message.starts_with(path), "{message}");
        assert!(message.contains(needle), "for {json}: {message}");
    }
}

#[test]
fn unknown_keys_are_rejected_with_their_path() {
    let (path, message) = error_for(r#"{"network":{"websocket":{"heartbeat_intervall":5}}}"#);
    assert_eq!(path, "network.websocket.heartbeat_intervall");
    assert!(message.contains("unknown field"), "{message}");
    let (path, _) = error_for(r#"{"netwerk":{}}"#);
    assert_eq!(path, "netwerk");
}

#[test]
fn broken_json_and_missing_files_are_clear_errors() {
    let (_, message) = error_for(r#"{"network": {"#);
    assert!(message.contains("line 1"), "{message}");
    match Config::from_file("/nonexistent/happynet.json") {
        Err(ConfigError::Io { path, .. }) => assert_eq!(path, "/nonexistent/happynet.json"),
        other => panic!("{other:?}"),
    }
}
