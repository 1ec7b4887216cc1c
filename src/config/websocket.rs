//! `network.websocket`: the real-time side — the hub's heartbeat, bounds
//! and rooms, and each session's limits — and the actors' settings built
//! from it ([`WebSocketConfig::hub_config`], [`WebSocketConfig::session_config`]).

use super::checks::{at_least_one, policy_error, positive, validate_quota, ConfigError, Seconds};
use happynet_actors::gcra::Quota;
use happynet_actors::history::HistoryConfig;
use happynet_actors::liveness::{
    EvictionPolicy, MAX_ENVELOPE_BYTES, OUTBOUND_HEADROOM_MESSAGES, PER_MESSAGE_OVERHEAD,
};
use happynet_actors::presence::PresenceLimits;
use happynet_actors::{HubConfig, RoomName, SessionConfig};
use serde::Deserialize;
use std::time::Duration;

/// `network.websocket`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// How often the hub pings every session, seconds. Default 30.
    pub heartbeat_interval: Seconds,
    /// A session silent for longer is closed (1008), seconds. Default: twice
    /// `heartbeat_interval`.
    pub client_timeout: Option<Seconds>,
    /// Open WebSocket connections; beyond it the upgrade gets HTTP 503.
    /// Default 1000.
    pub max_connections: usize,
    /// Bytes queued for one session and not yet written; beyond it the
    /// session is a slow consumer and is disconnected. Default 1 MiB. At
    /// least `4 × (max_message_bytes + 384)`
    /// ([`EvictionPolicy::min_outbound_bytes`]), so that a burst of the
    /// largest messages never evicts a client that is reading.
    pub max_outbound_bytes: usize,
    /// The largest message a client may send (frame or reassembled message);
    /// beyond it the connection is closed with 1009. Default 64 KiB. Also the
    /// body limit of `POST /broadcast`.
    pub max_message_bytes: usize,
    /// Data frames per second one client may send; beyond it (and the burst)
    /// the connection is closed with 1008. Default 20.
    pub max_messages_per_second: f64,
    /// How many frames a client may send at once before the rate applies.
    /// Default 40.
    pub message_burst: u32,
    /// Rooms one session may be in. Default 16.
    pub max_rooms_per_session: usize,
    /// Rooms that may exist at once. Default 10000.
    pub max_rooms: usize,
    /// Rooms that one client address (the per-IP key of
    /// `network.security`: an IPv4 address or an IPv6 /64) may have created
    /// and that still exist; beyond it its joins of new rooms are refused
    /// (`too_many_rooms`), joins of existing rooms are not. Addresses in
    /// `network.security.exempt_ips` (loopback by default) are not counted.
    /// 0 turns it off. Default 256: 40 addresses to fill `max_rooms`.
    pub max_rooms_per_ip: usize,
    /// The room a client starts in when `/ws` names none. Default `lobby`.
    pub default_room: String,
    /// How often presence frames go out (when something changed), seconds;
    /// 0 disables them. Default 1.
    pub presence_interval: Seconds,
    /// How long a graceful shutdown waits for clients to close, seconds.
    /// Default 5.
    pub shutdown_timeout: Seconds,
    /// `TCP_USER_TIMEOUT` on accepted sockets, seconds: the kernel aborts a
    /// connection whose sent data stays unacknowledged this long (a client
    /// that vanished or stopped reading). 0 leaves the kernel default.
    /// Default 30.
    pub tcp_user_timeout: Seconds,
    /// `SO_SNDBUF` for accepted sockets, bytes; 0 leaves the kernel's
    /// auto-tuning. Default 0.
    pub socket_send_buffer: usize,
    /// Messages the hub's mailbox holds from sessions before it tells a
    /// client its message was dropped (an error frame for a protocol
    /// client, close 1013 for a plain one). Default 65536.
    pub hub_mailbox_capacity: usize,
    /// Messages queued for one session before it counts as a slow consumer
    /// (in addition to `max_outbound_bytes`). Default 8192.
    pub session_mailbox_capacity: usize,
    /// `network.websocket.history`: each room's recent messages, so that a
    /// client that reconnects is replayed what it missed. On by default.
    pub history: HistorySettings,
}

/// `network.websocket.history`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// Keep a history at all. Without it, protocol clients receive room
    /// data verbatim (no offsets) and every recovery is `complete:false`.
    /// Default true.
    pub enabled: bool,
    /// Messages kept per room. Default 100.
    pub size: usize,
    /// How long a message is kept, seconds. Default 300.
    pub ttl: Seconds,
    /// Bytes kept for the whole node: each message's frame plus 96, and
    /// 160 per room. Default 64 MiB.
    pub max_bytes: usize,
}

impl Default for HistorySettings {
    fn default() -> Self {
        let d = HistoryConfig::default();
        HistorySettings {
            enabled: true,
            size: d.size,
            ttl: Seconds(d.ttl),
            max_bytes: d.max_bytes,
        }
    }
}

