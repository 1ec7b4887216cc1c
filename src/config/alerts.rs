//! `network.alerts`: the alert rules over the node's own counters, their
//! evaluation interval and hold, the history kept, and the webhook events
//! are POSTed to (an upstream like the API clients).

use super::api_clients::{validate_auth, AuthConfig, UpstreamSettings};
use super::checks::{
    at_least_one, fraction, parse_http_url, validate_headers, ConfigError, Millis,
};
use super::NetworkConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The window of the `slow_consumer_evictions` rule: its threshold is per
/// minute.
pub const EVICTIONS_WINDOW: Duration = Duration::from_secs(60);

/// `network.alerts`: rules over the node's own counters (see
/// `ops::alerts`). Each firing and resolving is logged, kept in a bounded
/// history and, with `webhook.url`, POSTed as JSON.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Whether the rules are evaluated at all. Default true.
    pub enabled: bool,
    /// How often the rules are evaluated, milliseconds: at most 60000 (the
    /// `slow_consumer_evictions` window) and at most
    /// `rules.upstream_error_rate.window_ms`, so that no window stretches to
    /// the interval. Default 1000. JSON key `interval_ms`.
    #[serde(rename = "interval_ms")]
    pub interval: Millis,
    /// How long after resolving a rule may not fire again for the same
    /// subject, milliseconds, measured from the resolve even if the condition
    /// came back in between: a flapping condition alerts once per hold, not
    /// once per flap. 0: no hold. Default 60000. JSON key `hold_ms`.
    #[serde(rename = "hold_ms")]
    pub hold: Millis,
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
            interval: Millis::ms(1000),
            hold: Millis::ms(60_000),
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
    /// Per-attempt timeout, milliseconds. Default 2000. JSON key
    /// `timeout_ms`.
    #[serde(rename = "timeout_ms")]
    pub timeout: Millis,
    /// Retries after the first attempt. Default 3.
    pub retry_attempts: u32,
    /// Overall deadline of one POST, retries included, milliseconds.
    /// Default: `timeout_ms × (retry_attempts + 1)`. JSON key `deadline_ms`.
    #[serde(rename = "deadline_ms")]
    pub deadline: Option<Millis>,
    /// POSTs in flight at once; further events wait in a bounded queue
    /// (`ops::alerts::WEBHOOK_QUEUE`). Default 4.
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
            timeout: Millis::ms(2000),
            retry_attempts: 3,
            deadline: None,
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
    /// The window, milliseconds. Default 60000. JSON key `window_ms`.
    #[serde(rename = "window_ms")]
    pub window: Millis,
    /// Calls the window needs before the ratio means anything; fewer never
    /// fire (and resolve a firing alert). Default 20.
    pub min_calls: u64,
}

impl Default for ErrorRateRule {
    fn default() -> Self {
        ErrorRateRule {
            enabled: true,
            threshold: 0.5,
            window: Millis::ms(60_000),
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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let path = |key: &str| format!("network.alerts.{key}");
        millis(&path("interval_ms"), self.interval)?;
        millis(&path("hold_ms"), self.hold.max(Millis::ms(1)))?;
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
        millis(&path("webhook.timeout_ms"), w.timeout)?;
        if let Some(d) = w.deadline {
            millis(&path("webhook.deadline_ms"), d)?;
        }
        // webhook.max_in_flight is the webhook pool's: `Config::validate`
        // has the pool check it.
        validate_headers(&path("webhook.headers"), &w.headers)?;
        if let Some(auth) = &w.auth {
            validate_auth(&path("webhook.auth"), auth)?;
        }
        let r = &self.rules.upstream_error_rate;
        let at = "rules.upstream_error_rate";
        fraction(&path(&format!("{at}.threshold")), r.threshold)?;
        millis(&path(&format!("{at}.window_ms")), r.window)?;
        // A window can only be judged as finely as the rules look: with a
        // longer interval it would silently stretch to the interval.
        let evictions_window = EVICTIONS_WINDOW.as_millis();
        if self.interval.0.as_millis() > evictions_window {
            return Err(ConfigError::invalid(
                &path("interval_ms"),
                format!("must be <= {evictions_window} (the slow_consumer_evictions window)"),
            ));
        }
        if self.interval > r.window {
            return Err(ConfigError::invalid(
                &path("interval_ms"),
                format!(
                    "must be <= network.alerts.{at}.window_ms ({})",
                    r.window.as_millis()
                ),
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

    /// The webhook's upstream settings: `network.http` for the URL's origin,
    /// with this section's timeout, retries, deadline, bulkhead, headers and
    /// auth. `None` without a URL (or with one `validate` refuses).
    pub fn webhook_upstream(&self, network: &NetworkConfig) -> Option<UpstreamSettings> {
        let w = &self.webhook;
        let uri: actix_web::http::Uri = w.url.as_deref()?.parse().ok()?;
        let origin = format!("{}://{}", uri.scheme_str()?, uri.authority()?);
        Some(self.webhook_settings(network, &origin))
    }

    /// The webhook's upstream settings for `origin`; see
    /// [`webhook_upstream`](Self::webhook_upstream).
    pub(super) fn webhook_settings(
        &self,
        network: &NetworkConfig,
        origin: &str,
    ) -> UpstreamSettings {
        let w = &self.webhook;
        let mut settings = network.origin(origin);
        settings.name = WEBHOOK_UPSTREAM.to_owned();
        let timeout = w.timeout.0;
        settings.timeout = timeout;
        settings.retry_attempts = w.retry_attempts;
        settings.deadline = w.deadline.map_or_else(
            || timeout.saturating_mul(w.retry_attempts.saturating_add(1)),
            |d| d.0,
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
        settings
    }
}

/// The longest duration an `_ms` key of `network.alerts` takes: one day.
/// Longer would mean "never", and timers would overflow.
pub const MAX_ALERT_MILLIS: u64 = 86_400_000;

/// Checks a duration in milliseconds: 1 to [`MAX_ALERT_MILLIS`].
fn millis(path: &str, value: Millis) -> Result<(), ConfigError> {
    if (1..=MAX_ALERT_MILLIS).contains(&value.as_millis()) {
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

/// Like `validate_url`, but a query string is allowed: many webhook
/// services put a routing key there.
fn validate_webhook_url(path: &str, url: &str) -> Result<(), ConfigError> {
    parse_http_url(path, url).map(|_| ())
}
