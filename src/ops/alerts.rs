//! Alerts (`network.alerts`): rules over the node's own counters that fire
//! and resolve, are logged, kept in a bounded history and, when a webhook is
//! configured, POSTed as JSON through the upstream stack.
//!
//! The parts, in the workspace's usual shape:
//!
//! - [`AlertRules`] is the state machine. It takes `now` and an
//!   [`AlertInput`] (the counters of one look at the node), does no I/O and
//!   returns the [`AlertEvent`]s that look produced. It keeps, per rule and
//!   subject, whether the alert is firing and when it last resolved; per
//!   upstream, a bounded window of `(time, calls, failures)` samples; for
//!   the hub, a bounded window of eviction counts.
//! - [`AlertActor`] is its shell: every `network.alerts.interval_ms` it takes
//!   the same snapshot `/metrics` and `/status` read
//!   ([`super::snapshot`]), feeds it to the rules, logs each event
//!   (`warn` firing, `info` resolved), appends it to the history behind
//!   `Network::recent_alerts` and queues it for the webhook.
//! - The webhook is an upstream like the API clients (pool, breaker,
//!   limiter, retries with backoff and jitter, deadline), started on the
//!   upstream arbiter. Events wait in a queue of at most [`WEBHOOK_QUEUE`];
//!   a POST is spawned, never awaited by the evaluation, while fewer than
//!   `webhook.max_in_flight` are out, and each one that ends lets the next
//!   go. At most one POST per (rule, subject) is out at a time, so a
//!   `firing` retried with backoff cannot arrive after its own `resolved`.
//!   Only a full queue drops an event: the oldest `firing` before any
//!   `resolved` (a lost `resolved` would leave a receiver showing the alert
//!   firing for ever), counted and logged. A dead webhook costs nothing but
//!   its own failed POSTs and a bounded queue.
//!
//! # Event identity
//!
//! `id` numbers the events of one process from 1; a restart starts again
//! at 1, and every node of a cluster counts on its own. Each event therefore
//! also carries its `node` — the node's one name,
//! [`NodeIdentity`](crate::config::NodeIdentity), the same `/status` shows as
//! `cluster.node`: `network.cluster.node_id` when set, else with a cluster
//! the bridge's random name, else the `HOSTNAME` environment variable, else
//! `happynet` — and its `run` (random hex drawn once per process start). A receiver dedupes retried POSTs on
//! (`node`, `run`, `id`).
//!
//! # No flapping
//!
//! A rule that resolved cannot fire again for the same subject until
//! `network.alerts.hold_ms` has passed since it resolved: a breaker that opens
//! and closes ten times in a minute alerts once and resolves once. A
//! condition still true when the hold ends fires then. Conditions that come
//! and go within the hold are counted as `suppressed`.
//!
//! # The rules
//!
//! | rule | subject | fires when | resolves when |
//! |---|---|---|---|
//! | `breaker_open` | API client | its breaker opened since the last look (counted by `BreakerSnapshot::opened`, so an open that closed in between is seen), or it is not closed | it is closed and did not open since the last look |
//! | `upstream_error_rate` | API client | failures ÷ calls over `window_ms` ≥ `threshold`, with ≥ `min_calls` calls; a call the open breaker refused counts as a failed call | the ratio is below, or calls are too few |
//! | `slow_consumer_evictions` | `hub` | ≥ `per_minute` slow consumers evicted in the last minute | fewer |
//! | `connections_near_max` | `websocket` | open WebSockets ≥ `ratio × max_connections` | fewer |

use super::snapshot::Snapshot;
use super::Probes;
use crate::client::{ApiClient, Upstreams};
use crate::config::{AlertRulesConfig, AlertsConfig, ConfigError, NetworkConfig, EVICTIONS_WINDOW};
use actix::prelude::*;
use happynet_actors::{BreakerSnapshot, BreakerStateKind};
use serde::Serialize;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Samples a counter window keeps per window length. Samples closer
/// together than `window / SAMPLES_PER_WINDOW` are not kept, so a short
/// interval with a long window costs the same memory as a long interval.
const SAMPLES_PER_WINDOW: u32 = 256;

/// Events that may wait for a webhook POST slot. Each look adds at most a
/// few events per API client, so this covers a long webhook outage; beyond
/// it the oldest `firing` is dropped first (see the module docs).
pub const WEBHOOK_QUEUE: usize = 256;

