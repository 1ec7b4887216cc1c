//! The alert state machine: [`AlertRules`] takes `now` and an
//! [`AlertInput`] (the counters of one look at the node), does no I/O and
//! returns the events that look produced; see the [module docs](super).

use super::events::{AlertCounters, AlertEvent, AlertRule, AlertState};
use crate::config::{AlertRulesConfig, AlertsConfig, EVICTIONS_WINDOW};
use crate::ops::snapshot::Snapshot;
use happynet_actors::{BreakerStateKind, BreakerStats};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// Samples a counter window keeps per window length. Samples closer
/// together than `window / SAMPLES_PER_WINDOW` are not kept, so a short
/// interval with a long window costs the same memory as a long interval.
const SAMPLES_PER_WINDOW: u32 = 256;

/// The subject of the `slow_consumer_evictions` rule.
pub const HUB_SUBJECT: &str = "hub";

/// The subject of the `connections_near_max` rule.
pub const WEBSOCKET_SUBJECT: &str = "websocket";

/// One look at the node: what the rules read.
#[derive(Debug, Clone, Default)]
pub struct AlertInput {
    /// Every API client, with its breaker's snapshot (`None`: the breaker
    /// did not answer, and that client's rules are left as they were).
    pub upstreams: Vec<UpstreamReading>,
    /// The hub's running count of slow-consumer evictions (`None`: the hub
    /// did not answer).
    pub evicted_slow_consumers: Option<u64>,
    /// WebSocket connections open now.
    pub connections: usize,
    /// `network.websocket.max_connections`.
    pub max_connections: usize,
}

/// One API client in an [`AlertInput`].
#[derive(Debug, Clone)]
pub struct UpstreamReading {
    /// The client's name (the `api_clients` key).
    pub name: String,
    /// Its breaker's state and running counters.
    pub breaker: Option<BreakerStats>,
}

impl AlertInput {
    /// The parts of a metrics snapshot the rules read.
    pub(crate) fn from_snapshot(snapshot: &Snapshot) -> Self {
        AlertInput {
            upstreams: snapshot
                .upstreams
                .iter()
                .map(|u| UpstreamReading {
                    name: u.name.clone(),
                    breaker: u.breaker.clone(),
                })
                .collect(),
            evicted_slow_consumers: snapshot.hub.as_ref().map(|h| h.evicted_slow_consumer),
            connections: snapshot.connections,
            max_connections: snapshot.max_connections,
        }
    }
}

/// Running counters sampled over a sliding window, to tell how much they
/// grew within it. Bounded: samples closer than `spacing` are not kept.
#[derive(Debug)]
struct CounterWindow {
    window: Duration,
    spacing: Duration,
    samples: VecDeque<(Instant, [u64; 2])>,
}

impl CounterWindow {
    fn new(window: Duration) -> Self {
        CounterWindow {
            window,
            spacing: window / SAMPLES_PER_WINDOW,
            samples: VecDeque::new(),
        }
    }

    /// Records `values` at `now` and returns how much each grew since the
    /// window's start. The baseline is the newest sample at least `window`
    /// old (or the oldest kept, early on), so the growth covers the whole
    /// window and not less, whatever the evaluation interval. A value lower
    /// than before means its source restarted: the window starts over.
    fn observe(&mut self, now: Instant, values: [u64; 2]) -> [u64; 2] {
        if let Some(&(_, last)) = self.samples.back() {
            if values[0] < last[0] || values[1] < last[1] {
                self.samples.clear();
            }
        }
        while self
            .samples
            .get(1)
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= self.window)
        {
            self.samples.pop_front();
        }
        let base = self.samples.front().map_or(values, |&(_, v)| v);
        let due = self
            .samples
            .back()
            .is_none_or(|&(at, _)| now.saturating_duration_since(at) >= self.spacing);
        if due {
            self.samples.push_back((now, values));
        }
        // The spacing already bounds the samples to about
        // SAMPLES_PER_WINDOW; this guards against a clock that jumps.
        while self.samples.len() > 2 * SAMPLES_PER_WINDOW as usize {
            self.samples.pop_front();
        }
        [values[0] - base[0], values[1] - base[1]]
    }
}

