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
    // History is on by default, with its documented limits.
    let history = n.websocket.hub_config().history.expect("history on");
    assert_eq!(history.size, 100);
    assert_eq!(history.ttl, Duration::from_secs(300));
    assert_eq!(history.max_bytes, 64 << 20);
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
fn history_can_be_turned_off_and_its_limits_set() {
    let c = Config::from_json_str(
        r#"{"network":{"websocket":{"history":{"size":1000,"ttl":1.5,"max_bytes":2097152}}}}"#,
    )
    .unwrap();
    let h = c.network.websocket.hub_config().history.unwrap();
    assert_eq!(
        (h.size, h.ttl, h.max_bytes),
        (1000, Duration::from_millis(1500), 2 << 20)
    );
    // Off, its limits are not judged.
    let c = Config::from_json_str(
        r#"{"network":{"websocket":{"history":{"enabled":false,"size":0}}}}"#,
    )
    .unwrap();
    assert!(c.network.websocket.hub_config().history.is_none());
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
            r#"{"network":{"websocket":{"hub_mailbox_capacity":4611686018427387904}}}"#,
            "network.websocket.hub_mailbox_capacity",
            "must be <= 16777216",
        ),
        (
            r#"{"network":{"websocket":{"session_mailbox_capacity":16777217}}}"#,
            "network.websocket.session_mailbox_capacity",
            "must be <= 16777216, got 16777217",
        ),
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
            r#"{"network":{"websocket":{"history":{"size":0}}}}"#,
            "network.websocket.history.size",
            "must be between 1 and 100000",
        ),
        (
            r#"{"network":{"websocket":{"history":{"ttl":0}}}}"#,
            "network.websocket.history.ttl",
            "must be > 0",
        ),
        (
            r#"{"network":{"websocket":{"history":{"max_bytes":1000}}}}"#,
            "network.websocket.history.max_bytes",
            "must be >= 1048576",
        ),
        (
            r#"{"network":{"websocket":{"history":{"sizes":10}}}}"#,
            "network.websocket.history.sizes",
            "unknown field `sizes`",
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

/// Policy settings the policy itself refuses: each must be refused when
/// the config is loaded, under the key's exact path — not accepted here
/// and then refused by the actor at start under `network.api_clients`.
const BAD_POLICIES: &[(&str, &str, &str)] = &[
    (
        r#"{"network":{"api_clients":{"openai":{"base_url":"https://x","breaker":{"failure_rate":0}}}}}"#,
        "network.api_clients.openai.breaker.failure_rate",
        "must be > 0 and <= 1, got 0",
    ),
    (
        r#"{"network":{"http":{"breaker":{"slow_call_rate":0}}}}"#,
        "network.http.breaker.slow_call_rate",
        "must be > 0 and <= 1",
    ),
    (
        r#"{"network":{"http":{"breaker":{"window":200000,"minimum_calls":10}}}}"#,
        "network.http.breaker.window",
        "between 1 and 100000",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","breaker":{"half_open_probes":20000}}}}}"#,
        "network.api_clients.a.breaker.half_open_probes",
        "between 1 and 10000",
    ),
    (
        r#"{"network":{"http":{"breaker":{"open_duration":1e6}}}}"#,
        "network.http.breaker.open_duration",
        "at most 86400 s",
    ),
    (
        r#"{"network":{"http":{"breaker":{"minimum_calls":30}}}}"#,
        "network.http.breaker.minimum_calls",
        "between 1 and window (20)",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","retry":{"budget_window":0.0001}}}}}"#,
        "network.api_clients.a.retry.budget_window",
        "must be at least 0.001 s",
    ),
    (
        r#"{"network":{"http":{"retry":{"budget_ratio":-0.5}}}}"#,
        "network.http.retry.budget_ratio",
        "between 0 and 1000",
    ),
    (
        r#"{"network":{"http":{"retry":{"base_delay":0}}}}"#,
        "network.http.retry.base_delay",
        "must be > 0",
    ),
    (
        r#"{"network":{"http":{"retry":{"base_delay":2,"max_delay":1}}}}"#,
        "network.http.retry.max_delay",
        "must be >= base (2 s)",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","cache":{"max_entry_bytes":10}}}}}"#,
        "network.api_clients.a.cache.max_entry_bytes",
        "must be between 257 and max_bytes",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","cache":{"max_entries":0}}}}}"#,
        "network.api_clients.a.cache.max_entries",
        "must be >= 1",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","rate_limit":1e-18}}}}"#,
        "network.api_clients.a.rate_limit",
        "too low",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","rate_limit":1e11}}}}"#,
        "network.api_clients.a.rate_limit",
        "one per nanosecond",
    ),
    (
        r#"{"network":{"http":{"rate_limit":60,"rate_burst":0}}}"#,
        "network.http.rate_burst",
        "must be >= 1",
    ),
    // The pool's settings, judged by `PoolConfig::validate` (the ejection
    // by `EjectionConfig::validate`), under the key they were written at.
    // Before, the balancer took a `consecutive_failures` of 0 as 1 while
    // the loader refused it, and the webhook's `max_in_flight` had no upper
    // bound at all (the pool's mailbox overflows above it).
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","ejection":{"consecutive_failures":0}}}}}"#,
        "network.api_clients.a.ejection.consecutive_failures",
        "must be >= 1",
    ),
    (
        r#"{"network":{"http":{"ejection":{"base_ejection":30,"max_ejection":10}}}}"#,
        "network.http.ejection.max_ejection",
        "must be >= base_ejection",
    ),
    (
        r#"{"network":{"http":{"ejection":{"base_ejection":0}}}}"#,
        "network.http.ejection.base_ejection",
        "must be > 0",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","bulkhead":{"max_queue":2000000}}}}}"#,
        "network.api_clients.a.bulkhead.max_queue",
        "must be <= 1048576",
    ),
    (
        r#"{"network":{"http":{"bulkhead":{"max_in_flight":0}}}}"#,
        "network.http.bulkhead.max_in_flight",
        "must be >= 1",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","max_connections":2000000}}}}"#,
        "network.api_clients.a.max_connections",
        "must be <= 1048576",
    ),
    (
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","connect_timeout":0}}}}"#,
        "network.api_clients.a.connect_timeout",
        "must be > 0",
    ),
    (
        r#"{"network":{"http":{"max_response_bytes":0}}}"#,
        "network.http.max_response_bytes",
        "must be >= 1",
    ),
    (
        r#"{"network":{"alerts":{"webhook":{"url":"http://127.0.0.1:9/hook","max_in_flight":2000000}}}}"#,
        "network.alerts.webhook.max_in_flight",
        "must be <= 1048576",
    ),
    (
        r#"{"network":{"websocket":{"max_messages_per_second":1e-300}}}"#,
        "network.websocket.max_messages_per_second",
        "too low",
    ),
    (
        r#"{"network":{"security":{"requests_per_second":1e-8,"request_burst":100}}}"#,
        "network.security.request_burst",
        "too large",
    ),
];

