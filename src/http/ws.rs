//! The WebSocket protocol at `/v1/ws`: every layer operation as a request frame with an
//! `op` and an optional `ref` echoed in its reply. Text frames carry JSON, binary frames
//! msgpack, and each reply uses the encoding of its request.
//!
//! Requests are handled in order, one at a time, so that one client's sends keep their
//! order; only `receive`, which may wait, runs on its own. Subscriptions push their
//! messages through the same bounded outbox as replies.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rmpv::Value;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as Frame};
use tokio_util::sync::CancellationToken;
use warp::http::StatusCode;
use warp::http::header::{CONNECTION, HeaderMap, HeaderValue, SEC_WEBSOCKET_ACCEPT, UPGRADE};
use warp::reply::Response;
use warp::{Filter, Rejection};

use super::access::Credentials;
use super::body::body_limit;
use super::error::{ApiError, ErrorKind, quoted};
use super::handlers::{membership, parse_lease, parse_wait};
use super::reply::{ChannelReply, Echo, Format, Gap, GroupSent, Id};
use super::subscription::{Leasing, Push, Spec, Subscription, resume_point};
use super::{Api, DECODE_INLINE_BYTES, Peer, blocking};
use crate::auth::{Held, Need, Target};
use crate::layer::LeaseTerms;
use crate::layer::Revoker;
use crate::message::{MAX_FIELD_BYTES, Message, Request as FieldsOf, parse_json_at};
use crate::metrics::{Carrying, Publish, Transport, metrics};

/// Frames waiting to be written to one socket.
const OUTBOX: usize = 64;
/// Most `receive` requests one connection may have waiting at once.
const MAX_PENDING_RECEIVES: usize = 64;

/// Close codes used by the server.
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_POLICY: u16 = 1008;

/// What a socket reads at once. tungstenite's default (128 KiB) is zero-filled up front,
/// so it cost every idle subscriber 128 KiB; larger frames still grow the buffer.
const READ_BUFFER: usize = 8 * 1024;

/// The largest frame Herald writes, as a multiple of the largest body it reads: a JSON
/// frame escapes a message's control characters (`\u0000`, six bytes for one).
const LARGEST_FRAME_FACTOR: usize = 6;

/// The socket Herald speaks the protocol on.
type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A checked WebSocket opening handshake (RFC 6455, section 4.2.1): the client's key and
/// the connection's upgrade, taken over once the `101` answer is out.
pub(crate) struct Handshake {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// The opening handshake of a `/v1/ws` request (the route checks the GET), or
/// `invalid_parameter` saying what is missing. Herald does the upgrade itself rather
/// than through warp's filter, to set the socket's buffer sizes.
pub fn handshake() -> impl Filter<Extract = (Handshake,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<OnUpgrade>())
        .and_then(
            |headers: HeaderMap, on_upgrade: Option<OnUpgrade>| async move {
                check_handshake(&headers)
                    .and_then(|key| {
                        on_upgrade
                            .map(|on_upgrade| Handshake { key, on_upgrade })
                            .ok_or_else(|| {
                                ApiError::new(
                                    ErrorKind::InvalidParameter,
                                    "this connection cannot be upgraded",
                                )
                            })
                    })
                    .map_err(Rejection::from)
            },
        )
}

/// The client's `Sec-WebSocket-Key` once every header of the handshake is right.
fn check_handshake(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let refuse = |why: &str| {
        Err(ApiError::new(
            ErrorKind::InvalidParameter,
            format!("not a WebSocket handshake: {why}"),
        ))
    };
    if !has_token(CONNECTION, "upgrade") {
        return refuse("Connection must include upgrade");
    }
    if !has_token(UPGRADE, "websocket") {
        return refuse("Upgrade must be websocket");
    }
    if headers
        .get("sec-websocket-version")
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return refuse("Sec-WebSocket-Version must be 13");
    }
    match headers.get("sec-websocket-key") {
        Some(key) if !key.is_empty() => Ok(key.clone()),
        _ => refuse("Sec-WebSocket-Key is missing"),
    }
}

