//! The fan-out benchmark's peers: servers in other runtimes that it
//! measures beside happynet, each a small idiomatic program in
//! `examples/peers/` installed with npm there (`npm ci`), never by CI.
//!
//! - **bun**: `Bun.serve`, whose WebSocket server is uWebSockets; every
//!   client subscribes to one topic and a broadcast is one
//!   `server.publish`. The npm package `bun` ships the binary.
//! - **node**: Node's http server with the `ws` package's
//!   `WebSocketServer`; a broadcast iterates `wss.clients` and calls
//!   `client.send` for each, as the ws README does.
//!
//! Both speak the benchmark's child contract (print the port on stdout,
//! exit when stdin closes) and its control routes (`POST /bench/run`,
//! `GET /bench/stats`). This module finds a peer's program and tells, when
//! it is not installed, how to install it; it starts nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A peer server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Bun (uWebSockets).
    Bun,
    /// Node with the `ws` package.
    Node,
}

/// How to start an installed peer.
#[derive(Debug, Clone)]
pub struct PeerCommand {
    /// The executable: the runtime itself, so that the child's pid (and
    /// its `/proc` figures) is the server's.
    pub program: PathBuf,
    /// The script to run, relative to `dir`.
    pub script: &'static str,
    /// The directory with `node_modules/`, the child's working directory.
    pub dir: PathBuf,
    /// What was found, for the report, e.g. `Bun 1.4.4`.
    pub version: String,
}

impl PeerCommand {
    /// The child's command line (stdio is the caller's to set).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.arg(self.script).current_dir(&self.dir);
        command
    }
}

/// What to do when a peer is missing.
const INSTALL_HINT: &str = "install it with `cd examples/peers && npm ci` (needs node and npm)";

impl Peer {
    /// The name `--servers` takes and the report prints.
    pub fn name(self) -> &'static str {
        match self {
            Peer::Bun => "bun",
            Peer::Node => "node",
        }
    }

    /// One line on what the server is and how it broadcasts.
    pub fn describe(self) -> &'static str {
        match self {
            Peer::Bun => {
                "Bun.serve (uWebSockets), one topic, server.publish per broadcast; \
                 JavaScript on one thread: one event loop serves every client"
            }
            Peer::Node => {
                "Node http + ws WebSocketServer, client.send per client per broadcast; \
                 JavaScript on one thread: one event loop serves every client"
            }
        }
    }

    /// Finds the peer's runtime and libraries under `dir`
    /// (`examples/peers`); `Err` says what is missing and how to install it.
    pub fn locate(self, dir: &Path) -> Result<PeerCommand, String> {
        match self {
            Peer::Bun => {
                // The npm package's binary; a `bun` on PATH will do too.
                let installed = dir.join("node_modules/bun/bin/bun.exe");
                let program = if installed.is_file() {
                    installed
                } else {
                    PathBuf::from("bun")
                };
                let version = run_version(&program).map_err(|e| {
                    format!(
                        "bun is not installed ({} is missing and {e}): {INSTALL_HINT}",
                        dir.join("node_modules/bun").display()
                    )
                })?;
                Ok(PeerCommand {
                    program,
                    script: "bun_server.mjs",
                    dir: dir.to_owned(),
                    version: format!("Bun {version}"),
                })
            }
            Peer::Node => {
                let program = PathBuf::from("node");
                let node = run_version(&program).map_err(|e| {
                    format!("node cannot be run ({e}): install Node.js, then {INSTALL_HINT}")
                })?;
                let ws =
                    package_version(&dir.join("node_modules/ws/package.json")).map_err(|e| {
                        format!("the ws package is not installed ({e}): {INSTALL_HINT}")
                    })?;
                Ok(PeerCommand {
                    program,
                    script: "node_server.mjs",
                    dir: dir.to_owned(),
                    version: format!("Node {node}, ws {ws}"),
                })
            }
        }
    }
}

/// `<program> --version`, trimmed.
fn run_version(program: &Path) -> Result<String, String> {
    let output = Command::new(program)
        .arg("--version")
        .output()
        .map_err(|e| format!("`{} --version`: {e}", program.display()))?;
    if !output.status.success() {
        return Err(format!(
            "`{} --version` exited with {}",
            program.display(),
            output.status
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The `version` of an npm package's `package.json`.
fn package_version(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    json.get("version")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| format!("{}: no version", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_ws_package_says_how_to_install_it() {
        let empty = std::env::temp_dir().join("testkit-peers-nothing-installed");
        match Peer::Node.locate(&empty) {
            Ok(found) => panic!("found {found:?} in an empty directory"),
            Err(e) => assert!(e.contains("npm ci"), "{e}"),
        }
    }

    #[test]
    fn a_package_version_is_read_from_its_package_json() {
        let dir = std::env::temp_dir().join(format!("testkit-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("package.json");
        std::fs::write(&path, r#"{"name":"ws","version":"8.23.0"}"#).unwrap();
        assert_eq!(package_version(&path).as_deref(), Ok("8.23.0"));
        std::fs::write(&path, r#"{"name":"ws"}"#).unwrap();
        assert!(package_version(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
