//! Bounded resources under a constant load against the real binary: HTTP publishers
//! send ~100-byte JSON messages to a few channels and group_send to a group of a few
//! members; long-poll receivers take about half of what is published; the rest expires
//! (`expiry_secs = 3`) and is swept (`sweep_interval_ms = 200`). Every few seconds the
//! server's resident memory (`VmRSS`), the size of its data directory and the message
//! bytes it stores (`stored_bytes` of `GET /v1/stats`) are sampled and printed as a
//! table, with the space amplification (data directory ÷ stored message bytes).
//!
//! `HERALD_SOAK_SECS` sets the duration (8 s by default, a smoke run for CI; `make soak`
//! runs 600 s). Every run asserts that the server stayed healthy, that messages were
//! published and received, and that no publish failed except with 429 `channel_full`.
//! Runs of at least [`LONG_RUN_SECS`] also assert that memory and disk level off (see
//! [`check_levels_off`]).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Api, Server, client};
use parking_lot::Mutex;
use serde_json::{Value as Json, json};

/// Receivers take the oldest message, so an unreceived one waits its full expiry in
/// its queue: a queue holds about (arrival rate × expiry) messages, up to 240 here,
/// hence a capacity above that.
const CONFIG: &str =
    "[layer]\nexpiry_secs = 3\ncapacity = 1000\n[storage]\nsweep_interval_ms = 200\n";
const CHANNELS: [&str; 3] = ["soak.c0", "soak.c1", "soak.c2"];
const GROUP: &str = "soak.g";
const MEMBERS: [&str; 3] = ["soak.m0", "soak.m1", "soak.m2"];
/// HTTP publishers sending to the channels (publisher `i` sends to `CHANNELS[i % 3]`).
const CHANNEL_PUBLISHERS: usize = 6;
/// HTTP publishers group_sending to `GROUP`.
const GROUP_PUBLISHERS: usize = 2;
/// Sends per second of each channel publisher: 80/s into each channel.
const CHANNEL_RATE: f64 = 40.0;
/// group_sends per second of each group publisher: 60/s into each member.
const GROUP_RATE: f64 = 30.0;
/// The shortest run whose samples are checked for leveling off.
const LONG_RUN_SECS: u64 = 120;
/// Bound of one request (a long poll waits at most 1 s of it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the clients counted. Queues are numbered `CHANNELS` then `MEMBERS`.
#[derive(Default)]
struct Counts {
    /// Messages acknowledged into each queue (channel sends; group deliveries).
    published: [AtomicU64; 6],
    /// Acknowledged group_sends (each delivered to the members with room).
    group_sends: AtomicU64,
    /// Messages received from each queue.
    received: [AtomicU64; 6],
    /// Sends refused with 429 `channel_full`, and members skipped as full.
    channel_full: AtomicU64,
    group_full: AtomicU64,
    /// Any other failed request, with the first few described.
    failures: AtomicU64,
    failure_notes: Mutex<Vec<String>>,
}

impl Counts {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut notes = self.failure_notes.lock();
        if notes.len() < 20 {
            notes.push(what);
        }
    }

    fn published(&self) -> u64 {
        self.published
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    fn received(&self) -> u64 {
        self.received
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// How many messages the receiver of `queue` should have taken by now: half.
    fn receive_target(&self, queue: usize) -> u64 {
        let arrived = if queue < CHANNELS.len() {
            self.published[queue].load(Ordering::Relaxed)
        } else {
            self.group_sends.load(Ordering::Relaxed)
        };
        arrived / 2
    }
}

/// A message of about 100 bytes of JSON.
fn message(publisher: &str, n: u64) -> Json {
    json!({
        "type": "soak.message",
        "publisher": publisher,
        "n": n,
        "pad": "0123456789abcdefghijklmnopqrstuvwxyzABCD",
    })
}

fn ticker(rate: f64) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// POSTs `body` as JSON: the status and JSON answer, or `None` after counting the
/// failure as `what`.
async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &Json,
    counts: &Counts,
    what: &str,
) -> Option<(u16, Json)> {
    match http
        .post(url)
        .timeout(REQUEST_TIMEOUT)
        .json(body)
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            Some((status, response.json().await.unwrap_or(Json::Null)))
        }
        Err(e) => {
            counts.fail(format!("{what}: {e}"));
            None
        }
    }
}

