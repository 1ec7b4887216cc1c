//! A fake upstream HTTP server with fault injection, for tests, demos and
//! benchmarks: a JSON echo, an OpenAI-compatible API and cacheable resources.
//!
//! It speaks real HTTP (actix-web on a real socket), so a client under test
//! meets the same connection pool, timeouts and error paths it meets in
//! production.
//!
//! # Routes
//!
//! | Route                         | Answer when no fault is chosen            |
//! |-------------------------------|-------------------------------------------|
//! | `POST /v1/chat/completions`   | a chat completion, plain or streamed      |
//! | `GET /v1/models`              | the one model, [`FAKE_MODEL`]             |
//! | `GET`/`HEAD /cache/{id}`      | a versioned, cacheable resource           |
//! | anything else                 | a JSON echo of the request                |
//! | `POST /cache/{id}/bump`       | control: next version of that resource    |
//! | `GET`/`POST /__fault`         | control: show or replace the faults       |
//! | `GET /__stats`                | control: the counters ([`Stats`])         |
//!
//! Control routes are not counted and never faulted. Every response carries
//! `x-upstream: <name>` so load-balancing tests can see who answered.
//!
//! # Faults
//!
//! Faults come from two places:
//!
//! - server-wide [`Faults`], set at [`FakeUpstream::start`], replaced with
//!   [`FakeUpstream::set_faults`] or `POST /__fault` (a JSON `Faults`; absent
//!   fields take their defaults, unknown fields are refused);
//! - per-request headers, which override the server-wide plan for that one
//!   request: `x-fault-latency-ms: N`, `x-fault-status: S`,
//!   `x-fault-retry-after: V`, `x-fault-reset: 1`, `x-fault-hang: 1`,
//!   `x-fault-quota: 1`, `x-fault-header-bytes: N` (the answer carries an
//!   extra `x-fault-padding` header of N bytes, at most
//!   [`MAX_HEADER_PADDING`]) and, for streamed completions,
//!   `x-fault-chunk-delay-ms: N`.
//!
//! Each counted request goes through the same steps: count it, read its
//! `x-fault-*` headers, check its API key (`/v1/*` only, see below), read its
//! body (at most [`BODY_LIMIT`]), check what its route needs from it (a chat
//! request must parse), choose its outcome, wait its latency, then answer. A
//! refusal at any step before the choice is counted as `rejected`.
//! A hang skips the latency and holds the request for [`HANG_LIMIT`]; at most
//! [`MAX_HANGING`] are held at once, and any hang beyond that is a reset.
//!
//! The outcome is chosen in this order: a per-request `x-fault-hang`, then
//! `x-fault-reset`, then `x-fault-quota`, then `x-fault-status`; if the
//! request carries none of those, the server-wide `insufficient_quota`, then
//! `fail_next`, then one roll of the dice split into `hang_rate`,
//! `reset_rate` and `error_rate`; otherwise the route's normal answer.
//!
//! An injected error carries `Retry-After` when one is set. A quota fault is
//! a `429` *without* `Retry-After`: waiting does not bring quota back, so a
//! client must not retry it. Errors on `/v1/*` (refusals included) have
//! OpenAI's shape, `{"error":{"message","type","code"}}` (a `429` has type
//! `rate_limit_exceeded`, a quota fault `insufficient_quota`, other `5xx`
//! `server_error`, other `4xx` `invalid_request_error`); errors elsewhere
//! are `{"upstream","error","status","n"}` (see `serve_echo`).
//!
//! # The OpenAI-compatible API
//!
//! `POST /v1/chat/completions` takes the standard request (`model`,
//! `messages: [{role, content}]`, optional `temperature`, `max_tokens`,
//! `stream`, `stream_options.include_usage`; other fields are ignored) and
//! answers deterministically: the content is `"Echo: "` followed by the
//! last `user` message (see `ChatCall`), and token counts are word counts.
//! Any model name is accepted and echoed back. With `"stream": true` the
//! answer is `text/event-stream`: one `data: {chat.completion.chunk}` event
//! with the role, one per word of the content (the deltas concatenate to
//! exactly the plain content), one with `finish_reason` and an empty delta,
//! a usage chunk if `include_usage` was asked for, then `data: [DONE]`. Each
//! event is its own body chunk, the chunks `stream_chunk_delay_ms` apart.
//! With `stream_padding_bytes`, every event is preceded by an SSE comment
//! line (`: xxx…`) of that many bytes, which readers ignore: a long stream
//! for tests of slow readers, without a long prompt.
//!
//! # Compression
//!
//! With [`StartOptions::compress`] the whole app is wrapped in actix-web's
//! `middleware::Compress`: answers are encoded as the request's
//! `Accept-Encoding` asks (gzip, brotli, zstd, deflate), chunked, with
//! `Content-Encoding` and `Vary: accept-encoding` — a real third-party
//! encoder, as most production APIs have in front of them.
//!
//! If the server was started with an API key ([`FakeUpstream::start_with_key`]
//! or [`StartOptions::api_key`]), every request under `/v1/` must present it,
//! in any one of `Authorization: Bearer <key>`, `x-api-key: <key>` or the
//! query parameter `?api_key=<key>`; otherwise it is answered `401`
//! `invalid_api_key`. Without a key (`start`, `start_on`) nothing is
//! checked. Paths under `/v1/` other than the two above get the echo.
//!
//! # Cacheable resources
//!
//! `GET /cache/{id}` answers `{"id", "version"}` with `ETag: "v<version>"`,
//! a `Last-Modified` fixed per version, and `Cache-Control` from the query
//! parameter `cc` (percent-encoded, e.g. `?cc=no-cache`; default
//! [`DEFAULT_CACHE_CONTROL`]). It honours `If-None-Match` (weak comparison,
//! `*` included) and, when that is absent, `If-Modified-Since`: a current
//! copy gets `304` with no body and the same three headers. Every id starts
//! at version 1; `POST /cache/{id}/bump` moves one to the next version.
//! Only bumped ids take memory, at most [`MAX_CACHE_IDS`] of them.
//!
//! Started in-process by happynet's tests and benchmark programs, and run on
//! its own by `examples/fake_upstream.rs`.

