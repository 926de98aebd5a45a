//! Shared helpers of the real-server integration tests (`tests/api_*.rs`): a [`Server`]
//! process on port 0 with its own data directory, an HTTP client, an SSE client that
//! parses the wire format, and a WebSocket client (JSON text and msgpack binary frames).
//!
//! Every wait is bounded, so a hang fails the test quickly instead of blocking the suite.

#![allow(dead_code)]

pub mod lazyfs;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::Value as Json;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// A random seed, or the one in environment variable `var` to replay a run.
pub fn seed_from_env(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// The default bound on a single wait in the tests.
pub const T: Duration = Duration::from_secs(10);

/// Awaits `fut` for at most `t`, panicking with `what` when it takes longer.
pub async fn within<F: std::future::Future>(t: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(t, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {t:?}: {what}"),
    }
}

// ---------------------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------------------

/// A temporary directory shared by the successive servers of one test (restarts).
pub struct Workdir {
    pub dir: TempDir,
    starts: AtomicUsize,
    /// The data directory, when not `dir/data` (one on a LazyFS mount).
    data_dir: Option<PathBuf>,
}

impl Workdir {
    pub fn new() -> Arc<Workdir> {
        Workdir::make(None)
    }

    /// A work directory whose servers keep their data in `data_dir`.
    pub fn with_data_dir(data_dir: PathBuf) -> Arc<Workdir> {
        Workdir::make(Some(data_dir))
    }

    fn make(data_dir: Option<PathBuf>) -> Arc<Workdir> {
        Arc::new(Workdir {
            dir: tempfile::Builder::new()
                .prefix("herald-test-")
                .tempdir()
                .expect("creating a temp dir"),
            starts: AtomicUsize::new(0),
            data_dir,
        })
    }

    /// The data directory given to `--data-dir`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }
}

/// One running `herald serve`. Dropping it kills the process.
pub struct Server {
    pub work: Arc<Workdir>,
    config: Option<String>,
    child: Child,
    pid: u32,
    /// Kept open so that the server never writes to a closed stdout.
    _stdout: BufReader<ChildStdout>,
    pub addr: String,
    pub base: String,
    log: PathBuf,
}

impl Server {
    /// Starts a server with the built-in configuration.
    pub async fn start() -> Server {
        Server::start_with("").await
    }

    /// Starts a server with `config` (TOML overriding the defaults) in a new directory.
    pub async fn start_with(config: &str) -> Server {
        Server::start_in(Workdir::new(), config).await
    }

    /// Starts a server on the data directory of `work`.
    pub async fn start_in(work: Arc<Workdir>, config: &str) -> Server {
        Server::start_with_args(work, config, &[]).await
    }

    /// Starts a server on the data directory of `work` with extra `serve` flags; it
    /// listens on port 0 unless they give `--listen`.
    pub async fn start_with_args(work: Arc<Workdir>, config: &str, args: &[&str]) -> Server {
        let n = work.starts.fetch_add(1, Ordering::SeqCst);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.arg("serve");
        if !args.contains(&"--listen") {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        cmd.arg("--data-dir").arg(work.data_dir()).args(args);
        let config = (!config.is_empty()).then(|| config.to_string());
        if let Some(text) = &config {
            let path = work.dir.path().join(format!("herald-{n}.toml"));
            std::fs::write(&path, text).expect("writing the config file");
            cmd.arg("--config").arg(path);
        }
        // The environment of the test run must not change the server's settings.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HERALD_") {
                cmd.env_remove(key);
            }
        }
        let log = work.dir.path().join(format!("server-{n}.log"));
        let log_file = std::fs::File::create(&log).expect("creating the log file");
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("starting herald");
        let pid = child.id().expect("a running child has a pid");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        let read = tokio::time::timeout(Duration::from_secs(20), stdout.read_line(&mut line)).await;
        let ok = matches!(read, Ok(Ok(n)) if n > 0);
        if !ok {
            let _ = child.start_kill();
            panic!(
                "herald did not report that it listens (got {line:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let base = line
            .trim()
            .strip_prefix("herald listening on ")
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"))
            .to_string();
        let addr = base
            .strip_prefix("http://")
            .expect("an http:// address")
            .to_string();
        Server {
            work,
            config,
            child,
            pid,
            _stdout: stdout,
            addr,
            base,
            log,
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The WebSocket URL of `/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.work.data_dir()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = within(T, "a killed server to exit", self.child.wait()).await;
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid);
    }

    /// Waits up to `t` for the process to exit; `None` when it is still running.
    pub async fn wait_exit(&mut self, t: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(t, self.child.wait())
            .await
            .ok()
            .map(|r| r.expect("waiting for the server"))
    }

    /// SIGTERM, then waits up to `t` for a clean exit; panics if it does not come.
    pub async fn shutdown(&mut self, t: Duration) -> ExitStatus {
        self.terminate();
        match self.wait_exit(t).await {
            Some(status) => status,
            None => panic!(
                "herald did not exit within {t:?} of SIGTERM; log:\n{}",
                self.log()
            ),
        }
    }

    /// Starts a new server on the same data directory and configuration (the current
    /// one must have exited).
    pub async fn restart(&self) -> Server {
        Server::start_in(self.work.clone(), self.config.as_deref().unwrap_or("")).await
    }

    /// Like [`Server::restart`], with another configuration.
    pub async fn restart_with(&self, config: &str) -> Server {
        Server::start_in(self.work.clone(), config).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

// ---------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------

/// A plain-HTTP client that ignores proxy settings of the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .expect("building the HTTP client")
}

/// A client like [`client`] that sends `Authorization: Bearer <token>` with every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("a header value"),
    );
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .expect("building the HTTP client")
}

/// A JSON body and its status, for assertions.
pub async fn json_of(response: reqwest::Response) -> (u16, Json) {
    let status = response.status().as_u16();
    let bytes = within(T, "a response body", response.bytes())
        .await
        .expect("reading a response body");
    let json = if bytes.is_empty() {
        Json::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "response ({status}) is not JSON: {e}: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    (status, json)
}

/// Asserts the error document of `response`: `status` and `{"error":{"code":code,...}}`.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Json {
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string());
    let (got, json) = json_of(response).await;
    assert_eq!(got, status, "status of an error answer: {json}");
    assert_eq!(json["error"]["code"], code, "error code in {json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error has a message: {json}"
    );
    assert_eq!(content_type.as_deref(), Some("application/json"));
    json
}

/// Sends `request`, bounded by [`T`].
pub async fn fetch(request: reqwest::RequestBuilder) -> reqwest::Response {
    within(T, "a request", request.send())
        .await
        .expect("sending a request")
}

/// Sends `request` and asserts that it is refused with `status` and the error `code`;
/// returns the error document.
pub async fn refused(request: reqwest::RequestBuilder, status: u16, code: &str) -> Json {
    assert_error(fetch(request).await, status, code).await
}

/// Small REST helpers around one server.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn new(server: &Server) -> Api {
        Api {
            http: client(),
            base: server.base.clone(),
        }
    }

    /// The helpers of [`Api::new`], presenting `token` on every request.
    pub fn with_token(server: &Server, token: &str) -> Api {
        Api {
            http: client_with_token(token),
            base: server.base.clone(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// POSTs `message` as JSON to the channel; panics unless 202. Returns the id.
    pub async fn send(&self, channel: &str, message: &Json) -> String {
        let (status, json) = json_of(self.send_raw(channel, message).await).await;
        assert_eq!(status, 202, "send to {channel}: {json}");
        assert_eq!(json["channel"], channel);
        json["id"]
            .as_str()
            .unwrap_or_else(|| panic!("id is a string: {json}"))
            .to_string()
    }

    /// The raw send response.
    pub async fn send_raw(&self, channel: &str, message: &Json) -> reqwest::Response {
        self.post_json(&format!("/v1/channels/{channel}/messages"), message)
            .await
    }

    /// POSTs `message` as JSON to `path`.
    pub async fn post_json(&self, path: &str, message: &Json) -> reqwest::Response {
        fetch(self.http.post(self.url(path)).json(message)).await
    }

    /// A receive without waiting: `Some((id, message))` or `None` on 204.
    pub async fn receive(&self, channel: &str) -> Option<(String, Json)> {
        self.receive_wait(channel, 0.0).await
    }

    /// A receive waiting up to `wait` seconds.
    pub async fn receive_wait(&self, channel: &str, wait: f64) -> Option<(String, Json)> {
        let response = within(
            Duration::from_secs_f64(wait) + T,
            "receive",
            self.http
                .get(self.url(&format!("/v1/channels/{channel}/messages?wait={wait}")))
                .send(),
        )
        .await
        .expect("receive request");
        let (status, json) = json_of(response).await;
        match status {
            204 => {
                assert_eq!(json, Json::Null, "a 204 has no body");
                None
            }
            200 => {
                assert_eq!(json["channel"], channel, "{json}");
                let id = json["id"].as_str().expect("id is a string").to_string();
                Some((id, json["message"].clone()))
            }
            other => panic!("receive from {channel}: {other} {json}"),
        }
    }

    /// Every message pending on `channel`, by receiving until 204.
    pub async fn drain(&self, channel: &str) -> Vec<(String, Json)> {
        let mut out = Vec::new();
        while let Some(m) = self.receive(channel).await {
            out.push(m);
            assert!(out.len() < 100_000, "drain does not end");
        }
        out
    }

    pub async fn group_add(&self, group: &str, channel: &str) {
        self.membership(reqwest::Method::PUT, group, channel).await;
    }

    pub async fn group_discard(&self, group: &str, channel: &str) {
        self.membership(reqwest::Method::DELETE, group, channel)
            .await;
    }

    /// PUT (group_add) or DELETE (group_discard) a membership; panics unless 204.
    async fn membership(&self, method: reqwest::Method, group: &str, channel: &str) {
        let url = self.url(&format!("/v1/groups/{group}/channels/{channel}"));
        let response = fetch(self.http.request(method.clone(), url)).await;
        assert_eq!(
            response.status().as_u16(),
            204,
            "{method} membership {group} {channel}"
        );
    }

    /// The members of `group`, as listed by the server, following `next` page by page.
    pub async fn members(&self, group: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut request = self
                .http
                .get(self.url(&format!("/v1/groups/{group}/channels")))
                .query(&[("limit", "1000")]);
            if let Some(after) = &after {
                request = request.query(&[("after", after)]);
            }
            let (status, json) = json_of(fetch(request).await).await;
            assert_eq!(status, 200, "members of {group}: {json}");
            assert_eq!(json["group"], group);
            out.extend(
                json["channels"]
                    .as_array()
                    .expect("channels is a list")
                    .iter()
                    .map(|c| c.as_str().expect("channel names are strings").to_string()),
            );
            match json["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => return out,
            }
        }
    }

    /// group_send; returns (delivered, full).
    pub async fn group_send(&self, group: &str, message: &Json) -> (u64, u64) {
        let response = self
            .post_json(&format!("/v1/groups/{group}/messages"), message)
            .await;
        let (status, json) = json_of(response).await;
        assert_eq!(status, 202, "group_send {group}: {json}");
        assert_eq!(json["group"], group);
        (
            json["delivered"].as_u64().expect("delivered is a number"),
            json["full"].as_u64().expect("full is a number"),
        )
    }

    /// new_channel with `prefix`.
    pub async fn new_channel(&self, prefix: &str) -> String {
        let response = within(
            T,
            "new_channel",
            self.http
                .post(self.url(&format!("/v1/channels?prefix={prefix}")))
                .send(),
        )
        .await
        .expect("new_channel request");
        let (status, json) = json_of(response).await;
        assert_eq!(status, 201, "new_channel: {json}");
        json["channel"]
            .as_str()
            .expect("channel is a string")
            .to_string()
    }

    /// Asserts the server answers its health check.
    pub async fn assert_healthy(&self) {
        let response = within(T, "healthz", self.http.get(self.url("/healthz")).send())
            .await
            .expect("healthz request");
        let (status, json) = json_of(response).await;
        assert_eq!(status, 200);
        assert_eq!(json, serde_json::json!({"status": "ok"}));
    }
}

/// The sweep forgets what a channel lost: sends m0 and receives it, sends m1 and lets
/// it expire (expiry 1 s) long enough for the sweep to delete both from disk and forget
/// the idle channel; then, with `restart`, kills the server and starts it again on the
/// same data directory; then sends m2. Returns the server and the ids of m0 and m2.
pub async fn lose_a_message_to_a_forgotten_channel(
    channel: &str,
    restart: bool,
) -> (Server, String, String) {
    let mut server = Server::start_with("[layer]\nexpiry_secs = 1\n").await;
    let api = Api::new(&server);
    let first = api.send(channel, &msg(0)).await;
    assert_eq!(api.receive(channel).await.unwrap().0, first);
    api.send(channel, &msg(1)).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    if restart {
        server.kill().await;
        server = server.restart().await;
    }
    let fresh = Api::new(&server).send(channel, &msg(2)).await;
    (server, first, fresh)
}

/// A test message `{"type":"test","n":n}`.
pub fn msg(n: u64) -> Json {
    serde_json::json!({"type": "test", "n": n})
}

/// The id as a number, for ordering checks.
pub fn id_num(id: &str) -> u64 {
    id.parse()
        .unwrap_or_else(|_| panic!("ids are decimal strings, not {id:?}"))
}

// ---------------------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------------------

/// One dispatched SSE event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    /// The data as JSON.
    pub fn json(&self) -> Json {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {:?}", self.data))
    }

    /// The id as a number (panics without an id).
    pub fn id_num(&self) -> u64 {
        id_num(self.id.as_deref().expect("the event has an id"))
    }
}

/// What an SSE stream yields, in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseItem {
    Event(SseEvent),
    /// A `:comment` line, without the colon (one leading space kept as sent).
    Comment(String),
    /// A `retry:` field, in milliseconds.
    Retry(u64),
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// An SSE client over a streaming HTTP response, parsing per the HTML spec.
pub struct Sse {
    stream: Option<ByteStream>,
    buf: Vec<u8>,
    items: VecDeque<SseItem>,
    current: SseEvent,
    has_data: bool,
    skip_lf: bool,
    /// Every raw byte received, for debugging and wire-format checks.
    pub raw: Vec<u8>,
    pub status: u16,
    pub content_type: Option<String>,
}

impl Sse {
    /// Opens `url` with `headers`; asserts `200 text/event-stream`.
    pub async fn open(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Sse {
        let sse = Sse::open_any(http, url, headers).await;
        assert_eq!(sse.status, 200, "SSE status for {url}");
        assert!(
            sse.content_type
                .as_deref()
                .is_some_and(|c| c.starts_with("text/event-stream")),
            "content type of {url}: {:?}",
            sse.content_type
        );
        sse
    }

    /// Opens `url` whatever the answer.
    pub async fn open_any(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Sse {
        let mut request = http.get(url).header("accept", "text/event-stream");
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = within(T, "opening an SSE stream", request.send())
            .await
            .expect("SSE request");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Sse {
            stream: Some(Box::pin(response.bytes_stream())),
            buf: Vec::new(),
            items: VecDeque::new(),
            current: SseEvent::default(),
            has_data: false,
            skip_lf: false,
            raw: Vec::new(),
            status,
            content_type,
        }
    }

    fn parse_line(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line).into_owned();
        if line.is_empty() {
            // Dispatch.
            let event = std::mem::take(&mut self.current);
            if self.has_data || event.event.is_some() {
                self.items.push_back(SseItem::Event(event));
            } else if event.id.is_some() {
                // An id alone updates the last event id; keep it visible to tests.
                self.items.push_back(SseItem::Event(event));
            }
            self.has_data = false;
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.items.push_back(SseItem::Comment(comment.to_string()));
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f.to_string(), v.strip_prefix(' ').unwrap_or(v).to_string()),
            None => (line.clone(), String::new()),
        };
        match field.as_str() {
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(&value);
                self.has_data = true;
            }
            "id" => self.current.id = Some(value),
            "event" => self.current.event = Some(value),
            "retry" => {
                if let Ok(ms) = value.parse() {
                    self.items.push_back(SseItem::Retry(ms));
                }
            }
            _ => {}
        }
    }

    fn parse_buffer(&mut self) {
        loop {
            if self.skip_lf && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.remove(0);
                }
                self.skip_lf = false;
            }
            let Some(pos) = self.buf.iter().position(|b| *b == b'\n' || *b == b'\r') else {
                return;
            };
            let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
            // A CR may be the first half of a CRLF split across chunks.
            self.skip_lf = line.pop() == Some(b'\r');
            self.parse_line(&line);
        }
    }

    /// The next item; `Ok(None)` when the stream ended, `Err(())` on timeout.
    pub async fn next_item(&mut self, t: Duration) -> Result<Option<SseItem>, ()> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            if let Some(item) = self.items.pop_front() {
                return Ok(Some(item));
            }
            let Some(stream) = self.stream.as_mut() else {
                return Ok(None);
            };
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => return Err(()),
                Ok(Some(Ok(chunk))) => {
                    self.raw.extend_from_slice(&chunk);
                    self.buf.extend_from_slice(&chunk);
                    self.parse_buffer();
                }
                Ok(Some(Err(_))) | Ok(None) => {
                    self.stream = None;
                }
            }
        }
    }

    /// The next event, skipping comments and retry fields; `Ok(None)` at the end.
    pub async fn next_event_within(&mut self, t: Duration) -> Result<Option<SseEvent>, ()> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_item(left).await? {
                Some(SseItem::Event(e)) => return Ok(Some(e)),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    /// The next event; panics on timeout or end of stream.
    pub async fn event(&mut self) -> SseEvent {
        match self.next_event_within(T).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("the SSE stream ended; raw tail: {:?}", self.raw_tail()),
            Err(()) => panic!("no SSE event within {T:?}; raw tail: {:?}", self.raw_tail()),
        }
    }

    /// The next `n` events.
    pub async fn events(&mut self, n: usize) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.event().await);
        }
        out
    }

    /// Asserts that no event comes within `t` (comments are fine).
    pub async fn assert_no_event(&mut self, t: Duration) {
        match self.next_event_within(t).await {
            Err(()) => {}
            Ok(Some(e)) => panic!("unexpected SSE event {e:?}"),
            Ok(None) => panic!("the SSE stream ended unexpectedly"),
        }
    }

    /// Waits up to `t` for the end of the stream, returning the events still received.
    pub async fn until_end(&mut self, t: Duration) -> Result<Vec<SseItem>, Vec<SseItem>> {
        let deadline = tokio::time::Instant::now() + t;
        let mut items = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_item(left).await {
                Ok(Some(item)) => items.push(item),
                Ok(None) => return Ok(items),
                Err(()) => return Err(items),
            }
        }
    }

    /// The last 1,000 bytes received, for failure messages.
    pub fn raw_tail(&self) -> String {
        let start = self.raw.len().saturating_sub(1000);
        String::from_utf8_lossy(&self.raw[start..]).into_owned()
    }

    /// Drops the connection (the client goes away).
    pub fn close(&mut self) {
        self.stream = None;
    }

    /// Whether the stream ended.
    pub fn ended(&self) -> bool {
        self.stream.is_none() && self.items.is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket
// ---------------------------------------------------------------------------------------

pub use tokio_tungstenite::tungstenite::Message as WsFrame;

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the server sent on a WebSocket.
#[derive(Debug, Clone, PartialEq)]
pub enum WsIn {
    Json(Json),
    Msgpack(rmpv::Value),
    /// A close frame: code and reason (code 1005 when none was given).
    Close(u16, String),
    /// The connection ended without a close frame.
    End,
}

/// A WebSocket client of `/v1/ws`.
pub struct Ws {
    pub stream: WsStream,
}

impl Ws {
    pub async fn connect(server: &Server) -> Ws {
        Ws::connect_url(&server.ws_url()).await
    }

    pub async fn connect_url(url: &str) -> Ws {
        let (stream, response) = within(
            T,
            "WebSocket handshake",
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("WebSocket handshake");
        assert_eq!(response.status().as_u16(), 101);
        Ws { stream }
    }

    /// Opens `url` with extra request `headers`; the handshake's HTTP status on refusal.
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("a WebSocket URL");
        for (name, value) in headers {
            request.headers_mut().insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                value.parse().expect("a header value"),
            );
        }
        match within(
            T,
            "WebSocket handshake",
            tokio_tungstenite::connect_async(request),
        )
        .await
        {
            Ok((stream, _)) => Ok(Ws { stream }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(e) => panic!("WebSocket handshake failed: {e}"),
        }
    }

    pub async fn send_frame(&mut self, frame: WsFrame) {
        within(T, "sending a WebSocket frame", self.stream.send(frame))
            .await
            .expect("sending a WebSocket frame");
    }

    /// Sends a frame, returning the error instead of panicking (for frames the server
    /// may refuse before it has read them whole).
    pub async fn try_send_frame(
        &mut self,
        frame: WsFrame,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        within(T, "sending a WebSocket frame", self.stream.send(frame)).await
    }

    /// Sends `request` as a JSON text frame.
    pub async fn send_json(&mut self, request: &Json) {
        self.send_frame(WsFrame::text(request.to_string())).await;
    }

    /// Sends `request` as a msgpack binary frame.
    pub async fn send_msgpack(&mut self, request: &rmpv::Value) {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, request).expect("encoding msgpack");
        self.send_frame(WsFrame::binary(buf)).await;
    }

    /// The next data or close frame; `Err(())` on timeout.
    pub async fn next_within(&mut self, t: Duration) -> Result<WsIn, ()> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let next = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .map_err(|_| ())?;
            return Ok(match next {
                None | Some(Err(_)) => WsIn::End,
                Some(Ok(WsFrame::Text(text))) => WsIn::Json(
                    serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("text frame is not JSON ({e}): {text}")),
                ),
                Some(Ok(WsFrame::Binary(bytes))) => {
                    let mut slice = &bytes[..];
                    let value = rmpv::decode::read_value(&mut slice)
                        .unwrap_or_else(|e| panic!("binary frame is not msgpack: {e}"));
                    assert!(slice.is_empty(), "trailing bytes in a binary frame");
                    WsIn::Msgpack(value)
                }
                Some(Ok(WsFrame::Close(frame))) => match frame {
                    Some(f) => WsIn::Close(u16::from(f.code), f.reason.to_string()),
                    None => WsIn::Close(1005, String::new()),
                },
                Some(Ok(_)) => continue, // ping, pong, raw frames
            });
        }
    }

    /// The next frame; panics on timeout.
    pub async fn next(&mut self) -> WsIn {
        self.next_within(T)
            .await
            .unwrap_or_else(|_| panic!("no WebSocket frame within {T:?}"))
    }

    /// The next frame, which must be a JSON text frame.
    pub async fn json(&mut self) -> Json {
        match self.next().await {
            WsIn::Json(json) => json,
            other => panic!("expected a JSON text frame, got {other:?}"),
        }
    }

    /// The next frame, which must be a msgpack binary frame.
    pub async fn msgpack(&mut self) -> rmpv::Value {
        match self.next().await {
            WsIn::Msgpack(value) => value,
            other => panic!("expected a msgpack binary frame, got {other:?}"),
        }
    }

    /// Sends a JSON request and returns the next JSON frame.
    pub async fn call(&mut self, request: Json) -> Json {
        self.send_json(&request).await;
        self.json().await
    }

    /// Asserts nothing arrives within `t`.
    pub async fn assert_silent(&mut self, t: Duration) {
        if let Ok(frame) = self.next_within(t).await {
            panic!("unexpected WebSocket frame {frame:?}");
        }
    }
}

/// The value under `key` of a msgpack map.
pub fn mp_get<'a>(map: &'a rmpv::Value, key: &str) -> Option<&'a rmpv::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// A msgpack map from string keys.
pub fn mp_map(entries: Vec<(&str, rmpv::Value)>) -> rmpv::Value {
    rmpv::Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (rmpv::Value::from(k), v))
            .collect(),
    )
}

/// The msgpack encoding of `value`.
pub fn mp_encode(value: &rmpv::Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, value).expect("encoding msgpack");
    buf
}

/// Decodes a whole msgpack buffer (no trailing bytes).
pub fn mp_decode(bytes: &[u8]) -> rmpv::Value {
    let mut slice = bytes;
    let value = rmpv::decode::read_value(&mut slice).expect("decoding msgpack");
    assert!(slice.is_empty(), "trailing bytes after msgpack");
    value
}

/// A loopback port that was free a moment ago, for a server that must listen on a port
/// known in advance (to come back on it, or as a second address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `sha256:<hex>` hash of a secret token, as `[[auth.tokens]]` holds it.
pub fn token_hash(token: &str) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}
