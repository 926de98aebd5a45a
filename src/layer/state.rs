//! The in-memory index of the channel layer: per-channel queues, replay logs and waiting
//! receivers, and group memberships. It is rebuilt from the store at start and changed
//! only under the layer's lock, in the same order as the store's writes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::{Bound, ControlFlow, Deref};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;
use std::time::Duration;

use hashbrown::HashMap;

use crate::config::ChannelRules;
use crate::message::Message;

/// One message in a channel's queue or replay log.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub id: u64,
    pub sent_at_ms: u64,
    /// The group it came through, if any (for keeping it when the membership ends).
    pub group: Option<Arc<str>>,
    pub message: Arc<Message>,
    /// Whether the store records it as leased and unacknowledged (an `E` key), which
    /// must go once it is acknowledged or taken for good.
    pub unacked_on_disk: bool,
}

/// A message taken with a lease and not acknowledged yet.
pub(super) struct Lease {
    pub entry: Entry,
    /// When it goes back to the head of its channel.
    pub until_ms: u64,
    /// The WebSocket connection it went to: its leases end when it closes.
    pub holder: Option<u64>,
}

/// A receiver waiting for a message.
pub(super) struct Waiter {
    pub id: u64,
    pub waker: Waker,
}

/// One channel's state.
pub(super) struct Channel {
    pub capacity: usize,
    pub expiry_ms: u64,
    pub replay_ms: u64,
    pub replay_capacity: usize,
    /// Pending messages, oldest first (ids and send times both ascend).
    pub queue: Queue,
    /// Delivered messages kept for replay, oldest first.
    pub delivered: VecDeque<Entry>,
    /// Messages taken with a lease and not acknowledged, by id: pending still (they
    /// count against the capacity), but no receiver gets them until the lease ends.
    pub leased: Leases,
    /// Receivers waiting, longest-waiting first.
    pub waiters: VecDeque<Waiter>,
    /// Receivers woken for a message that they have not taken yet: as many of the
    /// oldest pending messages are theirs, so a newly arriving receive may not take them.
    pub woken: Vec<u64>,
    /// The highest id that left this channel without being delivered or kept for
    /// replay (expired, or pushed out of the replay log): resuming after an earlier id
    /// may have missed it. A new channel state starts at the layer's lost watermark
    /// (see [`Store::lost_upto`](crate::store::Store::lost_upto)), since what an earlier, forgotten
    /// state of the same channel lost is known only up to it.
    pub lost_upto: u64,
    /// Receive cursor: the highest id taken off the queue.
    pub taken_upto: u64,
    /// The cursor as last written to the store.
    pub cursor_on_disk: u64,
    /// The cursor as it was at the previous sweep: written at the next one, so that a
    /// message is marked taken on disk only after its answer has long gone out.
    pub cursor_staged: u64,
}

