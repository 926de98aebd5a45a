//! Operating the real server: Prometheus metrics counted exactly, `/metrics` access,
//! readiness while starting and draining, JSON logs, the token listing and the
//! channel listing's capacities.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value as Json, json};
use tokio::io::AsyncWriteExt;

/// The value of the sample `name` (with its labels, as written) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("sample {name}: {e}"))
}

async fn metrics_text(http: &reqwest::Client, url: &str) -> String {
    let response = fetch(http.get(url)).await;
    assert_eq!(response.status(), 200, "GET {url}");
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

/// Polls `/metrics` until `name` reads `want`, for up to 10 s; returns the last text.
async fn metrics_until(server: &Server, name: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics_text(&client(), &server.url("/metrics")).await;
        if sample(&text, name) == want || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_what_was_published_delivered_expired_and_refused() {
    let server = Server::start_with(
        "[storage]\nsweep_interval_ms = 100\n\
         [layer.channel_expiry]\n\"short.*\" = 1\n\
         [layer.channel_capacity]\n\"tiny\" = 1\n",
    )
    .await;
    let api = Api::new(&server);
    let before = metrics_text(&client(), &server.url("/metrics")).await;
    assert_eq!(
        sample(
            &before,
            r#"herald_requests_refused_total{code="storage_full"}"#
        ),
        0.0,
        "every code is there from the start"
    );

    // 3 HTTP sends, 1 HTTP group send; 2 HTTP receives.
    for n in 0..3 {
        api.send("m.a", &msg(n)).await;
    }
    api.group_send("nobody", &msg(0)).await;
    assert!(api.receive("m.a").await.is_some());
    assert!(api.receive("m.a").await.is_some());
    // 2 WebSocket sends, 1 group send, 1 receive.
    let mut ws = Ws::connect(&server).await;
    for n in 0..2 {
        let reply = ws
            .call(json!({"op": "send", "channel": "m.a", "message": msg(n)}))
            .await;
        assert_eq!(reply["op"], "ok", "{reply}");
    }
    let reply = ws
        .call(json!({"op": "group_send", "group": "nobody", "message": msg(0)}))
        .await;
    assert_eq!(reply["op"], "ok", "{reply}");
    let reply = ws.call(json!({"op": "receive", "channel": "m.a"})).await;
    assert_eq!(reply["op"], "message", "{reply}");
    // An SSE stream takes 2.
    let mut sse = Sse::open(&client(), &server.url("/v1/channels/m.s/events"), &[]).await;
    api.send("m.s", &msg(1)).await;
    api.send("m.s", &msg(2)).await;
    sse.events(2).await;
    // 4 expire unreceived.
    for n in 0..4 {
        api.send("short.x", &msg(n)).await;
    }
    // Refusals: 2 invalid names over HTTP and 1 over WebSocket, 1 unknown path, 1 full
    // channel (after 1 send that fits).
    for _ in 0..2 {
        refused(
            client()
                .post(server.url("/v1/channels/bad%20name/messages"))
                .json(&msg(0)),
            400,
            "invalid_name",
        )
        .await;
    }
    let reply = ws
        .call(json!({"op": "send", "channel": "bad name", "message": msg(0)}))
        .await;
    assert_eq!(reply["code"], "invalid_name", "{reply}");
    refused(client().get(server.url("/v1/nowhere")), 404, "not_found").await;
    api.send("tiny", &msg(0)).await;
    refused(
        client()
            .post(server.url("/v1/channels/tiny/messages"))
            .json(&msg(1)),
        429,
        "channel_full",
    )
    .await;

    let text = metrics_until(&server, "herald_messages_expired_total", 4.0).await;
    let sends = 3 + 2 + 2 + 4 + 1;
    let figures = [
        (
            r#"herald_messages_published_total{op="send"}"#,
            sends as f64,
        ),
        (r#"herald_messages_published_total{op="group_send"}"#, 2.0),
        (r#"herald_deliveries_total{transport="http"}"#, 2.0),
        (r#"herald_deliveries_total{transport="ws"}"#, 1.0),
        (r#"herald_deliveries_total{transport="sse"}"#, 2.0),
        ("herald_messages_expired_total", 4.0),
        (r#"herald_requests_refused_total{code="invalid_name"}"#, 3.0),
        (r#"herald_requests_refused_total{code="not_found"}"#, 1.0),
        (r#"herald_requests_refused_total{code="channel_full"}"#, 1.0),
        (r#"herald_requests_refused_total{code="forbidden"}"#, 0.0),
        (r#"herald_connections{transport="sse"}"#, 1.0),
        (r#"herald_connections{transport="ws"}"#, 1.0),
        ("herald_subscriptions", 1.0),
        // m.a holds 5 - 3 taken, tiny 1; short.x expired.
        ("herald_pending_messages", 3.0),
        ("herald_channels", 2.0),
        ("herald_publish_duration_seconds_count", (sends + 2) as f64),
    ];
    for (name, want) in figures {
        assert_eq!(sample(&text, name), want, "{name} in:\n{text}");
    }
    assert!(sample(&text, "herald_disk_bytes") > 0.0);
    assert!(sample(&text, "herald_flush_duration_seconds_count") >= 1.0);
    assert!(sample(&text, "herald_flush_batch_size_sum") >= 1.0);
    assert!(text.contains(r#"herald_publish_duration_seconds_bucket{le="+Inf"}"#));

    // /v1/stats reads the same counters.
    let (status, stats) = json_of(fetch(client().get(server.url("/v1/stats"))).await).await;
    assert_eq!(status, 200);
    let stats = &stats["stats"];
    assert_eq!(stats["published"], json!({"send": sends, "group_send": 2}));
    assert_eq!(stats["deliveries"], json!({"http": 2, "sse": 2, "ws": 1}));
    assert_eq!(stats["connections"]["sse"], 1);
    assert_eq!(stats["connections"]["ws"], 1);
    assert_eq!(stats["subscriptions"], 1);

    // Streams that end are no longer counted.
    sse.close();
    drop(ws);
    let text = metrics_until(&server, "herald_subscriptions", 0.0).await;
    assert_eq!(sample(&text, "herald_subscriptions"), 0.0);
    let text = metrics_until(&server, r#"herald_connections{transport="ws"}"#, 0.0).await;
    assert_eq!(sample(&text, r#"herald_connections{transport="sse"}"#), 0.0);
    assert_eq!(sample(&text, r#"herald_connections{transport="ws"}"#), 0.0);
}

const ADMIN: &str = "hrld_ops-admin";
const PUBLISHER: &str = "hrld_ops-publisher";

fn tokens_config() -> String {
    format!(
        r#"[auth]
default_access = "none"
jwt_secret = "a-secret"

[[auth.tokens]]
name = "ops"
hash = "{}"
admin = true

[[auth.tokens]]
name = "ci"
hash = "{}"
publish = ["group:*"]
expires = "2099-01-01T00:00:00Z"
"#,
        token_hash(ADMIN),
        token_hash(PUBLISHER)
    )
}

#[tokio::test]
async fn metrics_need_an_admin_token_except_on_metrics_listen() {
    let port = free_port();
    let config = format!(
        "[server]\nmetrics_listen = \"127.0.0.1:{port}\"\n{}",
        tokens_config()
    );
    let server = Server::start_with(&config).await;
    refused(client().get(server.url("/metrics")), 401, "unauthorized").await;
    refused(
        client_with_token(PUBLISHER).get(server.url("/metrics")),
        403,
        "forbidden",
    )
    .await;
    let text = metrics_text(&client_with_token(ADMIN), &server.url("/metrics")).await;
    assert_eq!(
        sample(
            &text,
            r#"herald_requests_refused_total{code="unauthorized"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&text, r#"herald_requests_refused_total{code="forbidden"}"#),
        1.0
    );

    let open = format!("http://127.0.0.1:{port}");
    let text = metrics_text(&client(), &format!("{open}/metrics")).await;
    assert!(text.contains("herald_pending_messages"));
    let (status, body) = json_of(fetch(client().get(format!("{open}/readyz"))).await).await;
    assert_eq!((status, body), (200, json!({"status": "ready"})));
    // Only the metrics and the probes are served there.
    refused(client().get(format!("{open}/v1/stats")), 404, "not_found").await;
}

#[tokio::test]
async fn the_token_listing_shows_names_and_permissions_never_hashes() {
    let server = Server::start_with(&tokens_config()).await;
    refused(
        client_with_token(PUBLISHER).get(server.url("/v1/admin/tokens")),
        403,
        "forbidden",
    )
    .await;
    let response = fetch(client_with_token(ADMIN).get(server.url("/v1/admin/tokens"))).await;
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "tokens": [
                {"name": "ops", "publish": [], "subscribe": [], "admin": true},
                {"name": "ci", "publish": ["group:*"], "subscribe": [], "admin": false,
                 "expires": "2099-01-01T00:00:00Z"},
            ],
            "default_access": "none",
            "jwt": true,
        })
    );
    assert!(!body.to_string().contains("sha256"));
}

#[tokio::test]
async fn channel_listings_show_each_channels_capacity() {
    let server =
        Server::start_with("[layer]\ncapacity = 50\n[layer.channel_capacity]\n\"big.*\" = 500\n")
            .await;
    let api = Api::new(&server);
    api.send("big.one", &msg(0)).await;
    api.send("small", &msg(0)).await;
    let (status, page) = json_of(fetch(client().get(server.url("/v1/channels"))).await).await;
    assert_eq!(status, 200);
    assert_eq!(
        page["channels"],
        json!([
            {"name": "big.one", "pending": 1, "capacity": 500, "receivers_waiting": 0},
            {"name": "small", "pending": 1, "capacity": 50, "receivers_waiting": 0},
        ])
    );
}

/// A dump of `n` messages spread over 1000 channels, sent now.
fn big_dump(n: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut text = json!({"kind": "header", "herald_dump": 2, "format_version": 2,
                          "created_at_ms": now, "next_id": n + 10})
    .to_string();
    text.push('\n');
    for i in 0..n {
        let line = json!({"kind": "message", "id": i + 2, "sent_at_ms": now,
                          "channel": format!("c.{}", i % 1000), "body": "gqR0eXBloWGhbgE="});
        text.push_str(&line.to_string());
        text.push('\n');
    }
    let end = json!({"kind": "end", "messages": n, "memberships": 0, "cursors": 0,
                     "references": 0, "unacked": 0});
    text.push_str(&end.to_string());
    text.push('\n');
    text
}

/// GET `url` on a fresh connection: the status and JSON body, or `None` when nothing
/// listens yet.
async fn probe(url: &str) -> Option<(u16, Json)> {
    let response = client().get(url).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.unwrap_or(Json::Null)))
}

#[tokio::test]
async fn readyz_says_starting_while_the_data_opens_then_ready_then_draining() {
    let work = Workdir::new();
    let dump = work.dir.path().join("big.ndjson");
    std::fs::write(&dump, big_dump(200_000)).unwrap();
    let imported = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["import", "--data-dir"])
        .arg(work.data_dir())
        .arg(&dump)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(imported.status.success(), "{imported:?}");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}");
    let config = "[layer]\nexpiry_secs = 86400\ncapacity = 1000\n\
                  [server]\nrequest_timeout_secs = 30\nshutdown_timeout_secs = 30\n";
    let started = Instant::now();
    let starting = tokio::spawn(async move {
        Server::start_with_args(work, config, &["--listen", listen.as_str()]).await
    });
    // While the data opens: /healthz is up, /readyz says 503, and a request to the API
    // waits for it.
    let mut seen = Vec::new();
    let mut early_request = None;
    let ready_at = loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never ready: {seen:?}"
        );
        match probe(&format!("{base}/readyz")).await {
            Some((200, body)) => {
                assert_eq!(body, json!({"status": "ready"}));
                break started.elapsed();
            }
            Some((status, body)) => {
                assert_eq!((status, &body), (503, &json!({"status": "starting"})));
                if seen.is_empty() {
                    let (status, health) = probe(&format!("{base}/healthz")).await.unwrap();
                    assert_eq!((status, health), (200, json!({"status": "ok"})));
                    let stats = format!("{base}/v1/stats");
                    early_request = Some(tokio::spawn(async move {
                        json_of(fetch(client().get(stats)).await).await
                    }));
                }
                seen.push(status);
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        !seen.is_empty(),
        "503 starting was never seen (ready after {ready_at:?})"
    );
    let mut server = starting.await.unwrap();
    let (status, stats) = early_request.unwrap().await.unwrap();
    assert_eq!(
        (status, &stats["stats"]["pending_messages"]),
        (200, &json!(200_000)),
        "the request made while starting was answered once ready"
    );

    // Draining: a request in flight (its body half sent) holds the shutdown; meanwhile
    // new connections are told 503 draining.
    let mut slow = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/channels/late/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: text/plain\r\nContent-Length: 100\r\n\r\nhalf",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.terminate();
    let deadline = Instant::now() + Duration::from_secs(10);
    let draining = loop {
        let answer = probe(&server.url("/readyz")).await;
        if answer.as_ref().is_some_and(|(status, _)| *status == 503) || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(draining, Some((503, json!({"status": "draining"}))));
    let response = fetch(client().get(server.url("/v1/stats"))).await;
    assert_error(response, 503, "unavailable").await;
    drop(slow);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exited");
    assert!(status.success());
}

#[test]
fn json_logs_are_one_object_a_line_banner_included() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("herald.toml");
    std::fs::write(&config, "[server]\nlog_format = \"json\"\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info,herald=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    let banner: Json = serde_json::from_str(&banner).expect("the banner is JSON");
    assert_eq!(banner["level"], "INFO");
    let url = banner["message"]
        .as_str()
        .unwrap()
        .strip_prefix("herald listening on ")
        .expect("the banner gives the address")
        .to_string();
    // A refused request is logged at debug.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        refused(client().get(format!("{url}/v1/nowhere")), 404, "not_found").await;
    });
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<Json> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let find = |message: &str| {
        lines
            .iter()
            .find(|l| l["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} in {stderr}"))
    };
    let start = find("herald is serving");
    assert_eq!(start["level"], "INFO");
    assert!(start["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(start["durability"], "sync");
    assert!(
        start["auth"]
            .as_str()
            .unwrap()
            .contains("default_access all")
    );
    assert!(start["data_dir"].as_str().unwrap().ends_with("data"));
    let refusal = find("request refused");
    assert_eq!(refusal["level"], "DEBUG");
    assert_eq!(refusal["code"], "not_found");
    assert_eq!(find("herald stopped")["level"], "INFO");
}
