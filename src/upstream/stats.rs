//! Call stats: how each call to an upstream ended ([`CallOutcome`]), every
//! attempt's status class, whole calls' durations, retries, and retries the
//! budget refused — one [`CallStats`] per upstream, read by
//! [`Upstream::call_stats`](super::Upstream::call_stats) and exposed by
//! `GET /metrics`.
//!
//! The counters sit behind a `Mutex` taken once per attempt and once per
//! call, almost always by the upstream's own arbiter thread, so it is
//! uncontended: a few tens of nanoseconds against a network round trip.
//!
//! The vocabulary: an *attempt*'s outcome is what the breaker hears
//! (`happynet_actors::breaker::AttemptOutcome`); a *call*'s outcome, every
//! attempt and wait included, is a [`CallOutcome`].

use super::call::Upstream;
use super::error::HttpError;
use actix_web::http::StatusCode;
use happynet_actors::histogram::Histogram;
use std::time::Duration;
use tokio::time::Instant;

/// How one call to an upstream ended: the `outcome` label of
/// `happynet_upstream_requests_total`.
///
/// A closed set: the three ways a caller gets a response, a call the caller
/// gave up on, and one per [`HttpError`] variant, named after
/// [`HttpError::kind`] so that a metric, a log line and a gateway's error
/// body use the same word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallOutcome {
    /// `ok`: a response from the upstream (or, on a cached path, a stale
    /// entry revalidated by a `304` or served after an upstream failure;
    /// the cache's own families count those).
    Ok,
    /// `cache_hit`: a fresh cached response, without the upstream.
    CacheHit,
    /// `fallback`: the call failed and the caller's fallback answered.
    Fallback,
    /// `cancelled`: the caller stopped waiting (or the upstream arbiter
    /// stopped) before the call ended.
    Cancelled,
    /// `timeout`: [`HttpError::Timeout`].
    Timeout,
    /// `connect`: [`HttpError::Connect`].
    Connect,
    /// `status`: [`HttpError::Status`], an error status the caller got.
    Status,
    /// `breaker_open`: [`HttpError::BreakerOpen`].
    BreakerOpen,
    /// `rate_limited`: [`HttpError::RateLimited`].
    RateLimited,
    /// `overloaded`: [`HttpError::Overloaded`] (the bulkhead was full).
    Overloaded,
    /// `transport`: [`HttpError::Transport`].
    Transport,
    /// `decode`: [`HttpError::Decode`].
    Decode,
    /// `invalid_request`: [`HttpError::InvalidRequest`].
    InvalidRequest,
    /// `missing_secret`: [`HttpError::MissingSecret`].
    MissingSecret,
    /// `internal`: [`HttpError::Internal`].
    Internal,
}

impl CallOutcome {
    /// Every outcome, in the order [`CallStats`] keeps them.
    pub const ALL: [CallOutcome; 15] = [
        CallOutcome::Ok,
        CallOutcome::CacheHit,
        CallOutcome::Fallback,
        CallOutcome::Cancelled,
        CallOutcome::Timeout,
        CallOutcome::Connect,
        CallOutcome::Status,
        CallOutcome::BreakerOpen,
        CallOutcome::RateLimited,
        CallOutcome::Overloaded,
        CallOutcome::Transport,
        CallOutcome::Decode,
        CallOutcome::InvalidRequest,
        CallOutcome::MissingSecret,
        CallOutcome::Internal,
    ];

    /// The outcome of a call that failed with `e`.
    pub fn of_error(e: &HttpError) -> Self {
        // Exhaustive on purpose: a new error variant must choose its outcome.
        match e {
            HttpError::Timeout { .. } => CallOutcome::Timeout,
            HttpError::Connect { .. } => CallOutcome::Connect,
            HttpError::Status { .. } => CallOutcome::Status,
            HttpError::BreakerOpen { .. } => CallOutcome::BreakerOpen,
            HttpError::RateLimited { .. } => CallOutcome::RateLimited,
            HttpError::Overloaded { .. } => CallOutcome::Overloaded,
            HttpError::Transport { .. } => CallOutcome::Transport,
            HttpError::Decode { .. } => CallOutcome::Decode,
            HttpError::InvalidRequest { .. } => CallOutcome::InvalidRequest,
            HttpError::MissingSecret { .. } => CallOutcome::MissingSecret,
            HttpError::Internal { .. } => CallOutcome::Internal,
        }
    }

    /// The label value: `ok`, `cache_hit`, `fallback`, `cancelled`, or the
    /// error's [`HttpError::kind`].
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::CacheHit => "cache_hit",
            CallOutcome::Fallback => "fallback",
            CallOutcome::Cancelled => "cancelled",
            CallOutcome::Timeout => "timeout",
            CallOutcome::Connect => "connect",
            CallOutcome::Status => "status",
            CallOutcome::BreakerOpen => "breaker_open",
            CallOutcome::RateLimited => "rate_limited",
            CallOutcome::Overloaded => "overloaded",
            CallOutcome::Transport => "transport",
            CallOutcome::Decode => "decode",
            CallOutcome::InvalidRequest => "invalid_request",
            CallOutcome::MissingSecret => "missing_secret",
            CallOutcome::Internal => "internal",
        }
    }

    /// This outcome's place in [`CallOutcome::ALL`], which lists the
    /// variants in declaration order (a unit test checks it).
    fn index(self) -> usize {
        self as usize
    }
}

