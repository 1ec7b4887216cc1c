//! What the actor test binaries share: one hub configuration, so that the
//! heartbeat and relay tests exercise the same hub settings.

#![allow(clippy::unwrap_used, dead_code)] // test code: a failed unwrap is a failed test

use happynet_actors::liveness::EvictionPolicy;
use happynet_actors::{HubConfig, RoomName};
use std::time::Duration;

/// How often the test hub pings its sessions.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(30);
/// How long a session may stay silent before the test hub evicts it.
pub(crate) const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The test hub: no presence, 1 MiB outbound cap, lobby as default room.
pub(crate) fn hub_config() -> HubConfig {
    HubConfig {
        heartbeat_interval: HEARTBEAT,
        eviction: EvictionPolicy {
            client_timeout: CLIENT_TIMEOUT,
            max_outbound_bytes: 1 << 20,
        },
        max_rooms_per_session: 4,
        max_rooms: 100,
        max_rooms_per_ip: 0,
        presence_limits: happynet_actors::presence::PresenceLimits::default(),
        presence_interval: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(5),
        mailbox_capacity: 1024,
        default_room: RoomName::new("lobby").unwrap(),
        history: None,
    }
}
