//! Hostile input against a real server: each request gets the right error code, while
//! the data stored before stays intact and the server stays up. Every test first
//! stores a message, then sends the hostile requests, then checks the message is still
//! receivable, unchanged, with its id.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use rmpv::Value as Mp;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Data stored before the attack, checked after it.
struct Victim {
    id: String,
    message: serde_json::Value,
}

async fn store_victim(api: &Api) -> Victim {
    let message = json!({"type": "victim", "keep": [1, 2.5, "x"], "big": u64::MAX});
    let id = api.send("victim", &message).await;
    api.group_add("victim.group", "victim.member").await;
    Victim { id, message }
}

async fn assert_intact(api: &Api, victim: Victim) {
    api.assert_healthy().await;
    assert_eq!(
        api.receive("victim").await,
        Some((victim.id, victim.message)),
        "the message stored before the attack"
    );
    assert_eq!(api.receive("victim").await, None, "and nothing else");
    assert_eq!(api.members("victim.group").await, vec!["victim.member"]);
    // Still accepts normal traffic.
    let id = api.send("after.attack", &msg(1)).await;
    assert_eq!(api.receive("after.attack").await, Some((id, msg(1))));
}

/// One hostile HTTP request and the answer it must get.
struct Case {
    what: String,
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

impl Case {
    fn post(
        what: &str,
        content_type: &'static str,
        body: impl Into<Vec<u8>>,
        code: &'static str,
    ) -> Case {
        Case {
            what: what.to_string(),
            method: "POST",
            path: "/v1/channels/victim/messages".to_string(),
            content_type: Some(content_type),
            headers: Vec::new(),
            body: body.into(),
            status: if code == "message_too_large" {
                413
            } else {
                400
            },
            code,
        }
    }

    fn get(what: &str, path: impl Into<String>, status: u16, code: &'static str) -> Case {
        Case {
            what: what.to_string(),
            method: "GET",
            path: path.into(),
            content_type: None,
            headers: Vec::new(),
            body: Vec::new(),
            status,
            code,
        }
    }

    fn with_method(mut self, method: &'static str) -> Case {
        self.method = method;
        self
    }

    fn with_header(mut self, name: &'static str, value: &str) -> Case {
        self.headers.push((name, value.to_string()));
        self
    }

