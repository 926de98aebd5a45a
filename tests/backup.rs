//! Backup and restore: `herald export` of a stopped server's data dir, `herald backup`
//! of a running one, `herald import` into a new dir; the restored server shows the same
//! state (pending messages with their ids, memberships, what was already received).

mod common;

use std::path::Path;
use std::process::Output;

use common::{Api, Server, Workdir, msg, within};
use serde_json::Value as Json;

fn herald(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running herald")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `herald import` of the dump `file` into `work`'s data dir.
fn import_into(work: &Workdir, file: &Path) -> Output {
    herald(&["import", "--data-dir", path(&work.data_dir()), path(file)])
}

/// Everything a client can observe, in a comparable form; drains the channels.
async fn observe(server: &Server) -> (Vec<String>, Json, Vec<Vec<(String, Json)>>) {
    let api = Api::new(server);
    let members = api.members("room").await;
    let channels: Json = api
        .http
        .get(api.url("/v1/channels"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut drained = Vec::new();
    for channel in ["a", "b", "c", "direct"] {
        drained.push(api.drain(channel).await);
    }
    (members, channels, drained)
}

#[tokio::test]
async fn export_backup_and_import_restore_the_same_state() {
    let original = Workdir::new();
    let mut server = Server::start_in(original.clone(), "").await;
    let api = Api::new(&server);
    for n in 0..5 {
        api.send("direct", &msg(n)).await;
    }
    for channel in ["a", "b", "c"] {
        api.group_add("room", channel).await;
    }
    for n in 10..14 {
        api.group_send("room", &msg(n)).await;
    }
    // Received messages must not come back; a discarded member keeps what it got.
    api.receive("direct").await.unwrap();
    api.receive("a").await.unwrap();
    api.group_discard("room", "c").await;
    api.group_send("room", &msg(20)).await;

    // A live server's data dir is refused; its online backup works.
    let dumps = tempfile::tempdir().unwrap();
    let online = dumps.path().join("online.ndjson");
    let refused = herald(&["export", "--data-dir", path(&original.data_dir())]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("in use"), "{stderr}");
    let backup = herald(&["backup", "--url", &server.base, "--out", path(&online)]);
    assert!(backup.status.success(), "{backup:?}");

    server.shutdown(common::T).await;
    let offline = dumps.path().join("offline.ndjson");
    let export = herald(&[
        "export",
        "--data-dir",
        path(&original.data_dir()),
        "--out",
        path(&offline),
    ]);
    assert!(export.status.success(), "{export:?}");
    let header: Json = serde_json::from_str(
        std::fs::read_to_string(&offline)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kind"], "header");
    assert_eq!(header["herald_dump"], 2);

    let from_offline = Workdir::new();
    let import = herald(&[
        "import",
        "--data-dir",
        path(&from_offline.data_dir()),
        "--in",
        path(&offline),
    ]);
    assert!(import.status.success(), "{import:?}");
    let from_online = Workdir::new();
    let import = import_into(&from_online, &online);
    assert!(import.status.success(), "{import:?}");
    // Importing into a data dir that holds data is refused.
    let again = import_into(&from_online, &online);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let mut states = Vec::new();
    for work in [&original, &from_offline, &from_online] {
        let server = Server::start_in((*work).clone(), "").await;
        let state = observe(&server).await;
        // New ids follow the restored ones.
        let last_id = state
            .2
            .iter()
            .flatten()
            .map(|(id, _)| common::id_num(id))
            .max()
            .unwrap();
        let fresh = Api::new(&server).send("direct", &msg(99)).await;
        assert!(common::id_num(&fresh) > last_id);
        states.push(state);
    }
    let (members, _, drained) = &states[0];
    assert_eq!(members, &["a", "b"]);
    assert_eq!(
        drained[0].len(),
        4,
        "a: 5 group messages, minus the one received"
    );
    assert_eq!(
        drained[2].len(),
        4,
        "c keeps the group messages sent before its discard"
    );
    assert_eq!(drained[3].len(), 4, "direct: 5 sent, 1 received");
    assert_eq!(states[1], states[0], "restored from export");
    assert_eq!(states[2], states[0], "restored from online backup");
}

#[tokio::test]
async fn import_refuses_a_malformed_dump_with_the_line() {
    let dumps = tempfile::tempdir().unwrap();
    let bad = dumps.path().join("bad.ndjson");
    std::fs::write(
        &bad,
        "{\"kind\":\"header\",\"herald_dump\":1,\"format_version\":1,\"created_at_ms\":0,\"next_id\":5}\n{\"kind\":\"cursor\",\"channel\":\"bad name\",\"taken_upto\":1}\n",
    )
    .unwrap();
    let work = Workdir::new();
    let out = import_into(&work, &bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");

    std::fs::write(&bad, "{\"kind\":\"header\",\"herald_dump\":9,\"format_version\":1,\"created_at_ms\":0,\"next_id\":5}\n").unwrap();
    let work = Workdir::new();
    let out = import_into(&work, &bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 9"));

    // Message ids must ascend (they are stored in batches keyed by their first id).
    let message = |id: u64| {
        format!(
            "{{\"kind\":\"message\",\"id\":{id},\"sent_at_ms\":1,\"channel\":\"c\",\"skipped\":[],\"body\":\"gaR0eXBloXg=\"}}\n"
        )
    };
    let header = "{\"kind\":\"header\",\"herald_dump\":1,\"format_version\":2,\"created_at_ms\":0,\"next_id\":9}\n";
    std::fs::write(&bad, format!("{header}{}{}", message(7), message(3))).unwrap();
    let work = Workdir::new();
    let out = import_into(&work, &bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 3") && stderr.contains("ascend"),
        "{stderr}"
    );
    std::fs::write(&bad, format!("{header}{}{}", message(3), message(7))).unwrap();
    let work = Workdir::new();
    let out = import_into(&work, &bad);
    assert!(out.status.success(), "{out:?}");
}

/// Large enough that the dump of [`BULK`] of them is many times what loopback socket
/// buffers hold, so that the server is still reading its snapshot while the test
/// changes the state.
const BULK_BYTES: usize = 64 * 1024;
const BULK: u64 = 400;

#[tokio::test]
async fn a_backup_streams_the_state_of_its_start_while_changes_go_on() {
    let work = Workdir::new();
    let server = Server::start_in(
        work.clone(),
        "[layer]\ncapacity = 1000\n[storage]\ndurability = \"interval\"\n",
    )
    .await;
    let api = Api::new(&server);
    api.group_add("room", "a").await;
    api.group_add("room", "b").await;
    for n in 0..3 {
        api.group_send("room", &msg(n)).await;
    }
    // b keeps its three group messages: pins, stored after every message.
    api.group_discard("room", "b").await;
    let filler = "x".repeat(BULK_BYTES);
    let mut sent = Vec::new();
    for n in 0..BULK {
        let body = serde_json::json!({"type": "bulk", "n": n, "filler": filler});
        sent.push(api.send("bulk", &body).await);
    }

    let mut backup = api
        .http
        .get(api.url("/v1/admin/backup"))
        .send()
        .await
        .unwrap();
    assert_eq!(backup.status(), 200);
    let mut dump = backup.chunk().await.unwrap().unwrap().to_vec();
    // Past what the server read so far: new pins (a leaves with three messages), a
    // membership, messages; and a receive.
    api.group_discard("room", "a").await;
    api.group_add("room", "late").await;
    for n in 0..3 {
        api.send("bulk", &msg(100 + n)).await;
    }
    api.receive("bulk").await.unwrap();
    while let Some(chunk) = within(common::T * 4, "the backup", backup.chunk())
        .await
        .unwrap()
    {
        dump.extend_from_slice(&chunk);
    }
    let lines: Vec<Json> = String::from_utf8(dump)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of_kind = |kind: &'static str| lines.iter().filter(move |l| l["kind"] == kind);
    let ids: Vec<String> = of_kind("message")
        .map(|l| l["id"].as_u64().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3 + BULK as usize);
    assert_eq!(&ids[3..], &sent[..], "the messages sent before, none after");
    let members: Vec<&Json> = of_kind("membership").map(|l| &l["channel"]).collect();
    assert_eq!(members, ["a"]);
    let pinned: Vec<&Json> = of_kind("reference").map(|l| &l["channel"]).collect();
    assert_eq!(pinned, ["b", "b", "b"], "b's pins, not a's later ones");
    let end = lines.last().unwrap();
    assert_eq!(end["kind"], "end");
    assert_eq!(end["messages"], 3 + BULK);
    assert_eq!(end["references"], 3);

    // Restored, it is the state at the start: nothing of bulk was received then.
    let dumps = tempfile::tempdir().unwrap();
    let file = dumps.path().join("dump.ndjson");
    let text: Vec<String> = lines.iter().map(Json::to_string).collect();
    std::fs::write(&file, text.join("\n") + "\n").unwrap();
    let restored = Workdir::new();
    let import = import_into(&restored, &file);
    assert!(import.status.success(), "{import:?}");
    let server = Server::start_in(restored, "").await;
    let api = Api::new(&server);
    assert_eq!(api.members("room").await, ["a"]);
    assert_eq!(api.drain("b").await.len(), 3);
    assert_eq!(api.drain("a").await.len(), 3);
    let bulk: Vec<String> = api
        .drain("bulk")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(bulk, sent);

    // A flush while a backup streams interrupts it: its response ends cut short.
    let filler = "x".repeat(BULK_BYTES);
    for n in 0..BULK {
        let body = serde_json::json!({"type": "bulk", "n": n, "filler": filler});
        api.send(&format!("bulk.{}", n % 4), &body).await;
    }
    let mut backup = api
        .http
        .get(api.url("/v1/admin/backup"))
        .send()
        .await
        .unwrap();
    backup.chunk().await.unwrap().unwrap();
    let flush = api.http.post(api.url("/v1/flush")).send().await.unwrap();
    assert_eq!(flush.status(), 204);
    let mut ended = None;
    while ended.is_none() {
        match within(common::T * 4, "the backup", backup.chunk()).await {
            Ok(Some(_)) => {}
            Ok(None) => ended = Some(Ok(())),
            Err(e) => ended = Some(Err(e)),
        }
    }
    assert!(
        ended.unwrap().is_err(),
        "the interrupted backup ended as if complete"
    );
}

#[tokio::test]
async fn import_refuses_a_dump_cut_short() {
    let server = Server::start().await;
    let api = Api::new(&server);
    for n in 0..3 {
        api.send("c", &msg(n)).await;
    }
    let dump = api
        .http
        .get(api.url("/v1/admin/backup"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = dump.lines().collect();
    assert!(lines.last().unwrap().contains("\"kind\":\"end\""), "{dump}");
    let dumps = tempfile::tempdir().unwrap();
    let file = dumps.path().join("cut.ndjson");
    let import = |text: String| {
        std::fs::write(&file, text).unwrap();
        import_into(&Workdir::new(), &file)
    };
    let cut = import(lines[..lines.len() - 1].join("\n"));
    assert!(!cut.status.success());
    assert!(
        String::from_utf8_lossy(&cut.stderr).contains("cut short"),
        "{cut:?}"
    );
    // A line dropped from the middle: the end line's counts tell.
    let mut altered = lines.clone();
    altered.remove(2);
    let altered = import(altered.join("\n"));
    assert!(!altered.status.success());
    assert!(
        String::from_utf8_lossy(&altered.stderr).contains("end line"),
        "{altered:?}"
    );
    assert!(import(dump).status.success());
}