/// The subject of the `slow_consumer_evictions` rule.
pub const HUB_SUBJECT: &str = "hub";

/// The subject of the `connections_near_max` rule.
pub const WEBSOCKET_SUBJECT: &str = "websocket";

/// Which rule an [`AlertEvent`] comes from. Serialized in snake_case, as
/// named under `network.alerts.rules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AlertRule {
    /// An upstream's circuit breaker opened.
    BreakerOpen,
    /// An upstream's failure ratio over the window is at or over the
    /// threshold.
    UpstreamErrorRate,
    /// The hub evicted at least the configured number of slow consumers in
    /// the last minute.
    SlowConsumerEvictions,
    /// Open WebSocket connections are near `websocket.max_connections`.
    ConnectionsNearMax,
}

impl AlertRule {
    /// The rule's name under `network.alerts.rules`.
    pub fn name(self) -> &'static str {
        match self {
            AlertRule::BreakerOpen => "breaker_open",
            AlertRule::UpstreamErrorRate => "upstream_error_rate",
            AlertRule::SlowConsumerEvictions => "slow_consumer_evictions",
            AlertRule::ConnectionsNearMax => "connections_near_max",
        }
    }
}

/// Whether an alert started or ended. Serialized as `"firing"` / `"resolved"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition holds (and the rule was not in its hold time).
    Firing,
    /// The condition no longer holds.
    Resolved,
}

/// One firing or resolving of a rule: what is logged, kept in
/// `Network::recent_alerts` and POSTed to the webhook, as this JSON:
///
/// ```json
/// {"id": 1, "node": "web-1", "run": "9f2c4e1a7b3d5f60", "rule": "breaker_open",
///  "subject": "openai", "state": "firing", "value": 1.0, "threshold": 1.0,
///  "at": 1700000000000,
///  "message": "upstream openai: circuit breaker opened (1 time since the last check); it is open"}
/// ```
///
/// A receiver dedupes on (`node`, `run`, `id`): `id` alone repeats across
/// restarts and nodes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertEvent {
    /// Numbers the events of one `Network` from 1, so a receiver
    /// can drop a POST that a retry delivered twice (together with `node`
    /// and `run`).
    pub id: u64,
    /// The node that made the event: its
    /// [`NodeIdentity`](crate::config::NodeIdentity) name.
    pub node: String,
    /// Random hex drawn once per process start (see [`run_id`]): tells the
    /// events of a restarted node from those of its past self.
    pub run: String,
    /// The rule.
    pub rule: AlertRule,
    /// What the rule is about: the API client's name for the per-upstream
    /// rules, [`HUB_SUBJECT`] or [`WEBSOCKET_SUBJECT`] for the others.
    pub subject: String,
    /// Firing or resolved.
    pub state: AlertState,
    /// The measured value that decided the event: times opened since the
    /// last look (`breaker_open`), the failure ratio, evictions in the last
    /// minute, open connections.
    pub value: f64,
    /// What it was compared with (for `connections_near_max`, in
    /// connections: `ratio × max_connections`).
    pub threshold: f64,
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
    /// A sentence for people.
    pub message: String,
}

