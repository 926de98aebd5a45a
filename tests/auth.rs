//! Access control against the real server: every endpoint and WebSocket operation with
//! every kind of credential and every `default_access`, with the expected status and
//! nothing changed when refused; the Host and Origin rules; the refusal to start wide
//! open off loopback; `herald token`; and SIGHUP reloads and token expiry closing the
//! streams they no longer allow within a second.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value as Json, json};

const JWT_SECRET: &str = "jwt-test-secret";
const FULL: &str = "hrld_full-access-token";
const EMPTY: &str = "hrld_token-without-permissions";
const EXPIRED: &str = "hrld_expired-token";
const HALF: &str = "hrld_group-only-token";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 JWT with `claims`, signed with `secret`.
fn jwt(secret: &str, claims: Json) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A JWT valid for `secs` that may do everything.
fn full_jwt(secret: &str, secs: i64) -> String {
    jwt(
        secret,
        json!({"exp": now() as i64 + secs, "sub": "t",
               "herald": {"publish": ["*"], "subscribe": ["*"], "admin": true}}),
    )
}

/// The test configuration: the tokens above, the JWT secret, and `default_access`.
fn config(default_access: &str) -> String {
    format!(
        r#"[auth]
default_access = "{default_access}"
jwt_secret = "{JWT_SECRET}"

[[auth.tokens]]
name = "full"
hash = "{}"
publish = ["*"]
subscribe = ["*"]
admin = true

[[auth.tokens]]
name = "empty"
hash = "{}"

[[auth.tokens]]
name = "expired"
hash = "{}"
publish = ["*"]
subscribe = ["*"]
admin = true
expires = "2001-01-01T00:00:00Z"

[[auth.tokens]]
name = "half"
hash = "{}"
subscribe = ["group:*"]
"#,
        token_hash(FULL),
        token_hash(EMPTY),
        token_hash(EXPIRED),
        token_hash(HALF)
    )
}

/// What a request presents.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cred {
    None,
    Unknown,
    Expired,
    ExpiredJwt,
    BadSignature,
    Without,
    With,
    WithJwt,
}

impl Cred {
    const ALL: [Cred; 8] = [
        Cred::None,
        Cred::Unknown,
        Cred::Expired,
        Cred::ExpiredJwt,
        Cred::BadSignature,
        Cred::Without,
        Cred::With,
        Cred::WithJwt,
    ];

    fn token(self) -> Option<String> {
        match self {
            Cred::None => None,
            Cred::Unknown => Some("hrld_nobody-knows-this".into()),
            Cred::Expired => Some(EXPIRED.into()),
            Cred::ExpiredJwt => Some(full_jwt(JWT_SECRET, -5)),
            Cred::BadSignature => Some(full_jwt("another-secret", 3600)),
            Cred::Without => Some(EMPTY.into()),
            Cred::With => Some(FULL.into()),
            Cred::WithJwt => Some(full_jwt(JWT_SECRET, 3600)),
        }
    }
}

/// What an operation needs, to know what each `default_access` allows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Publish,
    Subscribe,
    Admin,
    Nothing,
}

/// One HTTP endpoint: method, path, body, what it needs and its success status.
struct Endpoint {
    method: &'static str,
    path: &'static str,
    kind: Kind,
    ok: u16,
}

