//! The clients app code calls upstreams with.
//!
//! - [`HttpClient`]: any URL — `client.get("https://api.example.com/data")`.
//!   It keeps one pool, breaker and limiter per origin (`scheme://host:port`),
//!   created on first use from `network.http`, at most
//!   `network.http.max_origins` of them.
//! - [`ApiClient`]: one configured `network.api_clients.<name>` — paths are
//!   relative to its `base_url`, and calls are balanced over its endpoints.
//!
//! Both are cheap to clone and `Send`, so any actor or handler can hold one.
//! The actors behind them run on one dedicated arbiter (thread), because the
//! pool's awc client cannot move between threads; callers on any thread talk
//! to them through messages. Each method returns a [`RequestBuilder`]: the
//! first step of the call path (see [`crate::upstream`]).
//!
//! Below the clients, in this file, are the request and response types as
//! app code holds them, so that what `get` returns and what `send` gives
//! back are read next to the client that makes them.
//!
//! A request before it runs: [`RequestBuilder`] (what `ApiClient::get` and
//! its siblings return), the [`Request`] it builds, and the caller's policy
//! riding on it — retries of non-idempotent methods, waiting for the rate
//! limiter, the deadline, a [`FallbackResponse`], [`GiveUpIf`], a cache key,
//! whether the body keeps its encoding.
//!
//! A response as the caller gets it: [`Response`] (read in full) or
//! [`StreamingResponse`] (the body still arriving), and the rules for its
//! head. What the caller gets back keeps one framing: by default the body
//! is decoded (awc advertises and undoes gzip, brotli, deflate and zstd)
//! and `Content-Encoding`/`Content-Length` are dropped from the headers, so
//! an app never sees an encoding that its bytes no longer have;
//! [`RequestBuilder::keep_content_encoding`] (the `/proxy` gateway) instead
//! passes the upstream's encoded bytes through untouched under its own
//! headers. A response head over [`MAX_RESPONSE_HEADER_BYTES`] is refused
//! as the upstream's fault.

use super::call::Upstream;
use super::error::HttpError;
use super::registry::Upstreams;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode, Uri};
use actix_web::web::Bytes;
use happynet_actors::cache::CacheKey;
use happynet_actors::pool::{PoolError, StreamHead, UpstreamResponse};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Splits an absolute URL into its origin and its path-and-query.
fn split_url(url: &str) -> Result<(String, String), HttpError> {
    let invalid = |reason: &str| HttpError::InvalidRequest {
        reason: format!("{url:?}: {reason}"),
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        _ => return Err(invalid("only http:// and https:// URLs")),
    };
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok((format!("{scheme}://{authority}"), path.to_owned()))
}

/// A client for any URL; see the module docs.
#[derive(Clone)]
pub struct HttpClient {
    upstreams: Arc<Upstreams>,
}

impl HttpClient {
    pub(crate) fn new(upstreams: Arc<Upstreams>) -> Self {
        HttpClient { upstreams }
    }

    /// A request with any method.
    pub fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let (target, path) = match split_url(url) {
            Ok((origin, path)) => (self.upstreams.origin(&origin), path),
            Err(e) => (Err(e), String::new()),
        };
        RequestBuilder {
            target,
            request: Request::new(method, path),
        }
    }

    /// `GET url`.
    pub fn get(&self, url: &str) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    /// `POST url` (not retried unless you opt in).
    pub fn post(&self, url: &str) -> RequestBuilder {
        self.request(Method::POST, url)
    }

    /// `PUT url`.
    pub fn put(&self, url: &str) -> RequestBuilder {
        self.request(Method::PUT, url)
    }

    /// `DELETE url`.
    pub fn delete(&self, url: &str) -> RequestBuilder {
        self.request(Method::DELETE, url)
    }
}

/// A client for one configured `network.api_clients.<name>`.
#[derive(Clone)]
pub struct ApiClient {
    upstream: Arc<Upstream>,
}

impl ApiClient {
    pub(crate) fn new(upstream: Arc<Upstream>) -> Self {
        ApiClient { upstream }
    }

    /// The client's name.
    pub fn name(&self) -> &str {
        self.upstream.name()
    }

