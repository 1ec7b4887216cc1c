//! Configuration: the `network` object of the user's JSON, as plain serde
//! structs with documented defaults and a `validate()` that names the path of
//! whatever is wrong.
//!
//! The user's seed file (`tests/fixtures/seed-network.json`) loads unchanged:
//! its keys keep their meaning (durations are seconds; `rate_limit` is
//! requests per minute). Every other key is optional. Unknown keys are
//! rejected, so a typo is an error that names its path rather than a setting
//! silently ignored.

use happynet_actors::backoff::{self, Backoff, RetryBudget};
use happynet_actors::breaker::{Breaker, BreakerConfig};
use happynet_actors::cache::ResponseCache;
use happynet_actors::gcra::Quota;
use happynet_actors::liveness::{
    EvictionPolicy, MAX_ENVELOPE_BYTES, OUTBOUND_HEADROOM_MESSAGES, PER_MESSAGE_OVERHEAD,
};
use happynet_actors::presence::PresenceLimits;
use happynet_actors::shared_limiter::{Fallback, SharedLimit};
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

/// `network.cluster`: several nodes sharing broadcasts, presence and rate
/// limits through one Redis (see `crate::cluster`). Only `redis_url` is
/// required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The Redis every node of the cluster uses: `redis://[:password@]host:port[/db]`.
    /// Required.
    pub redis_url: String,
    /// The first part of every Redis key (`{prefix}:broadcasts`, …); nodes
    /// with the same prefix form one cluster. Default `happynet`.
    pub prefix: String,
    /// This node's name in presence keys and logs. Default: 16 random hex
    /// digits per start. A configured name gets a random suffix on the
    /// broadcast stream, so a restarted node is never mistaken for its past
    /// self.
    pub node_id: Option<String>,
    /// Entries the broadcast stream keeps (`XADD MAXLEN ~`): the window a
    /// node that lost its link can replay. Default 100000.
    pub stream_max_len: usize,
    /// Broadcasts for other nodes kept while the link is down; beyond it the
    /// oldest are dropped, counted and logged. Default 10000.
    pub outbox_max: usize,
    /// The payload bytes the outbox may hold, whatever the count; the
    /// oldest are dropped (and counted) beyond it. Default 67108864 (64 MiB).
    pub outbox_max_bytes: usize,
    /// Stream entries read per `XREAD`. Default 512.
    pub read_batch: usize,
    /// The first wait before reconnecting, milliseconds. Default 100.
    pub reconnect_min_ms: u64,
    /// The longest wait between reconnection attempts, milliseconds.
    /// Default 5000.
    pub reconnect_max_ms: u64,
    /// How often each node publishes its room occupancy and reads the
    /// others', milliseconds; 0 turns cross-node presence off. Default 1000.
    pub presence_interval_ms: u64,
    /// What a shared rate limit does when Redis does not answer in time:
    /// `"local"` (this node's own limiter), `"deny"` or `"allow"`. Default
    /// `"local"`.
    pub limiter_fallback: Fallback,
    /// How long a shared rate-limit check waits for Redis, milliseconds.
    /// Default 50.
    pub limiter_timeout_ms: u64,
    /// Whether `/ready` answers 503 while the link to Redis is down. Default
    /// true: a node that cannot reach the others is not fully serving. Set
    /// it false when a Redis outage should not pull every node out of the
    /// load balancer at once (local delivery goes on either way).
    pub ready_requires_link: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: String::new(),
            prefix: "happynet".to_owned(),
            node_id: None,
            stream_max_len: 100_000,
            outbox_max: 10_000,
            outbox_max_bytes: 64 << 20,
            read_batch: 512,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5_000,
            presence_interval_ms: 1_000,
            limiter_fallback: Fallback::Local,
            limiter_timeout_ms: 50,
            ready_requires_link: true,
        }
    }
}

/// The longest `network.cluster.prefix` and `node_id`.
const MAX_CLUSTER_NAME: usize = 64;

fn cluster_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > MAX_CLUSTER_NAME {
        return Err(ConfigError::invalid(
            path,
            format!("must be 1 to {MAX_CLUSTER_NAME} characters"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(ConfigError::invalid(
            path,
            "may only contain ASCII letters, digits, '_', '-' and '.'",
        ));
    }
    Ok(())
}

impl ClusterConfig {
    /// Checks `network.cluster`; the error names the key's path.
    fn validate(&self) -> Result<(), ConfigError> {
        let path = |key: &str| format!("network.cluster.{key}");
        if self.redis_url.is_empty() {
            return Err(ConfigError::invalid(
                &path("redis_url"),
                "is required (e.g. \"redis://127.0.0.1:6379\")",
            ));
        }
        redis::Client::open(self.redis_url.as_str()).map_err(|e| {
            ConfigError::invalid(&path("redis_url"), format!("is not a Redis URL: {e}"))
        })?;
        cluster_name(&path("prefix"), &self.prefix)?;
        if let Some(id) = &self.node_id {
            cluster_name(&path("node_id"), id)?;
        }
        at_least_one(&path("stream_max_len"), self.stream_max_len)?;
        at_least_one(&path("outbox_max"), self.outbox_max)?;
        at_least_one(&path("outbox_max_bytes"), self.outbox_max_bytes)?;
        at_least_one(&path("read_batch"), self.read_batch)?;
        at_least_one(&path("reconnect_min_ms"), self.reconnect_min_ms as usize)?;
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(ConfigError::invalid(
                &path("reconnect_max_ms"),
                "must be >= network.cluster.reconnect_min_ms",
            ));
        }
        at_least_one(
            &path("limiter_timeout_ms"),
            self.limiter_timeout_ms as usize,
        )
    }

    /// The Redis side of a shared rate limit (`shared_rate_limit`,
    /// `shared_rate_limits`).
    pub fn shared_limit(&self) -> Option<SharedLimit> {
        SharedLimit::new(
            &self.redis_url,
            self.prefix.clone(),
            self.limiter_fallback,
            Duration::from_millis(self.limiter_timeout_ms),
        )
        .ok()
    }
}

/// `network.alerts`: rules over the node's own counters (see
/// `crate::alerts`). Each firing and resolving is logged, kept in a bounded
/// history and, with `webhook.url`, POSTed as JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Whether the rules are evaluated at all. Default true.
    pub enabled: bool,
    /// How often the rules are evaluated, milliseconds: at most 60000 (the
    /// `slow_consumer_evictions` window) and at most
    /// `rules.upstream_error_rate.window_ms`, so that no window stretches to
    /// the interval. Default 1000.
    pub interval_ms: u64,
    /// How long after resolving a rule may not fire again for the same
    /// subject, milliseconds, measured from the resolve even if the condition
    /// came back in between: a flapping condition alerts once per hold, not
    /// once per flap. 0: no hold. Default 60000.
    pub hold_ms: u64,
    /// Events kept for `Network::recent_alerts`. Default 50.
    pub history: usize,
    /// Where events are POSTed.
    pub webhook: WebhookConfig,
    /// The rules.
    pub rules: AlertRulesConfig,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            enabled: true,
            interval_ms: 1000,
            hold_ms: 60_000,
            history: 50,
            webhook: WebhookConfig::default(),
            rules: AlertRulesConfig::default(),
        }
    }
}

