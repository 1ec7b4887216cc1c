//! Retry timing as plain code: exponential backoff with full jitter,
//! `Retry-After`, the decision to wait or give up, and a retry budget.
//!
//! A retry loop asks three questions, and each has its own piece here:
//! *may I retry at all?* ([`RetryBudget`]: retries are a bounded fraction of
//! recent traffic, so a struggling upstream is not buried under a retry
//! storm), *how long should I wait?* ([`Backoff`], fed by [`Jitter`] and the
//! server's [`parse_retry_after`]), and *is there time left for it?*
//! ([`Backoff::plan_retry`] against the caller's overall deadline). None of
//! them does I/O or reads a clock: the caller passes `now`, the time that
//! remains and a random `unit`, so tests drive them with plain values and the
//! client that owns them decides where time and randomness come from.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::http::header::HttpDate;

/// The first backoff ceiling: quick enough that a transient blip costs
/// little, slow enough that an immediate retry storm is avoided.
pub const DEFAULT_BASE: Duration = Duration::from_millis(100);

/// The largest backoff ceiling: beyond ten seconds a caller is better served
/// by an error than by a longer wait.
pub const DEFAULT_MAX: Duration = Duration::from_secs(10);

/// The longest `Retry-After` we believe. A server that asks for more (or
/// sends a number too big to represent) is treated as asking for this: far
/// beyond any deadline, so the caller gives up rather than overflowing.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Exponential backoff with full jitter.
///
/// The `attempt`-th retry (counting from 0) waits a random time in
/// `[0, ceiling(attempt))`, where the ceiling is `base × 2^attempt` capped at
/// `max`. This is the "full jitter" of AWS's *Exponential Backoff and
/// Jitter*: spreading each wait over the whole range is what keeps many
/// clients that failed together from retrying together, and it does the least
/// total work of the variants measured there.
///
/// Any values are accepted: a `base` above `max` makes every ceiling `max`,
/// and a zero `base` makes every wait zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry's wait. Default [`DEFAULT_BASE`].
    pub base: Duration,
    /// The largest ceiling. Default [`DEFAULT_MAX`].
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: DEFAULT_BASE,
            max: DEFAULT_MAX,
        }
    }
}

/// What [`Backoff::plan_retry`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Retry after waiting this long.
    Wait(Duration),
    /// Do not retry; fail the call with the last error.
    GiveUp(GiveUpReason),
}

/// Why [`Backoff::plan_retry`] said not to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUpReason {
    /// The wait would reach or pass the caller's deadline, so the retry could
    /// not run before it. Failing now is better than sleeping and then failing.
    DeadlineTooClose,
}

impl std::fmt::Display for GiveUpReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GiveUpReason::DeadlineTooClose => {
                f.write_str("the retry wait would not end before the deadline")
            }
        }
    }
}

impl std::error::Error for GiveUpReason {}

/// Why [`Backoff::try_new`] refused its arguments. [`BackoffError::field`]
/// names the argument, so that a configuration can report it under its own
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackoffError {
    /// `base` was zero: every wait would be zero, a retry storm.
    ZeroBase,
    /// `max` was below `base`.
    MaxBelowBase {
        /// The base given.
        base: Duration,
        /// The max given.
        max: Duration,
    },
}

impl BackoffError {
    /// The argument that was wrong: `"base"` or `"max"`.
    pub fn field(&self) -> &'static str {
        match self {
            BackoffError::ZeroBase => "base",
            BackoffError::MaxBelowBase { .. } => "max",
        }
    }

    /// What the argument must be, without its name.
    pub fn requirement(&self) -> String {
        match self {
            BackoffError::ZeroBase => "must be > 0".to_owned(),
            BackoffError::MaxBelowBase { base, max } => format!(
                "must be >= base ({} s), got {} s",
                base.as_secs_f64(),
                max.as_secs_f64()
            ),
        }
    }
}

impl std::fmt::Display for BackoffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for BackoffError {}

