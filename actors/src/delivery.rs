//! How a broadcast's frame gets from the hub's shard to a session's socket:
//! encoded once, queued without a message, written in batches.
//!
//! actix-web-actors writes only what a session's handlers put in its
//! `WebsocketContext`, one message at a time, each encoded again for each
//! session and each carried in a mailbox envelope with a wake of its own.
//! For a broadcast to thousands of sessions that is most of the work. So
//! data takes another road, around the actor:
//! - the shard encodes each broadcast's frame once ([`encode`]: server frames
//!   are unmasked, so every session sends the very same bytes) and pushes a
//!   reference-counted handle to it into each member's [`DeliveryQueue`];
//! - the queue wakes the session's connection task only if it is not awake
//!   already, so a burst of broadcasts costs one wake, not one per message;
//! - the upgrade response's body ([`Outbound`]) takes everything queued at
//!   once each time the HTTP layer polls it and hands it over frame by
//!   frame (the HTTP layer copies them into its write buffer and writes
//!   them with one `write()`).
//!
//! The session's own frames (pings, pongs, error frames, the close frame)
//! still go through its `WebsocketContext`, which [`Outbound`] polls too, so
//! the actor runs as before. Order: each poll first takes what the queue
//! holds and then polls the context, so a close frame is always behind
//! every frame queued before the session decided to close (the session's
//! `Flush` waits for exactly those); once the close is out, the queue is
//! closed and later pushes are refused.
//!
//! Bounded as before: the shard charges each frame to the session's byte
//! budget ([`crate::liveness::OutboundBudget`]) and the queue holds at most
//! `max_frames`; either limit reached means a slow consumer. Since the
//! queue is filled while the body is not polled (a client that stops
//! reading), both limits are what evicts it.

use crate::liveness::SessionLink;
use crate::messages::Payload;
use actix_http::ws::{OpCode, Parser};
use actix_web::web::{Bytes, BytesMut};
use futures::task::AtomicWaker;
use futures::Stream;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

/// One encoded frame, ready for the socket, with what it was charged.
#[derive(Debug, Clone)]
pub struct Frame {
    bytes: Bytes,
    cost: usize,
}

impl Frame {
    /// The encoded frame of `payload` (a final, unmasked text or binary
    /// frame), charged `cost` against the session's budget.
    pub fn new(bytes: Bytes, cost: usize) -> Self {
        Frame { bytes, cost }
    }

    /// What the frame was charged.
    pub fn cost(&self) -> usize {
        self.cost
    }
}

/// `payload` as one final server frame (unmasked), header and all.
pub fn encode(payload: &Payload) -> Bytes {
    let (op, bytes) = match payload {
        Payload::Text(t) => (OpCode::Text, t.as_bytes().clone()),
        Payload::Binary(b) => (OpCode::Binary, b.clone()),
    };
    // The header is at most 10 bytes for an unmasked frame.
    let mut out = BytesMut::with_capacity(bytes.len() + 10);
    Parser::write_message(&mut out, bytes, op, true, false);
    out.freeze()
}

/// Why a push was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_frames` are queued: the session is not being written.
    Full,
    /// The session's output has ended (it closed, or is closing).
    Closed,
}

#[derive(Debug, Default)]
struct Queued {
    frames: VecDeque<Frame>,
    closed: bool,
}

/// The frames queued for one session's socket: pushed by its shard, taken
/// by its response body ([`Outbound`]). Shared through the
/// [`SessionLink`]; both sides run on the same thread, so the lock is never
/// contended and the wake is a local one.
#[derive(Debug)]
pub struct DeliveryQueue {
    queued: Mutex<Queued>,
    waker: AtomicWaker,
    max_frames: usize,
}

fn lock(m: &Mutex<Queued>) -> MutexGuard<'_, Queued> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DeliveryQueue {
    /// A queue that holds up to `max_frames` frames.
    pub fn new(max_frames: usize) -> Self {
        DeliveryQueue {
            queued: Mutex::new(Queued::default()),
            waker: AtomicWaker::new(),
            max_frames: max_frames.max(1),
        }
    }

    /// Queues `frame` and wakes the writer. `bounded` is false for a
    /// session whose body has not been polled yet (registered before its
    /// `101`): then only the byte budget bounds it, as the module docs say.
    pub fn push(&self, frame: Frame, bounded: bool) -> Result<(), Refused> {
        {
            let mut q = lock(&self.queued);
            if q.closed {
                return Err(Refused::Closed);
            }
            if bounded && q.frames.len() >= self.max_frames {
                return Err(Refused::Full);
            }
            q.frames.push_back(frame);
        }
        self.waker.wake();
        Ok(())
    }

    /// Takes everything queued into `into` (an empty deque: a swap).
    fn take_all(&self, into: &mut VecDeque<Frame>) {
        let mut q = lock(&self.queued);
        if into.is_empty() {
            std::mem::swap(&mut q.frames, into);
        } else {
            into.extend(q.frames.drain(..));
        }
    }

    /// Refuses every later push and drops what is queued; returns what the
    /// dropped frames were charged.
    fn close(&self) -> usize {
        let mut q = lock(&self.queued);
        q.closed = true;
        q.frames.drain(..).map(|f| f.cost).sum()
    }
}

