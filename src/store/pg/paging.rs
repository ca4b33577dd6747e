//! PostgreSQL: escalations and digest slots, claimed per item so each fires
//! once in a cluster of replicas. A due escalation step is claimed with
//! `FOR UPDATE SKIP LOCKED` in the transaction that enqueues its deliveries
//! and advances it; a digest slot is claimed under a transaction-scoped
//! advisory lock and its primary key, in the transaction that enqueues the
//! digest.

use crate::store::paging::{
    DigestDelivery, DigestGroup, EscalationCandidate, EscalationPlan, FiredStep, NO_ESCALATION,
};
use crate::store::pg::core::{group_destinations, lock_group, refresh_tx, upsert_alert_row};
use crate::store::pg::{big, get, Pg};
use crate::store::seam::StepText;
use crate::store::{now, Result};

/// The advisory lock serialising digest slot claims.
const DIGEST_LOCK: i64 = 7_262_000_002;

fn small(v: i64) -> u32 {
    u32::try_from(v).unwrap_or(0)
}

impl Pg {
    pub async fn escalation_candidates(
        &self,
        tiers: Vec<String>,
    ) -> Result<Vec<EscalationCandidate>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT g.id, g.tier, g.state, g.first_seen,
                            EXISTS (SELECT 1 FROM escalations e WHERE e.group_id=g.id)
                     FROM alert_groups g
                     WHERE g.status='firing'
                       AND g.tier = ANY($1)
                       AND NOT EXISTS (SELECT 1 FROM acks a WHERE a.group_id=g.id)
                       AND NOT EXISTS (SELECT 1 FROM escalations e
                                       WHERE e.group_id=g.id AND e.state!='resolved')
                     ORDER BY g.id LIMIT 500",
                    &[&tiers],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(EscalationCandidate {
                        group_id: get(r, 0)?,
                        tier: get(r, 1)?,
                        state: get(r, 2)?,
                        first_seen: get(r, 3)?,
                        refired: get(r, 4)?,
                    })
                })
                .collect()
        })
        .await
    }

    pub async fn start_escalations(&self, rows: Vec<(i64, i64, u32, f64)>) -> Result<usize> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let t = now();
            let mut n = 0;
            for (group, dest, steps, due) in &rows {
                // Two replicas starting the same group serialise here.
                if !lock_group(&tx, *group).await? {
                    continue;
                }
                let live = tx
                    .query_opt(
                        "SELECT 1 FROM escalations WHERE group_id=$1 AND state!='resolved' LIMIT 1",
                        &[group],
                    )
                    .await?
                    .is_some();
                if live && *dest != NO_ESCALATION {
                    let same = tx
                        .query_opt(
                            "SELECT 1 FROM escalations WHERE group_id=$1 AND dest=$2 AND state!='resolved'",
                            &[group, dest],
                        )
                        .await?
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
                tx.execute(
                    "INSERT INTO escalations(group_id, dest, step, steps, due_at, state, started_at)
                     VALUES ($1, $2, 0, $3, $4, $5, $6)
                     ON CONFLICT(group_id, dest) DO UPDATE SET step=0, steps=excluded.steps,
                       due_at=excluded.due_at, state=excluded.state, started_at=excluded.started_at",
                    &[group, dest, &i64::from(*steps), &due, &state, &t],
                )
                .await?;
                n += 1;
            }
            tx.commit().await?;
            Ok(n)
        })
        .await
    }

    pub async fn fire_due_escalations(
        &self,
        at: f64,
        plans: Vec<EscalationPlan>,
        text: StepText,
    ) -> Result<Vec<FiredStep>> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "UPDATE escalations SET state='resolved', due_at=NULL
                 WHERE state!='resolved'
                   AND group_id IN (SELECT id FROM alert_groups WHERE status='resolved')",
                &[],
            )
            .await?;
            // Claimed: another replica's concurrent call skips these rows.
            let due = tx
                .query(
                    "SELECT group_id, dest, step, steps, due_at FROM escalations
                     WHERE state='pending' AND due_at <= $1 ORDER BY due_at LIMIT 200
                     FOR UPDATE SKIP LOCKED",
                    &[&at],
                )
                .await?;
            let mut fired = Vec::new();
            for r in &due {
                let (group, dest, step, steps, due_at): (i64, i64, i64, i64, f64) =
                    (get(r, 0)?, get(r, 1)?, get(r, 2)?, get(r, 3)?, get(r, 4)?);
                let g = tx
                    .query_opt(
                        "SELECT g.status, g.rev, EXISTS (SELECT 1 FROM acks a WHERE a.group_id=g.id)
                         FROM alert_groups g WHERE g.id=$1 FOR UPDATE",
                        &[&group],
                    )
                    .await?;
                let plan = plans.iter().find(|p| p.dest == dest);
                let end = |state: &'static str| {
                    let tx = &tx;
                    async move {
                        tx.execute(
                            "UPDATE escalations SET state=$3, due_at=NULL WHERE group_id=$1 AND dest=$2",
                            &[&group, &dest, &state],
                        )
                        .await
                    }
                };
                let (Some(g), Some(plan)) = (g, plan) else {
                    end("stopped").await?;
                    continue;
                };
                let (status, rev, acked): (String, i64, bool) =
                    (get(&g, 0)?, get(&g, 1)?, get(&g, 2)?);
                if status != "firing" {
                    end("resolved").await?;
                    continue;
                }
                if acked {
                    end("stopped").await?;
                    continue;
                }
                let step = small(step) + 1;
                let steps = small(steps);
                let body = serde_json::to_string(&crate::message::Message::Text(
                    crate::message::TextMessage::new(text(group, step, steps), None),
                ))
                .unwrap_or_default();
                let t = now();
                let existing = group_destinations(&tx, group).await?;
                for target in &plan.targets {
                    if !existing.contains(target) {
                        upsert_alert_row(&tx, group, target, rev, t).await?;
                    }
                    tx.execute(
                        "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                         VALUES ($1, $2, 'reply', $3, $4, $5, $5)",
                        &[&group, target, &rev, &body, &t],
                    )
                    .await?;
                }
                match plan.repeat_every_secs.filter(|_| step < steps) {
                    Some(every) => {
                        let mut next = due_at + every;
                        if next <= at {
                            next = at + every;
                        }
                        tx.execute(
                            "UPDATE escalations SET step=$3, due_at=$4 WHERE group_id=$1 AND dest=$2",
                            &[&group, &dest, &i64::from(step), &next],
                        )
                        .await?;
                    }
                    None => {
                        tx.execute(
                            "UPDATE escalations SET step=$3, state='done', due_at=NULL
                             WHERE group_id=$1 AND dest=$2",
                            &[&group, &dest, &i64::from(step)],
                        )
                        .await?;
                    }
                }
                refresh_tx(&tx, group, t).await?;
                fired.push(FiredStep {
                    group_id: group,
                    dest,
                    step,
                    steps,
                    due_at,
                });
            }
            tx.commit().await?;
            Ok(fired)
        })
        .await
    }

    pub async fn next_escalation_due(&self) -> Result<Option<f64>> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "SELECT MIN(due_at) FROM escalations WHERE state='pending'",
                    &[],
                )
                .await?;
            get(&row, 0)
        })
        .await
    }

    pub async fn escalation_step(&self, group_id: i64) -> Result<Option<(u32, u32)>> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT step, steps FROM escalations WHERE group_id=$1 AND step>0
                     ORDER BY step DESC LIMIT 1",
                    &[&group_id],
                )
                .await?;
            match row {
                Some(r) => Ok(Some((small(get(&r, 0)?), small(get(&r, 1)?)))),
                None => Ok(None),
            }
        })
        .await
    }

    pub async fn escalations(&self, group_id: i64) -> Result<Vec<(i64, u32, u32, String)>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT dest, step, steps, state FROM escalations WHERE group_id=$1 ORDER BY dest",
                    &[&group_id],
                )
                .await?;
            rows.iter()
                .map(|r| Ok((get(r, 0)?, small(get(r, 1)?), small(get(r, 2)?), get(r, 3)?)))
                .collect()
        })
        .await
    }

    pub async fn last_digest_slot(&self) -> Result<Option<f64>> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one("SELECT MAX(slot) FROM digest_slots", &[])
                .await?;
            get(&row, 0)
        })
        .await
    }

    pub async fn digest_baseline(&self, at: f64) -> Result<()> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DIGEST_LOCK])
                .await?;
            let row = tx
                .query_one("SELECT MAX(slot) FROM digest_slots", &[])
                .await?;
            let any: Option<f64> = get(&row, 0)?;
            if any.is_none() {
                tx.execute(
                    "INSERT INTO digest_slots(slot, claimed_at, late, groups) VALUES ($1, $1, 0, -1)
                     ON CONFLICT DO NOTHING",
                    &[&at],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub async fn digest_groups(&self, since: f64) -> Result<Vec<DigestGroup>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT id, status, state, first_seen, updated_at FROM alert_groups
                     WHERE tier='P4' AND (status='firing' OR updated_at > $1) ORDER BY id",
                    &[&since],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(DigestGroup {
                        group_id: get(r, 0)?,
                        status: get(r, 1)?,
                        state: get(r, 2)?,
                        first_seen: get(r, 3)?,
                        updated_at: get(r, 4)?,
                    })
                })
                .collect()
        })
        .await
    }

    pub async fn claim_digest_slot(
        &self,
        slot: f64,
        late: bool,
        groups: usize,
        deliveries: Vec<DigestDelivery>,
    ) -> Result<bool> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DIGEST_LOCK])
                .await?;
            let row = tx.query_one("SELECT MAX(slot) FROM digest_slots", &[]).await?;
            let last: Option<f64> = get(&row, 0)?;
            if last.is_some_and(|l| l >= slot) {
                return Ok(false);
            }
            let t = now();
            tx.execute(
                "INSERT INTO digest_slots(slot, claimed_at, late, groups) VALUES ($1, $2, $3, $4)",
                &[&slot, &t, &i64::from(late), &big(groups)],
            )
            .await?;
            for d in &deliveries {
                tx.execute(
                    "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                     VALUES (0, $1, 'reply', 0, $2, $3, $3)",
                    &[&d.destination, &d.body, &t],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    pub async fn digest_slots(&self) -> Result<Vec<(f64, bool, i64)>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT slot, late, groups FROM digest_slots WHERE groups>=0 ORDER BY slot",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|r| Ok((get(r, 0)?, get::<i64>(r, 1)? != 0, get(r, 2)?)))
                .collect()
        })
        .await
    }
}
