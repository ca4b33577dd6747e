//! The store's paging tables: escalation due times per (group, destination)
//! and claimed digest slots. Claiming a due escalation step and enqueueing
//! its deliveries is one transaction, and so is claiming a digest slot and
//! enqueueing the digest: after a `kill -9` either both happened or
//! neither, so a step or a digest is never lost and never doubled. This
//! module knows nothing about AlertManager's JSON or the routing config: it
//! is handed target keys, texts and durations.

use rusqlite::{params, Connection, OptionalExtension};

use crate::store::sqlite::{group_destinations, refresh_tx, upsert_alert_row, Sqlite};
use crate::store::{now, Result};

/// `escalations.dest` of a group that matched no escalating destination.
pub const NO_ESCALATION: i64 = -1;

/// A firing, unacknowledged group with no escalation yet (or only ones
/// ended by a resolve).
#[derive(Debug, Clone, PartialEq)]
pub struct EscalationCandidate {
    pub group_id: i64,
    pub tier: String,
    pub state: String,
    pub first_seen: f64,
    /// It escalated before and resolved since: it fires again now.
    pub refired: bool,
}

/// What a destination's escalation does, by destination index.
#[derive(Debug, Clone)]
pub struct EscalationPlan {
    pub dest: i64,
    pub targets: Vec<String>,
    pub steps: u32,
    pub repeat_every_secs: Option<f64>,
}

/// One step fired (for metrics and logs).
#[derive(Debug, Clone, PartialEq)]
pub struct FiredStep {
    pub group_id: i64,
    pub dest: i64,
    pub step: u32,
    pub steps: u32,
    /// When it was due (Unix seconds), to measure lateness.
    pub due_at: f64,
}

/// A group a digest may mention.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestGroup {
    pub group_id: i64,
    pub status: String,
    pub state: String,
    pub first_seen: f64,
    pub updated_at: f64,
}

/// One delivery of a digest: a destination key and the JSON message.
#[derive(Debug, Clone)]
pub struct DigestDelivery {
    pub destination: String,
    pub body: String,
}

