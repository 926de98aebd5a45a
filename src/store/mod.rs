//! The durable store: one sled tree, its format version and migrations, and group commit.
//!
//! Writers apply their change to sled (fast, in memory) and get a [`Ticket`]; awaiting
//! [`Store::commit`] returns once a flush that covers the ticket is on disk. One flusher
//! thread runs the flushes, so concurrent writers share each fsync (group commit) and
//! throughput grows with concurrency instead of stopping at the disk's fsync rate.
//! The store knows nothing of HTTP.

pub mod dump;
pub mod keys;
mod migrate;
pub mod record;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::config::Durability;

pub use migrate::MIGRATIONS;

/// Storage failures, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "data directory {path} is in use by another Herald process (stop it, or choose another --data-dir)"
    )]
    Locked { path: PathBuf },
    #[error("cannot use data directory {path}: {cause}")]
    Unusable { path: PathBuf, cause: String },
    #[error(
        "data directory {path} has format version {found}, newer than this Herald supports ({supported}); run a newer Herald, or restore a backup made by this version"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "data directory {path} has format version {found}, older than any this Herald can upgrade (oldest: {oldest}); export it with the Herald that wrote it"
    )]
    OlderFormat {
        path: PathBuf,
        found: u32,
        oldest: u32,
    },
    #[error(
        "data directory {path} is damaged ({detail}); restore it from a backup or move it away"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("the disk is full")]
    Full,
    #[error("storage failure: {0}")]
    Io(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if io.raw_os_error() == Some(28) => StoreError::Full,
            e => StoreError::Io(e.to_string()),
        }
    }
}

/// A write's place in the flush order; see [`Store::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What the flusher has made durable so far.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every write with a ticket at or below this is on disk.
    upto: u64,
    /// Writes at or below this were covered by a flush that failed.
    failed_upto: u64,
    error: Option<String>,
}

struct Flusher {
    /// The ticket of the latest write.
    written: AtomicU64,
    /// Set by writers, cleared by the flusher thread.
    pending: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
    flushed: watch::Sender<Flushed>,
}

/// The sled database with its flusher.
pub struct Store {
    db: sled::Db,
    path: PathBuf,
    durability: Durability,
    flusher: Arc<Flusher>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Added to sled's id generator: set once by an import so that new ids follow the
    /// imported ones.
    id_floor: u64,
}

impl Store {
    /// Opens (creating) the data directory, checks or upgrades its format, starts the
    /// flusher. Fails at once if another process holds the directory.
    pub fn open(
        path: &Path,
        durability: Durability,
        flush_interval: Duration,
    ) -> Result<Store, StoreError> {
        let unusable = |cause: String| StoreError::Unusable {
            path: path.to_path_buf(),
            cause,
        };
        std::fs::create_dir_all(path).map_err(|e| unusable(e.to_string()))?;
        let probe = path.join(".herald-write-test");
        std::fs::write(&probe, b"ok")
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| unusable(format!("not writable: {e}")))?;
        let flush_every = match durability {
            Durability::Sync => None,
            Durability::Interval => Some(flush_interval.as_millis().max(1) as u64),
        };
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(flush_every)
            .open()
            .map_err(|e| open_error(path, e))?;
        migrate::check_and_upgrade(&db, path)?;

        let (flushed, _) = watch::channel(Flushed::default());
        let flusher = Arc::new(Flusher {
            written: AtomicU64::new(0),
            pending: Mutex::new(false),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            flushed,
        });
        let thread = (durability == Durability::Sync).then(|| {
            let db = db.clone();
            let flusher = flusher.clone();
            std::thread::Builder::new()
                .name("herald-flusher".into())
                .spawn(move || flusher.run(&db))
                .expect("spawning the flusher thread")
        });
        let id_floor = db
            .get(keys::ID_FLOOR)?
            .and_then(|v| keys::decode_u64(&v))
            .unwrap_or(0);
        Ok(Store {
            db,
            path: path.to_path_buf(),
            durability,
            flusher,
            thread: Mutex::new(thread),
            id_floor,
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next id of the global sequence; it only grows, also across restarts.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.id_floor + self.db.generate_id()? + 1)
    }

