//! `PoolActor`: one upstream API's connections, bulkhead and load balancer.
//!
//! The actor owns an `awc::Client`, which is `!Send`: it must be created on
//! the thread that uses it, so a pool is started on its own arbiter with
//! [`PoolActor::start_on`], and everyone else talks to it through [`Execute`]
//! messages. The awc connector keeps up to `max_connections` keep-alive
//! connections per endpoint.
//!
//! In front of the connections sits a bulkhead: at most `max_in_flight` calls
//! run at once and at most `max_queue` wait for a slot; the next caller gets
//! [`PoolError::Overloaded`] at once instead of queueing without bound, so a
//! slow upstream cannot absorb the application's memory or tasks.
//!
//! A caller that goes away (its request future is dropped: it hung up, or its
//! deadline fired) takes nothing with it. The pool answers through
//! [`PoolAnswer`], which notices the caller leave and tells the call, so:
//! - a call in flight is aborted at once: its bulkhead slot goes to the next
//!   queued call and its awc connection is closed, which gives the
//!   connector's slot back (a half-read HTTP/1.1 connection cannot be
//!   reused); the balancer hears of it as neither success nor failure
//!   ([`Balancer::on_cancel`]);
//! - a queued call is skipped when its turn comes, and a full queue drops
//!   such calls before it refuses a new one, so callers who left never cost
//!   a live caller its place;
//! - a rate-limit [`Grant`] travelling with the call is spent only when the
//!   request is sent; a call dropped before that refunds it.
//!
//! Queued calls whose deadline passed while they waited are answered with a
//! timeout without being sent.
//!
//! Each call goes to the endpoint the [`Balancer`] picks (round-robin or
//! power-of-two-choices on peak-EWMA latency) and its outcome feeds back into
//! the balancer's latency estimate and passive outlier ejection: what counts
//! against the endpoint is what [`Verdict`] calls a failure — a 5xx, or no
//! answer for a reason of the upstream's (a request awc could not even build
//! is [`PoolError::Invalid`], which blames no one), the same verdict the
//! breaker and the retry loop act on.
//!
//! Bodies are decoded (`Content-Encoding`) when [`Execute::decompress`] says
//! so, and passed through as the upstream encoded them otherwise.
//!
//! A streamed body whose reader stops taking chunks for longer than
//! [`ExecuteStream::write_timeout`] is abandoned: the upstream connection is
//! dropped, the slot freed, the reader told ([`StreamHead::ended`])
//! and [`PoolStats::stream_write_timeouts`] counts it.
//!
//! # The one verdict
//!
//! [`Verdict`] is the one answer to "did this attempt fail?": what an
//! upstream's answer to one attempt — a status, or a [`PoolError`] instead —
//! says about the upstream, for everyone who asks. It lives with the pool
//! because it judges the pool's answers.
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

use crate::backoff::Jitter;
use crate::balancer::{Balancer, EjectionConfig, EjectionConfigError, Strategy};
use crate::breaker::AttemptOutcome;
use crate::limiter::Grant;
use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Bytes;
use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The most connections one endpoint may keep, and the most calls the
/// bulkhead may run or queue. awc's connection limit is a semaphore, which
/// panics above 2^61 permits, and the pool's mailbox holds `max_in_flight +
/// max_queue`, whose channel arithmetic overflows (a panic) far below
/// `usize::MAX`; a million is far beyond what one process can hold open and
/// keeps the bound meaningful.
pub const MAX_CONNECTIONS: usize = 1 << 20;

/// How a pool is set up, resolved from `network.api_clients.<name>` or
/// `network.http` by the `happynet` crate. [`PoolConfig::validate`] is the
/// one judge of these settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The upstream's name, used in errors, logs and metrics.
    pub name: String,
    /// Base URLs of the endpoints (scheme, host, port and an optional path
    /// prefix, without a trailing slash); requests append their path.
    pub endpoints: Vec<String>,
    /// Connections kept per endpoint, 1 to [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// How long establishing a connection (including TLS) may take, above
    /// zero.
    pub connect_timeout: Duration,
    /// How long an idle keep-alive connection is kept.
    pub keep_alive: Duration,
    /// Calls running at once, 1 to [`MAX_CONNECTIONS`].
    pub max_in_flight: usize,
    /// Calls waiting for a slot, at most [`MAX_CONNECTIONS`]; beyond it
    /// callers get `Overloaded`.
    pub max_queue: usize,
    /// The largest response body read into memory, at least 1.
    pub max_response_bytes: usize,
    /// How endpoints are chosen.
    pub load_balancing: Strategy,
    /// When an endpoint is ejected for failing.
    pub ejection: EjectionConfig,
}

