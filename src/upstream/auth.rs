//! Credentials for upstream APIs, kept out of config files and out of logs.
//!
//! A client's `auth` names the environment variable that holds its secret
//! (`"key_env": "OPENAI_API_KEY"`), never the secret itself. The variable is
//! read once, when the network starts. The secret lives in a [`Secret`], whose
//! `Debug` and `Display` print `***`, and the header that carries it is
//! marked sensitive so that `http`'s own `Debug` redacts it too. When the
//! variable is not set, every call fails with an error that names the
//! variable — and a warning says so at start-up.

use super::error::HttpError;
use crate::config::AuthConfig;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use std::fmt;

/// A secret string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself; every use is a place it could leak, so keep them
    /// few.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where a credential goes.
#[derive(Debug, Clone)]
enum Placement {
    Bearer,
    Header(HeaderName),
    Query(String),
}

impl Placement {
    /// Whether `secret` can be sent this way: header placements need a
    /// valid header value; a query parameter is percent-encoded, so any
    /// value goes.
    fn accepts(&self, secret: &str) -> bool {
        match self {
            Placement::Bearer => HeaderValue::try_from(format!("Bearer {secret}")).is_ok(),
            Placement::Header(_) => HeaderValue::try_from(secret).is_ok(),
            Placement::Query(_) => true,
        }
    }
}

/// One client's credential, resolved at start.
#[derive(Debug, Clone)]
pub struct Auth {
    placement: Placement,
    key_env: String,
    secret: Option<Secret>,
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl Auth {
    /// Resolves `config` for client `name`, reading its environment
    /// variable now. An invalid header name is an error naming the path.
    pub fn resolve(name: &str, config: &AuthConfig) -> Result<Auth, String> {
        let (placement, key_env) = match config {
            AuthConfig::Bearer { key_env } => (Placement::Bearer, key_env),
            AuthConfig::Header { name: h, key_env } => (
                Placement::Header(HeaderName::try_from(h.as_str()).map_err(|_| {
                    format!("network.api_clients.{name}.auth.name: {h:?} is not a header name")
                })?),
                key_env,
            ),
            AuthConfig::Query { name: q, key_env } => (Placement::Query(q.clone()), key_env),
        };
        let mut secret = std::env::var(key_env)
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret);
        if secret.is_none() {
            log::warn!(
                "api client {name}: environment variable {key_env} is not set; its calls will fail until it is"
            );
        }
        // A value that cannot go in a header (a newline, a control
        // character) is the deployment's mistake, not the caller's: judged
        // once here, never echoed, and its calls fail as with no credential
        // (502, the next gateway client is tried) rather than as a bad
        // request (400) from whoever happened to call.
        if secret
            .as_ref()
            .is_some_and(|s| !placement.accepts(s.expose()))
        {
            log::warn!(
                "api client {name}: the value of {key_env} is not a valid header value; its calls will fail until it is"
            );
            secret = None;
        }
        Ok(Auth {
            placement,
            key_env: key_env.clone(),
            secret,
        })
    }

    /// The variable the secret comes from.
    pub fn key_env(&self) -> &str {
        &self.key_env
    }

    /// Adds the credential to an outgoing request.
    pub(crate) fn apply(
        &self,
        upstream: &str,
        path: &mut String,
        headers: &mut Vec<(HeaderName, HeaderValue)>,
    ) -> Result<(), HttpError> {
        let Some(secret) = &self.secret else {
            return Err(HttpError::MissingSecret {
                upstream: upstream.to_owned(),
                variable: self.key_env.clone(),
            });
        };
        let header_value = |text: String| {
            HeaderValue::try_from(text)
                .map(|mut v| {
                    v.set_sensitive(true);
                    v
                })
                // Never echo the value: say which variable holds a bad one.
                .map_err(|_| HttpError::InvalidRequest {
                    reason: format!(
                        "upstream {upstream}: the value of {} is not a valid header value",
                        self.key_env
                    ),
                })
        };
        match &self.placement {
            Placement::Bearer => {
                headers.retain(|(n, _)| n != header::AUTHORIZATION);
                headers.push((
                    header::AUTHORIZATION,
                    header_value(format!("Bearer {}", secret.expose()))?,
                ));
            }
            Placement::Header(name) => {
                headers.retain(|(n, _)| n != name);
                headers.push((name.clone(), header_value(secret.expose().to_owned())?));
            }
            Placement::Query(name) => {
                path.push(if path.contains('?') { '&' } else { '?' });
                path.push_str(&encode_query_value(name));
                path.push('=');
                path.push_str(&encode_query_value(secret.expose()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_that_cannot_be_a_header_value_is_refused_where_it_would_be_a_header() {
        // `resolve` drops such a value at start (its calls then fail as
        // MissingSecret, 502), so a caller never gets a 400 for it.
        let bad = "sk-live\nX-Injected: 1";
        assert!(!Placement::Bearer.accepts(bad));
        assert!(!Placement::Header(HeaderName::from_static("x-api-key")).accepts(bad));
        assert!(Placement::Query("k".into()).accepts(bad), "percent-encoded");
        assert!(Placement::Bearer.accepts("sk-live-123"));
        let unusable = Auth {
            placement: Placement::Bearer,
            key_env: "K".into(),
            secret: None,
        };
        let err = unusable
            .apply("u", &mut "/x".to_owned(), &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, HttpError::MissingSecret { .. }), "{err:?}");
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("sk-live-123");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let auth = Auth {
            placement: Placement::Bearer,
            key_env: "K".into(),
            secret: Some(s),
        };
        assert!(!format!("{auth:?}").contains("sk-live"));
    }

    #[test]
    fn credentials_go_where_configured() {
        let auth = |placement| Auth {
            placement,
            key_env: "K".into(),
            secret: Some(Secret::new("a b/c")),
        };
        let mut path = "/x".to_owned();
        let mut headers = vec![(header::AUTHORIZATION, HeaderValue::from_static("caller"))];
        auth(Placement::Bearer)
            .apply("u", &mut path, &mut headers)
            .unwrap();
        assert_eq!(headers.len(), 1, "the caller's Authorization is replaced");
        assert_eq!(headers[0].1, "Bearer a b/c");
        assert!(headers[0].1.is_sensitive());

        auth(Placement::Query("api_key".into()))
            .apply("u", &mut path, &mut headers)
            .unwrap();
        assert_eq!(path, "/x?api_key=a%20b%2Fc");
        auth(Placement::Query("k".into()))
            .apply("u", &mut path, &mut headers)
            .unwrap();
        assert!(path.ends_with("&k=a%20b%2Fc"));
    }

    #[test]
    fn a_missing_secret_names_its_variable() {
        let auth = Auth {
            placement: Placement::Bearer,
            key_env: "HAPPYNET_TEST_NOPE".into(),
            secret: None,
        };
        let err = auth
            .apply("openai", &mut String::new(), &mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("HAPPYNET_TEST_NOPE"), "{err}");
        assert!(err.to_string().contains("openai"), "{err}");
    }
}
