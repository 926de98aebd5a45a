//! SIGTERM during full load, against the real binary: 16 HTTP publishers, a few
//! WebSocket publishers and some SSE subscribers run flat out when the server gets
//! SIGTERM. Every request must either get its normal answer (202, `op: ok`) or fail
//! with 503 `unavailable`, a WebSocket close, or a connection error once the listener
//! is gone (none of which is an acknowledgement). The process must exit 0 within
//! `server.shutdown_timeout_secs`. A server restarted on the same data directory must
//! then hold every acknowledged message that no subscriber received before the stop:
//! nothing acknowledged is lost. Neither server's log may show a panic.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, Sse, Ws, WsIn, client};
use parking_lot::Mutex;
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

const SHUTDOWN_TIMEOUT_SECS: u64 = 10;
const CONFIG: &str = "[server]\nshutdown_timeout_secs = 10\n\
                      [layer]\ncapacity = 1000000\nexpiry_secs = 3600\n";
const HTTP_PUBLISHERS: usize = 16;
/// HTTP publisher `i` sends to `HTTP_CHANNELS[i % 4]`.
const HTTP_CHANNELS: [&str; 4] = ["sd.h0", "sd.h1", "sd.h2", "sd.h3"];
/// WebSocket publisher `i` sends to `WS_CHANNELS[i]`.
const WS_CHANNELS: [&str; 3] = ["sd.w0", "sd.w1", "sd.w2"];
/// Channels streamed by an SSE subscriber each; the others are only drained at the end.
const SSE_CHANNELS: [&str; 3] = ["sd.h0", "sd.h1", "sd.w0"];
/// How long the load runs before the SIGTERM, at least; and at most, waiting for acks.
const LOAD_BEFORE_TERM: Duration = Duration::from_millis(1500);
/// Every client loop ends by itself this long after it started.
const CLIENT_LIMIT: Duration = Duration::from_secs(40);

/// What the clients saw.
#[derive(Default)]
struct Record {
    /// Keys of every message a publisher tried to send.
    attempted: HashSet<String>,
    /// Acknowledged messages by channel: (key, acknowledged after the SIGTERM).
    acked: BTreeMap<String, Vec<(String, bool)>>,
    /// Keys received by the SSE subscribers before the stop, by channel.
    streamed: BTreeMap<String, Vec<String>>,
    /// Requests refused with 503 `unavailable`.
    unavailable: usize,
    /// Requests that failed with a connection error (or a WebSocket that closed).
    connection_errors: usize,
    /// Answers that are neither normal, nor `unavailable`, nor a connection error.
    violations: Vec<String>,
    /// When the SIGTERM was sent.
    term_at: Option<Instant>,
}

type Shared = Arc<Mutex<Record>>;

fn message(key: &str) -> Json {
    json!({"type": "shutdown.load", "k": key, "pad": "x".repeat(64)})
}

fn key_of(message: &Json) -> Option<String> {
    message["k"].as_str().map(str::to_string)
}

impl Record {
    fn ack(&mut self, channel: &str, key: String) {
        let after_term = self.term_at.is_some();
        self.acked
            .entry(channel.to_string())
            .or_default()
            .push((key, after_term));
    }

    fn total_acked(&self) -> usize {
        self.acked.values().map(Vec::len).sum()
    }
}

