//! Clients of the public API: one HTTP/1.1 keep-alive connection, a WebSocket, and the
//! SSE and WebSocket subscribers that time each delivery against its scheduled send.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::report::{Errors, count};
use super::since_base_us;

/// The longest a request may take, or a WebSocket publisher may wait for an ack: a
/// stalled server fails the request instead of hanging the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A WebSocket connection to `/v1/ws`.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A failed connection attempt: the error code (`connect`) and the OS error for the notes.
#[derive(Debug)]
pub struct ConnectError {
    pub code: &'static str,
    pub detail: String,
}

impl ConnectError {
    fn new(detail: impl ToString) -> ConnectError {
        ConnectError {
            code: "connect",
            detail: detail.to_string(),
        }
    }
}

/// One HTTP/1.1 keep-alive connection driven by hyper's low-level client: no pool, no
/// per-request allocation beyond the request itself.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl HttpConn {
    /// Opens a connection to `addr`.
    pub async fn connect(addr: SocketAddr) -> Result<HttpConn, ConnectError> {
        let stream = TcpStream::connect(addr).await.map_err(ConnectError::new)?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::new)?;
        // Ends when the sender is dropped or the server closes the connection.
        tokio::spawn(conn);
        Ok(HttpConn {
            sender,
            host: addr.to_string(),
        })
    }

    /// Sends one request and returns the status and the response body (headers only, for
    /// a stream).
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        json: Option<Bytes>,
    ) -> Result<hyper::Response<Incoming>, hyper::Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.host);
        if json.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(json.unwrap_or_default()))
            .expect("a valid request");
        self.sender.ready().await?;
        self.sender.send_request(request).await
    }

    /// Sends one request and reads the whole answer within [`REQUEST_TIMEOUT`]; fails
    /// with the error code `io` or `timeout`, after which the connection is unusable.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        json: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), &'static str> {
        let exchange = async {
            let response = self.send(method, path, json).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err("io"),
            Err(_) => Err("timeout"),
        }
    }
}

/// The error code of a non-2xx answer: status and `error.code`, e.g. `429 channel_full`.
pub fn error_code(status: StatusCode, body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: Code,
    }
    #[derive(Deserialize)]
    struct Code {
        code: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => format!("{} {}", status.as_u16(), b.error.code),
        Err(_) => status.as_u16().to_string(),
    }
}

/// Opens a WebSocket to `/v1/ws`.
pub async fn ws_connect(addr: SocketAddr) -> Result<Ws, ConnectError> {
    let url = format!("ws://{addr}/v1/ws");
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
        .await
        .map_err(ConnectError::new)?;
    Ok(ws)
}

/// The fields the bench reads from a published message: its sequence number and its
/// scheduled send time (µs since the process-wide base).
#[derive(Debug, Default, Deserialize)]
pub struct Stamp {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub ts: u64,
}

/// A WebSocket reply or push, as far as the bench reads it.
#[derive(Debug, Deserialize)]
pub struct Reply {
    pub op: String,
    #[serde(rename = "ref")]
    pub reference: Option<u64>,
    pub code: Option<String>,
    pub delivered: Option<u64>,
    pub full: Option<u64>,
    pub message: Option<Stamp>,
}

/// Sends one JSON request on `ws` and waits for its `ok`; any other answer is its error code.
pub async fn ws_call(ws: &mut Ws, request: String) -> Result<(), String> {
    ws.send(Frame::text(request))
        .await
        .map_err(|_| "io".to_string())?;
    while let Some(frame) = ws.next().await {
        let Ok(Frame::Text(text)) = frame else {
            continue;
        };
        let reply: Reply = serde_json::from_str(&text).map_err(|_| "invalid reply".to_string())?;
        return match reply.op.as_str() {
            "ok" => Ok(()),
            _ => Err(reply.code.unwrap_or(reply.op)),
        };
    }
    Err("closed".to_string())
}

/// A connected subscriber, whose membership is in place: its stream is open and it
/// awaits deliveries.
pub enum Subscriber {
    Sse(Incoming),
    Ws(Box<Ws>),
}

