//! The HTTP API v1 over warp: REST routes, SSE streams and the WebSocket protocol.
//! Every route is a thin call into the [`ChannelLayer`]; every failure goes through
//! [`error::handle_rejection`], the one place that picks status codes.

mod access;
mod body;
mod error;
mod handlers;
mod limits;
mod reply;
mod sse;
pub(crate) mod subscription;
mod ws;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::http::header::{CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, X_FRAME_OPTIONS};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::auth::{Access, Policy};
use crate::config::{AuthSettings, ConfigError, LimitsSettings, ServerSettings, Settings};
use crate::layer::ChannelLayer;
use error::{ApiError, ErrorKind};
use limits::{ClientKey, PublishRate};

pub(crate) use limits::{
    Peer, Refusal, client_address, head_timed_out, head_timed_out_sent, refusal,
};
use reply::Format;

/// What every handler needs, shared: cloning it for a request costs one reference count.
#[derive(Clone)]
pub struct Api(Arc<ApiState>);

/// The layer, the settings, the access policy, the shutdown signal, the publish rates
/// and the running subscriptions.
pub struct ApiState {
    /// The channel layer every route calls into.
    pub layer: ChannelLayer,
    /// The `[server]` settings: waits, keepalives, limits, CORS.
    pub settings: Arc<ServerSettings>,
    /// The `[limits]` on what one client or connection may take.
    pub limits: LimitsSettings,
    /// Cancelled on SIGINT/SIGTERM, so that waits and streams end and new requests are refused.
    pub shutdown: CancellationToken,
    publish_rate: PublishRate,
    streams: Arc<subscription::Registry>,
    /// The `[auth]` settings in force; replaced whole on a reload.
    policy: RwLock<Arc<Policy>>,
    /// Woken when the policy is replaced, so that streams it no longer allows end.
    policy_changed: Notify,
    /// Whether the server listens on loopback only (it decides the defaults).
    loopback: bool,
    sites: access::Sites,
    /// Clean-up that outlives a request (leaving the groups of a closed stream): the
    /// shutdown waits for it before its final flush.
    pub background: TaskTracker,
}

impl Api {
    /// The API over `layer`, with the `[server]`, `[limits]` and `[auth]` of `settings`.
    pub fn new(
        layer: ChannelLayer,
        settings: &Settings,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let Settings {
            server: settings,
            auth,
            limits,
            ..
        } = settings.clone();
        let loopback = settings.listen.ip().is_loopback();
        crate::metrics::metrics().know_refusals(ErrorKind::ALL.map(ErrorKind::code));
        Ok(Api(Arc::new(ApiState {
            layer,
            publish_rate: PublishRate::new(&limits),
            policy: RwLock::new(Arc::new(Policy::new(&auth, loopback)?)),
            limits,
            policy_changed: Notify::new(),
            loopback,
            sites: access::Sites::new(&settings.allowed_hosts, &settings.cors_origins, loopback),
            settings: Arc::new(settings),
            shutdown,
            streams: Arc::default(),
            background: TaskTracker::new(),
        })))
    }

    /// Replaces the access control with `auth` (SIGHUP). Settings that do not compile
    /// leave the old ones in force. Streams the new ones do not allow end within a second.
    pub(crate) fn reload_auth(&self, auth: &AuthSettings) -> Result<(), ConfigError> {
        let policy = Policy::new(auth, self.loopback)?;
        tracing::info!(tokens = policy.token_count(), "access control reloaded");
        *self.policy.write() = Arc::new(policy);
        self.policy_changed.notify_one();
        Ok(())
    }

    /// The access control in force.
    fn policy(&self) -> Arc<Policy> {
        self.policy.read().clone()
    }

    /// Ok unless the server is shutting down (then `unavailable`). Connection slots
    /// are taken by the server when it accepts a connection, before any request.
    fn admit(&self) -> Result<(), ApiError> {
        if self.shutdown.is_cancelled() {
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                "the server is shutting down",
            ));
        }
        Ok(())
    }

    /// Takes one publish from the caller's rate (`limits.publish_rate_per_sec`): the
    /// token's name counts, else the address the request came from.
    fn take_publish(&self, access: &Access, peer: Option<Peer>) -> Result<(), ApiError> {
        self.publish_rate
            .take(|| ClientKey::of(access.name(), peer))
    }

    /// Forgets the publish rates of clients that are idle (called now and then).
    pub(crate) fn forget_idle_clients(&self) {
        self.publish_rate.forget_idle();
    }

    /// The `"type"` for published maps that have none (`server.default_message_type`).
    fn default_type(&self) -> Option<&str> {
        Some(self.settings.default_message_type.as_str()).filter(|t| !t.is_empty())
    }
}

