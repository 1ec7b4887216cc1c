//! `network.cluster`: scale-out through one Redis shared by every node, and
//! [`NodeIdentity`], the one place this node's name is decided (the cluster
//! bridge, the alert events and `/status` all use it).

use super::checks::{at_least_one, policy_error, ConfigError, Millis};
use happynet_actors::backoff::Jitter;
use happynet_actors::reconnect::Reconnect;
use happynet_actors::shared_limiter::{Fallback, SharedLimit};
use serde::Deserialize;

/// `network.cluster`: several nodes sharing broadcasts, presence and rate
/// limits through one Redis (the cluster bridge). Only `redis_url` is
/// required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The Redis every node of the cluster uses: `redis://[:password@]host:port[/db]`.
    /// Required.
    pub redis_url: String,
    /// The first part of every Redis key (`{prefix}:broadcasts`, …); nodes
    /// with the same prefix form one cluster. Default `happynet`.
    pub prefix: String,
    /// This node's name in presence keys and logs. Default: 16 random hex
    /// digits per start. A configured name gets a random suffix on the
    /// broadcast stream, so a restarted node is never mistaken for its past
    /// self.
    pub node_id: Option<String>,
    /// Entries the broadcast stream keeps (`XADD MAXLEN ~`): the window a
    /// node that lost its link can replay. Default 100000.
    pub stream_max_len: usize,
    /// Broadcasts for other nodes kept while the link is down; beyond it the
    /// oldest are dropped, counted and logged. Default 10000.
    pub outbox_max: usize,
    /// The payload bytes the outbox may hold, whatever the count; the
    /// oldest are dropped (and counted) beyond it. Default 67108864 (64 MiB).
    pub outbox_max_bytes: usize,
    /// Stream entries read per `XREAD`. Default 512.
    pub read_batch: usize,
    /// `reconnect_min_ms`: the first wait before reconnecting, milliseconds.
    /// Default 100.
    #[serde(rename = "reconnect_min_ms")]
    pub reconnect_min: Millis,
    /// `reconnect_max_ms`: the longest wait between reconnection attempts,
    /// milliseconds. Default 5000.
    #[serde(rename = "reconnect_max_ms")]
    pub reconnect_max: Millis,
    /// `presence_interval_ms`: how often each node publishes its room
    /// occupancy and reads the others', milliseconds; 0 turns cross-node
    /// presence off. Default 1000. (A [`Duration`](std::time::Duration) like
    /// `network.websocket.presence_interval`, which the JSON writes in
    /// seconds.)
    #[serde(rename = "presence_interval_ms")]
    pub presence_interval: Millis,
    /// What a shared rate limit does when Redis does not answer in time:
    /// `"local"` (this node's own limiter), `"deny"` or `"allow"`. Default
    /// `"local"`.
    pub limiter_fallback: Fallback,
    /// `limiter_timeout_ms`: how long a shared rate-limit check waits for
    /// Redis, milliseconds. Default 50.
    #[serde(rename = "limiter_timeout_ms")]
    pub limiter_timeout: Millis,
    /// Whether `/ready` answers 503 while the link to Redis is down. Default
    /// true: a node that cannot reach the others is not fully serving. Set
    /// it false when a Redis outage should not pull every node out of the
    /// load balancer at once (local delivery goes on either way).
    pub ready_requires_link: bool,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis_url: String::new(),
            prefix: "happynet".to_owned(),
            node_id: None,
            stream_max_len: 100_000,
            outbox_max: 10_000,
            outbox_max_bytes: 64 << 20,
            read_batch: 512,
            reconnect_min: Millis::ms(100),
            reconnect_max: Millis::ms(5_000),
            presence_interval: Millis::ms(1_000),
            limiter_fallback: Fallback::Local,
            limiter_timeout: Millis::ms(50),
            ready_requires_link: true,
        }
    }
}

/// The longest `network.cluster.prefix` and `node_id`.
const MAX_CLUSTER_NAME: usize = 64;

