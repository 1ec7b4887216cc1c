//! `network.http`: how upstream calls are made, and the policy blocks an
//! API client may override (`retry`, `breaker`, `bulkhead`, `ejection`).
//!
//! Each policy block is a mirror of its policy's settings in
//! `happynet_actors` in the JSON's units and names: its defaults are the
//! policy's defaults, and its checks are the policy's constructor
//! ([`Breaker::new`], [`Backoff::try_new`], [`RetryBudget::new`]), whose
//! error this file only moves under the config key. The pool's settings
//! (`max_connections`, `connect_timeout`, `max_response_bytes`, `bulkhead`,
//! `ejection`) are judged by [`PoolConfig::validate`] on the resolved
//! settings of each upstream (see `Config::validate`).

use super::checks::{at_least_one, policy_error, positive, validate_quota, ConfigError, Seconds};
use happynet_actors::backoff::{self, Backoff, RetryBudget};
use happynet_actors::balancer::EjectionConfig;
use happynet_actors::breaker::{Breaker, BreakerConfig};
#[cfg(doc)]
use happynet_actors::pool::PoolConfig;
use serde::Deserialize;
use std::time::Duration;

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

/// `load_balancing`: the balancer's own [`Strategy`](happynet_actors::balancer::Strategy)
/// (`"round_robin"` or `"peak_ewma"`), read straight from the JSON, so the
/// setting has one type from the file to the pool.
pub use happynet_actors::balancer::Strategy as LoadBalancing;

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
///
/// Each key is a field of [`BreakerConfig`] of the same name (durations in
/// seconds), with the breaker's default and checked by [`Breaker::new`];
/// the ranges below are the breaker's.
pub struct BreakerSettings {
    /// Outcomes kept in the sliding window, 1 to
    /// [`MAX_WINDOW`](happynet_actors::breaker::MAX_WINDOW) (100000).
    /// Default 20.
    pub window: usize,
    /// Calls in the window before the breaker may open, 1 to `window`.
    /// Default 10.
    pub minimum_calls: usize,
    /// The failure rate (above 0, at most 1) that opens it. Default 0.5.
    pub failure_rate: f64,
    /// The slow-call rate (above 0, at most 1) that opens it; 1 turns it
    /// off. Default 1.
    pub slow_call_rate: f64,
    /// A call that takes at least this long is slow, seconds (above 0).
    /// Default 5.
    pub slow_call_duration: Seconds,
    /// How long it stays open before probing, seconds, above 0 and at most
    /// [`MAX_OPEN_DURATION`](happynet_actors::breaker::MAX_OPEN_DURATION)
    /// (86400). Default 30.
    pub open_duration: Seconds,
    /// Probe calls admitted while half-open, 1 to
    /// [`MAX_HALF_OPEN_PROBES`](happynet_actors::breaker::MAX_HALF_OPEN_PROBES)
    /// (10000). Default 3.
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

/// `bulkhead`: how many calls an upstream may have at once (the pool's
/// `max_in_flight` and `max_queue`, checked by [`PoolConfig::validate`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkheadSettings {
    /// Calls running at once, 1 to 1048576. Default: `max_connections`.
    pub max_in_flight: Option<usize>,
    /// Calls waiting for a slot, at most 1048576; beyond it calls fail at
    /// once with "overloaded". Default 100.
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

/// `ejection`: passive outlier ejection. Each key is a field of
/// [`EjectionConfig`] of the same name (durations in seconds), with the
/// balancer's default and checked by [`EjectionConfig::validate`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EjectionSettings {
    /// Consecutive failures that eject an endpoint, at least 1. Default 5.
    pub consecutive_failures: u32,
    /// First ejection, seconds (above 0); doubles with each ejection.
    /// Default 30.
    pub base_ejection: Seconds,
    /// Longest ejection, seconds, at least `base_ejection`. Default 300.
    pub max_ejection: Seconds,
}

impl Default for EjectionSettings {
    /// The balancer's own defaults ([`EjectionConfig::default`]): one
    /// source of truth.
    fn default() -> Self {
        let c = EjectionConfig::default();
        EjectionSettings {
            consecutive_failures: c.consecutive_failures,
            base_ejection: Seconds(c.base_ejection),
            max_ejection: Seconds(c.max_ejection),
        }
    }
}

impl EjectionSettings {
    /// The balancer's ejection settings.
    pub fn ejection_config(&self) -> EjectionConfig {
        EjectionConfig {
            consecutive_failures: self.consecutive_failures,
            base_ejection: self.base_ejection.0,
            max_ejection: self.max_ejection.0,
        }
    }
}

/// The burst of a rate in requests per minute when `rate_burst` is unset:
/// ten seconds' worth, at least 1.
pub(super) fn default_burst(rate_per_minute: f64) -> u32 {
    // Ten seconds' worth: a short burst passes, a sustained flood does not.
    ((rate_per_minute / 6.0).round() as u32).max(1)
}

/// A rate in requests per minute and its burst (`rate_burst`, or ten
/// seconds' worth when unset), as the upstream limiter will build it.
pub(super) fn validate_rate_per_minute(
    at: &str,
    rate: f64,
    burst: Option<u32>,
) -> Result<(), ConfigError> {
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
    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
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
    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        Breaker::new(at, self.breaker_config())
            .map_err(|e| policy_error(at, e.field(), e.requirement(), &[]))?;
        Ok(())
    }
}

impl HttpConfig {
    /// Checks `network.http`; the error names the key's path.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive("network.http.timeout", self.timeout)?;
        if let Some(d) = self.deadline {
            positive("network.http.deadline", d)?;
        }
        validate_rate_per_minute("network.http", self.rate_limit, self.rate_burst)?;
        at_least_one("network.http.max_origins", self.max_origins)?;
        self.retry.validate("network.http.retry")?;
        self.breaker.validate("network.http.breaker")
        // The pool's settings are checked on the resolved settings, by
        // the pool (`Config::validate`).
    }
}
