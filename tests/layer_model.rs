//! Model-based test: random sequences of operations, time steps, sweeps and restarts,
//! applied to the real layer and to a plain in-memory model, compared after every step
//! (after sled's own `prop_tree_matches_btreemap`).

mod layer_common;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use herald::layer::{Error, GroupSendReport};
use layer_common::{TestLayer, members, msg, n_of};
use proptest::prelude::*;

const CHANNELS: [&str; 3] = ["a", "b", "c!x"];
const GROUPS: [&str; 2] = ["g", "h"];
const CAPACITY: usize = 3;
const EXPIRY: u64 = 10;
const GROUP_EXPIRY: u64 = 15;

#[derive(Debug, Clone)]
enum Op {
    Send(usize),
    Receive(usize),
    GroupAdd(usize, usize),
    GroupDiscard(usize, usize),
    GroupSend(usize),
    Advance(u64),
    Sweep,
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CHANNELS.len()).prop_map(Op::Send),
        4 => (0..CHANNELS.len()).prop_map(Op::Receive),
        3 => (0..GROUPS.len(), 0..CHANNELS.len()).prop_map(|(g, c)| Op::GroupAdd(g, c)),
        1 => (0..GROUPS.len(), 0..CHANNELS.len()).prop_map(|(g, c)| Op::GroupDiscard(g, c)),
        3 => (0..GROUPS.len()).prop_map(Op::GroupSend),
        2 => (1..9u64).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
        1 => Just(Op::Restart),
    ]
}

/// The semantics in plain collections.
#[derive(Default)]
struct Model {
    now: u64,
    /// Pending messages per channel: (sent at, n).
    queues: BTreeMap<&'static str, VecDeque<(u64, i64)>>,
    /// Memberships per group: channel → last add time.
    groups: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
}

impl Model {
    fn queue(&mut self, channel: &'static str) -> &mut VecDeque<(u64, i64)> {
        let now = self.now;
        let queue = self.queues.entry(channel).or_default();
        queue.retain(|(sent, _)| sent + EXPIRY > now);
        queue
    }

    fn send(&mut self, channel: &'static str, n: i64) -> bool {
        let now = self.now;
        let queue = self.queue(channel);
        if queue.len() >= CAPACITY {
            return false;
        }
        queue.push_back((now, n));
        true
    }

    fn receive(&mut self, channel: &'static str) -> Option<i64> {
        self.queue(channel).pop_front().map(|(_, n)| n)
    }

    fn members(&self, group: &str) -> Vec<&'static str> {
        self.groups
            .get(group)
            .map(|m| {
                m.iter()
                    .filter(|(_, added)| self.now < *added + GROUP_EXPIRY)
                    .map(|(c, _)| *c)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn group_send(&mut self, group: &str, n: i64) -> GroupSendReport {
        let mut report = GroupSendReport::default();
        for channel in self.members(group) {
            if self.send(channel, n) {
                report.delivered += 1;
            } else {
                report.full += 1;
            }
        }
        report
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut t = TestLayer::with(|s| {
            s.layer.capacity = CAPACITY;
            s.layer.expiry_secs = EXPIRY;
            s.layer.group_expiry_secs = GROUP_EXPIRY;
        });
        let mut model = Model::default();
        let mut next_n = 0;
        for op in ops {
            next_n += 1;
            match op {
                Op::Send(c) => {
                    let result = t.layer.send(CHANNELS[c], msg("m", next_n)).await;
                    let accepted = model.send(CHANNELS[c], next_n);
                    match result {
                        Ok(_) => prop_assert!(accepted, "layer accepted, model refused"),
                        Err(Error::ChannelFull { .. }) => {
                            prop_assert!(!accepted, "layer refused, model accepted")
                        }
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Receive(c) => {
                    let got = t.layer.receive(CHANNELS[c], Duration::ZERO).await.unwrap();
                    prop_assert_eq!(got.map(|d| n_of(&d.message)), model.receive(CHANNELS[c]));
                }
                Op::GroupAdd(g, c) => {
                    t.layer.group_add(GROUPS[g], CHANNELS[c]).await.unwrap();
                    model
                        .groups
                        .entry(GROUPS[g])
                        .or_default()
                        .insert(CHANNELS[c], model.now);
                }
                Op::GroupDiscard(g, c) => {
                    t.layer.group_discard(GROUPS[g], CHANNELS[c]).await.unwrap();
                    if let Some(members) = model.groups.get_mut(GROUPS[g]) {
                        members.remove(CHANNELS[c]);
                    }
                }
                Op::GroupSend(g) => {
                    let report = t
                        .layer
                        .group_send(GROUPS[g], msg("m", next_n))
                        .await
                        .unwrap();
                    prop_assert_eq!(report, model.group_send(GROUPS[g], next_n));
                }
                Op::Advance(secs) => {
                    t.advance(secs);
                    model.now += secs;
                }
                Op::Sweep => {
                    t.layer.sweep().unwrap();
                    // Right after a sweep nothing expired or lapsed is left to count.
                    let stats = t.layer.stats();
                    let queues: Vec<usize> =
                        CHANNELS.iter().map(|c| model.queue(c).len()).collect();
                    let members: Vec<usize> =
                        GROUPS.iter().map(|g| model.members(g).len()).collect();
                    prop_assert_eq!(
                        (stats.channels, stats.pending_messages),
                        (
                            queues.iter().filter(|n| **n > 0).count(),
                            queues.iter().sum::<usize>()
                        ),
                        "stats of channels"
                    );
                    prop_assert_eq!(
                        (stats.groups, stats.memberships),
                        (
                            members.iter().filter(|n| **n > 0).count(),
                            members.iter().sum::<usize>()
                        ),
                        "stats of groups"
                    );
                }
                Op::Restart => t = t.restart(),
            }
            for channel in CHANNELS {
                prop_assert_eq!(
                    t.layer.pending(channel),
                    model.queue(channel).len(),
                    "pending on {}",
                    channel
                );
            }
            for group in GROUPS {
                let members = members(&t.layer, group);
                let mut expected: Vec<String> =
                    model.members(group).iter().map(|c| c.to_string()).collect();
                expected.sort();
                prop_assert_eq!(members, expected, "members of {}", group);
            }
        }
        // Drain: whatever is left comes out in the model's order.
        for channel in CHANNELS {
            loop {
                let got = t.layer.receive(channel, Duration::ZERO).await.unwrap();
                let expected = model.receive(channel);
                prop_assert_eq!(got.map(|d| n_of(&d.message)), expected);
                if expected.is_none() {
                    break;
                }
            }
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn layer_matches_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
