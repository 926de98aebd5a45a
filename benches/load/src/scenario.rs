//! The named scenarios: each drives one server through the public API and fills a
//! [`Report`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hyper::{Method, StatusCode};
use serde::Deserialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::clients::{HttpConn, Received, Stamp, Subscriber, error_code};
use super::load::{self, Destination, Published, Schedule, Transport, WS_WINDOW};
use super::report::{Errors, IdleMemory, OverloadCheck, Report, count, merge, percentiles};
use super::server::Server;
use super::{Options, PublishTarget};

/// Subscribers opened at once: enough to connect thousands quickly without a SYN flood.
const OPEN_CONCURRENCY: usize = 64;
/// How long one subscriber may take to connect and subscribe.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Publisher connections of the fan-out scenarios.
pub const FANOUT_PUBLISHERS: usize = 16;
/// After the last publish, subscribers stop once all is delivered, or after this long
/// without a delivery.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// The longest drain after the last publish.
const DRAIN_MAX: Duration = Duration::from_secs(15);
/// The `overload` receiver's pause between two receives: it must be slower than the
/// publishers so that the channel stays full.
const SLOW_RECEIVER_PAUSE: Duration = Duration::from_millis(10);

/// What a scenario needs: the server, the options, and a run id that keeps the channel
/// names of two runs against one `--url` server apart.
pub struct Ctx<'a> {
    pub server: &'a Server,
    pub opts: &'a Options,
    pub run_id: u32,
}

impl Ctx<'_> {
    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub(super) fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.opts.duration)
    }

    pub(super) fn progress(&self, what: &str) {
        if !self.opts.quiet {
            eprintln!("bench: {what}");
        }
    }

    /// Whether the server outlives the bench run, so the bench must tidy up after itself.
    fn shared_server(&self) -> bool {
        self.opts.url.is_some()
    }
}

/// `publish-http` and `publish-ws`: publishers at max rate, or open loop at `--rate`.
pub async fn publish(ctx: &Ctx<'_>, name: &str, transport: Transport) -> Result<Report, String> {
    let opts = ctx.opts;
    let destination = match opts.target {
        PublishTarget::Group => Destination::Group("bench-publish".into()),
        PublishTarget::Channel => Destination::Channel("bench-publish".into()),
    };
    let transport_text = match transport {
        Transport::Http => "HTTP keep-alive connections".to_string(),
        Transport::Ws => format!("WebSocket connections (window {WS_WINDOW})"),
    };
    ctx.progress(&format!("{name}: publishing for {} s", opts.duration));
    let cpu = ctx.server.cpu_mark();
    let (schedule, published) = load::publish(
        ctx.addr(),
        transport,
        destination.clone(),
        opts.connections,
        ctx.duration(),
        opts.rate,
    )
    .await;
    let mut report = publisher_report(name, &schedule, &published);
    (report.server_cpu_percent, report.bench_cpu_percent) = cpu.percent_since(ctx.server);
    report.mode = format!(
        "{}, {} {transport_text} to {destination}",
        mode(opts.rate),
        opts.connections
    );
    report.connections = opts.connections;
    report.latency_kind = Some("publish: due time to acknowledgement".into());
    report.latency = percentiles(published.latencies_us);
    Ok(report)
}

/// `fanout-sse`, `fanout-ws` and `latency`: subscribers of one group, then a publisher
/// at a fixed rate; every delivery is timed against its scheduled send.
pub async fn fanout(
    ctx: &Ctx<'_>,
    name: &str,
    ws: bool,
    subscribers: usize,
    rate: f64,
) -> Result<Report, String> {
    let group = "bench-fanout";
    let channels = channel_names(ctx, "fanout", subscribers);
    let (subs, errors, first_error) = open_subscribers(ctx.addr(), ws, group, &channels).await;
    let connected = subs.len();
    ctx.progress(&format!(
        "{name}: {connected}/{subscribers} subscribers connected; publishing {rate}/s for {} s",
        ctx.opts.duration
    ));
    let listening = Listening::start(subs);
    // Memberships are in place once a stream is open; a short pause lets the
    // subscribers' first reads settle before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cpu = ctx.server.cpu_mark();
    let (schedule, published) = load::publish(
        ctx.addr(),
        Transport::Http,
        Destination::Group(group.into()),
        FANOUT_PUBLISHERS,
        ctx.duration(),
        Some(rate),
    )
    .await;
    let expected = published.accepted.len() as u64 * connected as u64;
    let received = listening.drain(expected).await;
    let mode = format!(
        "{}, {FANOUT_PUBLISHERS} HTTP publishers, {} subscribers",
        mode(Some(rate)),
        if ws { "WebSocket" } else { "SSE" }
    );
    let mut report = fanout_report(
        name,
        mode,
        (&schedule, &published),
        (subscribers, connected),
        received,
        errors,
    );
    (report.server_cpu_percent, report.bench_cpu_percent) = cpu.percent_since(ctx.server);
    report.reported_delivered = Some(published.reported_delivered);
    report.reported_full = Some(published.reported_full);
    if published.reported_delivered != expected {
        report.notes.push(format!(
            "group sends reported {} delivered and {} full members, against {expected} expected",
            published.reported_delivered, published.reported_full
        ));
    }
    note_first_error(&mut report, first_error);
    if ctx.shared_server() {
        discard(ctx.addr(), group, &channels).await;
    }
    Ok(report)
}

