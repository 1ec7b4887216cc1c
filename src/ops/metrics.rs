//! `GET /metrics`: the node's `Snapshot` in the Prometheus text format,
//! mounted by `Network::configure`.
//!
//! Metrics are **collected at scrape time**. The actors already keep
//! counters for their own status messages (`GetHubStats`, `GetPoolStats`,
//! `GetBreakerStats`, `GetLimiterStats`), the cache and the security guards
//! keep theirs in plain fields and atomics, and each `Upstream` counts its
//! calls in a [`CallStats`] behind an uncontended lock, so a scrape asks
//! each of them for a snapshot and copies the numbers into a fresh
//! `prometheus-client` [`Registry`]. The hot paths pay almost nothing for
//! being measured: the fan-out adds one histogram observation per broadcast
//! (plain fields the hub owns), an upstream call one lock per attempt and
//! one per call; no messages, no per-delivery work.
//!
//! The two latency histograms are counted by their owners in the fixed
//! buckets of [`happynet_actors::histogram`] (50 µs to 10 s, and `+Inf`)
//! and handed to the encoder as they are: `_bucket{le=..}`, `_sum` (seconds)
//! and `_count`, the standard Prometheus histogram.
//!
//! A fresh registry per scrape means a counter starts at 0, so
//! `inc_by(total)` exposes the actor's running total; gauges are `set`.
//! Every question to an actor is a `send(..).timeout(`[`SCRAPE_REPLY_TIMEOUT`](super::snapshot::SCRAPE_REPLY_TIMEOUT)`)`
//! ([`super::snapshot`]):
//! an actor that does not answer in time (or has stopped) makes its families
//! disappear from that scrape instead of failing or stalling it.
//!
//! # Metric names
//!
//! All names start with `happynet_`; counters end in `_total` (the encoder
//! appends it). Labels: `upstream` (the API client's name), `endpoint` (its
//! base URL), `reason`, `state`, `outcome`, `class`.
//!
//! | Family | Type | Labels |
//! |---|---|---|
//! | `happynet_shutting_down` | gauge | |
//! | `happynet_ws_connections`, `happynet_ws_max_connections` | gauge | |
//! | `happynet_ws_sessions`, `happynet_ws_rooms` | gauge | |
//! | `happynet_ws_peak_session_queued_bytes` | gauge | |
//! | `happynet_ws_sessions_opened_total` | counter | |
//! | `happynet_ws_sessions_closed_total` | counter | `reason` = `normal`, `too_big`, `rate`, `invalid`, `protocol`, `error` (the session closed its connection), `heartbeat`, `slow_consumer` (evicted by the hub), `shutdown` |
//! | `happynet_ws_broadcasts_total`, `happynet_ws_deliveries_total`, `happynet_ws_dropped_deliveries_total` | counter | |
//! | `happynet_ws_broadcast_duration_seconds` | histogram (construction of a `Broadcast` to the end of its fan-out) | |
//! | `happynet_hub_queued_broadcasts` | gauge (broadcasts not yet handled: the hub's mailbox depth for them) | |
//! | `happynet_upstream_requests_total` | counter (calls by how they ended) | `upstream`, `outcome` = `ok`, `cache_hit`, `fallback`, `cancelled`, or an [`crate::HttpError::kind`]: `timeout`, `connect`, `status`, `breaker_open`, `rate_limited`, `overloaded`, `transport`, `decode`, `invalid_request`, `missing_secret`, `internal` (see [`crate::upstream::CallOutcome`]) |
//! | `happynet_upstream_responses_total` | counter (every attempt's response) | `upstream`, `class` = `1xx` … `5xx`, `other` |
//! | `happynet_upstream_request_duration_seconds` | histogram (whole calls, retries and waits included; a streamed call (`call_stream`, e.g. SSE) is timed and counted `ok` when its response head arrives, so a stream that breaks later still counts as `ok`; fresh cache hits and cancelled calls are not timed) | `upstream` |
//! | `happynet_upstream_retries_total`, `happynet_upstream_retry_budget_exhausted_total` | counter (attempts after the first; retries the budget refused) | `upstream` |
//! | `happynet_upstream_in_flight`, `happynet_upstream_queued` | gauge | `upstream` |
//! | `happynet_upstream_rejected_overloaded_total` | counter | `upstream` |
//! | `happynet_upstream_cancelled_in_flight_total`, `happynet_upstream_abandoned_in_queue_total` | counter (calls whose caller went away: aborted in flight; dropped from the queue unsent) | `upstream` |
//! | `happynet_upstream_sent_total` | counter | `upstream`, `endpoint` |
//! | `happynet_upstream_ejections_total` | counter | `upstream` |
//! | `happynet_upstream_stream_write_timeouts_total` | counter (streamed calls cut off because their reader took nothing for the stream write timeout: their connection and bulkhead slot were freed) | `upstream` |
//! | `happynet_upstream_endpoints_ejected` | gauge | `upstream` |
//! | `happynet_breaker_state` | gauge (1 for the current state) | `upstream`, `state` = `closed`, `open`, `half_open` |
//! | `happynet_breaker_calls_total`, `_failures_total`, `_rejections_total`, `_transitions_total` | counter | `upstream` |
//! | `happynet_limiter_keys` | gauge | `upstream` |
//! | `happynet_limiter_granted_total`, `_refunded_total`, `_denied_total`, `_overflow_total`, `_evicted_total` | counter | `upstream` |
//! | `happynet_cache_hits_total`, `_misses_total`, `_stale_lookups_total`, `_stale_hits_total`, `_revalidations_total`, `_stores_total`, `_not_stored_total`, `_evictions_total` | counter | `upstream` |
//! | `happynet_cache_entries`, `happynet_cache_bytes` | gauge | `upstream` |
//! | `happynet_upstream_collapsed_total` | counter | `upstream` |
//! | `happynet_cache_flights_abandoned_total`, `happynet_cache_flights_refused_total` | counter (collapsed calls whose leader went away; callers refused beyond the waiter bound) | `upstream` |
//! | `happynet_security_refusals_total` | counter | `reason` (a [`crate::security::Refusal::kind`]) |
//! | `happynet_security_ips_with_websockets`, `happynet_security_ips_with_connections` | gauge | |
//! | `happynet_limiter_shared_decisions_total`, `happynet_limiter_fallbacks_total` | counter | `upstream` |
//! | `happynet_alert_events_total` | counter | `state` = `firing`, `resolved` |
//! | `happynet_alert_suppressed_total`, `happynet_alert_evaluations_total` | counter | |
//! | `happynet_alert_webhook_posts_total` | counter | `outcome` = `sent`, `failed`, `dropped` |
//! | `happynet_cluster_link_up`, `happynet_cluster_outbox`, `happynet_cluster_peers`, `happynet_cluster_remote_sessions` | gauge (only with `network.cluster`) | |
//! | `happynet_cluster_published_total`, `_received_total`, `_replayed_total`, `_duplicates_total`, `_malformed_total`, `_reconnects_total`, `_positioned_own_total`, `_unpositioned_total`, `_backfilled_total` | counter (only with `network.cluster`) | |
//! | `happynet_cluster_lost_total` | counter (only with `network.cluster`) | `direction` = `outbound`, `inbound`, `dropped_inbound` |
//!
//! Only the configured API clients (`network.api_clients`) are exposed, not
//! the per-origin upstreams of the plain `HttpClient`, whose number is bounded
//! only by `network.http.max_origins` and whose names are whatever URLs app
//! code calls.
//!
//! The body is the Prometheus text format 0.0.4, served as
//! [`CONTENT_TYPE`] (`text/plain; version=0.0.4; charset=utf-8`).
//!
//! # Floods
//!
//! Scrapes share snapshots through the `SnapshotGate`
//! of [`OpsState`] (see [`super::snapshot`], "Floods"). With
//! `network.security.metrics_tokens` set, `/metrics` needs
//! `Authorization: Bearer <token>` (Prometheus' `authorization` setting).

