//! `network.api_clients.<name>`: the named upstream APIs, with their
//! response `cache` and credential `auth`, and [`UpstreamSettings`], one
//! upstream's settings with every default from `network.http` applied (what
//! the upstream stack is built from, for an API client, the plain
//! `HttpClient`'s origins and the alert webhook alike).

use super::checks::{policy_error, positive, validate_headers, validate_url, ConfigError, Seconds};
use super::cluster::ClusterConfig;
use super::http::{
    default_burst, validate_rate_per_minute, BreakerSettings, BulkheadSettings, EjectionSettings,
    LoadBalancing, RetrySettings,
};
use super::NetworkConfig;
use happynet_actors::cache::{CacheConfig, ResponseCache};
use happynet_actors::pool::PoolConfig;
use happynet_actors::shared_limiter::SharedLimit;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// `network.api_clients.<name>`: a named upstream API. Every key but
/// `base_url` is optional; the unset ones come from `network.http`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiClientConfig {
    /// Where the API lives: `http://` or `https://`, optionally with a path
    /// prefix. Required.
    pub base_url: String,
    /// More endpoints serving the same API, load balanced with `base_url`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Requests per minute. Default 60.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: f64,
    /// Requests that may go at once. Default: ten seconds' worth, at least 1.
    #[serde(default)]
    pub rate_burst: Option<u32>,
    /// Per-attempt timeout, seconds. Default: `network.http.timeout`.
    #[serde(default)]
    pub timeout: Option<Seconds>,
    /// Retries after the first attempt. Default: `network.http.retry_attempts`.
    #[serde(default)]
    pub retry_attempts: Option<u32>,
    /// Overall deadline, seconds. Default: `timeout × (retry_attempts + 1)`.
    #[serde(default)]
    pub deadline: Option<Seconds>,
    /// Default: `network.http.connect_timeout`.
    #[serde(default)]
    pub connect_timeout: Option<Seconds>,
    /// Default: `network.http.max_connections`.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Default: `network.http.wait_for_rate_limit`.
    #[serde(default)]
    pub wait_for_rate_limit: Option<bool>,
    /// Default: `network.http.max_response_bytes`.
    #[serde(default)]
    pub max_response_bytes: Option<usize>,
    /// Default: `network.http.load_balancing`.
    #[serde(default)]
    pub load_balancing: Option<LoadBalancing>,
    /// Default: `network.http.retry`.
    #[serde(default)]
    pub retry: Option<RetrySettings>,
    /// Default: `network.http.breaker`.
    #[serde(default)]
    pub breaker: Option<BreakerSettings>,
    /// Default: `network.http.bulkhead`.
    #[serde(default)]
    pub bulkhead: Option<BulkheadSettings>,
    /// Default: `network.http.ejection`.
    #[serde(default)]
    pub ejection: Option<EjectionSettings>,
    /// How the client authenticates; the secret comes from an environment
    /// variable, never from this file.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// Shorthand for `"auth": {"type": "bearer", "key_env": …}`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Headers sent with every request (e.g. an API version).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A response cache for this client; none when absent.
    #[serde(default)]
    pub cache: Option<CacheSettings>,
    /// Keep `rate_limit` in Redis, so that it holds across every node of the
    /// cluster rather than per node. Requires `network.cluster`. Default
    /// false.
    #[serde(default)]
    pub shared_rate_limit: bool,
}

/// `cache`: a bounded response cache in front of one API client. GET and
/// HEAD requests without a caller's own `Authorization` are cacheable;
/// callers may mark others cacheable with a key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Entries kept. Default 1024.
    pub max_entries: usize,
    /// Bytes kept (bodies, headers and overhead). Default 8 MiB.
    pub max_bytes: usize,
    /// Freshness of a response that gives no `max-age`, seconds. Default 0:
    /// such responses are kept only to be revalidated.
    pub default_ttl: Seconds,
    /// How long past its expiry an entry may still be served when the
    /// upstream fails, seconds. 0 never. Default 300.
    pub stale_if_error: Seconds,
    /// Larger responses are not kept, bytes. Default 1 MiB.
    pub max_entry_bytes: usize,
}

