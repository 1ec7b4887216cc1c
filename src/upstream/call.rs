//! The call path: an [`Upstream`] (one upstream's actors and policy) and how
//! one call reaches its arbiter and comes back, cache included.
//!
//! [`Upstream::call`] first looks in the cache on the caller's thread: a
//! fresh hit needs no actor. Anything else is handed off
//! (`Upstream::hand_off`) to the upstream's arbiter, where the retry
//! pipeline ([`super::retry`]) runs beside the limiter, breaker and pool
//! actors, bounded by the call's deadline. The hand-off counts the call
//! ([`super::stats`]), cancellation included.
//!
//! # The cache
//!
//! A miss (or a stale entry) makes one upstream call however many callers
//! ask for the same key at once (single flight), and its answer is stored,
//! revalidated or, when the upstream fails, replaced by a stale copy while
//! `stale_if_error` allows. Which requests may use the cache is
//! `Upstream::cache_key`'s rule: a GET or HEAD without a credential of the
//! caller's own, or any request the caller gave a key. Cancellation is a
//! normal path: the flight guards (`LeadingFlight`, `FollowingFlight`) keep
//! the single-flight table right when a leader or a follower goes away.

use super::auth::Auth;
use super::client::{Request, Response, StreamingResponse};
use super::error::HttpError;
use super::settings::Parts;
use super::stats::{CallOutcome, CallRecord, CallStats};
use crate::config::UpstreamSettings;
use actix::prelude::*;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use happynet_actors::backoff::{Backoff, RetryBudget};
use happynet_actors::breaker::BreakerActor;
use happynet_actors::cache::{
    CacheCounters, CacheKey, Lookup, ResponseCache, StoredResponse, Validators,
};
use happynet_actors::limiter::RateLimiterActor;
use happynet_actors::pool::PoolActor;
use happynet_actors::single_flight::{
    FlightCounters, FlightId, Joined, SingleFlight, WaiterId, DEFAULT_MAX_FLIGHTS,
    DEFAULT_MAX_WAITERS,
};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

/// Keys a limiter tracks at once: per-caller keys (API keys, client IPs)
/// beyond this are refused until idle ones are swept.
const MAX_LIMITER_KEYS: usize = 100_000;

/// When a call started and when it must be over: what every step of it
/// measures against. A timeout's error carries `started.elapsed()`, the
/// time the whole call had run.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallTime {
    /// When the call reached the upstream's arbiter.
    pub(super) started: Instant,
    /// When it must be over, every retry and wait included.
    pub(super) deadline: Instant,
}

/// One upstream's actors and policy. Shared by every request to it.
pub struct Upstream {
    pub(super) settings: UpstreamSettings,
    arbiter: ArbiterHandle,
    pub(super) cache: Option<Mutex<ResponseCache>>,
    /// Identical misses in the air (see [`SingleFlight`]); the leaders'
    /// and followers' drop guards keep it right when callers go away.
    pub(super) inflight: Mutex<SingleFlight<CollapsedWaiter>>,
    auth: Option<Auth>,
    default_headers: Vec<(HeaderName, HeaderValue)>,
    pub(super) pool: Addr<PoolActor>,
    pub(super) breaker: Addr<BreakerActor>,
    pub(super) limiter: Addr<RateLimiterActor>,
    pub(super) backoff: Backoff,
    pub(super) budget: Mutex<RetryBudget>,
    /// What the calls did; see [`CallStats`].
    calls: Mutex<CallStats>,
}

