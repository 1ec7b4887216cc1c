//! What every section of the configuration shares: the error type that
//! names a key's path, the two duration types of the JSON ([`Seconds`] and
//! [`Millis`]), and the checks more than one section runs (URLs, headers,
//! counts, rate quotas, a policy's own error under the config's key).

use happynet_actors::gcra::Quota;
use happynet_actors::pool::PoolConfig;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

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
    pub(super) fn invalid(path: &str, message: impl Into<String>) -> Self {
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

/// The longest duration any key takes: a year. Nothing happynet waits for
/// is longer, and a bound keeps `now + duration` and `timeout × attempts`
/// far from overflowing, which would panic.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let secs = f64::deserialize(d)?;
        match Duration::try_from_secs_f64(secs) {
            Ok(d) if d <= Duration::from_secs(MAX_SECONDS) => Ok(Seconds(d)),
            _ => Err(serde::de::Error::custom(format!(
                "must be a non-negative number of seconds, at most {MAX_SECONDS} (a year), got {secs}"
            ))),
        }
    }
}

impl Seconds {
    /// Whole seconds.
    pub(super) const fn secs(s: u64) -> Self {
        Seconds(Duration::from_secs(s))
    }
}

/// A duration written in the JSON as a whole number of milliseconds: the
/// keys whose names end in `_ms` (`network.cluster`, `network.alerts`). In Rust it is a
/// [`Duration`], as a [`Seconds`] is, so that code never has to remember
/// which unit a key was written in; the field drops the `_ms` suffix and
/// the JSON keeps it (`#[serde(rename = "…_ms")]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub Duration);

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u64::deserialize(d).map(|ms| Millis(Duration::from_millis(ms)))
    }
}

impl Millis {
    /// Whole milliseconds.
    pub(super) const fn ms(ms: u64) -> Self {
        Millis(Duration::from_millis(ms))
    }

    /// The duration in whole milliseconds, as the JSON wrote it.
    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

/// An absolute `http://` or `https://` URL with a host, or an error naming
/// `path`.
pub(super) fn parse_http_url(path: &str, url: &str) -> Result<actix_web::http::Uri, ConfigError> {
    let uri: actix_web::http::Uri = url
        .parse()
        .map_err(|e| ConfigError::invalid(path, format!("is not a URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(ConfigError::invalid(
            path,
            "must be an http:// or https:// URL with a host",
        ));
    }
    Ok(uri)
}

/// Checks every header name and value of a `headers` object.
pub(super) fn validate_headers(
    at: &str,
    headers: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    for (k, v) in headers {
        let at = format!("{at}.{k}");
        if actix_web::http::header::HeaderName::try_from(k.as_str()).is_err() {
            return Err(ConfigError::invalid(&at, "is not a header name"));
        }
        if actix_web::http::header::HeaderValue::try_from(v.as_str()).is_err() {
            return Err(ConfigError::invalid(&at, "is not a valid header value"));
        }
    }
    Ok(())
}

/// An absolute `http://` or `https://` URL with a host and no query string.
pub(super) fn validate_url(path: &str, url: &str) -> Result<(), ConfigError> {
    let uri = parse_http_url(path, url)?;
    if uri.query().is_some() {
        return Err(ConfigError::invalid(path, "must not have a query string"));
    }
    Ok(())
}

/// A number from 0 to 1.
pub(super) fn fraction(path: &str, value: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(path, "must be between 0 and 1"))
    }
}

/// A policy constructor's error, under the key of the field it names: the
/// policy in `happynet_actors` is the one judge of its settings, and the
/// configuration only says where in the JSON they came from. `renames` pairs a
/// policy field with its config key where the two differ.
pub(super) fn policy_error(
    at: &str,
    field: &str,
    requirement: String,
    renames: &[(&str, &str)],
) -> ConfigError {
    let key = renames
        .iter()
        .find(|(policy, _)| *policy == field)
        .map_or(field, |(_, key)| key);
    ConfigError::invalid(&format!("{at}.{key}"), requirement)
}

/// Checks a rate limit with the limiter's own constructor ([`Quota::new`]):
/// `count` per `period` with bursts of `burst`. A bad rate is reported
/// under `rate_path`, a bad burst under `burst_path`.
pub(super) fn validate_quota(
    rate_path: &str,
    burst_path: &str,
    count: f64,
    period: Duration,
    burst: u32,
) -> Result<Quota, ConfigError> {
    Quota::new(count, period, burst).map_err(|e| {
        let path = if e.field() == "burst" {
            burst_path
        } else {
            rate_path
        };
        ConfigError::invalid(path, e.requirement())
    })
}

/// A duration above zero.
pub(super) fn positive(path: &str, value: Seconds) -> Result<(), ConfigError> {
    if value.0.is_zero() {
        Err(ConfigError::invalid(path, "must be > 0"))
    } else {
        Ok(())
    }
}

/// A count of at least one.
pub(super) fn at_least_one(path: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::invalid(path, "must be >= 1"))
    } else {
        Ok(())
    }
}

/// The most connections one upstream endpoint may keep, and the most calls
/// its bulkhead may run or queue: the pool's own bound
/// ([`happynet_actors::pool::MAX_CONNECTIONS`], which says why).
pub use happynet_actors::pool::MAX_CONNECTIONS as MAX_UPSTREAM_CONNECTIONS;

/// Checks an upstream's pool settings with the pool's own judge,
/// [`PoolConfig::validate`]; an error goes under `at`, at the config key of
/// the field it names (`renames` pairs a pool field with its key where the
/// two differ, e.g. `max_queue` is `bulkhead.max_queue` in the JSON).
pub(super) fn validate_pool(
    at: &str,
    pool: &PoolConfig,
    renames: &[(&str, &str)],
) -> Result<(), ConfigError> {
    pool.validate()
        .map_err(|e| policy_error(at, e.field(), e.requirement(), renames))
}