/// The report of a fan-out load: the publishers' figures, then what the `connected` of
/// `subscribers` subscribers received of each accepted publish, timed end to end from
/// its scheduled send. `errors` are the subscribers' own (opening them).
pub fn fanout_report(
    name: &str,
    mode: String,
    (schedule, published): (&Schedule, &Published),
    (subscribers, connected): (usize, usize),
    received: Received,
    errors: Errors,
) -> Report {
    let expected = published.accepted.len() as u64 * connected as u64;
    let deliveries = received.latencies_us.len() as u64;
    let mut report = publisher_report(name, schedule, published);
    merge(&mut report.errors, errors);
    merge(&mut report.errors, received.errors);
    report.mode = mode;
    report.connections = FANOUT_PUBLISHERS;
    report.subscribers_requested = subscribers;
    report.subscribers_connected = connected;
    report.deliveries = deliveries;
    report.deliveries_per_s = received
        .last
        .map(|last| deliveries as f64 / (last - schedule.start()).as_secs_f64());
    report.expected = Some(expected);
    report.delivered_ratio = Some(ratio(deliveries, expected));
    report.latency_kind = Some("end to end: scheduled send to receive".into());
    report.latency = percentiles(received.latencies_us);
    report.publish_latency = percentiles(published.latencies_us.clone());
    report
}

/// `idle-sse` and `idle-ws`: the server's memory before and after `--subscribers` idle
/// subscribers.
pub async fn idle(ctx: &Ctx<'_>, name: &str, ws: bool) -> Result<Report, String> {
    let rss = || {
        ctx.server
            .rss_mib()
            .map(|(rss, _)| rss)
            .ok_or_else(|| format!("{name} needs the server's pid: give --server-pid with --url"))
    };
    let kind = if ws {
        "WebSocket subscribers"
    } else {
        "SSE streams"
    };
    let group = "bench-idle";
    let subscribers = ctx.opts.subscribers;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss()?;
    let channels = channel_names(ctx, "idle", subscribers);
    let (subs, errors, first_error) = open_subscribers(ctx.addr(), ws, group, &channels).await;
    let connected = subs.len();
    ctx.progress(&format!(
        "{name}: {connected}/{subscribers} idle {kind} open; settling 2 s"
    ));
    let listening = Listening::start(subs);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss()?;
    let received = listening.drain(0).await;
    let mut report = Report {
        scenario: name.into(),
        mode: format!("{subscribers} idle {kind} of group {group}, 2 s settle"),
        subscribers_requested: subscribers,
        subscribers_connected: connected,
        errors,
        idle: Some(IdleMemory {
            connected: connected as u64,
            rss_before_mib: before,
            rss_after_mib: after,
            kib_per_connection: if connected == 0 {
                0.0
            } else {
                (after - before) * 1024.0 / connected as f64
            },
        }),
        ..Report::default()
    };
    merge(&mut report.errors, received.errors);
    note_first_error(&mut report, first_error);
    if ctx.shared_server() {
        discard(ctx.addr(), group, &channels).await;
    }
    Ok(report)
}

