//! One upstream's resilience pipeline: rate limiter → breaker → pool, with
//! retries, an overall deadline and fallbacks.
//!
//! An [`Upstream`] owns the addresses of its three actors (all started on the
//! client's upstream arbiter) and the retry policy. [`Upstream::call`] runs one
//! logical request:
//!
//! 1. the whole call, waits included, is bounded by its deadline;
//! 2. `RateLimiterActor`: a denial is waited out when the wait fits in the
//!    deadline (and the caller allows waiting), otherwise it is an error that
//!    says when to retry;
//! 3. `BreakerActor`: an open breaker rejects at once (or yields the fallback);
//! 4. `PoolActor`: one attempt, bounded by the per-attempt timeout and the
//!    deadline, whichever comes first;
//! 5. the outcome goes back to the breaker (`do_send`: fire-and-forget, one
//!    per attempt, bounded by the bulkhead) and decides whether to retry: only
//!    idempotent methods (or callers who opt in), only on connect errors and
//!    429/502/503/504, only while the retry budget allows, waiting the
//!    jittered backoff or the upstream's `Retry-After` — never less, and never
//!    past the deadline.

use crate::config::{LoadBalancing, UpstreamSettings};
use crate::error::HttpError;
use actix::prelude::*;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Bytes;
use happynet_actors::backoff::{parse_retry_after, Backoff, Jitter, RetryBudget, RetryDecision};
use happynet_actors::balancer::{EjectionConfig, Strategy};
use happynet_actors::breaker::{BreakerActor, BreakerConfig, CallOutcome, Outcome, Permit};
use happynet_actors::gcra::Quota;
use happynet_actors::limiter::{Acquire, RateLimiterActor};
use happynet_actors::pool::{Execute, PoolActor, PoolConfig, PoolError, UpstreamResponse};
use serde::de::DeserializeOwned;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Keys a limiter tracks at once: per-caller keys (API keys, client IPs)
/// beyond this are refused until idle ones are swept.
const MAX_LIMITER_KEYS: usize = 100_000;

/// One upstream's actors and policy. Shared by every request to it.
pub struct Upstream {
    settings: UpstreamSettings,
    arbiter: ArbiterHandle,
    pool: Addr<PoolActor>,
    breaker: Addr<BreakerActor>,
    limiter: Addr<RateLimiterActor>,
    backoff: Backoff,
    budget: Mutex<RetryBudget>,
}