impl std::ops::Deref for Api {
    type Target = ApiState;

    fn deref(&self) -> &ApiState {
        &self.0
    }
}

/// Percent-decodes a path segment (`%21` for `!` and the like).
fn segment(raw: String) -> String {
    percent_encoding::percent_decode_str(&raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// The raw query string, empty when absent.
fn query() -> impl Filter<Extract = (Query,), Error = std::convert::Infallible> + Clone {
    warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .map(|raw: String| {
            Query(
                form_urlencoded::parse(raw.as_bytes())
                    .into_owned()
                    .collect(),
            )
        })
}

/// Query parameters in order, repeated keys kept.
#[derive(Debug, Clone, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`.
    pub fn all(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

fn format() -> impl Filter<Extract = (Format,), Error = Rejection> + Clone {
    warp::header::optional::<String>("accept")
        .map(|a: Option<String>| Format::from_accept(a.as_deref()))
}

/// The address the request came from, when the server put it in (always, except for
/// the routes tested on their own).
fn peer() -> impl Filter<Extract = (Option<Peer>,), Error = std::convert::Infallible> + Clone {
    warp::ext::optional::<Peer>()
}

fn with_api(api: Api) -> impl Filter<Extract = (Api,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || api.clone())
}

/// A message body not read yet: the handler reads it once the caller is allowed.
pub(crate) struct MessageBody {
    content_type: Option<String>,
    length: Option<u64>,
    stream: Pin<Box<dyn Stream<Item = Result<Bytes, warp::Error>> + Send>>,
}

impl MessageBody {
    /// Reads and decodes the message, refusing an oversized body before reading it whole.
    async fn read(self, api: &Api) -> Result<crate::message::Message, ApiError> {
        let limit = body::body_limit(api.layer.max_message_bytes());
        let patience = Duration::from_secs(api.settings.request_timeout_secs);
        let read = body::read_limited(self.length, self.stream, limit);
        let bytes = tokio::time::timeout(patience, read).await.map_err(|_| {
            ApiError::new(
                ErrorKind::RequestTimeout,
                "the request body did not come within server.request_timeout_secs",
            )
        })??;
        let kind = body::BodyKind::from_content_type(self.content_type.as_deref());
        if bytes.len() <= DECODE_INLINE_BYTES {
            return body::decode_message(kind, &bytes, api.default_type());
        }
        // A large body is decoded off the request threads, so that it never holds up
        // the other connections they serve.
        let default_type = api.default_type().map(str::to_string);
        blocking(move || body::decode_message(kind, &bytes, default_type.as_deref())).await?
    }
}

/// Runs blocking work on the blocking pool; a task that panicked is a 500.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        tracing::error!(error = %e, "a blocking task failed");
        ApiError::new(ErrorKind::Internal, "the operation failed")
    })
}

/// Bodies up to this size are decoded where they are read; larger ones on the blocking
/// pool.
pub(super) const DECODE_INLINE_BYTES: usize = 64 * 1024;

/// The request's message body, unread.
fn message_body() -> impl Filter<Extract = (MessageBody,), Error = Rejection> + Clone {
    warp::header::optional::<String>("content-type")
        .and(warp::header::optional::<u64>("content-length"))
        .and(warp::body::stream())
        .map(|content_type, length, stream| {
            let stream = futures_util::StreamExt::map(stream, |chunk: Result<_, warp::Error>| {
                chunk.map(|mut chunk| {
                    let n = bytes::Buf::remaining(&chunk);
                    bytes::Buf::copy_to_bytes(&mut chunk, n)
                })
            });
            MessageBody {
                content_type,
                length,
                stream: Box::pin(stream),
            }
        })
}

/// Joins routes with `or`, each boxed first, which keeps the filter types (and build
/// times) small.
fn any_of(routes: Vec<BoxedFilter<(Response,)>>) -> BoxedFilter<(Response,)> {
    routes
        .into_iter()
        .reduce(|a, b| a.or(b).unify().boxed())
        .expect("there are routes")
}

