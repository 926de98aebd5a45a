//! The durable store: one sled tree, its format version and migrations, and group commit.
//!
//! Writers apply their change to sled (fast, in memory) and get a [`Ticket`]; awaiting
//! [`Store::commit`] returns once a flush that covers the ticket is on stable storage.
//! One flusher thread runs the flushes (sled's flush, then `fdatasync` of its log: see
//! [`disk`]), so concurrent writers share each sync (group commit) and throughput grows
//! with concurrency instead of stopping at the disk's sync rate. (Overlapping the sync
//! of one flush with the next flush measured slower on one core: it halves the writes
//! per flush, and a flush costs CPU whatever it carries.) A mark written with every flush and copied into a file beside the
//! log tells at open whether the log lost acknowledged writes ([`watermark`]).
//!
//! Message records, the bulk of the writes, are not inserted one by one: they wait in
//! memory ([`Store::append`]) and the flusher writes all those of one flush as one
//! [`MessageBatch`] under one key, just before flushing. One sled insert costs about as
//! much CPU as a small flush, so this is what lets a flush carry many messages cheaply.
//! In `interval` mode records are inserted at once (a batch of one each) and the
//! flusher flushes every `flush_interval_ms` instead of when asked.
//!
//! The store knows nothing of HTTP.

mod batch;
mod disk;
pub(crate) mod dump;
mod handle;
mod keys;
mod migrate;
pub(crate) mod record;
mod recovery;
mod snapshot;
mod space;
mod sweep;
mod watermark;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::config::Durability;
use handle::{Failure, Handle};
use record::{MAX_BATCH_BYTES, MessageBatch, Record};
use watermark::{Mark, WatermarkFile};

pub use batch::WriteBatch;
pub use disk::sync_parent;
pub use dump::ImportError;
pub use recovery::Stored;
pub use sweep::Deleted;

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
    #[error(
        "data directory {path} has lost acknowledged writes: {detail}; restore it from a backup, or start with --accept-data-loss to serve what is left"
    )]
    DataLoss { path: PathBuf, detail: String },
    #[error("the disk is full")]
    Full,
    /// The data directory would pass `storage.max_disk_bytes`.
    #[error("the data directory is at its limit of {limit} bytes (storage.max_disk_bytes)")]
    DiskLimit { limit: u64 },
    /// sled failed: an I/O error other than a full disk, or damage it found.
    #[error("storage failure: {0}")]
    Sled(sled::Error),
    /// Writes fail since an earlier error (`cause`), until the database is reopened.
    #[error("{cause}")]
    Failing { cause: String },
    /// The store was closed while a write waited for its flush.
    #[error("the store is closed")]
    Closed,
    /// One of the store's threads could not be started.
    #[error("cannot start a storage thread: {0}")]
    Thread(#[source] io::Error),
    /// A dump could not be written to its destination.
    #[error("writing the dump: {0}")]
    Dump(#[source] io::Error),
    /// A snapshot (a dump in progress) could no longer be read consistently.
    #[error("the dump was interrupted: {cause}")]
    Interrupted { cause: &'static str },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if is_full(&io) => StoreError::Full,
            e => StoreError::Sled(e),
        }
    }
}

/// Whether `e` says the disk (or the quota) is full. sled hands out its stored write
/// error as a copy that keeps the kind but not the OS error number.
fn is_full(e: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    e.kind() == io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

/// A write's place in the flush order; see [`Store::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

/// What the flusher has made durable so far.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every write with a ticket at or below this is on disk, unless it is `lost`.
    upto: u64,
    /// Writes at or below this were covered by a flush that failed.
    failed_upto: u64,
    error: Option<Failure>,
    /// Tickets `(after, upto]` of writes that were still in memory when their
    /// database was closed to be reopened (see [`handle`]): never durable.
    lost: Vec<(u64, u64, Failure)>,
}

impl Flushed {
    fn lost(&self, ticket: u64) -> Option<&Failure> {
        self.lost
            .iter()
            .find(|(after, upto, _)| *after < ticket && ticket <= *upto)
            .map(|(_, _, failure)| failure)
    }
}