/// Where one rule stands for one subject.
#[derive(Debug, Default)]
struct RuleState {
    firing: bool,
    /// When it last resolved: it may not fire again until `hold` later.
    resolved_at: Option<Instant>,
    /// The condition is true but the hold kept it from firing (counted once
    /// per such stretch).
    held_back: bool,
}

/// What one rule found for one subject in one look.
struct Verdict {
    holds: bool,
    value: f64,
    threshold: f64,
    message: String,
}

/// The alert state machine; see the module docs. Keyed state is bounded by
/// the subjects of the latest input: state for an API client that no longer
/// appears is dropped.
#[derive(Debug)]
pub struct AlertRules {
    rules: AlertRulesConfig,
    hold: Duration,
    states: HashMap<(AlertRule, String), RuleState>,
    /// Each breaker's `opened` count at the last look.
    opened: HashMap<String, u64>,
    /// Each upstream's `(calls, failures)` over the error-rate window.
    error_windows: HashMap<String, CounterWindow>,
    evictions: CounterWindow,
    next_id: u64,
    /// The `node` and `run` of every event.
    node: String,
    run: String,
    counters: AlertCounters,
}

impl AlertRules {
    /// Rules as configured in `network.alerts` (already validated), whose
    /// events name `node` (the [`NodeIdentity`](crate::config::NodeIdentity)
    /// name) and this process's [`run_id`].
    pub fn new(config: &AlertsConfig, node: impl Into<String>) -> Self {
        AlertRules {
            rules: config.rules.clone(),
            hold: config.hold.0,
            states: HashMap::new(),
            opened: HashMap::new(),
            error_windows: HashMap::new(),
            evictions: CounterWindow::new(EVICTIONS_WINDOW),
            next_id: 1,
            node: node.into(),
            run: run_id().to_owned(),
            counters: AlertCounters::default(),
        }
    }

    /// Evaluations, fired, resolved and suppressed so far (the webhook
    /// counters are the actor's and stay 0 here).
    pub fn counters(&self) -> AlertCounters {
        self.counters
    }

    /// Whether `rule` is firing for `subject` now.
    pub fn is_firing(&self, rule: AlertRule, subject: &str) -> bool {
        self.states
            .get(&(rule, subject.to_owned()))
            .is_some_and(|s| s.firing)
    }

    /// Judges one look at the node taken at `now` (`at` is the same moment
    /// in milliseconds since the Unix epoch, for the events) and returns the
    /// events it produced, in rule order.
    pub fn evaluate(&mut self, now: Instant, at: u64, input: &AlertInput) -> Vec<AlertEvent> {
        self.counters.evaluations += 1;
        let mut verdicts: Vec<(AlertRule, String, Verdict)> = Vec::new();
        for up in &input.upstreams {
            let Some(breaker) = &up.breaker else {
                continue;
            };
            if self.rules.breaker_open.enabled {
                let verdict = self.breaker_open(&up.name, breaker);
                verdicts.push((AlertRule::BreakerOpen, up.name.clone(), verdict));
            }
            if self.rules.upstream_error_rate.enabled {
                let verdict = self.error_rate(now, &up.name, breaker);
                verdicts.push((AlertRule::UpstreamErrorRate, up.name.clone(), verdict));
            }
        }
        if let (true, Some(evicted)) = (
            self.rules.slow_consumer_evictions.enabled,
            input.evicted_slow_consumers,
        ) {
            let verdict = self.evictions(now, evicted);
            verdicts.push((
                AlertRule::SlowConsumerEvictions,
                HUB_SUBJECT.into(),
                verdict,
            ));
        }
        if self.rules.connections_near_max.enabled && input.max_connections > 0 {
            let verdict = self.connections(input.connections, input.max_connections);
            verdicts.push((
                AlertRule::ConnectionsNearMax,
                WEBSOCKET_SUBJECT.into(),
                verdict,
            ));
        }
        let events = verdicts
            .into_iter()
            .filter_map(|(rule, subject, verdict)| self.step(now, at, rule, subject, verdict))
            .collect();
        self.forget_gone(input);
        events
    }