/// GET /v1/ws
pub async fn upgrade(
    handshake: Handshake,
    credentials: Credentials,
    peer: Option<Peer>,
    api: Api,
) -> Result<Response, Rejection> {
    // A token given with the upgrade must be valid; it applies to every request until
    // an `auth` request replaces it.
    let token = credentials.token()?.map(str::to_string);
    api.authorize(&credentials, &[])?;
    api.admit()?;
    let limit = body_limit(api.layer.max_message_bytes());
    // Frames wait in the outbox, which bounds them; tungstenite's own buffer holds what
    // it writes by itself (pongs, the close), bounded too.
    let largest_frame = limit.saturating_mul(LARGEST_FRAME_FACTOR);
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(
            api.limits
                .max_write_buffer_bytes
                .saturating_add(largest_frame),
        )
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let accept = derive_accept_key(handshake.key.as_bytes());
    tokio::spawn(async move {
        match handshake.on_upgrade.await {
            Ok(upgraded) => {
                let socket = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                serve(api, socket, token, peer).await;
            }
            Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    Ok(response)
}

/// A close frame with `code` and `reason`.
fn close_frame(code: u16, reason: &'static str) -> Frame {
    Frame::Close(Some(CloseFrame {
        code: code.into(),
        reason: reason.into(),
    }))
}

/// One request, decoded (its message left as msgpack bytes, see
/// [`crate::message::Request`]).
struct Request {
    format: Format,
    reference: Option<Value>,
    fields: Vec<(String, Value)>,
    /// The `"message"`, checked (a map without a type got the default type).
    message: Option<Result<Message, ApiError>>,
}

/// A decoded frame: a request, or an error with the format to answer in and the `ref`
/// to echo; `None` for frames that carry no request (pings).
type Decoded = Option<Result<Request, (Format, Option<Value>, ApiError)>>;

impl Request {
    /// Decodes `frame` (on the blocking pool if it is large, so that it never holds up
    /// the connections this thread serves).
    async fn decode_off_thread(frame: Frame, default_type: Option<String>) -> Decoded {
        if frame.len() <= DECODE_INLINE_BYTES {
            return Request::decode(&frame, default_type.as_deref());
        }
        let decoded = blocking(move || Request::decode(&frame, default_type.as_deref())).await;
        decoded.unwrap_or_else(|e| Some(Err((Format::Json, None, e))))
    }

    /// The request in `frame`; a message without a type gets `default_type`.
    fn decode(frame: &Frame, default_type: Option<&str>) -> Decoded {
        let (format, parsed) = match frame {
            Frame::Text(text) => (
                Format::Json,
                FieldsOf::from_json(text.as_bytes()).map_err(|e| (json_ref(text.as_bytes()), e)),
            ),
            Frame::Binary(bytes) => (
                Format::Msgpack,
                FieldsOf::from_msgpack(bytes.clone()).map_err(|e| (None, e)),
            ),
            _ => return None,
        };
        Some(match parsed {
            Ok(FieldsOf { fields, message }) => {
                let reference = fields
                    .iter()
                    .find(|(k, _)| k == "ref")
                    .map(|(_, v)| v.clone());
                let message = message.map(|bytes| {
                    Message::decode_msgpack_bytes(bytes, default_type).map_err(ApiError::from)
                });
                Ok(Request {
                    format,
                    reference,
                    fields,
                    message,
                })
            }
            Err((reference, e)) => Err((format, reference, ApiError::from(e))),
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn str(&self, key: &str) -> Result<&str, ApiError> {
        self.get(key).and_then(Value::as_str).ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidParameter,
                format!("{key:?} must be given as a string"),
            )
        })
    }

    fn optional_str(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None | Some(Value::Nil) => Ok(None),
            Some(_) => self.str(key).map(Some),
        }
    }

    /// An id, as a decimal string or an integer.
    fn optional_id(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::Integer(i)) if i.as_u64().is_some() => Ok(i.as_u64()),
            Some(Value::String(s)) if s.as_str().is_some_and(|s| s.parse::<u64>().is_ok()) => {
                Ok(s.as_str().and_then(|s| s.parse().ok()))
            }
            Some(_) => Err(ApiError::new(
                ErrorKind::InvalidParameter,
                format!("{key:?} must be a message id"),
            )),
        }
    }

    /// The request's `"lease"` (whole seconds, see [`parse_lease`]), if it has one.
    fn lease(&self) -> Result<Option<Duration>, ApiError> {
        match self.get("lease") {
            None | Some(Value::Nil) => Ok(None),
            Some(Value::Integer(i)) => parse_lease(Some(&i.to_string())),
            Some(_) => parse_lease(Some("a non-integer")),
        }
    }

    /// The request's `"window"`: unacknowledged pushes at once, 1 to [`MAX_WINDOW`]
    /// (default [`DEFAULT_WINDOW`]).
    fn window(&self) -> Result<usize, ApiError> {
        match self.get("window") {
            None | Some(Value::Nil) => Ok(DEFAULT_WINDOW),
            Some(Value::Integer(i))
                if i.as_u64()
                    .is_some_and(|w| (1..=MAX_WINDOW as u64).contains(&w)) =>
            {
                Ok(i.as_u64().unwrap_or_default() as usize)
            }
            Some(_) => Err(ApiError::new(
                ErrorKind::InvalidParameter,
                format!("\"window\" must be a whole number from 1 to {MAX_WINDOW}"),
            )),
        }
    }

    /// The request's `"message"`.
    fn message(&self) -> Result<Message, ApiError> {
        self.message.clone().unwrap_or_else(|| {
            Err(ApiError::new(
                ErrorKind::InvalidMessage,
                "\"message\" is missing",
            ))
        })
    }
}