    async fn run(&self, api: &Api) {
        let mut request = api
            .http
            .request(self.method.parse().unwrap(), api.url(&self.path));
        if let Some(ct) = self.content_type {
            request = request.header("content-type", ct);
        }
        for (k, v) in &self.headers {
            request = request.header(*k, v.as_str());
        }
        if !self.body.is_empty() || self.method == "POST" {
            request = request.body(self.body.clone());
        }
        let response = within(T, &self.what, request.send())
            .await
            .unwrap_or_else(|e| panic!("{}: request failed: {e}", self.what));
        let (status, body) = json_of(response).await;
        assert_eq!(
            (status, body["error"]["code"].as_str().unwrap_or("")),
            (self.status, self.code),
            "{}: {body}",
            self.what
        );
    }
}

fn nested_json(levels: usize) -> String {
    let mut s = String::from(r#"{"type":"deep","v":"#);
    s.push_str(&"[".repeat(levels));
    s.push_str(&"]".repeat(levels));
    s.push('}');
    s
}

/// Bodies declared as JSON, text or a form that are no valid message, each with its code.
fn hostile_json_bodies() -> Vec<Case> {
    vec![
        Case::post(
            "truncated JSON",
            "application/json",
            r#"{"type":"x","a":[1,2"#,
            "invalid_body",
        ),
        Case::post(
            "JSON nested 10,000 levels",
            "application/json",
            nested_json(10_000),
            "invalid_message",
        ),
        Case::post(
            "JSON with 10,000 open brackets",
            "application/json",
            "[".repeat(10_000),
            "invalid_message",
        ),
        Case::post(
            "JSON nested 33 levels",
            "application/json",
            nested_json(32),
            "invalid_message",
        ),
        Case::post("JSON array", "application/json", "[]", "invalid_message"),
        Case::post(
            "JSON string",
            "application/json",
            r#""type""#,
            "invalid_message",
        ),
        Case::post("JSON number", "application/json", "42", "invalid_message"),
        Case::post("JSON null", "application/json", "null", "invalid_message"),
        Case::post(
            "type is a number",
            "application/json",
            r#"{"type":1}"#,
            "invalid_message",
        ),
        Case::post(
            "type is a list",
            "application/json",
            r#"{"type":["a"]}"#,
            "invalid_message",
        ),
        Case::post(
            "type is a map",
            "application/json",
            r#"{"type":{"a":"b"}}"#,
            "invalid_message",
        ),
        Case::post(
            "type is true",
            "application/json",
            r#"{"type":true}"#,
            "invalid_message",
        ),
        Case::post(
            "type is empty",
            "application/json",
            r#"{"type":""}"#,
            "invalid_message",
        ),
        Case::post(
            "no type",
            "application/json",
            r#"{"text":"hi"}"#,
            "invalid_message",
        ),
        Case::post(
            "reserved key",
            "application/json",
            r#"{"type":"x","__asgi_channel__":"specific.a!b"}"#,
            "invalid_message",
        ),
        Case::post(
            "bad base64 binary",
            "application/json",
            r#"{"type":"x","b":{"$binary":"%%%"}}"#,
            "invalid_message",
        ),
        Case::post(
            "lone surrogate",
            "application/json",
            r#"{"type":"\ud800"}"#,
            "invalid_body",
        ),
        Case::post(
            "number out of range",
            "application/json",
            r#"{"type":"x","n":1e400}"#,
            "invalid_body",
        ),
        Case::post(
            "invalid UTF-8 in JSON",
            "application/json",
            b"{\"type\":\"\xff\xfe\"}".to_vec(),
            "invalid_body",
        ),
        Case::post(
            "NUL byte before JSON",
            "application/json",
            b"\0{\"type\":\"x\"}".to_vec(),
            "invalid_body",
        ),
        Case::post(
            "invalid UTF-8 text",
            "text/plain",
            vec![b'h', b'i', 0xc3, 0x28],
            "invalid_body",
        ),
        Case::post(
            "invalid UTF-8 form body",
            "application/x-www-form-urlencoded",
            vec![0xff; 10],
            "invalid_body",
        ),
    ]
}

/// Bodies declared as msgpack (and msgpack declared as JSON) that are no valid message.
fn hostile_msgpack_bodies() -> Vec<Case> {
    let mut deep_msgpack = vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0xa1, b'x', 0xa1, b'v'];
    deep_msgpack.extend(std::iter::repeat_n(0x91, 100_000));
    deep_msgpack.push(0x01);
    let mut deep_msgpack_maps = vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0xa1, b'x'];
    for _ in 0..50_000 {
        deep_msgpack_maps.extend_from_slice(&[0xa1, b'v', 0x81]);
    }
    deep_msgpack_maps.extend_from_slice(&[0xa1, b'v', 0xc0]);
    let valid_msgpack = mp_encode(&mp_map(vec![("type", Mp::from("x"))]));
    let mut trailing = valid_msgpack.clone();
    trailing.extend_from_slice(b"garbage");
    let mut two_messages = valid_msgpack.clone();
    two_messages.extend_from_slice(&valid_msgpack);
    let with_ext = mp_encode(&mp_map(vec![
        ("type", Mp::from("x")),
        ("e", Mp::Ext(5, vec![1, 2, 3])),
    ]));
    let int_key = mp_encode(&Mp::Map(vec![
        (Mp::from("type"), Mp::from("x")),
        (Mp::Nil, Mp::from(1)),
    ]));
    // A str claiming 2 bytes that are not UTF-8.
    let bad_utf8_str = vec![0x81, 0xa4, b't', b'y', b'p', b'e', 0xa2, 0xff, 0xfe];

