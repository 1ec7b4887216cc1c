//! Property tests on hostile configuration: random edits of a full, valid
//! `network` object. Whatever the edit, loading either succeeds or fails with
//! an error that names a path under `network`; it never panics. And a
//! configuration that loads must also start, and `net.http()` must be able
//! to build its per-origin policies: a value that passes validation and is
//! then refused by an actor's constructor (or panics there) is a validator
//! that disagrees with its policy.
//!
//! It runs 4,096 cases; the run prints how many edits loaded and how many were refused
//! (`cargo test --test hostile_config -- --nocapture`).

use happynet::{Config, HttpError, Network};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use serde_json::{json, Map, Value};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Every section, with the keys a user is likely to touch, all valid.
fn full_config() -> Value {
    json!({
        "network": {
            "http": {
                "timeout": 30, "max_connections": 100, "retry_attempts": 3,
                "deadline": 100, "connect_timeout": 5, "keep_alive": 30,
                "rate_limit": 6000, "rate_burst": 100, "wait_for_rate_limit": true,
                "max_origins": 64, "max_response_bytes": 1048576,
                "load_balancing": "peak_ewma",
                "retry": {"base_delay": 0.1, "max_delay": 10, "budget_ratio": 0.2,
                          "budget_min_per_second": 10, "budget_window": 10},
                "breaker": {"window": 20, "minimum_calls": 10, "failure_rate": 0.5,
                            "slow_call_rate": 1, "slow_call_duration": 5,
                            "open_duration": 30, "half_open_probes": 3},
                "bulkhead": {"max_in_flight": 100, "max_queue": 100},
                "ejection": {"consecutive_failures": 5, "base_ejection": 30,
                             "max_ejection": 300}
            },
            "websocket": {
                "heartbeat_interval": 30, "max_connections": 1000,
                "max_outbound_bytes": 1048576, "max_message_bytes": 65536,
                "max_messages_per_second": 20, "message_burst": 40,
                "max_rooms_per_session": 16, "max_rooms": 10000,
                "default_room": "lobby", "presence_interval": 1,
                "shutdown_timeout": 5, "tcp_user_timeout": 30,
                "socket_send_buffer": 0, "hub_mailbox_capacity": 65536,
                "session_mailbox_capacity": 8192
            },
            "api_clients": {
                "openai": {
                    "base_url": "https://api.openai.com", "rate_limit": 60, "timeout": 60,
                    "endpoints": ["https://api2.openai.com"],
                    "headers": {"x-app": "happynet"},
                    "auth": {"type": "bearer", "key_env": "HAPPYNET_TEST_UNSET_KEY"},
                    "cache": {"max_entries": 1024, "max_bytes": 8388608, "default_ttl": 0,
                              "stale_if_error": 300, "max_entry_bytes": 1048576},
                    "breaker": {"window": 20, "minimum_calls": 10, "failure_rate": 0.5,
                                "slow_call_rate": 1, "slow_call_duration": 5,
                                "open_duration": 30, "half_open_probes": 3},
                    "retry": {"base_delay": 0.1, "max_delay": 10, "budget_ratio": 0.2,
                              "budget_min_per_second": 10, "budget_window": 10}
                }
            },
            "security": {
                "max_connections_per_ip": 64, "max_tcp_connections_per_ip": 256,
                "connections_per_second": 20, "connection_burst": 40,
                "requests_per_second": 50, "request_burst": 100,
                "max_tracked_ips": 65536, "ws_tokens": [], "allowed_origins": [],
                "request_header_timeout": 5, "request_body_timeout": 30,
                "exempt_ips": ["127.0.0.0/8", "::1"], "trust_forwarded_for": false
            },
            "gateway": {"clients": ["openai"], "tokens": [], "max_body_bytes": 1048576},
            "alerts": {
                "enabled": true, "interval_ms": 1000, "hold_ms": 60000, "history": 50,
                "rules": {
                    "upstream_error_rate": {"threshold": 0.5, "window_ms": 60000,
                                            "min_calls": 20},
                    "slow_consumer_evictions": {"per_minute": 10},
                    "connections_near_max": {"ratio": 0.9}
                }
            }
        }
    })
}

