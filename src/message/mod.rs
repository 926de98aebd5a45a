//! Messages: maps with a string `"type"`, stored as msgpack, and their JSON form.
//!
//! A [`Message`] is validated once when it is built (from JSON, msgpack or a value) and
//! keeps its msgpack encoding, which is what the store writes and what clients get back.
//! Key order and the integer/float distinction survive every round trip; binary values
//! appear in JSON as `{"$binary": "<base64>"}`.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use rmpv::Value;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Serialize, Serializer};

mod transcode;
mod walk;

use serde_json::value::RawValue;
use walk::Walk;

/// Deepest nesting a message may have (the top-level map counts as level 1).
pub(crate) const MAX_DEPTH: usize = 32;

/// The key Django reserves for routing, refused in messages.
pub(crate) const RESERVED_KEY: &str = "__asgi_channel__";

/// The JSON key that carries binary values in JSON form.
pub(crate) const BINARY_KEY: &str = "$binary";

/// Why bytes or a value are not an acceptable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    /// The bytes are not well-formed JSON, msgpack or UTF-8.
    #[error("{0}")]
    Malformed(String),
    /// Well-formed, but not a valid message (no type, not a map, reserved key, too deep).
    #[error("{0}")]
    Invalid(String),
}

/// A validated message with its msgpack encoding (and its JSON text, made once on demand).
#[derive(Debug)]
pub struct Message {
    msgpack: Bytes,
    json: OnceLock<Box<RawValue>>,
}

/// A message in a reply: in JSON its JSON text as it is, in msgpack its value (so binary
/// stays binary and key order is kept either way).
impl Serialize for Message {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.raw_json().serialize(serializer)
        } else {
            self.value().serialize(serializer)
        }
    }
}

impl Clone for Message {
    fn clone(&self) -> Self {
        Message::trusted(self.msgpack.clone())
    }
}

impl PartialEq for Message {
    fn eq(&self, other: &Self) -> bool {
        self.msgpack == other.msgpack
    }
}

impl Message {
    /// Validates `value` and encodes it.
    pub fn from_value(value: &Value) -> Result<Self, MessageError> {
        validate(value)?;
        let mut buf = Vec::with_capacity(64);
        rmpv::encode::write_value(&mut buf, value).expect("writing to a Vec cannot fail");
        Ok(Message::trusted(buf.into()))
    }

    /// Decodes and validates a msgpack map.
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, MessageError> {
        Message::decode_msgpack(bytes, None)
    }

    /// [`Message::from_msgpack`], except that a map without a `"type"` gets
    /// `default_type` (when given) instead of being refused.
    pub(crate) fn decode_msgpack(
        bytes: &[u8],
        default_type: Option<&str>,
    ) -> Result<Self, MessageError> {
        Message::checked(Bytes::copy_from_slice(bytes), default_type)
    }

    /// The message `msgpack` holds, checked in one walk over the bytes; a map without a
    /// `"type"` gets `default_type` (when given) put first.
    fn checked(msgpack: Bytes, default_type: Option<&str>) -> Result<Self, MessageError> {
        let top = Walk { rest: &msgpack }.message()?;
        match (top.has_type, default_type) {
            (true, _) => Ok(Message::trusted(msgpack)),
            (false, Some(default_type)) => {
                // The same entries behind a "type" put first: only the map's head changes.
                let mut typed = Vec::with_capacity(msgpack.len() + default_type.len() + 16);
                let entries = u32::try_from(top.entries + 1)
                    .map_err(|_| MessageError::Invalid("message has too many keys".into()))?;
                rmp::encode::write_map_len(&mut typed, entries).expect("writing to a Vec");
                rmp::encode::write_str(&mut typed, "type").expect("writing to a Vec");
                rmp::encode::write_str(&mut typed, default_type).expect("writing to a Vec");
                typed.extend_from_slice(&msgpack[top.head_len..]);
                Ok(Message::trusted(typed.into()))
            }
            (false, None) => Err(no_type()),
        }
    }