impl Upstream {
    /// Starts the upstream's pool, breaker and limiter on `arbiter`.
    pub fn start(settings: UpstreamSettings, arbiter: &ArbiterHandle) -> Result<Self, String> {
        let name = settings.name.clone();
        let quota = Quota::new(
            settings.rate_per_minute,
            Duration::from_secs(60),
            settings.rate_burst,
        )
        .map_err(|e| format!("{name}: rate limit: {e}"))?;
        let b = &settings.breaker;
        let breaker_config = BreakerConfig {
            window: b.window,
            minimum_calls: b.minimum_calls,
            failure_rate_threshold: b.failure_rate,
            slow_call_rate_threshold: b.slow_call_rate,
            slow_call_duration: b.slow_call_duration.0,
            open_duration: b.open_duration.0,
            half_open_probes: b.half_open_probes,
        };
        let pool_config = PoolConfig {
            name: name.clone(),
            endpoints: settings.endpoints.clone(),
            max_connections: settings.max_connections,
            connect_timeout: settings.connect_timeout,
            keep_alive: settings.keep_alive,
            max_in_flight: settings.max_in_flight,
            max_queue: settings.max_queue,
            max_response_bytes: settings.max_response_bytes,
            strategy: match settings.load_balancing {
                LoadBalancing::RoundRobin => Strategy::RoundRobin,
                LoadBalancing::PeakEwma => Strategy::PeakEwma,
            },
            ejection: EjectionConfig {
                consecutive_failures: settings.ejection.consecutive_failures,
                base_ejection: settings.ejection.base_ejection.0,
                max_ejection: settings.ejection.max_ejection.0,
            },
        };
        let r = &settings.retry;
        let backoff = Backoff {
            base: r.base_delay.0,
            max: r.max_delay.0,
        };
        let budget = RetryBudget::new(r.budget_window.0, r.budget_min_per_second, r.budget_ratio)
            .map_err(|e| format!("{name}: retry budget: {e}"))?;
        let breaker = BreakerActor::new(name.clone(), breaker_config)
            .map_err(|e| format!("{name}: breaker: {e}"))?;
        let limiter_name = name.clone();
        Ok(Upstream {
            pool: PoolActor::start_on(arbiter, pool_config),
            breaker: BreakerActor::start_in_arbiter(arbiter, move |_| breaker),
            limiter: RateLimiterActor::start_in_arbiter(arbiter, move |_| {
                RateLimiterActor::new(limiter_name, quota, MAX_LIMITER_KEYS)
            }),
            backoff,
            budget: Mutex::new(budget),
            arbiter: arbiter.clone(),
            settings,
        })
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// The resolved settings.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// The pool's address (for stats).
    pub fn pool(&self) -> &Addr<PoolActor> {
        &self.pool
    }

    /// The breaker's address (for stats).
    pub fn breaker(&self) -> &Addr<BreakerActor> {
        &self.breaker
    }

    /// The limiter's address (for stats).
    pub fn limiter(&self) -> &Addr<RateLimiterActor> {
        &self.limiter
    }

    fn mailbox_error(&self, what: &str, e: MailboxError) -> HttpError {
        HttpError::Internal {
            upstream: self.settings.name.clone(),
            message: format!("{what} unavailable: {e}"),
        }
    }

    /// Runs `req` through the pipeline (see the module docs).
    ///
    /// The pipeline itself runs on the upstream's arbiter, beside its three
    /// actors: the caller pays one cross-thread round trip (this call and its
    /// answer), and the hops limiter → breaker → pool are same-thread
    /// messages, which cost a queue push rather than a thread wake-up.
    pub async fn call(self: &Arc<Self>, req: Request) -> Result<Response, HttpError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let spawned = self.arbiter.spawn(async move {
            let _ = reply.send(this.run(req).await);
        });
        let gone = || HttpError::Internal {
            upstream: self.settings.name.clone(),
            message: "the upstream arbiter has stopped".into(),
        };
        if !spawned {
            return Err(gone());
        }
        answer.await.unwrap_or_else(|_| Err(gone()))
    }

