//! Long-lived deliveries of one channel to one client (an SSE stream or a WebSocket
//! `subscribe`): replay after a last event id, then live messages, with backpressure.
//!
//! A [`Subscription`] is a stream polled by the client's connection itself: it takes a
//! message off the channel only when the connection asks for the next one, so a slow
//! reader leaves its messages queued, and a delivery costs no hand-off between tasks.
//! The [`watchdog`] ends a subscription that had a message to hand over but was not
//! asked for it for `slow_consumer_secs`. Every message handed to a client stays in the
//! channel's replay log, so a client that lost its connection resumes with its last id
//! and misses nothing. A resuming subscription takes the channel over: earlier
//! subscriptions of that channel are cut off first.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::time::{Instant, Sleep};

use super::Api;
use super::error::{ApiError, ErrorKind};
use crate::auth::{Held, Policy};
use crate::layer::{self, Gap, LeaseTerms, Receiver, Revoker};
use crate::message::Message;
use crate::metrics::{Subscribed, Transport, metrics};
use prometheus_client::metrics::counter::Counter;

/// What a subscription pushes to its client.
#[derive(Debug, Clone)]
pub(crate) enum Push {
    /// A delivered message and its id (the SSE event id a client resumes from).
    Message { id: u64, message: Arc<Message> },
    /// Messages a resuming client needed are no longer in the replay log (`herald.gap`).
    Gap(Gap),
}

/// What to subscribe to.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    /// The channel whose messages the subscription delivers.
    pub channel: String,
    /// The last id the client saw (Last-Event-ID): replay what came after it first.
    pub last_event_id: Option<u64>,
    /// Groups whose membership the subscription keeps fresh while it runs.
    pub groups: Vec<String>,
    /// The channel was made for this subscription: leave its groups and delete it at the end.
    pub ephemeral: bool,
    /// What the subscription was allowed, checked again on reloads and at its token's expiry.
    pub held: Held,
    /// Lease what it pushes, a window at a time (a WebSocket `subscribe` with `lease`).
    pub leasing: Option<Leasing>,
}

/// How a subscription leases what it pushes: each message under `terms`, and at most
/// `window` of them unacknowledged at once (as AMQP's prefetch count).
#[derive(Debug, Clone)]
pub(crate) struct Leasing {
    pub terms: LeaseTerms,
    pub window: usize,
    /// Woken when one of its messages is acknowledged: the window has room again.
    pub acked: Arc<AtomicWaker>,
}

/// How often a subscription whose window is full looks again without an
/// acknowledgement (a lease that runs out frees room too): the lease timer's period.
const WINDOW_RECHECK: Duration = Duration::from_millis(250);

/// How often subscriptions whose token has expired are looked for: an expired token's
/// streams end within this time.
const EXPIRY_CHECK: Duration = Duration::from_millis(250);

/// The running subscriptions, by channel, so that a resuming one can cut the others
/// off and the watchdog can find the stalled ones.
#[derive(Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    running: Mutex<HashMap<String, Vec<Running>>>,
}

/// One running subscription as the registry sees it.
struct Running {
    id: u64,
    revoker: Revoker,
    progress: Arc<Progress>,
    held: Held,
    /// The watchdog's view: the poll count at its last look, and since when the
    /// subscription has been stalled.
    seen_polls: u64,
    stalled_since: Option<Instant>,
}

/// What a subscription's stream tells the watchdog, without locks.
#[derive(Default)]
struct Progress {
    /// Times the stream was polled.
    polls: AtomicU64,
    /// The last poll handed out an item: a connection that keeps up polls again at once.
    handed_out: AtomicBool,
    /// The watchdog ended it because its client did not read.
    too_slow: AtomicBool,
    /// It ended because the access control no longer allows it.
    lost_access: AtomicBool,
}

impl Registry {
    /// Cuts off every subscription of `channel`: once this returns, none takes another message.
    fn take_over(&self, channel: &str) {
        let running = self.running.lock().remove(channel).unwrap_or_default();
        for sub in &running {
            sub.revoker.revoke();
        }
    }

    /// Cuts off every subscription (shutdown).
    fn cut_off_all(&self) {
        let running = std::mem::take(&mut *self.running.lock());
        for sub in running.values().flatten() {
            sub.revoker.revoke();
        }
    }

    fn insert(&self, channel: &str, running: Running) {
        self.running
            .lock()
            .entry(channel.to_string())
            .or_default()
            .push(running);
    }

    fn remove(&self, channel: &str, id: u64) {
        let mut map = self.running.lock();
        if let Some(list) = map.get_mut(channel) {
            list.retain(|r| r.id != id);
            if list.is_empty() {
                map.remove(channel);
            }
        }
    }

