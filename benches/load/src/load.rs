//! The publishers: a shared schedule (open loop at a fixed rate, or max rate) and the
//! HTTP and WebSocket publishing loops that every publishing scenario uses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::Method;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message as Frame;

use super::clients::{ConnectError, HttpConn, REQUEST_TIMEOUT, Reply, Ws, error_code, ws_connect};
use super::report::{Errors, count, merge};
use super::since_base_us;

/// A WebSocket publisher keeps at most this many requests unacknowledged.
pub const WS_WINDOW: usize = 8;

/// Open-loop rates up to this many publishes/s are timed precisely (see [`Schedule::wait`]).
const PRECISE_RATE: f64 = 200.0;
/// How long before a due time a precise wait stops sleeping and starts yielding.
const PRECISE_SPAN: Duration = Duration::from_micros(1500);

/// Padding that brings a bench message to about 100 bytes of JSON.
const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// When each publish is due. With a rate, publish `seq` is due at `start + seq / rate`
/// whatever happened before (open loop): a late send counts in its latency, so there is
/// no coordinated omission. Without one, each is due when a connection is free.
pub struct Schedule {
    start: Instant,
    end: Instant,
    rate: Option<f64>,
    next: AtomicU64,
}

impl Schedule {
    /// A schedule that starts now and lasts `duration`.
    pub fn new(duration: Duration, rate: Option<f64>) -> Arc<Schedule> {
        let start = Instant::now();
        Arc::new(Schedule {
            start,
            end: start + duration,
            rate,
            next: AtomicU64::new(0),
        })
    }

    /// Claims the next publish: its sequence number and due time, or `None` once the
    /// run is over.
    pub fn claim(&self) -> Option<(u64, Instant)> {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let due = match self.rate {
            Some(rate) => self.start + Duration::from_secs_f64(seq as f64 / rate),
            None => Instant::now(),
        };
        (due < self.end).then_some((seq, due))
    }

    /// Waits until `due`. Tokio's timer has a resolution of 1 ms, which would add up to
    /// 1 ms of client lag to every latency; at rates up to [`PRECISE_RATE`] the last
    /// stretch is spent yielding instead, which costs at most that much CPU.
    pub async fn wait(&self, due: Instant) {
        if !self.rate.is_some_and(|rate| rate <= PRECISE_RATE) {
            tokio::time::sleep_until(due.into()).await;
            return;
        }
        if let Some(early) = due.checked_sub(PRECISE_SPAN) {
            tokio::time::sleep_until(early.into()).await;
        }
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
    }

    /// Whether publishes are due at a fixed rate (open loop), so their send lag matters.
    pub fn open_loop(&self) -> bool {
        self.rate.is_some()
    }

    /// When the load started.
    pub fn start(&self) -> Instant {
        self.start
    }
}

/// The bench message `{"type":"bench","seq":N,"ts":T,"pad":"..."}`, with `ts` its due
/// time in µs since the process-wide base.
pub fn message(seq: u64, due: Instant) -> String {
    let ts = super::base_us(due);
    format!(r#"{{"type":"bench","seq":{seq},"ts":{ts},"pad":"{PAD}"}}"#)
}

/// Where publishes go: a group (`group_send`) or a channel (`send`).
#[derive(Debug, Clone)]
pub enum Destination {
    Group(String),
    Channel(String),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Group(g) => write!(f, "group {g}"),
            Destination::Channel(c) => write!(f, "channel {c}"),
        }
    }
}

impl Destination {
    /// The HTTP path of a publish.
    fn path(&self) -> String {
        match self {
            Destination::Group(g) => format!("/v1/groups/{g}/messages"),
            Destination::Channel(c) => format!("/v1/channels/{c}/messages"),
        }
    }

