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

//! # A broadcast's walk
//!
//! `POST /broadcast` to a client's frame, file by file:
//!
//! 1. [`routes`]: the `/broadcast` resource, behind the guards of
//!    [`crate::security`] (per-IP limiter, cross-site check, token), hands
//!    the body to `broadcast_route`, which parses the room and the body and
//!    sends the hub a `Broadcast`;
//! 2. `happynet_actors::messages`: `Broadcast` (its constructors, its
//!    `Target`) and `Fan`, what the router hands each shard;
//! 3. `happynet_actors::hub`: the `BroadcastHub` router's
//!    `Handler<Broadcast>` relays a local broadcast to the cluster bridge,
//!    if any, once per node, then sends one `Fan` to each worker thread's
//!    `HubShard`; the shard encodes the frame once and `deliver` charges
//!    each member's byte budget (`happynet_actors::liveness`) and pushes
//!    the encoded bytes onto its `DeliveryQueue`;
//! 4. `happynet_actors::delivery`: the upgrade response's body
//!    (`Outbound`) takes everything queued at once and hands it to the
//!    HTTP layer, which writes it to the socket; the session actor is not
//!    woken for data at all.
//!
//! With `network.cluster`, the relay continues in [`cluster`]: the bridge's
//! `Handler<Relay>` queues it in the outbox, and `flush` publishes it with
//! the fields of `wire::add_xadd`; every other node's reader decodes it
//! (`wire::decode_read_reply`), and the bridge sends that node's hub a
//! `Broadcast::from_cluster`, which takes steps 3 and 4 there.

pub mod cluster;
pub mod routes;
pub mod websocket;

pub use routes::RealtimeState;
