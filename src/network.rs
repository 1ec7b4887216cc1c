//! `Network`: what an actix application holds to use happynet.
//!
//! `Network::start` builds the actors from a [`Config`] and hands back a cheap,
//! cloneable handle. From it app code gets the hub's address (to send
//! `Broadcast`s), a `configure` function that mounts the routes into any
//! actix-web `App`, an `on_connect` hook for `HttpServer` that tunes accepted
//! sockets and lets the hub cut off clients that stop reading, and a graceful
//! `shutdown`.
//!
//! Routes:
//! - `GET /ws[?room=NAME][&presence=1]`: the WebSocket upgrade. A plain
//!   client receives only data; one offering the subprotocol `happynet.v1`
//!   also gets protocol frames (`presence=1` needs it: 400 otherwise). The
//!   session is registered with the hub before the `101` is sent
//!   ([`crate::websocket`]);
//! - `POST /broadcast[?room=NAME]`: `text/plain` (verbatim text),
//!   `application/octet-stream` (verbatim binary) or JSON
//!   `{"room": …, "data": …}`; answers `202 {"recipients": n}`;
//! - `GET /health`: liveness with the hub's counters;
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

use crate::client::{ApiClient, HttpClient, Upstreams};
use crate::cluster::ClusterBridge;
use crate::config::{ClusterConfig, Config, ConfigError, NodeIdentity};
use crate::ops::{OpsState, Probes};
use crate::security::{Security, UpgradePass};
use actix::prelude::*;
use actix_web::dev::Extensions;
use actix_web::http::header::{self, ContentType};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use happynet_actors::{
    Broadcast, BroadcastHub, ClientKind, Connect, ConnectRefused, ConnectionGate, GetStats,
    RoomName, SessionConfig, Shutdown, WsSessionActor,
};
use serde::Deserialize;
use serde_json::json;
use socket2::{SockRef, Socket};
use std::any::Any;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long an HTTP route waits for the hub before answering 503.
const HUB_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// The handle an application keeps. Cloning it is cheap; every clone refers
/// to the same actors.
#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    hub: Addr<BroadcastHub>,
    hub_epoch: tokio::time::Instant,
    session_config: Arc<SessionConfig>,
    gate: Arc<ConnectionGate>,
    next_session: AtomicU64,
    shutting_down: Arc<AtomicBool>,
    upstreams: Arc<Upstreams>,
    security: Security,
    alerts: Arc<crate::ops::alerts::AlertLog>,
    /// The cluster bridge, when `network.cluster` is configured.
    cluster: Option<Addr<ClusterBridge>>,
    /// What `/metrics`, `/status`, `/ready` and the alerts read, and the
    /// snapshot gates of `/metrics` and `/status`.
    ops: Arc<OpsState>,
}

/// A duplicate of an accepted connection's socket, stored by
/// [`Network::on_connect`] in the connection's data for the upgrade route.
#[derive(Clone)]
struct PeerSocket {
    socket: Arc<Socket>,
    /// Whether the connection is TLS (see [`crate::websocket`]).
    tls: bool,
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
        // Issue 6: with `network.cluster`, rates marked shared are kept in
        // its Redis.
        let shared_limit = config
            .network
            .cluster
            .as_ref()
            .and_then(ClusterConfig::shared_limit);
        let security = Security::start_shared(&config.network.security, shared_limit)?;
        let ws = &config.network.websocket;
        let hub = BroadcastHub::new(ws.hub_config());
        let hub_epoch = hub.epoch();
        // One name for this node, in the bridge, the alerts and /status.
        let node = NodeIdentity::new(config.network.cluster.as_ref());
        let alerts = crate::ops::alerts::AlertsSetup::new(&config.network, &upstreams, &node.name)?;
        let hub = hub.start();
        // Issue 6: the bridge relays local broadcasts to the other nodes.
        let cluster = config
            .network
            .cluster
            .as_ref()
            .map(|c| ClusterBridge::start_for(c, node, hub.clone()))
            .transpose()?;
        let gate = ConnectionGate::new(ws.max_connections);
        let shutting_down = Arc::new(AtomicBool::new(false));
        let probes = Probes {
            hub: hub.clone(),
            started: hub_epoch,
            gate: gate.clone(),
            shutting_down: shutting_down.clone(),
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
            hub,
            cluster,
            hub_epoch,
            session_config: Arc::new(ws.session_config()),
            gate,
            next_session: AtomicU64::new(1),
            shutting_down,
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

    /// The hub's address: `net.hub().do_send(Broadcast::text("Hello, clients!"))`.
    pub fn hub(&self) -> Addr<BroadcastHub> {
        self.inner.hub.clone()
    }

    /// The cluster bridge (`network.cluster`), if configured: ask it for
    /// [`crate::cluster::GetClusterStats`].
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
        self.inner.gate.open()
    }

