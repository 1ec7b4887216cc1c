//! The HTTP faces of the upstream stack, and the OpenAI client behind one
//! of them.
//!
//! - [`proxy`]: `ANY /proxy/{client}/{tail…}`, a reverse proxy to any
//!   `network.api_clients.<client>`;
//! - [`v1`]: the OpenAI-compatible `POST /v1/chat/completions` and
//!   `GET /v1/models`, over the clients of `network.gateway.clients` in
//!   order;
//! - [`openai`]: `OpenAiClient`, the typed chat-completions client app code
//!   uses, and [`sse`]: the server-sent events parser under its streams.
//!
//! The routes take a [`GatewayState`] (the composition root builds one and
//! registers it with [`configure`]), never the whole network: what a
//! gateway needs is its settings and its clients. Every failed upstream
//! call is answered by [`error_response`], whose mapping of causes to
//! statuses is tabled in [`proxy`].

pub mod openai;
pub mod proxy;
pub mod sse;
pub mod v1;

pub use crate::upstream::MAX_RESPONSE_HEADER_BYTES;
pub use proxy::{MAX_FORWARDED_HEADER_BYTES, MAX_PROXY_BODY};

use crate::config::GatewayConfig;
use crate::json_error::{retry_after_secs, ErrorBody};
use crate::security::constant_time_eq;
use crate::upstream::{ApiClient, HttpError};
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use std::collections::BTreeMap;
use std::time::Duration;

/// What the gateway routes read: `network.gateway` and the API clients.
#[derive(Clone)]
pub struct GatewayState {
    /// `network.gateway.tokens`: callers must present one; empty, anyone may
    /// call.
    tokens: Vec<String>,
    /// `network.gateway.stream_write_timeout`.
    stream_write_timeout: Duration,
    /// `network.gateway.max_body_bytes`, for `/v1`.
    max_body_bytes: usize,
    /// Every API client, by name: what `/proxy/{client}` may reach.
    clients: BTreeMap<String, ApiClient>,
    /// The clients of `network.gateway.clients` that exist, in order: what
    /// `/v1` tries.
    chain: Vec<ApiClient>,
}

impl GatewayState {
    /// The state of gateways configured by `gateway` over `clients` (every
    /// configured API client).
    pub fn new(gateway: &GatewayConfig, clients: impl IntoIterator<Item = ApiClient>) -> Self {
        let clients: BTreeMap<String, ApiClient> = clients
            .into_iter()
            .map(|c| (c.name().to_owned(), c))
            .collect();
        let chain = gateway
            .clients
            .iter()
            .filter_map(|name| clients.get(name).cloned())
            .collect();
        GatewayState {
            tokens: gateway.tokens.clone(),
            stream_write_timeout: gateway.stream_write_timeout.0,
            max_body_bytes: gateway.max_body_bytes,
            clients,
            chain,
        }
    }

    /// The API client called `name`, if configured.
    fn client(&self, name: &str) -> Option<&ApiClient> {
        self.clients.get(name)
    }

    /// True when callers must present a gateway token.
    fn requires_token(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks the caller's bearer token against `network.gateway.tokens`;
    /// `Some(401 response)` when it is missing or unknown. The proxy spends
    /// the operator's upstream credentials, so both gateways ask.
    fn refused(&self, req: &HttpRequest) -> Option<HttpResponse> {
        if self.tokens.is_empty() {
            return None;
        }
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token)
                if self
                    .tokens
                    .iter()
                    .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes())) =>
            {
                None
            }
            _ => Some(v1::openai_error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or unknown gateway token (Authorization: Bearer <token>)",
            )),
        }
    }
}

/// Mounts both gateways with `state` as their app data: `/proxy/…` for
/// every method, `/v1/…` with bodies up to `network.gateway.max_body_bytes`.
pub fn configure(cfg: &mut web::ServiceConfig, state: &web::Data<GatewayState>) {
    cfg.app_data(state.clone());
    proxy::configure(cfg);
    v1::configure(cfg, state.max_body_bytes);
}

/// The HTTP answer for a failed upstream call: an error status the upstream
/// sent is passed on as it came ([`proxy`]'s relay); any other failure is
/// a status of its own (the table in [`proxy`]) with
/// `{"error", "upstream", "message", "retry_after_ms"}`, and `Retry-After`
/// when the error says when to come back.
pub fn error_response(e: &HttpError) -> HttpResponse {
    if let HttpError::Status { response, .. } = e {
        return proxy::relay(response.status, &response.headers, response.body.clone());
    }
    let status = match e {
        HttpError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        HttpError::BreakerOpen { .. } | HttpError::Overloaded { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        HttpError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        HttpError::Connect { .. } | HttpError::Transport { .. } | HttpError::Decode { .. } => {
            StatusCode::BAD_GATEWAY
        }
        HttpError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
        // The gateway's own upstream credential is missing: a server-side
        // misconfiguration, not the caller's fault.
        HttpError::MissingSecret { .. } => StatusCode::BAD_GATEWAY,
        HttpError::Internal { .. } | HttpError::Status { .. } => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut out = HttpResponse::build(status);
    if let Some(after) = e.retry_after() {
        out.insert_header((header::RETRY_AFTER, retry_after_secs(after)));
    }
    out.json(
        ErrorBody::new(e.kind(), e.to_string())
            .with("upstream", e.upstream())
            .with(
                "retry_after_ms",
                e.retry_after().map(|d| d.as_millis() as u64),
            )
            .into_value(),
    )
}