/// The most events `network.alerts.history` may keep.
pub const MAX_ALERT_HISTORY: usize = 10_000;

/// `network.alerts.webhook`: an upstream like the API clients (pool,
/// breaker, limiter, retries with backoff and jitter, deadline), with
/// `network.http` filling in what is not set here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// The `http://` or `https://` URL events are POSTed to; none (the
    /// default) turns the webhook off.
    pub url: Option<String>,
    /// Per-attempt timeout, milliseconds. Default 2000.
    pub timeout_ms: u64,
    /// Retries after the first attempt. Default 3.
    pub retry_attempts: u32,
    /// Overall deadline of one POST, retries included, milliseconds.
    /// Default: `timeout_ms × (retry_attempts + 1)`.
    pub deadline_ms: Option<u64>,
    /// POSTs in flight at once; further events wait in a bounded queue
    /// (`crate::alerts::WEBHOOK_QUEUE`). Default 4.
    pub max_in_flight: usize,
    /// Headers sent with every POST.
    pub headers: BTreeMap<String, String>,
    /// How the POST authenticates; the secret comes from an environment
    /// variable. Default none.
    pub auth: Option<AuthConfig>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: None,
            timeout_ms: 2000,
            retry_attempts: 3,
            deadline_ms: None,
            max_in_flight: 4,
            headers: BTreeMap::new(),
            auth: None,
        }
    }
}

/// `network.alerts.rules`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertRulesConfig {
    /// An API client's breaker opened.
    pub breaker_open: BreakerOpenRule,
    /// An API client's failure ratio over a window.
    pub upstream_error_rate: ErrorRateRule,
    /// Slow-consumer evictions in the last minute.
    pub slow_consumer_evictions: EvictionsRule,
    /// Open WebSockets near `network.websocket.max_connections`.
    pub connections_near_max: ConnectionsRule,
}

/// `network.alerts.rules.breaker_open`: fires when an API client's breaker
/// opens (even if it closed again before the next evaluation); resolves
/// when it is closed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerOpenRule {
    /// Default true.
    pub enabled: bool,
}

impl Default for BreakerOpenRule {
    fn default() -> Self {
        BreakerOpenRule { enabled: true }
    }
}

/// `network.alerts.rules.upstream_error_rate`: fires when failures ÷ calls
/// of an API client over the last `window_ms` reach `threshold`, once the
/// window holds `min_calls` calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorRateRule {
    /// Default true.
    pub enabled: bool,
    /// Failure ratio (0–1) that fires. Default 0.5.
    pub threshold: f64,
    /// The window, milliseconds. Default 60000.
    pub window_ms: u64,
    /// Calls the window needs before the ratio means anything; fewer never
    /// fire (and resolve a firing alert). Default 20.
    pub min_calls: u64,
}

impl ErrorRateRule {
    /// `window_ms` as a duration.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }
}

impl Default for ErrorRateRule {
    fn default() -> Self {
        ErrorRateRule {
            enabled: true,
            threshold: 0.5,
            window_ms: 60_000,
            min_calls: 20,
        }
    }
}

/// `network.alerts.rules.slow_consumer_evictions`: fires when the hub
/// evicted at least `per_minute` slow consumers in the last minute.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvictionsRule {
    /// Default true.
    pub enabled: bool,
    /// Evictions in the last minute that fire. Default 10.
    pub per_minute: u64,
}

impl Default for EvictionsRule {
    fn default() -> Self {
        EvictionsRule {
            enabled: true,
            per_minute: 10,
        }
    }
}

/// `network.alerts.rules.connections_near_max`: fires when open WebSockets
/// reach `ratio × network.websocket.max_connections`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsRule {
    /// Default true.
    pub enabled: bool,
    /// Fraction (0–1, above 0) of `max_connections`. Default 0.9.
    pub ratio: f64,
}

impl Default for ConnectionsRule {
    fn default() -> Self {
        ConnectionsRule {
            enabled: true,
            ratio: 0.9,
        }
    }
}