    vec![
        Case::post(
            "msgpack nested 100,000 arrays",
            "application/msgpack",
            deep_msgpack,
            "invalid_message",
        ),
        Case::post(
            "msgpack nested 50,000 maps",
            "application/x-msgpack",
            deep_msgpack_maps,
            "invalid_message",
        ),
        Case::post(
            "msgpack trailing garbage",
            "application/msgpack",
            trailing,
            "invalid_body",
        ),
        Case::post(
            "two msgpack messages",
            "application/msgpack",
            two_messages,
            "invalid_body",
        ),
        Case::post(
            "truncated msgpack",
            "application/msgpack",
            valid_msgpack[..3].to_vec(),
            "invalid_body",
        ),
        Case::post(
            "empty msgpack",
            "application/msgpack",
            Vec::new(),
            "invalid_body",
        ),
        Case::post(
            "msgpack array32 claiming 4G items",
            "application/msgpack",
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
            "invalid_body",
        ),
        Case::post(
            "msgpack map32 claiming 4G entries",
            "application/msgpack",
            vec![0xdf, 0xff, 0xff, 0xff, 0xff],
            "invalid_body",
        ),
        Case::post(
            "msgpack bin32 claiming 4 GB",
            "application/msgpack",
            vec![0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2],
            "invalid_body",
        ),
        Case::post(
            "msgpack str32 claiming 4 GB",
            "application/msgpack",
            vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a'],
            "invalid_body",
        ),
        Case::post(
            "msgpack ext type",
            "application/msgpack",
            with_ext,
            "invalid_message",
        ),
        Case::post(
            "msgpack nil key",
            "application/msgpack",
            int_key,
            "invalid_message",
        ),
        Case::post(
            "msgpack non-UTF-8 string",
            "application/msgpack",
            bad_utf8_str,
            "invalid_body",
        ),
        Case::post(
            "JSON sent as msgpack",
            "application/msgpack",
            r#"{"type":"x"}"#,
            "invalid_body",
        ),
        Case::post(
            "msgpack sent as JSON",
            "application/json",
            valid_msgpack.clone(),
            "invalid_body",
        ),
    ]
}

