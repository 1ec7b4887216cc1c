//! HTTPS and WSS end to end: a self-signed certificate made at test time
//! (rcgen), `happynet::tls::server_config` loading it from PEM files, a real
//! actix-web server on `127.0.0.1:0` serving happynet's routes over TLS, and
//! awc trusting exactly that certificate. Also the loader's errors, each
//! naming its file, and `Network::on_connect` still guarding TLS
//! connections.

#![allow(clippy::unwrap_used)]

mod support;

use actix_web::{App, HttpServer};
use awc::ws;
use futures::{SinkExt, StreamExt};
use happynet::tls::{self, TlsError};
use happynet::Network;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use support::{config, WAIT};

/// A scratch directory for one test's PEM files, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("happynet-tls-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost: its PEM files
/// and its DER form for the client's trust store.
struct SelfSigned {
    cert: PathBuf,
    key: PathBuf,
    der: rustls::pki_types::CertificateDer<'static>,
}

fn self_signed(dir: &Scratch) -> SelfSigned {
    let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    let made = rcgen::generate_simple_self_signed(names).unwrap();
    SelfSigned {
        cert: dir.write("cert.pem", made.cert.pem()),
        key: dir.write("key.pem", made.signing_key.serialize_pem()),
        der: made.cert.der().clone(),
    }
}

/// An awc client that trusts `cert` and nothing else, speaking HTTP/1.1
/// (awc's WebSocket handshake needs it).
fn client_trusting(cert: &rustls::pki_types::CertificateDer<'static>) -> awc::Client {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // awc uses a given rustls config as is (its `max_http_version` would
    // replace the config with the default trust store).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    awc::Client::builder()
        .connector(awc::Connector::new().rustls_0_23(Arc::new(config)))
        .timeout(WAIT)
        .finish()
}

type Framed = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

