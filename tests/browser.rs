//! A real browser against a real server: headless Chromium's `EventSource`, on a page of
//! another origin, receives a channel's messages over CORS, and after the server is
//! killed (SIGKILL) and restarted it reconnects by itself with `Last-Event-ID` and gets
//! what it missed from the replay log.
//!
//! The browser is driven over the Chrome DevTools protocol (`Runtime.evaluate` on the
//! page's WebSocket). Without a Chromium on the PATH the test says so and passes, unless
//! `HERALD_REQUIRE_BROWSER` is set (CI sets it, after installing `chromium`).
//!
//! With access control on, a page of an allowed origin subscribes with `EventSource` and
//! a JWT in `?access_token=` and receives; a page of another origin gets nothing and
//! changes nothing.
//!
//! The web console (`/console`) refuses a wrong token, logs in with an admin one, pages
//! through 1,000 channels, publishes from its form and shows the message in its live
//! tail. With `HERALD_CONSOLE_SCREENSHOT=FILE` it saves a screenshot there (the README's
//! `docs/console.png`).

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const CHANNEL: &str = "browser.tab";

/// The first Chromium found on the PATH.
/// Chromium's path; `None` after saying the test is skipped (a failure instead when
/// `HERALD_REQUIRE_BROWSER` is set).
fn chromium_or_skip() -> Option<PathBuf> {
    let binary = chromium();
    if binary.is_none() {
        assert!(
            std::env::var_os("HERALD_REQUIRE_BROWSER").is_none(),
            "HERALD_REQUIRE_BROWSER is set but no chromium is on the PATH"
        );
        eprintln!("skipped: no chromium on the PATH (apt-get install chromium)");
    }
    binary
}

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|candidate| candidate.is_file())
}

/// Serves `html` for every request: the page lives on its own origin, not Herald's.
fn serve_page(listener: TcpListener, html: String) {
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match socket.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                    html.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
}