    /// Parses and validates a JSON object; `{"$binary": "..."}` becomes binary.
    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        Message::decode_json(bytes, None)
    }

    /// [`Message::from_json`], except that an object without a `"type"` gets
    /// `default_type` (when given) instead of being refused.
    pub(crate) fn decode_json(
        bytes: &[u8],
        default_type: Option<&str>,
    ) -> Result<Self, MessageError> {
        Message::checked(transcode::json_to_msgpack(bytes, 1)?.into(), default_type)
    }

    /// [`Message::from_msgpack`] of bytes already owned, without copying them.
    pub(crate) fn decode_msgpack_bytes(
        bytes: Bytes,
        default_type: Option<&str>,
    ) -> Result<Self, MessageError> {
        Message::checked(bytes, default_type)
    }

    /// The message `{"type": "text", "text": text}` for plain-text publishes.
    pub fn text(text: &str) -> Self {
        let value = Value::Map(vec![
            (Value::from("type"), Value::from("text")),
            (Value::from("text"), Value::from(text)),
        ]);
        Message::from_value(&value).expect("a text message is valid")
    }

    /// Wraps msgpack that was validated before (e.g. read back from the store).
    pub(crate) fn trusted(msgpack: Bytes) -> Self {
        Message {
            msgpack,
            json: OnceLock::new(),
        }
    }

    /// The msgpack encoding, as stored.
    pub fn msgpack(&self) -> &Bytes {
        &self.msgpack
    }

    /// The number of bytes of the msgpack encoding.
    pub(crate) fn encoded_len(&self) -> usize {
        self.msgpack.len()
    }

    /// The decoded value.
    pub fn value(&self) -> Value {
        rmpv::decode::read_value(&mut &self.msgpack[..]).expect("stored messages are valid")
    }

    /// The JSON form, on one line; computed once and shared by every reader.
    pub fn json(&self) -> &str {
        self.raw_json().get()
    }

    fn raw_json(&self) -> &RawValue {
        self.json.get_or_init(|| {
            serde_json::value::to_raw_value(&value_to_json(&self.value()))
                .expect("a JSON value always serializes")
        })
    }
}

/// Parses JSON text straight into a msgpack value, keeping key order (a repeated key
/// keeps its first place and its last value) and turning `{"$binary": ...}` into
/// binary. The text's top level is at nesting level `depth` (1 for a message), and
/// nesting deeper than [`MAX_DEPTH`] is refused as soon as it is seen.
pub(crate) fn parse_json_at(bytes: &[u8], depth: usize) -> Result<Value, MessageError> {
    let refusal = Cell::new(None);
    let mut parser = serde_json::Deserializer::from_slice(bytes);
    let parsed = JsonValue {
        depth,
        refusal: &refusal,
    }
    .deserialize(&mut parser)
    .and_then(|value| parser.end().map(|()| value));
    parsed.map_err(|e| {
        refusal
            .take()
            .unwrap_or_else(|| MessageError::Malformed(format!("malformed JSON: {e}")))
    })
}

/// A request map around a message (a WebSocket frame), read without a value tree: the
/// `"message"` stays msgpack bytes, the other fields are decoded. A field that is not a
/// single value (a `ref` is echoed back as it came) may take at most
/// [`MAX_FIELD_BYTES`], so that decoding the fields costs little whatever the frame.
pub(crate) struct Request {
    pub fields: Vec<(String, Value)>,
    /// The `"message"` field's msgpack, if there is one.
    pub message: Option<Bytes>,
}

/// Largest encoding of a request field other than `"message"` that holds an array or
/// a map.
pub(crate) const MAX_FIELD_BYTES: usize = 1024;