#[tokio::test]
async fn hostile_json_bodies_are_refused_and_stored_data_stays_intact() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    for case in &hostile_json_bodies() {
        case.run(&api).await;
    }
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn hostile_msgpack_bodies_are_refused_and_stored_data_stays_intact() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    for case in &hostile_msgpack_bodies() {
        case.run(&api).await;
    }
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn hostile_bodies_sent_to_a_group_are_refused_alike() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let json = hostile_json_bodies().into_iter().take(5);
    let msgpack = hostile_msgpack_bodies().into_iter().take(5);
    for case in json.chain(msgpack) {
        let mut group_case = Case::post(
            &format!("group_send: {}", case.what),
            case.content_type.unwrap(),
            case.body,
            case.code,
        );
        group_case.path = "/v1/groups/victim.group/messages".to_string();
        group_case.run(&api).await;
    }
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn text_bodies_with_nul_bytes_and_newlines_are_fine_and_round_trip() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let texts = [
        "nul\0inside\0",
        "line\nbreaks\r\nand\rcarriage",
        "\n\ndata: fake\nid: 999\n\n",
        "tab\there \u{7f} \u{1b}[31m",
        "{\"type\":\"not json mode\"}",
    ];
    let mut ids = Vec::new();
    for text in texts {
        let response = api
            .http
            .post(api.url("/v1/channels/texts/messages"))
            .header("content-type", "text/plain")
            .body(text.as_bytes().to_vec())
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, 202, "{text:?}: {body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    // Over SSE: each stays one event with one line of data.
    let mut sse = Sse::open(&api.http, &api.url("/v1/channels/texts/events"), &[]).await;
    for (text, id) in texts.iter().zip(&ids) {
        let event = sse.event().await;
        assert_eq!(event.id.as_deref(), Some(id.as_str()), "{text:?}");
        assert_eq!(event.event, None);
        assert_eq!(event.json(), json!({"type": "text", "text": text}));
    }
    sse.close();
    // Over REST too, after sending them again.
    for text in texts {
        let response = api
            .http
            .post(api.url("/v1/channels/texts2/messages"))
            .body(text.as_bytes().to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202);
    }
    let got: Vec<_> = api.drain("texts2").await.into_iter().map(|m| m.1).collect();
    let expected: Vec<_> = texts
        .iter()
        .map(|t| json!({"type": "text", "text": t}))
        .collect();
    assert_eq!(got, expected);
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn hostile_names_are_refused_with_invalid_name() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let long = "n".repeat(10_000);
    let names = [
        "%00",
        "a%00b",
        "victim%00",
        "a%0Ab",
        "victim%0A",
        "a%0D%0Ab",
        "a%20b",
        "a%09b",
        "..%2F..%2Fetc%2Fpasswd",
        "a%2Fb",
        "a%5Cb",
        "%FF%FE",
        "a%C3%A9",
        "%E2%80%8B",
        "a%3Cscript%3E",
        "a%22b",
        "a%27b",
        "victim%3Bdrop",
        long.as_str(),
    ];
    let mut cases = Vec::new();
    for name in names {
        let short = &name[..name.len().min(30)];
        cases.push(
            Case::post(
                &format!("send to {short}"),
                "application/json",
                r#"{"type":"x"}"#,
                "invalid_name",
            )
            .with_path(format!("/v1/channels/{name}/messages")),
        );
        cases.push(Case::get(
            &format!("receive from {short}"),
            format!("/v1/channels/{name}/messages"),
            400,
            "invalid_name",
        ));
        cases.push(Case::get(
            &format!("events of {short}"),
            format!("/v1/channels/{name}/events"),
            400,
            "invalid_name",
        ));
        cases.push(
            Case::get(
                &format!("group_add {short}"),
                format!("/v1/groups/g/channels/{name}"),
                400,
                "invalid_name",
            )
            .with_method("PUT"),
        );
        cases.push(
            Case::get(
                &format!("group_add to group {short}"),
                format!("/v1/groups/{name}/channels/victim"),
                400,
                "invalid_name",
            )
            .with_method("PUT"),
        );
        cases.push(
            Case::get(
                &format!("group_discard {short}"),
                format!("/v1/groups/victim.group/channels/{name}"),
                400,
                "invalid_name",
            )
            .with_method("DELETE"),
        );
        cases.push(Case::get(
            &format!("members of {short}"),
            format!("/v1/groups/{name}/channels"),
            400,
            "invalid_name",
        ));
        cases.push(
            Case::post(
                &format!("group_send to {short}"),
                "application/json",
                r#"{"type":"x"}"#,
                "invalid_name",
            )
            .with_path(format!("/v1/groups/{name}/messages")),
        );
        cases.push(Case::get(
            &format!("group events of {short}"),
            format!("/v1/groups/{name}/events"),
            400,
            "invalid_name",
        ));
        cases.push(Case::get(
            &format!("group events channel {short}"),
            format!("/v1/groups/g/events?channel={name}"),
            400,
            "invalid_name",
        ));
        cases.push(Case::get(
            &format!("multi events {short}"),
            format!("/v1/events?group=ok&group={name}"),
            400,
            "invalid_name",
        ));
        cases.push(
            Case::get(
                &format!("new_channel prefix {short}"),
                format!("/v1/channels?prefix={name}"),
                400,
                "invalid_name",
            )
            .with_method("POST"),
        );
    }
    for case in &cases {
        case.run(&api).await;
    }
    assert_eq!(api.members("g").await, Vec::<String>::new());
    assert_eq!(api.members("ok").await, Vec::<String>::new());
    assert_intact(&api, victim).await;
}

impl Case {
    fn with_path(mut self, path: String) -> Case {
        self.path = path;
        self
    }
}