#[test]
fn each_invalid_policy_value_is_refused_at_load_with_its_exact_path() {
    for (json, path, needle) in BAD_POLICIES {
        let (got_path, message) = error_for(json);
        assert_eq!(&got_path, path, "for {json}: {message}");
        assert!(message.starts_with(path), "{message}");
        assert!(message.contains(needle), "for {json}: {message}");
    }
}

/// One validator: the edges the policies accept, loading accepts too, and
/// `Network::start` then starts them (on main, a `budget_ratio` above 1 was
/// refused by the loader that the retry budget accepts).
#[actix_web::test]
async fn what_loads_starts() {
    let accepted = [
        r#"{"network":{"http":{"breaker":{"failure_rate":1,"slow_call_rate":0.01,"window":100000,"minimum_calls":100000,"half_open_probes":10000,"open_duration":86400}}}}"#,
        r#"{"network":{"http":{"retry":{"budget_ratio":1000,"budget_window":0.001,"base_delay":0.001,"max_delay":0.001}}}}"#,
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","rate_limit":1e-6,"rate_burst":1,"cache":{"max_entry_bytes":257,"max_bytes":257}}}}}"#,
        r#"{"network":{"api_clients":{"a":{"base_url":"https://x","rate_limit":6e10}}}}"#,
        r#"{"network":{"websocket":{"max_messages_per_second":1e-6,"message_burst":1}}}"#,
    ];
    for json in accepted {
        let config = Config::from_json_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        if let Err(e) = happynet::Network::start(config) {
            panic!("loaded but did not start: {json}: {e}");
        }
    }
}

#[test]
fn the_policy_defaults_are_the_policies_own() {
    use happynet::actors::backoff::{self, Backoff, RetryBudget};
    use happynet::actors::balancer::EjectionConfig;
    use happynet::actors::breaker::BreakerConfig;
    use happynet::actors::cache::CacheConfig;
    use happynet::config::{BreakerSettings, CacheSettings, EjectionSettings, RetrySettings};
    assert_eq!(
        BreakerSettings::default().breaker_config(),
        BreakerConfig::default()
    );
    let retry = RetrySettings::default();
    assert_eq!(
        Backoff::try_new(retry.base_delay.0, retry.max_delay.0),
        Ok(Backoff::default())
    );
    assert_eq!(retry.budget_ratio, backoff::DEFAULT_RETRY_RATIO);
    assert_eq!(retry.budget_window.0, backoff::DEFAULT_BUDGET_TTL);
    assert_eq!(
        retry.budget_min_per_second,
        backoff::DEFAULT_MIN_RETRIES_PER_SEC
    );
    assert!(RetryBudget::new(retry.budget_window.0, 10, retry.budget_ratio).is_ok());
    assert_eq!(
        EjectionSettings::default().ejection_config(),
        EjectionConfig::default()
    );
    assert_eq!(
        CacheSettings::default().cache_config(),
        CacheConfig::default()
    );
    // The cache's defaults are the ones the README documents for
    // `cache: {}` (on main the cache's own were 32 MiB and 60 s, the
    // loader's 8 MiB and 0).
    let c = CacheConfig::default();
    assert_eq!((c.max_bytes, c.default_ttl), (8 << 20, Duration::ZERO));
}

#[test]
fn the_seed_config_still_loads_with_the_policy_checks() {
    let shared = "/work/shared/config/seed-network.json";
    for path in [
        shared,
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/seed-network.json"
        ),
    ] {
        if path == shared && !std::path::Path::new(path).exists() {
            continue;
        }
        Config::from_file(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}