/// The `class` labels of `happynet_upstream_responses_total`: the five
/// standard status classes, and `other` for the codes 600–999 that HTTP
/// parsers accept but no standard defines.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// What one upstream's calls have done since it started: a snapshot from
/// [`Upstream::call_stats`]. Plain data; every count only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls per outcome, in the order of [`CallOutcome::ALL`].
    requests: [u64; CallOutcome::ALL.len()],
    /// Responses (of every attempt) per class, in the order of
    /// [`STATUS_CLASSES`].
    responses: [u64; STATUS_CLASSES.len()],
    /// How long whole calls took, from the caller's hand-off to the answer,
    /// every retry and wait included. Fresh cache hits and cancelled calls
    /// are not timed (see [`CallOutcome`]).
    pub latency: Histogram,
    /// Attempts after the first (each retry that was sent).
    pub retries: u64,
    /// Retries that the retry policy wanted and the retry budget refused.
    pub retry_budget_exhausted: u64,
}

impl CallStats {
    /// Calls that ended with `outcome`.
    pub fn requests(&self, outcome: CallOutcome) -> u64 {
        self.requests[outcome.index()]
    }

    /// Calls per outcome, every outcome included (zeros too).
    pub fn requests_by_outcome(&self) -> impl Iterator<Item = (CallOutcome, u64)> + '_ {
        CallOutcome::ALL.into_iter().zip(self.requests)
    }

    /// Responses per status class ([`STATUS_CLASSES`]), counting every
    /// attempt's response, retried ones included.
    pub fn responses_by_class(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        STATUS_CLASSES.into_iter().zip(self.responses)
    }

    /// Counts one attempt's response.
    pub(crate) fn responded(&mut self, status: StatusCode) {
        // `StatusCode` is 100..=999, so the class index is 0..=8.
        let class = usize::from(status.as_u16() / 100).saturating_sub(1);
        self.responses[class.min(STATUS_CLASSES.len() - 1)] += 1;
    }

    /// Counts one call's end; `took` is `None` for calls not timed.
    pub(crate) fn ended(&mut self, outcome: CallOutcome, took: Option<Duration>) {
        self.requests[outcome.index()] += 1;
        if let Some(took) = took {
            self.latency.observe(took);
        }
    }
}

/// One call being counted: [`finish`](Self::finish) counts its outcome and
/// duration; dropped unfinished, it counts the call as cancelled.
pub(super) struct CallRecord<'a> {
    pub(super) upstream: &'a Upstream,
    pub(super) started: Instant,
    pub(super) finished: bool,
}

impl CallRecord<'_> {
    pub(super) fn finish(mut self, outcome: CallOutcome) {
        self.finished = true;
        let took = self.started.elapsed();
        self.upstream.count(|s| s.ended(outcome, Some(took)));
    }
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.upstream
                .count(|s| s.ended(CallOutcome::Cancelled, None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Response;

    #[test]
    fn outcomes_are_listed_in_declaration_order_with_distinct_labels() {
        for (i, outcome) in CallOutcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
        let mut labels: Vec<&str> = CallOutcome::ALL.iter().map(|o| o.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), CallOutcome::ALL.len());
    }

    #[test]
    fn an_error_outcome_is_named_like_the_error_kind() {
        let up = || "up".to_owned();
        let errors = [
            HttpError::Timeout {
                upstream: up(),
                after: Duration::ZERO,
            },
            HttpError::Connect {
                upstream: up(),
                message: String::new(),
            },
            HttpError::Status {
                upstream: up(),
                status: StatusCode::BAD_GATEWAY,
                retry_after: None,
                response: Box::new(Response::new(StatusCode::BAD_GATEWAY, "")),
            },
            HttpError::BreakerOpen {
                upstream: up(),
                retry_after: Duration::ZERO,
            },
            HttpError::RateLimited {
                upstream: up(),
                retry_after: Duration::ZERO,
            },
            HttpError::Overloaded { upstream: up() },
            HttpError::Transport {
                upstream: up(),
                message: String::new(),
            },
            HttpError::Decode {
                upstream: up(),
                message: String::new(),
            },
            HttpError::InvalidRequest {
                reason: String::new(),
            },
            HttpError::MissingSecret {
                upstream: up(),
                variable: String::new(),
            },
            HttpError::Internal {
                upstream: up(),
                message: String::new(),
            },
        ];
        for e in &errors {
            assert_eq!(CallOutcome::of_error(e).as_str(), e.kind());
        }
    }

    #[test]
    fn responses_are_counted_by_status_class() {
        let mut stats = CallStats::default();
        for code in [100, 200, 299, 304, 404, 429, 503, 599, 600, 999] {
            stats.responded(StatusCode::from_u16(code).unwrap());
        }
        let classes: Vec<(&str, u64)> = stats.responses_by_class().collect();
        assert_eq!(
            classes,
            [
                ("1xx", 1),
                ("2xx", 2),
                ("3xx", 1),
                ("4xx", 2),
                ("5xx", 2),
                ("other", 2)
            ]
        );
    }

    #[test]
    fn only_timed_ends_reach_the_latency_histogram() {
        let mut stats = CallStats::default();
        stats.ended(CallOutcome::Ok, Some(Duration::from_millis(3)));
        stats.ended(CallOutcome::Status, Some(Duration::from_millis(30)));
        stats.ended(CallOutcome::CacheHit, None);
        stats.ended(CallOutcome::Cancelled, None);
        assert_eq!(stats.requests(CallOutcome::Ok), 1);
        assert_eq!(stats.requests(CallOutcome::Status), 1);
        assert_eq!(stats.requests(CallOutcome::CacheHit), 1);
        assert_eq!(stats.requests(CallOutcome::Cancelled), 1);
        assert_eq!(stats.requests(CallOutcome::Timeout), 0);
        let total: u64 = stats.requests_by_outcome().map(|(_, n)| n).sum();
        assert_eq!(total, 4);
        assert_eq!(stats.latency.count(), 2);
        assert!((stats.latency.sum_seconds() - 0.033).abs() < 1e-9);
    }
}
