//! Static assets compiled into the binary, served the way a browser and a CDN
//! expect: validators, revalidation, cache lifetimes and compression.
//!
//! A [`StaticAssets`] is a set of files (URL path → bytes and content type)
//! built once at start-up and mounted with [`StaticAssets::configure`]:
//!
//! ```
//! use actix_web::App;
//! use happynet::assets::StaticAssets;
//!
//! const INDEX_HTML: &str = "<!doctype html><link rel=stylesheet href=/app.css>";
//! const APP_CSS: &str = "body { margin: 0 }";
//!
//! let assets = StaticAssets::new()
//!     .add_hashed("/app.css", "text/css; charset=utf-8", APP_CSS)
//!     .add("/", "text/html; charset=utf-8", INDEX_HTML);
//! // The name a page must link to: "/app.<8 hex digits>.css".
//! let css_url = assets.url("/app.css").expect("added above");
//! assert!(css_url.starts_with("/app.") && css_url.ends_with(".css"));
//! let routes = assets.configure();
//! let app = App::new().configure(routes.clone());
//! # let _ = app;
//! ```
//!
//! What every response carries, and why:
//!
//! - **A strong `ETag`**: FNV-1a 64 of the bytes, computed once when the asset
//!   is added (`"3f9a2c1b5d7e8f60"`). Each compressed variant is a different
//!   byte sequence and so gets its own strong tag (`"…-gz"`, `"…-br"`): a
//!   strong tag promises byte-identical content, which the identity tag on a
//!   gzipped body would break (RFC 9110 §8.8.3). This is why the assets are
//!   compressed here, once, instead of per request by actix's `Compress`
//!   middleware: `Compress` keeps the handler's headers, so the identity
//!   `ETag` would travel on a compressed body, and a `304` (which has no body
//!   to compress) could not say which variant it confirms.
//! - **`Last-Modified`**: one time for the whole set, by default the moment
//!   [`StaticAssets::new`] ran (that is, server start), truncated to whole
//!   seconds because HTTP dates have no fractions. It is stable for the life
//!   of the process, which is what revalidation needs; a restart moves it
//!   forward, which costs at most one full response per client. Several
//!   instances behind one CDN should pin it to the build time with
//!   [`StaticAssets::last_modified`] so that they agree. The `ETag` is the
//!   validator that matters: browsers send `If-None-Match`, and it wins.
//! - **Revalidation**: `If-None-Match` (a list or `*`) matching the selected
//!   variant's tag, or, only when `If-None-Match` is absent,
//!   `If-Modified-Since` at or after `Last-Modified`, answers `304 Not
//!   Modified` with no body and the same `ETag`, `Last-Modified`,
//!   `Cache-Control` and `Vary`. `If-None-Match` uses the weak comparison, as
//!   RFC 9110 §13.1.2 requires of it (strong comparison is for `If-Match`):
//!   `W/"x"` matches `"x"`, so a client that weakened our tag still
//!   revalidates.
//! - **`Cache-Control`**, chosen per asset by [`CachePolicy`]: names made by
//!   [`StaticAssets::add_hashed`] change whenever their content does, so they
//!   are `public, max-age=31536000, immutable`; HTML is `no-cache` (see
//!   [`CachePolicy::Revalidate`] for why); anything else is
//!   `public, max-age=3600`.
//! - **Compression**: text-like types (HTML, CSS, JavaScript, JSON, SVG, …)
//!   are compressed at construction with brotli (quality 11) and gzip (level
//!   9); a variant is kept only when it is smaller. Each request picks a
//!   variant from `Accept-Encoding` (q-values honoured; brotli before gzip on
//!   a tie), and every response of an asset that has variants says
//!   `Vary: Accept-Encoding`, so a CDN keys its copies by encoding. Work per
//!   request is a header lookup and a reference-counted clone of the bytes.
//! - **`HEAD`** is answered exactly like `GET`, `Content-Length` included,
//!   without the body. Other methods on an asset get `405` with
//!   `Allow: GET, HEAD`; paths that are not assets are left to the app (a
//!   `404` unless it routes them).
//!
//! Do not wrap these routes in `Compress`: responses that carry a
//! `Content-Encoding` pass through it untouched, but an identity response to
//! a client that accepts only `deflate` or `zstd` would be compressed under
//! the identity `ETag`.
//!
//! The rules themselves — variant choice and the conditional-request
//! decision — are plain functions of the request headers, tested here without
//! a server; `tests/assets.rs` checks them over real HTTP.

