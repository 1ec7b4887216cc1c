//! A keyed rate limiter: one GCRA state per key ([`KeyedLimiter`]), in
//! bounded memory, and its actor shell ([`RateLimiterActor`]).
//!
//! Keys are whatever a limit is per: an API client, a user, a peer address.
//! Each key gets its own [`Gcra`] under one shared [`Quota`]. Two things keep
//! memory bounded however many keys come and go:
//!
//! - **Idle keys are evicted.** A key whose GCRA state has recovered its whole
//!   burst ([`Gcra::is_idle`]) behaves exactly like a key never seen, so
//!   forgetting it changes no decision. [`KeyedLimiter::sweep`] drops those
//!   keys and shrinks the table when it is mostly empty: a `HashMap` never
//!   gives memory back by itself, so a burst of 100,000 keys would otherwise
//!   pin its peak allocation for ever. The actor sweeps on a timer.
//! - **The table has a ceiling.** When `max_keys` keys are tracked and a new
//!   one arrives, the table is swept first; if it is still full the new key is
//!   refused (fail closed) and counted as `overflow`. Existing keys keep
//!   working. Refusing is the safe side: admitting untracked keys would let a
//!   flood of fresh keys bypass the limit entirely.
//!
//! Memory per key is the key itself plus about 40 bytes of table entry; keys
//! should be short identifiers, not request bodies.
//!
//! Two ways to ask: [`Acquire`] spends a unit at once (for a guard that lets
//! something happen right away), and [`Reserve`] hands back a [`Grant`] for
//! a request that may yet not be sent (it waits in a bulkhead queue, its
//! caller may hang up, a breaker may refuse it). A grant is spent with
//! [`Grant::spend`] when the request goes out; dropped unspent it sends a
//! [`Refund`], and the unit comes back if no later admission has been made
//! on top of it ([`Gcra::refund`]). A caller that is *denied* holds nothing
//! while it waits out the denial: a denial consumes nothing.
//!
//! A limiter given a [`SharedLimit`] ([`RateLimiterActor::with_shared`])
//! keeps each key's state in Redis instead, so the limit holds across every
//! node of a cluster (see [`crate::shared_limiter`]); the local table is then
//! only its fallback for when Redis does not answer in time.

use crate::gcra::{Decision, Gcra, Quota};
use crate::shared_limiter::{
    Fallback, GcraScript, Route, SharedLimit, SharedLink, Transition, CONNECT_TIMEOUT,
};
use actix::prelude::*;
use futures::future::{FutureExt, LocalBoxFuture, Shared as Shared_};
use redis::aio::MultiplexedConnection;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The shortest time between two sweeps of a full table made on behalf of a
/// new key (see [`KeyedLimiter::check`]). A full table of busy keys would
/// otherwise be scanned end to end for every new key: a flood of fresh keys
/// would cost O(`max_keys`) each. The gap is at least one quota interval.
pub const MIN_FULL_TABLE_SWEEP_GAP: Duration = Duration::from_millis(10);

/// Below this many entries a sweep does not bother shrinking the table: the
/// memory is negligible and regrowing would cost more than it saves.
const MIN_SHRINK_SIZE: usize = 64;

/// A sweep shrinks the table when it holds fewer than one key in this many
/// of what it was sized for.
const SHRINK_WHEN_SPARSER_THAN: usize = 4;

/// The actor sweeps at least this often...
pub const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// ...and at most this far apart, however long the quota's tolerance.
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// What a [`KeyedLimiter`] has done, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LimiterCounters {
    /// Requests admitted (refunded ones included).
    pub granted: u64,
    /// Admissions given back unused ([`KeyedLimiter::refund`]).
    pub refunded: u64,
    /// Requests refused by their key's rate.
    pub denied: u64,
    /// Requests from new keys refused because the table was full.
    pub overflow: u64,
    /// Idle keys evicted by sweeps.
    pub evicted: u64,
}

/// One [`Quota`] applied separately to every key, in bounded memory. See the
/// module docs.
#[derive(Debug)]
pub struct KeyedLimiter<K> {
    quota: Quota,
    max_keys: usize,
    keys: HashMap<K, Gcra>,
    counters: LimiterCounters,
    /// The most keys held since the table was last shrunk: what its
    /// allocation was sized for. (`HashMap::capacity` is no measure of that:
    /// it shrinks as removals leave tombstones, while the memory stays.)
    high_water: usize,
    /// Set when a sweep made for a new key left the table full: no such sweep
    /// is tried again before this instant.
    next_full_sweep: Option<Instant>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter applying `quota` to each key and tracking at most
    /// `max_keys` keys at once. With `max_keys == 0` every request overflows.
    pub fn new(quota: Quota, max_keys: usize) -> Self {
        KeyedLimiter {
            quota,
            max_keys,
            keys: HashMap::new(),
            counters: LimiterCounters::default(),
            high_water: 0,
            next_full_sweep: None,
        }
    }