/// The upgrade response's body: the session's `WebsocketContext` output
/// (`inner`) merged with its [`DeliveryQueue`], in the order the module
/// docs give.
pub struct Outbound<S, E> {
    inner: Option<S>,
    link: Arc<SessionLink>,
    /// Taken from the queue, not yet handed over.
    ready: VecDeque<Frame>,
    /// The context's chunk, held behind `ready`.
    held: Option<Bytes>,
    /// The context's output ended with this (an error, or `None`).
    ended: Option<Option<E>>,
}

impl<S, E> Outbound<S, E> {
    /// The body for a session whose link is `link` and whose context's
    /// output is `inner`.
    pub fn new(link: Arc<SessionLink>, inner: S) -> Self {
        Outbound {
            inner: Some(inner),
            link,
            ready: VecDeque::new(),
            held: None,
            ended: None,
        }
    }

    fn close_queue(&mut self) {
        let dropped = self.link.queue().close();
        if dropped > 0 {
            self.link.release(dropped);
        }
    }
}

impl<S, E> Stream for Outbound<S, E>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ready.is_empty() && this.held.is_none() && this.ended.is_none() {
            // Registered before taking, so a push after the take wakes us.
            this.link.queue().waker.register(cx.waker());
            this.link.queue().take_all(&mut this.ready);
            if let Some(inner) = this.inner.as_mut() {
                match Pin::new(inner).poll_next(cx) {
                    Poll::Ready(Some(Ok(chunk))) => {
                        if this.link.is_closing() {
                            // The close frame is in this chunk or was
                            // before it: nothing may follow it.
                            this.close_queue();
                        }
                        this.held = Some(chunk);
                    }
                    Poll::Ready(Some(Err(e))) => {
                        this.ended = Some(Some(e));
                    }
                    Poll::Ready(None) => {
                        this.ended = Some(None);
                    }
                    Poll::Pending => {}
                }
            }
            if this.ended.is_some() {
                this.inner = None;
                this.close_queue();
            }
        }
        if let Some(frame) = this.ready.pop_front() {
            this.link.release(frame.cost);
            return Poll::Ready(Some(Ok(frame.bytes)));
        }
        if let Some(chunk) = this.held.take() {
            return Poll::Ready(Some(Ok(chunk)));
        }
        match this.ended.take() {
            Some(Some(e)) => {
                // Ended by an error: end after reporting it.
                this.ended = Some(None);
                Poll::Ready(Some(Err(e)))
            }
            Some(None) => {
                this.ended = Some(None);
                Poll::Ready(None)
            }
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::time::Instant;

    fn link(max_frames: usize) -> Arc<SessionLink> {
        let now = Instant::now();
        Arc::new(SessionLink::new(now, now).with_max_queued(max_frames))
    }

    fn frame(text: &str) -> Frame {
        Frame::new(encode(&Payload::Text(text.into())), 100)
    }

    #[test]
    fn a_text_frame_is_encoded_once_as_an_unmasked_final_frame() {
        let f = encode(&Payload::Text("hi".into()));
        assert_eq!(&f[..], &[0x81, 2, b'h', b'i']);
        let b = encode(&Payload::Binary(Bytes::from(vec![0u8; 300])));
        assert_eq!(&b[..4], &[0x82, 126, 1, 44]);
        assert_eq!(b.len(), 304);
    }

    #[test]
    fn a_full_queue_refuses_only_when_bounded_and_a_closed_one_always() {
        let l = link(2);
        let q = l.queue();
        q.push(frame("a"), true).unwrap();
        q.push(frame("b"), true).unwrap();
        assert_eq!(q.push(frame("c"), true), Err(Refused::Full));
        // Before the session is started, only the byte budget bounds it.
        q.push(frame("c"), false).unwrap();
        assert_eq!(q.close(), 300);
        assert_eq!(q.push(frame("d"), false), Err(Refused::Closed));
    }

    #[actix::test]
    async fn queued_frames_come_out_before_the_contexts_chunk_and_nothing_after_the_close() {
        let l = link(16);
        l.queue().push(frame("one"), true).unwrap();
        l.queue().push(frame("two"), true).unwrap();
        // The context's output: the close frame, after which it ends.
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, actix_web::Error>>();
        let mut out = Outbound::new(l.clone(), rx);
        l.mark_closing();
        tx.unbounded_send(Ok(Bytes::from_static(b"CLOSE"))).unwrap();
        drop(tx);
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            encode(&Payload::Text("one".into()))
        );
        // Pushed after the close was taken: refused, never written.
        assert_eq!(l.queue().push(frame("late"), true), Err(Refused::Closed));
        assert_eq!(
            out.next().await.unwrap().unwrap(),
            encode(&Payload::Text("two".into()))
        );
        assert_eq!(&out.next().await.unwrap().unwrap()[..], b"CLOSE");
        assert!(out.next().await.is_none());
        // Both handed-over frames were released.
        assert_eq!(l.released(), 200);
    }

    #[actix::test]
    async fn a_push_wakes_a_waiting_body() {
        let l = link(16);
        let (_tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, actix_web::Error>>();
        let mut out = Outbound::new(l.clone(), rx);
        let waiting = actix::spawn(async move { out.next().await.map(|r| r.unwrap()) });
        tokio::task::yield_now().await;
        l.queue().push(frame("woken"), true).unwrap();
        let got = waiting.await.unwrap().unwrap();
        assert_eq!(got, encode(&Payload::Text("woken".into())));
    }
}