/// A frame to the client: `op`, the request's `ref` when it had one, then `fields`.
#[derive(Serialize)]
struct Reply<'a, T> {
    op: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<Echo<'a>>,
    #[serde(flatten)]
    fields: T,
}

/// What a subscription pushes: `op` first, and no `ref` (it answers no request).
#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Pushed<'a> {
    Message {
        channel: &'a str,
        id: Id,
        message: &'a Message,
    },
    Gap {
        channel: &'a str,
        #[serde(flatten)]
        gap: Gap,
    },
}

/// The `id` of an acknowledged send.
#[derive(Serialize)]
struct Acked {
    id: Id,
}

fn frame(format: Format, op: &str, reference: Option<&Value>, fields: impl Serialize) -> Frame {
    let reply = Reply {
        op,
        reference: reference.map(Echo),
        fields,
    };
    encode_frame(format, &reply)
}

fn encode_frame(format: Format, doc: &impl Serialize) -> Frame {
    let bytes = format.encode(doc);
    match format {
        Format::Json => Frame::text(String::from_utf8(bytes).expect("serde_json writes UTF-8")),
        Format::Msgpack => Frame::binary(bytes),
    }
}

fn error_frame(format: Format, reference: Option<&Value>, error: &ApiError) -> Frame {
    error.record();
    frame(format, "error", reference, error.doc())
}

/// Just the `ref` of a JSON request, kept as its text.
#[derive(Deserialize)]
struct JsonRef<'a> {
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
}

/// The `ref` of a JSON request that was refused as a whole (a message nested too deep),
/// so that the refusal can still echo it, if it is small enough to echo.
fn json_ref(text: &[u8]) -> Option<Value> {
    let raw = serde_json::from_slice::<JsonRef>(text).ok()?.reference?;
    if raw.get().len() > MAX_FIELD_BYTES {
        return None;
    }
    parse_json_at(raw.get().as_bytes(), 1).ok()
}

