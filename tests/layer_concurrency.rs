//! Concurrency: competing senders and receivers, fairness, and cancelled receives.

mod layer_common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use layer_common::{TestLayer, msg, n_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn competing_receivers_get_every_message_exactly_once_in_sender_order() {
    const SENDERS: i64 = 8;
    const PER_SENDER: i64 = 250;
    const RECEIVERS: usize = 6;
    let t = TestLayer::with(|s| s.layer.capacity = 10_000);
    let mut receivers = Vec::new();
    for _ in 0..RECEIVERS {
        let layer = t.layer.clone();
        receivers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(d) = layer
                .receive("work", Duration::from_millis(500))
                .await
                .unwrap()
            {
                got.push((d.id, n_of(&d.message)));
            }
            got
        }));
    }
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let layer = t.layer.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..PER_SENDER {
                layer
                    .send("work", msg("t", s * 1_000_000 + i))
                    .await
                    .unwrap();
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    let mut all = Vec::new();
    for receiver in receivers {
        let got = receiver.await.unwrap();
        // Each receiver sees ids in increasing order (the queue is FIFO).
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
        all.extend(got);
    }
    assert_eq!(all.len() as i64, SENDERS * PER_SENDER, "every message once");
    let distinct: HashSet<i64> = all.iter().map(|(_, n)| *n).collect();
    assert_eq!(distinct.len(), all.len(), "no duplicates");
    // Per sender, ids follow the send order.
    all.sort();
    let mut last: HashMap<i64, i64> = HashMap::new();
    for (_, n) in all {
        let (sender, seq) = (n / 1_000_000, n % 1_000_000);
        let previous = last.insert(sender, seq);
        assert!(
            previous.is_none_or(|p| p < seq),
            "sender {sender}: {previous:?} then {seq}"
        );
    }
}

#[tokio::test]
async fn the_longest_waiting_receiver_gets_the_next_message() {
    let t = TestLayer::new();
    let mut waiting = Vec::new();
    for i in 0..5 {
        let layer = t.layer.clone();
        waiting.push(tokio::spawn(async move {
            let d = layer
                .receive("c", Duration::from_secs(5))
                .await
                .unwrap()
                .unwrap();
            (i, n_of(&d.message))
        }));
        // Let each receiver register before the next one.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..5 {
        t.layer.send("c", msg("t", n)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for handle in waiting {
        let (i, n) = handle.await.unwrap();
        assert_eq!(i, n, "receiver {i} got message {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_receives_never_consume_a_message() {
    const MESSAGES: i64 = 400;
    let t = TestLayer::with(|s| s.layer.capacity = 10_000);
    // Receivers that give up at random moments, racing with the sends.
    let mut cancelled = Vec::new();
    for r in 0..8u64 {
        let layer = t.layer.clone();
        cancelled.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..200u64 {
                let timeout = Duration::from_micros(50 + (i * 37 + r * 101) % 900);
                if let Ok(Ok(Some(d))) =
                    tokio::time::timeout(timeout, layer.receive("c", Duration::from_secs(10))).await
                {
                    got.push(n_of(&d.message));
                }
            }
            got
        }));
    }
    let sender = {
        let layer = t.layer.clone();
        tokio::spawn(async move {
            for n in 0..MESSAGES {
                layer.send("c", msg("t", n)).await.unwrap();
            }
        })
    };
    sender.await.unwrap();
    let mut seen = Vec::new();
    for handle in cancelled {
        seen.extend(handle.await.unwrap());
    }
    while let Some(d) = t.layer.receive("c", Duration::ZERO).await.unwrap() {
        seen.push(n_of(&d.message));
    }
    seen.sort();
    assert_eq!(
        seen,
        (0..MESSAGES).collect::<Vec<_>>(),
        "each message exactly once"
    );
}

#[tokio::test]
async fn a_timed_out_receive_leaves_the_line_and_the_message_for_the_next() {
    let t = TestLayer::new();
    assert!(
        t.layer
            .receive("c", Duration::from_millis(30))
            .await
            .unwrap()
            .is_none()
    );
    let layer = t.layer.clone();
    let patient = tokio::spawn(async move { layer.receive("c", Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    t.layer.send("c", msg("t", 1)).await.unwrap();
    let got = patient.await.unwrap().unwrap().unwrap();
    assert_eq!(n_of(&got.message), 1);
}