/// Every route of the API, behind the Host and Origin rules, with CORS when configured
/// and errors mapped to JSON.
///
/// Routes are grouped under their common path prefix (`/v1/channels`, `/v1/groups`), so
/// a request is matched against its own few routes, the publishing ones first, instead
/// of being tried against every route in turn.
pub fn routes(api: Api) -> BoxedFilter<(Response,)> {
    let channel_messages = warp::path!(String / "messages").map(segment);
    let group_members = warp::path!(String / "channels" / String)
        .map(|g, c| (segment(g), segment(c)))
        .untuple_one();

    let send = channel_messages
        .and(warp::post())
        .and(format())
        .and(message_body())
        .and(access::credentials())
        .and(peer())
        .and(with_api(api.clone()))
        .and_then(handlers::send);
    let receive = channel_messages
        .and(warp::get())
        .and(format())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::receive);
    let ack = warp::path!(String / "messages" / String)
        .map(|c, id| (segment(c), segment(id)))
        .untuple_one()
        .and(warp::delete())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::ack);
    let channel_events = warp::path!(String / "events")
        .map(segment)
        .and(warp::get())
        .and(sse::last_event_id())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(sse::channel_events);
    let new_channel = warp::path::end()
        .and(warp::post())
        .and(format())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::new_channel);
    let list_channels = warp::path::end()
        .and(warp::get())
        .and(format())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::list_channels);
    let group_add = group_members
        .and(warp::put())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::group_add);
    let group_discard = group_members
        .and(warp::delete())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::group_discard);
    let members = warp::path!(String / "channels")
        .map(segment)
        .and(warp::get())
        .and(format())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::members);
    let list_groups = warp::path::end()
        .and(warp::get())
        .and(format())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::list_groups);
    let group_send = warp::path!(String / "messages")
        .map(segment)
        .and(warp::post())
        .and(format())
        .and(message_body())
        .and(access::credentials())
        .and(peer())
        .and(with_api(api.clone()))
        .and_then(handlers::group_send);
    let group_events = warp::path!(String / "events")
        .map(segment)
        .and(warp::get())
        .and(sse::last_event_id())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(sse::group_events);
    let multi_events = warp::path!("events")
        .and(warp::get())
        .and(sse::last_event_id())
        .and(query())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(sse::multi_group_events);
    let websocket = warp::path!("ws")
        .and(warp::get())
        .and(ws::handshake())
        .and(access::credentials())
        .and(peer())
        .and(with_api(api.clone()))
        .and_then(ws::upgrade);
    let flush = warp::path!("flush")
        .and(warp::post())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::flush);
    let backup = warp::path!("admin" / "backup")
        .and(warp::get())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::backup);
    let layer_settings = warp::path!("layer")
        .and(warp::get())
        .and(format())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::layer_settings);
    let stats = warp::path!("stats")
        .and(warp::get())
        .and(format())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::stats);
    let tokens = warp::path!("admin" / "tokens")
        .and(warp::get())
        .and(format())
        .and(access::credentials())
        .and(with_api(api.clone()))
        .and_then(handlers::tokens);
    let console = warp::path!("console").and(warp::get()).map(|| {
        let mut page = Response::new(CONSOLE.into());
        let headers = page.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        // The page runs only its own script and talks only to this server.
        headers.insert(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
        );
        headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        page
    });

    let channels = warp::path("channels").and(any_of(vec![
        send.boxed(),
        receive.boxed(),
        ack.boxed(),
        channel_events.boxed(),
        new_channel.boxed(),
        list_channels.boxed(),
    ]));
    let groups = warp::path("groups").and(any_of(vec![
        group_send.boxed(),
        group_events.boxed(),
        group_add.boxed(),
        group_discard.boxed(),
        members.boxed(),
        list_groups.boxed(),
    ]));
    let v1 = warp::path("v1").and(any_of(vec![
        channels.boxed(),
        groups.boxed(),
        websocket.boxed(),
        multi_events.boxed(),
        flush.boxed(),
        backup.boxed(),
        stats.boxed(),
        tokens.boxed(),
        layer_settings.boxed(),
    ]));
    // `/v1` first and alone at its level: the API's requests pass one `or`.
    let others = any_of(vec![
        probes(api.clone()),
        metrics(api.clone(), false),
        console.boxed(),
    ]);
    let all = any_of(vec![v1.boxed(), others]);

    // Requests from another origin (allowed by `browser_rules`) go through CORS; the
    // rest, including the server's own origin, are served as they are.
    let served = all.recover(error::handle_rejection).unify().boxed();
    let origins = &api.settings.cors_origins;
    let cross_origin = if origins.is_empty() {
        served.clone()
    } else {
        let mut cors = warp::cors()
            .allow_methods(["GET", "POST", "PUT", "DELETE", "OPTIONS"])
            .allow_headers(["content-type", "accept", "last-event-id", "authorization"])
            .expose_headers(["retry-after"]);
        cors = if origins.iter().any(|o| o == "*") {
            cors.allow_any_origin()
        } else {
            cors.allow_origins(origins.iter().map(String::as_str))
        };
        served
            .clone()
            .with(cors)
            .map(Reply::into_response)
            // Requests that CORS refuses get the same JSON error body as the rest.
            .recover(error::handle_rejection)
            .unify()
            .boxed()
    };
    // A branch is skipped (not found) when the request is not of its kind.
    let only = |want: bool| {
        move |cross: bool| async move {
            if cross == want {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        }
    };
    let rules = access::browser_rules(api);
    let same_origin = rules
        .clone()
        .and_then(only(false))
        .untuple_one()
        .and(served);
    let other_origin = rules.and_then(only(true)).untuple_one().and(cross_origin);
    same_origin
        .or(other_origin)
        .unify()
        .recover(error::handle_rejection)
        .unify()
        .boxed()
}

