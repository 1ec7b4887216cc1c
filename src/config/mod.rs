//! Configuration: the `network` object of the user's JSON, as plain serde
//! structs with documented defaults and a `validate()` that names the path of
//! whatever is wrong.
//!
//! The user's seed file (kept as `tests/fixtures/seed-network.json` and embedded as [`EMBEDDED_DEFAULT`])
//! loads unchanged: its keys keep their meaning
//! (durations are seconds; `rate_limit` is requests per minute). Every other
//! key is optional. Unknown keys are rejected, so a typo is an error that
//! names its path rather than a setting silently ignored.
//!
//! # Layout
//!
//! One file per section of the JSON, each holding that section's structs,
//! their defaults and their `validate()`:
//!
//! | file | section |
//! |---|---|
//! | [`websocket`] | `network.websocket` (the hub's and each session's settings) |
//! | [`http`] | `network.http`, and the `retry`, `breaker`, `bulkhead` and `ejection` blocks an API client may override |
//! | [`api_clients`] | `network.api_clients.<name>`, with its `cache` and `auth`, and [`UpstreamSettings`] (one upstream with every default applied) |
//! | [`security`] | `network.security`, and the parsers the guards share with it ([`IpRange`], [`check_token`], [`normalize_origin`]) |
//! | [`gateway`] | `network.gateway` |
//! | [`alerts`] | `network.alerts` |
//! | [`cluster`] | `network.cluster`, and [`NodeIdentity`], the one name of this node |
//! | [`checks`] | what every section uses: [`ConfigError`], [`Seconds`], [`Millis`], URL and header checks |
//!
//! This module sits below everything else in the crate: it imports nothing
//! from `crate::`, only `happynet_actors`, whose policies (breaker, backoff,
//! retry budget, cache, rate quota, pool and ejection) are the one judge of their own settings:
//! a section hands its values to the policy's constructor and reports the
//! error under its own key. Every type is re-exported here, so
//! `happynet::config::X` is the path to use.

pub mod alerts;
pub mod api_clients;
pub mod checks;
pub mod cluster;
pub mod gateway;
pub mod http;
pub mod security;
pub mod websocket;

pub use alerts::*;
pub use api_clients::*;
pub use checks::*;
pub use cluster::*;
pub use gateway::*;
pub use http::*;
pub use security::*;
pub use websocket::*;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

/// The configuration the demo server and `Config::default()` start from: the
/// user's seed file, embedded.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-network.json");

/// The whole file: `{"network": {…}}`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Everything happynet reads.
    #[serde(default)]
    pub network: NetworkConfig,
}

/// `network`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// `network.http`: defaults for upstream HTTP calls.
    #[serde(default)]
    pub http: HttpConfig,
    /// `network.websocket`: the real-time side.
    #[serde(default)]
    pub websocket: WebSocketConfig,
    /// `network.api_clients.<name>`: named upstream APIs.
    #[serde(default)]
    pub api_clients: BTreeMap<String, ApiClientConfig>,
    /// `network.gateway`: the OpenAI-compatible gateway routes.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// `network.security`: flood and abuse guards, on by default.
    #[serde(default)]
    pub security: SecurityConfig,
    /// `network.alerts`: alert rules, on by default; the webhook is off
    /// until it has a URL.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// `network.cluster`: scale-out through Redis. Absent or `null` (the
    /// default): a single node.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
}

impl Config {
    /// The embedded default (the user's seed).
    pub fn embedded() -> Self {
        // The embedded file is checked by a unit test; fall back to the
        // built-in defaults rather than panic if it were ever broken.
        Self::from_json_str(EMBEDDED_DEFAULT).unwrap_or_default()
    }

    /// Parses and validates JSON text.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." {
                "config".to_owned()
            } else {
                path
            };
            let inner = e.into_inner();
            // serde_json appends "at line L column C"; keep it, it helps.
            ConfigError::invalid(&path, format!("is invalid: {inner}"))
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text)
    }

    /// Checks every value a type cannot; the error names the key's path.
    /// Each section checks itself (and each policy's settings are checked
    /// by that policy's own constructor); this only says in which order,
    /// and checks what spans sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let network = &self.network;
        network.http.validate()?;
        // An upstream's pool is judged by the pool, on the settings it will
        // be built from. `network.http` comes first, so that a value an
        // API client inherits is reported where it is written.
        validate_pool(
            "network.http",
            &network.origin("network.http").pool_config(),
            POOL_KEYS,
        )?;
        network.websocket.validate()?;
        network.gateway.validate()?;
        network.security.validate()?;
        if let Some(cluster) = &network.cluster {
            cluster.validate()?;
        } else if network.security.shared_rate_limits {
            return Err(ConfigError::invalid(
                "network.security.shared_rate_limits",
                "requires network.cluster (the limits are kept in its Redis)",
            ));
        }
        network.alerts.validate()?;
        // The webhook's own pool keys, with or without a URL; the rest is
        // `network.http`'s, checked above.
        let webhook = network
            .alerts
            .webhook_settings(network, "network.alerts.webhook");
        validate_pool(
            "network.alerts.webhook",
            &webhook.pool_config(),
            &[("max_queue", "max_in_flight")],
        )?;
        for (name, client) in &network.api_clients {
            client.validate(name, network.cluster.is_some())?;
            if let Some(settings) = network.api_client(name) {
                validate_pool(
                    &format!("network.api_clients.{name}"),
                    &settings.pool_config(),
                    POOL_KEYS,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_embedded_default_is_valid_and_is_the_seed() {
        let c = Config::from_json_str(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.network.websocket.heartbeat_interval, Seconds::secs(30));
        assert_eq!(c.network.api_clients["openai"].rate_limit, 60.0);
    }

    #[test]
    fn the_stream_write_timeout_defaults_to_30_s_and_must_be_positive() {
        let c = Config::from_json_str("{}").unwrap();
        assert_eq!(c.network.gateway.stream_write_timeout, Seconds::secs(30));
        let e = Config::from_json_str(r#"{"network":{"gateway":{"stream_write_timeout":0}}}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("network.gateway.stream_write_timeout"),
            "{e}"
        );
    }

    #[test]
    fn client_timeout_defaults_to_twice_the_heartbeat() {
        let c = Config::from_json_str(r#"{"network":{"websocket":{"heartbeat_interval":0.5}}}"#)
            .unwrap();
        assert_eq!(
            c.network.websocket.client_timeout(),
            Duration::from_millis(1000)
        );
    }
}