/// Why [`PoolConfig::validate`] refused a configuration: the first field
/// that is wrong. [`PoolConfigError::field`] names the field (an ejection
/// field as `ejection.<field>`), so that a configuration file can report the
/// error under its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolConfigError {
    /// `max_connections` is 0 or above [`MAX_CONNECTIONS`].
    MaxConnections(usize),
    /// `connect_timeout` is zero.
    ConnectTimeout,
    /// `max_response_bytes` is 0.
    MaxResponseBytes,
    /// `max_in_flight` is 0 or above [`MAX_CONNECTIONS`].
    MaxInFlight(usize),
    /// `max_queue` is above [`MAX_CONNECTIONS`].
    MaxQueue(usize),
    /// The ejection settings are wrong.
    Ejection(EjectionConfigError),
}

impl PoolConfigError {
    /// The [`PoolConfig`] field that is wrong.
    pub fn field(&self) -> &'static str {
        match self {
            PoolConfigError::MaxConnections(_) => "max_connections",
            PoolConfigError::ConnectTimeout => "connect_timeout",
            PoolConfigError::MaxResponseBytes => "max_response_bytes",
            PoolConfigError::MaxInFlight(_) => "max_in_flight",
            PoolConfigError::MaxQueue(_) => "max_queue",
            PoolConfigError::Ejection(e) => match e.field() {
                "consecutive_failures" => "ejection.consecutive_failures",
                "base_ejection" => "ejection.base_ejection",
                _ => "ejection.max_ejection",
            },
        }
    }

    /// What the field must be, without the field's name.
    pub fn requirement(&self) -> String {
        match self {
            PoolConfigError::MaxConnections(0) | PoolConfigError::MaxInFlight(0) => {
                "must be >= 1".to_owned()
            }
            PoolConfigError::MaxConnections(_)
            | PoolConfigError::MaxInFlight(_)
            | PoolConfigError::MaxQueue(_) => format!("must be <= {MAX_CONNECTIONS}"),
            PoolConfigError::ConnectTimeout => "must be > 0".to_owned(),
            PoolConfigError::MaxResponseBytes => "must be >= 1".to_owned(),
            PoolConfigError::Ejection(e) => e.requirement(),
        }
    }
}

impl fmt::Display for PoolConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for PoolConfigError {}

impl PoolConfig {
    /// Checks every field but the name and endpoints; the error names the
    /// first that is wrong.
    pub fn validate(&self) -> Result<(), PoolConfigError> {
        let count = |n: usize| (1..=MAX_CONNECTIONS).contains(&n);
        if !count(self.max_connections) {
            return Err(PoolConfigError::MaxConnections(self.max_connections));
        }
        if self.connect_timeout.is_zero() {
            return Err(PoolConfigError::ConnectTimeout);
        }
        if self.max_response_bytes == 0 {
            return Err(PoolConfigError::MaxResponseBytes);
        }
        if !count(self.max_in_flight) {
            return Err(PoolConfigError::MaxInFlight(self.max_in_flight));
        }
        if self.max_queue > MAX_CONNECTIONS {
            return Err(PoolConfigError::MaxQueue(self.max_queue));
        }
        self.ejection.validate().map_err(PoolConfigError::Ejection)
    }
}

/// One HTTP call for the pool to make.
///
/// Sent by `happynet::HttpClient` (once per attempt). The result is the whole
/// response, or why there is none. Dropping the request future (the caller
/// hung up) aborts the call, queued or in flight.
#[derive(Debug, Message)]
#[rtype(result = "Result<UpstreamResponse, PoolError>")]
pub struct Execute {
    /// The method.
    pub method: Method,
    /// The path and query, starting with `/`, appended to the endpoint's base URL.
    pub path_and_query: String,
    /// Request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The request body (empty for none).
    pub body: Bytes,
    /// When this attempt must be over, queueing included.
    pub deadline: Instant,
    /// Decode the response body as its `Content-Encoding` says (awc's
    /// default, which also sends awc's own `Accept-Encoding` when the
    /// request has none). False passes the encoded bytes through untouched
    /// and sends only the `Accept-Encoding` the request carries: for a proxy.
    pub decompress: bool,
    /// The rate-limit unit this attempt was granted, if any: spent when the
    /// request is sent, refunded if the call ends before that (its caller
    /// left the queue, the queue was full, the deadline passed).
    pub grant: Option<Grant>,
}

