//! Connection slots: every open connection holds one from the moment it is accepted
//! until it closes (idle keep-alive connections and upgraded WebSockets included), at
//! most `server.max_connections` in all and `limits.max_connections_per_client` from
//! one client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http::{Refusal, client_address};
use crate::metrics;

/// The slots of a server.
pub(crate) struct Slots {
    total: Arc<Semaphore>,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    per_client_max: usize,
}

/// One connection's slot, given back when dropped.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: Arc<Slots>,
    client: IpAddr,
    /// Counts the connection in the metrics while it holds the slot.
    _counted: metrics::Connection,
}

impl Slots {
    pub(crate) fn new(max_connections: usize, per_client_max: usize) -> Arc<Self> {
        Arc::new(Slots {
            total: Arc::new(Semaphore::new(max_connections)),
            per_client: Mutex::default(),
            per_client_max,
        })
    }

    /// A slot for a connection from `peer`, or why there is none.
    pub(crate) fn take(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Refusal> {
        let client = client_address(peer);
        let permit = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::ServerFull)?;
        let mut per_client = self.per_client.lock();
        let open = per_client.entry(client).or_default();
        if *open >= self.per_client_max {
            return Err(Refusal::ClientFull);
        }
        *open += 1;
        Ok(Slot {
            _permit: permit,
            slots: self.clone(),
            client,
            _counted: metrics::Connection::open(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_client = self.slots.per_client.lock();
        if let Some(open) = per_client.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_in_all_and_per_client_and_come_back_when_dropped() {
        let slots = Slots::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.take(a).expect("a slot");
        let _a2 = slots.take(a).expect("a slot");
        assert!(matches!(slots.take(a), Err(Refusal::ClientFull)));
        let _b1 = slots.take(b).expect("another client has its own count");
        assert!(matches!(slots.take(b), Err(Refusal::ServerFull)));
        drop(a1);
        let _a3 = slots
            .take(a)
            .expect("a closed connection gives its slot back");
        drop(_a3);
        drop(_a2);
        assert!(
            slots.per_client.lock().get(&a).is_none(),
            "no count is kept at zero"
        );
    }
}
