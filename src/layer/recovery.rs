//! Rebuilding the in-memory state from the store at open: memberships, cursors and
//! pins first, then every message placed in its recipients' queues or replay logs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::state::{Entry, Membership, State};
use super::{Error, Inner};
use crate::message::Message;
use crate::store::Stored;
use crate::store::record::{Record, Target};

/// What the records read before the messages tell about them: each channel's receive
/// cursor, and the leased messages not acknowledged (pending again after a restart).
#[derive(Clone, Copy)]
struct Known<'a> {
    cursors: &'a HashMap<String, u64>,
    unacked: &'a HashMap<u64, HashSet<String>>,
}

impl Inner {
    /// Reads the store back into memory: memberships, cursors, pins, then every
    /// message in id order, placed in each recipient's queue or replay log.
    pub(super) fn rebuild(&self) -> Result<State, Error> {
        let now = self.clock.now_ms();
        let mut state = State::default();
        let mut cursors = HashMap::new();
        let mut pins: HashMap<u64, Vec<String>> = HashMap::new();
        let mut unacked: HashMap<u64, HashSet<String>> = HashMap::new();
        let mut stored_bytes = 0;
        for stored in self.store.recover() {
            match stored? {
                Stored::Membership {
                    group,
                    channel,
                    joined_id,
                    last_add_ms,
                } => {
                    self.add_member(
                        &mut state,
                        &group,
                        &channel,
                        Membership {
                            joined_id,
                            last_add_ms,
                        },
                    );
                }
                Stored::Cursor {
                    channel,
                    taken_upto,
                } => {
                    cursors.insert(channel, taken_upto);
                }
                Stored::Pin { id, channel } => pins.entry(id).or_default().push(channel),
                Stored::Unacked { id, channel } => {
                    unacked.entry(id).or_default().insert(channel);
                }
                Stored::Message { id, record } => {
                    stored_bytes += record.stored_len() as u64;
                    let known = Known {
                        cursors: &cursors,
                        unacked: &unacked,
                    };
                    self.place(&mut state, known, &mut pins, id, record);
                }
            }
        }
        for (name, ch) in state.channels.iter_mut() {
            if let Some(cursor) = cursors.get(name) {
                ch.restore_cursor(*cursor);
            }
            ch.drop_expired(now);
        }
        self.forget_idle(&mut state);
        self.stored_bytes.store(stored_bytes, Ordering::Relaxed);
        Ok(state)
    }

    /// Puts a stored message into each recipient's queue, or its replay log if the
    /// recipient's cursor says it was taken (and no lease of it is unacknowledged).
    fn place(
        &self,
        state: &mut State,
        known: Known,
        pins: &mut HashMap<u64, Vec<String>>,
        id: u64,
        record: Record,
    ) {
        state.last_sent_at_ms = state.last_sent_at_ms.max(record.sent_at_ms);
        let mut recipients = pins.remove(&id).unwrap_or_default();
        let group = match &record.target {
            Target::Channel(channel) => {
                recipients.push(channel.clone());
                None
            }
            Target::Group(group) => {
                if let Some(members) = state.groups.get(group) {
                    recipients.extend(
                        members
                            .iter()
                            .filter(|(channel, m)| {
                                m.joined_id < id
                                    && m.active_at(record.sent_at_ms, self.group_expiry_ms)
                                    && !record.skipped.contains(channel)
                            })
                            .map(|(channel, _)| channel.clone()),
                    );
                }
                Some(Arc::<str>::from(group.as_str()))
            }
        };
        let message = Arc::new(Message::trusted(record.body));
        for channel in recipients {
            let unacked_on_disk = known.unacked.get(&id).is_some_and(|c| c.contains(&channel));
            let delivered =
                !unacked_on_disk && known.cursors.get(&channel).is_some_and(|c| id <= *c);
            let ch = self.channel(&mut state.channels, &channel);
            let entry = Entry {
                id,
                sent_at_ms: record.sent_at_ms,
                group: group.clone(),
                message: message.clone(),
                unacked_on_disk,
            };
            if delivered {
                ch.remember(entry);
            } else {
                ch.queue.push_back(entry);
            }
        }
    }
}