/// One HTTP call whose response body is streamed to the caller as it
/// arrives (server-sent events, large downloads).
///
/// Sent by `happynet`'s streaming calls. The result arrives with the
/// response head; the body follows through [`StreamHead::body`]. The
/// call keeps its bulkhead slot until the body ends or the receiver is
/// dropped. The channel is bounded: a consumer that stops reading stops the
/// pool reading from the upstream (TCP back-pressure), never a growing buffer.
#[derive(Debug, Message)]
#[rtype(result = "Result<StreamHead, PoolError>")]
pub struct ExecuteStream {
    /// The request, as for [`Execute`]; its deadline bounds the time to the
    /// response head.
    pub request: Execute,
    /// The longest wait for the next body chunk.
    pub idle_timeout: Duration,
    /// The longest wait for the reader to take a chunk once
    /// [`STREAM_CHUNK_BUFFER`] are waiting: past it the call is abandoned
    /// (see the module docs).
    pub write_timeout: Duration,
}

/// How many body chunks may wait between the pool and a streaming caller.
pub const STREAM_CHUNK_BUFFER: usize = 16;

/// A response head whose body is still arriving.
#[derive(Debug)]
pub struct StreamHead {
    /// The status code.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// Which endpoint answered.
    pub endpoint: usize,
    /// Time to the response head.
    pub latency: Duration,
    /// The body, chunk by chunk; an `Err` ends it.
    pub body: tokio::sync::mpsc::Receiver<Result<Bytes, PoolError>>,
    /// How the body ended, for a reader to check once `body` runs dry:
    /// `Ok(())` when everything was queued (the whole body, or the `Err`
    /// chunk that ended it); an `Err` when the pool had to give up without
    /// queueing one (the reader was not reading); nothing at all (the
    /// sender dropped) when the pool stopped. Only `Ok(())` means the body
    /// was not cut short without a word.
    pub ended: oneshot::Receiver<Result<(), PoolError>>,
}

/// A response read in full.
#[derive(Debug, Clone)]
pub struct UpstreamResponse {
    /// The status code.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// Which endpoint answered (index into the pool's endpoints).
    pub endpoint: usize,
    /// How long the call took, connection and body included.
    pub latency: Duration,
}

/// Why the pool could not produce a response.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// The bulkhead is full: `max_in_flight` calls running and `max_queue`
    /// waiting.
    Overloaded {
        /// The upstream.
        upstream: String,
    },
    /// No connection could be made to the endpoint.
    Connect {
        /// The upstream.
        upstream: String,
        /// The endpoint's base URL.
        endpoint: String,
        /// The connector's error.
        message: String,
    },
    /// The attempt's deadline passed (waiting in the queue, connecting,
    /// or waiting for the response).
    Timeout {
        /// The upstream.
        upstream: String,
        /// The endpoint's base URL, if the call had left the queue.
        endpoint: Option<String>,
    },
    /// The request failed after connecting (reset, malformed response, …).
    Transport {
        /// The upstream.
        upstream: String,
        /// The endpoint's base URL.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The response body was larger than `max_response_bytes`.
    BodyTooLarge {
        /// The upstream.
        upstream: String,
        /// The limit.
        limit: usize,
    },
    /// The pool has stopped.
    Closed {
        /// The upstream.
        upstream: String,
    },
    /// awc refused to build the request (a malformed URL or header, a body
    /// that failed): nothing was sent, and the endpoint is not to blame.
    Invalid {
        /// The upstream.
        upstream: String,
        /// What awc said.
        message: String,
    },
    /// A streamed body's reader took no chunk for the write timeout; the
    /// call was abandoned. The reader's doing, not the endpoint's.
    ReaderStalled {
        /// The upstream.
        upstream: String,
        /// The write timeout that passed.
        after: Duration,
    },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Overloaded { upstream } => {
                write!(f, "upstream {upstream}: overloaded (bulkhead full)")
            }
            PoolError::Connect {
                upstream,
                endpoint,
                message,
            } => write!(
                f,
                "upstream {upstream}: cannot connect to {endpoint}: {message}"
            ),
            PoolError::Timeout {
                upstream,
                endpoint: Some(endpoint),
            } => write!(f, "upstream {upstream}: {endpoint} timed out"),
            PoolError::Timeout {
                upstream,
                endpoint: None,
            } => write!(
                f,
                "upstream {upstream}: timed out waiting for a connection slot"
            ),
            PoolError::Transport {
                upstream,
                endpoint,
                message,
            } => write!(
                f,
                "upstream {upstream}: request to {endpoint} failed: {message}"
            ),
            PoolError::BodyTooLarge { upstream, limit } => {
                write!(f, "upstream {upstream}: response body over {limit} bytes")
            }
            PoolError::Closed { upstream } => write!(f, "upstream {upstream}: pool stopped"),
            PoolError::Invalid { upstream, message } => {
                write!(f, "upstream {upstream}: invalid request: {message}")
            }
            PoolError::ReaderStalled { upstream, after } => write!(
                f,
                "upstream {upstream}: the stream's reader took nothing for {after:?}; \
                 the stream was cut off"
            ),
        }
    }
}

