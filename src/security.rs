//! Flood and abuse guards: what `network.security` configures.
//!
//! One abusive client must not be able to take the server down or shut other
//! clients out, so every guard here is on by default and keyed by the
//! client's IP address. Each one answers before any work is done for the
//! request — before a WebSocket upgrade, before a body is read — with a JSON
//! error that names the limit:
//!
//! | guard | where | answer |
//! |---|---|---|
//! | open TCP connections per IP | `Network::on_connect` | a raw `429`, connection shut |
//! | new upgrades per second per IP (GCRA) | `GET /ws` | `429` + `Retry-After` |
//! | `Origin` allow-list | `GET /ws` | `403` |
//! | token | `GET /ws` | `401` (`400` for a token offered as a subprotocol without `happynet`) |
//! | open WebSockets per IP | `GET /ws` | `429` + `Retry-After` |
//! | requests per second per IP (GCRA) | API routes, via [`ApiGuard`] | `429` + `Retry-After` |
//! | cross-site check (state-changing methods) | API routes, via [`ApiGuard`] | `403` |
//! | request body deadline | API routes, via [`ApiGuard`] | `408`, connection closed |
//! | route tokens (`broadcast_tokens`, `status_tokens`, `metrics_tokens`) | `POST /broadcast`, `GET /status`, `GET /metrics`, via [`TokenGuard`] | `401` |
//! | request head deadline (slowloris) | the server: `HttpServer::client_request_timeout(`[`Security::request_header_timeout`]`())` | `408`, connection closed |
//!
//! The upgrade checks run in that order. The rate comes first, so that
//! guessing tokens is rate limited too; on the API routes the rate and the
//! cross-site check come before a route's token for the same reason.
//!
//! **Cross-site requests.** A page on another site, open in an operator's
//! browser, can send a `POST` with `text/plain` or a form body without
//! asking (a CORS "simple" request), and the browser attaches no warning.
//! So every state-changing request (any method but GET, HEAD, OPTIONS,
//! TRACE) behind [`ApiGuard`] whose `Origin` is neither the server's own
//! (the scheme, host and port the request arrived for, directly or as a
//! proxy in front reports it) nor in `allowed_origins` gets 403
//! `cross_site_request`; so does one with `Sec-Fetch-Site: cross-site`
//! unless its `Origin` is allowed, and `Origin: null`. Requests without
//! `Origin` pass: browsers send it on every cross-origin POST, so such a
//! request comes from curl or an SDK, which a token (not an origin) must
//! stop.
//!
//! **Why these status codes.** A client over one of *its own* limits gets 429
//! (RFC 6585): it is the one that should slow down, and `Retry-After` tells
//! it when. The server-wide `websocket.max_connections` stays 503: there the
//! server is full, whoever asks.
//!
//! **Which address.** The client IP is the peer address, unless
//! `trust_forwarded_for` is set, when it is the last `X-Forwarded-For`
//! entry — the one the proxy in front appended. IPv6 clients are keyed by
//! their /64 prefix, since one host usually holds a whole /64 and could
//! otherwise pick a fresh address per connection. IPv4-mapped IPv6 peers
//! count as their IPv4 address. `exempt_ips` (loopback by default: a local
//! reverse proxy or tool is not one client) skips the per-IP limits, never the
//! token, origin or timeouts. A request with no peer address (a Unix socket)
//! is not limited per IP.
//!
//! **Bounded state.** The per-IP connection tables hold an entry only while
//! that IP has a connection open, so they are bounded by the open
//! connections, and they give memory back when they empty. The rate limiters
//! are [`RateLimiterActor`]s: at most `max_tracked_ips` keys, idle keys
//! evicted, new keys refused (429) when full rather than let through.
//!
//! **Tokens** are compared in constant time and never logged. A browser
//! cannot set `Authorization` on an upgrade, so a token is accepted in any of:
//! `Sec-WebSocket-Protocol: happynet, token.<token>` (the server then echoes
//! `happynet`, as RFC 6455 requires — a browser fails a handshake that echoes
//! nothing it offered), `Authorization: Bearer <token>` (non-browser
//! clients) or `?token=<token>` (simplest, but the query string shows up in
//! proxies' access logs and in `middleware::Logger`'s). The route tokens
//! are bearer tokens only.
//!
//! **The access log.** [`access_log`] is actix-web's `Logger` with the
//! value of every secret-looking query parameter ([`is_secret_param`]) in
//! the request line and the `Referer` written as `REDACTED`: wrap the app
//! in it rather than in `Logger::default()`.
//!
//! **Behind a reverse proxy** on the same host, every client is 127.0.0.1,
//! which `exempt_ips` exempts by default: the per-IP guards would then
//! limit nobody. Starting the guards warns about it unless
//! `trust_forwarded_for` is set or `exempt_ips` is written in the config
//! (an explicit choice, whatever its value).
//!
//! **Known gap.** actix-web's head deadline covers only a connection's first
//! request; a keep-alive connection that starts its second request and then
//! trickles it is not cut off by it. The per-IP TCP connection cap bounds how
//! many such connections one address can hold.

use crate::config::{normalize_origin, ConfigError, IpRange, SecurityConfig};
use actix::prelude::*;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{
    forward_ready, Extensions, Payload, Service, ServiceRequest, ServiceResponse, Transform,
};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{HttpMessage, HttpRequest, HttpResponse, ResponseError};
use futures::future::{ready, LocalBoxFuture, Ready};
use futures::Stream;
use happynet_actors::gcra::Quota;
use happynet_actors::limiter::{Acquire, RateLimiterActor};
use happynet_actors::shared_limiter::SharedLimit;
use serde::{Deserialize, Serialize};
use socket2::SockRef;
use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

/// The subprotocol a client offers beside `token.<token>`, and the one the
/// server echoes.
pub const HAPPYNET_SUBPROTOCOL: &str = "happynet";

/// The prefix of a token offered in `Sec-WebSocket-Protocol`.
pub const TOKEN_SUBPROTOCOL_PREFIX: &str = "token.";

/// How long a route waits for a rate limiter's answer before answering 503.
const LIMITER_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// `Retry-After` for a client at its open-connection cap: when a connection
/// will close is unknown, so this only spaces out retries.
const CONNECTION_CAP_RETRY_AFTER: Duration = Duration::from_secs(5);

/// IPv6 clients are limited per prefix of this length (see the module docs).
const IPV6_KEY_PREFIX_LEN: u8 = 64;

/// Refusals are logged at `info` at most this often (each one at `debug`):
/// a flood must not become a flood of log lines.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Below this many entries a connection table is not worth shrinking.
const MIN_SHRINK_SIZE: usize = 64;

/// A table shrinks when it holds fewer than one entry in this many of what it
/// was sized for.
const SHRINK_WHEN_SPARSER_THAN: usize = 4;

// ---------------------------------------------------------------------------
// Client addresses
// ---------------------------------------------------------------------------

/// What per-IP limits are kept per: the IPv4 address, or the IPv6 /64.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        v6 @ IpAddr::V6(_) => IpRange::containing(v6, IPV6_KEY_PREFIX_LEN).first(),
    }
}