/// POSTs to `channel` as fast as answers come, until stopped or the time limit.
async fn http_publisher(base: String, index: usize, rec: Shared, stop: CancellationToken) {
    let http = client();
    let channel = HTTP_CHANNELS[index % HTTP_CHANNELS.len()];
    let limit = Instant::now() + CLIENT_LIMIT;
    let mut n = 0;
    while !stop.is_cancelled() && Instant::now() < limit {
        n += 1;
        let key = format!("h{index}:{n}");
        rec.lock().attempted.insert(key.clone());
        let sent = http
            .post(format!("{base}/v1/channels/{channel}/messages"))
            .timeout(Duration::from_secs(15))
            .json(&message(&key))
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(_) => {
                // Not an acknowledgement. Once the listener is closed, new connections
                // are refused; keep trying (slowly) until the test stops the clients.
                rec.lock().connection_errors += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let status = response.status().as_u16();
        if status == 202 {
            // The status line is the acknowledgement, whether or not the body arrives.
            rec.lock().ack(channel, key);
            continue;
        }
        let body: Json = response.json().await.unwrap_or(Json::Null);
        let mut rec = rec.lock();
        if status == 503 && body["error"]["code"] == "unavailable" {
            rec.unavailable += 1;
        } else {
            rec.violations
                .push(format!("send {key} to {channel}: {status} {body}"));
        }
    }
}

/// Sends `{"op":"send"}` frames on one WebSocket, one at a time, until stopped, the
/// time limit, or the connection ends.
async fn ws_publisher(url: String, index: usize, rec: Shared, stop: CancellationToken) {
    use futures_util::SinkExt;
    let channel = WS_CHANNELS[index];
    let mut ws = Ws::connect_url(&url).await;
    let limit = Instant::now() + CLIENT_LIMIT;
    let mut n = 0;
    while !stop.is_cancelled() && Instant::now() < limit {
        n += 1;
        let key = format!("w{index}:{n}");
        rec.lock().attempted.insert(key.clone());
        let request = json!({"op": "send", "channel": channel, "message": message(&key), "ref": n});
        let frame = tokio_tungstenite::tungstenite::Message::text(request.to_string());
        let sent = tokio::time::timeout(Duration::from_secs(5), ws.stream.send(frame)).await;
        if !matches!(sent, Ok(Ok(()))) {
            rec.lock().connection_errors += 1;
            return;
        }
        let reply = ws.next_within(Duration::from_secs(15)).await;
        let mut rec = rec.lock();
        match reply {
            Ok(WsIn::Json(reply)) if reply["op"] == "ok" && reply["ref"] == n => {
                rec.ack(channel, key);
            }
            Ok(WsIn::Json(reply)) if reply["op"] == "error" && reply["code"] == "unavailable" => {
                rec.unavailable += 1;
            }
            // The server closes with 1001 "going away" when it stops; the request in
            // flight then has no answer, which is no acknowledgement.
            Ok(WsIn::Close(1001, _)) | Ok(WsIn::End) => {
                rec.connection_errors += 1;
                return;
            }
            other => {
                rec.violations
                    .push(format!("ws send {key} to {channel}: {other:?}"));
                return;
            }
        }
    }
}

/// Streams `channel` until the server ends the stream, stopped, or the time limit.
async fn sse_subscriber(base: String, channel: &'static str, rec: Shared, stop: CancellationToken) {
    let http = client();
    let mut sse = Sse::open(&http, &format!("{base}/v1/channels/{channel}/events"), &[]).await;
    let limit = Instant::now() + CLIENT_LIMIT;
    while !stop.is_cancelled() && Instant::now() < limit {
        match sse.next_event_within(Duration::from_millis(200)).await {
            Ok(Some(event)) => {
                let mut rec = rec.lock();
                match (event.event.as_deref(), key_of(&event.json())) {
                    (None, Some(key)) => rec
                        .streamed
                        .entry(channel.to_string())
                        .or_default()
                        .push(key),
                    _ => rec
                        .violations
                        .push(format!("unexpected SSE event on {channel}: {event:?}")),
                }
            }
            Ok(None) => return,
            Err(()) => {}
        }
    }
}

fn assert_no_panic(server: &Server, which: &str) {
    let log = server.log();
    assert!(
        !log.contains("panicked"),
        "the {which} server's log shows a panic:\n{log}"
    );
}

/// Starts every client: the SSE subscribers, the WebSocket and the HTTP publishers.
fn spawn_clients(
    server: &Server,
    rec: &Shared,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for channel in SSE_CHANNELS {
        let client = sse_subscriber(server.base.clone(), channel, rec.clone(), stop.clone());
        tasks.push(tokio::spawn(client));
    }
    for i in 0..WS_CHANNELS.len() {
        let client = ws_publisher(server.ws_url(), i, rec.clone(), stop.clone());
        tasks.push(tokio::spawn(client));
    }
    for i in 0..HTTP_PUBLISHERS {
        let client = http_publisher(server.base.clone(), i, rec.clone(), stop.clone());
        tasks.push(tokio::spawn(client));
    }
    tasks
}

/// Waits [`LOAD_BEFORE_TERM`], then until every kind of client has made progress (every
/// channel acknowledged 10 times, every stream delivering), for 15 s at most.
async fn wait_for_full_load(rec: &Shared) {
    let started = Instant::now();
    tokio::time::sleep(LOAD_BEFORE_TERM).await;
    while started.elapsed() < Duration::from_secs(15) {
        let ready = {
            let rec = rec.lock();
            HTTP_CHANNELS
                .iter()
                .chain(WS_CHANNELS.iter())
                .all(|c| rec.acked.get(*c).is_some_and(|a| a.len() >= 10))
                && SSE_CHANNELS.iter().all(|c| rec.streamed.contains_key(*c))
        };
        if ready {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends SIGTERM and asserts that the server exits 0 in time; returns how long it took.
async fn terminate(server: &mut Server, rec: &Shared) -> Duration {
    rec.lock().term_at = Some(Instant::now());
    let term_at = Instant::now();
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_SECS))
        .await;
    let exit_after = term_at.elapsed();
    let status = status.unwrap_or_else(|| {
        panic!(
            "herald did not exit within {SHUTDOWN_TIMEOUT_SECS} s of SIGTERM under load; log:\n{}",
            server.log()
        )
    });
    assert_eq!(
        status.code(),
        Some(0),
        "exit status after SIGTERM: {status:?}; log:\n{}",
        server.log()
    );
    exit_after
}

/// Stops the clients and waits for each to end.
async fn stop_clients(stop: &CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.cancel();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("a client task ends once stopped")
            .expect("a client task does not panic");
    }
}

/// Receives every message left on every channel: the keys by channel, and any message
/// without a key (not sent by the test).
async fn drain(server: &Server) -> (BTreeMap<String, Vec<String>>, Vec<Json>) {
    let http = client();
    let mut drained: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut stray = Vec::new();
    for channel in HTTP_CHANNELS.iter().chain(WS_CHANNELS.iter()) {
        let got = drained.entry(channel.to_string()).or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "draining {channel} takes too long"
            );
            let r = http
                .get(server.url(&format!("/v1/channels/{channel}/messages?wait=0")))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .expect("receive on the restarted server");
            match r.status().as_u16() {
                204 => break,
                200 => {
                    let body: Json = r.json().await.expect("a message document");
                    match key_of(&body["message"]) {
                        Some(key) => got.push(key),
                        None => stray.push(body),
                    }
                }
                status => panic!("receive from {channel} answered {status}"),
            }
        }
    }
    (drained, stray)
}