    /// Cuts off the subscriptions `policy` no longer allows: all of them are checked
    /// after a reload (`everything`), otherwise those whose token has expired.
    fn cut_off_disallowed(&self, policy: &Arc<Policy>, everything: bool) {
        let now = std::time::SystemTime::now();
        let mut map = self.running.lock();
        for list in map.values_mut() {
            list.retain(|sub| {
                let due = everything || sub.held.expires.is_some_and(|at| at <= now);
                if !due || policy.still_allows(&sub.held) {
                    return true;
                }
                tracing::info!("ending a stream that the access control no longer allows");
                sub.progress.lost_access.store(true, Ordering::Relaxed);
                sub.revoker.revoke();
                false
            });
        }
        map.retain(|_, list| !list.is_empty());
    }

    /// Cuts off the subscriptions that had something to hand over (an item taken, or
    /// a message waiting for them) but were not polled for `slow`.
    fn cut_off_stalled(&self, slow: Duration) {
        let now = Instant::now();
        let mut map = self.running.lock();
        for list in map.values_mut() {
            list.retain_mut(|sub| {
                let polls = sub.progress.polls.load(Ordering::Relaxed);
                let stalled = polls == sub.seen_polls
                    && (sub.progress.handed_out.load(Ordering::Relaxed)
                        || sub.revoker.has_message_waiting());
                sub.seen_polls = polls;
                if !stalled {
                    sub.stalled_since = None;
                    return true;
                }
                let since = *sub.stalled_since.get_or_insert(now);
                if now.duration_since(since) < slow {
                    return true;
                }
                tracing::info!("ending a stream whose client has not read for {slow:?}");
                sub.progress.too_slow.store(true, Ordering::Relaxed);
                sub.revoker.revoke();
                false
            });
        }
        map.retain(|_, list| !list.is_empty());
    }
}

/// `last_event_id` if it is a point to resume from: 400 `invalid_last_event_id` when it
/// is above every id assigned (it would skip every message to come).
pub(crate) fn resume_point(api: &Api, last_event_id: Option<u64>) -> Result<Option<u64>, ApiError> {
    match last_event_id {
        Some(id) if id > api.layer.highest_id() => Err(ApiError::new(
            ErrorKind::InvalidLastEventId,
            format!("no message id up to {id} was assigned yet: resume from an id received"),
        )),
        resume => Ok(resume),
    }
}

/// Ends stalled subscriptions (see [`Registry::cut_off_stalled`]) and forgets the
/// publish rates of idle clients until shutdown, then ends every subscription.
pub(crate) async fn watchdog(api: Api) {
    let slow = Duration::from_secs(api.settings.slow_consumer_secs);
    let every = (slow / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = api.shutdown.cancelled() => break,
            _ = ticks.tick() => {
                api.streams.cut_off_stalled(slow);
                api.forget_idle_clients();
            }
        }
    }
    api.streams.cut_off_all();
}

/// Ends the subscriptions that the access control no longer allows: every one after a
/// reload, and those of expired tokens within [`EXPIRY_CHECK`].
pub(crate) async fn access_watch(api: Api) {
    let mut ticks = tokio::time::interval(EXPIRY_CHECK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let everything = tokio::select! {
            _ = api.shutdown.cancelled() => return,
            _ = api.policy_changed.notified() => true,
            _ = ticks.tick() => false,
        };
        api.streams.cut_off_disallowed(&api.policy(), everything);
    }
}

/// A channel's messages for one client, as a stream: first the replay after the last
/// event id (with a gap when some are gone), then live messages as they arrive. It ends
/// when its receiver is revoked: on shutdown, take-over, a stalled client, lost access,
/// or a WebSocket unsubscribe.
pub(crate) struct Subscription {
    api: Api,
    spec: Spec,
    id: u64,
    replay: VecDeque<Push>,
    receiver: Receiver,
    progress: Arc<Progress>,
    /// When to renew the group memberships next (only with groups).
    refresh: Option<Pin<Box<Sleep>>>,
    /// When a full lease window is looked at again.
    recheck: Option<Pin<Box<Sleep>>>,
    ended: bool,
    /// Counts the messages it hands out, under its transport.
    delivered: &'static Counter,
    _counted: Subscribed,
}

impl Subscription {
    /// Starts a subscription (taking its channel over when it resumes) whose messages
    /// go out over `transport`.
    pub fn start(api: &Api, spec: Spec, transport: Transport) -> Result<Self, layer::Error> {
        if spec.last_event_id.is_some() {
            api.streams.take_over(&spec.channel);
        }
        let lease = spec.leasing.as_ref().map(|leasing| leasing.terms);
        let receiver = api.layer.receiver_with(&spec.channel, lease)?;
        let mut replay = VecDeque::new();
        if let Some(after) = spec.last_event_id {
            let found = api.layer.replay(&spec.channel, after)?;
            replay.extend(found.gap.map(Push::Gap));
            replay.extend(found.deliveries.into_iter().map(|d| Push::Message {
                id: d.id,
                message: d.message,
            }));
        }
        let progress = Arc::new(Progress::default());
        let id = api.streams.next_id.fetch_add(1, Ordering::Relaxed);
        api.streams.insert(
            &spec.channel,
            Running {
                id,
                revoker: receiver.revoker(),
                progress: progress.clone(),
                held: spec.held.clone(),
                seen_polls: 0,
                stalled_since: None,
            },
        );
        if api.shutdown.is_cancelled() {
            // The shutdown's cut-off may have run before the insert.
            receiver.revoker().revoke();
        }
        let refresh =
            (!spec.groups.is_empty()).then(|| Box::pin(tokio::time::sleep(refresh_every(api))));
        Ok(Subscription {
            api: api.clone(),
            id,
            replay,
            receiver,
            progress,
            refresh,
            recheck: None,
            ended: false,
            spec,
            delivered: metrics().deliveries(transport),
            _counted: Subscribed::new(),
        })
    }