impl Backoff {
    /// A backoff policy for retries: `base` must be above zero (a zero base
    /// retries at once, every time) and `max` at least `base`. The struct's
    /// fields stay public for code that wants any values (see the type's
    /// docs); configuration goes through here.
    pub fn try_new(base: Duration, max: Duration) -> Result<Self, BackoffError> {
        if base.is_zero() {
            return Err(BackoffError::ZeroBase);
        }
        if max < base {
            return Err(BackoffError::MaxBelowBase { base, max });
        }
        Ok(Backoff { base, max })
    }

    /// The upper bound of the wait before retry number `attempt` (from 0):
    /// `min(max, base × 2^attempt)`, exact and without overflow for every
    /// `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let base = self.base.as_nanos();
        let max = self.max.as_nanos();
        if base == 0 {
            return Duration::ZERO;
        }
        // `base << attempt` fits in u128 only if `attempt` is below the number
        // of leading zeros; otherwise it is far beyond any `Duration` (whose
        // nanoseconds fit in 94 bits), so the cap applies.
        if attempt >= base.leading_zeros() {
            return self.max;
        }
        let grown = base << attempt;
        if grown >= max {
            self.max
        } else {
            from_nanos_u128(grown)
        }
    }

    /// The full-jitter wait before retry number `attempt`: `unit × ceiling`.
    ///
    /// `unit` should be uniform in `[0, 1)` (see [`Jitter::unit`]). Values
    /// outside it are clamped and NaN counts as 0, so a bad `unit` can shorten
    /// a wait but never panic or exceed the ceiling.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        // Through f64 seconds: the product can round up past `ceiling` (and
        // past `Duration::MAX` for a huge ceiling), hence the checked
        // conversion and the `min`.
        Duration::try_from_secs_f64(ceiling.as_secs_f64() * unit)
            .map_or(ceiling, |d| d.min(ceiling))
    }

    /// Decides whether retry number `attempt` (from 0) should happen, and
    /// after how long.
    ///
    /// `retry_after` is the server's `Retry-After` (see [`parse_retry_after`]),
    /// `remaining` the time left before the caller's overall deadline, and
    /// `unit` a random number in `[0, 1)` for the jitter.
    ///
    /// The wait is `max(retry_after, delay(attempt, unit))`. The server's value
    /// is a floor, never shortened: retrying earlier than it asked only earns
    /// another refusal. It is not used *instead* of our own backoff either: a
    /// server that says "1 s" to every client would otherwise get all of them
    /// back in the same instant, and after several failures our own ceiling
    /// may rightly be longer than what the server guessed.
    ///
    /// If that wait is not shorter than `remaining`, the retry could not even
    /// start before the deadline, so the answer is to give up now rather than
    /// sleep and fail. A caller that wants a margin for the attempt itself
    /// passes `remaining` minus that margin.
    pub fn plan_retry(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        remaining: Duration,
        unit: f64,
    ) -> RetryDecision {
        let delay = self.delay(attempt, unit);
        let wait = retry_after.map_or(delay, |floor| floor.max(delay));
        if wait >= remaining {
            RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
        } else {
            RetryDecision::Wait(wait)
        }
    }
}

/// A `Duration` from nanoseconds held in a u128 that is known to be below some
/// `Duration`'s nanoseconds, so the seconds fit in u64.
fn from_nanos_u128(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 10^9, so it fits in u32.
    let subsec = (nanos % NANOS_PER_SEC) as u32;
    Duration::new(secs, subsec)
}

/// Parses an HTTP `Retry-After` value into how long to wait from `now`.
///
/// Two forms are accepted (RFC 9110 §10.2.3):
/// - *delay-seconds*: ASCII digits only, with optional surrounding spaces or
///   tabs. Signs, fractions and anything else make the value invalid.
/// - *HTTP-date*: the IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, and the
///   obsolete RFC 850 and asctime forms that recipients must also accept. A
///   date in the past means "now": [`Duration::ZERO`].
///
/// Anything longer than [`MAX_RETRY_AFTER`] (including a digit string too
/// large for any integer type, as RFC 9111 §1.2.2 recommends for
/// delta-seconds) is capped at it. Returns `None` for an invalid value, in
/// which case the caller should fall back to its own backoff.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        // Saturating arithmetic instead of `str::parse`, which would also
        // accept a leading `+` and fail on overflow rather than cap.
        let secs = value.bytes().fold(0u64, |acc, b| {
            acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
        });
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let date: HttpDate = value.parse().ok()?;
    let at = SystemTime::from(date);
    Some(
        at.duration_since(now)
            .map_or(Duration::ZERO, |d| d.min(MAX_RETRY_AFTER)),
    )
}

