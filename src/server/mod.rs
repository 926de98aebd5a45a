//! Running Herald: open the layer, serve the API on a listener, sweep expired data in
//! the background, and on the shutdown signal stop accepting, end streams, finish
//! in-flight requests and flush, within `server.shutdown_timeout_secs`.

mod client_stream;
mod connection;
mod direct;
mod phase;
mod slots;

use std::any::Any;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AuthSettings, ConfigError, Settings};
use crate::http::{self, Api};
use crate::layer::clock::SystemClock;
use crate::layer::{self, ChannelLayer};
use crate::store::StoreError;
use client_stream::Timing;
use slots::Slots;

/// Every route of the API, as one warp filter.
type Routes = warp::filters::BoxedFilter<(warp::reply::Response,)>;

/// A connection whose client takes nothing of a write for this many times
/// `slow_consumer_secs` is closed. By then its stream was cut off for slowness, and the
/// client had time to read the end of it (a WebSocket close 1008) had it read at all.
const STALL_FACTOR: u32 = 4;

/// How long the accept loop pauses after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most this many connections turned away are being answered at once; past that,
/// one is closed at once.
const REFUSALS: usize = 256;

/// File descriptors kept for everything but client connections: the database, the
/// listener, the log, and the connections being turned away.
const RESERVED_FILES: u64 = 64 + REFUSALS as u64;

/// Opens the channel layer described by `settings` (blocking work, done off the runtime).
/// A panic while opening (sled asserts on some damaged files) becomes an error that
/// names the data directory.
pub async fn open_layer(settings: &Settings) -> Result<ChannelLayer, layer::Error> {
    let settings = settings.clone();
    let data_dir = settings.storage.data_dir.clone();
    tokio::task::spawn_blocking(move || ChannelLayer::open(&settings, Arc::new(SystemClock)))
        .await
        .unwrap_or_else(|e| Err(open_failed(&data_dir, e)))
}

/// The error for an open that panicked (or was cancelled).
fn open_failed(data_dir: &Path, e: JoinError) -> layer::Error {
    let detail = match e.try_into_panic() {
        Ok(payload) => format!(
            "the storage library failed while reading it: {}",
            panic_message(payload.as_ref())
        ),
        Err(e) => format!("opening it did not finish: {e}"),
    };
    StoreError::Corrupt {
        path: data_dir.to_path_buf(),
        detail,
    }
    .into()
}

/// The text of a panic payload, on one line.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where the server listens: the API's address and, with `server.metrics_listen`, the
/// metrics' (bound before the data is opened, so that `/readyz` can answer meanwhile).
pub struct Listeners {
    /// `server.listen`: the API, the probes, `/metrics` (admin) and the console.
    pub api: TcpListener,
    /// `server.metrics_listen`: `/metrics` without access control, and the probes.
    pub metrics: Option<TcpListener>,
}

