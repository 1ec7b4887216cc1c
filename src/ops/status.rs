//! `GET /status`: the node's state as one JSON document, for people — the
//! demo's operations panel polls it — rather than for scrapers.
//!
//! It is built from the same `Snapshot` that `/metrics` exposes and the
//! alert rules read, so the three views never disagree, plus the busiest
//! rooms (one extra question to the hub) and the newest alert events. An
//! actor that does not answer within [`SCRAPE_REPLY_TIMEOUT`] turns its
//! part into `null` instead of failing the request.
//!
//! Exposure: the same as `/metrics` (mounted beside it by
//! `Network::configure`; with `network.security.status_tokens` set it
//! needs `Authorization: Bearer <token>`) — counters, upstream names and
//! endpoints, and room names with member counts, which a presence frame
//! also shows. When `network.security.ws_tokens` is set, presence frames go
//! only to clients with a token, so `/status` then leaves the room names
//! out (`busiest` is empty; `count` stays). Unlike `/metrics` it is behind
//! the per-IP request limiter ([`crate::security::Security::api_guard`]),
//! because each request copies the hub's room table; loopback is exempt by
//! default. Either way a flood costs the hub at most one snapshot per
//! `network.security.snapshot_interval` (see [`super::snapshot`], "Floods").
//!
//! # Schema
//!
//! Counters (`*_total`, `calls`, `granted`, …) are running totals since
//! start: a rate is the difference of two polls over the difference of
//! their `time_ms`. `null` means "did not answer".
//!
//! ```text
//! {
//!   "time_ms": 1718000000000,          // when the snapshot was taken, ms since the Unix epoch
//!   "uptime_ms": 86400000,             // since Network::start
//!   "shutting_down": false,
//!   "connections": 12,                 // WebSockets holding a max_connections slot
//!   "max_connections": 1000,
//!   "sessions": 12,                    // registered with the hub       ┐
//!   "rooms": {"count": 3,              //                                │
//!             "busiest": [{"room": "lobby", "members": 9}, …]},  // ≤ 10 │ null when the
//!   "broadcasts_total": 812,           //                                │ hub did not
//!   "deliveries_total": 9240,          // frames queued for sessions     │ answer
//!   "evictions": {"heartbeat": 1, "slow_consumer": 0, "shutdown": 0},  │
//!   "closed": {"normal": 40, "too_big": 0, "rate": 1, "invalid": 0,   │
//!              "protocol": 0, "error": 0},  // sessions that closed ┘ themselves, by why
//!   "upstreams": [{                    // one per network.api_clients entry, by name
//!     "name": "openai", "endpoints": ["https://api.openai.com"],
//!     "breaker": {"state": "closed" | "open" | "half_open", "retry_after_ms": null,
//!                 "calls": 10, "failures": 1, "rejections": 0, "transitions": 0,
//!                 "opened": 0},
//!     "limiter": {"granted": 10, "denied": 0, "overflow": 0, "keys": 1},
//!     "pool": {"in_flight": 0, "queued": 0, "rejected_overloaded": 0,
//!              "sent_total": 10, "ejected_now": 0, "ejections": 0},
//!     "cache": {"hits": 0, "misses": 0, "stale_hits": 0, "revalidations": 0,
//!               "collapsed": 0, "entries": 0, "bytes": 0} | null (no cache)
//!   }],                                // breaker, limiter, pool: null when that actor did not answer
//!   "security": {"refusals": {"rate_limited": 0, …},  // by Refusal::kind, as in /metrics
//!                "ips_with_websockets": 1, "ips_with_connections": 2},
//!   "alerts": [AlertEvent, …],         // newest last, at most 20 (ops::alerts::AlertEvent)
//!   "cluster": null | {                // null on a single node (no network.cluster)
//!     "node": "a1b2…", "link_up": true, "link_down_ms": 0, "last_error": null,
//!     "published": 10, "received": 20, "skipped_own": 10, "duplicates": 0,
//!     "lost_outbound": 0, "lost_inbound": 0, "replayed": 0, "malformed": 0,
//!     "dropped_inbound": 0, "reconnects": 0, "positioned_own": 0,
//!     "unpositioned": 0, "backfilled": 0, "outbox": 0, "peers": 2,
//!     "remote_sessions": 7
//!   }                                  // crate::realtime::cluster::ClusterStats
//! }
//! ```