    /// Admits one request for `key` at `now`, or says how long to wait.
    ///
    /// A new key that finds the table full gets
    /// `Deny { retry_after: quota.interval() }` — or longer, up to
    /// [`MIN_FULL_TABLE_SWEEP_GAP`], if the interval is shorter than that and
    /// the table will not be swept again sooner.
    pub fn check(&mut self, key: &K, now: Instant) -> Decision {
        if let Some(gcra) = self.keys.get_mut(key) {
            let decision = gcra.check(&self.quota, now);
            self.count(decision);
            return decision;
        }
        if self.keys.len() >= self.max_keys {
            if let Some(retry_after) = self.make_room(now) {
                self.counters.overflow += 1;
                return Decision::Deny { retry_after };
            }
        }
        let mut gcra = Gcra::new();
        let decision = gcra.check(&self.quota, now);
        // A fresh key always has its burst (>= 1), so this always inserts;
        // the check keeps a denied key from taking a slot should that change.
        if decision.is_allowed() {
            self.keys.insert(key.clone(), gcra);
            self.high_water = self.high_water.max(self.keys.len());
        }
        self.count(decision);
        decision
    }

    /// The TAT `key` is at: after an admission, what [`KeyedLimiter::refund`]
    /// needs to give it back. `None` for an untracked key.
    pub fn tat_of(&self, key: &K) -> Option<Instant> {
        self.keys.get(key).and_then(Gcra::tat)
    }

    /// Gives back the admission of `key` that left its TAT at `granted_tat`,
    /// for a request that was never sent; only the latest admission can be
    /// (see [`Gcra::refund`]). Returns whether it was.
    pub fn refund(&mut self, key: &K, granted_tat: Instant) -> bool {
        let refunded = self
            .keys
            .get_mut(key)
            .is_some_and(|gcra| gcra.refund(&self.quota, granted_tat));
        self.counters.refunded += u64::from(refunded);
        refunded
    }

    /// Forgets every key that is idle at `now` and gives memory back if the
    /// table is mostly empty. Returns how many keys were dropped.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let before = self.keys.len();
        self.keys.retain(|_, gcra| !gcra.is_idle(now));
        let dropped = before - self.keys.len();
        self.counters.evicted += dropped as u64;
        let len = self.keys.len();
        if self.high_water > MIN_SHRINK_SIZE && len * SHRINK_WHEN_SPARSER_THAN < self.high_water {
            // Keep room to double, so that a table hovering around one size
            // does not reallocate on every sweep.
            self.keys.shrink_to(len * 2);
            self.high_water = len;
        }
        dropped
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True if no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// How many keys the table can hold without reallocating: a proxy for
    /// its memory.
    pub fn capacity(&self) -> usize {
        self.keys.capacity()
    }

    /// The quota applied to each key.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// The most keys tracked at once.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// What the limiter has done so far.
    pub fn counters(&self) -> LimiterCounters {
        self.counters
    }

    fn count(&mut self, decision: Decision) {
        match decision {
            Decision::Allow => self.counters.granted += 1,
            Decision::Deny { .. } => self.counters.denied += 1,
        }
    }

    /// The table is full and a new key arrived: sweeps (unless a sweep
    /// recently found nothing to free) and returns `None` if there is now
    /// room, or how long the new key should wait.
    fn make_room(&mut self, now: Instant) -> Option<Duration> {
        let interval = self.quota.interval();
        if let Some(at) = self.next_full_sweep {
            if now < at {
                return Some(interval.max(at - now));
            }
        }
        self.sweep(now);
        if self.keys.len() < self.max_keys {
            self.next_full_sweep = None;
            return None;
        }
        let gap = interval.max(MIN_FULL_TABLE_SWEEP_GAP);
        log::warn!(
            "rate limiter: {} keys tracked, the maximum; refusing new keys for {gap:?}",
            self.keys.len()
        );
        self.next_full_sweep = Some(now + gap);
        Some(gap)
    }
}

