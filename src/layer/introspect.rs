//! The read-only views of the layer: channels, groups, members, pending counts, totals.

use std::sync::atomic::Ordering;

use super::state::Members;
use super::{ChannelLayer, Error};
use crate::names;

/// One channel as seen by introspection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChannelInfo {
    /// The channel's name.
    pub name: String,
    /// Unexpired messages waiting to be received.
    pub pending: usize,
    /// Receives currently waiting on the channel for a message.
    pub receivers_waiting: usize,
}

/// One group and its current members.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupInfo {
    /// The group's name.
    pub name: String,
    /// The channels whose membership has not lapsed.
    pub members: Vec<String>,
}

/// Totals for a console or metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Channels that hold messages or have receivers waiting.
    pub channels: usize,
    /// Unexpired messages waiting in all channels.
    pub pending_messages: usize,
    /// Groups with at least one member.
    pub groups: usize,
    /// Current group memberships, summed over all groups.
    pub memberships: usize,
    /// Size of the data directory on disk, in bytes (as measured at the last sweep,
    /// plus the messages accepted since).
    pub disk_bytes: u64,
    /// What the data directory had lost when the server was started on it with
    /// `--accept-data-loss`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_loss: Option<String>,
    /// Bytes of the message records on disk (expired ones until the sweep deletes
    /// them): `disk_bytes` divided by this is the store's space amplification.
    pub stored_bytes: u64,
}

impl ChannelLayer {
    /// Every channel that holds messages or has receivers waiting, by name.
    pub fn channels(&self) -> Vec<ChannelInfo> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let now = inner.clock.now_ms();
        let mut list: Vec<ChannelInfo> = state
            .channels
            .iter_mut()
            .filter_map(|(name, ch)| {
                ch.drop_expired(now);
                (!ch.queue.is_empty() || !ch.waiters.is_empty()).then(|| ChannelInfo {
                    name: name.clone(),
                    pending: ch.queue.len(),
                    receivers_waiting: ch.waiters.len(),
                })
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Every group with at least one current member, by name.
    pub fn groups(&self) -> Vec<GroupInfo> {
        let inner = &*self.inner;
        let state = inner.state.lock();
        let now = inner.clock.now_ms();
        let mut list: Vec<GroupInfo> = state
            .groups
            .iter()
            .map(|(name, members)| GroupInfo {
                name: name.clone(),
                members: current_members(members, now, inner.group_expiry_ms),
            })
            .filter(|g| !g.members.is_empty())
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// The current members of `group`, by name.
    pub fn group_members(&self, group: &str) -> Result<Vec<String>, Error> {
        names::check_group(group)?;
        let inner = &*self.inner;
        let state = inner.state.lock();
        Ok(state
            .groups
            .get(group)
            .map(|m| current_members(m, inner.clock.now_ms(), inner.group_expiry_ms))
            .unwrap_or_default())
    }

    /// The number of unexpired messages pending on `channel`.
    pub fn pending(&self, channel: &str) -> usize {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let now = inner.clock.now_ms();
        state.channels.get_mut(channel).map_or(0, |ch| {
            ch.drop_expired(now);
            ch.queue.len()
        })
    }

    /// Totals over the whole layer.
    pub fn stats(&self) -> Stats {
        let channels = self.channels();
        let groups = self.groups();
        Stats {
            channels: channels.len(),
            pending_messages: channels.iter().map(|c| c.pending).sum(),
            groups: groups.len(),
            memberships: groups.iter().map(|g| g.members.len()).sum(),
            disk_bytes: self.inner.store.size_on_disk(),
            data_loss: self.inner.store.data_loss().map(str::to_string),
            stored_bytes: self.inner.stored_bytes.load(Ordering::Relaxed),
        }
    }
}

fn current_members(members: &Members, now: u64, group_expiry_ms: u64) -> Vec<String> {
    let mut list: Vec<String> = members
        .iter()
        .filter(|(_, m)| m.active_at(now, group_expiry_ms))
        .map(|(name, _)| name.clone())
        .collect();
    list.sort();
    list
}