/// See [`Flusher::gather`].
const GATHER_STEP: Duration = Duration::from_micros(50);
const GATHER_MAX: Duration = Duration::from_micros(500);
/// How long opening waits for the data directory's lock (see [`open_sled`]).
const LOCK_WAIT: Duration = Duration::from_secs(1);
/// How often opening tries the lock meanwhile.
const LOCK_RETRY: Duration = Duration::from_millis(20);

struct Flusher {
    /// The ticket of the latest write.
    written: AtomicU64,
    /// Message records appended but not yet written to sled, in id order. A ticket is
    /// taken under this lock, so the batches hold every appended ticket up to `written`.
    batches: Mutex<Vec<MessageBatch>>,
    /// Held while batches are written to sled, so that a flush that read `written` only
    /// after another thread took the batches still waits for them to be in sled.
    drain: Mutex<()>,
    /// Set by writers, cleared by the flusher thread.
    pending: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
    flushed: watch::Sender<Flushed>,
    /// In `interval` mode, how often the thread flushes without being asked.
    period: Option<Duration>,
    /// Marks written into sled so far (see [`watermark`]); counted under `drain`.
    flushes: AtomicU64,
    /// The highest message id appended so far.
    last_id: AtomicU64,
    /// The newest mark known to be on disk, and the watermark file it is copied into.
    durable: Mutex<Durable>,
}

/// See [`Flusher::durable`].
struct Durable {
    mark: Mark,
    file: WatermarkFile,
    file_written_at: Instant,
}

/// What to do when the log lost acknowledged writes (see [`watermark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDataLoss {
    /// Refuse to open, with [`StoreError::DataLoss`].
    Refuse,
    /// Open what is left, and report the loss ([`Store::data_loss`]).
    Accept,
}

/// The sled database with its flusher.
pub struct Store {
    db: Arc<Handle>,
    path: PathBuf,
    durability: Durability,
    flusher: Arc<Flusher>,
    thread: Mutex<Option<JoinHandle<()>>>,
    healer: Mutex<Option<JoinHandle<()>>>,
    /// Added to sled's id generator: set once by an import so that new ids follow the
    /// imported ones.
    id_floor: u64,
    /// No message id above this was ever assigned (see [`Store::highest_id`]).
    highest_id: AtomicU64,
    /// See [`Store::lost_upto`].
    lost: AtomicU64,
    /// What was lost, when opened with [`OnDataLoss::Accept`] on a damaged log.
    data_loss: Option<String>,
    space: space::Space,
    snapshots: Arc<snapshot::Snapshots>,
}

