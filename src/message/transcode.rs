//! JSON text transcoded straight into msgpack bytes, without a value tree: each value is
//! written as it is parsed, so memory stays within a small multiple of the input. Key
//! order is kept (a repeated key keeps its first place and its last value), and
//! `{"$binary": "<base64>"}` becomes binary.

use std::cell::Cell;
use std::fmt;
use std::ops::Range;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use super::walk::Walk;
use super::{BINARY_KEY, MAX_DEPTH, MessageError, too_deep};

/// `bytes` (JSON whose top level is at nesting level `depth`) as msgpack.
pub(super) fn json_to_msgpack(bytes: &[u8], depth: usize) -> Result<Vec<u8>, MessageError> {
    let refusal = Cell::new(None);
    let mut out = Vec::with_capacity(bytes.len() / 2 + 16);
    let mut parser = serde_json::Deserializer::from_slice(bytes);
    let parsed = Transcode {
        depth,
        refusal: &refusal,
        out: &mut out,
    }
    .deserialize(&mut parser)
    .and_then(|()| parser.end());
    parsed.map_err(|e| {
        refusal
            .take()
            .unwrap_or_else(|| MessageError::Malformed(format!("malformed JSON: {e}")))
    })?;
    Ok(out)
}

/// Room left before an array's or a map's items for its longest head (a 32-bit count).
const HEAD_ROOM: usize = 5;

/// A serde seed that writes the JSON value at nesting level `depth` to `out` as msgpack.
/// A message rule broken on the way is kept in `refusal`, so that the caller reports it
/// rather than serde's wording.
struct Transcode<'r> {
    depth: usize,
    refusal: &'r Cell<Option<MessageError>>,
    out: &'r mut Vec<u8>,
}

/// One entry of a map being written: where its key starts, and its value's bytes.
#[derive(Clone, Copy)]
struct Entry {
    key: u32,
    value: u32,
    end: u32,
}

impl Transcode<'_> {
    fn refuse<E: de::Error>(&self, error: MessageError) -> E {
        let text = error.to_string();
        self.refusal.set(Some(error));
        E::custom(text)
    }

    /// The seed for a value nested in this one, written to the same output.
    fn nested(&mut self) -> Transcode<'_> {
        Transcode {
            depth: self.depth + 1,
            refusal: self.refusal,
            out: self.out,
        }
    }

    /// The output's length as an offset; bodies are bounded far below 4 GiB.
    fn at(&self) -> Result<u32, MessageError> {
        u32::try_from(self.out.len())
            .map_err(|_| MessageError::Invalid("message is too large".to_string()))
    }

    /// Puts the head of an array (`map` false) or map of `count` items at `start`, in
    /// the [`HEAD_ROOM`] left there.
    fn close(&mut self, start: usize, count: usize, map: bool) {
        let mut head = Vec::with_capacity(HEAD_ROOM);
        // Counts fit: the input is bounded far below 4 Gi items.
        let count = count as u32;
        let written = if map {
            rmp::encode::write_map_len(&mut head, count)
        } else {
            rmp::encode::write_array_len(&mut head, count)
        };
        written.expect("writing to a Vec cannot fail");
        self.out.splice(start..start + HEAD_ROOM, head);
    }

    /// The map's entries once repeated keys are merged, each key at its first place with
    /// its last value, as the byte ranges of the key and of the value in `out`; `None`
    /// when no key repeats (the bytes are right as they are).
    fn merged(&self, entries: &[Entry]) -> Option<Vec<(Range<usize>, Range<usize>)>> {
        let key = |e: &Entry| &self.out[e.key as usize..e.value as usize];
        let mut order: Vec<u32> = (0..entries.len() as u32).collect();
        order.sort_by(|&a, &b| {
            key(&entries[a as usize])
                .cmp(key(&entries[b as usize]))
                .then(a.cmp(&b))
        });
        let mut source: Vec<u32> = (0..entries.len() as u32).collect();
        let mut dead = vec![false; entries.len()];
        let mut repeated = false;
        for group in order.chunk_by(|&a, &b| key(&entries[a as usize]) == key(&entries[b as usize]))
        {
            if let [first, .., last] = group {
                repeated = true;
                source[*first as usize] = *last;
                for later in &group[1..] {
                    dead[*later as usize] = true;
                }
            }
        }
        repeated.then(|| {
            (0..entries.len())
                .filter(|&i| !dead[i])
                .map(|i| {
                    let (entry, value) = (entries[i], entries[source[i] as usize]);
                    (
                        entry.key as usize..entry.value as usize,
                        value.value as usize..value.end as usize,
                    )
                })
                .collect()
        })
    }
}

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.depth > MAX_DEPTH {
            return Err(self.refuse(too_deep()));
        }
        deserializer.deserialize_any(self)
    }
}