use super::alerts::events::AlertCounters;
use super::snapshot::{take, Snapshot, UpstreamSnapshot};
use super::{OpsState, Probes};
use crate::realtime::cluster::ClusterStats;
use crate::security::SecurityStats;
use crate::upstream::CacheStats;
use crate::upstream::CallStats;
use actix_web::{web, HttpResponse};
use happynet_actors::pool::PoolStats;
use happynet_actors::single_flight::FlightCounters;
use happynet_actors::{BreakerStateKind, BreakerStats, Histogram, HubStats, LimiterStats};
use prometheus_client::encoding::{prometheus_text, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of `/metrics`: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The labels of one sample: `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;

/// One metric read from one part of an upstream's snapshot: its name, its
/// help text, and how to get its value.
type Reading<'a, P, V> = (&'a str, &'a str, fn(&P) -> V);

/// The breaker states, with their `state` label values.
const BREAKER_STATES: [(BreakerStateKind, &str); 3] = [
    (BreakerStateKind::Closed, "closed"),
    (BreakerStateKind::Open, "open"),
    (BreakerStateKind::HalfOpen, "half_open"),
];

/// Saturating conversion for gauges, which prometheus-client keeps as `i64`.
fn gauge_value(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Labelled histograms already counted elsewhere, as one Prometheus
/// histogram family.
///
/// prometheus-client's own `Histogram` is built from observations; ours are
/// counted by their owners (the hub, each upstream) in fixed buckets, so this
/// hands their buckets to the encoder as they are: `_bucket{le=..}` for
/// every bound of [`happynet_actors::histogram::LATENCY_BOUNDS_SECONDS`] and
/// `+Inf`, `_sum` in seconds, `_count`.
#[derive(Debug)]
struct HistogramFamily(Vec<(Labels, Histogram)>);

impl HistogramFamily {
    /// The encoder's input: `(upper bound, observations in that bucket
    /// alone)` — it makes them cumulative itself — ending with `+Inf`.
    fn buckets(h: &Histogram) -> Vec<(f64, u64)> {
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = h
            .cumulative()
            .map(|(bound, cumulative)| {
                let alone = cumulative - below;
                below = cumulative;
                (bound, alone)
            })
            .collect();
        buckets.push((f64::INFINITY, h.count().saturating_sub(below)));
        buckets
    }
}

impl EncodeMetric for HistogramFamily {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        for (labels, h) in &self.0 {
            encoder
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(
                    h.sum_seconds(),
                    h.count(),
                    &Self::buckets(h),
                    None,
                )?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A fresh registry being filled from one [`Snapshot`].
struct Exposition {
    registry: Registry,
}

impl Exposition {
    /// An unlabelled counter; `name` without `_total` (the encoder adds it).
    fn counter(&mut self, name: &str, help: &str, value: u64) {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    fn gauge(&mut self, name: &str, help: &str, value: i64) {
        let gauge = Gauge::<i64>::default();
        gauge.set(value);
        self.registry.register(name, help, gauge);
    }

    /// A labelled counter family, one sample per `(labels, value)`.
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) {
        let family = Family::<Labels, Counter<u64>>::default();
        for (labels, value) in samples {
            family.get_or_create(&labels).inc_by(value);
        }
        self.registry.register(name, help, family);
    }

    /// A histogram family, one histogram per `(labels, histogram)`.
    fn histograms(&mut self, name: &str, help: &str, samples: Vec<(Labels, Histogram)>) {
        self.registry.register(name, help, HistogramFamily(samples));
    }

    /// A labelled gauge family, one sample per `(labels, value)`.
    fn gauges(&mut self, name: &str, help: &str, samples: impl IntoIterator<Item = (Labels, i64)>) {
        let family = Family::<Labels, Gauge<i64>>::default();
        for (labels, value) in samples {
            family.get_or_create(&labels).set(value);
        }
        self.registry.register(name, help, family);
    }

    /// A family with one sample per upstream that reported `part`, labelled
    /// `upstream`; left out entirely when none did.
    fn per_upstream<P>(
        &mut self,
        upstreams: &[UpstreamSnapshot],
        part: impl Fn(&UpstreamSnapshot) -> Option<&P>,
        counters: &[Reading<'_, P, u64>],
        gauges: &[Reading<'_, P, i64>],
    ) {
        let reported: Vec<(Labels, &P)> = upstreams
            .iter()
            .filter_map(|u| part(u).map(|p| (vec![("upstream", u.name.clone())], p)))
            .collect();
        if reported.is_empty() {
            return;
        }
        for (name, help, value) in counters {
            let samples = reported.iter().map(|(l, p)| (l.clone(), value(p)));
            self.counters(name, help, samples);
        }
        for (name, help, value) in gauges {
            let samples = reported.iter().map(|(l, p)| (l.clone(), value(p)));
            self.gauges(name, help, samples);
        }
    }

    fn hub(&mut self, hub: &HubStats) {
        self.gauge(
            "happynet_ws_sessions",
            "WebSocket sessions registered with the hub now.",
            gauge_value(hub.sessions),
        );
        self.gauge(
            "happynet_ws_rooms",
            "Rooms that exist now.",
            gauge_value(hub.rooms),
        );
        self.gauge(
            "happynet_ws_peak_session_queued_bytes",
            "The largest byte backlog any session has had.",
            gauge_value(hub.peak_session_queued_bytes),
        );
        self.counter(
            "happynet_ws_sessions_opened",
            "WebSocket sessions ever registered.",
            hub.sessions_opened,
        );
        let reason = |r: &str| vec![("reason", r.to_owned())];
        let closed = &hub.closed;
        self.counters(
            "happynet_ws_sessions_closed",
            "WebSocket sessions closed, by reason: normal, too_big, rate, invalid, protocol, \
             error (the session ended its connection), heartbeat and slow_consumer (evicted \
             by the hub), shutdown.",
            [
                (reason("normal"), closed.normal),
                (reason("too_big"), closed.too_big),
                (reason("rate"), closed.rate),
                (reason("invalid"), closed.invalid),
                (reason("protocol"), closed.protocol),
                (reason("error"), closed.error),
                (reason("heartbeat"), hub.evicted_heartbeat),
                (reason("slow_consumer"), hub.evicted_slow_consumer),
                (reason("shutdown"), hub.closed_by_shutdown),
            ],
        );
        self.counter(
            "happynet_ws_broadcasts",
            "Broadcast messages handled (from app code, HTTP and clients).",
            hub.broadcasts,
        );
        self.counter(
            "happynet_ws_deliveries",
            "Frames queued for sessions.",
            hub.deliveries,
        );
        self.counter(
            "happynet_ws_dropped_deliveries",
            "Frames not queued: the session was a slow consumer (and was evicted) or had gone.",
            hub.dropped,
        );
        self.histograms(
            "happynet_ws_broadcast_duration_seconds",
            "Time from a broadcast's construction to the end of its fan-out (the wait in the \
             hub's mailbox included).",
            vec![(Vec::new(), hub.broadcast_latency.clone())],
        );
        self.gauge(
            "happynet_hub_queued_broadcasts",
            "Broadcasts built and not yet handled by the hub (its mailbox depth for broadcasts).",
            gauge_value(hub.queued_broadcasts),
        );
        self.counter(
            "happynet_ws_replayed",
            "Messages replayed to reconnecting clients from the rooms' history.",
            hub.replayed,
        );
        self.counter(
            "happynet_ws_recoveries_incomplete",
            "Recoveries answered complete:false (the history did not cover the gap, or the \
             epoch differed).",
            hub.recoveries_incomplete,
        );
        self.gauge(
            "happynet_ws_history_rooms",
            "Rooms with a history now.",
            gauge_value(hub.history_rooms),
        );
        self.gauge(
            "happynet_ws_history_bytes",
            "Bytes the rooms' history counts against websocket.history.max_bytes.",
            gauge_value(hub.history_bytes),
        );
    }

    fn upstreams(&mut self, upstreams: &[UpstreamSnapshot]) {
        self.calls(upstreams);
        self.per_upstream(
            upstreams,
            |u| u.pool.as_ref(),
            &[
                (
                    "happynet_upstream_rejected_overloaded",
                    "Calls refused because the bulkhead was full.",
                    |p: &PoolStats| p.rejected_overloaded,
                ),
                (
                    "happynet_upstream_ejections",
                    "Endpoint ejections so far.",
                    |p: &PoolStats| p.ejections,
                ),
                (
                    "happynet_upstream_stream_write_timeouts",
                    "Streamed calls abandoned because their reader stopped reading for the \
                     stream write timeout.",
                    |p: &PoolStats| p.stream_write_timeouts,
                ),
                (
                    "happynet_upstream_cancelled_in_flight",
                    "Calls in flight aborted because their caller went away.",
                    |p: &PoolStats| p.cancelled,
                ),
                (
                    "happynet_upstream_abandoned_in_queue",
                    "Queued calls dropped unsent because their caller went away.",
                    |p: &PoolStats| p.abandoned_in_queue,
                ),
            ],
            &[
                ("happynet_upstream_in_flight", "Calls running now.", |p| {
                    gauge_value(p.in_flight)
                }),
                (
                    "happynet_upstream_queued",
                    "Calls waiting for a bulkhead slot now.",
                    |p| gauge_value(p.queued),
                ),
                (
                    "happynet_upstream_endpoints_ejected",
                    "Endpoints ejected now.",
                    |p| gauge_value(p.ejected_now),
                ),
            ],
        );
        let sent: Vec<(Labels, u64)> = upstreams
            .iter()
            .filter_map(|u| u.pool.as_ref().map(|p| (u, p)))
            .flat_map(|(u, p)| {
                p.sent_per_endpoint.iter().enumerate().map(|(i, &n)| {
                    let endpoint = u.endpoints.get(i).cloned().unwrap_or_else(|| i.to_string());
                    (
                        vec![("upstream", u.name.clone()), ("endpoint", endpoint)],
                        n,
                    )
                })
            })
            .collect();
        if !sent.is_empty() {
            self.counters("happynet_upstream_sent", "Calls sent, per endpoint.", sent);
        }

        self.per_upstream(
            upstreams,
            |u| u.breaker.as_ref(),
            &[
                (
                    "happynet_breaker_calls",
                    "Calls the breaker admitted.",
                    |b: &BreakerStats| b.calls,
                ),
                (
                    "happynet_breaker_failures",
                    "Failures reported to the breaker.",
                    |b: &BreakerStats| b.failures,
                ),
                (
                    "happynet_breaker_rejections",
                    "Calls the breaker refused.",
                    |b: &BreakerStats| b.rejections,
                ),
                (
                    "happynet_breaker_transitions",
                    "Breaker state changes.",
                    |b: &BreakerStats| b.transitions,
                ),
            ],
            &[],
        );
        let states: Vec<(Labels, i64)> = upstreams
            .iter()
            .filter_map(|u| u.breaker.as_ref().map(|b| (u, b)))
            .flat_map(|(u, b)| {
                BREAKER_STATES.iter().map(move |(kind, label)| {
                    (
                        vec![("upstream", u.name.clone()), ("state", (*label).to_owned())],
                        i64::from(b.state == *kind),
                    )
                })
            })
            .collect();
        if !states.is_empty() {
            self.gauges(
                "happynet_breaker_state",
                "1 for the state the breaker is in, 0 for the others.",
                states,
            );
        }

        self.per_upstream(
            upstreams,
            |u| u.limiter.as_ref(),
            &[
                (
                    "happynet_limiter_granted",
                    "Calls the rate limiter admitted.",
                    |l: &LimiterStats| l.granted,
                ),
                (
                    "happynet_limiter_refunded",
                    "Admissions given back because their request was never sent.",
                    |l: &LimiterStats| l.refunded,
                ),
                (
                    "happynet_limiter_denied",
                    "Calls the rate limiter refused by their key's rate.",
                    |l: &LimiterStats| l.denied,
                ),
                (
                    "happynet_limiter_overflow",
                    "Calls from new keys refused because the key table was full.",
                    |l: &LimiterStats| l.overflow,
                ),
                (
                    "happynet_limiter_evicted",
                    "Idle limiter keys evicted.",
                    |l: &LimiterStats| l.evicted,
                ),
                (
                    "happynet_limiter_shared_decisions",
                    "Decisions made by the cluster-wide (Redis) limit.",
                    |l: &LimiterStats| l.shared,
                ),
                (
                    "happynet_limiter_fallbacks",
                    "Decisions made by the configured fallback because Redis was unreachable.",
                    |l: &LimiterStats| l.fallbacks,
                ),
            ],
            &[("happynet_limiter_keys", "Limiter keys tracked now.", |l| {
                gauge_value(l.keys)
            })],
        );

        type Cache = CacheStats;
        self.per_upstream(
            upstreams,
            |u| u.cache.as_ref(),
            &[
                (
                    "happynet_cache_hits",
                    "Cache lookups answered fresh.",
                    |c: &Cache| c.counters.hits,
                ),
                (
                    "happynet_cache_misses",
                    "Cache lookups that found nothing.",
                    |c: &Cache| c.counters.misses,
                ),
                (
                    "happynet_cache_stale_lookups",
                    "Cache lookups that found a stale entry (a conditional request follows).",
                    |c: &Cache| c.counters.stale_lookups,
                ),
                (
                    "happynet_cache_stale_hits",
                    "Stale responses served because the upstream failed.",
                    |c: &Cache| c.counters.stale_hits,
                ),
                (
                    "happynet_cache_revalidations",
                    "Stale entries revalidated by a 304.",
                    |c: &Cache| c.counters.revalidations,
                ),
                ("happynet_cache_stores", "Responses stored.", |c: &Cache| {
                    c.counters.stores
                }),
                (
                    "happynet_cache_not_stored",
                    "Responses offered to the cache and not stored.",
                    |c: &Cache| c.counters.not_stored,
                ),
                (
                    "happynet_cache_evictions",
                    "Entries evicted to respect the cache's size limits.",
                    |c: &Cache| c.counters.evictions,
                ),
                (
                    "happynet_upstream_collapsed",
                    "Calls collapsed into an identical call already in flight.",
                    |c: &Cache| c.collapsed,
                ),
            ],
            &[
                ("happynet_cache_entries", "Entries cached now.", |c| {
                    gauge_value(c.entries)
                }),
                ("happynet_cache_bytes", "Bytes cached now.", |c| {
                    gauge_value(c.bytes)
                }),
            ],
        );
        self.per_upstream(
            upstreams,
            |u| u.flights.as_ref(),
            &[
                (
                    "happynet_cache_flights_abandoned",
                    "Collapsed calls whose leader went away (cancelled, deadline); \
                     their waiters were released to call again.",
                    |f: &FlightCounters| f.abandoned,
                ),
                (
                    "happynet_cache_flights_refused",
                    "Calls refused because too many identical calls already waited.",
                    |f: &FlightCounters| f.refused,
                ),
            ],
            &[],
        );
    }

    /// The upstreams' own call counters ([`CallStats`]).
    fn calls(&mut self, upstreams: &[UpstreamSnapshot]) {
        if upstreams.is_empty() {
            return;
        }
        let labelled = |u: &UpstreamSnapshot, key: &'static str, value: &str| {
            vec![("upstream", u.name.clone()), (key, value.to_owned())]
        };
        let requests: Vec<(Labels, u64)> = upstreams
            .iter()
            .flat_map(|u| {
                u.calls
                    .requests_by_outcome()
                    .map(move |(o, n)| (labelled(u, "outcome", o.as_str()), n))
            })
            .collect();
        self.counters(
            "happynet_upstream_requests",
            "Calls by how they ended: ok, cache_hit, fallback, cancelled, or the error kind \
             (timeout, connect, status, breaker_open, rate_limited, overloaded, transport, ...).",
            requests,
        );
        let responses: Vec<(Labels, u64)> = upstreams
            .iter()
            .flat_map(|u| {
                u.calls
                    .responses_by_class()
                    .map(move |(class, n)| (labelled(u, "class", class), n))
            })
            .collect();
        self.counters(
            "happynet_upstream_responses",
            "Responses received, every attempt's, by status class.",
            responses,
        );
        self.per_upstream(
            upstreams,
            |u| Some(&u.calls),
            &[
                (
                    "happynet_upstream_retries",
                    "Attempts after the first.",
                    |c: &CallStats| c.retries,
                ),
                (
                    "happynet_upstream_retry_budget_exhausted",
                    "Retries wanted but refused by the retry budget.",
                    |c: &CallStats| c.retry_budget_exhausted,
                ),
            ],
            &[],
        );
        self.histograms(
            "happynet_upstream_request_duration_seconds",
            "Duration of whole calls, retries and waits included, up to the response \
             head for streamed calls (fresh cache hits and cancelled calls are not timed).",
            upstreams
                .iter()
                .map(|u| (vec![("upstream", u.name.clone())], u.calls.latency.clone()))
                .collect(),
        );
    }

    fn alerts(&mut self, a: &AlertCounters) {
        let event = |s: &str| vec![("state", s.to_owned())];
        self.counters(
            "happynet_alert_events",
            "Alert events, by state (firing or resolved).",
            [(event("firing"), a.fired), (event("resolved"), a.resolved)],
        );
        self.counter(
            "happynet_alert_suppressed",
            "Alert conditions that came true during their rule's hold time and fired nothing.",
            a.suppressed,
        );
        self.counter(
            "happynet_alert_evaluations",
            "Looks at the node the alert rules have judged.",
            a.evaluations,
        );
        let outcome = |s: &str| vec![("outcome", s.to_owned())];
        self.counters(
            "happynet_alert_webhook_posts",
            "Alert webhook POSTs by outcome: sent (2xx), failed (after retries), dropped (the waiting queue was full).",
            [
                (outcome("sent"), a.webhook_sent),
                (outcome("failed"), a.webhook_failed),
                (outcome("dropped"), a.webhook_dropped),
            ],
        );
    }

    fn cluster(&mut self, c: &ClusterStats) {
        self.gauge(
            "happynet_cluster_link_up",
            "1 while the link to Redis is up.",
            i64::from(c.link_up),
        );
        for (name, help, value) in [
            (
                "happynet_cluster_published",
                "Local broadcasts published to the cluster stream.",
                c.published,
            ),
            (
                "happynet_cluster_received",
                "Broadcasts from other nodes handed to the hub.",
                c.received,
            ),
            (
                "happynet_cluster_replayed",
                "Received broadcasts that were published while the link was down.",
                c.replayed,
            ),
            (
                "happynet_cluster_duplicates",
                "Stream entries read twice and dropped.",
                c.duplicates,
            ),
            (
                "happynet_cluster_malformed",
                "Stream entries that could not be decoded.",
                c.malformed,
            ),
            (
                "happynet_cluster_reconnects",
                "Times the link to Redis came back.",
                c.reconnects,
            ),
            (
                "happynet_cluster_positioned_own",
                "Own room broadcasts numbered by Redis and delivered here from the stream (history on).",
                c.positioned_own,
            ),
            (
                "happynet_cluster_unpositioned",
                "Own room broadcasts delivered with this node's own numbers because the link was down (history on).",
                c.unpositioned,
            ),
            (
                "happynet_cluster_backfilled",
                "Messages read back from the stream into the history at start-up (history on).",
                c.backfilled,
            ),
        ] {
            self.counter(name, help, value);
        }
        let direction = |s: &str| vec![("direction", s.to_owned())];
        self.counters(
            "happynet_cluster_lost",
            "Broadcasts lost between nodes: outbound (dropped from a full outbox), inbound (gaps in other nodes' sequences), dropped_inbound (refused by a full hub mailbox).",
            [
                (direction("outbound"), c.lost_outbound),
                (direction("inbound"), c.lost_inbound),
                (direction("dropped_inbound"), c.dropped_inbound),
            ],
        );
        self.gauge(
            "happynet_cluster_outbox",
            "Local broadcasts waiting for the link to Redis.",
            gauge_value(c.outbox),
        );
        self.gauge(
            "happynet_cluster_peers",
            "Other nodes seen in the last presence round.",
            gauge_value(c.peers),
        );
        self.gauge(
            "happynet_cluster_remote_sessions",
            "Sessions on the other nodes, as of the last presence round.",
            gauge_value(c.remote_sessions),
        );
    }

    fn security(&mut self, s: &SecurityStats) {
        let reason = |r: &str| vec![("reason", r.to_owned())];
        // The reasons are `Refusal::kind`, the `error` field clients see.
        self.counters(
            "happynet_security_refusals",
            "Connections, upgrades and requests refused by the flood and abuse guards, by reason.",
            [
                (reason("rate_limited"), s.requests_rate_limited),
                (reason("connection_rate_limited"), s.upgrades_rate_limited),
                (
                    reason("too_many_connections_from_ip"),
                    s.upgrades_over_ip_cap,
                ),
                (
                    reason("too_many_tcp_connections_from_ip"),
                    s.connections_over_ip_cap,
                ),
                (reason("token_required"), s.upgrades_token_required),
                (reason("invalid_token"), s.upgrades_token_invalid),
                (
                    reason("subprotocol_required"),
                    s.upgrades_subprotocol_required,
                ),
                (reason("origin_not_allowed"), s.upgrades_origin_not_allowed),
                (reason("request_body_timeout"), s.request_body_timeouts),
                (reason("limiter_unavailable"), s.limiter_unavailable),
            ],
        );
        self.gauge(
            "happynet_security_ips_with_websockets",
            "Client IPs with a WebSocket open now.",
            gauge_value(s.ips_with_websockets),
        );
        self.gauge(
            "happynet_security_ips_with_connections",
            "Client IPs with a TCP connection open now.",
            gauge_value(s.ips_with_connections),
        );
    }
}

/// Encodes `snapshot` in the Prometheus text format.
fn encode(snapshot: &Snapshot) -> Result<String, std::fmt::Error> {
    let mut exp = Exposition {
        registry: Registry::default(),
    };
    exp.gauge(
        "happynet_shutting_down",
        "1 once a graceful shutdown has begun.",
        i64::from(snapshot.shutting_down),
    );
    exp.gauge(
        "happynet_ws_connections",
        "WebSocket connections open now (holding a max_connections slot).",
        gauge_value(snapshot.connections),
    );
    exp.gauge(
        "happynet_ws_max_connections",
        "network.websocket.max_connections.",
        gauge_value(snapshot.max_connections),
    );
    if let Some(hub) = &snapshot.hub {
        exp.hub(hub);
    }
    exp.upstreams(&snapshot.upstreams);
    exp.security(&snapshot.security);
    exp.alerts(&snapshot.alerts);
    if let Some(cluster) = &snapshot.cluster {
        exp.cluster(cluster);
    }
    let mut body = String::new();
    prometheus_text::encode(&mut body, &exp.registry)?;
    Ok(body)
}

/// Collects every actor's counters now and renders them in the Prometheus
/// text format ([`CONTENT_TYPE`]); what `GET /metrics` serves. Never fails
/// for an actor that does not answer: its families are left out.
pub async fn render(probes: &Probes) -> Result<String, std::fmt::Error> {
    encode(&take(probes).await)
}

/// `GET /metrics`.
pub(crate) async fn metrics_route(ops: web::Data<OpsState>) -> HttpResponse {
    let rendered = ops
        .metrics
        .get(|| async {
            render(&ops.probes)
                .await
                .map(actix_web::web::Bytes::from)
                .map_err(|e| e.to_string())
        })
        .await;
    match rendered {
        Ok(body) => HttpResponse::Ok()
            .insert_header((actix_web::http::header::CONTENT_TYPE, CONTENT_TYPE))
            .body(body),
        Err(e) => {
            log::error!("metrics: encoding failed: {e}");
            HttpResponse::InternalServerError().finish()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::CallOutcome;
    use std::time::Duration;

    fn empty() -> Snapshot {
        Snapshot {
            shutting_down: false,
            connections: 0,
            max_connections: 10,
            hub: None,
            upstreams: Vec::new(),
            security: SecurityStats::default(),
            alerts: AlertCounters::default(),
            cluster: None,
        }
    }

    #[test]
    fn a_missing_hub_answer_leaves_out_only_the_hub_families() {
        let body = encode(&empty()).expect("encodes");
        assert!(!body.contains("happynet_ws_sessions "), "{body}");
        assert!(body.contains("happynet_ws_max_connections 10"), "{body}");
        assert!(body.contains("happynet_security_refusals_total{reason=\"rate_limited\"} 0"));
        assert!(!body.contains("happynet_breaker_state"), "{body}");
    }

    #[test]
    fn counters_expose_totals_with_the_total_suffix() {
        let snapshot = Snapshot {
            hub: Some(HubStats {
                sessions: 3,
                deliveries: 42,
                evicted_heartbeat: 1,
                ..HubStats::default()
            }),
            ..empty()
        };
        let body = encode(&snapshot).expect("encodes");
        assert!(
            body.contains("# TYPE happynet_ws_deliveries_total counter"),
            "{body}"
        );
        assert!(body.contains("happynet_ws_deliveries_total 42"), "{body}");
        assert!(body.contains("happynet_ws_sessions 3"), "{body}");
        assert!(body.contains("happynet_ws_sessions_closed_total{reason=\"heartbeat\"} 1"));
    }

    /// Parses `body` with the same Prometheus parser the integration test
    /// uses, so the histogram lines are checked by a real reader.
    fn parse(body: &str) -> prometheus_parse::Scrape {
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .expect("valid exposition")
    }

    #[test]
    fn call_counters_and_the_latency_histogram_are_exposed_per_upstream() {
        let mut calls = CallStats::default();
        calls.ended(CallOutcome::Ok, Some(Duration::from_millis(3)));
        calls.ended(CallOutcome::Status, Some(Duration::from_millis(40)));
        calls.ended(CallOutcome::Status, Some(Duration::from_secs(30)));
        calls.ended(CallOutcome::CacheHit, None);
        calls.responded(actix_web::http::StatusCode::OK);
        calls.responded(actix_web::http::StatusCode::BAD_GATEWAY);
        calls.retries = 2;
        calls.retry_budget_exhausted = 1;
        let snapshot = Snapshot {
            upstreams: vec![UpstreamSnapshot {
                name: "up".into(),
                endpoints: Vec::new(),
                pool: None,
                breaker: None,
                limiter: None,
                cache: None,
                flights: None,
                calls,
            }],
            ..empty()
        };
        let body = encode(&snapshot).expect("encodes");
        assert!(
            body.contains("happynet_upstream_requests_total{upstream=\"up\",outcome=\"status\"} 2"),
            "{body}"
        );
        assert!(body
            .contains("happynet_upstream_requests_total{upstream=\"up\",outcome=\"cache_hit\"} 1"));
        assert!(body
            .contains("happynet_upstream_requests_total{upstream=\"up\",outcome=\"timeout\"} 0"));
        assert!(body.contains("happynet_upstream_responses_total{upstream=\"up\",class=\"5xx\"} 1"));
        assert!(body.contains("happynet_upstream_retries_total{upstream=\"up\"} 2"));
        assert!(body.contains("happynet_upstream_retry_budget_exhausted_total{upstream=\"up\"} 1"));
        assert!(
            body.contains("# TYPE happynet_upstream_request_duration_seconds histogram"),
            "{body}"
        );

        let scrape = parse(&body);
        let histogram = scrape
            .samples
            .iter()
            .find(|s| s.metric == "happynet_upstream_request_duration_seconds")
            .expect("the histogram");
        assert_eq!(histogram.labels.get("upstream"), Some("up"));
        let prometheus_parse::Value::Histogram(buckets) = &histogram.value else {
            panic!("not a histogram: {histogram:?}");
        };
        let count_at = |le: f64| {
            buckets
                .iter()
                .find(|b| b.less_than == le)
                .map(|b| b.count)
                .unwrap_or_else(|| panic!("no le={le} bucket in {buckets:?}"))
        };
        // Cumulative: 3 ms, then 40 ms, then 30 s beyond the last bound.
        assert_eq!(count_at(0.001), 0.0);
        assert_eq!(count_at(0.005), 1.0);
        assert_eq!(count_at(0.05), 2.0);
        assert_eq!(count_at(10.0), 2.0);
        assert_eq!(count_at(f64::INFINITY), 3.0);
        assert_eq!(buckets.len(), 17, "16 bounds and +Inf");
        let value = |name: &str| {
            scrape
                .samples
                .iter()
                .find(|s| s.metric == name)
                .map(|s| match s.value {
                    prometheus_parse::Value::Untyped(v) => v,
                    ref other => panic!("{name}: {other:?}"),
                })
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(
            value("happynet_upstream_request_duration_seconds_count"),
            3.0
        );
        let sum = value("happynet_upstream_request_duration_seconds_sum");
        assert!((sum - 30.043).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn the_hub_exposes_closes_by_reason_its_queue_and_broadcast_latency() {
        let mut hub = HubStats {
            queued_broadcasts: 4,
            evicted_slow_consumer: 2,
            ..HubStats::default()
        };
        hub.closed.normal = 5;
        hub.closed.too_big = 1;
        hub.broadcast_latency.observe(Duration::from_micros(40));
        let body = encode(&Snapshot {
            hub: Some(hub),
            ..empty()
        })
        .expect("encodes");
        for line in [
            "happynet_hub_queued_broadcasts 4",
            "happynet_ws_sessions_closed_total{reason=\"normal\"} 5",
            "happynet_ws_sessions_closed_total{reason=\"too_big\"} 1",
            "happynet_ws_sessions_closed_total{reason=\"rate\"} 0",
            "happynet_ws_sessions_closed_total{reason=\"slow_consumer\"} 2",
            "happynet_ws_broadcast_duration_seconds_bucket{le=\"5e-05\"} 1",
            "happynet_ws_broadcast_duration_seconds_bucket{le=\"+Inf\"} 1",
            "happynet_ws_broadcast_duration_seconds_count 1",
        ] {
            assert!(body.contains(line), "{line} missing from {body}");
        }
        assert!(!body.contains("reason=\"client\""), "{body}");
    }
}