/// A JSON value a hostile or careless user might write anywhere.
fn hostile_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(2),
            Just(i64::MAX),
            Just(i64::MIN),
            any::<i64>()
        ]
        .prop_map(|n| json!(n)),
        Just(json!(u64::MAX)),
        prop_oneof![
            Just(0.0f64),
            Just(-0.5),
            Just(0.5),
            Just(1.0),
            Just(1.5),
            Just(1e-300),
            Just(1e300),
            any::<f64>().prop_filter("finite", |f| f.is_finite())
        ]
        .prop_map(|f| json!(f)),
        prop_oneof![
            Just(String::new()),
            Just("http://".to_owned()),
            Just("https://127.0.0.1:1/x".to_owned()),
            Just("redis://127.0.0.1:1".to_owned()),
            Just("round_robin".to_owned()),
            Just("bearer".to_owned()),
            Just("../../etc".to_owned()),
            Just("\u{0}\u{7f}é✓".to_owned()),
            ".{0,24}"
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// One edit: walk `steps` (each picks a child by index, modulo) from the
/// root, then replace, delete, or add an unknown key at the place reached.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace one leaf (picked uniformly among the full config's leaves) by
    /// a value of the same type at the edge of its range — a number by a
    /// number, a string by a string — which is where a validator and a
    /// constructor disagree.
    Nudge(usize, f64, String),
    Replace(Vec<usize>, Value),
    Delete(Vec<usize>),
    AddKey(Vec<usize>, String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    let steps = prop::collection::vec(any::<usize>(), 1..6);
    let number = prop_oneof![
        Just(0.0),
        Just(1.0),
        Just(-1.0),
        Just(0.5),
        Just(0.999),
        Just(1.001),
        Just(2.0),
        Just(1e-6),
        Just(1e9),
        Just(4294967296.0),
        Just(1e15),
        Just(1e19),
        (0u32..100_000).prop_map(f64::from),
    ];
    let string = prop_oneof![
        Just(String::new()),
        Just("round_robin".to_owned()),
        Just("http://127.0.0.1:1".to_owned()),
        Just("https://[::1]:1/p?q".to_owned()),
        Just("ftp://x".to_owned()),
        Just("a b".to_owned()),
        Just("x".repeat(300)),
    ];
    prop_oneof![
        8 => (any::<usize>(), number, string).prop_map(|(i, n, t)| Edit::Nudge(i, n, t)),
        4 => (steps.clone(), hostile_value()).prop_map(|(s, v)| Edit::Replace(s, v)),
        2 => steps.clone().prop_map(Edit::Delete),
        1 => (steps, "[a-z_]{1,12}", hostile_value()).prop_map(|(s, k, v)| Edit::AddKey(s, k, v)),
    ]
}

/// The key (as a JSON-pointer token) of the child of `v` that `step`
/// selects, if `v` has children.
fn child_token(v: &Value, step: usize) -> Option<String> {
    match v {
        Value::Object(m) if !m.is_empty() => m
            .keys()
            .nth(step % m.len())
            .map(|k| k.replace('~', "~0").replace('/', "~1")),
        Value::Array(a) if !a.is_empty() => Some((step % a.len()).to_string()),
        _ => None,
    }
}

/// JSON pointers to every number and string of `v`.
fn leaves(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                leaves(
                    child,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                leaves(child, format!("{at}/{i}"), out);
            }
        }
        Value::Number(_) | Value::String(_) => out.push(at),
        _ => {}
    }
}

fn nudge(root: &mut Value, pick: usize, number: f64, string: &str) {
    let mut all = Vec::new();
    leaves(root, String::new(), &mut all);
    let Some(place) = all
        .get(pick % all.len().max(1))
        .and_then(|p| root.pointer_mut(p))
    else {
        return;
    };
    *place = match place {
        // Whole numbers stay whole where they were (integer keys refuse
        // fractions, which would only test serde).
        Value::Number(n)
            if !n.is_f64() && number.fract() == 0.0 && (0.0..1.8e19).contains(&number) =>
        {
            json!(number as u64)
        }
        Value::Number(_) => json!(number),
        _ => Value::String(string.to_owned()),
    };
}

