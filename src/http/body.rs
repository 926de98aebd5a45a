//! Request bodies: read with a size limit, then decoded by content type into a message.

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use super::error::{ApiError, ErrorKind};
use crate::message::Message;

/// How a body is to be read, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// `application/json`: a JSON object.
    Json,
    /// `application/msgpack` or `application/x-msgpack`: a msgpack map.
    Msgpack,
    /// Any other type: UTF-8 text, sent as a `text` message.
    Text,
}

impl BodyKind {
    /// JSON for `application/json`, msgpack for `application/(x-)msgpack`, text otherwise.
    pub(crate) fn from_content_type(content_type: Option<&str>) -> BodyKind {
        let essence = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|ct| ct.trim().to_ascii_lowercase());
        match essence.as_deref() {
            Some("application/json") => BodyKind::Json,
            Some("application/msgpack" | "application/x-msgpack") => BodyKind::Msgpack,
            _ => BodyKind::Text,
        }
    }
}

/// The largest body read for a message of at most `max_message_bytes` (JSON and base64
/// take more room than msgpack); the layer checks the exact encoded size after.
pub(crate) fn body_limit(max_message_bytes: usize) -> usize {
    max_message_bytes
        .saturating_mul(2)
        .saturating_add(64 * 1024)
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorKind::MessageTooLarge,
        format!("the body is larger than {limit} bytes"),
    )
}

/// Reads the whole body, refusing it as soon as the declared length or the bytes
/// received pass `limit`.
pub(crate) async fn read_limited<S, B>(
    content_length: Option<u64>,
    mut body: S,
    limit: usize,
) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    if content_length.is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    let mut out = BytesMut::with_capacity(content_length.unwrap_or(0).min(limit as u64) as usize);
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk
            .map_err(|_| ApiError::new(ErrorKind::InvalidBody, "the body could not be read"))?;
        if out.len() + chunk.remaining() > limit {
            return Err(too_large(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

/// Decodes a body into a message: a JSON object, a msgpack map, or UTF-8 text that
/// becomes `{"type": "text", "text": BODY}`. A map without a type gets `default_type`
/// if one is given.
pub(crate) fn decode_message(
    kind: BodyKind,
    body: &[u8],
    default_type: Option<&str>,
) -> Result<Message, ApiError> {
    Ok(match kind {
        BodyKind::Json => Message::decode_json(body, default_type)?,
        BodyKind::Msgpack => Message::decode_msgpack(body, default_type)?,
        BodyKind::Text => {
            let text = std::str::from_utf8(body).map_err(|_| {
                ApiError::new(ErrorKind::InvalidBody, "a text body must be valid UTF-8")
            })?;
            Message::text(text)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(
            BodyKind::from_content_type(Some("application/json; charset=utf-8")),
            BodyKind::Json
        );
        assert_eq!(
            BodyKind::from_content_type(Some("application/x-msgpack")),
            BodyKind::Msgpack
        );
        assert_eq!(
            BodyKind::from_content_type(Some("application/x-www-form-urlencoded")),
            BodyKind::Text
        );
        assert_eq!(BodyKind::from_content_type(None), BodyKind::Text);
    }

    #[test]
    fn text_bodies() {
        let m = decode_message(BodyKind::Text, b"disk full", Some("x")).unwrap();
        assert_eq!(m.json(), r#"{"type":"text","text":"disk full"}"#);
        let err = decode_message(BodyKind::Text, b"\xff\xfe", None).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidBody);
        let err = decode_message(BodyKind::Json, b"{\"type\":1}", None).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidMessage);
        let err = decode_message(BodyKind::Json, b"{\"a\":1}", None).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidMessage);
        let m = decode_message(BodyKind::Json, b"{\"a\":1}", Some("x")).unwrap();
        assert_eq!(m.json(), r#"{"type":"x","a":1}"#);
        let err = decode_message(BodyKind::Json, b"{\"ty", None).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidBody);
    }
}
