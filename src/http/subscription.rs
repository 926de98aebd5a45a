//! Long-lived deliveries of one channel to one client (an SSE stream or a WebSocket
//! `subscribe`): replay after a last event id, then live messages, with backpressure.
//!
//! A task takes a message off the channel only when it holds a free slot in the
//! client's bounded outbox, so a slow reader leaves its messages queued; when no slot
//! frees up for `slow_consumer_secs`, the subscription ends. Every message handed to a
//! client stays in the channel's replay log, so a client that lost its connection
//! resumes with its last id and misses nothing. A resuming subscription takes the
//! channel over: earlier subscriptions of that channel are stopped first.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Api;
use crate::layer::Gap;
use crate::message::Message;

/// What a subscription pushes to its client.
#[derive(Debug, Clone)]
pub enum Push {
    /// A delivered message and its id (the SSE event id a client resumes from).
    Message { id: u64, message: Arc<Message> },
    /// Messages a resuming client needed are no longer in the replay log (`herald.gap`).
    Gap(Gap),
}

/// Slots in a client's outbox: messages taken off the queue but not yet written.
pub const OUTBOX: usize = 16;

/// How long one receive waits before the loop looks around again.
const RECEIVE_SLICE: Duration = Duration::from_secs(300);

/// What to subscribe to.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The channel whose messages the subscription delivers.
    pub channel: String,
    /// The last id the client saw (Last-Event-ID): replay what came after it first.
    pub last_event_id: Option<u64>,
    /// Groups whose membership the subscription keeps fresh while it runs.
    pub groups: Vec<String>,
    /// The channel was made for this subscription: leave its groups and delete it at the end.
    pub ephemeral: bool,
}

/// The running subscriptions, by channel, so that a resuming one can stop the others.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    running: Mutex<HashMap<String, Vec<Running>>>,
}

struct Running {
    id: u64,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Registry {
    /// Stops every subscription of `channel` and waits until they have stopped, so
    /// that none takes another message.
    async fn take_over(&self, channel: &str) {
        let running = self.running.lock().remove(channel).unwrap_or_default();
        for sub in running {
            sub.stop.cancel();
            let _ = sub.task.await;
        }
    }

    fn insert(&self, channel: &str, running: Running) {
        let mut map = self.running.lock();
        let list = map.entry(channel.to_string()).or_default();
        list.retain(|r| !r.task.is_finished());
        if !running.task.is_finished() {
            list.push(running);
        }
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
}

/// Starts a subscription and returns its outbox and a token that stops it.
pub async fn start(
    api: &Api,
    spec: Spec,
    permit: Option<OwnedSemaphorePermit>,
) -> (mpsc::Receiver<Push>, CancellationToken) {
    if spec.last_event_id.is_some() {
        api.streams.take_over(&spec.channel).await;
    }
    let (tx, rx) = mpsc::channel(OUTBOX);
    let stop = api.shutdown.child_token();
    let id = api.streams.next_id.fetch_add(1, Ordering::Relaxed);
    let channel = spec.channel.clone();
    let task = tokio::spawn({
        let api = api.clone();
        let stop = stop.clone();
        async move {
            run(&api, &spec, &tx, &stop).await;
            finish(&api, &spec).await;
            // The client's stream ends only now, so that a graceful shutdown, which
            // waits for open connections before its final flush, covers `finish`.
            drop(tx);
            api.streams.remove(&spec.channel, id);
            drop(permit);
        }
    });
    api.streams.insert(
        &channel,
        Running {
            id,
            stop: stop.clone(),
            task,
        },
    );
    (rx, stop)
}

async fn run(api: &Api, spec: &Spec, tx: &mpsc::Sender<Push>, stop: &CancellationToken) {
    let slow = Duration::from_secs(api.settings.slow_consumer_secs);
    let layer = &api.layer;
    let mut last = spec.last_event_id;
    if let Some(after) = spec.last_event_id {
        let replay = match layer.replay(&spec.channel, after) {
            Ok(replay) => replay,
            Err(e) => {
                tracing::warn!(channel = %spec.channel, error = %e, "replay failed");
                return;
            }
        };
        let pushes =
            replay
                .gap
                .map(Push::Gap)
                .into_iter()
                .chain(replay.deliveries.into_iter().map(|d| Push::Message {
                    id: d.id,
                    message: d.message,
                }));
        for push in pushes {
            if let Push::Message { id, .. } = &push {
                last = Some(*id);
            }
            let Some(permit) = reserve(tx, slow, stop).await else {
                return;
            };
            permit.send(push);
        }
    }
    let refresh_every =
        (layer.group_expiry() / 3).clamp(Duration::from_secs(1), Duration::from_secs(300));
    let mut refresh =
        tokio::time::interval_at(tokio::time::Instant::now() + refresh_every, refresh_every);
    loop {
        let Some(permit) = reserve(tx, slow, stop).await else {
            return;
        };
        let delivery = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = refresh.tick(), if !spec.groups.is_empty() => {
                for group in &spec.groups {
                    if let Err(e) = layer.group_add(group, &spec.channel).await {
                        tracing::warn!(group, channel = %spec.channel, error = %e, "membership refresh failed");
                    }
                }
                continue;
            }
            received = layer.receive(&spec.channel, RECEIVE_SLICE) => match received {
                Ok(Some(delivery)) => delivery,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(channel = %spec.channel, error = %e, "receive failed; ending the stream");
                    return;
                }
            },
        };
        if last.is_some_and(|l| delivery.id <= l) {
            continue;
        }
        permit.send(Push::Message {
            id: delivery.id,
            message: delivery.message,
        });
    }
}

/// A free outbox slot, or `None` when the client is gone, too slow, or we stop.
async fn reserve<'a>(
    tx: &'a mpsc::Sender<Push>,
    slow: Duration,
    stop: &CancellationToken,
) -> Option<mpsc::Permit<'a, Push>> {
    tokio::select! {
        _ = stop.cancelled() => None,
        reserved = tokio::time::timeout(slow, tx.reserve()) => match reserved {
            Ok(Ok(permit)) => Some(permit),
            Ok(Err(_closed)) => None,
            Err(_elapsed) => {
                tracing::info!("closing a stream whose client has not read for {slow:?}");
                None
            }
        },
    }
}

/// Leaves the groups and deletes the channel of an ephemeral subscription.
async fn finish(api: &Api, spec: &Spec) {
    if !spec.ephemeral {
        return;
    }
    for group in &spec.groups {
        if let Err(e) = api.layer.group_discard(group, &spec.channel).await {
            tracing::warn!(group, channel = %spec.channel, error = %e, "could not leave group");
        }
    }
    if let Err(e) = api.layer.delete_channel(&spec.channel).await {
        tracing::warn!(channel = %spec.channel, error = %e, "could not delete channel");
    }
}