const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "POST",
        path: "/v1/channels/t.c/messages",
        kind: Kind::Publish,
        ok: 202,
    },
    Endpoint {
        method: "POST",
        path: "/v1/groups/t.g/messages",
        kind: Kind::Publish,
        ok: 202,
    },
    Endpoint {
        method: "GET",
        path: "/v1/channels/t.seed/messages",
        kind: Kind::Subscribe,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/channels/t.seed/events",
        kind: Kind::Subscribe,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/groups/t.g/events?channel=t.m",
        kind: Kind::Subscribe,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/groups/t.new/events",
        kind: Kind::Subscribe,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/events?group=t.g&group=t.h&channel=t.m",
        kind: Kind::Subscribe,
        ok: 200,
    },
    Endpoint {
        method: "POST",
        path: "/v1/channels?prefix=t",
        kind: Kind::Subscribe,
        ok: 201,
    },
    Endpoint {
        method: "PUT",
        path: "/v1/groups/t.g/channels/t.x",
        kind: Kind::Subscribe,
        ok: 204,
    },
    Endpoint {
        method: "DELETE",
        path: "/v1/groups/t.g/channels/t.m",
        kind: Kind::Subscribe,
        ok: 204,
    },
    Endpoint {
        method: "POST",
        path: "/v1/flush",
        kind: Kind::Admin,
        ok: 204,
    },
    Endpoint {
        method: "GET",
        path: "/v1/admin/backup",
        kind: Kind::Admin,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/channels",
        kind: Kind::Admin,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/groups",
        kind: Kind::Admin,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/groups/t.g/channels",
        kind: Kind::Admin,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/stats",
        kind: Kind::Admin,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/v1/admin/tokens",
        kind: Kind::Admin,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/metrics",
        kind: Kind::Admin,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/healthz",
        kind: Kind::Nothing,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/readyz",
        kind: Kind::Nothing,
        ok: 200,
    },
    Endpoint {
        method: "GET",
        path: "/console",
        kind: Kind::Nothing,
        ok: 200,
    },
];

/// Sends `endpoint` with `cred` (as a Bearer header, or `?access_token=` for streams),
/// returning the status and, for errors, the checked error code.
async fn call(server: &Server, endpoint: &Endpoint, token: Option<&str>) -> (u16, Option<String>) {
    let stream = endpoint.path.contains("/events");
    let mut url = server.url(endpoint.path);
    let mut request = client().request(endpoint.method.parse().unwrap(), &url);
    if let Some(token) = token {
        if stream {
            let sep = if url.contains('?') { '&' } else { '?' };
            url = format!("{url}{sep}access_token={}", urlencode(token));
            request = client().request(endpoint.method.parse().unwrap(), &url);
        } else {
            request = request.bearer_auth(token);
        }
    }
    if endpoint.method == "POST" && endpoint.path.ends_with("/messages") {
        request = request
            .header("content-type", "application/json")
            .body(r#"{"type":"t"}"#);
    }
    let response = within(T, "a request", request.send()).await.unwrap();
    let status = response.status().as_u16();
    if status < 400 {
        return (status, None);
    }
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let (_, body) = json_of(response).await;
    let code = body["error"]["code"].as_str().unwrap().to_string();
    assert!(body["error"]["message"].is_string(), "{body}");
    if status == 401 {
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"herald\""));
    }
    (status, Some(code))
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The state refused requests must not change: pending channels and groups.
async fn snapshot(admin: &Api) -> Json {
    let channels = admin
        .http
        .get(admin.url("/v1/channels"))
        .send()
        .await
        .unwrap();
    let groups = admin
        .http
        .get(admin.url("/v1/groups"))
        .send()
        .await
        .unwrap();
    json!([json_of(channels).await.1, json_of(groups).await.1])
}

/// Empties the server and puts back a message on `t.seed` and `t.m` in `t.g`.
async fn reset(admin: &Api) {
    let flush = admin
        .http
        .post(admin.url("/v1/flush"))
        .send()
        .await
        .unwrap();
    assert_eq!(flush.status(), 204);
    admin.send("t.seed", &msg(1)).await;
    admin.group_add("t.g", "t.m").await;
}

