//! `herald-bench`: a load generator that starts (or targets) a Herald server and runs
//! named scenarios through the public API only, then prints a table and writes JSON.
//! A crate of its own, so that none of it is compiled into the server; `herald bench`
//! runs it when it is installed beside `herald`.
//!
//! # Layout
//! - [`server`]: the server under test (started per scenario, or `--url`), its RSS.
//! - [`clients`]: HTTP keep-alive, WebSocket, and the SSE and WebSocket subscribers.
//! - [`load`]: the open-loop or max-rate schedule and the publishers.
//! - [`scenario`]: the scenarios themselves.
//! - [`report`]: percentiles, the table and the JSON.

mod clients;
mod floor;
mod load;
mod report;
mod scenario;
mod server;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use serde::Serialize;

use load::Transport;
use report::{Meta, Report};
use scenario::Ctx;
use server::Server;

/// A named scenario of `herald bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// `--connections` HTTP keep-alive publishers, max rate or open loop at `--rate`.
    PublishHttp,
    /// The same over WebSocket, each connection with up to 8 requests in flight.
    PublishWs,
    /// `--subscribers` SSE subscribers of one group, a publisher at `--rate` (default 50/s).
    FanoutSse,
    /// The same with WebSocket subscribers.
    FanoutWs,
    /// fanout-sse with 100 subscribers at 10 publishes/s: light-load latency.
    Latency,
    /// `--subscribers` idle SSE streams: server RSS per connection.
    IdleSse,
    /// `--subscribers` idle WebSocket subscribers: server RSS per connection.
    IdleWs,
    /// Max-rate publishers into a small channel with one slow receiver: exactly-once check.
    Overload,
    /// fanout-sse against a stand-in that only writes (no Herald): the kernel's floor.
    FloorSse,
}

/// The scenarios run when none is named.
const DEFAULT_SCENARIOS: [Scenario; 6] = [
    Scenario::PublishHttp,
    Scenario::PublishWs,
    Scenario::FanoutSse,
    Scenario::FanoutWs,
    Scenario::Latency,
    Scenario::Overload,
];

/// Where `publish-http` and `publish-ws` publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PublishTarget {
    /// Group `bench-publish` (no members unless someone subscribes).
    Group,
    /// Channel `bench-publish` (fills at its capacity: 429 channel_full).
    Channel,
}

/// The options of `herald-bench`.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(
    name = "herald-bench",
    version,
    about = "Load generator for Herald: named scenarios through the public API"
)]
pub struct Options {
    /// Scenarios to run in order [default: publish-http publish-ws fanout-sse fanout-ws
    /// latency overload].
    #[arg(value_enum, value_name = "SCENARIO")]
    pub scenarios: Vec<Scenario>,
    /// Target this running server (loopback only, e.g. http://127.0.0.1:8080) instead
    /// of starting a fresh one per scenario.
    #[arg(long)]
    pub url: Option<String>,
    /// The pid of the `--url` server, for its RSS.
    #[arg(long, requires = "url")]
    pub server_pid: Option<u32>,
    /// Configuration file for the servers the bench starts.
    #[arg(long, value_name = "FILE", conflicts_with = "url")]
    pub server_config: Option<PathBuf>,
    /// The herald binary to start servers with [default: `herald` beside this program].
    #[arg(long, value_name = "PATH", env = "HERALD_BIN")]
    pub herald_bin: Option<PathBuf>,
    /// Pin the servers the bench starts to this CPU (`taskset -c N`).
    #[arg(long, value_name = "N", conflicts_with = "url")]
    pub server_cpu: Option<usize>,
    /// Seconds of load per scenario.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,
    /// Publishes per second in total: open loop for publish-*, the publisher rate of
    /// fanout-* [default: max rate for publish-*, 50 for fanout-*].
    #[arg(long)]
    pub rate: Option<f64>,
    /// Publisher connections of publish-* and overload.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Subscribers of fanout-* and idle-sse.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Publish to a group or to a channel (publish-*).
    #[arg(long, value_enum, default_value_t = PublishTarget::Group)]
    pub target: PublishTarget,
    /// Write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// No progress lines on stderr (the table is still printed).
    #[arg(long)]
    pub quiet: bool,
}

/// The fan-out rate when `--rate` is absent.
const FANOUT_RATE: f64 = 50.0;

static BASE: OnceLock<Instant> = OnceLock::new();

/// Microseconds from the process-wide base to `t`: the clock of every `ts` the bench
/// publishes and every latency it measures.
fn base_us(t: Instant) -> u64 {
    t.saturating_duration_since(*BASE.get_or_init(Instant::now))
        .as_micros() as u64
}

/// Microseconds from the process-wide base to now.
fn since_base_us() -> u64 {
    base_us(Instant::now())
}