impl CacheSettings {
    /// The cache state machine's settings.
    pub fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            default_ttl: self.default_ttl.0,
            stale_if_error: self.stale_if_error.0,
            max_entry_bytes: self.max_entry_bytes,
        }
    }
}

impl Default for CacheSettings {
    /// The cache's own defaults ([`CacheConfig::default`]): one source of
    /// truth.
    fn default() -> Self {
        let c = CacheConfig::default();
        CacheSettings {
            max_entries: c.max_entries,
            max_bytes: c.max_bytes,
            default_ttl: Seconds(c.default_ttl),
            stale_if_error: Seconds(c.stale_if_error),
            max_entry_bytes: c.max_entry_bytes,
        }
    }
}

/// `auth`: where a client's credential goes. `key_env` names the environment
/// variable that holds the secret.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum AuthConfig {
    /// `Authorization: Bearer <secret>`.
    Bearer {
        /// The variable holding the token.
        key_env: String,
    },
    /// `<name>: <secret>`.
    Header {
        /// The header's name, e.g. `x-api-key`.
        name: String,
        /// The variable holding the key.
        key_env: String,
    },
    /// `?<name>=<secret>` on every request.
    Query {
        /// The query parameter's name, e.g. `api_key`.
        name: String,
        /// The variable holding the key.
        key_env: String,
    },
}

fn default_rate_limit() -> f64 {
    60.0
}

/// One upstream's settings with every default applied: what the client
/// builds its pool, breaker and limiter from.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// The name used in errors, logs and metrics (the `api_clients` key, or
    /// the origin for the plain `HttpClient`).
    pub name: String,
    /// Endpoint base URLs without a trailing slash.
    pub endpoints: Vec<String>,
    /// `rate_limit`: requests per minute.
    pub rate_limit: f64,
    /// Requests that may go at once.
    pub rate_burst: u32,
    /// Whether calls wait for the limiter when the wait fits the deadline.
    pub wait_for_rate_limit: bool,
    /// `timeout`: the per-attempt timeout.
    pub timeout: Duration,
    /// Overall deadline of a call.
    pub deadline: Duration,
    /// Retries after the first attempt.
    pub retry_attempts: u32,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle keep-alive.
    pub keep_alive: Duration,
    /// Connections per endpoint.
    pub max_connections: usize,
    /// Largest response body.
    pub max_response_bytes: usize,
    /// Endpoint selection.
    pub load_balancing: LoadBalancing,
    /// Retry timing and budget.
    pub retry: RetrySettings,
    /// Circuit breaker.
    pub breaker: BreakerSettings,
    /// Calls running at once.
    pub max_in_flight: usize,
    /// Calls waiting for a slot.
    pub max_queue: usize,
    /// Outlier ejection.
    pub ejection: EjectionSettings,
    /// Credential, if any.
    pub auth: Option<AuthConfig>,
    /// Headers sent with every request.
    pub headers: Vec<(String, String)>,
    /// Response cache, if any.
    pub cache: Option<CacheSettings>,
    /// Where the rate limit is kept when it holds across the cluster
    /// (`shared_rate_limit`); `None`: per node.
    pub shared_limit: Option<SharedLimit>,
}

impl UpstreamSettings {
    /// The pool's settings: connections, bulkhead, balancing and ejection,
    /// field by field under the same names (the `bulkhead` block's two keys
    /// are flat in the pool, as they are here).
    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            name: self.name.clone(),
            endpoints: self.endpoints.clone(),
            max_connections: self.max_connections,
            connect_timeout: self.connect_timeout,
            keep_alive: self.keep_alive,
            max_in_flight: self.max_in_flight,
            max_queue: self.max_queue,
            max_response_bytes: self.max_response_bytes,
            load_balancing: self.load_balancing,
            ejection: self.ejection.ejection_config(),
        }
    }
}

