//! The sled database behind a lock, so that it can be closed and opened again after
//! sled has stopped writing for good.
//!
//! sled 0.34 keeps the first error of a write to its log (a full disk, an I/O error)
//! as a "global error" of the `Db`: from then on every write and flush returns that
//! error, even once the disk has room again, while reads still work. Only opening the
//! database again clears it; what never reached the disk is then gone, as in a crash.
//!
//! So a write that fails with an I/O error marks the handle as failing, and the healer
//! thread ([`Handle::spawn_healer`]) repairs it: if a flush still fails, it waits until
//! a probe file of [`PROBE_BYTES`] fits next to the database, then closes the `Db` and
//! opens it again. Between the two the handle holds no `Db` and every operation fails
//! with the error that started it (`Full` for a full disk).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use super::StoreError;
use super::disk::Disk;
use super::keys;

/// Room a probe file must find before a failed database is reopened: two of sled's
/// 512 KiB log segments, so that the reopened database can write at once.
pub(super) const PROBE_BYTES: usize = 1 << 20;
/// Pause between repair attempts while the disk stays full; doubled after each failed
/// reopen, up to [`MAX_RETRY`].
const RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(4);
/// Name of the probe file in the data directory.
const PROBE: &str = ".herald-space-probe";

/// How a repair attempt ended.
enum Repair {
    /// Writes work again (the database flushes, or was reopened).
    Done,
    /// The probe file does not fit yet.
    NoRoom,
    /// The database was closed, and opening it again failed.
    OpenFailed,
}

/// An open database and its log, for syncing.
struct Open {
    db: sled::Db,
    disk: Disk,
}

/// The open database, or none while it is being reopened.
struct Current {
    open: Option<Open>,
    /// Counts reopens: a failure seen on an older `Db` is repaired already.
    generation: u64,
}

#[derive(Default)]
struct Health {
    /// The first failed write since the last repair, with the generation it hit.
    failing: Option<(u64, Failure)>,
    stop: bool,
}

/// Why writes fail, for the answers given while they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Failure {
    pub full: bool,
    pub message: String,
}

impl Failure {
    pub fn of(e: &StoreError) -> Failure {
        Failure {
            full: matches!(e, StoreError::Full),
            message: e.to_string(),
        }
    }

    pub(crate) fn to_error(&self) -> StoreError {
        if self.full {
            StoreError::Full
        } else {
            StoreError::Failing {
                cause: self.message.clone(),
            }
        }
    }
}

/// A sled database that is reopened when it stops taking writes.
pub(super) struct Handle {
    path: PathBuf,
    config: sled::Config,
    current: RwLock<Current>,
    health: Mutex<Health>,
    wake: Condvar,
}

impl Handle {
    /// Takes the database just opened in `path`; syncs what sled created opening it.
    pub fn new(path: &Path, config: sled::Config, db: sled::Db) -> Result<Arc<Handle>, StoreError> {
        let disk = Disk::open(path).map_err(|e| StoreError::from(sled::Error::from(e)))?;
        Ok(Arc::new(Handle {
            path: path.to_path_buf(),
            config,
            current: RwLock::new(Current {
                open: Some(Open { db, disk }),
                generation: 0,
            }),
            health: Mutex::new(Health::default()),
            wake: Condvar::new(),
        }))
    }

    /// Runs a read.
    pub fn read<T>(&self, op: impl FnOnce(&sled::Db) -> sled::Result<T>) -> Result<T, StoreError> {
        let current = self.current.read();
        match &current.open {
            Some(open) => op(&open.db).map_err(|e| super::read_error(&self.path, e)),
            None => Err(self.closed_error()),
        }
    }

    /// Runs a write (or flush). An I/O error marks the database as failing, for the
    /// healer. `op` runs under the handle's read lock, so whatever it does after the
    /// write (taking a flush ticket) happens before any reopen. While the database is
    /// failing, writes are refused at once with its error: sled may block a writer
    /// that waits for log space its failed writes will never free.
    pub fn write<T>(&self, op: impl FnOnce(&sled::Db) -> sled::Result<T>) -> Result<T, StoreError> {
        self.write_open(|open| op(&open.db))
    }