use actix_web::dev::ServerHandle;
use actix_web::http::header::{
    HeaderMap, HeaderName, HeaderValue, HttpDate, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, ETAG,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RETRY_AFTER,
};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{middleware, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest a hung request is held before its connection is closed (and
/// the cap on any injected latency). Long enough that any client timeout
/// under test fires first; bounded so a forgotten hang cannot pin a socket
/// and a task for the life of a benchmark.
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

/// The most requests held hanging at once; a hang chosen beyond it becomes
/// a reset (counted as such). actix does not notice that a client gave up
/// while the handler is still waiting, so each hung request keeps its socket
/// (in CLOSE_WAIT) for the full [`HANG_LIMIT`]; at benchmark rates a small
/// `hang_rate` would otherwise run the process out of file descriptors.
pub const MAX_HANGING: u64 = 1024;

/// The largest request body read. A larger one is answered `413` and counted
/// as `rejected`: the fake must not be the thing that runs out of memory.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The largest `POST /__fault` body; a `Faults` is a few hundred bytes.
const CONTROL_BODY_LIMIT: usize = 16 * 1024;

/// The status of an injected error when `Faults::error_status` is 0.
pub const DEFAULT_ERROR_STATUS: u16 = 503;

/// The longest pause between two chunks of a streamed completion. A stream
/// has one chunk per word, so a long pause times a long message would hold
/// a connection for hours; tests need milliseconds.
pub const MAX_CHUNK_DELAY: Duration = Duration::from_secs(10);

/// Response header naming the upstream that answered.
pub const UPSTREAM_HEADER: &str = "x-upstream";

/// Per-request override of the latency, in milliseconds.
pub const FAULT_LATENCY_HEADER: &str = "x-fault-latency-ms";
/// Per-request override of the outcome: answer with this status.
pub const FAULT_STATUS_HEADER: &str = "x-fault-status";
/// Per-request override of the `Retry-After` sent with an error.
pub const FAULT_RETRY_AFTER_HEADER: &str = "x-fault-retry-after";
/// Per-request override of the outcome: `1` aborts the connection.
pub const FAULT_RESET_HEADER: &str = "x-fault-reset";
/// Per-request override of the outcome: `1` never answers (up to
/// [`HANG_LIMIT`]).
pub const FAULT_HANG_HEADER: &str = "x-fault-hang";
/// Per-request override of the outcome: `1` answers `429
/// insufficient_quota`, without `Retry-After`.
pub const FAULT_QUOTA_HEADER: &str = "x-fault-quota";
/// Per-request override of the pause between streamed chunks, in
/// milliseconds (at most [`MAX_CHUNK_DELAY`]).
pub const FAULT_CHUNK_DELAY_HEADER: &str = "x-fault-chunk-delay-ms";
/// Per-request: the answer carries a [`PADDING_HEADER`] of this many bytes
/// (at most [`MAX_HEADER_PADDING`]), for tests of response-header caps.
pub const FAULT_HEADER_BYTES_HEADER: &str = "x-fault-header-bytes";
/// The response header [`FAULT_HEADER_BYTES_HEADER`] asks for.
pub const PADDING_HEADER: &str = "x-fault-padding";
/// The largest [`PADDING_HEADER`]: above any proxy's header cap, below the
/// 128 KiB response head an HTTP client (awc, Node, Go) parses at all.
pub const MAX_HEADER_PADDING: usize = 120 * 1024;
/// The largest `stream_padding_bytes`: one comment line per event, kept
/// below the 1 MiB line limit of happynet's own SSE parser.
pub const MAX_STREAM_PADDING: u64 = 512 * 1024;

/// Control route: `POST` replaces the server-wide faults, `GET` shows them.
pub const FAULT_PATH: &str = "/__fault";
/// Control route: `GET` returns the counters.
pub const STATS_PATH: &str = "/__stats";

/// Requests under this path are the OpenAI-compatible API: they need the API
/// key (if one is set) and get errors in OpenAI's shape.
pub const API_PREFIX: &str = "/v1/";
/// `POST`: a chat completion, plain or streamed.
pub const CHAT_COMPLETIONS_PATH: &str = "/v1/chat/completions";
/// `GET`: the model list.
pub const MODELS_PATH: &str = "/v1/models";
/// The one model `GET /v1/models` lists (completions accept any name).
pub const FAKE_MODEL: &str = "fake-gpt";
/// Request header that may carry the API key instead of `Authorization`.
pub const API_KEY_HEADER: &str = "x-api-key";
/// Query parameter that may carry the API key instead of `Authorization`.
pub const API_KEY_QUERY: &str = "api_key";

/// `GET`/`HEAD`: a cacheable resource (route pattern).
pub const CACHE_PATH: &str = "/cache/{id}";
/// Control route, `POST`: moves a cacheable resource to its next version
/// (route pattern).
pub const CACHE_BUMP_PATH: &str = "/cache/{id}/bump";
/// Query parameter of `GET /cache/{id}` giving its `Cache-Control`.
pub const CACHE_CONTROL_QUERY: &str = "cc";
/// `Cache-Control` of a cacheable resource when the query gives none.
pub const DEFAULT_CACHE_CONTROL: &str = "max-age=60";
/// The most resource ids with a version of their own; a bump of a new id
/// beyond it is answered `503`. Ids never bumped take no memory.
pub const MAX_CACHE_IDS: usize = 100_000;
/// The longest id a bump accepts, in bytes, so that [`MAX_CACHE_IDS`] bounds
/// the memory and not only the count.
pub const MAX_CACHE_ID_BYTES: usize = 256;

/// Every cacheable resource starts at this version.
const FIRST_CACHE_VERSION: u64 = 1;
/// `Last-Modified` of version V is this many seconds after the Unix epoch
/// plus V times [`CACHE_VERSION_SPACING_SECS`]: fixed per version, later for
/// a later one, and whole seconds as HTTP dates are.
const CACHE_EPOCH_SECS: u64 = 1_700_000_000;
/// Seconds between the `Last-Modified` of two consecutive versions.
const CACHE_VERSION_SPACING_SECS: u64 = 3600;

/// What every completion's content starts with, before the last user message.
const ECHO_PREFIX: &str = "Echo: ";

/// OpenAI accepts a `temperature` in this range and refuses others.
const TEMPERATURE_RANGE: std::ops::RangeInclusive<f64> = 0.0..=2.0;

/// Request headers echoed back in the default `200`, so tests can check that
/// credentials and content types arrive intact.
const ECHOED_HEADERS: [&str; 4] = ["authorization", "x-api-key", "content-type", "x-request-id"];

/// Slack when checking that the rates sum to at most 1, so that e.g.
/// `0.1 + 0.2 + 0.7` (which is 1.0000000000000002 in f64) is accepted.
const RATE_SUM_EPSILON: f64 = 1e-9;

/// Used as the PRNG seed if the name hashes to 0, which xorshift cannot leave.
const FALLBACK_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

/// The server-wide fault plan. `Faults::default()` injects nothing.
#[derive(Clone, Default, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Delay before every answer, in milliseconds (at most [`HANG_LIMIT`]).
    pub latency_ms: u64,
    /// Fraction of requests, 0..=1, answered with `error_status`.
    pub error_rate: f64,
    /// Status of injected errors, 400..=599; 0 means
    /// [`DEFAULT_ERROR_STATUS`].
    pub error_status: u16,
    /// `Retry-After` value sent with every injected error response (e.g.
    /// `"2"` or an HTTP date); none when `None`. Never sent with a quota
    /// fault.
    pub retry_after: Option<String>,
    /// The next N requests fail with `error_status`, deterministically:
    /// for "retries succeed after transient 503s". Counts down as it fires.
    pub fail_next: u32,
    /// Fraction of requests, 0..=1, whose connection is aborted without a
    /// complete response.
    pub reset_rate: f64,
    /// Fraction of requests, 0..=1, never answered (the connection is closed
    /// after [`HANG_LIMIT`]; see also [`MAX_HANGING`]).
    pub hang_rate: f64,
    /// Every request is answered `429 insufficient_quota` without
    /// `Retry-After`, as OpenAI does for an account out of credit (before
    /// `fail_next` and the dice, which are left untouched).
    pub insufficient_quota: bool,
    /// Pause between the chunks of a streamed completion, in milliseconds
    /// (at most [`MAX_CHUNK_DELAY`]); 0 sends them back to back.
    pub stream_chunk_delay_ms: u64,
    /// Bytes of SSE comment sent before each event of a streamed completion
    /// (at most [`MAX_STREAM_PADDING`]); 0, the default, sends none.
    pub stream_padding_bytes: u64,
}

impl Faults {
    /// Checks that the plan can be carried out: rates are in 0..=1 and sum to
    /// at most 1 (they split one roll of the dice), `error_status` is 0 or
    /// 400..=599, `latency_ms` is at most [`HANG_LIMIT`],
    /// `stream_chunk_delay_ms` at most [`MAX_CHUNK_DELAY`],
    /// `stream_padding_bytes` at most [`MAX_STREAM_PADDING`], and `retry_after`
    /// is a valid header value. The message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        for (field, rate) in [
            ("error_rate", self.error_rate),
            ("reset_rate", self.reset_rate),
            ("hang_rate", self.hang_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{field} must be within 0..=1, got {rate}"));
            }
        }
        let sum = self.error_rate + self.reset_rate + self.hang_rate;
        if sum > 1.0 + RATE_SUM_EPSILON {
            return Err(format!(
                "error_rate + reset_rate + hang_rate must be at most 1, got {sum}"
            ));
        }
        if self.error_status != 0 && !(400..=599).contains(&self.error_status) {
            return Err(format!(
                "error_status must be 0 (meaning {DEFAULT_ERROR_STATUS}) or 400..=599, got {}",
                self.error_status
            ));
        }
        if u128::from(self.latency_ms) > HANG_LIMIT.as_millis() {
            return Err(format!(
                "latency_ms must be at most {} (the hang limit), got {}",
                HANG_LIMIT.as_millis(),
                self.latency_ms
            ));
        }
        if u128::from(self.stream_chunk_delay_ms) > MAX_CHUNK_DELAY.as_millis() {
            return Err(format!(
                "stream_chunk_delay_ms must be at most {}, got {}",
                MAX_CHUNK_DELAY.as_millis(),
                self.stream_chunk_delay_ms
            ));
        }
        if self.stream_padding_bytes > MAX_STREAM_PADDING {
            return Err(format!(
                "stream_padding_bytes must be at most {MAX_STREAM_PADDING}, got {}",
                self.stream_padding_bytes
            ));
        }
        if let Some(value) = &self.retry_after {
            if HeaderValue::from_str(value).is_err() {
                return Err(format!("retry_after {value:?} is not a valid header value"));
            }
        }
        Ok(())
    }

    /// The status injected errors are answered with.
    pub fn error_status(&self) -> StatusCode {
        let code = if self.error_status == 0 {
            DEFAULT_ERROR_STATUS
        } else {
            self.error_status
        };
        // Only an unvalidated plan can miss; answer like a broken upstream.
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

/// What reached the upstream, as counted by [`FakeState`] and returned by
/// `GET /__stats`. `requests` counts every non-control request on arrival;
/// each is then counted once more under its outcome (`ok`, `error`, `reset`,
/// `hang` or `rejected`), unless it is still on its way there. The
/// `chat_*` and `cache_*` counters break `ok` down further.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests received, faulted ones included, control routes excluded.
    pub requests: u64,
    /// Answered normally (status below 400): the echo, a completion, the
    /// model list or a cacheable resource (`304` included).
    pub ok: u64,
    /// Answered with an injected error status (400 and above), quota faults
    /// included.
    pub error: u64,
    /// Connection aborted without a complete response.
    pub reset: u64,
    /// Held without an answer.
    pub hang: u64,
    /// Held without an answer right now: a gauge, not a count (at most
    /// [`MAX_HANGING`]).
    pub hanging: u64,
    /// Refused before any fault was chosen: a bad `x-fault-*` header (400),
    /// a missing or wrong API key (401), a body over [`BODY_LIMIT`] (413), a
    /// body that failed to arrive, a malformed chat request or a bad
    /// `Cache-Control` query (400).
    pub rejected: u64,
    /// Chat completions answered, streamed ones included.
    pub chat_completions: u64,
    /// Of `chat_completions`, those answered as an event stream.
    pub chat_streams: u64,
    /// Cacheable resources answered in full (normally `200`).
    pub cache_200: u64,
    /// Cacheable resources answered `304 Not Modified`.
    pub cache_304: u64,
}

