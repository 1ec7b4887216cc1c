//! `Network`: what an actix application holds to use happynet.
//!
//! `Network::start` builds the actors from a [`Config`] and hands back a cheap,
//! cloneable handle. From it app code gets the hub's address (to send
//! `Broadcast`s), a `configure` function that mounts the routes into any
//! actix-web `App`, an `on_connect` hook for `HttpServer` that tunes accepted
//! sockets and lets the hub cut off clients that stop reading, and a graceful
//! `shutdown`.
//!
//! This is the composition root: it builds every part and wires the routes,
//! and no module imports it. Each part's routes take a small state of their
//! own layer, never `Network`.
//!
//! Routes:
//! - `GET /ws[?room=NAME][&presence=1][&since=EPOCH:OFFSET]`,
//!   `POST /broadcast[?room=NAME]`, `GET /rooms/{room}/history` and
//!   `GET /health`: the real-time routes ([`crate::realtime::routes`]),
//!   with a [`RealtimeState`];
//! - `GET /ready`: readiness, and `GET /metrics`: Prometheus metrics
//!   ([`crate::ops`]);
//! - `GET /status`: the same numbers as one JSON document for people
//!   ([`crate::ops::status`]).
//!
//! The flood and abuse guards of `network.security` ([`crate::security`])
//! sit in front: `on_connect` caps TCP connections per IP, `/ws` checks the
//! upgrade rate, origin, token and WebSockets per IP before upgrading, the
//! API routes (`POST /broadcast`, `GET /status`, `/proxy/…`, `/v1/…`) are
//! wrapped in the per-IP request limiter, the cross-site check for
//! state-changing methods and the body deadline; `POST /broadcast`,
//! `/status` and `/metrics` take optional tokens; the app passes
//! `net.security().request_header_timeout()` to
//! `HttpServer::client_request_timeout`. `/health`, `/ready` and `/metrics`
//! are never rate limited.

use crate::config::{ClusterConfig, Config, ConfigError, NodeIdentity};
use crate::ops::{OpsState, Probes};
use crate::realtime::cluster::{ClusterBridge, Leave};
use crate::realtime::websocket::PeerSocket;
use crate::realtime::{routes, RealtimeState};
use crate::security::Security;
use crate::upstream::{ApiClient, HttpClient, Upstreams};
use actix::prelude::*;
use actix_web::dev::Extensions;
use actix_web::web;
use happynet_actors::{BroadcastHub, GetHistory, HistoryPage, Position, RoomName};
use socket2::{SockRef, Socket};
use std::any::Any;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

/// The handle an application keeps. Cloning it is cheap; every clone refers
/// to the same actors.
#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    /// The hub and what the real-time routes share.
    realtime: web::Data<RealtimeState>,
    upstreams: Arc<Upstreams>,
    security: Security,
    alerts: Arc<crate::ops::alerts::AlertLog>,
    /// The cluster bridge, when `network.cluster` is configured.
    cluster: Option<Addr<ClusterBridge>>,
    /// What `/metrics`, `/status`, `/ready` and the alerts read, and the
    /// snapshot gates of `/metrics` and `/status`.
    ops: Arc<OpsState>,
}