impl AlertsConfig {
    /// Checks `network.alerts`; the error names the key's path.
    fn validate(&self) -> Result<(), ConfigError> {
        let path = |key: &str| format!("network.alerts.{key}");
        millis(&path("interval_ms"), self.interval_ms)?;
        millis(&path("hold_ms"), self.hold_ms.max(1))?;
        at_least_one(&path("history"), self.history)?;
        if self.history > MAX_ALERT_HISTORY {
            return Err(ConfigError::invalid(
                &path("history"),
                format!("must be <= {MAX_ALERT_HISTORY}"),
            ));
        }
        let w = &self.webhook;
        if let Some(url) = &w.url {
            validate_webhook_url(&path("webhook.url"), url)?;
        }
        millis(&path("webhook.timeout_ms"), w.timeout_ms)?;
        if let Some(d) = w.deadline_ms {
            millis(&path("webhook.deadline_ms"), d)?;
        }
        at_least_one(&path("webhook.max_in_flight"), w.max_in_flight)?;
        validate_headers(&path("webhook.headers"), &w.headers)?;
        if let Some(auth) = &w.auth {
            validate_auth(&path("webhook.auth"), auth)?;
        }
        let r = &self.rules.upstream_error_rate;
        let at = "rules.upstream_error_rate";
        fraction(&path(&format!("{at}.threshold")), r.threshold)?;
        millis(&path(&format!("{at}.window_ms")), r.window_ms)?;
        // A window can only be judged as finely as the rules look: with a
        // longer interval it would silently stretch to the interval.
        let evictions_window = crate::alerts::EVICTIONS_WINDOW.as_millis();
        if u128::from(self.interval_ms) > evictions_window {
            return Err(ConfigError::invalid(
                &path("interval_ms"),
                format!("must be <= {evictions_window} (the slow_consumer_evictions window)"),
            ));
        }
        if self.interval_ms > r.window_ms {
            return Err(ConfigError::invalid(
                &path("interval_ms"),
                format!("must be <= network.alerts.{at}.window_ms ({})", r.window_ms),
            ));
        }
        if r.min_calls == 0 {
            return Err(ConfigError::invalid(
                &path(&format!("{at}.min_calls")),
                "must be >= 1",
            ));
        }
        if self.rules.slow_consumer_evictions.per_minute == 0 {
            return Err(ConfigError::invalid(
                &path("rules.slow_consumer_evictions.per_minute"),
                "must be >= 1",
            ));
        }
        let ratio = self.rules.connections_near_max.ratio;
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(ConfigError::invalid(
                &path("rules.connections_near_max.ratio"),
                "must be above 0 and at most 1",
            ));
        }
        Ok(())
    }

    /// `interval_ms` as a duration.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// `hold_ms` as a duration.
    pub fn hold(&self) -> Duration {
        Duration::from_millis(self.hold_ms)
    }

    /// The webhook's upstream settings: `network.http` for the URL's origin,
    /// with this section's timeout, retries, deadline, bulkhead, headers and
    /// auth. `None` without a URL (or with one `validate` refuses).
    pub fn webhook_upstream(&self, network: &NetworkConfig) -> Option<UpstreamSettings> {
        let w = &self.webhook;
        let uri: actix_web::http::Uri = w.url.as_deref()?.parse().ok()?;
        let origin = format!("{}://{}", uri.scheme_str()?, uri.authority()?);
        let mut settings = network.origin(&origin);
        settings.name = WEBHOOK_UPSTREAM.to_owned();
        let timeout = Duration::from_millis(w.timeout_ms);
        settings.attempt_timeout = timeout;
        settings.retry_attempts = w.retry_attempts;
        settings.deadline = w.deadline_ms.map_or_else(
            || timeout.saturating_mul(w.retry_attempts.saturating_add(1)),
            Duration::from_millis,
        );
        settings.max_in_flight = w.max_in_flight;
        // Nothing waits in the bulkhead: the alert actor never has more than
        // `max_in_flight` POSTs out.
        settings.max_queue = w.max_in_flight;
        settings.headers = w
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        settings.auth = w.auth.clone();
        Some(settings)
    }
}

/// The longest duration an `_ms` key of `network.alerts` takes: one day.
/// Longer would mean "never", and timers would overflow.
pub const MAX_ALERT_MILLIS: u64 = 86_400_000;

/// Checks a duration in milliseconds: 1 to [`MAX_ALERT_MILLIS`].
fn millis(path: &str, value: u64) -> Result<(), ConfigError> {
    if (1..=MAX_ALERT_MILLIS).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            path,
            format!("must be between 1 and {MAX_ALERT_MILLIS} (one day)"),
        ))
    }
}

/// The name of the webhook's upstream in logs and errors.
pub const WEBHOOK_UPSTREAM: &str = "alerts.webhook";

/// Like [`validate_url`], but a query string is allowed: many webhook
/// services put a routing key there.
fn validate_webhook_url(path: &str, url: &str) -> Result<(), ConfigError> {
    parse_http_url(path, url).map(|_| ())
}

/// An absolute `http://` or `https://` URL with a host, or an error naming
/// `path`.
fn parse_http_url(path: &str, url: &str) -> Result<actix_web::http::Uri, ConfigError> {
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

fn validate_headers(at: &str, headers: &BTreeMap<String, String>) -> Result<(), ConfigError> {
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

fn validate_auth(at: &str, auth: &AuthConfig) -> Result<(), ConfigError> {
    let (AuthConfig::Bearer { key_env }
    | AuthConfig::Header { key_env, .. }
    | AuthConfig::Query { key_env, .. }) = auth;
    if key_env.is_empty() || key_env.contains('=') || key_env.contains('\0') {
        return Err(ConfigError::invalid(
            &format!("{at}.key_env"),
            "must name an environment variable",
        ));
    }
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

/// `network.gateway`: `POST /v1/chat/completions` and `GET /v1/models`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The API clients to forward to, in order: the first is used while it
    /// answers; the next when it is open, limited, overloaded or failing.
    /// Default `["openai"]`.
    pub clients: Vec<String>,
    /// Bearer tokens the gateway's own callers must present (separate from
    /// any upstream key). Empty: no token is required (a warning says so).
    pub tokens: Vec<String>,
    /// The largest request body, bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// How long a streamed answer's reader may take nothing, once the
    /// buffers between it and the upstream are full, before the upstream
    /// call is abandoned (its connection and bulkhead slot freed, the
    /// reader's connection cut, `happynet_upstream_stream_write_timeouts_total`
    /// counted), seconds; > 0. Default 30.
    pub stream_write_timeout: Seconds,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            clients: vec!["openai".to_owned()],
            tokens: Vec::new(),
            max_body_bytes: 1 << 20,
            stream_write_timeout: Seconds::secs(30),
        }
    }
}