/// Why `POST /cache/{id}/bump` (or [`FakeState::bump_cache`]) refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BumpError {
    /// The id is longer than [`MAX_CACHE_ID_BYTES`].
    IdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// [`MAX_CACHE_IDS`] ids already have a version of their own.
    TableFull,
}

impl fmt::Display for BumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BumpError::IdTooLong { len } => write!(
                f,
                "cache id of {len} bytes is over the limit of {MAX_CACHE_ID_BYTES}"
            ),
            BumpError::TableFull => write!(
                f,
                "cache table is full ({MAX_CACHE_IDS} ids); no new id can be bumped"
            ),
        }
    }
}

impl std::error::Error for BumpError {}

/// The shared state of one fake upstream: its name, its API key, its fault
/// plan, its cacheable resources and its counters. Handlers run on the
/// server's worker thread while the test reads counters from its own, hence
/// atomics and mutexes.
pub struct FakeState {
    name: String,
    /// The key `/v1/*` requests must present; `None` checks nothing.
    api_key: Option<String>,
    /// The plan and the dice together: both change on every roll.
    plan: Mutex<Planner>,
    /// Versions of the cacheable resources that were bumped.
    cache: Mutex<CacheTable>,
    requests: AtomicU64,
    ok: AtomicU64,
    error: AtomicU64,
    reset: AtomicU64,
    hang: AtomicU64,
    hanging: AtomicU64,
    rejected: AtomicU64,
    chat_completions: AtomicU64,
    chat_streams: AtomicU64,
    cache_200: AtomicU64,
    cache_304: AtomicU64,
}

impl FakeState {
    /// State for an upstream called `name`, with `faults` validated first and
    /// no API key required.
    pub fn new(name: &str, faults: Faults) -> Result<FakeState, String> {
        FakeState::with_api_key(name, faults, None)
    }

    /// As [`FakeState::new`], requiring `api_key` (if `Some`) on `/v1/*`.
    /// The key must be non-empty visible ASCII without spaces, so that it
    /// fits in a header and after `Bearer `.
    pub fn with_api_key(
        name: &str,
        faults: Faults,
        api_key: Option<String>,
    ) -> Result<FakeState, String> {
        faults.validate()?;
        if let Some(key) = &api_key {
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("the API key must be non-empty visible ASCII without spaces".into());
            }
        }
        Ok(FakeState {
            name: name.to_owned(),
            api_key,
            plan: Mutex::new(Planner {
                faults,
                rng: XorShift64::new(seed_for(name)),
            }),
            cache: Mutex::new(CacheTable::new(MAX_CACHE_IDS)),
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            error: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            hang: AtomicU64::new(0),
            hanging: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            chat_completions: AtomicU64::new(0),
            chat_streams: AtomicU64::new(0),
            cache_200: AtomicU64::new(0),
            cache_304: AtomicU64::new(0),
        })
    }

    /// The upstream's name, as sent in `x-upstream`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The API key `/v1/*` requests must present, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// Requests received so far (see [`Stats::requests`]).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// A snapshot of the counters. Each counter is read on its own, so a
    /// snapshot taken while requests are in flight may be mid-update.
    pub fn stats(&self) -> Stats {
        Stats {
            requests: self.requests.load(Ordering::SeqCst),
            ok: self.ok.load(Ordering::SeqCst),
            error: self.error.load(Ordering::SeqCst),
            reset: self.reset.load(Ordering::SeqCst),
            hang: self.hang.load(Ordering::SeqCst),
            hanging: self.hanging.load(Ordering::SeqCst),
            rejected: self.rejected.load(Ordering::SeqCst),
            chat_completions: self.chat_completions.load(Ordering::SeqCst),
            chat_streams: self.chat_streams.load(Ordering::SeqCst),
            cache_200: self.cache_200.load(Ordering::SeqCst),
            cache_304: self.cache_304.load(Ordering::SeqCst),
        }
    }

    /// The current server-wide faults (`fail_next` shows what is left).
    pub fn faults(&self) -> Faults {
        self.lock_plan().faults.clone()
    }

    /// Replaces the server-wide faults, if they pass [`Faults::validate`].
    /// Requests already past choosing their outcome are not affected.
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        self.lock_plan().faults = faults;
        Ok(())
    }

    /// The current version of the cacheable resource `id` (1 until bumped).
    pub fn cache_version(&self, id: &str) -> u64 {
        self.lock_cache().version(id)
    }

    /// Moves the cacheable resource `id` to its next version and returns it,
    /// as `POST /cache/{id}/bump` does.
    pub fn bump_cache(&self, id: &str) -> Result<u64, BumpError> {
        self.lock_cache().bump(id)
    }

    fn lock_plan(&self) -> MutexGuard<'_, Planner> {
        // The planner is a value with no invariant a panic could break
        // halfway, so a poisoned lock is still safe to use.
        self.plan.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_cache(&self) -> MutexGuard<'_, CacheTable> {
        // As for the planner: one map insert cannot be left half done.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Normal(_) => &self.ok,
            Outcome::Error(_) | Outcome::Quota => &self.error,
            Outcome::Reset => &self.reset,
            Outcome::Hang => &self.hang,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the request presents the API key, in any of the accepted
    /// places; always true when no key is set.
    fn authorized(&self, req: &HttpRequest) -> bool {
        match &self.api_key {
            None => true,
            Some(expected) => presented_keys(req).iter().any(|key| key == expected),
        }
    }

    /// Counts a refusal and builds its response, in the shape of the path.
    fn reject(&self, shape: ErrorShape, status: StatusCode, why: &str) -> HttpResponse {
        self.rejected.fetch_add(1, Ordering::SeqCst);
        let body = match shape {
            ErrorShape::Plain => json!({ "upstream": self.name, "error": why }),
            ErrorShape::OpenAi => openai_error(why, "invalid_request_error", None),
        };
        HttpResponse::build(status).json(body)
    }

    /// Chooses what happens to one request: its overrides first, then the
    /// server-wide plan (see the module docs for the order).
    fn choose(&self, overrides: &Overrides) -> Choice {
        let mut planner = self.lock_plan();
        let faults = &planner.faults;
        let latency = Duration::from_millis(overrides.latency_ms.unwrap_or(faults.latency_ms));
        let chunk_delay = Duration::from_millis(
            overrides
                .chunk_delay_ms
                .unwrap_or(faults.stream_chunk_delay_ms),
        );
        // Validated to at most MAX_STREAM_PADDING, which fits a usize.
        let stream_padding = usize::try_from(faults.stream_padding_bytes).unwrap_or(0);
        // Validated on the way in; an unparsable value is dropped rather
        // than failing a request over it.
        let retry_after = overrides.retry_after.clone().or_else(|| {
            faults
                .retry_after
                .as_deref()
                .and_then(|v| HeaderValue::from_str(v).ok())
        });
        let outcome = if overrides.hang {
            Outcome::Hang
        } else if overrides.reset {
            Outcome::Reset
        } else if overrides.quota {
            Outcome::Quota
        } else if let Some(status) = overrides.status {
            Outcome::for_status(status)
        } else {
            planner.roll()
        };
        Choice {
            latency,
            chunk_delay,
            stream_padding,
            outcome,
            retry_after,
        }
    }
}

