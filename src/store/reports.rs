//! The store's side of scheduled health reports: claimed report slots
//! (`report_slots`, one row per (report, slot)) and the read-only incident
//! queries a report's "Incidents" section is computed from. Claiming a slot
//! and enqueueing its deliveries is one transaction, so after a `kill -9`, a
//! restart or a second bot process a slot is either sent once or not at all.
//! The SQLite queries and the shared types are here; PostgreSQL's are
//! `pg/reports.rs`. Only SQL here: the report itself is `src/report/`.

use rusqlite::{params, Connection, OptionalExtension};

use crate::store::sqlite::Sqlite;
use crate::store::{now, Result};

/// `report_slots.outcome` of the row that records a report's first start
/// (slots before it are not owed).
pub const BASELINE: &str = "baseline";

/// One delivery of a report: a destination key (`slack:C0…`) and the
/// serialized `Message::Report`.
#[derive(Debug, Clone)]
pub struct ReportDelivery {
    pub destination: String,
    pub body: String,
}

/// An alert group a report's period touches, with its notification,
/// acknowledgement and webhook facts (Unix seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentGroup {
    pub id: i64,
    pub tier: String,
    pub status: String,
    pub first_seen: f64,
    pub updated_at: f64,
    /// The group's latest webhook (JSON), for alert names.
    pub state: String,
    /// The first message posted for it anywhere.
    pub first_notified: Option<f64>,
    pub acked_at: Option<f64>,
    /// Webhooks received for it within the period.
    pub webhooks: i64,
}

/// Counts a report's "Incidents" section needs besides the groups.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IncidentCounts {
    /// Dead letters written within the period.
    pub dead_letters: i64,
    /// Runbook runs started within the period, by status.
    pub runs_by_status: Vec<(String, i64)>,
}

