//! The server's Prometheus metrics: counters, gauges and histograms kept as the server
//! works (each a few atomic operations), and the layer's totals read at each scrape.
//! One set per process, so that every layer records into it without passing it around.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::layer::Stats;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One label and its value.
type Label = [(&'static str, &'static str); 1];

/// How a message reaches its receiver, or what a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// A plain HTTP request (a receive; a connection carrying no stream).
    Http,
    /// A server-sent event stream.
    Sse,
    /// A WebSocket.
    Ws,
}

impl Transport {
    const ALL: [Transport; 3] = [Transport::Http, Transport::Sse, Transport::Ws];

    fn label(self) -> Label {
        [(
            "transport",
            match self {
                Transport::Http => "http",
                Transport::Sse => "sse",
                Transport::Ws => "ws",
            },
        )]
    }
}

/// What a publish was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Publish {
    /// To one channel.
    Send,
    /// To a group.
    GroupSend,
}

/// A figure per transport, in [`Transport::ALL`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct PerTransport {
    pub(crate) http: u64,
    pub(crate) sse: u64,
    pub(crate) ws: u64,
}

/// The publishes accepted, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Published {
    pub(crate) send: u64,
    pub(crate) group_send: u64,
}

/// Every metric of the server.
pub(crate) struct Metrics {
    registry: Registry,
    published: [Counter; 2],
    deliveries: [Counter; 3],
    refused: Family<Label, Counter>,
    connections: [Gauge; 3],
    subscriptions: Gauge,
    publish_duration: Histogram,
    /// Seconds each flush of the store to disk took.
    pub(crate) flush_duration: Histogram,
    /// Writes each flush made durable.
    pub(crate) flush_batch_size: Histogram,
    expired: Counter,
    channels: Gauge,
    pending_messages: Gauge,
    groups: Gauge,
    memberships: Gauge,
    disk_bytes: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub(crate) fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("herald");
        let published = Family::<Label, Counter>::default();
        let deliveries = Family::<Label, Counter>::default();
        let connections = Family::<Label, Gauge>::default();
        let metrics = Metrics {
            published: [Publish::Send, Publish::GroupSend].map(|op| {
                published.get_or_create_owned(&[(
                    "op",
                    match op {
                        Publish::Send => "send",
                        Publish::GroupSend => "group_send",
                    },
                )])
            }),
            deliveries: Transport::ALL.map(|t| deliveries.get_or_create_owned(&t.label())),
            connections: Transport::ALL.map(|t| connections.get_or_create_owned(&t.label())),
            refused: Family::default(),
            subscriptions: Gauge::default(),
            // 50 µs to about 13 s.
            publish_duration: Histogram::new(exponential_buckets(0.00005, 2.0, 19)),
            flush_duration: Histogram::new(exponential_buckets(0.00005, 2.0, 19)),
            flush_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 17)),
            expired: Counter::default(),
            channels: Gauge::default(),
            pending_messages: Gauge::default(),
            groups: Gauge::default(),
            memberships: Gauge::default(),
            disk_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "messages_published",
            "Publishes accepted (one per request), by operation",
            published,
        );
        registry.register(
            "deliveries",
            "Messages handed to a receiver or a stream, by transport",
            deliveries,
        );
        registry.register(
            "messages_expired",
            "Messages dropped unreceived at their expiry",
            metrics.expired.clone(),
        );
        registry.register(
            "requests_refused",
            "Requests and operations refused, by error code",
            metrics.refused.clone(),
        );
        registry.register(
            "connections",
            "Open client connections, by what they carry",
            connections,
        );
        let gauges = [
            (
                "subscriptions",
                "Running subscriptions (event streams and WebSocket subscribes)",
                &metrics.subscriptions,
            ),
            (
                "channels",
                "Channels holding pending messages",
                &metrics.channels,
            ),
            (
                "pending_messages",
                "Messages pending in all channels",
                &metrics.pending_messages,
            ),
            ("groups", "Groups with at least one member", &metrics.groups),
            (
                "memberships",
                "Group memberships in all groups",
                &metrics.memberships,
            ),
            (
                "disk_bytes",
                "Size of the data directory",
                &metrics.disk_bytes,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        let histograms = [
            (
                "publish_duration_seconds",
                "Time from a publish request to its acknowledgement",
                &metrics.publish_duration,
            ),
            (
                "flush_duration_seconds",
                "Time each flush of the store to disk took",
                &metrics.flush_duration,
            ),
            (
                "flush_batch_size",
                "Writes made durable by each flush",
                &metrics.flush_batch_size,
            ),
        ];
        for (name, help, histogram) in histograms {
            registry.register(name, help, histogram.clone());
        }
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts an accepted publish that began at `started`.
    pub(crate) fn published(&self, op: Publish, started: Instant) {
        self.published[op as usize].inc();
        self.publish_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// The publishes accepted so far.
    pub(crate) fn published_totals(&self) -> Published {
        Published {
            send: self.published[Publish::Send as usize].get(),
            group_send: self.published[Publish::GroupSend as usize].get(),
        }
    }

    /// The counter of deliveries over `transport`.
    pub(crate) fn deliveries(&self, transport: Transport) -> &Counter {
        &self.deliveries[transport as usize]
    }

    /// The deliveries so far.
    pub(crate) fn delivery_totals(&self) -> PerTransport {
        let [http, sse, ws] = self.deliveries.each_ref().map(Counter::get);
        PerTransport { http, sse, ws }
    }

    /// Counts a refusal with the API error `code`.
    pub(crate) fn refused(&self, code: &'static str) {
        self.refused.get_or_create(&[("code", code)]).inc();
    }

    /// Makes `codes` appear (at 0) before their first refusal.
    pub(crate) fn know_refusals(&self, codes: impl IntoIterator<Item = &'static str>) {
        for code in codes {
            drop(self.refused.get_or_create(&[("code", code)]));
        }
    }

    /// The open connections, by what they carry.
    pub(crate) fn connection_totals(&self) -> PerTransport {
        let [http, sse, ws] = self
            .connections
            .each_ref()
            .map(|g| g.get().max(0).unsigned_abs());
        PerTransport { http, sse, ws }
    }

    /// The running subscriptions.
    pub(crate) fn subscription_total(&self) -> u64 {
        self.subscriptions.get().max(0).unsigned_abs()
    }

    /// Counts messages dropped at their expiry.
    pub(crate) fn expired(&self, n: u64) {
        self.expired.inc_by(n);
    }

    /// The text exposition of every metric, with the layer's totals `stats` read now.
    pub(crate) fn render(&self, stats: &Stats) -> String {
        let gauge = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.channels, stats.channels as u64);
        gauge(&self.pending_messages, stats.pending_messages as u64);
        gauge(&self.groups, stats.groups as u64);
        gauge(&self.memberships, stats.memberships as u64);
        gauge(&self.disk_bytes, stats.disk_bytes);
        let mut text = String::with_capacity(8 * 1024);
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

/// An open connection, counted under what it carries until dropped.
pub(crate) struct Connection(());

impl Connection {
    /// Counts a connection newly opened (carrying plain HTTP).
    pub(crate) fn open() -> Self {
        metrics().connections[Transport::Http as usize].inc();
        Connection(())
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        metrics().connections[Transport::Http as usize].dec();
    }
}

/// A connection counted under `transport` instead of plain HTTP while this lives (an
/// event stream's or a WebSocket's time on its connection).
pub(crate) struct Carrying(Transport);

impl Carrying {
    pub(crate) fn new(transport: Transport) -> Self {
        let connections = &metrics().connections;
        connections[Transport::Http as usize].dec();
        connections[transport as usize].inc();
        Carrying(transport)
    }
}

impl Drop for Carrying {
    fn drop(&mut self) {
        let connections = &metrics().connections;
        connections[self.0 as usize].dec();
        connections[Transport::Http as usize].inc();
    }
}

/// A running subscription, counted until dropped.
pub(crate) struct Subscribed(());

impl Subscribed {
    pub(crate) fn new() -> Self {
        metrics().subscriptions.inc();
        Subscribed(())
    }
}

impl Drop for Subscribed {
    fn drop(&mut self) {
        metrics().subscriptions.dec();
    }
}
