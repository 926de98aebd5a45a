//! API errors and the one place where each becomes a status code.

use std::convert::Infallible;

use serde::Serialize;
use warp::Rejection;
use warp::http::StatusCode;
use warp::http::header::{CONNECTION, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use warp::reply::Response;

use super::reply::{Format, respond};
use crate::auth::Denied;
use crate::layer;
use crate::message::MessageError;
use crate::names::NameError;
use crate::store::StoreError;

/// What kind of failure; each has one code and one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// 400 `invalid_name`: a channel or group name breaks the naming rules.
    InvalidName,
    /// 400 `invalid_message`: the body decodes but is not a valid message (e.g. no string `type`).
    InvalidMessage,
    /// 400 `invalid_body`: the body or frame cannot be read or decoded (bad JSON, msgpack, UTF-8).
    InvalidBody,
    /// 400 `invalid_parameter`: a bad query parameter, header or WebSocket request field.
    InvalidParameter,
    /// 400 `invalid_last_event_id`: a resume id above every id the server has assigned.
    InvalidLastEventId,
    /// 401 `unauthorized`: no token where one is needed, or one that is unknown,
    /// malformed, expired or badly signed; sent with `WWW-Authenticate`.
    Unauthorized,
    /// 403 `forbidden`: a token without the permission, or a Host or Origin (CORS)
    /// that is not allowed.
    Forbidden,
    /// 404 `not_found`: no route has this path.
    NotFound,
    /// 405 `method_not_allowed`: a known path with the wrong method.
    MethodNotAllowed,
    /// 413 `message_too_large`: the body or message is over `max_message_bytes`.
    MessageTooLarge,
    /// 429 `channel_full`: the channel already holds its capacity; sent with `Retry-After: 1`.
    ChannelFull,
    /// 429 `limit_reached`: the layer holds as much as a `[limits]` key allows, or a
    /// connection or stream asks for more than one may hold.
    LimitReached,
    /// 429 `rate_limited`: the client is over its publish rate or connection count; sent
    /// with `Retry-After`.
    RateLimited,
    /// 408 `request_timeout`: the request's head or body did not arrive in time.
    RequestTimeout,
    /// 503 `unavailable`: shutting down, at the connection limit, or storage failing.
    Unavailable,
    /// 507 `storage_full`: the disk is full (or over quota), or the data directory is at
    /// `storage.max_disk_bytes`, so the publish was refused.
    StorageFull,
    /// 500 `internal`: an unexpected failure, such as an unhandled rejection or a failed backup.
    Internal,
}

impl ErrorKind {
    /// Every kind, for the metrics to show each code before its first refusal.
    pub const ALL: [ErrorKind; 17] = [
        ErrorKind::InvalidName,
        ErrorKind::InvalidMessage,
        ErrorKind::InvalidBody,
        ErrorKind::InvalidParameter,
        ErrorKind::InvalidLastEventId,
        ErrorKind::Unauthorized,
        ErrorKind::Forbidden,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::MessageTooLarge,
        ErrorKind::ChannelFull,
        ErrorKind::LimitReached,
        ErrorKind::RateLimited,
        ErrorKind::RequestTimeout,
        ErrorKind::Unavailable,
        ErrorKind::StorageFull,
        ErrorKind::Internal,
    ];

    /// The `code` clients see.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidName => "invalid_name",
            ErrorKind::InvalidMessage => "invalid_message",
            ErrorKind::InvalidBody => "invalid_body",
            ErrorKind::InvalidParameter => "invalid_parameter",
            ErrorKind::InvalidLastEventId => "invalid_last_event_id",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::MessageTooLarge => "message_too_large",
            ErrorKind::ChannelFull => "channel_full",
            ErrorKind::LimitReached => "limit_reached",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::StorageFull => "storage_full",
            ErrorKind::Internal => "internal",
        }
    }

    /// The HTTP status for this kind: the only place a status code is chosen for an error.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidName
            | ErrorKind::InvalidMessage
            | ErrorKind::InvalidBody
            | ErrorKind::InvalidParameter
            | ErrorKind::InvalidLastEventId => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::ChannelFull | ErrorKind::LimitReached | ErrorKind::RateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answer: a kind and a message for a person, free of internals.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// What failed; picks the `code` and the HTTP status.
    pub kind: ErrorKind,
    /// A human-readable explanation, sent as `message`.
    pub message: String,
    /// Seconds a client should wait before trying again, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl warp::reject::Reject for ApiError {}

/// At most this many bytes of a client's input are quoted back in an error message, so
/// that a huge header or parameter is not sent back whole.
const QUOTED_BYTES: usize = 64;

/// `input` quoted for an error message: at most [`QUOTED_BYTES`] of it (cut at a
/// character boundary), followed by `…` when cut.
pub(crate) fn quoted(input: &str) -> String {
    let end = input.floor_char_boundary(QUOTED_BYTES);
    let cut = if end < input.len() { "…" } else { "" };
    format!("{:?}{cut}", &input[..end])
}

/// What went wrong, as every error body and WebSocket error frame says it.
#[derive(Serialize)]
pub(crate) struct ErrorDoc<'a> {
    code: &'static str,
    message: &'a str,
}

/// An HTTP error body: `{"error": {"code": ..., "message": ...}}`.
#[derive(Serialize)]
struct ErrorReply<'a> {
    error: ErrorDoc<'a>,
}

