//! A response as the caller gets it: [`Response`] (read in full) or
//! [`StreamingResponse`] (the body still arriving), and the rules for its
//! head.
//!
//! What the caller gets back keeps one framing: by default the body is
//! decoded (awc advertises and undoes gzip, brotli, deflate and zstd) and
//! `Content-Encoding`/`Content-Length` are dropped from the headers, so an
//! app never sees an encoding that its bytes no longer have;
//! [`RequestBuilder::keep_content_encoding`](super::RequestBuilder::keep_content_encoding)
//! (the `/proxy` gateway) instead passes the upstream's encoded bytes
//! through untouched under its own headers. A response head over
//! [`MAX_RESPONSE_HEADER_BYTES`] is refused as the upstream's fault.

use super::error::HttpError;
use actix_web::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use happynet_actors::pool::{PoolError, StreamHead, UpstreamResponse};
use serde::de::DeserializeOwned;
use tokio::time::Instant;

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