use actix_web::http::header::{self, AcceptEncoding, Encoding, HeaderMap, HeaderValue, HttpDate};
use actix_web::web::{self, Bytes, ServiceConfig};
use actix_web::{guard, HttpRequest, HttpResponse};
use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `max-age` of a content-hashed asset: one year, the conventional ceiling
/// (older HTTP advised no longer freshness, and caches evict long before).
pub const IMMUTABLE_MAX_AGE: Duration = Duration::from_secs(31_536_000);

/// `max-age` of an asset that is neither HTML nor content-hashed (a favicon,
/// `robots.txt`): long enough to spare a CDN most requests, short enough that
/// a change shows within the hour.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(3600);

/// Hex digits of the content hash put into a hashed file name: 32 bits, the
/// usual length for bundlers. Two versions of one file share a name with a
/// chance of one in four billion; the `ETag` uses all 64 bits.
const NAME_HASH_DIGITS: usize = 8;

/// Brotli's best quality and its usual window (4 MiB). Slow to compress
/// (about a megabyte a second), but that happens once, at start-up.
const BROTLI_QUALITY: i32 = 11;
const BROTLI_WINDOW_BITS: i32 = 22;

/// How long a browser or CDN may reuse an asset without asking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CachePolicy {
    /// `public, max-age=31536000, immutable`: for names that change whenever
    /// the content does, so a stored copy is never wrong. Browsers then skip
    /// even the revalidation on reload.
    Immutable,
    /// `no-cache`: browsers and CDNs may store the response but must
    /// revalidate it before each use. Meant for HTML, the entry point that
    /// names everything else: a deploy must be seen on the next load, and
    /// revalidating costs one `304` of a few hundred bytes. Chosen over
    /// `max-age=0, must-revalidate`, which behaves the same while online
    /// but lets a cache serve the stale page when it cannot reach us;
    /// `no-cache` says "always ask" outright.
    Revalidate,
    /// `public, max-age=N`: reuse for N seconds, then revalidate.
    MaxAge(Duration),
}

impl CachePolicy {
    /// The policy [`StaticAssets::add`] picks for a content type:
    /// [`Revalidate`](Self::Revalidate) for HTML,
    /// [`MaxAge`](Self::MaxAge)([`DEFAULT_MAX_AGE`]) for the rest.
    pub fn for_content_type(content_type: &str) -> Self {
        if essence(content_type) == "text/html" {
            CachePolicy::Revalidate
        } else {
            CachePolicy::MaxAge(DEFAULT_MAX_AGE)
        }
    }

    /// The `Cache-Control` value.
    pub fn header_value(&self) -> String {
        match self {
            CachePolicy::Immutable => {
                format!("public, max-age={}, immutable", IMMUTABLE_MAX_AGE.as_secs())
            }
            CachePolicy::Revalidate => "no-cache".to_owned(),
            CachePolicy::MaxAge(age) => format!("public, max-age={}", age.as_secs()),
        }
    }
}

/// A content coding this module produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Brotli,
    Gzip,
}

impl Coding {
    /// The `Content-Encoding` token (none for identity) and the suffix that
    /// tells the variant's `ETag` apart.
    fn token_and_tag_suffix(self) -> Option<(&'static str, &'static str)> {
        match self {
            Coding::Identity => None,
            Coding::Brotli => Some(("br", "-br")),
            Coding::Gzip => Some(("gzip", "-gz")),
        }
    }

    fn encoding(self) -> Encoding {
        match self {
            Coding::Identity => Encoding::identity(),
            Coding::Brotli => Encoding::brotli(),
            Coding::Gzip => Encoding::gzip(),
        }
    }
}

