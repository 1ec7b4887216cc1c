//! `network.gateway`: the OpenAI-compatible routes (`POST
//! /v1/chat/completions`, `GET /v1/models`): which API clients they forward
//! to, the tokens their callers present, and their body and stream bounds.

use super::checks::{positive, ConfigError, Seconds};
use serde::Deserialize;

/// `network.gateway`: `POST /v1/chat/completions` and `GET /v1/models`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The API clients to forward to, in order: the first is used while it
    /// answers; the next when it is open, limited, overloaded or failing.
    /// Default `["openai"]`.
    pub clients: Vec<String>,
    /// Bearer tokens the gateway's own callers must present (separate from
    /// any upstream key). Empty: no token is required (a warning says so).
    pub tokens: Vec<String>,
    /// The largest request body, bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// How long a streamed answer's reader may take nothing, once the
    /// buffers between it and the upstream are full, before the upstream
    /// call is abandoned (its connection and bulkhead slot freed, the
    /// reader's connection cut, `happynet_upstream_stream_write_timeouts_total`
    /// counted), seconds; > 0. Default 30.
    pub stream_write_timeout: Seconds,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            clients: vec!["openai".to_owned()],
            tokens: Vec::new(),
            max_body_bytes: 1 << 20,
            stream_write_timeout: Seconds::secs(30),
        }
    }
}

impl GatewayConfig {
    /// Checks `network.gateway`; the error names the key's path.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        positive(
            "network.gateway.stream_write_timeout",
            self.stream_write_timeout,
        )
    }
}
