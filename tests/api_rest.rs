//! The REST API against a real `herald serve` process: every route of the contract,
//! every error code that a client can provoke, the JSON/msgpack/text encodings, long
//! polling, groups, capacity, expiry, flush, the connection limit and durability across
//! a SIGKILL.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rmpv::Value as Mp;
use serde_json::{Value as Json, json};

fn channel_url(server: &Server, channel: &str) -> String {
    server.url(&format!("/v1/channels/{channel}/messages"))
}

/// A publish to `channel` of `body` declared as `content_type`, not sent yet.
fn post_as(
    server: &Server,
    channel: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::RequestBuilder {
    client()
        .post(channel_url(server, channel))
        .header("content-type", content_type)
        .body(body)
}

#[tokio::test]
async fn healthz_answers_ok() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let response = api.http.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"status": "ok"}));
}

#[tokio::test]
async fn send_answers_202_with_channel_and_string_id_then_receive_returns_it() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let response = api.send_raw("chat.room-1_x", &msg(7)).await;
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let (status, body) = json_of(response).await;
    assert_eq!(status, 202);
    assert_eq!(body["channel"], "chat.room-1_x");
    let id = body["id"].as_str().expect("the id is a JSON string");
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "id {id:?} is decimal"
    );
    assert_eq!(body.as_object().unwrap().len(), 2, "{body}");

    let (got_id, message) = api.receive("chat.room-1_x").await.expect("a message");
    assert_eq!(got_id, id);
    assert_eq!(message, msg(7));
    assert_eq!(
        api.receive("chat.room-1_x").await,
        None,
        "a message is delivered once"
    );
}

