//! In-process route tests (`warp::test`): the HTTP mapping of every route (methods,
//! paths, status codes, error documents, content negotiation, access control) checked
//! against the real routes and layer, without starting a server process.

use std::path::Path;

use bytes::Bytes;
use serde_json::{Value as Json, json};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::Response;
use warp::reply::Response as Reply;

use herald::config::Settings;
use herald::http::{Api, routes};

/// The routes over a fresh layer in a temporary data directory, with `config` (TOML)
/// over the built-in defaults. The directory lives as long as the returned guard.
async fn app(config: &str) -> (BoxedFilter<(Reply,)>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), config);
    let layer = herald::server::open_layer(&settings).await.unwrap();
    let api = Api::new(layer, &settings, CancellationToken::new()).unwrap();
    (routes(api).boxed(), dir)
}

fn settings(dir: &Path, config: &str) -> Settings {
    let file = dir.join("herald.toml");
    let data_dir = dir.join("data");
    let toml = format!(
        "[storage]\ndata_dir = {:?}\n{config}",
        data_dir.to_str().unwrap()
    );
    std::fs::write(&file, toml).unwrap();
    Settings::load(Some(&file)).unwrap()
}

/// A request from a loopback client, as the server's own accept loop sees one.
fn request(method: &str, path: &str) -> warp::test::RequestBuilder {
    warp::test::request()
        .method(method)
        .path(path)
        .header("host", "127.0.0.1:8080")
        .remote_addr("127.0.0.1:40000".parse().unwrap())
}

fn json_body(response: &Response<Bytes>) -> Json {
    serde_json::from_slice(response.body())
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", response.body()))
}

/// Asserts that `response` is the error `status`/`code` with a JSON error document.
#[track_caller]
fn assert_refused(response: &Response<Bytes>, status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status, "{:?}", response.body());
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "errors are JSON"
    );
    let doc = json_body(response);
    assert_eq!(doc["error"]["code"], code, "{doc}");
    assert!(
        doc["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error says what went wrong: {doc}"
    );
}

#[tokio::test]
async fn send_is_202_with_the_id_and_receive_returns_the_message_then_204() {
    let (app, _dir) = app("").await;
    let sent = request("POST", "/v1/channels/a/messages")
        .json(&json!({"type": "chat.message", "text": "hi"}))
        .reply(&app)
        .await;
    assert_eq!(sent.status(), 202);
    let doc = json_body(&sent);
    assert_eq!(doc["channel"], "a");
    let id = doc["id"].as_str().expect("the id is a string").to_string();

    let received = request("GET", "/v1/channels/a/messages").reply(&app).await;
    assert_eq!(received.status(), 200);
    let doc = json_body(&received);
    assert_eq!(doc["id"], id.as_str());
    assert_eq!(
        doc["message"],
        json!({"type": "chat.message", "text": "hi"})
    );

    let empty = request("GET", "/v1/channels/a/messages").reply(&app).await;
    assert_eq!(empty.status(), 204);
    assert!(empty.body().is_empty());
}

#[tokio::test]
async fn accept_msgpack_answers_msgpack_and_errors_stay_json() {
    let (app, _dir) = app("").await;
    let sent = request("POST", "/v1/channels/m/messages")
        .header("accept", "application/msgpack")
        .json(&json!({"type": "t", "n": 1}))
        .reply(&app)
        .await;
    assert_eq!(sent.status(), 202);
    assert_eq!(sent.headers()["content-type"], "application/msgpack");
    let doc: rmpv::Value = rmpv::decode::read_value(&mut &sent.body()[..]).unwrap();
    let channel = doc
        .as_map()
        .unwrap()
        .iter()
        .find(|(k, _)| k.as_str() == Some("channel"))
        .map(|(_, v)| v.as_str().unwrap().to_string());
    assert_eq!(channel.as_deref(), Some("m"));

    let refused = request("POST", "/v1/channels/m/messages")
        .header("accept", "application/msgpack")
        .header("content-type", "application/json")
        .body("{")
        .reply(&app)
        .await;
    assert_refused(&refused, 400, "invalid_body");
}

