//! The clients app code calls upstreams with.
//!
//! - [`HttpClient`]: any URL — `client.get("https://api.example.com/data")`.
//!   It keeps one pool, breaker and limiter per origin (`scheme://host:port`),
//!   created on first use from `network.http`, at most
//!   `network.http.max_origins` of them.
//! - [`ApiClient`]: one configured `network.api_clients.<name>` — paths are
//!   relative to its `base_url`, and calls are balanced over its endpoints.
//!
//! Both are cheap to clone and `Send`, so any actor or handler can hold one.
//! The actors behind them run on one dedicated arbiter (thread), because the
//! pool's awc client cannot move between threads; callers on any thread talk
//! to them through messages. Each method returns a [`RequestBuilder`]: the
//! first step of the call path (see [`crate::upstream`]).

use super::call::Upstream;
use super::error::HttpError;
use super::registry::Upstreams;
use super::types::{Request, RequestBuilder};
use actix_web::http::{Method, Uri};
use std::sync::Arc;

/// Splits an absolute URL into its origin and its path-and-query.
fn split_url(url: &str) -> Result<(String, String), HttpError> {
    let invalid = |reason: &str| HttpError::InvalidRequest {
        reason: format!("{url:?}: {reason}"),
    };
    let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some(s @ ("http" | "https")) => s,
        _ => return Err(invalid("only http:// and https:// URLs")),
    };
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Ok((format!("{scheme}://{authority}"), path.to_owned()))
}

/// A client for any URL; see the module docs.
#[derive(Clone)]
pub struct HttpClient {
    upstreams: Arc<Upstreams>,
}

impl HttpClient {
    pub(crate) fn new(upstreams: Arc<Upstreams>) -> Self {
        HttpClient { upstreams }
    }

    /// A request with any method.
    pub fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let (target, path) = match split_url(url) {
            Ok((origin, path)) => (self.upstreams.origin(&origin), path),
            Err(e) => (Err(e), String::new()),
        };
        RequestBuilder {
            target,
            request: Request::new(method, path),
        }
    }

    /// `GET url`.
    pub fn get(&self, url: &str) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    /// `POST url` (not retried unless you opt in).
    pub fn post(&self, url: &str) -> RequestBuilder {
        self.request(Method::POST, url)
    }

    /// `PUT url`.
    pub fn put(&self, url: &str) -> RequestBuilder {
        self.request(Method::PUT, url)
    }

    /// `DELETE url`.
    pub fn delete(&self, url: &str) -> RequestBuilder {
        self.request(Method::DELETE, url)
    }
}

/// A client for one configured `network.api_clients.<name>`.
#[derive(Clone)]
pub struct ApiClient {
    upstream: Arc<Upstream>,
}

impl ApiClient {
    pub(crate) fn new(upstream: Arc<Upstream>) -> Self {
        ApiClient { upstream }
    }

    /// The client's name.
    pub fn name(&self) -> &str {
        self.upstream.name()
    }

    /// The upstream behind it (addresses of its actors, settings).
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// A request with any method; `path` (with any query) is relative to the
    /// client's base URL and must start with `/`.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let target = if path.starts_with('/') {
            Ok(self.upstream.clone())
        } else {
            Err(HttpError::InvalidRequest {
                reason: format!("path {path:?} must start with /"),
            })
        };
        RequestBuilder {
            target,
            request: Request::new(method, path.to_owned()),
        }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> RequestBuilder {
        self.request(Method::GET, path)
    }

    /// `POST path` (not retried unless you opt in).
    pub fn post(&self, path: &str) -> RequestBuilder {
        self.request(Method::POST, path)
    }

    /// `PUT path`.
    pub fn put(&self, path: &str) -> RequestBuilder {
        self.request(Method::PUT, path)
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> RequestBuilder {
        self.request(Method::DELETE, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_origin_and_path() {
        assert_eq!(
            split_url("https://api.example.com/data?x=1").unwrap(),
            ("https://api.example.com".into(), "/data?x=1".into())
        );
        assert_eq!(
            split_url("http://127.0.0.1:9000").unwrap(),
            ("http://127.0.0.1:9000".into(), "/".into())
        );
        assert!(split_url("ftp://x/y").is_err());
        assert!(split_url("/relative").is_err());
        assert!(split_url("not a url").is_err());
    }
}
