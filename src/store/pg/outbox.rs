//! PostgreSQL: the outbox shared by replicas. [`Pg::due`] claims rows with
//! `FOR UPDATE SKIP LOCKED` and a lease (`claimed_by`, `lease_until`): two
//! replicas never claim the same row, a row whose replica died is taken
//! over once its lease expires, and only the first row of a (group,
//! destination) is ever claimable, so a post goes before its edits and
//! thread replies whichever replica sends them.

use crate::store::pg::{big, get, Pg, LEASE};
use crate::store::{now, DeadLetter, OutboxRow, Result};

const ROW: &str = "o.id, o.group_id, o.destination, o.kind, o.rev, o.body, o.attempts, o.created_at, o.next_attempt_at";

impl Pg {
    pub async fn due(&self, at: f64, limit: usize) -> Result<Vec<OutboxRow>> {
        let lease_until = now() + LEASE.as_secs_f64();
        let t = now();
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!(
                        "WITH c AS (
                           SELECT id FROM outbox o
                           WHERE next_attempt_at <= $1
                             AND (lease_until IS NULL OR lease_until < $2)
                             AND NOT EXISTS (SELECT 1 FROM outbox p
                                             WHERE p.group_id=o.group_id AND p.destination=o.destination
                                               AND p.id<o.id)
                           ORDER BY id LIMIT $3
                           FOR UPDATE SKIP LOCKED)
                         UPDATE outbox o SET claimed_by=$4, lease_until=$5 FROM c WHERE o.id=c.id
                         RETURNING {ROW}"
                    ),
                    &[&at, &t, &big(limit), &&*self.replica, &lease_until],
                )
                .await?;
            let mut out = rows.iter().map(outbox_row).collect::<Result<Vec<_>>>()?;
            out.sort_by_key(|r| r.id);
            Ok(out)
        })
        .await
    }

    pub async fn release(&self, ids: Vec<i64>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.exec(
            "UPDATE outbox SET claimed_by=NULL, lease_until=NULL WHERE id = ANY($1) AND claimed_by=$2",
            &[&ids, &&*self.replica],
        )
        .await
        .map(|_| ())
    }

    /// When the earliest row becomes claimable (a claimed row: when its
    /// lease ends).
    pub async fn next_due(&self) -> Result<Option<f64>> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "SELECT MIN(GREATEST(next_attempt_at, COALESCE(lease_until, 0))) FROM outbox",
                    &[],
                )
                .await?;
            get(&row, 0)
        })
        .await
    }

    pub async fn pending(&self) -> Result<i64> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one("SELECT COUNT(*)::BIGINT FROM outbox", &[])
                .await?;
            get(&row, 0)
        })
        .await
    }

    pub async fn alert_delivered(
        &self,
        row: OutboxRow,
        rendered_rev: i64,
        channel: String,
        message_id: String,
    ) -> Result<()> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let t = now();
            tx.execute(
                "INSERT INTO messages(group_id, destination, channel, message_id, rev, posted_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)
                 ON CONFLICT(group_id, destination) DO UPDATE SET
                   channel=excluded.channel, message_id=excluded.message_id,
                   rev=excluded.rev, updated_at=excluded.updated_at",
                &[&row.group_id, &row.destination, &channel, &message_id, &rendered_rev, &t],
            )
            .await?;
            let deleted = tx
                .execute(
                    "DELETE FROM outbox WHERE id=$1 AND rev<=$2",
                    &[&row.id, &rendered_rev],
                )
                .await?;
            if deleted == 0 {
                tx.execute(
                    "UPDATE outbox SET attempts=0, next_attempt_at=$2, last_error=NULL,
                       claimed_by=NULL, lease_until=NULL WHERE id=$1",
                    &[&row.id, &t],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub async fn forget_message(&self, group_id: i64, destination: String) -> Result<()> {
        self.within(async {
            let c = self.client().await?;
            c.execute(
                "DELETE FROM messages WHERE group_id=$1 AND destination=$2",
                &[&group_id, &destination],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn delivered(&self, id: i64) -> Result<()> {
        self.within(async {
            let c = self.client().await?;
            c.execute("DELETE FROM outbox WHERE id=$1", &[&id]).await?;
            Ok(())
        })
        .await
    }

    pub async fn retry_at(&self, id: i64, at: f64, error: String) -> Result<()> {
        self.within(async {
            let c = self.client().await?;
            c.execute(
                "UPDATE outbox SET attempts=attempts+1, next_attempt_at=$2, last_error=$3,
                   claimed_by=NULL, lease_until=NULL WHERE id=$1",
                &[&id, &at, &error],
            )
            .await?;
            Ok(())
        })
        .await
    }

    pub async fn dead_letter(&self, row: OutboxRow, error: String) -> Result<()> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO dead_letters(outbox_id, group_id, destination, kind, body, attempts, error, at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &row.id,
                    &row.group_id,
                    &row.destination,
                    &row.kind,
                    &row.body,
                    &(row.attempts + 1),
                    &error,
                    &now(),
                ],
            )
            .await?;
            tx.execute("DELETE FROM outbox WHERE id=$1", &[&row.id])
                .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT id, group_id, destination, kind, attempts, error, at FROM dead_letters ORDER BY id",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(DeadLetter {
                        id: get(r, 0)?,
                        group_id: get(r, 1)?,
                        destination: get(r, 2)?,
                        kind: get(r, 3)?,
                        attempts: get(r, 4)?,
                        error: get(r, 5)?,
                        at: get(r, 6)?,
                    })
                })
                .collect()
        })
        .await
    }
}

fn outbox_row(r: &tokio_postgres::Row) -> Result<OutboxRow> {
    Ok(OutboxRow {
        id: get(r, 0)?,
        group_id: get(r, 1)?,
        destination: get(r, 2)?,
        kind: get(r, 3)?,
        rev: get(r, 4)?,
        body: get(r, 5)?,
        attempts: get(r, 6)?,
        created_at: get(r, 7)?,
        next_attempt_at: get(r, 8)?,
    })
}