/// One stored byte sequence of an asset: the original or a compressed copy.
#[derive(Debug, Clone)]
struct Variant {
    coding: Coding,
    body: Bytes,
    /// The quoted strong entity tag, e.g. `"3f9a2c1b5d7e8f60-br"`.
    etag: HeaderValue,
}

/// One asset: where it is served and everything its responses need, so
/// answering a request builds no strings.
#[derive(Debug, Clone)]
struct Asset {
    path: String,
    content_type: HeaderValue,
    cache_control: HeaderValue,
    /// Identity first; then the compressed copies that came out smaller.
    variants: Vec<Variant>,
}

/// A set of embedded static assets; see the [module docs](self) for the
/// headers it serves and why.
///
/// Built with [`new`](Self::new) and the `add*` methods, then mounted with
/// [`configure`](Self::configure). Adding compresses text-like content (at
/// brotli's best quality), so build the set once at start-up, outside the
/// `HttpServer::new` factory that runs once per worker.
#[derive(Debug, Clone)]
pub struct StaticAssets {
    assets: Vec<Asset>,
    /// Logical name given to `add*` → the path it is served at.
    urls: HashMap<String, String>,
    last_modified: SystemTime,
}

impl Default for StaticAssets {
    fn default() -> Self {
        Self::new()
    }
}

impl StaticAssets {
    /// An empty set whose `Last-Modified` is now (whole seconds).
    pub fn new() -> Self {
        Self {
            assets: Vec::new(),
            urls: HashMap::new(),
            last_modified: whole_seconds(SystemTime::now()),
        }
    }

    /// Sets the `Last-Modified` of every asset in the set, e.g. the build
    /// time, so that instances started at different times agree. Truncated
    /// to whole seconds, as HTTP dates are.
    pub fn last_modified(mut self, at: SystemTime) -> Self {
        self.last_modified = whole_seconds(at);
        self
    }

    /// Adds an asset served at `path`, with the [`CachePolicy`] its content
    /// type calls for ([`CachePolicy::for_content_type`]).
    ///
    /// # Panics
    ///
    /// Like [`add_with`](Self::add_with), on a bad path, a duplicate or a
    /// content type that is not a valid header value: assets are fixed in
    /// code, so these are programming errors, caught at start-up.
    pub fn add(self, path: &str, content_type: &str, body: impl Into<Bytes>) -> Self {
        let policy = CachePolicy::for_content_type(content_type);
        self.add_with(path, content_type, body, policy)
    }

    /// Adds an asset under a content-hashed name made from `path` by
    /// [`hashed_name`] (`/app.css` → `/app.3f9a2c1b.css`), served
    /// [`CachePolicy::Immutable`]. [`url`](Self::url) with the original
    /// `path` gives the name to link to.
    ///
    /// Only names hashed here are made immutable: a name merely shaped like
    /// one might not change with its content.
    ///
    /// # Panics
    ///
    /// As [`add_with`](Self::add_with), and when `path` ends in `/` (there
    /// is no file name to put the hash in).
    pub fn add_hashed(mut self, path: &str, content_type: &str, body: impl Into<Bytes>) -> Self {
        assert!(
            !path.ends_with('/'),
            "static asset `{path}`: a hashed asset needs a file name"
        );
        let body = body.into();
        let served = hashed_name(path, &body);
        self = self.add_with(&served, content_type, body, CachePolicy::Immutable);
        if self.urls.insert(path.to_owned(), served).is_some() {
            panic!("static asset `{path}` added twice");
        }
        self
    }