/// The console page, embedded in the binary.
const CONSOLE: &str = include_str!("console.html");

/// The liveness answer: `{"status": "ok"}` whenever the process serves HTTP.
fn health() -> BoxedFilter<(Response,)> {
    warp::path!("healthz")
        .and(warp::get())
        .map(|| status(StatusCode::OK, "ok"))
        .boxed()
}

/// A `{"status": ...}` answer of the probes.
fn status(code: StatusCode, status: &'static str) -> Response {
    /// The probes' body.
    #[derive(serde::Serialize)]
    struct Status {
        status: &'static str,
    }
    reply::respond(Format::Json, code, &Status { status })
}

/// `/healthz`, and `/readyz`: 200 `ready` while the API is served, 503 `draining` once
/// the server is shutting down.
fn probes(api: Api) -> BoxedFilter<(Response,)> {
    let ready = warp::path!("readyz").and(warp::get()).map(move || {
        if api.shutdown.is_cancelled() {
            status(StatusCode::SERVICE_UNAVAILABLE, Unready::Draining.status())
        } else {
            status(StatusCode::OK, "ready")
        }
    });
    any_of(vec![health(), ready.boxed()])
}

/// `GET /metrics`; `open` serves it without access control (on `server.metrics_listen`).
fn metrics(api: Api, open: bool) -> BoxedFilter<(Response,)> {
    warp::path!("metrics")
        .and(warp::get())
        .map(move || open)
        .and(access::credentials())
        .and(with_api(api))
        .and_then(handlers::metrics_text)
        .boxed()
}

/// The routes of `server.metrics_listen`: `/metrics` without access control, and the
/// probes.
pub fn metrics_routes(api: Api) -> BoxedFilter<(Response,)> {
    any_of(vec![metrics(api.clone(), true), probes(api)])
        .recover(error::handle_rejection)
        .unify()
        .boxed()
}

/// Why the API is not served (yet, or any more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unready {
    /// The data is being opened and rebuilt.
    Starting,
    /// The server is shutting down.
    Draining,
}

impl Unready {
    /// The `status` `/readyz` reports.
    fn status(self) -> &'static str {
        match self {
            Unready::Starting => "starting",
            Unready::Draining => "draining",
        }
    }
}

/// The routes while the API is not served: `/healthz`, a 503 `/readyz`, the SSE
/// `retry:` hint for event streams (`EventSource` gives up for good on an error status)
/// and 503 `unavailable` for everything else.
pub fn unready(why: Unready) -> BoxedFilter<(Response,)> {
    let ready = warp::path!("readyz")
        .and(warp::get())
        .map(move || status(StatusCode::SERVICE_UNAVAILABLE, why.status()));
    let rest = warp::header::optional::<String>("accept").map(move |accept: Option<String>| {
        if accept.is_some_and(|a| a.contains("text/event-stream")) {
            return sse::retry_later();
        }
        let message = match why {
            Unready::Starting => "the server is starting; try again shortly",
            Unready::Draining => "the server is shutting down",
        };
        ApiError::new(ErrorKind::Unavailable, message)
            .retry_after(1)
            .into_response()
    });
    any_of(vec![health(), ready.boxed(), rest.boxed()])
}
