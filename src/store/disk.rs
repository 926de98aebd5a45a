//! What makes sled's writes survive a power loss, not only a crash of the process.
//!
//! sled 0.34 ends a flush with `sync_file_range`, which starts and waits for the
//! writeback of the log's pages but neither flushes the device's volatile write cache nor
//! commits the file's new size; it never syncs its blob files (values over about
//! 128 KiB, in `blobs/`), its `conf` file or the directory. So a flush is made durable
//! here: new blob files are synced before sled's flush (no durable log entry may point
//! to a lost blob), then the log with `fdatasync` through a second handle on the same
//! file (bytes and size). The files and directory entries sled creates at open are
//! synced once, before the store takes any write.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

/// sled's log, and the blob files known to be on stable storage.
pub(super) struct Disk {
    log: File,
    blobs: PathBuf,
    /// Names of blob files synced already; pruned to those still there.
    synced_blobs: Mutex<HashSet<u64>>,
}

impl Disk {
    /// Takes hold of the log of the sled database just opened in `dir`, and syncs what
    /// sled created or rewrote while opening: `conf`, blobs, the log itself, the data
    /// directory and its entry in its parent.
    pub fn open(dir: &Path) -> io::Result<Disk> {
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("db"))?;
        match File::open(dir.join("conf")) {
            Ok(conf) => conf.sync_all()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let disk = Disk {
            log,
            blobs: dir.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
        };
        disk.sync_blobs()?;
        disk.log.sync_all()?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(disk)
    }

    /// Syncs every blob file not synced yet, then the blob directory. sled writes a blob
    /// when the value is inserted, so by the time of a flush its file is complete.
    pub(crate) fn sync_blobs(&self) -> io::Result<()> {
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced_blobs.lock();
        let mut present = HashSet::with_capacity(synced.len());
        let mut new = 0usize;
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            present.insert(name);
            if synced.contains(&name) {
                continue;
            }
            match File::open(entry.path()) {
                Ok(file) => file.sync_data()?,
                // Removed by sled's blob collection meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            new += 1;
        }
        if new > 0 {
            sync_dir(&self.blobs)?;
        }
        *synced = present;
        Ok(())
    }

    /// Makes the log's bytes and size durable, after sled's flush wrote them.
    pub(crate) fn sync_log(&self) -> io::Result<()> {
        self.log.sync_data()
    }
}

/// Syncs a directory: the entries created, renamed or removed in it become durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Syncs `path`'s directory, after a file in it was created or renamed.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_synced_once_and_forgotten_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(blobs.join("7"), b"blob").unwrap();
        let disk = Disk::open(dir.path()).unwrap();
        assert_eq!(*disk.synced_blobs.lock(), HashSet::from([7]));
        std::fs::write(blobs.join("9"), b"blob").unwrap();
        std::fs::remove_file(blobs.join("7")).unwrap();
        disk.sync_blobs().unwrap();
        assert_eq!(*disk.synced_blobs.lock(), HashSet::from([9]));
        disk.sync_log().unwrap();
    }
}
