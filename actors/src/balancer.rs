//! Endpoint selection for one upstream, with passive outlier ejection, as a
//! plain state machine.
//!
//! An upstream may have several endpoints (base URLs). [`Balancer`] chooses
//! one for each call, either in turn ([`Strategy::RoundRobin`]) or by the
//! power of two choices on a peak-sensitive latency estimate
//! ([`Strategy::PeakEwma`], after Finagle and tower). It also watches
//! outcomes: an endpoint that fails too many calls in a row is taken out of
//! rotation for a while ("passive outlier ejection", as in Envoy), for longer
//! each time, and comes back on its own. It never ejects the last healthy
//! endpoint: a degraded answer is better than none.
//!
//! Like the other state machines it reads no clock and does no I/O: every call
//! takes `now`, and randomness comes from the caller's [`Jitter`]. The
//! `PoolActor` owns one balancer per upstream and reports each call's start
//! and end to it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backoff::{Backoff, Jitter};

/// How quickly [`PeakEwma`] forgets, by default: after 10 s an old estimate
/// keeps `1/e` (37 %) of its weight. Long enough to ride out one fast reply
/// from a slow endpoint, short enough to follow a real change within a minute.
pub const DEFAULT_TAU: Duration = Duration::from_secs(10);

/// The latency assumed for an endpoint that has not answered yet.
///
/// 100 ms is a typical round trip to a remote HTTP API, which is what
/// happynet's upstreams are. Zero would be wrong: an unmeasured endpoint
/// would win every comparison and take a burst of calls before its first
/// answer came back. Something huge would be wrong too: it would get no
/// traffic until idle decay caught up. The first real sample replaces this
/// value outright, so it only matters until then.
pub const DEFAULT_START_LATENCY: Duration = Duration::from_millis(100);

/// Consecutive failures that eject an endpoint, by default.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;

/// The first ejection's length, by default.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);

/// The longest ejection, by default.
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

/// A latency estimator that jumps up to every peak and decays slowly down.
///
/// A sample larger than the estimate replaces it at once, so one slow
/// response immediately makes an endpoint less attractive. A smaller sample
/// moves the estimate toward it by an exponentially weighted average whose
/// weight depends on the *time* since the last sample, not the number of
/// samples: `estimate' = estimate × w + sample × (1 − w)` with
/// `w = exp(−elapsed / tau)`. While no sample arrives the estimate decays
/// toward zero with the same `w`, so an endpoint that was once slow and then
/// got no traffic is eventually tried again (and, if it is still slow, its
/// next sample pushes it straight back up).
#[derive(Debug, Clone, PartialEq)]
pub struct PeakEwma {
    /// The estimate at `stamp`, in seconds.
    estimate: f64,
    /// When the estimate was last updated; `None` until the first sample,
    /// while `estimate` is only the starting guess (which does not decay).
    stamp: Option<Instant>,
    tau: Duration,
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new(DEFAULT_TAU, DEFAULT_START_LATENCY)
    }
}

impl PeakEwma {
    /// An estimator that forgets with time constant `tau` and assumes
    /// `start` until the first sample. A zero `tau` keeps no memory: the
    /// estimate is the latest sample, and drops to zero as soon as time
    /// passes without another.
    pub fn new(tau: Duration, start: Duration) -> Self {
        PeakEwma {
            estimate: start.as_secs_f64(),
            stamp: None,
            tau,
        }
    }

    /// The weight the estimate at `stamp` still has at `now`.
    fn weight(&self, now: Instant) -> f64 {
        let Some(stamp) = self.stamp else {
            return 1.0;
        };
        let elapsed = now.saturating_duration_since(stamp);
        if self.tau.is_zero() {
            return if elapsed.is_zero() { 1.0 } else { 0.0 };
        }
        (-elapsed.as_secs_f64() / self.tau.as_secs_f64()).exp()
    }

    /// Records a latency `sample` observed at `now`.
    pub fn observe(&mut self, sample: Duration, now: Instant) {
        let sample = sample.as_secs_f64();
        self.estimate = if self.stamp.is_none() || sample > self.estimate {
            // The first sample is the first real information; a larger one
            // is a peak, believed at once.
            sample
        } else {
            let w = self.weight(now);
            self.estimate * w + sample * (1.0 - w)
        };
        // A `now` older than the stamp must not move the stamp back.
        self.stamp = Some(self.stamp.map_or(now, |s| s.max(now)));
    }

