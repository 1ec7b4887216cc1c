//! Calls from app code to upstream APIs: one upstream's resilience pipeline
//! (rate limiter → breaker → pool, with retries, an overall deadline and
//! fallbacks), and the clients that reach it.
//!
//! # In call order
//!
//! The files read in the order a call travels:
//!
//! 1. In [`client`], [`ApiClient`] (one configured
//!    `network.api_clients.<name>`) and [`HttpClient`] (any URL, one
//!    upstream per origin) hand out a [`RequestBuilder`]. In the same file
//!    the caller sets the builder's headers, body and policy, then `send`s
//!    it; what comes back is a [`Response`], or a [`StreamingResponse`]
//!    whose body is still arriving.
//! 2. In [`call`], [`Upstream::call`] is the call path. A fresh cache hit is
//!    answered on the caller's thread (the cache: lookup, single flight,
//!    revalidation, stale-if-error); anything else is handed off to the
//!    upstream's arbiter, beside its actors, and bounded by its deadline.
//! 3. In [`retry`], the pipeline runs once per attempt:
//!    - `RateLimiterActor`: a denial is waited out when the wait fits in the
//!      deadline (and the caller allows waiting), otherwise it is an error
//!      that says when to retry;
//!    - `BreakerActor`: an open breaker rejects at once (or yields the
//!      fallback);
//!    - `PoolActor`: one attempt, bounded by the per-attempt timeout and
//!      the deadline, whichever comes first;
//!    - the answer is judged once, by the pool's verdict
//!      (`happynet_actors::pool::Verdict`): its health goes back to the breaker (`do_send`, one per attempt,
//!      bounded by the bulkhead), and it decides whether to retry — only
//!      idempotent methods (or callers who opt in), only on connect errors
//!      and 429/502/503/504, only while the retry budget allows, waiting the
//!      jittered backoff or the upstream's `Retry-After` (never less, and
//!      never past the deadline).
//! 4. In [`stats`], every call is counted ([`CallStats`]: how it ended as a
//!    [`CallOutcome`], status classes, durations, retries).
//! 5. In [`auth`], the credential each request goes out with, kept out of
//!    files and logs; in [`error`], [`HttpError`]: why a call failed and
//!    whose fault it was (the audit table).
//! 6. In [`settings`], an upstream's settings are turned into its actors'
//!    configs, once; in [`registry`], `Upstreams`: every upstream of a `Network` and
//!    the arbiter their actors run on.
//!
//! Cancellation is a normal path. A caller that gives up drops its call's
//! future, and with it, through drop guards, everything the call held: the
//! breaker permit reports `Ignored` (a half-open probe slot comes back), the
//! pool aborts the request (its bulkhead slot and connection come back), a
//! rate-limit grant whose request was never sent is refunded, and a cached
//! call's single-flight place is given up — a leader's release of its
//! followers included.

pub mod auth;
pub mod call;
pub mod client;
pub mod error;
pub mod registry;
pub mod retry;
pub mod settings;
pub mod stats;

pub use auth::{Auth, Secret};
pub use call::{CacheStats, Upstream};
pub use client::{
    header_bytes, ApiClient, FallbackFn, FallbackResponse, GiveUpIf, HttpClient, Request,
    RequestBuilder, Response, StreamingResponse, MAX_RESPONSE_HEADER_BYTES,
};
pub use error::HttpError;
pub(crate) use registry::Upstreams;
pub use stats::{CallOutcome, CallStats, STATUS_CLASSES};