/// The last entry of the last `X-Forwarded-For` header, as an address.
fn forwarded_for(req: &HttpRequest) -> Option<IpAddr> {
    let last = req
        .headers()
        .get_all("x-forwarded-for")
        .last()?
        .to_str()
        .ok()?
        .rsplit(',')
        .next()?
        .trim();
    last.parse::<IpAddr>()
        .ok()
        .or_else(|| last.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

// ---------------------------------------------------------------------------
// Tokens and origins
// ---------------------------------------------------------------------------

/// Whether `a` and `b` are equal, compared in constant time (`subtle`):
/// response timing must not reveal how much of a token was right. Every
/// token comparison in the crate goes through this one function.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // `ct_eq` on slices of different lengths is false at once: a
    // token's length is no secret worth hiding (tokens are long, random
    // and of one length per deployment), its bytes are.
    bool::from(a.ct_eq(b))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Which route's tokens a [`TokenGuard`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenScope {
    /// `POST /broadcast`: `network.security.broadcast_tokens`.
    Broadcast,
    /// `GET /status`: `network.security.status_tokens`.
    Status,
    /// `GET /metrics`: `network.security.metrics_tokens`.
    Metrics,
}

impl TokenScope {
    /// The key under `network.security` that holds the scope's tokens.
    pub fn config_key(&self) -> &'static str {
        match self {
            TokenScope::Broadcast => "broadcast_tokens",
            TokenScope::Status => "status_tokens",
            TokenScope::Metrics => "metrics_tokens",
        }
    }

    fn index(self) -> usize {
        match self {
            TokenScope::Broadcast => 0,
            TokenScope::Status => 1,
            TokenScope::Metrics => 2,
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's
/// case does not matter, RFC 9110 §11.1).
fn bearer_token(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Methods that must not change state (RFC 9110 §9.2.1): the cross-site
/// check leaves them alone, so links, images and `fetch` GETs from other
/// sites work as before.
fn is_safe_method(method: &actix_web::http::Method) -> bool {
    use actix_web::http::Method;
    [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE].contains(method)
}

/// The origins a request to this server may come from as same-origin: the
/// scheme it arrived on with its `Host` (or, over HTTP/2, its authority),
/// and the same as seen through `Forwarded` / `X-Forwarded-Host` /
/// `X-Forwarded-Proto` when a proxy in front sets them. A cross-site page
/// cannot forge either: a browser sends a custom header only after a CORS
/// preflight, which happynet does not grant.
fn own_origins(req: &HttpRequest) -> [Option<String>; 2] {
    let scheme = if req.app_config().secure() {
        "https"
    } else {
        "http"
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let direct = host.and_then(|h| normalize_origin(&format!("{scheme}://{h}")).ok());
    let info = req.connection_info();
    let forwarded = normalize_origin(&format!("{}://{}", info.scheme(), info.host())).ok();
    [direct, forwarded]
}

// ---------------------------------------------------------------------------
// Open connections per IP
// ---------------------------------------------------------------------------

/// Open connections per IP, at most `max` each: a plain state machine (no
/// locking, no clock). An IP has an entry only while it has a connection
/// open, so the table never outgrows the open connections, and it gives its
/// memory back when it empties.
#[derive(Debug)]
pub struct PerIpCounter {
    max: usize,
    open: HashMap<IpAddr, usize>,
    /// The most entries since the table was last shrunk: what its
    /// allocation was sized for.
    high_water: usize,
}

impl PerIpCounter {
    /// A table admitting up to `max` open connections per IP (with
    /// `max == 0`, none).
    pub fn new(max: usize) -> Self {
        PerIpCounter {
            max,
            open: HashMap::new(),
            high_water: 0,
        }
    }

    /// Counts one more connection from `ip`, or returns false if it already
    /// has `max`.
    pub fn try_open(&mut self, ip: IpAddr) -> bool {
        match self.open.get_mut(&ip) {
            Some(n) if *n >= self.max => false,
            Some(n) => {
                *n += 1;
                true
            }
            None if self.max == 0 => false,
            None => {
                self.open.insert(ip, 1);
                self.high_water = self.high_water.max(self.open.len());
                true
            }
        }
    }

    /// Counts one connection from `ip` as closed; the entry goes at zero.
    pub fn close(&mut self, ip: IpAddr) {
        if let Entry::Occupied(mut e) = self.open.entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
                self.maybe_shrink();
            }
        }
    }

    /// Connections open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.get(&ip).copied().unwrap_or(0)
    }

    /// IPs with a connection open: the table's size.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// True when no IP has a connection open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// The limit per IP.
    pub fn max(&self) -> usize {
        self.max
    }

    /// How many IPs the table can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.open.capacity()
    }

    fn maybe_shrink(&mut self) {
        let len = self.open.len();
        if self.high_water > MIN_SHRINK_SIZE && len * SHRINK_WHEN_SPARSER_THAN < self.high_water {
            // Room to double, so a table hovering around one size does not
            // reallocate on every close.
            self.open.shrink_to(len * 2);
            self.high_water = len;
        }
    }
}

/// A [`PerIpCounter`] shared by the worker threads. The lock is held for a
/// hash-map update, never across an await.
#[derive(Debug)]
struct ConnectionsPerIp(Mutex<PerIpCounter>);

impl ConnectionsPerIp {
    fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionsPerIp(Mutex::new(PerIpCounter::new(max))))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, PerIpCounter> {
        // The counter's state is valid after any panic in its short methods.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.table().try_open(ip).then(|| IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

/// One open connection counted against its IP; dropping it releases it.
#[derive(Debug)]
pub struct IpSlot {
    table: Arc<ConnectionsPerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.table.table().close(self.ip);
    }
}

/// Kept in a connection's data by [`Security::on_accept`] for as long as the
/// connection is open.
struct TcpSlot {
    _slot: IpSlot,
}

/// Marks a connection that was over its IP's TCP cap (and has been shut):
/// routes refuse anything that still arrives on it.
struct OverTcpCap;

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// Why a guard refused a request. Each is answered with the status below and
/// a JSON body `{"error": kind, "message": …, "retry_after_ms": …}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// 429: the client IP is over `requests_per_second` on the API routes.
    TooManyRequests {
        /// When one more request would be admitted.
        retry_after: Duration,
    },
    /// 429: the client IP is over `connections_per_second`.
    TooManyUpgrades {
        /// When one more upgrade would be admitted.
        retry_after: Duration,
    },
    /// 429: the client IP has `max_connections_per_ip` WebSockets open.
    TooManyConnections {
        /// The cap.
        max: usize,
    },
    /// 429: the request came on a connection over `max_tcp_connections_per_ip`.
    TooManyTcpConnections {
        /// The cap.
        max: usize,
    },
    /// 401: `ws_tokens` is set and no token was presented.
    TokenRequired,
    /// 401: the token presented is not one of `ws_tokens`.
    TokenInvalid,
    /// 400: a token was offered as a subprotocol without `happynet`, which
    /// the server must echo.
    SubprotocolRequired,
    /// 403: the browser's `Origin` is not in `allowed_origins`.
    OriginNotAllowed,
    /// 403: a browser's state-changing request from another site: its
    /// `Origin` is neither the server's own nor in `allowed_origins` (or
    /// `Sec-Fetch-Site` says `cross-site`).
    CrossSiteRequest,
    /// 401: the route has tokens (`broadcast_tokens`, `status_tokens`,
    /// `metrics_tokens`) and no `Authorization: Bearer` was presented.
    BearerRequired {
        /// Which route's tokens.
        scope: TokenScope,
    },
    /// 401: the bearer token presented is not one of the route's tokens.
    BearerInvalid {
        /// Which route's tokens.
        scope: TokenScope,
    },
    /// 408: the body did not arrive within `request_body_timeout`.
    BodyTimeout {
        /// The timeout.
        after: Duration,
    },
    /// 503: a rate limiter did not answer.
    LimiterUnavailable,
}

