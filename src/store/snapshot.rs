//! Consistent reads of the whole store that never hold writers back for long: a
//! [`Snapshot`] reads the entries as they were when it was taken, a chunk at a time,
//! while writes go on.
//!
//! sled's iterators see concurrent writes, so a snapshot keeps, for each key changed
//! after it was taken and not read yet, the value the key had then (copy on write,
//! recorded by [`Store::apply`] before it writes). Message records are never changed
//! once written, only deleted by the expiry sweep: while a snapshot is open the sweep
//! deletes nothing ([`Store::snapshots_open`]), so those copies stay small (receive
//! cursors, memberships, pins). Records written after the snapshot have higher ids,
//! which its reader leaves out, as it leaves out the flusher's own bookkeeping (the
//! flush mark), which is written past this copy. A flush of everything ([`Store::clear`]) or a reopen of
//! the database voids every open snapshot: its next read fails.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use sled::IVec;

use super::handle::Handle;
use super::{Store, StoreError, Ticket, WriteBatch};

/// Keys and values handed out by one [`Snapshot::next_chunk`], at most (a single
/// larger value still comes whole).
const CHUNK_BYTES: usize = 64 << 10;
/// Entries handed out by one [`Snapshot::next_chunk`], at most: bounds the time the
/// chunk holds writers of the same snapshot.
const CHUNK_ENTRIES: usize = 512;

/// What a snapshot has read, and the old values of keys changed since it was taken.
#[derive(Default)]
struct Frozen {
    /// Every key up to this one (in key order) was handed out; `None`: none yet.
    read_upto: Option<IVec>,
    /// Keys changed since the snapshot and not read yet, with their value at the
    /// snapshot (`None`: the key did not exist then).
    before: BTreeMap<IVec, Option<IVec>>,
    /// Set when the snapshot can no longer be read consistently.
    void: Option<&'static str>,
    done: bool,
}

impl Frozen {
    fn unread(&self, key: &[u8]) -> bool {
        !self.done && self.read_upto.as_deref().is_none_or(|upto| key > upto)
    }
}

/// The open snapshots of one store.
#[derive(Default)]
pub(super) struct Snapshots {
    open: RwLock<Vec<Arc<Mutex<Frozen>>>>,
}

/// A consistent view of the store, read in chunks in key order. Dropping it closes it.
pub(crate) struct Snapshot {
    frozen: Arc<Mutex<Frozen>>,
    snapshots: Arc<Snapshots>,
    db: Arc<Handle>,
    generation: u64,
}

impl Store {
    /// Takes a snapshot of everything written so far. Writes that callers must see in
    /// it (appended messages, cursors) have to be in sled first.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let frozen = Arc::new(Mutex::new(Frozen::default()));
        // The write lock waits for every apply in progress: each later one sees it.
        self.snapshots.open.write().push(frozen.clone());
        Snapshot {
            frozen,
            snapshots: self.snapshots.clone(),
            db: self.db.clone(),
            generation: self.db.generation(),
        }
    }

    /// Whether a snapshot is open (the expiry sweep then waits).
    pub(crate) fn snapshots_open(&self) -> bool {
        !self.snapshots.open.read().is_empty()
    }

    /// Runs `write`, which changes `keys`, after saving in every open snapshot the
    /// current value of each key it has not read yet.
    pub(super) fn preserving<T>(
        &self,
        keys: &[IVec],
        write: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let open = self.snapshots.open.read();
        for frozen in open.iter() {
            let mut frozen = frozen.lock();
            for key in keys {
                if frozen.unread(key) && !frozen.before.contains_key(key) {
                    let old = self.db.read(|db| db.get(key))?;
                    frozen.before.insert(key.clone(), old);
                }
            }
        }
        write()
    }

    /// Applies `batch` only if no snapshot is open, and keeps snapshots from opening
    /// meanwhile: for deletions too large to copy into a snapshot. `None` if one is open.
    pub(super) fn apply_unless_snapshot(
        &self,
        batch: WriteBatch,
    ) -> Result<Option<Ticket>, StoreError> {
        let open = self.snapshots.open.read();
        if !open.is_empty() {
            return Ok(None);
        }
        self.apply_sled(batch.into_sled().1).map(Some)
    }

    /// Marks every open snapshot as unreadable, for `why`.
    pub(super) fn void_snapshots(&self, why: &'static str) {
        for frozen in self.snapshots.open.read().iter() {
            frozen.lock().void.get_or_insert(why);
        }
    }
}