#[tokio::test]
async fn receive_on_an_empty_channel_is_204_without_body() {
    let server = Server::start().await;
    let response = client()
        .get(channel_url(&server, "nobody.home"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    assert!(response.bytes().await.unwrap().is_empty());
}

#[tokio::test]
async fn messages_come_out_in_order_with_increasing_ids() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut sent = Vec::new();
    for n in 0..20 {
        sent.push(api.send("fifo", &msg(n)).await);
    }
    let ids: Vec<u64> = sent.iter().map(|id| id_num(id)).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
    let got = api.drain("fifo").await;
    assert_eq!(got.len(), 20);
    for (n, (id, message)) in got.iter().enumerate() {
        assert_eq!(id, &sent[n]);
        assert_eq!(message, &msg(n as u64));
    }
}

#[tokio::test]
async fn json_messages_round_trip_byte_for_byte() {
    let server = Server::start().await;
    let http = client();
    // Key order, ints versus floats (1.0 stays 1.0), u64 and i64 extremes, nesting,
    // escapes and non-ASCII text: the response must embed exactly this text.
    let text = r#"{"type":"chat.message","z":1,"a":1.0,"big":18446744073709551615,"neg":-9223372036854775808,"f":-0.5,"nested":{"b":[true,null,"x",[{"k":"v"}]],"a":2.5},"s":"line\nnext \"q\" \u0000 é ☃","empty":{},"list":[]}"#;
    let response = post_as(&server, "round.trip", "application/json", text)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();

    let response = http
        .get(channel_url(&server, "round.trip"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let raw = response.text().await.unwrap();
    assert_eq!(
        raw,
        format!(r#"{{"channel":"round.trip","id":"{id}","message":{text}}}"#)
    );
}

#[tokio::test]
async fn json_content_type_with_charset_is_json() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let response = post_as(
        &server,
        "charset",
        "Application/JSON; charset=utf-8",
        r#"{"type":"x","v":1}"#,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(
        api.receive("charset").await.unwrap().1,
        json!({"type": "x", "v": 1})
    );
}

fn rich_msgpack() -> Mp {
    mp_map(vec![
        ("type", Mp::from("blob")),
        ("bin", Mp::Binary(vec![0, 1, 2, 255, 254])),
        ("f64", Mp::F64(1.0)),
        ("f32", Mp::F32(1.5)),
        ("big", Mp::from(u64::MAX)),
        ("min", Mp::from(i64::MIN)),
        ("nil", Mp::Nil),
        ("yes", Mp::Boolean(true)),
        (
            "nested",
            mp_map(vec![
                (
                    "list",
                    Mp::Array(vec![Mp::from(1), Mp::from("two"), Mp::Binary(vec![3])]),
                ),
                ("deeper", mp_map(vec![("x", Mp::F64(-2.25))])),
            ]),
        ),
        ("text", Mp::from("héllo\0")),
    ])
}

#[tokio::test]
async fn msgpack_messages_round_trip_with_binary_floats_and_big_ints() {
    let server = Server::start().await;
    let http = client();
    let message = rich_msgpack();
    for content_type in ["application/msgpack", "application/x-msgpack"] {
        let response = post_as(&server, "mp", content_type, mp_encode(&message))
            .header("accept", "application/msgpack")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 202, "{content_type}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "application/msgpack"
        );
        let ack = mp_decode(&response.bytes().await.unwrap());
        assert_eq!(mp_get(&ack, "channel"), Some(&Mp::from("mp")));
        let id = mp_get(&ack, "id")
            .and_then(Mp::as_str)
            .expect("ids are strings in msgpack too")
            .to_string();
        id_num(&id);

        let response = http
            .get(channel_url(&server, "mp"))
            .header("accept", "application/msgpack")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let doc = mp_decode(&response.bytes().await.unwrap());
        assert_eq!(mp_get(&doc, "channel"), Some(&Mp::from("mp")));
        assert_eq!(mp_get(&doc, "id"), Some(&Mp::from(id.as_str())));
        assert_eq!(
            mp_get(&doc, "message"),
            Some(&message),
            "binary, f32/f64, u64::MAX and i64::MIN survive ({content_type})"
        );
    }
}

#[tokio::test]
async fn msgpack_binary_appears_in_json_as_base64_and_json_binary_becomes_msgpack_binary() {
    let server = Server::start().await;
    let http = client();
    let response = post_as(
        &server,
        "mixed",
        "application/msgpack",
        mp_encode(&rich_msgpack()),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let raw = http
        .get(channel_url(&server, "mixed"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let message_text = raw
        .split_once(r#""message":"#)
        .map(|(_, m)| m.strip_suffix('}').unwrap())
        .unwrap();
    assert_eq!(
        message_text,
        r#"{"type":"blob","bin":{"$binary":"AAEC//4="},"f64":1.0,"f32":1.5,"big":18446744073709551615,"min":-9223372036854775808,"nil":null,"yes":true,"nested":{"list":[1,"two",{"$binary":"Aw=="}],"deeper":{"x":-2.25}},"text":"héllo\u0000"}"#
    );

    // And back: JSON {"$binary": ...} is stored as msgpack binary.
    let response = post_as(
        &server,
        "mixed",
        "application/json",
        r#"{"type":"b","data":{"$binary":"AAEC//4="}}"#,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let response = http
        .get(channel_url(&server, "mixed"))
        .header("accept", "application/msgpack")
        .send()
        .await
        .unwrap();
    let doc = mp_decode(&response.bytes().await.unwrap());
    assert_eq!(
        mp_get(&doc, "message"),
        Some(&mp_map(vec![
            ("type", Mp::from("b")),
            ("data", Mp::Binary(vec![0, 1, 2, 255, 254])),
        ]))
    );
}

#[tokio::test]
async fn text_bodies_of_any_other_content_type_become_text_messages() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let cases: Vec<(Option<&str>, &str)> = vec![
        // What `curl -d 'disk full'` sends.
        (Some("application/x-www-form-urlencoded"), "disk full"),
        (Some("text/plain; charset=utf-8"), "héllo ☃"),
        (None, "no content type at all"),
        (Some("application/octet-stream"), "a=1&b=2"),
        (Some("text/plain"), ""),
    ];
    for (content_type, text) in &cases {
        let mut request = api.http.post(channel_url(&server, "texts")).body(*text);
        if let Some(ct) = content_type {
            request = request.header("content-type", *ct);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 202, "{content_type:?}");
    }
    let got = api.drain("texts").await;
    let texts: Vec<Json> = got.into_iter().map(|(_, m)| m).collect();
    let expected: Vec<Json> = cases
        .iter()
        .map(|(_, t)| json!({"type": "text", "text": t}))
        .collect();
    assert_eq!(texts, expected);
}

#[tokio::test]
async fn non_utf8_text_is_400_invalid_body() {
    let server = Server::start().await;
    refused(
        post_as(&server, "texts", "text/plain", vec![b'o', b'k', 0xff, 0xfe]),
        400,
        "invalid_body",
    )
    .await;
}

#[tokio::test]
async fn long_poll_waits_for_a_message_sent_meanwhile() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let waiter = {
        let api = api.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let got = api.receive_wait("later", 10.0).await;
            (got, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!waiter.is_finished(), "the receive waits for a message");
    let id = api.send("later", &msg(1)).await;
    let (got, elapsed) = within(T, "the long-poll answer", waiter).await.unwrap();
    assert_eq!(got, Some((id, msg(1))));
    assert!(
        elapsed >= Duration::from_millis(350) && elapsed < Duration::from_secs(5),
        "answered when the message came: {elapsed:?}"
    );
}

#[tokio::test]
async fn long_poll_without_message_ends_with_204_after_the_wait() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let started = Instant::now();
    assert_eq!(api.receive_wait("quiet", 0.6).await, None);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(550) && elapsed < Duration::from_secs(4),
        "waited about 0.6 s: {elapsed:?}"
    );
}

#[tokio::test]
async fn long_poll_wait_is_capped_by_max_wait_secs() {
    let server = Server::start_with("[server]\nmax_wait_secs = 1\n").await;
    let api = Api::new(&server);
    let started = Instant::now();
    assert_eq!(api.receive_wait("capped", 30.0).await, None);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "the 30 s wait was cut to 1 s: {elapsed:?}"
    );
}

#[tokio::test]
async fn bad_wait_values_are_400_invalid_parameter() {
    let server = Server::start().await;
    let http = client();
    for wait in ["abc", "-1", "NaN", "inf", "1e999", ""] {
        refused(
            http.get(server.url(&format!("/v1/channels/c/messages?wait={wait}"))),
            400,
            "invalid_parameter",
        )
        .await;
    }
}

#[tokio::test]
async fn new_channel_makes_unique_valid_names_with_the_prefix() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let response = api
        .http
        .post(api.url("/v1/channels?prefix=chat.client"))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    let name = body["channel"].as_str().unwrap().to_string();
    let rest = name
        .strip_prefix("chat.client.")
        .unwrap_or_else(|| panic!("{name} starts with the prefix and a dot"));
    let (a, b) = rest.split_once('!').expect("a '!' separates the parts");
    for part in [a, b] {
        assert!(
            !part.is_empty() && part.bytes().all(|c| c.is_ascii_alphanumeric()),
            "random part {part:?} of {name}"
        );
    }
    let other = api.new_channel("chat.client").await;
    assert_ne!(name, other, "names are unique");

    // The new name is usable, percent-encoded or not.
    let id = api.send(&name, &msg(1)).await;
    let encoded = name.replace('!', "%21");
    let (status, got) = json_of(
        fetch(
            api.http
                .get(api.url(&format!("/v1/channels/{encoded}/messages"))),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(got["channel"], name.as_str(), "the decoded name is echoed");
    assert_eq!(got["id"], id.as_str());

    // A prefix that cannot make a valid name.
    for bad in ["a%21b", "bad%20prefix", &"p".repeat(95)] {
        refused(
            api.http
                .post(api.url(&format!("/v1/channels?prefix={bad}"))),
            400,
            "invalid_name",
        )
        .await;
    }
}

#[tokio::test]
async fn percent_encoded_names_are_decoded_before_checking() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let response = api
        .http
        .post(api.url("/v1/channels/specific.x%21abc/messages"))
        .json(&msg(1))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["channel"], "specific.x!abc");
    assert_eq!(api.receive("specific.x!abc").await.unwrap().1, msg(1));
}

#[tokio::test]
async fn invalid_channel_and_group_names_are_400_invalid_name() {
    let server = Server::start().await;
    let http = client();
    let long = "a".repeat(100);
    let bad_channels = [
        "a%20b",
        "%21start",
        "a!b!c",
        "a%2Fb",
        "caf%C3%A9",
        "a%00",
        "a%0A",
        long.as_str(),
    ];
    for channel in bad_channels {
        let requests = [
            http.post(server.url(&format!("/v1/channels/{channel}/messages")))
                .json(&msg(1)),
            http.get(server.url(&format!("/v1/channels/{channel}/messages"))),
            http.put(server.url(&format!("/v1/groups/g/channels/{channel}"))),
        ];
        for request in requests {
            refused(request, 400, "invalid_name").await;
        }
    }
    let long_group = "g".repeat(100);
    for group in ["a%21b", "a%20b", "x%21", long_group.as_str()] {
        let requests = [
            http.put(server.url(&format!("/v1/groups/{group}/channels/c"))),
            http.post(server.url(&format!("/v1/groups/{group}/messages")))
                .json(&msg(1)),
            http.get(server.url(&format!("/v1/groups/{group}/channels"))),
        ];
        for request in requests {
            refused(request, 400, "invalid_name").await;
        }
    }
    // 99 bytes is still fine.
    let api = Api::new(&server);
    api.send(&"a".repeat(99), &msg(1)).await;
    api.group_add(&"g".repeat(99), "c").await;
}

#[tokio::test]
async fn invalid_messages_are_400_invalid_message_or_invalid_body() {
    let server = Server::start().await;
    let deep = {
        let mut s = String::from(r#"{"type":"deep","v":"#);
        s.push_str(&"[".repeat(31));
        s.push('1');
        s.push_str(&"]".repeat(31));
        s.push('}');
        s
    };
    let cases: Vec<(&str, &str)> = vec![
        (r#"[1,2]"#, "invalid_message"),
        (r#""just a string""#, "invalid_message"),
        (r#"{"a":1}"#, "invalid_message"),
        (r#"{"type":""}"#, "invalid_message"),
        (r#"{"type":5}"#, "invalid_message"),
        (r#"{"type":null}"#, "invalid_message"),
        (r#"{"type":"x","__asgi_channel__":"y"}"#, "invalid_message"),
        (
            r#"{"type":"x","b":{"$binary":"not base64!"}}"#,
            "invalid_message",
        ),
        (&deep, "invalid_message"),
        (r#"{"type":"#, "invalid_body"),
        ("", "invalid_body"),
        (r#"{"type":"x"} trailing"#, "invalid_body"),
    ];
    for (body, code) in cases {
        let doc = refused(
            post_as(&server, "strict", "application/json", body.to_string()),
            400,
            code,
        )
        .await;
        eprintln!("{body:.40} -> {doc}");
    }
    // 32 levels is the limit, inclusive.
    let ok = deep.replacen("[", "", 1).replacen("]", "", 1);
    let response = post_as(&server, "strict", "application/json", ok)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);

    // msgpack: not a map, non-string key, trailing bytes.
    let not_map = mp_encode(&Mp::Array(vec![Mp::from(1)]));
    let int_key = mp_encode(&Mp::Map(vec![
        (Mp::from("type"), Mp::from("x")),
        (Mp::from(1), Mp::from(2)),
    ]));
    let mut trailing = mp_encode(&mp_map(vec![("type", Mp::from("x"))]));
    trailing.push(0xc0);
    for (body, code) in [
        (not_map, "invalid_message"),
        (int_key, "invalid_message"),
        (trailing, "invalid_body"),
        (vec![0x81, 0xa4], "invalid_body"),
    ] {
        refused(
            post_as(&server, "strict", "application/msgpack", body),
            400,
            code,
        )
        .await;
    }
    let api = Api::new(&server);
    assert_eq!(api.drain("strict").await.len(), 1, "only the valid one");
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let server = Server::start().await;
    let http = client();
    for path in [
        "/v1/nothing",
        "/v2/channels/a/messages",
        "/v1/channels/a/messages/1/extra",
        "/",
    ] {
        refused(http.get(server.url(path)), 404, "not_found").await;
    }
    let cases = [
        ("PATCH", "/v1/channels/a/messages"),
        ("DELETE", "/v1/channels/a/messages"),
        ("GET", "/v1/channels/a/messages/1"),
        ("POST", "/v1/channels/a/messages/1"),
        ("PUT", "/v1/channels/a/messages"),
        ("GET", "/v1/flush"),
        ("DELETE", "/v1/flush"),
        ("POST", "/v1/groups/g/channels/c"),
        ("DELETE", "/v1/groups/g/channels"),
        ("PUT", "/v1/groups/g/messages"),
        ("POST", "/v1/channels/a/events"),
        ("POST", "/healthz"),
    ];
    for (method, path) in cases {
        let response = http
            .request(method.parse().unwrap(), server.url(path))
            .send()
            .await
            .unwrap();
        let doc = json_of_error_status(response).await;
        assert_eq!(
            doc,
            (405, "method_not_allowed".to_string()),
            "{method} {path}"
        );
    }
}

async fn json_of_error_status(response: reqwest::Response) -> (u16, String) {
    let (status, body) = json_of(response).await;
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
    )
}

#[tokio::test]
async fn group_add_list_and_discard() {
    let server = Server::start().await;
    let api = Api::new(&server);
    assert_eq!(
        api.members("room").await,
        Vec::<String>::new(),
        "unknown group"
    );
    api.group_add("room", "b.one").await;
    api.group_add("room", "a.two!x").await;
    api.group_add("room", "b.one").await; // twice is fine
    api.group_add("other", "c").await;
    let mut members = api.members("room").await;
    members.sort();
    assert_eq!(members, vec!["a.two!x", "b.one"]);

    // Accept: msgpack
    let response = api
        .http
        .get(api.url("/v1/groups/room/channels"))
        .header("accept", "application/msgpack")
        .send()
        .await
        .unwrap();
    let doc = mp_decode(&response.bytes().await.unwrap());
    assert_eq!(mp_get(&doc, "group"), Some(&Mp::from("room")));
    let mut listed: Vec<String> = mp_get(&doc, "channels")
        .and_then(Mp::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, members);

    api.group_discard("room", "b.one").await;
    assert_eq!(api.members("room").await, vec!["a.two!x"]);
    api.group_discard("room", "b.one").await; // absent: still 204
    api.group_discard("never", "existed").await;
    api.group_discard("room", "a.two%21x").await;
    assert_eq!(api.members("room").await, Vec::<String>::new());
    assert_eq!(api.members("other").await, vec!["c"]);
}

#[tokio::test]
async fn group_send_reaches_every_member_and_counts_full_ones() {
    let server = Server::start_with("[layer]\ncapacity = 2\n").await;
    let api = Api::new(&server);
    for member in ["m.a", "m.b", "m.c"] {
        api.group_add("team", member).await;
    }
    api.send("m.c", &msg(100)).await;
    api.send("m.c", &msg(101)).await; // m.c is now full

    let (delivered, full) = api.group_send("team", &msg(1)).await;
    assert_eq!((delivered, full), (2, 1));

    let response = api
        .http
        .post(api.url("/v1/groups/team/messages"))
        .header("accept", "application/msgpack")
        .json(&msg(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let doc = mp_decode(&response.bytes().await.unwrap());
    assert_eq!(mp_get(&doc, "group"), Some(&Mp::from("team")));
    assert_eq!(mp_get(&doc, "delivered"), Some(&Mp::from(2)));
    assert_eq!(mp_get(&doc, "full"), Some(&Mp::from(1)));

    for member in ["m.a", "m.b"] {
        let got: Vec<Json> = api.drain(member).await.into_iter().map(|m| m.1).collect();
        assert_eq!(got, vec![msg(1), msg(2)], "{member}");
    }
    let got: Vec<Json> = api.drain("m.c").await.into_iter().map(|m| m.1).collect();
    assert_eq!(got, vec![msg(100), msg(101)], "the full member was skipped");

    // A group without members, and a discarded member.
    assert_eq!(api.group_send("empty", &msg(3)).await, (0, 0));
    api.group_discard("team", "m.b").await;
    assert_eq!(api.group_send("team", &msg(4)).await, (2, 0));
    assert_eq!(api.receive("m.b").await, None);
    assert_eq!(api.receive("m.a").await.unwrap().1, msg(4));
    assert_eq!(api.receive("m.c").await.unwrap().1, msg(4));
}

#[tokio::test]
async fn a_group_message_sent_before_joining_is_not_received() {
    let server = Server::start().await;
    let api = Api::new(&server);
    api.group_send("late", &msg(1)).await;
    api.group_add("late", "joiner").await;
    assert_eq!(api.receive("joiner").await, None);
    api.group_send("late", &msg(2)).await;
    assert_eq!(api.receive("joiner").await.unwrap().1, msg(2));
}

#[tokio::test]
async fn a_full_channel_answers_429_channel_full_with_retry_after() {
    let server = Server::start_with("[layer]\ncapacity = 3\n").await;
    let api = Api::new(&server);
    for n in 0..3 {
        api.send("small", &msg(n)).await;
    }
    let response = api.send_raw("small", &msg(3)).await;
    let retry_after = response
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .to_string();
    let seconds: u64 = retry_after
        .parse()
        .expect("Retry-After is a number of seconds");
    assert!(seconds >= 1, "{retry_after}");
    assert_error(response, 429, "channel_full").await;

    // Receiving one makes room for exactly one more.
    assert_eq!(api.receive("small").await.unwrap().1, msg(0));
    api.send("small", &msg(4)).await;
    assert_eq!(api.send_raw("small", &msg(5)).await.status().as_u16(), 429);
    let got: Vec<Json> = api.drain("small").await.into_iter().map(|m| m.1).collect();
    assert_eq!(got, vec![msg(1), msg(2), msg(4)]);
}

#[tokio::test]
async fn capacity_per_channel_pattern_applies() {
    let server =
        Server::start_with("[layer]\ncapacity = 50\n[layer.channel_capacity]\n\"tiny.*\" = 1\n")
            .await;
    let api = Api::new(&server);
    api.send("tiny.one", &msg(1)).await;
    assert_error(api.send_raw("tiny.one", &msg(2)).await, 429, "channel_full").await;
    for n in 0..5 {
        api.send("big.one", &msg(n)).await;
    }
}

#[tokio::test]
async fn expired_messages_are_never_delivered_and_free_capacity() {
    let server = Server::start_with("[layer]\nexpiry_secs = 1\ncapacity = 2\n").await;
    let api = Api::new(&server);
    api.send("brief", &msg(1)).await;
    api.send("brief", &msg(2)).await;
    assert_eq!(api.send_raw("brief", &msg(3)).await.status().as_u16(), 429);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(api.receive("brief").await, None, "expired");
    api.send("brief", &msg(4)).await;
    api.send("brief", &msg(5)).await;
    let got: Vec<Json> = api.drain("brief").await.into_iter().map(|m| m.1).collect();
    assert_eq!(got, vec![msg(4), msg(5)]);
}

#[tokio::test]
async fn flush_deletes_messages_and_memberships() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let first = api.send("f.a", &msg(1)).await;
    api.send("f.b", &msg(2)).await;
    api.group_add("fg", "f.c").await;
    api.group_send("fg", &msg(3)).await;

    let response = api.http.post(api.url("/v1/flush")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 204);
    assert!(response.bytes().await.unwrap().is_empty());

    for channel in ["f.a", "f.b", "f.c"] {
        assert_eq!(api.receive(channel).await, None, "{channel} is empty");
    }
    assert_eq!(api.members("fg").await, Vec::<String>::new());
    assert_eq!(api.group_send("fg", &msg(4)).await, (0, 0));
    let after = api.send("f.a", &msg(5)).await;
    assert!(
        id_num(&after) > id_num(&first),
        "ids keep growing after a flush"
    );
    assert_eq!(api.receive("f.a").await, Some((after, msg(5))));
}

#[tokio::test]
async fn accept_msgpack_gets_msgpack_documents_and_errors_stay_json() {
    let server = Server::start().await;
    let http = client();
    let response = http
        .post(server.url("/v1/channels?prefix=mp"))
        .header("accept", "application/msgpack")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/msgpack"
    );
    let doc = mp_decode(&response.bytes().await.unwrap());
    let name = mp_get(&doc, "channel")
        .and_then(Mp::as_str)
        .unwrap()
        .to_string();
    assert!(name.starts_with("mp."));

    refused(
        http.post(server.url("/v1/channels/x/messages"))
            .header("accept", "application/msgpack")
            .header("content-type", "application/json")
            .body("{"),
        400,
        "invalid_body",
    )
    .await;
}

#[tokio::test]
async fn oversized_messages_are_413_message_too_large() {
    let server = Server::start_with("[layer]\nmax_message_bytes = 2048\n").await;
    let api = Api::new(&server);
    // Just over the limit once encoded: refused by the size check of the layer.
    let big = json!({"type": "big", "pad": "x".repeat(2100)});
    assert_error(api.send_raw("big", &big).await, 413, "message_too_large").await;
    refused(
        api.http.post(api.url("/v1/groups/g/messages")).json(&big),
        413,
        "message_too_large",
    )
    .await;
    // Far over: refused from the body size.
    let huge = vec![b'x'; 1024 * 1024];
    let response = api
        .http
        .post(api.url("/v1/channels/big/messages"))
        .header("content-type", "text/plain")
        .body(huge)
        .send()
        .await
        .unwrap();
    // The body was left unread: the connection closes, and the answer says so, or a
    // keep-alive client would send its next request on a dead connection.
    assert_eq!(
        response
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close")
    );
    assert_error(response, 413, "message_too_large").await;
    // Under the limit is fine, on the same client.
    let fits = json!({"type": "big", "pad": "x".repeat(1900)});
    api.send("big", &fits).await;
    assert_eq!(api.receive("big").await.unwrap().1, fits);
}

#[tokio::test]
async fn a_default_server_takes_one_mib_messages_and_refuses_larger_bodies() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let fits = json!({"type": "big", "pad": "y".repeat(1024 * 1024 - 100)});
    api.send("mib", &fits).await;
    assert_eq!(api.receive("mib").await.unwrap().1, fits);
    let over = json!({"type": "big", "pad": "y".repeat(1024 * 1024 + 10)});
    assert_error(api.send_raw("mib", &over).await, 413, "message_too_large").await;
    // Far more than the socket buffers hold: the server answers before reading it, and
    // must read on (and discard) until the client is done, or the client gets a reset
    // instead of the answer.
    let response = api
        .http
        .post(api.url("/v1/channels/mib/messages"))
        .body(vec![b'z'; 16 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_error(response, 413, "message_too_large").await;
}

#[tokio::test]
async fn at_max_connections_requests_get_503_unavailable_until_a_slot_frees() {
    let server = Server::start_with("[server]\nmax_connections = 1\n").await;
    let api = Api::new(&server);
    let held = {
        let api = api.clone();
        tokio::spawn(async move { api.receive_wait("hold", 1.5).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished());
    assert_error(api.send_raw("x", &msg(1)).await, 503, "unavailable").await;
    refused(
        api.http.get(api.url("/v1/channels/x/messages")),
        503,
        "unavailable",
    )
    .await;
    refused(
        api.http.put(api.url("/v1/groups/g/channels/x")),
        503,
        "unavailable",
    )
    .await;
    assert_eq!(within(T, "the held long-poll", held).await.unwrap(), None);
    // The slot is free again.
    let id = api.send("x", &msg(2)).await;
    assert_eq!(api.receive("x").await, Some((id, msg(2))));
}

#[tokio::test]
async fn an_open_sse_stream_holds_a_connection_slot() {
    let server = Server::start_with("[server]\nmax_connections = 1\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &api.url("/v1/channels/s/events"), &[]).await;
    assert_error(api.send_raw("x", &msg(1)).await, 503, "unavailable").await;
    sse.close();
    // The server notices the closed stream and frees the slot.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = api.send_raw("x", &msg(1)).await;
        if response.status().as_u16() == 202 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn acknowledged_messages_and_memberships_survive_sigkill() {
    let mut server = Server::start().await;
    let api = Api::new(&server);
    let mut sent = Vec::new();
    for n in 0..5 {
        sent.push((api.send("durable", &msg(n)).await, msg(n)));
    }
    api.group_add("dg", "durable.member").await;
    api.group_send("dg", &msg(50)).await;
    // A message received just before the crash may come back (at-least-once).
    let received = sent.remove(0);
    assert_eq!(api.receive("durable").await, Some(received.clone()));
    let mp = rich_msgpack();
    let response = api
        .http
        .post(api.url("/v1/channels/durable.mp/messages"))
        .header("content-type", "application/msgpack")
        .body(mp_encode(&mp))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);

    server.kill().await;
    let server = server.restart().await;
    let api = Api::new(&server);
    let mut got = api.drain("durable").await;
    if got.first() == Some(&received) {
        got.remove(0);
    }
    assert_eq!(got, sent, "same ids, same messages, same order");
    assert_eq!(api.members("dg").await, vec!["durable.member"]);
    assert_eq!(api.receive("durable.member").await.unwrap().1, msg(50));
    let response = api
        .http
        .get(api.url("/v1/channels/durable.mp/messages"))
        .header("accept", "application/msgpack")
        .send()
        .await
        .unwrap();
    let doc = mp_decode(&response.bytes().await.unwrap());
    assert_eq!(mp_get(&doc, "message"), Some(&mp));
    let newer = api.send("durable", &msg(99)).await;
    let last_old = sent.last().map(|(id, _)| id_num(id)).unwrap();
    assert!(
        id_num(&newer) > last_old,
        "ids keep growing after a restart"
    );
}

#[tokio::test]
async fn a_message_received_seconds_before_a_crash_is_not_delivered_again_after_a_later_write() {
    let mut server = Server::start_with("[storage]\nsweep_interval_ms = 100\n").await;
    let api = Api::new(&server);
    let first = api.send("cursor", &msg(0)).await;
    let second = api.send("cursor", &msg(1)).await;
    assert_eq!(api.receive("cursor").await.unwrap().0, first);
    // Several sweeps later the cursor is written; the next acknowledged write syncs it.
    tokio::time::sleep(Duration::from_millis(600)).await;
    api.send("elsewhere", &msg(2)).await;
    server.kill().await;
    let server = server.restart().await;
    let api = Api::new(&server);
    assert_eq!(api.drain("cursor").await, vec![(second, msg(1))]);
}

#[tokio::test]
async fn a_message_received_seconds_before_a_crash_is_not_delivered_again() {
    let mut server = Server::start_with("[storage]\nsweep_interval_ms = 100\n").await;
    let api = Api::new(&server);
    let first = api.send("cursor", &msg(0)).await;
    let second = api.send("cursor", &msg(1)).await;
    assert_eq!(api.receive("cursor").await.unwrap().0, first);
    // Fifteen sweep intervals: far past the documented one to two.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill().await;
    let server = server.restart().await;
    let api = Api::new(&server);
    assert_eq!(api.drain("cursor").await, vec![(second, msg(1))]);
}

#[tokio::test]
async fn a_long_poll_abandoned_by_its_client_takes_no_message() {
    use tokio::io::AsyncWriteExt;
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut stream = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    stream
        .write_all(
            b"GET /v1/channels/abandoned/messages?wait=20 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = api.send("abandoned", &msg(1)).await;
    assert_eq!(
        api.receive_wait("abandoned", 2.0).await,
        Some((id, msg(1))),
        "the message went to the long-poll of a client that had left"
    );
}

#[tokio::test]
async fn cors_allows_listed_origins_and_refuses_others_with_a_json_error() {
    let server = Server::start_with("[server]\ncors_origins = [\"https://a.example.com\"]\n").await;
    let http = client();
    let allowed = http
        .post(server.url("/v1/channels/cors/messages"))
        .header("origin", "https://a.example.com")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status().as_u16(), 202);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://a.example.com"
    );
    assert_eq!(
        allowed.headers()["access-control-expose-headers"],
        "retry-after"
    );
    refused(
        http.request(
            reqwest::Method::OPTIONS,
            server.url("/v1/channels/cors/messages"),
        )
        .header("origin", "https://evil.example.com")
        .header("access-control-request-method", "POST"),
        403,
        "forbidden",
    )
    .await;
}

/// `--default-message-type` (and `server.default_message_type`) types untyped maps from
/// every publishing route, first in key order; typed ones are kept as they are, and a
/// bad type is still refused. Without it, untyped messages are refused.
#[tokio::test]
async fn a_default_message_type_types_untyped_publishes() {
    let strict = Server::start().await;
    let response = Api::new(&strict)
        .send_raw("dt.a", &json!({"event": "x"}))
        .await;
    assert_error(response, 400, "invalid_message").await;

    let server =
        Server::start_with_args(Workdir::new(), "", &["--default-message-type", "notify"]).await;
    let api = Api::new(&server);
    api.send("dt.a", &json!({"event": "x", "n": 1})).await;
    api.send("dt.a", &json!({"n": 2, "type": "own"})).await;
    let (_, first) = api.receive("dt.a").await.expect("the untyped message");
    assert_eq!(first.to_string(), r#"{"type":"notify","event":"x","n":1}"#);
    let (_, second) = api.receive("dt.a").await.expect("the typed message");
    assert_eq!(second.to_string(), r#"{"n":2,"type":"own"}"#);
    let response = api.send_raw("dt.a", &json!({"type": 5})).await;
    assert_error(response, 400, "invalid_message").await;

    // msgpack bodies and group sends too.
    api.group_add("dt.g", "dt.m").await;
    let body = rmp_serde::to_vec_named(&json!({"k": "v"})).unwrap();
    let response = within(
        T,
        "msgpack group send",
        api.http
            .post(api.url("/v1/groups/dt.g/messages"))
            .header("content-type", "application/msgpack")
            .body(body)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 202);
    let (_, got) = api.receive("dt.m").await.expect("the msgpack message");
    assert_eq!(got.to_string(), r#"{"type":"notify","k":"v"}"#);

    // WebSocket publishes.
    let mut ws = Ws::connect(&server).await;
    let ok = ws
        .call(json!({"op": "send", "channel": "dt.w", "message": {"x": true}}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    let (_, got) = api.receive("dt.w").await.expect("the WebSocket message");
    assert_eq!(got.to_string(), r#"{"type":"notify","x":true}"#);
}
