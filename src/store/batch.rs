//! [`WriteBatch`]: the changes besides message records (memberships, receive cursors,
//! pins, unacknowledged leases), written together and atomically by [`Store::apply`](super::Store::apply).
//! The only way the layer writes them: it never sees a key.

use super::keys;
use super::record::MessageBatch;

/// Changes applied at once, all or none.
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    /// The keys changed, for the open snapshots ([`Store::apply`](super::Store::apply)).
    keys: Vec<sled::IVec>,
}

impl WriteBatch {
    /// Stores the membership of `channel` in `group`: the id it joined at and the time
    /// of its last group_add.
    pub(crate) fn put_membership(
        &mut self,
        group: &str,
        channel: &str,
        joined_id: u64,
        last_add_ms: u64,
    ) {
        let value = keys::encode_membership(joined_id, last_add_ms);
        self.insert(&keys::membership(group, channel), &value);
    }

    /// Ends the membership of `channel` in `group`.
    pub(crate) fn remove_membership(&mut self, group: &str, channel: &str) {
        self.remove(&keys::membership(group, channel));
    }

    /// Records that every message of `channel` up to `taken_upto` was received.
    pub(crate) fn put_cursor(&mut self, channel: &str, taken_upto: u64) {
        self.insert(&keys::cursor(channel), &keys::encode_u64(taken_upto));
    }

    /// Pins the group message `id` to `channel`: it stays the channel's whatever the
    /// memberships say later.
    pub fn pin(&mut self, id: u64, channel: &str) {
        self.insert(&keys::reference(id, channel), &[]);
    }

    /// Removes a pin.
    pub(crate) fn unpin(&mut self, id: u64, channel: &str) {
        self.remove(&keys::reference(id, channel));
    }

    /// Records that `channel` holds the message `id` under a lease, not acknowledged:
    /// after a restart it is pending again, whatever the cursor says.
    pub(crate) fn put_unacked(&mut self, id: u64, channel: &str) {
        self.insert(&keys::unacked(id, channel), &[]);
    }

    /// The message `id` of `channel` was acknowledged (or taken for good).
    pub(crate) fn remove_unacked(&mut self, id: u64, channel: &str) {
        self.remove(&keys::unacked(id, channel));
    }

    /// Whether the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Stores message records under the key of the batch's first id.
    pub(super) fn put_messages(&mut self, messages: MessageBatch) {
        self.insert(&keys::message(messages.first_id()), &messages.into_bytes());
    }

    pub(super) fn insert(&mut self, key: &[u8], value: &[u8]) {
        let key = sled::IVec::from(key);
        self.batch.insert(key.clone(), value);
        self.keys.push(key);
    }

    pub(super) fn remove(&mut self, key: &[u8]) {
        let key = sled::IVec::from(key);
        self.batch.remove(key.clone());
        self.keys.push(key);
    }

    /// The keys changed, and the batch for sled.
    pub(super) fn into_sled(self) -> (Vec<sled::IVec>, sled::Batch) {
        (self.keys, self.batch)
    }
}
