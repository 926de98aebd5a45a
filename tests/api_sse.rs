//! Server-sent event streams against a real server: the wire format, keepalives,
//! resuming with Last-Event-ID (also under repeated random drops), gap events, group
//! streams (offline delivery, ephemeral channels, several groups), competing consumers,
//! slow readers and the connection limit.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{Value as Json, json};

fn events_url(server: &Server, channel: &str) -> String {
    server.url(&format!("/v1/channels/{channel}/events"))
}

fn seed() -> u64 {
    let seed = common::seed_from_env("HERALD_TEST_SEED");
    eprintln!("seed: {seed} (set HERALD_TEST_SEED to repeat)");
    seed
}

#[tokio::test]
async fn each_message_is_an_event_with_its_id_and_one_line_of_json() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &events_url(&server, "feed"), &[]).await;
    let messages = [
        msg(1),
        json!({"type": "multi", "text": "line one\nline two\r\nthree", "f": 1.0, "u": u64::MAX}),
        json!({"type": "nested", "a": {"b": [1, {"c": null}]}}),
    ];
    let mut ids = Vec::new();
    for m in &messages {
        ids.push(api.send("feed", m).await);
    }
    let events = sse.events(3).await;
    for ((event, id), m) in events.iter().zip(&ids).zip(&messages) {
        assert_eq!(event.id.as_deref(), Some(id.as_str()));
        assert_eq!(event.event, None, "messages have no event field");
        assert!(!event.data.contains('\n'), "one line of data");
        assert_eq!(event.data, m.to_string(), "the message's JSON, unchanged");
    }
    // The wire itself: id and data fields, events separated by blank lines.
    let raw = String::from_utf8_lossy(&sse.raw).into_owned();
    for (id, m) in ids.iter().zip(&messages) {
        let id_line = format!("id:{id}\n");
        let id_line_spaced = format!("id: {id}\n");
        assert!(
            raw.contains(&id_line) || raw.contains(&id_line_spaced),
            "{raw}"
        );
        assert!(raw.contains(&m.to_string()), "{raw}");
    }
    assert_eq!(raw.matches("data:").count(), 3, "{raw}");
    // Delivery consumed them.
    assert_eq!(api.receive("feed").await, None);
}

#[tokio::test]
async fn the_keepalive_comes_only_after_a_full_interval_of_silence() {
    let server = Server::start_with("[server]\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &events_url(&server, "busy"), &[]).await;
    // Events 600 ms apart for 3 s: never a second of silence, so no keepalive.
    for n in 0..5 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        let id = api.send("busy", &msg(n)).await;
        match sse.next_item(Duration::from_secs(3)).await {
            Ok(Some(SseItem::Event(e))) => assert_eq!(e.id, Some(id)),
            other => panic!("expected event {n}, got {other:?}"),
        }
    }
    // Then silence: the keepalive follows about a second after the last event.
    let quiet = Instant::now();
    match sse.next_item(Duration::from_secs(3)).await {
        Ok(Some(SseItem::Comment(c))) => assert_eq!(c.trim(), "keepalive"),
        other => panic!("expected a keepalive comment, got {other:?}"),
    }
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_millis(1800),
        "keepalive {waited:?} after the last event"
    );
}

#[tokio::test]
async fn messages_pending_before_the_stream_opens_are_delivered_first() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let early = api.send("backlog", &msg(1)).await;
    let mut sse = Sse::open(&api.http, &events_url(&server, "backlog"), &[]).await;
    let late = api.send("backlog", &msg(2)).await;
    let events = sse.events(2).await;
    assert_eq!(events[0].id.as_deref(), Some(early.as_str()));
    assert_eq!(events[1].id.as_deref(), Some(late.as_str()));
    assert_eq!(events[1].json(), msg(2));
}