impl Request {
    /// A msgpack request.
    pub(crate) fn from_msgpack(bytes: Bytes) -> Result<Request, MessageError> {
        let mut request = Request {
            fields: Vec::new(),
            message: None,
        };
        for (key, range) in (Walk { rest: &bytes }).fields()? {
            let raw = &bytes[range.clone()];
            if key == "message" {
                request.message = Some(bytes.slice(range));
                continue;
            }
            let nested = matches!(raw[0], 0x80..=0x9f | 0xdc..=0xdf);
            if nested && raw.len() > MAX_FIELD_BYTES {
                return Err(MessageError::Invalid(format!(
                    "a request field other than \"message\" may hold at most {MAX_FIELD_BYTES} bytes of arrays and maps"
                )));
            }
            let value = rmpv::decode::read_value(&mut &raw[..])
                .map_err(|e| MessageError::Malformed(format!("malformed msgpack: {e}")))?;
            request.fields.push((key.to_string(), value));
        }
        Ok(request)
    }

    /// A JSON request, transcoded to msgpack first (the request is nesting level 0,
    /// its message level 1).
    pub(crate) fn from_json(text: &[u8]) -> Result<Request, MessageError> {
        Request::from_msgpack(transcode::json_to_msgpack(text, 0)?.into())
    }
}

/// Maps with more keys than this find repeated keys through a hash index.
const LINEAR_KEY_SEARCH: usize = 16;

/// A serde seed that builds a msgpack [`Value`] from JSON at nesting level `depth`.
/// A message rule broken on the way is kept in `refusal`, so that the caller reports
/// it rather than serde's wording.
#[derive(Clone, Copy)]
struct JsonValue<'r> {
    depth: usize,
    refusal: &'r Cell<Option<MessageError>>,
}

impl JsonValue<'_> {
    fn refuse<E: de::Error>(&self, error: MessageError) -> E {
        let text = error.to_string();
        self.refusal.set(Some(error));
        E::custom(text)
    }

    /// The seed for the values nested in this one.
    fn nested(self) -> Self {
        JsonValue {
            depth: self.depth + 1,
            ..self
        }
    }
}

impl<'de> DeserializeSeed<'de> for JsonValue<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.depth > MAX_DEPTH {
            return Err(self.refuse(too_deep()));
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonValue<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Nil)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Boolean(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::from(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(Value::from(u))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::F64(f))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::from(s))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::from(s))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.nested())? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut entries: Vec<(Value, Value)> = Vec::new();
        let mut index: Option<HashMap<String, usize>> = None;
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self.nested())?;
            let repeated = match &index {
                Some(index) => index.get(&key).copied(),
                None => entries.iter().position(|(k, _)| k.as_str() == Some(&key)),
            };
            if let Some(at) = repeated {
                entries[at].1 = value;
                continue;
            }
            if index.is_none() && entries.len() == LINEAR_KEY_SEARCH {
                let keys = entries.iter().enumerate();
                index = Some(
                    keys.map(|(at, (k, _))| (k.as_str().unwrap_or_default().to_string(), at))
                        .collect(),
                );
            }
            if let Some(index) = &mut index {
                index.insert(key.clone(), entries.len());
            }
            entries.push((Value::from(key), value));
        }
        match entries.as_slice() {
            [(key, Value::String(b64))] if key.as_str() == Some(BINARY_KEY) => {
                let bytes = b64
                    .as_str()
                    .and_then(|b64| BASE64.decode(b64).ok())
                    .ok_or_else(|| {
                        self.refuse(MessageError::Invalid(format!(
                            "{BINARY_KEY:?} must hold base64"
                        )))
                    })?;
                Ok(Value::Binary(bytes))
            }
            _ => Ok(Value::Map(entries)),
        }
    }
}

fn too_deep() -> MessageError {
    MessageError::Invalid(format!("message nests deeper than {MAX_DEPTH} levels"))
}

fn no_type() -> MessageError {
    MessageError::Invalid("message must have a \"type\" key".to_string())
}

/// Checks the message rules on a decoded value.
fn validate(value: &Value) -> Result<(), MessageError> {
    let Value::Map(entries) = value else {
        return Err(MessageError::Invalid(
            "message must be a map (a JSON object)".to_string(),
        ));
    };
    check_nested(value, 1)?;
    let mut has_type = false;
    for (key, val) in entries {
        match key.as_str() {
            Some(RESERVED_KEY) => {
                return Err(MessageError::Invalid(format!(
                    "message must not contain the reserved key {RESERVED_KEY:?}"
                )));
            }
            Some("type") => match val.as_str() {
                Some(t) if !t.is_empty() => has_type = true,
                _ => {
                    return Err(MessageError::Invalid(
                        "message \"type\" must be a non-empty string".to_string(),
                    ));
                }
            },
            _ => {}
        }
    }
    if !has_type {
        return Err(MessageError::Invalid(
            "message must have a \"type\" key".to_string(),
        ));
    }
    Ok(())
}

