//! The one typed read of everything stored: what the layer rebuilds its state from at
//! open, and what an export writes. One decoder per record kind, here.

use std::path::Path;

use super::keys;
use super::record::{MessageBatch, Record};
use super::{Store, StoreError};

/// One stored record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// `channel` is in `group` since message id `joined_id`, last added at `last_add_ms`.
    Membership {
        group: String,
        channel: String,
        joined_id: u64,
        last_add_ms: u64,
    },
    /// Every message of `channel` up to `taken_upto` was received.
    Cursor { channel: String, taken_upto: u64 },
    /// The group message `id` belongs to `channel`, whatever the memberships say.
    Pin { id: u64, channel: String },
    /// `channel` took message `id` with a lease and did not acknowledge it.
    Unacked { id: u64, channel: String },
    /// A message, as sent.
    Message { id: u64, record: Record },
}

/// A record that cannot be decoded: its kind.
type Damaged = &'static str;

impl Store {
    /// Every stored record: memberships, receive cursors, pins and unacknowledged leases
    /// first (they decide a message's recipients and whether it is pending), then the
    /// messages in id order. A record that cannot
    /// be decoded is a [`StoreError::Corrupt`] item.
    pub(crate) fn recover(&self) -> impl Iterator<Item = Result<Stored, StoreError>> + use<> {
        let path = self.path().to_path_buf();
        [
            keys::MEMBERSHIP,
            keys::CURSOR,
            keys::REF,
            keys::UNACKED,
            keys::MESSAGE,
        ]
        .map(|prefix| self.scan(&[prefix]))
        .into_iter()
        .flatten()
        .flat_map(move |item| match item {
            Err(e) => vec![Err(e)],
            Ok((key, value)) => decode(&path, &key, &value),
        })
    }
}

/// The records one stored entry holds (several for a message batch, none for the keys
/// that hold no record: the format version, the watermarks, the id floor).
pub(super) fn decode(path: &Path, key: &[u8], value: &[u8]) -> Vec<Result<Stored, StoreError>> {
    let damaged = |what: Damaged| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("unreadable {what} record"),
    };
    let one = |record: Option<Stored>, what| vec![record.ok_or_else(|| damaged(what))];
    match key.first() {
        Some(&keys::MEMBERSHIP) => one(membership(key, value), "membership"),
        Some(&keys::CURSOR) => one(cursor(key, value), "cursor"),
        Some(&keys::REF) => one(pin(key), "reference"),
        Some(&keys::UNACKED) => one(unacked(key), "lease"),
        // A batch holds at most `MAX_BATCH_BYTES`: decoding one at a time is cheap.
        Some(&keys::MESSAGE) => MessageBatch::decode(value)
            .map(|record| {
                record
                    .map(|(id, record)| Stored::Message { id, record })
                    .ok_or_else(|| damaged("message"))
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn membership(key: &[u8], value: &[u8]) -> Option<Stored> {
    let (group, channel) = keys::membership_parts(key)?;
    let (joined_id, last_add_ms) = keys::decode_membership(value)?;
    Some(Stored::Membership {
        group: group.to_string(),
        channel: channel.to_string(),
        joined_id,
        last_add_ms,
    })
}

fn cursor(key: &[u8], value: &[u8]) -> Option<Stored> {
    Some(Stored::Cursor {
        channel: keys::cursor_channel(key)?.to_string(),
        taken_upto: keys::decode_u64(value)?,
    })
}

fn unacked(key: &[u8]) -> Option<Stored> {
    let (id, channel) = keys::reference_parts(key)?;
    Some(Stored::Unacked {
        id,
        channel: channel.to_string(),
    })
}

fn pin(key: &[u8]) -> Option<Stored> {
    let (id, channel) = keys::reference_parts(key)?;
    Some(Stored::Pin {
        id,
        channel: channel.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WriteBatch;
    use crate::store::record::Target;

    #[tokio::test]
    async fn recovery_reads_back_every_kind_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let record = |body: &'static [u8]| Record {
            sent_at_ms: 5,
            target: Target::Channel("c".into()),
            skipped: Vec::new(),
            body: bytes::Bytes::from_static(body),
        };
        {
            let store = Store::open_for_test(dir.path()).unwrap();
            let mut batch = WriteBatch::default();
            batch.put_cursor("c", 3);
            batch.put_membership("g", "c", 1, 2);
            batch.pin(9, "c");
            store.apply(batch).unwrap();
            store.append(10, &record(b"\x80")).unwrap();
            let ticket = store.append(11, &record(b"\x81\xa1a\x01")).unwrap();
            store.commit(ticket).await.unwrap();
        }
        let store = Store::open_for_test(dir.path()).unwrap();
        let stored: Vec<Stored> = store.recover().map(Result::unwrap).collect();
        assert_eq!(
            stored,
            [
                Stored::Membership {
                    group: "g".into(),
                    channel: "c".into(),
                    joined_id: 1,
                    last_add_ms: 2
                },
                Stored::Cursor {
                    channel: "c".into(),
                    taken_upto: 3
                },
                Stored::Pin {
                    id: 9,
                    channel: "c".into()
                },
                Stored::Message {
                    id: 10,
                    record: record(b"\x80")
                },
                Stored::Message {
                    id: 11,
                    record: record(b"\x81\xa1a\x01")
                },
            ]
        );
    }
}
