//! The stored form of a message: who it was sent to, when, which group members were
//! skipped as full, and the msgpack body. One record per send or group_send, whatever
//! the number of recipients.
//!
//! Record layout: kind (`c` channel or `g` group), sent_at ms (u64 BE), target name (u8
//! length + bytes), skipped count (u32 BE) and names (u8 length + bytes each), then the
//! body.
//!
//! Records are stored in batches ([`MessageBatch`]), one sled key per batch: the
//! flusher writes every message of a group commit with one insert, because a sled
//! insert costs about as much as a whole small flush.

use bytes::Bytes;

/// Where a message was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Channel(String),
    Group(String),
}

/// One stored message.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub sent_at_ms: u64,
    pub target: Target,
    /// Group members that were full at send time and did not get the message.
    pub skipped: Vec<String>,
    pub body: Bytes,
}

impl Record {
    /// Bytes the record adds to its [`MessageBatch`]: its id, its length and its
    /// encoding.
    pub(crate) fn stored_len(&self) -> usize {
        12 + self.encoded_len()
    }

    fn encoded_len(&self) -> usize {
        let names: usize = self.skipped.iter().map(|s| 1 + s.len()).sum();
        14 + self.target_name().len() + names + self.body.len()
    }

    fn target_name(&self) -> &str {
        match &self.target {
            Target::Channel(name) | Target::Group(name) => name,
        }
    }

    /// Appends the stored bytes to `out`.
    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, name) = match &self.target {
            Target::Channel(name) => (b'c', name),
            Target::Group(name) => (b'g', name),
        };
        out.reserve(self.encoded_len());
        out.push(kind);
        out.extend_from_slice(&self.sent_at_ms.to_be_bytes());
        push_name(out, name);
        out.extend_from_slice(&(self.skipped.len() as u32).to_be_bytes());
        for skipped in &self.skipped {
            push_name(out, skipped);
        }
        out.extend_from_slice(&self.body);
    }

    /// Reads stored bytes; `None` if they are damaged.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let mut reader = Reader(bytes);
        let kind = reader.take(1)?[0];
        let sent_at_ms = u64::from_be_bytes(reader.take(8)?.try_into().ok()?);
        let name = reader.name()?;
        let target = match kind {
            b'c' => Target::Channel(name),
            b'g' => Target::Group(name),
            _ => return None,
        };
        let count = u32::from_be_bytes(reader.take(4)?.try_into().ok()?);
        let skipped = (0..count)
            .map(|_| reader.name())
            .collect::<Option<Vec<_>>>()?;
        Some(Record {
            sent_at_ms,
            target,
            skipped,
            body: Bytes::copy_from_slice(reader.0),
        })
    }
}

/// Most bytes of one stored batch; more records start another. Well below what sled
/// moves out of its log into a file of its own (a quarter of a 512 KiB segment, for the
/// whole node holding the value).
pub(crate) const MAX_BATCH_BYTES: usize = 16 << 10;

/// Consecutive records stored under one key, the id of the first (format version 2).
///
/// Layout: the newest send time (u64 BE, so that the expiry sweep reads only 8 bytes),
/// then per record its id (u64 BE), its length (u32 BE) and its bytes, in id order.
#[derive(Debug)]
pub(crate) struct MessageBatch {
    first_id: u64,
    bytes: Vec<u8>,
}

impl MessageBatch {
    /// A batch holding one record.
    pub fn new(id: u64, record: &Record) -> MessageBatch {
        let mut batch = MessageBatch {
            first_id: id,
            bytes: vec![0; 8],
        };
        batch.push(id, record);
        batch
    }