/// A small, fast, non-cryptographic random source for backoff jitter and for
/// the load balancer's random choices.
///
/// It is xorshift64* (Vigna, 2016): one u64 of state, a few instructions per
/// number, no lock, no system call. Cryptographic randomness is not needed
/// because nothing secret or adversarial rests on these numbers: jitter only
/// has to spread retries so that clients that failed together do not retry
/// together, and the balancer only has to avoid always comparing the same
/// two endpoints. Someone who could predict the values gains nothing they
/// could not get by sending requests of their own.
///
/// Each [`Jitter::new`] is seeded from the wall clock and a process-wide
/// counter, so two sources created in the same nanosecond still differ;
/// tests use [`Jitter::with_seed`] for a repeatable sequence.
#[derive(Debug, Clone)]
pub struct Jitter {
    state: u64,
}

/// Distinguishes sources created at the same clock reading.
static JITTER_SEEDS: AtomicU64 = AtomicU64::new(0);

/// The state xorshift must never hold (it would stay zero forever); used in
/// its place. Any odd constant works; this is the 64-bit golden ratio.
const NONZERO_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for Jitter {
    fn default() -> Self {
        Self::new()
    }
}

impl Jitter {
    /// A source seeded from the current time and a process-wide counter.
    pub fn new() -> Self {
        // A clock before 1970 only loses the time part of the seed.
        let clock = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let count = JITTER_SEEDS.fetch_add(1, Ordering::Relaxed);
        Self::with_seed(clock ^ count.wrapping_mul(NONZERO_SEED))
    }

    /// A source with a fixed seed: the same seed gives the same sequence.
    pub fn with_seed(seed: u64) -> Self {
        // splitmix64's finaliser spreads nearby seeds (consecutive counters,
        // close clock readings) over the whole state space.
        let mut z = seed.wrapping_add(NONZERO_SEED);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Jitter {
            state: if z == 0 { NONZERO_SEED } else { z },
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A random number uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        // The top 53 bits are exactly representable in an f64 mantissa, so
        // the result is a multiple of 2^-53 strictly below 1.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A random index in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: usize) -> usize {
        // Lemire's multiply-shift: the high half of a 64×64-bit product is
        // below `n`. Its bias (at most n / 2^64) is irrelevant here.
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// The window a [`RetryBudget`] counts over, by default.
pub const DEFAULT_BUDGET_TTL: Duration = Duration::from_secs(10);

/// Retries per second a [`RetryBudget`] always allows, by default: enough
/// for a quiet client to retry its occasional failure.
pub const DEFAULT_MIN_RETRIES_PER_SEC: u32 = 10;

/// Retries as a fraction of requests a [`RetryBudget`] allows, by default:
/// a failing upstream sees at most 20 % extra load from retries.
pub const DEFAULT_RETRY_RATIO: f64 = 0.2;

/// The shortest window a [`RetryBudget`] accepts.
pub const MIN_BUDGET_TTL: Duration = Duration::from_millis(1);

/// The largest retry ratio a [`RetryBudget`] accepts (a thousand retries per
/// request: beyond it a budget limits nothing).
pub const MAX_RETRY_RATIO: f64 = 1000.0;

/// How many time slots the budget's window is cut into. More slots make the
/// window slide more smoothly; the memory is fixed either way.
const BUDGET_SLOTS: usize = 10;

/// The ratio's fixed-point scale: ratios are kept in millionths so that the
/// budget check is exact integer arithmetic (0.2 × 100 must allow exactly 20).
const RATIO_SCALE: u128 = 1_000_000;

/// Why [`RetryBudget::new`] refused its arguments.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BudgetError {
    /// The window was shorter than [`MIN_BUDGET_TTL`].
    TtlTooShort(Duration),
    /// The ratio was negative, NaN, infinite or above [`MAX_RETRY_RATIO`].
    InvalidRatio(f64),
}

impl BudgetError {
    /// The argument that was wrong: `"ttl"` or `"ratio"`.
    pub fn field(&self) -> &'static str {
        match self {
            BudgetError::TtlTooShort(_) => "ttl",
            BudgetError::InvalidRatio(_) => "ratio",
        }
    }

    /// What the argument must be, and what it was, without its name.
    pub fn requirement(&self) -> String {
        match self {
            BudgetError::TtlTooShort(ttl) => format!(
                "must be at least {} s, got {} s",
                MIN_BUDGET_TTL.as_secs_f64(),
                ttl.as_secs_f64()
            ),
            BudgetError::InvalidRatio(r) => {
                format!("must be between 0 and {MAX_RETRY_RATIO}, got {r}")
            }
        }
    }
}

impl std::fmt::Display for BudgetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "retry budget {} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for BudgetError {}

/// The deposits and withdrawals of one time slot.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Which slot-length period since the origin these counts belong to.
    epoch: u64,
    deposits: u64,
    withdrawals: u64,
}