    fn breaker_open(&mut self, name: &str, breaker: &BreakerStats) -> Verdict {
        // First look: the counters started at 0 when the network did, so
        // every opening so far is news.
        let last = self.opened.insert(name.to_owned(), breaker.opened);
        let opened = match last {
            Some(last) if breaker.opened >= last => breaker.opened - last,
            _ => breaker.opened,
        };
        let not_closed = breaker.state != BreakerStateKind::Closed;
        let holds = opened > 0 || not_closed;
        let message = if opened == 0 && not_closed {
            // Fired at the end of a hold with no new opening since the
            // last look: "opened 0 times" would read as a contradiction.
            format!(
                "upstream {name}: circuit breaker still {} (no new opening since the last check)",
                breaker.state
            )
        } else if holds {
            let times = if opened == 1 { "time" } else { "times" };
            format!(
                "upstream {name}: circuit breaker opened ({opened} {times} since the last check); it is {}",
                breaker.state
            )
        } else {
            format!("upstream {name}: circuit breaker closed again")
        };
        Verdict {
            holds,
            value: opened as f64,
            threshold: 1.0,
            message,
        }
    }

    fn error_rate(&mut self, now: Instant, name: &str, breaker: &BreakerStats) -> Verdict {
        let rule = &self.rules.upstream_error_rate;
        let window = self
            .error_windows
            .entry(name.to_owned())
            .or_insert_with(|| CounterWindow::new(rule.window.0));
        // A call the open breaker refuses is a request that failed, and
        // while it is open there are no admitted calls at all: without the
        // refusals the window would fall below `min_calls` and resolve the
        // alert in the middle of the outage.
        let [calls, failures] = window.observe(
            now,
            [
                breaker.calls.saturating_add(breaker.rejections),
                breaker.failures.saturating_add(breaker.rejections),
            ],
        );
        // A failure is reported after its call was admitted, so the two can
        // straddle the window's edge: keep the ratio a ratio.
        let ratio = if calls == 0 {
            0.0
        } else {
            (failures as f64 / calls as f64).min(1.0)
        };
        let holds = calls >= rule.min_calls && ratio >= rule.threshold;
        let secs = rule.window.0.as_secs_f64();
        let message = format!(
            "upstream {name}: {failures} of {calls} calls failed or were refused by the breaker in the last {secs}s ({:.0}%; alert at {:.0}% with at least {} calls)",
            ratio * 100.0,
            rule.threshold * 100.0,
            rule.min_calls
        );
        Verdict {
            holds,
            value: ratio,
            threshold: rule.threshold,
            message,
        }
    }

    fn evictions(&mut self, now: Instant, evicted: u64) -> Verdict {
        let per_minute = self.rules.slow_consumer_evictions.per_minute;
        let [recent, _] = self.evictions.observe(now, [evicted, 0]);
        Verdict {
            holds: recent >= per_minute,
            value: recent as f64,
            threshold: per_minute as f64,
            message: format!(
                "{recent} slow consumers evicted in the last minute (alert at {per_minute})"
            ),
        }
    }

    fn connections(&self, open: usize, max: usize) -> Verdict {
        let threshold = self.rules.connections_near_max.ratio * max as f64;
        Verdict {
            holds: open as f64 >= threshold,
            value: open as f64,
            threshold,
            message: format!(
                "{open} of {max} WebSocket connections open (alert at {threshold:.0})"
            ),
        }
    }

    /// Moves one rule for one subject; returns its event, if any.
    fn step(
        &mut self,
        now: Instant,
        at: u64,
        rule: AlertRule,
        subject: String,
        verdict: Verdict,
    ) -> Option<AlertEvent> {
        let hold = self.hold;
        let state = self.states.entry((rule, subject.clone())).or_default();
        let to = match (state.firing, verdict.holds) {
            (false, true) => {
                let in_hold = state
                    .resolved_at
                    .is_some_and(|r| now.saturating_duration_since(r) < hold);
                if in_hold {
                    if !state.held_back {
                        state.held_back = true;
                        self.counters.suppressed += 1;
                        log::debug!(
                            "alert {} {subject}: held back (resolved less than {hold:?} ago): {}",
                            rule.name(),
                            verdict.message
                        );
                    }
                    return None;
                }
                state.firing = true;
                state.held_back = false;
                self.counters.fired += 1;
                AlertState::Firing
            }
            (true, false) => {
                state.firing = false;
                state.resolved_at = Some(now);
                self.counters.resolved += 1;
                AlertState::Resolved
            }
            (false, false) => {
                state.held_back = false;
                return None;
            }
            (true, true) => return None,
        };
        let id = self.next_id;
        self.next_id += 1;
        Some(AlertEvent {
            id,
            node: self.node.clone(),
            run: self.run.clone(),
            rule,
            subject,
            state: to,
            value: verdict.value,
            threshold: verdict.threshold,
            at,
            message: verdict.message,
        })
    }

