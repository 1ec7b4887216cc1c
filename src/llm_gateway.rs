//! The OpenAI-compatible gateway: `POST /v1/chat/completions` (plain and
//! `"stream": true`) and `GET /v1/models`, forwarded to the API clients named
//! in `network.gateway.clients` through limiter → breaker → pool.
//!
//! Callers authenticate with their own bearer token (`network.gateway.tokens`),
//! which is never forwarded: the upstream gets the client's configured key.
//! The first client is used while it answers; when it is open, limited,
//! overloaded, unreachable or failing with 5xx, the next one is tried — for
//! streams too, as long as nothing has been sent to the caller yet. The body
//! is forwarded as the caller sent it (it is only parsed to see `stream`), so
//! the gateway adds no re-serialisation cost and drops no field the upstream
//! understands.
//!
//! Answers are built here, not relayed: the upstream's body is decoded (awc
//! undoes its `Content-Encoding`) and sent as identity with its own
//! `Content-Type`; error answers relayed through [`error_response`] carry
//! no `Content-Encoding` either, since `crate::upstream` drops it from
//! decoded responses. A streamed answer whose caller stops reading for
//! `network.gateway.stream_write_timeout` once the buffers are full is cut
//! off: the upstream call ends, its connection and bulkhead slot go to the
//! next caller, the caller's connection is closed without the stream's
//! end, and `happynet_upstream_stream_write_timeouts_total` counts it.

use crate::error::HttpError;
use crate::gateway::error_response;
use crate::network::Network;
use crate::security::constant_time_eq;
use actix_web::http::header::{self, ContentType};
use actix_web::{web, HttpRequest, HttpResponse};
use happynet_actors::cache::CacheKey;
use serde::Deserialize;
use serde_json::json;

/// Mounts `/v1/chat/completions` (bodies up to `max_body_bytes`; larger
/// ones get 413 before they are buffered) and `/v1/models`. The app must
/// also have the `Network` as app data (`Network::configure` adds it).
pub fn configure(cfg: &mut web::ServiceConfig, max_body_bytes: usize) {
    cfg.service(
        web::resource("/v1/chat/completions")
            .app_data(web::PayloadConfig::new(max_body_bytes))
            .route(web::post().to(chat_completions)),
    )
    .route("/v1/models", web::get().to(models));
}

/// OpenAI's error shape, so SDKs show the message.
fn openai_error(status: actix_web::http::StatusCode, kind: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(json!({
        "error": { "message": message, "type": kind, "code": kind }
    }))
}

/// Checks the caller's bearer token against `network.gateway.tokens`;
/// `Some(401 response)` when it is missing or unknown.
pub(crate) fn refused(req: &HttpRequest, net: &Network) -> Option<HttpResponse> {
    let tokens = &net.config().network.gateway.tokens;
    if tokens.is_empty() {
        return None;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(token)
            if tokens
                .iter()
                .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes())) =>
        {
            None
        }
        _ => Some(openai_error(
            actix_web::http::StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or unknown gateway token (Authorization: Bearer <token>)",
        )),
    }
}

/// Whether a failure on one client should send the call to the next.
fn try_next(e: &HttpError) -> bool {
    match e {
        HttpError::Status { status, .. } => status.is_server_error() || *status == 429,
        HttpError::BreakerOpen { .. }
        | HttpError::RateLimited { .. }
        | HttpError::Overloaded { .. }
        | HttpError::Timeout { .. }
        | HttpError::Connect { .. }
        | HttpError::Transport { .. }
        | HttpError::MissingSecret { .. } => true,
        _ => false,
    }
}

#[derive(Deserialize)]
struct StreamFlag {
    #[serde(default)]
    stream: Option<bool>,
}

async fn chat_completions(
    req: HttpRequest,
    body: web::Bytes,
    net: web::Data<Network>,
) -> HttpResponse {
    if let Some(denied) = refused(&req, &net) {
        return denied;
    }
    let stream = match serde_json::from_slice::<StreamFlag>(&body) {
        Ok(flag) => flag.stream.unwrap_or(false),
        Err(e) => {
            return openai_error(
                actix_web::http::StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("the body is not a JSON chat request: {e}"),
            )
        }
    };
    let clients = net.gateway_clients();
    if clients.is_empty() {
        return openai_error(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no upstream is configured for the gateway (network.gateway.clients)",
        );
    }
    let mut last_error = None;
    for client in &clients {
        let call = client
            .post(crate::openai::CHAT_COMPLETIONS_PATH)
            .typed_header(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            )
            .body(body.clone())
            .wait_for_rate_limit(false)
            .retry_non_idempotent()
            .give_up_if(crate::openai::is_insufficient_quota);
        // Identical non-streamed prompts are answered from the client's
        // cache, when it has one (`api_clients.<name>.cache`).
        let call = if stream {
            call
        } else {
            call.cache_key(CacheKey::for_body(
                &actix_web::http::Method::POST,
                crate::openai::CHAT_COMPLETIONS_PATH,
                &body,
            ))
        };
        let result = if stream {
            // A caller that stops reading must not hold the upstream's
            // connection and bulkhead slot for as long as it likes.
            let write_timeout = net.config().network.gateway.stream_write_timeout.0;
            call.stream_write_timeout(write_timeout)
                .send_streaming()
                .await
                .map(|resp| {
                    HttpResponse::Ok()
                        .content_type("text/event-stream")
                        .insert_header((header::CACHE_CONTROL, "no-cache"))
                        .insert_header(("x-upstream", resp.upstream.clone()))
                        .streaming(resp.into_stream())
                })
        } else {
            call.send().await.map(|resp| {
                HttpResponse::build(resp.status)
                    .content_type(ContentType::json())
                    .insert_header(("x-upstream", resp.upstream.clone()))
                    .body(resp.body)
            })
        };
        match result {
            Ok(resp) => return resp,
            Err(e) if try_next(&e) => {
                log::info!(
                    "gateway: {} failed ({e}); trying the next client",
                    client.name()
                );
                last_error = Some(e);
            }
            Err(e) => return error_response(&e),
        }
    }
    match last_error {
        Some(e) => error_response(&e),
        None => openai_error(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no upstream answered",
        ),
    }
}

async fn models(req: HttpRequest, net: web::Data<Network>) -> HttpResponse {
    if let Some(denied) = refused(&req, &net) {
        return denied;
    }
    let mut last_error = None;
    for client in net.gateway_clients() {
        match client
            .get("/v1/models")
            .wait_for_rate_limit(false)
            .send()
            .await
        {
            Ok(resp) => {
                return HttpResponse::build(resp.status)
                    .content_type(ContentType::json())
                    .insert_header(("x-upstream", resp.upstream.clone()))
                    .body(resp.body)
            }
            Err(e) if try_next(&e) => last_error = Some(e),
            Err(e) => return error_response(&e),
        }
    }
    match last_error {
        Some(e) => error_response(&e),
        None => openai_error(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no upstream is configured for the gateway (network.gateway.clients)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