#[tokio::test]
async fn idle_streams_get_keepalive_comments() {
    let server = Server::start_with("[server]\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &events_url(&server, "idle"), &[]).await;
    let started = Instant::now();
    let mut keepalives = 0;
    while keepalives < 2 {
        match sse.next_item(Duration::from_secs(3)).await {
            Ok(Some(SseItem::Comment(c))) => {
                assert_eq!(c.trim(), "keepalive", "comment {c:?}");
                keepalives += 1;
            }
            other => panic!("expected a keepalive comment, got {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(5),
        "two keepalives about a second apart: {elapsed:?}"
    );
    assert!(String::from_utf8_lossy(&sse.raw).starts_with(':'));
    // The stream still delivers.
    let id = api.send("idle", &msg(1)).await;
    assert_eq!(sse.event().await.id, Some(id));
}

#[tokio::test]
async fn resume_after_random_drops_delivers_1000_messages_exactly_once_in_order() {
    const N: usize = 1000;
    let server = Server::start_with(
        "[server]\nkeepalive_secs = 1\n[storage]\ndurability = \"interval\"\n[layer]\ncapacity = 2000\n",
    )
    .await;
    let api = Api::new(&server);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());

    let publisher = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(N);
            for n in 0..N {
                ids.push(api.send("resume", &msg(n as u64)).await);
            }
            ids
        })
    };

    let started = Instant::now();
    let mut got: Vec<(u64, u64)> = Vec::with_capacity(N);
    let mut last: Option<String> = None;
    let mut connections = 0;
    while got.len() < N {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "too slow: {} of {N} after {connections} connections",
            got.len()
        );
        let headers: Vec<(&str, &str)> = match &last {
            Some(id) => vec![("last-event-id", id.as_str())],
            None => vec![],
        };
        let mut sse = Sse::open(&api.http, &events_url(&server, "resume"), &headers).await;
        connections += 1;
        let quota = rng.random_range(1..=150);
        for _ in 0..quota {
            let event = sse.event().await;
            assert_eq!(event.event, None, "no gap is expected: {event:?}");
            let n = event.json()["n"].as_u64().expect("n");
            got.push((event.id_num(), n));
            last = event.id.clone();
            if got.len() == N {
                break;
            }
        }
        // Dropping `sse` here drops the connection, possibly with events in flight.
    }
    let ids = within(T, "the publisher", publisher).await.unwrap();
    assert!(connections >= 5, "only {connections} connections");
    let expected: Vec<(u64, u64)> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id_num(id), n as u64))
        .collect();
    if got != expected {
        let dups = got.len() - got.iter().collect::<BTreeSet<_>>().len();
        let first_diff = got.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "the resumed streams did not deliver every message once in order: \
             {dups} duplicates, first difference at {first_diff:?}"
        );
    }
    // Nothing more, nothing pending.
    assert_eq!(api.receive("resume").await, None);
}