/// `network.security`: flood and abuse guards (see `crate::security`). Every
/// guard is on by default; a per-IP limit or timeout set to 0 turns that one
/// guard off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Open WebSockets per client IP; beyond it the upgrade gets 429 before
    /// it happens. 0: no per-IP cap. Default 64.
    pub max_connections_per_ip: usize,
    /// Open TCP connections per client IP, any route, enforced by
    /// `Network::on_connect` (the connection is shut at once). 0: no cap.
    /// Not applied with `trust_forwarded_for` (the peer is then a proxy).
    /// Default 256.
    pub max_tcp_connections_per_ip: usize,
    /// New WebSocket upgrades per second per client IP (refused attempts
    /// count too); beyond it (and the burst) 429 + `Retry-After`. 0: no
    /// limit. Default 20.
    pub connections_per_second: f64,
    /// Upgrades one IP may make at once before the rate applies. Default 40.
    pub connection_burst: u32,
    /// Requests per second per client IP on the API routes (`POST
    /// /broadcast`, `/proxy/…`, `/v1/…`); beyond it 429 + `Retry-After`. 0: no
    /// limit. Default 50.
    pub requests_per_second: f64,
    /// Requests one IP may make at once before the rate applies. Default 100.
    pub request_burst: u32,
    /// Client IPs each per-IP rate limiter tracks at once (idle ones are
    /// evicted); a new IP beyond it gets 429 until room is made. Default
    /// 65536.
    pub max_tracked_ips: usize,
    /// Tokens `/ws` requires, one of them per upgrade (`?token=`,
    /// `Sec-WebSocket-Protocol: happynet, token.<token>` or `Authorization:
    /// Bearer`). Empty: no token is required. Default empty.
    pub ws_tokens: Vec<String>,
    /// Tokens `POST /broadcast` requires (`Authorization: Bearer <token>`;
    /// 401 without one). Empty: no token is required. Default empty.
    pub broadcast_tokens: Vec<String>,
    /// Tokens `GET /status` requires (`Authorization: Bearer <token>`).
    /// Empty: none. Default empty.
    pub status_tokens: Vec<String>,
    /// Tokens `GET /metrics` requires (`Authorization: Bearer <token>`, as
    /// Prometheus' `authorization` scrape setting sends it). Empty: none.
    /// Default empty.
    pub metrics_tokens: Vec<String>,
    /// The shortest time between two snapshots of the node behind
    /// `/status` (and, separately, `/metrics`), seconds: requests that
    /// arrive meanwhile wait for the next one and share it, so a flood costs
    /// the hub one question per interval. Each answer is taken after its
    /// request arrived. 0: no spacing (one snapshot at a time, shared by
    /// the requests waiting for it). At most 10. Default 0.25.
    pub snapshot_interval: Seconds,
    /// Origins (`scheme://host[:port]`) a browser may come from, besides the
    /// server's own: a `/ws` upgrade from another origin gets 403 when the
    /// list is not empty, and a state-changing request (`POST /broadcast`,
    /// a non-GET `/proxy/…` or `/v1/…`, any route behind `api_guard`) from
    /// neither the server's own origin nor one of these always does.
    /// Requests without `Origin` (non-browser clients) are allowed. Default
    /// empty.
    pub allowed_origins: Vec<String>,
    /// How long a client has to send a connection's first request head,
    /// seconds; then 408 and the connection is closed. The app applies it:
    /// `HttpServer::client_request_timeout(net.security()
    /// .request_header_timeout())`. 0: no timeout. Default 5.
    pub request_header_timeout: Seconds,
    /// How long a client has to send a request body on the API routes,
    /// seconds, from the end of its head; then 408 and the connection is
    /// closed. 0: no timeout. Default 30.
    pub request_body_timeout: Seconds,
    /// Addresses and CIDR ranges the per-IP limits do not apply to (token,
    /// origin and timeouts still do). Unset: `["127.0.0.0/8", "::1"]`
    /// ([`DEFAULT_EXEMPT_IPS`]), a local tool is not one client — but behind
    /// a reverse proxy on the same host every client is 127.0.0.1, so the
    /// guards then limit nobody, and a warning says so at start unless
    /// `trust_forwarded_for` is set or this key is written out (even as the
    /// same list, or `[]`): see [`SecurityConfig::exempt_ips`].
    pub exempt_ips: Option<Vec<String>>,
    /// Take the client IP from the last `X-Forwarded-For` entry rather than
    /// the peer address. Only for servers reachable solely through a proxy
    /// that appends it. Default false.
    pub trust_forwarded_for: bool,
    /// Keep the per-IP connection and request rates in Redis, so that they
    /// hold across every node of the cluster rather than per node. Requires
    /// `network.cluster`. Default false.
    pub shared_rate_limits: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            max_connections_per_ip: 64,
            max_tcp_connections_per_ip: 256,
            connections_per_second: 20.0,
            connection_burst: 40,
            requests_per_second: 50.0,
            request_burst: 100,
            max_tracked_ips: 65_536,
            ws_tokens: Vec::new(),
            broadcast_tokens: Vec::new(),
            status_tokens: Vec::new(),
            metrics_tokens: Vec::new(),
            snapshot_interval: Seconds(DEFAULT_SNAPSHOT_INTERVAL),
            allowed_origins: Vec::new(),
            request_header_timeout: Seconds::secs(5),
            request_body_timeout: Seconds::secs(30),
            exempt_ips: None,
            trust_forwarded_for: false,
            shared_rate_limits: false,
        }
    }
}

