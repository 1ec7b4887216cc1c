//! The circuit breaker: a plain state machine ([`Breaker`]) and its actor
//! shell ([`BreakerActor`]), one per upstream.
//!
//! A breaker watches the outcomes of the calls it admitted and stops admitting
//! calls when the upstream looks broken, so that callers fail fast instead of
//! piling up on an upstream that cannot answer, and the upstream gets room to
//! recover. It has three states:
//!
//! ```text
//!            failure or slow-call rate ≥ threshold
//!            (over ≥ minimum_calls outcomes in the window)
//!   Closed ───────────────────────────────────────────────► Open { until }
//!     ▲                                                      │  ▲
//!     │ all half_open_probes                 the first request │  │ a probe failed, was
//!     │ probes succeeded                     at or after until │  │ slow, or got lost
//!     │                                                      ▼  │
//!     └─────────────────────────────────────────────────── HalfOpen
//! ```
//!
//! - **Closed** admits every call and keeps the outcomes of the last `window`
//!   calls. Once at least `minimum_calls` are in the window, a failure rate or
//!   a slow-call rate at or over its threshold opens the breaker.
//! - **Open** rejects every call until `open_duration` has passed. It has no
//!   timer: the first request at or after that moment half-opens it.
//! - **HalfOpen** admits exactly `half_open_probes` calls and rejects the rest
//!   while their verdict is pending. If every probe succeeds the breaker
//!   closes with an empty window; the first probe that fails (or is slow)
//!   opens it again for a fresh `open_duration`.
//!
//! Every admitted call gets a [`Ticket`] that carries the breaker's
//! *generation*, which is bumped on every transition. The outcome of a call
//! admitted under an earlier state is stale and changes nothing: a slow
//! failure from the closed state that arrives after the breaker has reopened
//! must not count against the new half-open probes.
//!
//! Through the actor, a caller holds its ticket inside a [`BreakerPermit`], a
//! drop guard: a call that is cancelled (its caller hangs up, its deadline
//! fires) reports itself as [`AttemptOutcome::Ignored`] when its future is dropped,
//! so a half-open probe slot is never lost to a caller that went away.
//!
//! Like the other state machines here, [`Breaker`] does no I/O and reads no
//! clock; every method takes `now`. [`BreakerActor`] feeds it from
//! `tokio::time::Instant`, so actor tests can pause time.

use actix::prelude::*;
use serde::Serialize;
use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

/// The largest `window` [`BreakerConfig::validate`] accepts. The window is a
/// buffer of that many outcomes per breaker; this keeps a typo in a config
/// file from allocating gigabytes.
pub const MAX_WINDOW: usize = 100_000;

/// The largest `half_open_probes` [`BreakerConfig::validate`] accepts. The
/// breaker tracks each outstanding probe, and a probe count this high would
/// no longer be a careful test of a recovering upstream.
pub const MAX_HALF_OPEN_PROBES: u32 = 10_000;

/// How far ahead a caller rejected in the half-open state is told to retry.
///
/// While probes are out, the breaker cannot know when it will close: that
/// depends on how long the probes take. A short hint is the useful one: if the
/// probes succeed (the usual case once an upstream is back) the breaker closes
/// within about one call's latency, and a caller told to wait the whole
/// `open_duration` would stay away far longer than needed. If the probes fail,
/// the caller's retry meets the reopened breaker and is told the real time.
/// The hint never reaches past the half-open deadline (see [`Breaker`]).
pub const HALF_OPEN_RETRY_HINT: Duration = Duration::from_secs(1);

/// How a breaker decides. See the module docs for the state machine.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// How many of the most recent call outcomes the closed state judges by
    /// (a count-based sliding window). Default 20.
    pub window: usize,
    /// How many outcomes the window must hold before the breaker may open: a
    /// single failure out of one call is no evidence. Default 10.
    pub minimum_calls: usize,
    /// The failure rate (0 < rate ≤ 1) at or above which the breaker opens.
    /// Default 0.5.
    pub failure_rate: f64,
    /// The slow-call rate (0 < rate ≤ 1) at or above which the breaker opens.
    /// The default, 1.0, turns slow-call tripping off (a call that is slow
    /// enough to matter is usually cut off by its timeout, which the breaker
    /// then sees as a failure). Below 1.0, a slow probe also reopens a
    /// half-open breaker.
    pub slow_call_rate: f64,
    /// How long a call must take to count as slow. Default 5 s.
    pub slow_call_duration: Duration,
    /// How long the breaker stays open before it lets probes through.
    /// Default 30 s. It also bounds how long the half-open state waits for
    /// its probes' verdict.
    pub open_duration: Duration,
    /// How many probe calls the half-open state admits; all of them must
    /// succeed for the breaker to close. Default 3.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            minimum_calls: 10,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call_duration: Duration::from_secs(5),
            open_duration: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

/// The longest `open_duration` (and so the longest wait for a half-open
/// verdict) [`BreakerConfig::validate`] accepts: a day. A breaker open for
/// longer is a switch, not a breaker; the bound also keeps
/// `now + open_duration` from overflowing an `Instant`.
pub const MAX_OPEN_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Why [`BreakerConfig::validate`] (and so [`Breaker::new`]) refused a
/// configuration: the first field that is wrong, with what it was.
/// [`BreakerConfigError::field`] names the field, so that a configuration
/// file can report the error under its own key.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BreakerConfigError {
    /// `window` is 0 or above [`MAX_WINDOW`].
    Window(usize),
    /// `minimum_calls` is 0 or above `window`.
    MinimumCalls {
        /// The value given.
        got: usize,
        /// The window it must fit in.
        window: usize,
    },
    /// `failure_rate` is not in `(0, 1]`.
    FailureRateThreshold(f64),
    /// `slow_call_rate` is not in `(0, 1]`.
    SlowCallRateThreshold(f64),
    /// `slow_call_duration` is zero.
    SlowCallDuration,
    /// `open_duration` is zero or above [`MAX_OPEN_DURATION`].
    OpenDuration(Duration),
    /// `half_open_probes` is 0 or above [`MAX_HALF_OPEN_PROBES`].
    HalfOpenProbes(u32),
}

