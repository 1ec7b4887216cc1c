//! The webhook's side of the alerts: the queue of events waiting for a
//! POST slot and the POSTs out, as a plain state machine the actor drives,
//! and the webhook's client.

use super::events::{AlertEvent, AlertRule, AlertState};
use crate::upstream::ApiClient;
use std::collections::{HashSet, VecDeque};

/// Events that may wait for a webhook POST slot. Each look adds at most a
/// few events per API client, so this covers a long webhook outage; beyond
/// it the oldest `firing` is dropped first (see the module docs).
pub const WEBHOOK_QUEUE: usize = 256;

/// The events waiting for a webhook POST and the POSTs out: the webhook's
/// state machine, without I/O. [`AlertActor`] pushes each event, asks
/// [`WebhookQueue::next`] for what to POST now and reports each POST that
/// ended with [`WebhookQueue::done`].
#[derive(Debug)]
pub(super) struct WebhookQueue {
    capacity: usize,
    max_in_flight: usize,
    /// Waiting events, oldest first.
    pending: VecDeque<AlertEvent>,
    /// The (rule, subject) of every POST out now; one POST per key at most,
    /// so its length is the number in flight.
    in_flight: HashSet<(AlertRule, String)>,
}

impl WebhookQueue {
    pub(super) fn new(max_in_flight: usize, capacity: usize) -> Self {
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
    pub(super) fn push(&mut self, event: AlertEvent) -> Option<AlertEvent> {
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
    pub(super) fn next(&mut self) -> Option<AlertEvent> {
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
    pub(super) fn done(&mut self, rule: AlertRule, subject: &str) {
        self.in_flight.remove(&(rule, subject.to_owned()));
    }
}

/// The webhook's client and its queue.
pub(super) struct Webhook {
    /// The client of the webhook's upstream.
    pub(super) client: ApiClient,
    /// The URL's path and query, POSTed to on the webhook's origin.
    pub(super) path: String,
    /// The events waiting and the POSTs out.
    pub(super) queue: WebhookQueue,
}

/// The path and query of a validated webhook URL.
pub(super) fn webhook_path(url: &str) -> String {
    url.parse::<actix_web::http::Uri>()
        .ok()
        .and_then(|u| u.path_and_query().map(|p| p.as_str().to_owned()))
        .filter(|p| p.starts_with('/'))
        .unwrap_or_else(|| "/".to_owned())
}

#[cfg(test)]
mod tests {
    use super::super::events::{ids, test_event as event};
    use super::*;

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