    /// The estimate at `now`, including its decay since the last sample.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::try_from_secs_f64(self.estimate * self.weight(now)).unwrap_or(Duration::MAX)
    }

    /// The cost of sending one more call at `now` to an endpoint with
    /// `in_flight` calls running: `estimate × (in_flight + 1)`, in seconds.
    /// Lower is better. The load factor makes a fast but busy endpoint lose
    /// to a slightly slower idle one.
    pub fn cost(&self, in_flight: usize, now: Instant) -> f64 {
        self.estimate * self.weight(now) * (in_flight as f64 + 1.0)
    }
}

/// How a [`Balancer`] chooses among healthy endpoints. In configuration:
/// `"round_robin"` or `"peak_ewma"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each healthy endpoint in turn. Predictable; blind to latency and load.
    RoundRobin,
    /// The power of two choices: pick two distinct healthy endpoints at
    /// random and take the one with the lower [`PeakEwma::cost`]. It steers
    /// traffic away from slow or busy endpoints without the herd behaviour of
    /// always choosing the single best one. The default.
    #[default]
    PeakEwma,
}

/// When endpoints are ejected for failing, and for how long. Checked by
/// [`EjectionConfig::validate`] (the pool's [`PoolConfig::validate`](crate::pool::PoolConfig::validate)
/// runs it), the one judge of these settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EjectionConfig {
    /// Failures in a row that eject an endpoint, at least 1. Default
    /// [`DEFAULT_CONSECUTIVE_FAILURES`].
    pub consecutive_failures: u32,
    /// The first ejection's length, above zero; each further one doubles
    /// it. Default [`DEFAULT_BASE_EJECTION`].
    pub base_ejection: Duration,
    /// The longest ejection. Default [`DEFAULT_MAX_EJECTION`]. It is also how
    /// long an endpoint must stay in rotation, after an ejection ends, for its
    /// next ejection to start again from `base_ejection`.
    pub max_ejection: Duration,
}

/// Why [`EjectionConfig::validate`] refused a configuration: the first
/// field that is wrong. [`EjectionConfigError::field`] names the field, so
/// that a configuration file can report the error under its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EjectionConfigError {
    /// `consecutive_failures` is 0: there is no such thing as ejecting
    /// before the first failure.
    ConsecutiveFailures,
    /// `base_ejection` is zero: the ejection would end as it began.
    BaseEjection,
    /// `max_ejection` is shorter than `base_ejection`.
    MaxEjection,
}

impl EjectionConfigError {
    /// The [`EjectionConfig`] field that is wrong.
    pub fn field(&self) -> &'static str {
        match self {
            EjectionConfigError::ConsecutiveFailures => "consecutive_failures",
            EjectionConfigError::BaseEjection => "base_ejection",
            EjectionConfigError::MaxEjection => "max_ejection",
        }
    }

    /// What the field must be, without the field's name.
    pub fn requirement(&self) -> String {
        match self {
            EjectionConfigError::ConsecutiveFailures => "must be >= 1",
            EjectionConfigError::BaseEjection => "must be > 0",
            EjectionConfigError::MaxEjection => "must be >= base_ejection",
        }
        .to_owned()
    }
}

impl std::fmt::Display for EjectionConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for EjectionConfigError {}

impl EjectionConfig {
    /// Checks every field; the error names the first that is wrong.
    pub fn validate(&self) -> Result<(), EjectionConfigError> {
        if self.consecutive_failures == 0 {
            return Err(EjectionConfigError::ConsecutiveFailures);
        }
        if self.base_ejection.is_zero() {
            return Err(EjectionConfigError::BaseEjection);
        }
        if self.max_ejection < self.base_ejection {
            return Err(EjectionConfigError::MaxEjection);
        }
        Ok(())
    }
}

impl Default for EjectionConfig {
    fn default() -> Self {
        EjectionConfig {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
        }
    }
}