impl BreakerConfigError {
    /// The [`BreakerConfig`] field that is wrong.
    pub fn field(&self) -> &'static str {
        match self {
            BreakerConfigError::Window(_) => "window",
            BreakerConfigError::MinimumCalls { .. } => "minimum_calls",
            BreakerConfigError::FailureRateThreshold(_) => "failure_rate",
            BreakerConfigError::SlowCallRateThreshold(_) => "slow_call_rate",
            BreakerConfigError::SlowCallDuration => "slow_call_duration",
            BreakerConfigError::OpenDuration(_) => "open_duration",
            BreakerConfigError::HalfOpenProbes(_) => "half_open_probes",
        }
    }

    /// What the field must be, and what it was, without the field's name:
    /// `"must be > 0 and <= 1, got 0"`.
    pub fn requirement(&self) -> String {
        match self {
            BreakerConfigError::Window(got) => {
                format!("must be between 1 and {MAX_WINDOW}, got {got}")
            }
            BreakerConfigError::MinimumCalls { got, window } => {
                format!("must be between 1 and window ({window}), got {got}")
            }
            BreakerConfigError::FailureRateThreshold(got)
            | BreakerConfigError::SlowCallRateThreshold(got) => {
                format!("must be > 0 and <= 1, got {got}")
            }
            BreakerConfigError::SlowCallDuration => "must be > 0".to_owned(),
            BreakerConfigError::OpenDuration(got) => format!(
                "must be > 0 and at most {} s, got {} s",
                MAX_OPEN_DURATION.as_secs(),
                got.as_secs_f64()
            ),
            BreakerConfigError::HalfOpenProbes(got) => {
                format!("must be between 1 and {MAX_HALF_OPEN_PROBES}, got {got}")
            }
        }
    }
}

impl fmt::Display for BreakerConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for BreakerConfigError {}

impl BreakerConfig {
    /// Checks every field; the error names the first field that is wrong and
    /// why, e.g. `"minimum_calls must be between 1 and window (20), got 30"`.
    /// This is the one check of a breaker's settings: [`Breaker::new`] runs
    /// it, and so does happynet's configuration loader.
    pub fn validate(&self) -> Result<(), BreakerConfigError> {
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(BreakerConfigError::Window(self.window));
        }
        if self.minimum_calls == 0 || self.minimum_calls > self.window {
            return Err(BreakerConfigError::MinimumCalls {
                got: self.minimum_calls,
                window: self.window,
            });
        }
        // `!(x > 0)` rather than `x <= 0` so that NaN is refused too.
        let is_rate = |rate: f64| rate > 0.0 && rate <= 1.0;
        if !is_rate(self.failure_rate) {
            return Err(BreakerConfigError::FailureRateThreshold(self.failure_rate));
        }
        if !is_rate(self.slow_call_rate) {
            return Err(BreakerConfigError::SlowCallRateThreshold(
                self.slow_call_rate,
            ));
        }
        if self.slow_call_duration.is_zero() {
            return Err(BreakerConfigError::SlowCallDuration);
        }
        if self.open_duration.is_zero() || self.open_duration > MAX_OPEN_DURATION {
            return Err(BreakerConfigError::OpenDuration(self.open_duration));
        }
        if self.half_open_probes == 0 || self.half_open_probes > MAX_HALF_OPEN_PROBES {
            return Err(BreakerConfigError::HalfOpenProbes(self.half_open_probes));
        }
        Ok(())
    }

    /// Whether slow calls can open the breaker (see
    /// [`BreakerConfig::slow_call_rate`]).
    fn slow_calls_trip(&self) -> bool {
        self.slow_call_rate < 1.0
    }
}

/// The three states, without their data: for metrics and JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BreakerStateKind {
    /// Calls pass; outcomes are being watched.
    Closed,
    /// Calls are rejected.
    Open,
    /// A few probe calls pass to test the upstream.
    HalfOpen,
}

impl fmt::Display for BreakerStateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerStateKind::Closed => "closed",
            BreakerStateKind::Open => "open",
            BreakerStateKind::HalfOpen => "half-open",
        })
    }
}

/// What [`Breaker::state`] reports: the state a request would find at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// Calls are rejected until `retry_at`.
    Open {
        /// When the next request will half-open the breaker.
        retry_at: Instant,
    },
    /// Probe calls pass (or are all out).
    HalfOpen,
}

impl BreakerState {
    /// The state without its data.
    pub fn kind(&self) -> BreakerStateKind {
        match self {
            BreakerState::Closed => BreakerStateKind::Closed,
            BreakerState::Open { .. } => BreakerStateKind::Open,
            BreakerState::HalfOpen => BreakerStateKind::HalfOpen,
        }
    }
}

/// The proof that a call was admitted, to be handed back with its outcome.
///
/// It is small and `Copy` so that it can travel with a request. It remembers
/// the breaker generation it was issued under, so an outcome that arrives
/// after the breaker changed state is recognised as stale and ignored, and,
/// for a probe, which probe it was, so that a probe reported twice counts
/// once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    /// The probe's serial number within its half-open period; `None` for a
    /// call admitted by the closed state.
    probe: Option<u64>,
}

impl Ticket {
    /// True if the call was admitted as a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

/// How an admitted call ended, as far as the upstream's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The upstream answered well. A success that took at least
    /// `slow_call_duration` counts as slow.
    Success {
        /// How long the call took.
        elapsed: Duration,
    },
    /// The upstream failed (error status, connection error, timeout).
    Failure {
        /// How long the call took.
        elapsed: Duration,
    },
    /// The outcome says nothing about the upstream: the caller was cancelled,
    /// or the error was the caller's own (a bad request). It counts for
    /// nothing, but frees a half-open probe slot for another caller.
    Ignored,
}

/// Why [`Breaker::try_acquire`] refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejected {
    /// When a call may next be admitted. For an open breaker this is exactly
    /// when it will half-open; for a half-open breaker whose probes are all
    /// out it is an estimate, [`HALF_OPEN_RETRY_HINT`] from now.
    pub retry_at: Instant,
}

