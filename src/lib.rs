//! happynet: the network layer of HappyOS, built on actix.
//!
//! An actix application embeds happynet to talk to the world: WebSocket
//! clients receive typed `Broadcast`s fanned out by a `BroadcastHub`, and the
//! hub keeps every client honest — heartbeats, a byte cap per client, message
//! size and rate limits.
//!
//! # Layout
//!
//! `src/` is built in floors: a module uses only modules on floors below
//! its own, so there is no import cycle (`tests/layering.rs` checks the
//! code against this table, and that the table and the tree agree). The
//! `happynet-actors` crate (`actors/`, re-exported as [`actors`]) is below
//! them all: the five actors, their messages (the hub's and the sessions'
//! in `actors::messages`) and the plain state machines inside them.
//!
//! | floor | modules | what |
//! |---|---|---|
//! | 1 | `config`, `json_error` | [`config`]: the `network` JSON object, one file per section, with defaults and validation that names the offending path (each policy checked by its own constructor); `json_error`: the `{"error": …}` body and `Retry-After` every route answers with |
//! | 2 | `security`, `tls`, `assets` | [`security`]: the per-IP flood and abuse guards, origin and token checks; [`tls`]: a rustls server config from PEM files; [`assets`]: static files with validators and compression |
//! | 3 | `upstream` | [`upstream`]: `HttpClient` (any URL) and `ApiClient` (one configured upstream), in call order: the clients with their request and response types, call path (cache, hand-off to the upstream arbiter), retry pipeline, stats, credentials, errors, and the registry of upstreams |
//! | 4 | `gateway` | [`gateway`]: the upstream stack's HTTP faces, `/proxy/…` and the OpenAI-compatible `/v1/…`, with the OpenAI client and the event-stream parser |
//! | 5 | `realtime` | [`realtime`]: the `/ws`, `POST /broadcast` and `/health` routes on a [`realtime::RealtimeState`], the upgrade's pieces, and [`realtime::cluster`] (scale-out through Redis: wire format, outbox, sequence tracking, link, presence, bridge) |
//! | 6 | `ops` | [`ops`]: one snapshot of the node and its three views, `/metrics`, `/status` and `/ready`, plus the alerts; they read a [`ops::Probes`] struct, never `Network` |
//! | 7 | `network` | [`network`]: [`Network`], the handle an app keeps and the composition root: it starts the actors, builds each floor's state and mounts the routes |
//! | 8 | `server` | [`server`]: the embedding helper, an `HttpServer` with what the demo has (connect hook, header timeout, shutdown on a signal with 1001) |
//!
//! Two walks through it, for a newcomer:
//! - **A broadcast to a client**: `POST /broadcast` in
//!   `realtime/routes.rs` (behind the guards of `security.rs`) builds a
//!   `Broadcast` (`actors/src/messages.rs`) and sends it to the
//!   `BroadcastHub` (`actors/src/hub.rs`), the router, which hands it once
//!   to each worker thread's `HubShard` (same file); the shard encodes the
//!   frame once, charges each member's byte budget and queues the bytes on
//!   the member's `DeliveryQueue` (`actors/src/delivery.rs`), which the
//!   connection's response body writes to the socket. With a cluster the hub
//!   also hands it to `realtime/cluster/bridge.rs`, whose outbox and
//!   `wire.rs` put it on the Redis stream for the other nodes.
//! - **An API call**: `ApiClient::get` (`upstream/client.rs`) gives a
//!   `RequestBuilder` (same file); `send` goes through the call path
//!   (`upstream/call.rs`: cache, hand-off to the arbiter, deadline) and the
//!   retry pipeline (`upstream/retry.rs`), which asks `RateLimiterActor`
//!   (`actors/src/limiter.rs`, its GCRA in `gcra.rs`), `BreakerActor`
//!   (`breaker.rs`) and `PoolActor` (`pool.rs`, its endpoints chosen by
//!   `balancer.rs`) in turn; the pool's one verdict on the answer (in
//!   `pool.rs`) decides retry, breaker outcome and endpoint health;
//!   `upstream/stats.rs` counts the call: 9 files.
//!
//! ```text
//!  app code / POST /broadcast ──Broadcast──► BroadcastHub (router) ──Fan──► HubShard × workers
//!  client ──ws──► WsSessionActor ──FromClient──► its HubShard ──Fan──► the other shards
//!                  each shard: frame encoded once ──► members' DeliveryQueues ──► sockets;
//!                  heartbeat timer: pings, evicts the silent and the slow
//!                                                      │ Relay (local broadcasts, once per node)  ▲ Broadcast::from_cluster
//!                                                      ▼                                          │
//!                                                ClusterBridge ──XADD──► Redis stream ──XREAD──► (every node's bridge)
//!
//!  HttpClient / ApiClient / OpenAiClient / gateways          (one upstream arbiter thread)
//!    └─ cache hit? ─► answered on the caller's thread
//!    └─ call ──────► RateLimiterActor ─Acquire─► BreakerActor ─Permit─► PoolActor ─Execute─► endpoint A | B
//!                    (retries with backoff + jitter, Retry-After, retry budget, deadline, fallback)
//! ```
//!
//! # Embedding
//!
//! [`server::serve`] gives an app what the demo has: happynet's routes
//! beside the app's, the connect hook, the request-head deadline, and on
//! Ctrl-C or SIGTERM a 1001 to every client before the HTTP server stops.
//! [`server::Server`] opens up its parts; `Network::configure`,
//! `Network::on_connect` and `Network::shutdown` remain for an app that
//! builds its own `HttpServer`.
//!
//! ```no_run
//! use actix_web::web;
//! use happynet::{Broadcast, Config, Network};
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let net = Network::start(Config::embedded()).expect("valid config");
//!     net.hub().do_send(Broadcast::text("Hello, clients!"));
//!     happynet::server::serve(&net, ("127.0.0.1", 8080), |cfg| {
//!         cfg.route("/hello", web::get().to(|| async { "Hello!" }));
//!     })
//!     .await
//! }
//! ```

pub mod assets;
pub mod config;
pub mod gateway;
pub(crate) mod json_error;
pub mod network;
pub mod ops;
pub mod realtime;
pub mod security;
pub mod server;
pub mod tls;
pub mod upstream;

/// The cluster bridge under its earlier path, `happynet::cluster`.
pub use realtime::cluster;

pub use config::{Config, ConfigError};
pub use happynet_actors as actors;
pub use happynet_actors::{
    Broadcast, BroadcastHub, HistoryEntry, HistoryPage, Position, RoomName, SessionId, Target,
};
pub use network::Network;
pub use upstream::{ApiClient, HttpClient, HttpError, RequestBuilder, Response, StreamingResponse};

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