impl Store {
    /// Opens (creating) the data directory, checks or upgrades its format, checks that
    /// its log holds every acknowledged write, starts the flusher. Fails at once if
    /// another process holds the directory.
    pub fn open(
        path: &Path,
        durability: Durability,
        flush_interval: Duration,
        on_data_loss: OnDataLoss,
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
        // The flusher thread flushes in both modes (sled's own timer would not sync
        // blobs nor fdatasync): on request in `sync`, every `flush_interval` otherwise.
        let config = sled::Config::new().path(path).flush_every_ms(None);
        let had_data = holds_sled_data(path);
        let db = open_sled(&config, path)?;
        if had_data && db.is_empty() {
            // sled starts empty from a log it cannot read at all (truncated, deleted,
            // overwritten at the start): never serve that as a new, empty store.
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: "its database files are there, but sled recovered no data from them".into(),
            });
        }
        migrate::check_and_upgrade(&db, path)?;
        let read_u64 = |key| -> Result<u64, StoreError> {
            Ok(db.get(key)?.and_then(|v| keys::decode_u64(&v)).unwrap_or(0))
        };
        let id_floor = read_u64(keys::ID_FLOOR)?;
        let lost = AtomicU64::new(read_u64(keys::LOST)?);
        let stored = db
            .get(keys::WATERMARK)?
            .and_then(|v| Mark::decode(&v))
            .unwrap_or_default();
        // The log is synced here, before the watermark file may vouch for what it holds.
        let db = Handle::new(path, config, db)?;
        let (start, data_loss) = check_watermark(path, stored, on_data_loss)?;
        if start != stored {
            db.write(|db| db.insert(keys::WATERMARK, &start.encode()).map(drop))?;
            db.flush()?;
        }
        let file = WatermarkFile::create(path, start).map_err(|e| unusable(e.to_string()))?;
        // sled's generator only grows: every id it gave before is below the one it gives now.
        let highest_id = AtomicU64::new(id_floor + db.generate_id()?);

        let (flushed, _) = watch::channel(Flushed::default());
        let flusher = Arc::new(Flusher {
            written: AtomicU64::new(0),
            batches: Mutex::new(Vec::new()),
            drain: Mutex::new(()),
            pending: Mutex::new(false),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            flushed,
            period: (durability == Durability::Interval)
                .then(|| flush_interval.max(Duration::from_millis(1))),
            flushes: AtomicU64::new(start.flushes),
            last_id: AtomicU64::new(start.last_id),
            durable: Mutex::new(Durable {
                mark: start,
                file,
                file_written_at: Instant::now(),
            }),
        });
        let spawn_failed = StoreError::Thread;
        let thread = {
            let db = db.clone();
            let flusher = flusher.clone();
            std::thread::Builder::new()
                .name("herald-flusher".into())
                .spawn(move || {
                    yield_to_requests();
                    flusher.run(&db)
                })
                .map_err(spawn_failed)?
        };
        let lose = flusher.clone();
        let healer = db
            .spawn_healer(move |failure| lose.lose_unflushed(failure))
            .map_err(spawn_failed)?;
        Ok(Store {
            db,
            path: path.to_path_buf(),
            durability,
            flusher,
            thread: Mutex::new(Some(thread)),
            healer: Mutex::new(Some(healer)),
            id_floor,
            highest_id,
            lost,
            data_loss,
            space: space::Space::default(),
            snapshots: Arc::default(),
        })
    }

    /// The lost watermark: no message with a higher id was deleted yet (see
    /// [`keys::LOST`]).
    pub(crate) fn lost_upto(&self) -> u64 {
        self.lost.load(Ordering::SeqCst)
    }

    /// What the log had lost when this store was opened anyway ([`OnDataLoss::Accept`]).
    pub fn data_loss(&self) -> Option<&str> {
        self.data_loss.as_deref()
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next id of the global sequence; it only grows, also across restarts.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        let id = self.id_floor + self.db.generate_id()? + 1;
        self.highest_id.fetch_max(id, Ordering::SeqCst);
        Ok(id)
    }

    /// An id that no message id assigned so far (before restarts too) is above.
    pub fn highest_id(&self) -> u64 {
        self.highest_id.load(Ordering::SeqCst)
    }

    /// Stores a message record. In `sync` mode it waits in memory and the flusher writes
    /// it with the others of its flush; in `interval` mode (no flusher) it is written at
    /// once as a batch of one. Refused at once while writes are failing (a full disk).
    pub(crate) fn append(&self, id: u64, record: &Record) -> Result<Ticket, StoreError> {
        self.flusher.last_id.fetch_max(id, Ordering::SeqCst);
        if self.durability == Durability::Interval {
            let batch = MessageBatch::new(id, record);
            return self.db.write(|db| {
                db.insert(keys::message(id), batch.into_bytes())?;
                Ok(self.written())
            });
        }
        if let Some(failure) = self.db.failing() {
            return Err(failure.to_error());
        }
        let mut batches = self.flusher.batches.lock();
        match batches.last_mut() {
            Some(batch) if batch.size() < MAX_BATCH_BYTES => batch.push(id, record),
            _ => batches.push(MessageBatch::new(id, record)),
        }
        Ok(self.written())
    }

    /// Applies a batch atomically.
    pub fn apply(&self, batch: WriteBatch) -> Result<Ticket, StoreError> {
        let (keys, batch) = batch.into_sled();
        self.preserving(&keys, || self.apply_sled(batch))
    }

    /// Applies a batch atomically, ignoring the open snapshots.
    fn apply_sled(&self, batch: sled::Batch) -> Result<Ticket, StoreError> {
        self.db.write(|db| {
            db.apply_batch(batch)?;
            Ok(self.written())
        })
    }

    /// Deletes everything but the format version, and sets the lost watermark
    /// ([`keys::LOST`]) to `lost_upto` in the same write.
    pub fn clear(&self, lost_upto: u64) -> Result<Ticket, StoreError> {
        self.void_snapshots("everything stored was flushed meanwhile");
        let _drain = self.flusher.drain.lock();
        self.flusher.batches.lock().clear();
        let mark = self.flusher.mark();
        self.db.write(|db| {
            db.clear()?;
            migrate::stamp(db)?;
            // Kept: the watermark file may vouch for it already.
            db.insert(keys::WATERMARK, &mark.encode())?;
            db.insert(keys::LOST, &keys::encode_u64(lost_upto))?;
            self.lost.fetch_max(lost_upto, Ordering::SeqCst);
            Ok(self.written())
        })
    }

    fn written(&self) -> Ticket {
        Ticket(self.flusher.written.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Waits until the write with `ticket` is durable as configured: on disk for
    /// `sync`, at once for `interval` (the flusher flushes on its timer).
    pub(crate) async fn commit(&self, ticket: Ticket) -> Result<(), StoreError> {
        if self.durability == Durability::Interval {
            return Ok(());
        }
        let settled = |f: &Flushed| f.upto >= ticket.0 || f.failed_upto >= ticket.0;
        let mut rx = self.flusher.flushed.subscribe();
        if !settled(&rx.borrow()) {
            // Requests that are ready to run append first and join this flush; the
            // flusher, on the same core, would otherwise start a flush for a few writes.
            tokio::task::yield_now().await;
            self.flusher.request();
        }
        let state = rx.wait_for(settled).await.map_err(|_| StoreError::Closed)?;
        if let Some(failure) = state.lost(ticket.0) {
            Err(failure.to_error())
        } else if state.upto >= ticket.0 {
            Ok(())
        } else {
            Err(match &state.error {
                Some(failure) => failure.to_error(),
                None => StoreError::Failing {
                    cause: "a flush failed".into(),
                },
            })
        }
    }

    /// Asks for a flush soon without waiting for it, for writes nobody waits on (receive
    /// cursors) that must still reach the disk in bounded time.
    pub(crate) fn flush_soon(&self) {
        if self.durability == Durability::Sync {
            self.flusher.request();
        }
    }

    /// Writes the appended message records to sled without flushing, so that a scan
    /// sees every message sent so far.
    pub(crate) fn write_pending(&self) -> Result<(), StoreError> {
        self.flusher.write_pending(&self.db).2
    }

    /// Writes and flushes everything now, blocking, and records it in the watermark
    /// file at once.
    pub(crate) fn flush_blocking(&self) -> Result<(), StoreError> {
        let (_, mark, written) = self.flusher.write_pending(&self.db);
        written?;
        self.db.flush()?;
        self.flusher.made_durable(mark);
        self.flusher.update_file(true);
        Ok(())
    }

    /// All entries whose key starts with `prefix`, in key order.
    fn scan(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + use<> {
        iterate(&self.path, self.db.db().map(|db| db.scan_prefix(prefix)))
    }

    /// Entries in `[from, to)`, in key order.
    fn range(
        &self,
        from: &[u8],
        to: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + use<> {
        iterate(
            &self.path,
            self.db.db().map(|db| db.range(from.to_vec()..to.to_vec())),
        )
    }
}

/// The entries of `iter`, or its error as the only item.
fn iterate(
    path: &Path,
    iter: Result<sled::Iter, StoreError>,
) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + use<> {
    let path = path.to_path_buf();
    let (iter, error) = match iter {
        Ok(iter) => (Some(iter), None),
        Err(e) => (None, Some(Err(e))),
    };
    error.into_iter().chain(
        iter.into_iter()
            .flatten()
            .map(move |r| r.map_err(|e| read_error(&path, e))),
    )
}

impl Drop for Store {
    fn drop(&mut self) {
        self.db.stop();
        if let Some(thread) = self.healer.lock().take() {
            let _ = thread.join();
        }
        self.flusher.stop.store(true, Ordering::SeqCst);
        self.flusher.request();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
        if let Err(e) = self.flush_blocking() {
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

    /// Marks every write not yet on disk as lost: its database is being closed (the
    /// caller holds off every other store operation meanwhile).
    fn lose_unflushed(&self, failure: &Failure) {
        let written = self.written.load(Ordering::SeqCst);
        self.flushed.send_modify(|f| {
            if written > f.upto {
                f.lost.push((f.upto, written, failure.clone()));
                f.failed_upto = f.failed_upto.max(written);
                f.error = Some(failure.clone());
            }
        });
    }

    /// Under load (writes arrived during the previous flush), lets the writes in
    /// progress join the coming flush: sleeps in steps of [`GATHER_STEP`] while writes
    /// keep arriving, for at most [`GATHER_MAX`]. A flush costs as much CPU as several
    /// requests (sled wakes its whole I/O thread pool for each), so fuller flushes are
    /// what carries throughput; at light load nothing waits.
    fn gather(&self) {
        let start = Instant::now();
        loop {
            let before = self.written.load(Ordering::SeqCst);
            std::thread::sleep(GATHER_STEP);
            if self.written.load(Ordering::SeqCst) == before || start.elapsed() >= GATHER_MAX {
                return;
            }
        }
    }

    /// The mark the next flush would vouch for so far.
    fn mark(&self) -> Mark {
        Mark {
            flushes: self.flushes.load(Ordering::SeqCst),
            last_id: self.last_id.load(Ordering::SeqCst),
        }
    }

    /// Writes the appended batches to sled, and a new mark after them. Returns the
    /// ticket every write up to which is now in sled (if the result is `Ok`), and the
    /// mark that a flush after this makes durable.
    fn write_pending(&self, db: &Handle) -> (u64, Mark, Result<(), StoreError>) {
        let _drain = self.drain.lock();
        let (target, batches) = {
            let mut batches = self.batches.lock();
            (
                self.written.load(Ordering::SeqCst),
                std::mem::take(&mut *batches),
            )
        };
        let mark = Mark {
            flushes: self.flushes.fetch_add(1, Ordering::SeqCst) + 1,
            last_id: self.last_id.load(Ordering::SeqCst),
        };
        let result = batches
            .into_iter()
            .try_for_each(|batch| {
                let key = keys::message(batch.first_id());
                db.write(|db| db.insert(key, batch.into_bytes()).map(drop))
            })
            .and_then(|()| db.write(|db| db.insert(keys::WATERMARK, &mark.encode()).map(drop)));
        (target, mark, result)
    }

    /// Records that `mark` is on disk.
    fn made_durable(&self, mark: Mark) {
        let mut durable = self.durable.lock();
        durable.mark = durable.mark.max(mark);
    }

    /// Copies the newest durable mark into the watermark file if it lags and that is
    /// `due` or the file's last write is [`watermark::FILE_PERIOD`] old.
    fn update_file(&self, due: bool) {
        let mut durable = self.durable.lock();
        if durable.mark > durable.file.written()
            && (due || durable.file_written_at.elapsed() >= watermark::FILE_PERIOD)
        {
            let mark = durable.mark;
            if let Err(error) = durable.file.write(mark) {
                tracing::error!(%error, "writing the watermark file failed");
            }
            durable.file_written_at = Instant::now();
        }
    }

    /// When the watermark file must be written next, if it lags behind the disk.
    fn file_due(&self) -> Option<Instant> {
        let durable = self.durable.lock();
        (durable.mark > durable.file.written())
            .then(|| durable.file_written_at + watermark::FILE_PERIOD)
    }

    /// The flusher thread: one flush at a time, each covering every write before it; in
    /// `sync` mode when a writer asks, in `interval` mode every period. Between flushes
    /// it brings the watermark file up to date.
    fn run(&self, db: &Handle) {
        let mut tick = self.period.map(|period| Instant::now() + period);
        loop {
            let (requested, busy) = {
                let mut pending = self.pending.lock();
                let busy = *pending;
                while !*pending && !self.stop.load(Ordering::SeqCst) {
                    let deadline = tick.into_iter().chain(self.file_due()).min();
                    match deadline {
                        Some(deadline) => {
                            if self.wake.wait_until(&mut pending, deadline).timed_out() {
                                break;
                            }
                        }
                        None => self.wake.wait(&mut pending),
                    }
                }
                let requested = std::mem::take(&mut *pending);
                (requested, busy)
            };
            let stopping = self.stop.load(Ordering::SeqCst);
            let ticked = tick.is_some_and(|t| Instant::now() >= t);
            if requested || ticked || stopping {
                if let (Some(period), true) = (self.period, ticked) {
                    tick = Some(Instant::now() + period);
                }
                if busy && !stopping {
                    self.gather();
                }
                self.flush(db);
            }
            self.update_file(false);
            if stopping {
                return;
            }
        }
    }

    /// One flush of everything written so far, and its outcome for the waiting writers.
    fn flush(&self, db: &Handle) {
        let started = Instant::now();
        let (target, mark, written) = self.write_pending(db);
        let result = written.and_then(|()| db.flush());
        self.flushed.send_modify(|f| match &result {
            Ok(_) => {
                // Flushes that had nothing to make durable (interval ticks) are not counted.
                let batch = target.saturating_sub(f.upto);
                if batch > 0 {
                    let metrics = crate::metrics::metrics();
                    metrics
                        .flush_duration
                        .observe(started.elapsed().as_secs_f64());
                    metrics.flush_batch_size.observe(batch as f64);
                }
                f.upto = f.upto.max(target);
                f.error = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "flush failed");
                f.failed_upto = f.failed_upto.max(target);
                f.error = Some(Failure::of(e));
            }
        });
        if result.is_ok() {
            self.made_durable(mark);
        }
    }
}

/// Compares the mark in sled's log with the watermark file's: an older one in the log
/// means that sled lost acknowledged writes. Returns the mark to go on from, and what
/// was lost when that is accepted.
fn check_watermark(
    path: &Path,
    stored: Mark,
    on_data_loss: OnDataLoss,
) -> Result<(Mark, Option<String>), StoreError> {
    let file = WatermarkFile::read(path).map_err(|e| StoreError::Unusable {
        path: path.to_path_buf(),
        cause: format!("reading {}: {e}", watermark::FILE_NAME),
    })?;
    let Some(file) = file.filter(|file| file.flushes > stored.flushes) else {
        return Ok((stored.max(file.unwrap_or_default()), None));
    };
    let batches = format!(
        "its log ends with write batch {}, but batches up to {} were acknowledged",
        stored.flushes, file.flushes
    );
    let detail = if file.last_id > stored.last_id {
        format!(
            "{batches}: messages with ids {} to {} (some or all) and the memberships, receive cursors and deletions written with them are missing",
            stored.last_id + 1,
            file.last_id
        )
    } else {
        format!(
            "{batches}: memberships, receive cursors or deletions written in batches {} to {} are missing",
            stored.flushes + 1,
            file.flushes
        )
    };
    match on_data_loss {
        OnDataLoss::Refuse => Err(StoreError::DataLoss {
            path: path.to_path_buf(),
            detail,
        }),
        OnDataLoss::Accept => {
            tracing::error!(
                data_dir = %path.display(),
                lost = %detail,
                "the data directory lost acknowledged writes; serving what is left (--accept-data-loss)"
            );
            let start = Mark {
                flushes: file.flushes,
                last_id: file.last_id.max(stored.last_id),
            };
            Ok((start, Some(detail)))
        }
    }
}

/// Puts the calling thread (the flusher) under `SCHED_BATCH` on Linux: woken by a
/// writer, it no longer preempts the thread that serves requests but runs when that
/// thread waits or its time slice ends. On a busy core the requests already read then
/// append before the flush starts and share it: about twice as many writes per flush,
/// and a third of the context switches, under 64 concurrent publishers on one core.
fn yield_to_requests() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: changes only the calling thread's policy; `param` is valid for the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            let error = io::Error::last_os_error();
            tracing::debug!(%error, "the flusher keeps the default scheduling policy");
        }
    }
}

/// Opens sled, waiting up to [`LOCK_WAIT`] for the directory's lock: a database closed a
/// moment ago in this process (a reopen, a migration) or an iterator that still holds
/// it releases the lock from one of sled's background threads, shortly after.
fn open_sled(config: &sled::Config, path: &Path) -> Result<sled::Db, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open().map_err(|e| open_error(path, e)) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(LOCK_RETRY);
            }
            result => return result,
        }
    }
}