/// What `network.security.exempt_ips` is when the file does not set it.
pub const DEFAULT_EXEMPT_IPS: [&str; 2] = ["127.0.0.0/8", "::1"];

/// `network.security.snapshot_interval`'s default: a dashboard polling
/// every second never waits, a flood costs four snapshots a second.
pub const DEFAULT_SNAPSHOT_INTERVAL: Duration = Duration::from_millis(250);

/// The longest `network.security.snapshot_interval`: a request may wait
/// this long for its snapshot, which must stay well inside any client's
/// timeout.
pub const MAX_SNAPSHOT_INTERVAL: Duration = Duration::from_secs(10);

impl SecurityConfig {
    /// The ranges the per-IP limits skip: `exempt_ips`, or
    /// [`DEFAULT_EXEMPT_IPS`] when it is unset.
    pub fn effective_exempt_ips(&self) -> Vec<String> {
        self.exempt_ips
            .clone()
            .unwrap_or_else(|| DEFAULT_EXEMPT_IPS.iter().map(|r| (*r).to_owned()).collect())
    }

    /// Checks `network.security`; the error names the key's path.
    fn validate(&self) -> Result<(), ConfigError> {
        let path = |key: &str| format!("network.security.{key}");
        if self.max_tcp_connections_per_ip > 0
            && self.max_tcp_connections_per_ip < self.max_connections_per_ip
        {
            return Err(ConfigError::invalid(
                &path("max_tcp_connections_per_ip"),
                "must be >= network.security.max_connections_per_ip (or 0)",
            ));
        }
        for (rate, rate_key, burst, burst_key) in [
            (
                self.connections_per_second,
                "connections_per_second",
                self.connection_burst,
                "connection_burst",
            ),
            (
                self.requests_per_second,
                "requests_per_second",
                self.request_burst,
                "request_burst",
            ),
        ] {
            if !(rate.is_finite() && rate >= 0.0) {
                return Err(ConfigError::invalid(
                    &path(rate_key),
                    "must be >= 0 (0: no limit)",
                ));
            }
            // 0 turns the limit off; any other rate is the limiter's to judge.
            if rate > 0.0 {
                validate_quota(
                    &path(rate_key),
                    &path(burst_key),
                    rate,
                    Duration::from_secs(1),
                    burst,
                )?;
            }
        }
        at_least_one(&path("max_tracked_ips"), self.max_tracked_ips)?;
        for (key, tokens) in [
            ("ws_tokens", &self.ws_tokens),
            ("broadcast_tokens", &self.broadcast_tokens),
            ("status_tokens", &self.status_tokens),
            ("metrics_tokens", &self.metrics_tokens),
        ] {
            for (i, token) in tokens.iter().enumerate() {
                crate::security::check_token(token).map_err(|e| {
                    ConfigError::invalid(&format!("network.security.{key}[{i}]"), e)
                })?;
            }
        }
        if self.snapshot_interval.0 > MAX_SNAPSHOT_INTERVAL {
            return Err(ConfigError::invalid(
                &path("snapshot_interval"),
                format!("must be at most {} s", MAX_SNAPSHOT_INTERVAL.as_secs()),
            ));
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            crate::security::normalize_origin(origin).map_err(|e| {
                ConfigError::invalid(&format!("network.security.allowed_origins[{i}]"), e)
            })?;
        }
        for (i, range) in self.exempt_ips.iter().flatten().enumerate() {
            crate::security::IpRange::parse(range).map_err(|e| {
                ConfigError::invalid(&format!("network.security.exempt_ips[{i}]"), e)
            })?;
        }
        Ok(())
    }
}

/// `network.http`: how upstream calls are made. These are the defaults for
/// every `api_clients` entry and the settings of the plain `HttpClient`, which
/// keeps one pool, breaker and limiter per origin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Per-attempt timeout, seconds: connecting, sending and reading the
    /// whole response. Default 30.
    pub timeout: Seconds,
    /// Connections kept per endpoint. Default 100.
    pub max_connections: usize,
    /// Retries after the first attempt. Default 3.
    pub retry_attempts: u32,
    /// Overall deadline of a call, every retry and wait included, seconds.
    /// Default: `timeout × (retry_attempts + 1)`.
    pub deadline: Option<Seconds>,
    /// How long connecting (TCP and TLS) may take, seconds. Default 5.
    pub connect_timeout: Seconds,
    /// How long an idle keep-alive connection is kept, seconds. Default 30.
    pub keep_alive: Seconds,
    /// Requests per minute per origin (plain `HttpClient`). Default 6000.
    pub rate_limit: f64,
    /// Requests that may go at once before the rate applies. Default: ten
    /// seconds' worth of `rate_limit`, at least 1.
    pub rate_burst: Option<u32>,
    /// Whether a call waits for the rate limiter when the wait fits in its
    /// deadline (true), or fails at once with "rate limited" (false).
    /// Default true.
    pub wait_for_rate_limit: bool,
    /// Distinct origins the plain `HttpClient` keeps state for; beyond it a
    /// call to a new origin is refused. Default 64.
    pub max_origins: usize,
    /// The largest response body read into memory, bytes. Default 10 MiB.
    pub max_response_bytes: usize,
    /// Endpoint selection: `"peak_ewma"` (power of two choices on latency)
    /// or `"round_robin"`. Default `"peak_ewma"`.
    pub load_balancing: LoadBalancing,
    /// Retry timing and budget.
    pub retry: RetrySettings,
    /// Circuit breaker.
    pub breaker: BreakerSettings,
    /// Concurrency limit.
    pub bulkhead: BulkheadSettings,
    /// Passive outlier ejection of failing endpoints.
    pub ejection: EjectionSettings,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            timeout: Seconds::secs(30),
            max_connections: 100,
            retry_attempts: 3,
            deadline: None,
            connect_timeout: Seconds::secs(5),
            keep_alive: Seconds::secs(30),
            rate_limit: 6000.0,
            rate_burst: None,
            wait_for_rate_limit: true,
            max_origins: 64,
            max_response_bytes: 10 << 20,
            load_balancing: LoadBalancing::PeakEwma,
            retry: RetrySettings::default(),
            breaker: BreakerSettings::default(),
            bulkhead: BulkheadSettings::default(),
            ejection: EjectionSettings::default(),
        }
    }
}

