//! What the alerts produce and keep: the rule and state names, the event
//! a firing or resolving is, the running counters, and the bounded history
//! the network and the views read without waiting for the actor.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
    /// Random hex drawn once per process start (see [`run_id`](super::run_id)): tells the
    /// events of a restarted node from those of its past self.
    pub run: String,
    /// The rule.
    pub rule: AlertRule,
    /// What the rule is about: the API client's name for the per-upstream
    /// rules, [`HUB_SUBJECT`](super::HUB_SUBJECT) or
    /// [`WEBSOCKET_SUBJECT`](super::WEBSOCKET_SUBJECT) for the others.
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
    /// Events not POSTed because [`WEBHOOK_QUEUE`](super::WEBHOOK_QUEUE) events were already
    /// waiting.
    pub webhook_dropped: u64,
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
    pub(super) webhook_sent: AtomicU64,
    pub(super) webhook_failed: AtomicU64,
    pub(super) webhook_dropped: AtomicU64,
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

    pub(super) fn record(&self, event: AlertEvent) {
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

    pub(super) fn set_rule_counts(&self, counters: AlertCounters) {
        self.evaluations
            .store(counters.evaluations, Ordering::Relaxed);
        self.fired.store(counters.fired, Ordering::Relaxed);
        self.resolved.store(counters.resolved, Ordering::Relaxed);
        self.suppressed
            .store(counters.suppressed, Ordering::Relaxed);
    }
}

/// An event for the unit tests of the history and the webhook queue.
#[cfg(test)]
pub(super) fn test_event(id: u64, rule: AlertRule, subject: &str, state: AlertState) -> AlertEvent {
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

/// The ids of `events`, in order.
#[cfg(test)]
pub(super) fn ids(events: &[AlertEvent]) -> Vec<u64> {
    events.iter().map(|e| e.id).collect()
}

#[cfg(test)]
mod tests {
    use super::test_event as event;
    use super::*;

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
}
