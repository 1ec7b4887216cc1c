//! happynet: the network layer of HappyOS, built on actix.
//!
//! An actix application embeds happynet to talk to the world: WebSocket
//! clients receive typed `Broadcast`s fanned out by a `BroadcastHub`, and the
//! hub keeps every client honest — heartbeats, a byte cap per client, message
//! size and rate limits.
//!
//! # Layout
//!
//! - [`config`]: the `network` JSON object, one file per section, with
//!   defaults and validation that names the offending path; it imports
//!   nothing else from this crate;
//! - [`network`]: [`Network`], the handle an app keeps — it starts the actors,
//!   mounts the routes and shuts down gracefully; [`websocket`]: the `/ws`
//!   upgrade's plain/protocol choice and its TCP close;
//! - [`client`], [`upstream`], [`error`]: `HttpClient` (any URL, state per
//!   origin) and `ApiClient` (one configured upstream), the retry pipeline
//!   and its typed errors; [`auth`] keeps credentials out of files and logs;
//! - [`ops`]: one snapshot of the node and its three views — `/metrics`
//!   (Prometheus text, collected at scrape time from the actors' own
//!   counters), `/status` (the same numbers as JSON for the demo's
//!   operations panel) and `/ready` — plus the alerts: rules over the same
//!   snapshot (breaker opened, error rate, slow-consumer evictions,
//!   connections near the cap), logged and POSTed to a webhook through the
//!   upstream stack; they read a `Probes` struct, never `Network`;
//! - [`tls`]: a rustls server config from PEM files; [`security`]: the
//!   per-IP flood and abuse guards; [`assets`]: static files with
//!   validators and compression;
//! - [`cluster`]: `ClusterBridge`, scale-out through Redis
//!   (`network.cluster`): broadcasts to and from the other nodes on one
//!   stream, cluster-wide presence; shared rate limits are
//!   `actors::shared_limiter`;
//! - [`openai`] and [`sse`]: the chat-completions client and the event-stream
//!   parser; [`gateway`] (`/proxy/…`) and [`llm_gateway`] (`/v1/…`): the
//!   HTTP faces of the upstream stack;
//! - the `happynet-actors` crate (re-exported as [`actors`]): the five actors,
//!   their messages and the plain state machines inside (rooms and their
//!   quotas, bounded presence frames, eviction policy, GCRA, breaker, keyed
//!   limiter, backoff and retry budget, balancer, response cache).
//!
//! ```text
//!  client ──ws──► WsSessionActor ──FromClient──► BroadcastHub ──Deliver──► every WsSessionActor in the room
//!  app code ──Broadcast─────────────────────────►      │
//!  POST /broadcast ──Broadcast──────────────────►      └── heartbeat timer: pings, evicts the silent and the slow
//!                                                      │ Relay (local broadcasts)        ▲ Broadcast::from_cluster
//!                                                      ▼                                 │
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
//! ```no_run
//! use actix_web::{App, HttpServer};
//! use happynet::{Broadcast, Config, Network};
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//!     let net = Network::start(Config::embedded()).expect("valid config");
//!     net.hub().do_send(Broadcast::text("Hello, clients!"));
//!     let routes = net.configure();
//!     HttpServer::new(move || App::new().configure(routes.clone()))
//!         .on_connect(net.on_connect())
//!         .bind(("127.0.0.1", 8080))?
//!         .run()
//!         .await
//! }
//! ```

pub mod assets;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
pub mod error;
pub mod gateway;
pub mod llm_gateway;
pub mod network;
pub mod openai;
pub mod ops;
pub mod security;
pub mod sse;
pub mod tls;
pub mod upstream;
pub mod websocket;

pub use client::{ApiClient, HttpClient};
pub use config::{Config, ConfigError};
pub use error::HttpError;
pub use happynet_actors as actors;
pub use happynet_actors::{Broadcast, BroadcastHub, RoomName, SessionId, Target};
pub use network::Network;
pub use upstream::{RequestBuilder, Response, StreamedResponse};

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