/// The frames waiting to be written to one socket, bounded in number ([`OUTBOX`]) and in
/// bytes (`limits.max_write_buffer_bytes`). A frame waits for room; a client that leaves
/// no room for `slow_consumer_secs` (it reads nothing) has its connection closed with
/// 1008, and the frame is dropped.
#[derive(Clone)]
struct Outbox {
    frames: mpsc::Sender<(Frame, OwnedSemaphorePermit)>,
    /// One permit per byte that may be queued.
    room: Arc<Semaphore>,
    limit: usize,
    patience: Duration,
    /// Cancelled when a frame found no room in time: the connection ends.
    overflowed: CancellationToken,
}

/// The end of an [`Outbox`] that writes to the socket.
type Outgoing = mpsc::Receiver<(Frame, OwnedSemaphorePermit)>;

impl Outbox {
    fn new(limit: usize, patience: Duration) -> (Outbox, Outgoing) {
        let (frames, outgoing) = mpsc::channel(OUTBOX);
        let outbox = Outbox {
            frames,
            room: Arc::new(Semaphore::new(limit)),
            limit,
            patience,
            overflowed: CancellationToken::new(),
        };
        (outbox, outgoing)
    }

    /// Queues `frame` once there is room for it (a frame larger than the whole limit
    /// waits for all of it). Fails when the socket is gone or the client left no room in
    /// time (then the connection is ending).
    async fn send(&self, frame: Frame) -> Result<(), ()> {
        let bytes = frame.len().clamp(1, self.limit) as u32;
        let room = self.room.clone().acquire_many_owned(bytes);
        let permit = match tokio::time::timeout(self.patience, room).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(()),
            Err(_) => {
                self.overflowed.cancel();
                return Err(());
            }
        };
        self.frames.send((frame, permit)).await.map_err(drop)
    }

    /// Queues a close frame without waiting: the connection ends either way.
    fn close(&self, code: u16, reason: &'static str) {
        let permit = self.room.clone().try_acquire_owned();
        let nothing = || Arc::new(Semaphore::new(1)).try_acquire_owned();
        if let Ok(permit) = permit.or_else(|_| nothing()) {
            let _ = self.frames.try_send((close_frame(code, reason), permit));
        }
    }
}

/// One connection's state: its token, its outbox and its subscriptions.
struct Connection {
    api: Api,
    /// The token its requests present (from the upgrade, or the last `auth` request).
    token: Option<String>,
    /// The client's address, whom its publishes count against without a token.
    peer: Option<Peer>,
    outbox: Outbox,
    subscriptions: HashMap<String, Revoker>,
    receives: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the client's side ends, so waiting receives stop taking messages.
    closed: CancellationToken,
    /// Who holds the leases taken through this connection ([`LeaseTerms::holder`]).
    holder: u64,
    /// The channels it took leased messages from: their leases end when it closes.
    leasing: HashSet<String>,
    /// The lease windows of its leasing subscriptions, by channel, woken by its acks.
    windows: HashMap<String, Arc<AtomicWaker>>,
}

/// Unacknowledged pushes a leasing subscription may have at once, by default and at most.
const DEFAULT_WINDOW: usize = 16;
const MAX_WINDOW: usize = 10_000;

/// The holder ids of connections, one each.
static NEXT_HOLDER: AtomicU64 = AtomicU64::new(1);