    /// Adds an asset served at `path` with an explicit cache policy — for
    /// instance [`CachePolicy::Immutable`] for a file a bundler has already
    /// named by its content hash.
    ///
    /// # Panics
    ///
    /// When `path` does not start with `/`, contains anything but ASCII
    /// letters, digits and `/ - . _ ~` (the characters that need no
    /// escaping in a URL and no escaping in an actix route pattern), is
    /// already in the set, or `content_type` is not a valid header value.
    pub fn add_with(
        mut self,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
        policy: CachePolicy,
    ) -> Self {
        assert!(
            path.starts_with('/')
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b)),
            "static asset path `{path}` must start with `/` and use only \
             ASCII letters, digits and `/ - . _ ~`"
        );
        assert!(
            self.assets.iter().all(|a| a.path != path),
            "static asset `{path}` added twice"
        );
        let content_type = HeaderValue::from_str(content_type).unwrap_or_else(|_| {
            panic!("static asset `{path}`: `{content_type}` is not a valid Content-Type")
        });
        let cache_control = HeaderValue::from_str(&policy.header_value())
            .expect("a Cache-Control value made of ASCII");
        let body = body.into();
        let hash = format!("{:016x}", content_hash(&body));
        let compressible = content_type.to_str().is_ok_and(is_compressible);
        let mut variants = vec![variant(Coding::Identity, &hash, body.clone())];
        if compressible {
            for (coding, compressed) in [
                (Coding::Brotli, brotli_compress(&body)),
                (Coding::Gzip, gzip_compress(&body)),
            ] {
                // A failed or useless compression just leaves the variant out.
                if let Some(bytes) = compressed.filter(|c| c.len() < body.len()) {
                    variants.push(variant(coding, &hash, Bytes::from(bytes)));
                }
            }
        }
        self.urls.entry(path.to_owned()).or_insert(path.to_owned());
        self.assets.push(Asset {
            path: path.to_owned(),
            content_type,
            cache_control,
            variants,
        });
        self
    }

    /// The path to link to for an asset added as `name`: the hashed name
    /// for [`add_hashed`](Self::add_hashed), `name` itself otherwise.
    pub fn url(&self, name: &str) -> Option<&str> {
        self.urls.get(name).map(String::as_str)
    }

    /// The `Last-Modified` every asset is served with.
    pub fn modified_at(&self) -> SystemTime {
        self.last_modified
    }

    /// A function that mounts every asset, for `App::configure` or
    /// `ServiceConfig::configure`. Each asset becomes an exact-path resource
    /// answering `GET` and `HEAD`; cloning the function (once per worker)
    /// shares the bytes.
    pub fn configure(&self) -> impl Fn(&mut ServiceConfig) + Clone + Send + Sync + 'static {
        let last_modified = self.last_modified;
        let date = HeaderValue::from_str(&HttpDate::from(last_modified).to_string())
            .expect("an HTTP date is a valid header value");
        let served: Arc<[Arc<Served>]> = self
            .assets
            .iter()
            .map(|asset| {
                Arc::new(Served {
                    asset: asset.clone(),
                    last_modified,
                    last_modified_header: date.clone(),
                })
            })
            .collect();
        move |cfg: &mut ServiceConfig| {
            for asset in served.iter() {
                let asset = Arc::clone(asset);
                cfg.service(
                    web::resource(asset.asset.path.as_str())
                        .route(
                            web::route()
                                .guard(guard::Any(guard::Get()).or(guard::Head()))
                                .to(move |req: HttpRequest| {
                                    let asset = Arc::clone(&asset);
                                    async move { asset.respond(&req) }
                                }),
                        )
                        .default_service(web::to(method_not_allowed)),
                );
            }
        }
    }
}

/// `405` for a method other than `GET`/`HEAD` on an asset's path.
async fn method_not_allowed() -> HttpResponse {
    HttpResponse::MethodNotAllowed()
        .insert_header((header::ALLOW, "GET, HEAD"))
        .finish()
}

/// An asset as mounted: with the set's `Last-Modified`, ready to answer.
#[derive(Debug)]
struct Served {
    asset: Asset,
    last_modified: SystemTime,
    last_modified_header: HeaderValue,
}

