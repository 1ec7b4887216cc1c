//! `HttpError`: why an upstream call failed, naming the upstream and the
//! cause, so a log line or an HTTP error body says what went wrong where.
//!
//! # Whose fault: the audit
//!
//! The rule: nothing the caller did wrong counts against the upstream. A
//! mistake of the caller's is answered 400 (or 405/413/431) before any
//! attempt: it never reaches the breaker, the balancer's ejection or the
//! retry loop. Every way a call ends, where that is decided, and what it
//! counts as ("breaker": the outcome reported for the attempt; "eject": the
//! pool's health signal for the endpoint; "retry": for idempotent calls;
//! "next": `/v1` tries the next `network.gateway.clients` entry):
//!
//! | cause | decided in | error | gateway answers | breaker | eject | retry | next |
//! |---|---|---|---|---|---|---|---|
//! | target the client cannot send (bad characters, no leading `/`) | `Upstream::outgoing` | `InvalidRequest` | 400 | not asked | no | no | no |
//! | `/proxy` tail climbing above the base path (`..`, `%2e%2e`, `..%2f`, …) | `gateway::proxy` | — | 400 | not asked | no | no | — |
//! | caller headers over `gateway::MAX_FORWARDED_HEADER_BYTES` | `gateway::proxy` | — | 431 | not asked | no | no | — |
//! | `TRACE`/`CONNECT` through `/proxy` | `gateway::proxy` | — | 405 | not asked | no | no | — |
//! | body over the route's limit | actix `PayloadConfig` | — | 413 | not asked | no | no | — |
//! | awc cannot build the request (URL, header, body) | `pool::send_error` → `PoolError::Invalid` | `InvalidRequest` | 400 | ignored | no | no | no |
//! | credential variable unset, or not a valid header value | `Auth::resolve`, `Auth::apply` | `MissingSecret` | 502 | not asked | no | no | yes |
//! | our rate limit | `Upstream::pipeline` | `RateLimited` | 429 + `Retry-After` | not asked | no | no | yes |
//! | breaker open | `Upstream::pipeline` | `BreakerOpen` | 503 + `Retry-After` | — | no | no | yes |
//! | bulkhead full; deadline passed in the queue | `PoolActor::admit`, `prepare` | `Overloaded`; `Timeout` | 503; 504 | ignored | no | no | yes |
//! | cannot connect | `pool::send_error` | `Connect` | 502 | failure | yes | yes | yes |
//! | closed before a response, reset, malformed response, send error | `pool::send_error` | `Transport` | 502 | failure | yes | no | yes |
//! | attempt timed out after it was sent | `PoolActor::launch_*` | `Timeout` | 504 | failure | yes | no | yes |
//! | response head over `upstream::MAX_RESPONSE_HEADER_BYTES` | `Upstream::head_too_large` | `Transport` | 502 | failure | no | no | yes |
//! | response body over `max_response_bytes` | `PoolActor::launch_*` | `Transport` | 502 | ignored | no | no | yes |
//! | 5xx | `Verdict::of_status` | `Status` | passed through | failure | yes | 502/503/504 | yes |
//! | 429 | same | `Status` | passed through | ignored | no | yes (unless `give_up_if`) | yes |
//! | other 4xx (the upstream judged the request) | same | `Status` | passed through | success | no | no | no |
//! | streamed body: reader took nothing for the write timeout | `PoolActor::launch_stream` | `Transport` (ends the stream) | connection cut | head already counted | no | no | — |
//! | streamed body: upstream idle past the timeout | `PoolActor::launch_stream` | `Timeout` (ends the stream) | connection cut | head already counted | yes | no | — |
//! | the app could not decode a body it asked for | `Response::json`, `text` | `Decode` | — | — | — | — | — |
//!
//! "Decided in" names where the code is. Every attempt's answer is judged
//! once, by `happynet_actors::pool::Verdict` (`of_status`, `of_error`):
//! its health is the breaker's outcome and the pool's ejection, and its
//! `retryable` is the retry loop's (which adds the caller's policy:
//! idempotency, `give_up_if`). The `next` column is
//! [`HttpError::tries_next_client`], which asks the same verdict of an error
//! status.