#[tokio::test]
async fn hostile_parameters_are_refused_with_invalid_parameter() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let mut cases = Vec::new();
    for wait in [
        "-1", "abc", "%ZZ", "1e999", "NaN", "-inf", "0x10", "1%00", "", "%20",
    ] {
        cases.push(Case::get(
            &format!("wait={wait}"),
            format!("/v1/channels/victim/messages?wait={wait}"),
            400,
            "invalid_parameter",
        ));
    }
    for id in [
        "abc",
        "-1",
        "1.5",
        "18446744073709551616",
        "1 2",
        "0x1",
        "１",
        "\u{0}",
    ] {
        let encoded: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
        if id.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            cases.push(
                Case::get(
                    &format!("Last-Event-ID {id:?}"),
                    "/v1/channels/victim/events",
                    400,
                    "invalid_parameter",
                )
                .with_header("last-event-id", id),
            );
            cases.push(
                Case::get(
                    &format!("group Last-Event-ID {id:?}"),
                    "/v1/groups/g/events?channel=victim",
                    400,
                    "invalid_parameter",
                )
                .with_header("last-event-id", id),
            );
        }
        cases.push(Case::get(
            &format!("?last_event_id={id:?}"),
            format!("/v1/channels/victim/events?last_event_id={encoded}"),
            400,
            "invalid_parameter",
        ));
        cases.push(Case::get(
            &format!("multi ?last_event_id={id:?}"),
            format!("/v1/events?group=g&channel=victim&last_event_id={encoded}"),
            400,
            "invalid_parameter",
        ));
    }
    cases.push(Case::get(
        "events without group",
        "/v1/events?channel=victim",
        400,
        "invalid_parameter",
    ));
    cases.push(Case::get(
        "events with empty group",
        "/v1/events?group=",
        400,
        "invalid_name",
    ));
    for case in &cases {
        case.run(&api).await;
    }
    // A refused stream consumed nothing and joined nothing.
    assert_eq!(api.members("g").await, Vec::<String>::new());
    assert_intact(&api, victim).await;
}

/// Writes `request` on a fresh connection and returns the status and the body of the
/// answer (by its Content-Length), without waiting for the connection to close.
async fn raw_exchange(addr: &str, request: &[u8], then: Option<&[u8]>) -> (u16, String) {
    let mut stream = within(T, "connecting", TcpStream::connect(addr))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    if let Some(more) = then {
        // Written in pieces; the server may answer and close before the end.
        for piece in more.chunks(64 * 1024) {
            if stream.write_all(piece).await.is_err() {
                break;
            }
        }
    }
    read_response(&mut stream).await
}

async fn read_response(stream: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = within(T, "reading a response", stream.read(&mut chunk))
            .await
            .expect("reading a response");
        assert!(
            n > 0,
            "connection closed before a response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = within(T, "reading a body", stream.read(&mut chunk))
            .await
            .unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    (
        status,
        String::from_utf8_lossy(&buf[header_end..]).to_string(),
    )
}

#[tokio::test]
async fn a_huge_declared_content_length_is_refused_without_waiting_for_the_body() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    for (path, length) in [
        ("/v1/channels/victim/messages", "10000000000"),
        ("/v1/channels/victim/messages", "3000000"),
        ("/v1/groups/victim.group/messages", "99999999999999999"),
    ] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"type\":",
            server.addr
        );
        let (status, body) = within(
            Duration::from_secs(5),
            "an answer before the body",
            raw_exchange(&server.addr, request.as_bytes(), None),
        )
        .await;
        assert_eq!(status, 413, "{length}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["code"], "message_too_large");
    }
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_refused_while_it_streams() {
    let server = Server::start_with("[layer]\nmax_message_bytes = 4096\n").await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    // No Content-Length: the limit is applied to the bytes as they come.
    let head = format!(
        "POST /v1/channels/victim/messages HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
        server.addr
    );
    let mut chunks = Vec::new();
    for _ in 0..40 {
        chunks.extend_from_slice(format!("{:x}\r\n", 8192).as_bytes());
        chunks.extend(std::iter::repeat_n(b'a', 8192));
        chunks.extend_from_slice(b"\r\n");
    }
    let (status, body) = raw_exchange(&server.addr, head.as_bytes(), Some(&chunks)).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("message_too_large"), "{body}");
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn a_ten_megabyte_body_is_refused_with_413() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let body = vec![b'{'; 10 * 1024 * 1024];
    for content_type in ["application/json", "application/msgpack", "text/plain"] {
        let head = format!(
            "POST /v1/channels/victim/messages HTTP/1.1\r\nHost: {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            server.addr,
            body.len()
        );
        // The body is written while the answer may already be on its way.
        let (status, answer) = raw_exchange(&server.addr, head.as_bytes(), Some(&body)).await;
        assert_eq!(status, 413, "{content_type}: {answer}");
        assert!(answer.contains("message_too_large"), "{answer}");
    }
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn msgpack_with_the_reserved_marker_is_refused() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let inside_map = vec![
        0x82, 0xa4, b't', b'y', b'p', b'e', 0xa1, b'x', 0xa1, b'v', 0xc1,
    ];
    for (what, body) in [("top level", vec![0xc1]), ("inside a map", inside_map)] {
        let case = Case::post(what, "application/msgpack", body, "invalid_body");
        case.run(&api).await;
    }
    assert_eq!(
        api.receive("victim").await.map(|m| m.0),
        Some(victim.id.clone())
    );
}