async fn serve(api: Api, socket: Socket, token: Option<String>, peer: Option<Peer>) {
    let _carrying = Carrying::new(Transport::Ws);
    let (mut sink, mut incoming) = socket.split();
    let (outbox, mut outgoing) = Outbox::new(
        api.limits.max_write_buffer_bytes,
        Duration::from_secs(api.settings.slow_consumer_secs),
    );
    let writer = tokio::spawn(async move {
        while let Some((frame, room)) = outgoing.recv().await {
            let closing = frame.is_close();
            if sink.send(frame).await.is_err() || closing {
                break;
            }
            drop(room);
        }
        let _ = sink.close().await;
    });
    let mut conn = Connection {
        api: api.clone(),
        token,
        peer,
        outbox,
        subscriptions: HashMap::new(),
        receives: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_RECEIVES)),
        closed: CancellationToken::new(),
        holder: NEXT_HOLDER.fetch_add(1, Ordering::Relaxed),
        leasing: HashSet::new(),
        windows: HashMap::new(),
    };
    let default_type = api.default_type().map(str::to_string);
    loop {
        let next = tokio::select! {
            _ = api.shutdown.cancelled() => {
                conn.outbox.close(CLOSE_GOING_AWAY, "server shutting down");
                break;
            }
            _ = conn.outbox.overflowed.cancelled() => {
                conn.outbox.close(CLOSE_POLICY, "not reading what it is sent");
                break;
            }
            next = incoming.next() => next,
        };
        match next {
            None => break,
            Some(Err(WsError::Capacity(_))) => {
                conn.outbox.close(CLOSE_TOO_BIG, "message too big");
                break;
            }
            Some(Err(_)) => break,
            Some(Ok(frame)) if frame.is_close() => break,
            Some(Ok(frame)) => {
                match Request::decode_off_thread(frame, default_type.clone()).await {
                    None => {}
                    Some(Err((format, reference, error))) => {
                        let reply = error_frame(format, reference.as_ref(), &error);
                        let _ = conn.outbox.send(reply).await;
                    }
                    Some(Ok(request)) => {
                        if let Err(error) = conn.handle(&request).await {
                            let reply =
                                error_frame(request.format, request.reference.as_ref(), &error);
                            let _ = conn.outbox.send(reply).await;
                        }
                    }
                }
            }
        }
    }
    conn.closed.cancel();
    for stop in conn.subscriptions.values() {
        stop.revoke();
    }
    if !conn.leasing.is_empty() {
        // Once every receive of it has ended, nothing more is leased to it.
        let _ = conn
            .receives
            .acquire_many(MAX_PENDING_RECEIVES as u32)
            .await;
        api.layer
            .release(conn.holder, conn.leasing.iter().map(String::as_str));
    }
    drop(conn);
    let _ = writer.await;
}

impl Connection {
    /// Answers `request` with `ok` and `fields`.
    async fn ok(&self, request: &Request, fields: impl Serialize) {
        let reply = frame(request.format, "ok", request.reference.as_ref(), fields);
        let _ = self.outbox.send(reply).await;
    }

    /// Ok when the connection's token allows `needs` (else 401 or 403, as over HTTP).
    fn authorize(&self, needs: &[Need]) -> Result<crate::auth::Access, ApiError> {
        self.api.authorize_token(self.token.as_deref(), needs)
    }