    /// The upstream behind it (addresses of its actors, settings).
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// A request with any method; `path` (with any query) is relative to the
    /// client's base URL and must start with `/`.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let target = if path.starts_with('/') {
            Ok(self.upstream.clone())
        } else {
            Err(HttpError::InvalidRequest {
                reason: format!("path {path:?} must start with /"),
            })
        };
        RequestBuilder {
            target,
            request: Request::new(method, path.to_owned()),
        }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// `POST path` (not retried unless you opt in).
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    /// `PUT path`.
    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }
}

/// One logical request, before it runs.
#[derive(Clone)]
pub struct Request {
    pub(crate) method: Method,
    pub(crate) path_and_query: String,
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    pub(crate) body: Bytes,
    pub(crate) retry_non_idempotent: bool,
    pub(crate) wait_for_rate_limit: Option<bool>,
    pub(crate) rate_limit_key: Option<String>,
    pub(crate) deadline: Option<Duration>,
    pub(crate) fallback: Option<FallbackResponse>,
    pub(crate) give_up_if: Option<GiveUpIf>,
    pub(crate) cache_key: Option<CacheKey>,
    pub(crate) keep_encoding: bool,
    pub(crate) stream_write_timeout: Option<Duration>,
}

/// Says whether an otherwise retryable error response is final (an
/// out-of-quota 429, say).
pub type GiveUpIf = Arc<dyn Fn(&Response) -> bool + Send + Sync>;

impl Request {
    pub(crate) fn new(method: Method, path_and_query: String) -> Self {
        Request {
            method,
            path_and_query,
            headers: Vec::new(),
            body: Bytes::new(),
            retry_non_idempotent: false,
            wait_for_rate_limit: None,
            rate_limit_key: None,
            deadline: None,
            fallback: None,
            give_up_if: None,
            cache_key: None,
            keep_encoding: false,
            stream_write_timeout: None,
        }
    }
}

/// A request being built: set headers, a body and policy, then [`send`](Self::send).
#[must_use = "a request does nothing until it is sent"]
pub struct RequestBuilder {
    pub(crate) target: Result<Arc<Upstream>, HttpError>,
    pub(crate) request: Request,
}