impl Network {
    /// Validates `config` and starts the actors on the current actix arbiter.
    /// Call it inside a running actix `System` (e.g. in `#[actix_web::main]`).
    pub fn start(config: Config) -> Result<Network, ConfigError> {
        config.validate()?;
        let upstreams =
            Upstreams::start(&config.network).map_err(|message| ConfigError::Invalid {
                path: "network.api_clients".into(),
                message,
            })?;
        // With `network.cluster`, the rates marked shared are kept in its
        // Redis, so that they hold across the nodes.
        let shared_limit = config
            .network
            .cluster
            .as_ref()
            .and_then(ClusterConfig::shared_limit);
        let security = Security::start_shared(&config.network.security, shared_limit)?;
        let ws = &config.network.websocket;
        let hub = BroadcastHub::new(ws.hub_config());
        let hub_epoch = hub.epoch();
        let shards = hub.shards();
        // One name for this node, in the bridge, the alerts and /status.
        let node = NodeIdentity::new(config.network.cluster.as_ref());
        let alerts = crate::ops::alerts::AlertsSetup::new(&config.network, &upstreams, &node.name)?;
        let hub = hub.start();
        // With `network.cluster`, the bridge relays local broadcasts to the
        // other nodes and hands theirs to the hub.
        let cluster = config
            .network
            .cluster
            .as_ref()
            .map(|c| {
                let history_ttl = ws.history.history_config().map(|h| h.ttl);
                ClusterBridge::start_for(c, node, hub.clone(), history_ttl)
            })
            .transpose()?;
        let realtime = web::Data::new(RealtimeState::new(
            hub,
            shards,
            hub_epoch,
            ws,
            security.clone(),
        ));
        let probes = Probes {
            hub: realtime.hub().clone(),
            started: hub_epoch,
            gate: realtime.gate(),
            shutting_down: realtime.shutting_down_flag(),
            upstreams: upstreams.clone(),
            security: security.clone(),
            cluster: cluster.clone(),
            alerts: alerts.log(),
            room_names_public: config.network.security.ws_tokens.is_empty(),
            ready_requires_link: config
                .network
                .cluster
                .as_ref()
                .is_some_and(|c| c.ready_requires_link),
        };
        let ops = Arc::new(OpsState::new(
            probes,
            config.network.security.snapshot_interval.0,
        ));
        let inner = Inner {
            realtime,
            cluster,
            upstreams,
            security,
            alerts: alerts.log(),
            ops,
            config,
        };
        let gateway = &inner.config.network.gateway;
        if gateway.tokens.is_empty() && !inner.config.network.api_clients.is_empty() {
            log::warn!("network.gateway.tokens is empty: the /v1 gateway routes accept any caller");
        }
        let net = Network {
            inner: Arc::new(inner),
        };
        alerts.start(Arc::downgrade(&net.inner.ops.probes));
        Ok(net)
    }

    /// A page of `room`'s history: up to `limit` messages after `since`
    /// (oldest first), or the last `limit` without one, each with its
    /// offset and the frame protocol clients received for it. When
    /// `complete` is false the history no longer covers `since` (or its
    /// epoch is not the room's): reload the state instead. Errors when
    /// the hub does not answer in time.
    pub async fn history(
        &self,
        room: RoomName,
        since: Option<Position>,
        limit: usize,
    ) -> Result<HistoryPage, MailboxError> {
        self.hub()
            .send(GetHistory { room, since, limit })
            .timeout(Duration::from_secs(5))
            .await
    }

    /// The hub's address: `net.hub().do_send(Broadcast::text("Hello, clients!"))`.
    pub fn hub(&self) -> Addr<BroadcastHub> {
        self.inner.realtime.hub().clone()
    }

    /// The cluster bridge (`network.cluster`), if configured: ask it for
    /// [`crate::realtime::cluster::GetClusterStats`].
    pub fn cluster(&self) -> Option<&Addr<ClusterBridge>> {
        self.inner.cluster.as_ref()
    }

    /// A client for any URL: pooled, retried, broken and limited per origin.
    pub fn http(&self) -> HttpClient {
        HttpClient::new(self.inner.upstreams.clone())
    }

    /// The client for `network.api_clients.<name>`, if configured.
    pub fn api(&self, name: &str) -> Option<ApiClient> {
        self.inner.upstreams.api_client(name).map(ApiClient::new)
    }

    /// The gateway's clients (`network.gateway.clients`) that exist, in order.
    pub fn gateway_clients(&self) -> Vec<ApiClient> {
        self.inner
            .config
            .network
            .gateway
            .clients
            .iter()
            .filter_map(|name| self.api(name))
            .collect()
    }

    /// Every configured API client.
    pub fn api_clients(&self) -> Vec<ApiClient> {
        self.inner
            .upstreams
            .api_clients()
            .map(|(_, u)| ApiClient::new(u.clone()))
            .collect()
    }

