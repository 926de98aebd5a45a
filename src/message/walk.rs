//! The msgpack walk: the message rules checked in one pass over the bytes, without
//! building a value, so that memory stays at the nesting depth whatever the input.

use std::ops::Range;

use super::{MAX_DEPTH, MessageError, RESERVED_KEY, too_deep};

fn malformed_msgpack(why: &str) -> MessageError {
    MessageError::Malformed(format!("malformed msgpack: {why}"))
}

/// What the walk of a msgpack message found at its top level.
pub(super) struct TopLevel {
    /// Whether it has a (valid) `"type"`.
    pub(super) has_type: bool,
    /// How many entries its map has, and how many bytes the map's head takes.
    pub(super) entries: usize,
    pub(super) head_len: usize,
}

/// A single pass over msgpack bytes that checks the message rules without building a
/// value: memory stays at the nesting depth, whatever the number of values.
pub(super) struct Walk<'a> {
    pub(super) rest: &'a [u8],
}

impl<'a> Walk<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        if self.rest.len() < n {
            return Err(malformed_msgpack("it ends in the middle of a value"));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    /// A big-endian length of `n` bytes.
    fn len(&mut self, n: usize) -> Result<usize, MessageError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b)))
    }

    /// The whole message: a map with string keys, a non-empty string `"type"`, no
    /// reserved key, nesting at most [`MAX_DEPTH`], nothing after it.
    pub(super) fn message(mut self) -> Result<TopLevel, MessageError> {
        let start = self.rest.len();
        let entries = match self.map_head()? {
            Some(entries) => entries,
            None => {
                self.value(1)?;
                if !self.rest.is_empty() {
                    return Err(malformed_msgpack("trailing bytes after the message"));
                }
                return Err(MessageError::Invalid(
                    "message must be a map (a JSON object)".to_string(),
                ));
            }
        };
        let head_len = start - self.rest.len();
        let (mut has_type, mut type_error, mut reserved) = (false, false, false);
        for _ in 0..entries {
            let key = self.key()?;
            if key == "type" {
                let value = self.rest;
                self.value(2)?;
                let text = Walk { rest: value }.string();
                has_type = matches!(text, Ok(Some(t)) if !t.is_empty());
                type_error |= !has_type;
            } else {
                reserved |= key == RESERVED_KEY;
                self.value(2)?;
            }
        }
        if !self.rest.is_empty() {
            return Err(malformed_msgpack("trailing bytes after the message"));
        }
        if reserved {
            return Err(MessageError::Invalid(format!(
                "message must not contain the reserved key {RESERVED_KEY:?}"
            )));
        }
        if type_error {
            return Err(MessageError::Invalid(
                "message \"type\" must be a non-empty string".to_string(),
            ));
        }
        Ok(TopLevel {
            has_type,
            entries,
            head_len,
        })
    }

    /// The entry count of the map that comes next; `None`, with nothing read, if no
    /// map comes next.
    fn map_head(&mut self) -> Result<Option<usize>, MessageError> {
        let entries = match self.rest.first() {
            Some(&n @ 0x80..=0x8f) => {
                self.take(1)?;
                usize::from(n & 0x0f)
            }
            Some(0xde) => {
                self.take(1)?;
                self.len(2)?
            }
            Some(0xdf) => {
                self.take(1)?;
                self.len(4)?
            }
            _ => return Ok(None),
        };
        Ok(Some(entries))
    }

    /// A map of named fields (a request around a message): each key with the range of
    /// its value's bytes, checked as message content is, nothing after the map.
    pub(super) fn fields(mut self) -> Result<Vec<(&'a str, Range<usize>)>, MessageError> {
        let whole = self.rest.len();
        let Some(entries) = self.map_head()? else {
            // What is wrong inside it (nesting too deep) comes first.
            self.value(0)?;
            return Err(MessageError::Malformed(
                "a request must be a map with an \"op\"".to_string(),
            ));
        };
        let mut fields = Vec::with_capacity(entries.min(16));
        for _ in 0..entries {
            let key = self.key()?;
            let start = whole - self.rest.len();
            self.value(1)?;
            fields.push((key, start..whole - self.rest.len()));
        }
        if !self.rest.is_empty() {
            return Err(malformed_msgpack("trailing bytes after the request"));
        }
        Ok(fields)
    }

    /// A map key: it must be a string.
    fn key(&mut self) -> Result<&'a str, MessageError> {
        self.string()?
            .ok_or_else(|| MessageError::Invalid("map keys must be strings".to_string()))
    }

    /// The next value if it is a string (checked UTF-8); `None`, with nothing read, if
    /// it is not.
    pub(super) fn string(&mut self) -> Result<Option<&'a str>, MessageError> {
        let Some(&marker) = self.rest.first() else {
            return Err(malformed_msgpack("it ends in the middle of a value"));
        };
        let len = match marker {
            0xa0..=0xbf => {
                self.take(1)?;
                usize::from(marker & 0x1f)
            }
            0xd9..=0xdb => {
                self.take(1)?;
                self.len(1 << (marker - 0xd9))?
            }
            _ => return Ok(None),
        };
        std::str::from_utf8(self.take(len)?)
            .map(Some)
            .map_err(|_| MessageError::Malformed("strings must be valid UTF-8".to_string()))
    }

    /// Skips one value at nesting level `depth`, checking it.
    fn value(&mut self, depth: usize) -> Result<(), MessageError> {
        if depth > MAX_DEPTH {
            return Err(too_deep());
        }
        if self.string()?.is_some() {
            return Ok(());
        }
        let marker = self.take(1)?[0];
        let (items, per_item) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => return Ok(()),
            0x80..=0x8f => (usize::from(marker & 0x0f), 2),
            0x90..=0x9f => (usize::from(marker & 0x0f), 1),
            0xdc => (self.len(2)?, 1),
            0xdd => (self.len(4)?, 1),
            0xde => (self.len(2)?, 2),
            0xdf => (self.len(4)?, 2),
            0xc4..=0xc6 => {
                let len = self.len(1 << (marker - 0xc4))?;
                return self.take(len).map(drop);
            }
            0xca => return self.take(4).map(drop),
            0xcb => return self.take(8).map(drop),
            0xcc..=0xcf => return self.take(1 << (marker - 0xcc)).map(drop),
            0xd0..=0xd3 => return self.take(1 << (marker - 0xd0)).map(drop),
            0xc7..=0xc9 | 0xd4..=0xd8 => {
                return Err(MessageError::Invalid(
                    "msgpack extension types are not supported".to_string(),
                ));
            }
            _ => return Err(malformed_msgpack("the reserved marker 0xc1")),
        };
        for _ in 0..items {
            if per_item == 2 {
                self.key()?;
            }
            self.value(depth + 1)?;
        }
        Ok(())
    }
}