    async fn run(&self, req: Request) -> Result<Response, HttpError> {
        let started = Instant::now();
        let deadline = started + req.deadline.unwrap_or(self.settings.deadline);
        let result = match tokio::time::timeout_at(deadline, self.call_inner(&req, deadline)).await
        {
            Ok(Err(HttpError::Timeout { upstream, after })) if after.is_zero() => {
                Err(HttpError::Timeout {
                    upstream,
                    after: started.elapsed(),
                })
            }
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout {
                upstream: self.settings.name.clone(),
                after: started.elapsed(),
            }),
        };
        match (result, &req.fallback) {
            (Err(e), Some(fallback)) => {
                log::info!(
                    "upstream {}: using the fallback after: {e}",
                    self.settings.name
                );
                fallback.produce(&e).ok_or(e)
            }
            (result, _) => result,
        }
    }

    async fn call_inner(&self, req: &Request, deadline: Instant) -> Result<Response, HttpError> {
        let name = &self.settings.name;
        let idempotent = req.retry_non_idempotent || is_idempotent(&req.method);
        let wait_for_limiter = req
            .wait_for_rate_limit
            .unwrap_or(self.settings.wait_for_rate_limit);
        let key = req.rate_limit_key.clone().unwrap_or_else(|| name.clone());
        let mut jitter = Jitter::new();
        if let Ok(mut budget) = self.budget.lock() {
            budget.deposit(Instant::now().into_std());
        }
        let mut attempt: u32 = 0;
        loop {
            // The limiter: wait out a denial only if it fits the deadline.
            loop {
                let verdict = self
                    .limiter
                    .send(Acquire { key: key.clone() })
                    .await
                    .map_err(|e| self.mailbox_error("rate limiter", e))?;
                match verdict {
                    Ok(()) => break,
                    Err(limited) => {
                        let resume = Instant::now() + limited.retry_after;
                        if !wait_for_limiter || resume >= deadline {
                            return Err(HttpError::RateLimited {
                                upstream: name.clone(),
                                retry_after: limited.retry_after,
                            });
                        }
                        tokio::time::sleep_until(resume).await;
                    }
                }
            }

            let ticket = match self
                .breaker
                .send(Permit)
                .await
                .map_err(|e| self.mailbox_error("breaker", e))?
            {
                Ok(ticket) => ticket,
                Err(open) => {
                    return Err(HttpError::BreakerOpen {
                        upstream: name.clone(),
                        retry_after: open.retry_after,
                    })
                }
            };

            let now = Instant::now();
            let attempt_deadline = deadline.min(now + self.settings.attempt_timeout);
            let result = self
                .pool
                .send(Execute {
                    method: req.method.clone(),
                    path_and_query: req.path_and_query.clone(),
                    headers: req.headers.clone(),
                    body: req.body.clone(),
                    deadline: attempt_deadline,
                })
                .await
                .unwrap_or_else(|_| {
                    Err(PoolError::Closed {
                        upstream: name.clone(),
                    })
                });
            let elapsed = now.elapsed();
            let outcome = match &result {
                Ok(resp) if resp.status.is_server_error() => Outcome::Failure { elapsed },
                // 429 says "slow down", not "unhealthy"; 4xx is a healthy answer.
                Ok(resp) if resp.status == StatusCode::TOO_MANY_REQUESTS => Outcome::Ignored,
                Ok(_) => Outcome::Success { elapsed },
                Err(e) if e.is_upstream_failure() => Outcome::Failure { elapsed },
                Err(_) => Outcome::Ignored,
            };
            self.breaker.do_send(CallOutcome { ticket, outcome });

            let (error, retry_after) = match result {
                Ok(resp) if resp.status.as_u16() < 400 => {
                    return Ok(Response::from_upstream(name, resp, attempt + 1))
                }
                Ok(resp) => {
                    let retry_after = resp
                        .headers
                        .get(header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    let retryable = matches!(resp.status.as_u16(), 429 | 502 | 503 | 504);
                    let error = HttpError::Status {
                        upstream: name.clone(),
                        status: resp.status,
                        retry_after,
                        response: Box::new(Response::from_upstream(name, resp, attempt + 1)),
                    };
                    if !retryable {
                        return Err(error);
                    }
                    (error, retry_after)
                }
                Err(e @ PoolError::Connect { .. }) => (HttpError::from_pool(e), None),
                Err(e) => return Err(HttpError::from_pool(e)),
            };

            if !idempotent || attempt >= self.settings.retry_attempts {
                return Err(error);
            }
            let within_budget = self
                .budget
                .lock()
                .map(|mut b| b.try_withdraw(Instant::now().into_std()))
                .unwrap_or(false);
            if !within_budget {
                log::warn!("upstream {name}: retry budget exhausted, not retrying: {error}");
                return Err(error);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self
                .backoff
                .plan_retry(attempt, retry_after, remaining, jitter.unit())
            {
                RetryDecision::Wait(wait) => {
                    log::debug!(
                        "upstream {name}: retry {} in {wait:?} after: {error}",
                        attempt + 1
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                RetryDecision::GiveUp(_) => return Err(error),
            }
        }
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Builds a fallback response from the error that made it necessary.
pub type FallbackFn = Arc<dyn Fn(&HttpError) -> Option<Response> + Send + Sync>;

/// What a caller supplies when a call cannot succeed.
#[derive(Clone)]
pub enum Fallback {
    /// Always this response.
    Value(Response),
    /// A response computed from the error; `None` keeps the error.
    With(FallbackFn),
}

impl Fallback {
    fn produce(&self, error: &HttpError) -> Option<Response> {
        let mut resp = match self {
            Fallback::Value(r) => Some(r.clone()),
            Fallback::With(f) => f(error),
        }?;
        resp.from_fallback = true;
        Some(resp)
    }
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::Value(r) => f.debug_tuple("Value").field(&r.status).finish(),
            Fallback::With(_) => f.write_str("With(..)"),
        }
    }
}

/// One logical request, before it runs.
#[derive(Debug, Clone)]
pub struct Request {
    pub(crate) method: Method,
    pub(crate) path_and_query: String,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) body: Bytes,
    pub(crate) retry_non_idempotent: bool,
    pub(crate) wait_for_rate_limit: Option<bool>,
    pub(crate) rate_limit_key: Option<String>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) fallback: Option<Fallback>,
}

impl Request {
    pub(crate) fn new(method: Method, path_and_query: String) -> Self {
        Request {
            method,
            path_and_query,
            headers: Vec::new(),
            body: Bytes::new(),
            retry_non_idempotent: false,
            wait_for_rate_limit: None,
            rate_limit_key: None,
            deadline: None,
            fallback: None,
        }
    }
}

/// A request being built: set headers, a body and policy, then [`send`](Self::send).
#[must_use = "a request does nothing until it is sent"]
pub struct RequestBuilder {
    pub(crate) target: Result<Arc<Upstream>, HttpError>,
    pub(crate) request: Request,
}

impl RequestBuilder {
    /// Adds a header. An invalid name or value fails the request at `send`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(n), Ok(v)) => self.request.headers.push((n, v)),
            _ => {
                self.target = Err(HttpError::InvalidRequest {
                    reason: format!("invalid header {name:?}"),
                })
            }
        }
        self
    }

    /// Adds an already-typed header.
    pub fn typed_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.request.headers.push((name, value));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.request.body = body.into();
        self
    }

    /// Sets a JSON body and `Content-Type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.request.body = body.into();
                self.request.headers.push((
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ));
            }
            Err(e) => {
                self.target = Err(HttpError::InvalidRequest {
                    reason: format!("cannot encode JSON body: {e}"),
                })
            }
        }
        self
    }

    /// Allows retries of a non-idempotent method (POST, PATCH): only when the
    /// caller knows a repeat is harmless (an idempotency key, say).
    pub fn retry_non_idempotent(mut self) -> Self {
        self.request.retry_non_idempotent = true;
        self
    }

    /// Whether to wait for the rate limiter when the wait fits the deadline
    /// (overrides the configured `wait_for_rate_limit`).
    pub fn wait_for_rate_limit(mut self, wait: bool) -> Self {
        self.request.wait_for_rate_limit = Some(wait);
        self
    }

    /// The rate-limit key (default: the upstream's name). Use an API key or a
    /// client IP to limit per caller.
    pub fn rate_limit_key(mut self, key: impl Into<String>) -> Self {
        self.request.rate_limit_key = Some(key.into());
        self
    }

    /// The overall deadline of this call (default: the configured one).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.request.deadline = Some(deadline);
        self
    }

    /// A response to use when the breaker is open or the call finally fails.
    pub fn fallback(mut self, response: Response) -> Self {
        self.request.fallback = Some(Fallback::Value(response));
        self
    }

    /// A fallback computed from the error; returning `None` keeps the error.
    pub fn fallback_with(
        mut self,
        f: impl Fn(&HttpError) -> Option<Response> + Send + Sync + 'static,
    ) -> Self {
        self.request.fallback = Some(Fallback::With(Arc::new(f)));
        self
    }

    /// Runs the request through limiter → breaker → pool, with retries.
    pub async fn send(self) -> Result<Response, HttpError> {
        let upstream = self.target?;
        upstream.call(self.request).await
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The upstream that answered.
    pub upstream: String,
    /// How many attempts it took (0 for a fallback built by the caller).
    pub attempts: u32,
    /// True if this came from the caller's fallback, not the upstream.
    pub from_fallback: bool,
}

impl Response {
    fn from_upstream(upstream: &str, r: UpstreamResponse, attempts: u32) -> Self {
        Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
            upstream: upstream.to_owned(),
            attempts,
            from_fallback: false,
        }
    }

    /// A response built by the caller (for fallbacks).
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Response {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
            upstream: String::new(),
            attempts: 0,
            from_fallback: false,
        }
    }

    /// A `200` JSON response built by the caller (for fallbacks).
    pub fn json_value(value: &serde_json::Value) -> Self {
        let mut r = Response::new(StatusCode::OK, value.to_string());
        r.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    /// The body as raw bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.body
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, HttpError> {
        std::str::from_utf8(&self.body).map_err(|e| HttpError::Decode {
            upstream: self.upstream.clone(),
            message: format!("body is not UTF-8: {e}"),
        })
    }

    /// The body decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Decode {
            upstream: self.upstream.clone(),
            message: format!("body is not the expected JSON: {e}"),
        })
    }
}