    /// Drops the state of API clients the input no longer lists.
    fn forget_gone(&mut self, input: &AlertInput) {
        let names: HashSet<&str> = input.upstreams.iter().map(|u| u.name.as_str()).collect();
        self.opened.retain(|name, _| names.contains(name.as_str()));
        self.error_windows
            .retain(|name, _| names.contains(name.as_str()));
        self.states.retain(|(rule, subject), _| match rule {
            AlertRule::BreakerOpen | AlertRule::UpstreamErrorRate => {
                names.contains(subject.as_str())
            }
            _ => true,
        });
    }
}

/// This process's `run`: 16 hex digits drawn on first use and the same for
/// every later call, so every network of one process shares it.
pub fn run_id() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        // RandomState is seeded from the OS's randomness; the time and the
        // process id keep two starts apart even if it were not.
        let mut hasher = RandomState::new().build_hasher();
        SystemTime::now().hash(&mut hasher);
        std::process::id().hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn config(json: &str) -> AlertsConfig {
        let text = format!(r#"{{"network":{{"alerts":{json}}}}}"#);
        crate::Config::from_json_str(&text).unwrap().network.alerts
    }

    fn rules_for(config: &AlertsConfig) -> AlertRules {
        AlertRules::new(config, "n1")
    }

    /// Only the breaker rule, hold 10 s.
    fn breaker_only() -> AlertRules {
        rules_for(&config(
            r#"{"hold_ms":10000,"rules":{"upstream_error_rate":{"enabled":false},
                "slow_consumer_evictions":{"enabled":false},
                "connections_near_max":{"enabled":false}}}"#,
        ))
    }

    fn breaker(state: BreakerStateKind, opened: u64, calls: u64, failures: u64) -> BreakerStats {
        BreakerStats {
            state,
            retry_after: None,
            calls,
            failures,
            rejections: 0,
            transitions: 0,
            opened,
        }
    }

    fn input(breaker: BreakerStats) -> AlertInput {
        AlertInput {
            upstreams: vec![UpstreamReading {
                name: "up".into(),
                breaker: Some(breaker),
            }],
            evicted_slow_consumers: Some(0),
            connections: 0,
            max_connections: 100,
        }
    }

    use BreakerStateKind::{Closed, HalfOpen, Open};

    fn states(events: &[AlertEvent]) -> Vec<(AlertRule, AlertState)> {
        events.iter().map(|e| (e.rule, e.state)).collect()
    }

    #[test]
    fn a_flapping_breaker_fires_once_and_resolves_once_within_the_hold() {
        let t0 = Instant::now();
        let mut rules = breaker_only();
        let mut all = Vec::new();
        // open, closed, open, closed, open+closed between looks, closed:
        // all within the 10 s hold after the first resolve.
        let looks = [
            (0, Closed, 0),
            (1000, Open, 1),
            (2000, Closed, 1),
            (3000, Open, 2),
            (4000, HalfOpen, 2),
            (5000, Closed, 2),
            (6000, Closed, 3),
            (7000, Closed, 3),
        ];
        for (at, state, opened) in looks {
            all.extend(rules.evaluate(t0 + ms(at), at, &input(breaker(state, opened, 0, 0))));
        }
        assert_eq!(
            states(&all),
            [
                (AlertRule::BreakerOpen, AlertState::Firing),
                (AlertRule::BreakerOpen, AlertState::Resolved),
            ]
        );
        assert_eq!((all[0].at, all[1].at), (1000, 2000));
        assert_eq!((all[0].id, all[1].id), (1, 2));
        assert_eq!(all[0].subject, "up");
        assert_eq!(all[0].value, 1.0);
        // Two stretches were held back: 3000–5000 and 6000.
        let c = rules.counters();
        assert_eq!((c.fired, c.resolved, c.suppressed), (1, 1, 2));
        assert!(!rules.is_firing(AlertRule::BreakerOpen, "up"));
    }

    #[test]
    fn it_fires_again_once_the_hold_has_passed() {
        let t0 = Instant::now();
        let mut rules = breaker_only();
        let look = |rules: &mut AlertRules, at: u64, state, opened| {
            rules.evaluate(t0 + ms(at), at, &input(breaker(state, opened, 0, 0)))
        };
        assert_eq!(look(&mut rules, 0, Open, 1).len(), 1);
        assert_eq!(look(&mut rules, 1000, Closed, 1).len(), 1);
        // Resolved at 1000; the hold ends at 11000.
        assert!(look(&mut rules, 10_999, Open, 2).is_empty());
        let again = look(&mut rules, 11_000, Open, 2);
        assert_eq!(
            states(&again),
            [(AlertRule::BreakerOpen, AlertState::Firing)]
        );
        assert_eq!(again[0].id, 3);
    }

    #[test]
    fn a_condition_still_true_when_the_hold_ends_fires_then() {
        let t0 = Instant::now();
        let mut rules = breaker_only();
        rules.evaluate(t0, 0, &input(breaker(Open, 1, 0, 0)));
        rules.evaluate(t0 + ms(100), 100, &input(breaker(Closed, 1, 0, 0)));
        // Reopens during the hold and stays open past it.
        assert!(rules
            .evaluate(t0 + ms(200), 200, &input(breaker(Open, 2, 0, 0)))
            .is_empty());
        assert!(rules
            .evaluate(t0 + ms(5000), 5000, &input(breaker(Open, 2, 0, 0)))
            .is_empty());
        let events = rules.evaluate(t0 + ms(10_100), 10_100, &input(breaker(Open, 2, 0, 0)));
        assert_eq!(
            states(&events),
            [(AlertRule::BreakerOpen, AlertState::Firing)]
        );
        // No new opening since the last look: the value and message say so.
        assert_eq!(events[0].value, 0.0);
        assert_eq!(
            events[0].message,
            "upstream up: circuit breaker still open (no new opening since the last check)"
        );
    }

    #[test]
    fn an_open_that_closed_between_two_looks_still_fires() {
        let t0 = Instant::now();
        let mut rules = breaker_only();
        assert!(rules
            .evaluate(t0, 0, &input(breaker(Closed, 0, 0, 0)))
            .is_empty());
        let events = rules.evaluate(t0 + ms(1000), 1000, &input(breaker(Closed, 1, 0, 0)));
        assert_eq!(
            states(&events),
            [(AlertRule::BreakerOpen, AlertState::Firing)]
        );
        let events = rules.evaluate(t0 + ms(2000), 2000, &input(breaker(Closed, 1, 0, 0)));
        assert_eq!(
            states(&events),
            [(AlertRule::BreakerOpen, AlertState::Resolved)]
        );
    }

    #[test]
    fn a_breaker_that_does_not_answer_leaves_its_alert_as_it_was() {
        let t0 = Instant::now();
        let mut rules = breaker_only();
        rules.evaluate(t0, 0, &input(breaker(Open, 1, 0, 0)));
        let mut silent = input(breaker(Closed, 1, 0, 0));
        silent.upstreams[0].breaker = None;
        assert!(rules.evaluate(t0 + ms(1000), 1000, &silent).is_empty());
        assert!(rules.is_firing(AlertRule::BreakerOpen, "up"));
    }

    #[test]
    fn with_no_hold_every_flap_alerts() {
        let t0 = Instant::now();
        let mut rules = rules_for(&config(r#"{"hold_ms":0}"#));
        let mut n = 0;
        for i in 0..6u64 {
            let (state, opened) = if i % 2 == 0 {
                (Open, i / 2 + 1)
            } else {
                (Closed, i / 2 + 1)
            };
            n += rules
                .evaluate(t0 + ms(i), i, &input(breaker(state, opened, 0, 0)))
                .len();
        }
        assert_eq!(n, 6);
    }

    fn error_rate_rules() -> AlertRules {
        rules_for(&config(
            r#"{"hold_ms":0,"rules":{"breaker_open":{"enabled":false},
                "upstream_error_rate":{"threshold":0.5,"window_ms":10000,"min_calls":20}}}"#,
        ))
    }

    #[test]
    fn the_error_rate_needs_min_calls() {
        let t0 = Instant::now();
        let mut rules = error_rate_rules();
        let look = |rules: &mut AlertRules, at: u64, calls, failures| {
            rules.evaluate(t0 + ms(at), at, &input(breaker(Closed, 0, calls, failures)))
        };
        assert!(look(&mut rules, 0, 0, 0).is_empty());
        // 19 calls, all failed: too few to mean anything.
        assert!(look(&mut rules, 1000, 19, 19).is_empty());
        // The 20th: 20 of 20 failed.
        let events = look(&mut rules, 2000, 20, 20);
        assert_eq!(
            states(&events),
            [(AlertRule::UpstreamErrorRate, AlertState::Firing)]
        );
        assert_eq!((events[0].value, events[0].threshold), (1.0, 0.5));
        assert_eq!(events[0].subject, "up");
    }

    #[test]
    fn the_error_rate_is_judged_over_the_window_only() {
        let t0 = Instant::now();
        let mut rules = error_rate_rules();
        let look = |rules: &mut AlertRules, at: u64, calls, failures| {
            rules.evaluate(t0 + ms(at), at, &input(breaker(Closed, 0, calls, failures)))
        };
        look(&mut rules, 0, 0, 0);
        // 30 failures of 40 calls in the first second: fires.
        assert_eq!(look(&mut rules, 1000, 40, 30).len(), 1);
        // Then healthy traffic: 40 more calls, no failures, by 5 s. Over the
        // window (everything since 0): 30/80 < 0.5, resolved.
        let events = look(&mut rules, 5000, 80, 30);
        assert_eq!(
            states(&events),
            [(AlertRule::UpstreamErrorRate, AlertState::Resolved)]
        );
        // By 11 s, 30 more calls with 25 failures. The burst at 1 s has left
        // the 10 s window (the baseline is now the look at 1 s): 25 of 70
        // failed, quiet.
        assert!(look(&mut rules, 11_000, 110, 55).is_empty());
        let events = look(&mut rules, 16_000, 140, 85);
        // Baseline: the look at 5000 (80, 30) → 55 of 60 failed.
        assert_eq!(
            states(&events),
            [(AlertRule::UpstreamErrorRate, AlertState::Firing)]
        );
        assert!((events[0].value - 55.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn calls_the_open_breaker_refuses_keep_the_error_rate_firing() {
        let t0 = Instant::now();
        let mut rules = error_rate_rules();
        let look = |rules: &mut AlertRules, at: u64, state, rejections| {
            let b = BreakerStats {
                rejections,
                ..breaker(state, 1, 20, 20)
            };
            rules.evaluate(t0 + ms(at), at, &input(b))
        };
        rules.evaluate(t0, 0, &input(breaker(Closed, 0, 0, 0)));
        // 20 of 20 failed; the breaker opened.
        let events = look(&mut rules, 1000, Open, 0);
        assert_eq!(
            states(&events),
            [(AlertRule::UpstreamErrorRate, AlertState::Firing)]
        );
        // From here on no call is admitted: the breaker refuses them all.
        // Past the 10 s window the admitted calls in it are 0, yet every
        // request still fails.
        for (at, rejections) in [(5000, 50), (12_000, 100), (30_000, 150), (45_000, 200)] {
            assert!(look(&mut rules, at, Open, rejections).is_empty(), "{at}");
            assert!(rules.is_firing(AlertRule::UpstreamErrorRate, "up"), "{at}");
        }
        // The breaker closes and healthy calls come back: resolved.
        let b = BreakerStats {
            rejections: 200,
            ..breaker(Closed, 1, 60, 20)
        };
        let events = rules.evaluate(t0 + ms(60_000), 60_000, &input(b));
        assert_eq!(
            states(&events),
            [(AlertRule::UpstreamErrorRate, AlertState::Resolved)]
        );
    }

    #[test]
    fn a_restarted_counter_starts_the_window_over() {
        let mut w = CounterWindow::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.observe(t0, [100, 50]), [0, 0]);
        assert_eq!(w.observe(t0 + ms(1000), [120, 60]), [20, 10]);
        assert_eq!(w.observe(t0 + ms(2000), [5, 1]), [0, 0]);
        assert_eq!(w.observe(t0 + ms(3000), [9, 2]), [4, 1]);
    }

    #[test]
    fn a_counter_window_stays_bounded() {
        let mut w = CounterWindow::new(Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..100_000u64 {
            w.observe(t0 + ms(i), [i, 0]);
        }
        assert!(w.samples.len() <= SAMPLES_PER_WINDOW as usize + 2);
        // Still about a minute's growth: between 60 and 60 + one spacing.
        let [grew, _] = w.observe(t0 + ms(100_000), [100_000, 0]);
        assert!((60_000..=60_000 + 235).contains(&grew), "{grew}");
    }

    #[test]
    fn evictions_per_minute() {
        let t0 = Instant::now();
        let mut rules = rules_for(&config(
            r#"{"hold_ms":0,"rules":{"slow_consumer_evictions":{"per_minute":3}}}"#,
        ));
        let look = |rules: &mut AlertRules, at: u64, evicted| {
            let mut i = input(breaker(Closed, 0, 0, 0));
            i.evicted_slow_consumers = Some(evicted);
            rules.evaluate(t0 + ms(at), at, &i)
        };
        assert!(look(&mut rules, 0, 0).is_empty());
        assert!(look(&mut rules, 10_000, 2).is_empty());
        let events = look(&mut rules, 20_000, 3);
        assert_eq!(
            states(&events),
            [(AlertRule::SlowConsumerEvictions, AlertState::Firing)]
        );
        assert_eq!(events[0].subject, HUB_SUBJECT);
        // No more evictions: at 70 s the minute since 10 s holds 1.
        let events = look(&mut rules, 70_000, 3);
        assert_eq!(
            states(&events),
            [(AlertRule::SlowConsumerEvictions, AlertState::Resolved)]
        );
        // A hub that does not answer changes nothing.
        let mut i = input(breaker(Closed, 0, 0, 0));
        i.evicted_slow_consumers = None;
        assert!(rules.evaluate(t0 + ms(80_000), 80_000, &i).is_empty());
    }

    #[test]
    fn connections_near_max() {
        let t0 = Instant::now();
        let mut rules = rules_for(&config(
            r#"{"hold_ms":0,"rules":{"connections_near_max":{"ratio":0.9}}}"#,
        ));
        let look = |rules: &mut AlertRules, at: u64, open| {
            let mut i = input(breaker(Closed, 0, 0, 0));
            i.connections = open;
            rules.evaluate(t0 + ms(at), at, &i)
        };
        assert!(look(&mut rules, 0, 89).is_empty());
        let events = look(&mut rules, 1, 90);
        assert_eq!(
            states(&events),
            [(AlertRule::ConnectionsNearMax, AlertState::Firing)]
        );
        assert_eq!((events[0].value, events[0].threshold), (90.0, 90.0));
        assert_eq!(events[0].subject, WEBSOCKET_SUBJECT);
        assert!(look(&mut rules, 2, 100).is_empty());
        assert_eq!(look(&mut rules, 3, 10).len(), 1);
    }

    #[test]
    fn state_for_a_vanished_upstream_is_dropped() {
        let t0 = Instant::now();
        let mut rules = rules_for(&config("{}"));
        rules.evaluate(t0, 0, &input(breaker(Open, 1, 0, 0)));
        assert!(rules.is_firing(AlertRule::BreakerOpen, "up"));
        let empty = AlertInput {
            max_connections: 100,
            ..AlertInput::default()
        };
        rules.evaluate(t0 + ms(1), 1, &empty);
        assert!(rules.opened.is_empty() && rules.error_windows.is_empty());
        assert!(!rules.is_firing(AlertRule::BreakerOpen, "up"));
    }

    #[test]
    fn events_carry_the_node_and_a_run_per_process() {
        let t0 = Instant::now();
        let mut rules = breaker_only();
        let events = rules.evaluate(t0, 0, &input(breaker(Open, 1, 0, 0)));
        assert_eq!(events[0].node, "n1");
        assert_eq!(events[0].run, run_id());
        assert_eq!(run_id().len(), 16);
        assert!(run_id().chars().all(|c| c.is_ascii_hexdigit()));
        // The same for every network of the process.
        assert_eq!(breaker_only().run, rules.run);
        let with_node = |json: &str| {
            let text = format!(r#"{{"network":{{"cluster":{json}}}}}"#);
            let config = crate::Config::from_json_str(&text).unwrap();
            crate::config::NodeIdentity::new(config.network.cluster.as_ref()).name
        };
        assert_eq!(
            with_node(r#"{"redis_url":"redis://127.0.0.1:6379","node_id":"web-1"}"#),
            "web-1"
        );
        let fallback = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| crate::config::DEFAULT_NODE.to_owned());
        assert_eq!(with_node("null"), fallback);
    }
}
