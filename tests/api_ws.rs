//! The WebSocket protocol at `/v1/ws` against a real server: every op with its `ref`
//! echoed, JSON text and msgpack binary frames, subscriptions with replay and gaps,
//! error replies that keep the connection open, and the frame size limit.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rmpv::Value as Mp;
use serde_json::{Value as Json, json};

/// The keys of a JSON object, in order.
fn keys(json: &Json) -> Vec<String> {
    json.as_object()
        .unwrap_or_else(|| panic!("not an object: {json}"))
        .keys()
        .cloned()
        .collect()
}

fn assert_error_reply(reply: &Json, reference: Option<&Json>, code: &str) {
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    match reference {
        Some(r) => assert_eq!(&reply["ref"], r, "{reply}"),
        None => assert!(reply.get("ref").is_none(), "{reply}"),
    }
}

#[tokio::test]
async fn send_and_receive_echo_refs_and_keep_the_documented_shape() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    let message = json!({"type": "chat", "f": 1.0, "big": u64::MAX, "s": "é\n"});

    let ok = ws
        .call(json!({"op": "send", "ref": 1, "channel": "w.one", "message": message}))
        .await;
    assert_eq!(keys(&ok), ["op", "ref", "id"], "{ok}");
    assert_eq!(ok["op"], "ok");
    assert_eq!(ok["ref"], 1);
    let id = ok["id"].as_str().expect("ids are strings").to_string();
    id_num(&id);

    let got = ws
        .call(json!({"op": "receive", "ref": "r-2", "channel": "w.one", "wait": 0}))
        .await;
    assert_eq!(
        keys(&got),
        ["op", "ref", "channel", "id", "message"],
        "{got}"
    );
    assert_eq!(got["op"], "message");
    assert_eq!(got["ref"], "r-2");
    assert_eq!(got["channel"], "w.one");
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["message"], message);
    assert_eq!(
        got["message"].to_string(),
        message.to_string(),
        "the message round-trips exactly (1.0 stays 1.0)"
    );

    // Any JSON value is a ref; no ref, no "ref" key.
    let reference = json!({"client": [1, "x"], "n": null});
    let timeout = ws
        .call(json!({"op": "receive", "ref": reference, "channel": "w.one"}))
        .await;
    assert_eq!(timeout, json!({"op": "timeout", "ref": reference}));
    let bare = ws
        .call(json!({"op": "send", "channel": "w.one", "message": msg(2)}))
        .await;
    assert_eq!(keys(&bare), ["op", "id"], "{bare}");

    // What the WebSocket sent is visible over REST.
    let api = Api::new(&server);
    assert_eq!(
        api.receive("w.one").await,
        Some((bare["id"].as_str().unwrap().to_string(), msg(2)))
    );
}

