//! The client's end of a connection, as every response is written to it: a write that
//! stalls is given up, and closing does not reset what the client still sends.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

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

/// A client's TCP stream as Herald serves it:
/// - a write that the client takes nothing of for `stall` fails with `TimedOut`, so that
///   a client that stopped reading (its buffers full) does not hold its connection,
///   and its connection slot, for as long as TCP keeps it open;
/// - dropped before the client's end of input, it [`linger`]s in a task of its own.
pub(crate) struct ClientStream {
    /// Always `Some` until dropped; taken by the lingering task.
    stream: Option<TcpStream>,
    /// The client ended its sending side: closing now cannot reset anything.
    read_eof: bool,
    stall: Duration,
    /// Runs while a write waits for room in the socket.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl ClientStream {
    pub fn new(stream: TcpStream, stall: Duration) -> Self {
        ClientStream {
            stream: Some(stream),
            read_eof: false,
            stall,
            stalled: None,
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
        let stall = self.stall;
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
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() == before {
            // A read into room that returns nothing is the end of the client's input.
            self.read_eof |= buf.remaining() > 0;
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
