//! A fake upstream HTTP server with fault injection, for tests, demos and
//! benchmarks.
//!
//! It speaks real HTTP (actix-web on a real socket), so a client under test
//! meets the same connection pool, timeouts and error paths it meets in
//! production. Faults come from two places:
//!
//! - server-wide [`Faults`], set at [`FakeUpstream::start`], replaced with
//!   [`FakeUpstream::set_faults`] or `POST /__fault` (a JSON `Faults`; absent
//!   fields take their defaults, unknown fields are refused);
//! - per-request headers, which override the server-wide plan for that one
//!   request: `x-fault-latency-ms: N`, `x-fault-status: S`,
//!   `x-fault-retry-after: V`, `x-fault-reset: 1`, `x-fault-hang: 1`.
//!
//! Each counted request goes through the same steps: count it, read its body
//! (at most [`BODY_LIMIT`]), choose its outcome, wait its latency, then answer.
//! A hang skips the latency and holds the request for [`HANG_LIMIT`]; at most
//! [`MAX_HANGING`] are held at once, and any hang beyond that is a reset.
//! The outcome is chosen in this order: a per-request `x-fault-hang`, then
//! `x-fault-reset`, then `x-fault-status`; if the request carries none of
//! those, the server-wide `fail_next`, then one roll of the dice split into
//! `hang_rate`, `reset_rate` and `error_rate`; otherwise `200`. The default
//! `200` is a JSON echo of the request (see [`serve_upstream`]).
//!
//! `GET /__stats` returns the counters ([`Stats`]) and `GET /__fault` the
//! current faults; the control routes are not counted. Every response carries
//! `x-upstream: <name>` so load-balancing tests can see who answered.
//!
//! Included by path from tests and example programs, so it depends only on
//! crates every includer already has; each includer uses a different subset
//! of it, hence the `allow`s.

#![allow(dead_code, unreachable_pub)]

use actix_web::dev::ServerHandle;
use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes};
use actix_web::{middleware, App, HttpRequest, HttpResponse, HttpServer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

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

/// Control route: `POST` replaces the server-wide faults, `GET` shows them.
pub const FAULT_PATH: &str = "/__fault";
/// Control route: `GET` returns the counters.
pub const STATS_PATH: &str = "/__stats";

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
    /// `"2"` or an HTTP date); none when `None`.
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
}

impl Faults {
    /// Checks that the plan can be carried out: rates are in 0..=1 and sum to
    /// at most 1 (they split one roll of the dice), `error_status` is 0 or
    /// 400..=599, `latency_ms` is at most [`HANG_LIMIT`], and `retry_after`
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
/// each is then counted once more under its outcome, unless it is still
/// reading its body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests received, faulted ones included, control routes excluded.
    pub requests: u64,
    /// Answered with the echo (status below 400).
    pub ok: u64,
    /// Answered with an injected error status (400 and above).
    pub error: u64,
    /// Connection aborted without a complete response.
    pub reset: u64,
    /// Held without an answer.
    pub hang: u64,
    /// Held without an answer right now: a gauge, not a count (at most
    /// [`MAX_HANGING`]).
    pub hanging: u64,
    /// Refused before any fault was chosen: a bad `x-fault-*` header (400),
    /// a body over [`BODY_LIMIT`] (413) or a body that failed to arrive.
    pub rejected: u64,
}

/// The shared state of one fake upstream: its name, its fault plan and its
/// counters. Handlers run on the server's worker thread while the test reads
/// counters from its own, hence atomics and a mutex.
pub struct FakeState {
    name: String,
    /// The plan and the dice together: both change on every roll.
    plan: Mutex<Planner>,
    requests: AtomicU64,
    ok: AtomicU64,
    error: AtomicU64,
    reset: AtomicU64,
    hang: AtomicU64,
    hanging: AtomicU64,
    rejected: AtomicU64,
}

