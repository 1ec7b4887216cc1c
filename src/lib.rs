//! happynet: the network layer of HappyOS, built on actix.
//!
//! An actix application embeds happynet to talk to the world: WebSocket
//! clients receive typed `Broadcast`s fanned out by a `BroadcastHub`, and the
//! hub keeps every client honest — heartbeats, a byte cap per client, message
//! size and rate limits.
//!
//! # Layout
//!
//! - [`config`]: the `network` JSON object, with defaults and validation that
//!   names the offending path;
//! - [`network`]: [`Network`], the handle an app keeps — it starts the actors,
//!   mounts the routes and shuts down gracefully: the composition root,
//!   which imports every module and is imported by none;
//! - [`realtime`]: the `/ws`, `POST /broadcast` and `/health` routes with
//!   their [`realtime::RealtimeState`], the `/ws` upgrade's plain/protocol
//!   choice and TCP close ([`realtime::websocket`]), and
//!   [`realtime::cluster`]: `ClusterBridge`, scale-out through Redis
//!   (`network.cluster`): broadcasts to and from the other nodes on one
//!   stream, cluster-wide presence, one file per part (wire format, outbox,
//!   sequence tracking, link, presence, bridge); shared rate limits are
//!   `actors::shared_limiter`;
//! - [`upstream`]: `HttpClient` (any URL, state per origin) and `ApiClient`
//!   (one configured upstream), in call order: the request and response
//!   types, the call path (cache, hand-off to the upstream arbiter), the
//!   retry pipeline, call stats, credentials kept out of files and logs,
//!   the typed errors and the registry of upstreams;
//! - [`metrics`]: `/metrics` (Prometheus text, collected at scrape time from
//!   the actors' own counters) and `/ready`; [`status`]: `/status`, the
//!   same numbers as JSON for the demo's operations panel; [`tls`]: a
//!   rustls server config from PEM files; [`security`]: the per-IP flood
//!   and abuse guards; [`assets`]: static files with validators and
//!   compression; [`alerts`]: rules over the same counters (breaker opened,
//!   error rate, slow-consumer evictions, connections near the cap), logged
//!   and POSTed to a webhook through the upstream stack;
//! - [`gateway`]: the HTTP faces of the upstream stack (`/proxy/…` and the
//!   OpenAI-compatible `/v1/…`), the OpenAI chat-completions client and the
//!   event-stream parser; `json_error`: the `{"error": …}` body every
//!   route answers with;
//! - the `happynet-actors` crate (re-exported as [`actors`]): the five actors,
//!   their messages (the hub's and the sessions' all in
//!   `actors::messages`) and the plain state machines inside (rooms and their
//!   quotas, bounded presence frames, eviction policy, GCRA, breaker, keyed
//!   limiter, backoff and retry budget, the Redis links' reconnect policy,
//!   balancer, response cache).
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

pub mod alerts;
pub mod assets;
pub mod config;
pub mod gateway;
pub(crate) mod json_error;
pub mod metrics;
pub mod network;
pub mod realtime;
pub mod security;
pub mod server;
pub mod status;
pub mod tls;
pub mod upstream;

/// The cluster bridge under its earlier path, `happynet::cluster`.
pub use realtime::cluster;

pub use config::{Config, ConfigError};
pub use happynet_actors as actors;
pub use happynet_actors::{Broadcast, BroadcastHub, RoomName, SessionId, Target};
pub use network::Network;
pub use upstream::{ApiClient, HttpClient, HttpError, RequestBuilder, Response, StreamingResponse};

/// The README's Rust examples, compiled as doctests so they cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