    async fn handle(&mut self, request: &Request) -> Result<(), ApiError> {
        let layer = &self.api.layer;
        let op = request.str("op")?;
        match op {
            "auth" => {
                let token = request.str("token")?;
                self.api.authorize_token(Some(token), &[])?;
                self.token = Some(token.to_string());
                self.ok(request, ()).await;
            }
            "send" => {
                let started = Instant::now();
                let channel = request.str("channel")?;
                let access =
                    self.authorize(&[Need::Publish(Target::Channel(channel.to_string()))])?;
                self.api.take_publish(&access, self.peer)?;
                let id = layer.send(channel, request.message()?).await?;
                metrics().published(Publish::Send, started);
                self.ok(request, Acked { id: Id(id) }).await;
            }
            "group_send" => {
                let started = Instant::now();
                let group = request.str("group")?;
                let access = self.authorize(&[Need::Publish(Target::Group(group.to_string()))])?;
                self.api.take_publish(&access, self.peer)?;
                let report = layer.group_send(group, request.message()?).await?;
                metrics().published(Publish::GroupSend, started);
                let sent = GroupSent {
                    group: None,
                    delivered: report.delivered,
                    full: report.full,
                };
                self.ok(request, sent).await;
            }
            "group_add" => {
                let (group, channel) = (request.str("group")?, request.str("channel")?);
                self.authorize(&membership(group, channel))?;
                layer.group_add(group, channel).await?;
                self.ok(request, ()).await;
            }
            "group_discard" => {
                let (group, channel) = (request.str("group")?, request.str("channel")?);
                self.authorize(&membership(group, channel))?;
                layer.group_discard(group, channel).await?;
                self.ok(request, ()).await;
            }
            "new_channel" => {
                let prefix = request
                    .optional_str("prefix")?
                    .filter(|p| !p.is_empty())
                    .unwrap_or("specific");
                self.authorize(&[Need::Subscribe(Target::ChannelsUnder(prefix.to_string()))])?;
                let name = layer.new_channel(prefix)?;
                let created = ChannelReply {
                    channel: &name,
                    id: None,
                    message: None,
                };
                self.ok(request, created).await;
            }
            "receive" => self.receive(request)?,
            "ack" => {
                let channel = request.str("channel")?;
                self.authorize(&[Need::Subscribe(Target::Channel(channel.to_string()))])?;
                let id = request.optional_id("id")?.ok_or_else(|| {
                    ApiError::new(ErrorKind::InvalidParameter, "\"id\" must be a message id")
                })?;
                if !layer.ack(channel, id).await? {
                    return Err(ApiError::new(
                        ErrorKind::NotFound,
                        format!("channel {channel} holds no leased message {id}"),
                    ));
                }
                if let Some(window) = self.windows.get(channel) {
                    window.wake();
                }
                self.ok(request, ()).await;
            }
            "subscribe" => self.subscribe(request).await?,
            "unsubscribe" => {
                let channel = request.str("channel")?;
                if let Some(stop) = self.subscriptions.remove(channel) {
                    stop.revoke();
                }
                self.ok(request, ()).await;
            }
            other => {
                return Err(ApiError::new(
                    ErrorKind::InvalidParameter,
                    format!("unknown op {}", quoted(other)),
                ));
            }
        }
        Ok(())
    }

