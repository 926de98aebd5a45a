//! Server-sent event streams: one event per message (`id:` and one line of JSON in
//! `data:`), `event: herald.gap` when a resume cannot be complete, `: keepalive`
//! comments, and a `retry:` hint instead of an error when the server is full, since
//! browsers' EventSource gives up for good after any non-200 answer.

use std::convert::Infallible;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio_stream::wrappers::ReceiverStream;
use warp::reply::Response;
use warp::sse::Event;
use warp::{Filter, Rejection, Reply};

use super::error::{ApiError, ErrorKind};
use super::reply::Doc;
use super::subscription::{self, Push, Spec};
use super::{Api, Query};
use crate::layer::names;

/// How long a browser turned away at the connection limit waits before retrying.
const RETRY_WHEN_FULL: Duration = Duration::from_secs(5);

/// The `Last-Event-ID` header, unparsed.
pub fn last_event_id() -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("last-event-id")
}

/// The id to resume after: the header, else `?last_event_id=`.
fn resume_after(header: Option<String>, query: Option<&Query>) -> Result<Option<u64>, ApiError> {
    let raw = header.or_else(|| {
        query
            .and_then(|q| q.get("last_event_id"))
            .map(str::to_string)
    });
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(raw) => raw.parse().map(Some).map_err(|_| {
            ApiError::new(
                ErrorKind::InvalidParameter,
                format!("Last-Event-ID must be a message id, not {raw:?}"),
            )
        }),
    }
}

fn event(push: Push) -> Result<Event, Infallible> {
    Ok(match push {
        Push::Message { id, message } => Event::default().id(id.to_string()).data(message.json()),
        Push::Gap(gap) => Event::default().event("herald.gap").data(
            Doc::new()
                .id("after", gap.after)
                .id("next", gap.next)
                .to_json(),
        ),
    })
}

/// A stream that tells the browser to come back later, then ends.
fn retry_later() -> Response {
    let stream = futures_util::stream::once(async {
        Ok::<_, Infallible>(
            Event::default()
                .retry(RETRY_WHEN_FULL)
                .comment(" server busy"),
        )
    });
    warp::sse::reply(stream).into_response()
}

async fn stream(api: Api, spec: Spec, permit: OwnedSemaphorePermit) -> Result<Response, Rejection> {
    let (outbox, _stop) = subscription::start(&api, spec, Some(permit)).await;
    let events = ReceiverStream::new(outbox).map(event);
    let keepalive = warp::sse::keep_alive()
        .interval(Duration::from_secs(api.settings.keepalive_secs))
        .text(" keepalive")
        .stream(events);
    Ok(warp::sse::reply(keepalive).into_response())
}

/// GET /v1/channels/{channel}/events
pub async fn channel_events(
    channel: String,
    last_event_id: Option<String>,
    query: Query,
    api: Api,
) -> Result<Response, Rejection> {
    names::check_channel(&channel).map_err(ApiError::from)?;
    let last_event_id = resume_after(last_event_id, Some(&query))?;
    let Ok(permit) = api.admit() else {
        return Ok(retry_later());
    };
    let spec = Spec {
        channel,
        last_event_id,
        groups: Vec::new(),
        ephemeral: false,
    };
    stream(api, spec, permit).await
}

/// GET /v1/groups/{group}/events?channel=C
pub async fn group_events(
    group: String,
    last_event_id: Option<String>,
    query: Query,
    api: Api,
) -> Result<Response, Rejection> {
    joined_stream(vec![group], last_event_id, query, api).await
}

/// GET /v1/events?group=A&group=B&channel=C
pub async fn multi_group_events(
    last_event_id: Option<String>,
    query: Query,
    api: Api,
) -> Result<Response, Rejection> {
    let groups = query.all("group");
    if groups.is_empty() {
        return Err(
            ApiError::new(ErrorKind::InvalidParameter, "at least one group= is needed").into(),
        );
    }
    joined_stream(groups, last_event_id, query, api).await
}

/// Joins `groups` with `?channel=` (or a fresh channel, discarded at the end) and
/// streams that channel.
async fn joined_stream(
    groups: Vec<String>,
    last_event_id: Option<String>,
    query: Query,
    api: Api,
) -> Result<Response, Rejection> {
    for group in &groups {
        names::check_group(group).map_err(ApiError::from)?;
    }
    let last_event_id = resume_after(last_event_id, Some(&query))?;
    let Ok(permit) = api.admit() else {
        return Ok(retry_later());
    };
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
    };
    stream(api, spec, permit).await
}
