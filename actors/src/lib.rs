//! happynet's actors, their typed messages, and the plain state machines
//! inside them.
//!
//! # Topology
//!
//! ```text
//!  app code ──Broadcast──► BroadcastHub (router) ──Fan──► HubShard, one per worker thread
//!  client ──ws──► WsSessionActor ──FromClient──► its thread's HubShard ──Fan──► other shards
//!                                                     │ encoded frame, once per shard
//!                                                     ▼
//!                                  each member's DeliveryQueue ──► its socket (no mailbox)
//!                                  heartbeat timer per shard: pings, evicts the silent and the slow
//! ```
//!
//! Every message in that picture, and those between the hub and the cluster
//! bridge, is in [`messages`], with its reply and how it is sent.
//!
//! With history on ([`history`]), the router also stamps every room
//! broadcast with its offset, clients' room messages go through it, and
//! recoveries are asked of it (see [`hub`]).
//!
//! Each actor is a thin shell around a state machine that takes `now` and does
//! no I/O: [`rooms::RoomTable`] (who is in which room, with quotas per
//! session and per address), [`presence`] (bounded presence frames),
//! [`liveness::EvictionPolicy`] (silent and slow sessions), [`gcra::Gcra`]
//! (message rates) and, for the upstream actors, the breaker, the keyed
//! limiter, the balancer, the response cache and [`single_flight`] (one
//! upstream call for identical misses), and [`reconnect`], the one reconnect
//! policy of both Redis links (the shared limiter's and the cluster
//! bridge's). Those are unit-tested directly; the
//! actors are tested through real sockets in the `happynet` crate's `tests/`.
//!
//! The [`protocol`] module is the WebSocket wire protocol (plain and
//! protocol clients), parsed and encoded without I/O; [`frame_check`] is the
//! RFC 6455 checker every client's bytes pass before the codec, a plain
//! state machine fed chunks.

pub mod backoff;
pub mod balancer;
pub mod breaker;
pub mod cache;
pub mod capacity;
pub mod delivery;
pub mod frame_check;
pub mod gcra;
pub mod histogram;
pub mod history;
pub mod hub;
pub mod limiter;
pub mod liveness;
pub mod messages;
pub mod pool;
pub mod presence;
pub mod protocol;
pub mod reconnect;
pub mod rooms;
pub mod session;
pub mod shared_limiter;
pub mod single_flight;

pub use breaker::{
    AttemptOutcome, BreakerActor, BreakerConfig, BreakerOpen, BreakerPermit, BreakerStateKind,
    BreakerStats, GetBreakerStats, Permit, ReportOutcome, Ticket,
};
pub use frame_check::Violation;
pub use histogram::Histogram;
pub use history::{HistoryConfig, HistoryEntry, Position, Recover};
pub use hub::{BroadcastHub, HubConfig, HubShard, HubShards};
pub use limiter::{
    Acquire, GetLimiterStats, Grant, LimiterStats, RateLimited, RateLimiterActor, Reserve,
};
pub use liveness::ClosedBy;
pub use messages::Payload;
pub use messages::{
    Backfill, Backfilled, Broadcast, Close, ClosedCounts, ClusterPresence, Connect, ConnectRefused,
    Disconnect, Flush, FlushBehind, FlushToken, Flushed, FromClient, GetHistory, GetHubStats,
    GetOccupancy, Heartbeat, HistoryPage, HubStats, Occupancy, Origin, Relay, RelayTarget,
    Sequence, Sequenced, SetRelay, SetSequencer, Shutdown, Target, BACKFILL_WAIT, FLUSH_WAIT,
};
pub use protocol::ClientKind;
pub use rooms::{RoomName, SessionId};
pub use session::{ConnectionGate, ConnectionSlot, SessionConfig, WsSessionActor};
