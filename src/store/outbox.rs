//! The `outbox` and `dead_letters` tables: due rows, delivery bookkeeping,
//! retries and dead letters; and the outbox's enqueue handle ([`Outbox`]:
//! durable thread replies, acknowledgements, refreshes, then a wake-up for
//! the delivery worker, `Worker` in the top-level `outbox` module).

use std::sync::Arc;

use tokio::sync::Notify;

use crate::message::Message;
use rusqlite::params;

use crate::store::sqlite::Sqlite;
use crate::store::{self, now, DeadLetter, OutboxRow, Result, Store};

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

impl Sqlite {
    /// Rows due at `at`, oldest first, at most one per (group, destination)
    /// and only the first of each (so edits and replies keep their order).
    pub async fn due(&self, at: f64, limit: usize) -> Result<Vec<OutboxRow>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT id, group_id, destination, kind, rev, body, attempts, created_at, next_attempt_at
                 FROM outbox o
                 WHERE next_attempt_at <= ?1
                   AND NOT EXISTS (SELECT 1 FROM outbox p
                                   WHERE p.group_id=o.group_id AND p.destination=o.destination AND p.id<o.id)
                 ORDER BY id LIMIT ?2",
            )?;
            let rows = st
                .query_map(params![at, limit as i64], outbox_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Rows are not claimed in SQLite (one process): nothing to hand back.
    pub async fn release(&self, _ids: Vec<i64>) -> Result<()> {
        Ok(())
    }

    /// When the earliest pending row becomes due (None: outbox empty).
    pub async fn next_due(&self) -> Result<Option<f64>> {
        self.read(|c| Ok(c.query_row("SELECT MIN(next_attempt_at) FROM outbox", [], |r| r.get(0))?))
            .await
    }

    pub async fn pending(&self) -> Result<i64> {
        self.read(|c| Ok(c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?))
            .await
    }

    /// An alert row was delivered as `rev`: remember the message, and finish
    /// the row unless a newer state arrived meanwhile (then it runs again).
    pub async fn alert_delivered(
        &self,
        row: OutboxRow,
        rendered_rev: i64,
        channel: String,
        message_id: String,
    ) -> Result<()> {
        self.write(move |c| {
            let tx = c;
            let t = now();
            tx.execute(
                "INSERT INTO messages(group_id, destination, channel, message_id, rev, posted_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
                 ON CONFLICT(group_id, destination) DO UPDATE SET
                   channel=excluded.channel, message_id=excluded.message_id,
                   rev=excluded.rev, updated_at=excluded.updated_at",
                params![row.group_id, row.destination, channel, message_id, rendered_rev, t],
            )?;
            let deleted = tx.execute(
                "DELETE FROM outbox WHERE id=?1 AND rev<=?2",
                params![row.id, rendered_rev],
            )?;
            if deleted == 0 {
                tx.execute(
                    "UPDATE outbox SET attempts=0, next_attempt_at=?2, last_error=NULL WHERE id=?1",
                    params![row.id, t],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// The platform says the group's message at `destination` is gone:
    /// forget it, so the next attempt posts a new one.
    pub async fn forget_message(&self, group_id: i64, destination: String) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "DELETE FROM messages WHERE group_id=?1 AND destination=?2",
                params![group_id, destination],
            )?;
            Ok(())
        })
        .await
    }

    /// A reply (or any non-alert row) was delivered.
    pub async fn delivered(&self, id: i64) -> Result<()> {
        self.write(move |c| {
            c.execute("DELETE FROM outbox WHERE id=?1", [id])?;
            Ok(())
        })
        .await
    }

    /// Schedules another attempt.
    pub async fn retry_at(&self, id: i64, at: f64, error: String) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE outbox SET attempts=attempts+1, next_attempt_at=?2, last_error=?3 WHERE id=?1",
                params![id, at, error],
            )?;
            Ok(())
        })
        .await
    }

    /// Moves a row to the dead letters with the platform's error.
    pub async fn dead_letter(&self, row: OutboxRow, error: String) -> Result<()> {
        self.write(move |c| {
            let tx = c;
            tx.execute(
                "INSERT INTO dead_letters(outbox_id, group_id, destination, kind, body, attempts, error, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    row.id,
                    row.group_id,
                    row.destination,
                    row.kind,
                    row.body,
                    row.attempts + 1,
                    error,
                    now()
                ],
            )?;
            tx.execute("DELETE FROM outbox WHERE id=?1", [row.id])?;
            Ok(())
        })
        .await
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT id, group_id, destination, kind, attempts, error, at FROM dead_letters ORDER BY id",
            )?;
            let rows = st
                .query_map([], |r| {
                    Ok(DeadLetter {
                        id: r.get(0)?,
                        group_id: r.get(1)?,
                        destination: r.get(2)?,
                        kind: r.get(3)?,
                        attempts: r.get(4)?,
                        error: r.get(5)?,
                        at: r.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }
}

fn outbox_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.get(0)?,
        group_id: r.get(1)?,
        destination: r.get(2)?,
        kind: r.get(3)?,
        rev: r.get(4)?,
        body: r.get(5)?,
        attempts: r.get(6)?,
        created_at: r.get(7)?,
        next_attempt_at: r.get(8)?,
    })
}
