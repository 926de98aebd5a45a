//! One client connection: an event-stream request that opens it is served directly
//! ([`super::direct`]); everything else is HTTP/1.1 served by hyper, with upgrades for
//! WebSocket. Either way the socket is a [`ClientStream`]: a write that stalls is given
//! up, and the connection closes without resetting what the client still sends.

use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::client_stream::ClientStream;
use super::{Routes, direct};

/// How long a client has to send its first request head (hyper's own limit for the
/// requests after it is the same).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `stream` until the client or the server ends it, or the client takes nothing
/// of a write for `stall`.
pub async fn serve(stream: TcpStream, routes: Routes, stop: CancellationToken, stall: Duration) {
    let first = tokio::select! {
        _ = stop.cancelled() => return,
        first = tokio::time::timeout(HEADER_READ_TIMEOUT, direct::peek_event_stream(&stream)) => first,
    };
    let stream = ClientStream::new(stream, stall);
    match first {
        Err(_) => {}
        Ok(Some(request)) => direct::respond(stream, request, routes).await,
        // Boxed, so that an event stream's task is not as large as hyper's state.
        Ok(None) => Box::pin(serve_http(stream, routes, stop)).await,
    }
}

/// Serves HTTP/1.1 with hyper until the client closes, the server ends the connection,
/// or `stop` (after the request in flight).
async fn serve_http(stream: ClientStream, routes: Routes, stop: CancellationToken) {
    let service = TowerToHyperService::new(warp::service(routes));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
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
