//! A LazyFS mount for power-loss tests (`../shared/tools/lazyfs/`): written data
//! reaches its backing directory only when fsynced, and [`LazyFs::power_cut`] drops
//! the rest, as a machine that loses power does.
//!
//! Without FUSE (or the LazyFS tools) a test prints why and skips, unless
//! `HERALD_REQUIRE_LAZYFS` is set, as `.ci/run` does: then it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// The driver script, beside the project.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tools/lazyfs/lazyfs.sh")
}

/// One mounted LazyFS; unmounted on drop.
pub struct LazyFs {
    dir: TempDir,
}

impl LazyFs {
    /// Mounts a new LazyFS, or returns `None` after printing why it cannot (and
    /// panics instead when `HERALD_REQUIRE_LAZYFS` is set).
    pub fn mount(test: &str) -> Option<LazyFs> {
        let skip = |why: String| {
            if std::env::var_os("HERALD_REQUIRE_LAZYFS").is_some() {
                panic!("{test}: LazyFS is required (HERALD_REQUIRE_LAZYFS) but {why}");
            }
            eprintln!("{test}: skipped, {why} (set HERALD_REQUIRE_LAZYFS to make this fail)");
            None
        };
        if !Path::new("/dev/fuse").exists() {
            return skip("/dev/fuse is missing".into());
        }
        if !script().exists() {
            return skip(format!("{} is missing", script().display()));
        }
        // LazyFS takes any argument containing "-o" for a FUSE option, so a config
        // path such as `/tmp/herald-lazyfs-oX1/lazyfs.toml` would be ignored and
        // LazyFS would read `config/default.toml` from the working directory (ours).
        // The prefix ends in `_` and tempfile's suffix is alphanumeric: no `-o`.
        let dir = tempfile::Builder::new()
            .prefix("herald_lazyfs_")
            .tempdir()
            .expect("creating a temp dir");
        if dir.path().to_string_lossy().contains("-o") {
            return skip(format!(
                "{} contains \"-o\", which LazyFS misreads",
                dir.path().display()
            ));
        }
        let fs = LazyFs { dir };
        match fs.run("mount") {
            Ok(()) => Some(fs),
            Err(e) => {
                let out =
                    std::fs::read_to_string(fs.dir.path().join("lazyfs.out")).unwrap_or_default();
                skip(format!(
                    "mounting LazyFS failed: {e}; lazyfs.out: {}",
                    out.trim()
                ))
            }
        }
    }

    /// A data directory on the mount (not created).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("mnt/data")
    }

    /// What has really reached the disk, beside the mount.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Drops every byte that was never fsynced: a power loss (the server must be dead).
    pub fn power_cut(&self) {
        self.run("clear").expect("LazyFS clear");
    }

    /// Writes everything through, as if long since synced.
    pub fn checkpoint(&self) {
        self.run("checkpoint").expect("LazyFS checkpoint");
    }

    /// Sends a fault command to LazyFS's FIFO (e.g. `lazyfs::torn-op::...`).
    pub fn inject(&self, fault: &str) {
        std::fs::write(self.dir.path().join("faults.fifo"), format!("{fault}\n"))
            .expect("writing to LazyFS's fault FIFO");
    }

    /// Unmounts (after LazyFS crashed itself on a fault, too) and mounts again on the
    /// same backing directory: a reboot.
    pub fn remount(&self) {
        self.run("umount").expect("LazyFS umount");
        self.run("mount").expect("LazyFS mount");
    }

    /// LazyFS's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lazyfs.log")).unwrap_or_default()
    }

    fn run(&self, command: &str) -> Result<(), String> {
        let output = Command::new("bash")
            .arg(script())
            .arg(self.dir.path())
            .arg(command)
            .output()
            .map_err(|e| format!("running {}: {e}", script().display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "lazyfs.sh {command}: {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let _ = self.run("umount");
    }
}
