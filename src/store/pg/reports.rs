//! PostgreSQL: health-report slots and the incident queries of a report's
//! "Incidents" section (the SQLite side and the types: `store/reports.rs`).
//! A slot is claimed under a transaction-scoped advisory lock per report and
//! its primary key, in the transaction that enqueues its deliveries, so two
//! replicas reaching the same slot send it once.

use crate::store::pg::{get, Pg};
use crate::store::reports::{IncidentCounts, IncidentGroup, ReportDelivery, BASELINE};
use crate::store::{now, Result};

/// The advisory lock class of report slot claims (the key is `hashtext(name)`).
const REPORT_LOCK: i32 = 7262;

async fn insert_outbox(
    tx: &impl deadpool_postgres::GenericClient,
    d: &ReportDelivery,
    t: f64,
) -> Result<i64> {
    let row = tx
        .query_one(
            "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
             VALUES (0, $1, 'reply', 0, $2, $3, $3) RETURNING id",
            &[&d.destination, &d.body, &t],
        )
        .await?;
    get(&row, 0)
}

impl Pg {
    pub async fn last_report_slot(&self, name: String) -> Result<Option<f64>> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one("SELECT MAX(slot) FROM report_slots WHERE name=$1", &[&name])
                .await?;
            get(&row, 0)
        })
        .await
    }

    pub async fn report_baseline(&self, name: String, at: f64) -> Result<()> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&REPORT_LOCK, &name],
            )
            .await?;
            tx.execute(
                "INSERT INTO report_slots(name, slot, claimed_at, late, outcome)
                 SELECT $1, $2, $2, 0, $3
                 WHERE NOT EXISTS (SELECT 1 FROM report_slots WHERE name=$1)
                 ON CONFLICT (name, slot) DO NOTHING",
                &[&name, &at, &BASELINE],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub async fn claim_report_slot(
        &self,
        name: String,
        slot: f64,
        late: bool,
        outcome: String,
        deliveries: Vec<ReportDelivery>,
    ) -> Result<bool> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&REPORT_LOCK, &name],
            )
            .await?;
            let row = tx
                .query_one("SELECT MAX(slot) FROM report_slots WHERE name=$1", &[&name])
                .await?;
            let last: Option<f64> = get(&row, 0)?;
            if last.is_some_and(|l| l >= slot) {
                return Ok(false);
            }
            let t = now();
            let inserted = tx
                .execute(
                    "INSERT INTO report_slots(name, slot, claimed_at, late, outcome)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name, slot) DO NOTHING",
                    &[&name, &slot, &t, &i64::from(late), &outcome],
                )
                .await?;
            if inserted == 0 {
                return Ok(false);
            }
            for d in &deliveries {
                insert_outbox(&tx, d, t).await?;
            }
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    pub async fn report_slots(&self, name: String) -> Result<Vec<(f64, bool, String)>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT slot, late, outcome FROM report_slots WHERE name=$1 AND outcome<>$2
                     ORDER BY slot",
                    &[&name, &BASELINE],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let late: i64 = get(r, 1)?;
                    Ok((get(r, 0)?, late != 0, get(r, 2)?))
                })
                .collect()
        })
        .await
    }

    pub async fn enqueue_report(&self, deliveries: Vec<ReportDelivery>) -> Result<Vec<i64>> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let t = now();
            let mut ids = Vec::new();
            for d in &deliveries {
                ids.push(insert_outbox(&tx, d, t).await?);
            }
            tx.commit().await?;
            Ok(ids)
        })
        .await
    }

    pub async fn report_delivery_state(&self, ids: Vec<i64>) -> Result<(usize, Vec<String>)> {
        self.within(async {
            let c = self.client().await?;
            let pending = c
                .query("SELECT id FROM outbox WHERE id = ANY($1)", &[&ids])
                .await?
                .len();
            let rows = c
                .query(
                    "SELECT destination, error FROM dead_letters WHERE outbox_id = ANY($1)
                     ORDER BY outbox_id",
                    &[&ids],
                )
                .await?;
            let dead = rows
                .iter()
                .map(|r| {
                    let (d, e): (String, String) = (get(r, 0)?, get(r, 1)?);
                    Ok(format!("{d}: {e}"))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((pending, dead))
        })
        .await
    }

    pub async fn incident_groups(&self, start: f64, end: f64) -> Result<Vec<IncidentGroup>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT g.id, g.tier, g.status, g.first_seen, g.updated_at, g.state,
                            (SELECT MIN(m.posted_at) FROM messages m WHERE m.group_id=g.id),
                            (SELECT a.at FROM acks a WHERE a.group_id=g.id),
                            (SELECT COUNT(*) FROM webhooks w WHERE w.group_id=g.id
                               AND w.received_at >= $1 AND w.received_at < $2)
                     FROM alert_groups g
                     WHERE g.first_seen < $2 AND (g.status='firing' OR g.updated_at >= $1)
                     ORDER BY g.id",
                    &[&start, &end],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(IncidentGroup {
                        id: get(r, 0)?,
                        tier: get(r, 1)?,
                        status: get(r, 2)?,
                        first_seen: get(r, 3)?,
                        updated_at: get(r, 4)?,
                        state: get(r, 5)?,
                        first_notified: get(r, 6)?,
                        acked_at: get(r, 7)?,
                        webhooks: get(r, 8)?,
                    })
                })
                .collect()
        })
        .await
    }

    pub async fn incident_counts(&self, start: f64, end: f64) -> Result<IncidentCounts> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "SELECT COUNT(*) FROM dead_letters WHERE at >= $1 AND at < $2",
                    &[&start, &end],
                )
                .await?;
            let dead_letters: i64 = get(&row, 0)?;
            // chat_runs is part of the PostgreSQL schema from version 1.
            let rows = c
                .query(
                    "SELECT status, COUNT(*) FROM chat_runs
                     WHERE created_at >= $1 AND created_at < $2 GROUP BY status ORDER BY status",
                    &[&start, &end],
                )
                .await?;
            let runs_by_status = rows
                .iter()
                .map(|r| Ok((get(r, 0)?, get(r, 1)?)))
                .collect::<Result<Vec<_>>>()?;
            Ok(IncidentCounts {
                dead_letters,
                runs_by_status,
            })
        })
        .await
    }
}
