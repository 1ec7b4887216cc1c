//! Rate limits that hold across a cluster: the GCRA of [`crate::gcra`] run
//! as a Lua script inside Redis, so every node charges one shared state per
//! key, plus the plain state machine ([`SharedLink`]) that decides when a
//! check may go to Redis and when it must fall back.
//!
//! **The script** ([`GCRA_SCRIPT`]) is the same arithmetic as
//! [`crate::gcra::Gcra::check`], to the nanosecond: the theoretical arrival
//! time (TAT) is kept as a `seconds:nanoseconds` pair, because Lua numbers
//! are doubles and a nanosecond timestamp does not fit in their 53 bits.
//! It runs atomically (Redis runs one script at a time), reads the clock
//! with `redis.call('TIME')` so the nodes' clocks do not matter, and sets
//! the key to expire (`PEXPIREAT`, to the millisecond above) when its state
//! becomes idle — the moment the local limiter would forget it too — so idle
//! keys cost Redis nothing. An optional explicit `now` is what lets tests
//! replay a sequence against the Rust state machine and compare every
//! decision; expiry follows that clock too.
//!
//! **When Redis cannot answer** within the check's timeout (a dead or hung
//! server must not stall every request), the limiter decides by its
//! [`Fallback`]: the node's own local limiter (default), deny, or allow. After
//! a failure the link skips Redis for [`RETRY_GAP`] (the reconnect policy of
//! [`crate::reconnect`], which the cluster bridge uses too, with a fixed
//! wait) rather than making every request wait out a timeout; when the gap
//! ends exactly one check (the probe) goes to Redis while the others keep
//! using the fallback at once, until the probe's answer reopens the link or
//! its failure starts a new gap. A hung Redis thus costs one check one timeout per gap. A connection
//! that keeps failing is replaced (a new connection made during an outage is
//! probed the same way). While the very first connection attempt is under
//! way, checks wait for it (within their timeout) instead of all falling
//! back as the node starts; later attempts are not waited for.
//! Keys are `{prefix}:rl:{limiter}:{key}`.

use crate::gcra::{Decision, Quota};
use crate::reconnect::Reconnect;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{Duration, Instant};

/// GCRA in Lua. `KEYS[1]`: the key. `ARGV`: interval (seconds,
/// nanoseconds), tolerance = interval × burst (seconds, nanoseconds), and
/// optionally `now` (seconds, nanoseconds since the Unix epoch; tests only —
/// otherwise the server's `TIME`). Returns `{1}` (allow) or `{0, s, ns}`
/// (deny, retry after `s` seconds and `ns` nanoseconds). Every quantity is a
/// `(seconds, nanoseconds)` pair of integers below 2^53, exact in Lua's
/// doubles.
pub const GCRA_SCRIPT: &str = r#"
local G = 1000000000
local function norm(s, ns)
  if ns >= G then return s + 1, ns - G end
  if ns < 0 then return s - 1, ns + G end
  return s, ns
end
local function le(as, ans, bs, bns)
  return as < bs or (as == bs and ans <= bns)
end
local is, ins = tonumber(ARGV[1]), tonumber(ARGV[2])
local ts, tns = tonumber(ARGV[3]), tonumber(ARGV[4])
local now_s, now_ns
if ARGV[5] then
  now_s, now_ns = tonumber(ARGV[5]), tonumber(ARGV[6])
else
  local t = redis.call('TIME')
  now_s, now_ns = tonumber(t[1]), tonumber(t[2]) * 1000
end
-- tat = max(stored, now)
local tat_s, tat_ns = now_s, now_ns
local stored = redis.call('GET', KEYS[1])
if stored then
  local s, n = string.match(stored, '^(%d+):(%d+)$')
  if s then
    s, n = tonumber(s), tonumber(n)
    if not le(s, n, now_s, now_ns) then tat_s, tat_ns = s, n end
  end