#[tokio::test]
async fn malformed_http_does_not_harm_the_server() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let garbage: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n".to_vec(),
        format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n", "h".repeat(1_000_000)).into_bytes(),
        b"POST /v1/channels/victim/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n".to_vec(),
        b"POST /v1/channels/victim/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 18446744073709551615\r\n\r\n".to_vec(),
        b"POST /v1/channels/victim/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999999999999999\r\n\r\n".to_vec(),
        b"POST /v1/channels/victim/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
        b"POST /v1/channels/victim/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(),
    ];
    for request in garbage {
        let mut stream = TcpStream::connect(&server.addr).await.unwrap();
        let _ = stream.write_all(&request).await;
        // Whatever the answer (a client error or a closed connection), it must come
        // promptly.
        let mut sink = Vec::new();
        let mut chunk = [0u8; 4096];
        while !sink.windows(4).any(|w| w == b"\r\n\r\n") {
            match within(T, "the server to answer or close", stream.read(&mut chunk)).await {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.extend_from_slice(&chunk[..n]),
            }
        }
        if !sink.is_empty() {
            let head = String::from_utf8_lossy(&sink);
            assert!(
                head.starts_with("HTTP/1.1 4")
                    || head.starts_with("HTTP/1.0 4")
                    || head.starts_with("HTTP/1.1 505"),
                "a client error for {:?}: {head:.200}",
                String::from_utf8_lossy(&request[..request.len().min(60)])
            );
        }
    }
    // A connection that sends half a request and goes away.
    let mut half = TcpStream::connect(&server.addr).await.unwrap();
    half.write_all(b"POST /v1/channels/victim/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"type\"")
        .await
        .unwrap();
    drop(half);
    assert_intact(&api, victim).await;
}

