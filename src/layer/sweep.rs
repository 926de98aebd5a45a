//! Keeping memory and disk bounded, and receives durable: the periodic sweep (expired
//! messages, lapsed memberships, idle channels, disk space), receive cursors, the final
//! flush at close, and the consistent backup.

use std::sync::atomic::Ordering;

use super::groups::remove_member;
use super::state::{State, saturating_ms};
use super::{ChannelLayer, Error, Inner, SweepReport};
use crate::store::dump::{DumpStats, Export};
use crate::store::{Store, WriteBatch};

impl ChannelLayer {
    /// Removes expired messages and lapsed memberships from memory and disk. The server
    /// runs it every `storage.sweep_interval_ms`; it blocks on disk work, so call it
    /// from `spawn_blocking`.
    pub fn sweep(&self) -> Result<SweepReport, Error> {
        let inner = &*self.inner;
        let now = inner.clock.now_ms();
        let memberships_lapsed = inner.sweep_memory(now)?;
        let retention = saturating_ms(inner.rules.max_retention());
        let messages_deleted = inner.sweep_disk(now.saturating_sub(retention))?;
        let disk_reclaimed = inner.reclaim_disk()?;
        Ok(SweepReport {
            messages_deleted,
            memberships_lapsed,
            disk_reclaimed,
        })
    }

    /// Writes everything to disk now (for shutdown).
    pub(crate) fn flush_to_disk(&self) -> Result<(), Error> {
        self.inner
            .write_cursors(&mut self.inner.state.lock(), true)?;
        Ok(self.inner.store.flush_blocking()?)
    }

    /// Starts a consistent dump of everything (see [`crate::store::dump`]): writes the
    /// current receive cursors and the messages not yet in sled while operations wait,
    /// then leaves the dump to be read a chunk at a time while they go on. Blocking:
    /// call it from `spawn_blocking`.
    pub fn backup(&self) -> Result<Backup, Error> {
        let inner = &*self.inner;
        let mut state = inner.state.lock();
        inner.write_cursors(&mut state, true)?;
        inner.store.write_pending()?;
        Ok(Backup(inner.store.start_export(inner.clock.now_ms())?))
    }
}

/// A backup in progress ([`ChannelLayer::backup`]): the state of one instant, as dump
/// lines.
pub struct Backup(Export);

impl Backup {
    /// The next lines (at most about 64 KiB of records), `None` after the last.
    /// Blocking: call it from `spawn_blocking`.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.0.next_chunk()?)
    }

    /// What was written so far.
    pub fn stats(&self) -> DumpStats {
        self.0.stats()
    }
}

impl Inner {
    /// Drops expired entries, forgets idle channels, ends lapsed memberships.
    fn sweep_memory(&self, now: u64) -> Result<usize, Error> {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        for ch in state.channels.values_mut() {
            ch.drop_expired(now);
        }
        self.write_cursors(state, false)?;
        let mut batch = WriteBatch::default();
        let mut lapsed = Vec::new();
        for (group, members) in &state.groups {
            for (channel, membership) in members {
                if !membership.active_at(now, self.group_expiry_ms) {
                    self.pin_group_messages(state, group, channel, &mut batch);
                    batch.remove_membership(group, channel);
                    lapsed.push((group.clone(), channel.clone()));
                }
            }
        }
        if !lapsed.is_empty() {
            self.store.apply(batch)?;
            for (group, channel) in &lapsed {
                remove_member(state, group, channel);
            }
        }
        self.forget_idle(state);
        Ok(lapsed.len())
    }

    /// Deletes stored messages sent before `cutoff_ms` (past every expiry and replay
    /// time), their reference keys, and cursors that no longer point at anything, and
    /// raises the lost watermark to the highest deleted id in the same write.
    fn sweep_disk(&self, cutoff_ms: u64) -> Result<usize, Error> {
        let mut deleted = 0;
        loop {
            let round = self.store.delete_sent_before(cutoff_ms)?;
            if round.messages > 0 {
                let _ = self.stored_bytes.fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |stored| Some(stored.saturating_sub(round.bytes)),
                );
                self.reclaiming.store(true, Ordering::Relaxed);
            }
            deleted += round.messages;
            if !round.more {
                return Ok(deleted);
            }
        }
    }

    /// Measures the data directory and, while it is over twice the stored messages
    /// plus 64 MiB, makes the store give space back (sled alone waits for new writes;
    /// see [`Store::reclaim`]). Once a reclaim gives nothing back, the next waits for
    /// more deletions.
    fn reclaim_disk(&self) -> Result<bool, Error> {
        let disk = self.store.measure_disk();
        let stored = self.stored_bytes.load(Ordering::Relaxed);
        if !Store::is_bloated(disk, stored) || !self.reclaiming.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.store.reclaim()?;
        let after = self.store.measure_disk();
        if after >= disk {
            self.reclaiming.store(false, Ordering::Relaxed);
        }
        tracing::debug!(disk, after, stored, "reclaimed disk space");
        Ok(true)
    }

    /// Forgets the states of idle channels (see [`Channel::is_idle`]).
    pub(super) fn forget_idle(&self, state: &mut State) {
        let floor = self.lost_floor();
        state.channels.retain(|ch| !ch.is_idle(floor));
    }

    /// Writes receive cursors. `all`: every cursor as it is now (shutdown). Otherwise
    /// (each sweep) the cursors as they were at the previous sweep, so that a message
    /// counts as taken on disk one to two sweep intervals after it was handed out: a
    /// crash in between delivers it again rather than losing it with its answer.
    fn write_cursors(&self, state: &mut State, all: bool) -> Result<(), Error> {
        let mut batch = WriteBatch::default();
        let mut written = Vec::new();
        for (name, ch) in &state.channels {
            let target = if all { ch.taken_upto } else { ch.cursor_staged };
            if target > ch.cursor_on_disk {
                batch.put_cursor(name, target);
                written.push((name.clone(), target));
            }
        }
        if !written.is_empty() {
            self.store.apply(batch)?;
            self.store.flush_soon();
        }
        // Only what was written counts as on disk; a failed write is retried next sweep.
        for (name, target) in written {
            if let Some(ch) = state.channels.get_mut(&name) {
                ch.cursor_on_disk = target;
            }
        }
        for ch in state.channels.values_mut() {
            ch.cursor_staged = ch.taken_upto;
        }
        Ok(())
    }
}

impl Drop for Inner {
    /// Writes every receive cursor, so that a clean close redelivers nothing.
    fn drop(&mut self) {
        let mut state = std::mem::take(self.state.get_mut());
        if let Err(e) = self.write_cursors(&mut state, true) {
            tracing::error!(error = %e, "could not write receive cursors at close");
        }
    }
}
