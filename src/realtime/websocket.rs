//! The `/ws` upgrade's own pieces, used by the route in [`super::routes`]:
//! which kind of client is asking ([`requested_kind`]), the duplicate of the
//! accepted socket the route finds in the connection's data
//! (`PeerSocket`), and the upgrade's response body (`upgrade_body`): the
//! delivery queue's writer, which also gets the TCP connection closed once
//! the WebSocket is done.
//!
//! **Plain or protocol.** A client that offers the subprotocol
//! `happynet.v1` ([`happynet_actors::protocol::SUBPROTOCOL`]) gets it
//! echoed and receives protocol frames (welcome, joined/left, presence,
//! errors); any other client is plain and receives only data. A plain
//! client offering `happynet` (the companion of a `token.<token>`
//! subprotocol) still gets `happynet` echoed.
//!
//! **Closing TCP after the closing handshake.** RFC 6455 §7.1.1 wants the
//! server to close the TCP connection first once the close frames are
//! exchanged. When the session ends, actix-web-actors ends the upgrade's
//! response body; actix-http then *lingers* (for the server's
//! `client_disconnect_timeout`, 1 s by default), reading until the client
//! closes, because the upgrade's request payload was never read to its
//! end. A client that waits for the server — as RFC-conforming clients do —
//! would wait out that timeout. So when the body ends, the socket's *read*
//! half is shut down: actix-http's linger then reads end-of-stream at once,
//! flushes what it still holds (the close frame) and shuts the connection
//! down, which sends the FIN. Only the read half: shutting the write half
//! from outside could cut off bytes actix-http has not written yet. This
//! needs the duplicate socket the server's `on_connect` hook keeps
//! (`Network::on_connect` stores a `PeerSocket`), and is done for plain TCP
//! only; over TLS the connection ends after the linger (a TLS stream would
//! read the bare end-of-stream as a truncation attack).
//!
//! **Memory per connection: actix-http's two buffers.** An actix-web
//! WebSocket is a streaming `101` response, so actix-http's HTTP/1
//! dispatcher stays in charge of the connection for as long as it is open,
//! and so do its read and write buffers: two `BytesMut` of 8 KiB allocated
//! when the connection is accepted (`actix-http-3.20.0/src/h1/dispatcher.rs`
//! lines 307-308, `HW_BUFFER_SIZE` at line 40). Nothing in the public API
//! shrinks them after the upgrade: the dispatcher is private, a response
//! body gets no handle to it, and `HttpServer::h1_write_buffer_size`
//! (`actix-web-4.18.1/src/server.rs` line 305) sets how full the write
//! buffer may get before it is flushed (32 KiB by default,
//! `DEFAULT_H1_WRITE_BUFFER_SIZE` in actix-http's `src/config.rs` line 54),
//! not its size. Over plain TCP the upgrade body hands the dispatcher no
//! byte after the `101` (the frames are written to the socket's duplicate
//! directly, see `happynet_actors::delivery`), so the write buffer stays as
//! it was allocated and what follows about it holds for TLS connections
//! only. What the dispatcher does with them:
//! - it fills the write buffer from the body while the buffer holds less
//!   than `h1_write_buffer_size`, copying each item whole
//!   (`dispatcher.rs` lines 686-690), and a buffer that grew keeps its size
//!   unless it grew past max(`h1_write_buffer_size`, 128 KiB)
//!   (`WRITE_BUFFER_RETENTION_LIMIT`, line 44; the reset after a flush,
//!   lines 373-405). So [`Outbound`] hands over at most
//!   `happynet_actors::delivery::PASS_BYTES` (7 KiB) per pass and then
//!   wakes itself: a pass that starts with the buffer flushed stays inside
//!   its 8 KiB. A pass that starts with bytes still unwritten (a client
//!   slow to read) adds to them, and the buffer can grow, doubling, up to
//!   about `h1_write_buffer_size` + 7 KiB, which it then keeps; an app that
//!   wants that lower sets `HttpServer::h1_write_buffer_size`;
//! - the read buffer only grows (1 KiB low-water mark, +8 KiB:
//!   `dispatcher.rs` lines 1238-1241): 8 KiB for a client that sends small
//!   messages, up to the decoder's 128 KiB (`MAX_BUFFER_SIZE`,
//!   `h1/decoder.rs` line 14) for one that sends large ones, for good.
//!
//! That is the floor under any actix-web WebSocket server: about 12 KiB of
//! resident memory per idle HTTP/1 keep-alive connection, before any
//! WebSocket code (`examples/conn_memory.rs` measures it, and the README
//! has the figures).

use crate::security::UpgradePass;
use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};
use futures::Stream;
use happynet_actors::delivery::Outbound;
use happynet_actors::liveness::SessionLink;
use happynet_actors::ClientKind;
use socket2::Socket;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// A duplicate of an accepted connection's socket, stored by the server's
/// `on_connect` hook in the connection's data for the upgrade route: the
/// hub shuts it down to cut off a client whose session is frozen, and the
/// route half-closes it when the WebSocket is done.
#[derive(Clone)]
pub(crate) struct PeerSocket {
    pub(crate) socket: Arc<Socket>,
    /// Whether the connection is TLS (see the module docs).
    pub(crate) tls: bool,
}

/// The kind of client the upgrade request asks for, from every
/// `Sec-WebSocket-Protocol` header it sent.
pub fn requested_kind(req: &HttpRequest) -> ClientKind {
    ClientKind::offered(
        req.headers()
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .filter_map(|v| v.to_str().ok()),
    )
}

/// Makes `response` (the upgrade's) the WebSocket's body for as long as it
/// is open, in one allocation ([`UpgradeBody`]): it writes the frames the
/// hub queues for the session behind `link` as well as the session's own
/// ([`Outbound`], see `happynet_actors::delivery`), shuts down the read half
/// of `socket` when it ends (plain TCP only; see the module docs), and
/// holds `pass` (the client IP's connection slot) until then.
pub(crate) fn upgrade_body(
    response: HttpResponse,
    link: Arc<SessionLink>,
    socket: Option<Arc<Socket>>,
    pass: UpgradePass,
) -> HttpResponse {
    response.map_body(|_, body| {
        let out = Outbound::new(link, ContextOutput(body));
        // Plain TCP: the frames are written straight to the socket (see
        // `happynet_actors::delivery`); over TLS they go through actix-http.
        let out = match &socket {
            Some(socket) => out.with_direct(socket.clone()),
            None => out,
        };
        BoxBody::new(UpgradeBody {
            out,
            socket,
            _pass: pass,
        })
    })
}

/// actix-web-actors' body (the session's `WebsocketContext` output) as the
/// stream [`Outbound`] merges with the delivery queue.
struct ContextOutput(BoxBody);

impl Stream for ContextOutput {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().0).poll_next(cx)
    }
}

/// What actix's boxed bodies fail with.
type BodyError = Box<dyn std::error::Error>;

/// The upgrade response's body: the session's output merged with its
/// delivery queue, the socket to half-close when it ends, and the IP's
/// connection slot, held until then. One allocation per connection (the
/// `BoxBody` around it), where there were one per concern.
struct UpgradeBody {
    out: Outbound<ContextOutput, BodyError>,
    /// Taken when the body ends.
    socket: Option<Arc<Socket>>,
    _pass: UpgradePass,
}

impl MessageBody for UpgradeBody {
    type Error = BodyError;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.out).poll_next(cx);
        if let Poll::Ready(None) = next {
            if let Some(socket) = this.socket.take() {
                // Fails only if the peer is already gone: nothing to do then.
                let _ = socket.shutdown(Shutdown::Read);
            }
        }
        next
    }
}