impl Refusal {
    /// A short name for the condition: the `error` field of the JSON body.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::TooManyRequests { .. } => "rate_limited",
            Refusal::TooManyUpgrades { .. } => "connection_rate_limited",
            Refusal::TooManyConnections { .. } => "too_many_connections_from_ip",
            Refusal::TooManyTcpConnections { .. } => "too_many_tcp_connections_from_ip",
            Refusal::TokenRequired | Refusal::BearerRequired { .. } => "token_required",
            Refusal::TokenInvalid | Refusal::BearerInvalid { .. } => "invalid_token",
            Refusal::SubprotocolRequired => "subprotocol_required",
            Refusal::OriginNotAllowed => "origin_not_allowed",
            Refusal::CrossSiteRequest => "cross_site_request",
            Refusal::BodyTimeout { .. } => "request_body_timeout",
            Refusal::LimiterUnavailable => "limiter_unavailable",
        }
    }

    /// When the client may try again, if that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::TooManyRequests { retry_after } | Refusal::TooManyUpgrades { retry_after } => {
                Some(*retry_after)
            }
            Refusal::TooManyConnections { .. } | Refusal::TooManyTcpConnections { .. } => {
                Some(CONNECTION_CAP_RETRY_AFTER)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::TooManyRequests { .. } => {
                f.write_str("too many requests from this address (network.security.requests_per_second)")
            }
            Refusal::TooManyUpgrades { .. } => f.write_str(
                "too many new connections from this address (network.security.connections_per_second)",
            ),
            Refusal::TooManyConnections { max } => write!(
                f,
                "this address has its maximum of {max} WebSocket connections open \
                 (network.security.max_connections_per_ip)"
            ),
            Refusal::TooManyTcpConnections { max } => write!(
                f,
                "this address has its maximum of {max} connections open \
                 (network.security.max_tcp_connections_per_ip)"
            ),
            Refusal::TokenRequired => f.write_str(
                "a token is required: Sec-WebSocket-Protocol: happynet, token.<token>; \
                 Authorization: Bearer <token>; or ?token=<token>",
            ),
            Refusal::TokenInvalid => f.write_str("the token is not valid"),
            Refusal::SubprotocolRequired => f.write_str(
                "offer the happynet (or happynet.v1) subprotocol beside token.<token> \
                 (Sec-WebSocket-Protocol: happynet, token.<token>)",
            ),
            Refusal::OriginNotAllowed => {
                f.write_str("this origin may not connect (network.security.allowed_origins)")
            }
            Refusal::CrossSiteRequest => f.write_str(
                "a cross-site browser request may not change state here: its Origin is \
                 neither this server's own nor in network.security.allowed_origins",
            ),
            Refusal::BearerRequired { scope } => write!(
                f,
                "this route requires a token (network.security.{}): \
                 Authorization: Bearer <token>",
                scope.config_key()
            ),
            Refusal::BearerInvalid { scope } => write!(
                f,
                "the token is not valid (network.security.{})",
                scope.config_key()
            ),
            Refusal::BodyTimeout { after } => write!(
                f,
                "the request body did not arrive within {} s (network.security.request_body_timeout)",
                after.as_secs_f64()
            ),
            Refusal::LimiterUnavailable => f.write_str("the rate limiter did not answer"),
        }
    }
}

impl std::error::Error for Refusal {}

impl ResponseError for Refusal {
    fn status_code(&self) -> StatusCode {
        match self {
            Refusal::TooManyRequests { .. }
            | Refusal::TooManyUpgrades { .. }
            | Refusal::TooManyConnections { .. }
            | Refusal::TooManyTcpConnections { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::TokenRequired
            | Refusal::TokenInvalid
            | Refusal::BearerRequired { .. }
            | Refusal::BearerInvalid { .. } => StatusCode::UNAUTHORIZED,
            Refusal::SubprotocolRequired => StatusCode::BAD_REQUEST,
            Refusal::OriginNotAllowed | Refusal::CrossSiteRequest => StatusCode::FORBIDDEN,
            Refusal::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Refusal::LimiterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if let Some(after) = self.retry_after() {
            resp.insert_header((
                header::RETRY_AFTER,
                crate::json_error::retry_after_secs(after),
            ));
        }
        match self {
            Refusal::TokenRequired
            | Refusal::TokenInvalid
            | Refusal::BearerRequired { .. }
            | Refusal::BearerInvalid { .. } => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"happynet\""));
            }
            // The client is still sending, or should not be here at all.
            Refusal::BodyTimeout { .. } | Refusal::TooManyTcpConnections { .. } => {
                resp.force_close();
            }
            _ => {}
        }
        resp.json(
            crate::json_error::ErrorBody::new(self.kind(), self.to_string())
                .with(
                    "retry_after_ms",
                    self.retry_after().map(|d| d.as_millis() as u64),
                )
                .into_value(),
        )
    }
}

// ---------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------

/// What the guards have refused, and the per-IP tables' sizes: for metrics
/// and status pages ([`Security::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SecurityStats {
    /// Upgrades refused by `connections_per_second`.
    pub upgrades_rate_limited: u64,
    /// Upgrades refused by `max_connections_per_ip`.
    pub upgrades_over_ip_cap: u64,
    /// Upgrades refused for want of a token.
    pub upgrades_token_required: u64,
    /// Upgrades refused for a wrong token.
    pub upgrades_token_invalid: u64,
    /// Upgrades refused for a token offered without the `happynet`
    /// subprotocol.
    pub upgrades_subprotocol_required: u64,
    /// Upgrades refused by `allowed_origins`.
    pub upgrades_origin_not_allowed: u64,
    /// State-changing requests refused as cross-site.
    pub requests_cross_site: u64,
    /// Requests to a route with tokens that presented none.
    pub requests_token_required: u64,
    /// Requests to a route with tokens that presented a wrong one.
    pub requests_token_invalid: u64,
    /// API requests refused by `requests_per_second`.
    pub requests_rate_limited: u64,
    /// API requests whose body missed `request_body_timeout`.
    pub request_body_timeouts: u64,
    /// Connections (and requests on them) refused by
    /// `max_tcp_connections_per_ip`.
    pub connections_over_ip_cap: u64,
    /// Requests refused because a rate limiter did not answer.
    pub limiter_unavailable: u64,
    /// IPs with a WebSocket open now.
    pub ips_with_websockets: usize,
    /// IPs with a TCP connection open now (counted by `on_connect`).
    pub ips_with_connections: usize,
}