/// What the balancer knows about one endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    in_flight: usize,
    ewma: PeakEwma,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    /// When the latest ejection ended (or will end).
    last_ejection_end: Option<Instant>,
    /// How many times the next ejection's length doubles `base_ejection`.
    level: u32,
    ejections: u64,
}

impl Endpoint {
    fn new() -> Self {
        Endpoint {
            in_flight: 0,
            ewma: PeakEwma::default(),
            consecutive_failures: 0,
            ejected_until: None,
            last_ejection_end: None,
            level: 0,
            ejections: 0,
        }
    }

    /// Calls started and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The latency estimate.
    pub fn ewma(&self) -> &PeakEwma {
        &self.ewma
    }

    /// Failures since the last success (or return from ejection).
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Until when the endpoint is out of rotation, if it is (or was, and
    /// nothing has happened since its time ran out: use
    /// [`is_ejected`](Self::is_ejected) for the state at a given time).
    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    /// True if the endpoint is out of rotation at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| until > now)
    }

    /// How many times this endpoint has been ejected.
    pub fn ejections(&self) -> u64 {
        self.ejections
    }
}

/// Chooses endpoints for one upstream and ejects the failing ones. See the
/// module documentation.
///
/// The caller reports each call: [`pick`](Self::pick) an endpoint,
/// [`on_start`](Self::on_start) when the call is actually sent (it may still
/// be refused before that, by a breaker or a closed pool), and
/// [`on_end`](Self::on_end) with its latency and outcome. Indices are
/// positions in the endpoint list given to the pool; an index out of range is
/// ignored.
#[derive(Debug, Clone)]
pub struct Balancer {
    endpoints: Vec<Endpoint>,
    strategy: Strategy,
    ejection: EjectionConfig,
    /// Where round-robin looks first next time.
    cursor: usize,
    ejections: u64,
    suppressed: u64,
}

impl Balancer {
    /// A balancer over `n_endpoints` endpoints, all healthy and unmeasured.
    pub fn new(n_endpoints: usize, strategy: Strategy, ejection: EjectionConfig) -> Self {
        Balancer {
            endpoints: (0..n_endpoints).map(|_| Endpoint::new()).collect(),
            strategy,
            ejection,
            cursor: 0,
            ejections: 0,
            suppressed: 0,
        }
    }