impl FakeState {
    /// State for an upstream called `name`, with `faults` validated first.
    pub fn new(name: &str, faults: Faults) -> Result<FakeState, String> {
        faults.validate()?;
        Ok(FakeState {
            name: name.to_owned(),
            plan: Mutex::new(Planner {
                faults,
                rng: XorShift64::new(seed_for(name)),
            }),
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            error: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            hang: AtomicU64::new(0),
            hanging: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        })
    }

    /// The upstream's name, as sent in `x-upstream`.
    pub fn name(&self) -> &str {
        &self.name
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

    fn lock_plan(&self) -> MutexGuard<'_, Planner> {
        // The planner is a value with no invariant a panic could break
        // halfway, so a poisoned lock is still safe to use.
        self.plan.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Echo(_) => &self.ok,
            Outcome::Error(_) => &self.error,
            Outcome::Reset => &self.reset,
            Outcome::Hang => &self.hang,
        };
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Chooses what happens to one request: its overrides first, then the
    /// server-wide plan (see the module docs for the order).
    fn choose(&self, overrides: &Overrides) -> Choice {
        let mut planner = self.lock_plan();
        let faults = &planner.faults;
        let latency = Duration::from_millis(overrides.latency_ms.unwrap_or(faults.latency_ms));
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
        } else if let Some(status) = overrides.status {
            Outcome::for_status(status)
        } else {
            planner.roll()
        };
        Choice {
            latency,
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
        if faults.fail_next > 0 {
            faults.fail_next -= 1;
            return Outcome::Error(faults.error_status());
        }
        let (hang, reset, error) = (faults.hang_rate, faults.reset_rate, faults.error_rate);
        if hang + reset + error <= 0.0 {
            return Outcome::Echo(StatusCode::OK);
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
            Outcome::Echo(StatusCode::OK)
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
    /// The echo, with this status (below 400).
    Echo(StatusCode),
    /// An injected error with this status (400 and above).
    Error(StatusCode),
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
            Outcome::Echo(status)
        }
    }
}

/// The outcome of one request plus how it is delivered.
struct Choice {
    latency: Duration,
    outcome: Outcome,
    retry_after: Option<HeaderValue>,
}

/// The `x-fault-*` headers of one request.
#[derive(Debug, Default)]
struct Overrides {
    latency_ms: Option<u64>,
    status: Option<StatusCode>,
    retry_after: Option<HeaderValue>,
    reset: bool,
    hang: bool,
}