/// Sends to `CHANNELS[index % 3]` at `CHANNEL_RATE` until `deadline`.
async fn channel_publisher(base: String, index: usize, counts: Arc<Counts>, deadline: Instant) {
    let http = client();
    let queue = index % CHANNELS.len();
    let channel = CHANNELS[queue];
    let name = format!("c{index}");
    let mut ticks = ticker(CHANNEL_RATE);
    let mut n = 0;
    while Instant::now() < deadline {
        ticks.tick().await;
        n += 1;
        let url = format!("{base}/v1/channels/{channel}/messages");
        let what = format!("send to {channel}");
        let Some((status, body)) = post(&http, &url, &message(&name, n), &counts, &what).await
        else {
            continue;
        };
        match status {
            202 if body["channel"] == channel && body["id"].is_string() => {
                counts.published[queue].fetch_add(1, Ordering::Relaxed);
            }
            429 if body["error"]["code"] == "channel_full" => {
                counts.channel_full.fetch_add(1, Ordering::Relaxed);
            }
            _ => counts.fail(format!("send to {channel}: {status} {body}")),
        }
    }
}

/// group_sends to `GROUP` at `GROUP_RATE` until `deadline`.
async fn group_publisher(base: String, index: usize, counts: Arc<Counts>, deadline: Instant) {
    let http = client();
    let name = format!("g{index}");
    let mut ticks = ticker(GROUP_RATE);
    let mut n = 0;
    while Instant::now() < deadline {
        ticks.tick().await;
        n += 1;
        let url = format!("{base}/v1/groups/{GROUP}/messages");
        let Some((status, body)) =
            post(&http, &url, &message(&name, n), &counts, "group_send").await
        else {
            continue;
        };
        let (Some(delivered), Some(full)) = (body["delivered"].as_u64(), body["full"].as_u64())
        else {
            counts.fail(format!("group_send: {status} {body}"));
            continue;
        };
        if status != 202 || delivered + full != MEMBERS.len() as u64 {
            counts.fail(format!("group_send: {status} {body}"));
            continue;
        }
        counts.group_sends.fetch_add(1, Ordering::Relaxed);
        counts.group_full.fetch_add(full, Ordering::Relaxed);
        // Which members were full is not reported; spread the deliveries over them.
        for (i, _) in MEMBERS.iter().enumerate().take(delivered as usize) {
            counts.published[CHANNELS.len() + i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Long-polls queue `queue`, keeping its receptions at half of what arrived there.
async fn receiver(base: String, queue: usize, counts: Arc<Counts>, deadline: Instant) {
    let http = client();
    let channel = CHANNELS.iter().chain(MEMBERS.iter()).nth(queue).unwrap();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        if counts.received[queue].load(Ordering::Relaxed) >= counts.receive_target(queue) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let wait = left.as_secs_f64().min(1.0);
        let got = http
            .get(format!(
                "{base}/v1/channels/{channel}/messages?wait={wait:.3}"
            ))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        let response = match got {
            Ok(r) => r,
            Err(e) => {
                counts.fail(format!("receive from {channel}: {e}"));
                continue;
            }
        };
        match response.status().as_u16() {
            200 => {
                let body: Json = response.json().await.unwrap_or(Json::Null);
                if body["message"]["type"] == "soak.message" {
                    counts.received[queue].fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.fail(format!("receive from {channel}: 200 {body}"));
                }
            }
            204 => {}
            status => {
                let body = response.text().await.unwrap_or_default();
                counts.fail(format!("receive from {channel}: {status} {body}"));
            }
        }
    }
}

/// The resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// The sum of the sizes of the files under `dir`, recursively, in bytes. Files that
/// vanish during the walk (sled replaces some) are skipped.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if meta.is_dir() {
            total += dir_bytes(&entry.path());
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    total
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    published: u64,
    received: u64,
    rss_kib: u64,
    disk_kib: u64,
    /// The server's `stored_bytes` (message records on disk), in KiB.
    stored_kib: u64,
}

impl Sample {
    /// Space amplification: the data directory's size ÷ the message bytes stored.
    fn amplification(&self) -> f64 {
        self.disk_kib as f64 / self.stored_kib.max(1) as f64
    }

    fn print_header() {
        println!(
            "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6}",
            "time s", "published", "received", "RSS KiB", "disk KiB", "stored KiB", "amp"
        );
    }

    fn print(&self) {
        println!(
            "{:>8.1} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6.1}",
            self.secs,
            self.published,
            self.received,
            self.rss_kib,
            self.disk_kib,
            self.stored_kib,
            self.amplification()
        )
    }
}

/// Starts the publishers and receivers; each ends by itself at `deadline`.
fn spawn_load(
    base: &str,
    counts: &Arc<Counts>,
    deadline: Instant,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for i in 0..CHANNEL_PUBLISHERS {
        let client = channel_publisher(base.to_string(), i, counts.clone(), deadline);
        tasks.push(tokio::spawn(client));
    }
    for i in 0..GROUP_PUBLISHERS {
        let client = group_publisher(base.to_string(), i, counts.clone(), deadline);
        tasks.push(tokio::spawn(client));
    }
    for queue in 0..CHANNELS.len() + MEMBERS.len() {
        let client = receiver(base.to_string(), queue, counts.clone(), deadline);
        tasks.push(tokio::spawn(client));
    }
    tasks
}

/// Prints the totals, the extremes of RSS and disk, and the space amplification after
/// the warm-up (the first third: queues fill within the 3 s expiry).
fn print_summary(samples: &[Sample], counts: &Counts, stats: &Json) {
    let published = counts.published();
    let received = counts.received();
    println!(
        "soak: published {published} ({} group_sends), received {received} ({:.0}%), \
         {} sends refused as channel_full, {} group deliveries skipped \
         as full, {} other failures; server stats {stats}",
        counts.group_sends.load(Ordering::Relaxed),
        100.0 * received as f64 / published.max(1) as f64,
        counts.channel_full.load(Ordering::Relaxed),
        counts.group_full.load(Ordering::Relaxed),
        counts.failures.load(Ordering::Relaxed),
    );
    let rss: Vec<u64> = samples.iter().map(|s| s.rss_kib).collect();
    let disk: Vec<u64> = samples.iter().map(|s| s.disk_kib).collect();
    println!(
        "soak: RSS at start {} KiB, max {} KiB; disk at start {} KiB, max {} KiB",
        rss[0],
        rss.iter().max().unwrap(),
        disk[0],
        disk.iter().max().unwrap()
    );
    let mut amplification: Vec<f64> = samples[samples.len() / 3..]
        .iter()
        .filter(|s| s.stored_kib > 0)
        .map(Sample::amplification)
        .collect();
    amplification.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (amplification.first(), amplification.last()) {
        println!(
            "soak: space amplification (data directory ÷ stored message bytes) after warm-up: \
             median {:.1}, min {min:.1}, max {max:.1}",
            amplification[amplification.len() / 2]
        );
    }
}

/// Panics unless RSS and disk level off over a run of `secs` (see [`check_levels_off`]).
fn assert_levels_off(samples: &[Sample], secs: u64) {
    let d = secs as f64;
    let checks = [
        check_levels_off(samples, d, "RSS", |s| s.rss_kib, 2 * 1024),
        check_levels_off(samples, d, "disk", |s| s.disk_kib, 1024),
    ];
    for check in &checks {
        match check {
            Ok(verdict) => println!("soak: levels off: {verdict}"),
            Err(verdict) => println!("soak: GROWS: {verdict}"),
        }
    }
    for check in checks {
        if let Err(verdict) = check {
            panic!("does not level off: {verdict}");
        }
    }
}

/// The server's `GET /v1/stats` answer.
async fn stats(http: &reqwest::Client, base: &str) -> Json {
    http.get(format!("{base}/v1/stats"))
        .send()
        .await
        .expect("stats request")
        .json()
        .await
        .expect("stats JSON")
}

/// The server's `stored_bytes` in KiB (`GET /v1/stats`).
async fn stored_kib(http: &reqwest::Client, base: &str) -> u64 {
    stats(http, base).await["stats"]["stored_bytes"]
        .as_u64()
        .expect("stats has stored_bytes")
        / 1024
}

fn soak_secs() -> u64 {
    match std::env::var("HERALD_SOAK_SECS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("HERALD_SOAK_SECS must be a number of seconds, not {s:?}")),
        Err(_) => 8,
    }
}

/// Whether the samples of `name` level off. Samples of the first third are warm-up
/// (queues fill to their steady length within the 3 s expiry, sled's page cache and
/// the allocator's arenas grow to their working size) and are not judged. `value`'s
/// maxima over the middle and the last third are compared; maxima rather than means
/// or last values, because sled's file grows and shrinks by 512 KiB segments and the
/// allocator keeps freed memory for a while: both series are saw-tooth-like, and the
/// envelope of a saw tooth is what stays flat when nothing leaks, wherever in a tooth
/// the run happens to end. Two bounds:
///
/// - the ratio: `last ≤ 1.5 × middle`, which catches growth that is fast compared to
///   the level;
/// - the increment: `last − middle ≤ max(middle / 10, slack)`. The ratio alone is
///   not enough: a steady leak gives a ratio of at most 1.5 (exactly 1.5 for growth
///   from zero), so it would pass. A steady leak adds as much over the last third as
///   over the middle one, a plateau adds only noise. At the load's ~420 messages/s, a
///   600 s run puts ~84,000 messages into each third, so the bound (for memory, the
///   2 MiB slack, above 10% of the ~12 MiB this server settles at; for disk, the
///   1 MiB slack) fails for a leak of more than ~25 bytes of memory or ~12 bytes of
///   disk per message; a 600 s run measured +76 KiB of RSS and +0 KiB of disk between the two
///   thirds. `slack` is the noise floor for small levels: two sled segments of disk;
///   for memory, an allocator arena newly touched by a blocking thread.
fn check_levels_off(
    samples: &[Sample],
    duration: f64,
    name: &str,
    value: fn(&Sample) -> u64,
    slack: u64,
) -> Result<String, String> {
    let max_in = |from: f64, to: f64| {
        samples
            .iter()
            .filter(|s| s.secs >= from && s.secs <= to)
            .map(value)
            .max()
            .unwrap_or(0)
    };
    let middle = max_in(duration / 3.0, 2.0 * duration / 3.0);
    let last = max_in(2.0 * duration / 3.0, duration + 1.0);
    let allowed = middle + (middle / 10).max(slack);
    let verdict = format!(
        "{name}: max over the middle third {middle} KiB, over the last third {last} KiB \
         (allowed: at most {allowed} KiB and 1.5 × {middle})"
    );
    if middle > 0 && last <= allowed && last * 2 <= middle * 3 {
        Ok(verdict)
    } else {
        Err(verdict)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_disk_stay_bounded_under_constant_load() {
    let secs = soak_secs();
    let duration = Duration::from_secs(secs);
    // About 100 rows for long runs, one a second for short ones, at most one per 5 s.
    let period = Duration::from_secs_f64((secs as f64 / 100.0).clamp(1.0, 5.0));
    let mut server = Server::start_with(CONFIG).await;
    let api = Api::new(&server);
    api.assert_healthy().await;
    let http = client();
    for member in MEMBERS {
        api.group_add(GROUP, member).await;
    }

    let counts = Arc::new(Counts::default());
    let pid = server.pid();
    let data_dir = server.data_dir();
    let sample = async |secs: f64, counts: &Counts| Sample {
        secs,
        published: counts.published(),
        received: counts.received(),
        rss_kib: rss_kib(pid),
        disk_kib: dir_bytes(&data_dir) / 1024,
        stored_kib: stored_kib(&http, &server.base).await,
    };
    println!(
        "soak: {secs} s, {CHANNEL_PUBLISHERS} channel publishers at {CHANNEL_RATE}/s, \
         {GROUP_PUBLISHERS} group publishers at {GROUP_RATE}/s to {} members, config {CONFIG:?}",
        MEMBERS.len()
    );
    Sample::print_header();

    let start = Instant::now();
    let deadline = start + duration;
    let baseline = sample(0.0, &counts).await;
    baseline.print();
    let tasks = spawn_load(&server.base, &counts, deadline);
    let mut samples = vec![baseline];
    let mut next = start + period;
    while next <= deadline {
        tokio::time::sleep_until(next.into()).await;
        let s = sample(start.elapsed().as_secs_f64(), &counts).await;
        s.print();
        samples.push(s);
        next += period;
    }
    for task in tasks {
        tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(5), task)
            .await
            .expect("a client task ends by itself after the deadline")
            .expect("a client task does not panic");
    }
    sample(start.elapsed().as_secs_f64(), &counts).await.print();

    api.assert_healthy().await;
    print_summary(&samples, &counts, &stats(&http, &server.base).await);
    assert_eq!(
        counts.failures.load(Ordering::Relaxed),
        0,
        "requests failed other than with channel_full: {:#?}",
        counts.failure_notes.lock()
    );
    assert!(counts.published() > 0, "messages were published");
    assert!(counts.received() > 0, "messages were received");
    if secs >= LONG_RUN_SECS {
        assert_levels_off(&samples, secs);
    }

    let status = server.shutdown(Duration::from_secs(15)).await;
    assert!(status.success(), "clean exit after the soak: {status:?}");
    let log = server.log();
    assert!(
        !log.contains("panicked"),
        "the server log has a panic:\n{log}"
    );
}

/// The criterion itself, on synthetic series: a noisy plateau passes, a steady leak
/// fails whether it starts from zero (ratio exactly 1.5) or from a base.
#[test]
fn the_level_off_criterion_tells_a_plateau_from_a_leak() {
    let series = |f: fn(f64) -> u64| -> Vec<Sample> {
        (0..=120)
            .map(|i| {
                let secs = i as f64 * 5.0;
                Sample {
                    secs,
                    published: 0,
                    received: 0,
                    rss_kib: f(secs),
                    disk_kib: 0,
                    stored_kib: 0,
                }
            })
            .collect()
    };
    let check = |samples: &[Sample]| check_levels_off(samples, 600.0, "RSS", |s| s.rss_kib, 2048);
    // Warm-up, then a saw tooth around 12 MiB.
    let plateau = series(|t| {
        if t < 60.0 {
            8000 + t as u64 * 60
        } else {
            11500 + (t as u64 % 35) * 10
        }
    });
    assert!(check(&plateau).is_ok(), "{:?}", check(&plateau));
    // 20 KiB/s from zero: the ratio is exactly 1.5, the increment is too large.
    let from_zero = series(|t| (t * 20.0) as u64);
    assert!(check(&from_zero).is_err());
    // 15 KiB/s on top of 12 MiB: the ratio passes (1.17), the increment does not.
    let from_base = series(|t| 12_000 + (t * 15.0) as u64);
    assert!(check(&from_base).is_err());
    // 1 KiB/s on top of 12 MiB (200 KiB per third): within the noise allowance.
    let slow = series(|t| 12_000 + t as u64);
    assert!(check(&slow).is_ok());
}
