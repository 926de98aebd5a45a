//! Crash safety of the real binary: concurrent publishers (HTTP and WebSocket sends,
//! group_sends, group_adds) and consumers (long-poll, SSE with resume, WebSocket
//! receive) while the server is killed with SIGKILL at random, seeded moments and
//! restarted. At the end every channel is drained and the record is checked.
//!
//! The `..._across_power_cuts` tests run the server on LazyFS and drop every byte it
//! never fsynced after each kill: a power loss (see `common::lazyfs`).
//!
//! `HERALD_CRASH_SEED` replays a run; `HERALD_CRASH_CYCLES` sets the number of kills
//! (20 by default; `make soak` runs many more), `HERALD_POWERLOSS_CYCLES` that of power
//! cuts (20 by default).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::lazyfs::LazyFs;
use common::{Server, Sse, Workdir, Ws, WsIn, client};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

const GROUP: &str = "crash.g";
const MEMBERS: [&str; 3] = ["crash.m0", "crash.m1", "crash.m2"];
const ADDS_GROUP: &str = "crash.adds";
const HTTP_CHANNELS: [&str; 2] = ["crash.c0", "crash.c1"];
const WS_CHANNEL: &str = "crash.w";

/// Everything that happened, as the clients saw it.
#[derive(Default)]
struct Record {
    /// Keys of every message a publisher tried to send.
    attempted: HashSet<String>,
    /// Acknowledged messages: channel → (key, when acknowledged, cycle).
    acked: BTreeMap<String, Vec<(String, Instant, usize)>>,
    /// Deliveries in the order each consumer saw them: channel → (key, cycle).
    delivered: BTreeMap<String, Vec<(String, usize)>>,
    /// Acknowledged group_adds to `ADDS_GROUP`: (channel, when, cycle).
    adds: Vec<(String, Instant, usize)>,
    /// When each cycle's kill happened.
    kills: Vec<Instant>,
}

type Shared = Arc<Mutex<Record>>;

fn message(key: &str) -> Json {
    json!({"type": "crash", "k": key})
}

fn key_of(message: &Json) -> String {
    message["k"]
        .as_str()
        .expect("a crash-test message")
        .to_string()
}

/// `publisher:seq` → (publisher, seq).
fn split_key(key: &str) -> (&str, u64) {
    let (publisher, seq) = key.rsplit_once(':').unwrap();
    (publisher, seq.parse().unwrap())
}

fn cycles(var: &str) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// The next message key of `publisher`, recorded as attempted.
fn next_key(publisher: &str, seq: &Mutex<u64>, rec: &Shared) -> String {
    let key = {
        let mut n = seq.lock();
        *n += 1;
        format!("{publisher}:{n}")
    };
    rec.lock().attempted.insert(key.clone());
    key
}

/// POSTs the message `key` as JSON; `None` (after a short pause) when the server is
/// unreachable, as it is around a kill.
async fn post(http: &reqwest::Client, url: &str, key: &str) -> Option<reqwest::Response> {
    match http.post(url).json(&message(key)).send().await {
        Ok(response) => Some(response),
        Err(_) => {
            tokio::time::sleep(Duration::from_millis(5)).await;
            None
        }
    }
}

/// Publishes to `channel` over HTTP until stopped.
async fn http_publisher(
    base: String,
    name: String,
    channel: &'static str,
    cycle: usize,
    seq: Arc<Mutex<u64>>,
    rec: Shared,
    stop: CancellationToken,
) {
    let http = client();
    while !stop.is_cancelled() {
        let key = next_key(&name, &seq, &rec);
        match post(
            &http,
            &format!("{base}/v1/channels/{channel}/messages"),
            &key,
        )
        .await
        {
            Some(r) if r.status().as_u16() == 202 => {
                rec.lock().acked.entry(channel.into()).or_default().push((
                    key,
                    Instant::now(),
                    cycle,
                ));
            }
            Some(r) => panic!("send answered {}", r.status()),
            None => {}
        }
    }
}