/// What the acknowledged messages became: found on a stream or drained, or lost.
#[derive(Default)]
struct Tally {
    /// Acknowledged messages found nowhere.
    lost: Vec<String>,
    /// Messages drained after the restart that a stream had delivered before the stop.
    duplicates: usize,
    /// Acknowledgements answered after the SIGTERM.
    acked_after: usize,
    /// Delivered keys that no publisher sent.
    never_sent: Vec<String>,
}

impl Tally {
    fn of(rec: &Record, drained: &BTreeMap<String, Vec<String>>) -> Tally {
        let mut tally = Tally::default();
        for (channel, acked) in &rec.acked {
            let streamed = rec.streamed.get(channel).cloned().unwrap_or_default();
            let drained = drained.get(channel).cloned().unwrap_or_default();
            let streamed_set: HashSet<&String> = streamed.iter().collect();
            tally.duplicates += drained.iter().filter(|k| streamed_set.contains(k)).count();
            let present: HashSet<&String> = streamed.iter().chain(drained.iter()).collect();
            for (key, after_term) in acked {
                tally.acked_after += usize::from(*after_term);
                if !present.contains(key) {
                    tally.lost.push(format!(
                        "{channel}: {key} (acknowledged {} the SIGTERM)",
                        if *after_term { "after" } else { "before" }
                    ));
                }
            }
        }
        tally.never_sent = rec
            .streamed
            .values()
            .chain(drained.values())
            .flatten()
            .filter(|k| !rec.attempted.contains(*k))
            .cloned()
            .collect();
        tally
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_full_load_exits_cleanly_and_loses_nothing_acknowledged() {
    let mut server = Server::start_with(CONFIG).await;
    let rec: Shared = Arc::default();
    let stop = CancellationToken::new();
    let tasks = spawn_clients(&server, &rec, &stop);
    wait_for_full_load(&rec).await;
    let acked_before = rec.lock().total_acked();
    let exit_after = terminate(&mut server, &rec).await;
    stop_clients(&stop, tasks).await;
    assert_no_panic(&server, "stopped");

    let restarted = server.restart().await;
    let (drained, stray) = drain(&restarted).await;
    assert_no_panic(&restarted, "restarted");

    let rec = rec.lock();
    let tally = Tally::of(&rec, &drained);
    println!(
        "shutdown under load: {} attempted, {} acknowledged ({acked_before} before the SIGTERM \
         was sent, {} answered after it), {} refused as unavailable, {} connection \
         errors; {} streamed over SSE, {} drained after the restart ({} of them also \
         streamed); exit {:.2} s after SIGTERM",
        rec.attempted.len(),
        rec.total_acked(),
        tally.acked_after,
        rec.unavailable,
        rec.connection_errors,
        rec.streamed.values().map(Vec::len).sum::<usize>(),
        drained.values().map(Vec::len).sum::<usize>(),
        tally.duplicates,
        exit_after.as_secs_f64(),
    );
    assert!(
        rec.violations.is_empty(),
        "answers other than the normal one or unavailable: {:#?}",
        rec.violations
    );
    assert!(stray.is_empty(), "messages not sent by the test: {stray:?}");
    assert!(
        tally.never_sent.is_empty(),
        "delivered but never sent: {:?}",
        tally.never_sent
    );
    assert!(
        tally.lost.is_empty(),
        "{} acknowledged messages are lost after a clean stop, e.g. {:#?}",
        tally.lost.len(),
        &tally.lost[..tally.lost.len().min(20)]
    );
    // A clean stop writes every receive cursor (README, Durability): what a stream
    // delivered before the stop is not delivered again.
    assert_eq!(
        tally.duplicates, 0,
        "messages streamed before the clean stop were delivered again after it"
    );
    assert!(rec.total_acked() > 100, "the publishers made progress");
}