impl std::error::Error for PoolError {}

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

/// One attempt's verdict; see the table in the module docs ("The one
/// verdict").
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

/// Asks for the pool's counters.
#[derive(Debug, Message)]
#[rtype(result = "PoolStats")]
pub struct GetPoolStats;

/// What a pool has done, for metrics and tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PoolStats {
    /// Calls running now.
    pub in_flight: usize,
    /// Calls waiting for a slot now.
    pub queued: usize,
    /// Calls refused because the bulkhead was full.
    pub rejected_overloaded: u64,
    /// Calls sent, per endpoint.
    pub sent_per_endpoint: Vec<u64>,
    /// Endpoint ejections so far.
    pub ejections: u64,
    /// Endpoints ejected now.
    pub ejected_now: usize,
    /// Streamed calls abandoned because their reader stopped taking chunks
    /// for the write timeout.
    pub stream_write_timeouts: u64,
    /// Calls in flight aborted because their caller went away.
    pub cancelled: u64,
    /// Queued calls dropped unsent because their caller went away.
    pub abandoned_in_queue: u64,
}

/// What a failed send means. awc reports a connection that closed before
/// any response as a connect error; the request may have reached the
/// upstream, so it is a transport failure (not retried as "never sent").
/// A request awc could not build (URL, header, body) never left: it is
/// [`PoolError::Invalid`], which blames no one upstream.
fn send_error(e: awc::error::SendRequestError, upstream: &str, endpoint: &str) -> PoolError {
    use awc::error::{ConnectError, SendRequestError};
    match e {
        e @ (SendRequestError::Url(_)
        | SendRequestError::Http(_)
        | SendRequestError::Body(_)
        | SendRequestError::TunnelNotSupported) => PoolError::Invalid {
            upstream: upstream.to_owned(),
            message: e.to_string(),
        },
        SendRequestError::Connect(ConnectError::Disconnected) => PoolError::Transport {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
            message: "connection closed before a response".into(),
        },
        SendRequestError::Connect(e) => PoolError::Connect {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        },
        e => PoolError::Transport {
            upstream: upstream.to_owned(),
            endpoint: endpoint.to_owned(),
            message: e.to_string(),
        },
    }
}

type Reply = oneshot::Sender<Result<UpstreamResponse, PoolError>>;
type StreamReply = oneshot::Sender<Result<StreamHead, PoolError>>;

/// A call waiting in, or leaving, the bulkhead queue.
enum Job {
    Whole(Execute, Reply),
    Stream(ExecuteStream, StreamReply),
}

impl Job {
    /// True once the caller has gone: its [`PoolAnswer`] dropped the
    /// receiving end.
    fn caller_gone(&self) -> bool {
        match self {
            Job::Whole(_, reply) => reply.is_closed(),
            Job::Stream(_, reply) => reply.is_closed(),
        }
    }
}

/// How a whole call in flight ended, as the pool books it.
enum Ended {
    /// The call has its result (a response or an error) for the caller.
    Answered {
        result: Result<UpstreamResponse, PoolError>,
        latency: Duration,
        reply: Reply,
    },
    /// The caller went away first; the request was dropped mid-way.
    Cancelled { elapsed: Duration },
}

/// The pool's answer to [`Execute`] and [`ExecuteStream`]: the call's result
/// once it has one, or at once for a refusal.
///
/// actix runs an ordinary `ResponseFuture` to completion whether or not
/// anyone still waits for it, so a call whose caller hung up would keep its
/// bulkhead slot and its connection until the upstream answered. This
/// answer watches the caller's side instead: when the caller drops its
/// request future, the answer drops the call's reply channel, and the call
/// (queued or in flight) sees that and ends.
pub struct PoolAnswer<T> {
    upstream: String,
    answer: Result<oneshot::Receiver<Result<T, PoolError>>, PoolError>,
}

