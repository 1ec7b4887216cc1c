//! The gateway route: `ANY /proxy/{client}/{tail…}` forwards to
//! `network.api_clients.<client>` through limiter → breaker → pool, with
//! retries, and maps every failure to an HTTP status with a JSON body that
//! names the cause:
//!
//! | cause | status |
//! |---|---|
//! | a tail climbing above the base path, an invalid target | 400 |
//! | `TRACE` or `CONNECT` | 405 |
//! | the caller's headers over [`MAX_FORWARDED_HEADER_BYTES`] | 431 |
//! | rate limited | 429 + `Retry-After` |
//! | breaker open, bulkhead full | 503 (+ `Retry-After` when known) |
//! | deadline | 504 |
//! | connect or transport error, an upstream head over [`MAX_RESPONSE_HEADER_BYTES`](crate::upstream::MAX_RESPONSE_HEADER_BYTES) | 502 |
//! | upstream error status | passed through, body and all |
//!
//! None of the caller's mistakes reaches the upstream's breaker, its
//! endpoints' ejection or a retry (the audit is in [`crate::upstream::error`]).
//!
//! **The request target** goes to the upstream as the caller sent it: the
//! tail and query are cut from the raw request URI, not from the decoded
//! route match, so percent-encoding (`%20`, `%2F`, `%25`, …) and the query
//! reach the upstream byte for byte, appended to the client's base URL. A
//! tail whose dot segments would climb above that base path is refused with
//! 400 before anything is sent, whatever its spelling: `..` or `.` in any
//! case and percent-encoding (`%2e%2e`, `%2E.`), also after a second
//! decoding (`%252e`), with `/`, `\`, `%2f` or `%5c` as separators, and
//! `..;` (a path parameter some servers strip). Dots that stay inside the
//! base (`a/../b`) are passed on as they are.
//!
//! **Headers.** Hop-by-hop headers (RFC 9110 §7.6.1: `Connection`,
//! `Keep-Alive`, `Proxy-Authenticate`, `Proxy-Authorization`,
//! `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and
//! every header a `Connection` header names) are dropped in both
//! directions, as are `Host`, `Content-Length` (recomputed for the body
//! sent) and `Expect` (the expectation was met at this hop). Sizes are
//! capped, counting each header as its name, value and 4 bytes of framing:
//! the caller's forwarded headers at [`MAX_FORWARDED_HEADER_BYTES`] (over it,
//! 431 to the caller, nothing sent), the upstream's response head at
//! [`MAX_RESPONSE_HEADER_BYTES`](crate::upstream::MAX_RESPONSE_HEADER_BYTES) (over it, 502 and a breaker failure:
//! `crate::upstream` enforces it for every client). The caller's whole head
//! is further bounded by actix-web (96 headers), the upstream's by awc.
//!
//! **Bodies** keep the framing they arrived with: the upstream's encoded
//! bytes go to the caller untouched, under its `Content-Encoding` (and a
//! `Content-Length` that counts those same bytes), because the caller
//! negotiated the encoding itself — its `Accept-Encoding` is forwarded, and
//! without one the upstream is asked for identity. Decoding instead would
//! cost CPU per call, let a small compressed body grow past limits, and
//! break strong `ETag`s, which name one encoded representation. Cached
//! answers vary on `Accept-Encoding` ([`crate::upstream`]). The transfer
//! coding is per hop: a chunked answer is buffered and sent with a length.
//!
//! When `network.gateway.tokens` is set, callers must present one
//! (`Authorization: Bearer …`) and it is not forwarded; the upstream gets the
//! client's own credential. The gateway does not wait for the rate limiter: a caller that is over the
//! rate learns it at once and when to come back.

use super::{error_response, GatewayState};
use crate::json_error::ErrorBody;
use crate::upstream::header_bytes;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

/// The largest request body the gateway forwards.
pub const MAX_PROXY_BODY: usize = 10 << 20;

/// The most bytes of the caller's headers the gateway forwards, counted as
/// [`header_bytes`] does: 32 KiB, the total nginx accepts by
/// default (4 × 8 KiB buffers). Over it the caller gets 431 and nothing is
/// sent: the upstream would refuse it anyway, and that refusal must not be
/// spent against the upstream's own limits.
pub const MAX_FORWARDED_HEADER_BYTES: usize = 32 << 10;