#[tokio::test]
async fn a_waiting_receive_does_not_hold_up_other_requests() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;
    ws.send_json(&json!({"op": "receive", "ref": "slow", "channel": "w.wait", "wait": 10}))
        .await;
    let fast = ws
        .call(json!({"op": "send", "ref": "fast", "channel": "w.other", "message": msg(1)}))
        .await;
    assert_eq!(fast["ref"], "fast", "answered while the receive waits");
    ws.assert_silent(Duration::from_millis(300)).await;

    let started = Instant::now();
    let id = api.send("w.wait", &msg(7)).await;
    let got = ws.json().await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        got,
        json!({"op": "message", "ref": "slow", "channel": "w.wait", "id": id, "message": msg(7)})
    );

    // A short wait ends in a timeout.
    let started = Instant::now();
    let timeout = ws
        .call(json!({"op": "receive", "ref": 3, "channel": "w.wait", "wait": 0.5}))
        .await;
    let elapsed = started.elapsed();
    assert_eq!(timeout, json!({"op": "timeout", "ref": 3}));
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn group_ops_and_new_channel() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;

    let created = ws
        .call(json!({"op": "new_channel", "ref": "n", "prefix": "ws.client"}))
        .await;
    assert_eq!(keys(&created), ["op", "ref", "channel"], "{created}");
    assert_eq!(created["op"], "ok");
    let name = created["channel"].as_str().unwrap().to_string();
    let rest = name.strip_prefix("ws.client.").expect("the prefix");
    assert!(rest.contains('!'), "{name}");
    let other = ws.call(json!({"op": "new_channel"})).await;
    assert_eq!(other["op"], "ok");
    assert_ne!(other["channel"], name.as_str());

    assert_eq!(
        ws.call(json!({"op": "group_add", "ref": 1, "group": "wg", "channel": name}))
            .await,
        json!({"op": "ok", "ref": 1})
    );
    ws.call(json!({"op": "group_add", "ref": 2, "group": "wg", "channel": "ws.fixed"}))
        .await;
    let mut members = api.members("wg").await;
    members.sort();
    let mut expected = vec![name.clone(), "ws.fixed".to_string()];
    expected.sort();
    assert_eq!(members, expected);

    let sent = ws
        .call(json!({"op": "group_send", "ref": 3, "group": "wg", "message": msg(1)}))
        .await;
    assert_eq!(
        sent,
        json!({"op": "ok", "ref": 3, "delivered": 2, "full": 0})
    );
    assert_eq!(keys(&sent), ["op", "ref", "delivered", "full"]);
    assert_eq!(api.receive(&name).await.unwrap().1, msg(1));
    assert_eq!(api.receive("ws.fixed").await.unwrap().1, msg(1));

    assert_eq!(
        ws.call(json!({"op": "group_discard", "ref": 4, "group": "wg", "channel": name}))
            .await,
        json!({"op": "ok", "ref": 4})
    );
    assert_eq!(
        ws.call(json!({"op": "group_discard", "ref": 5, "group": "wg", "channel": "never.there"}))
            .await,
        json!({"op": "ok", "ref": 5}),
        "discarding a non-member is fine"
    );
    assert_eq!(api.members("wg").await, vec!["ws.fixed"]);
    let sent = ws
        .call(json!({"op": "group_send", "group": "wg", "message": msg(2)}))
        .await;
    assert_eq!(sent, json!({"op": "ok", "delivered": 1, "full": 0}));
}

#[tokio::test]
async fn group_send_counts_full_members() {
    let server = Server::start_with("[layer]\ncapacity = 1\n").await;
    let api = Api::new(&server);
    api.group_add("cap", "cap.a").await;
    api.group_add("cap", "cap.b").await;
    api.send("cap.b", &msg(0)).await;
    let mut ws = Ws::connect(&server).await;
    let sent = ws
        .call(json!({"op": "group_send", "ref": "g", "group": "cap", "message": msg(1)}))
        .await;
    assert_eq!(
        sent,
        json!({"op": "ok", "ref": "g", "delivered": 1, "full": 1})
    );
    let full = ws
        .call(json!({"op": "send", "ref": "s", "channel": "cap.b", "message": msg(2)}))
        .await;
    assert_error_reply(&full, Some(&json!("s")), "channel_full");
}

fn rich_message() -> Mp {
    mp_map(vec![
        ("type", Mp::from("bin.test")),
        ("data", Mp::Binary(vec![0, 255, 1, 254])),
        ("f32", Mp::F32(0.5)),
        ("f64", Mp::F64(2.0)),
        ("big", Mp::from(u64::MAX)),
        ("neg", Mp::from(-42)),
        ("list", Mp::Array(vec![Mp::Nil, Mp::Boolean(false)])),
    ])
}