/// One of the [`MAX_HANGING`] places for a hung request, given back on drop
/// (including when a forced stop drops the handler).
struct HangSlot<'a>(&'a FakeState);

impl<'a> HangSlot<'a> {
    fn acquire(state: &'a FakeState) -> Option<HangSlot<'a>> {
        state
            .hanging
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held < MAX_HANGING).then_some(held + 1)
            })
            .ok()
            .map(|_| HangSlot(state))
    }
}

impl Drop for HangSlot<'_> {
    fn drop(&mut self) {
        self.0.hanging.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The server-wide faults and the dice they are rolled with.
struct Planner {
    faults: Faults,
    rng: XorShift64,
}

impl Planner {
    /// The server-wide outcome for one request without overrides.
    fn roll(&mut self) -> Outcome {
        let faults = &mut self.faults;
        // Out of quota is a state of the account, not a transient fault: it
        // wins over everything and spends nothing (fail_next keeps its count).
        if faults.insufficient_quota {
            return Outcome::Quota;
        }
        if faults.fail_next > 0 {
            faults.fail_next -= 1;
            return Outcome::Error(faults.error_status());
        }
        let (hang, reset, error) = (faults.hang_rate, faults.reset_rate, faults.error_rate);
        if hang + reset + error <= 0.0 {
            return Outcome::Normal(StatusCode::OK);
        }
        // One roll split into bands, so each rate is exactly the fraction of
        // requests that get that fault.
        let roll = self.rng.next_f64();
        if roll < hang {
            Outcome::Hang
        } else if roll < hang + reset {
            Outcome::Reset
        } else if roll < hang + reset + error {
            Outcome::Error(faults.error_status())
        } else {
            Outcome::Normal(StatusCode::OK)
        }
    }
}

/// A tiny xorshift64 PRNG: good enough to spread faults, and no dependency.
/// Seeded from the upstream's name so a run is reproducible.
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 { FALLBACK_SEED } else { seed })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `[0, 1)`: the top 53 bits, which an f64 holds exactly.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// FNV-1a of the name: a stable seed without a hashing crate.
fn seed_for(name: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0100_0000_01b3;
    name.bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// What one request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The route's normal answer, with this status (below 400).
    Normal(StatusCode),
    /// An injected error with this status (400 and above).
    Error(StatusCode),
    /// `429 insufficient_quota`, never with `Retry-After`.
    Quota,
    /// The connection is aborted without a complete response.
    Reset,
    /// No answer until [`HANG_LIMIT`], then the connection is closed.
    Hang,
}

impl Outcome {
    fn for_status(status: StatusCode) -> Outcome {
        if status.as_u16() >= 400 {
            Outcome::Error(status)
        } else {
            Outcome::Normal(status)
        }
    }
}

/// The outcome of one request plus how it is delivered.
struct Choice {
    latency: Duration,
    /// Pause between streamed chunks (streamed completions only).
    chunk_delay: Duration,
    /// SSE comment bytes before each streamed event.
    stream_padding: usize,
    outcome: Outcome,
    retry_after: Option<HeaderValue>,
}

/// The `x-fault-*` headers of one request.
#[derive(Debug, Default)]
struct Overrides {
    latency_ms: Option<u64>,
    status: Option<StatusCode>,
    retry_after: Option<HeaderValue>,
    chunk_delay_ms: Option<u64>,
    header_bytes: Option<usize>,
    reset: bool,
    hang: bool,
    quota: bool,
}

impl Overrides {
    /// Reads the overrides; a malformed one is the caller's mistake and is
    /// reported (the request is answered 400) rather than ignored, so a test
    /// with a typo fails loudly instead of silently testing nothing.
    fn from_headers(headers: &HeaderMap) -> Result<Overrides, String> {
        let status = match header_text(headers, FAULT_STATUS_HEADER)? {
            None => None,
            Some(text) => {
                let status = text
                    .trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|code| (200..=599).contains(code))
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .ok_or_else(|| {
                        format!("{FAULT_STATUS_HEADER} {text:?} is not a status in 200..=599")
                    })?;
                Some(status)
            }
        };
        Ok(Overrides {
            latency_ms: header_millis(headers, FAULT_LATENCY_HEADER, HANG_LIMIT)?,
            status,
            retry_after: headers.get(FAULT_RETRY_AFTER_HEADER).cloned(),
            chunk_delay_ms: header_millis(headers, FAULT_CHUNK_DELAY_HEADER, MAX_CHUNK_DELAY)?,
            header_bytes: header_size(headers, FAULT_HEADER_BYTES_HEADER, MAX_HEADER_PADDING)?,
            reset: header_flag(headers, FAULT_RESET_HEADER)?,
            hang: header_flag(headers, FAULT_HANG_HEADER)?,
            quota: header_flag(headers, FAULT_QUOTA_HEADER)?,
        })
    }
}

/// The header's value as text, if present.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, String> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| format!("{name} is not visible ASCII"))
        })
        .transpose()
}

/// A boolean header: `1`/`true` on, `0`/`false` (or absent) off.
fn header_flag(headers: &HeaderMap, name: &str) -> Result<bool, String> {
    match header_text(headers, name)?.map(str::trim) {
        None => Ok(false),
        Some("1") | Some("true") => Ok(true),
        Some("0") | Some("false") => Ok(false),
        Some(other) => Err(format!("{name} {other:?} is not 1 or 0")),
    }
}

/// A size header in bytes, at most `limit`.
fn header_size(headers: &HeaderMap, name: &str, limit: usize) -> Result<Option<usize>, String> {
    let Some(text) = header_text(headers, name)? else {
        return Ok(None);
    };
    let bytes: usize = text
        .trim()
        .parse()
        .map_err(|_| format!("{name} {text:?} is not a whole number of bytes"))?;
    if bytes > limit {
        return Err(format!("{name} {bytes} is over the limit of {limit} bytes"));
    }
    Ok(Some(bytes))
}

/// A duration header in whole milliseconds, at most `limit`.
fn header_millis(headers: &HeaderMap, name: &str, limit: Duration) -> Result<Option<u64>, String> {
    let Some(text) = header_text(headers, name)? else {
        return Ok(None);
    };
    let ms: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{name} {text:?} is not a whole number of milliseconds"))?;
    if u128::from(ms) > limit.as_millis() {
        return Err(format!(
            "{name} {ms} is over the limit of {} ms",
            limit.as_millis()
        ));
    }
    Ok(Some(ms))
}

/// Which normal answer a counted request gets: set by the route it arrived
/// on, so that every counted route shares one pipeline ([`serve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Echo,
    ChatCompletions,
    Models,
    Cache,
}

/// How error bodies look on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorShape {
    /// `{"upstream", "error", ...}`, as the echo has always answered.
    Plain,
    /// `{"error": {"message", "type", "code"}}`, as OpenAI answers: under
    /// [`API_PREFIX`].
    OpenAi,
}

impl ErrorShape {
    fn for_path(path: &str) -> ErrorShape {
        if path.starts_with(API_PREFIX) {
            ErrorShape::OpenAi
        } else {
            ErrorShape::Plain
        }
    }
}

/// A request's route, with what the route needed from the request checked
/// before any fault is chosen.
enum Prepared {
    Echo,
    Chat(ChatCall),
    Models,
    Cache {
        id: String,
        cache_control: HeaderValue,
    },
}

impl Prepared {
    /// Checks the request against its route; the error is the reason for a
    /// `400`.
    fn new(route: Route, req: &HttpRequest, body: &[u8]) -> Result<Prepared, String> {
        Ok(match route {
            Route::Echo => Prepared::Echo,
            Route::Models => Prepared::Models,
            Route::ChatCompletions => Prepared::Chat(ChatCall::parse(body)?),
            Route::Cache => {
                let id = req.match_info().get("id").unwrap_or_default().to_owned();
                let query = query_pairs(req.query_string())
                    .map_err(|e| format!("bad query string: {e}"))?;
                let text = query
                    .get(CACHE_CONTROL_QUERY)
                    .map_or(DEFAULT_CACHE_CONTROL, String::as_str);
                let cache_control = HeaderValue::from_str(text).map_err(|_| {
                    format!("{CACHE_CONTROL_QUERY} {text:?} is not a valid Cache-Control value")
                })?;
                Prepared::Cache { id, cache_control }
            }
        })
    }
}

/// `POST /v1/chat/completions`: see [`serve`].
async fn serve_chat(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<FakeState>,
) -> HttpResponse {
    serve(req, payload, state, Route::ChatCompletions).await
}