fn apply(root: &mut Value, edit: &Edit) {
    let steps = match edit {
        Edit::Nudge(pick, number, string) => return nudge(root, *pick, *number, string),
        Edit::Replace(s, _) | Edit::Delete(s) | Edit::AddKey(s, _, _) => s,
    };
    // Walk down while there are containers: `parent` is where the edit
    // happens, `token` the child of it that the last step picked.
    let mut parent = String::new();
    let mut token = None;
    for &step in steps {
        let Some(here) = root.pointer(&parent) else {
            break;
        };
        let Some(t) = child_token(here, step) else {
            break;
        };
        if let Some(prev) = token.replace(t) {
            parent = format!("{parent}/{prev}");
        }
        let child = root.pointer(&format!("{parent}/{}", token.as_deref().unwrap_or("")));
        if !matches!(child, Some(Value::Object(_) | Value::Array(_))) {
            break;
        }
    }
    let Some(token) = token else {
        return;
    };
    let Some(at) = root.pointer_mut(&parent) else {
        return;
    };
    let place = match at {
        Value::Object(m) => m.get_mut(&token.replace("~1", "/").replace("~0", "~")),
        Value::Array(a) => token.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    };
    if let (Edit::Nudge(_, number, string), Some(place)) = (edit, place) {
        match place {
            // Whole numbers stay whole (integer keys refuse fractions).
            Value::Number(n) if n.is_f64() => *place = json!(number),
            Value::Number(_) if number.fract() == 0.0 && *number >= 0.0 && *number < 1.9e19 => {
                *place = json!(*number as u64)
            }
            Value::Number(_) => *place = json!(number),
            Value::String(_) => *place = Value::String(string.clone()),
            _ => {}
        }
        return;
    }
    let Some(at) = root.pointer_mut(&parent) else {
        return;
    };
    match (edit, at) {
        (Edit::Replace(_, value), Value::Object(m)) => {
            m.insert(token.replace("~1", "/").replace("~0", "~"), value.clone());
        }
        (Edit::Replace(_, value), Value::Array(a)) => {
            if let Some(place) = token.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                *place = value.clone();
            }
        }
        (Edit::Delete(_), Value::Object(m)) => {
            m.remove(&token.replace("~1", "/").replace("~0", "~"));
        }
        (Edit::Delete(_), Value::Array(a)) => {
            if let Some(i) = token.parse::<usize>().ok().filter(|&i| i < a.len()) {
                a.remove(i);
            }
        }
        (Edit::AddKey(_, key, value), Value::Object(m)) => {
            m.insert(key.clone(), value.clone());
        }
        _ => {}
    }
}

/// Starts a `Network` from `config` in a fresh actix System and stops it.
fn starts(config: Config) -> Result<(), String> {
    let system = actix::System::new();
    let result = system.block_on(async move {
        let started = match Network::start(config) {
            // `net.http()` builds its per-origin policies from
            // `network.http` on first use: make that first use now. The
            // call itself goes nowhere (nothing listens on port 9; the
            // deadline is 1 ms), but its policies must be buildable.
            Ok(net) => match net
                .http()
                .get("http://127.0.0.1:9/")
                .deadline(Duration::from_millis(1))
                .send()
                .await
            {
                Err(e @ HttpError::InvalidRequest { .. }) => {
                    Err(format!("net.http() refused its first origin: {e}"))
                }
                _ => Ok(()),
            },
            Err(e) => Err(e.to_string()),
        };
        actix::System::current().stop();
        started
    });
    let _ = system.run();
    result
}

#[test]
fn the_full_config_is_valid_and_starts() {
    let text = full_config().to_string();
    let config = Config::from_json_str(&text).expect("the full config loads");
    starts(config).expect("the full config starts");
}

/// Panics on any thread (an actor's arbiter, say), counted by a hook: a
/// panic there does not fail `Network::start`, but leaves a dead actor.
static PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn any_edit_is_refused_with_a_path_or_loads_and_starts() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let mut runner = TestRunner::new(ProptestConfig {
        // Each case is a load and, when it loads, a start: cheap enough to
        // cover every leaf with every edge value many times over.
        cases: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (accepted, refused) = (Cell::new(0u32), Cell::new(0u32));
    let result = runner.run(&prop::collection::vec(edit(), 1..4), |edits| {
        let mut value = full_config();
        for e in &edits {
            apply(&mut value, e);
        }
        let text = value.to_string();
        let panics_before = PANICS.load(Ordering::SeqCst);
        match Config::from_json_str(&text) {
            Err(e) => {
                refused.set(refused.get() + 1);
                // The path names a real place: `network…`, or a top-level
                // key the edit added.
                let path = e.path().unwrap_or_default();
                let first = path.split(['.', '[']).next().unwrap_or_default();
                prop_assert!(
                    !path.is_empty() && (first == "network" || value.get(first).is_some()),
                    "an error that names no place in the file: {e} (path {path:?})\n{text}"
                );
            }
            Ok(config) => {
                accepted.set(accepted.get() + 1);
                if let Err(e) = starts(config) {
                    prop_assert!(false, "accepted at load but refused at start: {e}\n{text}");
                }
                prop_assert_eq!(
                    PANICS.load(Ordering::SeqCst),
                    panics_before,
                    "a thread panicked while starting\n{}",
                    text
                );
            }
        }
        Ok(())
    });
    println!(
        "hostile config: {} random edits, {} loaded and started, {} refused with a path",
        accepted.get() + refused.get(),
        accepted.get(),
        refused.get()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