#[tokio::test]
async fn hostile_websocket_frames_get_error_replies_and_the_socket_stays_usable() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let mut ws = Ws::connect(&server).await;

    // JSON nested 10,000 levels, as a whole frame and as a message.
    ws.send_frame(WsFrame::text("[".repeat(10_000) + &"]".repeat(10_000)))
        .await;
    let reply = ws.json().await;
    assert_eq!(reply["op"], "error", "{reply}");
    assert!(
        reply["code"] == "invalid_body" || reply["code"] == "invalid_message",
        "{reply}"
    );
    let deep = format!(
        r#"{{"op":"send","ref":1,"channel":"victim","message":{}}}"#,
        nested_json(10_000)
    );
    ws.send_frame(WsFrame::text(deep)).await;
    let reply = ws.json().await;
    assert_eq!(reply["op"], "error", "{reply}");
    assert!(
        reply["code"] == "invalid_body" || reply["code"] == "invalid_message",
        "{reply}"
    );
    let deep40 = format!(
        r#"{{"op":"send","ref":2,"channel":"victim","message":{}}}"#,
        nested_json(40)
    );
    let reply = ws.call(serde_json::from_str(&deep40).unwrap()).await;
    assert_eq!(
        (reply["ref"].clone(), reply["code"].clone()),
        (json!(2), json!("invalid_message")),
        "{reply}"
    );

    // msgpack nested 100,000 levels, trailing garbage, huge declared lengths.
    let mut deep_mp = vec![0x91; 100_000];
    deep_mp.push(0x01);
    let mut trailing = mp_encode(&mp_map(vec![("op", Mp::from("new_channel"))]));
    trailing.extend_from_slice(b"\xc1\xc1");
    for (what, frame) in [
        ("nested 100,000 levels", deep_mp),
        ("trailing garbage", trailing),
        (
            "array32 claiming 4G items",
            vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        ),
        ("bin32 claiming 4 GB", vec![0xc6, 0xff, 0xff, 0xff, 0xff]),
        ("reserved byte", vec![0xc1]),
        ("empty frame", Vec::new()),
    ] {
        ws.send_frame(WsFrame::binary(frame)).await;
        let reply = ws.msgpack().await;
        assert_eq!(
            mp_get(&reply, "op"),
            Some(&Mp::from("error")),
            "{what}: {reply}"
        );
        let code = mp_get(&reply, "code")
            .and_then(Mp::as_str)
            .unwrap_or("")
            .to_string();
        let expected = if what.starts_with("nested") {
            "invalid_message"
        } else {
            "invalid_body"
        };
        assert_eq!(code, expected, "{what}: {reply}");
    }
    // NUL and newlines inside JSON strings are just text.
    let ok = ws
        .call(json!({"op": "send", "ref": "t", "channel": "ws.text", "message": {"type": "t", "s": "a\u{0}b\nc"}}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    // Bad names and ids through the socket.
    for (request, code) in [
        (
            json!({"op": "send", "ref": 3, "channel": "a\u{0}b", "message": msg(1)}),
            "invalid_name",
        ),
        (
            json!({"op": "send", "ref": 4, "channel": "a\nb", "message": msg(1)}),
            "invalid_name",
        ),
        (
            json!({"op": "subscribe", "ref": 5, "channel": "victim", "last_event_id": "-1"}),
            "invalid_parameter",
        ),
        (
            json!({"op": "subscribe", "ref": 6, "channel": "victim", "last_event_id": -1}),
            "invalid_parameter",
        ),
        (
            json!({"op": "subscribe", "ref": 7, "channel": "victim", "last_event_id": 1.5}),
            "invalid_parameter",
        ),
        (
            json!({"op": "receive", "ref": 8, "channel": "victim", "wait": -1}),
            "invalid_parameter",
        ),
        (
            json!({"op": "receive", "ref": 9, "channel": "victim", "wait": "abc"}),
            "invalid_parameter",
        ),
        (
            json!({"op": "receive", "ref": 10, "channel": "victim", "wait": [1]}),
            "invalid_parameter",
        ),
    ] {
        let reply = ws.call(request.clone()).await;
        assert_eq!(reply["op"], "error", "{request}: {reply}");
        assert_eq!(reply["code"], code, "{request}: {reply}");
    }
    let got = ws
        .call(json!({"op": "receive", "channel": "ws.text"}))
        .await;
    assert_eq!(got["message"], json!({"type": "t", "s": "a\u{0}b\nc"}));
    drop(ws);
    assert_intact(&api, victim).await;
}

/// Statuses the API documents for a request it refuses or serves.
const DOCUMENTED: &[u16] = &[
    200, 201, 202, 204, 400, 401, 403, 404, 405, 408, 413, 414, 429, 431, 505,
];

/// A random request: method, path, query and headers drawn from pieces the API knows and
/// random text, and a body that is random bytes or a mutated valid message.
fn random_request() -> impl Strategy<Value = (String, String, Vec<(String, String)>, Vec<u8>)> {
    let method = prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]);
    let segment = prop_oneof![
        prop::sample::select(vec![
            "v1", "channels", "groups", "messages", "events", "ws", "stats", "flush", "admin",
            "backup", "healthz", "x", "a.b!c",
        ])
        .prop_map(str::to_string),
        "[a-zA-Z0-9._!%~-]{0,12}",
        "\\PC{0,8}".prop_map(|s| percent_encoding::utf8_percent_encode(
            &s,
            percent_encoding::NON_ALPHANUMERIC
        )
        .to_string()),
    ];
    let path = prop::collection::vec(segment, 0..6).prop_map(|s| format!("/{}", s.join("/")));
    let query = prop_oneof![
        Just(String::new()),
        "(wait|limit|after|group|channel|prefix|last_event_id|access_token)=[0-9a-z.eE+-]{0,24}"
            .prop_map(|q| format!("?{q}")),
        "\\PC{0,40}".prop_map(|q| format!(
            "?{}",
            percent_encoding::utf8_percent_encode(&q, percent_encoding::CONTROLS)
        )),
    ];
    let header = (
        prop::sample::select(vec![
            "last-event-id",
            "content-type",
            "accept",
            "authorization",
            "origin",
            "x-any",
        ]),
        "[ -~]{0,40}",
    )
        .prop_map(|(k, v)| (k.to_string(), v));
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (prop::collection::vec((any::<usize>(), any::<u8>()), 0..6)).prop_map(|edits| {
            let mut body = br#"{"type":"fuzz","n":[1,2.5],"s":"x"}"#.to_vec();
            for (at, byte) in edits {
                let at = at % body.len();
                body[at] = byte;
            }
            body
        }),
    ];
    (
        method.prop_map(str::to_string),
        (path, query).prop_map(|(p, q)| p + &q),
        prop::collection::vec(header, 0..4),
        body,
    )
}

