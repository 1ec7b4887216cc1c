//! The registry of upstreams: `Upstreams`, every upstream of one
//! `Network` — the configured API clients, started with the network, and
//! the plain client's per-origin upstreams, started on first use — with the
//! one arbiter (thread) all their actors run on.

use super::call::Upstream;
use super::error::HttpError;
use crate::config::{HttpConfig, NetworkConfig, UpstreamSettings};
use actix::{Arbiter, ArbiterHandle};
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
    pub(crate) fn start_extra(&self, settings: UpstreamSettings) -> Result<Arc<Upstream>, String> {
        Upstream::start(settings, &self.arbiter).map(Arc::new)
    }

    pub(super) fn origin(&self, origin: &str) -> Result<Arc<Upstream>, HttpError> {
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
