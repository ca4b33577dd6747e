//! The outbox's enqueue handle: durable pending deliveries (thread replies,
//! acknowledgements, refreshes) committed to the store, then a wake-up for
//! the delivery worker (`Worker` in the top-level `outbox` module).

use std::sync::Arc;

use tokio::sync::Notify;

use crate::message::Message;
use crate::store::{self, Store};

/// The handle other modules use to enqueue work. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn new(store: Store) -> Outbox {
        Outbox {
            store,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Tells the worker there is new work.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves when [`Outbox::wake`] was called (the worker waits on it).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// Posts `message` as a thread reply under the group's message at every
    /// destination the group was (or is about to be) posted to. Durable:
    /// returns after the rows are committed. Returns how many were enqueued.
    pub async fn reply(&self, group_id: i64, message: &Message) -> store::Result<usize> {
        let body = serde_json::to_string(message).unwrap_or_default();
        let n = self.store.enqueue_reply(group_id, body).await?;
        self.wake();
        Ok(n)
    }

    /// Records who acknowledged the group and edits its messages to say so.
    /// `false` when the group does not exist.
    pub async fn acknowledge(&self, group_id: i64, who: &str) -> store::Result<bool> {
        let found = self.store.acknowledge(group_id, who.to_string()).await?;
        self.wake();
        Ok(found)
    }

    /// Re-renders the group's messages in place.
    pub async fn refresh(&self, group_id: i64) -> store::Result<usize> {
        let n = self.store.refresh(group_id).await?;
        self.wake();
        Ok(n)
    }
}
