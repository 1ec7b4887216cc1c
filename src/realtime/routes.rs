//! The real-time routes and the state they share, [`RealtimeState`]:
//!
//! - `GET /ws[?room=NAME][&presence=1]`: the WebSocket upgrade. A plain
//!   client receives only data; one offering the subprotocol `happynet.v1`
//!   also gets protocol frames (`presence=1` needs it: 400 otherwise). The
//!   session is registered with the hub before the `101` is sent
//!   ([`super::websocket`] has the upgrade's own pieces);
//! - `POST /broadcast[?room=NAME]`: `text/plain` (verbatim text),
//!   `application/octet-stream` (verbatim binary) or JSON
//!   `{"room": …, "data": …}`; answers `202 {"recipients": n}`;
//! - `GET /rooms/{room}/history[?since=EPOCH:OFFSET][&limit=N]`: a page of
//!   the room's history (`{"room","complete","last","messages":[…]}`),
//!   behind the same token as `POST /broadcast`;
//! - `GET /health`: liveness with the hub's counters.
//!
//! `/ws?since=EPOCH:OFFSET` (or `recover=last`) asks the hub to replay the
//! room's history after that position once the session is registered;
//! recovery frames are protocol frames, so a plain client asking is a 400.
//!
//! The flood and abuse guards of `network.security` ([`crate::security`])
//! sit in front: `/ws` checks the upgrade rate, origin, token and
//! WebSockets per IP before upgrading; `POST /broadcast` is behind the
//! per-IP request limiter, the cross-site check and its optional token;
//! `/health` is never rate limited.

use super::websocket::{self, PeerSocket};
use crate::config::WebSocketConfig;
use crate::security::{Security, TokenScope, UpgradePass};
use actix::prelude::*;
use actix_web::http::header::{self, ContentType};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use happynet_actors::{
    Broadcast, BroadcastHub, ClientKind, Connect, ConnectRefused, ConnectionGate, GetHistory,
    GetHubStats, HistoryPage, HubShards, Position, RoomName, SessionConfig, Shutdown,
    WsSessionActor,
};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long an HTTP route waits for the hub before answering 503.
const HUB_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the real-time routes need: the hub, the connection gate and session
/// numbering, the per-session limits, and the guards. Built once by
/// `Network::start` and registered as app data by `Network::configure`.
pub struct RealtimeState {
    hub: Addr<BroadcastHub>,
    /// Where each upgrade finds the hub's shard on its own worker thread.
    shards: HubShards,
    /// The hub's epoch, which every session's link is measured from.
    hub_epoch: Instant,
    session_config: Arc<SessionConfig>,
    gate: Arc<ConnectionGate>,
    next_session: AtomicU64,
    /// Shared with the readiness probe (`/ready` answers 503 once set).
    shutting_down: Arc<AtomicBool>,
    default_room: RoomName,
    security: Security,
}

impl RealtimeState {
    /// The state for a started `hub` whose epoch is `hub_epoch` and whose
    /// shards are `shards`, with the limits of `ws` and the guards of
    /// `security`.
    pub(crate) fn new(
        hub: Addr<BroadcastHub>,
        shards: HubShards,
        hub_epoch: Instant,
        ws: &WebSocketConfig,
        security: Security,
    ) -> Self {
        RealtimeState {
            hub,
            shards,
            hub_epoch,
            session_config: Arc::new(ws.session_config()),
            gate: ConnectionGate::new(ws.max_connections),
            next_session: AtomicU64::new(1),
            shutting_down: Arc::new(AtomicBool::new(false)),
            default_room: ws.default_room(),
            security,
        }
    }

    /// The WebSocket connection gate (`max_connections`).
    pub(crate) fn gate(&self) -> Arc<ConnectionGate> {
        self.gate.clone()
    }

    /// The flag [`RealtimeState::begin_shutdown`] sets, for readers elsewhere.
    pub(crate) fn shutting_down_flag(&self) -> Arc<AtomicBool> {
        self.shutting_down.clone()
    }

    /// The hub's address.
    pub fn hub(&self) -> &Addr<BroadcastHub> {
        &self.hub
    }

