//! Handlers of the plain HTTP routes: each checks the caller's access first (so that a
//! refused request changes nothing and learns nothing), admits the request, calls the
//! layer once, and answers with a document or an error.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use warp::http::StatusCode;
use warp::http::header::{CONTENT_TYPE, HeaderValue};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::access::Credentials;
use super::error::{ApiError, ErrorKind, quoted};
use super::reply::{ChannelReply, Format, GroupSent, Id, empty, respond};
use super::{Api, MessageBody, Peer, Query, blocking};
use crate::auth::{Need, Target};
use crate::layer::{GroupInfo, LeaseTerms, PageRequest, Stats};
use crate::metrics::{PerTransport, Publish, Published, Transport, metrics};

/// POST /v1/channels/{channel}/messages
pub async fn send(
    channel: String,
    format: Format,
    body: MessageBody,
    credentials: Credentials,
    peer: Option<Peer>,
    api: Api,
) -> Result<Response, Rejection> {
    let started = Instant::now();
    let access = api.authorize(
        &credentials,
        &[Need::Publish(Target::Channel(channel.clone()))],
    )?;
    api.admit()?;
    api.take_publish(&access, peer)?;
    let message = body.read(&api).await?;
    let id = api
        .layer
        .send(&channel, message)
        .await
        .map_err(ApiError::from)?;
    metrics().published(Publish::Send, started);
    Ok(respond(
        format,
        StatusCode::ACCEPTED,
        &ChannelReply {
            channel: &channel,
            id: Some(Id(id)),
            message: None,
        },
    ))
}

/// The `wait` parameter: seconds (fractions allowed), capped by `server.max_wait_secs`.
pub(crate) fn parse_wait(raw: Option<&str>, max_wait_secs: u64) -> Result<Duration, ApiError> {
    let Some(raw) = raw else {
        return Ok(Duration::ZERO);
    };
    let secs: f64 = raw
        .trim()
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s >= 0.0)
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidParameter,
                format!("wait must be a number of seconds, not {}", quoted(raw)),
            )
        })?;
    Ok(Duration::from_secs_f64(secs.min(max_wait_secs as f64)))
}

/// Longest lease, in seconds.
const MAX_LEASE_SECS: u64 = 3600;

/// A `lease` in whole seconds, 1 to [`MAX_LEASE_SECS`]; `None` when not given.
pub(crate) fn parse_lease(raw: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    raw.trim()
        .parse::<u64>()
        .ok()
        .filter(|secs| (1..=MAX_LEASE_SECS).contains(secs))
        .map(|secs| Some(Duration::from_secs(secs)))
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidParameter,
                format!(
                    "lease must be whole seconds from 1 to {MAX_LEASE_SECS}, not {}",
                    quoted(raw)
                ),
            )
        })
}

/// GET /v1/channels/{channel}/messages?wait=S&lease=L
pub async fn receive(
    channel: String,
    format: Format,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(
        &credentials,
        &[Need::Subscribe(Target::Channel(channel.clone()))],
    )?;
    api.admit()?;
    let wait = parse_wait(query.get("wait"), api.settings.max_wait_secs)?;
    let lease = parse_lease(query.get("lease"))?.map(|duration| LeaseTerms {
        duration,
        holder: None,
    });
    let received = tokio::select! {
        received = api.layer.receive_with(&channel, wait, lease) => received.map_err(ApiError::from)?,
        _ = api.shutdown.cancelled() => None,
    };
    Ok(match received {
        Some(delivery) => {
            metrics().deliveries(Transport::Http).inc();
            respond(
                format,
                StatusCode::OK,
                &ChannelReply {
                    channel: &channel,
                    id: Some(Id(delivery.id)),
                    message: Some(&delivery.message),
                },
            )
        }
        None => empty(StatusCode::NO_CONTENT),
    })
}

/// DELETE /v1/channels/{channel}/messages/{id}: acknowledges a leased message.
pub async fn ack(
    channel: String,
    id: String,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(
        &credentials,
        &[Need::Subscribe(Target::Channel(channel.clone()))],
    )?;
    api.admit()?;
    let not_leased = || {
        ApiError::new(
            ErrorKind::NotFound,
            format!("channel {channel} holds no leased message {}", quoted(&id)),
        )
    };
    let id: u64 = id.parse().map_err(|_| not_leased())?;
    if !api.layer.ack(&channel, id).await.map_err(ApiError::from)? {
        return Err(not_leased().into());
    }
    Ok(empty(StatusCode::NO_CONTENT))
}

/// GET /v1/layer: the layer settings in force, for clients to compare with their own.
pub async fn layer_settings(
    format: Format,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[])?;
    let layer = api.layer.settings();
    Ok(respond(
        format,
        StatusCode::OK,
        &LayerReport {
            capacity: layer.capacity,
            expiry: layer.expiry_secs,
            group_expiry: layer.group_expiry_secs,
            channel_capacity: &layer.channel_capacity,
            channel_expiry: &layer.channel_expiry,
            max_message_bytes: layer.max_message_bytes,
            replay_secs: layer.replay_secs,
            replay_capacity: layer.replay_capacity,
        },
    ))
}