end
local new_s, new_ns = norm(tat_s + is, tat_ns + ins)
local hor_s, hor_ns = norm(now_s + ts, now_ns + tns)
if le(new_s, new_ns, hor_s, hor_ns) then
  -- The key is idle (forgettable) once now >= new TAT: it expires then,
  -- at an absolute time on the script's clock (so an explicit test clock
  -- governs expiry too), rounded up to the next whole millisecond.
  local d_s, d_ns = norm(new_s - now_s, new_ns - now_ns)
  local expire_ms = now_s * 1000 + math.floor(now_ns / 1000000)
    + d_s * 1000 + math.ceil(d_ns / 1000000) + 1
  redis.call('SET', KEYS[1], string.format('%d:%d', new_s, new_ns))
  redis.call('PEXPIREAT', KEYS[1], expire_ms)
  return {1}
end
local r_s, r_ns = norm(new_s - hor_s, new_ns - hor_ns)
return {0, r_s, r_ns}
"#;

/// After a failed check (timeout or error), checks skip Redis and use the
/// fallback for this long; then one probe check goes to Redis while the
/// others still use the fallback. A hung Redis costs one timeout per gap
/// (the probe's), not one per request.
pub const RETRY_GAP: Duration = Duration::from_millis(250);

/// A connection that failed this many checks in a row, with no success in
/// between, is dropped and a new one is made (a hung server does not reset
/// the connection by itself).
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// How long making a connection to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a shared limiter does when Redis cannot answer in time
/// (`network.cluster.limiter_fallback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Decide with this node's own limiter under the same quota: requests
    /// keep flowing, and the cluster admits up to (nodes × rate) meanwhile.
    #[default]
    Local,
    /// Refuse every request until Redis is back (fail closed).
    Deny,
    /// Admit every request until Redis is back (fail open).
    Allow,
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fallback::Local => "local",
            Fallback::Deny => "deny",
            Fallback::Allow => "allow",
        })
    }
}

/// Where a shared limiter keeps its state and what it does without it.
#[derive(Debug, Clone)]
pub struct SharedLimit {
    /// The Redis server (a parsed URL; no connection is made until the
    /// limiter starts).
    pub client: redis::Client,
    /// The first part of every key, e.g. `happynet`.
    pub prefix: String,
    /// What decides while Redis cannot.
    pub fallback: Fallback,
    /// How long one check may wait for Redis.
    pub timeout: Duration,
}

impl SharedLimit {
    /// A shared limit on the Redis at `redis_url` (`redis://host:port[/db]`).
    /// Fails if the URL cannot be parsed; connects to nothing.
    pub fn new(
        redis_url: &str,
        prefix: impl Into<String>,
        fallback: Fallback,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        // TCP_NODELAY (the redis crate turns it off): checks from many
        // callers share one multiplexed connection, and a check written
        // while another's bytes are not yet acknowledged must not wait for
        // that ACK (Nagle) before it leaves; the cluster bridge does the same.
        let info = redis::IntoConnectionInfo::into_connection_info(redis_url)?;
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        Ok(SharedLimit {
            client: redis::Client::open(info.set_tcp_settings(tcp))?,
            prefix: prefix.into(),
            fallback,
            timeout,
        })
    }

    /// The Redis key of `key` under the limiter `limiter`.
    pub fn key(&self, limiter: &str, key: &str) -> String {
        format!("{}:rl:{limiter}:{key}", self.prefix)
    }
}

/// [`GCRA_SCRIPT`], loaded once per server and then run by its SHA1
/// (`EVALSHA`, falling back to `EVAL` when the server does not know it, e.g.
/// after a restart).
#[derive(Debug, Clone)]
pub struct GcraScript {
    script: redis::Script,
}

impl Default for GcraScript {
    fn default() -> Self {
        Self::new()
    }
}

fn pair(d: Duration) -> (u64, u32) {
    (d.as_secs(), d.subsec_nanos())
}

impl GcraScript {
    /// The script, ready to run.
    pub fn new() -> Self {
        GcraScript {
            script: redis::Script::new(GCRA_SCRIPT),
        }
    }

