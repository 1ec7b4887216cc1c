//! The embedding helper: an actix-web server with everything the demo has,
//! in one call.
//!
//! [`serve`] mounts happynet's routes ([`Network::configure`] and
//! [`Network::configure_gateways`]) beside the app's own, installs the
//! connect hook ([`Network::on_connect`]) and the request-head deadline
//! (`network.security`'s slowloris guard), and serves until SIGINT (Ctrl-C)
//! or SIGTERM; then it closes every WebSocket with 1001 (going away) before
//! it stops the HTTP server, which lets in-flight requests finish for at
//! most [`HTTP_SHUTDOWN_TIMEOUT`].
//!
//! [`Server`] is the same with its parts open: a listener bound beforehand,
//! HTTPS, the redacting access log, the number of workers, or a shutdown
//! signal of the app's own ([`Listening::run_until`]). An app that wants an
//! `HttpServer` of its own builds one from the same parts, as
//! `Server::start` does.
//!
//! It sits on the floor above the composition root: the one module that
//! imports [`crate::network`] (besides `lib.rs`), and nothing imports it.

use crate::network::Network;
use actix_web::dev::ServerHandle;
use actix_web::{middleware, web, App, HttpServer};
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How long stopping the HTTP server lets in-flight requests finish, unless
/// [`Server::http_shutdown_timeout`] says otherwise. WebSockets are already
/// closed by then ([`Network::shutdown`] waits up to
/// `websocket.shutdown_timeout` for them), so this only bounds plain
/// requests such as a slow `POST /broadcast`.
pub const HTTP_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `net`'s routes and the app's (`app`, given the same
/// `ServiceConfig` as `App::configure`) on `addr` until SIGINT or SIGTERM,
/// then shuts down gracefully: 1001 to every WebSocket client, then the
/// HTTP server stops. See the [module docs](self) for what it sets up.
///
/// Must run inside the actix `System` that started `net`
/// (`#[actix_web::main]`). If it cannot listen for the signals or bind
/// `addr`, it stops `net` (so that its actors are not torn down with the
/// runtime) and returns the error.
///
/// ```no_run
/// use actix_web::web;
/// use happynet::{Config, Network};
///
/// #[actix_web::main]
/// async fn main() -> std::io::Result<()> {
///     let net = Network::start(Config::embedded()).expect("valid config");
///     happynet::server::serve(&net, ("127.0.0.1", 8080), |cfg| {
///         cfg.route("/hello", web::get().to(|| async { "Hello!" }));
///     })
///     .await
/// }
/// ```
pub async fn serve<F>(net: &Network, addr: impl ToSocketAddrs, app: F) -> io::Result<()>
where
    F: Fn(&mut web::ServiceConfig) + Send + Sync + 'static,
{
    let started = Signals::listen().and_then(|signals| {
        let listening = Server::new(net).configure(app).bind(addr)?;
        Ok((signals, listening))
    });
    match started {
        Ok((signals, listening)) => listening.run_until(signals.recv()).await,
        Err(e) => {
            net.shutdown().await;
            Err(e)
        }
    }
}

/// The app's part of every worker's `App`, as `App::configure` takes it.
type AppRoutes = Arc<dyn Fn(&mut web::ServiceConfig) + Send + Sync>;

/// What [`serve`] builds, with its parts open. Each method says what it
/// changes; [`Server::bind`], [`Server::listen`] or [`Server::listen_rustls`]
/// then build the actix-web server.
///
/// ```no_run
/// use happynet::server::{Server, Signals};
/// use happynet::{Config, Network};
///
/// #[actix_web::main]
/// async fn main() -> std::io::Result<()> {
///     let signals = Signals::listen()?; // before anything can be killed mid-start
///     let net = Network::start(Config::embedded()).expect("valid config");
///     let tls = happynet::tls::server_config("cert.pem", "key.pem").expect("TLS files");
///     let listener = std::net::TcpListener::bind("127.0.0.1:8443")?;
///     let server = Server::new(&net)
///         .access_log(r#"%a "%r" %s %Dms"#)
///         .listen_rustls(listener, tls)?;
///     println!("listening on {:?}", server.addrs());
///     server.run_until(signals.recv()).await
/// }
/// ```
#[must_use]
pub struct Server {
    net: Network,
    app: Vec<AppRoutes>,
    access_log: Option<String>,
    workers: Option<usize>,
    http_shutdown_timeout: Duration,
}

/// Where [`Server::start`] listens.
enum Socket {
    Bind(Vec<SocketAddr>),
    Listen(TcpListener),
    ListenRustls(TcpListener, Box<rustls::ServerConfig>),
}

impl Server {
    /// happynet's routes alone, with the connect hook and the request-head
    /// deadline, actix-web's default number of workers, no access log, and
    /// [`HTTP_SHUTDOWN_TIMEOUT`].
    pub fn new(net: &Network) -> Server {
        Server {
            net: net.clone(),
            app: Vec::new(),
            access_log: None,
            workers: None,
            http_shutdown_timeout: HTTP_SHUTDOWN_TIMEOUT,
        }
    }

    /// Adds the app's own routes (after happynet's), as `App::configure`
    /// does; may be called more than once. `/ws`, `/broadcast`, `/health`,
    /// `/ready`, `/metrics`, `/status` and everything under `/proxy/` and
    /// `/v1/` are happynet's.
    pub fn configure<F>(mut self, app: F) -> Server
    where
        F: Fn(&mut web::ServiceConfig) + Send + Sync + 'static,
    {
        self.app.push(Arc::new(app));
        self
    }

    /// Logs every request with actix-web's `Logger` `format`, with the
    /// values of `?token=` redacted ([`crate::security::access_log_format`]).
    pub fn access_log(mut self, format: &str) -> Server {
        self.access_log = Some(format.to_owned());
        self
    }

    /// Runs `n` HTTP workers (actix-web's default: one per CPU).
    pub fn workers(mut self, n: usize) -> Server {
        self.workers = Some(n);
        self
    }

    /// How long stopping the HTTP server lets in-flight requests finish
    /// (whole seconds, as actix-web counts them).
    pub fn http_shutdown_timeout(mut self, timeout: Duration) -> Server {
        self.http_shutdown_timeout = timeout;
        self
    }

    /// Binds `addr` (every address it resolves to) over plain HTTP.
    ///
    /// On an error `net` keeps running: stop it (`net.shutdown().await`)
    /// before the runtime ends, as [`serve`] does.
    pub fn bind(self, addr: impl ToSocketAddrs) -> io::Result<Listening> {
        let addrs = addr.to_socket_addrs()?.collect();
        self.start(Socket::Bind(addrs))
    }

    /// Serves plain HTTP on a listener bound beforehand (e.g. before
    /// `Network::start`, so that a port in use is reported before any actor
    /// starts).
    pub fn listen(self, listener: TcpListener) -> io::Result<Listening> {
        self.start(Socket::Listen(listener))
    }

    /// Serves HTTPS (HTTP/2 too) on a listener bound beforehand, with `tls`
    /// from [`crate::tls::server_config`]. The connect hook guards TLS
    /// connections like plain ones.
    pub fn listen_rustls(
        self,
        listener: TcpListener,
        tls: rustls::ServerConfig,
    ) -> io::Result<Listening> {
        self.start(Socket::ListenRustls(listener, Box::new(tls)))
    }

    /// Builds the actix-web server: the same `HttpServer` calls an app
    /// would write by hand.
    fn start(self, socket: Socket) -> io::Result<Listening> {
        let routes = self.net.configure();
        let gateways = self.net.configure_gateways();
        let app = self.app;
        let access_log = self.access_log;
        let server = HttpServer::new(move || {
            // A `Logger` is not `Send`: each worker builds its own. When
            // there is none, `Condition` keeps the app one type either way.
            let log_format = access_log.as_deref().unwrap_or_default();
            let log = middleware::Condition::new(
                access_log.is_some(),
                crate::security::access_log_format(log_format),
            );
            let mut routes = App::new()
                .wrap(log)
                .configure(routes.clone())
                .configure(gateways.clone());
            for app in &app {
                routes = routes.configure(|cfg| app(cfg));
            }
            routes
        })
        // Lets the hub cut off a client that stops reading, and enforces
        // the per-IP TCP connection cap.
        .on_connect(self.net.on_connect())
        // Slowloris guard: a connection's first request head must arrive in
        // time.
        .client_request_timeout(self.net.security().request_header_timeout())
        // Signals are ours: actix's own handler would stop the HTTP server
        // before happynet could send its 1001 close frames.
        .disable_signals()
        .shutdown_timeout(self.http_shutdown_timeout.as_secs());
        let server = match self.workers {
            Some(n) => server.workers(n),
            None => server,
        };
        let server = match socket {
            Socket::Bind(addrs) => server.bind(&addrs[..])?,
            Socket::Listen(listener) => server.listen(listener)?,
            Socket::ListenRustls(listener, tls) => server.listen_rustls_0_23(listener, *tls)?,
        };
        let addrs = server.addrs();
        Ok(Listening {
            net: self.net,
            server: server.run(),
            addrs,
        })
    }
}

/// A server that is bound and not yet serving: its addresses are known (a
/// port 0 has become a real one), and nothing is accepted until it runs.
#[must_use = "a server does nothing until it runs"]
pub struct Listening {
    net: Network,
    server: actix_web::dev::Server,
    addrs: Vec<SocketAddr>,
}

impl Listening {
    /// Where it listens.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// A handle on the HTTP server (e.g. to stop it at once, with
    /// `stop(false)`, as a test does).
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGINT or SIGTERM (listened for from this call on),
    /// then shuts down gracefully; see [`Listening::run_until`]. If it
    /// cannot listen for them, it stops `net` and returns the error.
    pub async fn run(self) -> io::Result<()> {
        match Signals::listen() {
            Ok(signals) => self.run_until(signals.recv()).await,
            Err(e) => {
                self.net.shutdown().await;
                Err(e)
            }
        }
    }

    /// Serves until `shutdown` completes, then closes every WebSocket with
    /// 1001 ([`Network::shutdown`]) and stops the HTTP server, letting
    /// in-flight requests finish for at most the HTTP shutdown timeout.
    ///
    /// If the HTTP server stops first (a worker failed, or someone used
    /// [`Listening::handle`]), the WebSockets are closed all the same. The
    /// error is the HTTP server's, if it failed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let handle = self.server.handle();
        // Spawned, so that it keeps serving while the WebSockets close.
        let mut running = actix_web::rt::spawn(self.server);
        tokio::select! {
            () = shutdown => {}
            stopped = &mut running => {
                // Still close the WebSockets and stop the hub while the
                // runtime is alive.
                self.net.shutdown().await;
                return flatten(stopped);
            }
        }
        log::info!("closing WebSockets (1001), then stopping the HTTP server");
        let closed = self.net.shutdown().await;
        log::info!("closed {closed} WebSocket session(s)");
        handle.stop(true).await;
        flatten(running.await)
    }
}

