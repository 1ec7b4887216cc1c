//! [`AlertActor`], the shell around the rules: every
//! `network.alerts.interval_ms` it takes the node's snapshot, feeds it to
//! [`AlertRules`], logs and records each event and hands it to the
//! webhook's queue; and `AlertsSetup`, what `Network::start` builds
//! before the actor can start.

use super::events::{AlertEvent, AlertLog, AlertState};
use super::rules::{AlertInput, AlertRules};
use super::webhook::{webhook_path, Webhook, WebhookQueue, WEBHOOK_QUEUE};
use crate::config::{ConfigError, NetworkConfig};
use crate::ops::snapshot;
use crate::ops::Probes;
use crate::upstream::{ApiClient, Upstreams};
use actix::prelude::*;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
            actor: Some((rules, config.interval.0, webhook)),
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
        let look = async move { AlertInput::from_snapshot(&snapshot::take(&probes).await) };
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
