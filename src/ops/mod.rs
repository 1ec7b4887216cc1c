//! What an operator watches: one snapshot of the node, three views of it,
//! and the alerts that read it too.
//!
//! | file | what |
//! |---|---|
//! | [`snapshot`] | `Snapshot`: one look at every actor's counters, asked for at once with a deadline each; and the `SnapshotGate` that spaces looks out under a flood |
//! | [`metrics`] | `GET /metrics`: the snapshot in the Prometheus text format (the family table is there) |
//! | [`status`] | `GET /status`: the snapshot as one JSON document for people (the schema is there) |
//! | [`readiness`] | `GET /ready`: whether the node should get traffic |
//! | [`alerts`] | rules over the same snapshot that fire and resolve, logged and POSTed to a webhook |
//!
//! Because `/metrics`, `/status` and the alert rules read one `Snapshot`
//! type, taken by one function, the three never disagree about the node.
//!
//! None of them reads `Network`. Each takes a [`Probes`]: the handles and
//! addresses a look at the node needs (the hub, the connection gate, the
//! upstreams, the guards, the cluster bridge, the alert log), which
//! `Network::start` builds. The routes read an [`OpsState`] (the probes
//! and the snapshot gates), registered as app data by `Network::configure`.

pub mod alerts;
pub mod metrics;
pub mod readiness;
pub mod snapshot;
pub mod status;

use crate::realtime::cluster::ClusterBridge;
use crate::security::Security;
use crate::upstream::Upstreams;
use actix::Addr;
use alerts::events::AlertLog;
use happynet_actors::{BroadcastHub, ConnectionGate};
use snapshot::SnapshotGate;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a look at the node reads: handles to the parts that keep counters,
/// and the few settings that decide what a view shows. Built once by
/// `Network::start`; the alert actor holds it weakly, so that it stops with
/// the network.
pub struct Probes {
    /// The hub: its `GetHubStats` and `GetOccupancy`.
    pub(crate) hub: Addr<BroadcastHub>,
    /// When the hub was created (what `uptime_ms` counts from).
    pub(crate) started: tokio::time::Instant,
    /// The WebSocket connection slots: open and maximum.
    pub(crate) gate: Arc<ConnectionGate>,
    /// Set once `Network::shutdown` has begun.
    pub(crate) shutting_down: Arc<AtomicBool>,
    /// The upstreams; the configured API clients are the ones exposed.
    pub(crate) upstreams: Arc<Upstreams>,
    /// The guards' counters.
    pub(crate) security: Security,
    /// The cluster bridge, with `network.cluster`.
    pub(crate) cluster: Option<Addr<ClusterBridge>>,
    /// The alerts' history and counters.
    pub(crate) alerts: Arc<AlertLog>,
    /// Whether `/status` may list room names: not when WebSocket tokens
    /// are configured (presence is then only for clients with a token).
    pub(crate) room_names_public: bool,
    /// `network.cluster.ready_requires_link`: whether `/ready` fails while
    /// the link to Redis is down.
    pub(crate) ready_requires_link: bool,
}

impl Probes {
    /// True once `Network::shutdown` has begun.
    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// How long ago the hub was created.
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// What the ops routes (`/metrics`, `/status`, `/ready`) read: the probes,
/// and the gates that space out the snapshots behind `/metrics` and
/// `/status` (see [`snapshot`], "Floods").
pub struct OpsState {
    /// The handles a look reads.
    pub(crate) probes: Arc<Probes>,
    /// The encoded exposition, or the encoder's error.
    pub(crate) metrics: SnapshotGate<Result<actix_web::web::Bytes, String>>,
    /// The `/status` document, serialized.
    pub(crate) status: SnapshotGate<actix_web::web::Bytes>,
}

impl OpsState {
    /// The state for `probes`, with gates `snapshot_interval` apart
    /// (`network.security.snapshot_interval`).
    pub(crate) fn new(probes: Probes, snapshot_interval: Duration) -> Self {
        OpsState {
            probes: Arc::new(probes),
            metrics: SnapshotGate::new(snapshot_interval),
            status: SnapshotGate::new(snapshot_interval),
        }
    }

    /// The probes, for [`metrics::render`], [`status::collect`] and
    /// [`readiness::readiness`].
    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// How many snapshots `/metrics` and `/status` have taken so far.
    pub fn snapshots_taken(&self) -> SnapshotsTaken {
        SnapshotsTaken {
            metrics: self.metrics.taken(),
            status: self.status.taken(),
        }
    }
}

/// How many snapshots `/metrics` and `/status` have taken: what a flood of
/// either costs the hub (`Network::snapshots_taken`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotsTaken {
    /// For `/metrics`.
    pub metrics: u64,
    /// For `/status`.
    pub status: u64,
}