/// A retry budget, as in Finagle and tower: retries may be at most `ratio`
/// of recent requests, plus `min_per_sec` retries per second that are always
/// allowed.
///
/// Every original request calls [`deposit`](Self::deposit); every retry asks
/// [`try_withdraw`](Self::try_withdraw) and is not made if it says no. Unlike
/// a per-call attempt limit, this bounds the *total* extra load retries put on
/// an upstream: when everything fails, traffic grows by at most `ratio`, not by
/// the number of attempts.
///
/// Counts are kept in a fixed ring of slots, each `ttl / 10` long, so memory
/// is constant whatever the traffic. The guarantee, with `slot = ttl / 10`
/// and `reserve = min_per_sec × ttl` (in seconds, rounded down): at every
/// successful withdrawal at time `t`, the withdrawals in
/// `(t − (ttl − slot), t]` are at most `ratio ×` the deposits in
/// `(t − ttl, t] + reserve`. Once `ttl` has passed, old counts are
/// forgotten and the budget recovers.
///
/// Times passed in should not go backwards; if they do, they count as the
/// latest time seen.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    slots: [Slot; BUDGET_SLOTS],
    slot_nanos: u128,
    ratio_scaled: u128,
    reserve: u64,
    /// The first time seen: slot epochs count from it.
    origin: Option<Instant>,
    /// The latest epoch seen, so that time never runs backwards.
    latest: u64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        // The defaults are within every bound `new` checks.
        Self::build(
            DEFAULT_BUDGET_TTL,
            DEFAULT_MIN_RETRIES_PER_SEC,
            DEFAULT_RETRY_RATIO,
        )
    }
}

fn reserve(min_per_sec: u32, ttl_nanos: u128) -> u64 {
    u64::try_from(u128::from(min_per_sec) * ttl_nanos / NANOS_PER_SEC).unwrap_or(u64::MAX)
}