impl RequestBuilder {
    /// Adds a header. An invalid name or value fails the request at `send`.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        match (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            (Ok(n), Ok(v)) => self.request.headers.push((n, v)),
            _ => {
                self.target = Err(HttpError::InvalidRequest {
                    reason: format!("invalid header {name:?}"),
                })
            }
        }
        self
    }

    /// Adds an already-typed header.
    pub fn typed_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.request.headers.push((name, value));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.request.body = body.into();
        self
    }

    /// Sets a JSON body and `Content-Type: application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.request.body = body.into();
                self.request.headers.push((
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ));
            }
            Err(e) => {
                self.target = Err(HttpError::InvalidRequest {
                    reason: format!("cannot encode JSON body: {e}"),
                })
            }
        }
        self
    }

    /// Allows retries of a non-idempotent method (POST, PATCH): only when the
    /// caller knows a repeat is harmless (an idempotency key, say).
    pub fn retry_non_idempotent(mut self) -> Self {
        self.request.retry_non_idempotent = true;
        self
    }

    /// Whether to wait for the rate limiter when the wait fits the deadline
    /// (overrides the configured `wait_for_rate_limit`).
    pub fn wait_for_rate_limit(mut self, wait: bool) -> Self {
        self.request.wait_for_rate_limit = Some(wait);
        self
    }

    /// The rate-limit key (default: the upstream's name). Use an API key or a
    /// client IP to limit per caller.
    pub fn rate_limit_key(mut self, key: impl Into<String>) -> Self {
        self.request.rate_limit_key = Some(key.into());
        self
    }

    /// The overall deadline of this call (default: the configured one).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.request.deadline = Some(deadline);
        self
    }

    /// A response to use when the breaker is open or the call finally fails.
    pub fn fallback(mut self, response: Response) -> Self {
        self.request.fallback = Some(FallbackResponse::Value(response));
        self
    }

    /// A fallback computed from the error; returning `None` keeps the error.
    pub fn fallback_with(
        mut self,
        f: impl Fn(&HttpError) -> Option<Response> + Send + Sync + 'static,
    ) -> Self {
        self.request.fallback = Some(FallbackResponse::With(Arc::new(f)));
        self
    }

    /// Makes this request cacheable under `key` (when the client has a
    /// cache), whatever its method: e.g. `CacheKey::for_body(..)` for
    /// identical prompts to an LLM. Include the caller's identity in the key
    /// if answers differ per caller.
    pub fn cache_key(mut self, key: CacheKey) -> Self {
        self.request.cache_key = Some(key);
        self
    }

    /// Marks retryable error responses for which `f` is true as final (an
    /// out-of-quota 429 that no wait will cure, say).
    pub fn give_up_if(mut self, f: impl Fn(&Response) -> bool + Send + Sync + 'static) -> Self {
        self.request.give_up_if = Some(Arc::new(f));
        self
    }

    /// Passes the response body through as the upstream encoded it, under
    /// its own `Content-Encoding` and `Content-Length`, instead of decoding
    /// it: for a proxy, whose caller negotiated the encoding with its own
    /// `Accept-Encoding` (forward it as a header; without one the upstream
    /// is asked for nothing but identity). Cached answers vary on it.
    pub fn keep_content_encoding(mut self) -> Self {
        self.request.keep_encoding = true;
        self
    }

    /// For [`send_streaming`](Self::send_streaming): how long the body's
    /// reader may take no chunk, once the pool's chunk queue is full, before
    /// the call is abandoned — the upstream connection and the bulkhead slot
    /// freed, the stream ended with an error, and
    /// `PoolStats::stream_write_timeouts` counted. Default: the client's
    /// per-attempt `timeout`, the same time the upstream may take between
    /// chunks. The gateways use `network.gateway.stream_write_timeout`.
    pub fn stream_write_timeout(mut self, timeout: Duration) -> Self {
        self.request.stream_write_timeout = Some(timeout);
        self
    }

    /// Runs the request through limiter → breaker → pool, with retries.
    pub async fn send(self) -> Result<Response, HttpError> {
        let upstream = self.target?;
        upstream.call(self.request).await
    }

    /// Like [`send`](Self::send), but returns as soon as a successful
    /// response head arrives, with the body as a stream. Retries happen only
    /// before that point. Fallbacks do not apply to streams.
    pub async fn send_streaming(self) -> Result<StreamingResponse, HttpError> {
        let upstream = self.target?;
        upstream.call_stream(self.request).await
    }
}

/// Builds a fallback response from the error that made it necessary.
pub type FallbackFn = Arc<dyn Fn(&HttpError) -> Option<Response> + Send + Sync>;

/// The response a caller supplies for when a call cannot succeed
/// ([`RequestBuilder::fallback`], [`RequestBuilder::fallback_with`]).
#[derive(Clone)]
pub enum FallbackResponse {
    /// Always this response.
    Value(Response),
    /// A response computed from the error; `None` keeps the error.
    With(FallbackFn),
}

impl FallbackResponse {
    pub(super) fn produce(&self, error: &HttpError) -> Option<Response> {
        let mut resp = match self {
            FallbackResponse::Value(r) => Some(r.clone()),
            FallbackResponse::With(f) => f(error),
        }?;
        resp.from_fallback = true;
        Some(resp)
    }
}

impl std::fmt::Debug for FallbackResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FallbackResponse::Value(r) => f.debug_tuple("Value").field(&r.status).finish(),
            FallbackResponse::With(_) => f.write_str("With(..)"),
        }
    }
}

/// The largest response head accepted from an upstream, counted as
/// [`header_bytes`] does: 64 KiB. Above what real APIs send (a few KiB, a
/// cookie-heavy site tens), below the 128 KiB awc parses at all, so that an
/// upstream cannot make every cached entry, and every caller of a gateway,
/// carry its bloat. Over it, the attempt is a [`HttpError::Transport`] and a
/// breaker failure: the upstream's fault.
pub const MAX_RESPONSE_HEADER_BYTES: usize = 64 << 10;