    /// What ends this subscription (a WebSocket unsubscribe revokes it).
    pub fn stopper(&self) -> Revoker {
        self.receiver.revoker()
    }

    /// Whether it ended because its client did not read for `slow_consumer_secs`.
    pub(crate) fn was_too_slow(&self) -> bool {
        self.progress.too_slow.load(Ordering::Relaxed)
    }

    /// Whether it ended because the access control no longer allows it.
    pub(crate) fn lost_access(&self) -> bool {
        self.progress.lost_access.load(Ordering::Relaxed)
    }

    fn next_push(&mut self, cx: &mut Context<'_>) -> Poll<Option<Push>> {
        if self.ended || self.receiver.is_revoked() {
            self.end();
            return Poll::Ready(None);
        }
        if let Some(push) = self.replay.pop_front() {
            if matches!(push, Push::Message { .. }) {
                self.delivered.inc();
            }
            return Poll::Ready(Some(push));
        }
        if let Some(refresh) = &mut self.refresh
            && refresh.as_mut().poll(cx).is_ready()
        {
            refresh
                .as_mut()
                .reset(Instant::now() + refresh_every(&self.api));
            let _ = refresh.as_mut().poll(cx);
            tokio::spawn(renew(
                self.api.clone(),
                self.spec.groups.clone(),
                self.spec.channel.clone(),
            ));
        }
        if self.window_is_full(cx) {
            return Poll::Pending;
        }
        let resumed_after = self.spec.last_event_id;
        loop {
            match self.receiver.poll_receive(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.end();
                    return Poll::Ready(None);
                }
                // Already replayed.
                Poll::Ready(Some(d)) if resumed_after.is_some_and(|after| d.id <= after) => {}
                Poll::Ready(Some(d)) => {
                    self.delivered.inc();
                    return Poll::Ready(Some(Push::Message {
                        id: d.id,
                        message: d.message,
                    }));
                }
            }
        }
    }

    /// Whether it holds as many unacknowledged leases as its window allows; then it is
    /// woken by the next acknowledgement, or looks again after [`WINDOW_RECHECK`].
    fn window_is_full(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(leasing) = &self.spec.leasing else {
            return false;
        };
        leasing.acked.register(cx.waker());
        let holder = leasing.terms.holder.unwrap_or_default();
        if self.api.layer.leases_held(&self.spec.channel, holder) < leasing.window {
            return false;
        }
        let recheck = self
            .recheck
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(WINDOW_RECHECK)));
        if recheck.as_mut().poll(cx).is_ready() {
            recheck.as_mut().reset(Instant::now() + WINDOW_RECHECK);
            let _ = recheck.as_mut().poll(cx);
        }
        true
    }

    /// Leaves the registry and, for an ephemeral channel, its groups and the channel.
    fn end(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        self.api.streams.remove(&self.spec.channel, self.id);
        // Shutdown waits for these before its final flush. (Without a runtime the
        // process is ending; the membership then lapses by itself.)
        if self.spec.ephemeral
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            self.api
                .background
                .spawn_on(finish(self.api.clone(), self.spec.clone()), &runtime);
        }
    }
}

impl Stream for Subscription {
    type Item = Push;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Push>> {
        let this = self.get_mut();
        this.progress.polls.fetch_add(1, Ordering::Relaxed);
        let next = this.next_push(cx);
        this.progress
            .handed_out
            .store(matches!(next, Poll::Ready(Some(_))), Ordering::Relaxed);
        next
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.end();
    }
}

/// How often group memberships are renewed: well within their expiry.
fn refresh_every(api: &Api) -> Duration {
    (api.layer.group_expiry() / 3).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// Renews `channel`'s membership of `groups`.
async fn renew(api: Api, groups: Vec<String>, channel: String) {
    for group in &groups {
        if let Err(e) = api.layer.group_add(group, &channel).await {
            tracing::warn!(group, channel, error = %e, "membership refresh failed");
        }
    }
}

/// Leaves the groups and deletes the channel of an ephemeral subscription.
async fn finish(api: Api, spec: Spec) {
    if let Err(e) = api.layer.close_channel(&spec.channel, &spec.groups).await {
        tracing::warn!(channel = %spec.channel, error = %e, "could not close the stream's channel");
    }
}
