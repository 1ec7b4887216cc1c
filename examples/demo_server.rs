//! Run with: cargo run --release --example demo_server
//!
//! The happynet demo: one process that serves a chat-like page at `GET /`
//! and mounts happynet's routes (`GET /ws`, `POST /broadcast`,
//! `GET /health`) beside it. It needs nothing else running: with no flags it
//! uses the embedded default configuration and listens on 127.0.0.1:8080.
//! Open two browser tabs on the page to watch messages, rooms and presence
//! move between them.
//!
//! ```text
//! demo_server [--bind ADDR] [--config PATH] [--tls-cert PATH --tls-key PATH]
//!   --bind ADDR       where to listen (default 127.0.0.1:8080; port 0 picks one)
//!   --config PATH     a JSON config file; when absent, $HAPPYNET_CONFIG if set,
//!                     else the embedded default
//!   --tls-cert PATH   serve HTTPS (and wss://) with this PEM certificate chain
//!   --tls-key PATH    and this PEM private key (both or neither)
//! ```
//!
//! The page's operations panel polls `GET /status` (connections, rooms,
//! deliveries/s, upstream breakers and limiters, recent alerts).
//!
//! A bad flag, a bad configuration or an unusable certificate or key is
//! reported on stderr (naming the file, and for a config error the JSON path
//! of the offending key) and the process exits with status 2; it never
//! panics on input. An address already in
//! use exits with status 1. Ctrl-C or SIGTERM shuts down gracefully: every
//! WebSocket is closed with 1001 (going away) before the HTTP server stops.

use happynet::assets::StaticAssets;
use happynet::server::{Server, Signals};
use happynet::{Config, ConfigError, Network};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::process::ExitCode;
use testkit::fake_upstream;

// jemalloc unless built with `--features testkit/alloc-system` or
// `testkit/alloc-mimalloc` (`testkit::alloc`, README "Allocators" for the
// figures behind the default). Choosing an allocator is the application's
// call, so it lives here and not in the library.
#[global_allocator]
static GLOBAL: testkit::alloc::Chosen = testkit::alloc::CHOSEN;

/// The page, compiled in so the binary serves it from anywhere.
const INDEX_HTML: &str = include_str!("demo/index.html");

/// Where the demo listens when `--bind` is not given.
const DEFAULT_BIND: &str = "127.0.0.1:8080";

/// The environment variable naming a config file when `--config` is absent.
const CONFIG_ENV: &str = "HAPPYNET_CONFIG";

/// The listen backlog: actix-web's own default, which a listener we bind
/// ourselves would otherwise lose (std listens with a smaller one).
const LISTEN_BACKLOG: i32 = 1024;

/// Exit status for bad flags or a bad configuration: the caller's mistake.
const EXIT_USAGE: u8 = 2;

/// Exit status when the server cannot start or fails while running.
const EXIT_FAILURE: u8 = 1;

const USAGE: &str = "\
usage: demo_server [--bind ADDR] [--config PATH] [--tls-cert PATH --tls-key PATH]

  --bind ADDR       address to listen on (default 127.0.0.1:8080)
  --config PATH     JSON configuration file (default: $HAPPYNET_CONFIG if set,
                    otherwise the embedded default)
  --tls-cert PATH   serve HTTPS with this PEM certificate chain...
  --tls-key PATH    ...and this PEM private key (give both or neither)
  -h, --help        print this help";

/// What the command line asked for.
#[derive(Debug)]
struct Options {
    bind: SocketAddr,
    config: Option<String>,
    /// `(certificate, key)` PEM files: serve HTTPS.
    tls: Option<(String, String)>,
}

/// Why the command line was refused.
#[derive(Debug)]
enum ArgsError {
    /// `--help`: not an error, but the same early exit.
    Help,
    /// Anything else, with a message for the user.
    Bad(String),
}

/// Parses the flags by hand: four options do not justify a parser crate.
/// Both `--flag VALUE` and `--flag=VALUE` are accepted.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Options, ArgsError> {
    let mut bind: Option<String> = None;
    let mut config: Option<String> = None;
    let mut tls_cert: Option<String> = None;
    let mut tls_key: Option<String> = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg.clone(), None),
        };
        let slot = match flag.as_str() {
            "-h" | "--help" => return Err(ArgsError::Help),
            "--bind" => &mut bind,
            "--config" => &mut config,
            "--tls-cert" => &mut tls_cert,
            "--tls-key" => &mut tls_key,
            _ => return Err(ArgsError::Bad(format!("unknown argument `{arg}`"))),
        };
        let value = match inline.or_else(|| args.next()) {
            Some(v) if !v.is_empty() => v,
            _ => return Err(ArgsError::Bad(format!("{flag} needs a value"))),
        };
        if slot.replace(value).is_some() {
            return Err(ArgsError::Bad(format!("{flag} given more than once")));
        }
    }
    let bind_text = bind.as_deref().unwrap_or(DEFAULT_BIND);
    let bind = bind_text.parse().map_err(|_| {
        ArgsError::Bad(format!(
            "--bind `{bind_text}` is not an IP:PORT address (e.g. 127.0.0.1:8080 or [::1]:8080)"
        ))
    })?;
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => return Err(ArgsError::Bad("--tls-cert needs --tls-key".into())),
        (None, Some(_)) => return Err(ArgsError::Bad("--tls-key needs --tls-cert".into())),
    };
    Ok(Options { bind, config, tls })
}