impl Served {
    /// Answers a `GET` or `HEAD` (actix-http drops the body of a `HEAD`
    /// response but keeps its `Content-Length`).
    fn respond(&self, req: &HttpRequest) -> HttpResponse {
        let variant = select_variant(&self.asset.variants, req.headers());
        let not_modified = is_not_modified(req.headers(), &variant.etag, self.last_modified);
        let mut response = if not_modified {
            HttpResponse::NotModified()
        } else {
            HttpResponse::Ok()
        };
        response
            .insert_header((header::ETAG, variant.etag.clone()))
            .insert_header((header::LAST_MODIFIED, self.last_modified_header.clone()))
            .insert_header((header::CACHE_CONTROL, self.asset.cache_control.clone()));
        if self.asset.variants.len() > 1 {
            response.insert_header((header::VARY, "Accept-Encoding"));
        }
        if not_modified {
            return response.finish();
        }
        response.insert_header((header::CONTENT_TYPE, self.asset.content_type.clone()));
        if let Some((token, _)) = variant.coding.token_and_tag_suffix() {
            response.insert_header((header::CONTENT_ENCODING, token));
        }
        response.body(variant.body.clone())
    }
}

/// Picks the variant `Accept-Encoding` prefers among those the asset has:
/// highest q-value first, brotli before gzip on a tie; identity when the
/// header is absent, empty or unparsable. When the client refuses every
/// variant (`identity;q=0` with no acceptable compressed copy), it still
/// gets identity: `Accept-Encoding` is a preference a server may answer
/// without a coding (RFC 9110 §12.5.3), and a readable body beats a `406`
/// for a static file.
fn select_variant<'a>(variants: &'a [Variant], headers: &HeaderMap) -> &'a Variant {
    let identity = &variants[0];
    if variants.len() == 1 {
        return identity;
    }
    let Some(accept) = parse_accept_encoding(headers) else {
        return identity;
    };
    let offered: Vec<Encoding> = variants.iter().map(|v| v.coding.encoding()).collect();
    accept
        .negotiate(offered.iter())
        .and_then(|chosen| variants.iter().find(|v| v.coding.encoding() == chosen))
        .unwrap_or(identity)
}

/// `Accept-Encoding` as actix's typed header, or `None` when it is absent or
/// not text. Members that do not parse are skipped, as actix itself does.
fn parse_accept_encoding(headers: &HeaderMap) -> Option<AcceptEncoding> {
    if !headers.contains_key(header::ACCEPT_ENCODING) {
        return None;
    }
    header::from_comma_delimited(headers.get_all(header::ACCEPT_ENCODING))
        .ok()
        .map(AcceptEncoding)
}

/// Decides whether a `GET`/`HEAD` gets `304 Not Modified` (RFC 9110 §13.2.2,
/// steps 3 and 4: only `If-None-Match` and `If-Modified-Since` apply to a
/// resource that is always there).
///
/// - `If-None-Match` present: `304` when it is `*` or lists a tag equal to
///   `etag` under the weak comparison (opaque tags equal, `W/` ignored).
///   `If-Modified-Since` is then ignored, even when no tag matched.
/// - Otherwise `If-Modified-Since`, when it is a single valid HTTP date:
///   `304` when `last_modified` is at or before it.
fn is_not_modified(headers: &HeaderMap, etag: &HeaderValue, last_modified: SystemTime) -> bool {
    let mut if_none_match = headers.get_all(header::IF_NONE_MATCH).peekable();
    if if_none_match.peek().is_some() {
        let ours = strip_weak(etag.as_bytes());
        return if_none_match.any(|value| {
            let value = value.as_bytes();
            value.trim_ascii() == b"*" || entity_tags(value).any(|tag| strip_weak(tag) == ours)
        });
    }
    let mut dates = headers.get_all(header::IF_MODIFIED_SINCE);
    let (Some(date), None) = (dates.next(), dates.next()) else {
        return false;
    };
    match date.to_str().ok().and_then(|d| d.parse::<HttpDate>().ok()) {
        Some(since) => last_modified <= SystemTime::from(since),
        None => false,
    }
}

