//! Power loss, simulated with LazyFS (see `common::lazyfs`): the real server runs on a
//! LazyFS mount, is killed with SIGKILL, and every byte it never fsynced is dropped
//! before it starts again. Whatever it acknowledged must be there after the restart,
//! nothing it never took may appear, and it must start by itself.
//!
//! Seeded random cuts under concurrent load are in `tests/crash.rs`
//! (`..._across_power_cuts`).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::lazyfs::LazyFs;
use common::{Api, Server, T, Workdir, msg};

const CONFIG: &str =
    "[layer]\ncapacity = 100000\nexpiry_secs = 3600\n[storage]\nsweep_interval_ms = 200\n";

/// A LazyFS mount and a work directory whose data directory is on it.
struct Rig {
    fs: LazyFs,
    work: Arc<Workdir>,
}

impl Rig {
    fn new(test: &str) -> Option<Rig> {
        let fs = LazyFs::mount(test)?;
        let work = Workdir::with_data_dir(fs.data_dir());
        Some(Rig { fs, work })
    }

    async fn start(&self, config: &str) -> Server {
        Server::start_in(self.work.clone(), config).await
    }

    /// SIGKILL, then a power loss, then a new server on what is left.
    async fn power_cut(&self, server: &mut Server) -> Server {
        server.kill().await;
        self.fs.power_cut();
        server.restart().await
    }
}

/// The numbers `n` of the messages drained from `channel`, in order.
async fn drained(api: &Api, channel: &str) -> Vec<u64> {
    api.drain(channel)
        .await
        .iter()
        .map(|(_, m)| m["n"].as_u64().expect("a test message"))
        .collect()
}

