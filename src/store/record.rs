//! The stored form of a message: who it was sent to, when, which group members were
//! skipped as full, and the msgpack body. One record per send or group_send, whatever
//! the number of recipients.
//!
//! Layout: kind (`c` channel or `g` group), sent_at ms (u64 BE), target name (u8 length
//! + bytes), skipped count (u32 BE) and names (u8 length + bytes each), then the body.

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
    /// The bytes to store.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, name) = match &self.target {
            Target::Channel(name) => (b'c', name),
            Target::Group(name) => (b'g', name),
        };
        let names: usize = self.skipped.iter().map(|s| 1 + s.len()).sum();
        let mut out = Vec::with_capacity(14 + name.len() + names + self.body.len());
        out.push(kind);
        out.extend_from_slice(&self.sent_at_ms.to_be_bytes());
        push_name(&mut out, name);
        out.extend_from_slice(&(self.skipped.len() as u32).to_be_bytes());
        for skipped in &self.skipped {
            push_name(&mut out, skipped);
        }
        out.extend_from_slice(&self.body);
        out
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

    /// Reads only the send time, for the expiry sweep.
    pub fn decode_sent_at(bytes: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(bytes.get(1..9)?.try_into().ok()?))
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
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes), Some(record));
        assert_eq!(Record::decode_sent_at(&bytes), Some(1_700_000_000_123));
        assert_eq!(Record::decode(&bytes[..5]), None);
    }
}