/// Why the breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransitionReason {
    /// The failure rate in the window reached its threshold.
    FailureRate {
        /// Failures in the window.
        failures: usize,
        /// Outcomes in the window.
        calls: usize,
    },
    /// The slow-call rate in the window reached its threshold.
    SlowCallRate {
        /// Slow calls in the window.
        slow: usize,
        /// Outcomes in the window.
        calls: usize,
    },
    /// `open_duration` passed and a request arrived.
    OpenDurationElapsed,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// A half-open probe failed.
    ProbeFailed,
    /// A half-open probe was slow.
    ProbeSlow,
    /// The probes' verdict did not arrive within `open_duration` of
    /// half-opening: their callers are presumed gone without reporting.
    ProbesLost,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionReason::FailureRate { failures, calls } => {
                write!(f, "{failures} of the last {calls} calls failed")
            }
            TransitionReason::SlowCallRate { slow, calls } => {
                write!(f, "{slow} of the last {calls} calls were slow")
            }
            TransitionReason::OpenDurationElapsed => f.write_str("open duration elapsed"),
            TransitionReason::ProbesSucceeded => f.write_str("every probe succeeded"),
            TransitionReason::ProbeFailed => f.write_str("a probe failed"),
            TransitionReason::ProbeSlow => f.write_str("a probe was slow"),
            TransitionReason::ProbesLost => {
                f.write_str("no verdict from the probes within the open duration")
            }
        }
    }
}

/// One change of state, as recorded by [`Breaker::last_transition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state left.
    pub from: BreakerStateKind,
    /// The state entered.
    pub to: BreakerStateKind,
    /// Why.
    pub reason: TransitionReason,
    /// When.
    pub at: Instant,
}

/// What a breaker has done since it was created, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BreakerCounters {
    /// Calls admitted (probes included).
    pub calls: u64,
    /// Failures reported, stale ones included: they are real failures of the
    /// upstream even when they no longer decide the state.
    pub failures: u64,
    /// Slow outcomes reported (success or failure), stale ones included.
    pub slow_calls: u64,
    /// Calls refused.
    pub rejections: u64,
    /// State changes.
    pub transitions: u64,
    /// Transitions into open. Alerts read its growth, so an open that closed
    /// again between two looks is still seen.
    pub opened: u64,
}

/// One outcome in the closed state's window.
#[derive(Debug, Clone, Copy)]
struct Sample {
    failed: bool,
    slow: bool,
}

/// The closed state's count-based sliding window, with running totals so
/// that judging it costs nothing.
#[derive(Debug)]
struct Window {
    samples: VecDeque<Sample>,
    size: usize,
    failures: usize,
    slow: usize,
}

impl Window {
    fn new(size: usize) -> Self {
        Window {
            samples: VecDeque::with_capacity(size),
            size,
            failures: 0,
            slow: 0,
        }
    }

    fn push(&mut self, sample: Sample) {
        if self.samples.len() == self.size {
            if let Some(old) = self.samples.pop_front() {
                self.failures -= usize::from(old.failed);
                self.slow -= usize::from(old.slow);
            }
        }
        self.failures += usize::from(sample.failed);
        self.slow += usize::from(sample.slow);
        self.samples.push_back(sample);
    }

    fn len(&self) -> usize {
        self.samples.len()
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.failures = 0;
        self.slow = 0;
    }
}

/// The half-open state's bookkeeping.
#[derive(Debug)]
struct Probing {
    /// When the breaker half-opened: the probes' verdict is due by
    /// `since + open_duration`.
    since: Instant,
    /// Serial numbers of the probes admitted and not yet reported. At most
    /// `half_open_probes` long.
    outstanding: Vec<u64>,
    /// Probes that succeeded.
    succeeded: u32,
    /// The serial number of the next probe.
    next_serial: u64,
}

impl Probing {
    /// Probe slots in use: those out plus those that already succeeded.
    fn slots_used(&self) -> usize {
        self.outstanding.len() + self.succeeded as usize
    }

