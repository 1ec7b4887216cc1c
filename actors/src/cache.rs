//! An HTTP response cache as a plain state machine: it decides what may be
//! stored, for how long, and what a lookup may serve; the caller does the I/O.
//!
//! One [`ResponseCache`] sits in front of one upstream. It is a *shared*
//! cache in the sense of RFC 9111 (one copy serves many of our callers), so it
//! refuses `private` responses, strips `Set-Cookie` and connection-specific
//! headers from what it keeps, and lets `s-maxage` win over `max-age`. The
//! caller drives it like this:
//!
//! ```text
//! key = CacheKey::for_request(&method, path_and_query, &[("accept", accept)])
//! match cache.lookup(&key, now) {
//!     Fresh(r)                   => serve r; no upstream call
//!     Stale { response, validators } =>
//!         send the request with validators.apply_to(&mut headers)
//!         304                    => cache.revalidated(&key, &headers_of_304, now)
//!                                   (None: the entry went meanwhile; refetch unconditionally)
//!         200                    => cache.store(key, response, now)
//!         error / 5xx / timeout  => cache.stale_on_error(&key, now), else the error
//!     Miss                       => send; on 200 cache.store(key, response, now)
//! }
//! ```
//!
//! Nothing here reads a clock or touches the network: every call takes `now`,
//! so tests step time by hand and the owner decides where time comes from.
//! The cache is bounded three ways — entries, total bytes and bytes per
//! entry — and evicts least-recently-used entries in O(log n): a `HashMap`
//! holds the entries and a `BTreeMap` orders them by a recency tick, so no
//! operation scans the table.
//!
//! What this module leaves to the caller, deliberately:
//! - **Keys.** Whatever the response varies on (an `Accept`, the caller's
//!   identity) must be in the [`CacheKey`]; a response's own `Vary` header is
//!   not checked against requests, except that `Vary: *` is never stored.
//! - **Invalidation.** A successful unsafe request (POST, PUT, DELETE) to a
//!   cached resource should be followed by [`ResponseCache::remove`].
//! - **Coalescing.** Two callers that miss at once both go upstream here;
//!   [`crate::single_flight::SingleFlight`] is the (equally plain) state
//!   machine that lets the async code make one call for them, and survive
//!   the leader's caller going away.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use actix_web::http::header::{
    HeaderMap, HeaderName, HeaderValue, HttpDate, AGE, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH,
    DATE, ETAG, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, SET_COOKIE, VARY,
};
use actix_web::http::{Method, StatusCode};
use actix_web::web::Bytes;
use serde::Serialize;

/// Default [`CacheConfig::max_entries`].
pub const DEFAULT_MAX_ENTRIES: usize = 1024;

/// Default [`CacheConfig::max_bytes`]: 8 MiB.
pub const DEFAULT_MAX_BYTES: usize = 8 * 1024 * 1024;

/// Default [`CacheConfig::default_ttl`]: zero. A response that says nothing
/// of its freshness is kept only to be revalidated (a conditional request,
/// answered by a cheap 304) and never served unasked: the cache never makes
/// an app see data the upstream did not say it may keep.
pub const DEFAULT_TTL: Duration = Duration::ZERO;

/// Default [`CacheConfig::stale_if_error`]: five minutes covers a typical
/// upstream restart or deploy.
pub const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(300);

/// Default [`CacheConfig::max_entry_bytes`]: 1 MiB, so that one large
/// response cannot flush dozens of small, hot ones.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// What an entry costs beyond its body, header names and values and key: the
/// hash-table slot, the recency-index node, the `HeaderMap`'s own table and
/// the allocations' headers. An estimate, deliberately on the high side, so
/// that a flood of tiny responses is bounded by `max_bytes` too and not only
/// by `max_entries`.
pub const ENTRY_OVERHEAD_BYTES: usize = 256;

/// The largest freshness lifetime, `Age` or `default_ttl` we honour, in
/// seconds: 2^31, as RFC 9111 §1.2.2 prescribes for delta-seconds too large
/// to represent. It also keeps `now + ttl` far from overflowing an `Instant`.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// Headers that describe one connection, not the response (RFC 9110 §7.6.1),
/// and so must not be stored (RFC 9111 §3.1). `Connection` itself and the
/// names it lists are removed too.
const CONNECTION_SPECIFIC: [&str; 5] = [
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The 64-bit FNV-1a offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The 64-bit FNV-1a prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// How a [`ResponseCache`] is bounded and how long it keeps things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// The most entries held at once. Default [`DEFAULT_MAX_ENTRIES`].
    pub max_entries: usize,
    /// The most bytes held at once, counted as bodies, header names and
    /// values, keys and [`ENTRY_OVERHEAD_BYTES`] per entry. Default
    /// [`DEFAULT_MAX_BYTES`].
    pub max_bytes: usize,
    /// How long a response without `max-age`, `s-maxage` or `Expires` stays
    /// fresh. Default [`DEFAULT_TTL`].
    pub default_ttl: Duration,
    /// How long past its expiry an entry may still be served when the
    /// upstream fails ([`ResponseCache::stale_on_error`]); zero turns that
    /// off. Default [`DEFAULT_STALE_IF_ERROR`].
    pub stale_if_error: Duration,
    /// Responses that would cost more than this (counted as for `max_bytes`)
    /// are not stored. Default [`DEFAULT_MAX_ENTRY_BYTES`].
    pub max_entry_bytes: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            default_ttl: DEFAULT_TTL,
            stale_if_error: DEFAULT_STALE_IF_ERROR,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
        }
    }
}

/// Why [`CacheConfig::validate`] (and so [`ResponseCache::new`]) refused a
/// configuration: the first field that is wrong. [`CacheConfigError::field`]
/// names it, so that a configuration file can report the error under its
/// own key.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheConfigError {
    /// `max_entries` is 0.
    MaxEntries,
    /// `max_bytes` is no more than [`ENTRY_OVERHEAD_BYTES`].
    MaxBytes(usize),
    /// `max_entry_bytes` is outside `ENTRY_OVERHEAD_BYTES + 1 ..= max_bytes`.
    MaxEntryBytes {
        /// The value given.
        got: usize,
        /// `max_bytes`.
        max_bytes: usize,
    },
    /// `default_ttl` is above [`MAX_DELTA_SECONDS`].
    DefaultTtl(Duration),
    /// `stale_if_error` is above [`MAX_DELTA_SECONDS`].
    StaleIfError(Duration),
}

impl CacheConfigError {
    /// The [`CacheConfig`] field that is wrong.
    pub fn field(&self) -> &'static str {
        match self {
            CacheConfigError::MaxEntries => "max_entries",
            CacheConfigError::MaxBytes(_) => "max_bytes",
            CacheConfigError::MaxEntryBytes { .. } => "max_entry_bytes",
            CacheConfigError::DefaultTtl(_) => "default_ttl",
            CacheConfigError::StaleIfError(_) => "stale_if_error",
        }
    }

    /// What the field must be, and what it was, without the field's name.
    pub fn requirement(&self) -> String {
        match self {
            CacheConfigError::MaxEntries => "must be >= 1, got 0".to_owned(),
            CacheConfigError::MaxBytes(got) => format!(
                "must be more than the per-entry overhead ({ENTRY_OVERHEAD_BYTES}), got {got}"
            ),
            CacheConfigError::MaxEntryBytes { got, max_bytes } => format!(
                "must be between {} and max_bytes ({max_bytes}), got {got}",
                ENTRY_OVERHEAD_BYTES + 1
            ),
            CacheConfigError::DefaultTtl(got) | CacheConfigError::StaleIfError(got) => {
                format!("must be at most {MAX_DELTA_SECONDS} s, got {got:?}")
            }
        }
    }
}

