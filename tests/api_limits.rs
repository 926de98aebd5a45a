//! Resource limits against a real server: each probe gets its documented answer while a
//! victim client keeps working (its requests succeed, quickly), and what was stored
//! stays intact. Every probe is bounded in count and time.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A victim's request must take at most this long while a probe runs.
const VICTIM_P99: Duration = Duration::from_millis(100);

/// Sends and receives `rounds` messages on `channel`, and returns its latencies'
/// 99th percentile (after a first round that may open the connection).
async fn victim_p99(api: &Api, channel: &str, rounds: u64) -> Duration {
    let mut took = Vec::new();
    for n in 0..=rounds {
        let start = Instant::now();
        let id = api.send(channel, &msg(n)).await;
        assert_eq!(api.receive(channel).await, Some((id, msg(n))));
        if n > 0 {
            took.push(start.elapsed());
        }
    }
    took.sort();
    took[(took.len() * 99 / 100).min(took.len() - 1)]
}

/// Probes run one at a time, so that a victim's latency is its probe's doing and not
/// another test's.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A server for one probe, with `config`, once no other probe runs. Its writes are
/// flushed on an interval: the victims measure what the probe costs them, not the
/// disk's fsync latency.
async fn start(config: &str) -> (tokio::sync::MutexGuard<'static, ()>, Server) {
    let turn = ONE_AT_A_TIME.lock().await;
    let config = format!("{config}\n[storage]\ndurability = \"interval\"\n");
    (turn, Server::start_with(&config).await)
}

/// The server's address.
fn addr(server: &Server) -> SocketAddr {
    server
        .url("")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("a socket address")
}

/// A connection to the server from the loopback address `from` (127.0.0.x: each is
/// another client).
async fn connect_from(server: &Server, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{from}:0").parse().unwrap())
        .expect("binding a loopback source address");
    within(T, "connecting", socket.connect(addr(server)))
        .await
        .expect("connecting")
}

/// Everything the server sends on `stream` until it closes it (or `t` passes).
async fn read_to_close(stream: &mut TcpStream, t: Duration) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(t, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a raw HTTP answer.
fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

#[tokio::test]
async fn counts_past_their_limits_get_429_limit_reached_naming_the_key_and_change_nothing() {
    let (_one_at_a_time, server) = start(
        "[limits]\nmax_channels = 3\nmax_memberships = 2\n\
         max_subscriptions_per_connection = 2\nmax_groups_per_stream = 2\n",
    )
    .await;
    let api = Api::new(&server);
    let kept = api.send("c.1", &msg(1)).await;
    api.send("c.2", &msg(2)).await;
    api.send("c.3", &msg(3)).await;
    let error = assert_error(api.send_raw("c.4", &msg(4)).await, 429, "limit_reached").await;
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_channels"),
        "{error}"
    );
    api.send("c.1", &msg(5)).await;
    assert_eq!(
        api.receive("c.4").await,
        None,
        "the refused send stored nothing"
    );
    assert_eq!(api.receive("c.1").await, Some((kept, msg(1))));

    api.group_add("g", "c.1").await;
    api.group_add("g", "c.2").await;
    let error = refused(
        api.http.put(api.url("/v1/groups/g/channels/c.3")),
        429,
        "limit_reached",
    )
    .await;
    assert!(
        error.to_string().contains("limits.max_memberships"),
        "{error}"
    );
    api.group_add("g", "c.1").await; // renewing a membership is no new one
    assert_eq!(api.members("g").await, vec!["c.1", "c.2"]);

    api.drain("c.1").await;
    api.drain("c.2").await;
    let mut ws = Ws::connect(&server).await;
    for channel in ["c.1", "c.2"] {
        let ok = ws
            .call(json!({"op": "subscribe", "channel": channel}))
            .await;
        assert_eq!(ok["op"], "ok", "{ok}");
    }
    let error = ws.call(json!({"op": "subscribe", "channel": "c.3"})).await;
    assert_eq!(error["code"], "limit_reached", "{error}");
    let again = ws.call(json!({"op": "subscribe", "channel": "c.2"})).await;
    assert_eq!(
        again["op"], "ok",
        "subscribing again to a channel held: {again}"
    );

    let too_many = Sse::open_any(
        &api.http,
        &server.url("/v1/events?group=a&group=b&group=c"),
        &[],
    )
    .await;
    assert_eq!(too_many.status, 429);
    assert_eq!(
        api.members("c").await,
        Vec::<String>::new(),
        "nothing joined"
    );
    api.drain("c.3").await;
    let p99 = victim_p99(&api, "c.3", 20).await;
    assert!(p99 <= VICTIM_P99, "victim p99 {p99:?}");
}