    /// How long ago [`Network::start`] ran (it created the hub then).
    pub fn uptime(&self) -> Duration {
        self.inner.hub_epoch.elapsed()
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
            let body_limit = net.inner.config.network.websocket.max_message_bytes;
            let security = &net.inner.security;
            // The last `wrap` runs first: the limiter and the cross-site
            // check before the token, so that guessing is rate limited.
            cfg.app_data(web::Data::new(net.clone()))
                .app_data(web::Data::from(net.inner.ops.clone()))
                .route("/ws", web::get().to(ws_route))
                .service(
                    web::resource("/broadcast")
                        .wrap(security.token_guard(TokenScope::Broadcast))
                        .wrap(security.api_guard())
                        .app_data(web::PayloadConfig::new(body_limit))
                        .route(web::post().to(broadcast_route)),
                )
                .route("/health", web::get().to(health_route))
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
    /// Use it beside [`Network::configure`], which provides the app data:
    /// `App::new().configure(net.configure()).configure(net.configure_gateways())`.
    ///
    /// Every route under `/proxy/` and `/v1/` is behind the per-IP request
    /// limiter ([`Security::api_guard`]); those two prefixes belong to the
    /// gateways, so mount the app's own routes elsewhere.
    pub fn configure_gateways(&self) -> impl Fn(&mut web::ServiceConfig) + Clone + 'static {
        let max_body = self.inner.config.network.gateway.max_body_bytes;
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
                    .configure(|cfg| {
                        crate::gateway::configure(cfg);
                        crate::llm_gateway::configure(cfg, max_body);
                    }),
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
    /// (at most [`crate::cluster::LEAVE_TIMEOUT`]). Returns how many
    /// sessions were open.
    pub async fn shutdown(&self) -> usize {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        let open = self.inner.hub.send(Shutdown).await.unwrap_or(0);
        if let Some(cluster) = &self.inner.cluster {
            let _ = cluster.send(crate::cluster::Leave).await;
        }
        open
    }

    /// True once [`Network::shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }
}

fn error_response(status: actix_web::http::StatusCode, error: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": error, "message": message }))
}

#[derive(Deserialize)]
struct WsQuery {
    room: Option<String>,
    presence: Option<String>,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "yes" | "on"))
}

async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    net: web::Data<Network>,
) -> actix_web::Result<HttpResponse> {
    use actix_web::http::StatusCode;
    let inner = &net.inner;
    // Before anything else: the security checks answer 429/403/401 without
    // upgrading, and the pass holds this IP's connection slot.
    let pass: UpgradePass = inner.security.admit_upgrade(&req).await?;
    let query = match web::Query::<WsQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "bad_query",
                &e.to_string(),
            ))
        }
    };
    let kind = crate::websocket::requested_kind(&req);
    let presence = truthy(query.presence.as_deref());
    if presence && kind == ClientKind::Plain {
        return Ok(error_response(
            StatusCode::BAD_REQUEST,
            "presence_needs_protocol",
            &format!(
                "presence frames are protocol frames: offer the subprotocol {} to get them",
                happynet_actors::protocol::SUBPROTOCOL
            ),
        ));
    }
    let room = match query.room.as_deref() {
        None => inner.config.network.websocket.default_room(),
        Some(name) => match RoomName::new(name) {
            Ok(room) => room,
            Err(e) => {
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_room",
                    &e.to_string(),
                ))
            }
        },
    };
    if net.is_shutting_down() || !inner.hub.connected() {
        return Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    let Some(slot) = inner.gate.try_acquire() else {
        log::warn!(
            "websocket upgrade refused: {} connections open (max_connections)",
            inner.gate.max()
        );
        return Ok(HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "5"))
            .json(json!({
                "error": "too_many_connections",
                "message": format!("the server holds its maximum of {} WebSocket connections", inner.gate.max()),
            })));
    };
    let peer = req.conn_data::<PeerSocket>();
    let socket = peer.map(|p| p.socket.clone());
    let id = inner.next_session.fetch_add(1, Ordering::Relaxed);
    let session = WsSessionActor::new(
        id,
        inner.hub.clone(),
        inner.hub_epoch,
        inner.session_config.clone(),
        kind,
        Some(slot),
    );
    let link = session.link();
    let checked = session.check_inbound(stream);
    let builder = ws::WsResponseBuilder::new(session, &req, checked)
        // The frame checker refuses a message over the limit first (1009);
        // the codec's own limit is the same, so it never refuses first.
        .frame_size(inner.session_config.max_message_bytes);
    let (addr, mut response) = match kind {
        // Echoes `happynet` when the client offers it (RFC 6455: a token
        // offered as `token.<token>` must come with a protocol to echo).
        ClientKind::Plain => builder.protocols(UpgradePass::PROTOCOLS),
        // Echoed below: actix would echo whichever known protocol the
        // client listed first, and only from the first header.
        ClientKind::Protocol => builder,
    }
    .start_with_addr()?;
    if kind == ClientKind::Protocol {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static(happynet_actors::protocol::SUBPROTOCOL),
        );
    }
    // Registered before the 101 goes out, so that any broadcast sent once
    // the client holds it reaches it. On a refusal the response (and with
    // it the unstarted session) is dropped.
    let connect = Connect {
        id,
        addr,
        link,
        room,
        presence,
        kind,
        socket: socket.clone(),
        // The rooms this client creates count against its address (the
        // same key, and the same exemptions, as the per-IP guards).
        ip_key: room_quota_key(&inner.security, &req),
    };
    match inner.hub.send(connect).timeout(HUB_REPLY_TIMEOUT).await {
        Ok(Ok(())) => {}
        Ok(Err(refused)) => {
            let (status, code) = match refused {
                ConnectRefused::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
                ConnectRefused::RoomTableFull(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "server_full")
                }
                // The client's own quota: it is the one to slow down.
                ConnectRefused::RoomQuota(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_rooms"),
                _ => (StatusCode::SERVICE_UNAVAILABLE, "hub_unavailable"),
            };
            return Ok(HttpResponse::build(status)
                .insert_header((header::RETRY_AFTER, "5"))
                .json(json!({ "error": code, "message": refused.to_string() })));
        }
        Err(e) => {
            return Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "hub_unavailable",
                &format!("the broadcast hub did not register the session: {e}"),
            ))
        }
    }
    let plain_tcp = peer.filter(|p| !p.tls).map(|p| p.socket.clone());
    let response = crate::websocket::close_tcp_when_done(response, plain_tcp);
    Ok(pass.hold_until_closed(response))
}