#[tokio::test]
async fn msgpack_frames_get_msgpack_replies_and_keep_binary() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    let message = rich_message();
    ws.send_msgpack(&mp_map(vec![
        ("op", Mp::from("send")),
        ("ref", Mp::from(41)),
        ("channel", Mp::from("w.mp")),
        ("message", message.clone()),
    ]))
    .await;
    let ok = ws.msgpack().await;
    assert_eq!(mp_get(&ok, "op"), Some(&Mp::from("ok")));
    assert_eq!(mp_get(&ok, "ref"), Some(&Mp::from(41)));
    let id = mp_get(&ok, "id")
        .and_then(Mp::as_str)
        .expect("ids are strings in msgpack too")
        .to_string();

    ws.send_msgpack(&mp_map(vec![
        ("op", Mp::from("receive")),
        ("ref", Mp::Binary(vec![9])),
        ("channel", Mp::from("w.mp")),
        ("wait", Mp::F64(1.0)),
    ]))
    .await;
    let got = ws.msgpack().await;
    assert_eq!(
        got,
        mp_map(vec![
            ("op", Mp::from("message")),
            ("ref", Mp::Binary(vec![9])),
            ("channel", Mp::from("w.mp")),
            ("id", Mp::from(id.as_str())),
            ("message", message.clone()),
        ])
    );

    // The same message read with a JSON frame shows binary as base64.
    ws.send_msgpack(&mp_map(vec![
        ("op", Mp::from("send")),
        ("channel", Mp::from("w.mp")),
        ("message", message.clone()),
    ]))
    .await;
    ws.msgpack().await;
    let got = ws.call(json!({"op": "receive", "channel": "w.mp"})).await;
    assert_eq!(
        got["message"].to_string(),
        r#"{"type":"bin.test","data":{"$binary":"AP8B/g=="},"f32":0.5,"f64":2.0,"big":18446744073709551615,"neg":-42,"list":[null,false]}"#
    );

    // And a JSON-sent message read with a msgpack frame.
    ws.call(json!({"op": "send", "channel": "w.mp", "message": {"type": "j", "b": {"$binary": "AQI="}, "x": 1.0}}))
        .await;
    ws.send_msgpack(&mp_map(vec![
        ("op", Mp::from("receive")),
        ("channel", Mp::from("w.mp")),
    ]))
    .await;
    let got = ws.msgpack().await;
    assert_eq!(
        mp_get(&got, "message"),
        Some(&mp_map(vec![
            ("type", Mp::from("j")),
            ("b", Mp::Binary(vec![1, 2])),
            ("x", Mp::F64(1.0)),
        ]))
    );
}

#[tokio::test]
async fn subscribe_pushes_messages_and_unsubscribe_stops_them() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;
    assert_eq!(
        ws.call(json!({"op": "subscribe", "ref": "sub", "channel": "w.live"}))
            .await,
        json!({"op": "ok", "ref": "sub"})
    );
    let a = api.send("w.live", &msg(1)).await;
    let b = api.send("w.live", &msg(2)).await;
    let first = ws.json().await;
    assert_eq!(keys(&first), ["op", "channel", "id", "message"], "{first}");
    assert_eq!(
        first,
        json!({"op": "message", "channel": "w.live", "id": a, "message": msg(1)})
    );
    assert_eq!(
        ws.json().await,
        json!({"op": "message", "channel": "w.live", "id": b, "message": msg(2)})
    );
    // Pushed messages were consumed.
    assert_eq!(api.receive("w.live").await, None);

    assert_eq!(
        ws.call(json!({"op": "unsubscribe", "ref": "u", "channel": "w.live"}))
            .await,
        json!({"op": "ok", "ref": "u"})
    );
    let c = api.send("w.live", &msg(3)).await;
    ws.assert_silent(Duration::from_millis(500)).await;
    assert_eq!(
        api.receive("w.live").await,
        Some((c, msg(3))),
        "an ended subscription does not take messages"
    );
    // Unsubscribing from nothing is fine.
    assert_eq!(
        ws.call(json!({"op": "unsubscribe", "ref": 9, "channel": "w.none"}))
            .await,
        json!({"op": "ok", "ref": 9})
    );
}

