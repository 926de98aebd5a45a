//! `herald publish`, `herald subscribe` and `herald stats` against the real server:
//! what they send, print and exit with, and a subscribe that outlives a server restart.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// `herald ARGS` with no `HERALD_` variables from the test's environment.
fn herald(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    command
}

/// Runs `herald ARGS` (with `stdin` on its standard input) to the end.
async fn run(command: &mut Command, stdin: &str) -> (i32, String, String) {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running herald");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let output = within(T, "herald to finish", child.wait_with_output())
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

#[tokio::test]
async fn publish_sends_text_json_or_standard_input_and_prints_the_id() {
    let server = Server::start().await;
    let api = Api::new(&server);
    let url = server.base.as_str();
    let cases: [(&[&str], &str, Json); 4] = [
        (
            &["hello there"],
            "",
            json!({"type": "text", "text": "hello there"}),
        ),
        (&[r#"{"type":"x","n":1}"#], "", json!({"type": "x", "n": 1})),
        (
            &["--type", "t", "-"],
            "{\"n\":2}\n",
            json!({"type": "t", "n": 2}),
        ),
        (
            &["--type", "alert"],
            "disk full\n",
            json!({"type": "alert", "text": "disk full"}),
        ),
    ];
    for (args, stdin, want) in cases {
        let mut command = herald(&["publish", "--channel", "cli.c"]);
        // The address from the environment, as from --url.
        command.args(args).env("HERALD_URL", url);
        let (code, out, err) = run(&mut command, stdin).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        let (id, message) = api.receive("cli.c").await.expect("the message arrived");
        assert_eq!(out.trim(), id, "{args:?} prints the id");
        assert_eq!(message, want, "{args:?}");
    }
    api.group_add("cli.g", "cli.member").await;
    let (code, out, err) = run(
        &mut herald(&[
            "publish",
            "--url",
            url,
            "--group",
            "cli.g",
            r#"{"type":"g"}"#,
        ]),
        "",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "delivered 1 full 0\n"), "{err}");
    let (_, message) = api.receive("cli.member").await.unwrap();
    assert_eq!(message, json!({"type": "g"}));
}

#[tokio::test]
async fn refusals_print_the_servers_code_and_message_and_exit_1() {
    const TOKEN: &str = "hrld_cli-publisher";
    let hash = token_hash(TOKEN);
    let server = Server::start_with(&format!(
        "[auth]\ndefault_access = \"none\"\n[[auth.tokens]]\nname = \"p\"\nhash = \"{hash}\"\npublish = [\"channel:ok.*\"]\n"
    ))
    .await;
    let url = server.base.as_str();
    let publish = |args: &[&str]| {
        let mut command = herald(&["publish", "--url", url]);
        command.args(args);
        command
    };
    let (code, out, err) = run(&mut publish(&["--channel", "ok.a", "x"]), "").await;
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.starts_with("herald: unauthorized: "), "{err}");
    let mut with_token = publish(&["--channel", "other", "x"]);
    with_token.env("HERALD_TOKEN", TOKEN);
    let (code, _, err) = run(&mut with_token, "").await;
    assert_eq!(code, 1);
    assert!(err.starts_with("herald: forbidden: "), "{err}");
    let (code, _, err) = run(
        &mut publish(&["--token", TOKEN, "--channel", "ok.bad name", "x"]),
        "",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.starts_with("herald: invalid_name: "), "{err}");
    let (code, out, err) = run(
        &mut publish(&["--token", TOKEN, "--channel", "ok.a", "x"]),
        "",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(!out.trim().is_empty());
    // Nothing listens there.
    let (code, _, err) = run(
        &mut herald(&[
            "publish",
            "--url",
            "http://127.0.0.1:9",
            "--channel",
            "a",
            "x",
        ]),
        "",
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot reach"), "{err}");
}

/// A running `herald subscribe`, read line by line.
struct Subscriber {
    child: Child,
    out: Lines<BufReader<ChildStdout>>,
    err: Lines<BufReader<ChildStderr>>,
}

impl Subscriber {
    fn start(args: &[&str]) -> Subscriber {
        let mut child = herald(&["subscribe"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running herald subscribe");
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        let err = BufReader::new(child.stderr.take().unwrap()).lines();
        Subscriber { child, out, err }
    }

    async fn line(&mut self) -> String {
        within(T, "a line from herald subscribe", self.out.next_line())
            .await
            .unwrap()
            .expect("herald subscribe is still running")
    }

    /// The next stderr line that contains `text`.
    async fn said(&mut self, text: &str) -> String {
        within(T, "a notice from herald subscribe", async {
            loop {
                let line = self.err.next_line().await.unwrap().expect("stderr open");
                if line.contains(text) {
                    return line;
                }
            }
        })
        .await
    }

    /// Ctrl-C: it stops at once, with status 0.
    async fn interrupt(mut self) {
        let pid = self.child.id().unwrap().to_string();
        let status = std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap();
        assert!(status.success());
        let status = within(T, "herald subscribe to stop", self.child.wait())
            .await
            .unwrap();
        assert!(status.success(), "{status:?}");
    }
}

/// Waits until `channel` has a receiver (the subscriber's stream is open).
async fn until_streaming(server: &Server, channel: &str) {
    within(T, "the subscriber's stream", async {
        loop {
            let (_, page) = json_of(fetch(client().get(server.url("/v1/channels"))).await).await;
            let listed =
                page["channels"].as_array().unwrap().iter().any(|c| {
                    c["name"] == channel && c["receivers_waiting"].as_u64().unwrap_or(0) > 0
                });
            if listed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn subscribe_prints_each_message_and_resumes_across_a_server_restart() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let work = Workdir::new();
    let mut server = Server::start_with_args(work.clone(), "", &["--listen", &listen]).await;
    let api = Api::new(&server);
    let mut subscriber = Subscriber::start(&["--url", &server.base, "--channel", "cli.s"]);
    until_streaming(&server, "cli.s").await;
    api.send("cli.s", &json!({"type": "text", "text": "one"}))
        .await;
    api.send("cli.s", &json!({"type": "n", "n": 2})).await;
    assert_eq!(subscriber.line().await, "one");
    assert_eq!(subscriber.line().await, r#"{"type":"n","n":2}"#);

    assert!(server.shutdown(T).await.success());
    subscriber.said("disconnected").await;
    let server = Server::start_with_args(work, "", &["--listen", &listen]).await;
    let api = Api::new(&server);
    // Sent before the subscriber is back: it waits in the channel.
    api.send("cli.s", &json!({"type": "text", "text": "three"}))
        .await;
    subscriber.said("reconnected, resuming after id").await;
    api.send("cli.s", &json!({"type": "text", "text": "four"}))
        .await;
    // Nothing twice, nothing lost.
    assert_eq!(subscriber.line().await, "three");
    assert_eq!(subscriber.line().await, "four");
    subscriber.interrupt().await;
}

#[tokio::test]
async fn subscribe_json_exec_and_gaps() {
    let server = Server::start_with(
        "[storage]\nsweep_interval_ms = 100\n[layer.channel_expiry]\n\"short.*\" = 1\n",
    )
    .await;
    let api = Api::new(&server);
    let url = server.base.as_str();

    let mut json_out =
        Subscriber::start(&["--url", url, "--group", "cli.g", "--as", "cli.j", "--json"]);
    let work = Workdir::new();
    let file = work.dir.path().join("exec.out");
    let script = format!(
        r#"printf '%s|%s|%s|%s|' "$HERALD_ID" "$HERALD_CHANNEL" "$HERALD_GROUP" "$HERALD_TYPE" >> {0}; cat >> {0}; echo >> {0}"#,
        file.display()
    );
    let exec = Subscriber::start(&["--url", url, "--channel", "cli.x", "--exec", &script]);
    until_streaming(&server, "cli.j").await;
    until_streaming(&server, "cli.x").await;
    let (delivered, _) = api
        .group_send("cli.g", &json!({"type": "g.m", "n": 1}))
        .await;
    assert_eq!(delivered, 1);
    let line: Json = serde_json::from_str(&json_out.line().await).unwrap();
    let id = line["id"].as_str().unwrap().to_string();
    assert_eq!(
        line,
        json!({"id": id, "channel": "cli.j", "group": "cli.g", "message": {"type": "g.m", "n": 1}})
    );
    let first = api.send("cli.x", &json!({"type": "job", "n": 1})).await;
    let second = api.send("cli.x", &json!({"type": "job", "n": 2})).await;
    let written = within(T, "the commands to run", async {
        loop {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            // Both commands have finished their line.
            if text.lines().count() == 2 && text.ends_with('\n') {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        written,
        format!(
            "{first}|cli.x||job|{{\"type\":\"job\",\"n\":1}}\n{second}|cli.x||job|{{\"type\":\"job\",\"n\":2}}\n"
        )
    );
    json_out.interrupt().await;
    exec.interrupt().await;

    // Resuming after messages that expired unreceived: a gap notice on stderr.
    let before = api.send("short.q", &json!({"type": "a"})).await;
    assert!(api.receive("short.q").await.is_some());
    api.send("short.q", &json!({"type": "lost"})).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut resumed = Subscriber::start(&[
        "--url",
        url,
        "--channel",
        "short.q",
        "--last-event-id",
        &before,
    ]);
    let gap = resumed.said("gap").await;
    assert!(gap.contains(&format!("after id {before}")), "{gap}");
    resumed.interrupt().await;
}

#[tokio::test]
async fn stats_prints_the_figures_as_a_table() {
    let server = Server::start().await;
    let api = Api::new(&server);
    api.send("cli.t", &msg(1)).await;
    api.send("cli.t", &msg(2)).await;
    let (code, out, err) = run(&mut herald(&["stats", "--url", &server.base]), "").await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<(&str, &str)> = out
        .lines()
        .map(|line| line.split_once(char::is_whitespace).unwrap())
        .map(|(name, value)| (name, value.trim()))
        .collect();
    assert!(rows.contains(&("pending_messages", "2")), "{out}");
    assert!(rows.contains(&("channels", "1")), "{out}");
    assert!(rows.contains(&("published.send", "2")), "{out}");
}