/// `load_balancing`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each healthy endpoint in turn.
    RoundRobin,
    /// Power of two choices on peak-EWMA latency × load.
    PeakEwma,
}

/// `retry`: when and how fast to retry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// First backoff ceiling, seconds; it doubles per retry. Default 0.1.
    pub base_delay: Seconds,
    /// Largest backoff ceiling, seconds. Default 10.
    pub max_delay: Seconds,
    /// Retries may be at most this many per recent request (a retry budget
    /// against retry storms), 0 to 1000. Default 0.2.
    pub budget_ratio: f64,
    /// Retries per second always allowed by the budget. Default 10.
    pub budget_min_per_second: u32,
    /// The window the budget counts over, seconds (at least 0.001).
    /// Default 10.
    pub budget_window: Seconds,
}

impl Default for RetrySettings {
    /// The retry policy's own defaults (`happynet_actors::backoff`): one
    /// source of truth.
    fn default() -> Self {
        RetrySettings {
            base_delay: Seconds(backoff::DEFAULT_BASE),
            max_delay: Seconds(backoff::DEFAULT_MAX),
            budget_ratio: backoff::DEFAULT_RETRY_RATIO,
            budget_min_per_second: backoff::DEFAULT_MIN_RETRIES_PER_SEC,
            budget_window: Seconds(backoff::DEFAULT_BUDGET_TTL),
        }
    }
}

/// `breaker`: the circuit breaker over a count-based sliding window.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerSettings {
    /// Outcomes kept in the sliding window, 1 to 100000. Default 20.
    pub window: usize,
    /// Calls in the window before the breaker may open, 1 to `window`.
    /// Default 10.
    pub minimum_calls: usize,
    /// Failure rate (above 0, at most 1) that opens it. Default 0.5.
    pub failure_rate: f64,
    /// Slow-call rate (above 0, at most 1) that opens it; 1 turns it off.
    /// Default 1.
    pub slow_call_rate: f64,
    /// A call slower than this is slow, seconds. Default 5.
    pub slow_call_duration: Seconds,
    /// How long it stays open before probing, seconds, at most 86400.
    /// Default 30.
    pub open_duration: Seconds,
    /// Probe calls admitted while half-open, 1 to 10000. Default 3.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    /// The breaker's own defaults ([`BreakerConfig::default`]): one source
    /// of truth.
    fn default() -> Self {
        let c = BreakerConfig::default();
        BreakerSettings {
            window: c.window,
            minimum_calls: c.minimum_calls,
            failure_rate: c.failure_rate,
            slow_call_rate: c.slow_call_rate,
            slow_call_duration: Seconds(c.slow_call_duration),
            open_duration: Seconds(c.open_duration),
            half_open_probes: c.half_open_probes,
        }
    }
}

impl BreakerSettings {
    /// The breaker state machine's settings.
    pub fn breaker_config(&self) -> BreakerConfig {
        BreakerConfig {
            window: self.window,
            minimum_calls: self.minimum_calls,
            failure_rate: self.failure_rate,
            slow_call_rate: self.slow_call_rate,
            slow_call_duration: self.slow_call_duration.0,
            open_duration: self.open_duration.0,
            half_open_probes: self.half_open_probes,
        }
    }
}

/// `bulkhead`: how many calls an upstream may have at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkheadSettings {
    /// Calls running at once. Default: `max_connections`.
    pub max_in_flight: Option<usize>,
    /// Calls waiting for a slot; beyond it calls fail at once with
    /// "overloaded". Default 100.
    pub max_queue: usize,
}

impl Default for BulkheadSettings {
    fn default() -> Self {
        BulkheadSettings {
            max_in_flight: None,
            max_queue: 100,
        }
    }
}

/// `ejection`: passive outlier ejection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectionSettings {
    /// Consecutive failures that eject an endpoint. Default 5.
    pub consecutive_failures: u32,
    /// First ejection, seconds; doubles with each ejection. Default 30.
    pub base_ejection: Seconds,
    /// Longest ejection, seconds. Default 300.
    pub max_ejection: Seconds,
}