    /// Admits one request for the Redis key `key` under `quota`, or says how
    /// long to wait; the same decision [`crate::gcra::Gcra::check`] makes.
    /// `now` (since the Unix epoch) is for tests; `None` uses the server's
    /// clock.
    pub async fn check<C: redis::aio::ConnectionLike>(
        &self,
        conn: &mut C,
        key: &str,
        quota: &Quota,
        now: Option<Duration>,
    ) -> redis::RedisResult<Decision> {
        let (is, ins) = pair(quota.interval());
        let tolerance = quota
            .interval()
            .checked_mul(quota.burst())
            .unwrap_or(Duration::MAX);
        let (ts, tns) = pair(tolerance);
        let mut call = self.script.key(key);
        call.arg(is).arg(ins).arg(ts).arg(tns);
        if let Some(now) = now {
            let (s, ns) = pair(now);
            call.arg(s).arg(ns);
        }
        let reply: Vec<i64> = call.invoke_async(conn).await?;
        decode(&reply)
    }
}

fn decode(reply: &[i64]) -> redis::RedisResult<Decision> {
    match reply {
        [1] => Ok(Decision::Allow),
        [0, s, ns] => {
            let s = u64::try_from(*s).unwrap_or(0);
            let ns = u32::try_from(*ns).unwrap_or(0).min(999_999_999);
            Ok(Decision::Deny {
                retry_after: Duration::new(s, ns),
            })
        }
        other => Err(redis::RedisError::from((
            redis::ErrorKind::Parse,
            "unexpected GCRA script reply",
            format!("{other:?}"),
        ))),
    }
}

/// Where one check goes, as decided by [`SharedLink::route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<C> {
    /// To Redis, on this connection.
    Redis(C),
    /// To the fallback. `connect`: the caller should start making a
    /// connection now (and report with [`SharedLink::connected`] or
    /// [`SharedLink::connect_failed`]).
    Fallback {
        /// Whether to start connecting.
        connect: bool,
    },
}

/// Whether checks may go to Redis on the connection held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Redis answered last: every check goes to it.
    Open,
    /// A check (or a connection) failed: none goes to Redis before `until`;
    /// the first one at or after it is the probe. (A connection made during
    /// an outage starts here too, with `until` already passed.)
    Shut { until: Instant },
    /// The probe is out: every other check uses the fallback at once until
    /// it answers, so a hung Redis costs one timeout per gap, not one per
    /// check made while the probe waits.
    Probing,
}

/// The state of a shared limiter's link to Redis, as plain code: it takes
/// `now`, does no I/O, and is generic over the connection (tests use a
/// number). See the module docs for the policy.
#[derive(Debug)]
pub struct SharedLink<C> {
    conn: Option<C>,
    connecting: bool,
    /// Connection attempts started so far (saturating): the first one is
    /// the only one checks may wait for.
    attempts: u32,
    gate: Gate,
    failures: u32,
    /// How long a failure shuts the gate ([`RETRY_GAP`], fixed), and when
    /// the link last stopped answering while it has not answered since: for
    /// the "back after …" log line.
    reconnect: Reconnect<Instant>,
    fallbacks_this_outage: u64,
    ever_connected: bool,
}

impl<C> Default for SharedLink<C> {
    fn default() -> Self {
        SharedLink {
            conn: None,
            connecting: false,
            attempts: 0,
            gate: Gate::Open,
            failures: 0,
            reconnect: Reconnect::fixed(RETRY_GAP),
            fallbacks_this_outage: 0,
            ever_connected: false,
        }
    }
}

/// What a change of a [`SharedLink`]'s health means for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing worth a line.
    None,
    /// Redis just stopped answering.
    WentDown,
    /// Redis answers again after `down_for`, during which `fallbacks`
    /// checks were decided by the fallback.
    CameBack {
        /// How long it did not answer.
        down_for: Duration,
        /// Checks decided by the fallback meanwhile.
        fallbacks: u64,
    },
}

