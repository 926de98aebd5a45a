//! Receives with a lease and their acknowledgements, against a real server: a leased
//! message goes to nobody else until its lease runs out, then comes back first with its
//! id; an acknowledged one is gone for good; a crash, a restart or a closed WebSocket
//! gives unacknowledged ones back at once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value as Json, json};

impl Api {
    /// A receive leasing the message for `lease` seconds.
    async fn lease(&self, channel: &str, lease: u64) -> Option<(String, Json)> {
        let url = self.url(&format!("/v1/channels/{channel}/messages?lease={lease}"));
        let (status, json) = json_of(fetch(self.http.get(url)).await).await;
        match status {
            204 => None,
            200 => Some((
                json["id"].as_str().unwrap().to_string(),
                json["message"].clone(),
            )),
            other => panic!("leased receive from {channel}: {other} {json}"),
        }
    }

    /// The acknowledgement of message `id` of `channel`: its status.
    async fn ack(&self, channel: &str, id: &str) -> reqwest::Response {
        fetch(
            self.http
                .delete(self.url(&format!("/v1/channels/{channel}/messages/{id}"))),
        )
        .await
    }
}

#[tokio::test]
async fn a_leased_message_goes_to_nobody_else_and_an_ack_ends_it() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let first = api.send("work", &msg(1)).await;
    let second = api.send("work", &msg(2)).await;
    assert_eq!(api.lease("work", 60).await, Some((first.clone(), msg(1))));
    // The next receive, leased or not, gets the message after it.
    assert_eq!(api.receive("work").await, Some((second.clone(), msg(2))));
    assert_eq!(api.receive("work").await, None);
    assert_eq!(api.ack("work", &first).await.status(), 204);
    for (channel, id) in [
        ("work", first.as_str()),  // acknowledged already
        ("work", second.as_str()), // taken without a lease
        ("other", first.as_str()),
        ("work", "999999999"),
        ("work", "not-an-id"),
    ] {
        assert_error(api.ack(channel, id).await, 404, "not_found").await;
    }
    for bad in ["0", "3601", "1.5", "-1", "soon", ""] {
        let url = api.url(&format!("/v1/channels/work/messages?lease={bad}"));
        let error = refused(api.http.get(url), 400, "invalid_parameter").await;
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("lease"),
            "{error}"
        );
    }
    // Nothing comes back: it was acknowledged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.receive("work").await, None);
}

#[tokio::test]
async fn a_lease_that_runs_out_puts_the_message_back_first_with_its_id() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let first = api.send("jobs", &msg(1)).await;
    let start = Instant::now();
    assert_eq!(api.lease("jobs", 1).await, Some((first.clone(), msg(1))));
    // A receive waiting meanwhile gets it back within a second after the lease.
    let back = api.receive_wait("jobs", 5.0).await;
    let took = start.elapsed();
    assert_eq!(back, Some((first.clone(), msg(1))));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "back after {took:?}"
    );
    // Back ahead of what was sent after it.
    api.send("jobs", &msg(2)).await;
    let second = api.receive("jobs").await.unwrap().0;
    api.send("jobs", &msg(3)).await;
    let (leased, _) = api.lease("jobs", 1).await.unwrap();
    let later = api.send("jobs", &msg(4)).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        api.receive("jobs").await.map(|(id, _)| id),
        Some(leased.clone())
    );
    assert_eq!(api.receive("jobs").await.map(|(id, _)| id), Some(later));
    assert!(id_num(&second) < id_num(&leased));
    // Its lease is over: acknowledging it now finds nothing.
    assert_error(api.ack("jobs", &leased).await, 404, "not_found").await;
}

#[tokio::test]
async fn leased_messages_count_against_capacity_and_as_pending() {
    let server = Server::start_with("[layer]\ncapacity = 2\n").await;
    let api = Api::new(&server);
    api.send("small", &msg(1)).await;
    api.send("small", &msg(2)).await;
    let (id, _) = api.lease("small", 60).await.unwrap();
    let full = assert_error(api.send_raw("small", &msg(3)).await, 429, "channel_full").await;
    assert!(
        full["error"]["message"].as_str().unwrap().contains("small"),
        "{full}"
    );
    let (_, stats) = json_of(fetch(api.http.get(api.url("/v1/stats"))).await).await;
    assert_eq!(stats["stats"]["pending_messages"], 2, "{stats}");
    assert_eq!(api.ack("small", &id).await.status(), 204);
    api.send("small", &msg(3)).await;
}

#[tokio::test]
async fn unacknowledged_leases_are_pending_again_after_a_crash_or_a_restart() {
    let mut server = Server::start().await;
    let api = Api::new(&server);
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(api.send("c", &msg(n)).await);
    }
    let (acked, _) = api.lease("c", 3600).await.unwrap();
    let (kept, _) = api.lease("c", 3600).await.unwrap();
    let (taken, _) = api.receive("c").await.unwrap();
    assert_eq!([&acked, &kept, &taken], [&ids[0], &ids[1], &ids[2]]);
    assert_eq!(api.ack("c", &acked).await.status(), 204);
    // The receive cursor reaches the disk with the next sweeps: wait for them, so that
    // the leased message counts as taken there, but for its lease.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    server.kill().await;
    server = server.restart().await;
    let api = Api::new(&server);
    assert_eq!(
        api.drain("c")
            .await
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>(),
        [kept.clone(), ids[3].clone()],
        "after kill -9: the unacknowledged lease at once, in id order"
    );
    // Leased again and the server stopped cleanly: the same.
    api.send("d", &msg(9)).await;
    let (leased, _) = api.lease("d", 3600).await.unwrap();
    server.shutdown(T).await;
    let server = server.restart().await;
    let api = Api::new(&server);
    assert_eq!(
        api.receive("d").await.map(|(id, _)| id),
        Some(leased.clone())
    );
    assert_eq!(api.receive("d").await, None);
    assert_eq!(api.receive("c").await, None);
}