impl Upstream {
    /// Starts the upstream's pool, breaker and limiter on `arbiter`, from
    /// the parts `Parts::from_settings` builds.
    pub fn start(settings: UpstreamSettings, arbiter: &ArbiterHandle) -> Result<Self, String> {
        let Parts {
            quota,
            breaker,
            pool,
            backoff,
            budget,
            auth,
            cache,
            default_headers,
        } = Parts::from_settings(&settings)?;
        let limiter_name = settings.name.clone();
        let shared_limit = settings.shared_limit.clone();
        Ok(Upstream {
            pool: PoolActor::start_on(arbiter, pool),
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
            cache: cache.map(Mutex::new),
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
    pub(super) fn count<T>(&self, f: impl FnOnce(&mut CallStats) -> T) -> T {
        f(&mut self.calls.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn mailbox_error(&self, what: &str, e: MailboxError) -> HttpError {
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
        let time = self.call_time(&req);
        let work = async {
            match cached {
                Some((key, validators)) => self.call_cached(&req, time, key, validators).await,
                None => self.call_whole(&req, time, None).await,
            }
        };
        let result = tokio::time::timeout_at(time.deadline, work)
            .await
            .unwrap_or_else(|_| Err(self.timed_out(time)));
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

    /// The clock of a call starting now: its deadline is the request's, or
    /// the configured one.
    fn call_time(&self, req: &Request) -> CallTime {
        let started = Instant::now();
        CallTime {
            started,
            deadline: started + req.deadline.unwrap_or(self.settings.deadline),
        }
    }

    /// The error of a call whose deadline passed.
    fn timed_out(&self, time: CallTime) -> HttpError {
        HttpError::Timeout {
            upstream: self.settings.name.clone(),
            after: time.started.elapsed(),
        }
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
            let time = this.call_time(&req);
            tokio::time::timeout_at(time.deadline, this.call_streamed(&req, time))
                .await
                .unwrap_or_else(|_| Err(this.timed_out(time)))
        })
        .await
    }

    /// The headers and path a request goes out with: the client's default
    /// headers and its credentials added. Fails, naming the variable, when
    /// the credential's environment variable was not set.
    pub(super) fn outgoing(
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
}

/// A caller waiting for another caller's identical upstream call: it gets
/// the leader's outcome, or sees the sender dropped when the leader went
/// away without one (then it tries again itself).
pub(super) type CollapsedWaiter = tokio::sync::oneshot::Sender<Result<Response, HttpError>>;

/// How many times a follower, released because its leader went away, joins
/// the key's next flight before it calls alone. Each release means a leader
/// was cancelled or timed out; a follower that has seen this many in a row
/// stops betting on the next one (its own deadline still bounds it).
const MAX_RELEASES: u32 = 4;

/// What one upstream's cache holds and has done: [`Upstream::cache_stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups, stores, evictions and revalidations so far.
    pub counters: CacheCounters,
    /// Calls collapsed into an identical call already in flight.
    pub collapsed: u64,
    /// Entries cached now.
    pub entries: usize,
    /// Bytes cached now (bodies, headers and overhead).
    pub bytes: usize,
}

impl Upstream {
    /// The cache key of a request, if it may use the cache: a GET or HEAD
    /// that carries no credential of the caller's own (a shared cache must
    /// not hand one caller's authorised answer to another), or any request
    /// the caller gave a key.
    pub(super) fn cache_key(&self, req: &Request) -> Option<CacheKey> {
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

    pub(super) fn with_cache<T>(
        &self,
        f: impl FnOnce(&mut ResponseCache, std::time::Instant) -> T,
    ) -> Option<T> {
        let cache = self.cache.as_ref()?;
        let mut cache = cache.lock().ok()?;
        Some(f(&mut cache, Instant::now().into_std()))
    }

    /// A stored response as the caller gets it, marked as from the cache.
    pub(super) fn cached_response(&self, stored: StoredResponse) -> Response {
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
    /// up its place when it goes away. Beyond [`DEFAULT_MAX_WAITERS`](happynet_actors::single_flight::DEFAULT_MAX_WAITERS)
    /// followers of one flight, a caller gets [`HttpError::Overloaded`].
    pub(super) async fn call_cached(
        &self,
        req: &Request,
        time: CallTime,
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
                    let result = self.fetch_cached(req, time, &key, validators).await;
                    leading.finish(&result);
                    return result;
                }
                Joined::Alone => return self.fetch_cached(req, time, &key, validators).await,
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
        self.fetch_cached(req, time, &key, validators).await
    }

    /// One upstream call for a cached request, and what it means for the
    /// cache: a 304 refreshes the stale entry, a 200 is stored, and a
    /// failure is answered with a stale copy while `stale_if_error` allows.
    async fn fetch_cached(
        &self,
        req: &Request,
        time: CallTime,
        key: &CacheKey,
        validators: Option<Validators>,
    ) -> Result<Response, HttpError> {
        let name = &self.settings.name;
        let from_cache = |stored: StoredResponse| self.cached_response(stored);
        let result = self.call_whole(req, time, validators.as_ref()).await;
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

    /// What the cache holds and has done; `None` without a cache.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        let collapsed = self.flights(|f| f.counters().followed);
        self.with_cache(|c, _| CacheStats {
            counters: c.counters(),
            collapsed,
            entries: c.len(),
            bytes: c.bytes(),
        })
    }

    /// What the cache's single-flight has done (led, followed, abandoned,
    /// refused…); `None` without a cache.
    pub fn flight_stats(&self) -> Option<FlightCounters> {
        self.cache.as_ref()?;
        Some(self.flights(|f| f.counters()))
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