impl RetryBudget {
    /// A budget over a window of `ttl` that always allows `min_per_sec`
    /// retries per second, and beyond that `ratio` retries per request.
    ///
    /// Fails if `ttl` is shorter than [`MIN_BUDGET_TTL`], or `ratio` is not a
    /// number in `[0, MAX_RETRY_RATIO]`. A `ratio` of 0 with `min_per_sec` of
    /// 0 forbids every retry.
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f64) -> Result<Self, BudgetError> {
        if ttl < MIN_BUDGET_TTL {
            return Err(BudgetError::TtlTooShort(ttl));
        }
        if !(0.0..=MAX_RETRY_RATIO).contains(&ratio) {
            // `contains` is false for NaN as well.
            return Err(BudgetError::InvalidRatio(ratio));
        }
        Ok(Self::build(ttl, min_per_sec, ratio))
    }

    /// `new` without the checks, for arguments known to be valid.
    fn build(ttl: Duration, min_per_sec: u32, ratio: f64) -> Self {
        let ttl_nanos = ttl.as_nanos();
        RetryBudget {
            slots: [Slot::default(); BUDGET_SLOTS],
            slot_nanos: ttl_nanos / BUDGET_SLOTS as u128,
            ratio_scaled: (ratio * RATIO_SCALE as f64).round() as u128,
            reserve: reserve(min_per_sec, ttl_nanos),
            origin: None,
            latest: 0,
        }
    }

    /// Records one original (not retried) request at `now`.
    pub fn deposit(&mut self, now: Instant) {
        let slot = &mut self.slots[self.advance(now)];
        slot.deposits = slot.deposits.saturating_add(1);
    }

    /// Asks to make one retry at `now`. True means the retry fits in the
    /// budget and has been counted; false means it must not be made.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        let index = self.advance(now);
        if self.remaining_at(self.latest) == 0 {
            return false;
        }
        let slot = &mut self.slots[index];
        slot.withdrawals = slot.withdrawals.saturating_add(1);
        true
    }

    /// How many retries would be allowed at `now` (for metrics).
    pub fn remaining(&self, now: Instant) -> u64 {
        let epoch = self.epoch(now).max(self.latest);
        self.remaining_at(epoch)
    }

    /// The slot-length periods between the origin and `now`.
    fn epoch(&self, now: Instant) -> u64 {
        let Some(origin) = self.origin else {
            return 0;
        };
        let elapsed = now.saturating_duration_since(origin).as_nanos();
        u64::try_from(elapsed / self.slot_nanos.max(1)).unwrap_or(u64::MAX)
    }

    /// Moves the ring to `now` and returns the index of the slot that counts it.
    fn advance(&mut self, now: Instant) -> usize {
        if self.origin.is_none() {
            self.origin = Some(now);
        }
        self.latest = self.epoch(now).max(self.latest);
        let index = (self.latest % BUDGET_SLOTS as u64) as usize;
        let slot = &mut self.slots[index];
        if slot.epoch != self.latest {
            // This slot last counted a period that has left the window.
            *slot = Slot {
                epoch: self.latest,
                ..Slot::default()
            };
        }
        index
    }

    /// The allowance left when the current period is `epoch`.
    fn remaining_at(&self, epoch: u64) -> u64 {
        let (deposits, withdrawals) = self
            .slots
            .iter()
            .filter(|s| s.epoch <= epoch && epoch - s.epoch < BUDGET_SLOTS as u64)
            .fold((0u128, 0u128), |(d, w), s| {
                (d + u128::from(s.deposits), w + u128::from(s.withdrawals))
            });
        let allowed = (self.ratio_scaled * deposits) / RATIO_SCALE + u128::from(self.reserve);
        u64::try_from(allowed.saturating_sub(withdrawals)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::default();
        let expected = [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000];
        for (attempt, want) in expected.into_iter().enumerate() {
            assert_eq!(b.ceiling(attempt as u32), ms(want), "attempt {attempt}");
        }
    }

    #[test]
    fn ceiling_never_overflows() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(1000), secs(10));
        assert_eq!(b.ceiling(u32::MAX), secs(10));
        let huge = Backoff {
            base: Duration::from_nanos(1),
            max: Duration::MAX,
        };
        assert_eq!(huge.ceiling(10), Duration::from_nanos(1024));
        assert_eq!(huge.ceiling(64), Duration::from_nanos(1 << 63) * 2);
        assert_eq!(huge.ceiling(1000), Duration::MAX);
        let zero = Backoff {
            base: Duration::ZERO,
            max: secs(1),
        };
        assert_eq!(zero.ceiling(1000), Duration::ZERO);
        let inverted = Backoff {
            base: secs(5),
            max: secs(1),
        };
        assert_eq!(inverted.ceiling(0), secs(1));
    }

    #[test]
    fn delay_is_full_jitter_within_the_ceiling() {
        let b = Backoff::default();
        let mut jitter = Jitter::with_seed(7);
        for attempt in 0..12 {
            let ceiling = b.ceiling(attempt);
            assert_eq!(b.delay(attempt, 0.0), Duration::ZERO);
            assert_eq!(b.delay(attempt, 0.5), ceiling / 2);
            for _ in 0..1000 {
                let d = b.delay(attempt, jitter.unit());
                assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
            }
        }
        // The largest unit `Jitter` can produce stays under the ceiling.
        let below_one = 1.0 - f64::EPSILON / 2.0;
        assert!(b.delay(3, below_one) <= b.ceiling(3));
    }

    #[test]
    fn delay_tolerates_bad_units() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, f64::NAN), Duration::ZERO);
        assert_eq!(b.delay(0, -3.0), Duration::ZERO);
        assert_eq!(b.delay(0, 7.0), ms(100));
        assert_eq!(b.delay(0, f64::INFINITY), ms(100));
        let huge = Backoff {
            base: Duration::MAX,
            max: Duration::MAX,
        };
        assert_eq!(huge.delay(0, 1.0), Duration::MAX);
    }

    #[test]
    fn jitter_units_are_in_range_and_vary() {
        let mut j = Jitter::new();
        let units: Vec<f64> = (0..10_000).map(|_| j.unit()).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        let low = units.iter().filter(|&&u| u < 0.5).count();
        // A fair source puts about half below 0.5 (σ = 50 here).
        assert!((4_700..=5_300).contains(&low), "{low} of 10000 below 0.5");
        let distinct: std::collections::HashSet<u64> = units.iter().map(|u| u.to_bits()).collect();
        assert!(distinct.len() > 9_990);
    }

    #[test]
    fn jitter_seeds() {
        let a: Vec<u64> = {
            let mut j = Jitter::with_seed(42);
            (0..8).map(|_| j.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut j = Jitter::with_seed(42);
            (0..8).map(|_| j.next_u64()).collect()
        };
        assert_eq!(a, b);
        // Sources created back to back differ (the counter, if not the clock).
        let mut x = Jitter::new();
        let mut y = Jitter::new();
        assert_ne!(x.next_u64(), y.next_u64());
        // Seed 0 must not get stuck.
        let mut z = Jitter::with_seed(0);
        assert_ne!(z.next_u64(), z.next_u64());
    }

    #[test]
    fn jitter_below_stays_below() {
        let mut j = Jitter::with_seed(1);
        assert_eq!(j.below(0), 0);
        assert_eq!(j.below(1), 0);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            seen[j.below(3)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn retry_after_parsing() {
        // Sun, 06 Nov 1994 08:49:37 GMT
        let now = UNIX_EPOCH + secs(784_111_777);
        let cases: &[(&str, Option<Duration>)] = &[
            ("120", Some(secs(120))),
            ("0", Some(Duration::ZERO)),
            ("  120  ", Some(secs(120))),
            ("\t7 ", Some(secs(7))),
            ("007", Some(secs(7))),
            ("86400", Some(MAX_RETRY_AFTER)),
            ("86401", Some(MAX_RETRY_AFTER)),
            ("18446744073709551615", Some(MAX_RETRY_AFTER)),
            ("999999999999999999999999999999", Some(MAX_RETRY_AFTER)),
            ("", None),
            ("   ", None),
            ("-5", None),
            ("+5", None),
            ("1.5", None),
            ("12abc", None),
            ("1 2", None),
            ("soon", None),
            ("\u{FF11}\u{FF12}", None),
            // IMF-fixdate, two minutes ahead.
            ("Sun, 06 Nov 1994 08:51:37 GMT", Some(secs(120))),
            (" Sun, 06 Nov 1994 08:51:37 GMT ", Some(secs(120))),
            // The same instant, and one in the past: retry now.
            ("Sun, 06 Nov 1994 08:49:37 GMT", Some(Duration::ZERO)),
            ("Sat, 05 Nov 1994 08:49:37 GMT", Some(Duration::ZERO)),
            // Obsolete forms a recipient must accept.
            ("Sunday, 06-Nov-94 08:51:37 GMT", Some(secs(120))),
            ("Sun Nov  6 08:51:37 1994", Some(secs(120))),
            // Far future: capped.
            ("Fri, 31 Dec 9999 23:59:59 GMT", Some(MAX_RETRY_AFTER)),
            // Not dates.
            ("Sun, 32 Nov 1994 08:51:37 GMT", None),
            ("Sun, 06 Nov 1994 08:51:37", None),
        ];
        for (value, want) in cases {
            assert_eq!(parse_retry_after(value, now), *want, "{value:?}");
        }
    }

    #[test]
    fn plan_retry_without_retry_after_waits_the_jittered_delay() {
        let b = Backoff::default();
        assert_eq!(
            b.plan_retry(2, None, secs(30), 0.5),
            RetryDecision::Wait(ms(200))
        );
        assert_eq!(
            b.plan_retry(0, None, secs(30), 0.0),
            RetryDecision::Wait(Duration::ZERO)
        );
    }

    #[test]
    fn plan_retry_never_waits_less_than_retry_after() {
        let b = Backoff::default();
        let mut j = Jitter::with_seed(3);
        for attempt in 0..10 {
            for _ in 0..200 {
                let ra = ms(j.below(5_000) as u64);
                match b.plan_retry(attempt, Some(ra), secs(60), j.unit()) {
                    RetryDecision::Wait(w) => {
                        assert!(w >= ra, "waited {w:?} < Retry-After {ra:?}");
                        assert!(w <= ra.max(b.ceiling(attempt)));
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        // Our own backoff is longer than the server's hint: ours wins.
        assert_eq!(
            b.plan_retry(6, Some(secs(1)), secs(60), 0.5),
            RetryDecision::Wait(ms(3200))
        );
    }

    #[test]
    fn plan_retry_gives_up_when_the_wait_would_cross_the_deadline() {
        let b = Backoff::default();
        let give_up = RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose);
        // Retry-After longer than what remains: give up now.
        assert_eq!(b.plan_retry(0, Some(secs(120)), secs(30), 0.0), give_up);
        // Exactly what remains: the retry could not start in time either.
        assert_eq!(b.plan_retry(0, Some(secs(30)), secs(30), 0.0), give_up);
        assert_eq!(
            b.plan_retry(0, Some(secs(29)), secs(30), 0.0),
            RetryDecision::Wait(secs(29))
        );
        // The jittered delay alone crosses the deadline.
        assert_eq!(b.plan_retry(7, None, secs(4), 0.5), give_up);
        assert_eq!(
            b.plan_retry(7, None, secs(6), 0.5),
            RetryDecision::Wait(secs(5))
        );
        // No time left at all.
        assert_eq!(b.plan_retry(0, None, Duration::ZERO, 0.0), give_up);
    }

    #[test]
    fn budget_allows_reserve_plus_ratio_within_one_window() {
        let mut budget = RetryBudget::default();
        let t0 = Instant::now();
        for _ in 0..100 {
            budget.deposit(t0);
        }
        // 10/s × 10 s reserve + 0.2 × 100 requests.
        assert_eq!(budget.remaining(t0), 120);
        let allowed = (0..1000).filter(|_| budget.try_withdraw(t0)).count();
        assert_eq!(allowed, 120);
        assert_eq!(budget.remaining(t0), 0);
        // More requests earn more retries.
        for _ in 0..10 {
            budget.deposit(t0 + ms(500));
        }
        assert!(budget.try_withdraw(t0 + ms(500)));
        assert!(budget.try_withdraw(t0 + ms(500)));
        assert!(!budget.try_withdraw(t0 + ms(500)));
    }

    #[test]
    fn budget_recovers_after_ttl() {
        let mut budget = RetryBudget::new(secs(10), 1, 0.0).unwrap();
        let t0 = Instant::now();
        assert_eq!((0..100).filter(|_| budget.try_withdraw(t0)).count(), 10);
        assert!(!budget.try_withdraw(t0 + secs(10) - Duration::from_nanos(1)));
        assert_eq!(budget.remaining(t0 + secs(10)), 10);
        assert!(budget.try_withdraw(t0 + secs(10)));
    }

    #[test]
    fn budget_with_nothing_allowed_refuses_every_retry() {
        let mut budget = RetryBudget::new(secs(1), 0, 0.0).unwrap();
        let t0 = Instant::now();
        for i in 0..100 {
            budget.deposit(t0 + ms(i));
            assert!(!budget.try_withdraw(t0 + ms(i)));
        }
    }

    #[test]
    fn budget_tolerates_time_running_backwards() {
        let mut budget = RetryBudget::new(secs(1), 1, 0.0).unwrap();
        let t0 = Instant::now();
        assert!(budget.try_withdraw(t0 + secs(5)));
        // An older `now` counts as the latest time seen: no fresh allowance.
        assert!(!budget.try_withdraw(t0));
        assert!(budget.try_withdraw(t0 + secs(6)));
    }

    #[test]
    fn budget_rejects_bad_arguments() {
        assert_eq!(
            RetryBudget::new(Duration::ZERO, 10, 0.2).err(),
            Some(BudgetError::TtlTooShort(Duration::ZERO))
        );
        for ratio in [-0.1, f64::INFINITY, MAX_RETRY_RATIO * 2.0] {
            assert_eq!(
                RetryBudget::new(secs(10), 10, ratio).err(),
                Some(BudgetError::InvalidRatio(ratio))
            );
        }
        assert!(matches!(
            RetryBudget::new(secs(10), 10, f64::NAN),
            Err(BudgetError::InvalidRatio(_))
        ));
        assert!(RetryBudget::new(secs(10), 10, 0.0).is_ok());
        assert!(RetryBudget::new(secs(3600), u32::MAX, MAX_RETRY_RATIO).is_ok());
        let err = RetryBudget::new(Duration::ZERO, 10, 0.2).unwrap_err();
        assert_eq!(err.field(), "ttl");
        assert_eq!(
            BudgetError::InvalidRatio(-1.0).requirement(),
            format!("must be between 0 and {MAX_RETRY_RATIO}, got -1")
        );
    }

    #[test]
    fn backoff_try_new_refuses_a_zero_base_and_a_max_below_it() {
        assert_eq!(
            Backoff::try_new(Duration::ZERO, secs(1)),
            Err(BackoffError::ZeroBase)
        );
        let err = Backoff::try_new(secs(2), secs(1)).unwrap_err();
        assert_eq!(err.field(), "max");
        assert_eq!(err.to_string(), "max must be >= base (2 s), got 1 s");
        assert_eq!(
            Backoff::try_new(DEFAULT_BASE, DEFAULT_MAX),
            Ok(Backoff::default())
        );
    }

    /// Property: at every granted withdrawal at `t`, the withdrawals in
    /// `(t - (ttl - slot), t]` are at most `ratio ×` the deposits in
    /// `(t - ttl, t]` plus the reserve. Checked against a log of every event,
    /// independently of the ring. A small deterministic generator stands in
    /// for a property-testing crate.
    #[test]
    fn withdrawals_never_exceed_ratio_of_deposits_plus_reserve() {
        // The crate's own xorshift64* (Jitter), seeded: deterministic cases.
        let mut rng = super::Jitter::with_seed(0x2545_F491_4F6C_DD1D);
        let mut next = move || rng.next_u64();
        for case in 0..100 {
            let ttl = ms(1_000 * (1 + next() % 10));
            let slot = ttl / BUDGET_SLOTS as u32;
            let min_per_sec = (next() % 20) as u32;
            let ratio = (next() % 1000) as f64 / 1000.0;
            let mut budget = RetryBudget::new(ttl, min_per_sec, ratio).unwrap();
            let reserve = min_per_sec as f64 * ttl.as_secs_f64();
            let t0 = Instant::now();
            let mut now = t0;
            let mut deposits: Vec<Instant> = Vec::new();
            let mut withdrawals: Vec<Instant> = Vec::new();
            // Bursts of requests and storms of retries, in random phases.
            let mut retry_heavy = false;
            for step in 0..5_000 {
                if step % 500 == 0 {
                    retry_heavy = next() % 2 == 0;
                }
                now += Duration::from_micros(next() % 20_000);
                let retry = if retry_heavy {
                    next() % 10 != 0
                } else {
                    next() % 10 == 0
                };
                if !retry {
                    budget.deposit(now);
                    deposits.push(now);
                    continue;
                }
                if !budget.try_withdraw(now) {
                    continue;
                }
                withdrawals.push(now);
                let w = withdrawals
                    .iter()
                    .rev()
                    .take_while(|&&x| x + ttl - slot > now)
                    .count();
                let d = deposits
                    .iter()
                    .rev()
                    .take_while(|&&x| x + ttl > now)
                    .count();
                let bound = ratio * d as f64 + reserve;
                assert!(
                    w as f64 <= bound + 1e-9,
                    "case {case} step {step}: {w} withdrawals > {bound} \
                     (ratio {ratio}, {d} deposits, reserve {reserve})"
                );
            }
            assert!(!withdrawals.is_empty() || (min_per_sec == 0 && ratio == 0.0));
        }
    }
}