    /// Chooses the endpoint for the next call at `now`. `None` only when
    /// there are no endpoints at all.
    pub fn pick(&mut self, now: Instant, jitter: &mut Jitter) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        self.reinstate(now);
        let healthy = self.healthy_count(now);
        // Never-eject-the-last keeps at least one endpoint healthy; should
        // that ever fail, every endpoint is a candidate rather than none.
        let every = healthy == 0;
        let candidates = if every { n } else { healthy };
        let eligible = |e: &Endpoint| every || !e.is_ejected(now);
        match self.strategy {
            Strategy::RoundRobin => {
                let idx = (0..n)
                    .map(|k| (self.cursor + k) % n)
                    .find(|&i| eligible(&self.endpoints[i]))?;
                self.cursor = (idx + 1) % n;
                Some(idx)
            }
            Strategy::PeakEwma => {
                let nth = |k: usize| {
                    self.endpoints
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| eligible(e))
                        .nth(k)
                        .map(|(i, _)| i)
                };
                if candidates == 1 {
                    return nth(0);
                }
                let a = jitter.below(candidates);
                // A second draw over the others, shifted past `a`: distinct
                // and uniform without retrying.
                let mut b = jitter.below(candidates - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a)?, nth(b)?);
                let cost = |i: usize| {
                    let e = &self.endpoints[i];
                    e.ewma.cost(e.in_flight, now)
                };
                Some(if cost(b) < cost(a) { b } else { a })
            }
        }
    }

    /// Records that a call to endpoint `idx` has been sent.
    pub fn on_start(&mut self, idx: usize) {
        if let Some(e) = self.endpoints.get_mut(idx) {
            e.in_flight = e.in_flight.saturating_add(1);
        }
    }

    /// Records that a call to endpoint `idx` ended at `now` after `latency`,
    /// and whether the endpoint did its job (`success`; a 4xx answer is the
    /// caller's fault and counts as a success here).
    ///
    /// A failure only ever *raises* the latency estimate: an endpoint that
    /// fails fast (connection refused in a millisecond) must not look like
    /// the fastest one and attract more calls. After
    /// [`EjectionConfig::consecutive_failures`] failures in a row the endpoint
    /// is ejected, unless it is the last healthy one (then the ejection is
    /// only counted, see [`suppressed_ejections`](Self::suppressed_ejections)).
    pub fn on_end(&mut self, idx: usize, now: Instant, latency: Duration, success: bool) {
        self.reinstate(now);
        // `validate` refuses 0; were an unchecked 0 given, every failure
        // would eject, as with 1.
        let threshold = self.ejection.consecutive_failures;
        let healthy = self.healthy_count(now);
        let ejection = self.ejection;
        let Some(e) = self.endpoints.get_mut(idx) else {
            return;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        if success {
            e.ewma.observe(latency, now);
            e.consecutive_failures = 0;
            return;
        }
        if latency > e.ewma.estimate(now) {
            e.ewma.observe(latency, now);
        }
        e.consecutive_failures = e.consecutive_failures.saturating_add(1);
        // Failures of calls that were in flight when the endpoint was ejected
        // arrive later; they neither extend nor repeat the ejection.
        if e.consecutive_failures < threshold || e.is_ejected(now) {
            return;
        }
        if healthy <= 1 {
            // Ejecting it would leave nothing to send to. The failure count is
            // kept, so it is ejected on its next failure once another endpoint
            // is back.
            self.suppressed += 1;
            return;
        }
        // A stay in rotation as long as the longest ejection earns a fresh
        // start: an incident long past should not lengthen today's ejection.
        if e.last_ejection_end
            .is_some_and(|end| now.saturating_duration_since(end) >= ejection.max_ejection)
        {
            e.level = 0;
        }
        let length = Backoff {
            base: ejection.base_ejection,
            max: ejection.max_ejection,
        }
        .ceiling(e.level);
        // Only an ejection of centuries could overflow `Instant`; that endpoint
        // simply stays in rotation.
        let Some(until) = now.checked_add(length) else {
            return;
        };
        e.ejected_until = Some(until);
        e.last_ejection_end = Some(until);
        e.level = e.level.saturating_add(1);
        e.ejections += 1;
        self.ejections += 1;
    }

    /// Records that a call to endpoint `idx` was abandoned at `now` after
    /// `elapsed`, because its caller went away: it is no longer in flight,
    /// and it says nothing about the endpoint's health, so the failure count
    /// is untouched. Its duration is only a lower bound on the endpoint's
    /// latency, so, as for a failure, it can raise the estimate but never
    /// lower it: an endpoint so slow that every caller hangs up must still
    /// look slow.
    pub fn on_cancel(&mut self, idx: usize, now: Instant, elapsed: Duration) {
        let Some(e) = self.endpoints.get_mut(idx) else {
            return;
        };
        e.in_flight = e.in_flight.saturating_sub(1);
        if elapsed > e.ewma.estimate(now) {
            e.ewma.observe(elapsed, now);
        }
    }

    /// Returns to rotation every endpoint whose ejection has ended by `now`,
    /// with a clean failure count.
    fn reinstate(&mut self, now: Instant) {
        for e in &mut self.endpoints {
            if e.ejected_until.is_some_and(|until| until <= now) {
                e.ejected_until = None;
                e.consecutive_failures = 0;
            }
        }
    }

    /// The number of endpoints.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// True if there are no endpoints.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// The strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The state of endpoint `idx`.
    pub fn endpoint(&self, idx: usize) -> Option<&Endpoint> {
        self.endpoints.get(idx)
    }

    /// The state of every endpoint, in index order.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Endpoints in rotation at `now`.
    pub fn healthy_count(&self, now: Instant) -> usize {
        self.endpoints.iter().filter(|e| !e.is_ejected(now)).count()
    }

    /// Endpoints out of rotation at `now`.
    pub fn ejected_count(&self, now: Instant) -> usize {
        self.endpoints.len() - self.healthy_count(now)
    }

    /// Ejections so far, over all endpoints.
    pub fn ejections(&self) -> u64 {
        self.ejections
    }

    /// Ejections that were due but not made because the endpoint was the last
    /// healthy one. Each failure at or past the threshold counts once.
    pub fn suppressed_ejections(&self) -> u64 {
        self.suppressed
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

    fn close(a: Duration, b_secs: f64) -> bool {
        (a.as_secs_f64() - b_secs).abs() < 1e-9
    }

    /// `n` failures of endpoint `idx` at `now`.
    fn fail(b: &mut Balancer, idx: usize, now: Instant, n: u32) {
        for _ in 0..n {
            b.on_start(idx);
            b.on_end(idx, now, ms(5), false);
        }
    }

    #[test]
    fn ewma_starts_at_the_default_and_takes_the_first_sample() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        // The starting guess is not a measurement: it does not decay.
        assert_eq!(e.estimate(t0 + secs(100)), DEFAULT_START_LATENCY);
        e.observe(ms(20), t0);
        assert_eq!(e.estimate(t0), ms(20));
    }

    #[test]
    fn ewma_jumps_to_peaks_and_decays_toward_smaller_samples() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(ms(100), t0);
        e.observe(ms(300), t0 + secs(1));
        assert_eq!(e.estimate(t0 + secs(1)), ms(300));
        // One tau later, a 50 ms sample: 300 × e^-1 + 50 × (1 - e^-1).
        let w = (-1.0f64).exp();
        let t = t0 + secs(11);
        e.observe(ms(50), t);
        let want = 0.3 * w + 0.05 * (1.0 - w);
        assert!(close(e.estimate(t), want), "{:?} vs {want}", e.estimate(t));
        assert!((want - 0.141_97).abs() < 1e-4);
        // A sample right after barely moves it: the weight is by time.
        e.observe(ms(50), t + ms(1));
        let w1 = (-0.001f64 / 10.0).exp();
        let want1 = want * w1 + 0.05 * (1.0 - w1);
        assert!(close(e.estimate(t + ms(1)), want1));
    }

    #[test]
    fn ewma_decays_while_idle_and_cost_scales_with_load() {
        let t0 = Instant::now();
        let mut e = PeakEwma::default();
        e.observe(secs(1), t0);
        assert!((e.cost(0, t0) - 1.0).abs() < 1e-12);
        assert!((e.cost(3, t0) - 4.0).abs() < 1e-12);
        let w = (-1.0f64).exp();
        assert!((e.cost(0, t0 + secs(10)) - w).abs() < 1e-12);
        assert!((e.cost(2, t0 + secs(10)) - 3.0 * w).abs() < 1e-12);
        assert!(close(e.estimate(t0 + secs(20)), w * w));
        // A time before the last sample does not inflate the estimate.
        e.observe(secs(1), t0 + secs(5));
        assert!((e.cost(0, t0) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ewma_with_zero_tau_keeps_only_the_latest_sample() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new(Duration::ZERO, ms(1));
        e.observe(ms(300), t0);
        e.observe(ms(10), t0 + ms(1));
        assert_eq!(e.estimate(t0 + ms(1)), ms(10));
        assert_eq!(e.estimate(t0 + ms(2)), Duration::ZERO);
    }

    #[test]
    fn strategy_reads_snake_case_names() {
        let rr: Strategy = serde_json::from_str("\"round_robin\"").unwrap();
        let p2c: Strategy = serde_json::from_str("\"peak_ewma\"").unwrap();
        assert_eq!(rr, Strategy::RoundRobin);
        assert_eq!(p2c, Strategy::PeakEwma);
        assert!(serde_json::from_str::<Strategy>("\"RoundRobin\"").is_err());
        assert_eq!(Strategy::default(), Strategy::PeakEwma);
    }

    #[test]
    fn no_endpoints_no_pick_and_one_endpoint_always_picked() {
        let t0 = Instant::now();
        let mut j = Jitter::with_seed(1);
        for strategy in [Strategy::RoundRobin, Strategy::PeakEwma] {
            let mut none = Balancer::new(0, strategy, EjectionConfig::default());
            assert_eq!(none.pick(t0, &mut j), None);
            let mut one = Balancer::new(1, strategy, EjectionConfig::default());
            for _ in 0..10 {
                assert_eq!(one.pick(t0, &mut j), Some(0));
            }
        }
    }

    #[test]
    fn round_robin_cycles_healthy_endpoints_only() {
        let t0 = Instant::now();
        let mut j = Jitter::with_seed(1);
        let mut b = Balancer::new(3, Strategy::RoundRobin, EjectionConfig::default());
        let picks: Vec<_> = (0..6).filter_map(|_| b.pick(t0, &mut j)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        fail(&mut b, 1, t0, 5);
        assert!(b.endpoint(1).unwrap().is_ejected(t0));
        let picks: Vec<_> = (0..6).filter_map(|_| b.pick(t0, &mut j)).collect();
        assert_eq!(picks, [0, 2, 0, 2, 0, 2]);
        // Back after its 30 s.
        let later = t0 + secs(30);
        let picks: Vec<_> = (0..3).filter_map(|_| b.pick(later, &mut j)).collect();
        assert_eq!(picks, [0, 1, 2]);
    }

    /// Calls arrive every 2 ms and each holds its endpoint for its latency;
    /// endpoint 1 takes ten times as long as endpoint 0.
    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        let t0 = Instant::now();
        let mut j = Jitter::with_seed(99);
        let mut b = Balancer::new(2, Strategy::PeakEwma, EjectionConfig::default());
        let latency = [ms(10), ms(100)];
        let mut running: Vec<(Instant, usize)> = Vec::new();
        let mut picks = [0u32; 2];
        for step in 0..1000u64 {
            let now = t0 + ms(2 * step);
            running.retain(|&(end, idx)| {
                if end <= now {
                    b.on_end(idx, end, latency[idx], true);
                    false
                } else {
                    true
                }
            });
            let idx = b.pick(now, &mut j).unwrap();
            b.on_start(idx);
            running.push((now + latency[idx], idx));
            picks[idx] += 1;
        }
        assert!(picks[0] >= 900, "fast endpoint got only {picks:?}");
        assert!(picks[1] >= 1, "the slow one was measured too: {picks:?}");
    }

    #[test]
    fn p2c_prefers_the_least_loaded_when_latencies_are_equal() {
        let t0 = Instant::now();
        let mut j = Jitter::with_seed(5);
        let mut b = Balancer::new(3, Strategy::PeakEwma, EjectionConfig::default());
        for idx in 0..3 {
            b.on_start(idx);
            b.on_end(idx, t0, ms(20), true);
        }
        for _ in 0..3 {
            b.on_start(0);
        }
        b.on_start(1);
        let mut picks = [0u32; 3];
        for _ in 0..300 {
            picks[b.pick(t0, &mut j).unwrap()] += 1;
        }
        // 0 (3 in flight) loses every pairing; 1 (one) wins only against 0.
        assert_eq!(picks[0], 0, "{picks:?}");
        assert!(picks[2] > picks[1] && picks[1] > 50, "{picks:?}");
    }

    #[test]
    fn p2c_never_picks_an_ejected_endpoint() {
        let t0 = Instant::now();
        let mut j = Jitter::with_seed(11);
        let mut b = Balancer::new(4, Strategy::PeakEwma, EjectionConfig::default());
        // Endpoint 2 fails fast: it must not look attractive, and it goes.
        fail(&mut b, 2, t0, 5);
        assert_eq!(b.ejected_count(t0), 1);
        for _ in 0..500 {
            assert_ne!(b.pick(t0 + secs(1), &mut j), Some(2));
        }
        // Its 5 ms failures did not lower its (unmeasured) estimate.
        assert_eq!(
            b.endpoint(2).unwrap().ewma().estimate(t0),
            DEFAULT_START_LATENCY
        );
    }

    #[test]
    fn a_fast_failure_does_not_lower_the_estimate() {
        let t0 = Instant::now();
        let mut b = Balancer::new(2, Strategy::PeakEwma, EjectionConfig::default());
        b.on_start(0);
        b.on_end(0, t0, ms(200), true);
        b.on_start(0);
        b.on_end(0, t0 + secs(5), ms(1), false);
        assert_eq!(
            b.endpoint(0).unwrap().ewma().estimate(t0),
            ms(200),
            "the failure was ignored"
        );
        // A slow failure (a timeout) is a peak like any other.
        b.on_start(0);
        b.on_end(0, t0 + secs(5), secs(2), false);
        assert_eq!(
            b.endpoint(0).unwrap().ewma().estimate(t0 + secs(5)),
            secs(2)
        );
    }

    #[test]
    fn a_cancelled_call_frees_its_place_and_says_nothing_of_health() {
        let t0 = Instant::now();
        let mut b = Balancer::new(2, Strategy::PeakEwma, EjectionConfig::default());
        b.on_start(0);
        b.on_end(0, t0, ms(200), true);
        fail(&mut b, 0, t0, 4);
        // A quick cancel: out of flight, the failure streak and the estimate
        // untouched (a caller hanging up early is no latency sample).
        b.on_start(0);
        assert_eq!(b.endpoint(0).unwrap().in_flight(), 1);
        b.on_cancel(0, t0, ms(1));
        let e = b.endpoint(0).unwrap();
        assert_eq!(e.in_flight(), 0);
        assert_eq!(e.consecutive_failures(), 4);
        assert_eq!(e.ewma().estimate(t0), ms(200));
        // A cancel after longer than the estimate raises it: the endpoint
        // was at least that slow.
        b.on_start(0);
        b.on_cancel(0, t0, secs(3));
        assert_eq!(b.endpoint(0).unwrap().ewma().estimate(t0), secs(3));
        // An unknown endpoint is ignored.
        b.on_cancel(9, t0, ms(1));
    }

    #[test]
    fn ejects_after_consecutive_failures_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Balancer::new(2, Strategy::PeakEwma, EjectionConfig::default());
        fail(&mut b, 0, t0, 4);
        b.on_start(0);
        b.on_end(0, t0, ms(5), true);
        assert_eq!(b.endpoint(0).unwrap().consecutive_failures(), 0);
        fail(&mut b, 0, t0, 4);
        assert!(!b.endpoint(0).unwrap().is_ejected(t0));
        fail(&mut b, 0, t0, 1);
        let e = b.endpoint(0).unwrap();
        assert!(e.is_ejected(t0));
        assert_eq!(e.ejected_until(), Some(t0 + secs(30)));
        assert_eq!((e.ejections(), b.ejections()), (1, 1));
        assert_eq!(e.in_flight(), 0);
        assert_eq!(b.healthy_count(t0), 1);
    }

    #[test]
    fn ejections_grow_from_base_to_max_and_end_on_their_own() {
        let mut now = Instant::now();
        let mut b = Balancer::new(2, Strategy::PeakEwma, EjectionConfig::default());
        let mut j = Jitter::with_seed(3);
        for want in [30, 60, 120, 240, 300, 300] {
            fail(&mut b, 0, now, 5);
            let until = b.endpoint(0).unwrap().ejected_until();
            assert_eq!(until, Some(now + secs(want)));
            assert!(b.endpoint(0).unwrap().is_ejected(now + secs(want) - ms(1)));
            now += secs(want);
            assert!(!b.endpoint(0).unwrap().is_ejected(now));
            // Back in rotation: it is picked again.
            assert!((0..100).any(|_| b.pick(now, &mut j) == Some(0)));
        }
        assert_eq!(b.ejections(), 6);
    }

    #[test]
    fn a_returning_endpoint_starts_with_a_clean_count() {
        let t0 = Instant::now();
        let mut b = Balancer::new(2, Strategy::RoundRobin, EjectionConfig::default());
        for _ in 0..9 {
            b.on_start(0);
        }
        // Five of nine calls in flight fail: ejected. The other four fail
        // later, while it is out: no new ejection.
        for _ in 0..9 {
            b.on_end(0, t0, ms(5), false);
        }
        assert_eq!(b.ejections(), 1);
        let back = t0 + secs(30);
        fail(&mut b, 0, back, 4);
        assert!(!b.endpoint(0).unwrap().is_ejected(back));
        fail(&mut b, 0, back, 1);
        assert_eq!(
            b.endpoint(0).unwrap().ejected_until(),
            Some(back + secs(60))
        );
    }

    #[test]
    fn a_long_healthy_stay_resets_the_ejection_length() {
        let t0 = Instant::now();
        let mut b = Balancer::new(2, Strategy::PeakEwma, EjectionConfig::default());
        fail(&mut b, 0, t0, 5);
        fail(&mut b, 0, t0 + secs(30), 5);
        assert_eq!(b.endpoint(0).unwrap().ejected_until(), Some(t0 + secs(90)));
        // Back at 90 s; healthy for the longest ejection (300 s) and more.
        let later = t0 + secs(90 + 300);
        fail(&mut b, 0, later, 5);
        assert_eq!(
            b.endpoint(0).unwrap().ejected_until(),
            Some(later + secs(30))
        );
    }

    #[test]
    fn never_ejects_the_last_healthy_endpoint() {
        let t0 = Instant::now();
        let mut j = Jitter::with_seed(8);
        let mut b = Balancer::new(2, Strategy::PeakEwma, EjectionConfig::default());
        // Both fail, alternately.
        for _ in 0..10 {
            fail(&mut b, 0, t0, 1);
            fail(&mut b, 1, t0, 1);
        }
        assert_eq!(b.ejections(), 1);
        assert_eq!(b.healthy_count(t0), 1);
        assert!(b.endpoint(0).unwrap().is_ejected(t0));
        assert!(!b.endpoint(1).unwrap().is_ejected(t0));
        // Endpoint 1 reached the threshold at its 5th failure and failed 5
        // more times: six ejections that would have left nothing.
        assert_eq!(b.suppressed_ejections(), 6);
        for _ in 0..100 {
            assert_eq!(b.pick(t0, &mut j), Some(1));
        }
        // When 0 returns, 1's next failure ejects it: still one at a time.
        let back = t0 + secs(30);
        fail(&mut b, 1, back, 1);
        assert_eq!(b.ejections(), 2);
        assert!(b.endpoint(1).unwrap().is_ejected(back));
        assert!(!b.endpoint(0).unwrap().is_ejected(back));
        fail(&mut b, 0, back, 5);
        assert_eq!(b.ejected_count(back), 1);
        assert_eq!(b.suppressed_ejections(), 7);
    }

    #[test]
    fn a_single_endpoint_is_never_ejected() {
        let t0 = Instant::now();
        let mut j = Jitter::with_seed(2);
        let mut b = Balancer::new(1, Strategy::RoundRobin, EjectionConfig::default());
        fail(&mut b, 0, t0, 50);
        assert_eq!(b.ejections(), 0);
        assert_eq!(b.suppressed_ejections(), 46);
        assert_eq!(b.pick(t0, &mut j), Some(0));
    }

    #[test]
    fn out_of_range_indices_are_ignored() {
        let t0 = Instant::now();
        let mut b = Balancer::new(2, Strategy::RoundRobin, EjectionConfig::default());
        b.on_start(7);
        b.on_end(7, t0, ms(1), false);
        assert!(b.endpoint(7).is_none());
        assert_eq!(b.len(), 2);
        assert!(!b.is_empty());
        assert_eq!(b.strategy(), Strategy::RoundRobin);
        assert!(b.endpoints().iter().all(|e| e.in_flight() == 0));
    }

    #[test]
    fn the_ejection_config_is_checked_field_by_field() {
        assert_eq!(EjectionConfig::default().validate(), Ok(()));
        let bad = |c: EjectionConfig| c.validate().map_err(|e| e.to_string());
        let d = EjectionConfig::default();
        assert_eq!(
            bad(EjectionConfig {
                consecutive_failures: 0,
                ..d
            }),
            Err("consecutive_failures must be >= 1".to_owned())
        );
        assert_eq!(
            bad(EjectionConfig {
                base_ejection: Duration::ZERO,
                ..d
            }),
            Err("base_ejection must be > 0".to_owned())
        );
        assert_eq!(
            bad(EjectionConfig {
                max_ejection: d.base_ejection - ms(1),
                ..d
            }),
            Err("max_ejection must be >= base_ejection".to_owned())
        );
        let equal = EjectionConfig {
            max_ejection: d.base_ejection,
            ..d
        };
        assert_eq!(equal.validate(), Ok(()), "a fixed ejection length is fine");
    }
}