/// Headers that describe one hop's connection, not the message: never
/// forwarded (RFC 9110 §7.6.1), plus those this hop sets itself.
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
            | "expect"
    )
}

/// The headers of `headers` that go to the next hop: without the hop-by-hop
/// ones and without those its `Connection` headers name.
fn end_to_end(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::try_from(token.trim()).ok())
        .collect();
    headers
        .iter()
        .filter(move |(name, _)| !is_hop_by_hop(name) && !named.contains(name))
}

/// Mounts `/proxy/{client}/{tail:.*}` for every method.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/proxy/{client}/{tail:.*}")
            .app_data(web::PayloadConfig::new(MAX_PROXY_BODY))
            .default_service(web::to(proxy_route)),
    );
}

/// The caller's answer from an upstream's: its status, end-to-end headers
/// and body as they came.
pub(super) fn relay(status: StatusCode, headers: &HeaderMap, body: web::Bytes) -> HttpResponse {
    let mut out = HttpResponse::build(status);
    for (name, value) in end_to_end(headers) {
        out.append_header((name.clone(), value.clone()));
    }
    out.body(body)
}

/// The answer to a HEAD: as [`relay`], keeping the upstream's
/// `Content-Length`, which describes the body a GET would get (an empty body
/// would make actix write `Content-Length: 0`, a different representation).
fn relay_head(status: StatusCode, headers: &HeaderMap) -> HttpResponse {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(len) = declared else {
        return relay(status, headers, web::Bytes::new());
    };
    let mut out = HttpResponse::build(status);
    for (name, value) in end_to_end(headers) {
        out.append_header((name.clone(), value.clone()));
    }
    // An unsized body with chunking off is how actix keeps a set length;
    // for a HEAD it writes no body at all.
    out.no_chunking(len).streaming(futures::stream::empty::<
        Result<web::Bytes, std::convert::Infallible>,
    >())
}

/// A refusal of the caller's request, in the shape of [`error_response`].
fn refuse(status: StatusCode, reason: String) -> HttpResponse {
    ErrorBody::new("invalid_request", reason)
        .with("upstream", None::<&str>)
        .with("retry_after_ms", None::<u64>)
        .answer(status)
}

/// The tail of a raw `/proxy/{client}/{tail}` path as sent, from the `/`
/// after the client's name: never decoded, so it can be forwarded byte for
/// byte. `None` if the raw path is not of that form (e.g. `/proxy` itself
/// spelt with percent-encoding, which the router decodes but the gateway's
/// scope guard does not let in).
fn raw_tail(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/proxy/")?;
    let slash = rest.find('/')?;
    (slash > 0).then(|| &rest[slash..])
}

/// One level of percent-decoding; malformed escapes are kept as they are
/// (an upstream would see them the same way).
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Whether the dot segments of `tail` (decoded: see the module docs) take
/// it above where it starts.
fn climbs_above_base(tail: &str) -> bool {
    let climbs = |decoded: &[u8]| {
        let mut depth = 0usize;
        for segment in decoded.split(|&b| b == b'/' || b == b'\\') {
            // `..;x` is `..` to servers that strip path parameters.
            let name = segment.split(|&b| b == b';').next().unwrap_or(segment);
            match name {
                b"" | b"." => {}
                b".." => match depth.checked_sub(1) {
                    Some(d) => depth = d,
                    None => return true,
                },
                _ => depth += 1,
            }
        }
        false
    };
    let once = percent_decode(tail.as_bytes());
    // Decoding once more catches `%252e%252e`, for upstreams (or proxies in
    // front of them) that decode twice.
    climbs(&once) || climbs(&percent_decode(&once))
}

