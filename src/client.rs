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
//! to them through messages.

use crate::config::{HttpConfig, NetworkConfig};
use crate::error::HttpError;
use crate::upstream::{Request, RequestBuilder, Upstream};
use actix::{Arbiter, ArbiterHandle};
use actix_web::http::{Method, Uri};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// The upstreams of one `Network`: the configured API clients and the
/// per-origin ones of the plain client, with the arbiter their actors run on.
pub(crate) struct Upstreams {
    network: NetworkConfig,
    arbiter: ArbiterHandle,
    api_clients: BTreeMap<String, Arc<Upstream>>,
    origins: Mutex<HashMap<String, Arc<Upstream>>>,
    // Keeps the arbiter thread alive as long as the upstreams are.
    _arbiter: Arbiter,
}

impl Upstreams {
    /// Starts an arbiter and the actors of every configured API client.
    /// Must be called inside an actix `System`.
    pub(crate) fn start(network: &NetworkConfig) -> Result<Arc<Self>, String> {
        let arbiter = Arbiter::new();
        let handle = arbiter.handle();
        let mut api_clients = BTreeMap::new();
        for name in network.api_clients.keys() {
            if let Some(settings) = network.api_client(name) {
                api_clients.insert(name.clone(), Arc::new(Upstream::start(settings, &handle)?));
            }
        }
        Ok(Arc::new(Upstreams {
            network: network.clone(),
            arbiter: handle,
            api_clients,
            origins: Mutex::new(HashMap::new()),
            _arbiter: arbiter,
        }))
    }

    fn http(&self) -> &HttpConfig {
        &self.network.http
    }

    pub(crate) fn api_client(&self, name: &str) -> Option<Arc<Upstream>> {
        self.api_clients.get(name).cloned()
    }

    pub(crate) fn api_clients(&self) -> impl Iterator<Item = (&String, &Arc<Upstream>)> {
        self.api_clients.iter()
    }

    /// Starts one more upstream on the same arbiter, outside the API
    /// clients (the alert webhook's, so it is not itself alerted on).
    pub(crate) fn start_extra(
        &self,
        settings: crate::config::UpstreamSettings,
    ) -> Result<Arc<Upstream>, String> {
        Upstream::start(settings, &self.arbiter).map(Arc::new)
    }

    fn origin(&self, origin: &str) -> Result<Arc<Upstream>, HttpError> {
        let mut origins = self.origins.lock().map_err(|_| HttpError::Internal {
            upstream: origin.to_owned(),
            message: "origin table poisoned".into(),
        })?;
        if let Some(u) = origins.get(origin) {
            return Ok(u.clone());
        }
        if origins.len() >= self.http().max_origins {
            return Err(HttpError::InvalidRequest {
                reason: format!(
                    "{origin}: the client already tracks network.http.max_origins = {} origins",
                    self.http().max_origins
                ),
            });
        }
        let upstream = Upstream::start(self.network.origin(origin), &self.arbiter)
            .map_err(|reason| HttpError::InvalidRequest { reason })?;
        let upstream = Arc::new(upstream);
        origins.insert(origin.to_owned(), upstream.clone());
        Ok(upstream)
    }
}

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