impl SecurityStats {
    /// The refusal counters by reason, named by [`Refusal::kind`] (the
    /// `error` field clients see): one list for `/status` and `/metrics`.
    /// A missing or wrong token counts under one reason whether it was an
    /// upgrade's or a route's.
    pub fn refusals(&self) -> [(&'static str, u64); 11] {
        [
            ("rate_limited", self.requests_rate_limited),
            ("connection_rate_limited", self.upgrades_rate_limited),
            ("too_many_connections_from_ip", self.upgrades_over_ip_cap),
            (
                "too_many_tcp_connections_from_ip",
                self.connections_over_ip_cap,
            ),
            (
                "token_required",
                self.upgrades_token_required + self.requests_token_required,
            ),
            (
                "invalid_token",
                self.upgrades_token_invalid + self.requests_token_invalid,
            ),
            ("subprotocol_required", self.upgrades_subprotocol_required),
            ("origin_not_allowed", self.upgrades_origin_not_allowed),
            ("cross_site_request", self.requests_cross_site),
            ("request_body_timeout", self.request_body_timeouts),
            ("limiter_unavailable", self.limiter_unavailable),
        ]
    }
}

#[derive(Debug, Default)]
struct Counters {
    upgrades_rate_limited: AtomicU64,
    upgrades_over_ip_cap: AtomicU64,
    upgrades_token_required: AtomicU64,
    upgrades_token_invalid: AtomicU64,
    upgrades_subprotocol_required: AtomicU64,
    upgrades_origin_not_allowed: AtomicU64,
    requests_cross_site: AtomicU64,
    requests_token_required: AtomicU64,
    requests_token_invalid: AtomicU64,
    requests_rate_limited: AtomicU64,
    request_body_timeouts: AtomicU64,
    connections_over_ip_cap: AtomicU64,
    limiter_unavailable: AtomicU64,
}

impl Counters {
    /// Counts `refusal`; returns how many of its kind there have been.
    fn count(&self, refusal: &Refusal) -> u64 {
        let counter = match refusal {
            Refusal::TooManyRequests { .. } => &self.requests_rate_limited,
            Refusal::TooManyUpgrades { .. } => &self.upgrades_rate_limited,
            Refusal::TooManyConnections { .. } => &self.upgrades_over_ip_cap,
            Refusal::TooManyTcpConnections { .. } => &self.connections_over_ip_cap,
            Refusal::TokenRequired => &self.upgrades_token_required,
            Refusal::TokenInvalid => &self.upgrades_token_invalid,
            Refusal::SubprotocolRequired => &self.upgrades_subprotocol_required,
            Refusal::OriginNotAllowed => &self.upgrades_origin_not_allowed,
            Refusal::CrossSiteRequest => &self.requests_cross_site,
            Refusal::BearerRequired { .. } => &self.requests_token_required,
            Refusal::BearerInvalid { .. } => &self.requests_token_invalid,
            Refusal::BodyTimeout { .. } => &self.request_body_timeouts,
            Refusal::LimiterUnavailable => &self.limiter_unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Lets one log line through per [`REFUSAL_LOG_INTERVAL`].
#[derive(Debug)]
struct LogGate {
    epoch: Instant,
    /// Milliseconds since `epoch` before which nothing is logged.
    next_ms: AtomicU64,
}

impl LogGate {
    fn new() -> Self {
        LogGate {
            epoch: Instant::now(),
            next_ms: AtomicU64::new(0),
        }
    }

    fn allow(&self, now: Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + REFUSAL_LOG_INTERVAL.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

// ---------------------------------------------------------------------------
// The guards
// ---------------------------------------------------------------------------

/// The guards of `network.security`, built once by `Network::start` and
/// shared by every worker. Cloning is cheap.
#[derive(Clone)]
pub struct Security {
    inner: Arc<Shared>,
}

struct Shared {
    ws_per_ip: Option<Arc<ConnectionsPerIp>>,
    tcp_per_ip: Option<Arc<ConnectionsPerIp>>,
    upgrade_limiter: Option<Addr<RateLimiterActor>>,
    request_limiter: Option<Addr<RateLimiterActor>>,
    tokens: Vec<String>,
    /// `broadcast_tokens`, `status_tokens`, `metrics_tokens`, by
    /// [`TokenScope::index`].
    route_tokens: [Vec<String>; 3],
    /// Normalised ([`normalize_origin`]).
    origins: Vec<String>,
    exempt: Vec<IpRange>,
    trust_forwarded_for: bool,
    header_timeout: Duration,
    body_timeout: Option<Duration>,
    /// What `on_accept` writes to a connection over the TCP cap.
    over_tcp_cap_response: Vec<u8>,
    counters: Counters,
    log_gate: LogGate,
}

impl Security {
    /// Builds the guards of `config` and starts their rate limiters on the
    /// current arbiter: call it inside a running actix `System`.
    pub fn start(config: &SecurityConfig) -> Result<Security, ConfigError> {
        Self::start_shared(config, None)
    }

    /// [`Security::start`], with the per-IP rates kept in Redis (so that
    /// they hold across the cluster) when `shared` is given and
    /// `config.shared_rate_limits` is set.
    pub fn start_shared(
        config: &SecurityConfig,
        shared: Option<SharedLimit>,
    ) -> Result<Security, ConfigError> {
        let shared = shared.filter(|_| config.shared_rate_limits);
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: format!("network.security.{key}"),
            message,
        };
        let limiter = |name: &str, rate: f64, burst: u32, key: &str| {
            if rate == 0.0 {
                return Ok(None);
            }
            let quota = Quota::per_second(rate, burst).map_err(|e| invalid(key, e.to_string()))?;
            let limiter = RateLimiterActor::new(name, quota, config.max_tracked_ips);
            let limiter = match &shared {
                Some(shared) => limiter.with_shared(shared.clone()),
                None => limiter,
            };
            Ok::<_, ConfigError>(Some(limiter.start()))
        };
        let upgrade_limiter = limiter(
            "ws_connections_per_ip",
            config.connections_per_second,
            config.connection_burst,
            "connections_per_second",
        )?;
        let request_limiter = limiter(
            "http_requests_per_ip",
            config.requests_per_second,
            config.request_burst,
            "requests_per_second",
        )?;
        let origins = config
            .allowed_origins
            .iter()
            .map(|o| normalize_origin(o).map_err(|e| invalid("allowed_origins", e)))
            .collect::<Result<_, _>>()?;
        let exempt = config
            .effective_exempt_ips()
            .iter()
            .map(|r| IpRange::parse(r).map_err(|e| invalid("exempt_ips", e)))
            .collect::<Result<_, _>>()?;
        let max_tcp = config.max_tcp_connections_per_ip;
        let over_tcp = Refusal::TooManyTcpConnections { max: max_tcp };
        let body = crate::json_error::ErrorBody::new(over_tcp.kind(), over_tcp.to_string())
            .into_value()
            .to_string();
        let over_tcp_cap_response = format!(
            "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nretry-after: {}\r\nconnection: close\r\n\r\n{body}",
            body.len(),
            CONNECTION_CAP_RETRY_AFTER.as_secs(),
        )
        .into_bytes();
        let per_ip = |max: usize| (max > 0).then(|| ConnectionsPerIp::new(max));
        warn_if_proxy_clients_are_exempt(config);
        Ok(Security {
            inner: Arc::new(Shared {
                ws_per_ip: per_ip(config.max_connections_per_ip),
                // Behind a proxy every connection comes from the proxy.
                tcp_per_ip: per_ip(max_tcp).filter(|_| !config.trust_forwarded_for),
                upgrade_limiter,
                request_limiter,
                tokens: config.ws_tokens.clone(),
                route_tokens: [
                    config.broadcast_tokens.clone(),
                    config.status_tokens.clone(),
                    config.metrics_tokens.clone(),
                ],
                origins,
                exempt,
                trust_forwarded_for: config.trust_forwarded_for,
                header_timeout: config.request_header_timeout.0,
                body_timeout: Some(config.request_body_timeout.0).filter(|d| !d.is_zero()),
                over_tcp_cap_response,
                counters: Counters::default(),
                log_gate: LogGate::new(),
            }),
        })
    }

    /// Refuses a browser's state-changing request from another site (see
    /// [`Refusal::CrossSiteRequest`]). Safe methods and requests without
    /// `Origin` (curl, SDKs: not a browser, which always sends `Origin` on a
    /// cross-origin POST) pass; so does an `Origin` that is the server's own
    /// or in `allowed_origins`. `Sec-Fetch-Site: cross-site` is refused
    /// unless its `Origin` is allowed, whether or not `Origin` came with it.
    fn check_same_origin(&self, req: &HttpRequest) -> Result<(), Refusal> {
        if is_safe_method(req.method()) {
            return Ok(());
        }
        let cross_site = req
            .headers()
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("cross-site"));
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return if cross_site {
                Err(Refusal::CrossSiteRequest)
            } else {
                Ok(())
            };
        };
        // `Origin: null` (sandboxed frames, `file:` pages) is nobody's.
        let Some(origin) = origin.to_str().ok().and_then(|o| normalize_origin(o).ok()) else {
            return Err(Refusal::CrossSiteRequest);
        };
        if self.inner.origins.contains(&origin) {
            return Ok(());
        }
        if !cross_site && own_origins(req).iter().flatten().any(|own| *own == origin) {
            return Ok(());
        }
        Err(Refusal::CrossSiteRequest)
    }

    /// Whether `req` carries one of `scope`'s tokens, when it has any.
    fn check_bearer(&self, scope: TokenScope, req: &HttpRequest) -> Result<(), Refusal> {
        let tokens = &self.inner.route_tokens[scope.index()];
        if tokens.is_empty() {
            return Ok(());
        }
        let Some(presented) = bearer_token(req) else {
            return Err(Refusal::BearerRequired { scope });
        };
        // Every known token is compared, so timing does not tell which one
        // came close.
        let valid = tokens.iter().fold(false, |found, known| {
            constant_time_eq(known.as_bytes(), presented.as_bytes()) | found
        });
        if valid {
            Ok(())
        } else {
            Err(Refusal::BearerInvalid { scope })
        }
    }

    /// The client's address: the peer's, or with `trust_forwarded_for` the
    /// last `X-Forwarded-For` entry (the peer's when there is none).
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let forwarded = self
            .inner
            .trust_forwarded_for
            .then(|| forwarded_for(req))
            .flatten();
        forwarded
            .or_else(|| req.peer_addr().map(|a| a.ip()))
            .map(|ip| ip.to_canonical())
    }

    /// Whether `ip` is in `exempt_ips`.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.inner.exempt.iter().any(|r| r.contains(ip))
    }

