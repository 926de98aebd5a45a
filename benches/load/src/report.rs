//! What a scenario measured, its percentiles, the markdown table and the JSON file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// Error counts by code: `429 channel_full`, `connect`, `io`, or a WebSocket error code.
pub type Errors = BTreeMap<String, u64>;

/// Adds `n` to the count of `code`.
pub fn count(errors: &mut Errors, code: impl Into<String>, n: u64) {
    if n > 0 {
        *errors.entry(code.into()).or_default() += n;
    }
}

/// Adds every count of `other` to `errors`.
pub fn merge(errors: &mut Errors, other: Errors) {
    for (code, n) in other {
        count(errors, code, n);
    }
}

/// Latency percentiles in milliseconds (nearest rank), over `count` samples.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The percentiles of samples in microseconds; `None` when there are none.
pub fn percentiles(mut samples_us: Vec<u64>) -> Option<Latency> {
    if samples_us.is_empty() {
        return None;
    }
    samples_us.sort_unstable();
    let n = samples_us.len();
    let at = |p: f64| {
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        samples_us[rank.clamp(1, n) - 1] as f64 / 1000.0
    };
    Some(Latency {
        count: n,
        p50_ms: at(50.0),
        p90_ms: at(90.0),
        p99_ms: at(99.0),
        max_ms: samples_us[n - 1] as f64 / 1000.0,
    })
}

/// The exactly-once check of the `overload` scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OverloadCheck {
    /// Publishes answered 202.
    pub accepted: u64,
    /// Distinct accepted messages the receiver got.
    pub received: u64,
    /// Accepted but never received: must be 0.
    pub silent_losses: u64,
    /// Received more than once.
    pub duplicates: u64,
    /// Received although their publish got no 202 (e.g. the connection broke after the send).
    pub received_unacknowledged: u64,
    /// received ÷ accepted.
    pub delivered_ratio: f64,
}

/// The memory figures of the `idle-sse` and `idle-ws` scenarios.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IdleMemory {
    pub connected: u64,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub kib_per_connection: f64,
}

/// Everything one scenario measured; one row of the table and one object of the JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    /// `max-rate (closed loop)` or `open loop at R/s`, plus the transports.
    pub mode: String,
    pub duration_s: f64,
    pub connections: usize,
    pub subscribers_requested: usize,
    pub subscribers_connected: usize,
    /// Publishes the server accepted (2xx or WebSocket `ok`).
    pub publishes: u64,
    pub publishes_per_s: Option<f64>,
    /// Messages the subscribers (or the receiver) got.
    pub deliveries: u64,
    pub deliveries_per_s: Option<f64>,
    /// Accepted publishes × connected subscribers (overload: accepted).
    pub expected: Option<u64>,
    /// deliveries ÷ expected.
    pub delivered_ratio: Option<f64>,
    /// Sum of the `delivered` counts that the group sends reported.
    pub reported_delivered: Option<u64>,
    /// Sum of the `full` counts (members skipped because full) that the group sends reported.
    pub reported_full: Option<u64>,
    /// What the latency measures: `publish ack` or `scheduled send to receive`.
    pub latency_kind: Option<String>,
    pub latency: Option<Latency>,
    /// Fan-out: the latency of the publishes' acknowledgements (due time to 2xx), to tell
    /// the durable write apart from the delivery.
    pub publish_latency: Option<Latency>,
    /// Open loop: how late the bench sent each publish after its due time (its own lag,
    /// included in the latencies).
    pub send_lag: Option<Latency>,
    pub errors: Errors,
    pub server_rss_mib: Option<f64>,
    pub server_peak_rss_mib: Option<f64>,
    /// CPU used during the load (from the first publish to the end of the drain), in %
    /// of one core: the server's and the bench's.
    /// A bench near 100 % means the figures are bounded by the client, not the server.
    pub server_cpu_percent: Option<f64>,
    pub bench_cpu_percent: Option<f64>,
    pub overload: Option<OverloadCheck>,
    pub idle: Option<IdleMemory>,
    pub notes: Vec<String>,
}

/// The run as a whole, for the JSON file.
#[derive(Debug, Serialize)]
pub struct Meta {
    pub date: String,
    pub host_cpus: i64,
    pub herald_version: &'static str,
    /// The bench's open-file limit after raising it.
    pub fd_limit: Option<u64>,
    pub options: serde_json::Value,
}

/// The markdown table: one row per scenario.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| scenario | publishes/s | deliveries/s | delivered/expected | p50 | p90 | p99 | max (ms) | errors | server RSS (MiB) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---|---:|\n",
    );
    for r in reports {
        let ms = |f: fn(&Latency) -> f64| {
            r.latency
                .as_ref()
                .map_or("-".to_string(), |l| format!("{:.2}", f(l)))
        };
        let delivered = match (r.expected, r.delivered_ratio) {
            (Some(expected), Some(ratio)) => {
                format!("{}/{} ({:.1} %)", r.deliveries, expected, ratio * 100.0)
            }
            _ => "-".to_string(),
        };
        let errors = if r.errors.is_empty() {
            "0".to_string()
        } else {
            r.errors
                .iter()
                .map(|(code, n)| format!("{code}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let rss = match (r.server_rss_mib, &r.idle) {
            (_, Some(idle)) => format!(
                "{:.1} → {:.1} ({:.1} KiB/conn)",
                idle.rss_before_mib, idle.rss_after_mib, idle.kib_per_connection
            ),
            (Some(rss), None) => format!("{rss:.1}"),
            (None, None) => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.publishes_per_s
                .map_or("-".to_string(), |p| format!("{p:.0}")),
            r.deliveries_per_s
                .map_or("-".to_string(), |d| format!("{d:.0}")),
            delivered,
            ms(|l| l.p50_ms),
            ms(|l| l.p90_ms),
            ms(|l| l.p99_ms),
            ms(|l| l.max_ms),
            errors,
            rss,
        );
    }
    out
}

/// The notes and latency kinds under the table, one line each.
pub fn notes(reports: &[Report]) -> String {
    let mut out = String::new();
    for r in reports {
        let _ = write!(out, "- {}: {}", r.scenario, r.mode);
        if let Some(kind) = &r.latency_kind {
            let _ = write!(out, "; latency = {kind}");
        }
        if let Some(l) = &r.publish_latency {
            let _ = write!(
                out,
                "; publish ack p50/p99 {:.2}/{:.2} ms",
                l.p50_ms, l.p99_ms
            );
        }
        if let Some(l) = &r.send_lag {
            let _ = write!(out, "; send lag p50/p99 {:.3}/{:.3} ms", l.p50_ms, l.p99_ms);
        }
        if let (Some(server), Some(bench)) = (r.server_cpu_percent, r.bench_cpu_percent) {
            let _ = write!(out, "; CPU: server {server:.0} %, bench {bench:.0} %");
        }
        if let Some(o) = &r.overload {
            let _ = write!(
                out,
                "; accepted {} received {} silent losses {} duplicates {}",
                o.accepted, o.received, o.silent_losses, o.duplicates
            );
        }
        for note in &r.notes {
            let _ = write!(out, "; {note}");
        }
        out.push('\n');
    }
    out
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date crate.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let l = percentiles((1..=100).map(|i| i * 1000).collect()).unwrap();
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        let one = percentiles(vec![1500]).unwrap();
        assert_eq!((one.p50_ms, one.max_ms), (1.5, 1.5));
        assert!(percentiles(Vec::new()).is_none());
    }

    #[test]
    fn utc_now_is_well_formed() {
        let now = utc_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
    }
}