fn main() -> std::process::ExitCode {
    match run(Options::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs every scenario, prints the table on stdout, and writes the JSON file.
fn run(opts: Options) -> Result<(), String> {
    validate(&opts)?;
    BASE.get_or_init(Instant::now);
    let fd_limit = raise_fd_limit();
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let reports = runtime.block_on(run_all(&opts))?;
    let failed = reports.iter().filter(|r| r.mode == FAILED).count();
    print!("{}", report::table(&reports));
    println!();
    print!("{}", report::notes(&reports));
    if let Some(path) = &opts.json {
        let meta = Meta {
            date: report::utc_now(),
            // SAFETY: sysconf has no preconditions.
            host_cpus: unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as i64,
            herald_version: env!("CARGO_PKG_VERSION"),
            fd_limit,
            options: serde_json::json!(opts),
        };
        let doc = serde_json::json!({ "meta": meta, "scenarios": reports });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    match failed {
        0 => Ok(()),
        n => Err(format!("{n} scenario(s) failed; see the notes")),
    }
}

/// The herald binary that serves: `--herald-bin`, or `herald` beside this program.
fn herald_bin(opts: &Options) -> Result<PathBuf, String> {
    let path = match &opts.herald_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program's path: {e}"))?
            .with_file_name("herald"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no herald binary at {}: build it (cargo build --release -p herald) or pass --herald-bin",
            path.display()
        ))
    }
}

/// The `mode` of a scenario that could not run.
const FAILED: &str = "FAILED";

async fn run_all(opts: &Options) -> Result<Vec<Report>, String> {
    let external = match &opts.url {
        Some(url) => Some(server::loopback_addr(url)?),
        None => None,
    };
    let scenarios = if opts.scenarios.is_empty() {
        DEFAULT_SCENARIOS.to_vec()
    } else {
        opts.scenarios.clone()
    };
    let mut reports = Vec::new();
    for scenario in scenarios {
        let name = scenario
            .to_possible_value()
            .map_or(String::new(), |v| v.get_name().to_string());
        let mut server = match external {
            Some(addr) => Server::external(addr, opts.server_pid),
            None => match Server::start(
                &herald_bin(opts)?,
                opts.server_config.as_deref(),
                opts.server_cpu,
            )
            .await
            {
                Ok(server) => server,
                Err(e) => {
                    reports.push(failed(&name, e));
                    continue;
                }
            },
        };
        let ctx = Ctx {
            server: &server,
            opts,
            run_id: std::process::id(),
        };
        // Every loop is bounded by itself; this is the backstop against a hung server.
        let limit = Duration::from_secs_f64(opts.duration) + Duration::from_secs(300);
        let result = tokio::time::timeout(limit, run_one(&ctx, scenario, &name)).await;
        let mut report = match result {
            Ok(Ok(report)) => report,
            Ok(Err(e)) => failed(&name, e),
            Err(_) => failed(&name, format!("did not finish within {limit:?}")),
        };
        if let Some((rss, peak)) = server.rss_mib() {
            report.server_rss_mib = Some(rss);
            report.server_peak_rss_mib = Some(peak);
        }
        if let Some(exit) = server.exited() {
            report.notes.push(exit);
        }
        server.stop().await;
        reports.push(report);
    }
    Ok(reports)
}

async fn run_one(ctx: &Ctx<'_>, scenario: Scenario, name: &str) -> Result<Report, String> {
    let opts = ctx.opts;
    let rate = opts.rate.unwrap_or(FANOUT_RATE);
    match scenario {
        Scenario::PublishHttp => scenario::publish(ctx, name, Transport::Http).await,
        Scenario::PublishWs => scenario::publish(ctx, name, Transport::Ws).await,
        Scenario::FanoutSse => scenario::fanout(ctx, name, false, opts.subscribers, rate).await,
        Scenario::FanoutWs => scenario::fanout(ctx, name, true, opts.subscribers, rate).await,
        Scenario::Latency => scenario::fanout(ctx, name, false, 100, 10.0).await,
        Scenario::IdleSse => scenario::idle(ctx, name, false).await,
        Scenario::IdleWs => scenario::idle(ctx, name, true).await,
        Scenario::Overload => scenario::overload(ctx, name).await,
        Scenario::FloorSse => floor::floor_sse(ctx, name, opts.subscribers, rate).await,
    }
}

fn failed(name: &str, why: String) -> Report {
    eprintln!("bench: {name} failed: {why}");
    Report {
        scenario: name.into(),
        mode: FAILED.into(),
        notes: vec![why],
        ..Report::default()
    }
}

fn validate(opts: &Options) -> Result<(), String> {
    if !(opts.duration > 0.0 && opts.duration <= 3600.0) {
        return Err("--duration must be between 0 and 3600 seconds".into());
    }
    if opts.rate.is_some_and(|r| !(r > 0.0 && r <= 1e7)) {
        return Err("--rate must be above 0 and at most 10000000".into());
    }
    if !(1..=10_000).contains(&opts.connections) {
        return Err("--connections must be between 1 and 10000".into());
    }
    if opts.subscribers > 100_000 {
        return Err("--subscribers must be at most 100000".into());
    }
    Ok(())
}

/// Raises this process's open-file soft limit to its hard limit, for thousands of
/// subscribers (and the servers it starts inherit it); returns the new soft limit.
fn raise_fd_limit() -> Option<libc::rlim_t> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write or read only the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return None;
            }
        }
    }
    Some(limit.rlim_cur)
}