/// Loads the configuration the user chose: `--config`, then
/// `$HAPPYNET_CONFIG`, then the embedded default. Returns it with a label
/// for the start-up log. The error text names the file and, for a bad key,
/// its JSON path.
fn load_config(flag: Option<String>) -> Result<(Config, String), String> {
    let path = flag.or_else(|| std::env::var(CONFIG_ENV).ok().filter(|p| !p.is_empty()));
    let Some(path) = path else {
        return Ok((Config::embedded(), "the embedded default".to_owned()));
    };
    Config::from_file(&path)
        .map(|config| (config, path.clone()))
        .map_err(|e| describe_config_error(&path, &e))
}

fn describe_config_error(file: &str, e: &ConfigError) -> String {
    match e {
        // Its Display already names the file.
        ConfigError::Io { .. } => e.to_string(),
        _ => format!("invalid config {file}: {e}"),
    }
}

/// Binds the listening socket the way `HttpServer::bind` would
/// (`SO_REUSEADDR`, actix's backlog), so the demo can bind before it starts
/// any actor.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The environment variable holding the local fake's key: the offline demo
/// authenticates exactly as the real one would.
const LOCAL_FAKE_KEY_ENV: &str = "HAPPYNET_DEMO_LOCAL_OPENAI_KEY";
const LOCAL_FAKE_KEY: &str = "sk-local-fake-demo";

/// When `OPENAI_API_KEY` is not set, starts the built-in fake OpenAI on
/// 127.0.0.1 and points the `openai` client (added if the config has none)
/// at it. Returns the config to use and the fake, which must live as long
/// as the server.
async fn offline_openai(
    mut config: Config,
) -> std::io::Result<(Config, Option<fake_upstream::FakeUpstream>)> {
    let key_set = std::env::var("OPENAI_API_KEY").is_ok_and(|k| !k.is_empty());
    if key_set {
        return Ok((config, None));
    }
    let fake = fake_upstream::FakeUpstream::start_with_key(
        "local-fake-openai",
        fake_upstream::Faults::default(),
        Some(LOCAL_FAKE_KEY.to_owned()),
    )
    .await?;
    // Set before any thread reads the environment: Network::start has not
    // run yet, and nothing else here reads it.
    std::env::set_var(LOCAL_FAKE_KEY_ENV, LOCAL_FAKE_KEY);
    let client = config
        .network
        .api_clients
        .entry("openai".to_owned())
        .or_insert_with(|| {
            happynet::config::Config::from_json_str(
                r#"{"network":{"api_clients":{"openai":{"base_url":"http://127.0.0.1"}}}}"#,
            )
            .ok()
            .and_then(|c| c.network.api_clients.get("openai").cloned())
            .expect("a literal config")
        });
    client.base_url = fake.url("");
    client.endpoints.clear();
    client.api_key_env = None;
    client.auth = Some(happynet::config::AuthConfig::Bearer {
        key_env: LOCAL_FAKE_KEY_ENV.to_owned(),
    });
    log::warn!(
        "OPENAI_API_KEY is not set: the openai client uses a built-in local fake at {} \
         (answers echo the prompt); set OPENAI_API_KEY to use the real API",
        fake.url("")
    );
    Ok((config, Some(fake)))
}

/// The demo's static files: the page at `/`, served with a strong `ETag`,
/// `Last-Modified`, `304` on revalidation, `no-cache` (so a rebuilt demo is
/// seen on the next reload) and brotli/gzip when the browser accepts them.
/// Built once: compressing happens here, not per request or per worker.
fn demo_assets() -> StaticAssets {
    StaticAssets::new().add("/", "text/html; charset=utf-8", INDEX_HTML)
}

