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
//!
//! What the caller gets back keeps one framing: by default the body is
//! decoded (awc advertises and undoes gzip, brotli, deflate and zstd) and
//! `Content-Encoding`/`Content-Length` are dropped from the headers, so an
//! app never sees an encoding that its bytes no longer have;
//! [`RequestBuilder::keep_content_encoding`] (the `/proxy` gateway) instead
//! passes the upstream's encoded bytes through untouched under its own
//! headers, and its cache entries vary on the `Accept-Encoding` sent. A
//! response head over [`MAX_RESPONSE_HEADER_BYTES`] is refused as the
//! upstream's fault (a breaker failure, [`HttpError::Transport`]). Which
//! errors count against the upstream is tabled in [`crate::error`].
//!
//! Cancellation is a normal path. A caller that gives up drops its call's
//! future, and with it, through drop guards, everything the call held: the
//! breaker permit reports `Ignored` (a half-open probe slot comes back), the
//! pool aborts the request (its bulkhead slot and connection come back), a
//! rate-limit grant whose request was never sent is refunded, and a cached
//! call's single-flight place is given up — a leader's release of its
//! followers included (see `call_cached`).
//!
//! Every call is also counted, in one [`CallStats`] per upstream behind a
//! `Mutex` (read by [`Upstream::call_stats`], exposed by `GET /metrics`):
//! how it ended ([`CallOutcome`]), every attempt's status class, the
//! duration of whole calls, retries, and retries the budget refused. The lock
//! is taken once per attempt and once per call, almost always by the
//! upstream's own arbiter thread, so it is uncontended: a few tens of
//! nanoseconds against a network round trip.

use crate::auth::Auth;
use crate::config::{LoadBalancing, UpstreamSettings};
use crate::error::HttpError;
use actix::prelude::*;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Bytes;
use happynet_actors::backoff::{parse_retry_after, Backoff, Jitter, RetryBudget, RetryDecision};
use happynet_actors::balancer::{EjectionConfig, Strategy};
use happynet_actors::breaker::{BreakerActor, AttemptOutcome, Permit};
use happynet_actors::cache::{
    CacheCounters, CacheKey, Lookup, ResponseCache, StoredResponse, Validators,
};
use happynet_actors::gcra::Quota;
use happynet_actors::histogram::Histogram;
use happynet_actors::limiter::{Grant, RateLimiterActor, Reserve};
use happynet_actors::pool::{
    Execute, ExecuteStream, PoolActor, PoolConfig, PoolError, UpstreamResponse,
};
use happynet_actors::single_flight::{
    FlightCounters, FlightId, Joined, SingleFlight, WaiterId, DEFAULT_MAX_FLIGHTS,
    DEFAULT_MAX_WAITERS,
};
use serde::de::DeserializeOwned;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// A caller waiting for another caller's identical upstream call: it gets
/// the leader's outcome, or sees the sender dropped when the leader went
/// away without one (then it tries again itself).
type CollapsedWaiter = tokio::sync::oneshot::Sender<Result<Response, HttpError>>;

/// How many times a follower, released because its leader went away, joins
/// the key's next flight before it calls alone. Each release means a leader
/// was cancelled or timed out; a follower that has seen this many in a row
/// stops betting on the next one (its own deadline still bounds it).
const MAX_RELEASES: u32 = 4;

/// Keys a limiter tracks at once: per-caller keys (API keys, client IPs)
/// beyond this are refused until idle ones are swept.
const MAX_LIMITER_KEYS: usize = 100_000;

/// The largest response head accepted from an upstream, counted as
/// [`header_bytes`] does: 64 KiB. Above what real APIs send (a few KiB, a
/// cookie-heavy site tens), below the 128 KiB awc parses at all, so that an
/// upstream cannot make every cached entry, and every caller of a gateway,
/// carry its bloat. Over it, the attempt is a [`HttpError::Transport`] and a
/// breaker failure: the upstream's fault.
pub const MAX_RESPONSE_HEADER_BYTES: usize = 64 << 10;