/// group_sends to `GROUP` over HTTP until stopped.
async fn group_publisher(
    base: String,
    cycle: usize,
    seq: Arc<Mutex<u64>>,
    rec: Shared,
    stop: CancellationToken,
) {
    let http = client();
    while !stop.is_cancelled() {
        let key = next_key("group", &seq, &rec);
        let Some(r) = post(&http, &format!("{base}/v1/groups/{GROUP}/messages"), &key).await else {
            continue;
        };
        assert_eq!(r.status().as_u16(), 202);
        let Ok(body) = r.json::<Json>().await else {
            continue;
        };
        assert_eq!(body["delivered"], 3, "{body}");
        let now = Instant::now();
        let mut rec = rec.lock();
        for member in MEMBERS {
            rec.acked
                .entry(member.into())
                .or_default()
                .push((key.clone(), now, cycle));
        }
    }
}

/// Adds fresh channels to `ADDS_GROUP` until stopped.
async fn adder(base: String, cycle: usize, rec: Shared, stop: CancellationToken) {
    let http = client();
    let mut n = 0;
    while !stop.is_cancelled() {
        n += 1;
        let channel = format!("crash.a{cycle}.{n}");
        let added = http
            .put(format!("{base}/v1/groups/{ADDS_GROUP}/channels/{channel}"))
            .send()
            .await;
        match added {
            Ok(r) if r.status().as_u16() == 204 => {
                rec.lock().adds.push((channel, Instant::now(), cycle))
            }
            Ok(r) => panic!("group_add answered {}", r.status()),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Sends to `WS_CHANNEL` over one WebSocket until stopped or disconnected.
async fn ws_publisher(
    server_ws: String,
    cycle: usize,
    seq: Arc<Mutex<u64>>,
    rec: Shared,
    stop: CancellationToken,
) {
    let mut ws = Ws::connect_url(&server_ws).await;
    while !stop.is_cancelled() {
        let key = next_key("ws", &seq, &rec);
        if !ws_send(
            &mut ws,
            json!({"op": "send", "channel": WS_CHANNEL, "message": message(&key)}),
        )
        .await
        {
            return;
        }
        match ws.next_within(Duration::from_secs(5)).await {
            Ok(WsIn::Json(reply)) if reply["op"] == "ok" => {
                rec.lock()
                    .acked
                    .entry(WS_CHANNEL.into())
                    .or_default()
                    .push((key, Instant::now(), cycle));
            }
            Ok(WsIn::Json(reply)) => panic!("send answered {reply}"),
            _ => return,
        }
    }
}

/// Sends a request frame; false once the connection is gone.
async fn ws_send(ws: &mut Ws, request: Json) -> bool {
    use futures_util::SinkExt;
    let frame = tokio_tungstenite::tungstenite::Message::text(request.to_string());
    matches!(
        tokio::time::timeout(Duration::from_secs(5), ws.stream.send(frame)).await,
        Ok(Ok(()))
    )
}

fn delivered(rec: &Shared, channel: &str, message: &Json, cycle: usize) {
    rec.lock()
        .delivered
        .entry(channel.into())
        .or_default()
        .push((key_of(message), cycle));
}

/// Long-polls `channel` until stopped or the server is gone.
async fn long_poller(
    base: String,
    channel: &'static str,
    cycle: usize,
    rec: Shared,
    stop: CancellationToken,
) {
    let http = client();
    while !stop.is_cancelled() {
        let got = http
            .get(format!("{base}/v1/channels/{channel}/messages?wait=0.5"))
            .send()
            .await;
        let Ok(r) = got else { return };
        if r.status().as_u16() == 200 {
            let Ok(body) = r.json::<Json>().await else {
                return;
            };
            delivered(&rec, channel, &body["message"], cycle);
        }
    }
}

/// Receives `WS_CHANNEL` over a WebSocket until stopped or disconnected.
async fn ws_receiver(server_ws: String, cycle: usize, rec: Shared, stop: CancellationToken) {
    let mut ws = Ws::connect_url(&server_ws).await;
    while !stop.is_cancelled() {
        if !ws_send(
            &mut ws,
            json!({"op": "receive", "channel": WS_CHANNEL, "wait": 0.5}),
        )
        .await
        {
            return;
        }
        match ws.next_within(Duration::from_secs(5)).await {
            Ok(WsIn::Json(reply)) if reply["op"] == "message" => {
                delivered(&rec, WS_CHANNEL, &reply["message"], cycle);
            }
            Ok(WsIn::Json(reply)) if reply["op"] == "timeout" => {}
            Ok(WsIn::Json(reply)) => panic!("receive answered {reply}"),
            _ => return,
        }
    }
}

/// Streams `MEMBERS[0]` over SSE, resuming after the last id it saw.
async fn sse_reader(
    base: String,
    cycle: usize,
    last_id: Arc<Mutex<Option<String>>>,
    rec: Shared,
    stop: CancellationToken,
) {
    let http = client();
    let channel = MEMBERS[0];
    let resume = last_id.lock().clone();
    let headers: Vec<(&str, &str)> = resume
        .as_deref()
        .map(|id| vec![("last-event-id", id)])
        .unwrap_or_default();
    let mut sse = Sse::open_any(
        &http,
        &format!("{base}/v1/channels/{channel}/events"),
        &headers,
    )
    .await;
    if sse.status != 200 {
        return;
    }
    while !stop.is_cancelled() {
        match sse.next_event_within(Duration::from_millis(300)).await {
            Ok(Some(event)) => {
                assert_ne!(
                    event.event.as_deref(),
                    Some("herald.gap"),
                    "no message may be missing"
                );
                delivered(&rec, channel, &event.json(), cycle);
                *last_id.lock() = event.id.clone();
            }
            Ok(None) => return,
            Err(()) => {}
        }
    }
}

struct Mode {
    config: &'static str,
    /// Acknowledged messages may be lost only when acknowledged this close to a kill.
    loss_window: Option<Duration>,
    /// The test's name, when every kill is a power cut on LazyFS.
    power_cut: Option<&'static str>,
}

/// What the clients of every cycle share: each publisher's sequence, and the last
/// event id the SSE reader saw (it resumes from it after each restart).
struct Clients {
    seqs: HashMap<&'static str, Arc<Mutex<u64>>>,
    sse_last: Arc<Mutex<Option<String>>>,
    rec: Shared,
}

impl Clients {
    fn new() -> Clients {
        Clients {
            seqs: ["c0", "c1", "ws", "group"]
                .into_iter()
                .map(|k| (k, Arc::default()))
                .collect(),
            sse_last: Arc::default(),
            rec: Arc::default(),
        }
    }

    /// Starts every publisher, receiver and reader of one cycle against `server`.
    fn spawn(
        &self,
        server: &Server,
        cycle: usize,
        stop: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let (base, ws_url) = (server.base.clone(), server.ws_url());
        let (rec, stop) = (&self.rec, stop);
        let http = |name: &str, channel| {
            let seq = self.seqs[name].clone();
            http_publisher(
                base.clone(),
                name.into(),
                channel,
                cycle,
                seq,
                rec.clone(),
                stop.clone(),
            )
        };
        vec![
            tokio::spawn(http("c0", HTTP_CHANNELS[0])),
            tokio::spawn(http("c1", HTTP_CHANNELS[1])),
            tokio::spawn(group_publisher(
                base.clone(),
                cycle,
                self.seqs["group"].clone(),
                rec.clone(),
                stop.clone(),
            )),
            tokio::spawn(ws_publisher(
                ws_url.clone(),
                cycle,
                self.seqs["ws"].clone(),
                rec.clone(),
                stop.clone(),
            )),
            tokio::spawn(adder(base.clone(), cycle, rec.clone(), stop.clone())),
            tokio::spawn(long_poller(
                base.clone(),
                HTTP_CHANNELS[0],
                cycle,
                rec.clone(),
                stop.clone(),
            )),
            tokio::spawn(ws_receiver(ws_url, cycle, rec.clone(), stop.clone())),
            tokio::spawn(self.sse_reader(&base, cycle, stop)),
        ]
    }

    fn sse_reader(
        &self,
        base: &str,
        cycle: usize,
        stop: &CancellationToken,
    ) -> impl Future<Output = ()> + use<> {
        let (last, rec) = (self.sse_last.clone(), self.rec.clone());
        sse_reader(base.to_string(), cycle, last, rec, stop.clone())
    }
}

/// Every channel the test sends to.
fn all_channels() -> Vec<&'static str> {
    HTTP_CHANNELS
        .iter()
        .chain(MEMBERS.iter())
        .chain([WS_CHANNEL].iter())
        .copied()
        .collect()
}

/// On the last restart: lets the SSE reader resume once more, empties every channel,
/// and returns the members of [`ADDS_GROUP`].
async fn drain(server: &Server, clients: &Clients, final_cycle: usize) -> HashSet<String> {
    let stop = CancellationToken::new();
    let sse = tokio::spawn(clients.sse_reader(&server.base, final_cycle, &stop));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    sse.await.unwrap();
    let http = client();
    for channel in all_channels() {
        loop {
            let r = http
                .get(server.url(&format!("/v1/channels/{channel}/messages")))
                .send()
                .await
                .unwrap();
            if r.status().as_u16() == 204 {
                break;
            }
            let body: Json = r.json().await.unwrap();
            delivered(&clients.rec, channel, &body["message"], final_cycle);
        }
    }
    common::Api::new(server)
        .members(ADDS_GROUP)
        .await
        .into_iter()
        .collect()
}

/// Checks what `channel` delivered: nothing never sent, each publisher's order on
/// first deliveries, a duplicate only in a later cycle than its first delivery.
/// Returns the acknowledged messages never delivered: (key, when acked, cycle).
fn check_channel(rec: &Record, channel: &str, seed: u64) -> Vec<(String, Instant, usize)> {
    let acked = rec.acked.get(channel).cloned().unwrap_or_default();
    let got = rec.delivered.get(channel).cloned().unwrap_or_default();
    for (key, _) in &got {
        assert!(
            rec.attempted.contains(key),
            "seed {seed}: {channel} delivered {key}, never sent"
        );
    }
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    for (key, cycle) in &got {
        if let Some(first) = first_seen.get(key.as_str()) {
            assert!(
                first < cycle,
                "seed {seed}: {channel} delivered {key} twice in cycle {cycle}"
            );
            continue;
        }
        first_seen.insert(key, *cycle);
        let (publisher, seq) = split_key(key);
        if let Some(previous) = last_seq.insert(publisher, seq) {
            assert!(
                previous < seq,
                "seed {seed}: {channel} delivered {publisher}:{seq} after {previous}"
            );
        }
    }
    let seen: HashSet<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    acked
        .into_iter()
        .filter(|(key, _, _)| !seen.contains(key.as_str()))
        .collect()
}

async fn run(mode: Mode) {
    let seed = common::seed_from_env("HERALD_CRASH_SEED");
    let (cycles_var, fs) = match mode.power_cut {
        Some(test) => match LazyFs::mount(test) {
            Some(fs) => ("HERALD_POWERLOSS_CYCLES", Some(fs)),
            None => return,
        },
        None => ("HERALD_CRASH_CYCLES", None),
    };
    let cycles = cycles(cycles_var);
    println!("crash test: HERALD_CRASH_SEED={seed} {cycles_var}={cycles}");
    let mut rng = StdRng::seed_from_u64(seed);
    let work = match &fs {
        Some(fs) => Workdir::with_data_dir(fs.data_dir()),
        None => Workdir::new(),
    };
    let clients = Clients::new();
    let mut server = Server::start_in(work.clone(), mode.config).await;
    let api = common::Api::new(&server);
    for member in MEMBERS {
        api.group_add(GROUP, member).await;
    }
    for cycle in 0..cycles {
        if cycle > 0 {
            server = server.restart().await;
        }
        let stop = CancellationToken::new();
        let tasks = clients.spawn(&server, cycle, &stop);
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        server.kill().await;
        clients.rec.lock().kills.push(Instant::now());
        if let Some(fs) = &fs {
            fs.power_cut();
        }
        stop.cancel();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("a client task ends after the kill")
                .expect("a client task does not panic");
        }
    }
    server = server.restart().await;
    let members = drain(&server, &clients, cycles).await;

    let rec = clients.rec.lock();
    // In sync mode nothing acknowledged may be lost; in interval mode only what was
    // acknowledged within the window before a kill.
    let check_loss = |what: &str, at: Instant, cycle: usize| match mode.loss_window {
        None => panic!("seed {seed}: acknowledged {what} (cycle {cycle}) is lost"),
        Some(window) => {
            let before_kill = rec.kills[cycle].duration_since(at);
            assert!(
                before_kill <= window,
                "seed {seed}: {what} was lost though acknowledged {before_kill:?} before the kill"
            );
        }
    };
    let mut lost = 0;
    for channel in all_channels() {
        for (key, at, cycle) in check_channel(&rec, channel, seed) {
            lost += 1;
            check_loss(&format!("{key} on {channel}"), at, cycle);
        }
    }
    let mut adds_lost = 0;
    for (add, at, cycle) in &rec.adds {
        if !members.contains(add) {
            adds_lost += 1;
            check_loss(&format!("group_add of {add}"), *at, *cycle);
        }
    }
    let total_acked: usize = rec.acked.values().map(Vec::len).sum();
    println!(
        "crash test: {cycles} kills, {total_acked} acknowledged deliveries, {lost} lost within the window, {} group_adds ({adds_lost} lost within the window)",
        rec.adds.len()
    );
    assert!(
        total_acked > cycles * 10,
        "the publishers made progress: {total_acked}"
    );
    assert!(rec.delivered.values().map(Vec::len).sum::<usize>() >= total_acked - lost);
}

const INTERVAL_CONFIG: &str = "[layer]\ncapacity = 1000000\nexpiry_secs = 3600\n[storage]\nsweep_interval_ms = 200\ndurability = \"interval\"\nflush_interval_ms = 100\n";

const BASE_CONFIG: &str =
    "[layer]\ncapacity = 1000000\nexpiry_secs = 3600\n[storage]\nsweep_interval_ms = 200\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_durability_loses_nothing_acknowledged_across_kills() {
    run(Mode {
        config: BASE_CONFIG,
        loss_window: None,
        power_cut: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_durability_loses_nothing_acknowledged_across_power_cuts() {
    run(Mode {
        config: BASE_CONFIG,
        loss_window: None,
        power_cut: Some("sync_durability_loses_nothing_acknowledged_across_power_cuts"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_durability_loses_at_most_the_last_interval() {
    run(Mode {
        config: INTERVAL_CONFIG,
        // The flush period, plus the time a flush itself takes (a write acknowledged
        // during a slow fsync waits for the next flush) and the kill's delivery. A CI
        // run once lost a write acknowledged 534 ms before the kill: allow 2 s.
        loss_window: Some(Duration::from_millis(2000)),
        power_cut: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_durability_loses_at_most_the_last_interval_across_power_cuts() {
    run(Mode {
        config: INTERVAL_CONFIG,
        loss_window: Some(Duration::from_millis(2000)),
        power_cut: Some("interval_durability_loses_at_most_the_last_interval_across_power_cuts"),
    })
    .await;
}