/// The URL to print for a bound address. A wildcard address is not
/// something a browser can open, so it is shown as loopback.
fn page_url(scheme: &str, addr: SocketAddr) -> String {
    let mut shown = addr;
    if addr.ip().is_unspecified() {
        shown.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("{scheme}://{shown}/")
}

/// Runs the server until a signal (or a server failure), then shuts down
/// gracefully: `happynet::server` does that part, as it does for any app.
async fn serve(
    options: Options,
    config: Config,
    config_label: String,
    tls: Option<rustls::ServerConfig>,
) -> ExitCode {
    // Listened for before binding so that a SIGTERM sent right after start-up
    // is not lost, and so a failure to listen is reported before anyone
    // depends on graceful shutdown.
    let signals = match Signals::listen() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo_server: cannot listen for SIGTERM: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    // Bind before starting any actor: a port in use is then reported without
    // a hub to tear down. (An actor that was started but never polled runs
    // its `started` hook while the actix runtime is being dropped, and the
    // hub's timers panic there for want of a reactor.)
    let listener = match listen(options.bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo_server: cannot listen on {}: {e}", options.bind);
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    // Without an OpenAI key the demo still works offline: the `openai`
    // client is pointed at a local fake that speaks the same API.
    let (config, _local_openai) = match offline_openai(config).await {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("demo_server: cannot start the local fake OpenAI: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    let net = match Network::start(config) {
        Ok(net) => net,
        Err(e) => {
            eprintln!("demo_server: {}", describe_config_error(&config_label, &e));
            return ExitCode::from(EXIT_USAGE);
        }
    };

    // happynet's routes (`/ws`, `/broadcast`, `/health`, … and the
    // gateways `/proxy/{client}/{tail…}`, `/v1/…`), then GET|HEAD / → the
    // page; the access log with `?token=` values redacted (`/ws` accepts its
    // token in the query string).
    let assets = demo_assets().configure();
    let server = Server::new(&net)
        .access_log(r#"%a "%r" %s %Dms"#)
        .configure(assets);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        Some(tls) => server.listen_rustls(listener, tls),
        None => server.listen(listener),
    };
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo_server: cannot serve on {}: {e}", options.bind);
            // The hub has started; stop it inside the runtime, not in its
            // teardown.
            net.shutdown().await;
            return ExitCode::from(EXIT_FAILURE);
        }
    };

    log::info!("happynet demo using {config_label}");
    for addr in server.addrs() {
        log::info!("open {}", page_url(scheme, *addr));
    }

    match server.run_until(signals.recv()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo_server: server failed: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();

    let options = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Bad(why)) => {
            eprintln!("demo_server: {why}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Load before starting the actix system: a bad file is reported without
    // ever opening a socket.
    let (config, label) = match load_config(options.config.clone()) {
        Ok(c) => c,
        Err(why) => {
            eprintln!("demo_server: {why}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Likewise the certificate and key: a missing file, bad PEM or a key
    // that does not fit the certificate is the caller's mistake.
    let tls = match &options.tls {
        None => None,
        Some((cert, key)) => match happynet::tls::server_config(cert, key) {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("demo_server: TLS: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    actix_web::rt::System::new().block_on(serve(options, config, label, tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Options, ArgsError> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags_parse_in_both_forms() {
        let o = args(&[]).expect("defaults");
        assert_eq!(o.bind.to_string(), DEFAULT_BIND);
        assert!(o.config.is_none());
        assert!(o.tls.is_none());
        let o = args(&["--bind", "0.0.0.0:9000", "--config=x.json"]).expect("both");
        assert_eq!(o.bind.to_string(), "0.0.0.0:9000");
        assert_eq!(o.config.as_deref(), Some("x.json"));
        let o = args(&["--tls-cert", "c.pem", "--tls-key=k.pem"]).expect("tls");
        assert_eq!(o.tls, Some(("c.pem".to_owned(), "k.pem".to_owned())));
    }

    #[test]
    fn bad_flags_are_errors() {
        for bad in [
            &["--bind"][..],
            &["--bind", "nowhere"],
            &["--bind="],
            &["--port", "1"],
            &["--config", "a", "--config", "b"],
            &["--tls-cert", "c.pem"],
            &["--tls-key", "k.pem"],
            &["--tls-cert", "c.pem", "--tls-key"],
            &["extra"],
        ] {
            assert!(matches!(args(bad), Err(ArgsError::Bad(_))), "{bad:?}");
        }
        assert!(matches!(args(&["-h"]), Err(ArgsError::Help)));
    }

    #[test]
    fn wildcard_addresses_are_shown_as_loopback() {
        let url = |s: &str| page_url("http", s.parse().expect("addr"));
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080/");
        assert_eq!(url("[::]:80"), "http://[::1]:80/");
        assert_eq!(url("127.0.0.1:8080"), "http://127.0.0.1:8080/");
        assert_eq!(
            page_url("https", "0.0.0.0:8443".parse().expect("addr")),
            "https://127.0.0.1:8443/"
        );
    }
}