#[tokio::test]
async fn msgpack_subscriptions_push_msgpack_frames() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    ws.send_msgpack(&mp_map(vec![
        ("op", Mp::from("subscribe")),
        ("ref", Mp::from(1)),
        ("channel", Mp::from("w.mpsub")),
    ]))
    .await;
    assert_eq!(
        ws.msgpack().await,
        mp_map(vec![("op", Mp::from("ok")), ("ref", Mp::from(1))])
    );
    let response = client()
        .post(server.url("/v1/channels/w.mpsub/messages"))
        .header("content-type", "application/msgpack")
        .body(mp_encode(&rich_message()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let push = ws.msgpack().await;
    assert_eq!(mp_get(&push, "op"), Some(&Mp::from("message")));
    assert_eq!(mp_get(&push, "channel"), Some(&Mp::from("w.mpsub")));
    assert!(mp_get(&push, "id").and_then(Mp::as_str).is_some());
    assert_eq!(mp_get(&push, "message"), Some(&rich_message()));
}

#[tokio::test]
async fn subscribe_with_last_event_id_replays_what_a_dropped_socket_missed() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;
    ws.call(json!({"op": "subscribe", "channel": "w.replay"}))
        .await;
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(api.send("w.replay", &msg(n)).await);
    }
    for id in &ids {
        assert_eq!(ws.json().await["id"], id.as_str());
    }
    drop(ws);

    // The client only saw the first; it resumes after it (id as a string).
    let mut again = Ws::connect(&server).await;
    assert_eq!(
        again
            .call(json!({"op": "subscribe", "ref": "r", "channel": "w.replay", "last_event_id": ids[0]}))
            .await,
        json!({"op": "ok", "ref": "r"})
    );
    for (n, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(
            again.json().await,
            json!({"op": "message", "channel": "w.replay", "id": id, "message": msg(n as u64)})
        );
    }
    // Then live messages, without duplicates.
    let live = api.send("w.replay", &msg(9)).await;
    assert_eq!(again.json().await["id"], live.as_str());
    again.assert_silent(Duration::from_millis(300)).await;
    drop(again);

    // The id may also be a number.
    let mut third = Ws::connect(&server).await;
    third
        .call(json!({"op": "subscribe", "channel": "w.replay", "last_event_id": id_num(&ids[2])}))
        .await;
    assert_eq!(third.json().await["id"], ids[3].as_str());
    assert_eq!(third.json().await["id"], live.as_str());
    third.assert_silent(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn subscribe_after_messages_lost_to_a_forgotten_channel_pushes_a_gap() {
    for restart in [false, true] {
        let (server, first, fresh) =
            lose_a_message_to_a_forgotten_channel("w.forgotten", restart).await;
        let mut ws = Ws::connect(&server).await;
        ws.call(
            json!({"op": "subscribe", "ref": 1, "channel": "w.forgotten", "last_event_id": first}),
        )
        .await;
        assert_eq!(
            ws.json().await,
            json!({"op": "gap", "channel": "w.forgotten", "after": first, "next": fresh}),
            "restart: {restart}"
        );
        assert_eq!(ws.json().await["id"], fresh.as_str());
    }
}

#[tokio::test]
async fn subscribe_after_lost_messages_pushes_a_gap() {
    let server = Server::start_with("[layer]\nreplay_capacity = 2\n").await;
    let api = Api::new(&server);
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(api.send("w.gap", &msg(n)).await);
    }
    assert_eq!(api.drain("w.gap").await.len(), 5);
    let mut ws = Ws::connect(&server).await;
    ws.call(json!({"op": "subscribe", "ref": 1, "channel": "w.gap", "last_event_id": ids[0]}))
        .await;
    let gap = ws.json().await;
    assert_eq!(
        gap,
        json!({"op": "gap", "channel": "w.gap", "after": ids[0], "next": ids[3]})
    );
    assert_eq!(keys(&gap), ["op", "channel", "after", "next"]);
    assert_eq!(ws.json().await["id"], ids[3].as_str());
    assert_eq!(ws.json().await["id"], ids[4].as_str());
}

#[tokio::test]
async fn a_closed_socket_ends_its_subscriptions() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;
    ws.call(json!({"op": "subscribe", "channel": "w.closed"}))
        .await;
    ws.send_frame(WsFrame::Close(None)).await;
    let _ = ws.next_within(Duration::from_secs(2)).await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = api.send("w.closed", &msg(1)).await;
    assert_eq!(
        api.receive_wait("w.closed", 1.0).await,
        Some((id, msg(1))),
        "no subscription of the closed socket took it"
    );
}

