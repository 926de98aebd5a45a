//! The client commands: `herald publish`, `herald subscribe` and `herald stats`, over
//! the server's HTTP API.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use clap::{ArgGroup, Args};
use eventsource_stream::{Event, Eventsource};
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Map, Value};

use crate::failure::Failure;

/// Which server, and as whom.
#[derive(Args, Debug)]
pub(crate) struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "HERALD_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A token to present (`Authorization: Bearer`).
    #[arg(long, env = "HERALD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// A channel or a group.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("target").required(true).args(["channel", "group"])))]
pub(crate) struct Target {
    /// The channel.
    #[arg(long)]
    channel: Option<String>,
    /// The group.
    #[arg(long)]
    group: Option<String>,
}

impl Target {
    /// The API path of the channel or group followed by `/{what}`.
    fn path(&self, what: &str) -> String {
        match (&self.channel, &self.group) {
            (Some(channel), _) => format!("/v1/channels/{}/{what}", segment(channel)),
            (None, Some(group)) => format!("/v1/groups/{}/{what}", segment(group)),
            (None, None) => unreachable!("clap requires --channel or --group"),
        }
    }
}

/// `herald publish`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct Publish {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    target: Target,
    /// The message's `"type"` (for text, the message is `{"type": TYPE, "text": ...}`).
    #[arg(long = "type", value_name = "TYPE")]
    message_type: Option<String>,
    /// The message: a JSON object, or text. `-` or nothing reads it from standard input.
    message: Option<String>,
}

/// `herald subscribe`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct Subscribe {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    target: Target,
    /// With --group: the channel to join to the group and stream, so that a reconnect
    /// resumes where it stopped (without it, a fresh channel is used each time).
    #[arg(long = "as", value_name = "CHANNEL", requires = "group")]
    as_channel: Option<String>,
    /// Start after this message id (as a reconnect does with the last id it saw): the
    /// messages after it that the server still keeps come first.
    #[arg(long, value_name = "ID")]
    last_event_id: Option<String>,
    /// Print each event as one JSON object: `{"id", "channel" or "group", "message"}`.
    #[arg(long)]
    json: bool,
    /// Run CMD (with `sh -c`) for each message, with the message's JSON on its standard
    /// input and HERALD_ID, HERALD_CHANNEL, HERALD_GROUP and HERALD_TYPE set.
    #[arg(long, value_name = "CMD")]
    exec: Option<String>,
}