/// `duration` in whole milliseconds, `u64::MAX` for one too long to count them.
pub(crate) fn saturating_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Channel {
    pub fn new(
        name: &str,
        rules: &ChannelRules,
        replay_capacity: usize,
        lost_upto: u64,
        tally: &Arc<Tally>,
    ) -> Self {
        Channel {
            capacity: rules.capacity(name),
            expiry_ms: saturating_ms(rules.expiry(name)),
            replay_ms: saturating_ms(rules.replay(name)),
            replay_capacity,
            queue: Queue {
                entries: VecDeque::new(),
                tally: tally.clone(),
            },
            delivered: VecDeque::new(),
            leased: Leases {
                entries: BTreeMap::new(),
                tally: tally.clone(),
            },
            waiters: VecDeque::new(),
            woken: Vec::new(),
            lost_upto,
            taken_upto: 0,
            cursor_on_disk: 0,
            cursor_staged: 0,
        }
    }

    /// Drops expired pending messages and replay entries past their time.
    pub(crate) fn drop_expired(&mut self, now_ms: u64) {
        while let Some(front) = self.queue.front() {
            if front.sent_at_ms.saturating_add(self.expiry_ms) > now_ms {
                break;
            }
            self.lost_upto = self.lost_upto.max(front.id);
            self.queue.pop_front();
            crate::metrics::metrics().expired(1);
        }
        while let Some(front) = self.delivered.front() {
            if front.sent_at_ms.saturating_add(self.replay_ms) > now_ms {
                break;
            }
            self.lost_upto = self.lost_upto.max(front.id);
            self.delivered.pop_front();
        }
    }

    /// Whether a new message would exceed the capacity (after dropping expired ones;
    /// below the capacity there is no need to look, which spares a group_send a look
    /// into every member's queue).
    pub(crate) fn is_full(&mut self, now_ms: u64) -> bool {
        if self.pending() < self.capacity {
            return false;
        }
        self.drop_expired(now_ms);
        self.pending() >= self.capacity
    }

    /// Messages not yet taken for good: queued, or leased and not acknowledged.
    pub(crate) fn pending(&self) -> usize {
        self.queue.len() + self.leased.len()
    }

    /// Puts a message whose lease ended back in the queue, in id order (so at its
    /// head, ahead of everything sent after it), and wakes a waiting receiver for it.
    pub(crate) fn requeue(&mut self, entry: Entry) {
        self.queue.insert_in_order(entry);
        self.wake();
    }

    /// Keeps a delivered message for replay, within the replay log's bounds.
    pub(crate) fn remember(&mut self, entry: Entry) {
        if self.replay_capacity == 0 {
            self.lost_upto = self.lost_upto.max(entry.id);
            return;
        }
        if self.delivered.len() >= self.replay_capacity
            && let Some(old) = self.delivered.pop_front()
        {
            self.lost_upto = self.lost_upto.max(old.id);
        }
        // In id order: an acknowledged lease can come after later messages.
        let at = self.delivered.partition_point(|e| e.id < entry.id);
        self.delivered.insert(at, entry);
    }

    /// Hands pending messages to waiting receivers, longest-waiting first.
    pub(crate) fn wake(&mut self) {
        while self.queue.len() > self.woken.len() {
            let Some(waiter) = self.waiters.pop_front() else {
                break;
            };
            self.woken.push(waiter.id);
            waiter.waker.wake();
        }
    }

    /// Gives up receiver `id`'s reservation, if it holds one; tells whether it did.
    pub(crate) fn unreserve(&mut self, id: u64) -> bool {
        match self.woken.iter().position(|w| *w == id) {
            Some(at) => {
                self.woken.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// Takes receiver `id` out of the line; a message reserved for it passes on. Returns
    /// the waker of the receiver if it was waiting.
    pub fn leave(&mut self, id: u64) -> Option<Waker> {
        if self.unreserve(id) {
            self.wake();
            return None;
        }
        let at = self.waiters.iter().position(|w| w.id == id)?;
        self.waiters.remove(at).map(|w| w.waker)
    }

    /// Sets the cursor read back from the store.
    pub(crate) fn restore_cursor(&mut self, cursor: u64) {
        self.taken_upto = cursor;
        self.cursor_on_disk = cursor;
        self.cursor_staged = cursor;
    }

    /// Nothing in it, nobody waiting, cursor on disk, and nothing lost that the lost
    /// watermark `lost_floor` does not cover: it can be forgotten, and a state made
    /// anew for it later knows as much.
    pub(crate) fn is_idle(&self, lost_floor: u64) -> bool {
        self.lost_upto <= lost_floor
            && self.taken_upto == self.cursor_on_disk
            && self.queue.is_empty()
            && self.leased.is_empty()
            && self.delivered.is_empty()
            && self.waiters.is_empty()
            && self.woken.is_empty()
    }
}

/// Totals kept as the layer changes, so that stats cost nothing to read.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Messages in all queues (expired ones until they are dropped, at the latest by
    /// the next sweep).
    pub pending: AtomicUsize,
    /// Channels whose queue holds at least one message.
    pub busy_channels: AtomicUsize,
    /// Memberships in all groups (lapsed ones until the next sweep ends them).
    pub memberships: AtomicUsize,
}

impl Tally {
    fn add(counter: &AtomicUsize, n: usize) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(counter: &AtomicUsize, n: usize) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }
}

/// A channel's pending messages, counted in the layer's [`Tally`] as they come and go.
pub(super) struct Queue {
    entries: VecDeque<Entry>,
    tally: Arc<Tally>,
}

impl Queue {
    pub(crate) fn push_back(&mut self, entry: Entry) {
        if self.entries.is_empty() {
            Tally::add(&self.tally.busy_channels, 1);
        }
        Tally::add(&self.tally.pending, 1);
        self.entries.push_back(entry);
    }

    pub(crate) fn pop_front(&mut self) -> Option<Entry> {
        let entry = self.entries.pop_front()?;
        Tally::sub(&self.tally.pending, 1);
        if self.entries.is_empty() {
            Tally::sub(&self.tally.busy_channels, 1);
        }
        Some(entry)
    }

    /// Inserts `entry` before the first entry with a higher id.
    pub(crate) fn insert_in_order(&mut self, entry: Entry) {
        if self.entries.is_empty() {
            Tally::add(&self.tally.busy_channels, 1);
        }
        Tally::add(&self.tally.pending, 1);
        let at = self.entries.partition_point(|e| e.id < entry.id);
        self.entries.insert(at, entry);
    }

    pub(crate) fn clear(&mut self) {
        self.uncount();
        self.entries.clear();
    }

    fn uncount(&self) {
        if !self.entries.is_empty() {
            Tally::sub(&self.tally.pending, self.entries.len());
            Tally::sub(&self.tally.busy_channels, 1);
        }
    }
}

impl Deref for Queue {
    type Target = VecDeque<Entry>;

    fn deref(&self) -> &VecDeque<Entry> {
        &self.entries
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.uncount();
    }
}

/// A channel's leased messages, by id, counted as pending in the layer's [`Tally`].
pub(super) struct Leases {
    entries: BTreeMap<u64, Lease>,
    tally: Arc<Tally>,
}

impl Leases {
    pub(crate) fn insert(&mut self, lease: Lease) {
        let id = lease.entry.id;
        if self.entries.insert(id, lease).is_none() {
            Tally::add(&self.tally.pending, 1);
        }
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<Lease> {
        let lease = self.entries.remove(&id)?;
        Tally::sub(&self.tally.pending, 1);
        Some(lease)
    }

    /// Removes and returns the leases for which `ends` says so, in id order.
    pub(crate) fn take_if(&mut self, mut ends: impl FnMut(&Lease) -> bool) -> Vec<Lease> {
        let ended: Vec<u64> = self
            .entries
            .values()
            .filter(|lease| ends(lease))
            .map(|lease| lease.entry.id)
            .collect();
        ended.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    pub(crate) fn clear(&mut self) {
        Tally::sub(&self.tally.pending, self.entries.len());
        self.entries.clear();
    }
}

impl Deref for Leases {
    type Target = BTreeMap<u64, Lease>;

    fn deref(&self) -> &BTreeMap<u64, Lease> {
        &self.entries
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        Tally::sub(&self.tally.pending, self.entries.len());
    }
}

/// The channel states, by name, with the names also kept in order for paged listings
/// (the map itself is a hash map: a group_send looks up every member).
#[derive(Default)]
pub(super) struct Channels {
    map: HashMap<String, Channel>,
    names: BTreeSet<String>,
}

impl Channels {
    /// The state of `name`, made with `make` if there is none.
    pub(crate) fn get_or_insert_with(
        &mut self,
        name: &str,
        make: impl FnOnce() -> Channel,
    ) -> &mut Channel {
        let names = &mut self.names;
        self.map.entry_ref(name).or_insert_with(|| {
            names.insert(name.to_string());
            make()
        })
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> Option<&mut Channel> {
        self.map.get_mut(name)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut Channel> {
        self.map.values_mut()
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Channel)> {
        self.map.iter_mut()
    }

    /// Keeps the channels for which `keep` says so.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Channel) -> bool) {
        let names = &mut self.names;
        self.map.retain(|name, ch| {
            let kept = keep(ch);
            if !kept {
                names.remove(name);
            }
            kept
        });
    }

    /// Visits the channels after `after` (from the first when `None`) in name order,
    /// until `visit` breaks.
    pub(crate) fn visit_after(
        &mut self,
        after: Option<&str>,
        mut visit: impl FnMut(&str, &mut Channel) -> ControlFlow<()>,
    ) {
        let bound = after.map_or(Bound::Unbounded, Bound::Excluded);
        for name in self.names.range::<str, _>((bound, Bound::Unbounded)) {
            let Some(ch) = self.map.get_mut(name.as_str()) else {
                continue;
            };
            if visit(name, ch).is_break() {
                return;
            }
        }
    }
}

impl<'a> IntoIterator for &'a Channels {
    type Item = (&'a String, &'a Channel);
    type IntoIter = hashbrown::hash_map::Iter<'a, String, Channel>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl Deref for Channels {
    type Target = HashMap<String, Channel>;

    fn deref(&self) -> &HashMap<String, Channel> {
        &self.map
    }
}

/// A group's members, by channel name, counted in the layer's [`Tally`].
pub(super) struct Members {
    map: BTreeMap<String, Membership>,
    tally: Arc<Tally>,
}

impl Members {
    pub(crate) fn new(tally: &Arc<Tally>) -> Self {
        Members {
            map: BTreeMap::new(),
            tally: tally.clone(),
        }
    }

    /// Sets `channel`'s membership.
    pub(crate) fn insert(&mut self, channel: &str, membership: Membership) {
        match self.map.get_mut(channel) {
            Some(held) => *held = membership,
            None => {
                self.map.insert(channel.to_string(), membership);
                Tally::add(&self.tally.memberships, 1);
            }
        }
    }

    pub(crate) fn remove(&mut self, channel: &str) {
        if self.map.remove(channel).is_some() {
            Tally::sub(&self.tally.memberships, 1);
        }
    }
}

impl Deref for Members {
    type Target = BTreeMap<String, Membership>;

    fn deref(&self) -> &BTreeMap<String, Membership> {
        &self.map
    }
}

impl<'a> IntoIterator for &'a Members {
    type Item = (&'a String, &'a Membership);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Membership>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl Drop for Members {
    fn drop(&mut self) {
        Tally::sub(&self.tally.memberships, self.map.len());
    }
}

/// A channel's membership in a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Membership {
    /// Group messages with a higher id reach the channel (while the membership lasts).
    pub joined_id: u64,
    pub last_add_ms: u64,
}

impl Membership {
    /// Whether the membership is in force at `at_ms`.
    pub(crate) fn active_at(&self, at_ms: u64, group_expiry_ms: u64) -> bool {
        at_ms < self.last_add_ms.saturating_add(group_expiry_ms)
    }
}

/// Everything the layer holds in memory. The channel map is hashbrown's, hashing with
/// foldhash: a group_send looks up every member's channel, SipHash was a visible part
/// of its cost, and `entry_ref` finds or creates a channel with one lookup. Groups and
/// their members are kept in name order, for paged listings.
#[derive(Default)]
pub(super) struct State {
    pub channels: Channels,
    pub groups: BTreeMap<String, Members>,
    /// Send times never go backwards, so ids and send times ascend together.
    pub last_sent_at_ms: u64,
    /// Channels that hold leased messages, for the timer that ends leases.
    pub leasing: BTreeSet<String>,
}

impl State {
    /// The send time for a new message: now, but never before the previous one.
    pub(crate) fn send_time(&mut self, now_ms: u64) -> u64 {
        self.last_sent_at_ms = self.last_sent_at_ms.max(now_ms);
        self.last_sent_at_ms
    }
}
