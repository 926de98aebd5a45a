//! Disk space: the data directory's size, the `storage.max_disk_bytes` limit, and
//! giving back the space of deleted messages without waiting for new traffic.
//!
//! sled 0.34 stores a log fragment larger than a quarter of its 512 KiB segment (a tree
//! node holding a large message, or up to 17 of them) as a file of its own under
//! `blobs/`. When such a node is replaced, sled deletes the old file only once the log
//! segment that records the replacement is full and on disk. Blobs take a few bytes of
//! the log each, so that segment can stay open for hundreds of large messages, and
//! without other writes it never closes: 60 messages of 1 MiB, all expired and swept,
//! left 188 MiB in the data directory, across restarts too. [`Store::reclaim`] closes
//! the open segment by writing throw-away values into a tree of their own, and
//! flushes; sled then deletes the files, and truncates free segments at the log's end.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Store, StoreError};

/// sled's log segment size (its default, which Herald keeps).
const SEGMENT_BYTES: usize = 512 << 10;
/// Each throw-away value: under a quarter segment, so that it goes into the log.
const FILLER_BYTES: usize = 96 << 10;
/// The tree of the throw-away values, apart from Herald's data (see [`super::keys`]);
/// it holds nothing between reclaims.
pub(super) const FILLER_TREE: &[u8] = b"herald-space";
/// Segments [`Store::reclaim`] fills, each flushed: a replaced node's file is deleted
/// when the segment recording the replacement closes, and that can take a chain of
/// closes (measured: 60 files of 1 MiB went after the third to fourth segment).
const RECLAIM_SEGMENTS: usize = 4;
/// Slack of the reclaim bound: sled's own overhead, a few open segments.
const SLACK_BYTES: u64 = 64 << 20;

/// What the store knows of its size on disk.
#[derive(Default)]
pub(super) struct Space {
    /// `storage.max_disk_bytes`; 0 for no limit.
    limit: AtomicU64,
    /// The data directory's size at the last [`Store::measure_disk`].
    measured: AtomicU64,
    /// Bytes of messages admitted by [`Store::take_room`] since then.
    admitted: AtomicU64,
}

impl Store {
    /// Sets `storage.max_disk_bytes` (0: no limit) and measures the data directory.
    pub(crate) fn limit_disk(&self, max_bytes: u64) {
        self.space.limit.store(max_bytes, Ordering::Relaxed);
        self.measure_disk();
    }

    /// Admits a message of `bytes` if the data directory, as last measured plus what
    /// was admitted since, stays within `storage.max_disk_bytes`; otherwise
    /// [`StoreError::DiskLimit`], and nothing is counted. Measuring costs a directory
    /// walk, so the sweep does it ([`Store::measure_disk`]), not every publish.
    pub(crate) fn take_room(&self, bytes: usize) -> Result<(), StoreError> {
        let limit = self.space.limit.load(Ordering::Relaxed);
        if limit == 0 {
            return Ok(());
        }
        let bytes = bytes as u64;
        let measured = self.space.measured.load(Ordering::Relaxed);
        self.space
            .admitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |admitted| {
                (measured + admitted + bytes <= limit).then_some(admitted + bytes)
            })
            .map(drop)
            .map_err(|_| StoreError::DiskLimit { limit })
    }

    /// Measures the data directory (every file in it and in `blobs/`), for
    /// [`Store::take_room`]; returns the size.
    pub(crate) fn measure_disk(&self) -> u64 {
        let admitted = self.space.admitted.load(Ordering::Relaxed);
        let size = dir_bytes(&self.path);
        self.space.measured.store(size, Ordering::Relaxed);
        // What was admitted while measuring stays counted (perhaps twice, for a moment).
        self.space.admitted.fetch_sub(admitted, Ordering::Relaxed);
        size
    }

    /// Bytes the data directory takes, as last measured plus what was admitted since.
    pub(crate) fn size_on_disk(&self) -> u64 {
        self.space.measured.load(Ordering::Relaxed) + self.space.admitted.load(Ordering::Relaxed)
    }

    /// Whether a data directory of `disk` bytes holding `live` bytes of messages is
    /// over the bound [`Store::reclaim`] restores: twice the live data plus 64 MiB.
    pub(crate) fn is_bloated(disk: u64, live: u64) -> bool {
        disk > live.saturating_mul(2).saturating_add(SLACK_BYTES)
    }

    /// Makes sled close its open log segments, so that it deletes the files of replaced
    /// nodes and truncates free segments (see the module's documentation): writes
    /// [`RECLAIM_SEGMENTS`] segments' worth of throw-away values, flushing after each,
    /// and removes them. About 2 MiB of writes and five flushes.
    pub fn reclaim(&self) -> Result<(), StoreError> {
        self.db.write(|db| {
            let tree = db.open_tree(FILLER_TREE)?;
            let mut filler = vec![0; FILLER_BYTES];
            for _ in 0..RECLAIM_SEGMENTS {
                for round in 0..SEGMENT_BYTES.div_ceil(FILLER_BYTES) {
                    // sled writes nothing for a value equal to the one stored.
                    filler[0] = round as u8;
                    tree.insert(b"filler", filler.as_slice())?;
                }
                db.flush()?;
            }
            tree.remove(b"filler")?;
            db.flush()
        })?;
        Ok(())
    }
}

/// The sizes of the files in `dir` and its subdirectories (sled's `blobs/`).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WriteBatch;

    #[test]
    fn reclaim_gives_back_the_files_of_deleted_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path()).unwrap();
        // 40 values of 1 MiB: each a node of its own in blobs/, or several in one.
        let value = vec![7u8; 1 << 20];
        for id in 0..40u64 {
            let mut batch = WriteBatch::default();
            batch.insert(&super::super::keys::message(id), &value);
            store.apply(batch).unwrap();
        }
        store.flush_blocking().unwrap();
        for id in 0..40u64 {
            let mut batch = WriteBatch::default();
            batch.remove(&super::super::keys::message(id));
            store.apply(batch).unwrap();
        }
        store.flush_blocking().unwrap();
        let before = store.measure_disk();
        assert!(
            before > 40 << 20,
            "sled keeps the files until its segment closes"
        );
        // sled deletes the files of closed segments by itself, a moment later under
        // load; the sweep reclaims again while the directory stays over its bound.
        let mut after = before;
        for _ in 0..3 {
            store.reclaim().unwrap();
            after = store.measure_disk();
            if after < 8 << 20 {
                break;
            }
        }
        assert!(after < 8 << 20, "{after} bytes left of {before}");
    }
}