impl HistorySettings {
    /// The hub's history settings, `None` when it is off.
    pub fn history_config(&self) -> Option<HistoryConfig> {
        self.enabled.then_some(HistoryConfig {
            size: self.size,
            ttl: self.ttl.0,
            max_bytes: self.max_bytes,
        })
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            heartbeat_interval: Seconds::secs(30),
            client_timeout: None,
            max_connections: 1000,
            max_outbound_bytes: 1 << 20,
            max_message_bytes: 64 << 10,
            max_messages_per_second: 20.0,
            message_burst: 40,
            max_rooms_per_session: 16,
            max_rooms: 10_000,
            max_rooms_per_ip: 256,
            default_room: "lobby".to_owned(),
            presence_interval: Seconds::secs(1),
            shutdown_timeout: Seconds::secs(5),
            tcp_user_timeout: Seconds::secs(30),
            socket_send_buffer: 0,
            hub_mailbox_capacity: 65_536,
            session_mailbox_capacity: 8192,
            history: HistorySettings::default(),
        }
    }
}

impl WebSocketConfig {
    /// `client_timeout`, or twice `heartbeat_interval` when it is not set.
    pub fn client_timeout(&self) -> Duration {
        self.client_timeout
            .map_or(self.heartbeat_interval.0 * 2, |s| s.0)
    }

    /// The hub's settings.
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            heartbeat_interval: self.heartbeat_interval.0,
            eviction: EvictionPolicy {
                client_timeout: self.client_timeout(),
                max_outbound_bytes: self.max_outbound_bytes,
            },
            max_rooms_per_session: self.max_rooms_per_session,
            max_rooms: self.max_rooms,
            max_rooms_per_ip: self.max_rooms_per_ip,
            presence_limits: PresenceLimits::new(self.max_message_bytes),
            presence_interval: self.presence_interval.0,
            shutdown_timeout: self.shutdown_timeout.0,
            mailbox_capacity: self.hub_mailbox_capacity,
            default_room: self.default_room(),
            history: self.history.history_config(),
        }
    }

    /// Each session's limits.
    pub fn session_config(&self) -> SessionConfig {
        SessionConfig {
            max_message_bytes: self.max_message_bytes,
            // validate() has checked the rate and burst.
            inbound: Quota::per_second(self.max_messages_per_second, self.message_burst)
                .unwrap_or_else(|_| Quota::per_second(20.0, 40).unwrap_or_else(|_| unreachable!())),
            mailbox_capacity: self.session_mailbox_capacity,
        }
    }

    /// The default room as a validated name.
    pub fn default_room(&self) -> RoomName {
        RoomName::new(&self.default_room)
            .unwrap_or_else(|_| RoomName::new("lobby").unwrap_or_else(|_| unreachable!()))
    }
}

impl WebSocketConfig {
    /// Checks `network.websocket`; the error names the key's path.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive(
            "network.websocket.heartbeat_interval",
            self.heartbeat_interval,
        )?;
        if let Some(t) = self.client_timeout {
            positive("network.websocket.client_timeout", t)?;
            if t < self.heartbeat_interval {
                return Err(ConfigError::invalid(
                    "network.websocket.client_timeout",
                    "must be >= network.websocket.heartbeat_interval",
                ));
            }
        }
        at_least_one("network.websocket.max_connections", self.max_connections)?;
        at_least_one(
            "network.websocket.max_message_bytes",
            self.max_message_bytes,
        )?;
        let min_outbound = EvictionPolicy::min_outbound_bytes(self.max_message_bytes);
        if self.max_outbound_bytes < min_outbound {
            return Err(ConfigError::invalid(
                "network.websocket.max_outbound_bytes",
                format!(
                    "must be >= {min_outbound}: {OUTBOUND_HEADROOM_MESSAGES} × \
                     (network.websocket.max_message_bytes + {} bytes of framing), so that a \
                     burst of the largest messages cannot evict a client that is reading",
                    MAX_ENVELOPE_BYTES + PER_MESSAGE_OVERHEAD
                ),
            ));
        }
        validate_quota(
            "network.websocket.max_messages_per_second",
            "network.websocket.message_burst",
            self.max_messages_per_second,
            Duration::from_secs(1),
            self.message_burst,
        )?;
        at_least_one(
            "network.websocket.max_rooms_per_session",
            self.max_rooms_per_session,
        )?;
        at_least_one("network.websocket.max_rooms", self.max_rooms)?;
        RoomName::new(&self.default_room).map_err(|e| {
            ConfigError::invalid("network.websocket.default_room", format!("is invalid: {e}"))
        })?;
        mailbox_capacity(
            "network.websocket.hub_mailbox_capacity",
            self.hub_mailbox_capacity,
        )?;
        mailbox_capacity(
            "network.websocket.session_mailbox_capacity",
            self.session_mailbox_capacity,
        )?;
        // The history's own judge, its errors under this section's keys.
        if let Some(history) = self.history.history_config() {
            history.validate().map_err(|e| {
                policy_error("network.websocket.history", e.field(), e.requirement(), &[])
            })?;
        }
        Ok(())
    }
}

/// The most messages a hub or session mailbox may hold. A bound a
/// mailbox can fill is memory, so a limit far past any real load is a
/// mistake in the config; and actix's channel panics when an address is
/// cloned while its capacity is near its own limit (`usize::MAX >> 2`,
/// actix 0.13 `address/channel.rs`), which a capacity this large can
/// never approach.
pub const MAX_MAILBOX_CAPACITY: usize = 1 << 24;

fn mailbox_capacity(path: &str, value: usize) -> Result<(), ConfigError> {
    at_least_one(path, value)?;
    if value > MAX_MAILBOX_CAPACITY {
        return Err(ConfigError::invalid(
            path,
            format!("must be <= {MAX_MAILBOX_CAPACITY}, got {value}"),
        ));
    }
    Ok(())
}
