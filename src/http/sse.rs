//! Server-sent event streams: one event per message (`id:` and one line of JSON in
//! `data:`), `event: herald.gap` when a resume cannot be complete, `: keepalive`
//! comments, and a `retry:` hint instead of an error when the server is full, since
//! browsers' EventSource gives up for good after any non-200 answer.

use std::convert::Infallible;
use std::fmt::Write;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use warp::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use warp::reply::Response;
use warp::sse::Event;
use warp::{Filter, Rejection, Reply};

use super::access::Credentials;
use super::error::{ApiError, ErrorKind, quoted};
use super::reply::{Gap, Id};
use super::subscription::{Push, Spec, Subscription, resume_point};
use super::{Api, Query};
use crate::auth::{Held, Need, Target};
use crate::metrics::{Carrying, Transport};
use crate::names;

/// How long a browser turned away at the connection limit waits before retrying.
const RETRY_WHEN_FULL: Duration = Duration::from_secs(5);

/// The `Last-Event-ID` header, unparsed.
pub fn last_event_id() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("last-event-id")
}

/// The id to resume after: the header, else `?last_event_id=`; one above every id
/// assigned is refused.
fn resume_after(
    api: &Api,
    header: Option<String>,
    query: Option<&Query>,
) -> Result<Option<u64>, ApiError> {
    let raw = header.or_else(|| {
        query
            .and_then(|q| q.get("last_event_id"))
            .map(str::to_string)
    });
    let id = match raw.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(raw) => Some(raw.parse().map_err(|_| {
            ApiError::new(
                ErrorKind::InvalidParameter,
                format!("Last-Event-ID must be a message id, not {}", quoted(raw)),
            )
        })?),
    };
    resume_point(api, id)
}

/// One event in the wire format: `data:` (one line of JSON), then `id:`, then a blank line.
fn encode(push: &Push) -> Bytes {
    let mut out = BytesMut::new();
    // Writing into a BytesMut cannot fail.
    let _ = match push {
        Push::Message { id, message } => {
            let json = message.json();
            out.reserve(json.len() + 32);
            write!(out, "data:{json}\nid:{id}\n\n")
        }
        Push::Gap(gap) => {
            let gap = Gap {
                after: Id(gap.after),
                next: Id(gap.next),
            };
            let data = serde_json::to_string(&gap).expect("a gap serializes");
            write!(out, "event:herald.gap\ndata:{data}\n\n")
        }
    };
    out.freeze()
}

/// The comment written when a stream has been quiet for a keepalive interval.
const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// An SSE response body: the subscription's events, encoded, and a keepalive comment
/// after every `every` of silence (so that proxies keep the connection). The timer is
/// moved only when it fires, not at every event.
struct Events {
    subscription: Subscription,
    every: Duration,
    keepalive: Pin<Box<Sleep>>,
    last_write: Instant,
    /// Counts its connection as carrying an event stream while it runs.
    _carrying: Carrying,
}

impl Stream for Events {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match Pin::new(&mut this.subscription).poll_next(cx) {
            Poll::Ready(Some(push)) => {
                this.last_write = Instant::now();
                return Poll::Ready(Some(Ok(encode(&push))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        while this.keepalive.as_mut().poll(cx).is_ready() {
            let due = this.last_write + this.every;
            if Instant::now() >= due {
                this.last_write = Instant::now();
                this.keepalive.as_mut().reset(this.last_write + this.every);
                return Poll::Ready(Some(Ok(Bytes::from_static(KEEPALIVE))));
            }
            this.keepalive.as_mut().reset(due);
        }
        Poll::Pending
    }
}

/// A stream that tells the browser to come back later, then ends.
pub(super) fn retry_later() -> Response {
    let stream = futures_util::stream::once(async {
        Ok::<_, Infallible>(
            Event::default()
                .retry(RETRY_WHEN_FULL)
                .comment(" server busy"),
        )
    });
    warp::sse::reply(stream).into_response()
}

fn stream(api: &Api, spec: Spec) -> Result<Response, Rejection> {
    let subscription = Subscription::start(api, spec, Transport::Sse).map_err(ApiError::from)?;
    let every = Duration::from_secs(api.settings.keepalive_secs);
    let last_write = Instant::now();
    let events = Events {
        subscription,
        every,
        keepalive: Box::pin(tokio::time::sleep_until(last_write + every)),
        last_write,
        _carrying: Carrying::new(Transport::Sse),
    };
    let mut response = warp::reply::stream(events).into_response();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// GET /v1/channels/{channel}/events
pub(crate) async fn channel_events(
    channel: String,
    last_event_id: Option<String>,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    let needs = vec![Need::Subscribe(Target::Channel(channel.clone()))];
    let access = api.authorize(&credentials, &needs)?;
    names::check_channel(&channel).map_err(ApiError::from)?;
    let last_event_id = resume_after(&api, last_event_id, Some(&query))?;
    if api.admit().is_err() {
        return Ok(retry_later());
    }
    let spec = Spec {
        channel,
        last_event_id,
        groups: Vec::new(),
        ephemeral: false,
        held: Held::new(credentials.token()?, &access, needs),
        leasing: None,
    };
    stream(&api, spec)
}

/// GET /v1/groups/{group}/events?channel=C
pub(crate) async fn group_events(
    group: String,
    last_event_id: Option<String>,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    joined_stream(vec![group], last_event_id, query, credentials, api).await
}

/// GET /v1/events?group=A&group=B&channel=C
pub(crate) async fn multi_group_events(
    last_event_id: Option<String>,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    let groups = query.all("group");
    if groups.is_empty() {
        return Err(
            ApiError::new(ErrorKind::InvalidParameter, "at least one group= is needed").into(),
        );
    }
    let most = api.limits.max_groups_per_stream;
    if groups.len() > most {
        let why = format!("limits.max_groups_per_stream ({most}) reached: follow fewer groups");
        return Err(ApiError::new(ErrorKind::LimitReached, why).into());
    }
    joined_stream(groups, last_event_id, query, credentials, api).await
}

/// Joins `groups` with `?channel=` (or a fresh channel, discarded at the end) and
/// streams that channel.
async fn joined_stream(
    groups: Vec<String>,
    last_event_id: Option<String>,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    let mut needs: Vec<Need> = groups
        .iter()
        .map(|g| Need::Subscribe(Target::Group(g.clone())))
        .collect();
    needs.extend(
        query
            .get("channel")
            .map(|c| Need::Subscribe(Target::Channel(c.to_string()))),
    );
    let access = api.authorize(&credentials, &needs)?;
    for group in &groups {
        names::check_group(group).map_err(ApiError::from)?;
    }
    let last_event_id = resume_after(&api, last_event_id, Some(&query))?;
    if api.admit().is_err() {
        return Ok(retry_later());
    }
    let (channel, ephemeral) = match query.get("channel") {
        Some(channel) => {
            names::check_channel(channel).map_err(ApiError::from)?;
            (channel.to_string(), false)
        }
        None => (api.layer.new_channel("sse").map_err(ApiError::from)?, true),
    };
    for group in &groups {
        api.layer
            .group_add(group, &channel)
            .await
            .map_err(ApiError::from)?;
    }
    let spec = Spec {
        channel,
        last_event_id,
        groups,
        ephemeral,
        held: Held::new(credentials.token()?, &access, needs),
        leasing: None,
    };
    stream(&api, spec)
}
