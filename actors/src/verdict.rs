//! The one answer to "did this attempt fail?": what an upstream's answer to
//! one attempt — a status, or a [`PoolError`] instead — says about the
//! upstream, for everyone who asks.
//!
//! Three parties act on an attempt, and they must agree on it, so they all
//! ask [`Verdict::of_status`] or [`Verdict::of_error`]:
//!
//! - the pool's balancer, which ejects an endpoint that keeps failing
//!   (`health == Failure`);
//! - the breaker, which opens on a failure rate ([`Verdict::outcome`]);
//! - the retry loop of the `happynet` crate (`retryable`), and, for a call
//!   that ended, its `/v1` gateway's choice to try the next client (which
//!   asks the same verdict of an error status).
//!
//! | answer | health | retryable |
//! |---|---|---|
//! | 5xx | failure | 502, 503, 504 |
//! | 429 | ignored (it says "slow down", not "unhealthy") | yes |
//! | any other status | success (the upstream judged the request) | no |
//! | [`PoolError::Connect`] | failure | yes (nothing was sent) |
//! | [`PoolError::Timeout`] after the call left the queue, [`PoolError::Transport`] | failure | no (the request may have arrived) |
//! | a timeout in the queue, [`PoolError::Overloaded`], [`PoolError::Invalid`], [`PoolError::BodyTooLarge`], [`PoolError::ReaderStalled`], [`PoolError::Closed`] | ignored (our own limits, or the caller's doing) | no |
//!
//! A verdict is about one attempt's answer only. What the caller asked for
//! (`give_up_if`, whether its method may be repeated) is the retry loop's
//! business, and a streamed body cut short after its head is the pool's
//! (it counts against the endpoint: the head said all was well).

use crate::breaker::AttemptOutcome;
use crate::pool::PoolError;
use actix_web::http::StatusCode;
use std::time::Duration;

/// What one attempt's answer says about the upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The upstream answered well.
    Success,
    /// The upstream (or the way to it) failed: it counts against the
    /// breaker and the endpoint.
    Failure,
    /// Says nothing about the upstream: back-pressure, our own limits, a
    /// request that could not be built, a 429.
    Ignored,
}

/// One attempt's verdict; see the module docs for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// What it says about the upstream.
    pub health: Health,
    /// Whether another attempt may do better (when the call may be repeated).
    pub retryable: bool,
}

impl Verdict {
    /// The verdict on an answer with `status`.
    pub fn of_status(status: StatusCode) -> Verdict {
        let health = if status.is_server_error() {
            Health::Failure
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Health::Ignored
        } else {
            Health::Success
        };
        Verdict {
            health,
            retryable: matches!(status.as_u16(), 429 | 502 | 503 | 504),
        }
    }

    /// The verdict on an attempt that got no answer, only `error`.
    pub fn of_error(error: &PoolError) -> Verdict {
        let health = match error {
            PoolError::Connect { .. }
            | PoolError::Timeout {
                endpoint: Some(_), ..
            }
            | PoolError::Transport { .. } => Health::Failure,
            _ => Health::Ignored,
        };
        Verdict {
            health,
            // Only a connection that was never made is safe to retry
            // whatever the method: nothing reached the upstream.
            retryable: matches!(error, PoolError::Connect { .. }),
        }
    }

    /// True when the attempt counts against the upstream (the breaker's
    /// failure, the balancer's ejection).
    pub fn is_failure(&self) -> bool {
        self.health == Health::Failure
    }

    /// The breaker's outcome for this attempt, which took `elapsed`.
    pub fn outcome(&self, elapsed: Duration) -> AttemptOutcome {
        match self.health {
            Health::Success => AttemptOutcome::Success { elapsed },
            Health::Failure => AttemptOutcome::Failure { elapsed },
            Health::Ignored => AttemptOutcome::Ignored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_judged_by_class() {
        let v = |code| Verdict::of_status(StatusCode::from_u16(code).expect("valid status"));
        assert_eq!(v(200).health, Health::Success);
        assert_eq!(v(404).health, Health::Success);
        assert_eq!(v(429).health, Health::Ignored);
        assert_eq!(v(500).health, Health::Failure);
        for retryable in [429, 502, 503, 504] {
            assert!(v(retryable).retryable, "{retryable}");
        }
        for final_status in [200, 400, 404, 500, 501] {
            assert!(!v(final_status).retryable, "{final_status}");
        }
    }

    #[test]
    fn only_the_way_to_the_upstream_failing_counts_against_it() {
        let up = || "up".to_owned();
        let failing = [
            PoolError::Connect {
                upstream: up(),
                endpoint: "e".into(),
                message: String::new(),
            },
            PoolError::Timeout {
                upstream: up(),
                endpoint: Some("e".into()),
            },
            PoolError::Transport {
                upstream: up(),
                endpoint: "e".into(),
                message: String::new(),
            },
        ];
        for e in &failing {
            assert!(Verdict::of_error(e).is_failure(), "{e:?}");
        }
        let neutral = [
            PoolError::Timeout {
                upstream: up(),
                endpoint: None,
            },
            PoolError::Overloaded { upstream: up() },
            PoolError::BodyTooLarge {
                upstream: up(),
                limit: 1,
            },
            PoolError::Closed { upstream: up() },
            PoolError::Invalid {
                upstream: up(),
                message: String::new(),
            },
            PoolError::ReaderStalled {
                upstream: up(),
                after: Duration::from_secs(1),
            },
        ];
        for e in &neutral {
            assert_eq!(Verdict::of_error(e).health, Health::Ignored, "{e:?}");
        }
        assert!(Verdict::of_error(&failing[0]).retryable);
        assert!(!Verdict::of_error(&failing[1]).retryable);
    }
}