impl Snapshot {
    /// The next entries in key order, as they were at the snapshot; empty once every
    /// entry was handed out.
    pub(crate) fn next_chunk(&self) -> Result<Vec<(IVec, IVec)>, StoreError> {
        let mut frozen = self.frozen.lock();
        if self.db.generation() != self.generation {
            frozen
                .void
                .get_or_insert("the database was reopened after a write failure");
        }
        if let Some(why) = frozen.void {
            return Err(StoreError::Interrupted { cause: why });
        }
        if frozen.done {
            return Ok(Vec::new());
        }
        let from = match frozen.read_upto.clone() {
            Some(key) => Bound::Excluded(key),
            None => Bound::Unbounded,
        };
        let mut chunk = Chunk::default();
        let mut last = None;
        let mut exhausted = true;
        for item in self.db.db()?.range::<IVec, _>((from, Bound::Unbounded)) {
            let (key, value) = item.map_err(|e| super::read_error(self.db.path(), e))?;
            chunk.take_changed_before(&mut frozen.before, Some(&key));
            let value = frozen.before.remove(&key).unwrap_or(Some(value));
            if let Some(value) = value {
                chunk.push(key.clone(), value);
            }
            last = Some(key);
            if chunk.is_full() {
                exhausted = false;
                break;
            }
        }
        if exhausted {
            // Keys deleted since the snapshot and past the last one still there.
            chunk.take_changed_before(&mut frozen.before, None);
            frozen.done = true;
        }
        if last.is_some() {
            frozen.read_upto = last;
        }
        Ok(chunk.entries)
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        self.snapshots
            .open
            .write()
            .retain(|frozen| !Arc::ptr_eq(frozen, &self.frozen));
    }
}

/// The entries of one [`Snapshot::next_chunk`].
#[derive(Default)]
struct Chunk {
    entries: Vec<(IVec, IVec)>,
    bytes: usize,
}

impl Chunk {
    fn push(&mut self, key: IVec, value: IVec) {
        self.bytes += key.len() + value.len();
        self.entries.push((key, value));
    }

    fn is_full(&self) -> bool {
        self.bytes >= CHUNK_BYTES || self.entries.len() >= CHUNK_ENTRIES
    }

    /// Moves the saved old values of keys below `upto` (all of them for `None`) into
    /// the chunk: keys the store no longer holds, or holds again after a delete.
    fn take_changed_before(
        &mut self,
        before: &mut BTreeMap<IVec, Option<IVec>>,
        upto: Option<&IVec>,
    ) {
        while let Some(entry) = before.first_entry() {
            if upto.is_some_and(|upto| entry.key() >= upto) {
                return;
            }
            let (key, old) = entry.remove_entry();
            if let Some(old) = old {
                self.push(key, old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, key: &[u8], value: &[u8]) {
        let mut batch = WriteBatch::default();
        batch.insert(key, value);
        store.apply(batch).unwrap();
    }

    fn delete(store: &Store, key: &[u8]) {
        let mut batch = WriteBatch::default();
        batch.remove(key);
        store.apply(batch).unwrap();
    }

    fn key(n: usize) -> Vec<u8> {
        format!("C{n:05}").into_bytes()
    }

    /// Every entry the snapshot hands out, reading one chunk first, then running
    /// `meanwhile`, then reading the rest.
    fn read_around(store: &Store, meanwhile: impl FnOnce()) -> Vec<(Vec<u8>, Vec<u8>)> {
        let snapshot = store.snapshot();
        let mut read: Vec<_> = snapshot.next_chunk().unwrap();
        assert!(
            !read.is_empty() && read.len() < 2000,
            "one chunk of several"
        );
        meanwhile();
        loop {
            let chunk = snapshot.next_chunk().unwrap();
            if chunk.is_empty() {
                break;
            }
            read.extend(chunk);
        }
        read.into_iter()
            .filter(|(k, _)| k[0] == b'C' || k[0] == b'A')
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect()
    }

    #[test]
    fn a_snapshot_reads_the_entries_as_they_were_while_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path()).unwrap();
        for n in (0..2000).step_by(2) {
            put(&store, &key(n), b"old");
        }
        let before: Vec<(Vec<u8>, Vec<u8>)> = store
            .scan(b"C")
            .map(|item| {
                let (k, v) = item.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect();
        let read = read_around(&store, || {
            // Changes on both sides of what was read: updates, deletes, new keys
            // (between existing ones, before and after all of them), a key deleted and
            // written again.
            for n in [0, 2, 1000, 1500, 1998] {
                put(&store, &key(n), b"new");
            }
            for n in [4, 1002, 1996] {
                delete(&store, &key(n));
            }
            for n in [1, 1001, 1999, 5000] {
                put(&store, &key(n), b"added");
            }
            put(&store, b"A", b"added");
            delete(&store, &key(1500));
            put(&store, &key(1500), b"again");
        });
        assert_eq!(read, before);
        assert!(!store.snapshots_open(), "dropped, the snapshot closed");
        assert!(store.snapshots.open.read().is_empty());
    }

    #[test]
    fn a_clear_voids_open_snapshots_and_the_sweep_waits_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_for_test(dir.path()).unwrap();
        for n in 0..600 {
            put(&store, &key(n), b"v");
        }
        let snapshot = store.snapshot();
        assert!(store.snapshots_open());
        let mut batch = WriteBatch::default();
        batch.remove(&key(599));
        assert!(store.apply_unless_snapshot(batch).unwrap().is_none());
        assert!(!snapshot.next_chunk().unwrap().is_empty());
        store.clear(0).unwrap();
        assert!(matches!(
            snapshot.next_chunk(),
            Err(StoreError::Interrupted { .. })
        ));
        drop(snapshot);
        let mut batch = WriteBatch::default();
        batch.insert(b"C", b"v");
        assert!(store.apply_unless_snapshot(batch).unwrap().is_some());
    }
}
