//! The channel layer: named FIFO channels, groups, capacity, expiry, durable in the store.
//!
//! Every operation takes the layer's lock, assigns ids from the store's global sequence,
//! writes the store and updates the in-memory index in the same order, then (outside the
//! lock) waits for the store's group commit before acknowledging. A send or group_send
//! writes one record whatever the number of recipients: group members are resolved
//! from memberships (joined id and last add time) and the record's list of members that
//! were skipped as full. When a membership ends, the messages it brought that are still
//! held are pinned to the channel, so a restart rebuilds exactly the same queues.
//! Receives record a per-channel cursor lazily (at-least-once after a crash). Knows
//! nothing of HTTP, nor of the store's keys.
//!
//! # Layout
//! - this file: the errors and outcomes, [`ChannelLayer`] and its shared state, opening.
//! - [`send`](self::send): send, group_send, flush, new_channel.
//! - [`groups`]: group_add, group_discard, close_channel, and pinning.
//! - [`receive`]: receive, [`Receiver`], [`Revoker`], replay after an id.
//! - [`introspect`]: the read-only views (channels, groups, stats).
//! - [`recovery`]: rebuilding the in-memory state from the store at open.
//! - [`sweep`]: expiry in memory and on disk, receive cursors, backup.
//! - [`state`]: the in-memory state itself (channels, queues, waiters, memberships).
//! - [`clock`]: the time source, replaceable in tests.

pub mod clock;
mod groups;
mod introspect;
mod receive;
mod recovery;
mod send;
mod state;
mod sweep;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::config::{ChannelRules, ConfigError, LayerSettings, Settings};
use crate::message::{Message, MessageError};
use crate::names::NameError;
use crate::store::record::Record;
use crate::store::{OnDataLoss, Store, StoreError};
use clock::Clock;
use state::{Channel, Channels, Entry, State, Tally};

pub use introspect::{ChannelInfo, GroupInfo, Page, PageRequest, Stats};
pub use receive::{LeaseTerms, Receiver, Revoker};
pub use sweep::Backup;

/// Why a layer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A channel, group or prefix name breaks the naming rules.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The message is malformed or not a valid channel-layer message.
    #[error("{0}")]
    InvalidMessage(#[from] MessageError),
    /// The message's msgpack encoding (`size` bytes) is over `max_message_bytes` (`limit`).
    #[error("message is {size} bytes, over the limit of {limit} bytes")]
    MessageTooLarge { size: usize, limit: usize },
    /// A send found `channel` already holding its `capacity` of pending messages.
    #[error("channel {channel} is full ({capacity} messages pending)")]
    ChannelFull { channel: String, capacity: usize },
    /// The layer holds `limit` of what `key` (e.g. `limits.max_channels`) bounds.
    #[error("{key} ({limit}) reached: {what}")]
    LimitReached {
        key: &'static str,
        limit: usize,
        what: &'static str,
    },
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
    /// The `[layer]` settings it was opened with, as configured.
    settings: LayerSettings,
    rules: ChannelRules,
    group_expiry_ms: u64,
    max_message_bytes: usize,
    /// `limits.max_channels`: a send to a channel not held yet is refused past it.
    max_channels: usize,
    /// `limits.max_memberships`: a group_add of a new membership is refused past it.
    max_memberships: usize,
    replay_capacity: usize,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// Totals of what `state` holds, readable without its lock.
    tally: Arc<Tally>,
    next_waiter: AtomicU64,
    /// Bytes of the message records on disk ([`Record::stored_len`]), for the bound
    /// [`Store::is_bloated`] keeps the data directory within.
    stored_bytes: AtomicU64,
    /// Whether the sweep may call [`Store::reclaim`]: set when messages are deleted
    /// from disk (and at start), cleared when a reclaim gave nothing back.
    reclaiming: AtomicBool,
}

impl ChannelLayer {
    /// Opens the store in `storage.data_dir` and rebuilds the in-memory index from it,
    /// with the `[layer]` settings and the `[limits]` on what it holds. Blocking: call it
    /// before serving, or from `spawn_blocking`.
    pub fn open(settings: &Settings, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        let (layer, storage) = (&settings.layer, &settings.storage);
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
        let inner = Inner {
            store,
            settings: layer.clone(),
            rules,
            group_expiry_ms: layer.group_expiry_secs.saturating_mul(1000),
            max_message_bytes: layer.max_message_bytes,
            max_channels: settings.limits.max_channels,
            max_memberships: settings.limits.max_memberships,
            replay_capacity: layer.replay_capacity,
            clock,
            state: Mutex::new(State::default()),
            tally: Arc::default(),
            next_waiter: AtomicU64::new(1),
            stored_bytes: AtomicU64::new(0),
            reclaiming: AtomicBool::new(true),
        };
        let state = inner.rebuild()?;
        *inner.state.lock() = state;
        Ok(ChannelLayer {
            inner: Arc::new(inner),
        })
    }

    /// The `[layer]` settings in force.
    pub fn settings(&self) -> &LayerSettings {
        &self.inner.settings
    }

    /// How long a membership lasts after its last group_add.
    pub(crate) fn group_expiry(&self) -> Duration {
        Duration::from_millis(self.inner.group_expiry_ms)
    }

    /// An id no message id assigned so far is above: a resume point past it is bogus.
    pub fn highest_id(&self) -> u64 {
        self.inner.store.highest_id()
    }

    /// Largest accepted message, in bytes of msgpack.
    pub fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes
    }
}

impl Inner {
    /// The channel's state, created on first use with its configured limits.
    fn channel<'a>(&self, channels: &'a mut Channels, name: &str) -> &'a mut Channel {
        channels.get_or_insert_with(name, || {
            Channel::new(
                name,
                &self.rules,
                self.replay_capacity,
                self.lost_floor(),
                &self.tally,
            )
        })
    }

    /// Refuses a send to `name` when the layer holds no state for it and already holds
    /// `max_channels`.
    fn check_channel_room(&self, channels: &Channels, name: &str) -> Result<(), Error> {
        if channels.len() >= self.max_channels && !channels.contains_key(name) {
            return Err(Error::LimitReached {
                key: "limits.max_channels",
                limit: self.max_channels,
                what: "the server holds as many channels as it may",
            });
        }
        Ok(())
    }

    /// Refuses a new membership when the layer holds `max_memberships`.
    fn check_membership_room(&self) -> Result<(), Error> {
        if self.tally.memberships.load(Ordering::Relaxed) >= self.max_memberships {
            return Err(Error::LimitReached {
                key: "limits.max_memberships",
                limit: self.max_memberships,
                what: "the groups hold as many memberships as they may",
            });
        }
        Ok(())
    }

    /// The lost watermark ([`Store::lost_upto`]): the highest id of a message deleted
    /// from the store. New channel states start knowing losses up to it, and an idle
    /// channel is forgotten only once it covers what the channel lost.
    fn lost_floor(&self) -> u64 {
        self.store.lost_upto()
    }

    /// Counts a record just stored.
    fn stored(&self, record: &Record) {
        self.stored_bytes
            .fetch_add(record.stored_len() as u64, Ordering::Relaxed);
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
}

fn delivery(entry: &Entry) -> Delivery {
    Delivery {
        id: entry.id,
        message: entry.message.clone(),
    }
}