#[tokio::test]
async fn bad_requests_get_error_replies_and_the_connection_stays_open() {
    let server = Server::start_with("[layer]\ncapacity = 1\nmax_message_bytes = 1024\n").await;
    let mut ws = Ws::connect(&server).await;
    ws.call(json!({"op": "send", "channel": "w.full", "message": msg(0)}))
        .await;

    // Frames that cannot be parsed: no ref to echo.
    for text in ["{not json", "[1,2]", "\"op\"", ""] {
        ws.send_frame(WsFrame::text(text)).await;
        let reply = ws.json().await;
        assert_error_reply(&reply, None, "invalid_body");
    }

    let big = "x".repeat(2000);
    let cases: Vec<(Json, &str)> = vec![
        (json!({"ref": 1}), "invalid_parameter"),
        (json!({"op": 5, "ref": 2}), "invalid_parameter"),
        (json!({"op": "explode", "ref": 3}), "invalid_parameter"),
        (
            json!({"op": "send", "ref": 4, "channel": "bad name", "message": msg(1)}),
            "invalid_name",
        ),
        (
            json!({"op": "send", "ref": 5, "channel": "w.ok", "message": {"no": "type"}}),
            "invalid_message",
        ),
        (
            json!({"op": "send", "ref": 6, "channel": "w.ok"}),
            "invalid_message",
        ),
        (
            json!({"op": "send", "ref": 7, "channel": "w.ok", "message": {"type": "x", "__asgi_channel__": 1}}),
            "invalid_message",
        ),
        (
            json!({"op": "send", "ref": 8, "channel": "w.ok", "message": {"type": "x", "big": big}}),
            "message_too_large",
        ),
        (
            json!({"op": "send", "ref": 9, "channel": "w.full", "message": msg(1)}),
            "channel_full",
        ),
        (
            json!({"op": "send", "ref": 10, "message": msg(1)}),
            "invalid_parameter",
        ),
        (
            json!({"op": "group_send", "ref": 11, "group": "a!b", "message": msg(1)}),
            "invalid_name",
        ),
        (
            json!({"op": "group_add", "ref": 12, "group": "g", "channel": "!x"}),
            "invalid_name",
        ),
        (
            json!({"op": "receive", "ref": 13, "channel": "w.ok", "wait": "abc"}),
            "invalid_parameter",
        ),
        (
            json!({"op": "receive", "ref": 14, "channel": "w.ok", "wait": -1}),
            "invalid_parameter",
        ),
        (
            json!({"op": "receive", "ref": 15, "channel": "a b"}),
            "invalid_name",
        ),
        (
            json!({"op": "subscribe", "ref": 16, "channel": "w.ok", "last_event_id": "x"}),
            "invalid_parameter",
        ),
        (
            json!({"op": "subscribe", "ref": 17, "channel": "x!y!z"}),
            "invalid_name",
        ),
        (
            json!({"op": "new_channel", "ref": 18, "prefix": "a!"}),
            "invalid_name",
        ),
    ];
    for (request, code) in cases {
        let reference = request["ref"].clone();
        let reply = ws.call(request.clone()).await;
        assert_error_reply(&reply, Some(&reference), code);
    }

    // msgpack errors come back as msgpack.
    ws.send_frame(WsFrame::binary(vec![0x81, 0xa2])).await;
    let reply = ws.msgpack().await;
    assert_eq!(mp_get(&reply, "op"), Some(&Mp::from("error")));
    assert_eq!(mp_get(&reply, "code"), Some(&Mp::from("invalid_body")));
    ws.send_msgpack(&mp_map(vec![
        ("op", Mp::from("send")),
        ("ref", Mp::from(99)),
        ("channel", Mp::from("w.ok")),
        ("message", Mp::from(3)),
    ]))
    .await;
    let reply = ws.msgpack().await;
    assert_eq!(mp_get(&reply, "ref"), Some(&Mp::from(99)));
    assert_eq!(mp_get(&reply, "code"), Some(&Mp::from("invalid_message")));

    // Still open and working.
    let ok = ws
        .call(json!({"op": "send", "ref": "last", "channel": "w.ok", "message": msg(2)}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    let got = ws.call(json!({"op": "receive", "channel": "w.ok"})).await;
    assert_eq!(got["message"], msg(2), "only the valid message was stored");
    let got = ws.call(json!({"op": "receive", "channel": "w.ok"})).await;
    assert_eq!(got["op"], "timeout");
}

/// Reads until a close frame or the end; returns the close code, if any.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    match ws.next_within(T).await {
        Ok(WsIn::Close(code, _)) => Some(code),
        Ok(WsIn::End) => None,
        Err(()) => panic!("the socket was neither closed nor answered within {T:?}"),
        Ok(other) => panic!("unexpected frame {other:?}"),
    }
}

