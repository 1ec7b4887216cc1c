//! Configuration: the `network` object of the user's JSON, as plain serde
//! structs with documented defaults and a `validate()` that names the path of
//! whatever is wrong.
//!
//! The user's seed file (`tests/fixtures/seed-network.json`) loads unchanged:
//! its keys keep their meaning (durations are seconds; `rate_limit` is
//! requests per minute). Every other key is optional. Unknown keys are
//! rejected, so a typo is an error that names its path rather than a setting
//! silently ignored.

use happynet_actors::gcra::Quota;
use happynet_actors::liveness::EvictionPolicy;
use happynet_actors::{HubConfig, RoomName, SessionConfig};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// The configuration the demo server and `Config::default()` start from: the
/// user's seed file, embedded.
pub const EMBEDDED_DEFAULT: &str = include_str!("default-network.json");

/// Why a configuration could not be used.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The JSON did not match the schema; `path` is where (e.g.
    /// `network.websocket.heartbeat_interval`).
    Invalid {
        /// The dotted path of the offending key.
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(path: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            path: path.to_owned(),
            message: message.into(),
        }
    }

    /// The dotted path of the offending key, if the error is about one.
    pub fn path(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { path, .. } => Some(path),
            ConfigError::Io { .. } => None,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io { path, source } => write!(f, "cannot read config {path}: {source}"),
            ConfigError::Invalid { path, message } => write!(f, "{path} {message}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Io { source, .. } => Some(source),
            ConfigError::Invalid { .. } => None,
        }
    }
}

/// A duration written in the JSON as a number of seconds (fractions allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map(Seconds).map_err(|_| {
            serde::de::Error::custom(format!(
                "must be a non-negative number of seconds, got {secs}"
            ))
        })
    }
}

impl Seconds {
    fn secs(s: u64) -> Self {
        Seconds(Duration::from_secs(s))
    }
}

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
}

/// `network.http`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Per-request timeout, seconds. Default 30.
    pub timeout: Seconds,
    /// Connections kept per upstream. Default 100.
    pub max_connections: usize,
    /// Retries after the first attempt. Default 3.
    pub retry_attempts: u32,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: Seconds::secs(30),
            max_connections: 100,
            retry_attempts: 3,
        }
    }
}

/// `network.websocket`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// How often the hub pings every session, seconds. Default 30.
    pub heartbeat_interval: Seconds,
    /// A session silent for longer is closed (1008), seconds. Default: twice
    /// `heartbeat_interval`.
    pub client_timeout: Option<Seconds>,
    /// Open WebSocket connections; beyond it the upgrade gets HTTP 503.
    /// Default 1000.
    pub max_connections: usize,
    /// Bytes queued for one session and not yet written; beyond it the
    /// session is a slow consumer and is disconnected. Default 1 MiB.
    pub max_outbound_bytes: usize,
    /// The largest message a client may send (frame or reassembled message);
    /// beyond it the connection is closed with 1009. Default 64 KiB. Also the
    /// body limit of `POST /broadcast`.
    pub max_message_bytes: usize,
    /// Data frames per second one client may send; beyond it (and the burst)
    /// the connection is closed with 1008. Default 20.
    pub max_messages_per_second: f64,
    /// How many frames a client may send at once before the rate applies.
    /// Default 40.
    pub message_burst: u32,
    /// Rooms one session may be in. Default 16.
    pub max_rooms_per_session: usize,
    /// Rooms that may exist at once. Default 10000.
    pub max_rooms: usize,
    /// The room a client starts in when `/ws` names none. Default `lobby`.
    pub default_room: String,
    /// How often presence frames go out (when something changed), seconds;
    /// 0 disables them. Default 1.
    pub presence_interval: Seconds,
    /// How long a graceful shutdown waits for clients to close, seconds.
    /// Default 5.
    pub shutdown_timeout: Seconds,
    /// `TCP_USER_TIMEOUT` on accepted sockets, seconds: the kernel aborts a
    /// connection whose sent data stays unacknowledged this long (a client
    /// that vanished or stopped reading). 0 leaves the kernel default.
    /// Default 30.
    pub tcp_user_timeout: Seconds,
    /// `SO_SNDBUF` for accepted sockets, bytes; 0 leaves the kernel's
    /// auto-tuning. Default 0.
    pub socket_send_buffer: usize,
    /// Messages the hub's mailbox holds from sessions before it tells a
    /// client its message was dropped. Default 65536.
    pub hub_mailbox_capacity: usize,
    /// Messages queued for one session before it counts as a slow consumer
    /// (in addition to `max_outbound_bytes`). Default 8192.
    pub session_mailbox_capacity: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            heartbeat_interval: Seconds::secs(30),
            client_timeout: None,
            max_connections: 1000,
            max_outbound_bytes: 1 << 20,
            max_message_bytes: 64 << 10,
            max_messages_per_second: 20.0,
            message_burst: 40,
            max_rooms_per_session: 16,
            max_rooms: 10_000,
            default_room: "lobby".to_owned(),
            presence_interval: Seconds::secs(1),
            shutdown_timeout: Seconds::secs(5),
            tcp_user_timeout: Seconds::secs(30),
            socket_send_buffer: 0,
            hub_mailbox_capacity: 65_536,
            session_mailbox_capacity: 8192,
        }
    }
}