    /// When the hub was created.
    pub fn hub_epoch(&self) -> Instant {
        self.hub_epoch
    }

    /// WebSocket connections open now.
    pub fn open_connections(&self) -> usize {
        self.gate.open()
    }

    /// True once `Network::shutdown` has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Refuses new upgrades (503) from now on, then has the hub close every
    /// WebSocket with 1001 and stop; returns how many sessions were open.
    pub(crate) async fn shutdown(&self) -> usize {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.hub.send(Shutdown).await.unwrap_or(0)
    }
}

/// Mounts `/ws`, `POST /broadcast` and `GET /health` for `state`.
/// `POST /broadcast` is behind the per-IP request limiter and the
/// cross-site check ([`Security::api_guard`]), and requires a token when
/// `broadcast_tokens` is set ([`Security::token_guard`]).
pub(crate) fn configure(cfg: &mut web::ServiceConfig, state: &web::Data<RealtimeState>) {
    let security = &state.security;
    // The last `wrap` runs first: the limiter and the cross-site check
    // before the token, so that guessing is rate limited.
    cfg.app_data(state.clone())
        .route("/ws", web::get().to(ws_route))
        .service(
            web::resource("/broadcast")
                .wrap(security.token_guard(TokenScope::Broadcast))
                .wrap(security.api_guard())
                .app_data(web::PayloadConfig::new(
                    state.session_config.max_message_bytes,
                ))
                .route(web::post().to(broadcast_route)),
        )
        .service(
            web::resource("/rooms/{room}/history")
                .wrap(security.token_guard(TokenScope::Broadcast))
                .wrap(security.api_guard())
                .route(web::get().to(history_route)),
        )
        .route("/health", web::get().to(health_route));
}

fn error_response(status: StatusCode, error: &str, message: &str) -> HttpResponse {
    crate::json_error::ErrorBody::new(error, message).answer(status)
}

/// A refused upgrade the client may try again: the error body with
/// `Retry-After: 5`.
fn retry_later(status: StatusCode, error: &str, message: &str) -> HttpResponse {
    let mut response = error_response(status, error, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    response
}

#[derive(Deserialize)]
struct WsQuery {
    room: Option<String>,
    presence: Option<String>,
    since: Option<String>,
    recover: Option<String>,
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "yes" | "on"))
}

async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<RealtimeState>,
) -> actix_web::Result<HttpResponse> {
    // Before anything else: the security checks answer 429/403/401 without
    // upgrading, and the pass holds this IP's connection slot.
    let pass: UpgradePass = state.security.admit_upgrade(&req).await?;
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
    let kind = websocket::requested_kind(&req);
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
    let recover = match happynet_actors::protocol::recover_of(
        query.since.as_deref(),
        query.recover.as_deref(),
    ) {
        Ok(r) => r,
        Err(e) => {
            return Ok(error_response(
                StatusCode::BAD_REQUEST,
                "bad_since",
                &e.to_string(),
            ))
        }
    };
    if recover.is_some() && kind == ClientKind::Plain {
        return Ok(error_response(
            StatusCode::BAD_REQUEST,
            "recovery_needs_protocol",
            &format!(
                "recovered messages are protocol frames: offer the subprotocol {} to get them",
                happynet_actors::protocol::SUBPROTOCOL
            ),
        ));
    }
    let room = match query.room.as_deref() {
        None => state.default_room.clone(),
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
    // The session registers with the shard on this worker's thread, so that
    // the hub's deliveries to it never cross threads; the directory refuses
    // once the hub is shutting down, as the state does once the network is.
    let open = !state.is_shutting_down() && state.hub.connected();
    let Some(shard) = open.then(|| state.shards.local().ok()).flatten() else {
        return Ok(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    };
    let Some(slot) = state.gate.try_acquire() else {
        log::warn!(
            "websocket upgrade refused: {} connections open (max_connections)",
            state.gate.max()
        );
        return Ok(retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            &format!(
                "the server holds its maximum of {} WebSocket connections",
                state.gate.max()
            ),
        ));
    };
    let peer = req.conn_data::<PeerSocket>();
    let socket = peer.map(|p| p.socket.clone());
    let id = state.next_session.fetch_add(1, Ordering::Relaxed);
    let session = WsSessionActor::new(
        id,
        shard.clone(),
        state.hub_epoch,
        state.session_config.clone(),
        kind,
        Some(slot),
    );
    let link = session.link();
    let queue_link = link.clone();
    let checked = session.check_inbound(stream);
    let builder = ws::WsResponseBuilder::new(session, &req, checked)
        // The frame checker refuses a message over the limit first (1009);
        // the codec's own limit is the same, so it never refuses first.
        .frame_size(state.session_config.max_message_bytes);
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
        ip_key: room_quota_key(&state.security, &req),
        recover,
    };
    match shard.send(connect).timeout(HUB_REPLY_TIMEOUT).await {
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
            return Ok(retry_later(status, code, &refused.to_string()));
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
    Ok(websocket::upgrade_body(
        response, queue_link, plain_tcp, pass,
    ))
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
    state: web::Data<RealtimeState>,
) -> HttpResponse {
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
    match state.hub.send(msg).timeout(HUB_REPLY_TIMEOUT).await {
        Ok(recipients) => HttpResponse::Accepted().json(json!({ "recipients": recipients })),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub_unavailable",
            &format!("the broadcast hub did not accept the message: {e}"),
        ),
    }
}

