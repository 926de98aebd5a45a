//! One client connection: an event-stream request that opens it is served directly
//! ([`super::direct`]); everything else is HTTP/1.1 served by hyper, with upgrades for
//! WebSocket. Either way the socket is a [`ClientStream`]: a write that stalls is given
//! up, an idle connection or a slow request head is closed, and the connection closes
//! without resetting what the client still sends.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use warp::http::{Request, StatusCode};

use super::client_stream::{ClientStream, Timing};
use super::phase::{Phase, Tracked};
use super::slots::Slot;
use super::{Routes, direct};
use crate::http::Peer;

/// Serves `stream` (from `peer`, holding `slot`) until the client or the server ends
/// it, the connection stays idle for too long, or the client takes nothing of a write
/// for the stall time.
pub async fn serve(
    stream: TcpStream,
    slot: Slot,
    peer: SocketAddr,
    routes: Routes,
    stop: CancellationToken,
    timing: Arc<Timing>,
) {
    let first = tokio::select! {
        _ = stop.cancelled() => return,
        first = tokio::time::timeout(timing.idle, direct::peek_event_stream(&stream)) => first,
    };
    let phase = Arc::new(Phase::default());
    let stream = ClientStream::new(stream, slot, phase.clone(), timing);
    let peer = Peer(peer.ip());
    match first {
        Err(_) => {}
        Ok(Some(request)) => {
            phase.stream_for_good();
            direct::respond(stream, request.with_peer(peer), routes).await;
        }
        // Boxed, so that an event stream's task is not as large as hyper's state.
        Ok(None) => Box::pin(serve_http(stream, peer, phase, routes, stop)).await,
    }
}

/// What a connection accepted while the data opens is served with.
#[derive(Clone)]
pub(crate) struct Early {
    /// The answers while starting: the probes, and requests that waited too long.
    pub unready: Routes,
    /// The API's routes, once it is served.
    pub api: watch::Receiver<Option<Routes>>,
    /// Cancelled when the API shuts down.
    pub api_stop: CancellationToken,
}

/// Serves a connection accepted while the data opens. A probe (`GET /healthz`, `GET
/// /readyz`) is answered at once with `early.unready` (the connection closes after
/// `stop`, once the API is served); any other request waits for the API, up to the
/// request timeout, and its connection is then the API's (else it gets the 503).
pub async fn serve_early(
    stream: TcpStream,
    slot: Slot,
    peer: SocketAddr,
    early: Early,
    stop: CancellationToken,
    timing: Arc<Timing>,
) {
    let Early {
        unready,
        mut api,
        api_stop,
    } = early;
    let probe = tokio::time::timeout(timing.request, is_probe(&stream)).await;
    if let Ok(false) = probe {
        let waited = tokio::time::timeout(timing.request, api.wait_for(Option::is_some)).await;
        let routes = waited.ok().and_then(|routes| routes.ok()?.clone());
        if let Some(routes) = routes {
            return serve(stream, slot, peer, routes, api_stop, timing).await;
        }
    }
    serve(stream, slot, peer, unready, stop, timing).await
}

/// Whether the connection's first bytes (waited for) are a probe's request line.
async fn is_probe(stream: &TcpStream) -> bool {
    let mut line = [0; 16];
    let n = stream.peek(&mut line).await.unwrap_or(0);
    let line = &line[..n];
    line.starts_with(b"GET /healthz ") || line.starts_with(b"GET /readyz ")
}

/// Serves HTTP/1.1 with hyper until the client closes, the server ends the connection,
/// or `stop` (after the request in flight). Each request carries the client's [`Peer`],
/// and the connection's [`Phase`] follows the requests: answering from a head to the end
/// of its response, streaming for good after an upgrade.
async fn serve_http(
    stream: ClientStream,
    peer: Peer,
    phase: Arc<Phase>,
    routes: Routes,
    stop: CancellationToken,
) {
    let routes = TowerToHyperService::new(warp::service(routes));
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(peer);
        phase.answering();
        let phase = phase.clone();
        let answer = hyper::service::Service::call(&routes, request);
        async move {
            let response = answer.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                phase.stream_for_good();
            }
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, phase)))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // The stream times idle connections and request heads itself (hyper would
        // close without a 408, and time idle connections as heads).
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