/// How often [`RateLimiterActor`] sweeps under `quota`: every tolerance
/// (`interval × burst`, the longest a key can stay busy after its last
/// request), clamped to [`MIN_SWEEP_INTERVAL`]..=[`MAX_SWEEP_INTERVAL`]. An
/// idle key is therefore forgotten within about two sweep intervals.
pub fn sweep_interval(quota: &Quota) -> Duration {
    quota
        .interval()
        .checked_mul(quota.burst())
        .unwrap_or(MAX_SWEEP_INTERVAL)
        .clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL)
}

/// A request refused by a [`RateLimiterActor`]: the error of [`Acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RateLimited {
    /// The limiter's name.
    pub limiter: String,
    /// The key that is over its rate (or could not be tracked).
    pub key: String,
    /// How long until a request for `key` would be admitted.
    pub retry_after: Duration,
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limiter {}: key {:?} over its rate, retry after {} ms",
            self.limiter,
            self.key,
            self.retry_after.as_millis()
        )
    }
}

impl std::error::Error for RateLimited {}

/// A limiter's size and counters, the result of [`GetLimiterStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LimiterStats {
    /// Keys tracked now.
    pub keys: usize,
    /// Requests admitted.
    pub granted: u64,
    /// Admissions given back by unspent [`Grant`]s.
    pub refunded: u64,
    /// Requests refused by their key's rate.
    pub denied: u64,
    /// Requests from new keys refused because the table was full.
    pub overflow: u64,
    /// Idle keys evicted.
    pub evicted: u64,
    /// Requests decided by Redis (shared limiters only).
    pub shared: u64,
    /// Requests decided by the fallback because Redis did not answer in
    /// time (shared limiters only).
    pub fallbacks: u64,
}

/// Sent by a caller before the request it limits: may `key` go now?
///
/// `Ok(())` consumed one unit of `key`'s rate. `Err(RateLimited)` consumed
/// nothing and says how long to wait.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), RateLimited>")]
pub struct Acquire {
    /// What the limit is per: client, user, address.
    pub key: String,
}

/// Sent by a caller before a request that may yet not be sent (it still has
/// a breaker and a bulkhead queue ahead of it): may `key` go now?
///
/// `Ok(Grant)` holds one unit of `key`'s rate: spend it with
/// [`Grant::spend`] when the request goes out; dropped unspent (the caller
/// hung up, the request was refused before it left) it is refunded.
/// `Err(RateLimited)` consumed nothing and says how long to wait. A shared
/// limiter's grants are spent in Redis at once and are not refunded.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Grant, RateLimited>")]
pub struct Reserve {
    /// What the limit is per: client, user, address.
    pub key: String,
}

/// One unit of a key's rate, held by a request that has not gone out yet:
/// the result of [`Reserve`]. See [`Grant::spend`]; dropped unspent, it
/// sends its limiter a [`Refund`].
#[must_use = "a grant dropped unspent is refunded"]
pub struct Grant {
    refund: Option<(Recipient<Refund>, Refund)>,
}

impl Grant {
    /// A grant that has nothing to give back (a shared limiter's).
    fn final_() -> Self {
        Grant { refund: None }
    }

    /// The request went out: the unit is used for good.
    pub fn spend(mut self) {
        self.refund = None;
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("refundable", &self.refund.is_some())
            .finish()
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some((limiter, refund)) = self.refund.take() {
            // Fire-and-forget: one message per unspent grant, and grants are
            // bounded by the requests in flight. A stopped limiter has
            // nothing left to refund.
            limiter.do_send(refund);
        }
    }
}

/// Sent by a [`Grant`] dropped unspent: give its unit back. Only a grant
/// makes one.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Refund {
    key: String,
    granted_tat: Instant,
}

/// Sent by metrics and status endpoints; the result is the limiter's
/// [`LimiterStats`] as of now.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "LimiterStats")]
pub struct GetLimiterStats;

/// The actor shell around a [`KeyedLimiter<String>`]: answers [`Acquire`] and
/// sweeps idle keys every [`sweep_interval`].
///
/// It reads `tokio::time::Instant` (converted to std), so tests that pause
/// tokio time drive it exactly.
///
/// With [`with_shared`](Self::with_shared) it asks Redis instead (one
/// script call per request, bounded by the limit's timeout) and uses the
/// local table only as its [`Fallback`].
#[derive(Debug)]
pub struct RateLimiterActor {
    name: String,
    limiter: KeyedLimiter<String>,
    shared: Option<Shared>,
}