    /// The key the per-IP limits apply to for `req`, or `None` when they do
    /// not apply (exempt, or no address).
    fn limited_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        self.client_ip(req)
            .filter(|ip| !self.is_exempt(*ip))
            .map(limit_key)
    }

    /// `request_header_timeout`: pass it to
    /// `HttpServer::client_request_timeout` (zero turns the deadline off,
    /// there as here). actix-web's own default is 5 s; passing it keeps the
    /// server in step with the config.
    pub fn request_header_timeout(&self) -> Duration {
        self.inner.header_timeout
    }

    /// What the guards have refused so far.
    pub fn stats(&self) -> SecurityStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ips = |t: &Option<Arc<ConnectionsPerIp>>| t.as_ref().map_or(0, |t| t.table().len());
        SecurityStats {
            upgrades_rate_limited: get(&c.upgrades_rate_limited),
            upgrades_over_ip_cap: get(&c.upgrades_over_ip_cap),
            upgrades_token_required: get(&c.upgrades_token_required),
            upgrades_token_invalid: get(&c.upgrades_token_invalid),
            upgrades_subprotocol_required: get(&c.upgrades_subprotocol_required),
            upgrades_origin_not_allowed: get(&c.upgrades_origin_not_allowed),
            requests_cross_site: get(&c.requests_cross_site),
            requests_token_required: get(&c.requests_token_required),
            requests_token_invalid: get(&c.requests_token_invalid),
            requests_rate_limited: get(&c.requests_rate_limited),
            request_body_timeouts: get(&c.request_body_timeouts),
            connections_over_ip_cap: get(&c.connections_over_ip_cap),
            limiter_unavailable: get(&c.limiter_unavailable),
            ips_with_websockets: ips(&self.inner.ws_per_ip),
            ips_with_connections: ips(&self.inner.tcp_per_ip),
        }
    }

    /// Counts and logs a refusal (never with a token in it).
    fn refused(&self, refusal: &Refusal, ip: Option<IpAddr>) {
        let n = self.inner.counters.count(refusal);
        let who = ip.map_or_else(|| "an unknown address".to_owned(), |ip| ip.to_string());
        if self.inner.log_gate.allow(Instant::now()) {
            log::info!(
                "refused a request from {who}: {refusal} ({n} refusals of this kind so far)"
            );
        } else {
            log::debug!("refused a request from {who}: {}", refusal.kind());
        }
    }

    /// Takes one unit of `key`'s rate from `limiter`.
    async fn acquire(
        limiter: &Addr<RateLimiterActor>,
        key: IpAddr,
    ) -> Result<(), Option<Duration>> {
        // `send` with a timeout: a reply is needed, and a limiter that does
        // not give one within a second is treated as down (503), not waited
        // on by every request.
        match limiter
            .send(Acquire {
                key: key.to_string(),
            })
            .timeout(LIMITER_REPLY_TIMEOUT)
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(limited)) => Err(Some(limited.retry_after)),
            Err(_) => Err(None),
        }
    }

    /// Runs the upgrade checks of `GET /ws` (see the module docs), in order:
    /// connection rate, origin, token, open connections per IP. On success
    /// the [`UpgradePass`] holds the IP's connection slot: keep it as long
    /// as the connection is open (the `/ws` route puts it in the upgrade's
    /// response body, which lives exactly that long).
    pub async fn admit_upgrade(&self, req: &HttpRequest) -> Result<UpgradePass, Refusal> {
        let result = self.check_upgrade(req).await;
        if let Err(refusal) = &result {
            self.refused(refusal, self.client_ip(req));
        }
        result
    }

    async fn check_upgrade(&self, req: &HttpRequest) -> Result<UpgradePass, Refusal> {
        let s = &self.inner;
        if let (Some(_), Some(tcp)) = (req.conn_data::<OverTcpCap>(), &s.tcp_per_ip) {
            return Err(Refusal::TooManyTcpConnections {
                max: tcp.table().max(),
            });
        }
        let ip = self.limited_ip(req);
        if let (Some(limiter), Some(ip)) = (&s.upgrade_limiter, ip) {
            Self::acquire(limiter, ip).await.map_err(|e| match e {
                Some(retry_after) => Refusal::TooManyUpgrades { retry_after },
                None => Refusal::LimiterUnavailable,
            })?;
        }
        self.check_origin(req)?;
        self.check_token(req)?;
        let slot = match (&s.ws_per_ip, ip) {
            (Some(table), Some(ip)) => {
                Some(
                    table
                        .try_acquire(ip)
                        .ok_or_else(|| Refusal::TooManyConnections {
                            max: table.table().max(),
                        })?,
                )
            }
            _ => None,
        };
        Ok(UpgradePass { _slot: slot })
    }

    fn check_origin(&self, req: &HttpRequest) -> Result<(), Refusal> {
        let origins = &self.inner.origins;
        if origins.is_empty() {
            return Ok(());
        }
        // No Origin: not a browser. Such a client could send any Origin, so
        // the list protects browsers (against cross-site WebSocket
        // hijacking); it does not authenticate.
        let Some(origin) = req.headers().get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().ok().and_then(|o| normalize_origin(o).ok());
        match origin {
            Some(o) if origins.contains(&o) => Ok(()),
            _ => Err(Refusal::OriginNotAllowed),
        }
    }

    fn check_token(&self, req: &HttpRequest) -> Result<(), Refusal> {
        let tokens = &self.inner.tokens;
        if tokens.is_empty() {
            return Ok(());
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        let in_protocol = offered
            .iter()
            .find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX));
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let query = actix_web::web::Query::<TokenQuery>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.into_inner().token);
        let presented = [in_protocol, bearer, query.as_deref()];
        if presented.iter().all(Option::is_none) {
            return Err(Refusal::TokenRequired);
        }
        let valid = |t: &str| {
            tokens
                .iter()
                .any(|known| constant_time_eq(known.as_bytes(), t.as_bytes()))
        };
        if !presented.into_iter().flatten().any(valid) {
            return Err(Refusal::TokenInvalid);
        }
        // `happynet.v1` (a protocol client) is a protocol to echo too.
        let companion = [HAPPYNET_SUBPROTOCOL, happynet_actors::protocol::SUBPROTOCOL];
        if in_protocol.is_some() && !offered.iter().any(|p| companion.contains(p)) {
            return Err(Refusal::SubprotocolRequired);
        }
        Ok(())
    }

    /// The API routes' checks: the connection's TCP cap, the request rate
    /// of the client IP, then (for a state-changing method) that a browser's
    /// request comes from this server's own origin or an allowed one. The
    /// rate comes first, so that a flood of refused requests is limited too.
    pub async fn admit_request(&self, req: &HttpRequest) -> Result<(), Refusal> {
        let s = &self.inner;
        let result = if let (Some(_), Some(tcp)) = (req.conn_data::<OverTcpCap>(), &s.tcp_per_ip) {
            Err(Refusal::TooManyTcpConnections {
                max: tcp.table().max(),
            })
        } else if let (Some(limiter), Some(ip)) = (&s.request_limiter, self.limited_ip(req)) {
            Self::acquire(limiter, ip).await.map_err(|e| match e {
                Some(retry_after) => Refusal::TooManyRequests { retry_after },
                None => Refusal::LimiterUnavailable,
            })
        } else {
            Ok(())
        }
        .and_then(|()| self.check_same_origin(req));
        if let Err(refusal) = &result {
            self.refused(refusal, self.client_ip(req));
        }
        result
    }

    /// For `HttpServer::on_connect`: counts an accepted connection against
    /// its peer's `max_tcp_connections_per_ip` for as long as it is open
    /// (the slot lives in the connection's data). A connection over the cap
    /// gets a raw 429 and is shut down at once; returns false for it.
    pub fn on_accept(&self, tcp: &actix_web::rt::net::TcpStream, ext: &mut Extensions) -> bool {
        let Some(table) = &self.inner.tcp_per_ip else {
            return true;
        };
        let Ok(peer) = tcp.peer_addr() else {
            return true;
        };
        let ip = peer.ip().to_canonical();
        if self.is_exempt(ip) {
            return true;
        }
        match table.try_acquire(limit_key(ip)) {
            Some(slot) => {
                ext.insert(TcpSlot { _slot: slot });
                true
            }
            None => {
                let refusal = Refusal::TooManyTcpConnections {
                    max: table.table().max(),
                };
                self.refused(&refusal, Some(ip));
                // Whatever the dispatcher still reads from this connection
                // is refused by the routes (`OverTcpCap`); the shutdown ends
                // it. The send fits in a fresh socket's empty buffer.
                ext.insert(OverTcpCap);
                let sock = SockRef::from(tcp);
                let _ = sock.send(&self.inner.over_tcp_cap_response);
                let _ = sock.shutdown(Shutdown::Both);
                false
            }
        }
    }

    /// The middleware for API routes: per-IP request rate and body deadline.
    /// `Network::configure` and `configure_gateways` apply it to their API
    /// routes; wrap your own with it too:
    /// `web::scope("/api").wrap(net.security().api_guard())`.
    pub fn api_guard(&self) -> ApiGuard {
        ApiGuard {
            security: self.clone(),
        }
    }

    /// The middleware that makes a route require one of `scope`'s tokens
    /// (`Authorization: Bearer <token>`, 401 otherwise); with none
    /// configured it lets everything through. `Network::configure` puts it
    /// on `POST /broadcast`, `GET /status` and `GET /metrics`, inside the
    /// [`ApiGuard`] where there is one, so that guessing is rate limited.
    pub fn token_guard(&self, scope: TokenScope) -> TokenGuard {
        TokenGuard {
            security: self.clone(),
            scope,
        }
    }
}