fn check_nested(value: &Value, depth: usize) -> Result<(), MessageError> {
    if depth > MAX_DEPTH {
        return Err(too_deep());
    }
    match value {
        Value::Array(items) => items.iter().try_for_each(|v| check_nested(v, depth + 1)),
        Value::Map(entries) => entries.iter().try_for_each(|(k, v)| {
            if !k.is_str() {
                return Err(MessageError::Invalid(
                    "map keys must be strings".to_string(),
                ));
            }
            check_nested(v, depth + 1)
        }),
        Value::String(s) if !s.is_str() => Err(MessageError::Malformed(
            "strings must be valid UTF-8".to_string(),
        )),
        Value::Ext(..) => Err(MessageError::Invalid(
            "msgpack extension types are not supported".to_string(),
        )),
        _ => Ok(()),
    }
}

/// Converts a msgpack value to JSON (binary to `{"$binary": ...}`).
pub(crate) fn value_to_json(value: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Value::Nil => J::Null,
        Value::Boolean(b) => J::Bool(*b),
        Value::Integer(i) => i
            .as_i64()
            .map(J::from)
            .or_else(|| i.as_u64().map(J::from))
            .unwrap_or(J::Null),
        Value::F32(f) => float_to_json(f64::from(*f)),
        Value::F64(f) => float_to_json(*f),
        Value::String(s) => J::String(s.as_str().unwrap_or_default().to_string()),
        Value::Binary(b) => serde_json::json!({ BINARY_KEY: BASE64.encode(b) }),
        Value::Array(items) => J::Array(items.iter().map(value_to_json).collect()),
        Value::Map(entries) => J::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or_default().to_string(), value_to_json(v)))
                .collect(),
        ),
        Value::Ext(..) => J::Null,
    }
}