/// A shared limiter's Redis side: the limit, the script, the link's state
/// and its counters.
struct Shared {
    limit: SharedLimit,
    script: GcraScript,
    link: SharedLink<MultiplexedConnection>,
    /// The very first connection attempt, while it is under way: checks
    /// made meanwhile wait for it (within their timeout) rather than all
    /// going to the fallback while the node starts. Never set for later
    /// attempts ([`SharedLink::first_attempt_pending`]).
    first_connect: Option<FirstConnect>,
    decided: u64,
    fallbacks: u64,
}

/// The first connection attempt, shared by the checks waiting for it.
type FirstConnect = Shared_<LocalBoxFuture<'static, Option<MultiplexedConnection>>>;

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("prefix", &self.limit.prefix)
            .field("fallback", &self.limit.fallback)
            .field("decided", &self.decided)
            .field("fallbacks", &self.fallbacks)
            .finish_non_exhaustive()
    }
}

impl RateLimiterActor {
    /// A limiter named `name` (for errors and logs) applying `quota` to each
    /// key, tracking at most `max_keys` keys.
    pub fn new(name: impl Into<String>, quota: Quota, max_keys: usize) -> Self {
        RateLimiterActor {
            name: name.into(),
            limiter: KeyedLimiter::new(quota, max_keys),
            shared: None,
        }
    }

    /// Keeps the limit in Redis so that it holds across every node using
    /// the same Redis, prefix and limiter name; the local table decides only
    /// when Redis does not answer within `limit.timeout` and
    /// `limit.fallback` is [`Fallback::Local`]. The connection is made when
    /// the actor starts.
    pub fn with_shared(mut self, limit: SharedLimit) -> Self {
        self.shared = Some(Shared {
            limit,
            script: GcraScript::new(),
            link: SharedLink::new(),
            first_connect: None,
            decided: 0,
            fallbacks: 0,
        });
        self
    }

    /// The name given to [`RateLimiterActor::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The reply to an [`Acquire`] for `key` that got `decision`.
    fn answer(&self, key: String, decision: Decision) -> Result<(), RateLimited> {
        match decision {
            Decision::Allow => Ok(()),
            Decision::Deny { retry_after } => Err(RateLimited {
                limiter: self.name.clone(),
                key,
                retry_after,
            }),
        }
    }

    /// Decides `key` at `now` without Redis, as the fallback says.
    fn fall_back(&mut self, key: String, now: Instant) -> Result<(), RateLimited> {
        let fallback = self
            .shared
            .as_ref()
            .map_or(Fallback::Local, |s| s.limit.fallback);
        if let Some(shared) = &mut self.shared {
            shared.fallbacks += 1;
        }
        let decision = match fallback {
            Fallback::Local => self.limiter.check(&key, now),
            Fallback::Allow => {
                self.limiter.counters.granted += 1;
                Decision::Allow
            }
            Fallback::Deny => {
                self.limiter.counters.denied += 1;
                Decision::Deny {
                    retry_after: RETRY_GAP_HINT,
                }
            }
        };
        self.answer(key, decision)
    }

    fn log_transition(&self, transition: Transition, why: &dyn fmt::Display) {
        let fallback = self
            .shared
            .as_ref()
            .map_or(Fallback::Local, |s| s.limit.fallback);
        match transition {
            Transition::None => {}
            Transition::WentDown => log::warn!(
                "rate limiter {}: Redis did not answer ({why}); deciding with the {fallback} fallback",
                self.name
            ),
            Transition::CameBack {
                down_for,
                fallbacks,
            } => log::info!(
                "rate limiter {}: Redis answers again after {down_for:?}; {fallbacks} requests were decided by the {fallback} fallback",
                self.name
            ),
        }
    }

    /// Starts making the shared limiter's connection; the result lands in
    /// its link.
    fn connect(&mut self, ctx: &mut Context<Self>) {
        let Some(shared) = &mut self.shared else {
            return;
        };
        let client = shared.limit.client.clone();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // Each check has its own timeout (the limit's).
            .set_response_timeout(None);
        let (result_tx, result_rx) = tokio::sync::oneshot::channel();
        let attempt = async move {
            let result = client
                .get_multiplexed_async_connection_with_config(&config)
                .await;
            let conn = result.as_ref().ok().cloned();
            let _ = result_tx.send(result);
            conn
        }
        .boxed_local()
        .shared();
        // Only the very first attempt is waited for: once it has failed,
        // Redis is known to be unreachable, and waiting on every retry (one
        // a second while it drops packets) would cost each check made
        // meanwhile its full timeout.
        if shared.link.first_attempt_pending() {
            shared.first_connect = Some(attempt.clone());
        }
        ctx.spawn(
            async move {
                attempt.await;
                result_rx.await.ok()
            }
            .into_actor(self)
            .map(|result, actor, _| {
                let now = now();
                let Some(shared) = &mut actor.shared else {
                    return;
                };
                shared.first_connect = None;
                match result {
                    Some(Ok(conn)) => shared.link.connected(now, conn),
                    Some(Err(e)) => {
                        let t = shared.link.connect_failed(now);
                        actor.log_transition(t, &e);
                    }
                    None => {
                        let t = shared.link.connect_failed(now);
                        actor.log_transition(t, &"the connection attempt was lost");
                    }
                }
            }),
        );
    }
}