/// Where a pool field an API client (or `network.http`) sets sits in the
/// JSON, when that is not the field's own name.
pub(super) const POOL_KEYS: &[(&str, &str)] = &[
    ("max_in_flight", "bulkhead.max_in_flight"),
    ("max_queue", "bulkhead.max_queue"),
];

fn trim_base(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

impl NetworkConfig {
    fn deadline_for(explicit: Option<Seconds>, attempt: Duration, retries: u32) -> Duration {
        explicit.map_or(attempt.saturating_mul(retries.saturating_add(1)), |d| d.0)
    }

    /// The settings of `api_clients.<name>`, with `network.http` filling in
    /// what it leaves out; `None` if there is no such client.
    pub fn api_client(&self, name: &str) -> Option<UpstreamSettings> {
        let c = self.api_clients.get(name)?;
        let h = &self.http;
        let timeout = c.timeout.unwrap_or(h.timeout).0;
        let retry_attempts = c.retry_attempts.unwrap_or(h.retry_attempts);
        let max_connections = c.max_connections.unwrap_or(h.max_connections);
        let bulkhead = c.bulkhead.clone().unwrap_or_else(|| h.bulkhead.clone());
        let mut endpoints = vec![trim_base(&c.base_url)];
        for e in &c.endpoints {
            let e = trim_base(e);
            if !endpoints.contains(&e) {
                endpoints.push(e);
            }
        }
        Some(UpstreamSettings {
            name: name.to_owned(),
            endpoints,
            rate_limit: c.rate_limit,
            rate_burst: c.rate_burst.unwrap_or_else(|| default_burst(c.rate_limit)),
            wait_for_rate_limit: c.wait_for_rate_limit.unwrap_or(h.wait_for_rate_limit),
            timeout,
            deadline: Self::deadline_for(c.deadline.or(h.deadline), timeout, retry_attempts),
            retry_attempts,
            connect_timeout: c.connect_timeout.unwrap_or(h.connect_timeout).0,
            keep_alive: h.keep_alive.0,
            max_connections,
            max_response_bytes: c.max_response_bytes.unwrap_or(h.max_response_bytes),
            load_balancing: c.load_balancing.unwrap_or(h.load_balancing),
            retry: c.retry.clone().unwrap_or_else(|| h.retry.clone()),
            breaker: c.breaker.clone().unwrap_or_else(|| h.breaker.clone()),
            max_in_flight: bulkhead.max_in_flight.unwrap_or(max_connections),
            max_queue: bulkhead.max_queue,
            ejection: c.ejection.clone().unwrap_or_else(|| h.ejection.clone()),
            auth: c.auth.clone().or_else(|| {
                c.api_key_env
                    .clone()
                    // The `openai` client reads OPENAI_API_KEY unless told
                    // otherwise, as OpenAI's own SDKs do.
                    .or_else(|| (name == "openai").then(|| "OPENAI_API_KEY".to_owned()))
                    .map(|key_env| AuthConfig::Bearer { key_env })
            }),
            headers: c
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cache: c.cache.clone(),
            shared_limit: self
                .cluster
                .as_ref()
                .filter(|_| c.shared_rate_limit)
                .and_then(ClusterConfig::shared_limit),
        })
    }

    /// The settings the plain `HttpClient` uses for `origin`
    /// (`scheme://host:port`): all of `network.http`.
    pub fn origin(&self, origin: &str) -> UpstreamSettings {
        let h = &self.http;
        UpstreamSettings {
            name: origin.to_owned(),
            endpoints: vec![trim_base(origin)],
            rate_limit: h.rate_limit,
            rate_burst: h.rate_burst.unwrap_or_else(|| default_burst(h.rate_limit)),
            wait_for_rate_limit: h.wait_for_rate_limit,
            timeout: h.timeout.0,
            deadline: Self::deadline_for(h.deadline, h.timeout.0, h.retry_attempts),
            retry_attempts: h.retry_attempts,
            connect_timeout: h.connect_timeout.0,
            keep_alive: h.keep_alive.0,
            max_connections: h.max_connections,
            max_response_bytes: h.max_response_bytes,
            load_balancing: h.load_balancing,
            retry: h.retry.clone(),
            breaker: h.breaker.clone(),
            max_in_flight: h.bulkhead.max_in_flight.unwrap_or(h.max_connections),
            max_queue: h.bulkhead.max_queue,
            ejection: h.ejection.clone(),
            auth: None,
            headers: Vec::new(),
            cache: None,
            shared_limit: None,
        }
    }
}

impl CacheSettings {
    /// Checked by the cache's own constructor, [`ResponseCache::new`].
    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        ResponseCache::new(self.cache_config())
            .map_err(|e| policy_error(at, e.field(), e.requirement(), &[]))?;
        Ok(())
    }
}

