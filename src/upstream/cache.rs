//! The cache on the call path: a fresh hit is answered on the caller's
//! thread; a miss (or a stale entry) makes one upstream call however many
//! callers ask for the same key at once (single flight), and its answer is
//! stored, revalidated or, when the upstream fails, replaced by a stale copy
//! while `stale_if_error` allows.
//!
//! Which requests may use the cache is [`Upstream::cache_key`]'s rule: a GET
//! or HEAD without a credential of the caller's own, or any request the
//! caller gave a key. Cancellation is a normal path: the flight guards below
//! keep the single-flight table right when a leader or a follower goes away.

use super::call::{CallTime, Upstream};
use super::error::HttpError;
use super::request::Request;
use super::response::Response;
use actix_web::http::header;
use actix_web::http::{Method, StatusCode};
use happynet_actors::cache::{
    CacheCounters, CacheKey, Lookup, ResponseCache, StoredResponse, Validators,
};
use happynet_actors::single_flight::{FlightCounters, FlightId, Joined, SingleFlight, WaiterId};
use std::sync::PoisonError;
use tokio::time::Instant;

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