/// `overload`: publishers at max rate into one channel of small capacity with one slow
/// receiver, then a drain; every accepted message must be received exactly once.
pub async fn overload(ctx: &Ctx<'_>, name: &str) -> Result<Report, String> {
    let channel = "bench-overload";
    let mut receiver = Receiver::new(ctx.addr(), channel);
    // A server that outlives the bench may hold messages of an earlier run.
    let (leftovers, early_errors) = receiver.receive_all(0.0, Duration::from_secs(30)).await;
    ctx.progress(&format!(
        "{name}: {} publishers at max rate into {channel} with one slow receiver for {} s",
        ctx.opts.connections, ctx.opts.duration
    ));
    let cpu = ctx.server.cpu_mark();
    let stop = CancellationToken::new();
    let slow = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut seqs = Vec::new();
            let mut errors = early_errors;
            while !stop.is_cancelled() {
                match receiver.receive(1.0).await {
                    Ok(Some(seq)) => seqs.push(seq),
                    Ok(None) => {}
                    Err(code) => count(&mut errors, code, 1),
                }
                tokio::time::sleep(SLOW_RECEIVER_PAUSE).await;
            }
            // Then take what is left, until the channel has been empty for half a second.
            let (rest, rest_errors) = receiver.receive_all(0.5, DRAIN_MAX * 2).await;
            seqs.extend(rest);
            merge(&mut errors, rest_errors);
            (seqs, errors)
        }
    });
    let (schedule, published) = load::publish(
        ctx.addr(),
        Transport::Http,
        Destination::Channel(channel.into()),
        ctx.opts.connections,
        ctx.duration(),
        None,
    )
    .await;
    stop.cancel();
    let (seqs, receive_errors) = slow
        .await
        .map_err(|_| "the receiver panicked".to_string())?;

    let mut report = publisher_report(name, &schedule, &published);
    (report.server_cpu_percent, report.bench_cpu_percent) = cpu.percent_since(ctx.server);
    merge(&mut report.errors, receive_errors);
    report.mode = format!(
        "max rate (closed loop), {} HTTP publishers, one receiver pausing {} ms",
        ctx.opts.connections,
        SLOW_RECEIVER_PAUSE.as_millis()
    );
    report.connections = ctx.opts.connections;
    let check = exactly_once(&published.accepted, &seqs);
    report.deliveries = check.received;
    report.deliveries_per_s = Some(check.received as f64 / schedule_elapsed(&schedule, &published));
    report.expected = Some(check.accepted);
    report.delivered_ratio = Some(check.delivered_ratio);
    report.overload = Some(check);
    report.latency_kind = Some("publish: due time to acknowledgement (accepted only)".into());
    report.latency = percentiles(published.latencies_us);
    if !leftovers.is_empty() {
        report.notes.push(format!(
            "drained {} messages of an earlier run first",
            leftovers.len()
        ));
    }
    Ok(report)
}

/// Compares the accepted publishes with the received messages.
fn exactly_once(accepted: &[u64], received: &[u64]) -> OverloadCheck {
    let mut times: HashMap<u64, u64> = HashMap::with_capacity(received.len());
    for &seq in received {
        *times.entry(seq).or_default() += 1;
    }
    let got = accepted.iter().filter(|s| times.contains_key(s)).count() as u64;
    let accepted_set: std::collections::HashSet<u64> = accepted.iter().copied().collect();
    OverloadCheck {
        accepted: accepted.len() as u64,
        received: got,
        silent_losses: accepted.len() as u64 - got,
        duplicates: times.values().map(|&n| n - 1).sum(),
        received_unacknowledged: times.keys().filter(|s| !accepted_set.contains(s)).count() as u64,
        delivered_ratio: ratio(got, accepted.len() as u64),
    }
}

/// A long-poll receiver of one channel that reconnects after a broken connection.
struct Receiver {
    addr: SocketAddr,
    path: String,
    conn: Option<HttpConn>,
}

impl Receiver {
    fn new(addr: SocketAddr, channel: &str) -> Receiver {
        Receiver {
            addr,
            path: format!("/v1/channels/{channel}/messages"),
            conn: None,
        }
    }

    /// One receive waiting up to `wait` seconds: the message's `seq`, or `None` on 204.
    async fn receive(&mut self, wait: f64) -> Result<Option<u64>, String> {
        #[derive(Deserialize)]
        struct Got {
            message: Stamp,
        }
        let conn = match self.conn.as_mut() {
            Some(conn) => conn,
            None => {
                let conn = HttpConn::connect(self.addr).await.map_err(|e| e.code)?;
                self.conn.insert(conn)
            }
        };
        match conn
            .request(Method::GET, &format!("{}?wait={wait}", self.path), None)
            .await
        {
            Ok((StatusCode::OK, body)) => serde_json::from_slice::<Got>(&body)
                .map(|got| Some(got.message.seq))
                .map_err(|_| "undecodable receive".to_string()),
            Ok((StatusCode::NO_CONTENT, _)) => Ok(None),
            Ok((status, body)) => Err(error_code(status, &body)),
            Err(code) => {
                self.conn = None;
                Err(code.to_string())
            }
        }
    }

