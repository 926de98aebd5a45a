//! Every key Herald writes, built in one place (format version 2).
//!
//! All data lives in one sled tree so that a batch of mixed writes is atomic. (A
//! second tree, `herald-space`, only ever holds throw-away values while the store
//! makes sled give back disk space; see `space.rs`.) The first
//! byte of a key says what it holds; integers are big-endian so that keys sort by them.
//! Names never contain a NUL byte (the name rules forbid it), so NUL separates them.
//!
//! | key | value |
//! |---|---|
//! | `V` | format version, u32 |
//! | `S` | id floor, u64: added to sled's id generator (set by an import) |
//! | `M` id | a batch of message records, the first with this id ([`super::record::MessageBatch`]) |
//! | `G` group NUL channel | a membership: joined id, last add time |
//! | `C` channel | receive cursor: every message of the channel with a lower or equal id was taken |
//! | `R` id channel | the message `id` of a group belongs to `channel`, whatever the membership says |
//! | `E` id channel | `channel` took message `id` with a lease and has not acknowledged it: it is pending, whatever the cursor says |
//! | `L` | lost watermark, u64: no message with a higher id was deleted yet (see [`LOST`]) |
//! | `W` | the latest flush's mark: flushes so far, highest message id, u64 each ([`super::watermark`]) |
//!
//! `W` came after format 2 without a new version: readers scan by prefix and pass over
//! it, and a directory without it is simply not checked against the watermark file.

/// The format version this build writes.
pub(crate) const FORMAT_VERSION: u32 = 2;

pub(crate) const VERSION: &[u8] = b"V";
pub(crate) const ID_FLOOR: &[u8] = b"S";
pub(crate) const WATERMARK: &[u8] = b"W";
pub(crate) const MESSAGE: u8 = b'M';
pub(crate) const MEMBERSHIP: u8 = b'G';
pub(crate) const CURSOR: u8 = b'C';
pub(crate) const REF: u8 = b'R';
pub(crate) const UNACKED: u8 = b'E';
/// The lost watermark: the highest id of a message deleted from the store (by the
/// expiry sweep or a flush). A channel whose in-memory state was forgotten, or not yet
/// rebuilt, knows what it lost only up to this id, so a resume after a lower id gets a
/// gap. Added in format version 2 without a version change: older builds ignore it.
pub(crate) const LOST: &[u8] = b"L";

/// `M` id.
pub fn message(id: u64) -> [u8; 9] {
    let mut key = [MESSAGE; 9];
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The id of an `M` key.
pub(crate) fn message_id(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

/// `G` group NUL channel.
pub fn membership(group: &str, channel: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + group.len() + channel.len());
    key.push(MEMBERSHIP);
    key.extend_from_slice(group.as_bytes());
    key.push(0);
    key.extend_from_slice(channel.as_bytes());
    key
}

/// The group and channel of a `G` key.
pub(crate) fn membership_parts(key: &[u8]) -> Option<(&str, &str)> {
    let rest = key.get(1..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    Some((
        std::str::from_utf8(&rest[..nul]).ok()?,
        std::str::from_utf8(&rest[nul + 1..]).ok()?,
    ))
}

/// `C` channel.
pub fn cursor(channel: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + channel.len());
    key.push(CURSOR);
    key.extend_from_slice(channel.as_bytes());
    key
}

/// The channel of a `C` key.
pub(crate) fn cursor_channel(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.get(1..)?).ok()
}

/// `R` id channel.
pub fn reference(id: u64, channel: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + channel.len());
    key.push(REF);
    key.extend_from_slice(&id.to_be_bytes());
    key.extend_from_slice(channel.as_bytes());
    key
}

/// The id and channel of an `R` key.
pub(crate) fn reference_parts(key: &[u8]) -> Option<(u64, &str)> {
    let id = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    Some((id, std::str::from_utf8(key.get(9..)?).ok()?))
}

/// The first key of the `R` range for ids at or above `id`.
pub(crate) fn reference_from(id: u64) -> [u8; 9] {
    id_prefix(REF, id)
}

/// `E` id channel: an id-and-channel key like `R`'s, under its own prefix.
pub fn unacked(id: u64, channel: &str) -> Vec<u8> {
    let mut key = reference(id, channel);
    key[0] = UNACKED;
    key
}

/// The first key of the `E` range for ids at or above `id`.
pub(crate) fn unacked_from(id: u64) -> [u8; 9] {
    id_prefix(UNACKED, id)
}

/// `prefix` and `id`, the start of an id-and-channel range.
fn id_prefix(prefix: u8, id: u64) -> [u8; 9] {
    let mut key = [prefix; 9];
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// A u64 value.
pub(crate) fn encode_u64(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

/// Reads a u64 value.
pub(crate) fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?))
}

/// A membership value: joined id and last add time in ms.
pub(crate) fn encode_membership(joined_id: u64, last_add_ms: u64) -> [u8; 16] {
    let mut value = [0; 16];
    value[..8].copy_from_slice(&joined_id.to_be_bytes());
    value[8..].copy_from_slice(&last_add_ms.to_be_bytes());
    value
}

/// Reads a membership value.
pub(crate) fn decode_membership(bytes: &[u8]) -> Option<(u64, u64)> {
    Some((decode_u64(bytes)?, decode_u64(bytes.get(8..)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_id() {
        assert!(message(255) < message(256));
        assert_eq!(message_id(&message(42)), Some(42));
        assert_eq!(
            membership_parts(&membership("g.1", "c!x")),
            Some(("g.1", "c!x"))
        );
        assert_eq!(cursor_channel(&cursor("c")), Some("c"));
        assert_eq!(reference_parts(&reference(7, "c")), Some((7, "c")));
        assert_eq!(reference_parts(&unacked(7, "c")), Some((7, "c")));
        assert!(unacked_from(7).as_slice() <= unacked(7, "a").as_slice());
        assert!(unacked(7, "zzz").as_slice() < unacked_from(8).as_slice());
        assert!(reference_from(7).as_slice() <= reference(7, "a").as_slice());
        assert!(reference(7, "zzz").as_slice() < reference_from(8).as_slice());
        assert_eq!(decode_membership(&encode_membership(3, 4)), Some((3, 4)));
    }
}