fn open_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        // sled reports a held lock as `ErrorKind::Other` with this text.
        sled::Error::Io(io)
            if io.kind() == io::ErrorKind::WouldBlock
                || io.to_string().contains("could not acquire lock") =>
        {
            StoreError::Locked {
                path: path.to_path_buf(),
            }
        }
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: corruption(at),
        },
        sled::Error::Unsupported(_) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        sled::Error::Io(io) => StoreError::Unusable {
            path: path.to_path_buf(),
            cause: io.to_string(),
        },
        e => StoreError::Sled(e),
    }
}

/// An error of a read: damaged or missing data names the data directory.
fn read_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: corruption(at),
        },
        // sled's only files besides its log are blobs (large values).
        sled::Error::Io(io) if io.kind() == io::ErrorKind::NotFound => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("a file of the database is missing: {io}"),
        },
        e => StoreError::from(e),
    }
}

fn corruption(at: Option<sled::DiskPtr>) -> String {
    match at {
        Some(at) => format!("sled read corrupted data at {at:?}"),
        None => "sled found corrupted data".into(),
    }
}

/// Whether sled has written to `path` before: its log, its settings or a snapshot.
fn holds_sled_data(path: &Path) -> bool {
    let db_len = std::fs::metadata(path.join("db")).map_or(0, |m| m.len());
    let snapshot = std::fs::read_dir(path).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with("snap."))
    });
    db_len > 0 || snapshot || path.join("conf").exists()
}