impl<M, T> MessageResponse<PoolActor, M> for PoolAnswer<T>
where
    M: Message<Result = Result<T, PoolError>>,
    T: 'static,
{
    fn handle(self, ctx: &mut Context<PoolActor>, tx: Option<OneshotSender<M::Result>>) {
        let mut result = match self.answer {
            Ok(result) => result,
            Err(refused) => {
                if let Some(tx) = tx {
                    let _ = tx.send(Err(refused));
                }
                return;
            }
        };
        let upstream = self.upstream;
        let pool = ctx.address();
        actix::spawn(async move {
            let Some(mut tx) = tx else {
                // `do_send`: nobody waits, but the call was asked for; let it
                // run to its end.
                let _ = result.await;
                return;
            };
            let answer = tokio::select! {
                answer = &mut result => Some(answer),
                // Dropping `result` on the way out tells the call.
                () = tx.closed() => None,
            };
            match answer {
                Some(answer) => {
                    let _ = tx.send(answer.unwrap_or(Err(PoolError::Closed { upstream })));
                }
                None => {
                    // Dropping `result` tells the call: one in flight aborts
                    // itself; a queued one is removed now (CallerLeft), so
                    // that the queue counts live callers only.
                    drop(result);
                    pool.do_send(CallerLeft);
                }
            }
        });
    }
}

/// One upstream's connection pool, bulkhead and load balancer. See the module
/// docs.
pub struct PoolActor {
    config: PoolConfig,
    client: awc::Client,
    balancer: Balancer,
    jitter: Jitter,
    in_flight: usize,
    queue: VecDeque<Job>,
    stats: PoolStats,
}

impl PoolActor {
    /// Starts a pool on `arbiter` (the awc client is created there, since it
    /// cannot move between threads).
    pub fn start_on(arbiter: &actix::ArbiterHandle, config: PoolConfig) -> Addr<PoolActor> {
        PoolActor::start_in_arbiter(arbiter, move |_| PoolActor::new(config))
    }

    /// A pool with `config`. Must be called on the thread that will run it.
    pub fn new(config: PoolConfig) -> Self {
        let connector = awc::Connector::new()
            .limit(config.max_connections.max(1))
            .timeout(config.connect_timeout)
            .conn_keep_alive(config.keep_alive);
        let client = awc::Client::builder()
            .connector(connector)
            // The pool enforces the whole attempt's deadline itself.
            .disable_timeout()
            .disable_redirects()
            .finish();
        let n = config.endpoints.len();
        PoolActor {
            balancer: Balancer::new(n, config.load_balancing, config.ejection),
            jitter: Jitter::new(),
            client,
            in_flight: 0,
            queue: VecDeque::new(),
            stats: PoolStats {
                sent_per_endpoint: vec![0; n],
                ..PoolStats::default()
            },
            config,
        }
    }

    /// Picks an endpoint and builds the request, taking a bulkhead slot and
    /// spending the call's rate-limit grant; an error (for the caller) when
    /// the deadline has passed or there is no endpoint, in which case the
    /// grant is refunded.
    fn prepare(
        &mut self,
        msg: &mut Execute,
    ) -> Result<(usize, String, awc::ClientRequest), PoolError> {
        let upstream = self.config.name.clone();
        let now = Instant::now();
        if now >= msg.deadline {
            return Err(PoolError::Timeout {
                upstream,
                endpoint: None,
            });
        }
        let Some(idx) = self.balancer.pick(now.into_std(), &mut self.jitter) else {
            return Err(PoolError::Closed { upstream });
        };
        if let Some(grant) = msg.grant.take() {
            grant.spend();
        }
        self.balancer.on_start(idx);
        self.in_flight += 1;
        self.stats.sent_per_endpoint[idx] += 1;
        let endpoint = self.config.endpoints[idx].clone();
        let url = format!("{endpoint}{}", msg.path_and_query);
        let mut req = self.client.request(msg.method.clone(), url);
        if !msg.decompress {
            req = req.no_decompress();
        }
        for (name, value) in std::mem::take(&mut msg.headers) {
            req = req.append_header((name, value));
        }
        Ok((idx, endpoint, req))
    }

    /// Ends a call: frees its slot, feeds the balancer, starts a queued one.
    fn finish(&mut self, idx: usize, latency: Duration, healthy: bool, ctx: &mut Context<Self>) {
        self.in_flight -= 1;
        self.balancer
            .on_end(idx, Instant::now().into_std(), latency, healthy);
        self.launch_queued(ctx);
    }

