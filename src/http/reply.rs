//! Response documents, written as JSON or msgpack from one description.
//!
//! Ids are decimal strings in both encodings (JSON numbers lose precision past 2^53).
//! Messages are embedded as they are: their cached JSON text, or their msgpack bytes.

use std::sync::Arc;

use rmpv::Value;
use warp::http::StatusCode;
use warp::http::header::{CONTENT_TYPE, HeaderValue};
use warp::reply::Response;

use crate::message::{Message, value_to_json};

/// The encoding of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`, the default.
    Json,
    /// `application/msgpack`, when the `Accept` header asks for it.
    Msgpack,
}

impl Format {
    /// msgpack when the `Accept` header asks for it, JSON otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
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
}

/// One value in a document.
#[derive(Debug, Clone)]
pub enum Field {
    /// A string.
    Str(String),
    /// A message id, written as a decimal string so JSON keeps its precision.
    Id(u64),
    /// A number.
    Count(usize),
    /// An array of strings.
    Strings(Vec<String>),
    /// A message, embedded as its cached JSON text or msgpack bytes.
    Message(Arc<Message>),
    /// Any msgpack value, converted to JSON for JSON output.
    Value(Value),
    /// A nested document.
    Doc(Doc),
}

/// An ordered map of fields.
#[derive(Debug, Clone, Default)]
pub struct Doc(Vec<(&'static str, Field)>);

impl Doc {
    /// An empty document.
    pub fn new() -> Self {
        Doc(Vec::new())
    }

    /// Appends `key` with `field`; keys are written in the order added.
    pub fn field(mut self, key: &'static str, field: Field) -> Self {
        self.0.push((key, field));
        self
    }

    /// Appends a string field.
    pub fn str(self, key: &'static str, value: &str) -> Self {
        self.field(key, Field::Str(value.to_string()))
    }

    /// Appends a message id, written as a decimal string.
    pub fn id(self, key: &'static str, id: u64) -> Self {
        self.field(key, Field::Id(id))
    }

    /// Appends a number field.
    pub fn count(self, key: &'static str, n: usize) -> Self {
        self.field(key, Field::Count(n))
    }

    /// Appends a message, embedded without re-encoding.
    pub fn message(self, key: &'static str, message: Arc<Message>) -> Self {
        self.field(key, Field::Message(message))
    }

    /// Appends a nested document.
    pub fn doc(self, key: &'static str, doc: Doc) -> Self {
        self.field(key, Field::Doc(doc))
    }

    /// The JSON text, on one line.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(128);
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        out.push('{');
        for (i, (key, field)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_str(out, key);
            out.push(':');
            match field {
                Field::Str(s) => push_json_str(out, s),
                Field::Id(id) => {
                    out.push('"');
                    out.push_str(&id.to_string());
                    out.push('"');
                }
                Field::Count(n) => out.push_str(&n.to_string()),
                Field::Strings(list) => {
                    out.push('[');
                    for (j, s) in list.iter().enumerate() {
                        if j > 0 {
                            out.push(',');
                        }
                        push_json_str(out, s);
                    }
                    out.push(']');
                }
                Field::Message(m) => out.push_str(m.json()),
                Field::Value(v) => out.push_str(&value_to_json(v).to_string()),
                Field::Doc(d) => d.write_json(out),
            }
        }
        out.push('}');
    }

    /// The msgpack encoding.
    pub fn to_msgpack(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.write_msgpack(&mut out);
        out
    }

    fn write_msgpack(&self, out: &mut Vec<u8>) {
        use rmp::encode as enc;
        // Writing into a Vec cannot fail.
        let _ = enc::write_map_len(out, self.0.len() as u32);
        for (key, field) in &self.0 {
            let _ = enc::write_str(out, key);
            match field {
                Field::Str(s) => {
                    let _ = enc::write_str(out, s);
                }
                Field::Id(id) => {
                    let _ = enc::write_str(out, &id.to_string());
                }
                Field::Count(n) => {
                    let _ = enc::write_uint(out, *n as u64);
                }
                Field::Strings(list) => {
                    let _ = enc::write_array_len(out, list.len() as u32);
                    for s in list {
                        let _ = enc::write_str(out, s);
                    }
                }
                Field::Message(m) => out.extend_from_slice(m.msgpack()),
                Field::Value(v) => {
                    let _ = rmpv::encode::write_value(out, v);
                }
                Field::Doc(d) => d.write_msgpack(out),
            }
        }
    }

    /// The document in `format`.
    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => self.to_json().into_bytes(),
            Format::Msgpack => self.to_msgpack(),
        }
    }
}

fn push_json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).expect("strings always serialize"));
}

/// A response with `doc` as its body.
pub fn respond(format: Format, status: StatusCode, doc: Doc) -> Response {
    let mut response = Response::new(doc.encode(format).into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    response
}

/// An empty response with `status` (204 and the like).
pub fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Default::default());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_msgpack_agree() {
        let message = Arc::new(Message::from_json(br#"{"type":"t","n":1}"#).unwrap());
        let doc = Doc::new()
            .str("channel", "a\"b")
            .id("id", u64::MAX)
            .message("message", message)
            .field("list", Field::Strings(vec!["x".into()]));
        let json = doc.to_json();
        assert_eq!(
            json,
            r#"{"channel":"a\"b","id":"18446744073709551615","message":{"type":"t","n":1},"list":["x"]}"#
        );
        let value = rmpv::decode::read_value(&mut &doc.to_msgpack()[..]).unwrap();
        let as_json = value_to_json(&value);
        assert_eq!(
            as_json,
            serde_json::from_str::<serde_json::Value>(&json).unwrap()
        );
    }
}