    /// The WebSocket request of a publish.
    fn ws_request(&self, seq: u64, message: &str) -> String {
        match self {
            Destination::Group(g) => {
                format!(r#"{{"op":"group_send","ref":{seq},"group":"{g}","message":{message}}}"#)
            }
            Destination::Channel(c) => {
                format!(r#"{{"op":"send","ref":{seq},"channel":"{c}","message":{message}}}"#)
            }
        }
    }
}

/// What the publishers did.
#[derive(Debug, Default)]
pub struct Published {
    /// Sequence numbers of the accepted publishes.
    pub accepted: Vec<u64>,
    /// Sums of the `delivered` and `full` counts of group sends.
    pub reported_delivered: u64,
    pub reported_full: u64,
    /// Latency of each accepted publish: from its due time to its acknowledgement.
    pub latencies_us: Vec<u64>,
    /// Open loop: how late each publish went out (the client's own lag), in µs.
    pub send_lag_us: Vec<u64>,
    pub errors: Errors,
    /// The first connection error, for the notes (e.g. "Too many open files").
    pub connect_error: Option<String>,
    /// When the last publisher finished.
    pub end: Option<Instant>,
}

impl Published {
    fn accept(&mut self, seq: u64, due: Instant, delivered: Option<u64>, full: Option<u64>) {
        self.accepted.push(seq);
        self.latencies_us
            .push(since_base_us().saturating_sub(super::base_us(due)));
        self.reported_delivered += delivered.unwrap_or(0);
        self.reported_full += full.unwrap_or(0);
    }

    /// Notes that a publish due at `due` is being sent now.
    fn sending(&mut self, schedule: &Schedule, due: Instant) {
        if schedule.open_loop() {
            self.send_lag_us
                .push(since_base_us().saturating_sub(super::base_us(due)));
        }
    }

    fn merge(&mut self, other: Published) {
        self.accepted.extend(other.accepted);
        self.reported_delivered += other.reported_delivered;
        self.reported_full += other.reported_full;
        self.latencies_us.extend(other.latencies_us);
        self.send_lag_us.extend(other.send_lag_us);
        merge(&mut self.errors, other.errors);
        self.connect_error = self.connect_error.take().or(other.connect_error);
        self.end = self.end.max(other.end);
    }
}

/// The transport of the publishers.
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    Http,
    Ws,
}

/// Opens `connections` publisher connections, then starts a schedule of `duration` at
/// `rate` (so that no publish waits for a connection to open) and runs the publishers
/// on it until it ends. Returns the schedule and the sum of what the publishers did.
pub async fn publish(
    addr: SocketAddr,
    transport: Transport,
    destination: Destination,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> (Arc<Schedule>, Published) {
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        opened.push(match transport {
            Transport::Http => Connection::Http(HttpConn::connect(addr).await),
            Transport::Ws => Connection::Ws(ws_connect(addr).await.map(Box::new)),
        });
    }
    let schedule = Schedule::new(duration, rate);
    let tasks: Vec<_> = opened
        .into_iter()
        .map(|connection| {
            let (destination, schedule) = (destination.clone(), schedule.clone());
            tokio::spawn(async move {
                match connection {
                    Connection::Http(conn) => {
                        publish_http(addr, conn, &destination, &schedule).await
                    }
                    Connection::Ws(ws) => publish_ws(ws, &destination, &schedule).await,
                }
            })
        })
        .collect();
    let mut total = Published::default();
    for task in tasks {
        match task.await {
            Ok(published) => total.merge(published),
            Err(_) => count(&mut total.errors, "publisher panicked", 1),
        }
    }
    (schedule, total)
}

/// A publisher's connection, opened before the schedule starts.
enum Connection {
    Http(Result<HttpConn, ConnectError>),
    Ws(Result<Box<Ws>, ConnectError>),
}

/// One HTTP keep-alive publisher; reconnects after an I/O error.
async fn publish_http(
    addr: SocketAddr,
    opened: Result<HttpConn, ConnectError>,
    destination: &Destination,
    schedule: &Schedule,
) -> Published {
    #[derive(Deserialize)]
    struct Accepted {
        delivered: Option<u64>,
        full: Option<u64>,
    }
    let path = destination.path();
    let mut out = Published::default();
    let mut conn = match opened {
        Ok(conn) => Some(conn),
        Err(e) => {
            count(&mut out.errors, e.code, 1);
            out.connect_error = Some(e.detail);
            None
        }
    };
    while let Some((seq, due)) = schedule.claim() {
        schedule.wait(due).await;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match HttpConn::connect(addr).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    count(&mut out.errors, e.code, 1);
                    out.connect_error.get_or_insert(e.detail);
                    // Bounded by the schedule; the pause keeps a dead server from spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let body = Bytes::from(message(seq, due));
        out.sending(schedule, due);
        match c.request(Method::POST, &path, Some(body)).await {
            Ok((status, body)) if status.is_success() => {
                let counts = serde_json::from_slice::<Accepted>(&body).ok();
                out.accept(
                    seq,
                    due,
                    counts.as_ref().and_then(|a| a.delivered),
                    counts.as_ref().and_then(|a| a.full),
                );
            }
            Ok((status, body)) => count(&mut out.errors, error_code(status, &body), 1),
            Err(code) => {
                count(&mut out.errors, code, 1);
                conn = None;
            }
        }
    }
    out.end = Some(Instant::now());
    out
}

/// One WebSocket publisher with up to [`WS_WINDOW`] requests in flight, matched to
/// their acks by `ref`.
async fn publish_ws(
    opened: Result<Box<Ws>, ConnectError>,
    destination: &Destination,
    schedule: &Schedule,
) -> Published {
    let mut out = Published::default();
    let mut ws = match opened {
        Ok(ws) => *ws,
        Err(e) => {
            count(&mut out.errors, e.code, 1);
            out.connect_error = Some(e.detail);
            out.end = Some(Instant::now());
            return out;
        }
    };
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut next = schedule.claim();
    while next.is_some() || !in_flight.is_empty() {
        let due = next.filter(|_| in_flight.len() < WS_WINDOW);
        tokio::select! {
            _ = schedule.wait(due.map_or(schedule.end, |(_, at)| at)), if due.is_some() => {
                let (seq, at) = due.expect("guarded");
                out.sending(schedule, at);
                let request = destination.ws_request(seq, &message(seq, at));
                if ws.send(Frame::text(request)).await.is_err() {
                    count(&mut out.errors, "io", 1 + in_flight.len() as u64);
                    break;
                }
                in_flight.insert(seq, at);
                next = schedule.claim();
            }
            frame = tokio::time::timeout(REQUEST_TIMEOUT, ws.next()), if !in_flight.is_empty() => {
                let reply = match frame {
                    Ok(Some(Ok(Frame::Text(text)))) => serde_json::from_str::<Reply>(&text).ok(),
                    Ok(Some(Ok(_))) => continue,
                    Ok(_) => {
                        count(&mut out.errors, "io", in_flight.len() as u64);
                        break;
                    }
                    Err(_) => {
                        count(&mut out.errors, "timeout", in_flight.len() as u64);
                        break;
                    }
                };
                let Some(reply) = reply else {
                    count(&mut out.errors, "ws undecodable", 1);
                    continue;
                };
                let Some(at) = reply.reference.and_then(|r| in_flight.remove(&r)) else {
                    count(&mut out.errors, reply.code.unwrap_or(reply.op), 1);
                    continue;
                };
                match reply.op.as_str() {
                    "ok" => out.accept(reply.reference.unwrap_or_default(), at, reply.delivered, reply.full),
                    _ => count(&mut out.errors, reply.code.unwrap_or(reply.op), 1),
                }
            }
        }
    }
    let _ = ws.close(None).await;
    out.end = Some(Instant::now());
    out
}