use super::client::Response;
use actix_web::http::StatusCode;
use happynet_actors::pool::PoolError;
use happynet_actors::pool::{Health, Verdict};
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// Why an upstream call produced no acceptable response.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum HttpError {
    /// The overall deadline (or the last attempt's timeout) passed.
    Timeout {
        /// The upstream.
        upstream: String,
        /// How long the call had run.
        after: Duration,
    },
    /// No connection could be made (after any retries).
    Connect {
        /// The upstream.
        upstream: String,
        /// The connector's error.
        message: String,
    },
    /// The upstream answered with an error status (after any retries). The
    /// response is kept so a gateway can pass it on.
    Status {
        /// The upstream.
        upstream: String,
        /// The status.
        status: StatusCode,
        /// The upstream's `Retry-After`, parsed.
        retry_after: Option<Duration>,
        /// The whole response.
        response: Box<Response>,
    },
    /// The circuit breaker is open.
    BreakerOpen {
        /// The upstream.
        upstream: String,
        /// When it will let a probe through.
        retry_after: Duration,
    },
    /// The rate limiter refused the call and waiting would have crossed the
    /// deadline (or the caller chose not to wait).
    RateLimited {
        /// The upstream.
        upstream: String,
        /// When a call would be admitted.
        retry_after: Duration,
    },
    /// The bulkhead is full; or, on a cached call, the most callers allowed
    /// to wait for one identical call in flight already do
    /// (`single_flight::DEFAULT_MAX_WAITERS`).
    Overloaded {
        /// The upstream.
        upstream: String,
    },
    /// The request failed after connecting (reset, malformed response, body
    /// too large).
    Transport {
        /// The upstream.
        upstream: String,
        /// What went wrong.
        message: String,
    },
    /// The response could not be decoded as asked.
    Decode {
        /// The upstream.
        upstream: String,
        /// What went wrong.
        message: String,
    },
    /// The request itself was invalid (URL, header, body encoding, unknown
    /// client, too many origins).
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// The client's credential is missing: its environment variable was not
    /// set when the network started.
    MissingSecret {
        /// The upstream.
        upstream: String,
        /// The environment variable that should hold the secret.
        variable: String,
    },
    /// An actor of the pipeline is gone (the system is shutting down).
    Internal {
        /// The upstream.
        upstream: String,
        /// What went wrong.
        message: String,
    },
}

impl HttpError {
    /// The error of a call, started at `call_started`, whose attempt the
    /// pool answered with `e`. A timeout says how long the whole call had
    /// run by now.
    pub(crate) fn from_pool(e: PoolError, call_started: Instant) -> Self {
        match e {
            PoolError::Overloaded { upstream } => HttpError::Overloaded { upstream },
            PoolError::Connect {
                upstream,
                endpoint,
                message,
            } => HttpError::Connect {
                upstream,
                message: format!("{endpoint}: {message}"),
            },
            PoolError::Timeout { upstream, .. } => HttpError::Timeout {
                upstream,
                after: call_started.elapsed(),
            },
            PoolError::Closed { upstream } => HttpError::Internal {
                upstream,
                message: "connection pool stopped".into(),
            },
            PoolError::Invalid { upstream, message } => HttpError::InvalidRequest {
                reason: format!("upstream {upstream}: {message}"),
            },
            other => HttpError::Transport {
                upstream: other_upstream(&other),
                message: other.to_string(),
            },
        }
    }

    /// The upstream the error concerns, if any.
    pub fn upstream(&self) -> Option<&str> {
        match self {
            HttpError::Timeout { upstream, .. }
            | HttpError::Connect { upstream, .. }
            | HttpError::Status { upstream, .. }
            | HttpError::BreakerOpen { upstream, .. }
            | HttpError::RateLimited { upstream, .. }
            | HttpError::Overloaded { upstream }
            | HttpError::Transport { upstream, .. }
            | HttpError::Decode { upstream, .. }
            | HttpError::MissingSecret { upstream, .. }
            | HttpError::Internal { upstream, .. } => Some(upstream),
            HttpError::InvalidRequest { .. } => None,
        }
    }

