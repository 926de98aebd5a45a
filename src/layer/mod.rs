//! The channel layer: named FIFO channels, groups, capacity, expiry, durable in sled.
//!
//! Every operation takes the layer's lock, assigns ids from the store's global sequence,
//! writes the store and updates the in-memory index in the same order, then (outside the
//! lock) waits for the store's group commit before acknowledging. A send or group_send
//! writes one record whatever the number of recipients: group members are resolved
//! from memberships (joined id and last add time) and the record's list of members that
//! were skipped as full. When a membership ends, the messages it brought that are still
//! held are pinned to the channel with small reference keys, so a restart rebuilds
//! exactly the same queues. Receives record a per-channel cursor lazily (at-least-once
//! after a crash). Knows nothing of HTTP.

pub mod clock;
pub mod names;
mod state;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use rand::distr::Alphanumeric;

use crate::config::{ChannelRules, ConfigError, LayerSettings, StorageSettings};
use crate::message::{Message, MessageError};
use crate::store::dump::DumpStats;
use crate::store::record::{MessageBatch, Record, Target};
use crate::store::{OnDataLoss, Store, StoreError, keys};
use clock::Clock;
use state::{Channel, Entry, Members, Membership, State, Waiter};

/// Why a layer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A channel, group or prefix name breaks the naming rules; the string says how.
    #[error("{0}")]
    InvalidName(String),
    /// The message is malformed or not a valid channel-layer message.
    #[error("{0}")]
    InvalidMessage(#[from] MessageError),
    /// The message's msgpack encoding (`size` bytes) is over `max_message_bytes` (`limit`).
    #[error("message is {size} bytes, over the limit of {limit} bytes")]
    MessageTooLarge { size: usize, limit: usize },
    /// A send found `channel` already holding its `capacity` of pending messages.
    #[error("channel {channel} is full ({capacity} messages pending)")]
    ChannelFull { channel: String, capacity: usize },
    /// The store failed to read or write (including a full disk).
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// The layer settings are invalid (e.g. a bad per-channel glob) when opening.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A message taken off a channel.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message's id, from the store's global sequence; increases within a channel.
    pub id: u64,
    /// The message itself.
    pub message: Arc<Message>,
}

/// The outcome of a group_send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupSendReport {
    /// Members whose queue got the message.
    pub delivered: usize,
    /// Members that were full and were skipped.
    pub full: usize,
}

/// What a stream resuming after an id gets: the delivered messages still kept, and
/// whether some after that id can no longer be had.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Set when messages after the requested id were lost (expired or out of the log).
    pub gap: Option<Gap>,
    /// The delivered messages after the requested id still in the replay log, oldest first.
    pub deliveries: Vec<Delivery>,
}

/// Messages after `after` are missing; the first one still available is `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The id the stream resumed after.
    pub after: u64,
    /// The id of the first message still available after the gap.
    pub next: u64,
}

/// One channel as seen by introspection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChannelInfo {
    /// The channel's name.
    pub name: String,
    /// Unexpired messages waiting to be received.
    pub pending: usize,
    /// Receives currently waiting on the channel for a message.
    pub receivers_waiting: usize,
}

/// One group and its current members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// The channels whose membership has not lapsed.
    pub members: Vec<String>,
}

/// Totals for a console or metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Channels that hold messages or have receivers waiting.
    pub channels: usize,
    /// Unexpired messages waiting in all channels.
    pub pending_messages: usize,
    /// Groups with at least one member.
    pub groups: usize,
    /// Current group memberships, summed over all groups.
    pub memberships: usize,
    /// Size of the data directory on disk, in bytes (as measured at the last sweep,
    /// plus the messages accepted since).
    pub disk_bytes: u64,
    /// What the data directory had lost when the server was started on it with
    /// `--accept-data-loss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_loss: Option<String>,
    /// Bytes of the message records on disk (expired ones until the sweep deletes
    /// them): `disk_bytes` divided by this is the store's space amplification.
    pub stored_bytes: u64,
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Message records deleted from disk, sent longer ago than the longest expiry or replay time.
    pub messages_deleted: usize,
    /// Group memberships that passed `group_expiry_secs` since their last group_add.
    pub memberships_lapsed: usize,
    /// Whether the store was made to give back the space of deleted data
    /// ([`Store::reclaim`]).
    pub disk_reclaimed: bool,
}