/// The status `cred` gets for an operation of `kind` under `default_access`.
fn expected(kind: Kind, cred: Cred, default_access: &str, ok: u16) -> (u16, Option<&'static str>) {
    let by_default = matches!(
        (default_access, kind),
        (_, Kind::Nothing)
            | ("all", _)
            | ("publish", Kind::Publish)
            | ("subscribe", Kind::Subscribe)
    );
    match cred {
        _ if kind == Kind::Nothing => (ok, None),
        Cred::Unknown | Cred::Expired | Cred::ExpiredJwt | Cred::BadSignature => {
            (401, Some("unauthorized"))
        }
        Cred::With | Cred::WithJwt => (ok, None),
        _ if by_default => (ok, None),
        Cred::None => (401, Some("unauthorized")),
        Cred::Without => (403, Some("forbidden")),
    }
}

#[tokio::test]
async fn every_endpoint_with_every_credential_and_default_access() {
    for default_access in ["none", "publish", "subscribe", "all"] {
        let server = Server::start_with(&config(default_access)).await;
        let admin = Api::with_token(&server, FULL);
        for endpoint in ENDPOINTS {
            for cred in Cred::ALL {
                reset(&admin).await;
                let before = snapshot(&admin).await;
                let token = cred.token();
                let got = call(&server, endpoint, token.as_deref()).await;
                let (status, code) = expected(endpoint.kind, cred, default_access, endpoint.ok);
                let case = format!(
                    "{} {} with {cred:?}, default_access {default_access}",
                    endpoint.method, endpoint.path
                );
                assert_eq!(got, (status, code.map(str::to_string)), "{case}");
                if status >= 400 {
                    assert_eq!(snapshot(&admin).await, before, "{case} changed something");
                }
            }
        }
        // A token that only covers the group may not add another channel to it.
        let half = Endpoint {
            method: "PUT",
            path: "/v1/groups/t.g/channels/t.x",
            kind: Kind::Subscribe,
            ok: 204,
        };
        if default_access != "subscribe" && default_access != "all" {
            assert_eq!(
                call(&server, &half, Some(HALF)).await,
                (403, Some("forbidden".into()))
            );
        }
    }
}

/// The WebSocket operations, with what they need.
fn ws_ops() -> Vec<(Json, Kind)> {
    vec![
        (
            json!({"op": "send", "channel": "t.c", "message": {"type": "t"}}),
            Kind::Publish,
        ),
        (
            json!({"op": "group_send", "group": "t.g", "message": {"type": "t"}}),
            Kind::Publish,
        ),
        (
            json!({"op": "group_add", "group": "t.g", "channel": "t.x"}),
            Kind::Subscribe,
        ),
        (
            json!({"op": "group_discard", "group": "t.g", "channel": "t.m"}),
            Kind::Subscribe,
        ),
        (json!({"op": "new_channel", "prefix": "t"}), Kind::Subscribe),
        (
            json!({"op": "receive", "channel": "t.seed"}),
            Kind::Subscribe,
        ),
        (
            json!({"op": "subscribe", "channel": "t.seed"}),
            Kind::Subscribe,
        ),
    ]
}

