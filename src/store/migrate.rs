//! The on-disk format version: stamped on first use, checked at every open, and
//! upgraded one step at a time. `migrations/` documents each version's key layout.

use std::path::Path;

use super::StoreError;
use super::keys::{FORMAT_VERSION, VERSION};

/// A step that upgrades a database from version `to - 1` to `to`.
pub struct Migration {
    pub to: u32,
    pub describe: &'static str,
    pub run: fn(&sled::Db) -> Result<(), sled::Error>,
}

/// Every upgrade step, in order. Version 1 is the first format, so there are none yet;
/// version N's step is added here together with `migrations/000N-*.md`.
pub const MIGRATIONS: &[Migration] = &[];

/// The oldest version this build can open (and upgrade).
fn oldest_supported() -> u32 {
    MIGRATIONS
        .first()
        .map(|m| m.to - 1)
        .unwrap_or(FORMAT_VERSION)
}

/// Writes the current format version.
pub(super) fn stamp(db: &sled::Db) -> Result<(), StoreError> {
    db.insert(VERSION, &FORMAT_VERSION.to_be_bytes())?;
    Ok(())
}

/// Stamps an empty database, refuses a newer or too old one, upgrades an older one.
pub(super) fn check_and_upgrade(db: &sled::Db, path: &Path) -> Result<(), StoreError> {
    let found = match db.get(VERSION)? {
        None if db.is_empty() => {
            stamp(db)?;
            db.flush()?;
            return Ok(());
        }
        None => {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: "data without a format version".into(),
            });
        }
        Some(bytes) => {
            u32::from_be_bytes(bytes.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: "unreadable format version".into(),
            })?)
        }
    };
    if found > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        });
    }
    if found < oldest_supported() {
        return Err(StoreError::OlderFormat {
            path: path.to_path_buf(),
            found,
            oldest: oldest_supported(),
        });
    }
    for step in MIGRATIONS.iter().filter(|m| m.to > found) {
        tracing::info!(
            from = step.to - 1,
            to = step.to,
            what = step.describe,
            "upgrading data directory"
        );
        (step.run)(db)?;
        db.insert(VERSION, &step.to.to_be_bytes())?;
        db.flush()?;
        tracing::info!(version = step.to, "data directory upgraded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::store::Store;
    use std::time::Duration;

    #[test]
    fn newer_and_older_formats_are_refused_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        for (version, expected) in [(FORMAT_VERSION + 1, "newer"), (0, "older")] {
            {
                let db = sled::open(dir.path()).unwrap();
                db.insert(VERSION, &version.to_be_bytes()).unwrap();
                db.flush().unwrap();
            }
            let err = Store::open(dir.path(), Durability::Sync, Duration::from_secs(1))
                .err()
                .expect("must refuse");
            let text = err.to_string();
            assert!(text.contains(expected), "{text}");
            assert!(text.contains(&dir.path().display().to_string()), "{text}");
        }
    }

    #[test]
    fn a_new_directory_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), Durability::Sync, Duration::from_secs(1)).unwrap());
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(
            db.get(VERSION).unwrap().unwrap().as_ref(),
            FORMAT_VERSION.to_be_bytes()
        );
    }
}
