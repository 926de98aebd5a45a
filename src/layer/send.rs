//! The operations that put messages into queues or take them all away: send,
//! group_send, flush; and new_channel, which makes a name for one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rand::Rng;
use rand::distr::Alphanumeric;

use super::state::Entry;
use super::{ChannelLayer, Error, GroupSendReport};
use crate::message::Message;
use crate::names::{self, NameError};
use crate::store::record::{Record, Target};

impl ChannelLayer {
    /// Appends `message` to `channel` and returns its id once durable.
    pub async fn send(&self, channel: &str, message: Message) -> Result<u64, Error> {
        names::check_channel(channel)?;
        let inner = &*self.inner;
        inner.check_size(&message)?;
        let message = Arc::new(message);
        let (id, ticket) = {
            let mut state = inner.state.lock();
            let now = inner.clock.now_ms();
            inner.check_channel_room(&state.channels, channel)?;
            let ch = inner.channel(&mut state.channels, channel);
            if ch.is_full(now) {
                return Err(Error::ChannelFull {
                    channel: channel.to_string(),
                    capacity: ch.capacity,
                });
            }
            inner.store.take_room(message.encoded_len())?;
            let sent_at_ms = state.send_time(now);
            let id = inner.store.next_id()?;
            let record = Record {
                sent_at_ms,
                target: Target::Channel(channel.to_string()),
                skipped: Vec::new(),
                body: message.msgpack().clone(),
            };
            let ticket = inner.store.append(id, &record)?;
            inner.stored(&record);
            let ch = inner.channel(&mut state.channels, channel);
            ch.queue.push_back(Entry {
                id,
                sent_at_ms,
                group: None,
                message,
                unacked_on_disk: false,
            });
            ch.wake();
            (id, ticket)
        };
        inner.store.commit(ticket).await?;
        Ok(id)
    }

    /// Puts a copy of `message` into every current member's queue, with one durable
    /// write. Full members are skipped and counted, never an error.
    pub async fn group_send(
        &self,
        group: &str,
        message: Message,
    ) -> Result<GroupSendReport, Error> {
        names::check_group(group)?;
        let inner = &*self.inner;
        inner.check_size(&message)?;
        let message = Arc::new(message);
        let group_name: Arc<str> = Arc::from(group);
        let (report, ticket) = {
            let mut guard = inner.state.lock();
            let state = &mut *guard;
            let now = inner.clock.now_ms();
            let sent_at_ms = state.send_time(now);
            let Some(members) = state.groups.get(group) else {
                return Ok(GroupSendReport::default());
            };
            let mut targets = Vec::with_capacity(members.len());
            let mut skipped = Vec::new();
            for (channel, membership) in members {
                if !membership.active_at(sent_at_ms, inner.group_expiry_ms) {
                    continue;
                }
                let ch = inner.channel(&mut state.channels, channel);
                if ch.is_full(sent_at_ms) {
                    skipped.push(channel.clone());
                } else {
                    targets.push(channel.as_str());
                }
            }
            inner.store.take_room(message.encoded_len())?;
            let id = inner.store.next_id()?;
            let report = GroupSendReport {
                delivered: targets.len(),
                full: skipped.len(),
            };
            let record = Record {
                sent_at_ms,
                target: Target::Group(group.to_string()),
                skipped,
                body: message.msgpack().clone(),
            };
            let ticket = inner.store.append(id, &record)?;
            inner.stored(&record);
            let entry = Entry {
                id,
                sent_at_ms,
                group: Some(group_name),
                message,
                unacked_on_disk: false,
            };
            for channel in targets {
                let ch = state.channels.get_mut(channel).expect("created above");
                ch.queue.push_back(entry.clone());
                ch.wake();
            }
            (report, ticket)
        };
        inner.store.commit(ticket).await?;
        Ok(report)
    }

    /// Deletes every message, membership and cursor. Ids keep growing.
    pub async fn flush(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            // Everything held is deleted, and what was lost before is no longer on disk
            // to rebuild from: a resume after an earlier id gets a gap.
            let lost_upto = state
                .channels
                .values()
                .flat_map(|ch| {
                    let held = [ch.queue.back(), ch.delivered.back()];
                    held.into_iter()
                        .flatten()
                        .map(|e| e.id)
                        .chain(ch.leased.keys().next_back().copied())
                        .chain([ch.lost_upto])
                })
                .fold(inner.lost_floor(), u64::max);
            let ticket = inner.store.clear(lost_upto)?;
            inner.stored_bytes.store(0, Ordering::Relaxed);
            inner.reclaiming.store(true, Ordering::Relaxed);
            state.groups.clear();
            state.leasing.clear();
            for ch in state.channels.values_mut() {
                ch.lost_upto = ch.lost_upto.max(lost_upto);
                ch.queue.clear();
                ch.leased.clear();
                ch.delivered.clear();
            }
            inner.forget_idle(&mut state);
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
    }

    /// A fresh, unique, valid channel name: `{prefix}.{random}!{random}`.
    pub fn new_channel(&self, prefix: &str) -> Result<String, Error> {
        const RANDOM_LEN: usize = 12;
        let prefix = if prefix.is_empty() {
            "specific"
        } else {
            prefix
        };
        if prefix.contains('!') {
            return Err(NameError("channel prefix must not contain '!'".to_string()).into());
        }
        let mut rng = rand::rng();
        let mut random = || -> String {
            (&mut rng)
                .sample_iter(Alphanumeric)
                .take(RANDOM_LEN)
                .map(char::from)
                .collect()
        };
        let name = format!("{prefix}.{}!{}", random(), random());
        names::check_channel(&name)
            .map_err(|e| NameError(format!("channel prefix makes an invalid name: {e}")))?;
        Ok(name)
    }
}