/// Warns when the per-IP guards would exempt every client of a reverse
/// proxy on the same host: loopback is exempt by default, and such a proxy
/// makes every request come from 127.0.0.1. Quiet once the operator has
/// chosen: `trust_forwarded_for`, or `exempt_ips` written in the config
/// (whatever its value — even the default list or `[]`).
fn warn_if_proxy_clients_are_exempt(config: &SecurityConfig) {
    let per_ip_guards = config.max_connections_per_ip > 0
        || config.max_tcp_connections_per_ip > 0
        || config.connections_per_second > 0.0
        || config.requests_per_second > 0.0;
    if per_ip_guards && !config.trust_forwarded_for && config.exempt_ips.is_none() {
        log::warn!(
            "network.security: loopback is exempt from the per-IP limits by default, \
             and behind a reverse proxy on this host every client is 127.0.0.1, so \
             nobody would be limited. Set network.security.trust_forwarded_for if a \
             proxy that appends X-Forwarded-For is in front, or set \
             network.security.exempt_ips explicitly to keep the exemption knowingly."
        );
    }
}

/// An admitted upgrade: it holds the client IP's connection slot.
#[derive(Debug)]
#[must_use = "the slot is released when the pass is dropped"]
pub struct UpgradePass {
    /// Held, never read: dropping the pass frees the slot.
    _slot: Option<IpSlot>,
}

