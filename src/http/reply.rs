//! Response documents: `#[derive(Serialize)]` types, written as JSON by serde_json or
//! as msgpack (maps with field names) by rmp-serde.
//!
//! Ids are decimal strings in both encodings (JSON numbers lose precision past 2^53).
//! Messages are embedded as they are ([`Message`]'s own `Serialize`).

use rmpv::Value;
use serde::{Serialize, Serializer};
use warp::http::StatusCode;
use warp::http::header::{CONTENT_TYPE, HeaderValue};
use warp::reply::Response;

use crate::message::{Message, value_to_json};

/// The encoding of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// `application/json`, the default.
    Json,
    /// `application/msgpack`, when the `Accept` header asks for it.
    Msgpack,
}

impl Format {
    /// msgpack when the `Accept` header asks for it, JSON otherwise.
    pub(crate) fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/msgpack") || a.contains("application/x-msgpack") => {
                Format::Msgpack
            }
            _ => Format::Json,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Msgpack => "application/msgpack",
        }
    }

    /// `doc` in this encoding.
    pub(crate) fn encode(self, doc: &impl Serialize) -> Vec<u8> {
        // Replies are maps with string keys of strings, numbers and messages: both
        // encoders take every one of them.
        match self {
            Format::Json => serde_json::to_vec(doc).expect("replies encode as JSON"),
            Format::Msgpack => rmp_serde::to_vec_named(doc).expect("replies encode as msgpack"),
        }
    }
}

/// A message id, written as a decimal string so that JSON keeps its precision.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Id(pub(crate) u64);

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// A client's msgpack value echoed back (a WebSocket `ref`): in JSON with binary as
/// `{"$binary": ...}`, like messages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Echo<'a>(pub(crate) &'a Value);

impl Serialize for Echo<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            value_to_json(self.0).serialize(serializer)
        } else {
            self.0.serialize(serializer)
        }
    }
}

/// A channel and what the request did there: a send's id, a receive's message.
#[derive(Serialize)]
pub(crate) struct ChannelReply<'a> {
    pub(crate) channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<Id>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<&'a Message>,
}

/// What a group send did.
#[derive(Serialize)]
pub(crate) struct GroupSent<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<&'a str>,
    pub(crate) delivered: usize,
    pub(crate) full: usize,
}

/// A gap in a resumed stream: the messages after `after` and before `next` are gone.
#[derive(Serialize)]
pub(crate) struct Gap {
    pub(crate) after: Id,
    pub(crate) next: Id,
}

/// A response with `doc` as its body.
pub(crate) fn respond(format: Format, status: StatusCode, doc: &impl Serialize) -> Response {
    let mut response = Response::new(format.encode(doc).into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    response
}

/// An empty response with `status` (204 and the like).
pub(crate) fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Default::default());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_msgpack_agree() {
        let message = Message::from_json(br#"{"type":"t","n":1,"b":{"$binary":"AA=="}}"#).unwrap();
        let doc = ChannelReply {
            channel: "a\"b",
            id: Some(Id(u64::MAX)),
            message: Some(&message),
        };
        let json = String::from_utf8(Format::Json.encode(&doc)).unwrap();
        assert_eq!(
            json,
            r#"{"channel":"a\"b","id":"18446744073709551615","message":{"type":"t","n":1,"b":{"$binary":"AA=="}}}"#
        );
        let msgpack = Format::Msgpack.encode(&doc);
        let value = rmpv::decode::read_value(&mut &msgpack[..]).unwrap();
        let map = value.as_map().unwrap();
        assert_eq!(
            map[1],
            (Value::from("id"), Value::from("18446744073709551615"))
        );
        assert_eq!(map[2].1, message.value(), "the message as it was sent");
        assert_eq!(
            value_to_json(&value),
            serde_json::from_str::<serde_json::Value>(&json).unwrap()
        );
    }

    #[test]
    fn echoed_values_keep_binary_readable_in_json() {
        let binary = Value::Binary(vec![0, 1]);
        let json = Format::Json.encode(&[Echo(&binary)]);
        assert_eq!(json, br#"[{"$binary":"AAE="}]"#);
        let msgpack = Format::Msgpack.encode(&[Echo(&binary)]);
        assert_eq!(msgpack, [0x91, 0xc4, 2, 0, 1]);
    }
}