#[tokio::test]
async fn every_websocket_op_with_every_credential_and_default_access() {
    for default_access in ["none", "publish", "subscribe", "all"] {
        let server = Server::start_with(&config(default_access)).await;
        let admin = Api::with_token(&server, FULL);
        for cred in Cred::ALL {
            let token = cred.token();
            // Presented with the upgrade: a bad token is refused there.
            let headers: Vec<(&str, String)> = token
                .iter()
                .map(|t| ("authorization", format!("Bearer {t}")))
                .collect();
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let upgrade = Ws::connect_with(&server.ws_url(), &headers).await;
            let mut ws = match (cred, upgrade) {
                (
                    Cred::Unknown | Cred::Expired | Cred::ExpiredJwt | Cred::BadSignature,
                    Err(status),
                ) => {
                    assert_eq!(status, 401, "{cred:?}");
                    // The same token in an auth frame is refused, and the socket stays open.
                    let mut ws = Ws::connect(&server).await;
                    let reply = ws
                        .call(json!({"op": "auth", "ref": 1, "token": token.clone().unwrap()}))
                        .await;
                    assert_eq!(
                        (
                            reply["op"].as_str(),
                            reply["code"].as_str(),
                            reply["ref"].as_i64()
                        ),
                        (Some("error"), Some("unauthorized"), Some(1)),
                        "{cred:?}"
                    );
                    ws
                }
                (_, Ok(ws)) => ws,
                (cred, Err(status)) => panic!("{cred:?}: upgrade refused with {status}"),
            };
            for (op, kind) in ws_ops() {
                reset(&admin).await;
                let before = snapshot(&admin).await;
                let (status, code) = expected(kind, cred, default_access, 200);
                // A refused token never became the connection's: it has none.
                let (status, code) = match cred {
                    Cred::Unknown | Cred::Expired | Cred::ExpiredJwt | Cred::BadSignature => {
                        expected(kind, Cred::None, default_access, 200)
                    }
                    _ => (status, code),
                };
                let reply = ws.call(op.clone()).await;
                let case = format!("{op} with {cred:?}, default_access {default_access}");
                if status == 200 {
                    assert_ne!(reply["op"], "error", "{case}: {reply}");
                    if op["op"] == "subscribe" {
                        ws.json().await; // the seed message
                        ws.call(json!({"op": "unsubscribe", "channel": "t.seed"}))
                            .await;
                    }
                } else {
                    assert_eq!(reply["op"], "error", "{case}: {reply}");
                    assert_eq!(reply["code"].as_str(), code, "{case}: {reply}");
                    assert_eq!(snapshot(&admin).await, before, "{case} changed something");
                }
            }
        }
        // An auth frame switches a connection's token for the operations after it.
        let mut ws = Ws::connect(&server).await;
        let op = json!({"op": "group_send", "group": "t.g", "message": {"type": "t"}});
        let denied = if default_access == "publish" || default_access == "all" {
            "ok"
        } else {
            "error"
        };
        assert_eq!(ws.call(op.clone()).await["op"], denied);
        assert_eq!(
            ws.call(json!({"op": "auth", "token": FULL})).await["op"],
            "ok"
        );
        assert_eq!(ws.call(op.clone()).await["op"], "ok");
        assert_eq!(
            ws.call(json!({"op": "auth", "token": EMPTY})).await["op"],
            "ok"
        );
        let reply = ws.call(op).await;
        if denied == "error" {
            assert_eq!(reply["code"], "forbidden", "{reply}");
        }
    }
}