    /// [`Handle::write`] with the log at hand, for flushes.
    fn write_open<T>(&self, op: impl FnOnce(&Open) -> sled::Result<T>) -> Result<T, StoreError> {
        if let Some(failure) = self.failing() {
            return Err(failure.to_error());
        }
        let current = self.current.read();
        let Some(open) = &current.open else {
            return Err(self.closed_error());
        };
        match op(open) {
            Ok(value) => Ok(value),
            Err(e) => {
                let io = matches!(e, sled::Error::Io(_));
                let error = StoreError::from(e);
                if io {
                    self.report(current.generation, Failure::of(&error));
                }
                Err(error)
            }
        }
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counts the reopens: what was read before one may not match what is read after.
    pub fn generation(&self) -> u64 {
        self.current.read().generation
    }

    /// A clone of the database, for iterators that outlive a call; an iterator keeps
    /// its `Db` open, so a reopen waits for it to be dropped.
    pub fn db(&self) -> Result<sled::Db, StoreError> {
        self.read(|db| Ok(db.clone()))
    }

    pub(crate) fn generate_id(&self) -> Result<u64, StoreError> {
        self.write(|db| db.generate_id())
    }

    /// Flushes durably against power loss: new blob files first, then sled's flush,
    /// then its log's bytes and size (see [`super::disk`]).
    pub fn flush(&self) -> Result<usize, StoreError> {
        self.write_open(|open| {
            open.disk.sync_blobs()?;
            let flushed = open.db.flush()?;
            open.disk.sync_log()?;
            Ok(flushed)
        })
    }

    /// Whether writes are failing and not yet repaired.
    pub fn failing(&self) -> Option<Failure> {
        self.health.lock().failing.as_ref().map(|(_, f)| f.clone())
    }

    fn report(&self, generation: u64, failure: Failure) {
        let mut health = self.health.lock();
        if health.failing.is_none() {
            tracing::error!(
                error = %failure.message,
                "storage writes are failing; they are refused until the database can be reopened"
            );
            health.failing = Some((generation, failure));
            self.wake.notify_all();
        }
    }

    fn closed_error(&self) -> StoreError {
        match self.failing() {
            Some(failure) => failure.to_error(),
            None => StoreError::Closed,
        }
    }

    /// Starts the healer thread; `on_reopen` runs while no operation is in progress,
    /// just before the failed database is closed.
    pub(crate) fn spawn_healer(
        self: &Arc<Self>,
        on_reopen: impl Fn(&Failure) + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let handle = self.clone();
        std::thread::Builder::new()
            .name("herald-healer".into())
            .spawn(move || handle.heal_loop(&on_reopen))
    }

    /// Ends the healer thread.
    pub fn stop(&self) {
        self.health.lock().stop = true;
        self.wake.notify_all();
    }

    fn heal_loop(&self, on_reopen: &dyn Fn(&Failure)) {
        let mut health = self.health.lock();
        let mut failed_opens = 0u32;
        let mut next_attempt = Instant::now();
        loop {
            if health.stop {
                return;
            }
            let Some((generation, failure)) = health.failing.clone() else {
                self.wake.wait(&mut health);
                continue;
            };
            if Instant::now() < next_attempt {
                self.wake.wait_until(&mut health, next_attempt);
                continue;
            }
            let outcome =
                MutexGuard::unlocked(&mut health, || self.repair(generation, &failure, on_reopen));
            let pause = match outcome {
                Repair::Done => {
                    failed_opens = 0;
                    // A failure of the repaired database stays for the next round.
                    if health
                        .failing
                        .as_ref()
                        .is_some_and(|(g, _)| *g <= generation)
                    {
                        health.failing = None;
                    }
                    // Should the disk fill again at once: not more than a reopen a second.
                    Duration::from_secs(1)
                }
                Repair::NoRoom => RETRY,
                Repair::OpenFailed => {
                    failed_opens += 1;
                    (RETRY * 2u32.pow(failed_opens.min(4))).min(MAX_RETRY)
                }
            };
            next_attempt = Instant::now() + pause;
        }
    }

    /// One repair attempt.
    fn repair(&self, generation: u64, failure: &Failure, on_reopen: &dyn Fn(&Failure)) -> Repair {
        {
            let current = self.current.read();
            if current.generation > generation {
                return Repair::Done;
            }
            // A database that flushes again was not stuck (nothing to reopen).
            if let Some(open) = &current.open
                && open.db.flush().is_ok()
                && open.disk.sync_log().is_ok()
            {
                tracing::info!("storage writes work again");
                return Repair::Done;
            }
        }
        if let Err(e) = self.probe() {
            tracing::debug!(error = %e, "no room for the database yet");
            return Repair::NoRoom;
        }
        let old = {
            let mut current = self.current.write();
            if current.open.is_some() {
                on_reopen(failure);
            }
            current.open.take()
        };
        if let Some(old) = old {
            tracing::warn!(
                data_dir = %self.path.display(),
                "closing the database to clear its write error; writes not yet on disk are lost"
            );
            drop(old);
        }
        match self.open() {
            Ok(open) => {
                let mut current = self.current.write();
                current.open = Some(open);
                current.generation += 1;
                tracing::info!(data_dir = %self.path.display(), "database reopened; writes work again");
                Repair::Done
            }
            Err(e) => {
                tracing::error!(error = %e, data_dir = %self.path.display(), "reopening the database failed; will retry");
                Repair::OpenFailed
            }
        }
    }

    /// Writes and removes a file of [`PROBE_BYTES`]: fails while the disk is full.
    fn probe(&self) -> std::io::Result<()> {
        let path = self.path.join(PROBE);
        let result = std::fs::File::create(&path).and_then(|mut file| {
            file.write_all(&vec![0; PROBE_BYTES])?;
            file.sync_all()
        });
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Opens the database again; it must still hold its format version.
    fn open(&self) -> Result<Open, StoreError> {
        let db = super::open_sled(&self.config, &self.path)?;
        if db.get(keys::VERSION)?.is_none() {
            return Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: "the reopened database has lost its format version".into(),
            });
        }
        let disk = Disk::open(&self.path).map_err(|e| StoreError::from(sled::Error::from(e)))?;
        Ok(Open { db, disk })
    }
}