    /// Forgets a probe; false if it was not outstanding (a duplicate report).
    fn settle(&mut self, serial: u64) -> bool {
        match self.outstanding.iter().position(|&s| s == serial) {
            Some(i) => {
                self.outstanding.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen(Probing),
}

impl Phase {
    fn kind(&self) -> BreakerStateKind {
        match self {
            Phase::Closed => BreakerStateKind::Closed,
            Phase::Open { .. } => BreakerStateKind::Open,
            Phase::HalfOpen(_) => BreakerStateKind::HalfOpen,
        }
    }
}

/// The circuit breaker state machine. See the module docs.
///
/// Two choices the module docs leave open:
/// - a caller that never reports its probe's outcome would hold the half-open
///   state forever, so if the probes have reached no verdict `open_duration`
///   after half-opening, the next request reopens the breaker
///   ([`TransitionReason::ProbesLost`]); a probe that reports later is stale;
/// - report each ticket once. A probe reported twice counts once; a closed
///   ticket reported twice counts twice.
#[derive(Debug)]
pub struct Breaker {
    name: String,
    config: BreakerConfig,
    phase: Phase,
    /// Bumped on every transition; stamped on every ticket.
    generation: u64,
    window: Window,
    counters: BreakerCounters,
    last_transition: Option<Transition>,
}

impl Breaker {
    /// A closed breaker named `name` (the name appears in its log lines).
    /// Fails with [`BreakerConfig::validate`]'s error if `config` is
    /// invalid.
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Result<Self, BreakerConfigError> {
        config.validate()?;
        Ok(Breaker {
            name: name.into(),
            window: Window::new(config.window),
            config,
            phase: Phase::Closed,
            generation: 0,
            counters: BreakerCounters::default(),
            last_transition: None,
        })
    }

    /// The name given to [`Breaker::new`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Admits one call at `now`, or says when to come back.
    pub fn try_acquire(&mut self, now: Instant) -> Result<Ticket, Rejected> {
        if let Phase::Open { until } = self.phase {
            if now < until {
                return Err(self.reject(until));
            }
            self.transition(
                Phase::HalfOpen(Probing {
                    since: now,
                    outstanding: Vec::new(),
                    succeeded: 0,
                    next_serial: 0,
                }),
                TransitionReason::OpenDurationElapsed,
                now,
            );
        }
        let generation = self.generation;
        let probes = self.config.half_open_probes as usize;
        let open_duration = self.config.open_duration;
        let ticket = match &mut self.phase {
            Phase::Closed => Ticket {
                generation,
                probe: None,
            },
            Phase::HalfOpen(p) if p.slots_used() < probes => {
                let serial = p.next_serial;
                p.next_serial += 1;
                p.outstanding.push(serial);
                Ticket {
                    generation,
                    probe: Some(serial),
                }
            }
            Phase::HalfOpen(p) => {
                let deadline = p.since + open_duration;
                if now >= deadline {
                    let until = self.open(TransitionReason::ProbesLost, now);
                    return Err(self.reject(until));
                }
                return Err(self.reject((now + HALF_OPEN_RETRY_HINT).min(deadline)));
            }
            // Handled above: an open breaker either rejected or half-opened.
            Phase::Open { until } => {
                let until = *until;
                return Err(self.reject(until));
            }
        };
        self.counters.calls += 1;
        Ok(ticket)
    }

    /// Records how the call admitted with `ticket` ended. Outcomes of calls
    /// admitted before the last state change are counted in the metrics but
    /// do not affect the state.
    pub fn on_outcome(&mut self, ticket: Ticket, outcome: AttemptOutcome, now: Instant) {
        let (failed, elapsed) = match outcome {
            AttemptOutcome::Success { elapsed } => (false, elapsed),
            AttemptOutcome::Failure { elapsed } => (true, elapsed),
            AttemptOutcome::Ignored => {
                if ticket.generation == self.generation {
                    if let (Phase::HalfOpen(p), Some(serial)) = (&mut self.phase, ticket.probe) {
                        p.settle(serial);
                    }
                }
                return;
            }
        };
        let slow = elapsed >= self.config.slow_call_duration;
        self.counters.failures += u64::from(failed);
        self.counters.slow_calls += u64::from(slow);
        if ticket.generation != self.generation {
            return;
        }
        let slow_trips = self.config.slow_calls_trip();
        let probes = self.config.half_open_probes;
        match &mut self.phase {
            Phase::Closed => {
                self.window.push(Sample { failed, slow });
                self.judge_window(now);
            }
            Phase::HalfOpen(p) => {
                let Some(serial) = ticket.probe else { return };
                if !p.settle(serial) {
                    return;
                }
                if failed {
                    self.open(TransitionReason::ProbeFailed, now);
                } else if slow && slow_trips {
                    self.open(TransitionReason::ProbeSlow, now);
                } else {
                    p.succeeded += 1;
                    if p.succeeded >= probes {
                        self.window.clear();
                        self.transition(Phase::Closed, TransitionReason::ProbesSucceeded, now);
                    }
                }
            }
            // No ticket is issued while open, so none can match its generation.
            Phase::Open { .. } => {}
        }
    }

    /// The state a request would find at `now`. An open breaker whose
    /// `open_duration` has passed reports [`BreakerState::HalfOpen`]: the next
    /// request will be a probe.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if now < until => BreakerState::Open { retry_at: until },
            Phase::Open { .. } | Phase::HalfOpen(_) => BreakerState::HalfOpen,
        }
    }

    /// What the breaker has done so far.
    pub fn counters(&self) -> BreakerCounters {
        self.counters
    }

    /// The most recent change of state, if there was one.
    pub fn last_transition(&self) -> Option<Transition> {
        self.last_transition
    }

    fn reject(&mut self, retry_at: Instant) -> Rejected {
        self.counters.rejections += 1;
        Rejected { retry_at }
    }

    /// Closed only: opens the breaker if the window says so.
    fn judge_window(&mut self, now: Instant) {
        let calls = self.window.len();
        if calls < self.config.minimum_calls {
            return;
        }
        let rate = |n: usize| n as f64 / calls as f64;
        if rate(self.window.failures) >= self.config.failure_rate {
            let failures = self.window.failures;
            self.open(TransitionReason::FailureRate { failures, calls }, now);
        } else if self.config.slow_calls_trip()
            && rate(self.window.slow) >= self.config.slow_call_rate
        {
            let slow = self.window.slow;
            self.open(TransitionReason::SlowCallRate { slow, calls }, now);
        }
    }

    /// Opens the breaker for a fresh `open_duration`; returns when it will
    /// half-open.
    fn open(&mut self, reason: TransitionReason, now: Instant) -> Instant {
        let until = now + self.config.open_duration;
        self.transition(Phase::Open { until }, reason, now);
        until
    }

    fn transition(&mut self, to: Phase, reason: TransitionReason, now: Instant) {
        let from = self.phase.kind();
        self.phase = to;
        // A new generation makes every ticket issued so far stale.
        self.generation += 1;
        self.counters.transitions += 1;
        let t = Transition {
            from,
            to: self.phase.kind(),
            reason,
            at: now,
        };
        if t.to == BreakerStateKind::Open {
            self.counters.opened += 1;
            log::warn!(
                "breaker {}: {from} -> open for {:?}: {reason}",
                self.name,
                self.config.open_duration
            );
        } else {
            log::info!("breaker {}: {from} -> {}: {reason}", self.name, t.to);
        }
        self.last_transition = Some(t);
    }
}

/// Refused by an open (or fully probed half-open) breaker: the result of a
/// [`Permit`] that was not granted.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerOpen {
    /// The breaker's name: the upstream it protects.
    pub upstream: String,
    /// How long to wait before asking again (see [`Rejected::retry_at`]).
    pub retry_after: Duration,
}

impl fmt::Display for BreakerOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upstream {}: circuit open, retry after {} ms",
            self.upstream,
            self.retry_after.as_millis()
        )
    }
}

impl std::error::Error for BreakerOpen {}