#[cfg(test)]
impl Store {
    /// A `sync` store on `path` that refuses a damaged log, as the unit tests use it.
    pub(crate) fn open_for_test(path: &Path) -> Result<Store, StoreError> {
        Store::open(
            path,
            Durability::Sync,
            Duration::from_millis(500),
            OnDataLoss::Refuse,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commit_waits_for_flush_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open_for_test(dir.path()).unwrap();
            let mut batch = WriteBatch::default();
            batch.put_cursor("a", 5);
            let ticket = store.apply(batch).unwrap();
            store.commit(ticket).await.unwrap();
        }
        let store = Store::open_for_test(dir.path()).unwrap();
        let stored: Vec<Stored> = store.recover().map(Result::unwrap).collect();
        assert_eq!(
            stored,
            [Stored::Cursor {
                channel: "a".into(),
                taken_upto: 5
            }]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_flusher_runs_under_sched_batch() {
        let policy = std::thread::spawn(|| {
            yield_to_requests();
            // SAFETY: reads the calling thread's policy.
            unsafe { libc::sched_getscheduler(0) }
        })
        .join()
        .unwrap();
        assert_eq!(policy, libc::SCHED_BATCH);
        // SAFETY: as above; the test thread itself is unchanged.
        assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
    }

    #[test]
    fn second_open_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open_for_test(dir.path()).unwrap();
        let err = Store::open_for_test(dir.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }

    #[test]
    fn a_full_disk_is_full_also_in_the_copy_sled_hands_out_later() {
        let enospc = sled::Error::Io(io::Error::from_raw_os_error(28));
        // sled keeps the first write error and returns clones of it, which keep the
        // kind but not the OS error number.
        let copy = enospc.clone();
        assert!(matches!(copy, sled::Error::Io(ref e) if e.raw_os_error().is_none()));
        assert!(matches!(StoreError::from(enospc), StoreError::Full));
        assert!(matches!(StoreError::from(copy), StoreError::Full));
        let quota = sled::Error::Io(io::Error::from_raw_os_error(122));
        assert!(matches!(StoreError::from(quota), StoreError::Full));
        let other = sled::Error::Io(io::Error::from_raw_os_error(5));
        assert!(matches!(StoreError::from(other), StoreError::Sled(_)));
    }

    #[test]
    fn ids_grow_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = Store::open_for_test(dir.path()).unwrap();
            (0..10).map(|_| store.next_id().unwrap()).max().unwrap()
        };
        let store = Store::open_for_test(dir.path()).unwrap();
        assert!(store.next_id().unwrap() > first);
    }
}