/// Writing to a Vec cannot fail.
fn written<E>(result: Result<(), E>) {
    if result.is_err() {
        unreachable!("writing to a Vec cannot fail");
    }
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        written(rmp::encode::write_nil(self.out));
        Ok(())
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        written(rmp::encode::write_bool(self.out, b));
        Ok(())
    }

    fn visit_i64<E>(self, i: i64) -> Result<(), E> {
        match u64::try_from(i) {
            Ok(u) => written(rmp::encode::write_uint(self.out, u).map(drop)),
            Err(_) => written(rmp::encode::write_sint(self.out, i).map(drop)),
        }
        Ok(())
    }

    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        written(rmp::encode::write_uint(self.out, u).map(drop));
        Ok(())
    }

    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        written(rmp::encode::write_f64(self.out, f));
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        written(rmp::encode::write_str(self.out, s));
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; HEAD_ROOM]);
        let mut count = 0;
        while seq.next_element_seed(self.nested())?.is_some() {
            count += 1;
        }
        self.close(start, count, false);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let start = self.out.len();
        self.out.extend_from_slice(&[0; HEAD_ROOM]);
        let mut entries = Vec::new();
        let offset = |t: &Self| t.at().map_err(|e| t.refuse::<A::Error>(e));
        loop {
            let key = offset(&self)?;
            let Some(name) = map.next_key::<String>()? else {
                break;
            };
            written(rmp::encode::write_str(self.out, &name));
            let value = offset(&self)?;
            map.next_value_seed(self.nested())?;
            let end = offset(&self)?;
            entries.push(Entry { key, value, end });
        }
        let merged = self.merged(&entries);
        let live = merged.as_ref().map_or(entries.len(), Vec::len);
        if let Some(merged) = merged {
            let mut map_bytes = Vec::with_capacity(self.out.len() - start);
            for (key, value) in merged {
                map_bytes.extend_from_slice(&self.out[key]);
                map_bytes.extend_from_slice(&self.out[value]);
            }
            self.out.truncate(start + HEAD_ROOM);
            self.out.extend_from_slice(&map_bytes);
        }
        self.binary_or_map(start, live)
    }
}

impl Transcode<'_> {
    /// Ends the map written from `start` with `live` entries: `{"$binary": "<base64>"}`
    /// becomes binary, any other map gets its head.
    fn binary_or_map<E: de::Error>(&mut self, start: usize, live: usize) -> Result<(), E> {
        if live == 1 {
            let mut entry = Walk {
                rest: &self.out[start + HEAD_ROOM..],
            };
            let key = entry.string().ok().flatten();
            if key == Some(BINARY_KEY)
                && let Ok(Some(b64)) = entry.string()
            {
                let Ok(bytes) = BASE64.decode(b64) else {
                    return Err(self.refuse(MessageError::Invalid(format!(
                        "{BINARY_KEY:?} must hold base64"
                    ))));
                };
                self.out.truncate(start);
                written(rmp::encode::write_bin(self.out, &bytes));
                return Ok(());
            }
        }
        self.close(start, live, true);
        Ok(())
    }
}
