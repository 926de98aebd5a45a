//! Disk space against a real server: `storage.max_disk_bytes` refuses publishes with
//! 507 `storage_full` (HTTP and WebSocket) and changes nothing, and the space of
//! expired or flushed messages comes back without new traffic (sled alone keeps the
//! files of large values until later writes; see `src/store/space.rs`).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value as Json, json};

const MIB: u64 = 1 << 20;

/// A message of about 1 MiB (under the 1 MiB `max_message_bytes` as msgpack).
fn large(n: u64) -> Json {
    json!({"type": "large", "n": n, "data": "x".repeat(1_040_000)})
}

/// The sum of the sizes of the files under `dir`, `blobs/` included.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Waits up to `t` for the data directory to be at most `bound` bytes; returns the
/// time it took, or panics with the sizes seen.
async fn shrinks_to(server: &Server, bound: u64, t: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let size = dir_bytes(&server.data_dir());
        if size <= bound {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < t,
            "the data directory still takes {} MiB after {t:?} (bound {} MiB)",
            size / MIB,
            bound / MIB
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_space_of_expired_large_messages_comes_back_without_traffic() {
    let server = Server::start_with("[layer]\nexpiry_secs = 1\n").await;
    let api = Api::new(&server);
    for n in 0..60 {
        api.send(&format!("big.{}", n % 10), &large(n)).await;
    }
    // Nothing is live once they expired: the bound is 2 × 0 + 64 MiB. Without the
    // store's reclaim, sled kept 188 MiB here for good.
    let took = shrinks_to(&server, 64 * MIB, Duration::from_secs(60)).await;
    eprintln!("back within 64 MiB {took:?} after the last send");
}

#[tokio::test]
async fn the_space_of_flushed_messages_comes_back_also_across_a_restart() {
    let mut server = Server::start().await;
    let api = Api::new(&server);
    for n in 0..60 {
        api.send("kept", &large(n)).await;
    }
    assert!(dir_bytes(&server.data_dir()) > 60 * MIB);
    let response = api.http.post(api.url("/v1/flush")).send().await.unwrap();
    assert_eq!(response.status(), 204);
    shrinks_to(&server, 64 * MIB, Duration::from_secs(60)).await;
    server.kill().await;
    let server = server.restart().await;
    assert!(dir_bytes(&server.data_dir()) <= 64 * MIB);
    Api::new(&server).assert_healthy().await;
}

#[tokio::test]
async fn publishes_past_max_disk_bytes_get_507_and_change_nothing() {
    let server = Server::start_with("[storage]\nmax_disk_bytes = 8388608\n").await;
    let api = Api::new(&server);
    api.group_add("all", "member").await;
    let mut accepted = 0;
    let first_refusal = loop {
        let response = api.send_raw("filling", &large(accepted)).await;
        if response.status() != 202 {
            break response;
        }
        accepted += 1;
        assert!(accepted < 20, "8 MiB hold fewer than 20 messages of 1 MiB");
    };
    assert!(accepted >= 3, "only {accepted} accepted");
    let body = assert_error(first_refusal, 507, "storage_full").await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_disk_bytes"),
        "{body}"
    );

    // Nothing changed: the refused message is not queued, and a group_send and a
    // WebSocket send are refused alike.
    refused(
        api.http
            .post(api.url("/v1/groups/all/messages"))
            .json(&large(99)),
        507,
        "storage_full",
    )
    .await;
    let mut ws = Ws::connect(&server).await;
    let reply = ws
        .call(json!({"op": "send", "ref": 1, "channel": "filling", "message": large(98)}))
        .await;
    assert_eq!(reply["op"], "error", "{reply}");
    assert_eq!(reply["code"], "storage_full", "{reply}");
    assert_eq!(reply["ref"], 1);
    assert_eq!(api.drain("member").await.len(), 0);
    let drained = api.drain("filling").await;
    assert_eq!(drained.len() as u64, accepted);
    for (n, (_, message)) in drained.iter().enumerate() {
        assert_eq!(message["n"], n as u64);
    }
    api.assert_healthy().await;
}
