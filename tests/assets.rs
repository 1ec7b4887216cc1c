//! Static assets as a browser and a CDN see them: a real actix-web server on
//! `127.0.0.1:0` serving a `StaticAssets` set, driven by awc and, where the
//! exact bytes on the wire matter (`HEAD`, `304`), by a raw TCP client.
//!
//! Each test names what a cache relies on: validators that revalidate to an
//! empty `304`, cache lifetimes by kind of file, compressed variants that
//! decode to the original with their own tags and `Vary`, `HEAD` without a
//! body, and `404` for everything that is not an asset.

use actix_web::dev::ServerHandle;
use actix_web::http::header::HttpDate;
use actix_web::http::{Method, StatusCode};
use actix_web::{App, HttpServer};
use awc::http::header::HeaderMap;
use happynet::assets::{content_hash, hashed_name, StaticAssets};
use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The set's `Last-Modified`: 2023-11-14 22:13:20 UTC.
const MODIFIED_SECS: u64 = 1_700_000_000;

const CSS: &str = "body { font-family: sans-serif; margin: 0 auto; max-width: 40em }\n\
                   .message { padding: .5em; border-bottom: 1px solid #ddd }\n\
                   .message:nth-child(odd) { background: #f6f6f6 }\n";
const ROBOTS: &str = "User-agent: *\nDisallow:\n";

/// A page big enough that both compressors shrink it.
fn index_html() -> String {
    let rows: String = (0..40)
        .map(|i| format!("    <li class=\"message\">Message number {i} in the lobby</li>\n"))
        .collect();
    format!("<!doctype html>\n<html><head><title>demo</title></head>\n<body><ul>\n{rows}</ul></body></html>\n")
}

/// A few bytes that look nothing like text.
fn logo_png() -> Vec<u8> {
    (0..2048u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

fn modified_at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(MODIFIED_SECS)
}

fn http_date(at: SystemTime) -> String {
    HttpDate::from(at).to_string()
}

struct Server {
    addr: SocketAddr,
    handle: ServerHandle,
    css_url: String,
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn stop(self) {
        self.handle.stop(false).await;
    }
}

/// Serves the test set, and nothing else, on `127.0.0.1:0`.
async fn start() -> Server {
    let assets = StaticAssets::new()
        .last_modified(modified_at())
        .add_hashed("/app.css", "text/css; charset=utf-8", CSS)
        .add("/", "text/html; charset=utf-8", index_html())
        .add("/robots.txt", "text/plain; charset=utf-8", ROBOTS)
        .add("/logo.png", "image/png", logo_png());
    let css_url = assets.url("/app.css").expect("added").to_owned();
    let routes = assets.configure();
    let server = HttpServer::new(move || App::new().configure(routes.clone()))
        .workers(1)
        .disable_signals()
        .bind(("127.0.0.1", 0))
        .expect("bind 127.0.0.1:0");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Server {
        addr,
        handle,
        css_url,
    }
}

/// What came back, body as sent on the wire (awc's decompression off).
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("an ASCII header"))
    }

    fn etag(&self) -> &str {
        self.header("etag").expect("an ETag")
    }
}

/// A request with exactly the given headers; no `Accept-Encoding` unless
/// given (awc would otherwise offer every coding it knows).
async fn request(method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    let client = awc::Client::default();
    let mut req = client.request(method, url).no_decompress();
    for (name, value) in headers {
        req = req.insert_header((*name, *value));
    }
    let mut resp = req.send().await.expect("the server answers");
    let body = resp.body().await.expect("a body").to_vec();
    Reply {
        status: resp.status(),
        headers: resp.headers().clone(),
        body,
    }
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    request(Method::GET, url, headers).await
}

/// The raw bytes of one response to `request_head` (sent with
/// `Connection: close`), split into the head and whatever followed it.
async fn raw_exchange(addr: SocketAddr, request_head: &str) -> (String, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(request_head.as_bytes())
        .await
        .expect("send the request");
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the connection")
        .expect("read the response");
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head")
        + 4;
    let head = String::from_utf8(bytes[..end].to_vec()).expect("an ASCII head");
    (head.to_ascii_lowercase(), bytes[end..].to_vec())
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn unbrotli(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::Decompressor::new(bytes, 4096)
        .read_to_end(&mut out)
        .expect("valid brotli");
    out
}

/// A strong entity tag: quoted, no `W/`.
fn assert_strong(etag: &str) {
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
        "ETag {etag} is a quoted strong tag"
    );
}

