//! The on-disk format version: stamped on first use, checked at every open, and
//! upgraded one step at a time. `migrations/` documents each version's key layout.

use std::path::Path;

use super::StoreError;
use super::keys::{self, FORMAT_VERSION, VERSION};
use super::record::{MessageBatch, Record};

/// A step that upgrades a database from version `to - 1` to `to`.
pub(crate) struct Migration {
    pub to: u32,
    pub describe: &'static str,
    pub run: fn(&sled::Db) -> Result<(), sled::Error>,
}

/// Every upgrade step, in order; version N's step comes with `migrations/000N-*.md`.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    to: 2,
    describe: "store message records in batches",
    run: batch_messages,
}];

/// Version 2: each `M` key holds a batch of records instead of one record, so version
/// 1's records become batches of one (same key, the record's id). A batch starts with a
/// send time, whose first byte is 0 (until the year 4200), and a record with its kind
/// (`c` or `g`), so a step interrupted half-way skips what it converted already.
fn batch_messages(db: &sled::Db) -> Result<(), sled::Error> {
    const CHUNK: usize = 10_000;
    let mut from = keys::message(0).to_vec();
    loop {
        let mut batch = sled::Batch::default();
        let mut converted = 0;
        for item in db.range(from.clone()..vec![keys::MESSAGE + 1]) {
            let (key, value) = item?;
            if value.first() == Some(&0) {
                continue;
            }
            let (Some(id), Some(record)) = (keys::message_id(&key), Record::decode(&value)) else {
                return Err(sled::Error::Unsupported(format!(
                    "unreadable version 1 message record {key:?}"
                )));
            };
            batch.insert(key.clone(), MessageBatch::new(id, &record).into_bytes());
            converted += 1;
            if converted == CHUNK {
                from = keys::message(id + 1).to_vec();
                break;
            }
        }
        db.apply_batch(batch)?;
        if converted < CHUNK {
            return Ok(());
        }
    }
}

/// The oldest version `steps` can upgrade to `current`.
fn oldest_supported(steps: &[Migration], current: u32) -> u32 {
    steps.first().map(|m| m.to - 1).unwrap_or(current)
}

/// Writes the current format version.
pub(super) fn stamp(db: &sled::Db) -> sled::Result<()> {
    db.insert(VERSION, &FORMAT_VERSION.to_be_bytes())?;
    Ok(())
}

/// Stamps an empty database, refuses a newer or too old one, upgrades an older one.
pub(super) fn check_and_upgrade(db: &sled::Db, path: &Path) -> Result<(), StoreError> {
    upgrade_with(db, path, MIGRATIONS, FORMAT_VERSION)
}

/// [`check_and_upgrade`] with the steps and the current version as parameters, so that
/// the upgrade chain itself can be tested.
fn upgrade_with(
    db: &sled::Db,
    path: &Path,
    steps: &[Migration],
    current: u32,
) -> Result<(), StoreError> {
    let found = match db.get(VERSION).map_err(|e| super::read_error(path, e))? {
        None if db.is_empty() => {
            db.insert(VERSION, &current.to_be_bytes())?;
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
    if found > current {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found,
            supported: current,
        });
    }
    let oldest = oldest_supported(steps, current);
    if found < oldest {
        return Err(StoreError::OlderFormat {
            path: path.to_path_buf(),
            found,
            oldest,
        });
    }
    for step in steps.iter().filter(|m| m.to > found) {
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
    use crate::store::Store;

    #[test]
    fn newer_and_older_formats_are_refused_with_advice() {
        for (version, expected) in [(FORMAT_VERSION + 1, "newer"), (0, "older")] {
            // A directory each: sled's threads may hold the previous one's lock a moment
            // after it is closed.
            let dir = tempfile::tempdir().unwrap();
            {
                let db = sled::open(dir.path()).unwrap();
                db.insert(VERSION, &version.to_be_bytes()).unwrap();
                db.flush().unwrap();
            }
            let err = Store::open_for_test(dir.path()).err().expect("must refuse");
            let text = err.to_string();
            assert!(text.contains(expected), "{text}");
            assert!(text.contains(&dir.path().display().to_string()), "{text}");
        }
    }

    #[test]
    fn older_formats_are_upgraded_one_step_at_a_time_in_order() {
        fn to_2(db: &sled::Db) -> Result<(), sled::Error> {
            // Version 2 of this test renames key `a` to `b`.
            if let Some(v) = db.remove(b"a")? {
                db.insert(b"b", v)?;
            }
            Ok(())
        }
        fn to_3(db: &sled::Db) -> Result<(), sled::Error> {
            // Version 3 needs version 2's `b`.
            let b = db.get(b"b")?.expect("step 2 ran first");
            db.insert(b"c", b)?;
            Ok(())
        }
        let steps = [
            Migration {
                to: 2,
                describe: "rename a to b",
                run: to_2,
            },
            Migration {
                to: 3,
                describe: "copy b to c",
                run: to_3,
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        db.insert(VERSION, &1u32.to_be_bytes()).unwrap();
        db.insert(b"a", b"data").unwrap();
        upgrade_with(&db, dir.path(), &steps, 3).unwrap();
        assert_eq!(
            db.get(VERSION).unwrap().unwrap().as_ref(),
            3u32.to_be_bytes()
        );
        assert_eq!(db.get(b"a").unwrap(), None);
        assert_eq!(db.get(b"c").unwrap().unwrap().as_ref(), b"data");
        // A version older than the first step's source is refused.
        db.insert(VERSION, &0u32.to_be_bytes()).unwrap();
        let err = upgrade_with(&db, dir.path(), &steps, 3).unwrap_err();
        assert!(
            matches!(err, StoreError::OlderFormat { oldest: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn version_1_message_records_become_batches_of_one() {
        let record = |sent_at_ms| Record {
            sent_at_ms,
            target: crate::store::record::Target::Channel("a".into()),
            skipped: Vec::new(),
            body: bytes::Bytes::from_static(b"\x81\xa4type\xa1x"),
        };
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(VERSION, &1u32.to_be_bytes()).unwrap();
            for (id, sent_at_ms) in [(5, 100), (9, 200)] {
                let mut bytes = Vec::new();
                record(sent_at_ms).encode_into(&mut bytes);
                db.insert(keys::message(id), bytes).unwrap();
            }
            db.flush().unwrap();
        }
        let store = Store::open_for_test(dir.path()).unwrap();
        let stored: Vec<_> = store
            .scan(&[keys::MESSAGE])
            .map(|item| {
                let (key, value) = item.unwrap();
                let records: Vec<_> = MessageBatch::decode(&value).map(Option::unwrap).collect();
                (keys::message_id(&key).unwrap(), records)
            })
            .collect();
        assert_eq!(
            stored,
            [(5, vec![(5, record(100))]), (9, vec![(9, record(200))]),]
        );
        assert_eq!(
            store
                .db
                .read(|db| db.get(VERSION))
                .unwrap()
                .unwrap()
                .as_ref(),
            FORMAT_VERSION.to_be_bytes()
        );
    }

    #[test]
    fn a_new_directory_is_stamped() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open_for_test(dir.path()).unwrap());
        let db = sled::open(dir.path()).unwrap();
        assert_eq!(
            db.get(VERSION).unwrap().unwrap().as_ref(),
            FORMAT_VERSION.to_be_bytes()
        );
    }
}
