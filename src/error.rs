//! `HttpError`: why an upstream call failed, naming the upstream and the
//! cause, so a log line or an HTTP error body says what went wrong where.

use crate::upstream::Response;
use actix_web::http::StatusCode;
use happynet_actors::pool::PoolError;
use std::fmt;
use std::time::Duration;

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
    pub(crate) fn from_pool(e: PoolError) -> Self {
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
                after: Duration::ZERO,
            },
            PoolError::Closed { upstream } => HttpError::Internal {
                upstream,
                message: "connection pool stopped".into(),
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
        PoolError::Transport { upstream, .. } | PoolError::BodyTooLarge { upstream, .. } => {
            upstream.clone()
        }
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
                "upstream {upstream}: no credential: environment variable {variable} is not set"
            ),
            HttpError::Internal { upstream, message } => {
                write!(f, "upstream {upstream}: {message}")
            }
        }
    }
}

impl std::error::Error for HttpError {}