    /// Ends a call whose caller went away: frees its slot, tells the
    /// balancer (which learns nothing of the endpoint's health from it),
    /// starts a queued one.
    fn cancelled(&mut self, idx: usize, elapsed: Duration, ctx: &mut Context<Self>) {
        self.in_flight -= 1;
        self.stats.cancelled += 1;
        self.balancer
            .on_cancel(idx, Instant::now().into_std(), elapsed);
        self.launch_queued(ctx);
    }

    fn launch(&mut self, job: Job, ctx: &mut Context<Self>) {
        match job {
            Job::Whole(msg, reply) => self.launch_whole(msg, reply, ctx),
            Job::Stream(msg, reply) => self.launch_stream(msg, reply, ctx),
        }
    }

    fn launch_whole(&mut self, mut msg: Execute, mut reply: Reply, ctx: &mut Context<Self>) {
        let (idx, endpoint, req) = match self.prepare(&mut msg) {
            Ok(prepared) => prepared,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let upstream = self.config.name.clone();
        let limit = self.config.max_response_bytes;
        let deadline = msg.deadline;
        let call = async move {
            let started = Instant::now();
            let attempt = tokio::time::timeout_at(deadline, async {
                let mut resp = match req.send_body(msg.body).await {
                    Ok(resp) => resp,
                    Err(e) => return Err(send_error(e, &upstream, &endpoint)),
                };
                let body = resp.body().limit(limit).await.map_err(|e| match e {
                    awc::error::PayloadError::Overflow => PoolError::BodyTooLarge {
                        upstream: upstream.clone(),
                        limit,
                    },
                    other => PoolError::Transport {
                        upstream: upstream.clone(),
                        endpoint: endpoint.clone(),
                        message: other.to_string(),
                    },
                })?;
                Ok(UpstreamResponse {
                    status: resp.status(),
                    headers: resp.headers().clone(),
                    body,
                    endpoint: idx,
                    latency: started.elapsed(),
                })
            });
            let result = tokio::select! {
                result = attempt => result.unwrap_or_else(|_| {
                    Err(PoolError::Timeout {
                        upstream: upstream.clone(),
                        endpoint: Some(endpoint.clone()),
                    })
                }),
                // The caller went away: dropping the request here closes its
                // connection and frees the slot now, not when the upstream
                // gets round to answering.
                () = reply.closed() => {
                    return Ended::Cancelled { elapsed: started.elapsed() };
                }
            };
            Ended::Answered {
                result,
                latency: started.elapsed(),
                reply,
            }
        };
        ctx.spawn(
            call.into_actor(self)
                .map(move |ended, pool, ctx| match ended {
                    Ended::Answered {
                        result,
                        latency,
                        reply,
                    } => {
                        let verdict = match &result {
                            Ok(resp) => Verdict::of_status(resp.status),
                            Err(e) => Verdict::of_error(e),
                        };
                        let healthy = !verdict.is_failure();
                        let _ = reply.send(result);
                        pool.finish(idx, latency, healthy, ctx);
                    }
                    Ended::Cancelled { elapsed } => pool.cancelled(idx, elapsed, ctx),
                }),
        );
    }

    fn launch_stream(
        &mut self,
        msg: ExecuteStream,
        mut reply: StreamReply,
        ctx: &mut Context<Self>,
    ) {
        let ExecuteStream {
            request: mut msg,
            idle_timeout,
            write_timeout,
        } = msg;
        let (idx, endpoint, req) = match self.prepare(&mut msg) {
            Ok(prepared) => prepared,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let upstream = self.config.name.clone();
        let limit = self.config.max_response_bytes;
        let deadline = msg.deadline;
        let call = async move {
            use futures::StreamExt;
            let started = Instant::now();
            let transport = |message: String| PoolError::Transport {
                upstream: upstream.clone(),
                endpoint: endpoint.clone(),
                message,
            };
            let head = tokio::select! {
                head = tokio::time::timeout_at(deadline, req.send_body(msg.body)) => head,
                // The caller went away before the head: as for whole calls.
                () = reply.closed() => return StreamEnded::Cancelled { elapsed: started.elapsed() },
            };
            let mut resp = match head {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => {
                    let e = send_error(e, &upstream, &endpoint);
                    let healthy = !Verdict::of_error(&e).is_failure();
                    let _ = reply.send(Err(e));
                    return StreamEnded::Done {
                        latency: started.elapsed(),
                        healthy,
                    };
                }
                Err(_) => {
                    let _ = reply.send(Err(PoolError::Timeout {
                        upstream: upstream.clone(),
                        endpoint: Some(endpoint.clone()),
                    }));
                    return StreamEnded::Done {
                        latency: started.elapsed(),
                        healthy: false,
                    };
                }
            };
            let latency = started.elapsed();
            let status = resp.status();
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNK_BUFFER);
            let (ended, ended_rx) = oneshot::channel();
            let head = StreamHead {
                status,
                headers: resp.headers().clone(),
                endpoint: idx,
                latency,
                body: rx,
                ended: ended_rx,
            };
            if reply.send(Ok(head)).is_err() {
                return StreamEnded::Cancelled { elapsed: latency };
            }
            let mut total = 0usize;
            let healthy = loop {
                let chunk = match tokio::time::timeout(idle_timeout, resp.next()).await {
                    Err(_) => Err(PoolError::Timeout {
                        upstream: upstream.clone(),
                        endpoint: Some(endpoint.clone()),
                    }),
                    Ok(None) => {
                        let _ = ended.send(Ok(()));
                        break !Verdict::of_status(status).is_failure();
                    }
                    Ok(Some(Err(e))) => Err(transport(e.to_string())),
                    Ok(Some(Ok(chunk))) => {
                        total += chunk.len();
                        if total > limit {
                            Err(PoolError::BodyTooLarge {
                                upstream: upstream.clone(),
                                limit,
                            })
                        } else {
                            Ok(chunk)
                        }
                    }
                };
                let failed = chunk.is_err();
                // A consumer that went away ends the call; a slow one holds
                // this send, and so the upstream, back — for the write
                // timeout at most. Then the call is abandoned: the response
                // (and its connection) dropped, the slot freed, and the
                // reader told through `ended`, since the queue is full.
                match tokio::time::timeout(write_timeout, tx.send(chunk)).await {
                    Ok(Ok(())) if !failed => {}
                    Ok(Ok(())) => {
                        let _ = ended.send(Ok(()));
                        break false;
                    }
                    Ok(Err(_)) => break !failed,
                    Err(_) => {
                        let _ = ended.send(Err(PoolError::ReaderStalled {
                            upstream: upstream.clone(),
                            after: write_timeout,
                        }));
                        return StreamEnded::Stalled { latency };
                    }
                }
            };
            StreamEnded::Done { latency, healthy }
        };
        ctx.spawn(
            call.into_actor(self)
                .map(move |ended, pool, ctx| match ended {
                    StreamEnded::Done { latency, healthy } => {
                        pool.finish(idx, latency, healthy, ctx)
                    }
                    StreamEnded::Cancelled { elapsed } => pool.cancelled(idx, elapsed, ctx),
                    StreamEnded::Stalled { latency } => {
                        pool.stats.stream_write_timeouts += 1;
                        log::debug!(
                            "upstream {}: a stream's reader stalled; call abandoned",
                            pool.config.name
                        );
                        pool.finish(idx, latency, true, ctx)
                    }
                }),
        );
    }

    /// Fills free slots from the queue, skipping callers that gave up (their
    /// grants are refunded as the jobs drop).
    fn launch_queued(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < self.config.max_in_flight {
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            if job.caller_gone() {
                self.stats.abandoned_in_queue += 1;
            } else {
                self.launch(job, ctx);
            }
        }
    }

    /// Drops queued calls whose caller has gone (their grants are refunded
    /// as they drop); returns how many. Run when a caller leaves and when
    /// the queue is full; each run costs at most `max_queue` checks.
    fn drop_abandoned(&mut self) -> usize {
        let before = self.queue.len();
        self.queue.retain(|job| !job.caller_gone());
        let dropped = before - self.queue.len();
        self.stats.abandoned_in_queue += dropped as u64;
        dropped
    }
}

/// Sent by a [`PoolAnswer`] whose caller went away, to the pool itself: drop
/// the queued calls nobody waits for. `do_send`: one per caller that leaves,
/// so bounded by the calls admitted.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct CallerLeft;

impl Handler<CallerLeft> for PoolActor {
    type Result = ();