/// The `retry_after` of a request refused by the `deny` fallback: about when
/// Redis will be asked again.
const RETRY_GAP_HINT: Duration = crate::shared_limiter::RETRY_GAP;

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Actor for RateLimiterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        if let Some(shared) = &mut self.shared {
            // Connect at once rather than on the first request.
            if let Route::Fallback { connect: true } = shared.link.route(now()) {
                self.connect(ctx);
            }
        }
        ctx.run_interval(sweep_interval(&self.limiter.quota()), |actor, _| {
            let dropped = actor.limiter.sweep(now());
            if dropped > 0 {
                log::debug!(
                    "rate limiter {}: evicted {dropped} idle keys, {} left",
                    actor.name,
                    actor.limiter.len()
                );
            }
        });
    }
}

impl Handler<Acquire> for RateLimiterActor {
    type Result = ResponseActFuture<Self, Result<(), RateLimited>>;

    fn handle(&mut self, msg: Acquire, ctx: &mut Self::Context) -> Self::Result {
        let now = now();
        let Some(shared) = &mut self.shared else {
            let decision = self.limiter.check(&msg.key, now);
            return Box::pin(fut::ready(self.answer(msg.key, decision)));
        };
        let conn = match shared.link.route(now) {
            Route::Redis(conn) => Ok(conn),
            Route::Fallback { connect } => {
                if connect {
                    self.connect(ctx);
                }
                match self.shared.as_ref().and_then(|s| s.first_connect.clone()) {
                    Some(first) => Err(first),
                    None => return Box::pin(fut::ready(self.fall_back(msg.key, now))),
                }
            }
        };
        let Some(shared) = &self.shared else {
            return Box::pin(fut::ready(self.fall_back(msg.key, now)));
        };
        let script = shared.script.clone();
        let redis_key = shared.limit.key(&self.name, &msg.key);
        let quota = self.limiter.quota();
        let timeout = shared.limit.timeout;
        // Spawned, not waited on (ResponseActFuture): checks for many keys
        // are in flight at once on the one multiplexed connection.
        Box::pin(
            async move {
                tokio::time::timeout(timeout, async move {
                    let mut conn = match conn {
                        Ok(conn) => conn,
                        Err(first) => first.await.ok_or_else(|| {
                            redis::RedisError::from((
                                redis::ErrorKind::Io,
                                "no connection to Redis yet",
                            ))
                        })?,
                    };
                    script.check(&mut conn, &redis_key, &quota, None).await
                })
                .await
            }
            .into_actor(self)
            .map(move |result, actor, _| {
                let now = self::now();
                let Some(shared) = &mut actor.shared else {
                    return actor.fall_back(msg.key, now);
                };
                match result {
                    Ok(Ok(decision)) => {
                        shared.decided += 1;
                        let t = shared.link.answered(now);
                        actor.log_transition(t, &"");
                        match decision {
                            Decision::Allow => actor.limiter.counters.granted += 1,
                            Decision::Deny { .. } => actor.limiter.counters.denied += 1,
                        }
                        actor.answer(msg.key, decision)
                    }
                    Ok(Err(e)) => {
                        let broken = e.is_unrecoverable_error() || e.is_io_error();
                        let t = shared.link.failed(now, broken);
                        actor.log_transition(t, &e);
                        actor.fall_back(msg.key, now)
                    }
                    Err(_elapsed) => {
                        let t = shared.link.failed(now, false);
                        actor.log_transition(t, &format!("no answer within {timeout:?}"));
                        actor.fall_back(msg.key, now)
                    }
                }
            }),
        )
    }
}

