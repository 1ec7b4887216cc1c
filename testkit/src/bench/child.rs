//! A benchmark's server child and the requests that steer it: the one way
//! `fanout_bench` and `conn_memory` run each server in a process of its
//! own (so `/proc` figures are that server's alone) and talk to it.
//!
//! The child prints its port on a line of stdout once it listens and exits
//! when its stdin closes, so a parent that dies outright takes its servers
//! with it; dropping a [`ServerChild`] kills and reaps the child, also when
//! the parent unwinds.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running server child; see the module docs.
#[derive(Debug)]
pub struct ServerChild {
    child: Child,
    pid: u32,
    port: u16,
}

impl ServerChild {
    /// Starts `command` (stdin and stdout piped, stderr inherited) and waits
    /// up to `start_timeout` for the port it prints. `name` is the server's
    /// name in errors.
    pub fn spawn(
        mut command: Command,
        name: &str,
        start_timeout: Duration,
    ) -> Result<ServerChild, String> {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the {name} server: {e}"))?;
        let stdout = child.stdout.take();
        // From here on, an error drops the guard, which kills the child.
        let mut guard = ServerChild {
            pid: child.id(),
            child,
            port: 0,
        };
        let stdout = stdout.ok_or("the child has no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(read.map(|_| line));
        });
        let line = match rx.recv_timeout(start_timeout) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(format!("reading the server's port: {e}")),
            Err(_) => return Err("the server did not print its port in time".into()),
        };
        guard.port = line
            .trim()
            .parse()
            .map_err(|_| format!("the server printed `{}`, not a port", line.trim()))?;
        Ok(guard)
    }

    /// The child's process id, for its `/proc` figures.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request without a body and with `Connection: close`, over
/// within `timeout`; returns the status code and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{method} {path}: no answer within {timeout:?}"))?
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: not an HTTP response"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A command-line number `text` for option `name`, from `min` to `max`.
pub fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
    name: &str,
    text: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    match text.parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(format!(
            "{name}: `{text}` is not a number from {min} to {max}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_outside_their_range_or_not_numbers_are_refused_by_name() {
        assert_eq!(number("--runs", "3", 1, 50), Ok(3));
        assert_eq!(
            number("--runs", "0", 1, 50),
            Err("--runs: `0` is not a number from 1 to 50".to_owned())
        );
        assert!(number::<u32>("--runs", "x", 1, 50).is_err());
    }

    #[tokio::test]
    async fn a_request_gets_its_status_and_body() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("test socket");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("test socket");
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.expect("test socket");
            assert!(buf[..n].starts_with(b"GET /stats HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
                .await
                .expect("write");
        });
        let got = http_request(addr, "GET", "/stats", Duration::from_secs(5)).await;
        assert_eq!(got, Ok((202, "ok".to_owned())));
        server.await.expect("test socket");
    }
}
