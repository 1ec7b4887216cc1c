//! `GET /ready`: whether the node should get traffic — not shutting down,
//! the hub answering within [`READY_REPLY_TIMEOUT`], and, with
//! `network.cluster` (unless `ready_requires_link` is false), the link to
//! Redis up. Never rate limited, never behind a token: a load balancer asks.

use super::{OpsState, Probes};
use crate::realtime::cluster::GetClusterStats;
use actix_web::{web, HttpResponse};
use happynet_actors::GetHubStats;
use serde_json::json;
use std::time::Duration;

/// How long `/ready` waits for the hub. A hub that cannot answer a status
/// message this fast cannot serve clients either.
pub const READY_REPLY_TIMEOUT: Duration = Duration::from_millis(500);

/// Why the network is not ready; see [`readiness`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotReady {
    /// `Network::shutdown` has been called.
    ShuttingDown,
    /// The broadcast hub did not answer within [`READY_REPLY_TIMEOUT`], or
    /// has stopped.
    HubUnavailable(String),
    /// `network.cluster` is configured and the link to Redis is down (or
    /// the bridge did not answer): broadcasts would not reach the other
    /// nodes.
    ClusterLinkDown(String),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::ShuttingDown => f.write_str("shutting down"),
            NotReady::HubUnavailable(e) => write!(f, "broadcast hub unavailable: {e}"),
            NotReady::ClusterLinkDown(e) => write!(f, "cluster link down: {e}"),
        }
    }
}

/// Whether the network should get traffic: not shutting down, the hub
/// answers a status request within [`READY_REPLY_TIMEOUT`], and, with
/// `network.cluster`, the link to Redis is up.
pub async fn readiness(probes: &Probes) -> Result<(), NotReady> {
    if probes.is_shutting_down() {
        return Err(NotReady::ShuttingDown);
    }
    // Request/response with a deadline: a hub with a backed-up
    // mailbox is as good as a stopped one for a load balancer's purposes.
    probes
        .hub
        .send(GetHubStats)
        .timeout(READY_REPLY_TIMEOUT)
        .await
        .map_err(|e| NotReady::HubUnavailable(e.to_string()))?;
    // With a cluster, the link to Redis must be up, unless the operator
    // chose not to gate readiness on it.
    if let Some(bridge) = probes
        .cluster
        .as_ref()
        .filter(|_| probes.ready_requires_link)
    {
        let stats = bridge
            .send(GetClusterStats)
            .timeout(READY_REPLY_TIMEOUT)
            .await
            .map_err(|e| NotReady::ClusterLinkDown(format!("the bridge did not answer: {e}")))?;
        if !stats.link_up {
            return Err(NotReady::ClusterLinkDown(format!(
                "down for {} ms ({})",
                stats.link_down_ms,
                stats.last_error.as_deref().unwrap_or("not connected yet")
            )));
        }
    }
    Ok(())
}

/// `GET /ready`: `200 {"ready": true}` or `503 {"ready": false, "reason": …}`.
pub(crate) async fn ready_route(ops: web::Data<OpsState>) -> HttpResponse {
    match readiness(&ops.probes).await {
        Ok(()) => HttpResponse::Ok().json(json!({ "ready": true })),
        Err(reason) => HttpResponse::ServiceUnavailable()
            .json(json!({ "ready": false, "reason": reason.to_string() })),
    }
}