#[tokio::test]
async fn bad_names_messages_and_parameters_are_400_with_their_codes() {
    let (app, _dir) = app("").await;
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        (
            "POST",
            "/v1/channels/a%20b/messages",
            Some(r#"{"type":"t"}"#),
            "invalid_name",
        ),
        ("PUT", "/v1/groups/a%21b/channels/c", None, "invalid_name"),
        (
            "POST",
            "/v1/channels/a/messages",
            Some(r#"{"no":"type"}"#),
            "invalid_message",
        ),
        (
            "POST",
            "/v1/channels/a/messages",
            Some(r#"{"type":"#),
            "invalid_body",
        ),
        (
            "GET",
            "/v1/channels/a/messages?wait=abc",
            None,
            "invalid_parameter",
        ),
        (
            "GET",
            "/v1/channels/a/messages?wait=-1",
            None,
            "invalid_parameter",
        ),
    ];
    for &(method, path, body, code) in cases {
        let mut builder = request(method, path);
        if let Some(body) = body {
            builder = builder
                .header("content-type", "application/json")
                .body(body);
        }
        let response = builder.reply(&app).await;
        assert_refused(&response, 400, code);
    }
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_are_405() {
    let (app, _dir) = app("").await;
    for path in ["/", "/v1/nothing", "/v2/channels/a/messages"] {
        assert_refused(&request("GET", path).reply(&app).await, 404, "not_found");
    }
    for (method, path) in [
        ("PATCH", "/v1/channels/a/messages"),
        ("PUT", "/v1/channels/a/messages"),
        ("GET", "/v1/flush"),
        ("POST", "/healthz"),
    ] {
        let response = request(method, path).reply(&app).await;
        assert_refused(&response, 405, "method_not_allowed");
    }
}

#[tokio::test]
async fn a_full_channel_is_429_channel_full_with_retry_after() {
    let (app, _dir) = app("[layer]\ncapacity = 1\n").await;
    let send = || {
        request("POST", "/v1/channels/full/messages")
            .json(&json!({"type": "t"}))
            .reply(&app)
    };
    assert_eq!(send().await.status(), 202);
    let refused = send().await;
    assert_refused(&refused, 429, "channel_full");
    assert!(refused.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn an_oversized_message_is_413_message_too_large() {
    let (app, _dir) = app("[layer]\nmax_message_bytes = 1024\n").await;
    let big = json!({"type": "t", "pad": "x".repeat(4096)});
    let response = request("POST", "/v1/channels/big/messages")
        .json(&big)
        .reply(&app)
        .await;
    assert_refused(&response, 413, "message_too_large");
}

#[tokio::test]
async fn group_routes_add_list_send_and_discard() {
    let (app, _dir) = app("").await;
    for channel in ["x", "y"] {
        let added = request("PUT", &format!("/v1/groups/g/channels/{channel}"))
            .reply(&app)
            .await;
        assert_eq!(added.status(), 204, "{:?}", added.body());
    }
    let members = request("GET", "/v1/groups/g/channels").reply(&app).await;
    assert_eq!(members.status(), 200);
    let members = json_body(&members);
    let mut names: Vec<&str> = members["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("a channel list: {members}"))
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["x", "y"]);

    let sent = request("POST", "/v1/groups/g/messages")
        .json(&json!({"type": "t"}))
        .reply(&app)
        .await;
    assert_eq!(sent.status(), 202);
    assert_eq!(json_body(&sent)["delivered"], 2);

    let discarded = request("DELETE", "/v1/groups/g/channels/x")
        .reply(&app)
        .await;
    assert_eq!(discarded.status(), 204);
    let sent = request("POST", "/v1/groups/g/messages")
        .json(&json!({"type": "t"}))
        .reply(&app)
        .await;
    assert_eq!(json_body(&sent)["delivered"], 1);
}

#[tokio::test]
async fn with_tokens_required_a_missing_token_is_401_and_a_narrow_one_403() {
    let reader = "reader-secret-0123456789abcdef";
    let config = format!(
        "[auth]\ndefault_access = \"none\"\n\n[[auth.tokens]]\nname = \"reader\"\nhash = \"{}\"\nsubscribe = [\"*\"]\n",
        sha256_hash(reader)
    );
    let (app, _dir) = app(&config).await;
    let publish = |token: Option<&str>| {
        let mut builder = request("POST", "/v1/channels/a/messages").json(&json!({"type": "t"}));
        if let Some(token) = token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        builder.reply(&app)
    };
    assert_refused(&publish(None).await, 401, "unauthorized");
    assert_refused(&publish(Some("wrong")).await, 401, "unauthorized");
    assert_refused(&publish(Some(reader)).await, 403, "forbidden");
    let receive = request("GET", "/v1/channels/a/messages")
        .header("authorization", format!("Bearer {reader}"))
        .reply(&app)
        .await;
    assert_eq!(receive.status(), 204);
}

/// The `hash` of an opaque token in `[[auth.tokens]]`.
fn sha256_hash(token: &str) -> String {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[tokio::test]
async fn healthz_answers_ok() {
    let (app, _dir) = app("").await;
    let response = request("GET", "/healthz").reply(&app).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn refusals_quote_at_most_64_bytes_of_what_the_client_sent() {
    let (app, _dir) = app("").await;
    let huge = "9x".repeat(50_000);
    let stream = request("GET", "/v1/channels/c/events")
        .header("last-event-id", &huge)
        .reply(&app)
        .await;
    // A URI has a length limit of its own.
    let wait = request(
        "GET",
        &format!("/v1/channels/c/messages?wait={}", &huge[..1000]),
    )
    .reply(&app)
    .await;
    for response in [stream, wait] {
        assert_refused(&response, 400, "invalid_parameter");
        let message = json_body(&response)["error"]["message"].to_string();
        assert!(message.contains(&"9x".repeat(32)), "{message}");
        assert!(!message.contains(&"9x".repeat(33)), "{message}");
        assert!(response.body().len() < 300, "{}", response.body().len());
    }
}

#[tokio::test]
async fn listings_are_paged_with_limit_and_after() {
    let (app, _dir) = app("").await;
    for n in 0..5 {
        let sent = request("POST", &format!("/v1/channels/c{n}/messages"))
            .json(&json!({"type": "t"}))
            .reply(&app)
            .await;
        assert_eq!(sent.status(), 202);
        let added = request("PUT", &format!("/v1/groups/g{n}/channels/c{n}"))
            .reply(&app)
            .await;
        assert_eq!(added.status(), 204);
        let added = request("PUT", &format!("/v1/groups/all/channels/c{n}"))
            .reply(&app)
            .await;
        assert_eq!(added.status(), 204);
    }
    let first = json_body(&request("GET", "/v1/channels?limit=2").reply(&app).await);
    assert_eq!(first["channels"][0]["name"], "c0");
    assert_eq!(first["channels"][0]["pending"], 1);
    assert_eq!(first["channels"].as_array().unwrap().len(), 2);
    assert_eq!(first["next"], "c1");
    let last = json_body(
        &request("GET", "/v1/channels?limit=2&after=c2")
            .reply(&app)
            .await,
    );
    assert_eq!(last["channels"].as_array().unwrap().len(), 2);
    assert_eq!(last.get("next"), None, "{last}");
    let default = json_body(&request("GET", "/v1/channels").reply(&app).await);
    assert_eq!(default["channels"].as_array().unwrap().len(), 5);
    assert_eq!(default.get("next"), None, "{default}");

    let members = json_body(
        &request("GET", "/v1/groups/all/channels?limit=3&after=c0")
            .reply(&app)
            .await,
    );
    assert_eq!(
        members,
        json!({"group": "all", "channels": ["c1", "c2", "c3"], "next": "c3"})
    );
    let groups = json_body(&request("GET", "/v1/groups?after=g3").reply(&app).await);
    assert_eq!(
        groups,
        json!({"groups": [{"name": "g4", "members": ["c4"]}]})
    );
    let cut = json_body(&request("GET", "/v1/groups?limit=5000").reply(&app).await);
    assert_eq!(
        cut["groups"].as_array().unwrap().len(),
        6,
        "a limit past 1000 is cut"
    );

    for bad in ["0", "-1", "many", "1.5"] {
        for path in ["/v1/channels", "/v1/groups", "/v1/groups/all/channels"] {
            let refused = request("GET", &format!("{path}?limit={bad}"))
                .reply(&app)
                .await;
            assert_refused(&refused, 400, "invalid_parameter");
        }
    }
}