/// The most messages one page of `GET /rooms/{room}/history` returns.
pub const MAX_HISTORY_LIMIT: usize = 10_000;
/// A page's size when the query names none.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<usize>,
}

/// The body of `GET /rooms/{room}/history`: the room, whether the history
/// covers everything after `since`, the room's last position, and the
/// messages (each the frame protocol clients receive, verbatim JSON).
pub(crate) fn history_body(room: &RoomName, page: &HistoryPage) -> String {
    let json_str = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    let last = page
        .last
        .as_ref()
        .map_or_else(|| "null".to_owned(), |p| json_str(&p.to_string()));
    let mut body = format!(
        r#"{{"room":{},"enabled":{},"complete":{},"last":{last},"messages":["#,
        json_str(room.as_str()),
        page.enabled,
        page.complete
    );
    for (i, entry) in page.entries.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&entry.frame);
    }
    body.push_str("]}");
    body
}

async fn history_route(
    req: HttpRequest,
    room: web::Path<String>,
    state: web::Data<RealtimeState>,
) -> HttpResponse {
    let query = match web::Query::<HistoryQuery>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_query", &e.to_string()),
    };
    let room = match RoomName::new(&room) {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_room", &e.to_string()),
    };
    let since = match query.since.as_deref().map(Position::parse).transpose() {
        Ok(s) => s,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_since", &e.to_string()),
    };
    let limit = query.limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
    if !(1..=MAX_HISTORY_LIMIT).contains(&limit) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_limit",
            &format!("limit must be between 1 and {MAX_HISTORY_LIMIT}"),
        );
    }
    let ask = GetHistory {
        room: room.clone(),
        since,
        limit,
    };
    match state.hub.send(ask).timeout(HUB_REPLY_TIMEOUT).await {
        Ok(page) => HttpResponse::Ok()
            .content_type(ContentType::json())
            .body(history_body(&room, &page)),
        Err(e) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub_unavailable",
            &format!("the broadcast hub did not answer: {e}"),
        ),
    }
}

async fn health_route(state: web::Data<RealtimeState>) -> HttpResponse {
    if state.is_shutting_down() {
        return HttpResponse::ServiceUnavailable().json(json!({ "status": "shutting_down" }));
    }
    match state.hub.send(GetHubStats).timeout(HUB_REPLY_TIMEOUT).await {
        Ok(stats) => HttpResponse::Ok()
            .content_type(ContentType::json())
            .json(json!({
                "status": "ok",
                "connections": state.open_connections(),
                "max_connections": state.gate.max(),
                "hub": stats,
            })),
        Err(e) => HttpResponse::ServiceUnavailable().json(json!({
            "status": "unavailable",
            "reason": format!("broadcast hub: {e}"),
        })),
    }
}