    /// The configuration the network was started with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The flood and abuse guards (`network.security`): their counters, the
    /// client-IP rule, and [`Security::api_guard`] for the app's own routes.
    pub fn security(&self) -> &Security {
        &self.inner.security
    }

    /// How many snapshots `/metrics` and `/status` have taken so far: what
    /// their requests have cost the hub, at most one per
    /// `network.security.snapshot_interval` each, however many came.
    pub fn snapshots_taken(&self) -> crate::ops::SnapshotsTaken {
        self.inner.ops.snapshots_taken()
    }

    /// What a look at the node reads: pass it to
    /// [`crate::ops::metrics::render`], [`crate::ops::status::collect`] or
    /// [`crate::ops::readiness::readiness`].
    pub fn probes(&self) -> &Probes {
        self.inner.ops.probes()
    }

    /// WebSocket connections open now.
    pub fn open_connections(&self) -> usize {
        self.inner.realtime.open_connections()
    }

    /// How long ago [`Network::start`] ran (it created the hub then).
    pub fn uptime(&self) -> Duration {
        self.inner.realtime.hub_epoch().elapsed()
    }

    /// The most recent alert events (`network.alerts`), oldest first and
    /// newest last, at most `network.alerts.history` of them.
    pub fn recent_alerts(&self) -> Vec<crate::ops::alerts::AlertEvent> {
        self.inner.alerts.recent()
    }

    /// The newest `n` of [`Network::recent_alerts`], oldest first, copying
    /// only those (what `/status` shows).
    pub fn recent_alerts_tail(&self, n: usize) -> Vec<crate::ops::alerts::AlertEvent> {
        self.inner.alerts.recent_tail(n)
    }

    /// What the alerts have done so far: events fired and resolved, firings
    /// held back, webhook POSTs sent, failed and dropped.
    pub fn alert_counters(&self) -> crate::ops::alerts::AlertCounters {
        self.inner.alerts.counters()
    }