/// The server task's outcome as one `io::Result`.
fn flatten(joined: Result<io::Result<()>, actix_web::rt::task::JoinError>) -> io::Result<()> {
    joined.unwrap_or_else(|e| Err(io::Error::other(format!("server task failed: {e}"))))
}

/// SIGINT (Ctrl-C) and SIGTERM, listened for from [`Signals::listen`] on:
/// a signal that arrives before [`Signals::recv`] is awaited is kept, not
/// lost, and does not kill the process.
pub struct Signals {
    terminate: Signal,
    /// `None` if SIGINT could not be listened for: SIGTERM still works.
    interrupt: Option<Signal>,
}

impl Signals {
    /// Starts listening. Fails if SIGTERM cannot be listened for (without
    /// it there is no graceful shutdown to rely on); if only SIGINT cannot,
    /// logs a warning and goes on with SIGTERM.
    ///
    /// Must be called inside a tokio runtime (an actix `System` is one).
    pub fn listen() -> io::Result<Signals> {
        let terminate = signal(SignalKind::terminate())?;
        let interrupt = match signal(SignalKind::interrupt()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("cannot listen for Ctrl-C ({e}); stop the server with SIGTERM");
                None
            }
        };
        Ok(Signals {
            terminate,
            interrupt,
        })
    }

    /// Completes at the first SIGINT or SIGTERM, and logs which.
    pub async fn recv(mut self) {
        let name = match &mut self.interrupt {
            Some(interrupt) => tokio::select! {
                _ = interrupt.recv() => "Ctrl-C",
                _ = self.terminate.recv() => "SIGTERM",
            },
            None => {
                self.terminate.recv().await;
                "SIGTERM"
            }
        };
        log::info!("{name}: shutting down");
    }
}