impl fmt::Display for CacheConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.field(), self.requirement())
    }
}

impl std::error::Error for CacheConfigError {}

impl CacheConfig {
    /// Checks every field; the error names the first field that is wrong and
    /// why, e.g. `"max_entry_bytes must be between 257 and max_bytes (4096), got 8192"`.
    /// This is the one check of a cache's settings: [`ResponseCache::new`]
    /// runs it, and so does happynet's configuration loader.
    pub fn validate(&self) -> Result<(), CacheConfigError> {
        if self.max_entries == 0 {
            return Err(CacheConfigError::MaxEntries);
        }
        if self.max_bytes <= ENTRY_OVERHEAD_BYTES {
            return Err(CacheConfigError::MaxBytes(self.max_bytes));
        }
        // An entry larger than `max_bytes` could never fit, and one no larger
        // than the overhead would have to be empty: both are typos.
        let smallest = ENTRY_OVERHEAD_BYTES + 1;
        if self.max_entry_bytes < smallest || self.max_entry_bytes > self.max_bytes {
            return Err(CacheConfigError::MaxEntryBytes {
                got: self.max_entry_bytes,
                max_bytes: self.max_bytes,
            });
        }
        let max = Duration::from_secs(MAX_DELTA_SECONDS);
        if self.default_ttl > max {
            return Err(CacheConfigError::DefaultTtl(self.default_ttl));
        }
        if self.stale_if_error > max {
            return Err(CacheConfigError::StaleIfError(self.stale_if_error));
        }
        Ok(())
    }
}

/// What a cached response is filed under.
///
/// Two requests get the same key exactly when one's response may answer the
/// other. The constructors encode every part with its length, so no choice of
/// path or vary values can make two different requests collide.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key of a request for `path_and_query` with `method`, varying on
    /// `vary`: `(name, value)` pairs of whatever the response depends on,
    /// such as `("accept", "application/json")` or `("identity", hash)`.
    ///
    /// Names are compared case-insensitively and the pairs' order does not
    /// matter (pairs with the same name keep theirs). Pass a *hash* of a
    /// credential, never the credential: keys live in memory for the life of
    /// the entry and may be logged.
    pub fn for_request(method: &Method, path_and_query: &str, vary: &[(&str, &str)]) -> Self {
        let mut key = String::with_capacity(method.as_str().len() + path_and_query.len() + 8);
        key.push_str(method.as_str());
        key.push(' ');
        push_len_prefixed(&mut key, path_and_query);
        CacheKey(key).varying(vary)
    }

    /// The key of a request whose response is determined by its body: an
    /// LLM completion for an identical prompt, a search for an identical
    /// query. The body is reduced to its length and a 64-bit FNV-1a hash.
    ///
    /// FNV-1a is fast but not collision-resistant: someone who controls
    /// bodies can craft two with the same key. Where the responses belong to
    /// different callers, add the caller's identity with [`CacheKey::varying`]
    /// so that a crafted collision can only ever return the crafter's own
    /// response.
    pub fn for_body(method: &Method, path: &str, body: &[u8]) -> Self {
        let mut key = String::with_capacity(method.as_str().len() + path.len() + 32);
        key.push_str(method.as_str());
        key.push(' ');
        push_len_prefixed(&mut key, path);
        // `#` cannot begin a vary segment (those begin with a length), so a
        // body key never equals a request key.
        key.push_str(" #");
        key.push_str(&body.len().to_string());
        key.push(':');
        key.push_str(&format!("{:016x}", fnv1a64(body)));
        CacheKey(key)
    }

    /// A key chosen entirely by the caller. It is used as given: the caller
    /// is responsible for it not colliding with other keys in the same cache.
    pub fn custom(key: impl Into<String>) -> Self {
        CacheKey(key.into())
    }

    /// This key, further varying on `vary` (see [`CacheKey::for_request`]).
    pub fn varying(mut self, vary: &[(&str, &str)]) -> Self {
        let mut pairs: Vec<(String, &str)> = vary
            .iter()
            .map(|(name, value)| (name.to_ascii_lowercase(), *value))
            .collect();
        // Stable, so that repeated names keep the caller's order, which may
        // matter (`Accept: a` then `Accept: b` is not `b` then `a`).
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, value) in pairs {
            self.0.push(' ');
            push_len_prefixed(&mut self.0, &name);
            self.0.push('=');
            push_len_prefixed(&mut self.0, value);
        }
        self
    }

    /// The key as a string, for logs.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Appends `s` as `<len>:<s>`, which makes the encoding unambiguous whatever
/// `s` contains.
fn push_len_prefixed(key: &mut String, s: &str) {
    key.push_str(&s.len().to_string());
    key.push(':');
    key.push_str(s);
}

/// The 64-bit FNV-1a hash: a byte at a time, no tables, no dependencies.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// A response as the cache keeps and returns it.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    /// The status; only `200 OK` is ever stored.
    pub status: StatusCode,
    /// The headers, less connection-specific ones and `Set-Cookie`.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
}

/// The validators of a stored response: what to send upstream to ask
/// "has this changed?" instead of fetching it again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    /// The response's `ETag`, to send as `If-None-Match`.
    pub etag: Option<HeaderValue>,
    /// The response's `Last-Modified`, to send as `If-Modified-Since`.
    pub last_modified: Option<HeaderValue>,
}

impl Validators {
    /// The validators found in `headers`.
    pub fn of(headers: &HeaderMap) -> Self {
        Validators {
            etag: headers.get(ETAG).cloned(),
            last_modified: headers.get(LAST_MODIFIED).cloned(),
        }
    }

    /// True if there is nothing to validate with: a stale entry without
    /// validators can only be replaced by an unconditional request.
    pub fn is_empty(&self) -> bool {
        self.etag.is_none() && self.last_modified.is_none()
    }

    /// Sets `If-None-Match` and `If-Modified-Since` on a request's headers.
    /// Both are sent when both are known; a server that understands the
    /// `ETag` ignores the date (RFC 9110 §13.1.3).
    pub fn apply_to(&self, request_headers: &mut HeaderMap) {
        if let Some(etag) = &self.etag {
            request_headers.insert(IF_NONE_MATCH, etag.clone());
        }
        if let Some(date) = &self.last_modified {
            request_headers.insert(IF_MODIFIED_SINCE, date.clone());
        }
    }
}

/// What [`ResponseCache::lookup`] found.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A fresh response: serve it, no upstream call.
    Fresh(StoredResponse),
    /// An expired (or `no-cache`) response: ask the upstream with
    /// `validators`, then call [`ResponseCache::revalidated`] on a 304.
    Stale {
        /// The stored response, should the caller want it meanwhile.
        response: StoredResponse,
        /// What to send as `If-None-Match` / `If-Modified-Since`.
        validators: Validators,
    },
    /// Nothing stored under the key.
    Miss,
}

/// What [`ResponseCache::store`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The response was stored (replacing any entry under the same key).
    Stored {
        /// How long it will be [`Lookup::Fresh`]; zero for `no-cache`.
        fresh_for: Duration,
        /// How many least-recently-used entries were evicted to make room.
        evicted: usize,
    },
    /// The response was not stored. Any entry under the key was removed, as
    /// the newer response supersedes it — except after a server error
    /// (5xx), which leaves it for [`ResponseCache::stale_on_error`].
    NotStored(NotStored),
}