use super::alerts::AlertEvent;
use super::snapshot::{take, Snapshot, UpstreamSnapshot, SCRAPE_REPLY_TIMEOUT};
use super::{OpsState, Probes};
use crate::realtime::cluster::ClusterStats;
use crate::security::SecurityStats;
use actix_web::http::header;
use actix_web::{web, HttpResponse};
use happynet_actors::{BreakerStateKind, ClosedCounts, GetOccupancy, Occupancy, RoomName};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How many rooms `rooms.busiest` lists: enough for a panel, and the
/// document stays small however many rooms exist (up to
/// `websocket.max_rooms`).
pub const BUSIEST_ROOMS: usize = 10;

/// How many alert events `alerts` carries at most (the newest).
/// `network.alerts.history` bounds what is kept; this bounds what one
/// response carries.
pub const MAX_ALERTS: usize = 20;

/// The `/status` document; see the [module docs](self) for its shape.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// When the snapshot was taken, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Milliseconds since `Network::start`.
    pub uptime_ms: u64,
    /// True once `Network::shutdown` has begun.
    pub shutting_down: bool,
    /// WebSocket connections open now.
    pub connections: usize,
    /// `network.websocket.max_connections`.
    pub max_connections: usize,
    /// Sessions registered with the hub; `None` if the hub did not answer.
    pub sessions: Option<usize>,
    /// How many rooms exist and the busiest of them; `None` if the hub did
    /// not answer.
    pub rooms: Option<Rooms>,
    /// Broadcasts the hub has handled.
    pub broadcasts_total: Option<u64>,
    /// Frames the hub has queued for sessions.
    pub deliveries_total: Option<u64>,
    /// Sessions the hub closed, by reason.
    pub evictions: Option<Evictions>,
    /// Sessions that closed their own connection, by why.
    pub closed: Option<ClosedCounts>,
    /// One entry per configured API client, by name.
    pub upstreams: Vec<UpstreamStatus>,
    /// The flood and abuse guards.
    pub security: SecurityStatus,
    /// The newest alert events, oldest first, at most [`MAX_ALERTS`].
    pub alerts: Vec<AlertEvent>,
    /// The cluster bridge's counters; `None` (JSON `null`) on a single
    /// node or when the bridge did not answer.
    pub cluster: Option<ClusterStats>,
}

/// `rooms`: the count and the busiest few.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rooms {
    /// Rooms that exist now.
    pub count: usize,
    /// At most [`BUSIEST_ROOMS`] rooms, most members first (ties by name).
    pub busiest: Vec<RoomCount>,
}

/// One room and its member count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomCount {
    /// The room's name.
    pub room: String,
    /// Sessions in it.
    pub members: usize,
}

/// Sessions the hub closed itself, by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Evictions {
    /// Stopped answering pings within `client_timeout`.
    pub heartbeat: u64,
    /// Stopped reading (over `max_outbound_bytes` or a full mailbox).
    pub slow_consumer: u64,
    /// Closed by a graceful shutdown.
    pub shutdown: u64,
}

/// One API client's breaker, limiter, pool and cache.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    /// The client's name (`network.api_clients.<name>`).
    pub name: String,
    /// Its base URLs.
    pub endpoints: Vec<String>,
    /// `None` if the breaker did not answer.
    pub breaker: Option<BreakerStatus>,
    /// `None` if the limiter did not answer.
    pub limiter: Option<LimiterStatus>,
    /// `None` if the pool did not answer.
    pub pool: Option<PoolStatus>,
    /// `None` when the client has no cache.
    pub cache: Option<CacheStatus>,
}

/// A breaker's state and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BreakerStatus {
    /// `"closed"`, `"open"` or `"half_open"` (the `state` label of
    /// `happynet_breaker_state`).
    pub state: &'static str,
    /// For an open breaker, milliseconds until it lets a probe through.
    pub retry_after_ms: Option<u64>,
    /// Calls admitted.
    pub calls: u64,
    /// Failures reported.
    pub failures: u64,
    /// Calls refused.
    pub rejections: u64,
    /// State changes.
    pub transitions: u64,
    /// Times it opened.
    pub opened: u64,
}

