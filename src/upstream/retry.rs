//! The retry pipeline: rate limiter → breaker → pool, once per attempt, with
//! backoff, `Retry-After`, a retry budget and the call's deadline.
//!
//! Each attempt's answer is judged once, by [`Verdict`] (the classifier the
//! pool's ejection uses too): its health goes to the breaker, and whether it
//! is worth another attempt goes to the loop, which adds the caller's policy
//! (only idempotent methods or callers who opt in, `give_up_if`) and the
//! limits (`retry_attempts`, the budget other calls share, the deadline).
//! Whole and streamed calls share the loop; a streamed call is retried only
//! before the first byte of a successful answer reaches the caller.

use super::call::{CallTime, Upstream};
use super::client::{
    drop_decoded_encoding, header_bytes, Request, Response, StreamingResponse,
    MAX_RESPONSE_HEADER_BYTES,
};
use super::error::HttpError;
use actix_web::http::header::{self, HeaderMap};
use actix_web::http::Method;
use happynet_actors::backoff::{parse_retry_after, Jitter, RetryDecision};
use happynet_actors::breaker::{AttemptOutcome, Permit};
use happynet_actors::cache::Validators;
use happynet_actors::limiter::{Grant, Reserve};
use happynet_actors::pool::Verdict;
use happynet_actors::pool::{Execute, ExecuteStream, PoolError};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

impl Upstream {
    /// A response head over [`MAX_RESPONSE_HEADER_BYTES`], as the attempt's
    /// error. The upstream's fault, whatever its status: a breaker failure
    /// (but not an ejection: the pool saw a good status).
    fn head_too_large(&self, headers: &HeaderMap) -> Option<HttpError> {
        let size = header_bytes(headers);
        (size > MAX_RESPONSE_HEADER_BYTES).then(|| HttpError::Transport {
            upstream: self.settings.name.clone(),
            message: format!(
                "response headers of {size} bytes, over the limit of {MAX_RESPONSE_HEADER_BYTES}"
            ),
        })
    }

    /// What a complete response means for the loop: done, worth retrying
    /// (its verdict says so and the caller's `give_up_if` does not), or final.
    fn judge(&self, req: &Request, resp: Response, verdict: Verdict) -> Attempt<Response> {
        if resp.status.as_u16() < 400 {
            return Attempt::Done(resp);
        }
        let retry_after = resp
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let retryable = verdict.retryable && !req.give_up_if.as_ref().is_some_and(|f| f(&resp));
        let error = HttpError::Status {
            upstream: self.settings.name.clone(),
            status: resp.status,
            retry_after,
            response: Box::new(resp),
        };
        if retryable {
            Attempt::Retry { error, retry_after }
        } else {
            Attempt::Fail(error)
        }
    }

    /// What a pool call that got no answer means for the loop.
    fn judge_error(e: PoolError, verdict: Verdict, time: CallTime) -> Attempt<Response> {
        let error = HttpError::from_pool(e, time.started);
        if verdict.retryable {
            Attempt::Retry {
                error,
                retry_after: None,
            }
        } else {
            Attempt::Fail(error)
        }
    }

