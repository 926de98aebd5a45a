//! A portable, versioned dump of everything stored: one JSON object per line.
//!
//! The first line is a header (`herald_dump` version, format version, creation time,
//! the next id); then every receive cursor, membership, message (id, send time,
//! target, skipped members, msgpack body in base64), reference and unacknowledged lease,
//! in the store's key
//! order; the last line counts them, so that a dump cut short is refused. Importing it
//! into an empty data directory gives the same observable state; ids continue after
//! the dumped ones.
//!
//! A dump is written from a [`Snapshot`](super::snapshot::Snapshot), a chunk at a
//! time ([`Export`]): it holds the state of one instant, yet writes go on meanwhile.

use std::io::{BufRead, Write};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use super::batch::WriteBatch;
use super::keys::{self, FORMAT_VERSION};
use super::record::{MAX_BATCH_BYTES, MessageBatch, Record, Target};
use super::snapshot::Snapshot;
use super::{Store, StoreError, Stored, recovery};
// Names become parts of keys: the same rules as the layer's keep the key layout sound.
use crate::names;

/// The version of the dump format this build writes. Version 1 lacks the end line;
/// this build reads both.
pub(crate) const DUMP_VERSION: u32 = 2;
/// The oldest version this build reads.
const OLDEST_DUMP_VERSION: u32 = 1;

/// One line of a dump.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum Line {
    Header {
        herald_dump: u32,
        format_version: u32,
        created_at_ms: u64,
        /// Ids given after an import start above this.
        next_id: u64,
    },
    Message {
        id: u64,
        sent_at_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        skipped: Vec<String>,
        /// The message as msgpack, base64-encoded.
        body: String,
    },
    Membership {
        group: String,
        channel: String,
        joined_id: u64,
        last_add_ms: u64,
    },
    Cursor {
        channel: String,
        taken_upto: u64,
    },
    Reference {
        id: u64,
        channel: String,
    },
    /// `channel` holds message `id` under a lease it did not acknowledge.
    Unacked {
        id: u64,
        channel: String,
    },
    /// The last line (from version 2): what the dump holds, so that a cut one is
    /// refused.
    End(DumpStats),
}

/// Counts of what a dump held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DumpStats {
    pub messages: usize,
    pub memberships: usize,
    pub cursors: usize,
    pub references: usize,
    #[serde(default)]
    pub unacked: usize,
}