    /// Mounts `/ws`, `POST /broadcast`, `GET /health`, `GET /ready`,
    /// `GET /metrics` and `GET /status`:
    /// `App::new().configure(net.configure())`. `POST /broadcast` and
    /// `GET /status` are behind the per-IP request limiter and the
    /// cross-site check ([`Security::api_guard`]); `POST /broadcast`,
    /// `GET /status` and `GET /metrics` require a token when
    /// `broadcast_tokens`, `status_tokens` or `metrics_tokens` is set
    /// ([`Security::token_guard`]).
    pub fn configure(&self) -> impl Fn(&mut web::ServiceConfig) + Clone + 'static {
        use crate::security::TokenScope;
        let net = self.clone();
        move |cfg: &mut web::ServiceConfig| {
            let security = &net.inner.security;
            routes::configure(cfg, &net.inner.realtime);
            // The last `wrap` runs first: the limiter and the cross-site
            // check before the token, so that guessing is rate limited.
            cfg.app_data(web::Data::new(net.clone()))
                .app_data(web::Data::from(net.inner.ops.clone()))
                .route("/ready", web::get().to(crate::ops::readiness::ready_route))
                .service(
                    web::resource("/metrics")
                        .wrap(security.token_guard(TokenScope::Metrics))
                        .route(web::get().to(crate::ops::metrics::metrics_route)),
                )
                // Behind the per-IP limiter, unlike /metrics: each request
                // copies the room table (see crate::ops::status).
                .service(
                    web::resource("/status")
                        .wrap(security.token_guard(TokenScope::Status))
                        .wrap(security.api_guard())
                        .route(web::get().to(crate::ops::status::status_route)),
                );
        }
    }

    /// Mounts the gateways: `ANY /proxy/{client}/{tail…}` and the
    /// OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`.
    /// Use it beside [`Network::configure`]:
    /// `App::new().configure(net.configure()).configure(net.configure_gateways())`.
    ///
    /// Every route under `/proxy/` and `/v1/` is behind the per-IP request
    /// limiter ([`Security::api_guard`]); those two prefixes belong to the
    /// gateways, so mount the app's own routes elsewhere.
    pub fn configure_gateways(&self) -> impl Fn(&mut web::ServiceConfig) + Clone + 'static {
        let gateway = web::Data::new(crate::gateway::GatewayState::new(
            &self.inner.config.network.gateway,
            self.api_clients(),
        ));
        let security = self.inner.security.clone();
        move |cfg: &mut web::ServiceConfig| {
            // A scope with no prefix, entered only for the gateways' paths
            // (a failed guard lets routing go on to later services), is how
            // one middleware wraps routes that another module mounts.
            cfg.service(
                web::scope("")
                    .guard(actix_web::guard::fn_guard(|ctx| {
                        is_gateway_path(ctx.head().uri.path())
                    }))
                    .wrap(security.api_guard())
                    .configure(|cfg| crate::gateway::configure(cfg, &gateway)),
            );
        }
    }

    /// A hook for `HttpServer::on_connect`. It sets `TCP_USER_TIMEOUT`,
    /// `SO_SNDBUF` (when configured) and `TCP_NODELAY` on each accepted
    /// socket, and keeps a duplicate of it so the hub can shut down a client
    /// that stops reading even though its session actor is frozen. Without
    /// it, happynet still works, but such a client's connection lingers until
    /// the kernel gives up on it. It also enforces
    /// `network.security.max_tcp_connections_per_ip`: a connection beyond it
    /// gets a raw 429 and is shut down at once.
    pub fn on_connect(&self) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync + 'static {
        let ws = &self.inner.config.network.websocket;
        let user_timeout = ws.tcp_user_timeout.0;
        let send_buffer = ws.socket_send_buffer;
        let security = self.inner.security.clone();
        move |conn: &dyn Any, ext: &mut Extensions| {
            use actix_web::rt::net::TcpStream;
            // Over HTTPS (`bind_rustls_0_23`) the connection is the TLS
            // stream; the socket underneath gets the same treatment.
            type Tls = actix_tls::accept::rustls_0_23::TlsStream<TcpStream>;
            let (tcp, tls) = if let Some(tcp) = conn.downcast_ref::<TcpStream>() {
                (tcp, false)
            } else if let Some(tls) = conn.downcast_ref::<Tls>() {
                (tls.get_ref().0, true)
            } else {
                return;
            };
            if !security.on_accept(tcp, ext) {
                return;
            }
            let sock = SockRef::from(tcp);
            if !user_timeout.is_zero() {
                if let Err(e) = sock.set_tcp_user_timeout(Some(user_timeout)) {
                    log::debug!("TCP_USER_TIMEOUT not set: {e}");
                }
            }
            if send_buffer > 0 {
                if let Err(e) = sock.set_send_buffer_size(send_buffer) {
                    log::debug!("SO_SNDBUF not set: {e}");
                }
            }
            let _ = sock.set_nodelay(true);
            match tcp.as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    ext.insert(PeerSocket {
                        socket: Arc::new(Socket::from(fd)),
                        tls,
                    });
                }
                Err(e) => log::warn!("cannot duplicate an accepted socket: {e}"),
            }
        }
    }

    /// Closes every WebSocket with 1001 (going away), waits for them to close
    /// (at most `websocket.shutdown_timeout`), and stops the hub. New
    /// upgrades get 503 from the moment this is called. With
    /// `network.cluster`, the bridge then flushes its outbox and leaves
    /// (at most [`crate::realtime::cluster::LEAVE_TIMEOUT`]). Returns how
    /// many sessions were open.
    pub async fn shutdown(&self) -> usize {
        let open = self.inner.realtime.shutdown().await;
        if let Some(cluster) = &self.inner.cluster {
            let _ = cluster.send(Leave).await;
        }
        open
    }

    /// True once [`Network::shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.realtime.is_shutting_down()
    }
}

/// The paths [`Network::configure_gateways`] mounts.
fn is_gateway_path(path: &str) -> bool {
    path.starts_with("/proxy/") || path.starts_with("/v1/")
}
