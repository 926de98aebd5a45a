//! The read-only views of the layer: channels, groups, members, pending counts, totals.

use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow};
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
    /// The most messages the channel holds (`capacity` or its `channel_capacity`).
    pub capacity: usize,
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
    /// Channels that hold pending messages.
    pub channels: usize,
    /// Messages waiting in all channels (one that expires counts until it is dropped,
    /// at the latest by the next sweep).
    pub pending_messages: usize,
    /// Groups with at least one member.
    pub groups: usize,
    /// Group memberships, summed over all groups (one that lapses counts until the
    /// next sweep ends it).
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

/// Which part of a listing to read: the entries after `after` (from the first when
/// `None`), at most `limit` of them.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest<'a> {
    pub after: Option<&'a str>,
    pub limit: usize,
}

/// One page of a listing, in name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts (its `after`); `None` on the last page.
    pub next: Option<String>,
}

/// The most entries one page looks at, so that a page holds the layer's lock briefly
/// however many idle channels or lapsed memberships it has to skip: a page that runs out
/// of it is shorter than asked, and its `next` goes on from where it stopped.
const PAGE_SCAN: usize = 4096;

/// Collects one page from entries offered in name order.
struct PageBuilder<T> {
    limit: usize,
    scanned: usize,
    items: Vec<T>,
    /// The last entry offered: the next page starts after it.
    last: String,
}

impl<T> PageBuilder<T> {
    fn new(limit: usize) -> Self {
        PageBuilder {
            limit: limit.max(1),
            scanned: 0,
            items: Vec::new(),
            last: String::new(),
        }
    }

    /// Offers the entry `name`, which costs `cost` scans and is listed as `item()` unless
    /// that is `None`. Breaks when the page is complete: then there are more entries.
    fn offer(
        &mut self,
        name: &str,
        cost: usize,
        item: impl FnOnce() -> Option<T>,
    ) -> ControlFlow<()> {
        if self.items.len() == self.limit || self.scanned >= PAGE_SCAN.max(self.limit) {
            return ControlFlow::Break(());
        }
        self.scanned += cost;
        self.items.extend(item());
        self.last.clear();
        self.last.push_str(name);
        ControlFlow::Continue(())
    }

    /// The page; `more` tells whether an offer was refused (there are more entries).
    fn finish(self, more: bool) -> Page<T> {
        Page {
            items: self.items,
            next: more.then_some(self.last),
        }
    }
}

impl ChannelLayer {
    /// A page of the channels that hold messages or have receivers waiting.
    pub fn channels(&self, request: PageRequest<'_>) -> Page<ChannelInfo> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let now = inner.clock.now_ms();
        let mut page = PageBuilder::new(request.limit);
        let mut more = false;
        state.channels.visit_after(request.after, |name, ch| {
            let offered = page.offer(name, 1, || {
                ch.drop_expired(now);
                (ch.pending() > 0 || !ch.waiters.is_empty()).then(|| ChannelInfo {
                    name: name.to_string(),
                    pending: ch.pending(),
                    capacity: ch.capacity,
                    receivers_waiting: ch.waiters.len(),
                })
            });
            more = offered.is_break();
            offered
        });
        page.finish(more)
    }

    /// A page of the groups with at least one current member, each with its members.
    pub fn groups(&self, request: PageRequest<'_>) -> Page<GroupInfo> {
        let inner = &*self.inner;
        let state = inner.state.lock();
        let now = inner.clock.now_ms();
        let mut page = PageBuilder::new(request.limit);
        let more = after(&state.groups, request.after).any(|(name, members)| {
            page.offer(name, members.len(), || {
                let members: Vec<String> = current(members, now, inner.group_expiry_ms)
                    .map(str::to_string)
                    .collect();
                (!members.is_empty()).then(|| GroupInfo {
                    name: name.clone(),
                    members,
                })
            })
            .is_break()
        });
        page.finish(more)
    }

    /// A page of the current members of `group`.
    pub fn group_members(
        &self,
        group: &str,
        request: PageRequest<'_>,
    ) -> Result<Page<String>, Error> {
        names::check_group(group)?;
        let inner = &*self.inner;
        let state = inner.state.lock();
        let now = inner.clock.now_ms();
        let mut page = PageBuilder::new(request.limit);
        let Some(members) = state.groups.get(group) else {
            return Ok(page.finish(false));
        };
        let more = after(members, request.after).any(|(channel, membership)| {
            page.offer(channel, 1, || {
                membership
                    .active_at(now, inner.group_expiry_ms)
                    .then(|| channel.clone())
            })
            .is_break()
        });
        Ok(page.finish(more))
    }

    /// The number of unexpired messages pending on `channel` (leased ones included).
    pub fn pending(&self, channel: &str) -> usize {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        let now = inner.clock.now_ms();
        state.channels.get_mut(channel).map_or(0, |ch| {
            ch.drop_expired(now);
            ch.pending()
        })
    }

    /// Totals over the whole layer, from counters kept as it changes.
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        let tally = &inner.tally;
        Stats {
            channels: tally.busy_channels.load(Ordering::Relaxed),
            pending_messages: tally.pending.load(Ordering::Relaxed),
            groups: inner.state.lock().groups.len(),
            memberships: tally.memberships.load(Ordering::Relaxed),
            disk_bytes: inner.store.size_on_disk(),
            data_loss: inner.store.data_loss().map(str::to_string),
            stored_bytes: inner.stored_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The entries of `map` after `after` (all when `None`), in order.
fn after<'a, V>(
    map: &'a BTreeMap<String, V>,
    after: Option<&str>,
) -> impl Iterator<Item = (&'a String, &'a V)> {
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    map.range::<str, _>((start, Bound::Unbounded))
}

/// The members whose membership is in force at `now`, in name order.
fn current(members: &Members, now: u64, group_expiry_ms: u64) -> impl Iterator<Item = &str> {
    members
        .iter()
        .filter(move |(_, m)| m.active_at(now, group_expiry_ms))
        .map(|(name, _)| name.as_str())
}
