//! The `export`, `import` and `backup` commands: dumps of a data directory, offline or
//! from a running server.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use herald::config::Durability;
use herald::layer::clock::{Clock, SystemClock};
use herald::store::{OnDataLoss, Store, sync_parent};

use crate::failure::Failure;

fn open(data_dir: &Path) -> Result<Store, Failure> {
    let store = Store::open(
        data_dir,
        Durability::Sync,
        Duration::from_millis(500),
        OnDataLoss::Refuse,
    )?;
    Ok(store)
}

/// Writes where `out` says (a file, replaced only once complete and durable), or to
/// stdout.
fn write_to(
    out: Option<&Path>,
    write: impl FnOnce(&mut dyn Write) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let Some(path) = out else {
        return write(&mut std::io::stdout().lock());
    };
    let partial = path.with_extension("partial");
    let failed = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Failure::Write { path, source }
    };
    let file = File::create(&partial).map_err(failed(&partial))?;
    let mut writer = BufWriter::new(file);
    let written = write(&mut writer).and_then(|()| {
        writer
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|file| file.sync_all())
            .map_err(failed(&partial))
    });
    if let Err(e) = written {
        // What was written is incomplete: never leave it looking like a dump.
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, path)
        .and_then(|()| sync_parent(path))
        .map_err(failed(path))
}

/// `herald export`: refuses a data dir that a live server holds (its lock).
pub fn export(data_dir: &Path, out: Option<&Path>) -> Result<(), Failure> {
    if !data_dir.is_dir() {
        return Err(Failure::NoDataDir(data_dir.to_path_buf()));
    }
    let store = open(data_dir)?;
    write_to(out, |w| {
        let stats = store.export(SystemClock.now_ms(), w)?;
        eprintln!(
            "herald: exported {} messages, {} memberships, {} cursors, {} references",
            stats.messages, stats.memberships, stats.cursors, stats.references
        );
        Ok(())
    })
}

/// `herald import`: into a new or empty data dir only.
pub fn import(data_dir: &Path, input: Option<&Path>) -> Result<(), Failure> {
    let store = open(data_dir)?;
    let stats = match input {
        Some(path) => {
            let file = File::open(path).map_err(|source| Failure::Read {
                path: path.to_path_buf(),
                source,
            })?;
            store.import(BufReader::new(file))
        }
        None => store.import(std::io::stdin().lock()),
    }?;
    eprintln!(
        "herald: imported {} messages, {} memberships, {} cursors, {} references into {}",
        stats.messages,
        stats.memberships,
        stats.cursors,
        stats.references,
        data_dir.display()
    );
    Ok(())
}

/// `herald backup`: streams `URL/v1/admin/backup` into `out` as it arrives.
pub fn backup(url: &str, out: &Path, token: Option<&str>) -> Result<(), Failure> {
    let base = url.trim_end_matches('/');
    let endpoint = if base.ends_with("/v1/admin/backup") {
        base.to_string()
    } else {
        format!("{base}/v1/admin/backup")
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Failure::Runtime)?;
    let read_failed = |source| Failure::BackupRead {
        endpoint: endpoint.clone(),
        source,
    };
    let mut response = runtime.block_on(async {
        let mut request = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(Failure::Client)?
            .get(&endpoint);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|source| Failure::Unreachable {
                endpoint: endpoint.clone(),
                source,
            })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.map_err(read_failed)?;
            return Err(Failure::Refused {
                endpoint: endpoint.clone(),
                status,
                body,
            });
        }
        Ok(response)
    })?;
    let mut saved = 0;
    write_to(Some(out), |w| {
        runtime.block_on(async {
            while let Some(chunk) = response.chunk().await.map_err(read_failed)? {
                w.write_all(&chunk).map_err(|source| Failure::Write {
                    path: out.to_path_buf(),
                    source,
                })?;
                saved += chunk.len();
            }
            Ok(())
        })
    })?;
    eprintln!("herald: saved {saved} bytes of backup to {}", out.display());
    Ok(())
}