async fn proxy_route(
    req: HttpRequest,
    body: web::Bytes,
    gateway: web::Data<GatewayState>,
) -> HttpResponse {
    // The proxy spends the operator's upstream credentials: it answers only
    // callers with a gateway token when tokens are configured.
    if let Some(denied) = gateway.refused(&req) {
        return denied;
    }
    let gateway_auth = gateway.requires_token();
    let client_name = req.match_info().get("client").unwrap_or_default();
    let Some(client) = gateway.client(client_name) else {
        return ErrorBody::new(
            "unknown_client",
            format!("no network.api_clients.{client_name} is configured"),
        )
        .answer(StatusCode::NOT_FOUND);
    };
    // TRACE would echo back the credential this gateway adds; CONNECT asks
    // for a tunnel, which a reverse proxy does not offer.
    if matches!(*req.method(), Method::TRACE | Method::CONNECT) {
        return ErrorBody::new(
            "method_not_allowed",
            format!("{} is not forwarded by the gateway", req.method()),
        )
        .answer(StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(tail) = raw_tail(req.uri().path()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the target is not /proxy/{client}/{path}".into(),
        );
    };
    if climbs_above_base(tail) {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!("the path {tail:?} climbs above the client's base path"),
        );
    }
    let mut path = tail.to_owned();
    if let Some(query) = req.uri().query() {
        path.push('?');
        path.push_str(query);
    }
    // With gateway tokens, Authorization carries the caller's gateway token,
    // which is never the upstream's business.
    let forwarded: Vec<(&HeaderName, &HeaderValue)> = end_to_end(req.headers())
        .filter(|(name, _)| !(gateway_auth && *name == header::AUTHORIZATION))
        .collect();
    let size = header_bytes(forwarded.iter().copied());
    if size > MAX_FORWARDED_HEADER_BYTES {
        return refuse(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "request headers of {size} bytes, over the limit of {MAX_FORWARDED_HEADER_BYTES}"
            ),
        );
    }
    let mut call = client
        .request(req.method().clone(), &path)
        .wait_for_rate_limit(false)
        .keep_content_encoding()
        .body(body);
    for (name, value) in forwarded {
        call = call.typed_header(name.clone(), value.clone());
    }
    let head_request = req.method() == Method::HEAD;
    match call.send().await {
        Ok(resp) if head_request => relay_head(resp.status, &resp.headers),
        Ok(resp) => relay(resp.status, &resp.headers, resp.body),
        Err(e) => {
            log::info!("proxy {client_name}{path}: {e}");
            error_response(&e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_tail_starts_after_the_client_name() {
        assert_eq!(raw_tail("/proxy/up/a%20b"), Some("/a%20b"));
        assert_eq!(raw_tail("/proxy/up/"), Some("/"));
        assert_eq!(raw_tail("/proxy/up"), None);
        assert_eq!(raw_tail("/proxy//x"), None);
        assert_eq!(raw_tail("/%70roxy/up/x"), None);
    }

    #[test]
    fn percent_decoding_keeps_malformed_escapes() {
        assert_eq!(percent_decode(b"%2e%2E%41"), b"..A");
        assert_eq!(percent_decode(b"%zz%2"), b"%zz%2");
        assert_eq!(percent_decode(b"%"), b"%");
        assert_eq!(percent_decode(b"a%2"), b"a%2");
        assert_eq!(percent_decode(b"%252e"), b"%2e");
    }

    #[test]
    fn dot_segments_may_not_climb_above_the_base() {
        for climbs in [
            "/..",
            "/../x",
            "/a/../../x",
            "/%2e%2e",
            "/.%2E/x",
            "/..%2fx",
            "/..%5Cx",
            "/..\\x",
            "/%252e%252e/x",
            "/..;/x",
            "/./../x",
            "/a/b/../../..",
        ] {
            assert!(climbs_above_base(climbs), "{climbs}");
        }
        for stays in [
            "/",
            "/a/../b",
            "/..x",
            "/x..",
            "/.../x",
            "/.well-known",
            "/a/./b",
            "/a//..",
        ] {
            assert!(!climbs_above_base(stays), "{stays}");
        }
    }

    #[test]
    fn headers_named_in_connection_are_hop_by_hop() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Named"),
            ("connection", "x-other"),
            ("x-named", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("x-kept", "3"),
        ] {
            headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let kept: Vec<&str> = end_to_end(&headers).map(|(n, _)| n.as_str()).collect();
        assert_eq!(kept, ["x-kept"]);
    }
}