    /// Receives until a wait of `wait` seconds finds the channel empty, retrying after
    /// errors, for at most `limit`.
    async fn receive_all(&mut self, wait: f64, limit: Duration) -> (Vec<u64>, Errors) {
        let deadline = Instant::now() + limit;
        let (mut seqs, mut errors) = (Vec::new(), Errors::new());
        while Instant::now() < deadline {
            match self.receive(wait).await {
                Ok(Some(seq)) => seqs.push(seq),
                Ok(None) => break,
                Err(code) => {
                    count(&mut errors, code, 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        (seqs, errors)
    }
}

/// The report fields that come from the publishers alone.
fn publisher_report(name: &str, schedule: &Schedule, published: &Published) -> Report {
    let publishes = published.accepted.len() as u64;
    let mut report = Report {
        scenario: name.into(),
        duration_s: schedule_elapsed(schedule, published),
        publishes,
        publishes_per_s: Some(publishes as f64 / schedule_elapsed(schedule, published)),
        errors: published.errors.clone(),
        send_lag: percentiles(published.send_lag_us.clone()),
        ..Report::default()
    };
    if let Some(detail) = &published.connect_error {
        report
            .notes
            .push(format!("first publisher connect error: {detail}"));
    }
    report
}

/// Seconds from the start of the load to the end of the last publisher.
fn schedule_elapsed(schedule: &Schedule, published: &Published) -> f64 {
    let end = published.end.unwrap_or_else(Instant::now);
    (end - schedule.start()).as_secs_f64().max(1e-6)
}

fn mode(rate: Option<f64>) -> String {
    match rate {
        Some(rate) => format!("open loop at {rate}/s"),
        None => "max rate (closed loop)".into(),
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

/// One channel name per subscriber, unique to this run.
fn channel_names(ctx: &Ctx<'_>, what: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("bench.{what}.{}.{i}", ctx.run_id))
        .collect()
}

/// Opens a subscriber of `group` on each channel, a few at a time; returns those that
/// connected, the errors of the others by code, and the first error's detail.
pub(super) async fn open_subscribers(
    addr: SocketAddr,
    ws: bool,
    group: &str,
    channels: &[String],
) -> (Vec<Subscriber>, Errors, Option<String>) {
    let results: Vec<_> = futures_util::stream::iter(channels)
        .map(|channel| async move {
            let open = async {
                if ws {
                    Subscriber::ws(addr, group, channel).await
                } else {
                    Subscriber::sse(addr, group, channel).await
                }
            };
            tokio::time::timeout(OPEN_TIMEOUT, open)
                .await
                .unwrap_or_else(|_| Err(("timeout".into(), "subscribing timed out".into())))
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .collect()
        .await;
    let (mut subs, mut errors, mut first) = (Vec::new(), Errors::new(), None);
    for result in results {
        match result {
            Ok(sub) => subs.push(sub),
            Err((code, detail)) => {
                count(&mut errors, code.clone(), 1);
                first.get_or_insert(if detail.is_empty() { code } else { detail });
            }
        }
    }
    (subs, errors, first)
}

/// Notes the first error of the subscribers that could not connect, if any.
pub(super) fn note_first_error(report: &mut Report, first_error: Option<String>) {
    if let Some(detail) = first_error {
        report
            .notes
            .push(format!("first subscriber error: {detail}"));
    }
}

/// Subscribers listening in their own tasks.
pub(super) struct Listening {
    delivered: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<Received>>,
}

impl Listening {
    pub(super) fn start(subs: Vec<Subscriber>) -> Listening {
        let delivered = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let tasks = subs
            .into_iter()
            .map(|sub| tokio::spawn(sub.listen(delivered.clone(), stop.clone())))
            .collect();
        Listening {
            delivered,
            stop,
            tasks,
        }
    }

    /// Waits until `expected` deliveries arrived, or none for [`DRAIN_IDLE`], or
    /// [`DRAIN_MAX`]; then stops the subscribers and merges what they measured.
    pub(super) async fn drain(self, expected: u64) -> Received {
        let deadline = Instant::now() + DRAIN_MAX;
        let (mut seen, mut since) = (self.delivered.load(Ordering::Relaxed), Instant::now());
        while seen < expected && Instant::now() < deadline && since.elapsed() < DRAIN_IDLE {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.delivered.load(Ordering::Relaxed);
            if now != seen {
                (seen, since) = (now, Instant::now());
            }
        }
        self.stop.cancel();
        let mut all = Received::default();
        for task in self.tasks {
            match task.await {
                Ok(got) => {
                    all.latencies_us.extend(got.latencies_us);
                    all.last = all.last.max(got.last);
                    merge(&mut all.errors, got.errors);
                }
                Err(_) => count(&mut all.errors, "subscriber panicked", 1),
            }
        }
        all
    }
}

/// Removes the bench's channels from `group` on a server that outlives the run.
async fn discard(addr: SocketAddr, group: &str, channels: &[String]) {
    let Ok(mut conn) = HttpConn::connect(addr).await else {
        return;
    };
    for channel in channels {
        let path = format!("/v1/groups/{group}/channels/{channel}");
        if conn.request(Method::DELETE, &path, None).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_once_counts_losses_duplicates_and_extras() {
        let check = exactly_once(&[1, 2, 3, 4], &[1, 2, 2, 4, 9]);
        assert_eq!(check.accepted, 4);
        assert_eq!(check.received, 3);
        assert_eq!(check.silent_losses, 1);
        assert_eq!(check.duplicates, 1);
        assert_eq!(check.received_unacknowledged, 1);
        assert_eq!(check.delivered_ratio, 0.75);
    }
}