/// A rate limiter's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LimiterStatus {
    /// Calls admitted.
    pub granted: u64,
    /// Calls refused by their key's rate.
    pub denied: u64,
    /// Calls from new keys refused because the key table was full.
    pub overflow: u64,
    /// Keys tracked now.
    pub keys: usize,
}

/// A pool's bulkhead and endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PoolStatus {
    /// Calls running now.
    pub in_flight: usize,
    /// Calls waiting for a slot now.
    pub queued: usize,
    /// Calls refused because the bulkhead was full.
    pub rejected_overloaded: u64,
    /// Calls sent, all endpoints together.
    pub sent_total: u64,
    /// Endpoints ejected now.
    pub ejected_now: usize,
    /// Endpoint ejections so far.
    pub ejections: u64,
}

/// A response cache's counters and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CacheStatus {
    /// Lookups answered fresh.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Stale responses served because the upstream failed.
    pub stale_hits: u64,
    /// Stale entries revalidated by a 304.
    pub revalidations: u64,
    /// Calls collapsed into an identical call in flight.
    pub collapsed: u64,
    /// Entries cached now.
    pub entries: usize,
    /// Bytes cached now.
    pub bytes: usize,
}

/// The flood and abuse guards' refusals and tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityStatus {
    /// Refusals by reason ([`crate::security::Refusal::kind`]).
    pub refusals: BTreeMap<&'static str, u64>,
    /// Client IPs with a WebSocket open now.
    pub ips_with_websockets: usize,
    /// Client IPs with a TCP connection open now.
    pub ips_with_connections: usize,
}

/// Collects the node's status now: the metrics snapshot, the room
/// occupancy and the recent alerts, asked for at once. Never fails: a part
/// whose actor does not answer is `None`.
pub async fn collect(probes: &Probes) -> Status {
    // Request/response with a deadline, like the scrape itself.
    // Room names are for the clients allowed in: with WebSocket tokens
    // configured, an unauthenticated /status shows the count, not the names.
    let occupancy = async {
        if !probes.room_names_public {
            return Some(Occupancy::default());
        }
        probes
            .hub
            .send(GetOccupancy)
            .timeout(SCRAPE_REPLY_TIMEOUT)
            .await
            .map_err(|e| log::warn!("status: the hub's occupancy did not arrive: {e}"))
            .ok()
    };
    let (snap, occupancy) = futures::join!(take(probes), occupancy);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    build(
        &snap,
        occupancy,
        probes.alerts.recent_tail(MAX_ALERTS),
        now,
        probes.uptime(),
    )
}

/// Saturating milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The document from what was collected; plain code, unit-tested below.
fn build(
    snap: &Snapshot,
    occupancy: Option<Occupancy>,
    alerts: Vec<AlertEvent>,
    now: Duration,
    uptime: Duration,
) -> Status {
    let hub = snap.hub.as_ref();
    let rooms = hub.map(|h| Rooms {
        count: h.rooms,
        busiest: occupancy
            .map(|o| busiest(o.rooms, BUSIEST_ROOMS))
            .unwrap_or_default(),
    });
    let skip = alerts.len().saturating_sub(MAX_ALERTS);
    Status {
        time_ms: millis(now),
        uptime_ms: millis(uptime),
        shutting_down: snap.shutting_down,
        connections: snap.connections,
        max_connections: snap.max_connections,
        sessions: hub.map(|h| h.sessions),
        rooms,
        broadcasts_total: hub.map(|h| h.broadcasts),
        deliveries_total: hub.map(|h| h.deliveries),
        evictions: hub.map(|h| Evictions {
            heartbeat: h.evicted_heartbeat,
            slow_consumer: h.evicted_slow_consumer,
            shutdown: h.closed_by_shutdown,
        }),
        closed: hub.map(|h| h.closed.clone()),
        upstreams: snap.upstreams.iter().map(upstream).collect(),
        security: security(&snap.security),
        alerts: alerts.into_iter().skip(skip).collect(),
        cluster: snap.cluster.clone(),
    }
}