/// `GET /v1/models`: see [`serve`].
async fn serve_models(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<FakeState>,
) -> HttpResponse {
    serve(req, payload, state, Route::Models).await
}

/// `GET`/`HEAD /cache/{id}`: see [`serve`].
async fn serve_cache(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<FakeState>,
) -> HttpResponse {
    serve(req, payload, state, Route::Cache).await
}

/// Every other non-control request: see [`serve`].
///
/// The normal answer is `200` with
/// `{"upstream", "method", "path" (with query, as sent), "n" (this request's
/// number, from 1), "body_bytes", "headers" (those of ECHOED_HEADERS
/// present), "header_names" (every request header's name, sorted)}`;
/// an injected error's body is `{"upstream", "error", "status", "n"}`
/// (`"error"` is `"injected fault"`, or `"insufficient_quota"` for a quota
/// fault) outside `/v1/`.
async fn serve_echo(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<FakeState>,
) -> HttpResponse {
    serve(req, payload, state, Route::Echo).await
}

/// The pipeline of every counted request: see the module docs for the steps
/// and the order in which the outcome is chosen.
async fn serve(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<FakeState>,
    route: Route,
) -> HttpResponse {
    // Counted on arrival, so a test sees a hung or slow request at once.
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let shape = ErrorShape::for_path(req.path());
    let overrides = match Overrides::from_headers(req.headers()) {
        Ok(overrides) => overrides,
        Err(why) => return state.reject(shape, StatusCode::BAD_REQUEST, &why),
    };
    if shape == ErrorShape::OpenAi && !state.authorized(&req) {
        state.rejected.fetch_add(1, Ordering::SeqCst);
        return HttpResponse::Unauthorized().json(openai_error(
            "Incorrect API key provided",
            "invalid_request_error",
            Some("invalid_api_key"),
        ));
    }
    let body = match payload.to_bytes_limited(BODY_LIMIT).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            return state.reject(
                shape,
                StatusCode::BAD_REQUEST,
                &format!("reading the body: {e}"),
            )
        }
        Err(_) => {
            return state.reject(
                shape,
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body over {BODY_LIMIT} bytes"),
            )
        }
    };
    let prepared = match Prepared::new(route, &req, &body) {
        Ok(prepared) => prepared,
        Err(why) => return state.reject(shape, StatusCode::BAD_REQUEST, &why),
    };

    // Chosen (and counted) before the latency, so that `fail_next` fires in
    // arrival order and the counters show a request while it waits.
    let choice = state.choose(&overrides);
    let mut outcome = choice.outcome;
    let hang_slot = if outcome == Outcome::Hang {
        let slot = HangSlot::acquire(&state);
        if slot.is_none() {
            outcome = Outcome::Reset;
        }
        slot
    } else {
        None
    };
    state.count(&outcome);
    // A hang waits HANG_LIMIT and no more, latency or not.
    if !choice.latency.is_zero() && outcome != Outcome::Hang {
        tokio::time::sleep(choice.latency).await;
    }

    let mut response = match outcome {
        Outcome::Normal(status) => match prepared {
            Prepared::Echo => echo_response(&req, &state, status, n, body.len()),
            Prepared::Chat(call) => chat_response(
                &state,
                status,
                call,
                n,
                choice.chunk_delay,
                choice.stream_padding,
            ),
            Prepared::Models => HttpResponse::build(status).json(json!({
                "object": "list",
                "data": [{ "id": FAKE_MODEL, "object": "model", "owned_by": "fake" }],
            })),
            Prepared::Cache { id, cache_control } => {
                cache_response(&req, &state, status, &id, cache_control)
            }
        },
        Outcome::Error(status) => {
            let mut response = HttpResponse::build(status);
            if let Some(value) = choice.retry_after {
                response.insert_header((RETRY_AFTER, value));
            }
            response.json(match shape {
                ErrorShape::Plain => json!({
                    "upstream": state.name,
                    "error": "injected fault",
                    "status": status.as_u16(),
                    "n": n,
                }),
                ErrorShape::OpenAi => injected_openai_error(status),
            })
        }
        // Never a Retry-After: a client that waits and retries an account
        // out of credit only burns requests.
        Outcome::Quota => HttpResponse::TooManyRequests().json(match shape {
            ErrorShape::Plain => json!({
                "upstream": state.name,
                "error": "insufficient_quota",
                "status": StatusCode::TOO_MANY_REQUESTS.as_u16(),
                "n": n,
            }),
            ErrorShape::OpenAi => openai_error(
                "You exceeded your current quota",
                "insufficient_quota",
                Some("insufficient_quota"),
            ),
        }),
        Outcome::Reset => aborted_response(),
        Outcome::Hang => {
            // Runs to the limit even if the client gave up (see MAX_HANGING);
            // a forced stop drops it sooner.
            tokio::time::sleep(HANG_LIMIT).await;
            drop(hang_slot);
            aborted_response()
        }
    };
    if let Some(bytes) = overrides.header_bytes {
        // Visible ASCII, so always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&"p".repeat(bytes)) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(PADDING_HEADER), value);
        }
    }
    response
}

/// The echo: see [`serve_echo`].
fn echo_response(
    req: &HttpRequest,
    state: &FakeState,
    status: StatusCode,
    n: u64,
    body_bytes: usize,
) -> HttpResponse {
    let headers: serde_json::Map<String, Value> = ECHOED_HEADERS
        .iter()
        .filter_map(|name| {
            let value = req.headers().get(*name)?;
            let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            Some(((*name).to_owned(), text.into()))
        })
        .collect();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.path().to_owned(), |pq| pq.as_str().to_owned());
    let mut header_names: Vec<&str> = req.headers().keys().map(HeaderName::as_str).collect();
    header_names.sort_unstable();
    header_names.dedup();
    HttpResponse::build(status).json(json!({
        "upstream": state.name,
        "method": req.method().as_str(),
        "path": path,
        "n": n,
        "body_bytes": body_bytes,
        "headers": headers,
        "header_names": header_names,
    }))
}

/// The query string as a map (the last of a repeated name wins),
/// percent-decoded.
fn query_pairs(query: &str) -> Result<HashMap<String, String>, String> {
    web::Query::<HashMap<String, String>>::from_query(query)
        .map(web::Query::into_inner)
        .map_err(|e| e.to_string())
}

/// The keys a request presents: a `Bearer` token (the scheme in any case),
/// `x-api-key`, and the `api_key` query parameter. Any one that matches is
/// enough, so a client may use whichever scheme it is built for.
fn presented_keys(req: &HttpRequest) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(token) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
    {
        keys.push(token.to_owned());
    }
    if let Some(key) = req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        keys.push(key.trim().to_owned());
    }
    // A query that does not parse presents no key; the 401 says enough.
    if let Some(key) = query_pairs(req.query_string())
        .ok()
        .and_then(|mut q| q.remove(API_KEY_QUERY))
    {
        keys.push(key);
    }
    keys
}

/// OpenAI's error body.
fn openai_error(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({ "error": { "message": message, "type": kind, "code": code } })
}