/// Why a dump could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("data directory {0} is not empty; import only into a new, empty one")]
    NotEmpty(String),
    #[error("line {line}: {reason}")]
    Invalid { line: usize, reason: String },
    #[error(
        "the dump has version {0}; this Herald reads versions {OLDEST_DUMP_VERSION} to {DUMP_VERSION}: use a matching Herald"
    )]
    Version(u32),
    /// A dump of version 2 or later without its end line.
    #[error(
        "the dump ends at line {0} without its end line: it was cut short (an interrupted backup or copy)"
    )]
    Truncated(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the dump: {0}")]
    Read(#[from] std::io::Error),
}

/// A dump in progress: the store's snapshot, turned into lines a chunk at a time.
pub struct Export {
    snapshot: Snapshot,
    /// Written first, with the first chunk.
    header: Option<Line>,
    /// Messages stored after the snapshot have this id or a higher one.
    next_id: u64,
    path: PathBuf,
    stats: DumpStats,
    finished: bool,
}

impl Store {
    /// Starts a dump of everything in sled now: writes still in the flusher's memory
    /// or the layer's must be written first for it to hold them.
    pub(crate) fn start_export(&self, now_ms: u64) -> Result<Export, StoreError> {
        let snapshot = self.snapshot();
        let next_id = self.next_id()?;
        Ok(Export {
            snapshot,
            header: Some(Line::Header {
                herald_dump: DUMP_VERSION,
                format_version: FORMAT_VERSION,
                created_at_ms: now_ms,
                next_id,
            }),
            next_id,
            path: self.path().to_path_buf(),
            stats: DumpStats::default(),
            finished: false,
        })
    }

    /// Writes every stored record to `out`, one JSON line each, in key order.
    pub fn export<W: Write + ?Sized>(
        &self,
        now_ms: u64,
        out: &mut W,
    ) -> Result<DumpStats, StoreError> {
        let mut export = self.start_export(now_ms)?;
        while let Some(chunk) = export.next_chunk()? {
            out.write_all(&chunk).map_err(StoreError::Dump)?;
        }
        out.flush().map_err(StoreError::Dump)?;
        Ok(export.stats)
    }
}

impl Export {
    /// The next lines of the dump (each ends with a newline), `None` after the last.
    /// Blocks on reads of the store.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        if self.finished {
            return Ok(None);
        }
        let mut out = Vec::new();
        if let Some(header) = self.header.take() {
            write_line(&mut out, &header)?;
        }
        let entries = self.snapshot.next_chunk()?;
        if entries.is_empty() {
            let stats = self.stats;
            write_line(&mut out, &Line::End(stats))?;
            self.finished = true;
            return Ok(Some(out));
        }
        for (key, value) in entries {
            let after_snapshot = keys::message_id(&key).is_some_and(|id| id >= self.next_id);
            if key.first() == Some(&keys::MESSAGE) && after_snapshot {
                continue;
            }
            for stored in recovery::decode(&self.path, &key, &value) {
                let line = self.line(stored?);
                write_line(&mut out, &line)?;
            }
        }
        Ok(Some(out))
    }

    /// What the dump holds so far.
    pub fn stats(&self) -> DumpStats {
        self.stats
    }

    /// The line of one record, counted.
    fn line(&mut self, stored: Stored) -> Line {
        let stats = &mut self.stats;
        match stored {
            Stored::Membership {
                group,
                channel,
                joined_id,
                last_add_ms,
            } => {
                stats.memberships += 1;
                Line::Membership {
                    group,
                    channel,
                    joined_id,
                    last_add_ms,
                }
            }
            Stored::Cursor {
                channel,
                taken_upto,
            } => {
                stats.cursors += 1;
                Line::Cursor {
                    channel,
                    taken_upto,
                }
            }
            Stored::Pin { id, channel } => {
                stats.references += 1;
                Line::Reference { id, channel }
            }
            Stored::Unacked { id, channel } => {
                stats.unacked += 1;
                Line::Unacked { id, channel }
            }
            Stored::Message { id, record } => {
                stats.messages += 1;
                let (channel, group) = match record.target {
                    Target::Channel(c) => (Some(c), None),
                    Target::Group(g) => (None, Some(g)),
                };
                Line::Message {
                    id,
                    sent_at_ms: record.sent_at_ms,
                    channel,
                    group,
                    skipped: record.skipped,
                    body: BASE64.encode(&record.body),
                }
            }
        }
    }
}

/// Appends `line` and a newline.
fn write_line(out: &mut Vec<u8>, line: &Line) -> Result<(), StoreError> {
    serde_json::to_writer(&mut *out, line).map_err(|e| StoreError::Dump(e.into()))?;
    out.push(b'\n');
    Ok(())
}