/// The `limit` rooms with the most members, most first, ties by name so
/// that the panel's order is stable between polls. Selects before sorting:
/// linear in the number of rooms, not `n log n`.
fn busiest(mut rooms: Vec<(RoomName, usize)>, limit: usize) -> Vec<RoomCount> {
    let order = |a: &(RoomName, usize), b: &(RoomName, usize)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    if limit == 0 {
        return Vec::new();
    }
    if rooms.len() > limit {
        rooms.select_nth_unstable_by(limit - 1, order);
        rooms.truncate(limit);
    }
    rooms.sort_unstable_by(order);
    rooms
        .into_iter()
        .map(|(room, members)| RoomCount {
            room: room.as_str().to_owned(),
            members,
        })
        .collect()
}

fn upstream(u: &UpstreamSnapshot) -> UpstreamStatus {
    UpstreamStatus {
        name: u.name.clone(),
        endpoints: u.endpoints.clone(),
        breaker: u.breaker.as_ref().map(|b| BreakerStatus {
            state: match b.state {
                BreakerStateKind::Closed => "closed",
                BreakerStateKind::Open => "open",
                BreakerStateKind::HalfOpen => "half_open",
            },
            retry_after_ms: b.retry_after.map(millis),
            calls: b.calls,
            failures: b.failures,
            rejections: b.rejections,
            transitions: b.transitions,
            opened: b.opened,
        }),
        limiter: u.limiter.as_ref().map(|l| LimiterStatus {
            granted: l.granted,
            denied: l.denied,
            overflow: l.overflow,
            keys: l.keys,
        }),
        pool: u.pool.as_ref().map(|p| PoolStatus {
            in_flight: p.in_flight,
            queued: p.queued,
            rejected_overloaded: p.rejected_overloaded,
            sent_total: p.sent_per_endpoint.iter().sum(),
            ejected_now: p.ejected_now,
            ejections: p.ejections,
        }),
        cache: u.cache.as_ref().map(|c| CacheStatus {
            hits: c.counters.hits,
            misses: c.counters.misses,
            stale_hits: c.counters.stale_hits,
            revalidations: c.counters.revalidations,
            collapsed: c.collapsed,
            entries: c.entries,
            bytes: c.bytes,
        }),
    }
}

fn security(s: &SecurityStats) -> SecurityStatus {
    SecurityStatus {
        refusals: s.refusals().into_iter().collect(),
        ips_with_websockets: s.ips_with_websockets,
        ips_with_connections: s.ips_with_connections,
    }
}

