//! Where a connection is in its request cycle, shared by its socket (which starts a
//! request when bytes come and enforces the timeouts) and the service answering it
//! (which sees the head parsed and the response end).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};

/// The stage of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// No request in progress: the connection closes after `server.idle_timeout_secs`.
    Idle,
    /// Bytes of a request are arriving: its head must be whole within
    /// `server.request_timeout_secs`, or the client gets 408.
    Head,
    /// A request is being answered: its body is timed by the route that reads it,
    /// the response's writes by the slow-consumer rule.
    Answering,
    /// An upgraded WebSocket or an event stream: no more requests, no timeouts.
    Streaming,
}

impl Stage {
    fn from_bits(bits: u64) -> Self {
        match bits & 3 {
            0 => Stage::Idle,
            1 => Stage::Head,
            2 => Stage::Answering,
            _ => Stage::Streaming,
        }
    }
}

/// A connection's [`Stage`] and how many times it changed (so that a timer knows the
/// stage it was set for is still the one in force), and the reader to wake when an
/// answer ends (its idle timer starts then).
#[derive(Debug, Default)]
pub(crate) struct Phase {
    stage: AtomicU64,
    reader: AtomicWaker,
}

/// A moment of a connection's life: which stage, and which time in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moment(u64);

impl Moment {
    pub(crate) fn stage(self) -> Stage {
        Stage::from_bits(self.0)
    }
}

impl Phase {
    pub(crate) fn now(&self) -> Moment {
        Moment(self.stage.load(Ordering::Acquire))
    }

    /// Moves to `to` when the stage is one of `from`.
    fn enter(&self, from: &[Stage], to: Stage) {
        let _ = self
            .stage
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                from.contains(&Stage::from_bits(bits))
                    .then(|| ((bits >> 2) + 1) << 2 | to as u64)
            });
    }

    /// Bytes came while idle: a request begins.
    pub(crate) fn bytes_came(&self) {
        self.enter(&[Stage::Idle], Stage::Head);
    }

    /// A request's head was read and is being answered.
    pub(crate) fn answering(&self) {
        self.enter(&[Stage::Idle, Stage::Head], Stage::Answering);
    }

    /// The response ended: the connection is idle until its next request.
    pub(crate) fn answered(&self) {
        self.enter(&[Stage::Answering], Stage::Idle);
        self.reader.wake();
    }

    /// Wakes `reader` when the answer in progress ends.
    pub(crate) fn wake_when_answered(&self, reader: &Waker) {
        self.reader.register(reader);
    }

    /// The connection streams from now on (an upgrade, an event stream).
    pub(crate) fn stream_for_good(&self) {
        self.enter(
            &[Stage::Idle, Stage::Head, Stage::Answering],
            Stage::Streaming,
        );
    }
}

/// A response body that tells the connection's [`Phase`] when it has ended (or is
/// dropped unfinished).
pub(crate) struct Tracked<B> {
    body: B,
    phase: Arc<Phase>,
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, phase: Arc<Phase>) -> Self {
        Tracked { body, phase }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            this.phase.answered();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.phase.answered();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_goes_idle_head_answering_idle_and_streams_for_good() {
        let phase = Phase::default();
        let idle = phase.now();
        assert_eq!(idle.stage(), Stage::Idle);
        phase.answered();
        assert_eq!(phase.now(), idle, "only an answer in progress ends");
        phase.bytes_came();
        assert_eq!(phase.now().stage(), Stage::Head);
        phase.bytes_came();
        phase.answering();
        assert_eq!(phase.now().stage(), Stage::Answering);
        phase.bytes_came();
        assert_eq!(
            phase.now().stage(),
            Stage::Answering,
            "body bytes start nothing"
        );
        phase.answered();
        let again = phase.now();
        assert_eq!(again.stage(), Stage::Idle);
        assert_ne!(again, idle, "a new idle time is another moment");
        phase.stream_for_good();
        phase.answered();
        phase.bytes_came();
        assert_eq!(phase.now().stage(), Stage::Streaming);
    }
}
