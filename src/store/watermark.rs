//! Detects a log that sled cut short. sled takes the first unreadable spot of its log
//! for the log's end, so a damaged byte in the middle would make it open a prefix of the
//! data without a word. Every flush writes a [`Mark`] into sled (key `W`): a count of
//! flushes and the highest message id so far. The flusher copies the latest durable mark
//! into `herald.watermark` beside sled's files, at most every [`FILE_PERIOD`] and at a
//! clean stop; at open, a log whose mark is older than the file's has lost acknowledged
//! writes.
//!
//! The file holds two slots written in turn, each with its own checksum, so that a torn
//! write of one leaves the other.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

/// How often, at most, the file is rewritten: what acknowledged writes of the last
/// moments before a crash the check at open cannot vouch for.
pub(super) const FILE_PERIOD: Duration = Duration::from_millis(100);
/// The file's name in the data directory.
pub(super) const FILE_NAME: &str = "herald.watermark";

const MAGIC: &[u8; 4] = b"HWM1";
const SLOT: usize = 32;

/// A point in the store's write history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Mark {
    /// Flushes written so far.
    pub flushes: u64,
    /// The highest message id appended so far.
    pub last_id: u64,
}

impl Mark {
    /// The value of sled's `W` key.
    pub fn encode(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.flushes.to_be_bytes());
        out[8..].copy_from_slice(&self.last_id.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Mark> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        Some(Mark {
            flushes: u64::from_be_bytes(bytes[..8].try_into().ok()?),
            last_id: u64::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }

    fn slot(self) -> [u8; SLOT] {
        let mut out = [0; SLOT];
        out[..4].copy_from_slice(MAGIC);
        out[4..20].copy_from_slice(&self.encode());
        let crc = crc32fast::hash(&out[..20]);
        out[20..24].copy_from_slice(&crc.to_be_bytes());
        out
    }

    fn from_slot(slot: &[u8]) -> Option<Mark> {
        let crc = u32::from_be_bytes(slot.get(20..24)?.try_into().ok()?);
        (slot.get(..4)? == MAGIC && crc32fast::hash(&slot[..20]) == crc)
            .then(|| Mark::decode(&slot[4..20]))
            .flatten()
    }
}

/// `herald.watermark`, open for writing.
pub(super) struct WatermarkFile {
    file: File,
    next_slot: u64,
    /// The mark last written.
    written: Mark,
}

impl WatermarkFile {
    /// The newest intact mark in `dir`'s file; `None` when there is no file (a data
    /// directory from before the check, or a new one).
    pub fn read(dir: &Path) -> io::Result<Option<Mark>> {
        let bytes = match std::fs::read(dir.join(FILE_NAME)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(bytes.chunks(SLOT).filter_map(Mark::from_slot).max())
    }

    /// Opens (creating) the file in `dir` and writes `mark` into it, durably.
    pub fn create(dir: &Path, mark: Mark) -> io::Result<WatermarkFile> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut watermark = WatermarkFile {
            file,
            next_slot: 0,
            written: Mark::default(),
        };
        watermark.write(mark)?;
        watermark.write(mark)?;
        if !existed {
            super::disk::sync_dir(dir)?;
        }
        Ok(watermark)
    }

    /// The mark last written.
    pub fn written(&self) -> Mark {
        self.written
    }

    /// Writes `mark` into the older slot and syncs it.
    pub fn write(&mut self, mark: Mark) -> io::Result<()> {
        self.file
            .write_all_at(&mark.slot(), self.next_slot * SLOT as u64)?;
        self.file.sync_data()?;
        self.next_slot ^= 1;
        self.written = mark;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_intact_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(WatermarkFile::read(dir.path()).unwrap(), None);
        let first = Mark {
            flushes: 3,
            last_id: 40,
        };
        let second = Mark {
            flushes: 4,
            last_id: 41,
        };
        let mut file = WatermarkFile::create(dir.path(), first).unwrap();
        file.write(second).unwrap();
        assert_eq!(WatermarkFile::read(dir.path()).unwrap(), Some(second));
        // A torn write of the newer slot leaves the older one.
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(WatermarkFile::read(dir.path()).unwrap(), Some(first));
    }
}