#[tokio::test]
async fn random_requests_get_a_documented_answer_and_the_server_keeps_serving() {
    // Long-polls with a random `wait` end within a second.
    let server = Server::start_with("[server]\nmax_wait_secs = 1\n").await;
    let api = Api::new(&server);
    let victim = store_victim(&api).await;
    let seed = seed_from_env("HERALD_FUZZ_SEED");
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(
        proptest::test_runner::Config::default(),
        proptest::test_runner::TestRng::from_seed(
            proptest::test_runner::RngAlgorithm::ChaCha,
            &[seed.to_le_bytes(), [0; 8], [0; 8], [0; 8]].concat(),
        ),
    );
    let strategy = random_request();
    let mut sent = 0;
    for _ in 0..300 {
        let (method, path, headers, body) = strategy.new_tree(&mut runner).unwrap().current();
        let what = format!("seed {seed} (HERALD_FUZZ_SEED): {method} {path} {headers:?}");
        let mut request = api
            .http
            .request(method.parse().unwrap(), format!("{}{path}", server.url("")))
            .timeout(Duration::from_secs(5))
            .body(body);
        for (name, value) in &headers {
            request = request.header(name, value);
        }
        let Ok(request) = request.build() else {
            continue; // not a request reqwest can send
        };
        let response = within(T, &what, api.http.execute(request))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        sent += 1;
        let status = response.status().as_u16();
        assert!(DOCUMENTED.contains(&status), "{what}: {status}");
        let streams = response
            .headers()
            .get("content-type")
            .is_some_and(|t| t.as_bytes().starts_with(b"text/event-stream"));
        if status >= 400 && !streams {
            let body = within(T, &what, response.bytes()).await.unwrap();
            let json: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{what}: {status} body is not JSON ({e})"));
            assert!(json["error"]["code"].is_string(), "{what}: {json}");
        }
    }
    assert!(
        sent >= 250,
        "only {sent} of 300 random requests could be sent"
    );
    api.assert_healthy().await;
    let first = api.receive("victim").await;
    assert_eq!(
        first,
        Some((victim.id.clone(), victim.message.clone())),
        "seed {seed}"
    );
}
