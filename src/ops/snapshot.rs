//! One look at the node, and the gate that spaces looks out.
//!
//! `take` asks every part that keeps counters for them at once — the hub,
//! each configured API client's pool, breaker and limiter (and reads its
//! cache and call stats), the cluster bridge, the guards and the alert log —
//! each question with a deadline of [`SCRAPE_REPLY_TIMEOUT`]. An actor that
//! does not answer in time (or has stopped) leaves its part `None`: the views
//! leave it out instead of failing or stalling. The result, a `Snapshot`,
//! is what `/metrics`, `/status` and the alert rules all read.
//!
//! # Floods
//!
//! A look asks the hub and every upstream's actors, so a flood of
//! `/metrics` (or `/status`) requests must not become a flood of questions
//! to them. Each of those views goes through a `SnapshotGate`: snapshots
//! are taken one at a time and at least `network.security.snapshot_interval`
//! apart (default 0.25 s), and every request that arrives before a snapshot
//! begins is answered with that snapshot. So whatever the request rate, the
//! hub hears at most one question per view per interval, and no answer is
//! older than its request. `Network::snapshots_taken` counts them.

use super::alerts::events::AlertCounters;
use super::Probes;
use crate::realtime::cluster::{ClusterStats, GetClusterStats};
use crate::security::SecurityStats;
use crate::upstream::ApiClient;
use crate::upstream::{CacheStats, CallStats};
use actix::MailboxError;
use futures::future::join_all;
use happynet_actors::pool::{GetPoolStats, PoolStats};
use happynet_actors::single_flight::FlightCounters;
use happynet_actors::{
    BreakerStats, GetBreakerStats, GetHubStats, GetLimiterStats, HubStats, LimiterStats,
};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How long a scrape waits for each actor's snapshot. Short, because a
/// Prometheus scrape has its own timeout (10 s by default) and one stuck
/// actor must not cost the others' numbers.
pub const SCRAPE_REPLY_TIMEOUT: Duration = Duration::from_millis(500);

/// Everything one scrape learned; a `None` is an actor that did not answer.
/// Also what the alert rules and the `/status` page read, so that the three
/// views of the node never disagree.
pub(crate) struct Snapshot {
    pub(crate) shutting_down: bool,
    pub(crate) connections: usize,
    pub(crate) max_connections: usize,
    pub(crate) hub: Option<HubStats>,
    pub(crate) upstreams: Vec<UpstreamSnapshot>,
    pub(crate) security: SecurityStats,
    /// What the alert rules and their webhook have done.
    pub(crate) alerts: AlertCounters,
    /// The cluster bridge's counters; `None` on a single node (or when the
    /// bridge did not answer).
    pub(crate) cluster: Option<ClusterStats>,
}

/// What one API client's actors and cache reported.
pub(crate) struct UpstreamSnapshot {
    pub(crate) name: String,
    pub(crate) endpoints: Vec<String>,
    pub(crate) pool: Option<PoolStats>,
    pub(crate) breaker: Option<BreakerStats>,
    pub(crate) limiter: Option<LimiterStats>,
    /// The cache's counters, collapsed calls, entries and bytes.
    pub(crate) cache: Option<CacheStats>,
    /// What the cache's single-flight did; `None` without a cache.
    pub(crate) flights: Option<FlightCounters>,
    /// What the calls did; kept by the `Upstream` itself, so always there.
    pub(crate) calls: CallStats,
}

/// Logs a status request that went unanswered and turns it into `None`.
fn answered<T>(what: &str, reply: Result<T, MailboxError>) -> Option<T> {
    match reply {
        Ok(v) => Some(v),
        Err(e) => {
            log::warn!("snapshot: {what} did not answer: {e}; its part is left out");
            None
        }
    }
}

async fn upstream_snapshot(client: ApiClient) -> UpstreamSnapshot {
    let up = client.upstream();
    let name = client.name().to_owned();
    // Request/response with a deadline: the pool, breaker and
    // limiter run on the upstream arbiter; all three are asked at once.
    let (pool, breaker, limiter) = futures::join!(
        up.pool().send(GetPoolStats).timeout(SCRAPE_REPLY_TIMEOUT),
        up.breaker()
            .send(GetBreakerStats)
            .timeout(SCRAPE_REPLY_TIMEOUT),
        up.limiter()
            .send(GetLimiterStats)
            .timeout(SCRAPE_REPLY_TIMEOUT),
    );
    UpstreamSnapshot {
        pool: answered(&format!("{name}: pool"), pool),
        breaker: answered(&format!("{name}: breaker"), breaker),
        limiter: answered(&format!("{name}: limiter"), limiter),
        cache: up.cache_stats(),
        flights: up.flight_stats(),
        calls: up.call_stats(),
        endpoints: up.settings().endpoints.clone(),
        name,
    }
}