impl Sqlite {
    /// The latest slot of report `name` claimed (or its baseline).
    pub async fn last_report_slot(&self, name: String) -> Result<Option<f64>> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT MAX(slot) FROM report_slots WHERE name=?1",
                [name],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// Records the first start of report `name` as its baseline (nothing
    /// before it is owed). No-op when the report has any slot.
    pub async fn report_baseline(&self, name: String, at: f64) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO report_slots(name, slot, claimed_at, late, outcome)
                 SELECT ?1, ?2, ?2, 0, ?3
                 WHERE NOT EXISTS (SELECT 1 FROM report_slots WHERE name=?1)",
                params![name, at, BASELINE],
            )?;
            Ok(())
        })
        .await
    }

    /// Claims slot `slot` of report `name` and enqueues its deliveries in
    /// one transaction. `false` when that slot or a later one was claimed
    /// already (by this process before a restart, or by another): nothing
    /// is enqueued. `outcome` is recorded with the claim (`sent`, `empty`,
    /// `partial`).
    pub async fn claim_report_slot(
        &self,
        name: String,
        slot: f64,
        late: bool,
        outcome: String,
        deliveries: Vec<ReportDelivery>,
    ) -> Result<bool> {
        self.write(move |c| claim_tx(c, &name, slot, late, &outcome, &deliveries))
            .await
    }

    /// Claimed slots of report `name`, baseline excluded: `(slot, late,
    /// outcome)`, oldest first.
    pub async fn report_slots(&self, name: String) -> Result<Vec<(f64, bool, String)>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT slot, late, outcome FROM report_slots WHERE name=?1 AND outcome!=?2
                 ORDER BY slot",
            )?;
            let rows = st
                .query_map(params![name, BASELINE], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Enqueues a report sent by hand (`gpuops report send`: no slot) and
    /// returns the outbox row ids.
    pub async fn enqueue_report(&self, deliveries: Vec<ReportDelivery>) -> Result<Vec<i64>> {
        self.write(move |c| {
            let t = now();
            let mut ids = Vec::new();
            for d in &deliveries {
                ids.push(insert_outbox(c, d, t)?);
            }
            Ok(ids)
        })
        .await
    }

    /// Of these outbox rows: how many are still pending, and the errors of
    /// those that became dead letters.
    pub async fn report_delivery_state(&self, ids: Vec<i64>) -> Result<(usize, Vec<String>)> {
        self.read(move |c| {
            let mut pending = 0;
            let mut dead = Vec::new();
            for id in ids {
                let p: Option<i64> = c
                    .query_row("SELECT 1 FROM outbox WHERE id=?1", [id], |r| r.get(0))
                    .optional()?;
                if p.is_some() {
                    pending += 1;
                    continue;
                }
                let d: Option<(String, String)> = c
                    .query_row(
                        "SELECT destination, error FROM dead_letters WHERE outbox_id=?1",
                        [id],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if let Some((dest, err)) = d {
                    dead.push(format!("{dest}: {err}"));
                }
            }
            Ok((pending, dead))
        })
        .await
    }

    /// Groups that fired before `end` and were still firing or changed
    /// after `start`, with their first notification, acknowledgement and
    /// webhook count within `[start, end)`.
    pub async fn incident_groups(&self, start: f64, end: f64) -> Result<Vec<IncidentGroup>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT g.id, g.tier, g.status, g.first_seen, g.updated_at, g.state,
                        (SELECT MIN(m.posted_at) FROM messages m WHERE m.group_id=g.id),
                        (SELECT a.at FROM acks a WHERE a.group_id=g.id),
                        (SELECT COUNT(*) FROM webhooks w WHERE w.group_id=g.id
                           AND w.received_at >= ?1 AND w.received_at < ?2)
                 FROM alert_groups g
                 WHERE g.first_seen < ?2 AND (g.status='firing' OR g.updated_at >= ?1)
                 ORDER BY g.id",
            )?;
            let rows = st
                .query_map(params![start, end], |r| {
                    Ok(IncidentGroup {
                        id: r.get(0)?,
                        tier: r.get(1)?,
                        status: r.get(2)?,
                        first_seen: r.get(3)?,
                        updated_at: r.get(4)?,
                        state: r.get(5)?,
                        first_notified: r.get(6)?,
                        acked_at: r.get(7)?,
                        webhooks: r.get(8)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Dead letters and runbook runs within `[start, end)`. A store that
    /// never ran the chat role has no runs table: no runs.
    pub async fn incident_counts(&self, start: f64, end: f64) -> Result<IncidentCounts> {
        self.read(move |c| {
            let dead_letters = c.query_row(
                "SELECT COUNT(*) FROM dead_letters WHERE at >= ?1 AND at < ?2",
                params![start, end],
                |r| r.get(0),
            )?;
            let runs_table: Option<i64> = c
                .query_row(
                    "SELECT 1 FROM sqlite_master WHERE type='table' AND name='chat_runs'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let mut runs_by_status = Vec::new();
            if runs_table.is_some() {
                let mut st = c.prepare(
                    "SELECT status, COUNT(*) FROM chat_runs
                     WHERE created_at >= ?1 AND created_at < ?2 GROUP BY status ORDER BY status",
                )?;
                runs_by_status = st
                    .query_map(params![start, end], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
            }
            Ok(IncidentCounts {
                dead_letters,
                runs_by_status,
            })
        })
        .await
    }
}

fn insert_outbox(c: &Connection, d: &ReportDelivery, t: f64) -> Result<i64> {
    c.execute(
        "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
         VALUES (0, ?1, 'reply', 0, ?2, ?3, ?3)",
        params![d.destination, d.body, t],
    )?;
    Ok(c.last_insert_rowid())
}

fn claim_tx(
    c: &Connection,
    name: &str,
    slot: f64,
    late: bool,
    outcome: &str,
    deliveries: &[ReportDelivery],
) -> Result<bool> {
    let last: Option<f64> = c.query_row(
        "SELECT MAX(slot) FROM report_slots WHERE name=?1",
        [name],
        |r| r.get(0),
    )?;
    if last.is_some_and(|l| l >= slot) {
        return Ok(false);
    }
    let t = now();
    let inserted = c.execute(
        "INSERT INTO report_slots(name, slot, claimed_at, late, outcome) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(name, slot) DO NOTHING",
        params![name, slot, t, late, outcome],
    )?;
    if inserted == 0 {
        return Ok(false);
    }
    for d in deliveries {
        insert_outbox(c, d, t)?;
    }
    Ok(true)
}
