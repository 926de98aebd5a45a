//! Running Herald: open the layer, serve the API on a listener, sweep expired data in
//! the background, and on the shutdown signal stop accepting, end streams, finish
//! in-flight requests and flush, within `server.shutdown_timeout_secs`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::http::{self, Api};
use crate::layer::clock::SystemClock;
use crate::layer::{self, ChannelLayer};

/// Opens the channel layer described by `settings` (blocking work, done off the runtime).
pub async fn open_layer(settings: &Settings) -> Result<ChannelLayer, layer::Error> {
    let layer_settings = settings.layer.clone();
    let storage = settings.storage.clone();
    tokio::task::spawn_blocking(move || {
        ChannelLayer::open(&layer_settings, &storage, Arc::new(SystemClock))
    })
    .await
    .expect("opening the layer does not panic")
}

/// Serves `layer` on `listener` until `shutdown` completes, then shuts down gracefully.
pub async fn run(
    settings: Settings,
    layer: ChannelLayer,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let token = CancellationToken::new();
    let sweeper = tokio::spawn(sweep(
        layer.clone(),
        Duration::from_millis(settings.storage.sweep_interval_ms),
        token.clone(),
    ));
    let timeout = Duration::from_secs(settings.server.shutdown_timeout_secs);
    let api = Api::new(layer.clone(), settings.server, token.clone());
    let server = tokio::spawn(
        warp::serve(http::routes(api))
            .incoming(listener)
            .graceful(token.clone().cancelled_owned())
            .run(),
    );
    shutdown.await;
    tracing::info!("shutting down: no new connections, ending streams");
    token.cancel();
    if tokio::time::timeout(timeout, server).await.is_err() {
        tracing::warn!(
            ?timeout,
            "connections still open at the shutdown timeout; closing them"
        );
    }
    let _ = sweeper.await;
    match tokio::task::spawn_blocking(move || layer.flush_to_disk()).await {
        Ok(Ok(())) => tracing::info!("storage flushed; bye"),
        Ok(Err(e)) => tracing::error!(error = %e, "final flush failed"),
        Err(e) => tracing::error!(error = %e, "final flush failed"),
    }
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

/// Completes on SIGINT or SIGTERM.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