impl WebSocketConfig {
    /// `client_timeout`, or twice `heartbeat_interval` when it is not set.
    pub fn client_timeout(&self) -> Duration {
        self.client_timeout
            .map_or(self.heartbeat_interval.0 * 2, |s| s.0)
    }

    /// The hub's settings.
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            heartbeat_interval: self.heartbeat_interval.0,
            eviction: EvictionPolicy {
                client_timeout: self.client_timeout(),
                max_outbound_bytes: self.max_outbound_bytes,
            },
            max_rooms_per_session: self.max_rooms_per_session,
            max_rooms: self.max_rooms,
            presence_interval: self.presence_interval.0,
            shutdown_timeout: self.shutdown_timeout.0,
            mailbox_capacity: self.hub_mailbox_capacity,
            default_room: self.default_room(),
        }
    }

    /// Each session's limits.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            max_message_bytes: self.max_message_bytes,
            // validate() has checked the rate and burst.
            inbound: Quota::per_second(self.max_messages_per_second, self.message_burst)
                .unwrap_or_else(|_| Quota::per_second(20.0, 40).unwrap_or_else(|_| unreachable!())),
            mailbox_capacity: self.session_mailbox_capacity,
        }
    }

    /// The default room as a validated name.
    pub fn default_room(&self) -> RoomName {
        RoomName::new(&self.default_room)
            .unwrap_or_else(|_| RoomName::new("lobby").unwrap_or_else(|_| unreachable!()))
    }
}

/// `network.api_clients.<name>`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClientConfig {
    /// Where the API lives, `http://` or `https://`. Required.
    pub base_url: String,
    /// Requests per minute. Default 60.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: f64,
    /// Per-request timeout, seconds. Default: `network.http.timeout`.
    #[serde(default)]
    pub timeout: Option<Seconds>,
}

fn default_rate_limit() -> f64 {
    60.0
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
            ConfigError::invalid(&path, format!(": {inner}"))
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        let http = &self.network.http;
        positive("network.http.timeout", http.timeout)?;
        at_least_one("network.http.max_connections", http.max_connections)?;

        let ws = &self.network.websocket;
        positive(
            "network.websocket.heartbeat_interval",
            ws.heartbeat_interval,
        )?;
        if let Some(t) = ws.client_timeout {
            positive("network.websocket.client_timeout", t)?;
            if t < ws.heartbeat_interval {
                return Err(ConfigError::invalid(
                    "network.websocket.client_timeout",
                    "must be >= network.websocket.heartbeat_interval",
                ));
            }
        }
        at_least_one("network.websocket.max_connections", ws.max_connections)?;
        at_least_one("network.websocket.max_message_bytes", ws.max_message_bytes)?;
        if ws.max_outbound_bytes < ws.max_message_bytes {
            return Err(ConfigError::invalid(
                "network.websocket.max_outbound_bytes",
                "must be >= network.websocket.max_message_bytes",
            ));
        }
        if !(ws.max_messages_per_second.is_finite() && ws.max_messages_per_second > 0.0) {
            return Err(ConfigError::invalid(
                "network.websocket.max_messages_per_second",
                "must be > 0",
            ));
        }
        at_least_one("network.websocket.message_burst", ws.message_burst as usize)?;
        at_least_one(
            "network.websocket.max_rooms_per_session",
            ws.max_rooms_per_session,
        )?;
        at_least_one("network.websocket.max_rooms", ws.max_rooms)?;
        RoomName::new(&ws.default_room).map_err(|e| {
            ConfigError::invalid("network.websocket.default_room", format!("is invalid: {e}"))
        })?;
        at_least_one(
            "network.websocket.hub_mailbox_capacity",
            ws.hub_mailbox_capacity,
        )?;
        at_least_one(
            "network.websocket.session_mailbox_capacity",
            ws.session_mailbox_capacity,
        )?;

        for (name, client) in &self.network.api_clients {
            let path = |key: &str| format!("network.api_clients.{name}.{key}");
            let uri: actix_web::http::Uri = client.base_url.parse().map_err(|e| {
                ConfigError::invalid(&path("base_url"), format!("is not a URL: {e}"))
            })?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(ConfigError::invalid(
                    &path("base_url"),
                    "must be an http:// or https:// URL with a host",
                ));
            }
            if !(client.rate_limit.is_finite() && client.rate_limit > 0.0) {
                return Err(ConfigError::invalid(&path("rate_limit"), "must be > 0"));
            }
            if let Some(t) = client.timeout {
                positive(&path("timeout"), t)?;
            }
        }
        Ok(())
    }
}

fn positive(path: &str, value: Seconds) -> Result<(), ConfigError> {
    if value.0.is_zero() {
        Err(ConfigError::invalid(path, "must be > 0"))
    } else {
        Ok(())
    }
}

fn at_least_one(path: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::invalid(path, "must be >= 1"))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid_and_is_the_seed() {
        let c = Config::from_json_str(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.network.websocket.heartbeat_interval, Seconds::secs(30));
        assert_eq!(c.network.api_clients["openai"].rate_limit, 60.0);
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
