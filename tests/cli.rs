//! The `herald` command line: configuration layering, validation, and refusing a data
//! directory that another server holds.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.env("RUST_LOG", "warn");
    command
}

#[test]
fn config_prints_defaults_overridden_by_file_then_environment() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("herald.toml");
    std::fs::write(
        &file,
        "[layer]\ncapacity = 7\nexpiry_secs = 9\n[layer.channel_capacity]\n\"websocket.send*\" = 20\n",
    )
    .unwrap();
    let output = herald()
        .args(["config", "--config"])
        .arg(&file)
        .env("HERALD_LAYER__EXPIRY_SECS", "11")
        .env("HERALD_STORAGE__DURABILITY", "interval")
        // Variables with the prefix that name no setting (scripts' own) are ignored.
        .env("HERALD_BIN", "/usr/local/bin/herald")
        .env("HERALD_ARGS", "--default-message-type notify")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let printed: toml::Table = text.parse().unwrap();
    assert_eq!(printed["layer"]["capacity"].as_integer(), Some(7), "file");
    assert_eq!(
        printed["layer"]["expiry_secs"].as_integer(),
        Some(11),
        "env over file"
    );
    assert_eq!(printed["storage"]["durability"].as_str(), Some("interval"));
    assert_eq!(
        printed["server"]["listen"].as_str(),
        Some("127.0.0.1:8080"),
        "default"
    );
    assert_eq!(
        printed["layer"]["group_expiry_secs"].as_integer(),
        Some(86400)
    );
    assert_eq!(
        printed["layer"]["channel_capacity"]["websocket.send*"].as_integer(),
        Some(20)
    );
}

#[test]
fn bad_configuration_stops_the_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = herald()
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("HERALD_LAYER__CAPACITY", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("layer.capacity"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let output = herald()
        .args(["serve", "--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("herald.toml"));
}

#[test]
fn a_second_server_on_the_same_data_dir_exits_at_once_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = herald()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(first.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("herald listening on http://127.0.0.1:"),
        "{line}"
    );

    let started = Instant::now();
    let second = herald()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
    assert!(stderr.contains(&data.display().to_string()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first server is untouched"
    );
    first.kill().unwrap();
    first.wait().unwrap();
}

#[test]
fn an_unwritable_data_dir_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let output = herald()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(file.join("data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `herald bench` runs `herald-bench` from beside `herald`, with every argument; without
/// it, it says how to build it and exits 2.
#[test]
fn bench_runs_herald_bench_from_beside_herald_or_says_how_to_build_it() {
    let output = herald().args(["bench", "--help"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let beside = std::path::Path::new(env!("CARGO_BIN_EXE_herald")).with_file_name("herald-bench");
    if beside.is_file() {
        assert!(output.status.success(), "{output:?}");
        assert!(stdout.contains("Usage: herald-bench"), "{stdout}");
        assert!(stdout.contains("--herald-bin"), "{stdout}");
    } else {
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        assert!(
            stderr.contains("cargo build --release -p herald-bench"),
            "{stderr}"
        );
    }
}