/// A breaker's state and counters, the result of [`GetBreakerStats`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerStats {
    /// The state a request would find now.
    pub state: BreakerStateKind,
    /// For an open breaker, how long until it lets a probe through.
    /// Serialized as whole milliseconds, under `retry_after_ms`.
    #[serde(rename = "retry_after_ms", serialize_with = "serialize_millis")]
    pub retry_after: Option<Duration>,
    /// Calls admitted.
    pub calls: u64,
    /// Failures reported.
    pub failures: u64,
    /// Calls refused.
    pub rejections: u64,
    /// State changes.
    pub transitions: u64,
    /// Transitions into open (see [`BreakerCounters::opened`]).
    pub opened: u64,
}

fn serialize_millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_millis() as u64)),
        None => s.serialize_none(),
    }
}

/// Sent by a caller before it calls the upstream: may I?
///
/// `Ok(permit)`: go ahead, and report how it went with
/// [`BreakerPermit::report`]. `Err(BreakerOpen)`: do not call; the error says
/// how long to wait.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<BreakerPermit, BreakerOpen>")]
pub struct Permit;

/// An admitted call, as its caller holds it: the result of [`Permit`].
///
/// Report the call's outcome with [`report`](Self::report). A permit
/// dropped unreported — its caller hung up, its deadline fired mid-call, or
/// the answer to [`Permit`] found nobody waiting — reports
/// [`AttemptOutcome::Ignored`] by itself, so a half-open probe slot goes straight
/// back to the next caller instead of being lost until the probes are
/// presumed lost ([`TransitionReason::ProbesLost`]).
#[must_use = "a permit dropped unreported counts as an ignored call"]
pub struct BreakerPermit {
    ticket: Ticket,
    /// Where the outcome goes; `None` once reported.
    breaker: Option<Recipient<ReportOutcome>>,
}

impl BreakerPermit {
    /// The ticket the breaker issued.
    pub fn ticket(&self) -> Ticket {
        self.ticket
    }

    /// Reports how the admitted call went. `do_send`: there is nothing to
    /// wait for, and the messages in flight are bounded by the permits
    /// granted.
    pub fn report(mut self, outcome: AttemptOutcome) {
        if let Some(breaker) = self.breaker.take() {
            breaker.do_send(ReportOutcome {
                ticket: self.ticket,
                outcome,
            });
        }
    }
}

impl fmt::Debug for BreakerPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("ticket", &self.ticket)
            .field("reported", &self.breaker.is_none())
            .finish()
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if let Some(breaker) = self.breaker.take() {
            breaker.do_send(ReportOutcome {
                ticket: self.ticket,
                outcome: AttemptOutcome::Ignored,
            });
        }
    }
}

/// How an admitted call ended, reported once per ticket — by
/// [`BreakerPermit`], which is the usual way, or by a caller holding a bare
/// [`Ticket`]. There is nothing to wait for, so `do_send` is the right send:
/// the number in flight is bounded by the permits granted.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct ReportOutcome {
    /// The ticket the permit returned.
    pub ticket: Ticket,
    /// How the call went.
    pub outcome: AttemptOutcome,
}

/// Sent by metrics and status endpoints; the result is a
/// [`BreakerStats`] as of now.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "BreakerStats")]
pub struct GetBreakerStats;

/// The actor shell around one upstream's [`Breaker`].
///
/// It reads `tokio::time::Instant` (converted to std), so tests that pause
/// tokio time drive it exactly. It has no timers: the breaker moves from open
/// to half-open on the first [`Permit`] after its open duration.
#[derive(Debug)]
pub struct BreakerActor {
    breaker: Breaker,
}

impl BreakerActor {
    /// A closed breaker for `upstream`. Fails with
    /// [`BreakerConfig::validate`]'s error if `config` is invalid.
    pub fn new(
        upstream: impl Into<String>,
        config: BreakerConfig,
    ) -> Result<Self, BreakerConfigError> {
        Ok(BreakerActor {
            breaker: Breaker::new(upstream, config)?,
        })
    }

