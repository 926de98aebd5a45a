//! Group membership: group_add, group_discard, close_channel, and the pins that keep
//! a group's messages with a channel once its membership ends.

use super::state::{Members, Membership, State};
use super::{ChannelLayer, Error, Inner};
use crate::names;
use crate::store::WriteBatch;

impl ChannelLayer {
    /// Adds `channel` to `group`, or refreshes its membership.
    pub async fn group_add(&self, group: &str, channel: &str) -> Result<(), Error> {
        names::check_group(group)?;
        names::check_channel(channel)?;
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            let now = inner.clock.now_ms();
            let existing = state
                .groups
                .get(group)
                .and_then(|members| members.get(channel))
                .copied();
            let mut batch = WriteBatch::default();
            let membership = match existing {
                Some(m) if m.active_at(now, inner.group_expiry_ms) => Membership {
                    joined_id: m.joined_id,
                    last_add_ms: now.max(m.last_add_ms),
                },
                lapsed_or_new => {
                    if lapsed_or_new.is_none() {
                        inner.check_membership_room()?;
                    } else {
                        inner.pin_group_messages(&state, group, channel, &mut batch);
                    }
                    Membership {
                        joined_id: inner.store.next_id()?,
                        last_add_ms: now,
                    }
                }
            };
            batch.put_membership(group, channel, membership.joined_id, membership.last_add_ms);
            let ticket = inner.store.apply(batch)?;
            inner.add_member(&mut state, group, channel, membership);
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
    }

    /// Removes `channel` from `group`; not an error when it is not a member. Messages
    /// the group already put into the channel's queue stay there.
    pub async fn group_discard(&self, group: &str, channel: &str) -> Result<(), Error> {
        names::check_group(group)?;
        names::check_channel(channel)?;
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            let is_member = state
                .groups
                .get(group)
                .is_some_and(|members| members.contains_key(channel));
            if !is_member {
                return Ok(());
            }
            let mut batch = WriteBatch::default();
            inner.pin_group_messages(&state, group, channel, &mut batch);
            batch.remove_membership(group, channel);
            let ticket = inner.store.apply(batch)?;
            remove_member(&mut state, group, channel);
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
    }

    /// Ends a channel made for one connection: removes it from `groups` and drops
    /// everything pending on it and its replay log, in one write. Its group messages
    /// need no pinning, since nothing of the channel is kept. (A restart rebuilds the
    /// messages sent straight to it into its replay log until they age out: records
    /// are stored in shared batches.)
    pub async fn close_channel(&self, channel: &str, groups: &[String]) -> Result<(), Error> {
        names::check_channel(channel)?;
        for group in groups {
            names::check_group(group)?;
        }
        let inner = &*self.inner;
        let ticket = {
            let mut state = inner.state.lock();
            let mut batch = WriteBatch::default();
            let joined: Vec<&String> = groups
                .iter()
                .filter(|g| {
                    state
                        .groups
                        .get(*g)
                        .is_some_and(|m| m.contains_key(channel))
                })
                .collect();
            for group in &joined {
                batch.remove_membership(group, channel);
            }
            let held = state.channels.get(channel).and_then(|ch| {
                let leased = ch.leased.values().map(|lease| &lease.entry);
                let entries = || {
                    ch.queue
                        .iter()
                        .chain(ch.delivered.iter())
                        .chain(leased.clone())
                };
                let last = entries().map(|e| e.id).max()?;
                for entry in entries() {
                    batch.unpin(entry.id, channel);
                    if entry.unacked_on_disk {
                        batch.remove_unacked(entry.id, channel);
                    }
                }
                batch.put_cursor(channel, last);
                Some(last)
            });
            if joined.is_empty() && held.is_none() {
                return Ok(());
            }
            let ticket = inner.store.apply(batch)?;
            for group in joined {
                remove_member(&mut state, group, channel);
            }
            if let (Some(last), Some(ch)) = (held, state.channels.get_mut(channel)) {
                ch.restore_cursor(last);
                ch.lost_upto = ch.lost_upto.max(last);
                ch.queue.clear();
                ch.leased.clear();
                ch.delivered.clear();
            }
            state.leasing.remove(channel);
            ticket
        };
        inner.store.commit(ticket).await?;
        Ok(())
    }
}

impl Inner {
    /// Adds reference keys so that the group's messages the channel holds stay its own
    /// after the membership ends (also across a restart).
    pub(super) fn pin_group_messages(
        &self,
        state: &State,
        group: &str,
        channel: &str,
        batch: &mut WriteBatch,
    ) {
        let Some(ch) = state.channels.get(channel) else {
            return;
        };
        for entry in ch.queue.iter().chain(ch.delivered.iter()) {
            if entry.group.as_deref() == Some(group) {
                batch.pin(entry.id, channel);
            }
        }
    }
}

impl Inner {
    /// Sets `channel`'s membership of `group`.
    pub(super) fn add_member(
        &self,
        state: &mut State,
        group: &str,
        channel: &str,
        membership: Membership,
    ) {
        match state.groups.get_mut(group) {
            Some(members) => members.insert(channel, membership),
            None => {
                let mut members = Members::new(&self.tally);
                members.insert(channel, membership);
                state.groups.insert(group.to_string(), members);
            }
        }
    }
}

pub(super) fn remove_member(state: &mut State, group: &str, channel: &str) {
    if let Some(members) = state.groups.get_mut(group) {
        members.remove(channel);
        if members.is_empty() {
            state.groups.remove(group);
        }
    }
}