/// The channel layer; cheap to clone, all clones share one state.
#[derive(Clone)]
pub struct ChannelLayer {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    rules: ChannelRules,
    group_expiry_ms: u64,
    max_message_bytes: usize,
    replay_capacity: usize,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    next_waiter: AtomicU64,
    /// The lost watermark as stored ([`keys::LOST`]): the highest id of a message
    /// deleted from the store. New channel states start knowing losses up to it, and
    /// an idle channel is forgotten only once it covers what the channel lost.
    lost_floor: AtomicU64,
    /// Bytes of the message records on disk ([`Record::stored_len`]), for the bound
    /// [`Store::is_bloated`] keeps the data directory within.
    stored_bytes: AtomicU64,
    /// Whether the sweep may call [`Store::reclaim`]: set when messages are deleted
    /// from disk (and at start), cleared when a reclaim gave nothing back.
    reclaiming: AtomicBool,
}

impl ChannelLayer {
    /// Opens the store in `storage.data_dir` and rebuilds the in-memory index from it.
    /// Blocking: call it before serving, or from `spawn_blocking`.
    pub fn open(
        layer: &LayerSettings,
        storage: &StorageSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, Error> {
        let rules = layer.rules()?;
        let store = Store::open(
            &storage.data_dir,
            storage.durability,
            Duration::from_millis(storage.flush_interval_ms),
            if storage.accept_data_loss {
                OnDataLoss::Accept
            } else {
                OnDataLoss::Refuse
            },
        )?;
        store.limit_disk(storage.max_disk_bytes);
        let lost_floor = store
            .get(keys::LOST)?
            .and_then(|v| keys::decode_u64(&v))
            .unwrap_or(0);
        let inner = Inner {
            store,
            rules,
            group_expiry_ms: layer.group_expiry_secs.saturating_mul(1000),
            max_message_bytes: layer.max_message_bytes,
            replay_capacity: layer.replay_capacity,
            clock,
            state: Mutex::new(State::default()),
            next_waiter: AtomicU64::new(1),
            lost_floor: AtomicU64::new(lost_floor),
            stored_bytes: AtomicU64::new(0),
            reclaiming: AtomicBool::new(true),
        };
        let state = inner.rebuild()?;
        *inner.state.lock() = state;
        Ok(ChannelLayer {
            inner: Arc::new(inner),
        })
    }

    /// Appends `message` to `channel` and returns its id once durable.
    pub async fn send(&self, channel: &str, message: Message) -> Result<u64, Error> {
        names::check_channel(channel)?;
        let inner = &*self.inner;
        inner.check_size(&message)?;
        let message = Arc::new(message);
        let (id, ticket) = {
            let mut state = inner.state.lock();
            let now = inner.clock.now_ms();
            let ch = inner.channel(&mut state.channels, channel);
            if ch.is_full(now) {
                return Err(Error::ChannelFull {
                    channel: channel.to_string(),
                    capacity: ch.capacity,
                });
            }
            inner.store.take_room(message.encoded_len())?;
            let sent_at_ms = state.send_time(now);
            let id = inner.store.next_id()?;
            let record = Record {
                sent_at_ms,
                target: Target::Channel(channel.to_string()),
                skipped: Vec::new(),
                body: message.msgpack().clone(),
            };
            let ticket = inner.store.append(id, &record)?;
            inner.stored(&record);
            let ch = inner.channel(&mut state.channels, channel);
            ch.queue.push_back(Entry {
                id,
                sent_at_ms,
                group: None,
                message,
            });
            ch.wake();
            (id, ticket)
        };
        inner.store.commit(ticket).await?;
        Ok(id)
    }

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

    /// Adds `channel` to `group`, or refreshes its membership.
    pub async fn group_add(&self, group: &str, channel: &str) -> Result<(), Error> {
        names::check_group(group)?;
        names::check_channel(channel)?;
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            let now = inner.clock.now_ms();
            let existing = state
                .groups
                .get(group)
                .and_then(|members| members.get(channel))
                .copied();
            let mut batch = sled::Batch::default();
            let membership = match existing {
                Some(m) if m.active_at(now, inner.group_expiry_ms) => Membership {
                    joined_id: m.joined_id,
                    last_add_ms: now.max(m.last_add_ms),
                },
                lapsed_or_new => {
                    if lapsed_or_new.is_some() {
                        inner.pin_group_messages(&state, group, channel, &mut batch);
                    }
                    Membership {
                        joined_id: inner.store.next_id()?,
                        last_add_ms: now,
                    }
                }
            };
            batch.insert(
                keys::membership(group, channel).as_slice(),
                keys::encode_membership(membership.joined_id, membership.last_add_ms).as_slice(),
            );
            let ticket = inner.store.apply(batch)?;
            state
                .groups
                .entry(group.to_string())
                .or_default()
                .insert(channel.to_string(), membership);
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
    }

    /// Removes `channel` from `group`; not an error when it is not a member. Messages
    /// the group already put into the channel's queue stay there.
    pub async fn group_discard(&self, group: &str, channel: &str) -> Result<(), Error> {
        names::check_group(group)?;
        names::check_channel(channel)?;
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            let is_member = state
                .groups
                .get(group)
                .is_some_and(|members| members.contains_key(channel));
            if !is_member {
                return Ok(());
            }
            let mut batch = sled::Batch::default();
            inner.pin_group_messages(&state, group, channel, &mut batch);
            batch.remove(keys::membership(group, channel));
            let ticket = inner.store.apply(batch)?;
            remove_member(&mut state, group, channel);
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
    }

    /// Puts a copy of `message` into every current member's queue, with one durable
    /// write. Full members are skipped and counted, never an error.
    pub async fn group_send(
        &self,
        group: &str,
        message: Message,
    ) -> Result<GroupSendReport, Error> {
        names::check_group(group)?;
        let inner = &*self.inner;
        inner.check_size(&message)?;
        let message = Arc::new(message);
        let group_name: Arc<str> = Arc::from(group);
        let (report, ticket) = {
            let mut guard = inner.state.lock();
            let state = &mut *guard;
            let now = inner.clock.now_ms();
            let sent_at_ms = state.send_time(now);
            let Some(members) = state.groups.get(group) else {
                return Ok(GroupSendReport::default());
            };
            let mut targets = Vec::with_capacity(members.len());
            let mut skipped = Vec::new();
            for (channel, membership) in members {
                if !membership.active_at(sent_at_ms, inner.group_expiry_ms) {
                    continue;
                }
                let ch = inner.channel(&mut state.channels, channel);
                if ch.is_full(sent_at_ms) {
                    skipped.push(channel.clone());
                } else {
                    targets.push(channel.as_str());
                }
            }
            inner.store.take_room(message.encoded_len())?;
            let id = inner.store.next_id()?;
            let report = GroupSendReport {
                delivered: targets.len(),
                full: skipped.len(),
            };
            let record = Record {
                sent_at_ms,
                target: Target::Group(group.to_string()),
                skipped,
                body: message.msgpack().clone(),
            };
            let ticket = inner.store.append(id, &record)?;
            inner.stored(&record);
            let entry = Entry {
                id,
                sent_at_ms,
                group: Some(group_name),
                message,
            };
            for channel in targets {
                let ch = state.channels.get_mut(channel).expect("created above");
                ch.queue.push_back(entry.clone());
                ch.wake();
            }
            (report, ticket)
        };
        inner.store.commit(ticket).await?;
        Ok(report)
    }

    /// A fresh, unique, valid channel name: `{prefix}.{random}!{random}`.
    pub fn new_channel(&self, prefix: &str) -> Result<String, Error> {
        const RANDOM_LEN: usize = 12;
        let prefix = if prefix.is_empty() {
            "specific"
        } else {
            prefix
        };
        if prefix.contains('!') {
            return Err(Error::InvalidName(
                "channel prefix must not contain '!'".to_string(),
            ));
        }
        let mut rng = rand::rng();
        let mut random = || -> String {
            (&mut rng)
                .sample_iter(Alphanumeric)
                .take(RANDOM_LEN)
                .map(char::from)
                .collect()
        };
        let name = format!("{prefix}.{}!{}", random(), random());
        names::check_channel(&name).map_err(|e| {
            Error::InvalidName(format!("channel prefix makes an invalid name: {e}"))
        })?;
        Ok(name)
    }

    /// Ends a channel made for one connection: removes it from `groups` and drops
    /// everything pending on it and its replay log, in one write. Its group messages
    /// need no pinning, since nothing of the channel is kept. (A restart rebuilds the
    /// messages sent straight to it into its replay log until they age out: records
    /// are stored in shared batches.)
    pub async fn close_channel(&self, channel: &str, groups: &[String]) -> Result<(), Error> {
        names::check_channel(channel)?;
        for group in groups {
            names::check_group(group)?;
        }
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            let mut batch = sled::Batch::default();
            let joined: Vec<&String> = groups
                .iter()
                .filter(|g| {
                    state
                        .groups
                        .get(*g)
                        .is_some_and(|m| m.contains_key(channel))
                })
                .collect();
            for group in &joined {
                batch.remove(keys::membership(group, channel));
            }
            let held = state.channels.get(channel).and_then(|ch| {
                let last = ch.queue.back().or(ch.delivered.back())?.id;
                for entry in ch.queue.iter().chain(ch.delivered.iter()) {
                    batch.remove(keys::reference(entry.id, channel));
                }
                batch.insert(
                    keys::cursor(channel).as_slice(),
                    keys::encode_u64(last).as_slice(),
                );
                Some(last)
            });
            if joined.is_empty() && held.is_none() {
                return Ok(());
            }
            let ticket = inner.store.apply(batch)?;
            for group in joined {
                remove_member(&mut state, group, channel);
            }
            if let (Some(last), Some(ch)) = (held, state.channels.get_mut(channel)) {
                ch.restore_cursor(last);
                ch.lost_upto = ch.lost_upto.max(last);
                ch.queue.clear();
                ch.delivered.clear();
            }
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
    }

    /// How long a membership lasts after its last group_add.
    pub fn group_expiry(&self) -> Duration {
        Duration::from_millis(self.inner.group_expiry_ms)
    }

    /// Deletes every message, membership and cursor. Ids keep growing.
    pub async fn flush(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            // Everything held is deleted, and what was lost before is no longer on disk
            // to rebuild from: a resume after an earlier id gets a gap.
            let lost_upto = state
                .channels
                .values()
                .flat_map(|ch| {
                    let held = [ch.queue.back(), ch.delivered.back()];
                    held.into_iter()
                        .flatten()
                        .map(|e| e.id)
                        .chain([ch.lost_upto])
                })
                .fold(inner.lost_floor(), u64::max);
            let ticket = inner.store.clear(lost_upto)?;
            inner.lost_floor.fetch_max(lost_upto, Ordering::SeqCst);
            inner.stored_bytes.store(0, Ordering::Relaxed);
            inner.reclaiming.store(true, Ordering::Relaxed);
            state.groups.clear();
            for ch in state.channels.values_mut() {
                ch.lost_upto = ch.lost_upto.max(lost_upto);
                ch.queue.clear();
                ch.delivered.clear();
            }
            inner.forget_idle(&mut state);
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
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

    /// Every channel that holds messages or has receivers waiting, by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let now = inner.clock.now_ms();
        let mut list: Vec<ChannelInfo> = state
            .channels
            .iter_mut()
            .filter_map(|(name, ch)| {
                ch.drop_expired(now);
                (!ch.queue.is_empty() || !ch.waiters.is_empty()).then(|| ChannelInfo {
                    name: name.clone(),
                    pending: ch.queue.len(),
                    receivers_waiting: ch.waiters.len(),
                })
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Every group with at least one current member, by name.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let inner = &*self.inner;
        let state = inner.state.lock();
        let now = inner.clock.now_ms();
        let mut list: Vec<GroupInfo> = state
            .groups
            .iter()
            .map(|(name, members)| GroupInfo {
                name: name.clone(),
                members: current_members(members, now, inner.group_expiry_ms),
            })
            .filter(|g| !g.members.is_empty())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// The current members of `group`, by name.
    pub fn group_members(&self, group: &str) -> Result<Vec<String>, Error> {
        names::check_group(group)?;
        let inner = &*self.inner;
        let state = inner.state.lock();
        Ok(state
            .groups
            .get(group)
            .map(|m| current_members(m, inner.clock.now_ms(), inner.group_expiry_ms))
            .unwrap_or_default())
    }

    /// The number of unexpired messages pending on `channel`.
    pub fn pending(&self, channel: &str) -> usize {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let now = inner.clock.now_ms();
        state.channels.get_mut(channel).map_or(0, |ch| {
            ch.drop_expired(now);
            ch.queue.len()
        })
    }

    /// Totals over the whole layer.
    pub fn stats(&self) -> Stats {
        let channels = self.channels();
        let groups = self.groups();
        Stats {
            channels: channels.len(),
            pending_messages: channels.iter().map(|c| c.pending).sum(),
            groups: groups.len(),
            memberships: groups.iter().map(|g| g.members.len()).sum(),
            disk_bytes: self.inner.store.size_on_disk(),
            data_loss: self.inner.store.data_loss().map(str::to_string),
            stored_bytes: self.inner.stored_bytes.load(Ordering::Relaxed),
        }
    }

    /// Removes expired messages and lapsed memberships from memory and disk. The server
    /// runs it every `storage.sweep_interval_ms`; it blocks on disk work, so call it
    /// from `spawn_blocking`.
    pub fn sweep(&self) -> Result<SweepReport, Error> {
        let inner = &*self.inner;
        let now = inner.clock.now_ms();
        let memberships_lapsed = inner.sweep_memory(now)?;
        let retention = inner.rules.max_retention().as_millis() as u64;
        let messages_deleted = inner.sweep_disk(now.saturating_sub(retention))?;
        let disk_reclaimed = inner.reclaim_disk()?;
        Ok(SweepReport {
            messages_deleted,
            memberships_lapsed,
            disk_reclaimed,
        })
    }

    /// Writes everything to disk now (for shutdown).
    pub fn flush_to_disk(&self) -> Result<(), Error> {
        self.inner
            .write_cursors(&mut self.inner.state.lock(), true)?;
        Ok(self.inner.store.flush_blocking()?)
    }

    /// Writes a consistent dump of everything to `out` (see [`crate::store::dump`]):
    /// current receive cursors first, then every record, while operations wait.
    /// Blocking: call it from `spawn_blocking`.
    pub fn backup(&self, out: &mut impl std::io::Write) -> Result<DumpStats, Error> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        inner.write_cursors(&mut state, true)?;
        inner.store.write_pending()?;
        Ok(inner.store.export(inner.clock.now_ms(), out)?)
    }

    /// Largest accepted message, in bytes of msgpack.
    pub fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }
}

fn delivery(entry: &Entry) -> Delivery {
    Delivery {
        id: entry.id,
        message: entry.message.clone(),
    }
}

fn current_members(members: &Members, now: u64, group_expiry_ms: u64) -> Vec<String> {
    let mut list: Vec<String> = members
        .iter()
        .filter(|(_, m)| m.active_at(now, group_expiry_ms))
        .map(|(name, _)| name.clone())
        .collect();
    list.sort();
    list
}

fn remove_member(state: &mut State, group: &str, channel: &str) {
    if let Some(members) = state.groups.get_mut(group) {
        members.remove(channel);
        if members.is_empty() {
            state.groups.remove(group);
        }
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

    /// The channel's state, created on first use with its configured limits.
    fn channel<'a>(
        &self,
        channels: &'a mut hashbrown::HashMap<String, Channel>,
        name: &str,
    ) -> &'a mut Channel {
        channels.entry_ref(name).or_insert_with(|| {
            Channel::new(name, &self.rules, self.replay_capacity, self.lost_floor())
        })
    }

    fn lost_floor(&self) -> u64 {
        self.lost_floor.load(Ordering::SeqCst)
    }

    /// Counts a record just stored.
    fn stored(&self, record: &Record) {
        self.stored_bytes
            .fetch_add(record.stored_len() as u64, Ordering::Relaxed);
    }

    /// Measures the data directory and, while it is over twice the stored messages
    /// plus 64 MiB, makes the store give space back (sled alone waits for new writes;
    /// see [`Store::reclaim`]). Once a reclaim gives nothing back, the next waits for
    /// more deletions.
    fn reclaim_disk(&self) -> Result<bool, Error> {
        let disk = self.store.measure_disk();
        let stored = self.stored_bytes.load(Ordering::Relaxed);
        if !Store::is_bloated(disk, stored) || !self.reclaiming.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.store.reclaim()?;
        let after = self.store.measure_disk();
        if after >= disk {
            self.reclaiming.store(false, Ordering::Relaxed);
        }
        tracing::debug!(disk, after, stored, "reclaimed disk space");
        Ok(true)
    }

    /// Forgets the states of idle channels (see [`Channel::is_idle`]).
    fn forget_idle(&self, state: &mut State) {
        let floor = self.lost_floor();
        state.channels.retain(|_, ch| !ch.is_idle(floor));
    }

    fn check_size(&self, message: &Message) -> Result<(), Error> {
        if message.encoded_len() > self.max_message_bytes {
            return Err(Error::MessageTooLarge {
                size: message.encoded_len(),
                limit: self.max_message_bytes,
            });
        }
        Ok(())
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

    /// Writes receive cursors. `all`: every cursor as it is now (shutdown). Otherwise
    /// (each sweep) the cursors as they were at the previous sweep, so that a message
    /// counts as taken on disk one to two sweep intervals after it was handed out: a
    /// crash in between delivers it again rather than losing it with its answer.
    fn write_cursors(&self, state: &mut State, all: bool) -> Result<(), Error> {
        let mut batch = sled::Batch::default();
        let mut written = Vec::new();
        for (name, ch) in &state.channels {
            let target = if all { ch.taken_upto } else { ch.cursor_staged };
            if target > ch.cursor_on_disk {
                batch.insert(
                    keys::cursor(name).as_slice(),
                    keys::encode_u64(target).as_slice(),
                );
                written.push((name.clone(), target));
            }
        }
        if !written.is_empty() {
            self.store.apply(batch)?;
            self.store.flush_soon();
        }
        // Only what was written counts as on disk; a failed write is retried next sweep.
        for (name, target) in written {
            if let Some(ch) = state.channels.get_mut(&name) {
                ch.cursor_on_disk = target;
            }
        }
        for ch in state.channels.values_mut() {
            ch.cursor_staged = ch.taken_upto;
        }
        Ok(())
    }

    /// Adds reference keys so that the group's messages the channel holds stay its own
    /// after the membership ends (also across a restart).
    fn pin_group_messages(
        &self,
        state: &State,
        group: &str,
        channel: &str,
        batch: &mut sled::Batch,
    ) {
        let Some(ch) = state.channels.get(channel) else {
            return;
        };
        for entry in ch.queue.iter().chain(ch.delivered.iter()) {
            if entry.group.as_deref() == Some(group) {
                batch.insert(keys::reference(entry.id, channel), &[]);
            }
        }
    }

    /// Drops expired entries, forgets idle channels, ends lapsed memberships.
    fn sweep_memory(&self, now: u64) -> Result<usize, Error> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        for ch in state.channels.values_mut() {
            ch.drop_expired(now);
        }
        self.write_cursors(state, false)?;
        let mut batch = sled::Batch::default();
        let mut lapsed = Vec::new();
        for (group, members) in &state.groups {
            for (channel, membership) in members {
                if !membership.active_at(now, self.group_expiry_ms) {
                    self.pin_group_messages(state, group, channel, &mut batch);
                    batch.remove(keys::membership(group, channel));
                    lapsed.push((group.clone(), channel.clone()));
                }
            }
        }
        if !lapsed.is_empty() {
            self.store.apply(batch)?;
            for (group, channel) in &lapsed {
                remove_member(state, group, channel);
            }
        }
        self.forget_idle(state);
        Ok(lapsed.len())
    }

    /// Deletes stored messages sent before `cutoff_ms` (past every expiry and replay
    /// time), their reference keys, and cursors that no longer point at anything, and
    /// raises the lost watermark to the highest deleted id in the same write.
    fn sweep_disk(&self, cutoff_ms: u64) -> Result<usize, Error> {
        const BATCH: usize = 10_000;
        let mut deleted = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            let mut first_kept = None;
            let mut last_deleted = None;
            let mut deleted_bytes = 0;
            for item in self.store.scan(&[keys::MESSAGE]) {
                let (key, value) = item?;
                let id = keys::message_id(&key).unwrap_or(0);
                match MessageBatch::decode_sent_at(&value) {
                    Some(sent_at) if sent_at >= cutoff_ms => {
                        first_kept = Some(id);
                        break;
                    }
                    _ => {}
                }
                batch.remove(key);
                deleted_bytes += MessageBatch::records_len(&value) as u64;
                last_deleted = Some((id, value));
                in_batch += 1;
                if in_batch == BATCH {
                    first_kept = Some(id + 1);
                    break;
                }
            }
            let upto = first_kept.unwrap_or(u64::MAX);
            if in_batch == 0 {
                return Ok(deleted);
            }
            for item in self
                .store
                .range(&keys::reference_from(0), &keys::reference_from(upto))
            {
                batch.remove(item?.0);
            }
            for item in self.store.scan(&[keys::CURSOR]) {
                let (key, value) = item?;
                if keys::decode_u64(&value).is_some_and(|cursor| cursor < upto) {
                    batch.remove(key);
                }
            }
            // A damaged batch (which a start refuses anyway) counts by its key.
            let lost_upto = last_deleted
                .map(|(id, value)| MessageBatch::decode_last_id(&value).unwrap_or(id))
                .map_or(0, |id| id.max(self.lost_floor()));
            batch.insert(keys::LOST, &keys::encode_u64(lost_upto));
            self.store.apply(batch)?;
            self.lost_floor.fetch_max(lost_upto, Ordering::SeqCst);
            let _ =
                self.stored_bytes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |stored| {
                        Some(stored.saturating_sub(deleted_bytes))
                    });
            self.reclaiming.store(true, Ordering::Relaxed);
            deleted += in_batch;
            if in_batch < BATCH {
                return Ok(deleted);
            }
        }
    }

    /// Reads the store back into memory: memberships, cursors, references, then every
    /// message in id order, placed in each recipient's queue or replay log.
    fn rebuild(&self) -> Result<State, Error> {
        let now = self.clock.now_ms();
        let corrupt = |what: &str| StoreError::Corrupt {
            path: self.store.path().to_path_buf(),
            detail: format!("unreadable {what} record"),
        };
        let mut state = State::default();
        for item in self.store.scan(&[keys::MEMBERSHIP]) {
            let (key, value) = item?;
            let (group, channel) =
                keys::membership_parts(&key).ok_or_else(|| corrupt("membership"))?;
            let (joined_id, last_add_ms) =
                keys::decode_membership(&value).ok_or_else(|| corrupt("membership"))?;
            state.groups.entry(group.to_string()).or_default().insert(
                channel.to_string(),
                Membership {
                    joined_id,
                    last_add_ms,
                },
            );
        }
        let mut cursors = HashMap::new();
        for item in self.store.scan(&[keys::CURSOR]) {
            let (key, value) = item?;
            let channel = keys::cursor_channel(&key).ok_or_else(|| corrupt("cursor"))?;
            let cursor = keys::decode_u64(&value).ok_or_else(|| corrupt("cursor"))?;
            cursors.insert(channel.to_string(), cursor);
        }
        let mut references: HashMap<u64, Vec<String>> = HashMap::new();
        for item in self.store.scan(&[keys::REF]) {
            let (key, _) = item?;
            let (id, channel) = keys::reference_parts(&key).ok_or_else(|| corrupt("reference"))?;
            references.entry(id).or_default().push(channel.to_string());
        }
        let mut stored_bytes = 0;
        for item in self.store.scan(&[keys::MESSAGE]) {
            let (_, value) = item?;
            stored_bytes += MessageBatch::records_len(&value) as u64;
            for record in MessageBatch::decode(&value) {
                let (id, record) = record.ok_or_else(|| corrupt("message"))?;
                self.place(&mut state, &cursors, &mut references, id, record);
            }
        }
        for (name, ch) in state.channels.iter_mut() {
            if let Some(cursor) = cursors.get(name) {
                ch.restore_cursor(*cursor);
            }
            ch.drop_expired(now);
        }
        self.forget_idle(&mut state);
        self.stored_bytes.store(stored_bytes, Ordering::Relaxed);
        Ok(state)
    }

    /// Puts a stored message into each recipient's queue, or its replay log if the
    /// recipient's cursor says it was taken.
    fn place(
        &self,
        state: &mut State,
        cursors: &HashMap<String, u64>,
        references: &mut HashMap<u64, Vec<String>>,
        id: u64,
        record: Record,
    ) {
        state.last_sent_at_ms = state.last_sent_at_ms.max(record.sent_at_ms);
        let mut recipients = references.remove(&id).unwrap_or_default();
        let group = match &record.target {
            Target::Channel(channel) => {
                recipients.push(channel.clone());
                None
            }
            Target::Group(group) => {
                if let Some(members) = state.groups.get(group) {
                    recipients.extend(
                        members
                            .iter()
                            .filter(|(channel, m)| {
                                m.joined_id < id
                                    && m.active_at(record.sent_at_ms, self.group_expiry_ms)
                                    && !record.skipped.contains(channel)
                            })
                            .map(|(channel, _)| channel.clone()),
                    );
                }
                Some(Arc::<str>::from(group.as_str()))
            }
        };
        let message = Arc::new(Message::trusted(record.body));
        for channel in recipients {
            let delivered = cursors.get(&channel).is_some_and(|c| id <= *c);
            let ch = self.channel(&mut state.channels, &channel);
            let entry = Entry {
                id,
                sent_at_ms: record.sent_at_ms,
                group: group.clone(),
                message: message.clone(),
            };
            if delivered {
                ch.remember(entry);
            } else {
                ch.queue.push_back(entry);
            }
        }
    }
}

impl Drop for Inner {
    /// Writes every receive cursor, so that a clean close redelivers nothing.
    fn drop(&mut self) {
        let mut state = std::mem::take(self.state.get_mut());
        if let Err(e) = self.write_cursors(&mut state, true) {
            tracing::error!(error = %e, "could not write receive cursors at close");
        }
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
    pub fn try_take(&mut self) -> Option<Delivery> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let ch = inner.channel(&mut state.channels, &self.key.channel);
        inner.take(ch)
    }

    /// Whether it was revoked (it takes nothing more).
    pub fn is_revoked(&self) -> bool {
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
    pub fn has_message_waiting(&self) -> bool {
        let state = self.inner.state.lock();
        state
            .channels
            .get(&self.key.channel)
            .is_some_and(|ch| ch.woken.contains(&self.key.id))
    }
}