/// The entity tags of an `If-None-Match` field value, each with its quotes
/// and any `W/` prefix. Parsing stops at the first malformed member: a tag
/// can hold a comma, so there is no safe way to skip one.
fn entity_tags(mut rest: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let start = rest
            .iter()
            .position(|b| !matches!(b, b' ' | b'\t' | b','))?;
        rest = &rest[start..];
        let open = if rest.starts_with(b"W/") { 2 } else { 0 };
        if rest.get(open) != Some(&b'"') {
            rest = &[];
            return None;
        }
        let Some(len) = rest[open + 1..].iter().position(|&b| b == b'"') else {
            rest = &[];
            return None;
        };
        let end = open + 1 + len + 1;
        let (tag, tail) = rest.split_at(end);
        rest = tail;
        Some(tag)
    })
}

/// The opaque tag (quotes included) of an entity tag.
fn strip_weak(tag: &[u8]) -> &[u8] {
    tag.strip_prefix(b"W/").unwrap_or(tag)
}

/// FNV-1a, 64 bits: the content hash behind every `ETag` and hashed name.
/// Not a defence against someone crafting collisions — the assets are our
/// own — but it spreads accidental edits evenly and needs no dependency.
pub fn content_hash(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// A content-hashed version of `name`: the first eight hex digits of
/// [`content_hash`]`(body)` go before the file name's last extension
/// (`/static/app.css` → `/static/app.3f9a2c1b.css`, `jquery.min.js` →
/// `jquery.min.3f9a2c1b.js`), or at its end when it has none
/// (`/LICENSE` → `/LICENSE.3f9a2c1b`).
pub fn hashed_name(name: &str, body: &[u8]) -> String {
    let hash = format!("{:016x}", content_hash(body));
    let hash = &hash[..NAME_HASH_DIGITS];
    let file_start = name.rfind('/').map_or(0, |i| i + 1);
    // A dot that starts the file name (`.env`) is not an extension.
    match name[file_start..].rfind('.').filter(|&i| i > 0) {
        Some(dot) => {
            let dot = file_start + dot;
            format!("{}.{hash}{}", &name[..dot], &name[dot..])
        }
        None => format!("{name}.{hash}"),
    }
}

fn variant(coding: Coding, hash: &str, body: Bytes) -> Variant {
    let suffix = coding.token_and_tag_suffix().map_or("", |(_, s)| s);
    let etag = HeaderValue::from_str(&format!("\"{hash}{suffix}\""))
        .expect("hex digits and a suffix make a valid header value");
    Variant { coding, body, etag }
}

/// Whether a content type is worth compressing: text and the text-based
/// application formats. Images other than SVG, fonts in WOFF and archives
/// are compressed already.
fn is_compressible(content_type: &str) -> bool {
    let essence = essence(content_type);
    essence.starts_with("text/")
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
        || matches!(
            essence.as_str(),
            "application/javascript"
                | "application/ecmascript"
                | "application/json"
                | "application/xml"
                | "application/wasm"
                | "image/svg+xml"
                | "image/x-icon"
                | "font/ttf"
                | "font/otf"
        )
}

/// The media type without parameters, lower-cased: `text/html`.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn gzip_compress(body: &[u8]) -> Option<Vec<u8>> {
    // GzEncoder writes no file name and a zero mtime, so the same bytes
    // always compress to the same bytes: the strong "-gz" tag stays true
    // across restarts and instances.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(body).ok()?;
    encoder.finish().ok()
}

fn brotli_compress(body: &[u8]) -> Option<Vec<u8>> {
    let params = brotli::enc::BrotliEncoderParams {
        quality: BROTLI_QUALITY,
        lgwin: BROTLI_WINDOW_BITS,
        size_hint: body.len(),
        ..Default::default()
    };
    let mut out = Vec::new();
    brotli::BrotliCompress(&mut &body[..], &mut out, &params).ok()?;
    Some(out)
}