impl Store {
    /// Loads a dump into this store, which must be empty, and flushes it to disk.
    pub fn import(&self, input: impl BufRead) -> Result<DumpStats, ImportError> {
        let has_data = self
            .scan(&[])
            .filter_map(Result::ok)
            .any(|(key, _)| key.as_ref() != keys::VERSION);
        if has_data {
            return Err(ImportError::NotEmpty(self.path().display().to_string()));
        }
        let mut stats = DumpStats::default();
        let mut batch = WriteBatch::default();
        // Messages are stored in batches, as the flusher writes them.
        let mut messages: Option<MessageBatch> = None;
        let mut last_id = None;
        // The header's version, once read.
        let mut version = None;
        let mut ended = false;
        let mut lines = 0;
        for (n, line) in input.lines().enumerate() {
            let line = line?;
            lines = n + 1;
            if line.trim().is_empty() {
                continue;
            }
            let invalid = |reason: String| ImportError::Invalid {
                line: n + 1,
                reason,
            };
            let parsed: Line = serde_json::from_str(&line).map_err(|e| invalid(e.to_string()))?;
            if version.is_none() && !matches!(parsed, Line::Header { .. }) {
                return Err(invalid("the first line must be the dump header".into()));
            }
            if ended {
                return Err(invalid("a line after the end line".into()));
            }
            match parsed {
                Line::Header {
                    herald_dump,
                    next_id,
                    ..
                } => {
                    if version.is_some() {
                        return Err(invalid("a second header".into()));
                    }
                    if !(OLDEST_DUMP_VERSION..=DUMP_VERSION).contains(&herald_dump) {
                        return Err(ImportError::Version(herald_dump));
                    }
                    version = Some(herald_dump);
                    batch.insert(keys::ID_FLOOR, &keys::encode_u64(next_id));
                }
                Line::End(expected) => {
                    if expected != stats {
                        return Err(invalid(format!(
                            "the end line counts {expected:?}, the lines before it hold {stats:?}"
                        )));
                    }
                    ended = true;
                }
                Line::Message {
                    id,
                    sent_at_ms,
                    channel,
                    group,
                    skipped,
                    body,
                } => {
                    for name in channel.iter().chain(&skipped) {
                        names::check_channel(name).map_err(|e| invalid(e.to_string()))?;
                    }
                    if let Some(group) = &group {
                        names::check_group(group).map_err(|e| invalid(e.to_string()))?;
                    }
                    let target = match (channel, group) {
                        (Some(c), None) => Target::Channel(c),
                        (None, Some(g)) => Target::Group(g),
                        _ => return Err(invalid("a message needs a channel or a group".into())),
                    };
                    let body = BASE64
                        .decode(body)
                        .map_err(|e| invalid(format!("body is not base64: {e}")))?;
                    crate::message::Message::from_msgpack(&body)
                        .map_err(|e| invalid(format!("body is not a valid message: {e}")))?;
                    if last_id.is_some_and(|last| id <= last) {
                        return Err(invalid(
                            "message ids must ascend, as `herald export` writes them".into(),
                        ));
                    }
                    last_id = Some(id);
                    let record = Record {
                        sent_at_ms,
                        target,
                        skipped,
                        body: body.into(),
                    };
                    match &mut messages {
                        Some(open) if open.size() < MAX_BATCH_BYTES => open.push(id, &record),
                        _ => {
                            if let Some(full) = messages.replace(MessageBatch::new(id, &record)) {
                                batch.put_messages(full);
                            }
                        }
                    }
                    stats.messages += 1;
                }
                Line::Membership {
                    group,
                    channel,
                    joined_id,
                    last_add_ms,
                } => {
                    names::check_group(&group).map_err(|e| invalid(e.to_string()))?;
                    names::check_channel(&channel).map_err(|e| invalid(e.to_string()))?;
                    batch.put_membership(&group, &channel, joined_id, last_add_ms);
                    stats.memberships += 1;
                }
                Line::Cursor {
                    channel,
                    taken_upto,
                } => {
                    names::check_channel(&channel).map_err(|e| invalid(e.to_string()))?;
                    batch.put_cursor(&channel, taken_upto);
                    stats.cursors += 1;
                }
                Line::Reference { id, channel } => {
                    names::check_channel(&channel).map_err(|e| invalid(e.to_string()))?;
                    batch.pin(id, &channel);
                    stats.references += 1;
                }
                Line::Unacked { id, channel } => {
                    names::check_channel(&channel).map_err(|e| invalid(e.to_string()))?;
                    batch.put_unacked(id, &channel);
                    stats.unacked += 1;
                }
            }
        }
        match version {
            None => {
                return Err(ImportError::Invalid {
                    line: 1,
                    reason: "empty dump: no header".into(),
                });
            }
            Some(version) if version >= 2 && !ended => return Err(ImportError::Truncated(lines)),
            Some(_) => {}
        }
        if let Some(last) = messages {
            batch.put_messages(last);
        }
        self.apply(batch)?;
        self.flush_blocking()?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn export_counts_messages_not_the_batches_they_are_stored_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path()).unwrap();
        let mut ticket = None;
        for id in 1..=50 {
            let record = Record {
                sent_at_ms: 1,
                target: Target::Channel("c".into()),
                skipped: Vec::new(),
                body: bytes::Bytes::from_static(b"\x81\xa4type\xa1x"),
            };
            ticket = Some(store.append(id, &record).unwrap());
        }
        // One flush: the 50 records share one stored batch.
        store.commit(ticket.unwrap()).await.unwrap();
        let mut out = Vec::new();
        let stats = store.export(0, &mut out).unwrap();
        let lines = String::from_utf8(out).unwrap();
        let message_lines = lines
            .lines()
            .filter(|l| l.contains("\"kind\":\"message\""))
            .count();
        assert_eq!((stats.messages, message_lines), (50, 50));
    }
}