fn cluster_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > MAX_CLUSTER_NAME {
        return Err(ConfigError::invalid(
            path,
            format!("must be 1 to {MAX_CLUSTER_NAME} characters"),
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(ConfigError::invalid(
            path,
            "may only contain ASCII letters, digits, '_', '-' and '.'",
        ));
    }
    Ok(())
}

impl ClusterConfig {
    /// Checks `network.cluster`; the error names the key's path.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let path = |key: &str| format!("network.cluster.{key}");
        if self.redis_url.is_empty() {
            return Err(ConfigError::invalid(
                &path("redis_url"),
                "is required (e.g. \"redis://127.0.0.1:6379\")",
            ));
        }
        redis::Client::open(self.redis_url.as_str()).map_err(|e| {
            ConfigError::invalid(&path("redis_url"), format!("is not a Redis URL: {e}"))
        })?;
        cluster_name(&path("prefix"), &self.prefix)?;
        if let Some(id) = &self.node_id {
            cluster_name(&path("node_id"), id)?;
        }
        at_least_one(&path("stream_max_len"), self.stream_max_len)?;
        at_least_one(&path("outbox_max"), self.outbox_max)?;
        at_least_one(&path("outbox_max_bytes"), self.outbox_max_bytes)?;
        at_least_one(&path("read_batch"), self.read_batch)?;
        self.reconnect()?;
        if self.limiter_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                &path("limiter_timeout_ms"),
                "must be >= 1",
            ));
        }
        Ok(())
    }

    /// The bridge's reconnect policy, judged by its own constructor
    /// ([`Reconnect::try_new`]); a bad bound is reported under its key
    /// (`network.cluster.reconnect_min_ms` or `reconnect_max_ms`).
    pub fn reconnect(&self) -> Result<Reconnect<tokio::time::Instant>, ConfigError> {
        Reconnect::try_new(self.reconnect_min.0, self.reconnect_max.0).map_err(|e| {
            policy_error(
                "network.cluster",
                e.field(),
                e.requirement(),
                &[("min", "reconnect_min_ms"), ("max", "reconnect_max_ms")],
            )
        })
    }

    /// The Redis side of a shared rate limit (`shared_rate_limit`,
    /// `shared_rate_limits`).
    pub fn shared_limit(&self) -> Option<SharedLimit> {
        SharedLimit::new(
            &self.redis_url,
            self.prefix.clone(),
            self.limiter_fallback,
            self.limiter_timeout.0,
        )
        .ok()
    }
}

/// Who this node is: its `name` (in presence keys, logs, alert events and
/// `/status`) and its `origin` (the id its broadcasts carry on the stream).
/// Decided once per `Network::start` by [`NodeIdentity::new`] and handed to everything that names the node, so
/// that an alert and `/status` never name the same node differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node's name.
    pub name: String,
    /// The node's id on the broadcast stream: unique per start, so that a
    /// restarted node (whose sequence starts again) is never mistaken for a
    /// replay of its past self.
    pub origin: String,
}

/// The node's name when nothing names it: no `network.cluster.node_id`,
/// no cluster, no `HOSTNAME`.
pub const DEFAULT_NODE: &str = "happynet";

impl NodeIdentity {
    /// This node's identity, from `network.cluster` (if any), the `HOSTNAME`
    /// environment variable and fresh randomness; see
    /// [`NodeIdentity::choose`] for the rule.
    pub fn new(cluster: Option<&ClusterConfig>) -> Self {
        let hostname = std::env::var("HOSTNAME").ok();
        let mut jitter = Jitter::new();
        NodeIdentity::choose(cluster, hostname.as_deref(), jitter.next_u64())
    }

    /// The rule, as plain code:
    ///
    /// - `network.cluster.node_id` when set; its origin gets a random
    ///   suffix (`name~1a2b3c4d`);
    /// - else, with a cluster, 16 random hex digits, name and origin alike:
    ///   the nodes' names must differ (they key each node's presence in
    ///   Redis), which host names do not promise (two nodes on one host);
    /// - else (a single node, where nothing needs the name unique) the
    ///   `HOSTNAME` when it is not empty, else [`DEFAULT_NODE`].
    pub fn choose(cluster: Option<&ClusterConfig>, hostname: Option<&str>, random: u64) -> Self {
        match cluster {
            Some(ClusterConfig {
                node_id: Some(name),
                ..
            }) => NodeIdentity {
                name: name.clone(),
                origin: format!("{name}~{:08x}", random as u32),
            },
            Some(_) => {
                let name = format!("{random:016x}");
                NodeIdentity {
                    origin: name.clone(),
                    name,
                }
            }
            None => {
                let name = hostname
                    .filter(|h| !h.is_empty())
                    .unwrap_or(DEFAULT_NODE)
                    .to_owned();
                NodeIdentity {
                    origin: name.clone(),
                    name,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(node_id: Option<&str>) -> ClusterConfig {
        ClusterConfig {
            redis_url: "redis://127.0.0.1:6379".into(),
            node_id: node_id.map(str::to_owned),
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn a_configured_node_id_is_the_name_and_the_origin_is_suffixed() {
        let c = cluster(Some("web-1"));
        let id = NodeIdentity::choose(Some(&c), Some("host"), 0x1234_5678_9abc_def0);
        assert_eq!(id.name, "web-1");
        assert_eq!(id.origin, "web-1~9abcdef0");
    }

    #[test]
    fn a_cluster_node_without_node_id_gets_a_random_name_not_the_host_name() {
        let c = cluster(None);
        let id = NodeIdentity::choose(Some(&c), Some("host"), 0xab);
        assert_eq!(id.name, "00000000000000ab");
        assert_eq!(id.origin, id.name);
        let other = NodeIdentity::choose(Some(&c), Some("host"), 0xcd);
        assert_ne!(id.name, other.name, "two nodes on one host differ");
    }

    #[test]
    fn a_single_node_is_named_by_its_host_or_the_default() {
        assert_eq!(NodeIdentity::choose(None, Some("box"), 1).name, "box");
        assert_eq!(NodeIdentity::choose(None, Some(""), 1).name, DEFAULT_NODE);
        assert_eq!(NodeIdentity::choose(None, None, 1).name, DEFAULT_NODE);
    }
}
