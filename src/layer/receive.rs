//! Taking messages: receive, the [`Receiver`] that holds a place in a channel's line of
//! waiting receivers, the [`Revoker`] that cuts one off, and replay after an id.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::BTreeSet;

use super::state::{Channel, Lease, Waiter, saturating_ms};
use super::{ChannelLayer, Delivery, Error, Gap, Inner, Replay, delivery};
use crate::names;
use crate::store::WriteBatch;

impl ChannelLayer {
    /// Takes the oldest unexpired message off `channel`, waiting up to `wait` for one.
    /// Receivers that wait are served longest-waiting first. Dropping the returned
    /// future before it completes never consumes a message.
    pub async fn receive(&self, channel: &str, wait: Duration) -> Result<Option<Delivery>, Error> {
        self.receive_with(channel, wait, None).await
    }

    /// [`ChannelLayer::receive`], leasing the message taken when `lease` is given.
    pub async fn receive_with(
        &self,
        channel: &str,
        wait: Duration,
        lease: Option<LeaseTerms>,
    ) -> Result<Option<Delivery>, Error> {
        let mut receiver = self.receiver_with(channel, lease)?;
        if wait.is_zero() {
            return Ok(receiver.try_take());
        }
        let taking = std::future::poll_fn(|cx| receiver.poll_receive(cx));
        Ok(tokio::time::timeout(wait, taking).await.ok().flatten())
    }

    /// A receiver of `channel` that takes its messages one after another (a stream),
    /// keeping its place in the line of waiting receivers between them.
    pub fn receiver(&self, channel: &str) -> Result<Receiver, Error> {
        self.receiver_with(channel, None)
    }

    /// [`ChannelLayer::receiver`]; with `lease`, each message it takes is leased (see
    /// [`LeaseTerms`]).
    pub fn receiver_with(
        &self,
        channel: &str,
        lease: Option<LeaseTerms>,
    ) -> Result<Receiver, Error> {
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
            lease,
        })
    }

    /// Acknowledges the leased message `id` of `channel`: it is taken for good (kept for
    /// replay like any delivered message), durably as configured. `false` when no such
    /// lease is held (acknowledged already, ran out, never leased).
    pub async fn ack(&self, channel: &str, id: u64) -> Result<bool, Error> {
        names::check_channel(channel)?;
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            let Some(ch) = state.channels.get_mut(channel) else {
                return Ok(false);
            };
            let Some(lease) = ch.leased.remove(id) else {
                return Ok(false);
            };
            let mut batch = WriteBatch::default();
            batch.remove_unacked(id, channel);
            match inner.store.apply(batch) {
                Ok(ticket) => {
                    let mut entry = lease.entry;
                    entry.unacked_on_disk = false;
                    ch.remember(entry);
                    ticket
                }
                Err(e) => {
                    ch.leased.insert(lease);
                    return Err(e.into());
                }
            }
        };
        inner.store.commit(ticket).await?;
        Ok(true)
    }

    /// How many messages of `channel` `holder` holds under a lease now.
    pub fn leases_held(&self, channel: &str, holder: u64) -> usize {
        let state = self.inner.state.lock();
        state.channels.get(channel).map_or(0, |ch| {
            ch.leased
                .values()
                .filter(|lease| lease.holder == Some(holder))
                .count()
        })
    }

    /// Puts every message whose lease ran out back at the head of its channel (unless
    /// it expired meanwhile). The server calls it a few times a second.
    pub fn end_leases(&self) {
        let now = self.inner.clock.now_ms();
        self.inner
            .end_leases_where(None, |lease| lease.until_ms <= now);
    }

    /// Ends at once every lease that `holder` holds on `channels` (its connection
    /// closed): the messages go back to the head of their channels, in id order.
    pub fn release<'a>(&self, holder: u64, channels: impl IntoIterator<Item = &'a str>) {
        let channels: Vec<&str> = channels.into_iter().collect();
        self.inner
            .end_leases_where(Some(&channels), |lease| lease.holder == Some(holder));
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

    /// Takes the oldest pending message of `channel` not reserved for a woken waiter;
    /// with `lease`, leases it (and records the lease in the store, before any cursor
    /// that covers it). The cursor reaches the store later (see
    /// [`Inner::write_cursors`]).
    fn take(
        &self,
        ch: &mut Channel,
        channel: &str,
        lease: Option<LeaseTerms>,
        leasing: &mut BTreeSet<String>,
    ) -> Option<Delivery> {
        let now = self.clock.now_ms();
        ch.drop_expired(now);
        if ch.queue.len() <= ch.woken.len() {
            return None;
        }
        let mut entry = ch.queue.pop_front().expect("queue is longer than reserved");
        ch.taken_upto = ch.taken_upto.max(entry.id);
        let taken = delivery(&entry);
        let mut batch = WriteBatch::default();
        match lease {
            Some(terms) => {
                if !entry.unacked_on_disk {
                    batch.put_unacked(entry.id, channel);
                    entry.unacked_on_disk = true;
                }
                ch.leased.insert(Lease {
                    entry,
                    until_ms: now.saturating_add(saturating_ms(terms.duration)),
                    holder: terms.holder,
                });
                if !leasing.contains(channel) {
                    leasing.insert(channel.to_string());
                }
            }
            None => {
                if entry.unacked_on_disk {
                    batch.remove_unacked(entry.id, channel);
                    entry.unacked_on_disk = false;
                }
                ch.remember(entry);
            }
        }
        if !batch.is_empty()
            && let Err(error) = self.store.apply(batch)
        {
            // The lease holds in memory; after a restart the message may count as taken.
            tracing::warn!(%error, channel, "could not record a lease");
        }
        Some(taken)
    }

    /// Ends the leases for which `ends` says so, on `channels` (every channel that holds
    /// leases when `None`): each message goes back to the head of its channel.
    fn end_leases_where(&self, channels: Option<&[&str]>, ends: impl Fn(&Lease) -> bool) {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let names: Vec<String> = match channels {
            Some(channels) => channels
                .iter()
                .filter(|c| state.leasing.contains(**c))
                .map(|c| c.to_string())
                .collect(),
            None => state.leasing.iter().cloned().collect(),
        };
        for name in names {
            let Some(ch) = state.channels.get_mut(&name) else {
                state.leasing.remove(&name);
                continue;
            };
            for lease in ch.leased.take_if(&ends) {
                ch.requeue(lease.entry);
            }
            if ch.leased.is_empty() {
                state.leasing.remove(&name);
            }
        }
    }
}

/// How a receiver leases what it takes: for `duration` no other receiver gets the
/// message; unless it is acknowledged ([`ChannelLayer::ack`]) by then, it goes back to
/// the head of its channel. `holder`: the connection it goes to, whose close ends its
/// leases at once ([`ChannelLayer::release`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTerms {
    pub duration: Duration,
    pub holder: Option<u64>,
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
    lease: Option<LeaseTerms>,
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
        let mut guard = inner.state.lock();
        let state = &mut *guard;
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
        if let Some(delivery) = inner.take(ch, &key.channel, self.lease, &mut state.leasing) {
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
        let mut guard = inner.state.lock();
        let state = &mut *guard;
        let ch = inner.channel(&mut state.channels, &self.key.channel);
        inner.take(ch, &self.key.channel, self.lease, &mut state.leasing)
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