impl ApiError {
    /// An error of `kind` with `message` for the client.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let retry_after = (kind == ErrorKind::ChannelFull).then_some(1);
        ApiError {
            kind,
            message: message.into(),
            retry_after,
        }
    }

    /// The same error, telling the client to wait `secs` before trying again.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The `{"code": ..., "message": ...}` document.
    pub(crate) fn doc(&self) -> ErrorDoc<'_> {
        ErrorDoc {
            code: self.kind.code(),
            message: &self.message,
        }
    }

    /// Counts the refusal in the metrics and logs it (at debug): every error sent to a
    /// client, as a response or a WebSocket frame, passes here.
    pub(crate) fn record(&self) {
        crate::metrics::metrics().refused(self.kind.code());
        tracing::debug!(code = self.kind.code(), detail = %self.message, "request refused");
    }

    /// The HTTP answer, counted and logged: always JSON, whatever the request asked for.
    pub(crate) fn into_response(self) -> Response {
        self.record();
        self.response()
    }

    /// The HTTP answer, not counted (for one made ahead and sent later).
    pub(crate) fn response(self) -> Response {
        let mut response = respond(
            Format::Json,
            self.kind.status(),
            &ErrorReply { error: self.doc() },
        );
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.kind == ErrorKind::Unauthorized {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"herald\""),
            );
        }
        if matches!(
            self.kind,
            ErrorKind::MessageTooLarge | ErrorKind::RequestTimeout
        ) {
            // The body may be left unread, and then the connection cannot serve another
            // request: say so, or keep-alive clients reuse it and their next request fails.
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<layer::Error> for ApiError {
    fn from(e: layer::Error) -> Self {
        use layer::Error as E;
        let kind = match &e {
            E::InvalidName(_) => ErrorKind::InvalidName,
            E::InvalidMessage(MessageError::Malformed(_)) => ErrorKind::InvalidBody,
            E::InvalidMessage(MessageError::Invalid(_)) => ErrorKind::InvalidMessage,
            E::MessageTooLarge { .. } => ErrorKind::MessageTooLarge,
            E::ChannelFull { .. } => ErrorKind::ChannelFull,
            E::LimitReached { .. } => ErrorKind::LimitReached,
            E::Storage(StoreError::Full | StoreError::DiskLimit { .. }) => ErrorKind::StorageFull,
            E::Storage(_) | E::Config(_) => {
                tracing::error!(error = %e, "storage failure while serving a request");
                return ApiError::new(
                    ErrorKind::Unavailable,
                    "storage is failing; try again later",
                );
            }
        };
        ApiError::new(kind, e.to_string())
    }
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Unauthorized(why) => ApiError::new(ErrorKind::Unauthorized, why),
            Denied::Forbidden(why) => ApiError::new(ErrorKind::Forbidden, why),
        }
    }
}

impl From<NameError> for ApiError {
    fn from(e: NameError) -> Self {
        ApiError::from(layer::Error::from(e))
    }
}

impl From<MessageError> for ApiError {
    fn from(e: MessageError) -> Self {
        ApiError::from(layer::Error::from(e))
    }
}

/// Turns every rejection, ours or warp's, into a status and a JSON error body.
pub(crate) async fn handle_rejection(err: Rejection) -> Result<Response, Infallible> {
    let error = if let Some(api) = err.find::<ApiError>() {
        api.clone()
    } else if let Some(e) = err.find::<warp::filters::cors::CorsForbidden>() {
        ApiError::new(ErrorKind::Forbidden, e.to_string())
    } else if err.is_not_found() {
        ApiError::new(ErrorKind::NotFound, "no such path")
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            ErrorKind::MethodNotAllowed,
            "this path does not take that method",
        )
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(ErrorKind::MessageTooLarge, "the body is too large")
    } else if let Some(e) = err.find::<warp::reject::InvalidQuery>() {
        ApiError::new(ErrorKind::InvalidParameter, e.to_string())
    } else if let Some(e) = err.find::<warp::reject::InvalidHeader>() {
        ApiError::new(ErrorKind::InvalidParameter, e.to_string())
    } else if let Some(e) = err.find::<warp::reject::MissingHeader>() {
        ApiError::new(ErrorKind::InvalidParameter, e.to_string())
    } else if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
        ApiError::new(ErrorKind::InvalidBody, "unsupported content type")
    } else if let Some(e) = err.find::<warp::reject::LengthRequired>() {
        ApiError::new(ErrorKind::InvalidBody, e.to_string())
    } else {
        tracing::warn!(rejection = ?err, "unhandled rejection");
        ApiError::new(ErrorKind::Internal, "internal error")
    };
    Ok(error.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_input_is_cut_at_64_bytes_on_a_character_boundary() {
        assert_eq!(quoted("abc"), "\"abc\"");
        assert_eq!(quoted(&"x".repeat(64)), format!("\"{}\"", "x".repeat(64)));
        assert_eq!(
            quoted(&"x".repeat(100_000)),
            format!("\"{}\"…", "x".repeat(64))
        );
        // 'é' is two bytes: 63 of 'x' then 'é' would straddle byte 64.
        let straddling = format!("{}é and more", "x".repeat(63));
        assert_eq!(quoted(&straddling), format!("\"{}\"…", "x".repeat(63)));
    }
}
