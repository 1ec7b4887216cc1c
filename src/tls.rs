//! TLS for the HTTP server: a rustls [`ServerConfig`] from a PEM
//! certificate chain and a PEM private key, with errors that name the file.
//!
//! ```no_run
//! # fn demo(net: happynet::Network) -> Result<(), Box<dyn std::error::Error>> {
//! use actix_web::{App, HttpServer};
//! let tls = happynet::tls::server_config("cert.pem", "key.pem")?;
//! let routes = net.configure();
//! HttpServer::new(move || App::new().configure(routes.clone()))
//!     .bind_rustls_0_23(("0.0.0.0", 8443), tls)?;
//! # Ok(()) }
//! ```
//!
//! The crypto provider is rustls' `ring`, the one the upstream client (awc)
//! already uses, passed explicitly: rustls' process-wide default panics when
//! it cannot tell which provider to pick, and loading a file must never
//! panic. The server speaks TLS 1.3 and 1.2 with rustls' safe defaults;
//! actix-web adds the ALPN protocols (`h2`, `http/1.1`) itself.
//!
//! `Network::on_connect` works over TLS too: it finds the TCP socket under
//! the TLS stream, so the per-IP connection cap and the slow-consumer
//! cut-off apply to HTTPS clients as well.
//!
//! PEM parsing is `rustls-pki-types`' (re-exported by rustls), the
//! maintained successor of `rustls-pemfile`.

use rustls::crypto::ring;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The largest PEM file read. A certificate chain or a key is a few
/// kilobytes; anything this big is the wrong file, and is refused before
/// it is read into memory.
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why [`server_config`] failed. Every variant names the file involved.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// The file could not be opened or read.
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is larger than [`MAX_PEM_BYTES`].
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        bytes: u64,
    },
    /// The file is not valid PEM, or holds no item of the kind wanted
    /// (`CERTIFICATE`, or a `PRIVATE KEY` in PKCS#8, PKCS#1 or SEC1 form).
    BadPem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// rustls refused the pair: the key does not match the certificate, or
    /// the key or certificate is unusable.
    Rejected {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        message: String,
    },
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            TlsError::TooLarge { path, bytes } => write!(
                f,
                "{} is {bytes} bytes, larger than any PEM certificate or key \
                 ({MAX_PEM_BYTES} at most)",
                path.display()
            ),
            TlsError::BadPem { path, message } => write!(f, "{}: {message}", path.display()),
            TlsError::Rejected { cert, key, message } => write!(
                f,
                "rustls refused the certificate {} with the key {} ({message}); \
                 the key must match the first (leaf) certificate in the file, and \
                 ring signs with RSA, ECDSA P-256/P-384 and Ed25519 keys only",
                cert.display(),
                key.display()
            ),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Reads a whole file of at most [`MAX_PEM_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let read_err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells "exactly the limit" from "over it".
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if len > MAX_PEM_BYTES {
        let bytes = std::fs::metadata(path).map_or(len, |m| m.len());
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
            bytes,
        });
    }
    Ok(bytes)
}

fn bad_pem(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::BadPem {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Describes a PEM parse error without echoing the file's bytes (a key
/// file's contents must not reach a log).
fn describe(e: &pem::Error) -> String {
    match e {
        pem::Error::NoItemsFound => "no PEM item of the expected kind".to_owned(),
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line".to_owned(),
        pem::Error::IllegalSectionStart { .. } => "a malformed PEM BEGIN line".to_owned(),
        pem::Error::Base64Decode(_) => "a PEM section is not valid base64".to_owned(),
        pem::Error::Io(e) => e.to_string(),
        _ => "not valid PEM".to_owned(),
    }
}

/// The certificates in a PEM file, end-entity first.
pub fn load_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let path = path.as_ref();
    let bytes = read_bounded(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad_pem(path, describe(&e)))?;
    if certs.is_empty() {
        return Err(bad_pem(path, "no CERTIFICATE section found"));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, TlsError> {
    let path = path.as_ref();
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => bad_pem(
            path,
            "no PRIVATE KEY section found (PKCS#8, RSA or EC; an encrypted key must be decrypted first)",
        ),
        e => bad_pem(path, describe(&e)),
    })
}

/// A rustls server configuration serving the certificate chain in
/// `cert_path` with the key in `key_path` (both PEM), for
/// `HttpServer::bind_rustls_0_23` / `listen_rustls_0_23`.
///
/// Fails, naming the file, when a file cannot be read or is over
/// [`MAX_PEM_BYTES`], holds no certificate or no key, or when the key does
/// not belong to the certificate. Never panics.
pub fn server_config(
    cert_path: impl AsRef<Path>,
    key_path: impl AsRef<Path>,
) -> Result<ServerConfig, TlsError> {
    let (cert_path, key_path) = (cert_path.as_ref(), key_path.as_ref());
    let certs = load_certs(cert_path)?;
    let key = load_key(key_path)?;
    let rejected = |e: rustls::Error| TlsError::Rejected {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
        message: e.to_string(),
    };
    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(rejected)?
        .with_no_client_auth()
        // Checks that the key's public half is the certificate's.
        .with_single_cert(certs, key)
        .map_err(rejected)?;
    Ok(config)
}