impl Handler<Reserve> for RateLimiterActor {
    type Result = ResponseActFuture<Self, Result<Grant, RateLimited>>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Self::Context) -> Self::Result {
        if self.shared.is_some() {
            // Redis spends the unit in its own state; there is no refund.
            let acquire = Handler::<Acquire>::handle(self, Acquire { key: msg.key }, ctx);
            return Box::pin(acquire.map(|result, _, _| result.map(|()| Grant::final_())));
        }
        let decision = self.limiter.check(&msg.key, now());
        let refund = match decision {
            Decision::Allow => self.limiter.tat_of(&msg.key).map(|granted_tat| {
                let refund = Refund {
                    key: msg.key.clone(),
                    granted_tat,
                };
                (ctx.address().recipient(), refund)
            }),
            Decision::Deny { .. } => None,
        };
        let answer = self.answer(msg.key, decision).map(|()| Grant { refund });
        Box::pin(fut::ready(answer))
    }
}

impl Handler<Refund> for RateLimiterActor {
    type Result = ();

    fn handle(&mut self, msg: Refund, _: &mut Self::Context) {
        self.limiter.refund(&msg.key, msg.granted_tat);
    }
}

impl Handler<GetLimiterStats> for RateLimiterActor {
    type Result = MessageResult<GetLimiterStats>;