/// The next text frame, skipping pings; panics on anything else or after
/// [`WAIT`].
async fn next_text(framed: &mut Framed) -> String {
    loop {
        match tokio::time::timeout(WAIT, framed.next()).await {
            Ok(Some(Ok(ws::Frame::Text(t)))) => return String::from_utf8(t.to_vec()).unwrap(),
            Ok(Some(Ok(ws::Frame::Ping(_)))) => {}
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// happynet's routes over HTTPS on `127.0.0.1:0`.
fn start_https(
    net: &Network,
    tls: rustls::ServerConfig,
) -> (SocketAddr, actix_web::dev::ServerHandle) {
    let routes = net.configure();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = HttpServer::new(move || App::new().configure(routes.clone()))
        .workers(1)
        .on_connect(net.on_connect())
        .disable_signals()
        .listen_rustls_0_23(listener, tls)
        .unwrap();
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    (addr, handle)
}

#[actix_web::test]
async fn https_and_wss_work_with_a_certificate_loaded_from_pem() {
    let dir = Scratch::new("serve");
    let cert = self_signed(&dir);
    let tls = tls::server_config(&cert.cert, &cert.key).unwrap();
    let net = Network::start(config("{}")).unwrap();
    let (addr, handle) = start_https(&net, tls);
    let client = client_trusting(&cert.der);

    let mut resp = client
        .get(format!("https://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let health: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(health["status"], "ok");

    // A WebSocket over TLS: a protocol client gets the welcome frame, then
    // an echo of its text through the hub (text goes to the sender's rooms,
    // itself too).
    let (_, mut framed) = client
        .ws(format!("wss://{addr}/ws"))
        .protocols(["happynet.v1"])
        .connect()
        .await
        .unwrap();
    let welcome = next_text(&mut framed).await;
    assert!(welcome.contains(r#""type":"welcome""#), "{welcome}");
    framed
        .send(ws::Message::Text("over tls".into()))
        .await
        .unwrap();
    // Stamped with its offset in the lobby's history.
    let echo: serde_json::Value = serde_json::from_str(&next_text(&mut framed).await).unwrap();
    assert_eq!(
        (&echo["type"], &echo["room"], &echo["offset"], &echo["data"]),
        (
            &serde_json::json!("message"),
            &serde_json::json!("lobby"),
            &serde_json::json!(1),
            &serde_json::json!("over tls")
        ),
        "{echo}"
    );
    assert!(
        echo["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{echo}"
    );
    assert_eq!(net.open_connections(), 1);

    // A client that does not trust the certificate is refused by TLS.
    let untrusting = awc::Client::builder().timeout(WAIT).finish();
    let refused = untrusting
        .get(format!("https://{addr}/health"))
        .send()
        .await;
    assert!(refused.is_err(), "{refused:?}");

    net.shutdown().await;
    handle.stop(false).await;
}

#[actix_web::test]
async fn on_connect_guards_tls_connections_too() {
    let dir = Scratch::new("cap");
    let cert = self_signed(&dir);
    let tls = tls::server_config(&cert.cert, &cert.key).unwrap();
    // One TCP connection per IP, loopback not exempt.
    let net = Network::start(config(
        r#"{"network":{"security":{"exempt_ips":[],
            "max_tcp_connections_per_ip":1,"max_connections_per_ip":1}}}"#,
    ))
    .unwrap();
    let (addr, handle) = start_https(&net, tls);
    let client = client_trusting(&cert.der);
    let (_, _held) = client
        .ws(format!("wss://{addr}/ws"))
        .connect()
        .await
        .unwrap();
    // A second connection from the same IP is cut off by `on_connect`,
    // which found the socket under the TLS stream.
    let second = client.get(format!("https://{addr}/health")).send().await;
    assert!(second.is_err(), "{second:?}");
    assert_eq!(net.security().stats().connections_over_ip_cap, 1);
    net.shutdown().await;
    handle.stop(false).await;
}

/// The error's text, checked to name `path`.
fn names(e: &TlsError, path: &Path) -> String {
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "{text} does not name {}",
        path.display()
    );
    text
}

#[test]
fn loading_errors_name_the_file() {
    let dir = Scratch::new("errors");
    let good = self_signed(&dir);

    let missing = dir.0.join("missing.pem");
    let e = tls::server_config(&missing, &good.key).unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
    assert!(names(&e, &missing).contains("cannot read"));
    let e = tls::server_config(&good.cert, &missing).unwrap_err();
    names(&e, &missing);

    let garbage = dir.write("garbage.pem", "not a certificate\n");
    let e = tls::server_config(&garbage, &good.key).unwrap_err();
    assert!(matches!(e, TlsError::BadPem { .. }), "{e:?}");
    assert!(names(&e, &garbage).contains("no CERTIFICATE"));

    // The certificate given as the key: valid PEM, but no key in it.
    let e = tls::server_config(&good.cert, &good.cert).unwrap_err();
    assert!(matches!(e, TlsError::BadPem { .. }), "{e:?}");
    assert!(names(&e, &good.cert).contains("no PRIVATE KEY"));

    let broken = dir.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    );
    let e = tls::server_config(&broken, &good.key).unwrap_err();
    assert!(matches!(e, TlsError::BadPem { .. }), "{e:?}");
    names(&e, &broken);

    // Another certificate's key.
    let other = rcgen::KeyPair::generate().unwrap();
    let other_key = dir.write("other-key.pem", other.serialize_pem());
    let e = tls::server_config(&good.cert, &other_key).unwrap_err();
    assert!(matches!(e, TlsError::Rejected { .. }), "{e:?}");
    names(&e, &other_key);
    names(&e, &good.cert);

    let huge = dir.write("huge.pem", vec![b'a'; (tls::MAX_PEM_BYTES + 1) as usize]);
    let e = tls::server_config(&huge, &good.key).unwrap_err();
    assert!(matches!(e, TlsError::TooLarge { .. }), "{e:?}");
    names(&e, &huge);

    // And the good pair loads.
    tls::server_config(&good.cert, &good.key).unwrap();
}
