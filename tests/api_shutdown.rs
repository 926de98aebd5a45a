//! Graceful shutdown of a real server: on SIGTERM (or SIGINT) streams end, WebSockets
//! are closed with 1001, in-flight requests finish, the process exits 0 within
//! `server.shutdown_timeout_secs`, and everything acknowledged is there after a restart.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// Reads a WebSocket until its close frame; returns the code and the frames before it.
async fn until_close(ws: &mut Ws, t: Duration) -> (Option<u16>, Vec<WsIn>) {
    let deadline = Instant::now() + t;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws.next_within(left).await {
            Ok(WsIn::Close(code, _)) => return (Some(code), before),
            Ok(WsIn::End) => return (None, before),
            Ok(other) => before.push(other),
            Err(()) => panic!("the WebSocket was not closed within {t:?}; got {before:?}"),
        }
    }
}

#[tokio::test]
async fn sigterm_ends_streams_closes_websockets_with_1001_and_exits_0_keeping_acknowledged_data() {
    let mut server = Server::start_with("[server]\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);

    // Acknowledged data: three messages (one received), a membership, a group message.
    let mut kept = Vec::new();
    for n in 0..3 {
        kept.push((api.send("kept", &msg(n)).await, msg(n)));
    }
    assert_eq!(api.receive("kept").await, Some(kept.remove(0)));
    api.group_add("kept.group", "kept.member").await;
    api.group_send("kept.group", &msg(10)).await;

    // Many open SSE streams of every kind, each having delivered one message.
    let mut streams = Vec::new();
    for i in 0..12 {
        let path = match i % 4 {
            0 => format!("/v1/channels/s.{i}/events"),
            1 => format!("/v1/groups/s.group/events?channel=s.{i}"),
            2 => "/v1/groups/s.eph/events".to_string(),
            _ => format!("/v1/events?group=s.a&group=s.b&channel=s.{i}"),
        };
        streams.push((i, Sse::open(&api.http, &server.url(&path), &[]).await));
    }
    for (i, sse) in streams.iter_mut() {
        if *i % 4 == 0 {
            api.send(&format!("s.{i}"), &msg(*i)).await;
            assert_eq!(sse.event().await.json(), msg(*i));
        }
    }

    // WebSockets: idle, subscribed, and with a receive waiting.
    let mut sockets = Vec::new();
    for i in 0..6 {
        let mut ws = Ws::connect(&server).await;
        match i % 3 {
            0 => {}
            1 => {
                let ok = ws
                    .call(json!({"op": "subscribe", "channel": format!("w.{i}")}))
                    .await;
                assert_eq!(ok["op"], "ok");
            }
            _ => {
                ws.send_json(
                    &json!({"op": "receive", "ref": i, "channel": format!("w.{i}"), "wait": 30}),
                )
                .await;
            }
        }
        sockets.push(ws);
    }

    // An in-flight long-poll.
    let long_poll = {
        let api = api.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let response = api
                .http
                .get(api.url("/v1/channels/lp/messages?wait=30"))
                .send()
                .await;
            (response.map(|r| r.status().as_u16()), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!long_poll.is_finished());

    let started = Instant::now();
    server.terminate();

    for (i, sse) in streams.iter_mut() {
        match sse.until_end(Duration::from_secs(5)).await {
            Ok(items) => assert!(
                !items.iter().any(|it| matches!(it, SseItem::Event(_))),
                "stream {i}: {items:?}"
            ),
            Err(items) => panic!("stream {i} did not end at shutdown: {items:?}"),
        }
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        let (code, before) = until_close(ws, Duration::from_secs(5)).await;
        assert_eq!(
            code,
            Some(1001),
            "socket {i}: closed with 1001 (going away)"
        );
        for frame in &before {
            // A waiting receive may be answered with a timeout first; nothing else.
            assert!(
                matches!(frame, WsIn::Json(j) if j["op"] == "timeout"),
                "socket {i}: {frame:?}"
            );
        }
    }
    let (status, waited) = within(T, "the long-poll", long_poll).await.unwrap();
    match status {
        Ok(status) => assert_eq!(status, 204, "the long-poll ends empty"),
        Err(e) => panic!("the long-poll got no answer: {e}"),
    }
    assert!(waited < Duration::from_secs(10), "{waited:?}");

    let status = server
        .wait_exit(Duration::from_secs(8))
        .await
        .unwrap_or_else(|| panic!("still running; log:\n{}", server.log()));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        server.log()
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "well within the 10 s shutdown timeout: {took:?}"
    );
    assert!(server.log().contains("storage flushed"), "{}", server.log());

    // After a restart: every acknowledged, unreceived message, once; nothing received
    // before the clean stop comes back.
    let server = server.restart().await;
    let api = Api::new(&server);
    assert_eq!(api.drain("kept").await, kept);
    assert_eq!(api.members("kept.group").await, vec!["kept.member"]);
    assert_eq!(api.receive("kept.member").await.unwrap().1, msg(10));
    for i in (0..12).step_by(4) {
        assert_eq!(
            api.receive(&format!("s.{i}")).await,
            None,
            "s.{i}: delivered over SSE before the stop"
        );
    }
}

#[tokio::test]
async fn an_ephemeral_group_stream_open_at_shutdown_leaves_no_membership_behind() {
    let mut server = Server::start().await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &server.url("/v1/groups/temp/events"), &[]).await;
    let mut multi = Sse::open(
        &api.http,
        &server.url("/v1/events?group=temp2&group=temp3"),
        &[],
    )
    .await;
    assert_eq!(api.members("temp").await.len(), 1);
    assert_eq!(api.members("temp2").await.len(), 1);
    let status = server.shutdown(T).await;
    assert!(status.success());
    assert!(sse.until_end(T).await.is_ok());
    assert!(multi.until_end(T).await.is_ok());

    let server = server.restart().await;
    let api = Api::new(&server);
    for group in ["temp", "temp2", "temp3"] {
        assert_eq!(
            api.members(group).await,
            Vec::<String>::new(),
            "the stream's fresh channel is still in {group} after the restart"
        );
        assert_eq!(api.group_send(group, &msg(1)).await, (0, 0), "{group}");
    }
}