fn whole_seconds(at: SystemTime) -> SystemTime {
    match at.duration_since(UNIX_EPOCH) {
        Ok(since) => UNIX_EPOCH + Duration::from_secs(since.as_secs()),
        // Before 1970: no HTTP date can say it; the epoch is the earliest.
        Err(_) => UNIX_EPOCH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    const T: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn date(secs: u64) -> String {
        HttpDate::from(at(secs)).to_string()
    }

    fn not_modified(pairs: &[(&str, &str)]) -> bool {
        is_not_modified(&headers(pairs), &HeaderValue::from_static("\"abc\""), at(T))
    }

    #[test]
    fn fnv1a_matches_the_published_vectors() {
        assert_eq!(content_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(content_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(content_hash(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn hashed_names_put_the_hash_before_the_extension() {
        let h = &format!("{:016x}", content_hash(b"x"))[..8];
        assert_eq!(hashed_name("/app.css", b"x"), format!("/app.{h}.css"));
        assert_eq!(
            hashed_name("/s/jquery.min.js", b"x"),
            format!("/s/jquery.min.{h}.js")
        );
        assert_eq!(hashed_name("/LICENSE", b"x"), format!("/LICENSE.{h}"));
        assert_eq!(hashed_name("/v1.2/app", b"x"), format!("/v1.2/app.{h}"));
        assert_eq!(hashed_name("/.env", b"x"), format!("/.env.{h}"));
        assert_ne!(hashed_name("/app.css", b"x"), hashed_name("/app.css", b"y"));
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison_over_lists_and_star() {
        assert!(not_modified(&[("if-none-match", "\"abc\"")]));
        assert!(not_modified(&[("if-none-match", "W/\"abc\"")]));
        assert!(not_modified(&[("if-none-match", "\"x\", W/\"y\",\"abc\"")]));
        assert!(not_modified(&[
            ("if-none-match", "\"x\""),
            ("if-none-match", "\"abc\"")
        ]));
        assert!(not_modified(&[("if-none-match", " * ")]));
        // A comma inside a tag is part of the tag.
        assert!(not_modified(&[("if-none-match", "\"a,b\", \"abc\"")]));
        assert!(!not_modified(&[("if-none-match", "\"a,b\"")]));
        assert!(!not_modified(&[("if-none-match", "\"abcd\"")]));
        assert!(!not_modified(&[("if-none-match", "\"ab\"")]));
        // Unquoted tags are malformed: nothing after them is trusted.
        assert!(!not_modified(&[("if-none-match", "abc")]));
        assert!(!not_modified(&[("if-none-match", "x, \"abc\"")]));
        assert!(!not_modified(&[("if-none-match", "\"abc")]));
        assert!(!not_modified(&[("if-none-match", "")]));
    }

    #[test]
    fn if_modified_since_counts_only_without_if_none_match() {
        assert!(not_modified(&[("if-modified-since", &date(T))]));
        assert!(not_modified(&[("if-modified-since", &date(T + 60))]));
        assert!(!not_modified(&[("if-modified-since", &date(T - 1))]));
        // A non-matching If-None-Match decides alone.
        assert!(!not_modified(&[
            ("if-none-match", "\"other\""),
            ("if-modified-since", &date(T + 60)),
        ]));
        // Invalid or repeated dates are ignored.
        assert!(!not_modified(&[("if-modified-since", "yesterday")]));
        assert!(!not_modified(&[
            ("if-modified-since", &date(T)),
            ("if-modified-since", &date(T)),
        ]));
        // The obsolete date formats are still HTTP dates.
        assert!(not_modified(&[(
            "if-modified-since",
            "Tuesday, 14-Nov-23 22:13:20 GMT"
        )]));
        assert!(!not_modified(&[]));
    }

    #[test]
    fn last_modified_is_whole_seconds() {
        let assets = StaticAssets::new().last_modified(at(T) + Duration::from_millis(999));
        assert_eq!(assets.modified_at(), at(T));
        let now = StaticAssets::new().modified_at();
        assert_eq!(now.duration_since(UNIX_EPOCH).unwrap().subsec_nanos(), 0);
    }

    fn text_asset() -> Asset {
        let body = "hello, static world. ".repeat(50);
        StaticAssets::new()
            .add("/a.txt", "text/plain; charset=utf-8", body)
            .assets
            .remove(0)
    }

    #[test]
    fn text_gets_smaller_compressed_variants_with_their_own_strong_tags() {
        let asset = text_asset();
        let codings: Vec<Coding> = asset.variants.iter().map(|v| v.coding).collect();
        assert_eq!(codings, [Coding::Identity, Coding::Brotli, Coding::Gzip]);
        let original = &asset.variants[0].body;
        let hash = format!("{:016x}", content_hash(original));
        assert_eq!(asset.variants[0].etag, format!("\"{hash}\"").as_str());
        assert_eq!(asset.variants[1].etag, format!("\"{hash}-br\"").as_str());
        assert_eq!(asset.variants[2].etag, format!("\"{hash}-gz\"").as_str());

        let mut unbrotli = Vec::new();
        brotli::Decompressor::new(&asset.variants[1].body[..], 4096)
            .read_to_end(&mut unbrotli)
            .unwrap();
        assert_eq!(unbrotli, original[..]);
        let mut ungzip = Vec::new();
        flate2::read::GzDecoder::new(&asset.variants[2].body[..])
            .read_to_end(&mut ungzip)
            .unwrap();
        assert_eq!(ungzip, original[..]);
        assert!(asset.variants[1..]
            .iter()
            .all(|v| v.body.len() < original.len()));
    }

    #[test]
    fn tiny_or_binary_content_stays_identity() {
        let set = StaticAssets::new()
            .add("/tiny.txt", "text/plain", "hi")
            .add("/logo.png", "image/png", vec![0u8; 4096]);
        assert!(set.assets.iter().all(|a| a.variants.len() == 1));
    }

    #[test]
    fn accept_encoding_picks_by_quality_then_brotli() {
        let asset = text_asset();
        let pick = |ae: Option<&str>| {
            let map = match ae {
                Some(v) => headers(&[("accept-encoding", v)]),
                None => HeaderMap::new(),
            };
            select_variant(&asset.variants, &map).coding
        };
        assert_eq!(pick(None), Coding::Identity);
        assert_eq!(pick(Some("")), Coding::Identity);
        assert_eq!(pick(Some("identity")), Coding::Identity);
        assert_eq!(pick(Some("gzip")), Coding::Gzip);
        assert_eq!(pick(Some("gzip, deflate, br, zstd")), Coding::Brotli);
        assert_eq!(pick(Some("br;q=0.5, gzip")), Coding::Gzip);
        assert_eq!(pick(Some("zstd, deflate")), Coding::Identity);
        assert_eq!(pick(Some("br;q=0, gzip;q=0")), Coding::Identity);
        assert_eq!(pick(Some("identity;q=0")), Coding::Identity);
        assert_eq!(pick(Some(";;;garbage=")), Coding::Identity);
    }

    #[test]
    fn policies_follow_the_content_type() {
        assert_eq!(
            CachePolicy::for_content_type("Text/HTML; charset=utf-8"),
            CachePolicy::Revalidate
        );
        assert_eq!(
            CachePolicy::for_content_type("text/css"),
            CachePolicy::MaxAge(DEFAULT_MAX_AGE)
        );
        assert_eq!(
            CachePolicy::Immutable.header_value(),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(CachePolicy::Revalidate.header_value(), "no-cache");
        assert_eq!(
            CachePolicy::MaxAge(DEFAULT_MAX_AGE).header_value(),
            "public, max-age=3600"
        );
    }

    #[test]
    fn urls_map_logical_names_to_served_paths() {
        let set = StaticAssets::new()
            .add_hashed("/app.js", "text/javascript", "let x = 1;")
            .add("/", "text/html", "<p>");
        assert_eq!(
            set.url("/app.js"),
            Some(hashed_name("/app.js", b"let x = 1;").as_str())
        );
        assert_eq!(set.url("/"), Some("/"));
        assert_eq!(set.url("/missing"), None);
    }

    #[test]
    #[should_panic(expected = "added twice")]
    fn duplicates_are_refused() {
        let _ = StaticAssets::new()
            .add("/", "text/html", "a")
            .add("/", "text/html", "b");
    }

    #[test]
    #[should_panic(expected = "must start with `/`")]
    fn route_patterns_are_refused_as_paths() {
        let _ = StaticAssets::new().add("/{name}", "text/plain", "a");
    }
}
