//! The `/ws` upgrade's own pieces, used by the route in [`super::routes`]:
//! which kind of client is asking ([`requested_kind`]), the duplicate of the
//! accepted socket the route finds in the connection's data
//! (`PeerSocket`), and the response body that gets the TCP connection
//! closed once the WebSocket is done ([`close_tcp_when_done`]).
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

use actix_web::body::{BodySize, BodyStream, BoxBody, MessageBody};
use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse};
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

/// Makes `response` (the upgrade's) write the frames the hub queues for the
/// session behind `link` as well as the session's own: the upgrade's body
/// becomes [`Outbound`] (see `happynet_actors::delivery`).
pub fn with_delivery_queue(response: HttpResponse, link: Arc<SessionLink>) -> HttpResponse {
    response.map_body(|_, mut body| {
        let own = futures::stream::poll_fn(move |cx| Pin::new(&mut body).poll_next(cx));
        BoxBody::new(BodyStream::new(Outbound::new(link, own)))
    })
}

/// Makes `response` (the upgrade's) shut down the read half of `socket`
/// when its body ends, so that actix-http closes the connection at once
/// (see the module docs). Without a socket the response is unchanged.
pub fn close_tcp_when_done(response: HttpResponse, socket: Option<Arc<Socket>>) -> HttpResponse {
    match socket {
        None => response,
        Some(socket) => response.map_body(|_, body| {
            BoxBody::new(CloseTcpWhenDone {
                body,
                socket: Some(socket),
            })
        }),
    }
}

/// The upgrade response's body, which half-closes the socket once it ends.
struct CloseTcpWhenDone<B> {
    body: B,
    socket: Option<Arc<Socket>>,
}

impl<B: MessageBody + Unpin> MessageBody for CloseTcpWhenDone<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.get_mut();
        let next = Pin::new(&mut this.body).poll_next(cx);
        if let Poll::Ready(None) = next {
            if let Some(socket) = this.socket.take() {
                // Fails only if the peer is already gone: nothing to do then.
                let _ = socket.shutdown(Shutdown::Read);
            }
        }
        next
    }
}
