//! Taking messages: receive, the [`Receiver`] that holds a place in a channel's line of
//! waiting receivers, the [`Revoker`] that cuts one off, and replay after an id.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use super::state::{Channel, Waiter};
use super::{ChannelLayer, Delivery, Error, Gap, Inner, Replay, delivery};
use crate::names;

impl ChannelLayer {
    /// Takes the oldest unexpired message off `channel`, waiting up to `wait` for one.
    /// Receivers that wait are served longest-waiting first. Dropping the returned
    /// future before it completes never consumes a message.
    pub async fn receive(&self, channel: &str, wait: Duration) -> Result<Option<Delivery>, Error> {
        let mut receiver = self.receiver(channel)?;
        if wait.is_zero() {
            return Ok(receiver.try_take());
        }
        let taking = std::future::poll_fn(|cx| receiver.poll_receive(cx));
        Ok(tokio::time::timeout(wait, taking).await.ok().flatten())
    }

    /// A receiver of `channel` that takes its messages one after another (a stream),
    /// keeping its place in the line of waiting receivers between them.
    pub fn receiver(&self, channel: &str) -> Result<Receiver, Error> {
        names::check_channel(channel)?;
        let id = self.inner.next_waiter.fetch_add(1, Ordering::Relaxed);
        Ok(Receiver {
            inner: self.inner.clone(),
            key: Arc::new(ReceiverKey {
                channel: channel.to_string(),
                id,
                revoked: AtomicBool::new(false),
            }),
            waiting: false,
        })
    }

    /// Delivered messages after `after_id` that the channel's replay log still holds,
    /// and a gap when some after `after_id` are gone.
    pub fn replay(&self, channel: &str, after_id: u64) -> Result<Replay, Error> {
        names::check_channel(channel)?;
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let now = inner.clock.now_ms();
        // A channel without state knows its losses up to the lost watermark.
        let ch = inner.channel(&mut state.channels, channel);
        ch.drop_expired(now);
        let deliveries: Vec<Delivery> = ch
            .delivered
            .iter()
            .filter(|e| e.id > after_id)
            .map(delivery)
            .collect();
        let gap = (ch.lost_upto > after_id).then(|| {
            let next = deliveries
                .first()
                .map(|d| d.id)
                .or_else(|| ch.queue.front().map(|e| e.id))
                .unwrap_or(ch.lost_upto + 1);
            Gap {
                after: after_id,
                next,
            }
        });
        Ok(Replay { gap, deliveries })
    }
}

impl Inner {
    /// Takes a receiver out of its channel's line; `revoke` also stops it for good
    /// (under the same lock, so that it cannot take a message in between) and wakes it
    /// if it was waiting, so that its consumer learns of the end.
    fn leave(&self, key: &ReceiverKey, revoke: bool) {
        let waiting = {
            let mut state = self.state.lock();
            if revoke {
                key.revoked.store(true, Ordering::Relaxed);
            }
            state
                .channels
                .get_mut(&key.channel)
                .and_then(|ch| ch.leave(key.id))
        };
        if revoke && let Some(waker) = waiting {
            // Its next poll reports the end.
            waker.wake();
        }
    }

    /// Takes the oldest pending message not reserved for a woken waiter. The cursor
    /// reaches the store later (see [`Inner::write_cursors`]).
    fn take(&self, ch: &mut Channel) -> Option<Delivery> {
        ch.drop_expired(self.clock.now_ms());
        if ch.queue.len() <= ch.woken.len() {
            return None;
        }
        let entry = ch.queue.pop_front().expect("queue is longer than reserved");
        ch.taken_upto = entry.id;
        let taken = delivery(&entry);
        ch.remember(entry);
        Some(taken)
    }
}

/// Takes messages off one channel for one consumer. While it waits it holds a place in
/// the channel's line of receivers (longest-waiting first); dropping it gives the place
/// up, and a message it was woken for passes to the next in line, so dropping never
/// loses a message.
pub struct Receiver {
    inner: Arc<Inner>,
    key: Arc<ReceiverKey>,
    /// In the channel's line (waiting, or woken and not yet taken).
    waiting: bool,
}

/// Who a receiver is, shared with its [`Revoker`].
struct ReceiverKey {
    channel: String,
    id: u64,
    /// Set under the layer's lock: from then on the receiver takes nothing.
    revoked: AtomicBool,
}

impl Receiver {
    /// The next message, or `Pending` until one arrives (the task is woken then).
    /// `Ready(None)` once the receiver was revoked.
    pub fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        let inner = &*self.inner;
        let key = &*self.key;
        let mut state = inner.state.lock();
        if key.revoked.load(Ordering::Relaxed) {
            return Poll::Ready(None);
        }
        let ch = inner.channel(&mut state.channels, &key.channel);
        let was_woken = self.waiting && ch.unreserve(key.id);
        if self.waiting
            && !was_woken
            && let Some(waiter) = ch.waiters.iter_mut().find(|w| w.id == key.id)
        {
            waiter.waker.clone_from(cx.waker());
            return Poll::Pending;
        }
        if let Some(delivery) = inner.take(ch) {
            if self.waiting {
                ch.wake();
            }
            self.waiting = false;
            return Poll::Ready(Some(delivery));
        }
        let waiter = Waiter {
            id: key.id,
            waker: cx.waker().clone(),
        };
        if self.waiting {
            // Woken for a message that expired first: still first in line.
            ch.waiters.push_front(waiter);
            ch.wake();
        } else {
            ch.waiters.push_back(waiter);
        }
        self.waiting = true;
        Poll::Pending
    }

    /// The next message if one is pending now, without waiting.
    pub(crate) fn try_take(&mut self) -> Option<Delivery> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let ch = inner.channel(&mut state.channels, &self.key.channel);
        inner.take(ch)
    }

    /// Whether it was revoked (it takes nothing more).
    pub(crate) fn is_revoked(&self) -> bool {
        self.key.revoked.load(Ordering::Relaxed)
    }

    /// A handle that can cut this receiver off from another task.
    pub fn revoker(&self) -> Revoker {
        Revoker {
            inner: self.inner.clone(),
            key: self.key.clone(),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if self.waiting {
            self.inner.leave(&self.key, false);
        }
    }
}

/// Cuts a [`Receiver`] off: when `revoke` returns, it has taken its last message, a
/// message it was woken for has passed to the next receiver in line, and a consumer
/// waiting on it is woken to find `Ready(None)`.
pub struct Revoker {
    inner: Arc<Inner>,
    key: Arc<ReceiverKey>,
}

impl Revoker {
    /// Stops the receiver from taking any more messages.
    pub fn revoke(&self) {
        self.inner.leave(&self.key, true);
    }

    /// Whether the receiver was woken for a message that it has not taken yet.
    pub(crate) fn has_message_waiting(&self) -> bool {
        let state = self.inner.state.lock();
        state
            .channels
            .get(&self.key.channel)
            .is_some_and(|ch| ch.woken.contains(&self.key.id))
    }
}