#[tokio::test]
async fn one_publish_to_an_established_data_dir_survives() {
    let Some(rig) = Rig::new("one_publish_to_an_established_data_dir_survives") else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    let api = Api::new(&server);
    for n in 0..10 {
        api.send("pl.old", &msg(n)).await;
    }
    server.shutdown(T).await;
    // What the first server wrote is long on disk.
    rig.fs.checkpoint();
    let mut server = server.restart().await;
    Api::new(&server).send("pl.one", &msg(100)).await;
    let server = rig.power_cut(&mut server).await;
    let api = Api::new(&server);
    assert_eq!(drained(&api, "pl.one").await, vec![100]);
    assert_eq!(drained(&api, "pl.old").await, (0..10).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_first_publish_into_a_fresh_data_dir_survives() {
    let Some(rig) = Rig::new("the_first_publish_into_a_fresh_data_dir_survives") else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    Api::new(&server).send("pl.first", &msg(1)).await;
    let server = rig.power_cut(&mut server).await;
    assert_eq!(drained(&Api::new(&server), "pl.first").await, vec![1]);
}

#[tokio::test]
async fn sequential_publishes_survive() {
    let Some(rig) = Rig::new("sequential_publishes_survive") else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    let api = Api::new(&server);
    for n in 0..500 {
        api.send("pl.seq", &msg(n)).await;
    }
    let server = rig.power_cut(&mut server).await;
    assert_eq!(
        drained(&Api::new(&server), "pl.seq").await,
        (0..500).collect::<Vec<_>>()
    );
}

/// 500 publishes from 16 concurrent clients; `power` false is the control: SIGKILL only.
async fn concurrent_publishes(test: &str, power: bool) {
    let Some(rig) = Rig::new(test) else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    let api = Api::new(&server);
    let clients: Vec<_> = (0..16u64)
        .map(|client| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut n = client;
                while n < 500 {
                    api.send("pl.conc", &msg(n)).await;
                    n += 16;
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let server = if power {
        rig.power_cut(&mut server).await
    } else {
        server.kill().await;
        server.restart().await
    };
    let got: BTreeSet<u64> = drained(&Api::new(&server), "pl.conc")
        .await
        .into_iter()
        .collect();
    assert_eq!(got, (0..500).collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn concurrent_publishes_survive() {
    concurrent_publishes("concurrent_publishes_survive", true).await;
}

#[tokio::test]
async fn concurrent_publishes_survive_a_kill_without_power_loss() {
    concurrent_publishes(
        "concurrent_publishes_survive_a_kill_without_power_loss",
        false,
    )
    .await;
}

#[tokio::test]
async fn group_operations_survive() {
    let Some(rig) = Rig::new("group_operations_survive") else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    let api = Api::new(&server);
    for member in ["pl.a", "pl.b", "pl.c"] {
        api.group_add("pl.g", member).await;
    }
    api.group_discard("pl.g", "pl.b").await;
    assert_eq!(api.group_send("pl.g", &msg(7)).await, (2, 0));
    let server = rig.power_cut(&mut server).await;
    let api = Api::new(&server);
    let mut members = api.members("pl.g").await;
    members.sort();
    assert_eq!(members, ["pl.a", "pl.c"]);
    assert_eq!(drained(&api, "pl.a").await, vec![7]);
    assert_eq!(drained(&api, "pl.b").await, Vec::<u64>::new());
    assert_eq!(drained(&api, "pl.c").await, vec![7]);
}

/// A receive is marked on disk one to two sweep intervals after it (see the README):
/// once that time has passed, a power cut does not bring the message back.
#[tokio::test]
async fn a_receive_cursor_survives() {
    let Some(rig) = Rig::new("a_receive_cursor_survives") else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    let api = Api::new(&server);
    for n in 0..10 {
        api.send("pl.cur", &msg(n)).await;
    }
    for n in 0..4 {
        let (_, m) = api.receive("pl.cur").await.expect("a message");
        assert_eq!(m["n"], n);
    }
    // Two sweep intervals (200 ms each) and the flush that follows.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let server = rig.power_cut(&mut server).await;
    assert_eq!(
        drained(&Api::new(&server), "pl.cur").await,
        (4..10).collect::<Vec<_>>()
    );
}

/// In `interval` mode a power cut loses at most what was acknowledged in the last
/// interval (plus a flush in progress): what survives is a prefix of the acknowledged
/// sends, and it holds everything acknowledged earlier than that.
#[tokio::test]
async fn interval_mode_loses_only_the_last_interval() {
    const INTERVAL: &str = "[layer]\ncapacity = 100000\nexpiry_secs = 3600\n[storage]\ndurability = \"interval\"\nflush_interval_ms = 200\n";
    let Some(rig) = Rig::new("interval_mode_loses_only_the_last_interval") else {
        return;
    };
    let mut server = rig.start(INTERVAL).await;
    let api = Api::new(&server);
    let mut acked = Vec::new();
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        api.send("pl.int", &msg(n)).await;
        acked.push((n, Instant::now()));
        n += 1;
    }
    server.kill().await;
    let cut = Instant::now();
    rig.fs.power_cut();
    let server = server.restart().await;
    let got = drained(&Api::new(&server), "pl.int").await;
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>(), "a prefix");
    // The interval, plus the time of a flush in progress (as in tests/crash.rs).
    let window = Duration::from_millis(1000);
    let lost: Vec<_> = acked[got.len()..].iter().collect();
    for (n, at) in &lost {
        assert!(
            cut.duration_since(*at) <= window,
            "message {n} acknowledged {:?} before the cut is lost",
            cut.duration_since(*at)
        );
    }
    println!(
        "interval mode: {} acknowledged, {} lost in the last interval",
        acked.len(),
        lost.len()
    );
}

/// LazyFS tears a write of sled's log (a part of it reaches the disk, the rest not)
/// and crashes itself, as a power cut in the middle of a write does. The server,
/// restarted on the remounted disk, starts by itself and holds every acknowledged send.
/// `senders` clients send messages padded to `pad` bytes until the disk is gone;
/// `file` is the data directory's file whose next write is torn.
async fn torn_write(
    test: &str,
    senders: u64,
    pad: usize,
    file: &str,
    fault: impl Fn(&str) -> String,
) {
    let Some(rig) = Rig::new(test) else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    let api = Api::new(&server);
    let padded = move |n: u64| serde_json::json!({"type": "test", "n": n, "pad": "x".repeat(pad)});
    for n in 0..20 {
        api.send("pl.torn", &padded(n)).await;
    }
    let torn = rig.fs.root().join("data").join(file);
    rig.fs.inject(&fault(&torn.display().to_string()));
    let clients: Vec<_> = (0..senders)
        .map(|client| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in (1000 * (client + 1)..).take(500) {
                    let sent = api
                        .http
                        .post(api.url("/v1/channels/pl.torn/messages"))
                        .json(&padded(n))
                        .timeout(T)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().as_u16() == 202 => acked.push(n),
                        _ => break,
                    }
                }
                acked
            })
        })
        .collect();
    let mut acked: BTreeSet<u64> = (0..20).collect();
    let mut stopped = false;
    for client in clients {
        let sent = client.await.unwrap();
        stopped |= sent.len() < 500;
        acked.extend(sent);
    }
    assert!(
        stopped,
        "LazyFS never applied the fault; its log:\n{}",
        rig.fs.log()
    );
    server.kill().await;
    rig.fs.remount();
    let server = server.restart().await;
    let got: BTreeSet<u64> = drained(&Api::new(&server), "pl.torn")
        .await
        .into_iter()
        .collect();
    let missing: Vec<_> = acked.difference(&got).collect();
    assert!(missing.is_empty(), "acknowledged, then lost: {missing:?}");
    println!(
        "{test}: {} acknowledged, {} after the restart",
        acked.len(),
        got.len()
    );
}