/// Checks an `auth` object at `at`: the variable it names, and the header
/// name of `"type": "header"`.
pub(super) fn validate_auth(at: &str, auth: &AuthConfig) -> Result<(), ConfigError> {
    let (AuthConfig::Bearer { key_env }
    | AuthConfig::Header { key_env, .. }
    | AuthConfig::Query { key_env, .. }) = auth;
    env_var_name(&format!("{at}.key_env"), key_env)?;
    if let AuthConfig::Header { name, .. } = auth {
        if actix_web::http::header::HeaderName::try_from(name.as_str()).is_err() {
            return Err(ConfigError::invalid(
                &format!("{at}.name"),
                "is not a header name",
            ));
        }
    }
    Ok(())
}

/// Whether `var` can name an environment variable.
fn env_var_name(path: &str, var: &str) -> Result<(), ConfigError> {
    if var.is_empty() || var.contains('=') || var.contains('\0') {
        return Err(ConfigError::invalid(
            path,
            "must name an environment variable",
        ));
    }
    Ok(())
}

impl ApiClientConfig {
    /// Checks `network.api_clients.<name>`; `clustered` is whether
    /// `network.cluster` is configured (a shared rate limit needs it).
    pub(super) fn validate(&self, name: &str, clustered: bool) -> Result<(), ConfigError> {
        let at = format!("network.api_clients.{name}");
        let path = |key: &str| format!("{at}.{key}");
        validate_url(&path("base_url"), &self.base_url)?;
        if self.shared_rate_limit && !clustered {
            return Err(ConfigError::invalid(
                &path("shared_rate_limit"),
                "requires network.cluster (the limit is kept in its Redis)",
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            validate_url(&format!("{at}.endpoints[{i}]"), e)?;
        }
        validate_rate_per_minute(&at, self.rate_limit, self.rate_burst)?;
        for (key, value) in [("timeout", self.timeout), ("deadline", self.deadline)] {
            if let Some(v) = value {
                positive(&path(key), v)?;
            }
        }
        // The pool's settings (`max_connections`, `connect_timeout`,
        // `max_response_bytes`, `bulkhead`, `ejection`) are checked by the
        // pool on the resolved settings (`Config::validate`).
        if let Some(r) = &self.retry {
            r.validate(&path("retry"))?;
        }
        if let Some(b) = &self.breaker {
            b.validate(&path("breaker"))?;
        }
        if let Some(c) = &self.cache {
            c.validate(&path("cache"))?;
        }
        if self.auth.is_some() && self.api_key_env.is_some() {
            return Err(ConfigError::invalid(
                &path("api_key_env"),
                "cannot be used together with auth",
            ));
        }
        match (&self.auth, &self.api_key_env) {
            (Some(auth), _) => validate_auth(&path("auth"), auth)?,
            (None, Some(var)) => env_var_name(&path("api_key_env"), var)?,
            (None, None) => {}
        }
        validate_headers(&format!("{at}.headers"), &self.headers)
    }
}