#[tokio::test]
async fn an_oversized_message_closes_the_socket_with_1009() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let server = Server::start().await;
    let api = Api::new(&server);
    let kept = api.send("w.keep", &msg(1)).await;
    let mut ws = Ws::connect(&server).await;
    // Default limit: 1 MiB messages, so WebSocket messages of about 2 MiB. Three
    // fragments of 1 MiB, each under the frame limit; the last one crosses the message
    // limit, so that the server has read every byte when it refuses.
    let part = "z".repeat(1024 * 1024);
    for (opcode, last) in [
        (OpCode::Data(Data::Text), false),
        (OpCode::Data(Data::Continue), false),
        (OpCode::Data(Data::Continue), true),
    ] {
        ws.send_frame(WsFrame::Frame(Frame::message(part.clone(), opcode, last)))
            .await;
    }
    assert_eq!(
        close_code(&mut ws).await,
        Some(1009),
        "closed with 1009 (message too big)"
    );
    // Nothing was stored, the server is fine and other data is intact.
    api.assert_healthy().await;
    assert_eq!(api.receive("w.keep").await, Some((kept, msg(1))));
    assert_eq!(api.receive("w.keep").await, None);
    let mut again = Ws::connect(&server).await;
    assert_eq!(
        again
            .call(json!({"op": "receive", "channel": "w.keep"}))
            .await,
        json!({"op": "timeout"})
    );
}

#[tokio::test]
async fn an_oversized_single_frame_is_refused_without_harm() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let kept = api.send("w.keep", &msg(1)).await;
    let mut ws = Ws::connect(&server).await;
    let huge = format!(
        r#"{{"op":"send","channel":"w.keep","message":{{"type":"x","pad":"{}"}}}}"#,
        "z".repeat(3 * 1024 * 1024)
    );
    // The server refuses from the frame header and may close while the client still
    // writes; the client then sees a reset instead of the close frame.
    let sent = ws.try_send_frame(WsFrame::text(huge)).await;
    if sent.is_ok() {
        let code = close_code(&mut ws).await;
        assert!(code.is_none() || code == Some(1009), "closed with {code:?}");
    }
    api.assert_healthy().await;
    assert_eq!(api.receive("w.keep").await, Some((kept, msg(1))));
    assert_eq!(
        api.receive("w.keep").await,
        None,
        "the huge message was not stored"
    );
}

#[tokio::test]
async fn a_large_frame_within_the_limit_is_accepted() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    let pad = "y".repeat(900 * 1024);
    let ok = ws
        .call(json!({"op": "send", "channel": "w.large", "message": {"type": "x", "pad": pad}}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    let got = ws
        .call(json!({"op": "receive", "channel": "w.large"}))
        .await;
    assert_eq!(
        got["message"]["pad"].as_str().map(str::len),
        Some(pad.len())
    );
}

#[tokio::test]
async fn at_max_connections_the_upgrade_is_refused_with_503() {
    let server = Server::start_with("[server]\nmax_connections = 1\n").await;
    let mut first = Ws::connect(&server).await;
    match tokio_tungstenite::connect_async(server.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let body = response.body().clone().unwrap_or_default();
            let json: Json = serde_json::from_slice(&body).expect("a JSON error");
            assert_eq!(json["error"]["code"], "unavailable");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a second WebSocket was admitted past max_connections = 1"),
    }
    // The admitted socket works.
    let ok = first
        .call(json!({"op": "send", "channel": "w.c", "message": msg(1)}))
        .await;
    assert_eq!(ok["op"], "ok");
}

#[tokio::test]
async fn a_receive_pending_when_the_socket_closes_takes_no_message() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;
    ws.send_json(&json!({"op": "receive", "ref": 1, "channel": "w.orphan", "wait": 20}))
        .await;
    ws.assert_silent(Duration::from_millis(200)).await;
    // The client goes away while its receive waits.
    drop(ws);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = api.send("w.orphan", &msg(1)).await;
    assert_eq!(
        api.receive_wait("w.orphan", 2.0).await,
        Some((id, msg(1))),
        "the message went to the receive of a closed socket and was lost"
    );
}

