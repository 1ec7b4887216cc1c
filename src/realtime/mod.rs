//! The real-time half of happynet: WebSocket clients, broadcasts to them,
//! and scale-out of both across nodes.
//!
//! - [`routes`]: `GET /ws`, `POST /broadcast` and `GET /health`, and the
//!   [`RealtimeState`] they share (the hub, the connection gate, the
//!   per-session limits, the guards);
//! - [`websocket`]: the `/ws` upgrade's plain/protocol choice and its TCP
//!   close;
//! - [`cluster`]: the `ClusterBridge`, which carries broadcasts to and from
//!   the other nodes through Redis and shares presence.
//!
//! The actors themselves — the hub, the sessions and the messages between
//! them — are in the `happynet-actors` crate (`happynet::actors`). Nothing
//! here reaches `Network`: it builds a [`RealtimeState`] and mounts these
//! routes with it.

pub mod cluster;
pub mod routes;
pub mod websocket;

pub use routes::RealtimeState;
