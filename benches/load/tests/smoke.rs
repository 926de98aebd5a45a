//! `herald-bench` end to end: a short real run (the bench starts its own servers, the
//! workspace's `herald` binary) whose JSON must show publishes, complete fan-out, and
//! no silent loss under overload.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// Runs `herald-bench ARGS` with the `herald` built beside it, killing it if it takes
/// longer than `limit`.
fn bench(args: &[&str], limit: Duration) -> Output {
    let exe = Path::new(env!("CARGO_BIN_EXE_herald-bench"));
    let herald = exe.with_file_name("herald");
    assert!(
        herald.is_file(),
        "{} is missing: build the workspace (cargo test --workspace, or cargo build -p herald)",
        herald.display()
    );
    let mut command = Command::new(exe);
    command.args(args).env("RUST_LOG", "warn");
    // The environment of the test run must not change the servers' settings.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting herald-bench");
    let start = Instant::now();
    while child.try_wait().expect("polling herald bench").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("herald bench ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collecting the output")
}

fn scenario<'a>(doc: &'a Json, name: &str) -> &'a Json {
    doc["scenarios"]
        .as_array()
        .expect("a scenarios array")
        .iter()
        .find(|s| s["scenario"] == name)
        .unwrap_or_else(|| panic!("no {name} in {doc:#}"))
}

#[test]
fn short_run_reports_publishes_full_fanout_and_no_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let output = bench(
        &[
            "--duration",
            "1",
            "--subscribers",
            "20",
            "--rate",
            "20",
            "--quiet",
            "--json",
            json.to_str().unwrap(),
            "publish-http",
            "fanout-sse",
            "fanout-ws",
            "overload",
            "floor-sse",
        ],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{output:?}\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("| scenario | publishes/s |"), "{stdout}");
    let doc: Json = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert!(doc["meta"]["herald_version"].is_string(), "{doc:#}");
    assert!(doc["meta"]["date"].is_string(), "{doc:#}");

    let publish = scenario(&doc, "publish-http");
    assert!(publish["publishes"].as_u64().unwrap() > 0, "{publish:#}");
    assert!(publish["publishes_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        publish["server_rss_mib"].as_f64().unwrap() > 0.0,
        "{publish:#}"
    );

    for name in ["fanout-sse", "fanout-ws", "floor-sse"] {
        let fanout = scenario(&doc, name);
        assert_eq!(fanout["subscribers_connected"], 20, "{fanout:#}");
        let expected = fanout["expected"].as_u64().unwrap();
        assert!(expected > 0, "{fanout:#}");
        assert_eq!(fanout["deliveries"].as_u64(), Some(expected), "{fanout:#}");
        if name != "floor-sse" {
            assert_eq!(fanout["reported_delivered"].as_u64(), Some(expected));
        }
        let latency = &fanout["latency"];
        for field in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            assert!(
                latency[field].as_f64().is_some(),
                "{name} {field}: {fanout:#}"
            );
        }
        assert!(latency["p50_ms"].as_f64() <= latency["max_ms"].as_f64());
        assert_eq!(latency["count"].as_u64(), Some(expected));
    }

    let floor = scenario(&doc, "floor-sse");
    assert!(
        floor["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("µs per write")),
        "{floor:#}"
    );

    let overload = scenario(&doc, "overload");
    let check = &overload["overload"];
    assert!(check["accepted"].as_u64().unwrap() > 0, "{overload:#}");
    assert_eq!(check["silent_losses"], 0, "{overload:#}");
    assert_eq!(check["duplicates"], 0, "{overload:#}");
    assert_eq!(check["delivered_ratio"], 1.0, "{overload:#}");
    assert!(
        overload["errors"]["429 channel_full"].as_u64().unwrap() > 0,
        "the channel must have been driven past its capacity: {overload:#}"
    );
}

#[test]
fn refuses_a_server_that_is_not_on_loopback() {
    let output = bench(
        &["--url", "http://192.0.2.1:8080", "publish-http"],
        Duration::from_secs(10),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}