#[tokio::test]
async fn a_client_past_its_publish_rate_gets_429_with_retry_after_and_other_clients_do_not() {
    let (_one_at_a_time, server) = start(
        "[limits]\npublish_rate_per_sec = 1\npublish_burst = 3\n\
         [auth]\ndefault_access = \"all\"\n\
         [[auth.tokens]]\nname = \"other\"\n\
         hash = \"sha256:a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3\"\n\
         publish = [\"*\"]\nsubscribe = [\"*\"]\n",
    )
    .await;
    let api = Api::new(&server);
    for n in 0..3 {
        api.send("rated", &msg(n)).await;
    }
    let response = api.send_raw("rated", &msg(3)).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After: {retry_after}");
    assert_error(response, 429, "rate_limited").await;
    refused(
        api.http
            .post(api.url("/v1/groups/g/messages"))
            .json(&msg(4)),
        429,
        "rate_limited",
    )
    .await;
    // Another client (a token, "123") has its own bucket; reads are not rated.
    let other = Api::with_token(&server, "123");
    other.send("rated", &msg(5)).await;
    assert_eq!(
        api.drain("rated").await.len(),
        4,
        "the refused publishes stored nothing"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    api.send("rated", &msg(6)).await;
}

#[tokio::test]
async fn a_head_or_body_that_does_not_come_in_time_gets_408_and_the_connection_closes() {
    let (_one_at_a_time, server) = start("[server]\nrequest_timeout_secs = 1\n").await;
    let api = Api::new(&server);
    let id = api.send("kept", &msg(1)).await;
    let started = Instant::now();
    let mut head = connect_from(&server, "127.0.0.1").await;
    head.write_all(b"POST /v1/channels/slow/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let mut body = connect_from(&server, "127.0.0.1").await;
    body.write_all(
        b"POST /v1/channels/slow/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"type\":",
    )
    .await
    .unwrap();
    let p99 = victim_p99(&api, "victim.live", 20).await;
    for (what, stream) in [("head", &mut head), ("body", &mut body)] {
        let answer = read_to_close(stream, Duration::from_secs(5)).await;
        assert_eq!(status_of(&answer), 408, "{what}: {answer}");
        assert!(answer.contains("\"request_timeout\""), "{what}: {answer}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(p99 <= VICTIM_P99, "victim p99 {p99:?}");
    assert_eq!(api.receive("slow").await, None);
    assert_eq!(api.receive("kept").await, Some((id, msg(1))));
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let (_one_at_a_time, server) = start("[server]\nidle_timeout_secs = 1\n").await;
    let started = Instant::now();
    let mut silent = connect_from(&server, "127.0.0.1").await;
    let mut kept_alive = connect_from(&server, "127.0.0.1").await;
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut kept_alive, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(read_to_close(&mut silent, Duration::from_secs(5)).await, "");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn connections_take_their_slot_at_accept_and_past_the_limits_are_answered_and_closed() {
    let (_one_at_a_time, server) =
        start("[server]\nmax_connections = 6\n[limits]\nmax_connections_per_client = 3\n").await;
    // One client (127.0.0.2) holds its 3 connections, idle, sending nothing.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(connect_from(&server, "127.0.0.2").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut fourth = connect_from(&server, "127.0.0.2").await;
    fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut fourth, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 429, "{answer}");
    assert!(answer.contains("\"rate_limited\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );

    // Others are served meanwhile; then a second client fills the server.
    let victim = Api::new(&server);
    let p99 = victim_p99(&victim, "victim.live", 20).await;
    assert!(p99 <= VICTIM_P99, "victim p99 {p99:?}");
    for _ in 0..2 {
        idle.push(connect_from(&server, "127.0.0.3").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut full = connect_from(&server, "127.0.0.4").await;
    full.write_all(
        b"POST /v1/channels/x/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut full, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert!(answer.contains("\"unavailable\""), "{answer}");
    let mut stream = connect_from(&server, "127.0.0.4").await;
    stream
        .write_all(b"GET /v1/channels/x/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(
        answer.contains("\nretry:"),
        "an EventSource retry hint: {answer}"
    );

    // A closed connection gives its slot back at once.
    drop(idle.pop());
    let deadline = Instant::now() + T;
    loop {
        let ok = client().get(server.url("/healthz")).send().await;
        if ok.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        victim.receive("x").await,
        None,
        "the refused publish stored nothing"
    );
}

#[tokio::test]
async fn a_websocket_client_that_never_reads_is_closed_with_1008_at_its_write_budget() {
    let (_one_at_a_time, server) =
        start("[server]\nslow_consumer_secs = 1\n[limits]\nmax_write_buffer_bytes = 65536\n").await;
    let api = Api::new(&server);
    let mut ws = Ws::connect(&server).await;
    let pad = "p".repeat(16 * 1024);
    // Requests whose answers are never read: each echo (an error frame quoting the
    // reference) is queued for the client until the budget is spent.
    let mut sent = 0;
    for n in 0..5_000 {
        let frame = json!({"op": "nope", "ref": format!("{n}{pad}")}).to_string();
        let request = WsFrame::text(frame);
        match tokio::time::timeout(Duration::from_secs(2), ws.stream.send(request)).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    assert!(sent > 4, "only {sent} requests went out");
    let mut code = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match ws.next_within(Duration::from_secs(5)).await {
            Ok(WsIn::Close(c, _)) => {
                code = Some(c);
                break;
            }
            Ok(WsIn::End) | Err(()) => break,
            Ok(_) => {}
        }
    }
    assert_eq!(code, Some(1008), "closed for not reading");
    api.assert_healthy().await;
    let p99 = victim_p99(&api, "victim.live", 20).await;
    assert!(p99 <= VICTIM_P99, "victim p99 {p99:?}");
}

#[tokio::test]
async fn a_resume_id_above_every_assigned_id_is_refused_and_errors_quote_little() {
    let (_one_at_a_time, server) = start("").await;
    let api = Api::new(&server);
    let id = api.send("resumed", &msg(1)).await;
    let future = (id_num(&id) + 1_000_000).to_string();
    for value in [u64::MAX.to_string(), future.clone()] {
        let sse = Sse::open_any(
            &api.http,
            &server.url("/v1/channels/resumed/events"),
            &[("last-event-id", value.as_str())],
        )
        .await;
        assert_eq!(sse.status, 400, "{value}");
        refused(
            api.http.get(server.url(&format!(
                "/v1/groups/g/events?channel=resumed&last_event_id={value}"
            ))),
            400,
            "invalid_last_event_id",
        )
        .await;
    }
    assert_eq!(
        api.members("g").await,
        Vec::<String>::new(),
        "nothing joined"
    );
    let mut ws = Ws::connect(&server).await;
    let reply = ws
        .call(json!({"op": "subscribe", "channel": "resumed", "last_event_id": future}))
        .await;
    assert_eq!(reply["code"], "invalid_last_event_id", "{reply}");
    // The id just received is a fine resume point.
    let mut sse = Sse::open(
        &api.http,
        &server.url("/v1/channels/resumed/events"),
        &[("last-event-id", id.as_str())],
    )
    .await;
    let id2 = api.send("resumed", &msg(2)).await;
    assert_eq!(sse.event().await.id.as_deref(), Some(id2.as_str()));

    let huge = "9".repeat(100_000);
    let error = refused(
        api.http
            .get(server.url("/v1/channels/resumed/events"))
            .header("last-event-id", huge),
        400,
        "invalid_parameter",
    )
    .await;
    assert!(error.to_string().len() < 400, "{error}");
}

/// Every numeric key with the range a start must take (log-uniform within it): the
/// documented range, raised at the bottom where one request of the test would not fit.
const KEY_RANGES: &[(&str, &str, u64, u64)] = &[
    ("server", "max_wait_secs", 1, 86_400),
    ("server", "keepalive_secs", 1, 86_400),
    ("server", "slow_consumer_secs", 1, 86_400),
    ("server", "max_connections", 2, 1 << 20),
    ("server", "shutdown_timeout_secs", 1, 86_400),
    ("server", "idle_timeout_secs", 2, 86_400),
    ("server", "request_timeout_secs", 2, 3_600),
    ("storage", "flush_interval_ms", 1, 86_400_000),
    ("storage", "sweep_interval_ms", 1, 86_400_000),
    ("layer", "expiry_secs", 10, 315_360_000),
    ("layer", "group_expiry_secs", 10, 315_360_000),
    ("layer", "capacity", 1, i64::MAX as u64),
    ("layer", "max_message_bytes", 1024, 64 << 20),
    ("layer", "replay_secs", 0, 315_360_000),
    ("layer", "replay_capacity", 0, i64::MAX as u64),
    ("limits", "max_connections_per_client", 2, i64::MAX as u64),
    ("limits", "publish_rate_per_sec", 1, u32::MAX as u64),
    ("limits", "publish_burst", 2, u32::MAX as u64),
    ("limits", "max_write_buffer_bytes", 1, 1 << 30),
    ("limits", "max_channels", 2, i64::MAX as u64),
    ("limits", "max_memberships", 1, i64::MAX as u64),
    (
        "limits",
        "max_subscriptions_per_connection",
        1,
        i64::MAX as u64,
    ),
    ("limits", "max_groups_per_stream", 1, i64::MAX as u64),
];

#[tokio::test]
async fn random_settings_in_range_start_serve_and_stop_cleanly() {
    use rand::{Rng, SeedableRng};
    let seed = seed_from_env("HERALD_SETTINGS_SEED");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let _one_at_a_time = ONE_AT_A_TIME.lock().await;
    for round in 0..4 {
        let mut config = String::new();
        let mut section = "";
        for &(in_section, key, low, high) in KEY_RANGES {
            if in_section != section {
                config.push_str(&format!("[{in_section}]\n"));
                section = in_section;
            }
            let bits = rng.random_range((low.max(1) as f64).log2()..=(high as f64).log2());
            let value = (2f64.powf(bits) as u64).clamp(low, high);
            let value = if rng.random_bool(0.2) { high } else { value };
            config.push_str(&format!("{key} = {value}\n"));
        }
        let what = format!("seed {seed} (HERALD_SETTINGS_SEED), round {round}:\n{config}");
        let mut server = Server::start_with(&config).await;
        let api = Api::new(&server);
        api.assert_healthy().await;
        let id = api.send("random.settings", &msg(1)).await;
        assert_eq!(
            api.receive("random.settings").await,
            Some((id, msg(1))),
            "{what}"
        );
        api.group_add("random", "random.settings").await;
        assert_eq!(
            api.members("random").await,
            vec!["random.settings"],
            "{what}"
        );
        let status = server.shutdown(T).await;
        assert!(
            status.success(),
            "{what}\nexit {status:?}\n{}",
            server.log()
        );
    }
}

/// The server's peak resident memory so far, in bytes.
fn peak_rss(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

/// After 8 clients sent hostile bodies of `limit` bytes: the peak RSS grew from `before`
/// by at most 4 × the body and 1 MiB for each of the 8 in flight, and the victim kept
/// its latency.
fn assert_hostile_bodies_bounded(server: &Server, before: u64, limit: usize, p99: Duration) {
    let grew = peak_rss(server).saturating_sub(before);
    let bound = 8 * (4 * limit as u64 + (1 << 20));
    assert!(
        grew <= bound,
        "peak RSS grew by {grew} bytes (bound {bound})"
    );
    assert!(p99 <= VICTIM_P99, "victim p99 {p99:?}");
}

#[tokio::test]
async fn hostile_bodies_are_decoded_in_bounded_memory_while_others_are_served() {
    let (_one_at_a_time, server) = start("").await;
    let api = Api::new(&server);
    let id = api.send("kept", &msg(1)).await;
    // The largest bodies a default server reads (2 MiB + 64 KiB): a msgpack map holding
    // an array of nils, and a JSON array of zeros, each one value per byte or two.
    let limit = 2 * 1024 * 1024 + 64 * 1024;
    let mut msgpack = b"\x82\xa4type\xa1x\xa1a\xdd".to_vec();
    let nils = limit - msgpack.len() - 4;
    msgpack.extend_from_slice(&(nils as u32).to_be_bytes());
    msgpack.resize(limit, 0xc0);
    let mut json = br#"{"type":"x","a":[0"#.to_vec();
    while json.len() < limit - 3 {
        json.extend_from_slice(b",0");
    }
    json.extend_from_slice(b"]}");
    let before = peak_rss(&server);
    let mut uploads = Vec::new();
    for n in 0..8 {
        let (body, content_type) = if n % 2 == 0 {
            (msgpack.clone(), "application/msgpack")
        } else {
            (json.clone(), "application/json")
        };
        let http = client();
        let url = server.url("/v1/channels/hostile/messages");
        uploads.push(tokio::spawn(async move {
            for _ in 0..4 {
                let response = http
                    .post(&url)
                    .header("content-type", content_type)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    response.status(),
                    413,
                    "over max_message_bytes once decoded"
                );
            }
        }));
    }
    let p99 = victim_p99(&api, "victim.live", 20).await;
    for upload in uploads {
        upload.await.unwrap();
    }
    assert_hostile_bodies_bounded(&server, before, limit, p99);
    assert_eq!(api.receive("hostile").await, None);
    assert_eq!(api.receive("kept").await, Some((id, msg(1))));
}

#[tokio::test]
async fn backups_stream_in_bounded_memory_without_stalling_sends() {
    let (_one_at_a_time, server) = start("[layer]\ncapacity = 1000\n").await;
    let api = Api::new(&server);
    // 200 messages of 64 KiB: each dump is about 17 MB.
    let filler = "x".repeat(64 * 1024);
    for n in 0..200 {
        api.send("bulk", &json!({"type": "bulk", "n": n, "filler": filler}))
            .await;
    }
    let before = peak_rss(&server);
    let mut backups = Vec::new();
    for _ in 0..8 {
        let request = api.http.get(api.url("/v1/admin/backup"));
        backups.push(tokio::spawn(async move {
            let mut response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let (mut bytes, mut tail) = (0, Vec::new());
            // A slow reader: the server reads its snapshot only as fast as this.
            while let Some(chunk) = response.chunk().await.unwrap() {
                bytes += chunk.len();
                tail.extend_from_slice(&chunk);
                tail.drain(..tail.len().saturating_sub(256));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (bytes, String::from_utf8_lossy(&tail).into_owned())
        }));
    }
    let p99 = victim_p99(&api, "victim.backup", 50).await;
    for backup in backups {
        let (bytes, tail) = within(T * 6, "a backup", backup).await.unwrap();
        assert!(bytes > 17_000_000, "{bytes} bytes");
        let end = tail.lines().last().unwrap();
        assert!(end.contains(r#""kind":"end","messages":2"#), "{end}");
    }
    let grew = peak_rss(&server).saturating_sub(before);
    // The 8 dumps together are 8 × 17 MB: held in memory, they would be past this.
    let bound = 48 << 20;
    assert!(
        grew <= bound,
        "peak RSS grew by {grew} bytes (bound {bound})"
    );
    assert!(p99 <= VICTIM_P99, "victim p99 {p99:?}");
    assert_eq!(api.drain("bulk").await.len(), 200);
}

#[tokio::test]
async fn hostile_websocket_frames_are_decoded_in_bounded_memory() {
    let (_one_at_a_time, server) = start("").await;
    let api = Api::new(&server);
    // A send whose message is a map holding an array of nils, the largest frame a
    // default server reads; and its JSON form, an array of zeros.
    let limit = 2 * 1024 * 1024 + 64 * 1024;
    let mut msgpack =
        b"\x83\xa2op\xa4send\xa7channel\xa7hostile\xa7message\x82\xa4type\xa1x\xa1a\xdd".to_vec();
    let nils = limit - msgpack.len() - 4;
    msgpack.extend_from_slice(&(nils as u32).to_be_bytes());
    msgpack.resize(limit, 0xc0);
    let mut json = br#"{"op":"send","channel":"hostile","message":{"type":"x","a":[0"#.to_vec();
    while json.len() < limit - 4 {
        json.extend_from_slice(b",0");
    }
    json.extend_from_slice(b"]}}");
    let before = peak_rss(&server);
    let mut clients = Vec::new();
    for n in 0..8 {
        let frame = if n % 2 == 0 {
            WsFrame::binary(msgpack.clone())
        } else {
            WsFrame::text(String::from_utf8(json.clone()).unwrap())
        };
        let mut ws = Ws::connect(&server).await;
        clients.push(tokio::spawn(async move {
            for _ in 0..4 {
                ws.send_frame(frame.clone()).await;
                let reply = format!("{:?}", ws.next().await);
                assert!(reply.contains("message_too_large"), "{reply}");
            }
        }));
    }
    let p99 = victim_p99(&api, "victim.ws", 20).await;
    for client in clients {
        within(T * 4, "a hostile client", client).await.unwrap();
    }
    assert_hostile_bodies_bounded(&server, before, limit, p99);
    assert_eq!(api.receive("hostile").await, None);
}