    fn handle(&mut self, _: CallerLeft, _: &mut Self::Context) {
        // One scan of the queue per caller that leaves: at most `max_queue`
        // cheap checks (an atomic load each).
        if !self.queue.is_empty() {
            self.drop_abandoned();
        }
    }
}

/// How a streamed call ended, as the pool books it.
enum StreamEnded {
    /// The body ended, failed or was refused; the caller was answered.
    Done { latency: Duration, healthy: bool },
    /// The caller went away (before the head, or with the head unread).
    Cancelled { elapsed: Duration },
    /// The reader took nothing for the write timeout: the call was
    /// abandoned (the upstream itself was healthy).
    Stalled { latency: Duration },
}

impl Actor for PoolActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Callers use `send` (request/response), which waits for mailbox
        // room; the bulkhead below is the real bound, so the mailbox only
        // needs to absorb bursts.
        ctx.set_mailbox_capacity(self.config.max_in_flight + self.config.max_queue);
    }
}

impl PoolActor {
    /// Admits `job` through the bulkhead: run now, queue, or refuse. A full
    /// queue first drops the calls whose caller has gone.
    fn admit(&mut self, job: Job, ctx: &mut Context<Self>) -> Result<(), PoolError> {
        if self.in_flight < self.config.max_in_flight {
            self.launch(job, ctx);
            return Ok(());
        }
        if self.queue.len() >= self.config.max_queue {
            self.drop_abandoned();
        }
        if self.queue.len() < self.config.max_queue {
            self.queue.push_back(job);
            Ok(())
        } else {
            self.stats.rejected_overloaded += 1;
            log::debug!(
                "upstream {}: bulkhead full, call rejected",
                self.config.name
            );
            Err(PoolError::Overloaded {
                upstream: self.config.name.clone(),
            })
        }
    }