impl Default for EjectionSettings {
    fn default() -> Self {
        EjectionSettings {
            consecutive_failures: 5,
            base_ejection: Seconds::secs(30),
            max_ejection: Seconds::secs(300),
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
    /// session is a slow consumer and is disconnected. Default 1 MiB. At
    /// least `4 × (max_message_bytes + 384)`
    /// ([`EvictionPolicy::min_outbound_bytes`]), so that a burst of the
    /// largest messages never evicts a client that is reading.
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
    /// Rooms that one client address (the per-IP key of
    /// `network.security`: an IPv4 address or an IPv6 /64) may have created
    /// and that still exist; beyond it its joins of new rooms are refused
    /// (`too_many_rooms`), joins of existing rooms are not. Addresses in
    /// `network.security.exempt_ips` (loopback by default) are not counted.
    /// 0 turns it off. Default 256: 40 addresses to fill `max_rooms`.
    pub max_rooms_per_ip: usize,
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
    /// client its message was dropped (an error frame for a protocol
    /// client, close 1013 for a plain one). Default 65536.
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
            max_rooms_per_ip: 256,
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
            max_rooms_per_ip: self.max_rooms_per_ip,
            presence_limits: PresenceLimits::new(self.max_message_bytes),
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
    pub fn cache_config(&self) -> happynet_actors::cache::CacheConfig {
        happynet_actors::cache::CacheConfig {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            default_ttl: self.default_ttl.0,
            stale_if_error: self.stale_if_error.0,
            max_entry_bytes: self.max_entry_bytes,
        }
    }
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            max_entries: 1024,
            max_bytes: 8 << 20,
            default_ttl: Seconds(Duration::ZERO),
            stale_if_error: Seconds::secs(300),
            max_entry_bytes: 1 << 20,
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
    /// Requests per minute.
    pub rate_per_minute: f64,
    /// Requests that may go at once.
    pub rate_burst: u32,
    /// Whether calls wait for the limiter when the wait fits the deadline.
    pub wait_for_rate_limit: bool,
    /// Per-attempt timeout.
    pub attempt_timeout: Duration,
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

fn default_burst(rate_per_minute: f64) -> u32 {
    // Ten seconds' worth: a short burst passes, a sustained flood does not.
    ((rate_per_minute / 6.0).round() as u32).max(1)
}

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
        let attempt_timeout = c.timeout.unwrap_or(h.timeout).0;
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
            rate_per_minute: c.rate_limit,
            rate_burst: c.rate_burst.unwrap_or_else(|| default_burst(c.rate_limit)),
            wait_for_rate_limit: c.wait_for_rate_limit.unwrap_or(h.wait_for_rate_limit),
            attempt_timeout,
            deadline: Self::deadline_for(
                c.deadline.or(h.deadline),
                attempt_timeout,
                retry_attempts,
            ),
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
            rate_per_minute: h.rate_limit,
            rate_burst: h.rate_burst.unwrap_or_else(|| default_burst(h.rate_limit)),
            wait_for_rate_limit: h.wait_for_rate_limit,
            attempt_timeout: h.timeout.0,
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

fn validate_url(path: &str, url: &str) -> Result<(), ConfigError> {
    let uri = parse_http_url(path, url)?;
    if uri.query().is_some() {
        return Err(ConfigError::invalid(path, "must not have a query string"));
    }
    Ok(())
}

fn fraction(path: &str, value: f64) -> Result<(), ConfigError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(path, "must be between 0 and 1"))
    }
}

/// A policy constructor's error, under the key of the field it names: the
/// policy in `happynet_actors` is the one judge of its settings, and this
/// file only says where in the JSON they came from. `renames` pairs a
/// policy field with its config key where the two differ.
fn policy_error(
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
fn validate_quota(
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

/// A rate in requests per minute and its burst (`rate_burst`, or ten
/// seconds' worth when unset), as the upstream limiter will build it.
fn validate_rate_per_minute(at: &str, rate: f64, burst: Option<u32>) -> Result<(), ConfigError> {
    let burst = burst.unwrap_or_else(|| default_burst(rate));
    validate_quota(
        &format!("{at}.rate_limit"),
        &format!("{at}.rate_burst"),
        rate,
        Duration::from_secs(60),
        burst,
    )
    .map(drop)
}

impl RetrySettings {
    /// Checked by the retry policy's own constructors, [`Backoff::try_new`]
    /// and [`RetryBudget::new`].
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        Backoff::try_new(self.base_delay.0, self.max_delay.0).map_err(|e| {
            policy_error(
                at,
                e.field(),
                e.requirement(),
                &[("base", "base_delay"), ("max", "max_delay")],
            )
        })?;
        RetryBudget::new(
            self.budget_window.0,
            self.budget_min_per_second,
            self.budget_ratio,
        )
        .map_err(|e| {
            policy_error(
                at,
                e.field(),
                e.requirement(),
                &[("ttl", "budget_window"), ("ratio", "budget_ratio")],
            )
        })?;
        Ok(())
    }
}

impl BreakerSettings {
    /// Checked by the breaker's own constructor, [`Breaker::new`].
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        Breaker::new(at, self.breaker_config()).map_err(|e| {
            policy_error(
                at,
                e.field(),
                e.requirement(),
                // The breaker's own field names are the JSON keys.
                &[],
            )
        })?;
        Ok(())
    }
}

impl CacheSettings {
    /// Checked by the cache's own constructor, [`ResponseCache::new`].
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        ResponseCache::new(self.cache_config())
            .map_err(|e| policy_error(at, e.field(), e.requirement(), &[]))?;
        Ok(())
    }
}

impl BulkheadSettings {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if let Some(n) = self.max_in_flight {
            upstream_connections(&format!("{at}.max_in_flight"), n)?;
        }
        // The pool's mailbox holds max_in_flight + max_queue; actix's
        // channel arithmetic overflows (a panic) far below usize::MAX.
        if self.max_queue > MAX_UPSTREAM_CONNECTIONS {
            return Err(ConfigError::invalid(
                &format!("{at}.max_queue"),
                format!("must be <= {MAX_UPSTREAM_CONNECTIONS}"),
            ));
        }
        Ok(())
    }
}