    /// Reads one key.
    pub fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.db.get(key)?)
    }

    /// Writes one key.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<Ticket, StoreError> {
        self.db.insert(key, value)?;
        Ok(self.written())
    }

    /// Applies a batch atomically.
    pub fn apply(&self, batch: sled::Batch) -> Result<Ticket, StoreError> {
        self.db.apply_batch(batch)?;
        Ok(self.written())
    }

    /// Deletes everything but the format version.
    pub fn clear(&self) -> Result<Ticket, StoreError> {
        self.db.clear()?;
        migrate::stamp(&self.db)?;
        Ok(self.written())
    }

    fn written(&self) -> Ticket {
        Ticket(self.flusher.written.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Waits until the write with `ticket` is durable as configured: on disk for
    /// `sync`, at once for `interval` (sled flushes on its own timer).
    pub async fn commit(&self, ticket: Ticket) -> Result<(), StoreError> {
        if self.durability == Durability::Interval {
            return Ok(());
        }
        let mut rx = self.flusher.flushed.subscribe();
        if rx.borrow().upto >= ticket.0 {
            return Ok(());
        }
        self.flusher.request();
        let state = rx
            .wait_for(|f| f.upto >= ticket.0 || f.failed_upto >= ticket.0)
            .await
            .map_err(|_| StoreError::Io("the store is closed".into()))?;
        if state.upto >= ticket.0 {
            Ok(())
        } else {
            Err(match state.error.as_deref() {
                Some(e) if e.contains("No space left") => StoreError::Full,
                e => StoreError::Io(e.unwrap_or("flush failed").to_string()),
            })
        }
    }

    /// Asks for a flush soon without waiting for it, for writes nobody waits on (receive
    /// cursors) that must still reach the disk in bounded time.
    pub fn flush_soon(&self) {
        if self.durability == Durability::Sync {
            self.flusher.request();
        }
    }

    /// Flushes everything now, blocking.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// All entries whose key starts with `prefix`, in key order.
    pub fn scan(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + use<> {
        self.db
            .scan_prefix(prefix)
            .map(|r| r.map_err(StoreError::from))
    }

    /// Entries in `[from, to)`, in key order.
    pub fn range(
        &self,
        from: &[u8],
        to: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + use<> {
        self.db
            .range(from.to_vec()..to.to_vec())
            .map(|r| r.map_err(StoreError::from))
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.flusher.stop.store(true, Ordering::SeqCst);
        self.flusher.request();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

impl Flusher {
    fn request(&self) {
        let mut pending = self.pending.lock();
        if !*pending {
            *pending = true;
            self.wake.notify_one();
        }
    }

    /// The flusher thread: one flush at a time, each covering every write before it.
    fn run(&self, db: &sled::Db) {
        loop {
            {
                let mut pending = self.pending.lock();
                while !*pending {
                    self.wake.wait(&mut pending);
                }
                *pending = false;
            }
            let target = self.written.load(Ordering::SeqCst);
            let result = db.flush();
            self.flushed.send_modify(|f| match result {
                Ok(_) => {
                    f.upto = f.upto.max(target);
                    f.error = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "flush failed");
                    f.failed_upto = f.failed_upto.max(target);
                    f.error = Some(e.to_string());
                }
            });
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

fn open_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock => StoreError::Locked {
            path: path.to_path_buf(),
        },
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            StoreError::Locked {
                path: path.to_path_buf(),
            }
        }
        sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        sled::Error::Io(io) => StoreError::Unusable {
            path: path.to_path_buf(),
            cause: io.to_string(),
        },
        e => StoreError::Io(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_waits_for_flush_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store =
                Store::open(dir.path(), Durability::Sync, Duration::from_millis(500)).unwrap();
            let ticket = store
                .insert(&keys::cursor("a"), &keys::encode_u64(5))
                .unwrap();
            store.commit(ticket).await.unwrap();
        }
        let store = Store::open(dir.path(), Durability::Sync, Duration::from_millis(500)).unwrap();
        let value = store.get(&keys::cursor("a")).unwrap().unwrap();
        assert_eq!(keys::decode_u64(&value), Some(5));
    }

    #[test]
    fn second_open_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path(), Durability::Sync, Duration::from_millis(500)).unwrap();
        let err = Store::open(dir.path(), Durability::Sync, Duration::from_millis(500))
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn ids_grow_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store =
                Store::open(dir.path(), Durability::Sync, Duration::from_millis(500)).unwrap();
            (0..10).map(|_| store.next_id().unwrap()).max().unwrap()
        };
        let store = Store::open(dir.path(), Durability::Sync, Duration::from_millis(500)).unwrap();
        assert!(store.next_id().unwrap() > first);
    }
}