/// The answer of `GET /v1/layer`: the names of Django's channel layer `CONFIG` where
/// they exist (seconds for times).
#[derive(Serialize)]
struct LayerReport<'a> {
    capacity: usize,
    expiry: u64,
    group_expiry: u64,
    channel_capacity: &'a indexmap::IndexMap<String, usize>,
    channel_expiry: &'a indexmap::IndexMap<String, u64>,
    max_message_bytes: usize,
    replay_secs: u64,
    replay_capacity: usize,
}

/// POST /v1/channels?prefix=P
pub async fn new_channel(
    format: Format,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    let prefix = query
        .get("prefix")
        .filter(|p| !p.is_empty())
        .unwrap_or("specific");
    api.authorize(
        &credentials,
        &[Need::Subscribe(Target::ChannelsUnder(prefix.to_string()))],
    )?;
    api.admit()?;
    let name = api.layer.new_channel(prefix).map_err(ApiError::from)?;
    Ok(respond(
        format,
        StatusCode::CREATED,
        &ChannelReply {
            channel: &name,
            id: None,
            message: None,
        },
    ))
}

/// GET /v1/channels[?limit=N&after=NAME]: a page of the channels with pending messages
/// or waiting receivers.
pub(crate) async fn list_channels(
    format: Format,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[Need::Admin])?;
    let page = api.layer.channels(page_request(&query)?);
    Ok(respond(
        format,
        StatusCode::OK,
        &ChannelPage {
            group: None,
            channels: &page.items,
            next: page.next.as_deref(),
        },
    ))
}

/// GET /v1/groups[?limit=N&after=NAME]: a page of the groups, with their current members.
pub(crate) async fn list_groups(
    format: Format,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[Need::Admin])?;
    let page = api.layer.groups(page_request(&query)?);
    Ok(respond(
        format,
        StatusCode::OK,
        &GroupPage {
            groups: &page.items,
            next: page.next.as_deref(),
        },
    ))
}

/// Entries a listing page holds when `limit` is not given.
const DEFAULT_PAGE: usize = 100;

/// The most entries of a listing page; a larger `limit` is cut to it.
const MAX_PAGE: usize = 1000;

/// The page a listing asks for with `limit` (a whole number from 1) and `after`.
fn page_request(query: &Query) -> Result<PageRequest<'_>, ApiError> {
    let limit = match query.get("limit") {
        None => DEFAULT_PAGE,
        Some(raw) => raw
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::InvalidParameter,
                    format!("limit must be a whole number from 1, not {}", quoted(raw)),
                )
            })?
            .min(MAX_PAGE as u64) as usize,
    };
    Ok(PageRequest {
        after: query.get("after"),
        limit,
    })
}

/// GET /v1/stats: totals.
pub async fn stats(
    format: Format,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[Need::Admin])?;
    let metrics = metrics();
    let stats = ServerStats {
        layer: api.layer.stats(),
        connections: metrics.connection_totals(),
        subscriptions: metrics.subscription_total(),
        published: metrics.published_totals(),
        deliveries: metrics.delivery_totals(),
    };
    Ok(admin_read(format, "stats", stats))
}

/// The layer's totals and the server's own: connections, subscriptions, and what was
/// published and delivered since the start.
#[derive(Serialize)]
struct ServerStats {
    #[serde(flatten)]
    layer: Stats,
    connections: PerTransport,
    subscriptions: u64,
    published: Published,
    deliveries: PerTransport,
}

/// GET /v1/admin/tokens: the configured tokens' names and permissions, never secrets.
pub async fn tokens(
    format: Format,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[Need::Admin])?;
    Ok(respond(format, StatusCode::OK, api.policy().listing()))
}

/// GET /metrics: every metric in the Prometheus text format (admin, unless served on
/// `server.metrics_listen`, whose routes pass `open`).
pub async fn metrics_text(
    open: bool,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    if !open {
        api.authorize(&credentials, &[Need::Admin])?;
    }
    let text = metrics().render(&api.layer.stats());
    let mut response = Response::new(text.into());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(response)
}

/// A 200 whose one field `key` holds `value`, for the admin reads.
fn admin_read(format: Format, key: &'static str, value: impl serde::Serialize) -> Response {
    respond(
        format,
        StatusCode::OK,
        &[(key, value)].into_iter().collect::<BTreeMap<_, _>>(),
    )
}

/// What group_add and group_discard of `channel` in `group` need.
pub fn membership(group: &str, channel: &str) -> [Need; 2] {
    [
        Need::Subscribe(Target::Group(group.to_string())),
        Need::Subscribe(Target::Channel(channel.to_string())),
    ]
}