/// A headless Chromium showing one page, driven over the DevTools protocol.
struct Browser {
    _child: Child,
    _profile: tempfile::TempDir,
    page: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Browser {
    async fn open(binary: &PathBuf, url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("a log");
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                // No connections of its own (updates, sync, QUIC probes): only the test's.
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--remote-debugging-port=0",
                "--window-size=1280,1500",
                "--remote-allow-origins=*",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting chromium");
        // Chromium writes the port it chose into the profile once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let port = within(Duration::from_secs(30), "chromium's DevTools port", async {
            loop {
                if let Some(port) = std::fs::read_to_string(&port_file)
                    .ok()
                    .and_then(|text| text.lines().next()?.trim().parse::<u16>().ok())
                {
                    return port;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let list_url = format!("http://127.0.0.1:{port}/json/list");
        let page_ws = within(Duration::from_secs(30), "chromium's page target", async {
            loop {
                if let Ok(response) = client().get(&list_url).send().await
                    && let Ok(targets) = response.json::<Json>().await
                    && let Some(ws) = targets.as_array().into_iter().flatten().find_map(|t| {
                        (t["type"] == "page" && t["url"] == url)
                            .then(|| t["webSocketDebuggerUrl"].as_str().map(str::to_string))
                            .flatten()
                    })
                {
                    return ws;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let (page, _) = tokio_tungstenite::connect_async(&page_ws)
            .await
            .expect("connecting to the page over DevTools");
        Browser {
            _child: child,
            _profile: profile,
            page,
            next_id: 0,
        }
    }

    /// The result of the DevTools command `method` with `params` on the page.
    async fn call(&mut self, method: &str, params: Json) -> Json {
        self.next_id += 1;
        let id = self.next_id;
        let call = json!({"id": id, "method": method, "params": params});
        self.page
            .send(WsMessage::text(call.to_string()))
            .await
            .expect("sending to DevTools");
        loop {
            let frame = within(T, "a DevTools answer", self.page.next())
                .await
                .expect("DevTools closed")
                .expect("reading from DevTools");
            let WsMessage::Text(text) = frame else {
                continue;
            };
            let mut answer: Json = serde_json::from_str(&text).expect("DevTools sends JSON");
            if answer["id"] == id {
                return answer["result"].take();
            }
        }
    }

    /// The value of a JavaScript expression on the page.
    async fn eval(&mut self, expression: &str) -> Json {
        let params = json!({"expression": expression, "returnByValue": true});
        let result = self.call("Runtime.evaluate", params).await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression} threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// A PNG of what the page shows.
    async fn screenshot(&mut self) -> Vec<u8> {
        let result = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let data = result["data"].as_str().expect("PNG data");
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data)
            .expect("base64 PNG")
    }

    /// Waits until a JavaScript expression is true on the page.
    async fn wait_until(&mut self, expression: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.eval(expression).await != Json::Bool(true) {
            assert!(
                Instant::now() < deadline,
                "{expression} still false after {timeout:?}; the page has {}",
                self.eval("JSON.stringify(window.state)").await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The page: an `EventSource` on Herald's channel, counting opens and keeping events.
fn page_html(herald: &str) -> String {
    format!(
        r#"<!doctype html>
<title>herald</title>
<script>
window.state = {{opens: 0, errors: 0, events: []}};
const es = new EventSource("{herald}/v1/channels/{CHANNEL}/events");
es.onopen = () => window.state.opens++;
es.onerror = () => window.state.errors++;
es.onmessage = (e) => window.state.events.push([e.lastEventId, JSON.parse(e.data)]);
</script>"#
    )
}

#[tokio::test]
async fn chromium_event_source_gets_what_it_missed_across_a_kill_with_last_event_id() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let page_origin = format!("http://{}", page_listener.local_addr().unwrap());
    let listen = format!("127.0.0.1:{}", free_port());
    let config = format!("[server]\ncors_origins = [\"{page_origin}\"]\n");
    let work = Workdir::new();
    let mut server =
        Server::start_with_args(work.clone(), &config, &["--listen", listen.as_str()]).await;
    serve_page(page_listener, page_html(&server.base));
    let page_url = format!("{page_origin}/");
    let mut browser = Browser::open(&binary, &page_url).await;
    browser
        .wait_until("window.state?.opens === 1", Duration::from_secs(20))
        .await;

    let api = Api::new(&server);
    let sent: Vec<String> = vec![
        api.send(CHANNEL, &msg(1)).await,
        api.send(CHANNEL, &msg(2)).await,
    ];
    browser
        .wait_until("window.state.events.length === 2", T)
        .await;
    let events = browser.eval("window.state.events").await;
    assert_eq!(events, json!([[sent[0], msg(1)], [sent[1], msg(2)]]));

    // The server dies; a message is sent and taken by someone else while the browser
    // waits to reconnect (EventSource waits 3 s by default).
    server.kill().await;
    let server =
        Server::start_with_args(work.clone(), &config, &["--listen", listen.as_str()]).await;
    let api = Api::new(&server);
    let third = api.send(CHANNEL, &msg(3)).await;
    let taken: Vec<String> = api
        .drain(CHANNEL)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(
        taken.contains(&third),
        "the message sent while the browser was away was taken: {taken:?}"
    );
    assert_eq!(
        browser.eval("window.state.opens").await,
        json!(1),
        "the browser reconnected before the test took the message"
    );

    // The reconnect carries Last-Event-ID, so Herald replays what was delivered after it.
    browser
        .wait_until("window.state.events.length === 3", Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = browser.eval("window.state.events").await;
    assert_eq!(
        events,
        json!([[sent[0], msg(1)], [sent[1], msg(2)], [third, msg(3)]])
    );
    assert_eq!(browser.eval("window.state.opens").await, json!(2));
}

/// A page that subscribes with `EventSource` and a JWT in `?access_token=`, and tries
/// to flush and to publish with no-cors requests, which a page of another origin can
/// always send.
fn token_page_html(herald: &str, jwt: &str) -> String {
    format!(
        r#"<!doctype html>
<title>herald</title>
<script>
window.state = {{opens: 0, errors: 0, events: [], posts: 0}};
const es = new EventSource("{herald}/v1/channels/user.42/events?access_token={jwt}");
es.onopen = () => window.state.opens++;
es.onerror = () => window.state.errors++;
es.onmessage = (e) => window.state.events.push([e.lastEventId, JSON.parse(e.data)]);
const post = (path) => fetch("{herald}" + path + "?access_token={jwt}",
    {{method: "POST", mode: "no-cors", body: "from the page"}})
  .finally(() => window.state.posts++);
post("/v1/flush");
post("/v1/channels/user.42/messages");
</script>"#
    )
}

#[tokio::test]
async fn chromium_event_source_with_a_jwt_receives_on_an_allowed_origin_only() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    let allowed_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let allowed_origin = format!("http://{}", allowed_listener.local_addr().unwrap());
    let denied_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let denied_origin = format!("http://{}", denied_listener.local_addr().unwrap());
    let secret = "browser-jwt-secret";
    let config = format!(
        "[server]\ncors_origins = [\"{allowed_origin}\"]\n[auth]\njwt_secret = \"{secret}\"\n"
    );
    let server = Server::start_with(&config).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let backend_jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"exp": exp, "herald": {"publish": ["*"], "subscribe": ["*"], "admin": true}}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    // The browser user may read channel:user.42 and nothing else.
    let user_jwt = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"exp": exp, "sub": "42", "herald": {"subscribe": ["channel:user.42"]}}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let backend = Api::with_token(&server, &backend_jwt);
    backend.send("keep", &msg(0)).await;

    serve_page(allowed_listener, token_page_html(&server.base, &user_jwt));
    serve_page(denied_listener, token_page_html(&server.base, &user_jwt));
    let mut allowed = Browser::open(&binary, &format!("{allowed_origin}/")).await;
    let mut denied = Browser::open(&binary, &format!("{denied_origin}/")).await;
    allowed
        .wait_until(
            "window.state?.opens === 1 && window.state.posts === 2",
            Duration::from_secs(20),
        )
        .await;
    denied
        .wait_until(
            "window.state?.errors >= 1 && window.state.posts === 2",
            Duration::from_secs(20),
        )
        .await;

    let id = backend.send("user.42", &msg(1)).await;
    allowed
        .wait_until("window.state.events.length === 1", T)
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        allowed.eval("window.state.events").await,
        json!([[id, msg(1)]])
    );
    assert_eq!(denied.eval("window.state.events").await, json!([]));
    assert_eq!(denied.eval("window.state.opens").await, json!(0));
    // Neither page could flush or publish: the JWT only subscribes, and the other
    // origin is refused before anything runs.
    assert_eq!(backend.drain("keep").await.len(), 1, "nothing was flushed");
    assert!(
        backend.drain("user.42").await.is_empty(),
        "nothing was published"
    );
}

/// Sets a form field of the console and tells the page it changed.
fn set_field(id: &str, value: &str) -> String {
    format!(
        "(() => {{ const e = document.getElementById({id:?}); e.value = {value}; \
         e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change')); return true; }})()",
        value = serde_json::to_string(value).unwrap()
    )
}

fn click(id: &str) -> String {
    format!("(() => {{ document.getElementById({id:?}).click(); return true; }})()")
}

fn text_of(id: &str) -> String {
    format!("document.getElementById({id:?}).textContent")
}

#[tokio::test]
async fn the_console_logs_in_pages_channels_publishes_and_tails() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    const ADMIN: &str = "hrld_console-admin";
    let hash = token_hash(ADMIN);
    let config = format!(
        "[auth]\ndefault_access = \"none\"\n[[auth.tokens]]\nname = \"ops\"\nhash = \"{hash}\"\n\
         publish = [\"*\"]\nsubscribe = [\"*\"]\nadmin = true\n\
         [[auth.tokens]]\nname = \"ci\"\nhash = \"sha256:{}\"\npublish = [\"group:ci.*\"]\n",
        "0".repeat(64)
    );
    let server = Server::start_with(&config).await;
    let admin = Api::with_token(&server, ADMIN);
    // 1,000 channels, one message each.
    futures_util::stream::iter(0..1000)
        .for_each_concurrent(32, |n| {
            let admin = &admin;
            async move {
                admin.send(&format!("page.{n:04}"), &msg(n)).await;
            }
        })
        .await;

    let mut page = Browser::open(&binary, &server.url("/console")).await;
    page.wait_until("!!document.getElementById('login-button')", T)
        .await;
    // A wrong token is refused and the console stays closed.
    page.eval(&set_field("token", "hrld_wrong")).await;
    page.eval(&click("login-button")).await;
    page.wait_until(
        "document.getElementById('login-error').textContent.startsWith('unauthorized')",
        T,
    )
    .await;
    assert_eq!(
        page.eval("document.getElementById('app').hidden").await,
        json!(true)
    );
    assert_eq!(
        page.eval("sessionStorage.getItem('herald.token')").await,
        Json::Null
    );

    page.eval(&set_field("token", ADMIN)).await;
    page.eval(&click("login-button")).await;
    page.wait_until("!document.getElementById('app').hidden", T)
        .await;
    assert_eq!(
        page.eval("sessionStorage.getItem('herald.token')").await,
        json!(ADMIN)
    );
    page.wait_until(
        "document.getElementById('fig-channels').textContent === '1,000'",
        T,
    )
    .await;
    // The tokens' names and permissions.
    page.wait_until(
        "document.querySelectorAll('#tokens tbody tr').length === 2",
        T,
    )
    .await;
    assert_eq!(
        page.eval(
            "[...document.querySelectorAll('#tokens tbody tr')].map(r => r.cells[0].textContent)"
        )
        .await,
        json!(["ops", "ci"])
    );
    assert!(
        !page
            .eval("document.body.innerText")
            .await
            .to_string()
            .contains("sha256")
    );

    // Ten pages of 100 channels, in order, each with its depth against its capacity.
    let first_cells =
        "[...document.querySelectorAll('#channels tbody tr')].map(r => r.cells[0].textContent)";
    for p in 0..10 {
        let first = format!("page.{:04}", p * 100);
        page.wait_until(
            &format!(
                "(() => {{ const names = {first_cells}; return names.length === 100 && names[0] === {first:?}; }})()"
            ),
            T,
        )
        .await;
        assert_eq!(
            page.eval(&text_of("channels-page")).await,
            json!(format!("page {}", p + 1))
        );
        if p < 9 {
            page.eval(&click("channels-next")).await;
        }
    }
    assert_eq!(
        page.eval(&format!("{first_cells}[99]")).await,
        json!("page.0999")
    );
    assert_eq!(
        page.eval("document.getElementById('channels-next').disabled")
            .await,
        json!(true)
    );
    let row = page
        .eval("document.querySelector('#channels tbody tr').innerText")
        .await;
    assert!(row.as_str().unwrap().contains("1 / 100"), "{row}");
    page.eval(&click("channels-prev")).await;
    page.wait_until(&format!("{first_cells}[0] === 'page.0800'"), T)
        .await;

    // A live tail of a group, and a publish from the form that shows up in it.
    page.eval(&set_field("tail-kind", "group")).await;
    page.eval(&set_field("tail-name", "console.g")).await;
    page.eval(&click("tail-start")).await;
    page.wait_until(&format!("{} === 'open'", text_of("tail-state")), T)
        .await;
    // The stream has joined the group once the group lists a member.
    within(T, "the tail's membership", async {
        while admin.members("console.g").await.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    page.eval(&set_field("pub-kind", "group")).await;
    page.eval(&set_field("pub-name", "console.g")).await;
    page.eval(&set_field("pub-format", "json")).await;
    page.eval(&set_field("pub-body", r#"{"type":"console.hello","n":7}"#))
        .await;
    page.eval(&click("pub-send")).await;
    page.wait_until(
        "document.getElementById('pub-result').classList.contains('ok')",
        T,
    )
    .await;
    let result = page.eval(&text_of("pub-result")).await;
    assert!(result.as_str().unwrap().contains("delivered 1"), "{result}");
    page.wait_until(
        "[...document.querySelectorAll('#tail-log li')].some(li => li.textContent.includes('{\"type\":\"console.hello\",\"n\":7}'))",
        T,
    )
    .await;
    // An error from the server is shown as its code and message.
    page.eval(&set_field("pub-kind", "channel")).await;
    page.eval(&set_field("pub-name", "bad name")).await;
    page.eval(&click("pub-send")).await;
    page.wait_until(
        "document.getElementById('pub-result').classList.contains('error') && document.getElementById('pub-result').textContent.startsWith('invalid_name')",
        T,
    )
    .await;
    page.eval(&set_field("pub-name", "console.c")).await;
    page.eval(&set_field("pub-format", "text")).await;
    page.eval(&set_field("pub-body", "from the console")).await;
    page.eval(&click("pub-send")).await;
    page.wait_until(
        "document.getElementById('pub-result').classList.contains('ok')",
        T,
    )
    .await;
    let (_, message) = admin.receive("console.c").await.expect("published");
    assert_eq!(message, json!({"type": "text", "text": "from the console"}));

    if let Some(file) = std::env::var_os("HERALD_CONSOLE_SCREENSHOT") {
        // Once the rates have two polls behind them, with the group the tail joined.
        page.eval(&click("groups-refresh")).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        std::fs::write(file, page.screenshot().await).expect("writing the screenshot");
    }
}
