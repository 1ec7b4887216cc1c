//! The JSON error answer every happynet route gives, and its `Retry-After`.
//!
//! One shape, `{"error": kind, "message": …}`, so a client parses every
//! refusal the same way: the guards' (`crate::security`), the composition
//! root's own routes, and the gateways', which add the fields their callers
//! need (`upstream`, `retry_after_ms`). `kind` is a stable snake_case word;
//! `message` is for people. (The `/v1` routes answer in OpenAI's own error
//! shape instead, so that SDKs show the message.) Nothing here imports
//! from the crate: any floor may use it.

use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use serde_json::{Map, Value};
use std::time::Duration;

/// A JSON error body being built: `{"error": kind, "message": …}` and any
/// fields [`with`](Self::with) adds.
#[derive(Debug, Clone)]
#[must_use = "an error body does nothing until it is answered"]
pub(crate) struct ErrorBody(Map<String, Value>);

impl ErrorBody {
    /// `{"error": kind, "message": message}`.
    pub(crate) fn new(kind: &str, message: impl Into<String>) -> Self {
        let mut body = Map::new();
        body.insert("error".into(), Value::from(kind));
        body.insert("message".into(), Value::from(message.into()));
        ErrorBody(body)
    }

    /// Adds (or replaces) a field; `None` is written as `null`.
    pub(crate) fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.insert(key.into(), value.into());
        self
    }

    /// The body as a JSON value.
    pub(crate) fn into_value(self) -> Value {
        Value::Object(self.0)
    }

    /// The answer: `status` with this body as `application/json`.
    pub(crate) fn answer(self, status: StatusCode) -> HttpResponse {
        HttpResponse::build(status).json(self.into_value())
    }
}

/// `Retry-After` for a wait of `d`: whole seconds, rounded up, at least 1.
///
/// RFC 9110 §10.2.3 gives `Retry-After` as `delay-seconds`, a non-negative
/// integer, so a fractional wait must be rounded, and only rounding up
/// keeps a client that obeys from coming back before it may (it would be
/// refused again). The arithmetic is on integers: a float's `ceil` can
/// round a wait just over a whole second down to it. "0" is never sent: it
/// would invite every refused client back at once.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_and_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(20)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_nanos(1_000_000_001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(7)), 7);
    }

    #[test]
    fn an_error_body_has_the_kind_the_message_and_what_was_added() {
        let body = ErrorBody::new("bad_room", "no such room")
            .with("retry_after_ms", None::<u64>)
            .into_value();
        assert_eq!(
            body,
            serde_json::json!({"error": "bad_room", "message": "no such room", "retry_after_ms": null})
        );
    }
}