#[tokio::test]
async fn a_torn_write_of_the_log_loses_nothing_acknowledged() {
    torn_write(
        "a_torn_write_of_the_log_loses_nothing_acknowledged",
        1,
        100,
        "db",
        |file| format!("lazyfs::torn-op::file={file}::parts=3::persist=1,3"),
    )
    .await;
}

/// The same with a torn write of the watermark file: its other slot stands, and the
/// server starts by itself.
#[tokio::test]
async fn a_torn_write_of_the_watermark_file_loses_nothing_acknowledged() {
    torn_write(
        "a_torn_write_of_the_watermark_file_loses_nothing_acknowledged",
        4,
        100,
        "herald.watermark",
        |file| format!("lazyfs::torn-op::file={file}::parts=2::persist=1"),
    )
    .await;
}

/// Runs the `herald` command with `args`; panics unless it succeeds.
fn herald(args: &[&str]) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .output()
        .expect("running herald");
    assert!(
        output.status.success(),
        "herald {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A dump written by `herald backup` and `herald export`, and a data directory filled
/// by `herald import`, are on stable storage once the command reports success.
#[tokio::test]
async fn backup_export_and_import_are_durable_when_they_succeed() {
    let Some(rig) = Rig::new("backup_export_and_import_are_durable_when_they_succeed") else {
        return;
    };
    let mut server = rig.start(CONFIG).await;
    let api = Api::new(&server);
    for n in 0..20 {
        api.send("pl.dump", &msg(n)).await;
    }
    let mnt = rig.fs.data_dir().parent().unwrap().to_path_buf();
    let backup = mnt.join("backup.ndjson");
    herald(&[
        "backup",
        "--url",
        &server.base,
        "--out",
        backup.to_str().unwrap(),
    ]);
    server.shutdown(T).await;
    let export = mnt.join("export.ndjson");
    let data = rig.fs.data_dir();
    herald(&[
        "export",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    let restored = mnt.join("restored");
    herald(&[
        "import",
        "--data-dir",
        restored.to_str().unwrap(),
        "--in",
        export.to_str().unwrap(),
    ]);
    let dumps = [
        std::fs::read(&backup).unwrap(),
        std::fs::read(&export).unwrap(),
    ];
    rig.fs.power_cut();
    assert_eq!(std::fs::read(&backup).unwrap(), dumps[0], "the backup");
    assert_eq!(std::fs::read(&export).unwrap(), dumps[1], "the export");
    let work = Workdir::with_data_dir(restored);
    let server = Server::start_in(work, CONFIG).await;
    assert_eq!(
        drained(&Api::new(&server), "pl.dump").await,
        (0..20).collect::<Vec<_>>()
    );
}