impl StoreOutcome {
    /// True for [`StoreOutcome::Stored`].
    pub fn is_stored(&self) -> bool {
        matches!(self, StoreOutcome::Stored { .. })
    }
}

/// Why a response was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotStored {
    /// Only `200 OK` is stored: other cacheable statuses (301, 404, 410…) are
    /// rare in API traffic and each has its own subtleties.
    Status(StatusCode),
    /// `Cache-Control: no-store`.
    NoStore,
    /// `Cache-Control: private`: meant for one client, and this cache is
    /// shared by all of ours.
    Private,
    /// `Vary: *`: the response depends on something no key can capture.
    VaryAny,
    /// The entry would cost `bytes`, over the `limit` of
    /// [`CacheConfig::max_entry_bytes`].
    TooLarge {
        /// What the entry would cost.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
}

impl fmt::Display for NotStored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotStored::Status(status) => write!(f, "status {status} is not cached"),
            NotStored::NoStore => f.write_str("response says no-store"),
            NotStored::Private => f.write_str("response is private"),
            NotStored::VaryAny => f.write_str("response varies on *"),
            NotStored::TooLarge { bytes, limit } => {
                write!(
                    f,
                    "response needs {bytes} bytes, over the {limit}-byte limit"
                )
            }
        }
    }
}

/// The `Cache-Control` directives the cache acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheDirectives {
    /// `no-store`: do not keep the response at all.
    pub no_store: bool,
    /// `no-cache` (with or without field names, which we treat alike, on
    /// the safe side): keep it, but revalidate before every use.
    pub no_cache: bool,
    /// `private` (with or without field names, likewise): only for the one
    /// client it was sent to.
    pub private: bool,
    /// `must-revalidate` or `proxy-revalidate` (the same thing for a shared
    /// cache): never serve it stale, not even on error.
    pub must_revalidate: bool,
    /// `max-age`: fresh for this long.
    pub max_age: Option<Duration>,
    /// `s-maxage`: fresh for this long in a shared cache; overrides `max-age`.
    pub s_maxage: Option<Duration>,
}

/// Reads every `Cache-Control` header in `headers`.
///
/// Tolerant of what servers send: directive names in any case, spaces
/// around `,` and `=`, quoted values (`max-age="60"`, `no-cache="a, b"`),
/// directives spread over several header lines, and unknown directives,
/// which are skipped. A number that is not plain digits leaves its directive
/// unset; one too large to represent counts as [`MAX_DELTA_SECONDS`]. When a
/// directive repeats, its first valid occurrence wins (RFC 9111 §4.2.1).
pub fn parse_cache_control(headers: &HeaderMap) -> CacheDirectives {
    let mut d = CacheDirectives::default();
    for value in headers.get_all(CACHE_CONTROL) {
        for_each_directive(value.as_bytes(), |name, arg| {
            let is = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
            if is("no-store") {
                d.no_store = true;
            } else if is("no-cache") {
                d.no_cache = true;
            } else if is("private") {
                d.private = true;
            } else if is("must-revalidate") || is("proxy-revalidate") {
                d.must_revalidate = true;
            } else if is("max-age") {
                if d.max_age.is_none() {
                    d.max_age = arg.and_then(parse_delta_seconds);
                }
            } else if is("s-maxage") && d.s_maxage.is_none() {
                d.s_maxage = arg.and_then(parse_delta_seconds);
            }
        });
    }
    d
}

/// Splits one `Cache-Control` value into `name[=value]` directives, calling
/// `f` with each name and its unquoted value. A comma inside quotes does not
/// end a directive; an unterminated quote runs to the end of the value.
fn for_each_directive(s: &[u8], mut f: impl FnMut(&[u8], Option<&[u8]>)) {
    let mut i = 0;
    while i < s.len() {
        if s[i] == b',' || s[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < s.len() && s[i] != b'=' && s[i] != b',' {
            i += 1;
        }
        let name = s[start..i].trim_ascii();
        let mut arg = None;
        if i < s.len() && s[i] == b'=' {
            i += 1;
            while i < s.len() && s[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < s.len() && s[i] == b'"' {
                i += 1;
                let start = i;
                while i < s.len() && s[i] != b'"' {
                    // A backslash escapes the next byte, quote included.
                    i += if s[i] == b'\\' { 2 } else { 1 };
                }
                let end = i.min(s.len());
                arg = Some(&s[start..end]);
                // Whatever follows the closing quote, up to the next comma,
                // is malformed and skipped.
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
            } else {
                let start = i;
                while i < s.len() && s[i] != b',' {
                    i += 1;
                }
                arg = Some(s[start..i].trim_ascii());
            }
        }
        if !name.is_empty() {
            f(name, arg);
        }
    }
}

/// Parses delta-seconds: plain ASCII digits, saturating at
/// [`MAX_DELTA_SECONDS`]. Anything else is `None`.
fn parse_delta_seconds(s: &[u8]) -> Option<Duration> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = s.iter().fold(0u64, |n, &b| {
        n.saturating_mul(10)
            .saturating_add(u64::from(b - b'0'))
            .min(MAX_DELTA_SECONDS)
    });
    Some(Duration::from_secs(secs))
}

/// How long a response with these headers stays fresh from the moment it is
/// stored: its freshness lifetime less the `Age` it arrived with.
///
/// The lifetime is zero for `no-cache`; otherwise `s-maxage`, else `max-age`,
/// else `Expires` − `Date`, else `default_ttl`. An `Expires` that cannot be
/// used (unparsable, or no `Date` to measure it from — we read no wall clock)
/// means "already expired", as RFC 9111 §5.3 says for invalid dates: the
/// entry is kept but revalidated before use.
fn freshness(headers: &HeaderMap, d: &CacheDirectives, default_ttl: Duration) -> Duration {
    let lifetime = if d.no_cache {
        Duration::ZERO
    } else if let Some(ttl) = d.s_maxage.or(d.max_age) {
        ttl
    } else if headers.contains_key(EXPIRES) {
        match (http_date(headers, &EXPIRES), http_date(headers, &DATE)) {
            (Some(expires), Some(date)) => expires
                .duration_since(date)
                .unwrap_or(Duration::ZERO)
                .min(Duration::from_secs(MAX_DELTA_SECONDS)),
            _ => Duration::ZERO,
        }
    } else {
        default_ttl
    };
    let age = headers
        .get(AGE)
        .and_then(|v| parse_delta_seconds(v.as_bytes().trim_ascii()))
        .unwrap_or(Duration::ZERO);
    lifetime.saturating_sub(age)
}

/// The first `name` header as a date, if it is one.
fn http_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    let text = headers.get(name)?.to_str().ok()?;
    text.trim().parse::<HttpDate>().ok().map(SystemTime::from)
}

/// True if the response may not be served stale, not even on error:
/// `no-cache` and `must-revalidate` say so, and for a shared cache so does
/// `s-maxage` (RFC 9111 §5.2.2.10: it carries `proxy-revalidate`'s meaning).
fn forbids_stale(d: &CacheDirectives) -> bool {
    d.no_cache || d.must_revalidate || d.s_maxage.is_some()
}

/// True for `Vary: *` in any of the response's `Vary` lines.
fn varies_on_anything(headers: &HeaderMap) -> bool {
    headers.get_all(VARY).any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|name| name.trim_ascii() == b"*")
    })
}