/// Serves on `listeners`: `/healthz` and a 503 `/readyz` while `opening` opens the
/// layer, then the API until `shutdown` completes, then shuts down gracefully (while
/// new connections get the draining answers). `ready` is called once the API is served.
/// On SIGHUP the `[auth]` settings are read again with `reload` and replace the old
/// ones if they are valid. Fails when the layer does not open or `settings.auth` does
/// not compile.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    opening: impl Future<Output = Result<ChannelLayer, layer::Error>>,
    shutdown: impl Future<Output = ()>,
    reload: Reload,
    ready: impl FnOnce(),
) -> Result<(), layer::Error> {
    let timeout = Duration::from_secs(settings.server.shutdown_timeout_secs);
    let timing = Arc::new(Timing {
        stall: Duration::from_secs(settings.server.slow_consumer_secs).saturating_mul(STALL_FACTOR),
        idle: Duration::from_secs(settings.server.idle_timeout_secs),
        request: Duration::from_secs(settings.server.request_timeout_secs),
        timed_out: direct::whole(http::head_timed_out()).await,
    });
    let slots = Slots::new(
        fit_connections(settings.server.max_connections),
        settings.limits.max_connections_per_client,
    );
    let api_listener = Arc::new(listeners.api);
    let metrics_listener = listeners.metrics.map(Arc::new);
    // Serves as `api` says on the API's address and as `metrics` says on the metrics'
    // until `stop`.
    let serve_all = |api: Serving, metrics: Serving, stop: &CancellationToken| {
        let mut tasks = vec![tokio::spawn(serve(
            api_listener.clone(),
            api,
            stop.clone(),
            slots.clone(),
            timing.clone(),
        ))];
        if let Some(listener) = &metrics_listener {
            tasks.push(tokio::spawn(serve(
                listener.clone(),
                metrics,
                stop.clone(),
                slots.clone(),
                timing.clone(),
            )));
        }
        tasks
    };

    // While the data opens: the probes say so, other requests wait for the API.
    let token = CancellationToken::new();
    let starting = CancellationToken::new();
    let (api_routes, api_waiting) = watch::channel(None);
    let (metrics_routes, metrics_waiting) = watch::channel(None);
    let early = |api: watch::Receiver<Option<Routes>>| {
        Serving::Early(connection::Early {
            unready: http::unready(http::Unready::Starting),
            api,
            api_stop: token.clone(),
        })
    };
    let early = serve_all(early(api_waiting), early(metrics_waiting), &starting);
    let opened = opening.await;
    let layer = match opened {
        Ok(layer) => layer,
        Err(e) => {
            starting.cancel();
            return Err(e);
        }
    };

    let api = Api::new(layer.clone(), &settings, token.clone())?;
    let sweeper = tokio::spawn(sweep(
        layer.clone(),
        Duration::from_millis(settings.storage.sweep_interval_ms),
        token.clone(),
    ));
    let lease_timer = tokio::spawn(end_leases(layer.clone(), token.clone()));
    let watchdog = tokio::spawn(http::subscription::watchdog(api.clone()));
    let access_watch = tokio::spawn(http::subscription::access_watch(api.clone()));
    let reloader = tokio::spawn(reload.serve(api.clone(), token.clone()));
    let background = api.background.clone();
    let (routes, metrics) = (http::routes(api.clone()), http::metrics_routes(api));
    api_routes.send_replace(Some(routes.clone()));
    metrics_routes.send_replace(Some(metrics.clone()));
    // The early loops stop accepting before the API's start, so that a connection made
    // once the server is ready is the API's.
    starting.cancel();
    let early_connections = trackers(early).await;
    let servers = serve_all(Serving::Routes(routes), Serving::Routes(metrics), &token);
    ready();
    shutdown.await;
    tracing::info!("shutting down: ending streams, answering new connections 503");
    token.cancel();
    let draining = CancellationToken::new();
    let unready = Serving::Routes(http::unready(http::Unready::Draining));
    serve_all(unready.clone(), unready, &draining);
    let mut connections = trackers(servers).await;
    connections.extend(early_connections);
    let closed = futures_util::future::join_all(connections.iter().map(TaskTracker::wait));
    if tokio::time::timeout(timeout, closed).await.is_err() {
        tracing::warn!(
            ?timeout,
            "connections still open at the shutdown timeout; closing them"
        );
    }
    background.close();
    if tokio::time::timeout(timeout, background.wait())
        .await
        .is_err()
    {
        tracing::warn!("clean-up of closed streams still running at the shutdown timeout");
    }
    let _ = sweeper.await;
    let _ = lease_timer.await;
    let _ = watchdog.await;
    let _ = access_watch.await;
    let _ = reloader.await;
    match tokio::task::spawn_blocking(move || layer.flush_to_disk()).await {
        Ok(Ok(())) => tracing::info!("storage flushed"),
        Ok(Err(e)) => tracing::error!(error = %e, "final flush failed"),
        Err(e) => tracing::error!(error = %e, "final flush failed"),
    }
    draining.cancel();
    Ok(())
}

/// How an accept loop serves the connections it accepts.
#[derive(Clone)]
enum Serving {
    /// With these routes.
    Routes(Routes),
    /// As [`connection::serve_early`] does, while the data opens.
    Early(connection::Early),
}

/// The connections of the accept loops `loops`, once they stopped accepting.
async fn trackers(loops: Vec<JoinHandle<TaskTracker>>) -> Vec<TaskTracker> {
    futures_util::future::join_all(loops)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// What SIGHUP does: read the `[auth]` settings again and put them in force.
pub struct Reload {
    hangups: tokio::signal::unix::Signal,
    read: Box<dyn Fn() -> Result<AuthSettings, ConfigError> + Send>,
}

impl Reload {
    /// Installs the SIGHUP handler (before the server announces itself, so that an
    /// early SIGHUP does not end the process); `read` reads the settings again.
    pub fn install(
        read: impl Fn() -> Result<AuthSettings, ConfigError> + Send + 'static,
    ) -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Reload {
            hangups: signal(SignalKind::hangup())?,
            read: Box::new(read),
        })
    }

    /// Reloads at every SIGHUP until `stop`; a reload that fails keeps the settings in
    /// force and logs why.
    async fn serve(mut self, api: Api, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.hangups.recv() => {}
            }
            if let Err(e) = (self.read)().and_then(|auth| api.reload_auth(&auth)) {
                tracing::error!(
                    error = %e,
                    "SIGHUP: [auth] not reloaded; the previous settings stay in force"
                );
            }
        }
    }
}