impl<C: Clone> SharedLink<C> {
    /// A link with no connection yet: the first [`route`](Self::route)
    /// asks for one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where a check at `now` goes. Every [`Route::Redis`] must be followed
    /// by [`answered`](Self::answered) or [`failed`](Self::failed): after a
    /// failure it may be the one probe, which the other checks wait out on
    /// the fallback.
    pub fn route(&mut self, now: Instant) -> Route<C> {
        let gap_over = match self.gate {
            Gate::Open => true,
            Gate::Shut { until } => now >= until,
            Gate::Probing => false,
        };
        match &self.conn {
            Some(conn) if gap_over => {
                if self.gate != Gate::Open {
                    self.gate = Gate::Probing;
                }
                Route::Redis(conn.clone())
            }
            _ => {
                self.fallbacks_this_outage += 1;
                let connect = self.conn.is_none() && !self.connecting && gap_over;
                if connect {
                    self.connecting = true;
                    self.attempts = self.attempts.saturating_add(1);
                }
                Route::Fallback { connect }
            }
        }
    }

    /// True while the very first connection attempt is under way: the only
    /// one that checks may wait for (within their timeout), so that a node
    /// does not decide its first requests by the fallback merely because it
    /// is starting. Later attempts — Redis still unreachable — are not
    /// waited for: a Redis that drops packets would otherwise cost every
    /// check made during each attempt its full timeout.
    pub fn first_attempt_pending(&self) -> bool {
        self.connecting && self.attempts == 1 && !self.ever_connected
    }

    /// A connection was made at `now`. During an outage it is probed by one
    /// check before the others use it.
    pub fn connected(&mut self, now: Instant, conn: C) {
        self.ever_connected = true;
        self.connecting = false;
        self.conn = Some(conn);
        self.gate = if self.reconnect.is_down() {
            Gate::Shut { until: now }
        } else {
            Gate::Open
        };
        self.failures = 0;
    }

    /// Making a connection failed at `now`: try again after [`RETRY_GAP`].
    pub fn connect_failed(&mut self, now: Instant) -> Transition {
        self.connecting = false;
        self.shut_after_failure(now)
    }

    /// Redis answered a check: every check goes to it again.
    pub fn answered(&mut self, now: Instant) -> Transition {
        self.failures = 0;
        self.gate = Gate::Open;
        self.reconnect.healthy();
        match self.reconnect.connected(now) {
            Some(down_for) => Transition::CameBack {
                down_for,
                fallbacks: std::mem::take(&mut self.fallbacks_this_outage),
            },
            None => {
                self.fallbacks_this_outage = 0;
                Transition::None
            }
        }
    }

    /// A check failed at `now` (timeout or error); `broken` when the error
    /// says the connection itself is gone. The fallback decides it, and
    /// Redis is skipped for [`RETRY_GAP`].
    pub fn failed(&mut self, now: Instant, broken: bool) -> Transition {
        self.fallbacks_this_outage += 1;
        self.failures += 1;
        if broken || self.failures >= MAX_CONSECUTIVE_FAILURES {
            self.conn = None;
            self.failures = 0;
        }
        self.shut_after_failure(now)
    }

    /// Shuts the gate for the policy's wait and begins an outage, unless
    /// one is under way.
    fn shut_after_failure(&mut self, now: Instant) -> Transition {
        // A fixed gap: the jitter's unit changes nothing.
        let retry = self.reconnect.failed(now, 0.0);
        self.gate = Gate::Shut {
            until: now + retry.wait,
        };
        if retry.outage_began {
            Transition::WentDown
        } else {
            Transition::None
        }
    }

    /// True once a connection has been made (it may have failed since).
    pub fn ever_connected(&self) -> bool {
        self.ever_connected
    }

    /// True while a connection is held and Redis answered last (no failure
    /// is being waited out or probed).
    pub fn is_up(&self) -> bool {
        self.conn.is_some() && self.gate == Gate::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_check_asks_for_a_connection_once() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        assert_eq!(link.route(t0), Route::Fallback { connect: true });
        // While connecting, checks fall back without a second attempt.
        assert_eq!(link.route(t0), Route::Fallback { connect: false });
        link.connected(t0, 7);
        assert_eq!(link.route(t0), Route::Redis(7));
        assert_eq!(link.route(t0), Route::Redis(7), "no probing when up");
        assert!(link.is_up());
    }