#[actix_web::test]
async fn first_get_carries_validators_and_cache_policy() {
    let server = start().await;
    let page = get(&server.url("/"), &[("accept-encoding", "identity")]).await;

    assert_eq!(page.status, 200);
    assert_eq!(page.body, index_html().as_bytes());
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("content-encoding"), None);
    assert_strong(page.etag());
    assert_eq!(
        page.etag(),
        format!("\"{:016x}\"", content_hash(index_html().as_bytes()))
    );
    assert_eq!(
        page.header("last-modified"),
        Some(http_date(modified_at()).as_str())
    );
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    // Even the identity response varies with Accept-Encoding.
    assert_eq!(page.header("vary"), Some("Accept-Encoding"));

    // Stable across requests: a CDN and a browser must see the same validators.
    let again = get(&server.url("/"), &[("accept-encoding", "identity")]).await;
    assert_eq!(again.etag(), page.etag());
    assert_eq!(again.header("last-modified"), page.header("last-modified"));
    server.stop().await;
}

#[actix_web::test]
async fn if_none_match_revalidates_to_an_empty_304() {
    let server = start().await;
    let url = server.url("/");
    let first = get(&url, &[("accept-encoding", "identity")]).await;
    let etag = first.etag().to_owned();

    let weak = format!("W/{etag}");
    let listed = format!("\"stale\", {etag}");
    for if_none_match in [etag.as_str(), weak.as_str(), listed.as_str(), "*"] {
        let reval = get(
            &url,
            &[
                ("accept-encoding", "identity"),
                ("if-none-match", if_none_match),
            ],
        )
        .await;
        assert_eq!(reval.status, 304, "If-None-Match: {if_none_match}");
        assert!(reval.body.is_empty());
        // The 304 refreshes exactly what the stored copy was served with.
        assert_eq!(reval.etag(), etag);
        assert_eq!(reval.header("last-modified"), first.header("last-modified"));
        assert_eq!(reval.header("cache-control"), Some("no-cache"));
        assert_eq!(reval.header("vary"), Some("Accept-Encoding"));
        assert_eq!(reval.header("content-type"), None);
    }

    // On the wire: no body and no Content-Length after the 304's head.
    let (head, rest) = raw_exchange(
        server.addr,
        &format!(
            "GET / HTTP/1.1\r\nHost: test\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(head.starts_with("http/1.1 304"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(rest.is_empty(), "a 304 carried {} body bytes", rest.len());
    server.stop().await;
}

#[actix_web::test]
async fn if_modified_since_revalidates_when_there_is_no_if_none_match() {
    let server = start().await;
    let url = server.url("/");
    let at = http_date(modified_at());
    let later = http_date(modified_at() + Duration::from_secs(3600));
    let earlier = http_date(modified_at() - Duration::from_secs(1));

    for since in [&at, &later] {
        let reval = get(&url, &[("if-modified-since", since)]).await;
        assert_eq!(reval.status, 304, "If-Modified-Since: {since}");
        assert!(reval.body.is_empty());
        assert_eq!(reval.header("last-modified"), Some(at.as_str()));
        assert_eq!(reval.header("cache-control"), Some("no-cache"));
        assert!(reval.header("etag").is_some());
    }

    let changed = get(&url, &[("if-modified-since", &earlier)]).await;
    assert_eq!(changed.status, 200);
    assert_eq!(changed.body, index_html().as_bytes());

    // If-None-Match wins: a tag that does not match means a full response,
    // whatever the date says.
    let both = get(
        &url,
        &[
            ("if-none-match", "\"stale\""),
            ("if-modified-since", &later),
        ],
    )
    .await;
    assert_eq!(both.status, 200);
    assert_eq!(both.body, index_html().as_bytes());
    server.stop().await;
}

#[actix_web::test]
async fn a_changed_validator_gets_the_full_response() {
    let server = start().await;
    let url = server.url("/");
    let current = get(&url, &[("accept-encoding", "identity")]).await;

    // What a client holds after a deploy changed the page: another tag.
    let old_tag = format!("\"{:016x}\"", content_hash(b"the previous page"));
    let reply = get(
        &url,
        &[("accept-encoding", "identity"), ("if-none-match", &old_tag)],
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, index_html().as_bytes());
    assert_eq!(reply.etag(), current.etag());
    assert_ne!(reply.etag(), old_tag);
    server.stop().await;
}

#[actix_web::test]
async fn hashed_names_are_immutable_html_revalidates_the_rest_is_an_hour() {
    let server = start().await;
    // The served name carries the content hash; the plain name is not served.
    assert_eq!(server.css_url, hashed_name("/app.css", CSS.as_bytes()));
    let hash = &format!("{:016x}", content_hash(CSS.as_bytes()))[..8];
    assert_eq!(server.css_url, format!("/app.{hash}.css"));

    let css = get(&server.url(&server.css_url), &[]).await;
    assert_eq!(css.status, 200);
    assert_eq!(css.body, CSS.as_bytes());
    assert_eq!(
        css.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(css.header("content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(get(&server.url("/app.css"), &[]).await.status, 404);

    let html = get(&server.url("/"), &[]).await;
    assert_eq!(html.header("cache-control"), Some("no-cache"));

    for path in ["/robots.txt", "/logo.png"] {
        let other = get(&server.url(path), &[("accept-encoding", "gzip, br")]).await;
        assert_eq!(other.status, 200, "{path}");
        assert_eq!(
            other.header("cache-control"),
            Some("public, max-age=3600"),
            "{path}"
        );
        // Too small, or not text: served as is, and nothing varies.
        assert_eq!(other.header("content-encoding"), None, "{path}");
        assert_eq!(other.header("vary"), None, "{path}");
    }
    let logo = get(&server.url("/logo.png"), &[]).await;
    assert_eq!(logo.body, logo_png());
    assert_eq!(
        get(&server.url("/robots.txt"), &[]).await.body,
        ROBOTS.as_bytes()
    );
    server.stop().await;
}

#[actix_web::test]
async fn gzip_and_brotli_decode_to_the_original_with_their_own_tags() {
    let server = start().await;
    let url = server.url("/");
    let original = index_html().into_bytes();
    let identity = get(&url, &[("accept-encoding", "identity")]).await;

    let gz = get(&url, &[("accept-encoding", "gzip")]).await;
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.header("vary"), Some("Accept-Encoding"));
    assert_eq!(gz.header("content-type"), Some("text/html; charset=utf-8"));
    assert!(gz.body.len() < original.len());
    assert_eq!(gunzip(&gz.body), original);

    // Brotli is preferred when both are offered, as browsers do.
    let br = get(&url, &[("accept-encoding", "gzip, deflate, br")]).await;
    assert_eq!(br.status, 200);
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(br.header("vary"), Some("Accept-Encoding"));
    assert_eq!(unbrotli(&br.body), original);

    // Different bytes, different strong tags: a cache never confuses them.
    for variant in [&gz, &br] {
        assert_strong(variant.etag());
    }
    let base = identity.etag().trim_matches('"');
    assert_eq!(gz.etag(), format!("\"{base}-gz\""));
    assert_eq!(br.etag(), format!("\"{base}-br\""));

    // A client's q-values are honoured.
    let prefers_gzip = get(&url, &[("accept-encoding", "br;q=0.5, gzip")]).await;
    assert_eq!(prefers_gzip.header("content-encoding"), Some("gzip"));

    // Each variant revalidates with its own tag, keeping Vary on the 304.
    let reval = get(
        &url,
        &[
            ("accept-encoding", "gzip, br"),
            ("if-none-match", br.etag()),
        ],
    )
    .await;
    assert_eq!(reval.status, 304);
    assert!(reval.body.is_empty());
    assert_eq!(reval.etag(), br.etag());
    assert_eq!(reval.header("vary"), Some("Accept-Encoding"));
    // The gzip copy does not validate the brotli one.
    let other = get(
        &url,
        &[("accept-encoding", "br"), ("if-none-match", gz.etag())],
    )
    .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("content-encoding"), Some("br"));

    // And awc's own decompression, as any HTTP client would do it.
    let mut resp = awc::Client::default()
        .get(&url)
        .send()
        .await
        .expect("the server answers");
    assert_eq!(resp.status(), 200);
    let decoded = resp.body().await.expect("a decodable body");
    assert_eq!(decoded, original);
    server.stop().await;
}

#[actix_web::test]
async fn head_is_get_without_a_body() {
    let server = start().await;
    for encoding in ["identity", "gzip", "br"] {
        let get_reply = get(&server.url("/"), &[("accept-encoding", encoding)]).await;
        let head = request(
            Method::HEAD,
            &server.url("/"),
            &[("accept-encoding", encoding)],
        )
        .await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        for name in [
            "etag",
            "last-modified",
            "cache-control",
            "content-type",
            "content-encoding",
            "vary",
            "content-length",
        ] {
            assert_eq!(
                head.header(name),
                get_reply.header(name),
                "{name} ({encoding})"
            );
        }
        assert_eq!(
            head.header("content-length"),
            Some(get_reply.body.len().to_string().as_str())
        );
    }

    // On the wire: the real Content-Length, then nothing.
    let (head, rest) = raw_exchange(
        server.addr,
        "HEAD / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let length = format!("content-length: {}\r\n", index_html().len());
    assert!(head.contains(&length), "{head}");
    assert!(rest.is_empty(), "HEAD carried {} body bytes", rest.len());

    // A conditional HEAD revalidates like a GET.
    let etag = get(&server.url("/"), &[]).await.etag().to_owned();
    let reval = request(Method::HEAD, &server.url("/"), &[("if-none-match", &etag)]).await;
    assert_eq!(reval.status, 304);
    server.stop().await;
}

#[actix_web::test]
async fn unknown_paths_are_404_and_other_methods_405() {
    let server = start().await;
    for path in ["/missing", "/index.html", "/robots.txt/", "/app.css"] {
        assert_eq!(get(&server.url(path), &[]).await.status, 404, "{path}");
    }
    let post = request(Method::POST, &server.url("/"), &[]).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    server.stop().await;
}