/// OpenAI's error body for an injected error status.
fn injected_openai_error(status: StatusCode) -> Value {
    match status.as_u16() {
        401 => openai_error(
            "Incorrect API key provided",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        429 => openai_error(
            "Rate limit reached for requests (injected fault)",
            "rate_limit_exceeded",
            Some("rate_limit_exceeded"),
        ),
        500..=599 => openai_error(&format!("injected fault: {status}"), "server_error", None),
        _ => openai_error(
            &format!("injected fault: {status}"),
            "invalid_request_error",
            None,
        ),
    }
}

/// A chat completion request, checked: what the answer is built from.
///
/// The content is [`ECHO_PREFIX`] followed by the text of the last message
/// whose role is `user` (nothing if there is none). A message's `content`
/// may be a string, an array of content parts (the `text` of each `"type":
/// "text"` part, joined by single spaces) or null. Token counts are words
/// (runs of non-whitespace): `prompt_tokens` over every message,
/// `completion_tokens` over the content. If `max_tokens` is below the
/// content's words, the content is cut to that many words and
/// `finish_reason` is `"length"` instead of `"stop"`.
#[derive(Debug, Clone, PartialEq)]
struct ChatCall {
    model: String,
    prompt_tokens: u64,
    last_user: String,
    max_tokens: Option<u64>,
    stream: bool,
    include_usage: bool,
}

/// The request body as sent; [`ChatCall::parse`] checks it.
#[derive(Deserialize)]
struct ChatRequestBody {
    model: String,
    messages: Vec<ChatMessageBody>,
    temperature: Option<f64>,
    max_tokens: Option<u64>,
    stream: Option<bool>,
    stream_options: Option<StreamOptionsBody>,
}

#[derive(Deserialize)]
struct ChatMessageBody {
    role: String,
    content: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptionsBody {
    include_usage: Option<bool>,
}

impl ChatCall {
    /// Parses and checks a request body; the message says what is wrong,
    /// in the words OpenAI's `invalid_request_error` would use.
    fn parse(body: &[u8]) -> Result<ChatCall, String> {
        let request: ChatRequestBody = serde_json::from_slice(body)
            .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
        if request.messages.is_empty() {
            return Err("'messages' must contain at least one message".into());
        }
        if let Some(t) = request.temperature {
            if !TEMPERATURE_RANGE.contains(&t) {
                return Err(format!(
                    "'temperature' must be within {}..={}, got {t}",
                    TEMPERATURE_RANGE.start(),
                    TEMPERATURE_RANGE.end()
                ));
            }
        }
        if request.max_tokens == Some(0) {
            return Err("'max_tokens' must be at least 1".into());
        }
        let mut prompt_tokens = 0;
        let mut last_user = String::new();
        for (index, message) in request.messages.iter().enumerate() {
            let text = message_text(message.content.as_ref())
                .map_err(|why| format!("messages[{index}].content {why}"))?;
            prompt_tokens += word_count(&text);
            if message.role == "user" {
                last_user = text;
            }
        }
        Ok(ChatCall {
            model: request.model,
            prompt_tokens,
            last_user,
            max_tokens: request.max_tokens,
            stream: request.stream.unwrap_or(false),
            include_usage: request
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

/// The text of a message's `content` (see [`ChatCall`]).
fn message_text(content: Option<&Value>) -> Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter(|part| part["type"] == "text")
            .filter_map(|part| part["text"].as_str())
            .collect::<Vec<_>>()
            .join(" ")),
        Some(_) => Err("must be a string, an array of content parts or null".into()),
    }
}

/// Words, as the fake counts tokens.
fn word_count(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The length in bytes of the first piece of `text`: its leading
/// whitespace, one word and the whitespace after it. Pieces laid end to end
/// are the text again, and there is one per word.
fn piece_len(text: &str) -> usize {
    let mut seen_word = false;
    let mut after_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            after_word = seen_word;
        } else if after_word {
            return i;
        } else {
            seen_word = true;
        }
    }
    text.len()
}

/// One answered completion: everything both the JSON and the event stream
/// are made of.
#[derive(Debug, Clone, PartialEq)]
struct Completion {
    id: String,
    created: u64,
    model: String,
    content: String,
    finish_reason: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Completion {
    /// The answer to `call`, the `n`th request, at `created` (Unix seconds).
    fn new(call: &ChatCall, n: u64, created: u64) -> Completion {
        let mut content = format!("{ECHO_PREFIX}{}", call.last_user);
        let mut finish_reason = "stop";
        if let Some(max) = call.max_tokens {
            if word_count(&content) > max {
                let mut end = 0;
                for _ in 0..max {
                    end += piece_len(&content[end..]);
                }
                content.truncate(content[..end].trim_end().len());
                finish_reason = "length";
            }
        }
        Completion {
            id: format!("chatcmpl-fake-{n}"),
            created,
            model: call.model.clone(),
            completion_tokens: word_count(&content),
            content,
            finish_reason,
            prompt_tokens: call.prompt_tokens,
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }

    /// The `chat.completion` object.
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": self.content },
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage(),
        })
    }

    /// A `chat.completion.chunk` object with these choices (and usage).
    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }
}

/// The server-sent events of a streamed completion, made one at a time so
/// that a long message does not sit in memory as thousands of events.
struct StreamEvents {
    completion: Completion,
    include_usage: bool,
    step: StreamStep,
    /// How much of the content has been sent, in bytes.
    sent: usize,
}

/// Where a [`StreamEvents`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamStep {
    Role,
    Content,
    Finish,
    Usage,
    Done,
    End,
}

impl StreamEvents {
    fn new(completion: Completion, include_usage: bool) -> StreamEvents {
        StreamEvents {
            completion,
            include_usage,
            step: StreamStep::Role,
            sent: 0,
        }
    }

    fn delta(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        self.completion.chunk(
            json!([{ "index": 0, "delta": delta, "finish_reason": finish_reason }]),
            None,
        )
    }
}

impl Iterator for StreamEvents {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let data = match self.step {
            StreamStep::Role => {
                self.step = StreamStep::Content;
                self.delta(json!({ "role": "assistant", "content": "" }), None)
            }
            StreamStep::Content => {
                let rest = &self.completion.content[self.sent..];
                if rest.is_empty() {
                    self.step = StreamStep::Finish;
                    return self.next();
                }
                let piece = &rest[..piece_len(rest)];
                self.sent += piece.len();
                self.delta(json!({ "content": piece }), None)
            }
            StreamStep::Finish => {
                self.step = if self.include_usage {
                    StreamStep::Usage
                } else {
                    StreamStep::Done
                };
                self.delta(json!({}), Some(self.completion.finish_reason))
            }
            StreamStep::Usage => {
                self.step = StreamStep::Done;
                self.completion
                    .chunk(json!([]), Some(self.completion.usage()))
            }
            StreamStep::Done => {
                self.step = StreamStep::End;
                return Some(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            StreamStep::End => return None,
        };
        Some(Bytes::from(format!("data: {data}\n\n")))
    }
}

/// A completion, as JSON or as an event stream whose chunks are
/// `chunk_delay` apart, each event after `padding` bytes of SSE comment;
/// counted here, when it is answered.
fn chat_response(
    state: &FakeState,
    status: StatusCode,
    call: ChatCall,
    n: u64,
    chunk_delay: Duration,
    padding: usize,
) -> HttpResponse {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let completion = Completion::new(&call, n, created);
    state.chat_completions.fetch_add(1, Ordering::SeqCst);
    if !call.stream {
        return HttpResponse::build(status).json(completion.to_json());
    }
    state.chat_streams.fetch_add(1, Ordering::SeqCst);
    let events = StreamEvents::new(completion, call.include_usage).enumerate();
    // One comment line, shared by every event (a cheap clone).
    let comment = (padding > 0).then(|| {
        let mut line = Vec::with_capacity(padding + 3);
        line.extend_from_slice(b": ");
        line.resize(padding + 2, b'x');
        line.push(b'\n');
        Bytes::from(line)
    });
    let stream = futures::stream::iter(events).then(move |(i, event)| {
        let comment = comment.clone();
        async move {
            if i > 0 && !chunk_delay.is_zero() {
                tokio::time::sleep(chunk_delay).await;
            }
            Ok::<Bytes, io::Error>(match comment {
                Some(comment) => [comment, event].concat().into(),
                None => event,
            })
        }
    });
    HttpResponse::build(status)
        .insert_header((CONTENT_TYPE, "text/event-stream"))
        .insert_header((CACHE_CONTROL, "no-cache"))
        .streaming(stream)
}

/// The versions of the cacheable resources that were bumped; an id not in
/// the table is at [`FIRST_CACHE_VERSION`]. Plain data, no I/O.
#[derive(Debug)]
struct CacheTable {
    versions: HashMap<String, u64>,
    capacity: usize,
}

impl CacheTable {
    fn new(capacity: usize) -> CacheTable {
        CacheTable {
            versions: HashMap::new(),
            capacity,
        }
    }

    fn version(&self, id: &str) -> u64 {
        self.versions
            .get(id)
            .copied()
            .unwrap_or(FIRST_CACHE_VERSION)
    }

    /// Moves `id` to its next version; refuses an id too long to keep, or a
    /// new id when the table is full (a known id can always move on).
    fn bump(&mut self, id: &str) -> Result<u64, BumpError> {
        if id.len() > MAX_CACHE_ID_BYTES {
            return Err(BumpError::IdTooLong { len: id.len() });
        }
        if let Some(version) = self.versions.get_mut(id) {
            *version = version.saturating_add(1);
            return Ok(*version);
        }
        if self.versions.len() >= self.capacity {
            return Err(BumpError::TableFull);
        }
        let version = FIRST_CACHE_VERSION + 1;
        self.versions.insert(id.to_owned(), version);
        Ok(version)
    }
}

/// The `ETag` of a version.
fn cache_etag(version: u64) -> String {
    format!("\"v{version}\"")
}

/// The `Last-Modified` of a version (see [`CACHE_EPOCH_SECS`]).
fn cache_last_modified(version: u64) -> SystemTime {
    let secs = version
        .saturating_mul(CACHE_VERSION_SPACING_SECS)
        .saturating_add(CACHE_EPOCH_SECS);
    // Out of SystemTime's range only for absurd versions: stay at the epoch.
    UNIX_EPOCH
        .checked_add(Duration::from_secs(secs))
        .unwrap_or(UNIX_EPOCH + Duration::from_secs(CACHE_EPOCH_SECS))
}

/// Whether the client's copy is current, by RFC 9110 §13.1: `If-None-Match`
/// if present (weak comparison; `*` matches any), otherwise
/// `If-Modified-Since` if it is a valid date. An unreadable header counts as
/// absent.
fn client_copy_is_current(headers: &HeaderMap, etag: &str, last_modified: SystemTime) -> bool {
    if let Some(value) = headers.get(IF_NONE_MATCH) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        return text
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag);
    }
    headers
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|text| text.parse::<HttpDate>().ok())
        .is_some_and(|since| last_modified <= SystemTime::from(since))
}