/// The key `websocket.max_rooms_per_ip` counts `req`'s client under: the
/// per-IP key of `network.security` (honouring `trust_forwarded_for`, IPv6
/// by /64), or `None` for an exempt or unknown address.
fn room_quota_key(security: &Security, req: &HttpRequest) -> Option<std::net::IpAddr> {
    security
        .client_ip(req)
        .filter(|ip| !security.is_exempt(*ip))
        .map(crate::security::limit_key)
}

/// The paths [`Network::configure_gateways`] mounts.
fn is_gateway_path(path: &str) -> bool {
    path.starts_with("/proxy/") || path.starts_with("/v1/")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBroadcast {
    room: Option<String>,
    data: Box<serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct BroadcastQuery {
    room: Option<String>,
}

async fn broadcast_route(
    req: HttpRequest,
    body: web::Bytes,
    net: web::Data<Network>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    let query = match web::Query::<BroadcastQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_query", &e.to_string()),
    };
    let parse_room = |name: Option<String>| name.map(|n| RoomName::new(&n)).transpose();
    let bad_room = |e: happynet_actors::rooms::RoomNameError| {
        error_response(StatusCode::BAD_REQUEST, "bad_room", &e.to_string())
    };
    let mime = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok());
    let msg = match mime.as_ref().map(|m| (m.type_(), m.subtype())) {
        Some((mime::APPLICATION, mime::JSON)) => {
            let parsed: JsonBroadcast = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return error_response(StatusCode::BAD_REQUEST, "bad_json", &e.to_string())
                }
            };
            let room = match parse_room(parsed.room.or(query.room)) {
                Ok(r) => r,
                Err(e) => return bad_room(e),
            };
            Broadcast::message(room, &parsed.data)
        }
        Some((mime::APPLICATION, mime::OCTET_STREAM)) => match parse_room(query.room) {
            Ok(Some(room)) => Broadcast::binary_to_room(room, body),
            Ok(None) => Broadcast::binary(body),
            Err(e) => return bad_room(e),
        },
        Some((mime::TEXT, mime::PLAIN)) => {
            let text = match bytestring::ByteString::try_from(body) {
                Ok(t) => t,
                Err(_) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        "bad_text",
                        "the body is not UTF-8",
                    )
                }
            };
            match parse_room(query.room) {
                Ok(Some(room)) => Broadcast::to_room(room, text),
                Ok(None) => Broadcast::text(text),
                Err(e) => return bad_room(e),
            }
        }
        _ => {
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send text/plain, application/octet-stream or application/json",
            )
        }
    };
    match net.inner.hub.send(msg).timeout(HUB_REPLY_TIMEOUT).await {
        Ok(recipients) => HttpResponse::Accepted().json(json!({ "recipients": recipients })),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub_unavailable",
            &format!("the broadcast hub did not accept the message: {e}"),
        ),
    }
}

async fn health_route(net: web::Data<Network>) -> HttpResponse {
    if net.is_shutting_down() {
        return HttpResponse::ServiceUnavailable().json(json!({ "status": "shutting_down" }));
    }
    match net
        .inner
        .hub
        .send(GetStats)
        .timeout(HUB_REPLY_TIMEOUT)
        .await
    {
        Ok(stats) => HttpResponse::Ok()
            .content_type(ContentType::json())
            .json(json!({
                "status": "ok",
                "connections": net.open_connections(),
                "max_connections": net.inner.gate.max(),
                "hub": stats,
            })),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({
            "status": "unavailable",
            "reason": format!("broadcast hub: {e}"),
        })),
    }
}