#[tokio::test]
async fn host_and_origin_rules_apply_to_every_kind_of_request() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    api.send("o.c", &msg(1)).await;
    let http = client();

    // A cross-origin text/plain POST (a form or fetch from any web page) flushes nothing.
    refused(
        http.post(server.url("/v1/flush"))
            .header("origin", "http://evil.example")
            .header("content-type", "text/plain")
            .body("x"),
        403,
        "forbidden",
    )
    .await;
    assert_eq!(api.drain("o.c").await.len(), 1, "the flush did not run");

    for (method, path) in [
        ("POST", "/v1/channels/o.c/messages"),
        ("GET", "/v1/channels/o.c/messages"),
        ("GET", "/v1/channels/o.c/events"),
        ("GET", "/v1/groups/g/events"),
        ("GET", "/healthz"),
        ("GET", "/v1/nothing/here"),
    ] {
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("host", "evil.example"),
            ("host", &format!("rebound.example:{port}")),
        ] {
            refused(
                http.request(method.parse().unwrap(), server.url(path))
                    .header(name, value)
                    .body("x"),
                403,
                "forbidden",
            )
            .await;
        }
        // Loopback names and the server's own origin are fine.
        for host in ["localhost", "127.0.0.1", "[::1]"] {
            let response = http
                .request(method.parse().unwrap(), server.url(path))
                .header("host", format!("{host}:{port}"))
                .header("origin", format!("http://{host}:{port}"))
                .header("content-type", "application/json")
                .body(r#"{"type":"t"}"#)
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if let Ok(response) = response {
                assert_ne!(
                    response.status().as_u16(),
                    403,
                    "{method} {path} from {host}"
                );
            }
        }
    }
    assert!(api.drain("o.c").await.len() <= 3);

    // Event streams served without hyper and WebSocket upgrades too.
    let sse = Sse::open_any(
        &http,
        &server.url("/v1/channels/o.c/events"),
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(sse.status, 403);
    let ws = Ws::connect_with(&server.ws_url(), &[("origin", "http://evil.example")]).await;
    assert_eq!(ws.err(), Some(403));
    let own = format!("http://{}", server.addr);
    assert!(
        Ws::connect_with(&server.ws_url(), &[("origin", own.as_str())])
            .await
            .is_ok()
    );

    // CORS origins are allowed, preflights from them included; allowed_hosts replaces
    // the loopback names.
    let listed = Server::start_with(
        "[server]\ncors_origins = [\"https://app.example\"]\nallowed_hosts = [\"herald.example\"]\n",
    )
    .await;
    let preflight = http
        .request(
            reqwest::Method::OPTIONS,
            listed.url("/v1/channels/c/messages"),
        )
        .header("host", "herald.example")
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let send = http
        .post(listed.url("/v1/channels/c/messages"))
        .header("host", "herald.example:8443")
        .header("origin", "https://app.example")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(send.status(), 202);
    // The server's own origin needs no CORS entry.
    let own = http
        .post(listed.url("/v1/channels/c/messages"))
        .header("host", "herald.example:8443")
        .header("origin", "http://herald.example:8443")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 202);
    refused(http.get(listed.url("/healthz")), 403, "forbidden").await;
}

#[tokio::test]
async fn an_unprotected_server_off_loopback_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("herald token new") && stderr.contains("default_access"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "it stopped before opening the data dir"
    );

    // An explicit "all" starts, with a warning; so does a server with a token. (No
    // traffic goes to the non-loopback address.)
    let open = Server::start_with_args(
        Workdir::new(),
        "[auth]\ndefault_access = \"all\"\n",
        &["--listen", "0.0.0.0:0"],
    )
    .await;
    assert!(
        open.log()
            .lines()
            .any(|line| line.contains("WARN") && line.contains("default_access")),
        "{}",
        open.log()
    );
    let token = format!(
        "[[auth.tokens]]\nname = \"a\"\nhash = \"{}\"\n",
        token_hash(FULL)
    );
    let protected =
        Server::start_with_args(Workdir::new(), &token, &["--listen", "0.0.0.0:0"]).await;
    assert!(
        !protected
            .log()
            .lines()
            .any(|line| line.contains("WARN") && line.contains("default_access")),
        "{}",
        protected.log()
    );
}