    /// Puts a job through the bulkhead; the answer relays its result, or
    /// `Overloaded` at once.
    fn submit<T: Send + 'static>(
        &mut self,
        job: impl FnOnce(oneshot::Sender<Result<T, PoolError>>) -> Job,
        ctx: &mut Context<Self>,
    ) -> PoolAnswer<T> {
        let (reply, result) = oneshot::channel();
        PoolAnswer {
            upstream: self.config.name.clone(),
            answer: self.admit(job(reply), ctx).map(|()| result),
        }
    }
}

impl Handler<Execute> for PoolActor {
    type Result = PoolAnswer<UpstreamResponse>;

    fn handle(&mut self, msg: Execute, ctx: &mut Self::Context) -> Self::Result {
        self.submit(|reply| Job::Whole(msg, reply), ctx)
    }
}

impl Handler<ExecuteStream> for PoolActor {
    type Result = PoolAnswer<StreamHead>;

    fn handle(&mut self, msg: ExecuteStream, ctx: &mut Self::Context) -> Self::Result {
        self.submit(|reply| Job::Stream(msg, reply), ctx)
    }
}

impl Handler<GetPoolStats> for PoolActor {
    type Result = MessageResult<GetPoolStats>;

    fn handle(&mut self, _: GetPoolStats, _: &mut Self::Context) -> Self::Result {
        let mut stats = self.stats.clone();
        stats.in_flight = self.in_flight;
        stats.queued = self.queue.len();
        stats.ejections = self.balancer.ejections();
        stats.ejected_now = self.balancer.ejected_count(Instant::now().into_std());
        MessageResult(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use awc::error::{ConnectError, InvalidUrl, SendRequestError};

    #[test]
    fn a_request_awc_cannot_build_blames_no_endpoint() {
        let invalid = [
            SendRequestError::Url(InvalidUrl::MissingHost),
            SendRequestError::Http(awc::error::HttpError::from(
                actix_web::http::uri::Uri::try_from("/a b").unwrap_err(),
            )),
            SendRequestError::TunnelNotSupported,
        ];
        for e in invalid {
            let mapped = send_error(e, "up", "http://127.0.0.1:1");
            assert!(matches!(mapped, PoolError::Invalid { .. }), "{mapped:?}");
            assert!(!Verdict::of_error(&mapped).is_failure());
        }
        // What the endpoint did (or the way to it) still counts.
        for e in [
            SendRequestError::Connect(ConnectError::Disconnected),
            SendRequestError::Connect(ConnectError::Timeout),
            SendRequestError::Send(std::io::Error::other("reset")),
        ] {
            assert!(Verdict::of_error(&send_error(e, "up", "x")).is_failure());
        }
        let stalled = PoolError::ReaderStalled {
            upstream: "up".into(),
            after: Duration::from_secs(1),
        };
        assert!(!Verdict::of_error(&stalled).is_failure());
    }
}

#[cfg(test)]
mod verdict_tests {
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