impl UpgradePass {
    /// The subprotocols the upgrade may echo: pass them to
    /// `WsResponseBuilder::protocols`. A client offering `happynet` gets it
    /// back, whether or not a token is required.
    pub const PROTOCOLS: &'static [&'static str] = &[HAPPYNET_SUBPROTOCOL];
}

// ---------------------------------------------------------------------------
// The API middleware
// ---------------------------------------------------------------------------

/// Middleware for API routes (see [`Security::api_guard`]): refuses a
/// client IP over `requests_per_second` with 429 + `Retry-After` before the
/// handler runs (and before its body is read), and answers 408 and closes
/// the connection when a body takes longer than `request_body_timeout`.
#[derive(Clone)]
pub struct ApiGuard {
    security: Security,
}

impl<S, B> Transform<S, ServiceRequest> for ApiGuard
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = ApiGuardService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(ApiGuardService {
            service: Rc::new(service),
            security: self.security.clone(),
        }))
    }
}

/// The service [`ApiGuard`] wraps a route in.
pub struct ApiGuardService<S> {
    service: Rc<S>,
    security: Security,
}

impl<S, B> Service<ServiceRequest> for ApiGuardService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, mut req: ServiceRequest) -> Self::Future {
        let service = self.service.clone();
        let security = self.security.clone();
        Box::pin(async move {
            if let Err(refusal) = security.admit_request(req.request()).await {
                return Ok(req
                    .into_response(refusal.error_response())
                    .map_into_right_body());
            }
            let timed_out = security.inner.body_timeout.and_then(|after| {
                let payload = req.take_payload();
                if matches!(payload, Payload::None) {
                    return None;
                }
                let flag = Rc::new(Cell::new(false));
                let stream: BoxedPayloadStream = Box::pin(BodyDeadline {
                    payload,
                    deadline: Box::pin(tokio::time::sleep(after)),
                    after,
                    timed_out: flag.clone(),
                });
                req.set_payload(Payload::from(stream));
                Some((flag, after))
            });
            let res = service.call(req).await?;
            match timed_out {
                Some((flag, after)) if flag.get() => {
                    let refusal = Refusal::BodyTimeout { after };
                    security.refused(&refusal, security.client_ip(res.request()));
                    let (req, _) = res.into_parts();
                    Ok(ServiceResponse::new(req, refusal.error_response()).map_into_right_body())
                }
                _ => Ok(res.map_into_left_body()),
            }
        })
    }
}

/// Middleware that makes a route require one of a [`TokenScope`]'s tokens
/// (see [`Security::token_guard`]). Refusals are counted and logged like
/// the other guards', never with the token.
#[derive(Clone)]
pub struct TokenGuard {
    security: Security,
    scope: TokenScope,
}

impl<S, B> Transform<S, ServiceRequest> for TokenGuard
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = TokenGuardService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(TokenGuardService {
            service,
            guard: self.clone(),
        }))
    }
}

/// The service [`TokenGuard`] wraps a route in.
pub struct TokenGuardService<S> {
    service: S,
    guard: TokenGuard,
}

impl<S, B> Service<ServiceRequest> for TokenGuardService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let security = &self.guard.security;
        if let Err(refusal) = security.check_bearer(self.guard.scope, req.request()) {
            security.refused(&refusal, security.client_ip(req.request()));
            let res = req.into_response(refusal.error_response());
            return Box::pin(ready(Ok(res.map_into_right_body())));
        }
        let fut = self.service.call(req);
        Box::pin(async move { fut.await.map(ServiceResponse::map_into_left_body) })
    }
}

// ---------------------------------------------------------------------------
// The access log
// ---------------------------------------------------------------------------

/// The access-log format of [`access_log`]: actix-web's default
/// (`%a "%r" %s %b "%{Referer}i" "%{User-Agent}i" %T`), whose request line
/// and referer [`access_log_format`] redacts.
pub const ACCESS_LOG_FORMAT: &str = r#"%a "%r" %s %b "%{Referer}i" "%{User-Agent}i" %T"#;

/// What a secret query value is replaced with in the access log.
pub const REDACTED: &str = "REDACTED";

/// The labels [`access_log_format`] puts in place of `%r` and
/// `%{Referer}i`.
const REQUEST_LINE_LABEL: &str = "happynet_request_line";
const REFERER_LABEL: &str = "happynet_referer";

/// Whether a query parameter's value is a secret the access log must not
/// show: its name (percent-decoded, any case) is `token` or ends in
/// `token`, `key`, `secret`, `password`, `auth`, `authorization` or
/// `signature` (`?token=` of `/ws`, `access_token`, `api_key`, …).
pub fn is_secret_param(name: &str) -> bool {
    const SUFFIXES: [&str; 7] = [
        "token",
        "key",
        "secret",
        "password",
        "auth",
        "authorization",
        "signature",
    ];
    let name = percent_decode_lossy(name).to_ascii_lowercase();
    SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// `query` (without its `?`) with the value of every secret parameter
/// ([`is_secret_param`]) replaced by [`REDACTED`]; everything else as it was.
pub fn redact_query(query: &str) -> std::borrow::Cow<'_, str> {
    let secret = |pair: &str| {
        pair.split_once('=')
            .is_some_and(|(name, value)| !value.is_empty() && is_secret_param(name))
    };
    if !query.split('&').any(secret) {
        return std::borrow::Cow::Borrowed(query);
    }
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if secret(pair) => format!("{name}={REDACTED}"),
            _ => pair.to_owned(),
        })
        .collect();
    std::borrow::Cow::Owned(pairs.join("&"))
}

/// `%XX` and `+` decoded; invalid escapes kept as they are.
fn percent_decode_lossy(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL (a `Referer`) with its query redacted as by [`redact_query`].
fn redact_url(url: &str) -> String {
    let (before_fragment, fragment) = match url.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (url, None),
    };
    let mut out = match before_fragment.split_once('?') {
        Some((base, query)) => format!("{base}?{}", redact_query(query)),
        None => before_fragment.to_owned(),
    };
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// `format` with `%r` and `%{Referer}i` (any case) turned into the labels
/// that [`access_log_format`] fills in redacted. `%%` stays a literal `%`.
fn redacting_format(format: &str) -> String {
    let referer = "%{referer}i";
    let mut out = String::with_capacity(format.len() + 32);
    let mut rest = format;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (replacement, skip) = if tail.starts_with("%%") {
            ("%%".to_owned(), 2)
        } else if tail.starts_with("%r") {
            (format!("%{{{REQUEST_LINE_LABEL}}}xi"), 2)
        } else if tail
            .get(..referer.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(referer))
        {
            (format!("%{{{REFERER_LABEL}}}xi"), referer.len())
        } else {
            ("%".to_owned(), 1)
        };
        out.push_str(&replacement);
        rest = &tail[skip..];
    }
    out.push_str(rest);
    out
}