/// `GET /status`: `200` with the [`Status`] document, never cached by
/// the client. The document comes through the network's snapshot gate
/// (see [`super::snapshot`], "Floods"): taken after the request arrived,
/// shared with the requests that arrived with it.
pub(crate) async fn status_route(ops: web::Data<OpsState>) -> HttpResponse {
    let body = ops
        .status
        .get(|| async {
            // A `Status` is plain data; serializing it cannot fail.
            serde_json::to_vec(&collect(&ops.probes).await)
                .map(web::Bytes::from)
                .unwrap_or_default()
        })
        .await;
    HttpResponse::Ok()
        // A dashboard polls it: a cached copy would freeze the panel.
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type(mime::APPLICATION_JSON)
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::alerts::{AlertRule, AlertState};
    use happynet_actors::pool::PoolStats;
    use happynet_actors::{BreakerStats, HubStats, LimiterStats};

    fn room(name: &str) -> RoomName {
        RoomName::new(name).expect("valid room name")
    }

    fn snap() -> Snapshot {
        Snapshot {
            shutting_down: false,
            connections: 2,
            max_connections: 10,
            hub: None,
            upstreams: Vec::new(),
            security: SecurityStats::default(),
            alerts: Default::default(),
            cluster: None,
        }
    }

    fn alert(at: u64) -> AlertEvent {
        AlertEvent {
            id: at + 1,
            rule: AlertRule::BreakerOpen,
            subject: "up".into(),
            state: AlertState::Firing,
            value: 1.0,
            threshold: 1.0,
            at,
            message: "up: breaker open".into(),
            node: "n".into(),
            run: "r".into(),
        }
    }

    #[test]
    fn busiest_rooms_are_bounded_and_ordered_by_members_then_name() {
        let rooms: Vec<_> = (0..50)
            .map(|i| (room(&format!("r{i:02}")), i % 7))
            .collect();
        let top = busiest(rooms, 4);
        let got: Vec<_> = top.iter().map(|r| (r.room.as_str(), r.members)).collect();
        assert_eq!(got, [("r06", 6), ("r13", 6), ("r20", 6), ("r27", 6)]);
        let few = busiest(vec![(room("b"), 1), (room("a"), 1), (room("c"), 3)], 10);
        let got: Vec<_> = few.iter().map(|r| r.room.as_str()).collect();
        assert_eq!(got, ["c", "a", "b"]);
        assert!(busiest(vec![(room("a"), 1)], 0).is_empty());
    }

    #[test]
    fn a_silent_hub_gives_nulls_not_zeros() {
        let status = build(
            &snap(),
            None,
            Vec::new(),
            Duration::from_secs(5),
            Duration::ZERO,
        );
        let v = serde_json::to_value(&status).expect("serializes");
        assert_eq!(v["time_ms"], 5000);
        assert_eq!(v["connections"], 2);
        assert_eq!(v["max_connections"], 10);
        for key in [
            "sessions",
            "rooms",
            "deliveries_total",
            "evictions",
            "cluster",
        ] {
            assert!(v[key].is_null(), "{key}: {v}");
        }
        assert_eq!(v["security"]["refusals"]["rate_limited"], 0);
        assert_eq!(v["alerts"], serde_json::json!([]));
    }

    #[test]
    fn the_document_carries_the_snapshot_and_the_newest_alerts() {
        let snapshot = Snapshot {
            hub: Some(HubStats {
                sessions: 3,
                rooms: 2,
                broadcasts: 4,
                deliveries: 9,
                evicted_slow_consumer: 1,
                ..HubStats::default()
            }),
            upstreams: vec![UpstreamSnapshot {
                name: "up".into(),
                endpoints: vec!["http://a".into(), "http://b".into()],
                pool: Some(PoolStats {
                    sent_per_endpoint: vec![2, 3],
                    ..PoolStats::default()
                }),
                breaker: Some(BreakerStats {
                    state: BreakerStateKind::HalfOpen,
                    retry_after: None,
                    calls: 5,
                    failures: 2,
                    rejections: 1,
                    transitions: 2,
                    opened: 1,
                }),
                limiter: Some(LimiterStats {
                    denied: 7,
                    ..LimiterStats::default()
                }),
                cache: None,
                flights: None,
                calls: Default::default(),
            }],
            ..snap()
        };
        let occupancy = Occupancy {
            sessions: 3,
            rooms: vec![(room("lobby"), 3), (room("games"), 1)],
        };
        let alerts: Vec<_> = (0..MAX_ALERTS as u64 + 5).map(alert).collect();
        let status = build(
            &snapshot,
            Some(occupancy),
            alerts,
            Duration::from_secs(1),
            Duration::from_millis(1500),
        );
        let v = serde_json::to_value(&status).expect("serializes");
        assert_eq!(v["uptime_ms"], 1500);
        assert_eq!(v["sessions"], 3);
        assert_eq!(
            v["rooms"],
            serde_json::json!({"count": 2, "busiest": [
                {"room": "lobby", "members": 3}, {"room": "games", "members": 1}]})
        );
        assert_eq!(v["deliveries_total"], 9);
        assert_eq!(v["evictions"]["slow_consumer"], 1);
        let up = &v["upstreams"][0];
        assert_eq!(up["breaker"]["state"], "half_open");
        assert_eq!(up["limiter"]["denied"], 7);
        assert_eq!(up["pool"]["sent_total"], 5);
        assert!(up["cache"].is_null());
        let alerts = v["alerts"].as_array().expect("alerts");
        assert_eq!(alerts.len(), MAX_ALERTS);
        assert_eq!(alerts[MAX_ALERTS - 1]["at"], MAX_ALERTS as u64 + 4);
        assert_eq!(alerts[0]["state"], "firing");
    }
}
