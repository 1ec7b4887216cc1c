//! testkit: the harness happynet's tests and benchmark programs share, as
//! one crate compiled once (it used to be `#[path]`-included into each test
//! binary and example, so every includer compiled it again and its own tests
//! ran once per includer).
//!
//! It does not depend on `happynet`: it is a dev-dependency of happynet, and
//! the path back would be a cycle. What needs a running `happynet::Network`
//! (the tests' `TestServer`, their awc WebSocket client) stays in
//! `tests/support/`.
//!
//! # Layout
//!
//! - [`fake_upstream`]: a real HTTP upstream with fault injection, an
//!   OpenAI-compatible API and cacheable resources;
//! - [`redis_server`]: a `redis-server` child process on a free port;
//! - [`ws`]: a WebSocket client written by hand on a raw socket: the
//!   handshake, frame parsing and building for the load generators, and
//!   [`ws::RawWsClient`] for tests that need a client awc will not be;
//! - [`bench`](mod@bench): the benchmark programs' shared parts (the fan-out load
//!   generator, its payload and histogram, the naive baseline hub, `/proc`
//!   readers);
//! - [`alloc`]: the example programs' global allocator, chosen by feature;
//! - [`free_port`].

pub mod alloc;
pub mod bench;
pub mod fake_upstream;
pub mod redis_server;
pub mod ws;

use std::net::TcpListener;

/// A port on 127.0.0.1 that was free a moment ago: bound, read and closed.
/// Nothing listens there until someone binds it (a child server, or nobody,
/// for a test that wants a refused connection).
///
/// # Panics
/// If no port can be bound.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