/// Removes what a shared cache must not keep: connection-specific headers
/// (and any named in `Connection`), and `Set-Cookie`. A cookie is one
/// client's state; replaying it to every later caller would hand one user's
/// session to the next. The response that carried it reaches its own caller
/// untouched — only the stored copy goes without.
fn strip_unstorable(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    headers.remove(CONNECTION);
    headers.remove(SET_COOKIE);
    for name in CONNECTION_SPECIFIC {
        headers.remove(name);
    }
}

/// Updates a stored response's headers from a 304 (RFC 9111 §4.3.4): each
/// header the 304 carries replaces the stored one of that name, except
/// `Content-Length`, which describes the 304's empty body. `Age` describes
/// the message it came on, so the stored one goes even if the 304 has none.
fn merge_not_modified(stored: &mut HeaderMap, not_modified: &HeaderMap) {
    stored.remove(AGE);
    for name in not_modified.keys() {
        if name == CONTENT_LENGTH {
            continue;
        }
        stored.remove(name);
        for value in not_modified.get_all(name) {
            stored.append(name.clone(), value.clone());
        }
    }
    strip_unstorable(stored);
}

/// What an entry costs against [`CacheConfig::max_bytes`]. The key counts
/// twice: it is held by the table and by the recency index.
fn entry_bytes(key: &CacheKey, response: &StoredResponse) -> usize {
    let headers: usize = response
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    ENTRY_OVERHEAD_BYTES + 2 * key.0.len() + response.body.len() + headers
}

/// What a [`ResponseCache`] has done, for metrics. Every call that reports
/// something counts exactly once: `hits + stale_lookups + misses` is the
/// number of lookups, `stores + not_stored` the number of `store` calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheCounters {
    /// Lookups answered [`Lookup::Fresh`].
    pub hits: u64,
    /// Lookups answered [`Lookup::Miss`].
    pub misses: u64,
    /// Lookups answered [`Lookup::Stale`] (a conditional request follows).
    pub stale_lookups: u64,
    /// Responses served by [`ResponseCache::stale_on_error`].
    pub stale_hits: u64,
    /// Responses served by [`ResponseCache::revalidated`].
    pub revalidations: u64,
    /// `store` calls that stored the response.
    pub stores: u64,
    /// Entries evicted to respect `max_entries` or `max_bytes` (not those
    /// replaced, removed or dropped by a store that was refused).
    pub evictions: u64,
    /// `store` calls that stored nothing.
    pub not_stored: u64,
}

/// One stored response and its bookkeeping.
#[derive(Debug)]
struct Entry {
    response: StoredResponse,
    /// Fresh strictly before this instant, stale from it on.
    fresh_until: Instant,
    /// False when the response forbids serving it stale (see
    /// [`forbids_stale`]).
    may_serve_stale: bool,
    /// What it costs, per [`entry_bytes`].
    bytes: usize,
    /// Its position in the recency index.
    tick: u64,
}

/// An HTTP response cache for one upstream, in bounded memory. See the
/// module docs for how a caller drives it.
#[derive(Debug)]
pub struct ResponseCache {
    config: CacheConfig,
    entries: HashMap<CacheKey, Entry>,
    /// Every key by the tick of its last use: the first is the least
    /// recently used. Ticks only grow, so they are unique.
    recency: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: usize,
    counters: CacheCounters,
}

impl ResponseCache {
    /// An empty cache, or [`CacheConfig::validate`]'s error if `config` is
    /// not usable.
    pub fn new(config: CacheConfig) -> Result<Self, CacheConfigError> {
        config.validate()?;
        Ok(ResponseCache {
            config,
            entries: HashMap::new(),
            recency: BTreeMap::new(),
            next_tick: 0,
            bytes: 0,
            counters: CacheCounters::default(),
        })
    }

    /// What is stored under `key`, and whether it may be served as it is.
    /// Anything found becomes the most recently used entry.
    pub fn lookup(&mut self, key: &CacheKey, now: Instant) -> Lookup {
        let Some(entry) = self.entries.get_mut(key) else {
            self.counters.misses += 1;
            return Lookup::Miss;
        };
        touch(&mut self.recency, &mut self.next_tick, entry);
        if now < entry.fresh_until {
            self.counters.hits += 1;
            Lookup::Fresh(entry.response.clone())
        } else {
            self.counters.stale_lookups += 1;
            Lookup::Stale {
                validators: Validators::of(&entry.response.headers),
                response: entry.response.clone(),
            }
        }
    }

    /// Stores `response` under `key` if its status and `Cache-Control` allow
    /// (see [`NotStored`] for the refusals). It stays fresh for zero
    /// seconds under `no-cache`; otherwise for `s-maxage`, else `max-age`,
    /// else `Expires` − `Date` (zero if either is missing or unparsable),
    /// else `default_ttl` — less the `Age` it arrived with. An `Expires`
    /// is ignored when either max-age directive is present.
    ///
    /// Least-recently-used entries are evicted until both `max_entries` and
    /// `max_bytes` hold with the new one in. Connection-specific headers and
    /// `Set-Cookie` are not kept.
    pub fn store(
        &mut self,
        key: CacheKey,
        mut response: StoredResponse,
        now: Instant,
    ) -> StoreOutcome {
        if response.status != StatusCode::OK {
            let keep_old = response.status.is_server_error();
            return self.refuse(&key, NotStored::Status(response.status), keep_old);
        }
        strip_unstorable(&mut response.headers);
        let directives = parse_cache_control(&response.headers);
        if let Some(reason) = self.refusal(&key, &response, &directives) {
            return self.refuse(&key, reason, false);
        }
        let fresh_for = freshness(&response.headers, &directives, self.config.default_ttl);
        let evicted = self.insert(key, response, &directives, now);
        self.counters.stores += 1;
        StoreOutcome::Stored { fresh_for, evicted }
    }

    /// The upstream answered `304 Not Modified` to a conditional request for
    /// `key`: updates the entry's headers from the 304's, refreshes its
    /// freshness from the result (so a 304 with its own `Cache-Control`
    /// sets the new lifetime; one without keeps the stored directives, or
    /// `default_ttl` if there are none) and returns the stored response.
    ///
    /// `None` if the entry is gone (evicted or removed since the lookup): the
    /// caller must then fetch unconditionally. If the updated headers forbid
    /// storing (`no-store`, `private`) or make the entry too large, the
    /// response is still returned, but the entry is dropped.
    pub fn revalidated(
        &mut self,
        key: &CacheKey,
        not_modified_headers: &HeaderMap,
        now: Instant,
    ) -> Option<StoredResponse> {
        // Taken out and put back, so that a change in size goes through the
        // same eviction path as a store.
        let (key, entry) = self.take(key)?;
        let mut response = entry.response;
        merge_not_modified(&mut response.headers, not_modified_headers);
        self.counters.revalidations += 1;
        let directives = parse_cache_control(&response.headers);
        if self.refusal(&key, &response, &directives).is_none() {
            self.insert(key, response.clone(), &directives, now);
        }
        Some(response)
    }

    /// The upstream just failed: returns the entry under `key` if it expired
    /// less than `stale_if_error` ago (or has not expired) and its response
    /// does not forbid serving it stale (`no-cache`, `must-revalidate`,
    /// `proxy-revalidate`, `s-maxage`). The entry is not refreshed: the next
    /// lookup is still stale and tries the upstream again.
    pub fn stale_on_error(&mut self, key: &CacheKey, now: Instant) -> Option<StoredResponse> {
        let stale_if_error = self.config.stale_if_error;
        let entry = self.entries.get_mut(key)?;
        let servable = now < entry.fresh_until
            || (entry.may_serve_stale
                && now.saturating_duration_since(entry.fresh_until) < stale_if_error);
        if !servable {
            return None;
        }
        touch(&mut self.recency, &mut self.next_tick, entry);
        self.counters.stale_hits += 1;
        Some(entry.response.clone())
    }