#[tokio::test]
async fn at_most_64_receives_wait_on_one_connection() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    for n in 0..64 {
        ws.send_json(&json!({"op": "receive", "ref": n, "channel": "w.many", "wait": 1}))
            .await;
    }
    let reply = ws
        .call(json!({"op": "receive", "ref": "one-too-many", "channel": "w.many", "wait": 1}))
        .await;
    assert_error_reply(&reply, Some(&json!("one-too-many")), "unavailable");
    let mut timeouts = 0;
    while timeouts < 64 {
        let reply = ws.json().await;
        assert_eq!(reply["op"], "timeout", "{reply}");
        timeouts += 1;
    }
    // The slots are free again.
    let reply = ws
        .call(json!({"op": "receive", "ref": "again", "channel": "w.many"}))
        .await;
    assert_eq!(reply, json!({"op": "timeout", "ref": "again"}));
}

#[tokio::test]
async fn a_subscriber_too_slow_to_read_gets_close_1008_and_resubscribes_without_loss() {
    const N: usize = 300;
    let server = Server::start_with(
        "[server]\nslow_consumer_secs = 1\n[storage]\ndurability = \"interval\"\n\
         [layer]\ncapacity = 1000\n",
    )
    .await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;
    ws.call(json!({"op": "subscribe", "channel": "w.slow"}))
        .await;
    let mut ids = Vec::with_capacity(N);
    let pad = "p".repeat(30_000);
    for n in 0..N {
        ids.push(
            api.send("w.slow", &json!({"type": "big", "n": n, "pad": pad}))
                .await,
        );
    }
    // The client reads nothing for longer than slow_consumer_secs, then reads again:
    // what was in flight, then a close 1008 (not silence).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut got: Vec<String> = Vec::new();
    loop {
        match ws.next_within(Duration::from_secs(3)).await {
            Ok(WsIn::Json(frame)) if frame["op"] == "message" => {
                got.push(frame["id"].as_str().unwrap().to_string());
            }
            Ok(WsIn::Close(code, _)) => {
                assert_eq!(code, 1008, "closed for slowness with 1008");
                break;
            }
            Ok(other) => panic!("unexpected frame {other:?} after {} messages", got.len()),
            Err(()) => panic!(
                "after {} of {N} messages the subscription went silent without telling \
                 the client",
                got.len()
            ),
        }
    }
    assert!(got.len() < N, "the server did not stop for the slow reader");
    drop(ws);

    // Resubscribing with the last id received gets the rest, once, in order.
    let mut again = Ws::connect(&server).await;
    let last = got.last().map_or("0", String::as_str).to_string();
    let request = json!({"op": "subscribe", "channel": "w.slow", "last_event_id": last});
    assert_eq!(again.call(request).await["op"], "ok");
    while got.len() < N {
        let frame = again.json().await;
        assert_eq!(frame["op"], "message", "{frame}");
        got.push(frame["id"].as_str().unwrap().to_string());
    }
    assert_eq!(got, ids, "every message once, in order");
    again.assert_silent(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_request_that_is_not_a_websocket_handshake_gets_a_clear_400() {
    let server = Server::start().await;
    let http = reqwest::Client::new();
    let url = server.url("/v1/ws");
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[], "Connection"),
        (&[("connection", "upgrade")], "Upgrade"),
        (
            &[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "WebSocket"),
            ],
            "Version",
        ),
        (
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
            ],
            "Key",
        ),
    ];
    for (headers, missing) in cases {
        let mut request = http.get(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let error = refused(request, 400, "invalid_parameter").await;
        let text = error["error"]["message"].as_str().unwrap();
        assert!(text.contains(missing), "{headers:?}: {text}");
    }
    // A real client still connects.
    let mut ws = Ws::connect(&server).await;
    let reply = ws
        .call(json!({"op": "send", "ref": 1, "channel": "h", "message": {"type": "t"}}))
        .await;
    assert_eq!(reply["op"], "ok", "{reply}");
}
