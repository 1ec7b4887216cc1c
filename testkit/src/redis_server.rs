//! A `redis-server` child process of a test's or benchmark's own, on a free
//! port, without persistence: a test can kill and restart its own without
//! touching anyone else's, and nothing is left on disk.
//!
//! It needs the `redis-server` binary on `PATH` (`apt-get install
//! redis-server`; `.ci/run` installs it). Every wait is bounded by
//! [`START_TIMEOUT`].

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The program started.
pub const REDIS_SERVER: &str = "redis-server";

/// How long a fresh server may take to answer `PING`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A running `redis-server` on 127.0.0.1; killed when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers `PING`.
    ///
    /// # Panics
    /// If `redis-server` cannot be started (the message says how to install
    /// it) or does not answer within [`START_TIMEOUT`].
    pub fn start() -> RedisServer {
        let mut redis = RedisServer {
            port: crate::free_port(),
            child: None,
        };
        redis.spawn();
        redis
    }

    fn spawn(&mut self) {
        let child = Command::new(REDIS_SERVER)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &std::env::temp_dir().display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {REDIS_SERVER} (install it: apt-get install redis-server): {e}"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(mut conn) = self.try_conn() {
                if redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{REDIS_SERVER} did not start within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id while it runs (a benchmark reads its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (at once, as a crash would) and waits for it to go.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts a fresh one (empty: no persistence) on
    /// the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A new blocking connection, or why there is none.
    pub fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(CONNECT_TIMEOUT)
    }

    /// A new blocking connection.
    ///
    /// # Panics
    /// If the server does not accept one.
    pub fn conn(&self) -> redis::Connection {
        self.try_conn()
            .unwrap_or_else(|e| panic!("connect to the own {REDIS_SERVER}: {e}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `INFO <section>` on `conn` as `field → value` (for `commandstats`, the
/// value is the `calls=…` part).
///
/// # Panics
/// If the command fails.
pub fn info(conn: &mut redis::Connection, section: &str) -> HashMap<String, String> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query(conn)
        .unwrap_or_else(|e| panic!("INFO {section}: {e}"));
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            let v = v
                .split(',')
                .find_map(|p| p.strip_prefix("calls="))
                .unwrap_or(v);
            (k.to_owned(), v.trim().to_owned())
        })
        .collect()
}