    /// A short machine-readable name of the cause.
    pub fn kind(&self) -> &'static str {
        match self {
            HttpError::Timeout { .. } => "timeout",
            HttpError::Connect { .. } => "connect",
            HttpError::Status { .. } => "status",
            HttpError::BreakerOpen { .. } => "breaker_open",
            HttpError::RateLimited { .. } => "rate_limited",
            HttpError::Overloaded { .. } => "overloaded",
            HttpError::Transport { .. } => "transport",
            HttpError::Decode { .. } => "decode",
            HttpError::InvalidRequest { .. } => "invalid_request",
            HttpError::MissingSecret { .. } => "missing_secret",
            HttpError::Internal { .. } => "internal",
        }
    }

    /// Whether a caller with other upstreams for the same thing (the `/v1`
    /// gateway's `network.gateway.clients`) should try the next one: the
    /// upstream failed or refused for now, rather than judging the request.
    /// An error status goes on when its [`Verdict`] is not a healthy
    /// answer (5xx, 429); our own refusals (open breaker, rate limit, full
    /// bulkhead, a missing credential) go on too; the caller's mistakes, a
    /// body the app could not decode and a stopped pipeline do not.
    pub fn tries_next_client(&self) -> bool {
        match self {
            HttpError::Status { status, .. } => {
                Verdict::of_status(*status).health != Health::Success
            }
            HttpError::BreakerOpen { .. }
            | HttpError::RateLimited { .. }
            | HttpError::Overloaded { .. }
            | HttpError::Timeout { .. }
            | HttpError::Connect { .. }
            | HttpError::Transport { .. }
            | HttpError::MissingSecret { .. } => true,
            HttpError::Decode { .. }
            | HttpError::InvalidRequest { .. }
            | HttpError::Internal { .. } => false,
        }
    }

    /// When the caller may try again, if the error says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            HttpError::BreakerOpen { retry_after, .. }
            | HttpError::RateLimited { retry_after, .. } => Some(*retry_after),
            HttpError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn other_upstream(e: &PoolError) -> String {
    match e {
        PoolError::Transport { upstream, .. }
        | PoolError::BodyTooLarge { upstream, .. }
        | PoolError::ReaderStalled { upstream, .. } => upstream.clone(),
        _ => String::new(),
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Timeout { upstream, after } => {
                write!(f, "upstream {upstream}: deadline exceeded after {after:?}")
            }
            HttpError::Connect { upstream, message } => {
                write!(f, "upstream {upstream}: cannot connect: {message}")
            }
            HttpError::Status {
                upstream, status, ..
            } => write!(f, "upstream {upstream}: answered {status}"),
            HttpError::BreakerOpen {
                upstream,
                retry_after,
            } => write!(
                f,
                "upstream {upstream}: circuit open, retry after {} ms",
                retry_after.as_millis()
            ),
            HttpError::RateLimited {
                upstream,
                retry_after,
            } => write!(
                f,
                "upstream {upstream}: rate limited, retry after {} ms",
                retry_after.as_millis()
            ),
            HttpError::Overloaded { upstream } => {
                write!(f, "upstream {upstream}: overloaded (bulkhead full)")
            }
            HttpError::Transport { upstream, message } => {
                write!(f, "upstream {upstream}: {message}")
            }
            HttpError::Decode { upstream, message } => {
                write!(f, "upstream {upstream}: {message}")
            }
            HttpError::InvalidRequest { reason } => write!(f, "invalid request: {reason}"),
            HttpError::MissingSecret { upstream, variable } => write!(
                f,
                "upstream {upstream}: no credential: environment variable {variable} is not set, or not a valid header value"
            ),
            HttpError::Internal { upstream, message } => {
                write!(f, "upstream {upstream}: {message}")
            }
        }
    }
}

impl std::error::Error for HttpError {}