impl Overrides {
    /// Reads the overrides; a malformed one is the caller's mistake and is
    /// reported (the request is answered 400) rather than ignored, so a test
    /// with a typo fails loudly instead of silently testing nothing.
    fn from_headers(headers: &HeaderMap) -> Result<Overrides, String> {
        let latency_ms = match header_text(headers, FAULT_LATENCY_HEADER)? {
            None => None,
            Some(text) => {
                let ms: u64 = text.trim().parse().map_err(|_| {
                    format!("{FAULT_LATENCY_HEADER} {text:?} is not a whole number of milliseconds")
                })?;
                if u128::from(ms) > HANG_LIMIT.as_millis() {
                    return Err(format!(
                        "{FAULT_LATENCY_HEADER} {ms} is over the limit of {} ms",
                        HANG_LIMIT.as_millis()
                    ));
                }
                Some(ms)
            }
        };
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
            latency_ms,
            status,
            retry_after: headers.get(FAULT_RETRY_AFTER_HEADER).cloned(),
            reset: header_flag(headers, FAULT_RESET_HEADER)?,
            hang: header_flag(headers, FAULT_HANG_HEADER)?,
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

/// Every non-control request: see the module docs for the steps.
///
/// The default `200` body is
/// `{"upstream", "method", "path" (with query), "n" (this request's number,
/// from 1), "body_bytes", "headers" (those of ECHOED_HEADERS present)}`;
/// an injected error's body is `{"upstream", "error", "status", "n"}`.
async fn serve_upstream(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<FakeState>,
) -> HttpResponse {
    // Counted on arrival, so a test sees a hung or slow request at once.
    let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let overrides = match Overrides::from_headers(req.headers()) {
        Ok(overrides) => overrides,
        Err(why) => {
            state.rejected.fetch_add(1, Ordering::SeqCst);
            return HttpResponse::BadRequest()
                .json(json!({ "upstream": state.name, "error": why }));
        }
    };
    let body = match payload.to_bytes_limited(BODY_LIMIT).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            state.rejected.fetch_add(1, Ordering::SeqCst);
            return HttpResponse::BadRequest().json(
                json!({ "upstream": state.name, "error": format!("reading the body: {e}") }),
            );
        }
        Err(_) => {
            state.rejected.fetch_add(1, Ordering::SeqCst);
            return HttpResponse::PayloadTooLarge().json(json!({
                "upstream": state.name,
                "error": format!("body over {BODY_LIMIT} bytes"),
            }));
        }
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

    match outcome {
        Outcome::Echo(status) => {
            let headers: serde_json::Map<String, serde_json::Value> = ECHOED_HEADERS
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
            HttpResponse::build(status).json(json!({
                "upstream": state.name,
                "method": req.method().as_str(),
                "path": path,
                "n": n,
                "body_bytes": body.len(),
                "headers": headers,
            }))
        }
        Outcome::Error(status) => {
            let mut response = HttpResponse::build(status);
            if let Some(value) = choice.retry_after {
                response.insert_header((RETRY_AFTER, value));
            }
            response.json(json!({
                "upstream": state.name,
                "error": "injected fault",
                "status": status.as_u16(),
                "n": n,
            }))
        }
        Outcome::Reset => aborted_response(),
        Outcome::Hang => {
            // Runs to the limit even if the client gave up (see MAX_HANGING);
            // a forced stop drops it sooner.
            tokio::time::sleep(HANG_LIMIT).await;
            drop(hang_slot);
            aborted_response()
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

/// `GET /__stats`: `{"upstream", "requests", "ok", "error", "reset", "hang",
/// "hanging", "rejected"}`.
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
    /// Starts an upstream called `name` on `127.0.0.1:0` with one worker.
    /// Must be called inside an actix System (e.g. `#[actix_web::test]`):
    /// the server future is spawned onto it.
    ///
    /// Fails with `InvalidInput` if `faults` fail [`Faults::validate`] or
    /// `name` cannot be a header value.
    pub async fn start(name: &str, faults: Faults) -> io::Result<FakeUpstream> {
        FakeUpstream::start_on(name, faults, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// As [`FakeUpstream::start`], on a chosen address (port 0 picks one).
    pub async fn start_on(
        name: &str,
        faults: Faults,
        bind: SocketAddr,
    ) -> io::Result<FakeUpstream> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        let upstream_value = HeaderValue::from_str(name).map_err(|_| {
            invalid(format!(
                "upstream name {name:?} is not a valid header value"
            ))
        })?;
        let state = Arc::new(FakeState::new(name, faults).map_err(invalid)?);
        let data = web::Data::from(Arc::clone(&state));
        let upstream_header = HeaderName::from_static(UPSTREAM_HEADER);

        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(CONTROL_BODY_LIMIT))
                .wrap(
                    middleware::DefaultHeaders::new()
                        .add((upstream_header.clone(), upstream_value.clone())),
                )
                .route(FAULT_PATH, web::post().to(replace_faults))
                .route(FAULT_PATH, web::get().to(show_faults))
                .route(STATS_PATH, web::get().to(show_stats))
                .default_service(web::to(serve_upstream))
        })
        // One worker is plenty for a fake and keeps thread counts low when a
        // test starts several.
        .workers(1)
        // The includer owns signals: a test has none, the program handles
        // them itself.
        .disable_signals()
        .bind(bind)?;
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