    /// The upstream this breaker protects.
    pub fn name(&self) -> &str {
        self.breaker.name()
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Actor for BreakerActor {
    type Context = Context<Self>;
}

impl Handler<Permit> for BreakerActor {
    type Result = Result<BreakerPermit, BreakerOpen>;

    fn handle(&mut self, _: Permit, ctx: &mut Self::Context) -> Self::Result {
        let now = now();
        match self.breaker.try_acquire(now) {
            Ok(ticket) => Ok(BreakerPermit {
                ticket,
                breaker: Some(ctx.address().recipient()),
            }),
            Err(rejected) => Err(BreakerOpen {
                upstream: self.breaker.name().to_owned(),
                retry_after: rejected.retry_at.saturating_duration_since(now),
            }),
        }
    }
}

impl Handler<ReportOutcome> for BreakerActor {
    type Result = ();

    fn handle(&mut self, msg: ReportOutcome, _: &mut Self::Context) {
        self.breaker.on_outcome(msg.ticket, msg.outcome, now());
    }
}

impl Handler<GetBreakerStats> for BreakerActor {
    type Result = MessageResult<GetBreakerStats>;

    fn handle(&mut self, _: GetBreakerStats, _: &mut Self::Context) -> Self::Result {
        let now = now();
        let state = self.breaker.state(now);
        let counters = self.breaker.counters();
        MessageResult(BreakerStats {
            state: state.kind(),
            retry_after: match state {
                BreakerState::Open { retry_at } => Some(retry_at.saturating_duration_since(now)),
                _ => None,
            },
            calls: counters.calls,
            failures: counters.failures,
            rejections: counters.rejections,
            transitions: counters.transitions,
            opened: counters.opened,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const FAST: Duration = Duration::from_millis(10);

    fn ok() -> AttemptOutcome {
        AttemptOutcome::Success { elapsed: FAST }
    }

    fn fail() -> AttemptOutcome {
        AttemptOutcome::Failure { elapsed: FAST }
    }

    /// Window 10, minimum 5, failure threshold 0.5, open 30 s, 3 probes.
    fn config() -> BreakerConfig {
        BreakerConfig {
            window: 10,
            minimum_calls: 5,
            failure_rate: 0.5,
            slow_call_rate: 1.0,
            slow_call_duration: ms(1000),
            open_duration: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }

    fn breaker(config: BreakerConfig) -> Breaker {
        Breaker::new("test", config).unwrap()
    }

    /// Admits a call and reports `outcome` for it, at `now`.
    fn call(b: &mut Breaker, outcome: AttemptOutcome, now: Instant) {
        let t = b.try_acquire(now).expect("admitted");
        b.on_outcome(t, outcome, now);
    }

    /// Opens `b` (config()) with failures at `now`.
    fn trip(b: &mut Breaker, now: Instant) {
        for _ in 0..b.config.minimum_calls {
            call(b, fail(), now);
        }
        assert_eq!(b.state(now).kind(), BreakerStateKind::Open);
    }

    #[test]
    fn the_defaults_are_valid_and_as_documented() {
        let c = BreakerConfig::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.window, 20);
        assert_eq!(c.minimum_calls, 10);
        assert_eq!(c.half_open_probes, 3);
        assert!(!c.slow_calls_trip());
    }

    #[test]
    fn validate_names_the_wrong_field() {
        type Spoil = fn(&mut BreakerConfig);
        let bad: [(&str, Spoil); 12] = [
            ("window", |c| c.window = 0),
            ("window", |c| c.window = MAX_WINDOW + 1),
            ("minimum_calls", |c| c.minimum_calls = 0),
            ("minimum_calls", |c| c.minimum_calls = 21),
            ("failure_rate", |c| c.failure_rate = 0.0),
            ("failure_rate", |c| c.failure_rate = f64::NAN),
            ("slow_call_rate", |c| c.slow_call_rate = 1.5),
            ("slow_call_duration", |c| {
                c.slow_call_duration = Duration::ZERO
            }),
            ("open_duration", |c| c.open_duration = Duration::ZERO),
            ("open_duration", |c| {
                c.open_duration = MAX_OPEN_DURATION + Duration::from_secs(1)
            }),
            ("half_open_probes", |c| c.half_open_probes = 0),
            ("half_open_probes", |c| {
                c.half_open_probes = MAX_HALF_OPEN_PROBES + 1
            }),
        ];
        for (field, spoil) in bad {
            let mut c = BreakerConfig::default();
            spoil(&mut c);
            let err = c.validate().unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().starts_with(field), "{field}: {err}");
            // By text: a NaN in the error is not equal to itself.
            let from_new = Breaker::new("x", c).err().map(|e| e.to_string());
            assert_eq!(from_new, Some(err.to_string()));
        }
    }

    #[test]
    fn closed_does_not_open_before_minimum_calls() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        for i in 0..4 {
            call(&mut b, fail(), t0 + ms(i));
            assert_eq!(b.state(t0).kind(), BreakerStateKind::Closed, "call {i}");
        }
        // The fifth failure reaches minimum_calls at a 100 % failure rate.
        call(&mut b, fail(), t0 + ms(5));
        assert_eq!(
            b.state(t0 + ms(5)),
            BreakerState::Open {
                retry_at: t0 + ms(5) + Duration::from_secs(30)
            }
        );
        let t = b.last_transition().unwrap();
        assert_eq!(t.from, BreakerStateKind::Closed);
        assert_eq!(t.to, BreakerStateKind::Open);
        assert_eq!(
            t.reason,
            TransitionReason::FailureRate {
                failures: 5,
                calls: 5
            }
        );
        assert_eq!(t.at, t0 + ms(5));
    }

    #[test]
    fn closed_opens_exactly_at_the_failure_rate_threshold() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        // 6 successes then 4 failures: 4/10 < 0.5, stays closed.
        for _ in 0..6 {
            call(&mut b, ok(), t0);
        }
        for _ in 0..4 {
            call(&mut b, fail(), t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        // One more failure pushes out a success: 5/10 = 0.5 opens.
        call(&mut b, fail(), t0);
        assert_eq!(b.state(t0).kind(), BreakerStateKind::Open);
        assert_eq!(b.counters().failures, 5);
        assert_eq!(b.counters().calls, 11);
        assert_eq!(b.counters().transitions, 1);
        assert_eq!(b.counters().opened, 1);
    }

    #[test]
    fn the_window_slides_old_outcomes_out() {
        let t0 = Instant::now();
        let mut b = breaker(BreakerConfig {
            minimum_calls: 10,
            ..config()
        });
        for _ in 0..4 {
            call(&mut b, fail(), t0);
        }
        // Ten successes push all four failures out of the 10-call window.
        for _ in 0..10 {
            call(&mut b, ok(), t0);
        }
        assert_eq!(b.window.failures, 0);
        assert_eq!(b.window.len(), 10);
        // Four fresh failures are 4/10: closed. Had the old ones stayed,
        // 8 failures would be counted.
        for _ in 0..4 {
            call(&mut b, fail(), t0);
        }
        assert_eq!(b.window.failures, 4);
        assert_eq!(b.state(t0), BreakerState::Closed);
        // The fifth makes 5/10 within the window: open.
        call(&mut b, fail(), t0);
        assert_eq!(b.state(t0).kind(), BreakerStateKind::Open);
    }

    #[test]
    fn slow_calls_open_the_breaker_when_enabled() {
        let t0 = Instant::now();
        let slow = AttemptOutcome::Success { elapsed: ms(1000) };
        let mut b = breaker(BreakerConfig {
            slow_call_rate: 0.6,
            ..config()
        });
        // 2 fast, then slow ones: 3/5 = 0.6 at the fifth call.
        call(&mut b, ok(), t0);
        call(&mut b, ok(), t0);
        call(&mut b, slow, t0);
        call(&mut b, slow, t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        call(&mut b, slow, t0);
        assert_eq!(b.state(t0).kind(), BreakerStateKind::Open);
        assert_eq!(
            b.last_transition().unwrap().reason,
            TransitionReason::SlowCallRate { slow: 3, calls: 5 }
        );
        assert_eq!(b.counters().slow_calls, 3);
        assert_eq!(b.counters().failures, 0);
    }

    #[test]
    fn slow_calls_do_not_trip_by_default() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        for _ in 0..50 {
            call(&mut b, AttemptOutcome::Success { elapsed: ms(5000) }, t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        assert_eq!(b.counters().slow_calls, 50);
    }

    #[test]
    fn open_rejects_until_its_duration_has_passed_then_half_opens() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        trip(&mut b, t0);
        let until = t0 + Duration::from_secs(30);
        for at in [t0, t0 + ms(1), until - ms(1)] {
            assert_eq!(b.try_acquire(at), Err(Rejected { retry_at: until }));
        }
        assert_eq!(b.counters().rejections, 3);
        // Time is up but nobody asked: still open internally, reported as
        // half-open because that is what the next request finds.
        assert_eq!(b.state(until), BreakerState::HalfOpen);
        assert_eq!(b.counters().transitions, 1);
        // The first request half-opens it and is a probe.
        let t = b.try_acquire(until).unwrap();
        assert!(t.is_probe());
        assert_eq!(b.counters().transitions, 2);
        let tr = b.last_transition().unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.reason),
            (
                BreakerStateKind::Open,
                BreakerStateKind::HalfOpen,
                TransitionReason::OpenDurationElapsed
            )
        );
    }

    #[test]
    fn half_open_admits_exactly_the_probes_and_closes_when_all_succeed() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        trip(&mut b, t0);
        let t1 = t0 + Duration::from_secs(30);
        let probes: Vec<Ticket> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        assert!(probes.iter().all(Ticket::is_probe));
        for _ in 0..10 {
            assert_eq!(
                b.try_acquire(t1 + ms(5)),
                Err(Rejected {
                    retry_at: t1 + ms(5) + HALF_OPEN_RETRY_HINT
                })
            );
        }
        b.on_outcome(probes[0], ok(), t1 + ms(10));
        b.on_outcome(probes[1], ok(), t1 + ms(10));
        // Two of three succeeded; the third is still out: keep rejecting.
        assert!(b.try_acquire(t1 + ms(11)).is_err());
        assert_eq!(b.state(t1 + ms(11)), BreakerState::HalfOpen);
        b.on_outcome(probes[2], ok(), t1 + ms(12));
        assert_eq!(b.state(t1 + ms(12)), BreakerState::Closed);
        let tr = b.last_transition().unwrap();
        assert_eq!(tr.reason, TransitionReason::ProbesSucceeded);
        assert_eq!(tr.to, BreakerStateKind::Closed);
        // The window starts empty: four failures are below minimum_calls.
        assert_eq!(b.window.len(), 0);
        let c = b.try_acquire(t1 + ms(13)).unwrap();
        assert!(!c.is_probe());
        b.on_outcome(c, fail(), t1 + ms(13));
        for _ in 0..3 {
            call(&mut b, fail(), t1 + ms(13));
        }
        assert_eq!(b.state(t1 + ms(13)), BreakerState::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_fresh_duration() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        trip(&mut b, t0);
        let t1 = t0 + Duration::from_secs(30);
        let p1 = b.try_acquire(t1).unwrap();
        let p2 = b.try_acquire(t1).unwrap();
        b.on_outcome(p1, ok(), t1 + ms(1));
        b.on_outcome(p2, fail(), t1 + ms(2));
        let reopened = t1 + ms(2) + Duration::from_secs(30);
        assert_eq!(
            b.state(t1 + ms(2)),
            BreakerState::Open { retry_at: reopened }
        );
        assert_eq!(
            b.last_transition().unwrap().reason,
            TransitionReason::ProbeFailed
        );
        // Both openings count, the half-open in between does not.
        assert_eq!(b.counters().opened, 2);
        assert_eq!(b.counters().transitions, 3);
        assert_eq!(
            b.try_acquire(t1 + ms(3)),
            Err(Rejected { retry_at: reopened })
        );
        // And it half-opens again after that.
        assert!(b.try_acquire(reopened).unwrap().is_probe());
    }

    #[test]
    fn a_slow_probe_reopens_when_slow_calls_trip() {
        let t0 = Instant::now();
        let mut b = breaker(BreakerConfig {
            slow_call_rate: 0.5,
            ..config()
        });
        trip(&mut b, t0);
        let t1 = t0 + Duration::from_secs(30);
        let p = b.try_acquire(t1).unwrap();
        b.on_outcome(
            p,
            AttemptOutcome::Success { elapsed: ms(1000) },
            t1 + ms(1000),
        );
        assert_eq!(b.state(t1 + ms(1000)).kind(), BreakerStateKind::Open);
        assert_eq!(
            b.last_transition().unwrap().reason,
            TransitionReason::ProbeSlow
        );

        // With slow-call tripping off, a slow probe is a success.
        let mut b = breaker(config());
        trip(&mut b, t0);
        for _ in 0..3 {
            let p = b.try_acquire(t1).unwrap();
            b.on_outcome(
                p,
                AttemptOutcome::Success { elapsed: ms(9000) },
                t1 + ms(9000),
            );
        }
        assert_eq!(b.state(t1 + ms(9000)), BreakerState::Closed);
    }

    #[test]
    fn stale_tickets_change_nothing() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        // A slow call admitted while closed...
        let old = b.try_acquire(t0).unwrap();
        trip(&mut b, t0);
        let t1 = t0 + Duration::from_secs(30);
        let probes: Vec<Ticket> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        // ...fails after the breaker reopened and half-opened: ignored.
        b.on_outcome(old, fail(), t1 + ms(1));
        assert_eq!(b.state(t1 + ms(1)), BreakerState::HalfOpen);
        // It is still counted as a failure of the upstream.
        assert_eq!(b.counters().failures, 6);
        // An old "Ignored" frees no probe slot either.
        b.on_outcome(old, AttemptOutcome::Ignored, t1 + ms(1));
        assert!(b.try_acquire(t1 + ms(1)).is_err());
        for p in &probes {
            b.on_outcome(*p, ok(), t1 + ms(2));
        }
        assert_eq!(b.state(t1 + ms(2)), BreakerState::Closed);
        // Probes of the finished half-open period are stale in the closed
        // state: they fill no window slot.
        b.on_outcome(probes[0], fail(), t1 + ms(3));
        assert_eq!(b.window.len(), 0);
    }

    #[test]
    fn ignored_frees_a_probe_slot_without_counting() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        trip(&mut b, t0);
        let t1 = t0 + Duration::from_secs(30);
        let probes: Vec<Ticket> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        assert!(b.try_acquire(t1).is_err());
        b.on_outcome(probes[0], AttemptOutcome::Ignored, t1);
        // One slot is free again: exactly one more probe passes.
        let extra = b.try_acquire(t1).unwrap();
        assert!(extra.is_probe());
        assert!(b.try_acquire(t1).is_err());
        // The ignored probe did not count as a success: three real ones are
        // needed to close.
        b.on_outcome(probes[1], ok(), t1);
        b.on_outcome(probes[2], ok(), t1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        b.on_outcome(extra, ok(), t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    #[test]
    fn a_probe_reported_twice_counts_once() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        trip(&mut b, t0);
        let t1 = t0 + Duration::from_secs(30);
        let probes: Vec<Ticket> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        for _ in 0..3 {
            b.on_outcome(probes[0], ok(), t1);
        }
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        // An Ignored after its success must not free a slot either.
        b.on_outcome(probes[0], AttemptOutcome::Ignored, t1);
        assert!(b.try_acquire(t1).is_err());
        b.on_outcome(probes[1], ok(), t1);
        b.on_outcome(probes[2], ok(), t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    #[test]
    fn lost_probes_reopen_the_breaker_after_the_open_duration() {
        let t0 = Instant::now();
        let mut b = breaker(config());
        trip(&mut b, t0);
        let t1 = t0 + Duration::from_secs(30);
        let probes: Vec<Ticket> = (0..3).map(|_| b.try_acquire(t1).unwrap()).collect();
        // Near the deadline the retry hint stops at the deadline.
        let deadline = t1 + Duration::from_secs(30);
        assert_eq!(
            b.try_acquire(deadline - ms(100)),
            Err(Rejected { retry_at: deadline })
        );
        // Nobody reported: at the deadline the next request reopens it.
        assert_eq!(
            b.try_acquire(deadline),
            Err(Rejected {
                retry_at: deadline + Duration::from_secs(30)
            })
        );
        assert_eq!(
            b.last_transition().unwrap().reason,
            TransitionReason::ProbesLost
        );
        // A late report is stale.
        b.on_outcome(probes[0], ok(), deadline + ms(1));
        assert_eq!(b.state(deadline + ms(1)).kind(), BreakerStateKind::Open);
    }

    #[test]
    fn every_transition_is_counted_and_recorded() {
        let t0 = Instant::now();
        let mut b = breaker(BreakerConfig {
            half_open_probes: 1,
            ..config()
        });
        assert_eq!(b.last_transition(), None);
        trip(&mut b, t0); // closed -> open
        let t1 = t0 + Duration::from_secs(30);
        let p = b.try_acquire(t1).unwrap(); // open -> half-open
        b.on_outcome(p, fail(), t1); // half-open -> open
        let t2 = t1 + Duration::from_secs(30);
        let p = b.try_acquire(t2).unwrap(); // open -> half-open
        b.on_outcome(p, ok(), t2); // half-open -> closed
        assert_eq!(b.counters().transitions, 5);
        assert_eq!(b.generation, 5);
        let last = b.last_transition().unwrap();
        assert_eq!(
            (last.from, last.to, last.at),
            (BreakerStateKind::HalfOpen, BreakerStateKind::Closed, t2)
        );
    }

    /// Property: under any interleaving of requests, outcomes and clock
    /// steps, a half-open period never has more than `half_open_probes`
    /// probe slots in use (admitted, minus those reported `Ignored`), and it
    /// closes only after that many probes of its own succeeded. A tiny
    /// deterministic generator stands in for a property-testing crate.
    #[test]
    fn half_open_never_admits_more_than_its_probes() {
        // The crate's own xorshift64* (Jitter), seeded: deterministic cases.
        let mut rng = crate::backoff::Jitter::with_seed(0x2545_F491_4F6C_DD1D);
        let mut next = move || rng.next_u64();
        let mut closes = 0;
        for case in 0..300 {
            let probes = 1 + (next() % 6) as u32;
            let mut b = breaker(BreakerConfig {
                window: 8,
                minimum_calls: 4,
                half_open_probes: probes,
                open_duration: ms(50),
                ..config()
            });
            let t0 = Instant::now();
            let mut now = t0;
            let mut out: Vec<Ticket> = Vec::new();
            // Per generation: probe slots in use and probe successes.
            let mut used: std::collections::HashMap<u64, (i64, u32)> = Default::default();
            for step in 0..2000 {
                match next() % 10 {
                    0..=3 => {
                        if let Ok(t) = b.try_acquire(now) {
                            if t.is_probe() {
                                let e = used.entry(t.generation).or_default();
                                e.0 += 1;
                                assert!(
                                    e.0 <= i64::from(probes),
                                    "case {case} step {step}: {} probes out of {probes}",
                                    e.0
                                );
                            }
                            out.push(t);
                        }
                    }
                    4..=8 if !out.is_empty() => {
                        let t = out.swap_remove((next() % out.len() as u64) as usize);
                        let outcome = match next() % 4 {
                            0 => fail(),
                            1 => AttemptOutcome::Ignored,
                            _ => ok(),
                        };
                        let before = b.generation;
                        let was_half_open = b.phase.kind() == BreakerStateKind::HalfOpen;
                        b.on_outcome(t, outcome, now);
                        if t.is_probe() && t.generation == before {
                            let e = used.entry(t.generation).or_default();
                            match outcome {
                                AttemptOutcome::Ignored => e.0 -= 1,
                                AttemptOutcome::Success { .. } => e.1 += 1,
                                AttemptOutcome::Failure { .. } => {}
                            }
                        }
                        if was_half_open && b.phase.kind() == BreakerStateKind::Closed {
                            closes += 1;
                            assert_eq!(used[&before].1, probes, "case {case} step {step}");
                        }
                    }
                    _ => now += ms(next() % 20),
                }
            }
        }
        // The walk must actually have exercised half-open closing.
        assert!(closes > 100, "only {closes} closes");
    }
}