/// actix-web's access-log middleware ([`Logger`](actix_web::middleware::Logger))
/// with [`ACCESS_LOG_FORMAT`], which never writes a token from a query
/// string: `App::new().wrap(happynet::security::access_log())`. Use it
/// instead of `Logger::default()`, whose `%r` would log `/ws?token=…` as it
/// came. Lines go to the `log` crate at `info`, target
/// `actix_web::middleware::logger`.
pub fn access_log() -> actix_web::middleware::Logger {
    access_log_format(ACCESS_LOG_FORMAT)
}

/// [`access_log`] with an actix-web `Logger` format of your own. `%r` and
/// `%{Referer}i` are written with secret query values ([`is_secret_param`])
/// replaced by [`REDACTED`]; the other directives are actix-web's. Do not
/// log `%{Authorization}i` or similar headers yourself.
pub fn access_log_format(format: &str) -> actix_web::middleware::Logger {
    actix_web::middleware::Logger::new(&redacting_format(format))
        .custom_request_replace(REQUEST_LINE_LABEL, |req| {
            let query = req.query_string();
            if query.is_empty() {
                format!("{} {} {:?}", req.method(), req.path(), req.version())
            } else {
                format!(
                    "{} {}?{} {:?}",
                    req.method(),
                    req.path(),
                    redact_query(query),
                    req.version()
                )
            }
        })
        .custom_request_replace(REFERER_LABEL, |req| {
            req.headers()
                .get(header::REFERER)
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| "-".to_owned(), redact_url)
        })
}

/// What `Payload::Stream` holds (actix-http's `BoxedPayloadStream`).
type BoxedPayloadStream = Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>;

/// A request body that fails with a timeout once its deadline passes.
struct BodyDeadline {
    payload: Payload,
    deadline: Pin<Box<tokio::time::Sleep>>,
    after: Duration,
    /// Set when the deadline hit, so the middleware answers 408 whatever the
    /// handler made of the error.
    timed_out: Rc<Cell<bool>>,
}

impl Stream for BodyDeadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.timed_out.get() {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut this.payload).poll_next(cx) {
            return Poll::Ready(item);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.timed_out.set(true);
            return Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "request body not received within {} s",
                    this.after.as_secs_f64()
                ),
            )))));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn counts_per_ip_up_to_the_cap_and_forgets_ips_at_zero() {
        let mut t = PerIpCounter::new(2);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert!(t.try_open(a));
        assert!(t.try_open(a));
        assert!(!t.try_open(a), "a third from the same IP");
        assert!(t.try_open(b), "another IP is unaffected");
        assert_eq!((t.open(a), t.open(b), t.len()), (2, 1, 2));
        t.close(a);
        assert!(t.try_open(a), "a closed connection frees its place");
        t.close(a);
        t.close(a);
        t.close(b);
        assert!(t.is_empty(), "entries go at zero");
        // Closing what is not open changes nothing.
        t.close(a);
        assert!(t.is_empty());
    }

    #[test]
    fn a_zero_cap_admits_nobody_and_keeps_no_entry() {
        let mut t = PerIpCounter::new(0);
        assert!(!t.try_open(ip("10.0.0.1")));
        assert!(t.is_empty());
    }

    #[test]
    fn the_table_gives_memory_back_when_it_empties() {
        let mut t = PerIpCounter::new(1);
        let ips: Vec<IpAddr> = (0..10_000u32)
            .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        for &i in &ips {
            assert!(t.try_open(i));
        }
        let peak = t.capacity();
        assert!(peak >= 10_000);
        for &i in &ips[..9_990] {
            t.close(i);
        }
        assert_eq!(t.len(), 10);
        assert!(
            t.capacity() < peak / 4,
            "capacity {} of {peak}",
            t.capacity()
        );
        // What is left still counts.
        assert!(!t.try_open(ips[9_999]));
    }

    #[test]
    fn slots_release_on_drop() {
        let table = ConnectionsPerIp::new(1);
        let a = ip("192.0.2.1");
        let slot = table.try_acquire(a).expect("first");
        assert!(table.try_acquire(a).is_none());
        drop(slot);
        assert!(table.try_acquire(a).is_some());
        assert!(table.table().is_empty());
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_slash_64() {
        assert_eq!(
            limit_key(ip("2001:db8:1:2:aaaa::1")),
            limit_key(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(limit_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn tokens_compare_equal_only_when_every_byte_and_the_length_match() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn secret_query_values_are_redacted_and_the_rest_kept() {
        assert_eq!(redact_query("room=a&token=s3"), "room=a&token=REDACTED");
        assert_eq!(
            redact_query("API_KEY=1&x=2&access_token=3&%74oken=4&client_secret=5"),
            "API_KEY=REDACTED&x=2&access_token=REDACTED&%74oken=REDACTED&client_secret=REDACTED"
        );
        // Nothing secret: borrowed as it was, odd pairs and all.
        assert!(matches!(
            redact_query("a=1&&b&token=&=x"),
            std::borrow::Cow::Borrowed("a=1&&b&token=&=x")
        ));
        assert_eq!(
            redact_url("http://h/p?token=1#f"),
            "http://h/p?token=REDACTED#f"
        );
        assert_eq!(redact_url("http://h/p#token=1"), "http://h/p#token=1");
        assert_eq!(percent_decode_lossy("a%2Bb+c%zz%4"), "a+b c%zz%4");
    }

    #[test]
    fn the_access_log_format_swaps_the_request_line_and_referer_only() {
        assert_eq!(
            redacting_format(r#"%a "%r" %s "%{referer}i" %{User-Agent}i 100%% %{r}a"#),
            r#"%a "%{happynet_request_line}xi" %s "%{happynet_referer}xi" %{User-Agent}i 100%% %{r}a"#
        );
        assert_eq!(redacting_format("%%r %"), "%%r %");
    }

    #[test]
    fn the_log_gate_lets_one_line_through_per_interval() {
        let gate = LogGate::new();
        let t0 = gate.epoch;
        assert!(gate.allow(t0));
        assert!(!gate.allow(t0 + Duration::from_millis(10)));
        assert!(gate.allow(t0 + REFUSAL_LOG_INTERVAL));
    }

    #[test]
    fn refusals_name_their_limit_and_status() {
        let r = Refusal::TooManyRequests {
            retry_after: Duration::from_millis(20),
        };
        assert_eq!(r.status_code(), StatusCode::TOO_MANY_REQUESTS);
        assert!(r.to_string().contains("requests_per_second"));
        let resp = r.error_response();
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "1");
        assert_eq!(
            Refusal::TokenInvalid.status_code(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Refusal::OriginNotAllowed.status_code(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            Refusal::CrossSiteRequest.status_code(),
            StatusCode::FORBIDDEN
        );
        let bearer = Refusal::BearerRequired {
            scope: TokenScope::Metrics,
        };
        assert_eq!(bearer.status_code(), StatusCode::UNAUTHORIZED);
        assert_eq!(bearer.kind(), "token_required");
        assert!(bearer.to_string().contains("metrics_tokens"));
        assert_eq!(
            Refusal::TooManyConnections { max: 3 }.status_code(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
