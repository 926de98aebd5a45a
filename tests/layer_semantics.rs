//! Each channel-layer rule, with every refusal and its error.

mod layer_common;

use std::time::Duration;

use herald::layer::{Error, Gap, GroupSendReport, PageRequest};
use herald::message::Message;
use layer_common::{ALL, TestLayer, members, msg, n_of, take};

fn assert_invalid_name<T: std::fmt::Debug>(result: Result<T, Error>, expected: &str) {
    match result {
        Err(Error::InvalidName(e)) => assert!(e.to_string().contains(expected), "{e}"),
        other => panic!("expected invalid_name mentioning {expected:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn every_operation_checks_names() {
    let t = TestLayer::new();
    let l = &t.layer;
    assert_invalid_name(l.send("bad name", msg("t", 1)).await, "may only contain");
    assert_invalid_name(l.send("", msg("t", 1)).await, "empty");
    assert_invalid_name(l.send(&"c".repeat(100), msg("t", 1)).await, "99");
    assert_invalid_name(l.send("a!b!c", msg("t", 1)).await, "'!'");
    assert_invalid_name(l.receive("x\ny", Duration::ZERO).await, "may only contain");
    assert_invalid_name(l.group_add("g!", "c").await, "group name");
    assert_invalid_name(l.group_add("g", "é").await, "channel name");
    assert_invalid_name(l.group_discard("g g", "c").await, "group name");
    assert_invalid_name(l.group_send(&"g".repeat(100), msg("t", 1)).await, "99");
    assert_invalid_name(l.group_members("a/b", ALL), "group name");
    assert_invalid_name(l.new_channel("a!"), "'!'");
    assert_invalid_name(l.new_channel(&"p".repeat(90)), "invalid name");
    // Accepted forms, including Django's process-local `!` channels.
    l.send("specific.abc!def", msg("t", 1)).await.unwrap();
    l.send("x!", msg("t", 1)).await.unwrap();
    l.send(&"c".repeat(99), msg("t", 1)).await.unwrap();
}

#[tokio::test]
async fn oversized_messages_are_refused_and_change_nothing() {
    let t = TestLayer::with(|s| s.layer.max_message_bytes = 64);
    let big = Message::text(&"x".repeat(100));
    match t.layer.send("c", big.clone()).await {
        Err(Error::MessageTooLarge { size, limit }) => {
            assert_eq!(limit, 64);
            assert!(size > 100);
        }
        other => panic!("{other:?}"),
    }
    t.layer.group_add("g", "c").await.unwrap();
    assert!(matches!(
        t.layer.group_send("g", big).await,
        Err(Error::MessageTooLarge { .. })
    ));
    assert_eq!(t.layer.pending("c"), 0);
}

#[tokio::test]
async fn send_is_fifo_with_growing_ids() {
    let t = TestLayer::new();
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(t.layer.send("q", msg("t", n)).await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for (n, id) in ids.iter().enumerate() {
        assert_eq!(take(&t.layer, "q").await, Some((*id, n as i64)));
    }
    assert_eq!(take(&t.layer, "q").await, None);
}

#[tokio::test]
async fn messages_come_back_identical() {
    let t = TestLayer::new();
    let value = rmpv::Value::Map(vec![
        ("type".into(), "x.y".into()),
        ("z".into(), rmpv::Value::from(u64::MAX)),
        ("a".into(), rmpv::Value::F64(1.0)),
        ("i".into(), rmpv::Value::from(-7)),
        ("b".into(), rmpv::Value::Binary(vec![0, 255])),
        ("nil".into(), rmpv::Value::Nil),
    ]);
    let sent = Message::from_value(&value).unwrap();
    t.layer.send("c", sent.clone()).await.unwrap();
    let t = t.restart();
    let got = t.layer.receive("c", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(got.message.msgpack(), sent.msgpack());
    assert_eq!(got.message.value(), value);
}

#[tokio::test]
async fn a_full_channel_refuses_and_changes_nothing() {
    let t = TestLayer::new();
    for n in 0..100 {
        t.layer.send("c", msg("t", n)).await.unwrap();
    }
    match t.layer.send("c", msg("t", 100)).await {
        Err(Error::ChannelFull { channel, capacity }) => {
            assert_eq!(channel, "c");
            assert_eq!(capacity, 100);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.layer.pending("c"), 100);
    assert_eq!(take(&t.layer, "c").await.unwrap().1, 0);
    t.layer.send("c", msg("t", 101)).await.unwrap();
    assert!(t.layer.send("c", msg("t", 102)).await.is_err());
}

#[tokio::test]
async fn capacity_patterns_apply_in_config_order() {
    let t = TestLayer::with(|s| {
        s.layer.channel_capacity.insert("websocket.send*".into(), 2);
        s.layer.channel_capacity.insert("websocket.*".into(), 3);
    });
    for (channel, capacity) in [
        ("websocket.send!x", 2),
        ("websocket.receive", 3),
        ("other", 100),
    ] {
        for n in 0..capacity {
            t.layer.send(channel, msg("t", n)).await.unwrap();
        }
        assert!(
            matches!(t.layer.send(channel, msg("t", 0)).await, Err(Error::ChannelFull { capacity: c, .. }) if c == capacity as usize),
            "{channel}"
        );
    }
}

#[tokio::test]
async fn expired_messages_are_never_delivered_and_free_capacity_at_once() {
    let t = TestLayer::with(|s| s.layer.capacity = 3);
    for n in 0..3 {
        t.layer.send("c", msg("t", n)).await.unwrap();
    }
    assert!(t.layer.send("c", msg("t", 3)).await.is_err());
    t.advance(59);
    assert!(
        t.layer.send("c", msg("t", 3)).await.is_err(),
        "not expired yet"
    );
    t.advance(1);
    t.layer.send("c", msg("t", 4)).await.unwrap();
    assert_eq!(t.layer.pending("c"), 1);
    assert_eq!(take(&t.layer, "c").await.unwrap().1, 4);
}

#[tokio::test]
async fn expiry_patterns_override_per_channel() {
    let t = TestLayer::with(|s| {
        s.layer.channel_expiry.insert("http.*".into(), 5);
    });
    t.layer.send("http.response", msg("t", 1)).await.unwrap();
    t.layer.send("other", msg("t", 2)).await.unwrap();
    t.advance(5);
    assert_eq!(take(&t.layer, "http.response").await, None);
    assert_eq!(take(&t.layer, "other").await.unwrap().1, 2);
}

#[tokio::test]
async fn messages_that_expire_while_down_are_gone_after_restart() {
    let t = TestLayer::new();
    t.layer.send("c", msg("t", 1)).await.unwrap();
    t.advance(30);
    t.layer.send("c", msg("t", 2)).await.unwrap();
    t.advance(31);
    let t = t.restart();
    assert_eq!(take(&t.layer, "c").await.unwrap().1, 2);
    assert_eq!(take(&t.layer, "c").await, None);
}

#[tokio::test]
async fn receive_waits_for_a_later_send() {
    let t = TestLayer::new();
    let layer = t.layer.clone();
    let waiting = tokio::spawn(async move { layer.receive("c", Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let id = t.layer.send("c", msg("t", 7)).await.unwrap();
    let got = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!((got.id, n_of(&got.message)), (id, 7));
    let start = std::time::Instant::now();
    assert!(
        t.layer
            .receive("c", Duration::from_millis(100))
            .await
            .unwrap()
            .is_none()
    );
    assert!(start.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn group_send_copies_to_every_member_and_counts_full_ones() {
    let t = TestLayer::with(|s| {
        s.layer
            .channel_capacity
            .insert("small".into(), 1)
            .map(|_| ())
            .unwrap_or(())
    });
    for channel in ["a", "b", "small"] {
        t.layer.group_add("g", channel).await.unwrap();
    }
    t.layer.group_add("g", "a").await.unwrap();
    assert_eq!(members(&t.layer, "g"), ["a", "b", "small"]);
    let report = t.layer.group_send("g", msg("t", 1)).await.unwrap();
    assert_eq!(
        report,
        GroupSendReport {
            delivered: 3,
            full: 0
        }
    );
    let report = t.layer.group_send("g", msg("t", 2)).await.unwrap();
    assert_eq!(
        report,
        GroupSendReport {
            delivered: 2,
            full: 1
        }
    );
    for channel in ["a", "b"] {
        assert_eq!(take(&t.layer, channel).await.unwrap().1, 1);
        assert_eq!(take(&t.layer, channel).await.unwrap().1, 2);
    }
    assert_eq!(take(&t.layer, "small").await.unwrap().1, 1);
    assert_eq!(
        take(&t.layer, "small").await,
        None,
        "the full member skipped message 2"
    );
    assert_eq!(
        t.layer.group_send("nobody", msg("t", 3)).await.unwrap(),
        GroupSendReport::default()
    );
}

#[tokio::test]
async fn discard_stops_new_copies_but_keeps_queued_ones_across_restart() {
    let t = TestLayer::new();
    t.layer.group_add("g", "a").await.unwrap();
    t.layer.group_add("g", "b").await.unwrap();
    t.layer.group_send("g", msg("t", 1)).await.unwrap();
    t.layer.group_discard("g", "a").await.unwrap();
    t.layer.group_discard("g", "a").await.unwrap();
    t.layer.group_discard("g", "never-joined").await.unwrap();
    assert_eq!(
        t.layer.group_send("g", msg("t", 2)).await.unwrap(),
        GroupSendReport {
            delivered: 1,
            full: 0
        }
    );
    let t = t.restart();
    assert_eq!(members(&t.layer, "g"), ["b"]);
    assert_eq!(take(&t.layer, "a").await.unwrap().1, 1);
    assert_eq!(take(&t.layer, "a").await, None);
    assert_eq!(take(&t.layer, "b").await.unwrap().1, 1);
    assert_eq!(take(&t.layer, "b").await.unwrap().1, 2);
}

#[tokio::test]
async fn memberships_lapse_after_group_expiry_and_refresh_on_add() {
    let t = TestLayer::with(|s| s.layer.group_expiry_secs = 100);
    t.layer.group_add("g", "a").await.unwrap();
    t.layer.group_add("g", "b").await.unwrap();
    t.layer.group_send("g", msg("t", 1)).await.unwrap();
    t.advance(60);
    t.layer.group_add("g", "a").await.unwrap();
    t.advance(50);
    // b lapsed 100 s after its add; a was refreshed 50 s ago.
    assert_eq!(members(&t.layer, "g"), ["a"]);
    assert_eq!(
        t.layer.group_send("g", msg("t", 2)).await.unwrap(),
        GroupSendReport {
            delivered: 1,
            full: 0
        }
    );
    t.layer.sweep().unwrap();
    // Re-adding b starts a new membership; what it got before is still its own.
    t.layer.group_add("g", "b").await.unwrap();
    t.layer.group_send("g", msg("t", 3)).await.unwrap();
    let t = t.restart();
    assert_eq!(members(&t.layer, "g"), ["a", "b"]);
    let ns =
        |v: Vec<Option<(u64, i64)>>| v.into_iter().flatten().map(|(_, n)| n).collect::<Vec<_>>();
    // Message 1 (sent 110 s ago) has expired for both; 2 and 3 remain.
    assert_eq!(
        ns(vec![
            take(&t.layer, "a").await,
            take(&t.layer, "a").await,
            take(&t.layer, "a").await
        ]),
        [2, 3]
    );
    assert_eq!(
        ns(vec![take(&t.layer, "b").await, take(&t.layer, "b").await]),
        [3]
    );
}

#[tokio::test]
async fn a_lapsed_membership_keeps_what_it_received_across_restart() {
    let t = TestLayer::with(|s| {
        s.layer.group_expiry_secs = 10;
        s.layer.expiry_secs = 60;
    });
    t.layer.group_add("g", "a").await.unwrap();
    t.layer.group_send("g", msg("t", 1)).await.unwrap();
    t.advance(11);
    assert_eq!(t.layer.sweep().unwrap().memberships_lapsed, 1);
    t.layer.group_add("g", "a").await.unwrap();
    t.layer.group_send("g", msg("t", 2)).await.unwrap();
    let t = t.restart();
    assert_eq!(take(&t.layer, "a").await.unwrap().1, 1);
    assert_eq!(take(&t.layer, "a").await.unwrap().1, 2);
    assert_eq!(take(&t.layer, "a").await, None);
}

#[tokio::test]
async fn restart_keeps_pending_messages_ids_and_memberships_but_not_received_ones() {
    let t = TestLayer::new();
    let first = t.layer.send("c", msg("t", 1)).await.unwrap();
    let second = t.layer.send("c", msg("t", 2)).await.unwrap();
    t.layer.group_add("g", "c").await.unwrap();
    assert_eq!(take(&t.layer, "c").await, Some((first, 1)));
    let t = t.restart();
    assert_eq!(members(&t.layer, "g"), ["c"]);
    assert_eq!(take(&t.layer, "c").await, Some((second, 2)));
    let third = t.layer.send("c", msg("t", 3)).await.unwrap();
    assert!(third > second);
    let t = t.restart();
    assert_eq!(take(&t.layer, "c").await, Some((third, 3)));
    assert_eq!(take(&t.layer, "c").await, None);
}

#[tokio::test]
async fn new_channel_names_are_valid_and_unique() {
    let t = TestLayer::new();
    let a = t.layer.new_channel("specific").unwrap();
    let b = t.layer.new_channel("specific").unwrap();
    assert_ne!(a, b);
    assert!(a.starts_with("specific.") && a.contains('!'), "{a}");
    let (head, tail) = a.split_once('!').unwrap();
    assert!(head.len() > "specific.".len() && !tail.is_empty());
    assert!(t.layer.new_channel("").unwrap().starts_with("specific."));
    let c = t.layer.new_channel("chat.room").unwrap();
    t.layer.send(&c, msg("t", 1)).await.unwrap();
}

#[tokio::test]
async fn flush_deletes_everything_and_ids_keep_growing() {
    let t = TestLayer::new();
    let id = t.layer.send("c", msg("t", 1)).await.unwrap();
    t.layer.group_add("g", "c").await.unwrap();
    t.layer.flush().await.unwrap();
    assert_eq!(take(&t.layer, "c").await, None);
    assert!(members(&t.layer, "g").is_empty());
    let t = t.restart();
    assert_eq!(take(&t.layer, "c").await, None);
    assert!(t.layer.groups(ALL).items.is_empty());
    assert!(t.layer.send("c", msg("t", 2)).await.unwrap() > id);
}

#[tokio::test]
async fn introspection_lists_channels_groups_and_totals() {
    let t = TestLayer::new();
    t.layer.send("b", msg("t", 1)).await.unwrap();
    t.layer.send("a", msg("t", 1)).await.unwrap();
    t.layer.send("a", msg("t", 2)).await.unwrap();
    t.layer.group_add("g", "a").await.unwrap();
    t.layer.group_add("g", "z").await.unwrap();
    let channels = t.layer.channels(ALL).items;
    let summary: Vec<_> = channels
        .iter()
        .map(|c| (c.name.as_str(), c.pending))
        .collect();
    assert_eq!(summary, [("a", 2), ("b", 1)]);
    let groups = t.layer.groups(ALL).items;
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].members, ["a", "z"]);
    let stats = t.layer.stats();
    assert_eq!(
        (
            stats.channels,
            stats.pending_messages,
            stats.groups,
            stats.memberships
        ),
        (2, 3, 1, 2)
    );
    assert!(stats.disk_bytes > 0);
}

#[tokio::test]
async fn the_sweep_removes_expired_messages_from_disk_once_per_send() {
    let t = TestLayer::new();
    for channel in ["a", "b", "c"] {
        t.layer.group_add("g", channel).await.unwrap();
    }
    t.layer.group_send("g", msg("t", 1)).await.unwrap();
    t.layer.send("a", msg("t", 2)).await.unwrap();
    assert_eq!(t.layer.sweep().unwrap().messages_deleted, 0);
    t.advance(61);
    // One record for the group_send (whatever the member count) and one for the send.
    assert_eq!(t.layer.sweep().unwrap().messages_deleted, 2);
    assert_eq!(t.layer.sweep().unwrap().messages_deleted, 0);
    assert!(t.layer.channels(ALL).items.is_empty());
    let t = t.restart();
    assert_eq!(take(&t.layer, "a").await, None);
}

#[tokio::test]
async fn a_revoked_receiver_takes_nothing_more_and_hands_on_its_message() {
    use std::future::poll_fn;
    let t = TestLayer::new();
    let l = &t.layer;
    // A waiting receiver is woken by its revocation and reports the end.
    let mut first = l.receiver("r").unwrap();
    let stopper = first.revoker();
    let waiting = tokio::spawn(async move { poll_fn(|cx| first.poll_receive(cx)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    stopper.revoke();
    let ended = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the revoked receiver was woken")
        .unwrap();
    assert!(ended.is_none(), "a revoked receiver takes nothing");

    // One woken for a message (not yet taken) passes it on when revoked.
    let mut woken = l.receiver("r").unwrap();
    let noop = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(noop);
    assert!(woken.poll_receive(&mut cx).is_pending());
    l.send("r", msg("t", 7)).await.unwrap();
    woken.revoker().revoke();
    assert!(matches!(
        woken.poll_receive(&mut cx),
        std::task::Poll::Ready(None)
    ));
    assert_eq!(take(l, "r").await.map(|(_, n)| n), Some(7));
}

#[tokio::test]
async fn closing_a_channel_leaves_its_groups_and_drops_what_it_held_for_good() {
    let t = TestLayer::new();
    let l = &t.layer;
    for group in ["a", "b"] {
        l.group_add(group, "conn").await.unwrap();
    }
    l.group_add("a", "other").await.unwrap();
    l.group_send("a", msg("t", 1)).await.unwrap();
    l.group_send("b", msg("t", 2)).await.unwrap();
    assert_eq!(take(l, "conn").await.map(|(_, n)| n), Some(1));
    l.send("conn", msg("t", 3)).await.unwrap();

    l.close_channel(
        "conn",
        &["a".to_string(), "b".to_string(), "never".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(members(l, "a"), vec!["other".to_string()]);
    assert!(members(l, "b").is_empty());
    assert_eq!(l.pending("conn"), 0);
    assert!(l.replay("conn", 0).unwrap().deliveries.is_empty());
    let report = l.group_send("a", msg("t", 4)).await.unwrap();
    assert_eq!(
        report,
        GroupSendReport {
            delivered: 1,
            full: 0
        }
    );
    // Closing again is a no-op; the other member kept its messages.
    l.close_channel("conn", &["a".to_string()]).await.unwrap();
    assert_eq!(l.pending("other"), 2);

    let t = t.restart();
    let l = &t.layer;
    assert_eq!(members(l, "a"), vec!["other".to_string()]);
    assert_eq!(l.pending("conn"), 0, "nothing comes back after a restart");
    // (Messages sent straight to the channel are rebuilt into its replay log until
    // they age out: the records are shared, and such channels have random names.)
    assert!(
        l.replay("conn", 0)
            .unwrap()
            .deliveries
            .iter()
            .all(|d| n_of(&d.message) == 3)
    );
    assert_eq!(take(l, "other").await.map(|(_, n)| n), Some(1));
    assert_invalid_name(l.close_channel("bad name", &[]).await, "may only contain");
    assert_invalid_name(
        l.close_channel("c", &["g!".to_string()]).await,
        "group name",
    );
}

#[tokio::test]
async fn a_resume_learns_of_losses_after_the_sweep_forgot_the_channel_a_flush_and_restarts() {
    let t = TestLayer::with(|s| s.layer.expiry_secs = 1);
    let first = t.layer.send("c", msg("t", 0)).await.unwrap();
    assert_eq!(take(&t.layer, "c").await.unwrap().1, 0);
    let lost = t.layer.send("c", msg("t", 1)).await.unwrap();
    t.advance(2);
    // The first sweep deletes both from disk, the second forgets the idle channel.
    assert_eq!(t.layer.sweep().unwrap().messages_deleted, 2);
    t.layer.sweep().unwrap();
    let gap = |t: &TestLayer, after| t.layer.replay("c", after).unwrap().gap;
    assert_eq!(
        gap(&t, first),
        Some(Gap {
            after: first,
            next: lost + 1
        })
    );
    let t = t.restart();
    let fresh = t.layer.send("c", msg("t", 2)).await.unwrap();
    assert_eq!(
        gap(&t, first),
        Some(Gap {
            after: first,
            next: fresh
        })
    );
    assert_eq!(
        gap(&t, lost),
        None,
        "nothing after the last loss is missing"
    );

    // A flush deletes what is pending: a resume after an earlier id learns of it, also
    // after a restart.
    t.layer.flush().await.unwrap();
    let t = t.restart();
    let after_flush = t.layer.send("c", msg("t", 3)).await.unwrap();
    assert_eq!(
        gap(&t, lost),
        Some(Gap {
            after: lost,
            next: after_flush
        })
    );
}

#[tokio::test]
async fn the_longest_channel_expiry_keeps_messages_instead_of_overflowing() {
    let t = TestLayer::with(|s| {
        s.layer.channel_expiry.insert("forever.*".into(), u64::MAX);
    });
    t.layer.send("forever.c", msg("t", 1)).await.unwrap();
    t.advance(10 * 365 * 86_400);
    // The disk sweep keeps it too, so it is there after a restart.
    t.layer.sweep().unwrap();
    let t = t.restart();
    let got = t.layer.receive("forever.c", Duration::ZERO).await.unwrap();
    assert_eq!(got.map(|d| n_of(&d.message)), Some(1));
}

#[tokio::test]
async fn listings_come_in_pages_in_name_order() {
    let t = TestLayer::new();
    for n in 0..250 {
        t.layer
            .send(&format!("c{n:03}"), msg("t", n))
            .await
            .unwrap();
    }
    // A channel with nothing pending and nobody waiting is skipped.
    assert!(take(&t.layer, "c007").await.is_some());
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = t.layer.channels(PageRequest {
            after: after.as_deref(),
            limit: 100,
        });
        assert!(page.items.len() <= 100);
        seen.extend(page.items.into_iter().map(|c| c.name));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..250)
        .filter(|n| *n != 7)
        .map(|n| format!("c{n:03}"))
        .collect();
    assert_eq!(seen, expected);
    let last = t.layer.channels(PageRequest {
        after: Some("c199"),
        limit: 100,
    });
    assert_eq!(last.items.len(), 50);
    assert_eq!(last.next, None);

    for channel in ["m3", "m1", "m2"] {
        t.layer.group_add("g", channel).await.unwrap();
        t.layer.group_add(channel, channel).await.unwrap();
    }
    let first = t
        .layer
        .group_members(
            "g",
            PageRequest {
                after: None,
                limit: 2,
            },
        )
        .unwrap();
    assert_eq!(first.items, ["m1", "m2"]);
    assert_eq!(first.next.as_deref(), Some("m2"));
    let rest = t
        .layer
        .group_members(
            "g",
            PageRequest {
                after: Some("m2"),
                limit: 2,
            },
        )
        .unwrap();
    assert_eq!((rest.items, rest.next), (vec!["m3".to_string()], None));
    let groups = t.layer.groups(PageRequest {
        after: Some("g"),
        limit: 2,
    });
    let names: Vec<&str> = groups.items.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["m1", "m2"]);
    assert_eq!(groups.next.as_deref(), Some("m2"));
    assert_eq!(groups.items[0].members, ["m1"]);
}