/// A cacheable resource in full (with `status`), or `304` if the client's
/// copy is current; counted here.
fn cache_response(
    req: &HttpRequest,
    state: &FakeState,
    status: StatusCode,
    id: &str,
    cache_control: HeaderValue,
) -> HttpResponse {
    let version = state.cache_version(id);
    let etag = cache_etag(version);
    let last_modified = cache_last_modified(version);
    let current = client_copy_is_current(req.headers(), &etag, last_modified);
    let mut response = if current {
        state.cache_304.fetch_add(1, Ordering::SeqCst);
        HttpResponse::NotModified()
    } else {
        state.cache_200.fetch_add(1, Ordering::SeqCst);
        HttpResponse::build(status)
    };
    response
        .insert_header((ETAG, etag))
        .insert_header((LAST_MODIFIED, HttpDate::from(last_modified)))
        .insert_header((CACHE_CONTROL, cache_control));
    if current {
        response.finish()
    } else {
        response.json(json!({ "id": id, "version": version }))
    }
}

/// `POST /cache/{id}/bump`: `{"id", "version"}` with the new version; `400`
/// for an id over [`MAX_CACHE_ID_BYTES`], `503` when the table is full.
async fn bump_cache(id: web::Path<String>, state: web::Data<FakeState>) -> HttpResponse {
    match state.bump_cache(&id) {
        Ok(version) => HttpResponse::Ok().json(json!({ "id": *id, "version": version })),
        Err(e) => {
            let mut response = match e {
                BumpError::TableFull => HttpResponse::ServiceUnavailable(),
                BumpError::IdTooLong { .. } => HttpResponse::BadRequest(),
            };
            response.json(json!({ "upstream": state.name, "error": e.to_string() }))
        }
    }
}

/// A response that aborts the connection before any byte of it is sent.
///
/// actix-web has no "reset this connection" call. It encodes the status line
/// and headers into its write buffer, then polls the body in the same pass;
/// a body stream whose first item is an `Err` makes the dispatcher drop the
/// connection with that buffer unflushed. So the client sees the connection
/// close with no response at all (not a 200 with a short body), which is
/// what a crashed or reset upstream looks like.
fn aborted_response() -> HttpResponse {
    let failure = io::Error::new(
        io::ErrorKind::ConnectionReset,
        "fake_upstream: injected connection reset",
    );
    HttpResponse::Ok().streaming(futures::stream::once(futures::future::ready(Err::<
        Bytes,
        io::Error,
    >(failure))))
}

/// `POST /__fault`: replaces the server-wide faults with the JSON body.
async fn replace_faults(body: Bytes, state: web::Data<FakeState>) -> HttpResponse {
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(faults) => faults,
        Err(e) => {
            return HttpResponse::BadRequest()
                .json(json!({ "upstream": state.name, "error": format!("bad Faults JSON: {e}") }))
        }
    };
    match state.set_faults(faults.clone()) {
        Ok(()) => HttpResponse::Ok().json(faults),
        Err(why) => {
            HttpResponse::BadRequest().json(json!({ "upstream": state.name, "error": why }))
        }
    }
}

/// `GET /__fault`: the current server-wide faults.
async fn show_faults(state: web::Data<FakeState>) -> HttpResponse {
    HttpResponse::Ok().json(state.faults())
}

/// `GET /__stats`: `{"upstream"}` and every field of [`Stats`].
async fn show_stats(state: web::Data<FakeState>) -> HttpResponse {
    #[derive(Serialize)]
    struct Body<'a> {
        upstream: &'a str,
        #[serde(flatten)]
        stats: Stats,
    }
    HttpResponse::Ok().json(Body {
        upstream: &state.name,
        stats: state.stats(),
    })
}

/// How to start a fake upstream, beyond its name and faults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartOptions {
    /// Where to listen; port 0 picks one. Default `127.0.0.1:0`.
    pub bind: SocketAddr,
    /// The key every request under `/v1/` must present (as a `Bearer`
    /// token, `x-api-key` or `?api_key=`); `None`, the default, checks
    /// nothing.
    pub api_key: Option<String>,
    /// Encode answers as the request's `Accept-Encoding` asks, with
    /// actix-web's `middleware::Compress` (see the module docs). Default
    /// false: every answer is identity-encoded.
    pub compress: bool,
}

impl Default for StartOptions {
    fn default() -> StartOptions {
        StartOptions {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            api_key: None,
            compress: false,
        }
    }
}

/// A running fake upstream. Stopped by [`FakeUpstream::stop`], or without
/// waiting when dropped (so a test that panics does not leave it serving).
pub struct FakeUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its faults and counters, shared with the handlers.
    pub state: Arc<FakeState>,
    handle: ServerHandle,
}

impl FakeUpstream {
    /// Starts an upstream called `name` on `127.0.0.1:0` with one worker and
    /// no API key. Must be called inside an actix System (e.g.
    /// `#[actix_web::test]`): the server future is spawned onto it.
    ///
    /// Fails with `InvalidInput` if `faults` fail [`Faults::validate`] or
    /// `name` cannot be a header value.
    pub async fn start(name: &str, faults: Faults) -> io::Result<FakeUpstream> {
        FakeUpstream::start_with(name, faults, StartOptions::default()).await
    }

    /// As [`FakeUpstream::start`], on a chosen address (port 0 picks one).
    pub async fn start_on(
        name: &str,
        faults: Faults,
        bind: SocketAddr,
    ) -> io::Result<FakeUpstream> {
        let options = StartOptions {
            bind,
            ..StartOptions::default()
        };
        FakeUpstream::start_with(name, faults, options).await
    }

    /// As [`FakeUpstream::start`], requiring `key` (if `Some`) on every
    /// request under `/v1/`. Also fails with `InvalidInput` if the key is
    /// empty or not visible ASCII.
    pub async fn start_with_key(
        name: &str,
        faults: Faults,
        key: Option<String>,
    ) -> io::Result<FakeUpstream> {
        let options = StartOptions {
            api_key: key,
            ..StartOptions::default()
        };
        FakeUpstream::start_with(name, faults, options).await
    }