    /// Forgets the entry under `key`, if any; true if there was one. Call it
    /// after a successful unsafe request to the same resource.
    pub fn remove(&mut self, key: &CacheKey) -> bool {
        self.take(key).is_some()
    }

    /// How many entries are stored.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the stored entries cost, counted as for
    /// [`CacheConfig::max_bytes`].
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// What the cache has done so far.
    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// The configuration the cache was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// Why a `200` response with these directives may not be kept, if so.
    fn refusal(
        &self,
        key: &CacheKey,
        response: &StoredResponse,
        directives: &CacheDirectives,
    ) -> Option<NotStored> {
        if directives.no_store {
            return Some(NotStored::NoStore);
        }
        if directives.private {
            return Some(NotStored::Private);
        }
        if varies_on_anything(&response.headers) {
            return Some(NotStored::VaryAny);
        }
        let bytes = entry_bytes(key, response);
        if bytes > self.config.max_entry_bytes {
            return Some(NotStored::TooLarge {
                bytes,
                limit: self.config.max_entry_bytes,
            });
        }
        None
    }

    /// Counts a refused store and, unless `keep_old`, drops the entry the
    /// refused response supersedes.
    fn refuse(&mut self, key: &CacheKey, reason: NotStored, keep_old: bool) -> StoreOutcome {
        if !keep_old {
            self.take(key);
        }
        self.counters.not_stored += 1;
        StoreOutcome::NotStored(reason)
    }

    /// Puts an admitted response in as the most recent entry, replacing any
    /// under `key`, after evicting what must go. Returns how many entries
    /// were evicted. The caller has checked the size against
    /// `max_entry_bytes` (≤ `max_bytes`), so room can always be made.
    fn insert(
        &mut self,
        key: CacheKey,
        response: StoredResponse,
        directives: &CacheDirectives,
        now: Instant,
    ) -> usize {
        self.take(&key);
        let bytes = entry_bytes(&key, &response);
        let evicted = self.make_room(bytes);
        let fresh_for = freshness(&response.headers, directives, self.config.default_ttl);
        // Lifetimes are capped at 2^31 s, so this cannot overflow in
        // practice; were it to, the entry would merely start out stale.
        let fresh_until = now.checked_add(fresh_for).unwrap_or(now);
        let tick = bump(&mut self.next_tick);
        self.recency.insert(tick, key.clone());
        self.entries.insert(
            key,
            Entry {
                response,
                fresh_until,
                may_serve_stale: !forbids_stale(directives),
                bytes,
                tick,
            },
        );
        self.bytes += bytes;
        evicted
    }

    /// Evicts least-recently-used entries until one more entry of `bytes`
    /// fits within both bounds. Returns how many were evicted.
    fn make_room(&mut self, bytes: usize) -> usize {
        let mut evicted = 0;
        while self.entries.len() >= self.config.max_entries
            || self.bytes + bytes > self.config.max_bytes
        {
            let Some((_, oldest)) = self.recency.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= entry.bytes;
            }
            evicted += 1;
        }
        self.counters.evictions += evicted as u64;
        evicted
    }

    /// Removes the entry under `key` from the table and the recency index.
    fn take(&mut self, key: &CacheKey) -> Option<(CacheKey, Entry)> {
        let (key, entry) = self.entries.remove_entry(key)?;
        self.recency.remove(&entry.tick);
        self.bytes -= entry.bytes;
        Some((key, entry))
    }
}

/// Makes `entry` the most recently used: moves its key to a new tick.
fn touch(recency: &mut BTreeMap<u64, CacheKey>, next_tick: &mut u64, entry: &mut Entry) {
    if let Some(key) = recency.remove(&entry.tick) {
        entry.tick = bump(next_tick);
        recency.insert(entry.tick, key);
    }
}

