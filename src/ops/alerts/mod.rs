//! Alerts (`network.alerts`): rules over the node's own counters that fire
//! and resolve, are logged, kept in a bounded history and, when a webhook is
//! configured, POSTed as JSON through the upstream stack.
//!
//! The parts, in the workspace's usual shape, one file each:
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
//! | `breaker_open` | API client | its breaker opened since the last look (counted by `BreakerStats::opened`, so an open that closed in between is seen), or it is not closed | it is closed and did not open since the last look |
//! | `upstream_error_rate` | API client | failures ÷ calls over `window_ms` ≥ `threshold`, with ≥ `min_calls` calls; a call the open breaker refused counts as a failed call | the ratio is below, or calls are too few |
//! | `slow_consumer_evictions` | `hub` | ≥ `per_minute` slow consumers evicted in the last minute | fewer |
//! | `connections_near_max` | `websocket` | open WebSockets ≥ `ratio × max_connections` | fewer |
//!
//! | file | what |
//! |---|---|
//! | [`events`] | what comes out: [`AlertRule`], [`AlertState`], [`AlertEvent`], [`AlertCounters`], and the history the network reads |
//! | [`rules`] | the state machine [`AlertRules`] and what it reads, [`AlertInput`] |
//! | [`webhook`] | the webhook's queue of events and POSTs out, without I/O |
//! | [`actor`] | [`AlertActor`], the shell: the timer, the snapshot, the log lines and the POSTs |

pub mod actor;
pub mod events;
pub mod rules;
pub mod webhook;

pub use actor::AlertActor;
pub(crate) use actor::AlertsSetup;
pub(crate) use events::AlertLog;
pub use events::{AlertCounters, AlertEvent, AlertRule, AlertState};
pub use rules::{run_id, AlertInput, AlertRules, UpstreamReading, HUB_SUBJECT, WEBSOCKET_SUBJECT};
pub use webhook::WEBHOOK_QUEUE;
