//! An upstream's settings, turned into what its actors and its retry policy
//! are built from — in this one place.
//!
//! `crate::config` resolves the JSON (`network.api_clients.<name>` over
//! `network.http`) into one [`UpstreamSettings`] per upstream, with every
//! default applied. This module is the only step after that: each actor's
//! config is filled from it field by field, under the same names the JSON
//! uses (`failure_rate` is `failure_rate` in the file, in the settings and in
//! the breaker; `timeout`, `rate_limit`, `load_balancing` likewise), and each
//! is checked by its policy's own constructor, so a rule is written once.
//! Nothing downstream reshapes them again.
//!
//! The one place names change is the retry block's backoff: [`Backoff`] is
//! one policy shared by three blocks (`retry`'s `base_delay`/`max_delay`,
//! the ejection's lengths, the Redis links' `reconnect_min_ms`/`_max_ms`),
//! so its fields are `base` and `max`, and the retry budget's `ttl` and
//! `ratio` are `budget_window` and `budget_ratio` in the `retry` block;
//! `config::http` maps those errors back to the JSON's keys.

use super::auth::Auth;
use crate::config::UpstreamSettings;
use actix_web::http::header::{HeaderName, HeaderValue};
use happynet_actors::backoff::{Backoff, RetryBudget};
use happynet_actors::breaker::BreakerActor;
use happynet_actors::cache::ResponseCache;
use happynet_actors::gcra::Quota;
use happynet_actors::pool::PoolConfig;
use std::time::Duration;

/// Everything an [`super::Upstream`] is built from, checked.
pub(super) struct Parts {
    /// The rate limit (`rate_limit` requests per minute, `rate_burst`).
    pub(super) quota: Quota,
    /// The breaker, its config validated.
    pub(super) breaker: BreakerActor,
    /// The pool's connections, bulkhead, balancing and ejection.
    pub(super) pool: PoolConfig,
    /// Retry timing.
    pub(super) backoff: Backoff,
    /// Retries allowed per recent request.
    pub(super) budget: RetryBudget,
    /// The credential, its variable read now.
    pub(super) auth: Option<Auth>,
    /// The response cache, when configured.
    pub(super) cache: Option<ResponseCache>,
    /// Headers sent with every request.
    pub(super) default_headers: Vec<(HeaderName, HeaderValue)>,
}

impl Parts {
    /// Builds every part from `settings`; an error names the upstream and
    /// the offending setting.
    pub(super) fn from_settings(settings: &UpstreamSettings) -> Result<Parts, String> {
        let name = &settings.name;
        let quota = Quota::new(
            settings.rate_limit,
            Duration::from_secs(60),
            settings.rate_burst,
        )
        .map_err(|e| format!("{name}: rate limit: {e}"))?;
        let pool = settings.pool_config();
        pool.validate().map_err(|e| format!("{name}: pool: {e}"))?;
        let r = &settings.retry;
        let backoff = Backoff::try_new(r.base_delay.0, r.max_delay.0)
            .map_err(|e| format!("{name}: retry backoff: {e}"))?;
        let budget = RetryBudget::new(r.budget_window.0, r.budget_min_per_second, r.budget_ratio)
            .map_err(|e| format!("{name}: retry budget: {e}"))?;
        let breaker = BreakerActor::new(name.clone(), settings.breaker.breaker_config())
            .map_err(|e| format!("{name}: breaker: {e}"))?;
        let auth = settings
            .auth
            .as_ref()
            .map(|a| Auth::resolve(name, a))
            .transpose()?;
        let cache = settings
            .cache
            .as_ref()
            .map(|c| {
                ResponseCache::new(c.cache_config())
                    .map_err(|e| format!("network.api_clients.{name}.cache: {e}"))
            })
            .transpose()?;
        let mut default_headers = Vec::new();
        for (k, v) in &settings.headers {
            let pair = HeaderName::try_from(k.as_str())
                .ok()
                .zip(HeaderValue::try_from(v.as_str()).ok())
                .ok_or_else(|| format!("network.api_clients.{name}.headers.{k} is invalid"))?;
            default_headers.push(pair);
        }
        Ok(Parts {
            quota,
            breaker,
            pool,
            backoff,
            budget,
            auth,
            cache,
            default_headers,
        })
    }
}