/// The next recency tick. A u64 bumped once per operation does not wrap in
/// any process's lifetime.
fn bump(next_tick: &mut u64) -> u64 {
    let tick = *next_tick;
    *next_tick += 1;
    tick
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn ok(pairs: &[(&str, &str)], body: &'static str) -> StoredResponse {
        StoredResponse {
            status: StatusCode::OK,
            headers: headers(pairs),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn key(path: &str) -> CacheKey {
        CacheKey::for_request(&Method::GET, path, &[])
    }

    /// The freshness the tests give a response without caching headers:
    /// the default (zero) would make every such entry stale at once.
    const TEST_TTL: Duration = Duration::from_secs(60);

    /// The defaults, but with [`TEST_TTL`].
    fn test_config() -> CacheConfig {
        CacheConfig {
            default_ttl: TEST_TTL,
            ..CacheConfig::default()
        }
    }

    fn cache() -> ResponseCache {
        ResponseCache::new(test_config()).unwrap()
    }

    fn body_of(lookup: &Lookup) -> Option<&[u8]> {
        match lookup {
            Lookup::Fresh(r) | Lookup::Stale { response: r, .. } => Some(&r.body[..]),
            Lookup::Miss => None,
        }
    }

    /// The bookkeeping agrees with the entries: byte total, index size, and
    /// every entry's tick pointing back at its key.
    fn assert_consistent(c: &ResponseCache) {
        let sum: usize = c.entries.values().map(|e| e.bytes).sum();
        assert_eq!(c.bytes, sum);
        assert_eq!(c.recency.len(), c.entries.len());
        for (k, e) in &c.entries {
            assert_eq!(c.recency.get(&e.tick), Some(k));
            assert_eq!(e.bytes, entry_bytes(k, &e.response));
        }
    }

    #[test]
    fn fresh_until_the_ttl_then_stale() {
        let mut c = cache();
        let t0 = Instant::now();
        let out = c.store(key("/a"), ok(&[("cache-control", "max-age=10")], "x"), t0);
        assert_eq!(
            out,
            StoreOutcome::Stored {
                fresh_for: secs(10),
                evicted: 0
            }
        );
        assert!(matches!(c.lookup(&key("/a"), t0), Lookup::Fresh(_)));
        let just_before = t0 + secs(10) - Duration::from_nanos(1);
        assert!(matches!(
            c.lookup(&key("/a"), just_before),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            c.lookup(&key("/a"), t0 + secs(10)),
            Lookup::Stale { .. }
        ));
        assert!(matches!(c.lookup(&key("/b"), t0), Lookup::Miss));
    }

    #[test]
    fn default_ttl_applies_without_max_age() {
        let mut c = ResponseCache::new(CacheConfig {
            default_ttl: secs(7),
            ..test_config()
        })
        .unwrap();
        let t0 = Instant::now();
        let out = c.store(key("/a"), ok(&[], "x"), t0);
        assert_eq!(
            out,
            StoreOutcome::Stored {
                fresh_for: secs(7),
                evicted: 0
            }
        );
        assert!(matches!(
            c.lookup(&key("/a"), t0 + secs(6)),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            c.lookup(&key("/a"), t0 + secs(7)),
            Lookup::Stale { .. }
        ));
    }

    #[test]
    fn s_maxage_wins_over_max_age() {
        let mut c = cache();
        let t0 = Instant::now();
        let r = ok(&[("cache-control", "max-age=100, s-maxage=5")], "x");
        c.store(key("/a"), r, t0);
        assert!(matches!(
            c.lookup(&key("/a"), t0 + secs(4)),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            c.lookup(&key("/a"), t0 + secs(5)),
            Lookup::Stale { .. }
        ));
    }

    #[test]
    fn age_shortens_freshness_and_expires_counts_only_without_max_age() {
        let mut c = cache();
        let t0 = Instant::now();
        let date = "Mon, 01 Jan 2024 00:00:00 GMT";
        let later = "Mon, 01 Jan 2024 00:00:30 GMT";
        let cases: [(&[(&str, &str)], Duration); 5] = [
            (&[("cache-control", "max-age=60"), ("age", "45")], secs(15)),
            (&[("cache-control", "max-age=60"), ("age", "99")], secs(0)),
            (&[("date", date), ("expires", later)], secs(30)),
            (
                &[
                    ("date", date),
                    ("expires", later),
                    ("cache-control", "max-age=5"),
                ],
                secs(5),
            ),
            // Unusable Expires: already expired, kept for revalidation.
            (&[("expires", "0")], secs(0)),
        ];
        for (i, (pairs, want)) in cases.into_iter().enumerate() {
            let out = c.store(key(&format!("/{i}")), ok(pairs, "x"), t0);
            assert_eq!(
                out,
                StoreOutcome::Stored {
                    fresh_for: want,
                    evicted: 0
                },
                "case {i}"
            );
        }
    }

    #[test]
    fn no_store_private_vary_star_and_non_200_are_not_stored() {
        let mut c = cache();
        let t0 = Instant::now();
        let cases = [
            ("no-store", NotStored::NoStore),
            ("max-age=60, PRIVATE", NotStored::Private),
            ("private=\"set-cookie\"", NotStored::Private),
        ];
        for (cc, want) in cases {
            let out = c.store(key("/a"), ok(&[("cache-control", cc)], "x"), t0);
            assert_eq!(out, StoreOutcome::NotStored(want), "{cc}");
        }
        let out = c.store(key("/a"), ok(&[("vary", "accept, *")], "x"), t0);
        assert_eq!(out, StoreOutcome::NotStored(NotStored::VaryAny));
        let mut not_found = ok(&[], "x");
        not_found.status = StatusCode::NOT_FOUND;
        let out = c.store(key("/a"), not_found, t0);
        assert_eq!(
            out,
            StoreOutcome::NotStored(NotStored::Status(StatusCode::NOT_FOUND))
        );
        assert!(c.is_empty());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn a_refused_store_drops_the_old_entry_but_a_server_error_keeps_it() {
        let mut c = cache();
        let t0 = Instant::now();
        c.store(key("/a"), ok(&[], "old"), t0);
        let mut failed = ok(&[], "oops");
        failed.status = StatusCode::BAD_GATEWAY;
        assert!(!c.store(key("/a"), failed, t0).is_stored());
        assert_eq!(body_of(&c.lookup(&key("/a"), t0)), Some(&b"old"[..]));
        let out = c.store(key("/a"), ok(&[("cache-control", "no-store")], "new"), t0);
        assert_eq!(out, StoreOutcome::NotStored(NotStored::NoStore));
        assert!(matches!(c.lookup(&key("/a"), t0), Lookup::Miss));
        assert_consistent(&c);
    }

    #[test]
    fn no_cache_is_stored_but_always_stale() {
        let mut c = cache();
        let t0 = Instant::now();
        let r = ok(
            &[
                ("cache-control", "no-cache, max-age=60"),
                ("etag", "\"v1\""),
            ],
            "x",
        );
        let out = c.store(key("/a"), r, t0);
        assert_eq!(
            out,
            StoreOutcome::Stored {
                fresh_for: Duration::ZERO,
                evicted: 0
            }
        );
        match c.lookup(&key("/a"), t0) {
            Lookup::Stale { validators, .. } => {
                assert_eq!(validators.etag, Some(HeaderValue::from_static("\"v1\"")));
            }
            other => panic!("expected stale, got {other:?}"),
        }
        // Revalidating keeps it no-cache: the 304 says nothing new.
        assert!(c.revalidated(&key("/a"), &HeaderMap::new(), t0).is_some());
        assert!(matches!(c.lookup(&key("/a"), t0), Lookup::Stale { .. }));
        // And it may never be served stale on error.
        assert!(c.stale_on_error(&key("/a"), t0).is_none());
    }

    #[test]
    fn a_304_refreshes_the_entry_and_returns_the_old_body() {
        let mut c = cache();
        let t0 = Instant::now();
        let r = ok(
            &[
                ("cache-control", "max-age=10"),
                ("etag", "\"v1\""),
                ("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
                ("content-type", "application/json"),
                ("age", "3"),
            ],
            "{\"n\":1}",
        );
        c.store(key("/a"), r, t0);
        let t1 = t0 + secs(20);
        let Lookup::Stale { validators, .. } = c.lookup(&key("/a"), t1) else {
            panic!("expected stale");
        };
        let mut request = HeaderMap::new();
        validators.apply_to(&mut request);
        assert_eq!(
            request.get(IF_NONE_MATCH),
            Some(&HeaderValue::from_static("\"v1\""))
        );
        assert!(request.contains_key(IF_MODIFIED_SINCE));

        let not_modified = headers(&[
            ("cache-control", "max-age=30"),
            ("etag", "\"v2\""),
            ("content-length", "0"),
        ]);
        let served = c.revalidated(&key("/a"), &not_modified, t1).unwrap();
        assert_eq!(&served.body[..], b"{\"n\":1}");
        assert_eq!(
            served.headers.get(ETAG),
            Some(&HeaderValue::from_static("\"v2\""))
        );
        assert_eq!(
            served.headers.get("content-type"),
            Some(&HeaderValue::from_static("application/json"))
        );
        assert!(!served.headers.contains_key(CONTENT_LENGTH));
        // The old Age belonged to the original response.
        assert!(!served.headers.contains_key(AGE));
        // Fresh for the 304's 30 s, from the revalidation.
        assert!(matches!(
            c.lookup(&key("/a"), t1 + secs(29)),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            c.lookup(&key("/a"), t1 + secs(30)),
            Lookup::Stale { .. }
        ));
        assert_consistent(&c);
    }

    #[test]
    fn a_304_without_cache_control_keeps_the_stored_directives_or_the_default() {
        let mut c = ResponseCache::new(CacheConfig {
            default_ttl: secs(5),
            ..test_config()
        })
        .unwrap();
        let t0 = Instant::now();
        c.store(
            key("/kept"),
            ok(&[("cache-control", "max-age=50")], "x"),
            t0,
        );
        c.store(key("/default"), ok(&[], "x"), t0);
        let t1 = t0 + secs(100);
        for k in ["/kept", "/default"] {
            assert!(c.revalidated(&key(k), &HeaderMap::new(), t1).is_some());
        }
        assert!(matches!(
            c.lookup(&key("/kept"), t1 + secs(49)),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            c.lookup(&key("/default"), t1 + secs(4)),
            Lookup::Fresh(_)
        ));
        assert!(matches!(
            c.lookup(&key("/default"), t1 + secs(5)),
            Lookup::Stale { .. }
        ));
    }

    #[test]
    fn a_304_that_says_no_store_serves_once_and_drops_the_entry() {
        let mut c = cache();
        let t0 = Instant::now();
        c.store(key("/a"), ok(&[], "x"), t0);
        let nm = headers(&[("cache-control", "no-store")]);
        assert!(c.revalidated(&key("/a"), &nm, t0).is_some());
        assert!(c.is_empty());
        assert_eq!(c.bytes(), 0);
        // And a 304 for an entry that is gone cannot be answered.
        assert!(c.revalidated(&key("/a"), &HeaderMap::new(), t0).is_none());
    }

    #[test]
    fn stale_on_error_only_within_the_window() {
        let mut c = ResponseCache::new(CacheConfig {
            stale_if_error: secs(30),
            ..test_config()
        })
        .unwrap();
        let t0 = Instant::now();
        c.store(key("/a"), ok(&[("cache-control", "max-age=10")], "x"), t0);
        // Still fresh: served (it is what the caller would have had anyway).
        assert!(c.stale_on_error(&key("/a"), t0 + secs(9)).is_some());
        assert!(c.stale_on_error(&key("/a"), t0 + secs(10)).is_some());
        let last = t0 + secs(40) - Duration::from_nanos(1);
        assert!(c.stale_on_error(&key("/a"), last).is_some());
        assert!(c.stale_on_error(&key("/a"), t0 + secs(40)).is_none());
        assert!(c.stale_on_error(&key("/missing"), t0).is_none());
        // Serving on error does not refresh the entry.
        assert!(matches!(
            c.lookup(&key("/a"), t0 + secs(11)),
            Lookup::Stale { .. }
        ));

        // Directives that forbid stale service are honoured.
        for cc in [
            "max-age=10, must-revalidate",
            "proxy-revalidate, max-age=10",
            "s-maxage=10",
        ] {
            c.store(key("/b"), ok(&[("cache-control", cc)], "x"), t0);
            assert!(
                c.stale_on_error(&key("/b"), t0 + secs(11)).is_none(),
                "{cc}"
            );
        }
    }

    #[test]
    fn stale_if_error_zero_means_never() {
        let mut c = ResponseCache::new(CacheConfig {
            stale_if_error: Duration::ZERO,
            ..test_config()
        })
        .unwrap();
        let t0 = Instant::now();
        c.store(key("/a"), ok(&[("cache-control", "max-age=10")], "x"), t0);
        assert!(c.stale_on_error(&key("/a"), t0 + secs(10)).is_none());
    }

    #[test]
    fn least_recently_used_goes_first_and_a_hit_protects() {
        let mut c = ResponseCache::new(CacheConfig {
            max_entries: 3,
            ..test_config()
        })
        .unwrap();
        let t0 = Instant::now();
        for p in ["/a", "/b", "/c"] {
            c.store(key(p), ok(&[], "x"), t0);
        }
        assert!(matches!(c.lookup(&key("/a"), t0), Lookup::Fresh(_)));
        let out = c.store(key("/d"), ok(&[], "x"), t0);
        assert_eq!(
            out,
            StoreOutcome::Stored {
                fresh_for: TEST_TTL,
                evicted: 1
            }
        );
        assert!(matches!(c.lookup(&key("/b"), t0), Lookup::Miss));
        // Now c is the oldest (a and d were used after it).
        c.store(key("/e"), ok(&[], "x"), t0);
        assert!(matches!(c.lookup(&key("/c"), t0), Lookup::Miss));
        for p in ["/a", "/d", "/e"] {
            assert!(matches!(c.lookup(&key(p), t0), Lookup::Fresh(_)), "{p}");
        }
        // Replacing an entry is not an eviction and does not grow the cache.
        c.store(key("/a"), ok(&[], "yy"), t0);
        assert_eq!(c.len(), 3);
        assert_eq!(c.counters().evictions, 2);
        assert_consistent(&c);
    }

    #[test]
    fn entries_over_max_entry_bytes_are_not_stored() {
        let mut c = ResponseCache::new(CacheConfig {
            max_entry_bytes: 1024,
            max_bytes: 4096,
            ..test_config()
        })
        .unwrap();
        let t0 = Instant::now();
        let k = key("/a");
        let fits = 1024 - ENTRY_OVERHEAD_BYTES - 2 * k.as_str().len();
        let body = Bytes::from(vec![b'x'; fits]);
        let mut r = ok(&[], "");
        r.body = body.clone();
        assert!(c.store(k.clone(), r.clone(), t0).is_stored());
        assert_eq!(c.bytes(), 1024);
        r.body = Bytes::from(vec![b'x'; fits + 1]);
        assert_eq!(
            c.store(k.clone(), r, t0),
            StoreOutcome::NotStored(NotStored::TooLarge {
                bytes: 1025,
                limit: 1024
            })
        );
        assert!(c.is_empty());
    }

    /// Property: under 10,000 distinct keys with bodies of random sizes (some
    /// too large to store), interleaved with lookups and removals, the cache
    /// never holds more than `max_entries` entries or `max_bytes` bytes, and
    /// its bookkeeping stays exact. A small deterministic generator stands in
    /// for a property-testing crate.
    #[test]
    fn bounds_hold_under_ten_thousand_random_keys() {
        // The crate's own xorshift64* (Jitter), seeded: deterministic cases.
        let mut rng = crate::backoff::Jitter::with_seed(0x9E37_79B9_7F4A_7C15);
        let mut next = move || rng.next_u64();
        let config = CacheConfig {
            max_entries: 100,
            max_bytes: 256 * 1024,
            max_entry_bytes: 16 * 1024,
            ..test_config()
        };
        let mut c = ResponseCache::new(config.clone()).unwrap();
        let zeros = Bytes::from(vec![0u8; 20 * 1024]);
        let t0 = Instant::now();
        let (mut stores, mut refused, mut lookups) = (0u64, 0u64, 0u64);
        let (mut full_by_count, mut full_by_bytes) = (false, false);
        for i in 0..10_000u64 {
            let now = t0 + Duration::from_millis(i);
            // Mostly small bodies, so that the entry bound binds, and now
            // and then a large one (sometimes too large), so that the byte
            // bound does.
            let size = if next() % 4 == 0 {
                (next() % (20 * 1024)) as usize
            } else {
                (next() % 256) as usize
            };
            let mut r = ok(&[("cache-control", "max-age=5"), ("etag", "\"e\"")], "");
            r.body = zeros.slice(..size);
            match c.store(key(&format!("/item/{i}")), r, now) {
                StoreOutcome::Stored { .. } => stores += 1,
                StoreOutcome::NotStored(NotStored::TooLarge { .. }) => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
            assert!(c.bytes() <= config.max_bytes, "bytes {} at {i}", c.bytes());
            assert!(c.len() <= config.max_entries, "len {} at {i}", c.len());
            full_by_count |= c.len() == config.max_entries;
            full_by_bytes |= c.bytes() > config.max_bytes - config.max_entry_bytes;
            for _ in 0..2 {
                let j = next() % (i + 1);
                c.lookup(&key(&format!("/item/{j}")), now);
                lookups += 1;
            }
            if next() % 16 == 0 {
                c.remove(&key(&format!("/item/{}", next() % (i + 1))));
            }
            if i % 500 == 0 {
                assert_consistent(&c);
            }
        }
        assert_consistent(&c);
        let n = c.counters();
        assert_eq!(n.stores, stores);
        assert_eq!(n.not_stored, refused);
        assert_eq!(n.hits + n.stale_lookups + n.misses, lookups);
        assert!(n.evictions > 0 && stores > 0 && refused > 0);
        assert!(
            full_by_count && full_by_bytes,
            "both bounds must be exercised"
        );
    }

    #[test]
    fn counters_are_exact() {
        let mut c = ResponseCache::new(CacheConfig {
            max_entries: 2,
            ..test_config()
        })
        .unwrap();
        let t0 = Instant::now();
        let cc = [("cache-control", "max-age=10")];
        c.lookup(&key("/a"), t0); // miss
        c.store(key("/a"), ok(&cc, "a"), t0); // store
        c.lookup(&key("/a"), t0); // hit
        c.lookup(&key("/a"), t0 + secs(10)); // stale lookup
        c.revalidated(&key("/a"), &HeaderMap::new(), t0 + secs(10)); // revalidation
        c.revalidated(&key("/zz"), &HeaderMap::new(), t0); // nothing
        c.store(key("/b"), ok(&[("cache-control", "no-store")], "b"), t0); // not stored
        c.store(key("/b"), ok(&cc, "b"), t0); // store
        c.store(key("/c"), ok(&cc, "c"), t0); // store, evicts /a, the least recent
        c.stale_on_error(&key("/c"), t0 + secs(11)); // stale hit
        c.stale_on_error(&key("/nope"), t0); // nothing
        c.remove(&key("/c")); // not an eviction
        assert_eq!(
            c.counters(),
            CacheCounters {
                hits: 1,
                misses: 1,
                stale_lookups: 1,
                stale_hits: 1,
                revalidations: 1,
                stores: 3,
                evictions: 1,
                not_stored: 1,
            }
        );
        // /a was revalidated after /b's refusal and before /b and /c were
        // stored, so /a was the least recent when /c arrived.
        assert!(matches!(c.lookup(&key("/a"), t0), Lookup::Miss));
    }

    #[test]
    fn connection_headers_and_set_cookie_are_not_kept() {
        let mut c = cache();
        let t0 = Instant::now();
        let r = ok(
            &[
                ("connection", "keep-alive, x-trace"),
                ("keep-alive", "timeout=5"),
                ("transfer-encoding", "chunked"),
                ("x-trace", "abc"),
                ("set-cookie", "session=secret"),
                ("content-type", "text/plain"),
            ],
            "x",
        );
        c.store(key("/a"), r, t0);
        let Lookup::Fresh(stored) = c.lookup(&key("/a"), t0) else {
            panic!("expected fresh");
        };
        let names: Vec<&str> = stored.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type"]);
        assert_consistent(&c);
    }

    #[test]
    fn body_keys_match_equal_bodies_and_differ_otherwise() {
        let post = Method::POST;
        let a = CacheKey::for_body(&post, "/v1/chat", b"{\"prompt\":\"hi\"}");
        assert_eq!(
            a,
            CacheKey::for_body(&post, "/v1/chat", b"{\"prompt\":\"hi\"}")
        );
        assert_ne!(
            a,
            CacheKey::for_body(&post, "/v1/chat", b"{\"prompt\":\"ho\"}")
        );
        assert_ne!(
            a,
            CacheKey::for_body(&post, "/v1/other", b"{\"prompt\":\"hi\"}")
        );
        assert_ne!(
            a,
            CacheKey::for_body(&Method::PUT, "/v1/chat", b"{\"prompt\":\"hi\"}")
        );
        assert_ne!(a, CacheKey::for_request(&post, "/v1/chat", &[]));
        assert_ne!(
            a.clone().varying(&[("identity", "u1")]),
            a.varying(&[("identity", "u2")])
        );
        // Many bodies, no collisions among them.
        let keys: std::collections::HashSet<CacheKey> = (0..10_000u32)
            .map(|i| CacheKey::for_body(&post, "/p", &i.to_le_bytes()))
            .collect();
        assert_eq!(keys.len(), 10_000);
        // The published FNV-1a test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn request_keys_ignore_vary_order_and_name_case_and_cannot_collide() {
        let get = Method::GET;
        let k = |vary: &[(&str, &str)]| CacheKey::for_request(&get, "/a?b=c", vary);
        assert_eq!(
            k(&[("Accept", "json"), ("identity", "h1")]),
            k(&[("identity", "h1"), ("accept", "json")])
        );
        assert_ne!(k(&[("accept", "json")]), k(&[("accept", "xml")]));
        assert_ne!(k(&[]), CacheKey::for_request(&Method::HEAD, "/a?b=c", &[]));
        // Values that try to smuggle a second pair stay one value.
        assert_ne!(k(&[("a", "1 1:b=1:2")]), k(&[("a", "1"), ("b", "2")]));
        assert_ne!(
            CacheKey::for_request(&get, "/x 1:a=1:b", &[]),
            CacheKey::for_request(&get, "/x", &[("a", "b")])
        );
        assert_eq!(CacheKey::custom("mine").as_str(), "mine");
    }

    #[test]
    fn cache_control_parsing_is_tolerant() {
        let parse = |lines: &[&str]| {
            let pairs: Vec<(&str, &str)> = lines.iter().map(|l| ("cache-control", *l)).collect();
            parse_cache_control(&headers(&pairs))
        };
        assert_eq!(parse(&[]), CacheDirectives::default());
        let d = parse(&["  Max-Age = 60 ,NO-CACHE,  x-unknown=\"a,b\", s-maxage=\"30\""]);
        assert_eq!(d.max_age, Some(secs(60)));
        assert_eq!(d.s_maxage, Some(secs(30)));
        assert!(d.no_cache && !d.no_store && !d.private);
        // Quoted commas do not split directives.
        let d = parse(&["no-cache=\"set-cookie, x-foo\", max-age=5"]);
        assert!(d.no_cache);
        assert_eq!(d.max_age, Some(secs(5)));
        // Several header lines are one list; the first valid value wins.
        let d = parse(&["max-age=10", "max-age=20, no-store", "private"]);
        assert_eq!(d.max_age, Some(secs(10)));
        assert!(d.no_store && d.private);
        // Invalid numbers leave the directive unset (and a later valid one
        // still counts).
        for bad in [
            "max-age=-1",
            "max-age=1.5",
            "max-age=",
            "max-age",
            "max-age=abc",
        ] {
            assert_eq!(parse(&[bad]).max_age, None, "{bad}");
        }
        assert_eq!(parse(&["max-age=x, max-age=3"]).max_age, Some(secs(3)));
        // Too large to represent: the RFC's 2^31 seconds.
        let d = parse(&["max-age=99999999999999999999999"]);
        assert_eq!(d.max_age, Some(secs(MAX_DELTA_SECONDS)));
        // Escapes inside quotes and an unterminated quote do not panic.
        let d = parse(&["x=\"a\\\"b,c\", must-revalidate, y=\"open"]);
        assert!(d.must_revalidate);
        assert!(parse(&["proxy-revalidate"]).must_revalidate);
        assert_eq!(parse(&[",,, ,"]), CacheDirectives::default());
    }

    #[test]
    fn validate_names_the_offending_field() {
        assert_eq!(test_config().validate(), Ok(()));
        let cases: [(CacheConfig, &str); 6] = [
            (
                CacheConfig {
                    max_entries: 0,
                    ..test_config()
                },
                "max_entries",
            ),
            (
                CacheConfig {
                    max_bytes: 10,
                    ..test_config()
                },
                "max_bytes",
            ),
            (
                CacheConfig {
                    max_entry_bytes: DEFAULT_MAX_BYTES + 1,
                    ..test_config()
                },
                "max_entry_bytes",
            ),
            (
                CacheConfig {
                    max_entry_bytes: ENTRY_OVERHEAD_BYTES,
                    ..test_config()
                },
                "max_entry_bytes",
            ),
            (
                CacheConfig {
                    default_ttl: Duration::MAX,
                    ..test_config()
                },
                "default_ttl",
            ),
            (
                CacheConfig {
                    stale_if_error: Duration::MAX,
                    ..test_config()
                },
                "stale_if_error",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate().unwrap_err();
            assert_eq!(err.field(), field, "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
            assert_eq!(ResponseCache::new(config).err(), Some(err));
        }
    }
}