#[tokio::test]
async fn sigint_also_shuts_down_cleanly() {
    let mut server = Server::start().await;
    let api = Api::new(&server);
    let id = api.send("int", &msg(1)).await;
    let status = std::process::Command::new("kill")
        .arg("-INT")
        .arg(server.pid().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = server
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits on SIGINT");
    assert!(exit.success(), "{exit:?}");
    let server = server.restart().await;
    assert_eq!(Api::new(&server).receive("int").await, Some((id, msg(1))));
}

#[tokio::test]
async fn clients_that_hold_on_cannot_delay_the_exit_past_the_shutdown_timeout() {
    let mut server = Server::start_with(
        "[server]\nshutdown_timeout_secs = 2\n[storage]\ndurability = \"interval\"\n[layer]\ncapacity = 500\n",
    )
    .await;
    let api = Api::new(&server);
    // A stream whose client reads nothing while a lot is waiting for it...
    let stuck = Sse::open(&api.http, &server.url("/v1/channels/stuck/events"), &[]).await;
    let pad = "s".repeat(30_000);
    for n in 0..200 {
        api.send("stuck", &json!({"type": "big", "n": n, "pad": pad}))
            .await;
    }
    // ...a request whose body never finishes...
    let mut half = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    half.write_all(
        b"POST /v1/channels/half/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"type\":",
    )
    .await
    .unwrap();
    // ...and a WebSocket that never reads.
    let mut ws = Ws::connect(&server).await;
    ws.call(json!({"op": "subscribe", "channel": "stuck.ws"}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    server.terminate();
    let status = server
        .wait_exit(Duration::from_secs(8))
        .await
        .unwrap_or_else(|| panic!("still running 8 s after SIGTERM; log:\n{}", server.log()));
    let took = started.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(5),
        "exit within the 2 s timeout (plus the final flush): {took:?}"
    );
    drop((stuck, half, ws));

    // What the stuck stream never showed is replayable or still queued.
    let server = server.restart().await;
    let api = Api::new(&server);
    let queued = api.drain("stuck").await;
    let mut replay = Sse::open(
        &api.http,
        &server.url("/v1/channels/stuck/events"),
        &[("last-event-id", "0")],
    )
    .await;
    let replayed = replay.events(200 - queued.len()).await;
    let mut ns: Vec<u64> = replayed
        .iter()
        .map(|e| e.json()["n"].as_u64().unwrap())
        .chain(queued.iter().map(|(_, m)| m["n"].as_u64().unwrap()))
        .collect();
    ns.sort();
    assert_eq!(ns, (0..200).collect::<Vec<_>>(), "nothing lost");
}

#[tokio::test]
async fn no_new_connections_are_served_after_shutdown() {
    let mut server = Server::start().await;
    let addr = server.addr.clone();
    let status = server.shutdown(T).await;
    assert!(status.success());
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "the listener is closed"
    );
}