    /// The retry loop shared by whole and streamed calls: limiter, breaker,
    /// one attempt (`attempt_once`), the outcome back to the breaker, and
    /// the decision to retry (the attempt's [`Verdict`], the caller's
    /// policy, the budget and the deadline). `attempt_once` gets the attempt's deadline, its
    /// number and its rate-limit grant (to hand to the pool, which spends it
    /// when the request is sent), and returns what the loop should do with
    /// the breaker's outcome.
    async fn pipeline<T, F, Fut>(
        &self,
        req: &Request,
        time: CallTime,
        mut attempt_once: F,
    ) -> Result<T, HttpError>
    where
        F: FnMut(Instant, u32, Grant) -> Fut,
        Fut: std::future::Future<Output = (Attempt<T>, AttemptOutcome)>,
    {
        let name = &self.settings.name;
        let deadline = time.deadline;
        let idempotent = req.retry_non_idempotent || is_idempotent(&req.method);
        let wait_for_limiter = req
            .wait_for_rate_limit
            .unwrap_or(self.settings.wait_for_rate_limit);
        let key = req.rate_limit_key.clone().unwrap_or_else(|| name.clone());
        let mut jitter = Jitter::new();
        if let Ok(mut budget) = self.budget.lock() {
            budget.deposit(Instant::now().into_std());
        }
        let mut attempt: u32 = 0;
        loop {
            // The limiter: wait out a denial only if it fits the deadline. A
            // denied caller holds nothing while it waits; the grant it gets
            // goes with the attempt and is refunded if the request is never
            // sent (breaker refusal, bulkhead, caller gone).
            let grant = loop {
                let verdict = self
                    .limiter
                    .send(Reserve { key: key.clone() })
                    .await
                    .map_err(|e| self.mailbox_error("rate limiter", e))?;
                match verdict {
                    Ok(grant) => break grant,
                    Err(limited) => {
                        let resume = Instant::now() + limited.retry_after;
                        if !wait_for_limiter || resume >= deadline {
                            return Err(HttpError::RateLimited {
                                upstream: name.clone(),
                                retry_after: limited.retry_after,
                            });
                        }
                        tokio::time::sleep_until(resume).await;
                    }
                }
            };

            // A permit dropped unreported (this future cancelled mid-attempt)
            // reports itself as ignored: no half-open probe slot is lost.
            let permit = match self
                .breaker
                .send(Permit)
                .await
                .map_err(|e| self.mailbox_error("breaker", e))?
            {
                Ok(permit) => permit,
                Err(open) => {
                    return Err(HttpError::BreakerOpen {
                        upstream: name.clone(),
                        retry_after: open.retry_after,
                    })
                }
            };

            let attempt_deadline = deadline.min(Instant::now() + self.settings.timeout);
            if attempt > 0 {
                self.count(|s| s.retries += 1);
            }
            let (judged, outcome) = attempt_once(attempt_deadline, attempt + 1, grant).await;
            permit.report(outcome);

            let (error, retry_after) = match judged {
                Attempt::Done(value) => return Ok(value),
                Attempt::Fail(error) => return Err(error),
                Attempt::Retry { error, retry_after } => (error, retry_after),
            };
            if !idempotent || attempt >= self.settings.retry_attempts {
                return Err(error);
            }
            // Plan first, withdraw second: a retry the deadline rules out
            // must not spend a token from the budget other calls share.
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait = match self
                .backoff
                .plan_retry(attempt, retry_after, remaining, jitter.unit())
            {
                RetryDecision::Wait(wait) => wait,
                RetryDecision::GiveUp(_) => return Err(error),
            };
            let within_budget = self
                .budget
                .lock()
                .map(|mut b| b.try_withdraw(Instant::now().into_std()))
                .unwrap_or(false);
            if !within_budget {
                self.count(|s| s.retry_budget_exhausted += 1);
                log::warn!("upstream {name}: retry budget exhausted, not retrying: {error}");
                return Err(error);
            }
            log::debug!(
                "upstream {name}: retry {} in {wait:?} after: {error}",
                attempt + 1
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// A whole call through the pipeline: each attempt is one [`Execute`],
    /// with the stale entry's `validators` when the cache revalidates.
    pub(super) async fn call_whole(
        &self,
        req: &Request,
        time: CallTime,
        validators: Option<&Validators>,
    ) -> Result<Response, HttpError> {
        let (path, mut headers) = self.outgoing(req)?;
        if let Some(v) = validators {
            let mut conditional = HeaderMap::new();
            v.apply_to(&mut conditional);
            headers.extend(conditional);
        }
        self.pipeline(req, time, |attempt_deadline, attempts, grant| {
            let execute = Execute {
                method: req.method.clone(),
                path_and_query: path.clone(),
                headers: headers.clone(),
                body: req.body.clone(),
                deadline: attempt_deadline,
                decompress: !req.keep_encoding,
                grant: Some(grant),
            };
            async move {
                let started = Instant::now();
                let result = self.pool.send(execute).await.unwrap_or_else(|_| {
                    Err(PoolError::Closed {
                        upstream: self.settings.name.clone(),
                    })
                });
                let elapsed = started.elapsed();
                match result {
                    Ok(mut resp) => {
                        self.count(|s| s.responded(resp.status));
                        if let Some(error) = self.head_too_large(&resp.headers) {
                            return (Attempt::Fail(error), AttemptOutcome::Failure { elapsed });
                        }
                        let verdict = Verdict::of_status(resp.status);
                        if !req.keep_encoding {
                            drop_decoded_encoding(&mut resp.headers);
                        }
                        let resp = Response::from_upstream(&self.settings.name, resp, attempts);
                        (self.judge(req, resp, verdict), verdict.outcome(elapsed))
                    }
                    Err(e) => {
                        let verdict = Verdict::of_error(&e);
                        let outcome = verdict.outcome(elapsed);
                        (Self::judge_error(e, verdict, time), outcome)
                    }
                }
            }
        })
        .await
    }

    /// A streamed call through the pipeline: each attempt is one
    /// [`ExecuteStream`]; an error status is read in full (the pool bounds
    /// it) and judged like any other.
    pub(super) async fn call_streamed(
        &self,
        req: &Request,
        time: CallTime,
    ) -> Result<StreamingResponse, HttpError> {
        let (path, headers) = self.outgoing(req)?;
        let name = self.settings.name.clone();
        self.pipeline(req, time, |attempt_deadline, attempts, grant| {
            let execute = ExecuteStream {
                request: Execute {
                    method: req.method.clone(),
                    path_and_query: path.clone(),
                    headers: headers.clone(),
                    body: req.body.clone(),
                    deadline: attempt_deadline,
                    decompress: !req.keep_encoding,
                    grant: Some(grant),
                },
                idle_timeout: self.settings.timeout,
                write_timeout: req.stream_write_timeout.unwrap_or(self.settings.timeout),
            };
            let name = name.clone();
            async move {
                let started = Instant::now();
                let result = self.pool.send(execute).await.unwrap_or_else(|_| {
                    Err(PoolError::Closed {
                        upstream: name.clone(),
                    })
                });
                let elapsed = started.elapsed();
                let mut head = match result {
                    Ok(head) => head,
                    Err(e) => {
                        let verdict = Verdict::of_error(&e);
                        let outcome = verdict.outcome(elapsed);
                        return (map_attempt(Self::judge_error(e, verdict, time)), outcome);
                    }
                };
                self.count(|s| s.responded(head.status));
                if let Some(error) = self.head_too_large(&head.headers) {
                    return (Attempt::Fail(error), AttemptOutcome::Failure { elapsed });
                }
                let verdict = Verdict::of_status(head.status);
                let outcome = verdict.outcome(elapsed);
                if !req.keep_encoding {
                    drop_decoded_encoding(&mut head.headers);
                }
                if head.status.as_u16() < 400 {
                    let streamed = StreamingResponse::new(head, name, attempts, time.started);
                    return (Attempt::Done(streamed), outcome);
                }
                // An error answer: read it whole (the pool bounds it) and
                // judge it like any other.
                let mut body = actix_web::web::BytesMut::new();
                while let Some(chunk) = head.body.recv().await {
                    match chunk {
                        Ok(c) => body.extend_from_slice(&c),
                        Err(e) => {
                            let error = HttpError::from_pool(e, time.started);
                            return (Attempt::Fail(error), outcome);
                        }
                    }
                }
                let resp = Response {
                    status: head.status,
                    headers: head.headers,
                    body: body.freeze(),
                    upstream: name,
                    attempts,
                    from_fallback: false,
                    from_cache: false,
                };
                (map_attempt(self.judge(req, resp, verdict)), outcome)
            }
        })
        .await
    }
}

/// What the loop does after one attempt.
enum Attempt<T> {
    /// Success: return it.
    Done(T),
    /// A failure worth retrying (if policy allows), with the upstream's
    /// requested wait.
    Retry {
        error: HttpError,
        retry_after: Option<Duration>,
    },
    /// A final failure.
    Fail(HttpError),
}

/// Re-types a judgement whose success case cannot occur (errors only).
fn map_attempt<T>(a: Attempt<Response>) -> Attempt<T> {
    match a {
        Attempt::Done(resp) => Attempt::Fail(HttpError::Status {
            upstream: resp.upstream.clone(),
            status: resp.status,
            retry_after: None,
            response: Box::new(resp),
        }),
        Attempt::Retry { error, retry_after } => Attempt::Retry { error, retry_after },
        Attempt::Fail(e) => Attempt::Fail(e),
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}
