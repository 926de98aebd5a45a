//! The client's end of a connection, as every response is written to it: a write that
//! stalls is given up, an idle connection or a request head that does not come whole in
//! time is closed, and closing does not reset what the client still sends.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::phase::{Moment, Phase, Stage};
use super::slots::Slot;
use crate::http;

/// How long a connection closed by the server keeps reading (and discarding) what its
/// client still sends.
const LINGER: Duration = Duration::from_secs(5);

/// Closes `stream` like a production server does when it ends a connection before the
/// client finished sending (an oversized body answered with 413 before it was read, a
/// graceful shutdown). Closing at once would make the kernel answer the unread bytes
/// with a reset, and the client would see a broken pipe instead of the answer. So the
/// sending side is shut down (the client reads the answer, then end of stream), and
/// what still comes is read and discarded until the client closes, for up to
/// [`LINGER`].
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = tokio::io::sink();
    let _ = tokio::time::timeout(LINGER, tokio::io::copy(&mut stream, &mut sink)).await;
}

/// How a server's connections are timed.
pub(crate) struct Timing {
    /// A write the client takes nothing of for this long fails.
    pub stall: Duration,
    /// A connection without a request in progress closes after this long.
    pub idle: Duration,
    /// A request head must come whole within this long of its first byte.
    pub request: Duration,
    /// The whole 408 response, written when a head does not come in time.
    pub timed_out: Bytes,
}

/// A client's TCP stream as Herald serves it:
/// - a write that the client takes nothing of for `stall` fails with `TimedOut`, so that
///   a client that stopped reading (its buffers full) does not hold its connection,
///   and its connection slot, for as long as TCP keeps it open;
/// - in the [`Stage::Idle`] stage for `idle` it ends (the client's input ends), and in
///   the [`Stage::Head`] stage for `request` it answers 408 and fails;
/// - it holds the connection's [`Slot`] until dropped (after an upgrade too);
/// - dropped before the client's end of input, it [`linger`]s in a task of its own.
pub(crate) struct ClientStream {
    /// Always `Some` until dropped; taken by the lingering task.
    stream: Option<TcpStream>,
    /// The client ended its sending side: closing now cannot reset anything.
    read_eof: bool,
    timing: Arc<Timing>,
    phase: Arc<Phase>,
    /// Runs while a write waits for room in the socket.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Runs for the idle or head stage it was set in.
    deadline: Option<(Moment, Pin<Box<Sleep>>)>,
    _slot: Slot,
}

impl ClientStream {
    pub fn new(stream: TcpStream, slot: Slot, phase: Arc<Phase>, timing: Arc<Timing>) -> Self {
        ClientStream {
            stream: Some(stream),
            read_eof: false,
            timing,
            phase,
            stalled: None,
            deadline: None,
            _slot: slot,
        }
    }

    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("present until dropped"))
    }

    /// Passes on a write's outcome; a write still pending after `stall` (counted from
    /// the first time it was pending) fails.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stall = self.timing.stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing for the slow-consumer time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl ClientStream {
    /// Polls the timer of the stage the connection is in; ready with that stage when
    /// it runs out. Only the idle and head stages are timed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<Stage> {
        let now = self.phase.now();
        let limit = match now.stage() {
            Stage::Idle => self.timing.idle,
            Stage::Head => self.timing.request,
            Stage::Answering => {
                // The idle timer starts when the answer ends: be polled again then.
                self.phase.wake_when_answered(cx.waker());
                if self.phase.now() != now {
                    cx.waker().wake_by_ref();
                }
                self.deadline = None;
                return Poll::Pending;
            }
            Stage::Streaming => {
                self.deadline = None;
                return Poll::Pending;
            }
        };
        let (_, timer) = match &mut self.deadline {
            Some(deadline) if deadline.0 == now => deadline,
            deadline => deadline.insert((now, Box::pin(tokio::time::sleep(limit)))),
        };
        timer.as_mut().poll(cx).map(|()| now.stage())
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        if self.read_eof {
            return;
        }
        if let (Some(stream), Ok(runtime)) =
            (self.stream.take(), tokio::runtime::Handle::try_current())
        {
            runtime.spawn(linger(stream));
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.stream().poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() > before => self.phase.bytes_came(),
            // A read into room that returns nothing is the end of the client's input.
            Poll::Ready(Ok(())) => self.read_eof |= buf.remaining() > 0,
            Poll::Ready(Err(_)) => {}
            Poll::Pending => {
                return match self.poll_deadline(cx) {
                    Poll::Pending => Poll::Pending,
                    // Idle too long: as if the client had closed, so the connection ends.
                    Poll::Ready(Stage::Idle) => Poll::Ready(Ok(())),
                    Poll::Ready(_) => {
                        // Nothing else is being written while a head is awaited; the
                        // small answer fits in the socket's buffer, else it is lost.
                        let answer = self.timing.timed_out.clone();
                        let _ = self.stream().try_write(&answer);
                        http::head_timed_out_sent();
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the request head did not come within server.request_timeout_secs",
                        )))
                    }
                };
            }
        }
        polled
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.stream().poll_write(cx, buf);
        this.timed(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = this.stream().poll_write_vectored(cx, bufs);
        this.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream().poll_shutdown(cx)
    }
}