    fn handle(&mut self, _: GetLimiterStats, _: &mut Self::Context) -> Self::Result {
        let c = self.limiter.counters();
        MessageResult(LimiterStats {
            keys: self.limiter.len(),
            granted: c.granted,
            refunded: c.refunded,
            denied: c.denied,
            overflow: c.overflow,
            evicted: c.evicted,
            shared: self.shared.as_ref().map_or(0, |s| s.decided),
            fallbacks: self.shared.as_ref().map_or(0, |s| s.fallbacks),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn keys_are_independent() {
        let q = Quota::per_second(10.0, 2).unwrap();
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(q, 100);
        assert!(l.check(&"a", t0).is_allowed());
        assert!(l.check(&"a", t0).is_allowed());
        assert_eq!(
            l.check(&"a", t0),
            Decision::Deny {
                retry_after: ms(100)
            }
        );
        // "a" is spent; "b" still has its whole burst.
        assert!(l.check(&"b", t0).is_allowed());
        assert!(l.check(&"b", t0).is_allowed());
        assert!(!l.check(&"b", t0).is_allowed());
        assert_eq!(l.len(), 2);
        assert_eq!(
            l.counters(),
            LimiterCounters {
                granted: 4,
                refunded: 0,
                denied: 2,
                overflow: 0,
                evicted: 0
            }
        );
    }

    #[test]
    fn a_refund_gives_back_the_latest_admission_of_that_key_only() {
        let q = Quota::per_second(10.0, 1).unwrap(); // 100 ms, burst 1
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(q, 100);
        assert!(l.check(&"a", t0).is_allowed());
        let a = l.tat_of(&"a").unwrap();
        assert!(l.check(&"b", t0).is_allowed());
        assert!(!l.check(&"a", t0).is_allowed());
        // "a"'s request never went out: its unit is back, "b"'s is not.
        assert!(l.refund(&"a", a));
        assert!(l.check(&"a", t0).is_allowed());
        assert!(!l.check(&"b", t0).is_allowed());
        // An admission with a newer one on top is not refunded; an unknown
        // key has nothing to refund.
        let older = l.tat_of(&"a").unwrap();
        assert!(l.check(&"a", t0 + ms(100)).is_allowed());
        assert!(!l.refund(&"a", older));
        assert!(!l.refund(&"zz", a));
        assert_eq!(l.counters().refunded, 1);
        // A key swept since (idle) has nothing to give back.
        let c = {
            l.check(&"c", t0);
            l.tat_of(&"c").unwrap()
        };
        l.sweep(t0 + ms(100));
        assert!(!l.refund(&"c", c));
    }

    #[test]
    fn sweep_drops_exactly_the_idle_keys() {
        let q = Quota::per_second(10.0, 5).unwrap(); // 100 ms, tolerance 500 ms
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(q, 100);
        l.check(&"once", t0); // idle from t0 + 100 ms
        for _ in 0..5 {
            l.check(&"burst", t0); // idle from t0 + 500 ms
        }
        assert_eq!(l.sweep(t0 + ms(99)), 0);
        assert_eq!(l.len(), 2);
        assert_eq!(l.sweep(t0 + ms(100)), 1);
        assert_eq!(l.len(), 1);
        // The survivor's state is intact: one interval has passed, so one
        // request passes, not a fresh burst of five.
        assert!(l.check(&"burst", t0 + ms(100)).is_allowed());
        assert!(!l.check(&"burst", t0 + ms(100)).is_allowed());
        // It is busy until t0 + 600 ms now.
        assert_eq!(l.sweep(t0 + ms(599)), 0);
        assert_eq!(l.sweep(t0 + ms(600)), 1);
        assert!(l.is_empty());
        assert_eq!(l.counters().evicted, 2);
    }

    #[test]
    fn sweep_gives_memory_back() {
        let q = Quota::per_second(100.0, 1).unwrap();
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(q, 1_000_000);
        for k in 0..50_000u32 {
            assert!(l.check(&k, t0).is_allowed());
        }
        assert!(l.capacity() >= 50_000);
        // Half of them stay busy one interval longer.
        for k in 0..25_000u32 {
            assert!(l.check(&k, t0 + ms(10)).is_allowed());
        }
        assert_eq!(l.sweep(t0 + ms(10)), 25_000);
        // Half full is not "mostly empty": no shrink yet.
        assert_eq!(l.high_water, 50_000);
        assert_eq!(l.sweep(t0 + ms(20)), 25_000);
        assert!(l.is_empty());
        assert_eq!(l.capacity(), 0, "the allocation is freed");
        // A few keys later the table is small and stays small.
        for k in 0..10u32 {
            l.check(&k, t0 + ms(30));
        }
        assert!(l.capacity() < 100, "{}", l.capacity());
    }

    #[test]
    fn a_full_table_refuses_new_keys_but_serves_known_ones() {
        let q = Quota::per_second(10.0, 2).unwrap(); // 100 ms
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(q, 2);
        // "a" is idle from t0 + 100 ms, "b" from t0 + 200 ms.
        assert!(l.check(&"a", t0).is_allowed());
        assert!(l.check(&"b", t0).is_allowed());
        assert!(l.check(&"b", t0).is_allowed());
        // Full, nothing idle: the new key is refused for one interval.
        assert_eq!(
            l.check(&"c", t0),
            Decision::Deny {
                retry_after: ms(100)
            }
        );
        assert_eq!(
            l.check(&"c", t0 + ms(40)),
            Decision::Deny {
                retry_after: ms(100)
            }
        );
        assert_eq!(l.counters().overflow, 2);
        assert_eq!(l.counters().denied, 0);
        assert_eq!(l.len(), 2);
        // Known keys are unaffected; "a" is now idle from t0 + 200 ms.
        assert!(l.check(&"a", t0 + ms(50)).is_allowed());
        // At t0 + 100 ms the table may be swept again but nothing is idle yet.
        assert!(!l.check(&"c", t0 + ms(100)).is_allowed());
        // At t0 + 200 ms both are idle: the sweep makes room and c passes.
        assert!(l.check(&"c", t0 + ms(200)).is_allowed());
        assert_eq!(l.counters().overflow, 3);
        assert_eq!(l.counters().evicted, 2);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn a_full_table_is_not_rescanned_for_every_new_key() {
        // A fast quota: interval 1 µs, so the floor gap applies.
        let q = Quota::per_second(1_000_000.0, 1000).unwrap();
        let t0 = Instant::now();
        let mut l = KeyedLimiter::new(q, 1);
        for _ in 0..1000 {
            l.check(&0u32, t0); // busy until t0 + 1 ms
        }
        assert_eq!(
            l.check(&1, t0),
            Decision::Deny {
                retry_after: MIN_FULL_TABLE_SWEEP_GAP
            }
        );
        // Key 0 is idle at 1 ms, but no sweep is made before the gap is up.
        assert_eq!(
            l.check(&1, t0 + ms(2)),
            Decision::Deny { retry_after: ms(8) }
        );
        assert_eq!(l.counters().evicted, 0);
        assert!(l.check(&1, t0 + ms(10)).is_allowed());
        assert_eq!(l.counters().evicted, 1);
    }

    #[test]
    fn zero_max_keys_admits_nothing() {
        let q = Quota::per_second(10.0, 2).unwrap();
        let mut l = KeyedLimiter::new(q, 0);
        assert!(!l.check(&"a", Instant::now()).is_allowed());
        assert_eq!(l.counters().overflow, 1);
    }

    #[test]
    fn sweep_interval_follows_the_tolerance_within_bounds() {
        let q = |rate, burst| Quota::per_second(rate, burst).unwrap();
        assert_eq!(sweep_interval(&q(100.0, 1)), MIN_SWEEP_INTERVAL);
        assert_eq!(sweep_interval(&q(1.0, 5)), Duration::from_secs(5));
        assert_eq!(sweep_interval(&q(0.001, 1000)), MAX_SWEEP_INTERVAL);
    }

    /// A Redis that accepts connections and never answers (as one behind
    /// a firewall dropping packets would look): the checks made during the
    /// first connection attempt wait for it, up to their timeout; the ones
    /// made during a later attempt fall back at once. Paused tokio time
    /// drives the timeouts.
    #[test]
    fn only_the_first_connection_attempt_delays_checks() {
        actix::System::new().block_on(async {
            tokio::time::pause();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let port = listener.local_addr().expect("local addr").port();
            let silent = tokio::spawn(async move {
                let mut held = Vec::new();
                while let Ok((sock, _)) = listener.accept().await {
                    held.push(sock);
                }
            });
            let timeout = ms(300);
            let limit = SharedLimit::new(
                &format!("redis://127.0.0.1:{port}/"),
                "t",
                Fallback::Local,
                timeout,
            )
            .expect("valid URL");
            let quota = Quota::per_second(1000.0, 1000).expect("quota");
            let limiter = RateLimiterActor::new("api", quota, 100)
                .with_shared(limit)
                .start();
            let acquire = || Acquire { key: "k".into() };

            // The first attempt (made as the actor starts) is waited for.
            let t = tokio::time::Instant::now();
            assert!(limiter.send(acquire()).await.expect("reply").is_ok());
            assert!(t.elapsed() >= timeout, "the first check waited");

            // It times out after CONNECT_TIMEOUT; after the gap the next
            // check starts the second attempt, and neither it nor the
            // checks made during it wait.
            tokio::time::sleep(CONNECT_TIMEOUT + RETRY_GAP_HINT).await;
            for _ in 0..3 {
                let t = tokio::time::Instant::now();
                assert!(limiter.send(acquire()).await.expect("reply").is_ok());
                assert!(
                    t.elapsed() < timeout,
                    "a check waited {:?} for a later attempt",
                    t.elapsed()
                );
            }
            let stats = limiter.send(GetLimiterStats).await.expect("stats");
            assert_eq!((stats.shared, stats.fallbacks), (0, 4), "{stats:?}");
            silent.abort();
        });
    }

    #[test]
    fn rate_limited_names_limiter_key_and_wait() {
        let e = RateLimited {
            limiter: "openai".into(),
            key: "user-1".into(),
            retry_after: ms(250),
        };
        assert_eq!(
            e.to_string(),
            "rate limiter openai: key \"user-1\" over its rate, retry after 250 ms"
        );
    }

    /// Property: with random keys, times and sweeps, every decision equals
    /// that of an unbounded reference holding a `Gcra` per key and never
    /// forgetting one (so eviction is invisible), and no key is ever admitted
    /// more than `burst + elapsed / interval` times. A small deterministic
    /// generator stands in for a property-testing crate.
    #[test]
    fn matches_an_unbounded_reference_and_never_exceeds_the_rate() {
        // The crate's own xorshift64* (Jitter), seeded: deterministic cases.
        let mut rng = crate::backoff::Jitter::with_seed(0xD1B5_4A32_D192_ED03);
        let mut next = move || rng.next_u64();
        for case in 0..50 {
            let rate = 1.0 + (next() % 500) as f64;
            let burst = 1 + (next() % 10) as u32;
            let q = Quota::per_second(rate, burst).unwrap();
            let nkeys = 1 + next() % 200;
            let t0 = Instant::now();
            let mut now = t0;
            let mut l = KeyedLimiter::new(q, nkeys as usize);
            let mut reference: HashMap<u64, Gcra> = HashMap::new();
            // Per key: first request time and admissions.
            let mut seen: HashMap<u64, (Instant, u64)> = HashMap::new();
            for step in 0..5000 {
                now += Duration::from_micros(next() % 3000);
                if next() % 50 == 0 {
                    l.sweep(now);
                }
                let key = next() % nkeys;
                let got = l.check(&key, now);
                let want = reference.entry(key).or_default().check(&q, now);
                assert_eq!(got, want, "case {case} step {step} key {key}");
                let (first, admitted) = seen.entry(key).or_insert((now, 0));
                if got.is_allowed() {
                    *admitted += 1;
                }
                let bound =
                    f64::from(burst) + (now - *first).as_secs_f64() / q.interval().as_secs_f64();
                assert!(
                    *admitted as f64 <= bound + 1e-9,
                    "case {case} key {key}: admitted {admitted} > bound {bound}"
                );
            }
            assert_eq!(l.counters().overflow, 0);
        }
    }
}