    #[test]
    fn a_failed_connect_waits_the_retry_gap() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        assert_eq!(link.route(t0), Route::Fallback { connect: true });
        assert_eq!(link.connect_failed(t0), Transition::WentDown);
        assert_eq!(
            link.route(t0 + RETRY_GAP - ms(1)),
            Route::Fallback { connect: false }
        );
        assert_eq!(
            link.route(t0 + RETRY_GAP),
            Route::Fallback { connect: true }
        );
        // A second failure is the same outage.
        assert_eq!(link.connect_failed(t0 + RETRY_GAP), Transition::None);
        link.connected(t0 + ms(500), 1);
        assert_eq!(
            link.answered(t0 + ms(600)),
            Transition::CameBack {
                down_for: ms(600),
                fallbacks: 3
            }
        );
        assert_eq!(link.answered(t0 + ms(601)), Transition::None);
    }

    #[test]
    fn a_timeout_skips_redis_for_the_gap_but_keeps_the_connection() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        link.route(t0);
        link.connected(t0, 1);
        assert_eq!(link.failed(t0, false), Transition::WentDown);
        assert!(!link.is_up());
        assert_eq!(link.route(t0 + ms(1)), Route::Fallback { connect: false });
        assert_eq!(link.route(t0 + RETRY_GAP), Route::Redis(1));
        assert!(matches!(
            link.answered(t0 + RETRY_GAP),
            Transition::CameBack { .. }
        ));
    }

    #[test]
    fn repeated_failures_or_a_broken_connection_replace_it() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        link.route(t0);
        link.connected(t0, 1);
        let mut now = t0;
        for _ in 0..MAX_CONSECUTIVE_FAILURES - 1 {
            link.failed(now, false);
            now += RETRY_GAP;
            assert_eq!(link.route(now), Route::Redis(1));
        }
        link.failed(now, false);
        now += RETRY_GAP;
        assert_eq!(link.route(now), Route::Fallback { connect: true });
        link.connected(now, 2);
        link.failed(now, true);
        assert_eq!(
            link.route(now + RETRY_GAP),
            Route::Fallback { connect: true }
        );
    }

    #[test]
    fn after_a_gap_exactly_one_probe_goes_to_redis() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        link.route(t0);
        link.connected(t0, 1);
        link.failed(t0, false);
        let t1 = t0 + RETRY_GAP;
        assert_eq!(link.route(t1), Route::Redis(1), "the probe");
        // Until the probe answers, the rest fall back at once.
        for i in 0..10 {
            assert_eq!(
                link.route(t1 + ms(i * 10)),
                Route::Fallback { connect: false }
            );
        }
        assert!(!link.is_up());
        // Its success reopens the link to every check.
        assert!(matches!(
            link.answered(t1 + ms(100)),
            Transition::CameBack { .. }
        ));
        assert!(link.is_up());
        assert_eq!(link.route(t1 + ms(100)), Route::Redis(1));
        assert_eq!(link.route(t1 + ms(100)), Route::Redis(1));
    }

    #[test]
    fn a_failed_probe_starts_a_new_gap() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        link.route(t0);
        link.connected(t0, 1);
        link.failed(t0, false);
        let t1 = t0 + RETRY_GAP;
        assert_eq!(link.route(t1), Route::Redis(1));
        assert_eq!(link.route(t1 + ms(49)), Route::Fallback { connect: false });
        // The probe times out at t1 + 50 ms: a new gap from then.
        assert_eq!(link.failed(t1 + ms(50), false), Transition::None);
        let t2 = t1 + ms(50) + RETRY_GAP;
        assert_eq!(link.route(t2 - ms(1)), Route::Fallback { connect: false });
        assert_eq!(link.route(t2), Route::Redis(1), "the next probe");
        assert_eq!(link.route(t2), Route::Fallback { connect: false });
    }

    #[test]
    fn a_connection_made_during_an_outage_is_probed_first() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        link.route(t0);
        link.connected(t0, 1);
        link.failed(t0, true); // the connection is gone
        let t1 = t0 + RETRY_GAP;
        assert_eq!(link.route(t1), Route::Fallback { connect: true });
        link.connected(t1 + ms(5), 2);
        assert_eq!(link.route(t1 + ms(5)), Route::Redis(2), "the probe");
        assert_eq!(link.route(t1 + ms(6)), Route::Fallback { connect: false });
        link.answered(t1 + ms(7));
        assert_eq!(link.route(t1 + ms(7)), Route::Redis(2));
        assert_eq!(link.route(t1 + ms(7)), Route::Redis(2));
    }

    /// A Redis that hangs for 10 s, a check every millisecond, 50 ms
    /// timeouts: only the probes (one per gap + timeout) wait; before the
    /// fix every check made while the first one after a gap waited did too
    /// (about one in six).
    #[test]
    fn a_hung_redis_delays_one_check_per_gap() {
        let timeout = ms(50);
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        link.route(t0);
        link.connected(t0, 1);
        // Each check routed to Redis times out: when, for those pending.
        let mut pending: Vec<Instant> = Vec::new();
        let (mut to_redis, mut total) = (0u32, 0u32);
        for i in 0..10_000u64 {
            let now = t0 + ms(i);
            pending.retain(|&at| {
                if at <= now {
                    link.failed(at, false);
                    false
                } else {
                    true
                }
            });
            total += 1;
            match link.route(now) {
                Route::Redis(_) => {
                    to_redis += 1;
                    pending.push(now + timeout);
                }
                Route::Fallback { connect } => {
                    // Replaced connections reconnect at once (to the same
                    // hung server).
                    if connect {
                        link.connected(now, 1);
                    }
                }
            }
        }
        // The checks already in flight when it hung (one per millisecond
        // of the first timeout) cannot be helped; after them, one probe
        // per gap + timeout.
        let in_flight = timeout.as_millis() as u32;
        let per_gap = (timeout + RETRY_GAP).as_millis() as u32;
        println!("hung Redis: {to_redis} of {total} checks waited a timeout");
        assert!(
            to_redis <= in_flight + total / per_gap + 2,
            "{to_redis} checks went to a hung Redis"
        );
    }

    #[test]
    fn only_the_first_connection_attempt_may_be_waited_for() {
        let t0 = Instant::now();
        let mut link = SharedLink::<u32>::new();
        assert!(!link.first_attempt_pending());
        assert_eq!(link.route(t0), Route::Fallback { connect: true });
        assert!(link.first_attempt_pending());
        // Redis drops packets: the attempt times out.
        let t1 = t0 + CONNECT_TIMEOUT;
        link.connect_failed(t1);
        assert!(!link.first_attempt_pending());
        assert_eq!(
            link.route(t1 + RETRY_GAP),
            Route::Fallback { connect: true }
        );
        assert!(
            !link.first_attempt_pending(),
            "the second attempt is not waited for"
        );
        link.connected(t1 + RETRY_GAP + ms(1), 1);
        assert!(!link.first_attempt_pending());
        // Nor is a reconnection after the first connection was made.
        let mut fresh = SharedLink::<u32>::new();
        fresh.route(t0);
        fresh.connected(t0, 1);
        fresh.failed(t0, true);
        assert_eq!(
            fresh.route(t0 + RETRY_GAP),
            Route::Fallback { connect: true }
        );
        assert!(!fresh.first_attempt_pending());
    }

    #[test]
    fn replies_decode_to_decisions() {
        assert_eq!(decode(&[1]).ok(), Some(Decision::Allow));
        assert_eq!(
            decode(&[0, 1, 500]).ok(),
            Some(Decision::Deny {
                retry_after: Duration::new(1, 500)
            })
        );
        assert!(decode(&[2, 3]).is_err());
    }

    #[test]
    fn keys_name_prefix_limiter_and_key() {
        let l = SharedLimit::new("redis://127.0.0.1:1/", "hn", Fallback::Deny, ms(50))
            .expect("valid URL");
        assert_eq!(l.key("openai", "user-1"), "hn:rl:openai:user-1");
        assert!(SharedLimit::new("nonsense", "hn", Fallback::Deny, ms(50)).is_err());
    }
}