    /// Adds a record; ids must ascend.
    pub fn push(&mut self, id: u64, record: &Record) {
        debug_assert!(id >= self.first_id);
        let newest = Self::decode_sent_at(&self.bytes).map_or(0, |t| t.max(record.sent_at_ms));
        self.bytes[..8].copy_from_slice(&newest.to_be_bytes());
        self.bytes.extend_from_slice(&id.to_be_bytes());
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        record.encode_into(&mut self.bytes);
        let len = (self.bytes.len() - at - 4) as u32;
        self.bytes[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// The id of the first record: the batch's key.
    pub(crate) fn first_id(&self) -> u64 {
        self.first_id
    }

    /// Bytes stored so far.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }

    /// The bytes to store.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The newest send time of a stored batch, for the expiry sweep.
    pub(crate) fn decode_sent_at(bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
    }

    /// Bytes of a stored batch taken by its records (see [`Record::stored_len`]): all
    /// but the send time in front.
    pub(crate) fn records_len(bytes: &[u8]) -> usize {
        bytes.len().saturating_sub(8)
    }

    /// How many records a stored batch holds and the id of the last, read without
    /// decoding the records; `None` if the batch is damaged.
    pub(crate) fn decode_extent(bytes: &[u8]) -> Option<(usize, u64)> {
        let mut reader = Reader(bytes.get(8..)?);
        let mut extent = None;
        while !reader.0.is_empty() {
            let id = u64::from_be_bytes(reader.take(8)?.try_into().ok()?);
            let len = u32::from_be_bytes(reader.take(4)?.try_into().ok()?) as usize;
            reader.take(len)?;
            extent = Some((extent.map_or(0, |(count, _)| count) + 1, id));
        }
        extent
    }

    /// The records of a stored batch with their ids, in order; a `None` item (and
    /// nothing after it) where the bytes are damaged.
    pub fn decode(bytes: &[u8]) -> impl Iterator<Item = Option<(u64, Record)>> + '_ {
        // `None`: finished; `Some(None)`: damage still to report.
        let mut rest = Some(bytes.get(8..));
        std::iter::from_fn(move || {
            let Some(unread) = rest.take()? else {
                return Some(None);
            };
            if unread.is_empty() {
                return None;
            }
            let mut reader = Reader(unread);
            let item = (|| {
                let id = u64::from_be_bytes(reader.take(8)?.try_into().ok()?);
                let len = u32::from_be_bytes(reader.take(4)?.try_into().ok()?) as usize;
                Some((id, Record::decode(reader.take(len)?)?))
            })();
            if item.is_some() {
                rest = Some(Some(reader.0));
            }
            Some(item)
        })
    }
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    debug_assert!(name.len() < 256);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn name(&mut self) -> Option<String> {
        let len = self.take(1)?[0] as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let record = Record {
            sent_at_ms: 1_700_000_000_123,
            target: Target::Group("alerts".into()),
            skipped: vec!["a!1".into(), "b".into()],
            body: Bytes::from_static(b"\x81\xa4type\xa1x"),
        };
        let mut bytes = Vec::new();
        record.encode_into(&mut bytes);
        assert_eq!(record.stored_len(), 12 + bytes.len());
        assert_eq!(Record::decode(&bytes), Some(record.clone()));
        assert_eq!(Record::decode(&bytes[..5]), None);
    }

    #[test]
    fn batches_round_trip_and_report_damage() {
        let record = |sent_at_ms, body: &'static [u8]| Record {
            sent_at_ms,
            target: Target::Channel("a".into()),
            skipped: Vec::new(),
            body: Bytes::from_static(body),
        };
        let mut batch = MessageBatch::new(7, &record(100, b"\x80"));
        batch.push(9, &record(105, b"\x81\xa1a\x01"));
        assert_eq!(batch.first_id(), 7);
        let bytes = batch.into_bytes();
        assert_eq!(
            MessageBatch::records_len(&bytes),
            record(100, b"\x80").stored_len() + record(105, b"\x81\xa1a\x01").stored_len()
        );
        assert_eq!(MessageBatch::decode_sent_at(&bytes), Some(105));
        assert_eq!(MessageBatch::decode_extent(&bytes), Some((2, 9)));
        assert_eq!(MessageBatch::decode_extent(&bytes[..bytes.len() - 2]), None);
        let records: Vec<_> = MessageBatch::decode(&bytes).collect();
        assert_eq!(
            records,
            [
                Some((7, record(100, b"\x80"))),
                Some((9, record(105, b"\x81\xa1a\x01"))),
            ]
        );
        let cut: Vec<_> = MessageBatch::decode(&bytes[..bytes.len() - 2]).collect();
        assert_eq!(cut, [Some((7, record(100, b"\x80"))), None]);
        assert_eq!(
            MessageBatch::decode(&bytes[..3]).collect::<Vec<_>>(),
            [None]
        );
    }
}