/// The size of headers as they go on the wire in HTTP/1.1: each line's
/// name, value, `": "` and CRLF.
pub fn header_bytes<'a>(
    headers: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
) -> usize {
    headers
        .into_iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// Drops the headers that describe an encoding the body no longer has: the
/// body was decoded (when `Content-Encoding` names a coding awc decodes;
/// any other is left, with its bytes, as it came), so the encoded length is
/// wrong too.
pub(super) fn drop_decoded_encoding(headers: &mut HeaderMap) {
    let decoded = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.parse::<header::ContentEncoding>().is_ok());
    if decoded {
        headers.remove(header::CONTENT_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The upstream that answered.
    pub upstream: String,
    /// How many attempts it took (0 for a fallback built by the caller).
    pub attempts: u32,
    /// True if this came from the caller's fallback, not the upstream.
    pub from_fallback: bool,
    /// True if this was served from the response cache.
    pub from_cache: bool,
}

/// A response whose body is still arriving.
#[derive(Debug)]
pub struct StreamingResponse {
    /// The status (always below 400: error answers become errors).
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The upstream that answered.
    pub upstream: String,
    /// How many attempts it took.
    pub attempts: u32,
    /// When the call started: a timeout mid-body says how long it had run.
    started: Instant,
    body: tokio::sync::mpsc::Receiver<Result<Bytes, PoolError>>,
    /// Says, once `body` is dry, whether the stream was whole (taken when
    /// read, so an error is given once).
    ended: Option<tokio::sync::oneshot::Receiver<Result<(), PoolError>>>,
}

impl StreamingResponse {
    /// The caller's side of the pool's `head`, after `attempts` attempts of
    /// a call that started at `started`.
    pub(super) fn new(head: StreamHead, upstream: String, attempts: u32, started: Instant) -> Self {
        StreamingResponse {
            status: head.status,
            headers: head.headers,
            upstream,
            attempts,
            started,
            body: head.body,
            ended: Some(head.ended),
        }
    }

    /// The next body chunk; `None` at the end. A stream cut short without
    /// an error chunk (its reader stalled past the write timeout, or the
    /// pool stopped) ends with an `Err`, never with a `None` that would pass
    /// for a complete body.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, HttpError>> {
        match self.body.recv().await {
            Some(chunk) => Some(chunk.map_err(|e| HttpError::from_pool(e, self.started))),
            // The pool says how the body ended before it drops the body's
            // sender, so the verdict is there by now.
            None => match self.ended.take()?.try_recv() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Err(HttpError::from_pool(e, self.started))),
                Err(_) => Some(Err(HttpError::Internal {
                    upstream: self.upstream.clone(),
                    message: "the connection pool stopped mid-stream".into(),
                })),
            },
        }
    }

    /// The body as a `Stream` of chunks (for `HttpResponse::streaming`).
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Bytes, HttpError>> {
        futures::stream::unfold(self, |mut r| async move {
            r.next_chunk().await.map(|chunk| (chunk, r))
        })
    }
}

impl Response {
    pub(super) fn from_upstream(upstream: &str, r: UpstreamResponse, attempts: u32) -> Self {
        Response {
            status: r.status,
            headers: r.headers,
            body: r.body,
            upstream: upstream.to_owned(),
            attempts,
            from_fallback: false,
            from_cache: false,
        }
    }

    /// A response built by the caller (for fallbacks).
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Response {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
            upstream: String::new(),
            attempts: 0,
            from_fallback: false,
            from_cache: false,
        }
    }

    /// A `200` JSON response built by the caller (for fallbacks).
    pub fn json_value(value: &serde_json::Value) -> Self {
        let mut r = Response::new(StatusCode::OK, value.to_string());
        r.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }

    /// The body as raw bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.body
    }

    /// The body as UTF-8 text.
    pub fn text(&self) -> Result<&str, HttpError> {
        std::str::from_utf8(&self.body).map_err(|e| HttpError::Decode {
            upstream: self.upstream.clone(),
            message: format!("body is not UTF-8: {e}"),
        })
    }

    /// The body decoded from JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HttpError> {
        serde_json::from_slice(&self.body).map_err(|e| HttpError::Decode {
            upstream: self.upstream.clone(),
            message: format!("body is not the expected JSON: {e}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_origin_and_path() {
        assert_eq!(
            split_url("https://api.example.com/data?x=1").unwrap(),
            ("https://api.example.com".into(), "/data?x=1".into())
        );
        assert_eq!(
            split_url("http://127.0.0.1:9000").unwrap(),
            ("http://127.0.0.1:9000".into(), "/".into())
        );
        assert!(split_url("ftp://x/y").is_err());
        assert!(split_url("/relative").is_err());
        assert!(split_url("not a url").is_err());
    }
}