#[tokio::test]
async fn last_event_id_works_as_a_query_parameter_on_channel_streams() {
    let server = Server::start_with("[server]\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &events_url(&server, "q"), &[]).await;
    let a = api.send("q", &msg(1)).await;
    let b = api.send("q", &msg(2)).await;
    let c = api.send("q", &msg(3)).await;
    let events = sse.events(3).await;
    assert_eq!(events[2].id.as_deref(), Some(c.as_str()));
    sse.close();
    // Resume after `a`: the delivered b and c are replayed.
    let mut resumed = Sse::open(
        &api.http,
        &server.url(&format!("/v1/channels/q/events?last_event_id={a}")),
        &[],
    )
    .await;
    let replayed = resumed.events(2).await;
    assert_eq!(
        replayed.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        vec![Some(b), Some(c)]
    );
    resumed.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_resuming_stream_closes_earlier_streams_of_the_channel() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut first = Sse::open(&api.http, &events_url(&server, "takeover"), &[]).await;
    let a = api.send("takeover", &msg(1)).await;
    assert_eq!(first.event().await.id.as_deref(), Some(a.as_str()));
    let mut second = Sse::open(
        &api.http,
        &events_url(&server, "takeover"),
        &[("last-event-id", &a)],
    )
    .await;
    match first.until_end(Duration::from_secs(3)).await {
        Ok(items) => assert!(
            items.iter().all(|i| !matches!(i, SseItem::Event(_))),
            "{items:?}"
        ),
        Err(items) => panic!("the earlier stream was not closed: {items:?}"),
    }
    let b = api.send("takeover", &msg(2)).await;
    let event = second.event().await;
    assert_eq!(event.id.as_deref(), Some(b.as_str()), "no duplicate of {a}");
}

#[tokio::test]
async fn resuming_past_the_replay_log_starts_with_a_gap_event() {
    let server = Server::start_with("[layer]\nreplay_capacity = 3\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &events_url(&server, "gappy"), &[]).await;
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(api.send("gappy", &msg(n)).await);
    }
    let events = sse.events(10).await;
    assert_eq!(events[9].id.as_deref(), Some(ids[9].as_str()));
    sse.close();

    // Only the last 3 deliveries are kept: resuming after the 2nd misses 3rd..7th.
    let mut resumed = Sse::open(
        &api.http,
        &events_url(&server, "gappy"),
        &[("last-event-id", &ids[1])],
    )
    .await;
    let gap = resumed.event().await;
    assert_eq!(gap.event.as_deref(), Some("herald.gap"), "{gap:?}");
    assert_eq!(
        gap.data,
        format!(r#"{{"after":"{}","next":"{}"}}"#, ids[1], ids[7])
    );
    let rest = resumed.events(3).await;
    let got: Vec<Option<String>> = rest.iter().map(|e| e.id.clone()).collect();
    assert_eq!(
        got,
        ids[7..]
            .iter()
            .map(|id| Some(id.clone()))
            .collect::<Vec<_>>()
    );
    assert!(rest.iter().all(|e| e.event.is_none()));
    resumed.assert_no_event(Duration::from_millis(300)).await;
    resumed.close();

    // Resuming right at the start of the log: complete, so no gap.
    let mut exact = Sse::open(
        &api.http,
        &events_url(&server, "gappy"),
        &[("last-event-id", &ids[6])],
    )
    .await;
    let first = exact.event().await;
    assert_eq!(first.event, None, "no gap: {first:?}");
    assert_eq!(first.id.as_deref(), Some(ids[7].as_str()));
}

#[tokio::test]
async fn resuming_after_expired_messages_starts_with_a_gap_event() {
    // The replay window outlasts the expiry, so that a sweep between the expiry and the
    // resume cannot forget the channel (and with it what was lost; see the README).
    let server = Server::start_with("[layer]\nexpiry_secs = 1\nreplay_secs = 30\n").await;
    let api = Api::new(&server);
    let first = api.send("fading", &msg(1)).await;
    assert_eq!(api.receive("fading").await.unwrap().0, first);
    let lost = api.send("fading", &msg(2)).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let fresh = api.send("fading", &msg(3)).await;
    assert!(id_num(&lost) < id_num(&fresh));

    let mut sse = Sse::open(
        &api.http,
        &events_url(&server, "fading"),
        &[("last-event-id", &first)],
    )
    .await;
    let gap = sse.event().await;
    assert_eq!(gap.event.as_deref(), Some("herald.gap"));
    assert_eq!(gap.json(), json!({"after": first, "next": fresh}));
    let event = sse.event().await;
    assert_eq!(event.id, Some(fresh));
    assert_eq!(event.json(), msg(3));
}

#[tokio::test]
async fn resuming_after_messages_lost_to_a_forgotten_channel_starts_with_a_gap_event() {
    for restart in [false, true] {
        let (server, first, fresh) =
            lose_a_message_to_a_forgotten_channel("forgotten", restart).await;
        let mut sse = Sse::open(
            &client(),
            &events_url(&server, "forgotten"),
            &[("last-event-id", &first)],
        )
        .await;
        let gap = sse.event().await;
        assert_eq!(
            gap.event.as_deref(),
            Some("herald.gap"),
            "restart: {restart}"
        );
        assert_eq!(gap.json(), json!({"after": first, "next": fresh}));
        let event = sse.event().await;
        assert_eq!(event.id, Some(fresh));
        assert_eq!(event.json(), msg(2));
    }
}

#[tokio::test]
async fn a_group_stream_with_a_channel_gets_messages_sent_while_offline() {
    let server = Server::start_with("[server]\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);
    let url = server.url("/v1/groups/room/events?channel=user.1");
    let mut sse = Sse::open(&api.http, &url, &[]).await;
    assert_eq!(api.members("room").await, vec!["user.1"]);
    assert_eq!(api.group_send("room", &msg(1)).await, (1, 0));
    let online = sse.event().await;
    assert_eq!(online.json(), msg(1));
    sse.close();

    // Offline: the membership stays, the message waits in user.1.
    assert_eq!(api.group_send("room", &msg(2)).await, (1, 0));
    assert_eq!(api.members("room").await, vec!["user.1"]);

    let last = online.id.clone().unwrap();
    let mut again = Sse::open(&api.http, &url, &[("last-event-id", &last)]).await;
    let event = again.event().await;
    assert_eq!(event.json(), msg(2));
    assert!(event.id_num() > online.id_num());
    again.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_group_stream_without_channel_leaves_the_group_when_the_client_goes() {
    let server = Server::start_with("[server]\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &server.url("/v1/groups/eph/events"), &[]).await;
    let members = api.members("eph").await;
    assert_eq!(members.len(), 1, "{members:?}");
    assert!(members[0].starts_with("sse."), "{members:?}");
    assert_eq!(api.group_send("eph", &msg(1)).await, (1, 0));
    assert_eq!(sse.event().await.json(), msg(1));
    sse.close();

    let deadline = Instant::now() + Duration::from_secs(8);
    while !api.members("eph").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the fresh channel is still in the group"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(api.group_send("eph", &msg(2)).await, (0, 0));
    assert_eq!(api.receive(&members[0]).await, None);
}

#[tokio::test]
async fn one_stream_joins_several_groups() {
    let server = Server::start_with("[server]\nkeepalive_secs = 1\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(
        &api.http,
        &server.url("/v1/events?group=alpha&group=beta&channel=multi.1"),
        &[],
    )
    .await;
    assert_eq!(api.members("alpha").await, vec!["multi.1"]);
    assert_eq!(api.members("beta").await, vec!["multi.1"]);
    api.group_send("alpha", &msg(1)).await;
    api.group_send("beta", &msg(2)).await;
    api.send("multi.1", &msg(3)).await;
    api.group_send("gamma", &msg(4)).await;
    let got: Vec<Json> = sse.events(3).await.iter().map(|e| e.json()).collect();
    assert_eq!(got, vec![msg(1), msg(2), msg(3)]);
    sse.assert_no_event(Duration::from_millis(300)).await;
    sse.close();

    // Without channel=: one fresh channel in both groups, gone with the client.
    let mut eph = Sse::open(
        &api.http,
        &server.url("/v1/events?group=left&group=right"),
        &[],
    )
    .await;
    let left = api.members("left").await;
    assert_eq!(left.len(), 1);
    assert_eq!(api.members("right").await, left);
    api.group_send("right", &msg(5)).await;
    assert_eq!(eph.event().await.json(), msg(5));
    eph.close();
    let deadline = Instant::now() + Duration::from_secs(8);
    while !(api.members("left").await.is_empty() && api.members("right").await.is_empty()) {
        assert!(Instant::now() < deadline, "the fresh channel stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn stream_requests_with_bad_parameters_are_refused_with_json_errors() {
    let server = Server::start().await;
    let http = client();
    let cases = [
        ("/v1/events", 400, "invalid_parameter"),
        ("/v1/events?channel=c", 400, "invalid_parameter"),
        ("/v1/events?group=ok&group=b%21d", 400, "invalid_name"),
        ("/v1/groups/b%21d/events", 400, "invalid_name"),
        ("/v1/groups/g/events?channel=%21x", 400, "invalid_name"),
        ("/v1/channels/a%20b/events", 400, "invalid_name"),
        (
            "/v1/groups/g/events?last_event_id=abc",
            400,
            "invalid_parameter",
        ),
    ];
    for (path, status, code) in cases {
        refused(http.get(server.url(path)), status, code).await;
    }
    for bad in ["abc", "-1", "1.5", "99999999999999999999999"] {
        refused(
            http.get(events_url(&server, "c"))
                .header("last-event-id", bad),
            400,
            "invalid_parameter",
        )
        .await;
    }
    // A refused group stream joined nothing.
    let api = Api::new(&server);
    assert_eq!(api.members("g").await, Vec::<String>::new());
    assert_eq!(api.members("ok").await, Vec::<String>::new());
}

#[tokio::test]
async fn competing_streams_on_one_channel_split_the_messages() {
    const N: u64 = 100;
    let server = Server::start_with("[storage]\ndurability = \"interval\"\n").await;
    let api = Api::new(&server);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let http = api.http.clone();
            let url = events_url(&server, "work");
            tokio::spawn(async move {
                let mut sse = Sse::open(&http, &url, &[]).await;
                let mut ids = Vec::new();
                while let Ok(Some(event)) = sse.next_event_within(Duration::from_secs(2)).await {
                    ids.push(event.id_num());
                }
                ids
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sent = BTreeSet::new();
    for n in 0..N {
        sent.insert(id_num(&api.send("work", &msg(n)).await));
    }
    let mut seen = BTreeSet::new();
    for reader in readers {
        let ids = within(T, "a competing reader", reader).await.unwrap();
        assert!(!ids.is_empty(), "each consumer gets a share");
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "each in order: {ids:?}"
        );
        for id in ids {
            assert!(seen.insert(id), "{id} was delivered twice");
        }
    }
    assert_eq!(seen, sent, "together they got every message");
}

#[tokio::test]
async fn a_slow_reader_is_cut_off_and_loses_nothing() {
    const N: usize = 300;
    let server = Server::start_with(
        "[server]\nslow_consumer_secs = 1\nkeepalive_secs = 1\n\
         [storage]\ndurability = \"interval\"\n[layer]\ncapacity = 1000\n",
    )
    .await;
    let api = Api::new(&server);
    let pad = "p".repeat(30_000);
    // Opened, then not read at all while messages pile up.
    let mut slow = Sse::open(&api.http, &events_url(&server, "slow"), &[]).await;
    let mut ids = Vec::with_capacity(N);
    for n in 0..N {
        ids.push(
            api.send("slow", &json!({"type": "big", "n": n, "pad": pad}))
                .await,
        );
    }
    // Longer than slow_consumer_secs without progress.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // What the slow stream still hands over, then its end.
    let items = match slow.until_end(T).await {
        Ok(items) => items,
        Err(items) => panic!(
            "the slow stream was not closed ({} items read)",
            items.len()
        ),
    };
    let first: Vec<SseEvent> = items
        .into_iter()
        .filter_map(|i| match i {
            SseItem::Event(e) => Some(e),
            _ => None,
        })
        .collect();
    eprintln!(
        "the slow stream got {} of {N} before it was closed",
        first.len()
    );
    assert!(
        first.len() < N,
        "the server kept taking messages for a reader that did not read"
    );

    // A resumed stream gets the rest: what was in flight and what stayed queued.
    let last = first
        .last()
        .and_then(|e| e.id.clone())
        .unwrap_or_else(|| "0".to_string());
    let mut resumed = Sse::open(
        &api.http,
        &events_url(&server, "slow"),
        &[("last-event-id", &last)],
    )
    .await;
    let rest = resumed.events(N - first.len()).await;
    let got: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|e| e.id.clone().expect("an id"))
        .collect();
    assert_eq!(got, ids, "every message once, in order");
    for (n, event) in first.iter().chain(&rest).enumerate() {
        assert_eq!(event.json()["n"], n, "the message of {:?}", event.id);
    }
    resumed.assert_no_event(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_reader_that_vanishes_leaves_its_messages_to_receives_and_replay() {
    const N: usize = 200;
    let server = Server::start_with(
        "[server]\nslow_consumer_secs = 1\nkeepalive_secs = 1\n\
         [storage]\ndurability = \"interval\"\n[layer]\ncapacity = 1000\n",
    )
    .await;
    let api = Api::new(&server);
    let pad = "q".repeat(30_000);
    let mut stuck = Sse::open(&api.http, &events_url(&server, "gone"), &[]).await;
    let mut ids = Vec::with_capacity(N);
    for n in 0..N {
        ids.push(
            api.send("gone", &json!({"type": "big", "n": n, "pad": pad}))
                .await,
        );
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stuck.close();

    // Plain receives get what the stream never took...
    let mut queued = api.drain("gone").await;
    assert!(!queued.is_empty(), "messages stayed queued");
    // ...and a stream resuming from the start replays what it took but never showed.
    let mut replay = Sse::open(
        &api.http,
        &events_url(&server, "gone"),
        &[("last-event-id", "0")],
    )
    .await;
    let delivered = N - queued.len();
    let mut got: Vec<String> = replay
        .events(delivered)
        .await
        .into_iter()
        .map(|e| e.id.unwrap())
        .collect();
    got.extend(queued.drain(..).map(|(id, _)| id));
    assert_eq!(got, ids, "nothing lost, nothing twice");
}

#[tokio::test]
async fn at_max_connections_stream_requests_get_a_retry_hint_and_an_immediate_close() {
    let server = Server::start_with("[server]\nmax_connections = 1\n").await;
    let api = Api::new(&server);
    let mut holder = Sse::open(&api.http, &events_url(&server, "held"), &[]).await;
    for path in [
        "/v1/channels/other/events",
        "/v1/groups/g/events?channel=c",
        "/v1/groups/g/events",
        "/v1/events?group=g",
    ] {
        let mut refused = Sse::open(&api.http, &server.url(path), &[]).await;
        let items = match refused.until_end(Duration::from_secs(3)).await {
            Ok(items) => items,
            Err(items) => panic!("{path}: the stream was not closed: {items:?}"),
        };
        assert!(
            items
                .iter()
                .any(|i| matches!(i, SseItem::Retry(ms) if *ms > 0)),
            "{path}: a retry: line in {items:?}"
        );
        assert!(
            !items.iter().any(|i| matches!(i, SseItem::Event(_))),
            "{path}: no events in {items:?}"
        );
    }
    assert_error(api.send_raw("x", &msg(1)).await, 503, "unavailable").await;
    // Every open connection holds a slot: the holder's goes back when it closes.
    holder.close();
    within(T, "the holder's slot to be freed", async {
        while api
            .http
            .get(server.url("/healthz"))
            .send()
            .await
            .map_or(true, |r| r.status() != 200)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        api.members("g").await,
        Vec::<String>::new(),
        "refused streams join nothing"
    );
}

/// Sends `parts` on one fresh connection, pausing between them, and returns the stream.
async fn raw_request(server: &Server, parts: &[&str]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = server.url("").trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    for (n, part) in parts.iter().enumerate() {
        if n > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stream.write_all(part.as_bytes()).await.unwrap();
    }
    stream
}

/// Reads from `stream` until `text` has come (then returns all read so far), the stream
/// ends, or 5 s pass.
async fn read_until(stream: &mut tokio::net::TcpStream, text: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got: Vec<u8> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut buf = [0; 65536];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        // Only the new bytes (and what a match could straddle) need looking at.
        let from = got.len().saturating_sub(text.len());
        got.extend_from_slice(&buf[..n]);
        if got[from..]
            .windows(text.len())
            .any(|w| w == text.as_bytes())
        {
            break;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_stream_that_opens_its_connection_ends_with_it_and_others_are_chunked() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    };
    // First request on its connection, whole in one packet: served directly, the body
    // ends with the connection.
    let mut direct = raw_request(&server, &[&get("/v1/channels/wire/events")]).await;
    let head = read_until(&mut direct, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("content-type: text/event-stream"), "{head}");
    assert!(lower.contains("connection: close\r\n"), "{head}");
    assert!(lower.contains("\r\ndate: "), "{head}");
    assert!(
        !lower.contains("transfer-encoding") && !lower.contains("content-length"),
        "{head}"
    );
    let id = api.send("wire", &msg(1)).await;
    let event = format!("data:{}\nid:{id}\n\n", msg(1));
    let body = read_until(&mut direct, &event).await;
    assert!(
        body.ends_with(&event),
        "exactly the event, unframed: {body:?}"
    );
    // After another request on a kept-alive connection: hyper's chunked framing.
    let mut reused = raw_request(
        &server,
        &[
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            &get("/v1/channels/wire/events"),
        ],
    )
    .await;
    let heads = read_until(&mut reused, "transfer-encoding: chunked\r\n").await;
    let stream_head = heads.split("HTTP/1.1 ").nth(2).expect("two responses");
    assert!(stream_head.starts_with("200 OK\r\n"), "{heads}");
    assert!(stream_head.contains("text/event-stream"), "{heads}");
    assert!(
        stream_head.contains("transfer-encoding: chunked\r\n"),
        "{heads}"
    );
    // The two streams compete for the channel's messages: one each.
    let (a, b) = (
        api.send("wire", &msg(2)).await,
        api.send("wire", &msg(3)).await,
    );
    let (to_direct, to_reused) = (
        read_until(&mut direct, "\n\n").await,
        read_until(&mut reused, "\n\n").await,
    );
    let has = |text: &str, id: &str| text.contains(&format!("id:{id}\n"));
    assert!(
        (has(&to_direct, &a) && has(&to_reused, &b))
            || (has(&to_direct, &b) && has(&to_reused, &a)),
        "{to_direct:?} / {to_reused:?}"
    );
}

#[tokio::test]
async fn a_stream_request_that_comes_in_pieces_is_served_too() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let mut stream = raw_request(
        &server,
        &[
            "GET /v1/channels/pieces/ev",
            "ents HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            "\r\n",
        ],
    )
    .await;
    let head = read_until(&mut stream, "\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let id = api.send("pieces", &msg(1)).await;
    let body = read_until(&mut stream, &format!("id:{id}\n\n")).await;
    assert!(body.contains(&msg(1).to_string()), "{body}");
}

#[tokio::test]
async fn a_request_pipelined_behind_a_stream_request_is_answered_in_turn() {
    let server = Server::start().await;
    // A refused stream request (its answer has a length) with a second request behind it
    // in the same packet: both are answered, in order.
    let mut stream = raw_request(
        &server,
        &["GET /v1/channels/bad%20name/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
    )
    .await;
    let responses = read_until(&mut stream, "\"ok\"").await;
    let mut statuses = responses.split("HTTP/1.1 ").skip(1);
    let refused = statuses.next().expect("the stream request's answer");
    assert!(refused.starts_with("400 Bad Request\r\n"), "{responses}");
    assert!(refused.contains("invalid_name"), "{responses}");
    let health = statuses.next().expect("the pipelined request's answer");
    assert!(health.starts_with("200 OK\r\n"), "{responses}");
}

#[tokio::test]
async fn a_refused_stream_on_its_own_connection_gets_a_json_error_with_its_length() {
    let server = Server::start().await;
    let mut stream = raw_request(
        &server,
        &["GET /v1/channels/bad%20name/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
    )
    .await;
    let response = read_until(&mut stream, "\u{0}never").await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    let length = format!("content-length: {}", body.len());
    assert!(
        head.to_ascii_lowercase().contains(&length),
        "{head} / {body}"
    );
    let error: Json = serde_json::from_str(body).unwrap();
    assert_eq!(error["error"]["code"], "invalid_name", "{body}");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_frees_its_slot() {
    let server = Server::start_with(
        "[server]\nslow_consumer_secs = 1\nmax_connections = 3\n\
         [storage]\ndurability = \"interval\"\n[layer]\ncapacity = 1000\n",
    )
    .await;
    let api = Api::new(&server);
    // A stream that is never read: its socket buffers fill and the server's write stalls.
    let mut stuck = raw_request(
        &server,
        &["GET /v1/channels/stuck/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"],
    )
    .await;
    let pad = "p".repeat(30_000);
    for n in 0..400 {
        api.send("stuck", &json!({"type": "big", "n": n, "pad": pad}))
            .await;
    }
    // The third slot, held (the second is the sender's keep-alive connection): the
    // stalled stream holds the last one until it is closed.
    let mut holder = Sse::open(&api.http, &events_url(&server, "held"), &[]).await;
    // Within 4 × slow_consumer_secs of stalling, the connection is closed and its slot
    // is free.
    within(
        Duration::from_secs(10),
        "the stalled stream's slot to be freed",
        async {
            loop {
                // A new connection each time, which needs a free slot.
                let response = client()
                    .get(api.url("/v1/channels/x/messages"))
                    .send()
                    .await;
                if response.is_ok_and(|r| r.status() == 204) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        },
    )
    .await;
    // The stalled client finds the events it was sent, then the end of its connection.
    let rest = read_until(&mut stuck, "\u{0}never").await;
    assert!(
        rest.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        &rest[..200.min(rest.len())]
    );
    assert!(rest.contains("data:{"), "events before the end");
    holder.close();
}

#[tokio::test]
async fn the_largest_time_settings_still_serve_streams() {
    let server =
        Server::start_with("[server]\nslow_consumer_secs = 86400\nkeepalive_secs = 86400\n").await;
    let api = Api::new(&server);
    let mut sse = Sse::open(&api.http, &events_url(&server, "far"), &[]).await;
    let id = api.send("far", &msg(1)).await;
    let event = sse.event().await;
    assert_eq!(event.id.as_deref(), Some(id.as_str()));
    api.assert_healthy().await;
}