    /// As [`FakeUpstream::start`], with every option: the others call this.
    pub async fn start_with(
        name: &str,
        faults: Faults,
        options: StartOptions,
    ) -> io::Result<FakeUpstream> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let upstream_value = HeaderValue::from_str(name).map_err(|_| {
            invalid(format!(
                "upstream name {name:?} is not a valid header value"
            ))
        })?;
        let state =
            Arc::new(FakeState::with_api_key(name, faults, options.api_key).map_err(invalid)?);
        let data = web::Data::from(Arc::clone(&state));
        let upstream_header = HeaderName::from_static(UPSTREAM_HEADER);
        let compress = options.compress;

        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(CONTROL_BODY_LIMIT))
                .wrap(middleware::Condition::new(
                    compress,
                    middleware::Compress::default(),
                ))
                .wrap(
                    middleware::DefaultHeaders::new()
                        .add((upstream_header.clone(), upstream_value.clone())),
                )
                .route(FAULT_PATH, web::post().to(replace_faults))
                .route(FAULT_PATH, web::get().to(show_faults))
                .route(STATS_PATH, web::get().to(show_stats))
                .route(CACHE_BUMP_PATH, web::post().to(bump_cache))
                // Each counted route sends its other methods to the echo,
                // so that every non-control request is counted.
                .service(
                    web::resource(CHAT_COMPLETIONS_PATH)
                        .route(web::post().to(serve_chat))
                        .default_service(web::to(serve_echo)),
                )
                .service(
                    web::resource(MODELS_PATH)
                        .route(web::get().to(serve_models))
                        .default_service(web::to(serve_echo)),
                )
                .service(
                    web::resource(CACHE_PATH)
                        .route(web::get().to(serve_cache))
                        .route(web::head().to(serve_cache))
                        .default_service(web::to(serve_echo)),
                )
                .default_service(web::to(serve_echo))
        })
        // One worker is plenty for a fake and keeps thread counts low when a
        // test starts several.
        .workers(1)
        // The caller owns signals: a test has none, the program handles
        // them itself.
        .disable_signals()
        .bind(options.bind)?;
        let addr = server.addrs().first().copied().ok_or_else(|| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, "bound to no address")
        })?;
        let server = server.run();
        let handle = server.handle();
        actix_web::rt::spawn(async move {
            if let Err(e) = server.await {
                log::error!("fake upstream on {addr} failed: {e}");
            }
        });
        Ok(FakeUpstream {
            addr,
            state,
            handle,
        })
    }

    /// `http://127.0.0.1:PORT` followed by `path` (a leading `/` is added if
    /// missing).
    pub fn url(&self, path: &str) -> String {
        let slash = if path.starts_with('/') { "" } else { "/" };
        format!("http://{}{slash}{path}", self.addr)
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        self.state.name()
    }

    /// The API key `/v1/*` requests must present, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.state.api_key()
    }

    /// Requests received so far, faulted ones included, control routes
    /// excluded.
    pub fn requests(&self) -> u64 {
        self.state.requests()
    }

    /// A snapshot of all counters.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Replaces the server-wide faults.
    ///
    /// # Panics
    /// If `faults` fail [`Faults::validate`]: callers are tests and
    /// benchmarks, where a bad plan is a bug to surface at once. Validate
    /// first (or use [`FakeState::set_faults`]) for faults from user input.
    pub fn set_faults(&self, faults: Faults) {
        if let Err(why) = self.state.set_faults(faults) {
            panic!("fake upstream {}: invalid faults: {why}", self.state.name());
        }
    }

    /// The current version of the cacheable resource `id` (1 until bumped).
    pub fn cache_version(&self, id: &str) -> u64 {
        self.state.cache_version(id)
    }

    /// Moves the cacheable resource `id` to its next version and returns it,
    /// as `POST /cache/{id}/bump` does.
    ///
    /// # Panics
    /// If the bump is refused ([`BumpError`]): as for
    /// [`FakeUpstream::set_faults`], use [`FakeState::bump_cache`] to handle
    /// it.
    pub fn bump_cache(&self, id: &str) -> u64 {
        match self.state.bump_cache(id) {
            Ok(version) => version,
            Err(e) => panic!("fake upstream {}: {e}", self.state.name()),
        }
    }

    /// Stops the server at once, dropping requests in flight (a hung one
    /// would otherwise hold a graceful stop for [`HANG_LIMIT`]).
    pub async fn stop(self) {
        self.handle.stop(false).await;
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        // `stop` sends its command before the returned future is polled, so
        // dropping the future still stops the server (a no-op once stopped).
        drop(self.handle.stop(false));
    }
}

/// The plain parts, without a server (the server is exercised by happynet's
/// own tests, which are its clients).
#[cfg(test)]
mod tests {
    use super::*;

    fn call(body: Value) -> ChatCall {
        ChatCall::parse(body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn pieces_rebuild_the_text_with_one_piece_per_word() {
        for text in [
            "Echo: hello  world",
            "Echo: ",
            " a\tb\n c ",
            "x",
            "Echo: é ü",
        ] {
            let mut pieces = Vec::new();
            let mut rest = text;
            while !rest.is_empty() {
                let len = piece_len(rest);
                pieces.push(&rest[..len]);
                rest = &rest[len..];
            }
            assert_eq!(pieces.concat(), text);
            assert_eq!(pieces.len() as u64, word_count(text).max(1), "{text:?}");
        }
    }

    #[test]
    fn a_completion_echoes_the_last_user_message_and_counts_words() {
        let call = call(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": null},
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                                             {"type": "image_url"},
                                             {"type": "text", "text": "there"}]},
            ],
        }));
        let completion = Completion::new(&call, 7, 0);
        assert_eq!(completion.content, "Echo: hi there");
        assert_eq!(completion.finish_reason, "stop");
        assert_eq!(completion.prompt_tokens, 5);
        assert_eq!(completion.completion_tokens, 3);
        assert_eq!(completion.id, "chatcmpl-fake-7");
    }

    #[test]
    fn max_tokens_cuts_the_content_and_says_length() {
        let call = call(json!({"model": "m", "max_tokens": 2,
                               "messages": [{"role": "user", "content": "a b c"}]}));
        let completion = Completion::new(&call, 1, 0);
        assert_eq!(completion.content, "Echo: a");
        assert_eq!(completion.completion_tokens, 2);
        assert_eq!(completion.finish_reason, "length");
    }

    #[test]
    fn bad_chat_requests_are_refused() {
        for body in [
            json!({"messages": [{"role": "user", "content": "x"}]}),
            json!({"model": "m", "messages": []}),
            json!({"model": "m", "temperature": 3, "messages": [{"role": "user"}]}),
            json!({"model": "m", "max_tokens": 0, "messages": [{"role": "user"}]}),
            json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
        ] {
            assert!(
                ChatCall::parse(body.to_string().as_bytes()).is_err(),
                "{body}"
            );
        }
    }

    #[test]
    fn stream_events_come_in_order_and_rebuild_the_content() {
        let call = call(json!({"model": "m", "stream": true,
                               "stream_options": {"include_usage": true},
                               "messages": [{"role": "user", "content": "one two"}]}));
        let completion = Completion::new(&call, 1, 0);
        let content = completion.content.clone();
        let events: Vec<String> = StreamEvents::new(completion, call.include_usage)
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        assert_eq!(events.last().unwrap(), "data: [DONE]\n\n");
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap().trim_end()).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let deltas: String = chunks[1..chunks.len() - 2]
            .iter()
            .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, content);
        assert_eq!(chunks.len(), 1 + 3 + 1 + 1);
        let finish = &chunks[chunks.len() - 2];
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert_eq!(finish["choices"][0]["delta"], json!({}));
        assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 5);
    }

    #[test]
    fn the_cache_table_is_bounded_but_known_ids_still_move() {
        let mut table = CacheTable::new(2);
        assert_eq!(table.version("a"), 1);
        assert_eq!(table.bump("a"), Ok(2));
        assert_eq!(table.bump("b"), Ok(2));
        assert_eq!(table.bump("c"), Err(BumpError::TableFull));
        assert_eq!(table.bump("a"), Ok(3));
        assert_eq!(table.version("c"), 1);
        let long = "x".repeat(MAX_CACHE_ID_BYTES + 1);
        assert!(matches!(
            table.bump(&long),
            Err(BumpError::IdTooLong { .. })
        ));
    }

    #[test]
    fn conditional_headers_follow_rfc_9110() {
        let modified = cache_last_modified(2);
        let with = |pairs: &[(HeaderName, String)]| {
            let mut headers = HeaderMap::new();
            for (name, value) in pairs {
                headers.insert(name.clone(), HeaderValue::from_str(value).unwrap());
            }
            client_copy_is_current(&headers, &cache_etag(2), modified)
        };
        assert!(!with(&[]));
        assert!(with(&[(IF_NONE_MATCH, "\"v1\", W/\"v2\"".into())]));
        assert!(with(&[(IF_NONE_MATCH, "*".into())]));
        assert!(!with(&[(IF_NONE_MATCH, "\"v1\"".into())]));
        let same = HttpDate::from(modified).to_string();
        let before = HttpDate::from(cache_last_modified(1)).to_string();
        assert!(with(&[(IF_MODIFIED_SINCE, same.clone())]));
        assert!(!with(&[(IF_MODIFIED_SINCE, before)]));
        assert!(!with(&[(IF_MODIFIED_SINCE, "yesterday".into())]));
        // If-None-Match wins over If-Modified-Since.
        assert!(!with(&[
            (IF_NONE_MATCH, "\"v1\"".into()),
            (IF_MODIFIED_SINCE, same)
        ]));
    }

    #[test]
    fn new_faults_default_off_and_are_checked() {
        let faults: Faults = serde_json::from_str("{}").unwrap();
        assert!(!faults.insufficient_quota);
        assert_eq!(faults.stream_chunk_delay_ms, 0);
        assert!(serde_json::from_str::<Faults>(r#"{"quota":true}"#).is_err());
        let slow = Faults {
            stream_chunk_delay_ms: MAX_CHUNK_DELAY.as_millis() as u64 + 1,
            ..Faults::default()
        };
        assert!(slow.validate().is_err());
        let padded = Faults {
            stream_padding_bytes: MAX_STREAM_PADDING + 1,
            ..Faults::default()
        };
        assert!(padded.validate().is_err());
    }
}