impl EjectionSettings {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        at_least_one(
            &format!("{at}.consecutive_failures"),
            self.consecutive_failures as usize,
        )?;
        positive(&format!("{at}.base_ejection"), self.base_ejection)?;
        if self.max_ejection < self.base_ejection {
            return Err(ConfigError::invalid(
                &format!("{at}.max_ejection"),
                "must be >= base_ejection",
            ));
        }
        Ok(())
    }
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
    pub fn validate(&self) -> Result<(), ConfigError> {
        let http = &self.network.http;
        positive("network.http.timeout", http.timeout)?;
        upstream_connections("network.http.max_connections", http.max_connections)?;
        if let Some(d) = http.deadline {
            positive("network.http.deadline", d)?;
        }
        positive("network.http.connect_timeout", http.connect_timeout)?;
        validate_rate_per_minute("network.http", http.rate_limit, http.rate_burst)?;
        at_least_one("network.http.max_origins", http.max_origins)?;
        at_least_one("network.http.max_response_bytes", http.max_response_bytes)?;
        http.retry.validate("network.http.retry")?;
        http.breaker.validate("network.http.breaker")?;
        http.bulkhead.validate("network.http.bulkhead")?;
        http.ejection.validate("network.http.ejection")?;

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
        let min_outbound = EvictionPolicy::min_outbound_bytes(ws.max_message_bytes);
        if ws.max_outbound_bytes < min_outbound {
            return Err(ConfigError::invalid(
                "network.websocket.max_outbound_bytes",
                format!(
                    "must be >= {min_outbound}: {OUTBOUND_HEADROOM_MESSAGES} × \
                     (network.websocket.max_message_bytes + {} bytes of framing), so that a \
                     burst of the largest messages cannot evict a client that is reading",
                    MAX_ENVELOPE_BYTES + PER_MESSAGE_OVERHEAD
                ),
            ));
        }
        validate_quota(
            "network.websocket.max_messages_per_second",
            "network.websocket.message_burst",
            ws.max_messages_per_second,
            Duration::from_secs(1),
            ws.message_burst,
        )?;
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

        positive(
            "network.gateway.stream_write_timeout",
            self.network.gateway.stream_write_timeout,
        )?;
        self.network.security.validate()?;
        if let Some(cluster) = &self.network.cluster {
            cluster.validate()?;
        } else if self.network.security.shared_rate_limits {
            return Err(ConfigError::invalid(
                "network.security.shared_rate_limits",
                "requires network.cluster (the limits are kept in its Redis)",
            ));
        }
        self.network.alerts.validate()?;

        for (name, client) in &self.network.api_clients {
            let at = format!("network.api_clients.{name}");
            let path = |key: &str| format!("{at}.{key}");
            validate_url(&path("base_url"), &client.base_url)?;
            if client.shared_rate_limit && self.network.cluster.is_none() {
                return Err(ConfigError::invalid(
                    &path("shared_rate_limit"),
                    "requires network.cluster (the limit is kept in its Redis)",
                ));
            }
            for (i, e) in client.endpoints.iter().enumerate() {
                validate_url(&format!("{at}.endpoints[{i}]"), e)?;
            }
            validate_rate_per_minute(&at, client.rate_limit, client.rate_burst)?;
            for (key, value) in [
                ("timeout", client.timeout),
                ("deadline", client.deadline),
                ("connect_timeout", client.connect_timeout),
            ] {
                if let Some(v) = value {
                    positive(&path(key), v)?;
                }
            }
            if let Some(n) = client.max_connections {
                upstream_connections(&path("max_connections"), n)?;
            }
            if let Some(n) = client.max_response_bytes {
                at_least_one(&path("max_response_bytes"), n)?;
            }
            if let Some(r) = &client.retry {
                r.validate(&path("retry"))?;
            }
            if let Some(b) = &client.breaker {
                b.validate(&path("breaker"))?;
            }
            if let Some(b) = &client.bulkhead {
                b.validate(&path("bulkhead"))?;
            }
            if let Some(e) = &client.ejection {
                e.validate(&path("ejection"))?;
            }
            if let Some(c) = &client.cache {
                c.validate(&path("cache"))?;
            }
            if client.auth.is_some() && client.api_key_env.is_some() {
                return Err(ConfigError::invalid(
                    &path("api_key_env"),
                    "cannot be used together with auth",
                ));
            }
            let key_env = match &client.auth {
                Some(AuthConfig::Bearer { key_env })
                | Some(AuthConfig::Header { key_env, .. })
                | Some(AuthConfig::Query { key_env, .. }) => Some((path("auth.key_env"), key_env)),
                None => client
                    .api_key_env
                    .as_ref()
                    .map(|k| (path("api_key_env"), k)),
            };
            if let Some((at, var)) = key_env {
                if var.is_empty() || var.contains('=') || var.contains('\0') {
                    return Err(ConfigError::invalid(
                        &at,
                        "must name an environment variable",
                    ));
                }
            }
            if let Some(AuthConfig::Header { name: h, .. }) = &client.auth {
                if actix_web::http::header::HeaderName::try_from(h.as_str()).is_err() {
                    return Err(ConfigError::invalid(
                        &path("auth.name"),
                        "is not a header name",
                    ));
                }
            }
            validate_headers(&format!("{at}.headers"), &client.headers)?;
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

/// The most connections one upstream endpoint may keep, and the most calls
/// its bulkhead may run or queue. awc's connection limit is a semaphore,
/// which panics above 2^61 permits, and the pool's mailbox is sized from
/// the bulkhead; a million is far beyond what one process can hold open and
/// keeps the bound meaningful.
pub const MAX_UPSTREAM_CONNECTIONS: usize = 1 << 20;

fn upstream_connections(path: &str, value: usize) -> Result<(), ConfigError> {
    at_least_one(path, value)?;
    if value > MAX_UPSTREAM_CONNECTIONS {
        return Err(ConfigError::invalid(
            path,
            format!("must be <= {MAX_UPSTREAM_CONNECTIONS}"),
        ));
    }
    Ok(())
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