/// A page of channels (of a group's members when `group` is set); `next`, absent on the
/// last page, is the next page's `after`.
#[derive(Serialize)]
struct ChannelPage<'a, T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
    channels: &'a [T],
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<&'a str>,
}

/// A page of groups, as [`ChannelPage`].
#[derive(Serialize)]
struct GroupPage<'a> {
    groups: &'a [GroupInfo],
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<&'a str>,
}

/// PUT /v1/groups/{group}/channels/{channel}
pub async fn group_add(
    group: String,
    channel: String,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &membership(&group, &channel))?;
    api.admit()?;
    api.layer
        .group_add(&group, &channel)
        .await
        .map_err(ApiError::from)?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// DELETE /v1/groups/{group}/channels/{channel}
pub async fn group_discard(
    group: String,
    channel: String,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &membership(&group, &channel))?;
    api.admit()?;
    api.layer
        .group_discard(&group, &channel)
        .await
        .map_err(ApiError::from)?;
    Ok(empty(StatusCode::NO_CONTENT))
}

/// GET /v1/groups/{group}/channels[?limit=N&after=NAME]: a page of the group's members.
pub async fn members(
    group: String,
    format: Format,
    query: Query,
    credentials: Credentials,
    api: Api,
) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[Need::Admin])?;
    let page = api
        .layer
        .group_members(&group, page_request(&query)?)
        .map_err(ApiError::from)?;
    Ok(respond(
        format,
        StatusCode::OK,
        &ChannelPage {
            group: Some(&group),
            channels: &page.items,
            next: page.next.as_deref(),
        },
    ))
}

/// POST /v1/groups/{group}/messages
pub async fn group_send(
    group: String,
    format: Format,
    body: MessageBody,
    credentials: Credentials,
    peer: Option<Peer>,
    api: Api,
) -> Result<Response, Rejection> {
    let started = Instant::now();
    let access = api.authorize(&credentials, &[Need::Publish(Target::Group(group.clone()))])?;
    api.admit()?;
    api.take_publish(&access, peer)?;
    let message = body.read(&api).await?;
    let report = api
        .layer
        .group_send(&group, message)
        .await
        .map_err(ApiError::from)?;
    metrics().published(Publish::GroupSend, started);
    Ok(respond(
        format,
        StatusCode::ACCEPTED,
        &GroupSent {
            group: Some(&group),
            delivered: report.delivered,
            full: report.full,
        },
    ))
}

/// GET /v1/admin/backup: a consistent dump of everything, one JSON object per line,
/// streamed: each chunk is read from the store only once the client took the last.
pub async fn backup(credentials: Credentials, api: Api) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[Need::Admin])?;
    api.admit()?;
    let layer = api.layer.clone();
    let backup = blocking(move || layer.backup())
        .await?
        .map_err(ApiError::from)?;
    let chunks = futures_util::stream::try_unfold(backup, |mut backup| async move {
        // One chunk at a time over all backups: together they take at most one core
        // from the requests.
        let _lane = BACKUP_LANE.acquire().await;
        let (backup, chunk) = blocking(move || {
            let chunk = backup.next_chunk();
            (backup, chunk)
        })
        .await
        .map_err(|_| BackupFailed("the backup task failed".into()))?;
        match chunk {
            Ok(Some(chunk)) => Ok(Some((Bytes::from(chunk), backup))),
            Ok(None) => {
                let stats = backup.stats();
                tracing::info!(
                    messages = stats.messages,
                    memberships = stats.memberships,
                    "backup sent"
                );
                Ok(None)
            }
            Err(e) => {
                tracing::error!(error = %e, "backup interrupted");
                Err(BackupFailed(e.to_string()))
            }
        }
    });
    let mut response = warp::reply::stream(chunks).into_response();
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

/// Backup chunks are read one at a time (see [`backup`]).
static BACKUP_LANE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// Why a backup stream stopped: the response then ends without its last chunk, so the
/// client sees the dump cut short.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct BackupFailed(String);

/// POST /v1/flush
pub async fn flush(credentials: Credentials, api: Api) -> Result<Response, Rejection> {
    api.authorize(&credentials, &[Need::Admin])?;
    api.admit()?;
    api.layer.flush().await.map_err(ApiError::from)?;
    Ok(empty(StatusCode::NO_CONTENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_parameter() {
        assert_eq!(parse_wait(None, 60).unwrap(), Duration::ZERO);
        assert_eq!(
            parse_wait(Some("1.5"), 60).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_wait(Some("999"), 60).unwrap(),
            Duration::from_secs(60)
        );
        for bad in ["abc", "-1", "NaN", "inf", ""] {
            let err = parse_wait(Some(bad), 60).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidParameter, "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_wait_is_a_duration_within_the_cap_or_refused(raw in "\\PC{0,40}|[0-9.eE+-]{0,40}", cap in 0u64..=86_400) {
            if let Ok(wait) = parse_wait(Some(&raw), cap) {
                proptest::prop_assert!(wait <= Duration::from_secs(cap));
            }
        }
    }
}