/// One look at the node: every actor asked at once, each with
/// [`SCRAPE_REPLY_TIMEOUT`], so this ends however the actors are doing.
pub(crate) async fn take(probes: &Probes) -> Snapshot {
    let hub = probes.hub.send(GetHubStats).timeout(SCRAPE_REPLY_TIMEOUT);
    let clients = probes
        .upstreams
        .api_clients()
        .map(|(_, u)| ApiClient::new(u.clone()));
    let upstreams = join_all(clients.map(upstream_snapshot));
    let cluster = async {
        match &probes.cluster {
            Some(bridge) => answered(
                "cluster bridge",
                bridge
                    .send(GetClusterStats)
                    .timeout(SCRAPE_REPLY_TIMEOUT)
                    .await,
            ),
            None => None,
        }
    };
    let (hub, upstreams, cluster) = futures::join!(hub, upstreams, cluster);
    Snapshot {
        alerts: probes.alerts.counters(),
        cluster,
        shutting_down: probes.is_shutting_down(),
        connections: probes.gate.open(),
        max_connections: probes.gate.max(),
        hub: answered("broadcast hub", hub),
        upstreams,
        security: probes.security.stats(),
    }
}

/// Spaces out the snapshots behind one view (`/metrics` or `/status`) and
/// shares each among the requests waiting for it; see the module docs.
///
/// The lock is held while a snapshot is taken, and while waiting for the
/// interval to pass: requests queue behind it (their number is bounded by
/// the connections the server admits) and are answered in turn from what
/// it took. A request that hangs up while it holds the lock drops it, and
/// the next one takes over.
#[derive(Debug)]
pub(crate) struct SnapshotGate<T> {
    interval: Duration,
    latest: tokio::sync::Mutex<Option<Taken<T>>>,
    taken: AtomicU64,
}

/// A snapshot and when it was begun.
#[derive(Debug)]
struct Taken<T> {
    began: Instant,
    value: T,
}

impl<T: Clone> SnapshotGate<T> {
    /// A gate taking snapshots at least `interval` apart.
    pub(crate) fn new(interval: Duration) -> Self {
        SnapshotGate {
            interval,
            latest: tokio::sync::Mutex::new(None),
            taken: AtomicU64::new(0),
        }
    }

    /// A snapshot begun after this call, from `take` or shared with the
    /// other callers that were waiting for the same one.
    pub(crate) async fn get<F, Fut>(&self, take: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let arrived = Instant::now();
        let mut latest = self.latest.lock().await;
        if let Some(last) = latest.as_ref() {
            if last.began >= arrived {
                return last.value.clone();
            }
            tokio::time::sleep_until(last.began + self.interval).await;
        }
        let began = Instant::now();
        self.taken.fetch_add(1, Ordering::Relaxed);
        let value = take().await;
        *latest = Some(Taken {
            began,
            value: value.clone(),
        });
        value
    }

    /// How many snapshots have been taken.
    pub(crate) fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: Duration = Duration::from_millis(250);

    /// A snapshot that takes `d` and reports how many were taken before it.
    async fn slow_take(gate: &SnapshotGate<u64>, d: Duration) -> u64 {
        let n = gate.taken();
        gate.get(|| async move {
            tokio::time::sleep(d).await;
            n
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_share_one_snapshot_and_the_next_waits_the_gap() {
        let gate = SnapshotGate::new(GAP);
        let t0 = Instant::now();
        // Ten at once: one snapshot, every caller gets it.
        let got = futures::future::join_all((0..10).map(|_| slow_take(&gate, GAP / 5))).await;
        assert_eq!(got, vec![0; 10]);
        assert_eq!(gate.taken(), 1);
        // The next one arrived after that snapshot began: it gets a fresh
        // one, but not before the gap since the last began.
        assert_eq!(slow_take(&gate, Duration::ZERO).await, 1);
        assert_eq!(gate.taken(), 2);
        assert!(t0.elapsed() >= GAP, "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_over_time_takes_one_snapshot_per_gap() {
        let gate = SnapshotGate::new(GAP);
        let t0 = Instant::now();
        // A request every 10 ms for two seconds, each waiting its answer.
        let requests = (0..200u32).map(|i| {
            let gate = &gate;
            async move {
                tokio::time::sleep(Duration::from_millis(10) * i).await;
                slow_take(gate, Duration::from_millis(1)).await
            }
        });
        futures::future::join_all(requests).await;
        let spent = t0.elapsed();
        let most = 1 + (spent.as_millis() / GAP.as_millis()) as u64;
        assert!(
            gate.taken() <= most,
            "{} snapshots in {spent:?}",
            gate.taken()
        );
        assert!(gate.taken() >= 8, "{} snapshots", gate.taken());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_hangs_up_mid_snapshot_frees_the_gate() {
        let gate = SnapshotGate::new(GAP);
        // Cut off by its deadline while taking the snapshot: the lock goes
        // with it, and the next caller takes its own.
        let cut = tokio::time::timeout(GAP / 10, slow_take(&gate, GAP * 4)).await;
        assert!(cut.is_err());
        let t1 = Instant::now();
        assert_eq!(slow_take(&gate, Duration::ZERO).await, 1);
        assert_eq!(gate.taken(), 2);
        assert!(t1.elapsed() < GAP, "it waited {:?}", t1.elapsed());
    }
}