impl Sqlite {
    /// Firing, unacknowledged groups of these tiers that have no live
    /// escalation row.
    pub async fn escalation_candidates(
        &self,
        tiers: Vec<String>,
    ) -> Result<Vec<EscalationCandidate>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT g.id, g.tier, g.state, g.first_seen,
                        EXISTS (SELECT 1 FROM escalations e WHERE e.group_id=g.id)
                 FROM alert_groups g
                 WHERE g.status='firing'
                   AND g.tier IN (SELECT value FROM json_each(?1))
                   AND NOT EXISTS (SELECT 1 FROM acks a WHERE a.group_id=g.id)
                   AND NOT EXISTS (SELECT 1 FROM escalations e
                                   WHERE e.group_id=g.id AND e.state!='resolved')
                 ORDER BY g.id LIMIT 500",
            )?;
            let tiers = serde_json::to_string(&tiers).unwrap_or_default();
            let rows = st
                .query_map([tiers], |r| {
                    Ok(EscalationCandidate {
                        group_id: r.get(0)?,
                        tier: r.get(1)?,
                        state: r.get(2)?,
                        first_seen: r.get(3)?,
                        refired: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// Starts escalations: `(group, dest, steps, due_at)`; `dest` =
    /// [`NO_ESCALATION`] records that a group needs none. Replaces rows
    /// ended by a resolve; leaves live rows alone.
    pub async fn start_escalations(&self, rows: Vec<(i64, i64, u32, f64)>) -> Result<usize> {
        self.write(move |c| {
            let t = now();
            let mut n = 0;
            for (group, dest, steps, due) in &rows {
                let live: bool = c
                    .query_row(
                        "SELECT 1 FROM escalations WHERE group_id=?1 AND state!='resolved'",
                        [group],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                if live && *dest != NO_ESCALATION {
                    // Another row of this group started in this batch.
                    let same: bool = c
                        .query_row(
                            "SELECT 1 FROM escalations WHERE group_id=?1 AND dest=?2 AND state!='resolved'",
                            params![group, dest],
                            |_| Ok(()),
                        )
                        .optional()?
                        .is_some();
                    if same {
                        continue;
                    }
                } else if live {
                    continue;
                }
                let (state, due) = if *dest == NO_ESCALATION {
                    ("none", None)
                } else {
                    ("pending", Some(*due))
                };
                c.execute(
                    "INSERT INTO escalations(group_id, dest, step, steps, due_at, state, started_at)
                     VALUES (?1, ?2, 0, ?3, ?4, ?5, ?6)
                     ON CONFLICT(group_id, dest) DO UPDATE SET step=0, steps=excluded.steps,
                       due_at=excluded.due_at, state=excluded.state, started_at=excluded.started_at",
                    params![group, dest, steps, due, state, t],
                )?;
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    /// Claims every escalation step due at `at` and enqueues its deliveries
    /// in the same transaction: for each target, the group's alert message
    /// (if the target has none yet) and a thread reply `text(step, steps)`.
    /// Rows of acknowledged groups stop; of resolved groups end.
    pub async fn fire_due_escalations(
        &self,
        at: f64,
        plans: Vec<EscalationPlan>,
        text: std::sync::Arc<dyn Fn(i64, u32, u32) -> String + Send + Sync>,
    ) -> Result<Vec<FiredStep>> {
        self.write(move |c| fire_due_tx(c, at, &plans, text.as_ref()))
            .await
    }

    /// When the earliest pending escalation step is due.
    pub async fn next_escalation_due(&self) -> Result<Option<f64>> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT MIN(due_at) FROM escalations WHERE state='pending'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// The furthest escalation step a group reached: `(step, steps)`.
    pub async fn escalation_step(&self, group_id: i64) -> Result<Option<(u32, u32)>> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT step, steps FROM escalations WHERE group_id=?1 AND step>0
                 ORDER BY step DESC LIMIT 1",
                [group_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
        .await
    }

    /// Escalation rows of a group: `(dest, step, steps, state)` (tests, audit).
    pub async fn escalations(&self, group_id: i64) -> Result<Vec<(i64, u32, u32, String)>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT dest, step, steps, state FROM escalations WHERE group_id=?1 ORDER BY dest",
            )?;
            let rows = st
                .query_map([group_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// The latest digest slot claimed (or the first start's baseline).
    pub async fn last_digest_slot(&self) -> Result<Option<f64>> {
        self.read(|c| Ok(c.query_row("SELECT MAX(slot) FROM digest_slots", [], |r| r.get(0))?))
            .await
    }

    /// Records the first start as the digest baseline (nothing before it
    /// is owed). No-op when any slot exists.
    pub async fn digest_baseline(&self, at: f64) -> Result<()> {
        self.write(move |c| {
            let any: Option<f64> =
                c.query_row("SELECT MAX(slot) FROM digest_slots", [], |r| r.get(0))?;
            if any.is_none() {
                c.execute(
                    "INSERT INTO digest_slots(slot, claimed_at, late, groups) VALUES (?1, ?1, 0, -1)",
                    [at],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// P4 groups a digest for the window after `since` may mention: still
    /// firing, or changed since.
    pub async fn digest_groups(&self, since: f64) -> Result<Vec<DigestGroup>> {
        self.read(move |c| {
            let mut st = c.prepare(
                "SELECT id, status, state, first_seen, updated_at FROM alert_groups
                 WHERE tier='P4' AND (status='firing' OR updated_at > ?1) ORDER BY id",
            )?;
            let rows = st
                .query_map([since], |r| {
                    Ok(DigestGroup {
                        group_id: r.get(0)?,
                        status: r.get(1)?,
                        state: r.get(2)?,
                        first_seen: r.get(3)?,
                        updated_at: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Claims digest slot `slot` and enqueues its deliveries in one
    /// transaction. `false` when the slot (or a later one) was claimed
    /// already: nothing is enqueued.
    pub async fn claim_digest_slot(
        &self,
        slot: f64,
        late: bool,
        groups: usize,
        deliveries: Vec<DigestDelivery>,
    ) -> Result<bool> {
        self.write(move |c| {
            let last: Option<f64> =
                c.query_row("SELECT MAX(slot) FROM digest_slots", [], |r| r.get(0))?;
            if last.is_some_and(|l| l >= slot) {
                return Ok(false);
            }
            let t = now();
            c.execute(
                "INSERT INTO digest_slots(slot, claimed_at, late, groups) VALUES (?1, ?2, ?3, ?4)",
                params![slot, t, late, groups as i64],
            )?;
            for d in &deliveries {
                c.execute(
                    "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                     VALUES (0, ?1, 'reply', 0, ?2, ?3, ?3)",
                    params![d.destination, d.body, t],
                )?;
            }
            Ok(true)
        })
        .await
    }

    /// Claimed digest slots: `(slot, late, groups)` (tests).
    pub async fn digest_slots(&self) -> Result<Vec<(f64, bool, i64)>> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT slot, late, groups FROM digest_slots WHERE groups>=0 ORDER BY slot",
            )?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }
}

fn fire_due_tx(
    c: &Connection,
    at: f64,
    plans: &[EscalationPlan],
    text: &(dyn Fn(i64, u32, u32) -> String + Send + Sync),
) -> Result<Vec<FiredStep>> {
    // Groups that resolved end their escalations, so firing again starts a
    // new one (an acknowledged group's stays stopped while it fires).
    c.execute(
        "UPDATE escalations SET state='resolved', due_at=NULL
         WHERE state!='resolved'
           AND group_id IN (SELECT id FROM alert_groups WHERE status='resolved')",
        [],
    )?;
    let due: Vec<(i64, i64, u32, u32, f64)> = {
        let mut st = c.prepare_cached(
            "SELECT group_id, dest, step, steps, due_at FROM escalations
             WHERE state='pending' AND due_at <= ?1 ORDER BY due_at LIMIT 200",
        )?;
        let rows = st
            .query_map([at], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        rows
    };
    let mut fired = Vec::new();
    for (group, dest, step, steps, due_at) in due {
        let g: Option<(String, i64, bool)> = c
            .query_row(
                "SELECT g.status, g.rev, EXISTS (SELECT 1 FROM acks a WHERE a.group_id=g.id)
                 FROM alert_groups g WHERE g.id=?1",
                [group],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let end = |state: &str| -> Result<()> {
            c.execute(
                "UPDATE escalations SET state=?3, due_at=NULL WHERE group_id=?1 AND dest=?2",
                params![group, dest, state],
            )?;
            Ok(())
        };
        let plan = plans.iter().find(|p| p.dest == dest);
        let (status, rev, acked) = match (g, plan) {
            (Some(g), Some(_)) => g,
            // The group is gone, or the destination no longer escalates.
            _ => {
                end("stopped")?;
                continue;
            }
        };
        let Some(plan) = plan else { continue };
        if status != "firing" {
            end("resolved")?;
            continue;
        }
        if acked {
            end("stopped")?;
            continue;
        }
        let step = step + 1;
        let body = serde_json::to_string(&crate::message::Message::Text(
            crate::message::TextMessage::new(text(group, step, steps), None),
        ))
        .unwrap_or_default();
        let t = now();
        let existing = group_destinations(c, group)?;
        for target in &plan.targets {
            if !existing.contains(target) {
                upsert_alert_row(c, group, target, rev, t)?;
            }
            c.execute(
                "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                 VALUES (?1, ?2, 'reply', ?3, ?4, ?5, ?5)",
                params![group, target, rev, body, t],
            )?;
        }
        match plan.repeat_every_secs.filter(|_| step < steps) {
            Some(every) => {
                let mut next = due_at + every;
                if next <= at {
                    // Down for longer than a repeat: one step now, the next
                    // a full interval later (never a burst of catch-ups).
                    next = at + every;
                }
                c.execute(
                    "UPDATE escalations SET step=?3, due_at=?4 WHERE group_id=?1 AND dest=?2",
                    params![group, dest, step, next],
                )?;
            }
            None => {
                c.execute(
                    "UPDATE escalations SET step=?3, state='done', due_at=NULL WHERE group_id=?1 AND dest=?2",
                    params![group, dest, step],
                )?;
            }
        }
        // Re-render the group's messages: they show the step reached.
        refresh_tx(c, group, t)?;
        fired.push(FiredStep {
            group_id: group,
            dest,
            step,
            steps,
            due_at,
        });
    }
    Ok(fired)
}