#[tokio::test]
async fn token_new_and_token_jwt_print_what_the_server_accepts() {
    let herald = env!("CARGO_BIN_EXE_herald");
    let output = std::process::Command::new(herald)
        .args([
            "token",
            "new",
            "--name",
            "backend",
            "--publish",
            "channel:user.*",
            "--subscribe",
            "group:*",
            "--expires",
            "2099-01-01T00:00:00Z",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (secret, table) = stdout.split_once('\n').unwrap();
    assert!(
        secret.starts_with("hrld_") && secret.len() == 48,
        "{secret}"
    );
    let parsed: toml::Table = table.parse().unwrap();
    let entry = &parsed["auth"]["tokens"][0];
    assert_eq!(entry["name"].as_str(), Some("backend"));
    assert_eq!(entry["hash"].as_str(), Some(token_hash(secret).as_str()));
    assert_eq!(entry["expires"].as_str(), Some("2099-01-01T00:00:00Z"));

    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("jwt.secret");
    std::fs::write(&secret_file, format!("{JWT_SECRET}\n")).unwrap();
    let output = std::process::Command::new(herald)
        .args([
            "token",
            "jwt",
            "--sub",
            "42",
            "--subscribe",
            "channel:user.42",
            "--ttl",
            "1h",
            "--secret-file",
        ])
        .arg(&secret_file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let browser_jwt = String::from_utf8(output.stdout).unwrap().trim().to_string();

    // The printed table, pasted below the [auth] keys.
    let config = format!(
        "[auth]\njwt_secret = \"{JWT_SECRET}\"\n\n{table}\n[[auth.tokens]]\nname = \"admin\"\nhash = \"{}\"\nadmin = true\n",
        token_hash(FULL)
    );
    let server = Server::start_with(&config).await;
    let backend = Api::with_token(&server, secret);
    backend.send("user.42", &msg(1)).await;
    let forbidden = backend.send_raw("other", &msg(1)).await;
    assert_error(forbidden, 403, "forbidden").await;
    let browser = Api::with_token(&server, &browser_jwt);
    assert_eq!(
        browser.receive("user.42").await.map(|(_, m)| m),
        Some(msg(1))
    );
    refused(
        browser
            .http
            .get(browser.url("/v1/channels/user.43/messages")),
        403,
        "forbidden",
    )
    .await;

    // `herald backup` presents an admin token from a file.
    let dump = dir.path().join("dump.ndjson");
    let backup = |token_file: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(herald);
        command
            .args(["backup", "--url", &server.base, "--out"])
            .arg(&dump);
        if let Some(file) = token_file {
            command.arg("--token-file").arg(file);
        }
        command.output().unwrap()
    };
    let refused = backup(None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{refused:?}"
    );
    let admin_file = dir.path().join("admin.token");
    std::fs::write(&admin_file, format!("{FULL}\n")).unwrap();
    let done = backup(Some(&admin_file));
    assert!(done.status.success(), "{done:?}");
    assert!(
        std::fs::read_to_string(&dump)
            .unwrap()
            .contains("herald_dump")
    );

    let bad = std::process::Command::new(herald)
        .args(["token", "new", "--name", "x", "--publish", "user.42"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("channel:GLOB"));
}

/// An SSE stream of `channel` presenting `token`.
async fn stream(server: &Server, channel: &str, token: &str) -> Sse {
    let url = server.url(&format!(
        "/v1/channels/{channel}/events?access_token={}",
        urlencode(token)
    ));
    Sse::open(&client(), &url, &[]).await
}

/// A WebSocket subscribed to `channel` with `token`.
async fn ws_subscriber(server: &Server, channel: &str, token: &str) -> Ws {
    let mut ws = Ws::connect(server).await;
    assert_eq!(
        ws.call(json!({"op": "auth", "token": token})).await["op"],
        "ok"
    );
    assert_eq!(
        ws.call(json!({"op": "subscribe", "channel": channel}))
            .await["op"],
        "ok"
    );
    ws
}

/// Waits for the end of `sse`, returning how long it took.
async fn sse_end(sse: &mut Sse) -> Duration {
    let start = Instant::now();
    sse.until_end(Duration::from_secs(5))
        .await
        .expect("the stream ends");
    start.elapsed()
}

/// Waits for a close frame on `ws`, returning its code and how long it took.
async fn ws_close(ws: &mut Ws) -> (u16, Duration) {
    let start = Instant::now();
    loop {
        match ws
            .next_within(Duration::from_secs(5))
            .await
            .expect("a close frame")
        {
            WsIn::Close(code, _) => return (code, start.elapsed()),
            WsIn::End => panic!("the socket ended without a close frame"),
            _ => {}
        }
    }
}

#[tokio::test]
async fn sighup_reload_closes_what_the_new_settings_no_longer_allow() {
    let tokens = |a_channel: &str, with_a: bool| {
        let mut text = format!(
            "[auth]\n[[auth.tokens]]\nname = \"pub\"\nhash = \"{}\"\npublish = [\"*\"]\n\
             [[auth.tokens]]\nname = \"b\"\nhash = \"{}\"\nsubscribe = [\"channel:rev.b\"]\n",
            token_hash("hrld_pub"),
            token_hash("hrld_b")
        );
        if with_a {
            text += &format!(
                "[[auth.tokens]]\nname = \"a\"\nhash = \"{}\"\nsubscribe = [\"channel:{a_channel}\"]\n",
                token_hash("hrld_a")
            );
        }
        text
    };
    let server = Server::start_with(&tokens("rev.a*", true)).await;
    let file = server.work.dir.path().join("herald-0.toml");
    let publisher = Api::with_token(&server, "hrld_pub");
    let hangup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };

    let mut sse_a = stream(&server, "rev.a", "hrld_a").await;
    let mut sse_a2 = stream(&server, "rev.a2", "hrld_a").await;
    let mut sse_b = stream(&server, "rev.b", "hrld_b").await;
    let mut ws_a = ws_subscriber(&server, "rev.a", "hrld_a").await;
    let mut ws_b = ws_subscriber(&server, "rev.b", "hrld_b").await;

    // A narrower permission: the stream of rev.a2 loses it, the others keep theirs.
    std::fs::write(&file, tokens("rev.a", true)).unwrap();
    hangup();
    assert!(sse_end(&mut sse_a2).await < Duration::from_secs(1));
    // The token is removed: its streams end within a second, the others go on.
    std::fs::write(&file, tokens("rev.a", false)).unwrap();
    hangup();
    assert!(sse_end(&mut sse_a).await < Duration::from_secs(1));
    let (code, took) = ws_close(&mut ws_a).await;
    assert_eq!(code, 1008);
    assert!(took < Duration::from_secs(1), "{took:?}");
    publisher.send("rev.b", &msg(1)).await;
    publisher.send("rev.b", &msg(2)).await;
    let got: Vec<Json> = vec![
        sse_b.event().await.json(),
        ws_b.json().await["message"].clone(),
    ];
    assert!(got.contains(&msg(1)) && got.contains(&msg(2)), "{got:?}");
    let refused = Api::with_token(&server, "hrld_a")
        .send_raw("rev.a", &msg(1))
        .await;
    assert_error(refused, 401, "unauthorized").await;

    // A reload that fails validation keeps the settings in force.
    std::fs::write(
        &file,
        "[auth]\n[[auth.tokens]]\nname = \"x\"\nhash = \"sha256:00\"\n",
    )
    .unwrap();
    hangup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.log().contains("not reloaded"), "{}", server.log());
    publisher.send("rev.b", &msg(3)).await;
    assert_eq!(sse_b.event().await.json(), msg(3));
    assert!(!server.log().contains("hrld_"), "no token in the log");
}

#[tokio::test]
async fn streams_of_an_expiring_token_close_within_a_second_of_its_expiry() {
    let server = Server::start_with(&format!("[auth]\njwt_secret = \"{JWT_SECRET}\"\n")).await;
    let exp = now() + 2;
    let token = jwt(
        JWT_SECRET,
        json!({"exp": exp, "herald": {"subscribe": ["channel:exp.*"]}}),
    );
    let mut sse = stream(&server, "exp.sse", &token).await;
    let mut ws = ws_subscriber(&server, "exp.ws", &token).await;
    let lasting = full_jwt(JWT_SECRET, 3600);
    let mut other = stream(&server, "exp.other", &lasting).await;
    sse.until_end(Duration::from_secs(5))
        .await
        .expect("the stream ends");
    let ended = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (exp as f64 - 0.05..exp as f64 + 1.0).contains(&ended),
        "ended {:.2} s after expiry",
        ended - exp as f64
    );
    assert_eq!(ws_close(&mut ws).await.0, 1008);
    Api::with_token(&server, &lasting)
        .send("exp.other", &msg(1))
        .await;
    assert_eq!(other.event().await.json(), msg(1));
}