/// JSON has no NaN or infinity; they become null. Whole floats keep their fraction.
fn float_to_json(f: f64) -> serde_json::Value {
    serde_json::Number::from_f64(f)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {

    /// The value-tree decoding that the walk and the transcoder replaced: the reference
    /// they are held to. A map without a `"type"` gets `default_type` (when given).
    fn decode_value(value: &Value, default_type: Option<&str>) -> Result<Message, MessageError> {
        match default_type.and_then(|t| with_type(value, t)) {
            Some(typed) => Message::from_value(&typed),
            None => Message::from_value(value),
        }
    }

    /// `value` with `"type": default_type` put first, if it is a map without a `"type"`.
    fn with_type(value: &Value, default_type: &str) -> Option<Value> {
        let entries = value.as_map()?;
        if entries.iter().any(|(k, _)| k.as_str() == Some("type")) {
            return None;
        }
        let mut typed = Vec::with_capacity(entries.len() + 1);
        typed.push((Value::from("type"), Value::from(default_type)));
        typed.extend(entries.iter().cloned());
        Some(Value::Map(typed))
    }
    use super::*;

    #[test]
    fn json_round_trip_keeps_order_and_number_kinds() {
        let text = r#"{"type":"chat.message","z":1,"a":1.0,"big":18446744073709551615,"neg":-5,"nested":{"b":[true,null,"x"],"a":2.5}}"#;
        let message = Message::from_json(text.as_bytes()).unwrap();
        assert_eq!(message.json(), text);
    }

    #[test]
    fn msgpack_round_trip_keeps_binary() {
        let value = Value::Map(vec![
            (Value::from("type"), Value::from("blob")),
            (Value::from("data"), Value::Binary(vec![0, 159, 146, 150])),
            (Value::from("f"), Value::F32(1.5)),
        ]);
        let message = Message::from_value(&value).unwrap();
        let again = Message::from_msgpack(message.msgpack()).unwrap();
        assert_eq!(again.value(), value);
        assert_eq!(
            message.json(),
            r#"{"type":"blob","data":{"$binary":"AJ+Slg=="},"f":1.5}"#
        );
        let from_json = Message::from_json(message.json().as_bytes()).unwrap();
        assert_eq!(
            from_json.value().as_map().unwrap()[1].1,
            Value::Binary(vec![0, 159, 146, 150])
        );
    }

    #[test]
    fn json_parsing_matches_serde_json_and_keeps_the_last_of_repeated_keys() {
        let many: String = (0..40).map(|i| format!(",\"k{}\":{i}", i % 20)).collect();
        for text in [
            r#"{"type":"t","a":[1,-2,3.5,1e300,null,true,"s\u00e9\n"],"b":{"c":{}}}"#.to_string(),
            r#"{"type":"t","x":1,"type":"u","x":2}"#.to_string(),
            format!(r#"{{"type":"t"{many}}}"#),
        ] {
            let expected: serde_json::Value = serde_json::from_str(&text).unwrap();
            let parsed = parse_json_at(text.as_bytes(), 1).unwrap();
            // As text, so that the key order is compared too.
            assert_eq!(
                value_to_json(&parsed).to_string(),
                expected.to_string(),
                "{text}"
            );
            let transcoded = Message::from_json(text.as_bytes()).unwrap();
            assert_eq!(transcoded.json(), expected.to_string(), "{text}");
        }
        let err = Message::from_json(br#"{"type":"t","b":{"$binary":"not base64!"}}"#).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
        let err = parse_json_at(br#"{"type":"t","b":{"$binary":"not base64!"}}"#, 1).unwrap_err();
        assert!(err.to_string().contains("base64"), "{err}");
        assert!(matches!(
            parse_json_at(b"{} x", 1),
            Err(MessageError::Malformed(_))
        ));
    }

    #[test]
    fn a_default_type_is_put_first_only_where_the_type_is_missing() {
        let typed = Message::decode_json(br#"{"a":1}"#, Some("note")).unwrap();
        assert_eq!(typed.json(), r#"{"type":"note","a":1}"#);
        let kept = Message::decode_json(br#"{"a":1,"type":"x"}"#, Some("note")).unwrap();
        assert_eq!(kept.json(), r#"{"a":1,"type":"x"}"#);
        let msgpack =
            Message::from_value(&Value::Map(vec![(Value::from("type"), Value::from("x"))]))
                .unwrap();
        let untyped = [0x81, 0xa1, b'a', 0x01];
        assert!(Message::from_msgpack(&untyped).is_err());
        let typed = Message::decode_msgpack(&untyped, Some("note")).unwrap();
        assert_eq!(typed.json(), r#"{"type":"note","a":1}"#);
        let kept = Message::decode_msgpack(msgpack.msgpack(), Some("note")).unwrap();
        assert_eq!(kept, msgpack);
        assert!(Message::decode_json(br#"{"type":5}"#, Some("note")).is_err());
    }

    #[test]
    fn refusals() {
        let cases: &[(&str, &str)] = &[
            (r#"[1,2]"#, "must be a map"),
            (r#"{"a":1}"#, "must have a \"type\""),
            (r#"{"type":""}"#, "non-empty string"),
            (r#"{"type":5}"#, "non-empty string"),
            (r#"{"type":"x","__asgi_channel__":"y"}"#, "reserved key"),
        ];
        for (json, expected) in cases {
            let err = Message::from_json(json.as_bytes()).unwrap_err();
            assert!(matches!(err, MessageError::Invalid(_)), "{json}");
            assert!(err.to_string().contains(expected), "{json}: {err}");
        }
        assert!(matches!(
            Message::from_json(b"{\"type\":"),
            Err(MessageError::Malformed(_))
        ));
        assert!(matches!(
            Message::from_msgpack(&[0x81, 0xa4]),
            Err(MessageError::Malformed(_))
        ));
    }

    #[test]
    fn depth_limit_is_32_levels() {
        let nest = |levels: usize| {
            let mut json = String::from(r#"{"type":"deep","v":"#);
            for _ in 0..levels - 2 {
                json.push('[');
            }
            json.push('1');
            for _ in 0..levels - 2 {
                json.push(']');
            }
            json.push('}');
            json
        };
        // The map is level 1, the value under "v" level 2, so this is exactly 32 levels.
        Message::from_json(nest(32).as_bytes()).unwrap();
        let err = Message::from_json(nest(33).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("deeper than 32"), "{err}");
        let err = Message::from_json(nest(5000).as_bytes()).unwrap_err();
        assert!(matches!(err, MessageError::Invalid(_)), "{err}");

        let mut deep = Vec::new();
        deep.extend_from_slice(&[0x82, 0xa4, b't', b'y', b'p', b'e', 0xa1, b'x', 0xa1, b'v']);
        deep.extend(std::iter::repeat_n(0x91, 100_000));
        deep.push(0x01);
        let err = Message::from_msgpack(&deep).unwrap_err();
        assert!(err.to_string().contains("deeper than 32"), "{err}");
    }

    /// Valid bodies of both encodings, to mutate.
    fn seeds() -> Vec<Vec<u8>> {
        let json =
            br#"{"type":"chat.message","n":[1,2.5,-3,{"$binary":"AJ+Slg=="}],"s":"x\u00e9"}"#;
        let message = Message::from_json(json).unwrap();
        let repeated = br#"{"a":1,"type":"t","a":[2,{"x":1,"x":{"$binary":"AAAA"}}],"b":{"$binary":"AA=="},"a":3e0}"#;
        vec![json.to_vec(), message.msgpack().to_vec(), repeated.to_vec()]
    }

    /// Whether a msgpack body is a valid message, decided on its decoded value.
    fn reference_accepts(body: &[u8]) -> bool {
        use serde::Deserialize;
        let mut rest = body;
        let Ok(value) = rmpv::decode::read_value_with_max_depth(&mut rest, 2 * MAX_DEPTH + 8)
        else {
            return false;
        };
        let strict = serde::de::IgnoredAny::deserialize(&mut rmp_serde::Deserializer::new(body));
        rest.is_empty() && strict.is_ok() && validate(&value).is_ok()
    }

    /// Every decoder either refuses a body or gives a message that decodes to itself again.
    fn check_decoders(body: &[u8]) {
        // The transcoder writes what the value tree would encode, and refuses alike.
        let tree = parse_json_at(body, 1).and_then(|v| decode_value(&v, Some("fuzz")));
        match (tree, Message::decode_json(body, Some("fuzz"))) {
            (Ok(tree), Ok(streamed)) => assert_eq!(tree.msgpack(), streamed.msgpack(), "{body:?}"),
            (Err(tree), Err(streamed)) => assert_eq!(
                std::mem::discriminant(&tree),
                std::mem::discriminant(&streamed),
                "{body:?}: {tree} / {streamed}"
            ),
            (tree, streamed) => panic!("{body:?}: {tree:?} / {streamed:?}"),
        }
        if let Ok(message) = Message::decode_json(body, Some("fuzz")) {
            assert_eq!(
                Message::from_json(message.json().as_bytes())
                    .unwrap()
                    .json(),
                message.json()
            );
        }
        let accepted = Message::decode_msgpack(body, None);
        assert_eq!(accepted.is_ok(), reference_accepts(body), "{body:?}");
        if let Ok(message) = accepted {
            assert_eq!(
                &Message::from_msgpack(message.msgpack()).unwrap().msgpack()[..],
                &message.msgpack()[..]
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        #[test]
        fn random_bodies_never_panic_a_decoder(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            check_decoders(&body);
        }

        #[test]
        fn mutated_bodies_never_panic_a_decoder(seed in 0..3usize, edits in crate::testing::edits(1)) {
            check_decoders(&crate::testing::mutated(&seeds()[seed], &edits));
        }
    }
}