/// What the alerts have done since the network started, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct AlertCounters {
    /// Looks at the node the rules have judged.
    pub evaluations: u64,
    /// Events with state `firing`.
    pub fired: u64,
    /// Events with state `resolved`.
    pub resolved: u64,
    /// Conditions that came true during their rule's hold and fired no event.
    pub suppressed: u64,
    /// Webhook POSTs answered with a success status.
    pub webhook_sent: u64,
    /// Webhook POSTs that failed after their retries.
    pub webhook_failed: u64,
    /// Events not POSTed because [`WEBHOOK_QUEUE`] events were already
    /// waiting.
    pub webhook_dropped: u64,
}

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
    pub breaker: Option<BreakerSnapshot>,
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
            hold: config.hold(),
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

    fn breaker_open(&mut self, name: &str, breaker: &BreakerSnapshot) -> Verdict {
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

    fn error_rate(&mut self, now: Instant, name: &str, breaker: &BreakerSnapshot) -> Verdict {
        let rule = &self.rules.upstream_error_rate;
        let window = self
            .error_windows
            .entry(name.to_owned())
            .or_insert_with(|| CounterWindow::new(rule.window()));
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
        let secs = rule.window().as_secs_f64();
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

/// The history and counters the [`AlertActor`] writes and the network and
/// the views read (`recent_alerts`, `alert_counters`, the snapshot), shared
/// without messages so that reading them never waits for the actor.
#[derive(Debug)]
pub(crate) struct AlertLog {
    capacity: usize,
    history: Mutex<VecDeque<AlertEvent>>,
    evaluations: AtomicU64,
    fired: AtomicU64,
    resolved: AtomicU64,
    suppressed: AtomicU64,
    webhook_sent: AtomicU64,
    webhook_failed: AtomicU64,
    webhook_dropped: AtomicU64,
}

impl AlertLog {
    pub(crate) fn new(capacity: usize) -> Self {
        AlertLog {
            capacity,
            history: Mutex::new(VecDeque::with_capacity(capacity.min(64))),
            evaluations: AtomicU64::new(0),
            fired: AtomicU64::new(0),
            resolved: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            webhook_sent: AtomicU64::new(0),
            webhook_failed: AtomicU64::new(0),
            webhook_dropped: AtomicU64::new(0),
        }
    }

    /// The kept events, oldest first.
    pub(crate) fn recent(&self) -> Vec<AlertEvent> {
        match self.history.lock() {
            Ok(h) => h.iter().cloned().collect(),
            Err(poisoned) => poisoned.get_ref().iter().cloned().collect(),
        }
    }

    /// The newest `n` kept events, oldest first: what `/status` shows,
    /// without copying the whole history.
    pub(crate) fn recent_tail(&self, n: usize) -> Vec<AlertEvent> {
        let tail =
            |h: &VecDeque<AlertEvent>| h.iter().skip(h.len().saturating_sub(n)).cloned().collect();
        match self.history.lock() {
            Ok(h) => tail(&h),
            Err(poisoned) => tail(poisoned.get_ref()),
        }
    }

    pub(crate) fn counters(&self) -> AlertCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        AlertCounters {
            evaluations: get(&self.evaluations),
            fired: get(&self.fired),
            resolved: get(&self.resolved),
            suppressed: get(&self.suppressed),
            webhook_sent: get(&self.webhook_sent),
            webhook_failed: get(&self.webhook_failed),
            webhook_dropped: get(&self.webhook_dropped),
        }
    }

    fn record(&self, event: AlertEvent) {
        let mut history = match self.history.lock() {
            Ok(h) => h,
            // A panic elsewhere while holding the lock leaves a valid deque.
            Err(poisoned) => poisoned.into_inner(),
        };
        while history.len() >= self.capacity {
            history.pop_front();
        }
        history.push_back(event);
    }

    fn set_rule_counts(&self, counters: AlertCounters) {
        self.evaluations
            .store(counters.evaluations, Ordering::Relaxed);
        self.fired.store(counters.fired, Ordering::Relaxed);
        self.resolved.store(counters.resolved, Ordering::Relaxed);
        self.suppressed
            .store(counters.suppressed, Ordering::Relaxed);
    }
}

/// The events waiting for a webhook POST and the POSTs out: the webhook's
/// state machine, without I/O. [`AlertActor`] pushes each event, asks
/// [`WebhookQueue::next`] for what to POST now and reports each POST that
/// ended with [`WebhookQueue::done`].
#[derive(Debug)]
struct WebhookQueue {
    capacity: usize,
    max_in_flight: usize,
    /// Waiting events, oldest first.
    pending: VecDeque<AlertEvent>,
    /// The (rule, subject) of every POST out now; one POST per key at most,
    /// so its length is the number in flight.
    in_flight: HashSet<(AlertRule, String)>,
}

impl WebhookQueue {
    fn new(max_in_flight: usize, capacity: usize) -> Self {
        WebhookQueue {
            capacity,
            max_in_flight,
            pending: VecDeque::new(),
            in_flight: HashSet::new(),
        }
    }

    /// Queues `event`. When the queue is full, returns the event dropped
    /// to make room: the oldest `firing` (possibly `event` itself), and only
    /// when none is waiting, the oldest `resolved`. A lost `firing` means an
    /// alert never shown; a lost `resolved`, one shown for ever.
    fn push(&mut self, event: AlertEvent) -> Option<AlertEvent> {
        let mut dropped = None;
        if self.pending.len() >= self.capacity {
            let oldest_firing = self
                .pending
                .iter()
                .position(|e| e.state == AlertState::Firing);
            dropped = match oldest_firing {
                Some(i) => self.pending.remove(i),
                None if event.state == AlertState::Firing => return Some(event),
                None => self.pending.pop_front(),
            };
        }
        self.pending.push_back(event);
        dropped
    }

    /// The event to POST now, if any, counted as in flight: the oldest
    /// waiting one whose (rule, subject) has no POST out, while fewer than
    /// `max_in_flight` are out. Events of one key thus go out in order.
    fn next(&mut self) -> Option<AlertEvent> {
        if self.in_flight.len() >= self.max_in_flight {
            return None;
        }
        let in_flight = &self.in_flight;
        let i = self
            .pending
            .iter()
            .position(|e| !in_flight.contains(&(e.rule, e.subject.clone())))?;
        let event = self.pending.remove(i)?;
        self.in_flight.insert((event.rule, event.subject.clone()));
        Some(event)
    }

    /// The POST for (`rule`, `subject`) ended, delivered or not.
    fn done(&mut self, rule: AlertRule, subject: &str) {
        self.in_flight.remove(&(rule, subject.to_owned()));
    }
}

/// The webhook's client and its queue.
struct Webhook {
    client: ApiClient,
    /// The URL's path and query, POSTed to on the webhook's origin.
    path: String,
    queue: WebhookQueue,
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

/// Everything [`AlertActor`] needs but the probes, built by
/// `Network::start` before the probes exist.
pub(crate) struct AlertsSetup {
    log: Arc<AlertLog>,
    actor: Option<(AlertRules, Duration, Option<Webhook>)>,
}

impl AlertsSetup {
    /// Builds the rules, the history and (with a URL) the webhook's
    /// upstream on the upstream arbiter; events name `node`. With
    /// `enabled: false` only the (empty) history exists.
    pub(crate) fn new(
        network: &NetworkConfig,
        upstreams: &Upstreams,
        node: &str,
    ) -> Result<Self, ConfigError> {
        let config = &network.alerts;
        let log = Arc::new(AlertLog::new(config.history));
        if !config.enabled {
            return Ok(AlertsSetup { log, actor: None });
        }
        let webhook = match config.webhook_upstream(network) {
            Some(settings) => {
                let invalid = |message: String| ConfigError::Invalid {
                    path: "network.alerts.webhook".into(),
                    message,
                };
                let path = webhook_path(config.webhook.url.as_deref().unwrap_or("/"));
                let upstream = upstreams.start_extra(settings).map_err(invalid)?;
                Some(Webhook {
                    client: ApiClient::new(upstream),
                    path,
                    queue: WebhookQueue::new(config.webhook.max_in_flight, WEBHOOK_QUEUE),
                })
            }
            None => None,
        };
        let rules = AlertRules::new(config, node);
        Ok(AlertsSetup {
            log,
            actor: Some((rules, config.interval(), webhook)),
        })
    }

    /// The history and counters, for the network to read.
    pub(crate) fn log(&self) -> Arc<AlertLog> {
        self.log.clone()
    }

    /// Starts the actor on the current arbiter (if alerts are enabled).
    pub(crate) fn start(self, probes: Weak<Probes>) {
        if let Some((rules, interval, webhook)) = self.actor {
            AlertActor {
                probes,
                rules,
                interval,
                webhook,
                log: self.log,
                evaluating: false,
            }
            .start();
        }
    }
}

/// The path and query of a validated webhook URL.
fn webhook_path(url: &str) -> String {
    url.parse::<actix_web::http::Uri>()
        .ok()
        .and_then(|u| u.path_and_query().map(|p| p.as_str().to_owned()))
        .filter(|p| p.starts_with('/'))
        .unwrap_or_else(|| "/".to_owned())
}

/// Milliseconds since the Unix epoch (0 for a clock before 1970).
fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The shell around [`AlertRules`]; see the module docs. It holds the
/// probes weakly (the network holds them, and does not hold the actor at
/// all) and stops when the network is dropped or shut down.
pub struct AlertActor {
    probes: Weak<Probes>,
    rules: AlertRules,
    interval: Duration,
    webhook: Option<Webhook>,
    log: Arc<AlertLog>,
    /// A snapshot is being taken: the next tick is skipped rather than
    /// stacking a second one behind an actor that is slow to answer.
    evaluating: bool,
}

impl Actor for AlertActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, |act, ctx| act.tick(ctx));
    }
}

