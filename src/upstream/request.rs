//! A request before it runs: [`RequestBuilder`] (what `ApiClient::get` and
//! its siblings return), the [`Request`] it builds, and the caller's policy
//! riding on it — retries of non-idempotent methods, waiting for the rate
//! limiter, the deadline, a [`FallbackResponse`], [`GiveUpIf`], a cache key,
//! whether the body keeps its encoding.

use super::call::Upstream;
use super::error::HttpError;
use super::response::{Response, StreamingResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::web::Bytes;
use happynet_actors::cache::CacheKey;
use std::sync::Arc;
use std::time::Duration;

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