/// A client of the server at `args`.
struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(args: &ServerArgs) -> Result<Self, Failure> {
        Ok(Client {
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .map_err(Failure::Client)?,
            base: args.url.trim_end_matches('/').to_string(),
            token: args.token.clone().filter(|t| !t.is_empty()),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request` and reads its JSON answer; an error answer is the server's code
    /// and message.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let endpoint = self.base.clone();
        let response = request
            .send()
            .await
            .map_err(|source| Failure::Unreachable { endpoint, source })?;
        if response.status().is_success() {
            return Ok(response.json().await.unwrap_or(Value::Null));
        }
        Err(refusal(response).await)
    }
}

/// The failure for an error answer: its code and message, or its status and body.
async fn refusal(response: reqwest::Response) -> Failure {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    let doc: Option<Value> = serde_json::from_str(&body).ok();
    let field = |key: &str| {
        doc.as_ref()
            .and_then(|d| d["error"][key].as_str())
            .map(str::to_string)
    };
    match (field("code"), field("message")) {
        (Some(code), Some(message)) => Failure::Api { code, message },
        _ => Failure::Api {
            code: status.as_u16().to_string(),
            message: body,
        },
    }
}

/// What a path segment or query value keeps as it is: the characters of valid names.
const KEPT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'!');

/// A path segment, percent-encoded.
fn segment(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, KEPT).to_string()
}

/// Runs `work` on a small runtime of its own.
fn block_on<T>(work: impl Future<Output = Result<T, Failure>>) -> Result<T, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Failure::Runtime)?
        .block_on(work)
}

/// `herald publish`: prints the id (or, for a group, delivered and full).
pub(crate) fn publish(args: Publish) -> Result<(), Failure> {
    let text = match args.message.as_deref() {
        None | Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|source| Failure::Read {
                    path: "standard input".into(),
                    source,
                })?;
            text.strip_suffix('\n').unwrap_or(&text).to_string()
        }
        Some(text) => text.to_string(),
    };
    let body = message_body(&text, args.message_type.as_deref());
    let client = Client::new(&args.server)?;
    let request = client.request(reqwest::Method::POST, &args.target.path("messages"));
    let request = match body {
        Body::Json(map) => request
            .header(CONTENT_TYPE, "application/json")
            .body(Value::Object(map).to_string()),
        Body::Text(text) => request
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(text),
    };
    let answer = block_on(client.call(request))?;
    match answer.get("id").and_then(Value::as_str) {
        Some(id) => println!("{id}"),
        None => println!(
            "delivered {} full {}",
            answer["delivered"].as_u64().unwrap_or(0),
            answer["full"].as_u64().unwrap_or(0)
        ),
    }
    Ok(())
}

/// What a publish sends.
#[derive(Debug, PartialEq)]
enum Body {
    Json(Map<String, Value>),
    Text(String),
}

/// A JSON object is sent as it is (its `"type"` set to `message_type` when given);
/// anything else is text, sent as text or, with a type, as `{"type", "text"}`.
fn message_body(text: &str, message_type: Option<&str>) -> Body {
    match (serde_json::from_str::<Value>(text), message_type) {
        (Ok(Value::Object(mut map)), Some(t)) => {
            map.insert("type".into(), Value::from(t));
            Body::Json(map)
        }
        (Ok(Value::Object(map)), None) => Body::Json(map),
        (_, Some(t)) => {
            let mut map = Map::new();
            map.insert("type".into(), Value::from(t));
            map.insert("text".into(), Value::from(text));
            Body::Json(map)
        }
        (_, None) => Body::Text(text.to_string()),
    }
}

/// `herald stats`: the server's stats as a table of names and figures.
pub(crate) fn stats(args: ServerArgs) -> Result<(), Failure> {
    let client = Client::new(&args)?;
    let answer = block_on(client.call(client.request(reqwest::Method::GET, "/v1/stats")))?;
    let mut rows = Vec::new();
    flatten("", &answer["stats"], &mut rows);
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for (name, value) in rows {
        let _ = writeln!(out, "{name:<width$}  {value}");
    }
    Ok(())
}

/// The leaves of `value` as (dotted name, text) rows, in order.
fn flatten(prefix: &str, value: &Value, rows: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&name, inner, rows);
            }
        }
        Value::String(text) => rows.push((prefix.to_string(), text.clone())),
        other => rows.push((prefix.to_string(), other.to_string())),
    }
}

/// The first wait before reconnecting, and the longest.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(30));

/// `herald subscribe`: prints (or runs `--exec` for) each message until Ctrl-C or
/// SIGTERM, reconnecting with backoff and resuming after the last id seen.
pub(crate) fn subscribe(args: Subscribe) -> Result<(), Failure> {
    let client = Client::new(&args.server)?;
    block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(Failure::Signals)?;
        tokio::select! {
            result = follow(&client, &args) => result,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    })
}

/// Streams the events of `args`' channel or group for good.
async fn follow(client: &Client, args: &Subscribe) -> Result<(), Failure> {
    let channel = args
        .target
        .channel
        .as_deref()
        .or(args.as_channel.as_deref());
    let mut path = args.target.path("events");
    if let Some(joined) = &args.as_channel {
        path = format!("{path}?channel={}", segment(joined));
    }
    // Only a named channel can be resumed.
    let resumable = channel.is_some();
    let mut last_id = args.last_event_id.clone();
    let mut reconnecting = false;
    let mut backoff = BACKOFF.0;
    loop {
        let mut request = client
            .request(reqwest::Method::GET, &path)
            .header(ACCEPT, "text/event-stream");
        if let (Some(id), true) = (&last_id, resumable) {
            request = request.header("last-event-id", id);
        }
        let why = match request.send().await {
            Ok(response) if response.status() == StatusCode::OK => {
                match (reconnecting, resumable, &last_id) {
                    (false, _, _) => {}
                    (true, true, Some(id)) => {
                        eprintln!("herald: reconnected, resuming after id {id}");
                    }
                    (true, true, None) => eprintln!("herald: reconnected"),
                    (true, false, _) => eprintln!(
                        "herald: reconnected; what was sent to the group meanwhile is not delivered (--as CHANNEL resumes)"
                    ),
                }
                backoff = BACKOFF.0;
                let mut events = response.bytes_stream().eventsource();
                let mut why = "the server closed the stream".to_string();
                while let Some(event) = events.next().await {
                    match event {
                        Ok(event) => {
                            if !event.id.is_empty() {
                                last_id = Some(event.id.clone());
                            }
                            handle(args, channel, &event).await;
                        }
                        Err(e) => {
                            why = e.to_string();
                            break;
                        }
                    }
                }
                why
            }
            Ok(response) => {
                let status = response.status();
                let failure = refusal(response).await;
                // Only a busy or restarting server is worth waiting for.
                if !(status.is_server_error()
                    || status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::REQUEST_TIMEOUT)
                {
                    return Err(failure);
                }
                failure.to_string()
            }
            Err(e) => e.to_string(),
        };
        eprintln!("herald: disconnected ({why}); reconnecting in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
        reconnecting = true;
    }
}

/// Prints one event, or runs `--exec` for it; a gap is reported on stderr.
async fn handle(args: &Subscribe, channel: Option<&str>, event: &Event) {
    if event.event == "herald.gap" {
        let gap: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
        eprintln!(
            "herald: gap: messages after id {} up to id {} are lost (expired or no longer kept)",
            gap["after"].as_str().unwrap_or("?"),
            gap["next"].as_str().unwrap_or("?")
        );
        return;
    }
    if event.event != "message" {
        return;
    }
    let message: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
    let message_type = message["type"].as_str().unwrap_or_default();
    let group = args.target.group.as_deref();
    if let Some(command) = &args.exec {
        run(
            command,
            &event.id,
            channel,
            group,
            message_type,
            &event.data,
        )
        .await;
        return;
    }
    let line = if args.json {
        let mut doc = Map::new();
        doc.insert("id".into(), Value::from(event.id.as_str()));
        if let Some(channel) = channel {
            doc.insert("channel".into(), Value::from(channel));
        }
        if let Some(group) = group {
            doc.insert("group".into(), Value::from(group));
        }
        doc.insert("message".into(), message);
        Value::Object(doc).to_string()
    } else {
        match (message_type, message["text"].as_str()) {
            ("text", Some(text)) => text.replace('\n', " "),
            _ => event.data.clone(),
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs `command` for one message, the message's JSON on its stdin, and waits for it.
async fn run(
    command: &str,
    id: &str,
    channel: Option<&str>,
    group: Option<&str>,
    message_type: &str,
    data: &str,
) {
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("HERALD_ID", id)
        .env("HERALD_CHANNEL", channel.unwrap_or_default())
        .env("HERALD_GROUP", group.unwrap_or_default())
        .env("HERALD_TYPE", message_type)
        .stdin(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!("herald: cannot run {command:?}: {e}");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        let _ = stdin.write_all(data.as_bytes()).await;
    }
    match child.wait().await {
        Ok(status) if !status.success() => {
            eprintln!("herald: {command:?} failed for message {id} ({status})");
        }
        Ok(_) => {}
        Err(e) => eprintln!("herald: waiting for {command:?}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_json_and_the_rest_is_text() {
        let Body::Json(map) = message_body(r#"{"type":"a","n":1}"#, None) else {
            panic!("an object is JSON");
        };
        assert_eq!(map["type"], "a");
        let Body::Json(map) = message_body(r#"{"n":1}"#, Some("b")) else {
            panic!("an object is JSON");
        };
        assert_eq!(
            (map["type"].as_str(), map["n"].as_u64()),
            (Some("b"), Some(1))
        );
        assert_eq!(
            message_body("disk full", None),
            Body::Text("disk full".into())
        );
        assert_eq!(message_body("42", None), Body::Text("42".into()));
        let Body::Json(map) = message_body("disk full", Some("alert")) else {
            panic!("typed text is JSON");
        };
        assert_eq!(map["text"], "disk full");
        assert_eq!(map["type"], "alert");
    }

    #[test]
    fn stats_are_flattened_in_order() {
        let mut rows = Vec::new();
        flatten(
            "",
            &serde_json::json!({"channels": 3, "connections": {"http": 1, "sse": 2}}),
            &mut rows,
        );
        let names: Vec<_> = rows.iter().map(|(n, v)| format!("{n}={v}")).collect();
        assert_eq!(
            names,
            ["channels=3", "connections.http=1", "connections.sse=2"]
        );
    }
}