#[tokio::test]
async fn a_websocket_leases_acknowledges_and_gives_back_what_it_held_when_it_closes() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let first = api.send("ws.jobs", &msg(1)).await;
    let second = api.send("ws.jobs", &msg(2)).await;
    let mut ws = Ws::connect(&server).await;
    let got = ws
        .call(json!({"op": "receive", "ref": 1, "channel": "ws.jobs", "lease": 60}))
        .await;
    assert_eq!(
        (got["op"].as_str(), got["id"].as_str()),
        (Some("message"), Some(first.as_str())),
        "{got}"
    );
    let ok = ws
        .call(json!({"op": "ack", "ref": 2, "channel": "ws.jobs", "id": first}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    let again = ws
        .call(json!({"op": "ack", "ref": 3, "channel": "ws.jobs", "id": first}))
        .await;
    assert_eq!(
        (again["op"].as_str(), again["code"].as_str()),
        (Some("error"), Some("not_found")),
        "{again}"
    );
    for bad in [json!(0), json!(3601), json!(1.5), json!("60")] {
        let refused = ws
            .call(json!({"op": "receive", "channel": "ws.jobs", "lease": bad}))
            .await;
        assert_eq!(refused["code"], "invalid_parameter", "{bad}: {refused}");
    }
    let held = ws
        .call(json!({"op": "receive", "channel": "ws.jobs", "lease": 3600}))
        .await;
    assert_eq!(held["id"].as_str(), Some(second.as_str()), "{held}");
    assert_eq!(api.receive("ws.jobs").await, None, "leased to the socket");
    drop(ws);
    // Closed without acknowledging: back at once, not after the hour.
    let back = api.receive_wait("ws.jobs", 2.0).await;
    assert_eq!(back, Some((second, msg(2))));
}

#[tokio::test]
async fn the_layer_settings_are_reported() {
    let server = Server::start_with(
        "[layer]\ncapacity = 7\nexpiry_secs = 30\ngroup_expiry_secs = 600\n\
         [layer.channel_capacity]\n\"big.*\" = 1000\n",
    )
    .await;
    let api = Api::new(&server);
    let (status, layer) = json_of(fetch(api.http.get(api.url("/v1/layer"))).await).await;
    assert_eq!(status, 200, "{layer}");
    assert_eq!(layer["capacity"], 7);
    assert_eq!(layer["expiry"], 30);
    assert_eq!(layer["group_expiry"], 600);
    assert_eq!(layer["channel_capacity"], json!({"big.*": 1000}));
    assert!(
        layer["max_message_bytes"].as_u64().unwrap() >= 1 << 20,
        "{layer}"
    );
}

#[tokio::test]
async fn a_leasing_subscription_pushes_a_window_at_a_time() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(api.send("sub", &msg(n)).await);
    }
    let mut ws = Ws::connect(&server).await;
    for bad in [
        json!({"op": "subscribe", "channel": "sub", "window": 2}),
        json!({"op": "subscribe", "channel": "sub", "lease": 60, "window": 0}),
        json!({"op": "subscribe", "channel": "sub", "lease": 60, "window": "2"}),
        json!({"op": "subscribe", "channel": "sub", "lease": 0}),
    ] {
        let refused = ws.call(bad.clone()).await;
        assert_eq!(refused["code"], "invalid_parameter", "{bad}: {refused}");
    }
    let ok = ws
        .call(json!({"op": "subscribe", "channel": "sub", "lease": 60, "window": 2}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    let pushed = |frame: Json| frame["id"].as_str().unwrap().to_string();
    assert_eq!(pushed(ws.json().await), ids[0]);
    assert_eq!(pushed(ws.json().await), ids[1]);
    ws.assert_silent(Duration::from_millis(600)).await;
    let ok = ws
        .call(json!({"op": "ack", "ref": "a", "channel": "sub", "id": ids[0]}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
    assert_eq!(pushed(ws.json().await), ids[2], "room in the window again");
    ws.assert_silent(Duration::from_millis(300)).await;
    drop(ws);
    // The socket closed holding 1 and 2 unacknowledged: they come back first (once the
    // server has seen it close).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let left: Vec<String> = api
        .drain("sub")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(left, ids[1..]);
}

#[tokio::test]
async fn a_subscription_gets_a_message_again_once_its_lease_runs_out() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let id = api.send("again", &msg(1)).await;
    let mut ws = Ws::connect(&server).await;
    ws.call(json!({"op": "subscribe", "channel": "again", "lease": 1, "window": 1}))
        .await;
    assert_eq!(ws.json().await["id"].as_str(), Some(id.as_str()));
    let start = Instant::now();
    let again = ws
        .next_within(Duration::from_secs(3))
        .await
        .expect("pushed again");
    assert!(
        format!("{again:?}").contains(&format!("\"{id}\"")),
        "{again:?}"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "{:?}",
        start.elapsed()
    );
    let ok = ws
        .call(json!({"op": "ack", "channel": "again", "id": id}))
        .await;
    assert_eq!(ok["op"], "ok", "{ok}");
}
