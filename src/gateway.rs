//! The gateway route: `ANY /proxy/{client}/{tail…}` forwards to
//! `network.api_clients.<client>` through limiter → breaker → pool, with
//! retries, and maps every failure to an HTTP status with a JSON body that
//! names the cause:
//!
//! | cause | status |
//! |---|---|
//! | rate limited | 429 + `Retry-After` |
//! | breaker open, bulkhead full | 503 (+ `Retry-After` when known) |
//! | deadline | 504 |
//! | connect or transport error | 502 |
//! | upstream error status | passed through, body and all |
//!
//! When `network.gateway.tokens` is set, callers must present one
//! (`Authorization: Bearer …`) and it is not forwarded; the upstream gets the
//! client's own credential. The gateway does not wait for the rate limiter: a caller that is over the
//! rate learns it at once and when to come back.

use crate::error::HttpError;
use crate::network::Network;
use actix_web::http::header::{self, HeaderName};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

/// The largest request body the gateway forwards.
pub const MAX_PROXY_BODY: usize = 10 << 20;

/// Headers that describe one hop's connection, not the message: never
/// forwarded (RFC 9110 §7.6.1), plus those the client sets itself.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
    )
}

/// Mounts `/proxy/{client}/{tail:.*}` for every method.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/proxy/{client}/{tail:.*}")
            .app_data(web::PayloadConfig::new(MAX_PROXY_BODY))
            .default_service(web::to(proxy_route)),
    );
}

fn retry_after_secs(d: std::time::Duration) -> String {
    // Whole seconds, rounded up: "Retry-After: 0" would invite a stampede.
    d.as_secs_f64().ceil().max(1.0).to_string()
}

/// The HTTP answer for a failed upstream call.
pub fn error_response(e: &HttpError) -> HttpResponse {
    if let HttpError::Status { response, .. } = e {
        let mut out = HttpResponse::build(response.status);
        for (name, value) in response.headers.iter() {
            if !is_hop_by_hop(name) {
                out.append_header((name.clone(), value.clone()));
            }
        }
        return out.body(response.body.clone());
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
    out.json(json!({
        "error": e.kind(),
        "upstream": e.upstream(),
        "message": e.to_string(),
        "retry_after_ms": e.retry_after().map(|d| d.as_millis() as u64),
    }))
}

async fn proxy_route(req: HttpRequest, body: web::Bytes, net: web::Data<Network>) -> HttpResponse {
    // The proxy spends the operator's upstream credentials: it answers only
    // callers with a gateway token when tokens are configured.
    if let Some(denied) = crate::llm_gateway::refused(&req, &net) {
        return denied;
    }
    let gateway_auth = !net.config().network.gateway.tokens.is_empty();
    let client_name = req.match_info().get("client").unwrap_or_default();
    let tail = req.match_info().get("tail").unwrap_or_default();
    let Some(client) = net.api(client_name) else {
        return HttpResponse::NotFound().json(json!({
            "error": "unknown_client",
            "message": format!("no network.api_clients.{client_name} is configured"),
        }));
    };
    let mut path = format!("/{tail}");
    if !req.query_string().is_empty() {
        path.push('?');
        path.push_str(req.query_string());
    }
    let mut call = client
        .request(req.method().clone(), &path)
        .wait_for_rate_limit(false)
        .body(body);
    for (name, value) in req.headers() {
        // With gateway tokens, Authorization carries the caller's gateway
        // token, which is never the upstream's business.
        let gateway_token = gateway_auth && name == header::AUTHORIZATION;
        if !is_hop_by_hop(name) && !gateway_token {
            call = call.typed_header(name.clone(), value.clone());
        }
    }
    match call.send().await {
        Ok(resp) => {
            let mut out = HttpResponse::build(resp.status);
            for (name, value) in resp.headers.iter() {
                if !is_hop_by_hop(name) {
                    out.append_header((name.clone(), value.clone()));
                }
            }
            out.body(resp.body)
        }
        Err(e) => {
            log::info!("proxy {client_name}{path}: {e}");
            error_response(&e)
        }
    }
}