/// What a subscriber measured.
#[derive(Debug, Default)]
pub struct Received {
    pub latencies_us: Vec<u64>,
    pub last: Option<Instant>,
    pub errors: Errors,
}

impl Subscriber {
    /// Opens an SSE stream of `group` on channel `channel`.
    pub async fn sse(
        addr: SocketAddr,
        group: &str,
        channel: &str,
    ) -> Result<Subscriber, (String, String)> {
        let mut conn = HttpConn::connect(addr)
            .await
            .map_err(|e| (e.code.to_string(), e.detail))?;
        let path = format!("/v1/groups/{group}/events?channel={channel}");
        let response = conn
            .send(Method::GET, &path, None)
            .await
            .map_err(|e| ("io".to_string(), e.to_string()))?;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err((error_code(status, &body), String::new()));
        }
        Ok(Subscriber::Sse(response.into_body()))
    }

    /// Opens a WebSocket, adds `channel` to `group` and subscribes to it.
    pub async fn ws(
        addr: SocketAddr,
        group: &str,
        channel: &str,
    ) -> Result<Subscriber, (String, String)> {
        let mut ws = ws_connect(addr)
            .await
            .map_err(|e| (e.code.to_string(), e.detail))?;
        let add =
            format!(r#"{{"op":"group_add","ref":1,"group":"{group}","channel":"{channel}"}}"#);
        ws_call(&mut ws, add)
            .await
            .map_err(|code| (code, String::new()))?;
        let subscribe = format!(r#"{{"op":"subscribe","ref":2,"channel":"{channel}"}}"#);
        ws_call(&mut ws, subscribe)
            .await
            .map_err(|code| (code, String::new()))?;
        Ok(Subscriber::Ws(Box::new(ws)))
    }

    /// Receives until `stop`, timing each delivery (now − its scheduled send) and adding
    /// one to `delivered`.
    pub async fn listen(self, delivered: Arc<AtomicU64>, stop: CancellationToken) -> Received {
        let mut got = Received::default();
        let record = |stamp: Stamp, got: &mut Received| {
            got.latencies_us
                .push(since_base_us().saturating_sub(stamp.ts));
            got.last = Some(Instant::now());
            delivered.fetch_add(1, Ordering::Relaxed);
        };
        match self {
            Subscriber::Sse(mut body) => {
                let mut buf = BytesMut::new();
                loop {
                    let frame = tokio::select! {
                        _ = stop.cancelled() => break,
                        frame = body.frame() => frame,
                    };
                    match frame {
                        Some(Ok(frame)) => {
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            buf.extend_from_slice(&data);
                            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                                let line = buf.split_to(end + 1);
                                if let Some(json) = line.strip_prefix(b"data:") {
                                    match serde_json::from_slice::<Stamp>(json) {
                                        Ok(stamp) => record(stamp, &mut got),
                                        Err(_) => count(&mut got.errors, "sse undecodable", 1),
                                    }
                                }
                            }
                        }
                        Some(Err(_)) => {
                            count(&mut got.errors, "io", 1);
                            break;
                        }
                        None => {
                            count(&mut got.errors, "sse closed", 1);
                            break;
                        }
                    }
                }
            }
            Subscriber::Ws(mut ws) => {
                loop {
                    let frame = tokio::select! {
                        _ = stop.cancelled() => break,
                        frame = ws.next() => frame,
                    };
                    match frame {
                        Some(Ok(Frame::Text(text))) => match serde_json::from_str::<Reply>(&text) {
                            Ok(Reply {
                                op,
                                message: Some(stamp),
                                ..
                            }) if op == "message" => record(stamp, &mut got),
                            Ok(reply) => count(&mut got.errors, reply.code.unwrap_or(reply.op), 1),
                            Err(_) => count(&mut got.errors, "ws undecodable", 1),
                        },
                        Some(Ok(_)) => {}
                        Some(Err(_)) => {
                            count(&mut got.errors, "io", 1);
                            break;
                        }
                        None => {
                            count(&mut got.errors, "ws closed", 1);
                            break;
                        }
                    }
                }
                let _ = ws.close().await;
            }
        }
        got
    }
}