    /// Starts a receive that answers on its own when a message comes or the wait ends.
    fn receive(&mut self, request: &Request) -> Result<(), ApiError> {
        let channel = request.str("channel")?.to_string();
        self.authorize(&[Need::Subscribe(Target::Channel(channel.clone()))])?;
        crate::names::check_channel(&channel)?;
        let wait = match request.get("wait") {
            None | Some(Value::Nil) => Duration::ZERO,
            Some(Value::Integer(i)) => {
                parse_wait(Some(&i.to_string()), self.api.settings.max_wait_secs)?
            }
            Some(Value::F32(_) | Value::F64(_)) => {
                let secs = request.get("wait").and_then(Value::as_f64).unwrap_or(-1.0);
                parse_wait(Some(&secs.to_string()), self.api.settings.max_wait_secs)?
            }
            Some(_) => {
                return Err(ApiError::new(
                    ErrorKind::InvalidParameter,
                    "\"wait\" must be a number of seconds",
                ));
            }
        };
        let lease = request.lease()?.map(|duration| LeaseTerms {
            duration,
            holder: Some(self.holder),
        });
        let slot = self.receives.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                ErrorKind::Unavailable,
                format!("at most {MAX_PENDING_RECEIVES} receives may wait on one connection"),
            )
        })?;
        let api = self.api.clone();
        let outbox = self.outbox.clone();
        let format = request.format;
        let reference = request.reference.clone();
        let closed = self.closed.clone();
        if lease.is_some() {
            self.leasing.insert(channel.clone());
        }
        tokio::spawn(async move {
            let received = tokio::select! {
                biased;
                _ = closed.cancelled() => return,
                received = api.layer.receive_with(&channel, wait, lease) => received,
                _ = api.shutdown.cancelled() => Ok(None),
            };
            let reference = reference.as_ref();
            let reply = match received {
                Ok(Some(delivery)) => {
                    metrics().deliveries(Transport::Ws).inc();
                    let received = ChannelReply {
                        channel: &channel,
                        id: Some(Id(delivery.id)),
                        message: Some(&delivery.message),
                    };
                    frame(format, "message", reference, received)
                }
                Ok(None) => frame(format, "timeout", reference, ()),
                Err(e) => error_frame(format, reference, &ApiError::from(e)),
            };
            let _ = outbox.send(reply).await;
            drop(slot);
        });
        Ok(())
    }

    /// Starts pushing a channel's messages, after replaying from `last_event_id`.
    async fn subscribe(&mut self, request: &Request) -> Result<(), ApiError> {
        let channel = request.str("channel")?.to_string();
        let needs = vec![Need::Subscribe(Target::Channel(channel.clone()))];
        let access = self.authorize(&needs)?;
        crate::names::check_channel(&channel)?;
        let leasing = match request.lease()? {
            Some(duration) => Some(Leasing {
                terms: LeaseTerms {
                    duration,
                    holder: Some(self.holder),
                },
                window: request.window()?,
                acked: Arc::default(),
            }),
            None if request.get("window").is_some_and(|w| !w.is_nil()) => {
                return Err(ApiError::new(
                    ErrorKind::InvalidParameter,
                    "\"window\" needs a \"lease\"",
                ));
            }
            None => None,
        };
        let spec = Spec {
            channel: channel.clone(),
            last_event_id: resume_point(&self.api, request.optional_id("last_event_id")?)?,
            groups: Vec::new(),
            ephemeral: false,
            held: Held::new(self.token.as_deref(), &access, needs),
            leasing: leasing.clone(),
        };
        let most = self.api.limits.max_subscriptions_per_connection;
        if self.subscriptions.len() >= most && !self.subscriptions.contains_key(&channel) {
            return Err(ApiError::new(
                ErrorKind::LimitReached,
                format!(
                    "limits.max_subscriptions_per_connection ({most}) reached: unsubscribe first"
                ),
            ));
        }
        if let Some(previous) = self.subscriptions.remove(&channel) {
            previous.revoke();
        }
        self.ok(request, ()).await;
        let mut pushes = Subscription::start(&self.api, spec, Transport::Ws)?;
        self.subscriptions.insert(channel.clone(), pushes.stopper());
        match leasing {
            Some(leasing) => {
                self.leasing.insert(channel.clone());
                self.windows.insert(channel.clone(), leasing.acked);
            }
            None => {
                self.windows.remove(&channel);
            }
        }
        let outbox = self.outbox.clone();
        let format = request.format;
        tokio::spawn(async move {
            while let Some(push) = pushes.next().await {
                let pushed = match &push {
                    Push::Message { id, message } => Pushed::Message {
                        channel: &channel,
                        id: Id(*id),
                        message,
                    },
                    Push::Gap(gap) => Pushed::Gap {
                        channel: &channel,
                        gap: Gap {
                            after: Id(gap.after),
                            next: Id(gap.next),
                        },
                    },
                };
                if outbox.send(encode_frame(format, &pushed)).await.is_err() {
                    return;
                }
            }
            // The client did not read for `slow_consumer_secs`. Its messages stay
            // queued and in the replay log; closing the socket tells it to reconnect and
            // resubscribe with its last id.
            if pushes.was_too_slow() {
                outbox.close(
                    CLOSE_POLICY,
                    "too slow to read; resubscribe with last_event_id",
                );
            }
            // Its token was removed, expired or lost the permission.
            if pushes.lost_access() {
                outbox.close(CLOSE_POLICY, "access revoked");
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// A random frame is a request, an error reply, or ignored; never a panic.
        #[test]
        fn random_frames_never_panic_the_decoder(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
            text in "\\PC{0,256}",
        ) {
            let _ = Request::decode(&Frame::binary(bytes), Some("t"));
            let _ = Request::decode(&Frame::text(text), None);
        }

        #[test]
        fn mutated_requests_never_panic_the_decoder(edits in crate::testing::edits(1)) {
            let request = crate::testing::mutated(
                br#"{"op":"subscribe","ref":[1,{"a":null}],"channel":"c","last_event_id":"7","message":{"type":"x"}}"#,
                &edits,
            );
            let _ = Request::decode(&Frame::binary(request.clone()), Some("t"));
            let _ = Request::decode(&Frame::text(String::from_utf8_lossy(&request).into_owned()), None);
        }
    }
}