impl AlertActor {
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let Some(probes) = self.probes.upgrade() else {
            ctx.stop();
            return;
        };
        if probes.is_shutting_down() {
            ctx.stop();
            return;
        }
        if self.evaluating {
            return;
        }
        self.evaluating = true;
        // The snapshot asks every actor with a deadline of its own
        // (snapshot::SCRAPE_REPLY_TIMEOUT), so this future ends.
        let look = async move { AlertInput::from_snapshot(&super::snapshot::take(&probes).await) };
        ctx.spawn(look.into_actor(self).map(|input, act, ctx| {
            act.evaluating = false;
            act.evaluate(&input, ctx);
        }));
    }

    fn evaluate(&mut self, input: &AlertInput, ctx: &mut Context<Self>) {
        let now = tokio::time::Instant::now().into_std();
        let events = self.rules.evaluate(now, unix_millis(), input);
        for event in events {
            match event.state {
                AlertState::Firing => log::warn!(
                    "alert firing: {} {}: {}",
                    event.rule.name(),
                    event.subject,
                    event.message
                ),
                AlertState::Resolved => log::info!(
                    "alert resolved: {} {}: {}",
                    event.rule.name(),
                    event.subject,
                    event.message
                ),
            }
            self.post(&event);
            self.log.record(event);
        }
        // After the history: whoever sees the count grow sees its events.
        self.log.set_rule_counts(self.rules.counters());
        self.pump(ctx);
    }

    /// Queues the webhook POST of `event` (see [`WebhookQueue::push`]).
    fn post(&mut self, event: &AlertEvent) {
        let Some(webhook) = &mut self.webhook else {
            return;
        };
        if let Some(dropped) = webhook.queue.push(event.clone()) {
            self.log.webhook_dropped.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "alert webhook: {WEBHOOK_QUEUE} events already wait for it; event {} ({} {} {:?}) not sent",
                dropped.id,
                dropped.rule.name(),
                dropped.subject,
                dropped.state
            );
        }
    }

    /// Spawns the POSTs the queue lets go now; each one that ends calls
    /// this again.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let Some(webhook) = &mut self.webhook else {
            return;
        };
        while let Some(event) = webhook.queue.next() {
            // A POST is retried only when the caller says a repeat is
            // harmless; it is here: the receiver can tell a repeat by the
            // event's (`node`, `run`, `id`).
            let request = webhook
                .client
                .post(&webhook.path)
                .json(&event)
                .retry_non_idempotent();
            let AlertEvent {
                id, rule, subject, ..
            } = event;
            let send = async move { request.send().await };
            ctx.spawn(
                actix::fut::wrap_future::<_, Self>(send).map(move |result, act, ctx| {
                    if let Some(webhook) = &mut act.webhook {
                        webhook.queue.done(rule, &subject);
                    }
                    match result {
                        Ok(resp) if resp.status.is_success() => {
                            act.log.webhook_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(resp) => {
                            act.log.webhook_failed.fetch_add(1, Ordering::Relaxed);
                            log::warn!("alert webhook: event {id} answered {}", resp.status);
                        }
                        Err(e) => {
                            act.log.webhook_failed.fetch_add(1, Ordering::Relaxed);
                            log::warn!("alert webhook: event {id} not delivered: {e}");
                        }
                    }
                    act.pump(ctx);
                }),
            );
        }
    }
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

    fn breaker(state: BreakerStateKind, opened: u64, calls: u64, failures: u64) -> BreakerSnapshot {
        BreakerSnapshot {
            state,
            retry_after: None,
            calls,
            failures,
            rejections: 0,
            transitions: 0,
            opened,
        }
    }

    fn input(breaker: BreakerSnapshot) -> AlertInput {
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
            let b = BreakerSnapshot {
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
        let b = BreakerSnapshot {
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
    fn the_event_json_has_the_documented_shape() {
        let event = AlertEvent {
            rule: AlertRule::UpstreamErrorRate,
            subject: "openai".into(),
            state: AlertState::Resolved,
            value: 0.25,
            threshold: 0.5,
            at: 1_700_000_000_000,
            message: "m".into(),
            ..event(7, AlertRule::BreakerOpen, "x", AlertState::Firing)
        };
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            serde_json::json!({"id": 7, "node": "n1", "run": "r1",
                "rule": "upstream_error_rate", "subject": "openai",
                "state": "resolved", "value": 0.25, "threshold": 0.5,
                "at": 1_700_000_000_000u64, "message": "m"})
        );
    }

    fn event(id: u64, rule: AlertRule, subject: &str, state: AlertState) -> AlertEvent {
        AlertEvent {
            id,
            node: "n1".into(),
            run: "r1".into(),
            rule,
            subject: subject.into(),
            state,
            value: 1.0,
            threshold: 1.0,
            at: 0,
            message: String::new(),
        }
    }

    fn ids(events: &[AlertEvent]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    #[test]
    fn the_history_keeps_the_newest_and_its_tail_copies_only_the_tail() {
        let log = AlertLog::new(3);
        for id in 1..=4 {
            log.record(event(id, AlertRule::BreakerOpen, "up", AlertState::Firing));
        }
        assert_eq!(ids(&log.recent()), [2, 3, 4]);
        assert_eq!(ids(&log.recent_tail(2)), [3, 4]);
        assert_eq!(ids(&log.recent_tail(10)), [2, 3, 4]);
        assert!(log.recent_tail(0).is_empty());
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

    /// Takes what the queue lets go now.
    fn drain(queue: &mut WebhookQueue) -> Vec<AlertEvent> {
        std::iter::from_fn(|| queue.next()).collect()
    }

    #[test]
    fn a_burst_beyond_max_in_flight_waits_and_all_of_it_goes_out() {
        use AlertState::Firing;
        let mut q = WebhookQueue::new(4, WEBHOOK_QUEUE);
        for id in 1..=10 {
            assert!(q
                .push(event(
                    id,
                    AlertRule::BreakerOpen,
                    &format!("up{id}"),
                    Firing
                ))
                .is_none());
        }
        let first = drain(&mut q);
        assert_eq!(ids(&first), [1, 2, 3, 4]);
        // Each POST that ends lets one more go.
        q.done(AlertRule::BreakerOpen, "up2");
        assert_eq!(ids(&drain(&mut q)), [5]);
        for e in first.iter().filter(|e| e.id != 2) {
            q.done(e.rule, &e.subject);
        }
        assert_eq!(ids(&drain(&mut q)), [6, 7, 8]);
        for id in [5, 6, 7, 8] {
            q.done(AlertRule::BreakerOpen, &format!("up{id}"));
        }
        assert_eq!(ids(&drain(&mut q)), [9, 10]);
        assert!(q.pending.is_empty());
    }

    #[test]
    fn one_post_per_rule_and_subject_keeps_their_order() {
        use AlertState::{Firing, Resolved};
        let mut q = WebhookQueue::new(4, WEBHOOK_QUEUE);
        q.push(event(1, AlertRule::BreakerOpen, "a", Firing));
        q.push(event(2, AlertRule::BreakerOpen, "a", Resolved));
        q.push(event(3, AlertRule::UpstreamErrorRate, "a", Firing));
        q.push(event(4, AlertRule::BreakerOpen, "b", Firing));
        // The resolved of (breaker_open, a) waits behind its firing, which
        // may be retried with backoff; the others pass it.
        assert_eq!(ids(&drain(&mut q)), [1, 3, 4]);
        q.done(AlertRule::BreakerOpen, "b");
        assert!(drain(&mut q).is_empty());
        q.done(AlertRule::BreakerOpen, "a");
        assert_eq!(ids(&drain(&mut q)), [2]);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_firing_before_any_resolved() {
        use AlertState::{Firing, Resolved};
        let mut q = WebhookQueue::new(1, 3);
        let rule = AlertRule::BreakerOpen;
        q.push(event(1, rule, "a", Resolved));
        q.push(event(2, rule, "b", Firing));
        q.push(event(3, rule, "c", Firing));
        let dropped = q.push(event(4, rule, "d", Resolved)).unwrap();
        assert_eq!(dropped.id, 2);
        let dropped = q.push(event(5, rule, "e", Resolved)).unwrap();
        assert_eq!(dropped.id, 3);
        // Only resolved events wait: a new firing is the one dropped…
        assert_eq!(q.push(event(6, rule, "f", Firing)).unwrap().id, 6);
        // …and a new resolved pushes out the oldest resolved.
        assert_eq!(q.push(event(7, rule, "g", Resolved)).unwrap().id, 1);
        assert_eq!(
            ids(&q.pending.iter().cloned().collect::<Vec<_>>()),
            [4, 5, 7]
        );
    }

    #[test]
    fn the_webhook_path_keeps_the_query() {
        assert_eq!(webhook_path("http://h:1/hooks/a?k=v"), "/hooks/a?k=v");
        assert_eq!(webhook_path("http://h:1"), "/");
    }
}