/// Raises the soft limit on open files to the hard one, and returns how many
/// connections fit under it: `wanted`, or fewer (logged) when the limit leaves no room
/// for them and [`RESERVED_FILES`].
fn fit_connections(wanted: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not read the open-file limit");
        return wanted;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let room = usize::try_from(limit.rlim_cur.saturating_sub(RESERVED_FILES)).unwrap_or(usize::MAX);
    if wanted <= room {
        return wanted;
    }
    let effective = room.max(1);
    tracing::warn!(
        configured = wanted,
        effective,
        open_files = limit.rlim_cur,
        "server.max_connections lowered to fit the open-file limit (RLIMIT_NOFILE)"
    );
    effective
}

/// Accepts connections and serves each ([`connection::serve`]) until `stop` is
/// cancelled; then stops accepting and returns the connections, which finish their
/// in-flight request or stream and close (the tracker tells when all have). A connection takes its slot when it is
/// accepted; one that finds none is answered and closed ([`direct::refuse`]). Our own
/// loop rather than `warp::serve`, for the slots, for `TCP_NODELAY` (an SSE event is one
/// small write that must not wait for an ACK) and for the lighter HTTP/1-only
/// connection state.
async fn serve(
    listener: Arc<TcpListener>,
    serving: Serving,
    stop: CancellationToken,
    slots: Arc<Slots>,
    timing: Arc<Timing>,
) -> TaskTracker {
    let connections = TaskTracker::new();
    let refusals = Arc::new(Semaphore::new(REFUSALS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: give connections time to close.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        match slots.take(peer.ip()) {
            Ok(slot) => {
                let (stop, timing) = (stop.clone(), timing.clone());
                match &serving {
                    Serving::Routes(routes) => connections.spawn(connection::serve(
                        stream,
                        slot,
                        peer,
                        routes.clone(),
                        stop,
                        timing,
                    )),
                    Serving::Early(early) => connections.spawn(connection::serve_early(
                        stream,
                        slot,
                        peer,
                        early.clone(),
                        stop,
                        timing,
                    )),
                };
            }
            Err(why) => {
                if let Ok(answering) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        direct::refuse(stream, why).await;
                        drop(answering);
                    });
                }
            }
        }
    }
    drop(listener);
    connections.close();
    connections
}

/// Removes expired messages and lapsed memberships every `every`.
async fn sweep(layer: ChannelLayer, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let layer = layer.clone();
        match tokio::task::spawn_blocking(move || layer.sweep()).await {
            Ok(Ok(report)) if report != Default::default() => {
                tracing::debug!(?report, "swept");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "sweep failed"),
            Err(e) => tracing::error!(error = %e, "sweep task failed"),
        }
    }
}

/// How often leases that ran out are ended: a message comes back at most this long
/// after its lease.
const LEASE_TICK: Duration = Duration::from_millis(250);

/// Puts messages whose lease ran out back in their channels, every [`LEASE_TICK`].
async fn end_leases(layer: ChannelLayer, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(LEASE_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => layer.end_leases(),
        }
    }
}

/// Completes on SIGINT or SIGTERM. The handlers are installed by the call, so that a
/// signal that comes before the future is first polled still counts.
pub fn signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_while_opening_names_the_data_dir() {
        let join = tokio::task::spawn_blocking(|| -> () {
            std::panic::panic_any(String::from("duplicate segment\n  left: 1\n right: 2"))
        })
        .await
        .expect_err("the task panics");
        let text = open_failed(Path::new("/var/lib/herald"), join).to_string();
        assert!(text.contains("/var/lib/herald"), "{text}");
        assert!(text.contains("restore it from a backup"), "{text}");
        assert!(
            text.contains("duplicate segment left: 1 right: 2"),
            "{text}"
        );
    }
}
