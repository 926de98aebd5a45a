//! Deleting what aged out: message records sent before a cutoff, their pins and leases, and the
//! receive cursors left pointing at nothing, with the lost watermark raised in the
//! same write.

use std::sync::atomic::Ordering;

use super::batch::WriteBatch;
use super::keys;
use super::record::MessageBatch;
use super::{Store, StoreError};

/// Stored batches deleted by one [`Store::delete_sent_before`] at most.
const ROUND_BATCHES: usize = 10_000;

/// What one round of [`Store::delete_sent_before`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Message records deleted.
    pub messages: usize,
    /// Their bytes ([`Record::stored_len`](super::record::Record::stored_len) each).
    pub bytes: u64,
    /// Whether records sent before the cutoff may remain: call it again.
    pub more: bool,
}

impl Store {
    /// Deletes, in one atomic write, the oldest stored messages sent before
    /// `cutoff_ms` (up to [`ROUND_BATCHES`] batches of them), the pins of their ids,
    /// and the cursors below the first id kept; raises the lost watermark
    /// ([`Store::lost_upto`]) to the highest deleted id. Deletes nothing while a
    /// snapshot is open (a dump reads those records): the next sweep catches up.
    pub(crate) fn delete_sent_before(&self, cutoff_ms: u64) -> Result<Deleted, StoreError> {
        if self.snapshots_open() {
            return Ok(Deleted::default());
        }
        let mut batch = WriteBatch::default();
        let mut deleted = Deleted::default();
        let mut batches = 0;
        let mut first_kept = None;
        let mut lost_upto = self.lost_upto();
        for item in self.scan(&[keys::MESSAGE]) {
            let (key, value) = item?;
            let id = keys::message_id(&key).unwrap_or(0);
            if MessageBatch::decode_sent_at(&value).is_some_and(|sent_at| sent_at >= cutoff_ms) {
                first_kept = Some(id);
                break;
            }
            batch.remove(&key);
            // A damaged batch (which a start refuses anyway) counts as one, by its key.
            let (count, last_id) = MessageBatch::decode_extent(&value).unwrap_or((1, id));
            deleted.messages += count;
            deleted.bytes += MessageBatch::records_len(&value) as u64;
            lost_upto = lost_upto.max(last_id);
            batches += 1;
            if batches == ROUND_BATCHES {
                first_kept = Some(id + 1);
                deleted.more = true;
                break;
            }
        }
        if batches == 0 {
            return Ok(deleted);
        }
        let upto = first_kept.unwrap_or(u64::MAX);
        for item in self.range(&keys::reference_from(0), &keys::reference_from(upto)) {
            batch.remove(&item?.0);
        }
        for item in self.range(&keys::unacked_from(0), &keys::unacked_from(upto)) {
            batch.remove(&item?.0);
        }
        for item in self.scan(&[keys::CURSOR]) {
            let (key, value) = item?;
            if keys::decode_u64(&value).is_some_and(|cursor| cursor < upto) {
                batch.remove(&key);
            }
        }
        batch.insert(keys::LOST, &keys::encode_u64(lost_upto));
        if self.apply_unless_snapshot(batch)?.is_none() {
            return Ok(Deleted::default());
        }
        self.lost.fetch_max(lost_upto, Ordering::SeqCst);
        Ok(deleted)
    }
}