/// The size of headers as they go on the wire in HTTP/1.1: each line's
/// name, value, `": "` and CRLF.
pub fn header_bytes<'a>(
    headers: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) -> usize {
    headers
        .into_iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// Drops the headers that describe an encoding the body no longer has: the
/// body was decoded (when `Content-Encoding` names a coding awc decodes;
/// any other is left, with its bytes, as it came), so the encoded length is
/// wrong too.
fn drop_decoded_encoding(headers: &mut HeaderMap) {
    let decoded = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.parse::<header::ContentEncoding>().is_ok());
    if decoded {
        headers.remove(header::CONTENT_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// One upstream's actors and policy. Shared by every request to it.
pub struct Upstream {
    settings: UpstreamSettings,
    arbiter: ArbiterHandle,
    cache: Option<Mutex<ResponseCache>>,
    /// Identical misses in the air (see [`SingleFlight`]); the leaders'
    /// and followers' drop guards keep it right when callers go away.
    inflight: Mutex<SingleFlight<CollapsedWaiter>>,
    auth: Option<Auth>,
    default_headers: Vec<(HeaderName, HeaderValue)>,
    pool: Addr<PoolActor>,
    breaker: Addr<BreakerActor>,
    limiter: Addr<RateLimiterActor>,
    backoff: Backoff,
    budget: Mutex<RetryBudget>,
    /// What the calls did; see [`CallStats`].
    calls: Mutex<CallStats>,
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
        let breaker_config = settings.breaker.breaker_config();
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
        let shared_limit = settings.shared_limit.clone();
        let auth = settings
            .auth
            .as_ref()
            .map(|a| Auth::resolve(&name, a))
            .transpose()?;
        let cache = settings
            .cache
            .as_ref()
            .map(|c| {
                ResponseCache::new(c.cache_config())
                    .map(Mutex::new)
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
        Ok(Upstream {
            pool: PoolActor::start_on(arbiter, pool_config),
            breaker: BreakerActor::start_in_arbiter(arbiter, move |_| breaker),
            limiter: RateLimiterActor::start_in_arbiter(arbiter, move |_| {
                let limiter = RateLimiterActor::new(limiter_name, quota, MAX_LIMITER_KEYS);
                // `shared_rate_limit`: the limit holds across the cluster.
                match shared_limit {
                    Some(shared) => limiter.with_shared(shared),
                    None => limiter,
                }
            }),
            backoff,
            budget: Mutex::new(budget),
            calls: Mutex::new(CallStats::default()),
            arbiter: arbiter.clone(),
            cache,
            inflight: Mutex::new(SingleFlight::new(DEFAULT_MAX_WAITERS, DEFAULT_MAX_FLIGHTS)),
            auth,
            default_headers,
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

    /// The client's credential, if it has one.
    pub fn auth(&self) -> Option<&Auth> {
        self.auth.as_ref()
    }

    /// The limiter's address (for stats).
    pub fn limiter(&self) -> &Addr<RateLimiterActor> {
        &self.limiter
    }

    /// A snapshot of what this upstream's calls have done so far.
    pub fn call_stats(&self) -> CallStats {
        self.count(|stats| stats.clone())
    }

    /// Runs `f` on the call counters. A poisoned lock is used anyway: a
    /// panic elsewhere cannot leave counters in a state worth refusing.
    fn count<T>(&self, f: impl FnOnce(&mut CallStats) -> T) -> T {
        f(&mut self.calls.lock().unwrap_or_else(PoisonError::into_inner))
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
    ///
    /// A fresh cache hit is answered on the caller's thread, without the
    /// round trip: the cache is shared, and a hit needs no actor. It is
    /// counted as [`CallOutcome::CacheHit`] but not timed: its
    /// microseconds would hide the upstream's latency in the histogram.
    pub async fn call(self: &Arc<Self>, req: Request) -> Result<Response, HttpError> {
        let cached = match self.cache_key(&req) {
            Some(key) => match self.with_cache(|c, now| c.lookup(&key, now)) {
                Some(Lookup::Fresh(stored)) => {
                    self.count(|s| s.ended(CallOutcome::CacheHit, None));
                    return Ok(self.cached_response(stored));
                }
                Some(Lookup::Stale { validators, .. }) => Some((key, Some(validators))),
                _ => Some((key, None)),
            },
            None => None,
        };
        let classify = |r: &Result<Response, HttpError>| match r {
            Ok(resp) if resp.from_fallback => CallOutcome::Fallback,
            Ok(_) => CallOutcome::Ok,
            Err(e) => CallOutcome::of_error(e),
        };
        self.hand_off(
            classify,
            move |this| async move { this.run(req, cached).await },
        )
        .await
    }

    /// Runs `work` on the upstream's arbiter, beside its actors, and waits
    /// for its answer. A caller that gives up (a gateway client hung up, say)
    /// stops the work: no more retries or waits on its behalf.
    ///
    /// Counts the call: how it ended (`classify`) and how long it took from
    /// here to its answer, or [`CallOutcome::Cancelled`] when the work is
    /// dropped unfinished.
    async fn hand_off<T, F, Fut>(
        self: &Arc<Self>,
        classify: fn(&Result<T, HttpError>) -> CallOutcome,
        work: F,
    ) -> Result<T, HttpError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, HttpError>> + Send + 'static,
    {
        let (mut reply, answer) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let started = Instant::now();
        let spawned = self.arbiter.spawn(async move {
            // Counts `Cancelled` if this task is dropped before `finish`:
            // the caller hung up, or the arbiter stopped under it.
            let record = CallRecord {
                upstream: &this,
                started,
                finished: false,
            };
            tokio::select! {
                result = work(this.clone()) => {
                    record.finish(classify(&result));
                    let _ = reply.send(result);
                }
                _ = reply.closed() => {}
            }
        });
        let gone = || HttpError::Internal {
            upstream: self.settings.name.clone(),
            message: "the upstream arbiter has stopped".into(),
        };
        if !spawned {
            self.count(|s| s.ended(CallOutcome::Internal, None));
            return Err(gone());
        }
        answer.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Runs `req` on the upstream's arbiter. `cached` is the cache key and
    /// the stale entry's validators, when the caller already looked it up.
    async fn run(
        &self,
        req: Request,
        cached: Option<(CacheKey, Option<Validators>)>,
    ) -> Result<Response, HttpError> {
        let started = Instant::now();
        let deadline = started + req.deadline.unwrap_or(self.settings.deadline);
        let work = async {
            match cached {
                Some((key, validators)) => self.call_cached(&req, deadline, key, validators).await,
                None => self.call_inner(&req, deadline, None).await,
            }
        };
        let result = match tokio::time::timeout_at(deadline, work).await {
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

    /// The cache key of a request, if it may use the cache: a GET or HEAD
    /// that carries no credential of the caller's own (a shared cache must
    /// not hand one caller's authorised answer to another), or any request
    /// the caller gave a key.
    fn cache_key(&self, req: &Request) -> Option<CacheKey> {
        self.cache.as_ref()?;
        if let Some(key) = &req.cache_key {
            return Some(key.clone());
        }
        let cacheable = matches!(req.method, Method::GET | Method::HEAD)
            && !req
                .headers
                .iter()
                .any(|(n, _)| n == header::AUTHORIZATION || n == header::COOKIE);
        let accept = req
            .headers
            .iter()
            .find(|(n, _)| n == header::ACCEPT)
            .and_then(|(_, v)| v.to_str().ok())
            .unwrap_or("");
        if !cacheable {
            return None;
        }
        let key = CacheKey::for_request(&req.method, &req.path_and_query, &[("accept", accept)]);
        // A passed-through body is in the encoding the request accepted: one
        // entry per `Accept-Encoding`, and never the decoded entry an app's
        // call made (nor the other way round).
        Some(if req.keep_encoding {
            let accept_encoding = req
                .headers
                .iter()
                .find(|(n, _)| n == header::ACCEPT_ENCODING)
                .and_then(|(_, v)| v.to_str().ok())
                .unwrap_or("");
            key.varying(&[
                ("content-coding", "as-sent"),
                ("accept-encoding", accept_encoding),
            ])
        } else {
            key
        })
    }

    fn with_cache<T>(
        &self,
        f: impl FnOnce(&mut ResponseCache, std::time::Instant) -> T,
    ) -> Option<T> {
        let cache = self.cache.as_ref()?;
        let mut cache = cache.lock().ok()?;
        Some(f(&mut cache, Instant::now().into_std()))
    }

    /// A stored response as the caller gets it, marked as from the cache.
    fn cached_response(&self, stored: StoredResponse) -> Response {
        Response {
            status: stored.status,
            headers: stored.headers,
            body: stored.body,
            upstream: self.settings.name.clone(),
            attempts: 0,
            from_fallback: false,
            from_cache: true,
        }
    }

    /// A cached call that missed (or found a stale entry): identical
    /// misses in the air at once make one upstream call, led by the first.
    ///
    /// Cancellation is a normal path here. The leader holds a
    /// [`LeadingFlight`] guard: if its caller hangs up or its deadline fires
    /// mid-call, the guard frees the key and releases the followers, who
    /// look the key up again and join a new flight (the first of them
    /// leads it). A follower holds a [`FollowingFlight`] guard that gives
    /// up its place when it goes away. Beyond [`DEFAULT_MAX_WAITERS`]
    /// followers of one flight, a caller gets [`HttpError::Overloaded`].
    async fn call_cached(
        &self,
        req: &Request,
        deadline: Instant,
        key: CacheKey,
        mut validators: Option<Validators>,
    ) -> Result<Response, HttpError> {
        let name = &self.settings.name;
        for _ in 0..=MAX_RELEASES {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let joined = self.flights(|f| f.join(&key, || tx));
            let (flight, waiter) = match joined {
                Joined::Lead(flight) => {
                    let leading = LeadingFlight {
                        upstream: self,
                        key: &key,
                        flight,
                        ended: false,
                    };
                    let result = self.fetch_cached(req, deadline, &key, validators).await;
                    leading.finish(&result);
                    return result;
                }
                Joined::Alone => return self.fetch_cached(req, deadline, &key, validators).await,
                Joined::Refused { waiters } => {
                    log::warn!(
                        "upstream {name}: {waiters} callers already wait for {key}; refusing one more"
                    );
                    return Err(HttpError::Overloaded {
                        upstream: name.clone(),
                    });
                }
                Joined::Follow { flight, waiter } => (flight, waiter),
            };
            let following = FollowingFlight {
                upstream: self,
                key: &key,
                flight,
                waiter,
                ended: false,
            };
            let outcome = rx.await;
            // The flight has ended either way, and took its waiters with it.
            following.ended();
            if let Ok(result) = outcome {
                return result;
            }
            // Released: the leader went away without an outcome. Look again
            // (another caller may have stored an answer meanwhile) and join
            // the next flight.
            match self.with_cache(|c, now| c.lookup(&key, now)) {
                Some(Lookup::Fresh(stored)) => return Ok(self.cached_response(stored)),
                Some(Lookup::Stale { validators: v, .. }) => validators = Some(v),
                _ => validators = None,
            }
        }
        self.fetch_cached(req, deadline, &key, validators).await
    }

    /// One upstream call for a cached request, and what it means for the
    /// cache: a 304 refreshes the stale entry, a 200 is stored, and a
    /// failure is answered with a stale copy while `stale_if_error` allows.
    async fn fetch_cached(
        &self,
        req: &Request,
        deadline: Instant,
        key: &CacheKey,
        validators: Option<Validators>,
    ) -> Result<Response, HttpError> {
        let name = &self.settings.name;
        let from_cache = |stored: StoredResponse| self.cached_response(stored);
        let result = self.call_inner(req, deadline, validators.as_ref()).await;
        match result {
            Ok(resp) if resp.status == StatusCode::NOT_MODIFIED && validators.is_some() => {
                match self
                    .with_cache(|c, now| c.revalidated(key, &resp.headers, now))
                    .flatten()
                {
                    Some(stored) => Ok(from_cache(stored)),
                    None => Ok(resp),
                }
            }
            Ok(resp) => {
                let stored = StoredResponse {
                    status: resp.status,
                    headers: resp.headers.clone(),
                    body: resp.body.clone(),
                };
                self.with_cache(|c, now| c.store(key.clone(), stored, now));
                Ok(resp)
            }
            Err(e) => match self
                .with_cache(|c, now| c.stale_on_error(key, now))
                .flatten()
            {
                Some(stored) => {
                    log::info!("upstream {name}: serving a stale cached answer after: {e}");
                    Ok(from_cache(stored))
                }
                None => Err(e),
            },
        }
    }

    /// Runs `f` on the single-flight table. A poisoned lock is used anyway:
    /// every transition leaves the table consistent, and refusing it would
    /// wedge every cached key.
    fn flights<T>(&self, f: impl FnOnce(&mut SingleFlight<CollapsedWaiter>) -> T) -> T {
        f(&mut self.inflight.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The cache's counters, and how many calls were collapsed into
    /// another's; `None` without a cache.
    pub fn cache_stats(&self) -> Option<(CacheCounters, u64, usize, usize)> {
        let collapsed = self.flights(|f| f.counters().followed);
        self.with_cache(|c, _| (c.counters(), collapsed, c.len(), c.bytes()))
    }

    /// What the cache's single-flight has done (led, followed, abandoned,
    /// refused…); `None` without a cache.
    pub fn flight_stats(&self) -> Option<FlightCounters> {
        self.cache.as_ref()?;
        Some(self.flights(|f| f.counters()))
    }

    /// The headers and path a request goes out with: the client's default
    /// headers and its credentials added. Fails, naming the variable, when
    /// the credential's environment variable was not set.
    fn outgoing(
        &self,
        req: &Request,
    ) -> Result<(String, Vec<(HeaderName, HeaderValue)>), HttpError> {
        let mut headers = self.default_headers.clone();
        headers.extend(req.headers.iter().cloned());
        let mut path = req.path_and_query.clone();
        if let Some(auth) = &self.auth {
            auth.apply(&self.settings.name, &mut path, &mut headers)?;
        }
        // A target awc would refuse is the caller's mistake: refused here,
        // before the limiter, breaker and pool, so it is never an attempt.
        if !path.starts_with('/')
            || actix_web::http::uri::PathAndQuery::try_from(path.as_str()).is_err()
        {
            return Err(HttpError::InvalidRequest {
                reason: format!("{:?} is not a valid request target", req.path_and_query),
            });
        }
        Ok((path, headers))
    }

    /// A response head over [`MAX_RESPONSE_HEADER_BYTES`], as the attempt's
    /// verdict (the upstream's fault: a breaker failure).
    fn head_too_large(
        &self,
        headers: &HeaderMap,
        elapsed: Duration,
    ) -> Option<(HttpError, AttemptOutcome)> {
        let size = header_bytes(headers);
        (size > MAX_RESPONSE_HEADER_BYTES).then(|| {
            (
                HttpError::Transport {
                    upstream: self.settings.name.clone(),
                    message: format!(
                        "response headers of {size} bytes, over the limit of {MAX_RESPONSE_HEADER_BYTES}"
                    ),
                },
                AttemptOutcome::Failure { elapsed },
            )
        })
    }

    /// Classifies a complete response: done, worth retrying, or final.
    fn judge(&self, req: &Request, resp: Response) -> Attempt<Response> {
        if resp.status.as_u16() < 400 {
            return Attempt::Done(resp);
        }
        let retry_after = resp
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let retryable = matches!(resp.status.as_u16(), 429 | 502 | 503 | 504)
            && !req.give_up_if.as_ref().is_some_and(|f| f(&resp));
        let error = HttpError::Status {
            upstream: self.settings.name.clone(),
            status: resp.status,
            retry_after,
            response: Box::new(resp),
        };
        if retryable {
            Attempt::Retry { error, retry_after }
        } else {
            Attempt::Fail(error)
        }
    }

    /// What one failed pool call means for the retry loop.
    fn judge_pool_error(e: PoolError) -> Attempt<Response> {
        match e {
            e @ PoolError::Connect { .. } => Attempt::Retry {
                error: HttpError::from_pool(e),
                retry_after: None,
            },
            e => Attempt::Fail(HttpError::from_pool(e)),
        }
    }

    /// The breaker's view of one attempt.
    fn outcome_of(
        status: Option<StatusCode>,
        error: Option<&PoolError>,
        elapsed: Duration,
    ) -> AttemptOutcome {
        match (status, error) {
            (Some(s), _) if s.is_server_error() => AttemptOutcome::Failure { elapsed },
            // 429 says "slow down", not "unhealthy"; other 4xx are healthy answers.
            (Some(StatusCode::TOO_MANY_REQUESTS), _) => AttemptOutcome::Ignored,
            (Some(_), _) => AttemptOutcome::Success { elapsed },
            (None, Some(e)) if e.is_upstream_failure() => AttemptOutcome::Failure { elapsed },
            _ => AttemptOutcome::Ignored,
        }
    }

    /// The retry loop shared by whole and streamed calls: limiter, breaker,
    /// one attempt (`attempt_once`), the outcome back to the breaker, and
    /// the decision to retry. `attempt_once` gets the attempt's deadline, its
    /// number and its rate-limit grant (to hand to the pool, which spends it
    /// when the request is sent), and returns its verdict with the breaker
    /// outcome.
    async fn pipeline<T, F, Fut>(
        &self,
        req: &Request,
        deadline: Instant,
        mut attempt_once: F,
    ) -> Result<T, HttpError>
    where
        F: FnMut(Instant, u32, Grant) -> Fut,
        Fut: std::future::Future<Output = (Attempt<T>, AttemptOutcome)>,
    {
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
            // The limiter: wait out a denial only if it fits the deadline. A
            // denied caller holds nothing while it waits; the grant it gets
            // goes with the attempt and is refunded if the request is never
            // sent (breaker refusal, bulkhead, caller gone).
            let grant = loop {
                let verdict = self
                    .limiter
                    .send(Reserve { key: key.clone() })
                    .await
                    .map_err(|e| self.mailbox_error("rate limiter", e))?;
                match verdict {
                    Ok(grant) => break grant,
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
            };

            // A permit dropped unreported (this future cancelled mid-attempt)
            // reports itself as ignored: no half-open probe slot is lost.
            let permit = match self
                .breaker
                .send(Permit)
                .await
                .map_err(|e| self.mailbox_error("breaker", e))?
            {
                Ok(permit) => permit,
                Err(open) => {
                    return Err(HttpError::BreakerOpen {
                        upstream: name.clone(),
                        retry_after: open.retry_after,
                    })
                }
            };

            let attempt_deadline = deadline.min(Instant::now() + self.settings.attempt_timeout);
            if attempt > 0 {
                self.count(|s| s.retries += 1);
            }
            let (verdict, outcome) = attempt_once(attempt_deadline, attempt + 1, grant).await;
            permit.report(outcome);

            let (error, retry_after) = match verdict {
                Attempt::Done(value) => return Ok(value),
                Attempt::Fail(error) => return Err(error),
                Attempt::Retry { error, retry_after } => (error, retry_after),
            };
            if !idempotent || attempt >= self.settings.retry_attempts {
                return Err(error);
            }
            // Plan first, withdraw second: a retry the deadline rules out
            // must not spend a token from the budget other calls share.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait = match self
                .backoff
                .plan_retry(attempt, retry_after, remaining, jitter.unit())
            {
                RetryDecision::Wait(wait) => wait,
                RetryDecision::GiveUp(_) => return Err(error),
            };
            let within_budget = self
                .budget
                .lock()
                .map(|mut b| b.try_withdraw(Instant::now().into_std()))
                .unwrap_or(false);
            if !within_budget {
                self.count(|s| s.retry_budget_exhausted += 1);
                log::warn!("upstream {name}: retry budget exhausted, not retrying: {error}");
                return Err(error);
            }
            log::debug!(
                "upstream {name}: retry {} in {wait:?} after: {error}",
                attempt + 1
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn call_inner(
        &self,
        req: &Request,
        deadline: Instant,
        validators: Option<&Validators>,
    ) -> Result<Response, HttpError> {
        let (path, mut headers) = self.outgoing(req)?;
        if let Some(v) = validators {
            let mut conditional = HeaderMap::new();
            v.apply_to(&mut conditional);
            headers.extend(conditional);
        }
        self.pipeline(req, deadline, |attempt_deadline, attempts, grant| {
            let execute = Execute {
                method: req.method.clone(),
                path_and_query: path.clone(),
                headers: headers.clone(),
                body: req.body.clone(),
                deadline: attempt_deadline,
                decompress: !req.keep_encoding,
                grant: Some(grant),
            };
            async move {
                let started = Instant::now();
                let result = self.pool.send(execute).await.unwrap_or_else(|_| {
                    Err(PoolError::Closed {
                        upstream: self.settings.name.clone(),
                    })
                });
                let elapsed = started.elapsed();
                match result {
                    Ok(mut resp) => {
                        self.count(|s| s.responded(resp.status));
                        if let Some((error, outcome)) = self.head_too_large(&resp.headers, elapsed)
                        {
                            return (Attempt::Fail(error), outcome);
                        }
                        let outcome = Self::outcome_of(Some(resp.status), None, elapsed);
                        if !req.keep_encoding {
                            drop_decoded_encoding(&mut resp.headers);
                        }
                        let resp = Response::from_upstream(&self.settings.name, resp, attempts);
                        (self.judge(req, resp), outcome)
                    }
                    Err(e) => {
                        let outcome = Self::outcome_of(None, Some(&e), elapsed);
                        (Self::judge_pool_error(e), outcome)
                    }
                }
            }
        })
        .await
    }

    /// Like [`Upstream::call`], but the body is streamed. Retries happen only
    /// before the first byte of a successful response reaches the caller: an
    /// error status is read in full (bounded) and judged like any other.
    pub async fn call_stream(
        self: &Arc<Self>,
        req: Request,
    ) -> Result<StreamingResponse, HttpError> {
        let classify = |r: &Result<StreamingResponse, HttpError>| match r {
            Ok(_) => CallOutcome::Ok,
            Err(e) => CallOutcome::of_error(e),
        };
        self.hand_off(classify, move |this| async move {
            let started = Instant::now();
            let deadline = started + req.deadline.unwrap_or(this.settings.deadline);
            tokio::time::timeout_at(deadline, this.stream_inner(&req, deadline))
                .await
                .unwrap_or_else(|_| {
                    Err(HttpError::Timeout {
                        upstream: this.settings.name.clone(),
                        after: started.elapsed(),
                    })
                })
        })
        .await
    }

    async fn stream_inner(
        &self,
        req: &Request,
        deadline: Instant,
    ) -> Result<StreamingResponse, HttpError> {
        let (path, headers) = self.outgoing(req)?;
        let name = self.settings.name.clone();
        self.pipeline(req, deadline, |attempt_deadline, attempts, grant| {
            let execute = ExecuteStream {
                request: Execute {
                    method: req.method.clone(),
                    path_and_query: path.clone(),
                    headers: headers.clone(),
                    body: req.body.clone(),
                    deadline: attempt_deadline,
                    decompress: !req.keep_encoding,
                    grant: Some(grant),
                },
                idle_timeout: self.settings.attempt_timeout,
                write_timeout: req
                    .stream_write_timeout
                    .unwrap_or(self.settings.attempt_timeout),
            };
            let name = name.clone();
            async move {
                let started = Instant::now();
                let result = self.pool.send(execute).await.unwrap_or_else(|_| {
                    Err(PoolError::Closed {
                        upstream: name.clone(),
                    })
                });
                let elapsed = started.elapsed();
                let mut head = match result {
                    Ok(head) => head,
                    Err(e) => {
                        let outcome = Self::outcome_of(None, Some(&e), elapsed);
                        return (map_attempt(Self::judge_pool_error(e)), outcome);
                    }
                };
                self.count(|s| s.responded(head.status));
                if let Some((error, outcome)) = self.head_too_large(&head.headers, elapsed) {
                    return (Attempt::Fail(error), outcome);
                }
                let outcome = Self::outcome_of(Some(head.status), None, elapsed);
                if !req.keep_encoding {
                    drop_decoded_encoding(&mut head.headers);
                }
                if head.status.as_u16() < 400 {
                    let streamed = StreamingResponse {
                        status: head.status,
                        headers: head.headers,
                        upstream: name,
                        attempts,
                        body: head.body,
                        ended: Some(head.ended),
                    };
                    return (Attempt::Done(streamed), outcome);
                }
                // An error answer: read it whole (the pool bounds it) and
                // judge it like any other.
                let mut body = actix_web::web::BytesMut::new();
                while let Some(chunk) = head.body.recv().await {
                    match chunk {
                        Ok(c) => body.extend_from_slice(&c),
                        Err(e) => return (Attempt::Fail(HttpError::from_pool(e)), outcome),
                    }
                }
                let resp = Response {
                    status: head.status,
                    headers: head.headers,
                    body: body.freeze(),
                    upstream: name,
                    attempts,
                    from_fallback: false,
                    from_cache: false,
                };
                (map_attempt(self.judge(req, resp)), outcome)
            }
        })
        .await
    }
}

/// One attempt's verdict.
enum Attempt<T> {
    /// Success: return it.
    Done(T),
    /// A failure worth retrying (if policy allows), with the upstream's
    /// requested wait.
    Retry {
        error: HttpError,
        retry_after: Option<Duration>,
    },
    /// A final failure.
    Fail(HttpError),
}

/// Re-types a verdict whose success case cannot occur (errors only).
fn map_attempt<T>(a: Attempt<Response>) -> Attempt<T> {
    match a {
        Attempt::Done(resp) => Attempt::Fail(HttpError::Status {
            upstream: resp.upstream.clone(),
            status: resp.status,
            retry_after: None,
            response: Box::new(resp),
        }),
        Attempt::Retry { error, retry_after } => Attempt::Retry { error, retry_after },
        Attempt::Fail(e) => Attempt::Fail(e),
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// How one call to an upstream ended: the `outcome` label of
/// `happynet_upstream_requests_total`.
///
/// A closed set: the three ways a caller gets a response, a call the caller
/// gave up on, and one per [`HttpError`] variant, named after
/// [`HttpError::kind`] so that a metric, a log line and a gateway's error
/// body use the same word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallOutcome {
    /// `ok`: a response from the upstream (or, on a cached path, a stale
    /// entry revalidated by a `304` or served after an upstream failure;
    /// the cache's own families count those).
    Ok,
    /// `cache_hit`: a fresh cached response, without the upstream.
    CacheHit,
    /// `fallback`: the call failed and the caller's fallback answered.
    Fallback,
    /// `cancelled`: the caller stopped waiting (or the upstream arbiter
    /// stopped) before the call ended.
    Cancelled,
    /// `timeout`: [`HttpError::Timeout`].
    Timeout,
    /// `connect`: [`HttpError::Connect`].
    Connect,
    /// `status`: [`HttpError::Status`], an error status the caller got.
    Status,
    /// `breaker_open`: [`HttpError::BreakerOpen`].
    BreakerOpen,
    /// `rate_limited`: [`HttpError::RateLimited`].
    RateLimited,
    /// `overloaded`: [`HttpError::Overloaded`] (the bulkhead was full).
    Overloaded,
    /// `transport`: [`HttpError::Transport`].
    Transport,
    /// `decode`: [`HttpError::Decode`].
    Decode,
    /// `invalid_request`: [`HttpError::InvalidRequest`].
    InvalidRequest,
    /// `missing_secret`: [`HttpError::MissingSecret`].
    MissingSecret,
    /// `internal`: [`HttpError::Internal`].
    Internal,
}

impl CallOutcome {
    /// Every outcome, in the order [`CallStats`] keeps them.
    pub const ALL: [CallOutcome; 15] = [
        CallOutcome::Ok,
        CallOutcome::CacheHit,
        CallOutcome::Fallback,
        CallOutcome::Cancelled,
        CallOutcome::Timeout,
        CallOutcome::Connect,
        CallOutcome::Status,
        CallOutcome::BreakerOpen,
        CallOutcome::RateLimited,
        CallOutcome::Overloaded,
        CallOutcome::Transport,
        CallOutcome::Decode,
        CallOutcome::InvalidRequest,
        CallOutcome::MissingSecret,
        CallOutcome::Internal,
    ];

    /// The outcome of a call that failed with `e`.
    pub fn of_error(e: &HttpError) -> Self {
        // Exhaustive on purpose: a new error variant must choose its outcome.
        match e {
            HttpError::Timeout { .. } => CallOutcome::Timeout,
            HttpError::Connect { .. } => CallOutcome::Connect,
            HttpError::Status { .. } => CallOutcome::Status,
            HttpError::BreakerOpen { .. } => CallOutcome::BreakerOpen,
            HttpError::RateLimited { .. } => CallOutcome::RateLimited,
            HttpError::Overloaded { .. } => CallOutcome::Overloaded,
            HttpError::Transport { .. } => CallOutcome::Transport,
            HttpError::Decode { .. } => CallOutcome::Decode,
            HttpError::InvalidRequest { .. } => CallOutcome::InvalidRequest,
            HttpError::MissingSecret { .. } => CallOutcome::MissingSecret,
            HttpError::Internal { .. } => CallOutcome::Internal,
        }
    }

    /// The label value: `ok`, `cache_hit`, `fallback`, `cancelled`, or the
    /// error's [`HttpError::kind`].
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::CacheHit => "cache_hit",
            CallOutcome::Fallback => "fallback",
            CallOutcome::Cancelled => "cancelled",
            CallOutcome::Timeout => "timeout",
            CallOutcome::Connect => "connect",
            CallOutcome::Status => "status",
            CallOutcome::BreakerOpen => "breaker_open",
            CallOutcome::RateLimited => "rate_limited",
            CallOutcome::Overloaded => "overloaded",
            CallOutcome::Transport => "transport",
            CallOutcome::Decode => "decode",
            CallOutcome::InvalidRequest => "invalid_request",
            CallOutcome::MissingSecret => "missing_secret",
            CallOutcome::Internal => "internal",
        }
    }

    /// This outcome's place in [`CallOutcome::ALL`], which lists the
    /// variants in declaration order (a unit test checks it).
    fn index(self) -> usize {
        self as usize
    }
}

/// The `class` labels of `happynet_upstream_responses_total`: the five
/// standard status classes, and `other` for the codes 600–999 that HTTP
/// parsers accept but no standard defines.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// What one upstream's calls have done since it started: a snapshot from
/// [`Upstream::call_stats`]. Plain data; every count only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls per outcome, in the order of [`CallOutcome::ALL`].
    requests: [u64; CallOutcome::ALL.len()],
    /// Responses (of every attempt) per class, in the order of
    /// [`STATUS_CLASSES`].
    responses: [u64; STATUS_CLASSES.len()],
    /// How long whole calls took, from the caller's hand-off to the answer,
    /// every retry and wait included. Fresh cache hits and cancelled calls
    /// are not timed (see [`CallOutcome`]).
    pub latency: Histogram,
    /// Attempts after the first (each retry that was sent).
    pub retries: u64,
    /// Retries that the retry policy wanted and the retry budget refused.
    pub retry_budget_exhausted: u64,
}

impl CallStats {
    /// Calls that ended with `outcome`.
    pub fn requests(&self, outcome: CallOutcome) -> u64 {
        self.requests[outcome.index()]
    }

    /// Calls per outcome, every outcome included (zeros too).
    pub fn requests_by_outcome(&self) -> impl Iterator<Item = (CallOutcome, u64)> + '_ {
        CallOutcome::ALL.into_iter().zip(self.requests)
    }

    /// Responses per status class ([`STATUS_CLASSES`]), counting every
    /// attempt's response, retried ones included.
    pub fn responses_by_class(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STATUS_CLASSES.into_iter().zip(self.responses)
    }

    /// Counts one attempt's response.
    pub(crate) fn responded(&mut self, status: StatusCode) {
        // `StatusCode` is 100..=999, so the class index is 0..=8.
        let class = usize::from(status.as_u16() / 100).saturating_sub(1);
        self.responses[class.min(STATUS_CLASSES.len() - 1)] += 1;
    }

    /// Counts one call's end; `took` is `None` for calls not timed.
    pub(crate) fn ended(&mut self, outcome: CallOutcome, took: Option<Duration>) {
        self.requests[outcome.index()] += 1;
        if let Some(took) = took {
            self.latency.observe(took);
        }
    }
}

/// One call being counted: [`finish`](Self::finish) counts its outcome and
/// duration; dropped unfinished, it counts the call as cancelled.
struct CallRecord<'a> {
    upstream: &'a Upstream,
    started: Instant,
    finished: bool,
}

impl CallRecord<'_> {
    fn finish(mut self, outcome: CallOutcome) {
        self.finished = true;
        let took = self.started.elapsed();
        self.upstream.count(|s| s.ended(outcome, Some(took)));
    }
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.upstream
                .count(|s| s.ended(CallOutcome::Cancelled, None));
        }
    }
}

/// The leader of a flight of identical cached calls: [`finish`](Self::finish)
/// hands the outcome to every follower. Dropped unfinished (the caller hung
/// up, the deadline fired), it abandons the flight: the key is free at once
/// and the followers, their senders dropped, try again themselves.
struct LeadingFlight<'a> {
    upstream: &'a Upstream,
    key: &'a CacheKey,
    flight: FlightId,
    ended: bool,
}

impl LeadingFlight<'_> {
    fn finish(mut self, result: &Result<Response, HttpError>) {
        self.ended = true;
        let waiters = self.upstream.flights(|f| f.finish(self.key, self.flight));
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

impl Drop for LeadingFlight<'_> {
    fn drop(&mut self) {
        if !self.ended {
            // Dropped outside the lock: each drop wakes a follower.
            let released = self.upstream.flights(|f| f.abandon(self.key, self.flight));
            log::debug!(
                "upstream {}: the call for {} went away; {} waiting callers released",
                self.upstream.settings.name,
                self.key,
                released.len()
            );
        }
    }
}

/// A follower's place in a flight: dropped before the flight ended (the
/// caller hung up, the deadline fired), it gives the place up, so that
/// callers who left do not fill the bounded waiter list.
struct FollowingFlight<'a> {
    upstream: &'a Upstream,
    key: &'a CacheKey,
    flight: FlightId,
    waiter: WaiterId,
    ended: bool,
}

impl FollowingFlight<'_> {
    /// The flight ended and took the waiter with it: nothing to give up.
    fn ended(mut self) {
        self.ended = true;
    }
}

impl Drop for FollowingFlight<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let left = self
                .upstream
                .flights(|f| f.leave(self.key, self.flight, self.waiter));
            // The sender is dropped outside the lock.
            drop(left);
        }
    }
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
#[derive(Clone)]
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
    pub(crate) give_up_if: Option<GiveUpIf>,
    pub(crate) cache_key: Option<CacheKey>,
    pub(crate) keep_encoding: bool,
    pub(crate) stream_write_timeout: Option<Duration>,
}

/// Says whether an otherwise retryable error response is final (an
/// out-of-quota 429, say).
pub type GiveUpIf = Arc<dyn Fn(&Response) -> bool + Send + Sync>;

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
            give_up_if: None,
            cache_key: None,
            keep_encoding: false,
            stream_write_timeout: None,
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

    /// Makes this request cacheable under `key` (when the client has a
    /// cache), whatever its method: e.g. `CacheKey::for_body(..)` for
    /// identical prompts to an LLM. Include the caller's identity in the key
    /// if answers differ per caller.
    pub fn cache_key(mut self, key: CacheKey) -> Self {
        self.request.cache_key = Some(key);
        self
    }

    /// Marks retryable error responses for which `f` is true as final (an
    /// out-of-quota 429 that no wait will cure, say).
    pub fn give_up_if(mut self, f: impl Fn(&Response) -> bool + Send + Sync + 'static) -> Self {
        self.request.give_up_if = Some(Arc::new(f));
        self
    }

    /// Passes the response body through as the upstream encoded it, under
    /// its own `Content-Encoding` and `Content-Length`, instead of decoding
    /// it: for a proxy, whose caller negotiated the encoding with its own
    /// `Accept-Encoding` (forward it as a header; without one the upstream
    /// is asked for nothing but identity). Cached answers vary on it.
    pub fn keep_content_encoding(mut self) -> Self {
        self.request.keep_encoding = true;
        self
    }

    /// For [`send_streaming`](Self::send_streaming): how long the body's
    /// reader may take no chunk, once the pool's chunk queue is full, before
    /// the call is abandoned — the upstream connection and the bulkhead slot
    /// freed, the stream ended with an error, and
    /// `PoolStats::stream_write_timeouts` counted. Default: the client's
    /// per-attempt `timeout`, the same time the upstream may take between
    /// chunks. The gateways use `network.gateway.stream_write_timeout`.
    pub fn stream_write_timeout(mut self, timeout: Duration) -> Self {
        self.request.stream_write_timeout = Some(timeout);
        self
    }

    /// Runs the request through limiter → breaker → pool, with retries.
    pub async fn send(self) -> Result<Response, HttpError> {
        let upstream = self.target?;
        upstream.call(self.request).await
    }

    /// Like [`send`](Self::send), but returns as soon as a successful
    /// response head arrives, with the body as a stream. Retries happen only
    /// before that point. Fallbacks do not apply to streams.
    pub async fn send_streaming(self) -> Result<StreamingResponse, HttpError> {
        let upstream = self.target?;
        upstream.call_stream(self.request).await
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
    /// True if this was served from the response cache.
    pub from_cache: bool,
}

/// A response whose body is still arriving.
#[derive(Debug)]
pub struct StreamingResponse {
    /// The status (always below 400: error answers become errors).
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The upstream that answered.
    pub upstream: String,
    /// How many attempts it took.
    pub attempts: u32,
    body: tokio::sync::mpsc::Receiver<Result<Bytes, PoolError>>,
    /// Says, once `body` is dry, whether the stream was whole (taken when
    /// read, so an error is given once).
    ended: Option<tokio::sync::oneshot::Receiver<Result<(), PoolError>>>,
}

impl StreamingResponse {
    /// The next body chunk; `None` at the end. A stream cut short without
    /// an error chunk (its reader stalled past the write timeout, or the
    /// pool stopped) ends with an `Err`, never with a `None` that would pass
    /// for a complete body.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, HttpError>> {
        match self.body.recv().await {
            Some(chunk) => Some(chunk.map_err(HttpError::from_pool)),
            // The pool says how the body ended before it drops the body's
            // sender, so the verdict is there by now.
            None => match self.ended.take()?.try_recv() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Err(HttpError::from_pool(e))),
                Err(_) => Some(Err(HttpError::Internal {
                    upstream: self.upstream.clone(),
                    message: "the connection pool stopped mid-stream".into(),
                })),
            },
        }
    }

    /// The body as a `Stream` of chunks (for `HttpResponse::streaming`).
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, HttpError>> {
        futures::stream::unfold(self, |mut r| async move {
            r.next_chunk().await.map(|chunk| (chunk, r))
        })
    }
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
            from_cache: false,
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
            from_cache: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_listed_in_declaration_order_with_distinct_labels() {
        for (i, outcome) in CallOutcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
        let mut labels: Vec<&str> = CallOutcome::ALL.iter().map(|o| o.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), CallOutcome::ALL.len());
    }

    #[test]
    fn an_error_outcome_is_named_like_the_error_kind() {
        let up = || "up".to_owned();
        let errors = [
            HttpError::Timeout {
                upstream: up(),
                after: Duration::ZERO,
            },
            HttpError::Connect {
                upstream: up(),
                message: String::new(),
            },
            HttpError::Status {
                upstream: up(),
                status: StatusCode::BAD_GATEWAY,
                retry_after: None,
                response: Box::new(Response::new(StatusCode::BAD_GATEWAY, "")),
            },
            HttpError::BreakerOpen {
                upstream: up(),
                retry_after: Duration::ZERO,
            },
            HttpError::RateLimited {
                upstream: up(),
                retry_after: Duration::ZERO,
            },
            HttpError::Overloaded { upstream: up() },
            HttpError::Transport {
                upstream: up(),
                message: String::new(),
            },
            HttpError::Decode {
                upstream: up(),
                message: String::new(),
            },
            HttpError::InvalidRequest {
                reason: String::new(),
            },
            HttpError::MissingSecret {
                upstream: up(),
                variable: String::new(),
            },
            HttpError::Internal {
                upstream: up(),
                message: String::new(),
            },
        ];
        for e in &errors {
            assert_eq!(CallOutcome::of_error(e).as_str(), e.kind());
        }
    }

    #[test]
    fn responses_are_counted_by_status_class() {
        let mut stats = CallStats::default();
        for code in [100, 200, 299, 304, 404, 429, 503, 599, 600, 999] {
            stats.responded(StatusCode::from_u16(code).unwrap());
        }
        let classes: Vec<(&str, u64)> = stats.responses_by_class().collect();
        assert_eq!(
            classes,
            [
                ("1xx", 1),
                ("2xx", 2),
                ("3xx", 1),
                ("4xx", 2),
                ("5xx", 2),
                ("other", 2)
            ]
        );
    }

    #[test]
    fn only_timed_ends_reach_the_latency_histogram() {
        let mut stats = CallStats::default();
        stats.ended(CallOutcome::Ok, Some(Duration::from_millis(3)));
        stats.ended(CallOutcome::Status, Some(Duration::from_millis(30)));
        stats.ended(CallOutcome::CacheHit, None);
        stats.ended(CallOutcome::Cancelled, None);
        assert_eq!(stats.requests(CallOutcome::Ok), 1);
        assert_eq!(stats.requests(CallOutcome::Status), 1);
        assert_eq!(stats.requests(CallOutcome::CacheHit), 1);
        assert_eq!(stats.requests(CallOutcome::Cancelled), 1);
        assert_eq!(stats.requests(CallOutcome::Timeout), 0);
        let total: u64 = stats.requests_by_outcome().map(|(_, n)| n).sum();
        assert_eq!(total, 4);
        assert_eq!(stats.latency.count(), 2);
        assert!((stats.latency.sum_seconds() - 0.033).abs() < 1e-9);
    }
}
