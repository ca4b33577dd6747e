//! PostgreSQL: webhooks, alert groups, messages and the outbox rows they
//! enqueue. Ingest is decided in the database: the group row is created by
//! `INSERT … ON CONFLICT DO NOTHING` and then locked (`FOR UPDATE`), so two
//! replicas ingesting the same state serialise on it and the second sees
//! the first's state hash (a duplicate, nothing enqueued); the pending alert
//! row of a (group, destination) is unique (a partial unique index) and
//! upserted. Every enqueue locks the group row first, so outbox ids of one
//! group are allocated in commit order.

use std::time::Duration;

use tokio_postgres::Transaction;

use crate::message::Ack;
use crate::store::pg::{big, get, Pg};
use crate::store::{
    now, Correlation, GroupRecord, GroupUpdate, Incident, IngestResult, MessageRecord, Result,
    KIND_NOTICE, KIND_REPLY, RECENT_HASHES,
};

impl Pg {
    pub async fn ingest(&self, raw: String, update: GroupUpdate) -> Result<IngestResult> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let r = ingest_tx(&tx, &raw, &update, now()).await?;
            tx.commit().await?;
            Ok(r)
        })
        .await
    }

    pub async fn acknowledge(&self, group_id: i64, who: String) -> Result<bool> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            if !lock_group(&tx, group_id).await? {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO acks(group_id, who, at) VALUES ($1, $2, $3)
                 ON CONFLICT(group_id) DO UPDATE SET who=excluded.who, at=excluded.at",
                &[&group_id, &who, &now()],
            )
            .await?;
            refresh_tx(&tx, group_id, now()).await?;
            tx.commit().await?;
            Ok(true)
        })
        .await
    }

    pub async fn refresh(&self, group_id: i64) -> Result<usize> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            lock_group(&tx, group_id).await?;
            let n = refresh_tx(&tx, group_id, now()).await?;
            tx.commit().await?;
            Ok(n)
        })
        .await
    }

    pub async fn enqueue_reply(&self, group_id: i64, body: String) -> Result<usize> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            lock_group(&tx, group_id).await?;
            let dests = group_destinations(&tx, group_id).await?;
            let t = now();
            for d in &dests {
                tx.execute(
                    "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                     VALUES ($1, $2, 'reply', 0, $3, $4, $4)",
                    &[&group_id, d, &body, &t],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(dests.len())
        })
        .await
    }

    pub async fn group(&self, group_id: i64) -> Result<Option<GroupRecord>> {
        self.within(async {
            let c = self.client().await?;
            group_where(&c, "g.id = $1", &group_id).await
        })
        .await
    }

    pub async fn group_by_key(&self, key: String) -> Result<Option<GroupRecord>> {
        self.within(async {
            let c = self.client().await?;
            group_where(&c, "g.group_key = $1", &key).await
        })
        .await
    }

    pub async fn firing_groups(&self, limit: usize) -> Result<Vec<GroupRecord>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!("{GROUP_SELECT} WHERE g.status='firing' ORDER BY g.updated_at DESC LIMIT $1"),
                    &[&big(limit)],
                )
                .await?;
            rows.iter().map(group_row).collect()
        })
        .await
    }

    pub async fn message(
        &self,
        group_id: i64,
        destination: String,
    ) -> Result<Option<MessageRecord>> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT group_id, destination, channel, message_id, rev FROM messages
                     WHERE group_id=$1 AND destination=$2",
                    &[&group_id, &destination],
                )
                .await?;
            row.as_ref().map(message_row).transpose()
        })
        .await
    }

    pub async fn messages(&self, group_id: i64) -> Result<Vec<MessageRecord>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT group_id, destination, channel, message_id, rev FROM messages
                     WHERE group_id=$1 ORDER BY destination",
                    &[&group_id],
                )
                .await?;
            rows.iter().map(message_row).collect()
        })
        .await
    }

    /// Retention; idempotent, so any replica may run it.
    pub async fn prune(&self, age: Duration) -> Result<usize> {
        let cutoff = now() - age.as_secs_f64();
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            let mut n = tx
                .execute("DELETE FROM webhooks WHERE received_at < $1", &[&cutoff])
                .await?;
            let old = "SELECT id FROM alert_groups g WHERE status='resolved' AND updated_at < $1
                       AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.group_id = g.id)";
            for table in ["messages", "acks", "group_incidents"] {
                n += tx
                    .execute(
                        &format!("DELETE FROM {table} WHERE group_id IN ({old})"),
                        &[&cutoff],
                    )
                    .await?;
            }
            n += tx
                .execute(
                    &format!("DELETE FROM alert_groups WHERE id IN ({old})"),
                    &[&cutoff],
                )
                .await?;
            n += tx
                .execute(
                    "DELETE FROM incident_subjects WHERE last_at < $1",
                    &[&cutoff],
                )
                .await?;
            tx.commit().await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
        .await
    }

    pub async fn incident(&self, group_id: i64) -> Result<Option<Incident>> {
        self.within(async {
            let c = self.client().await?;
            let Some(row) = c
                .query_opt(
                    "SELECT incident_group_id FROM group_incidents WHERE group_id=$1",
                    &[&group_id],
                )
                .await?
            else {
                return Ok(None);
            };
            let incident: i64 = get(&row, 0)?;
            let row = c
                .query_one(
                    "SELECT COUNT(*) FROM alert_groups g WHERE g.status='firing' AND g.id <> $1
                       AND (g.id = $2 OR g.id IN
                         (SELECT group_id FROM group_incidents WHERE incident_group_id = $2))",
                    &[&group_id, &incident],
                )
                .await?;
            let others: i64 = get(&row, 0)?;
            Ok(Some(Incident {
                group_id: incident,
                others_firing: others > 0,
            }))
        })
        .await
    }
}

async fn ingest_tx(
    tx: &Transaction<'_>,
    raw: &str,
    u: &GroupUpdate,
    t: f64,
) -> Result<IngestResult> {
    // Create-or-lock: rev 0 marks a row made by this transaction.
    tx.execute(
        "INSERT INTO alert_groups(group_key, receiver, status, tier, rev, state_hash, recent_hashes,
           state, first_seen, updated_at) VALUES ($1, $2, $3, $4, 0, '', '[]', $5, $6, $6)
         ON CONFLICT (group_key) DO NOTHING",
        &[&u.group_key, &u.receiver, &u.status, &u.tier, &u.state, &t],
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT id, rev, status, recent_hashes, state FROM alert_groups WHERE group_key=$1 FOR UPDATE",
            &[&u.group_key],
        )
        .await?;
    let (id, old_rev, status, recent, old_state): (i64, i64, String, String, String) = (
        get(&row, 0)?,
        get(&row, 1)?,
        get(&row, 2)?,
        get(&row, 3)?,
        get(&row, 4)?,
    );
    let mut hashes: Vec<String> = serde_json::from_str(&recent).unwrap_or_default();
    if old_rev > 0 && hashes.iter().any(|h| h == &u.state_hash) {
        let r = tx
            .query_one(
                "INSERT INTO webhooks(received_at, group_id, duplicate, payload) VALUES ($1, $2, 1, $3)
                 RETURNING id",
                &[&t, &id, &raw],
            )
            .await?;
        return Ok(IngestResult {
            webhook_id: get(&r, 0)?,
            group_id: id,
            rev: old_rev,
            duplicate: true,
            enqueued: 0,
        });
    }
    hashes.push(u.state_hash.clone());
    if hashes.len() > RECENT_HASHES {
        let cut = hashes.len() - RECENT_HASHES;
        hashes.drain(..cut);
    }
    let rev = old_rev + 1;
    let was_firing = old_rev > 0 && status == "firing";
    tx.execute(
        "UPDATE alert_groups SET receiver=$2, status=$3, tier=$4, rev=$5, state_hash=$6,
           recent_hashes=$7, state=$8, updated_at=$9 WHERE id=$1",
        &[
            &id,
            &u.receiver,
            &u.status,
            &u.tier,
            &rev,
            &u.state_hash,
            &serde_json::to_string(&hashes).unwrap_or_default(),
            &u.state,
            &t,
        ],
    )
    .await?;
    let mut dests = group_destinations(tx, id).await?;
    for d in &u.destinations {
        if !dests.contains(d) {
            dests.push(d.clone());
        }
    }
    let mut enqueued = 0;
    for d in &dests {
        upsert_alert_row(tx, id, d, rev, t).await?;
        enqueued += 1;
    }
    if was_firing && u.status == "resolved" {
        let body = serde_json::to_string(&crate::message::Message::Text(
            crate::message::TextMessage {
                text: u.resolved_reply.clone(),
                code: None,
                buttons: Vec::new(),
            },
        ))
        .unwrap_or_default();
        for d in &dests {
            tx.execute(
                "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                 VALUES ($1, $2, 'reply', $3, $4, $5, $5)",
                &[&id, d, &rev, &body, &t],
            )
            .await?;
            enqueued += 1;
        }
    }
    let change = match &u.change {
        Some(f) if old_rev > 0 => (f.0)(&old_state),
        _ => None,
    };
    if let Some(reply) = change {
        let kind = if reply.renotify {
            KIND_NOTICE
        } else {
            KIND_REPLY
        };
        for d in &dests {
            tx.execute(
                "INSERT INTO outbox(group_id, destination, kind, rev, body, created_at, next_attempt_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)",
                &[&id, d, &kind, &rev, &reply.body, &t],
            )
            .await?;
            enqueued += 1;
        }
    }
    if let Some(c) = &u.correlate {
        correlate_tx(tx, id, c, t).await?;
    }
    let r = tx
        .query_one(
            "INSERT INTO webhooks(received_at, group_id, duplicate, payload) VALUES ($1, $2, 0, $3)
             RETURNING id",
            &[&t, &id, &raw],
        )
        .await?;
    Ok(IngestResult {
        webhook_id: get(&r, 0)?,
        group_id: id,
        rev,
        duplicate: false,
        enqueued,
    })
}

/// Links a P1/P2 group to the incident of its first subject (see
/// [`Correlation`]) at its first ingest, and marks its subjects seen. The
/// upsert on a subject's row makes a concurrent ingest about the same
/// subject wait for this transaction and then see its choice.
async fn correlate_tx(tx: &Transaction<'_>, group_id: i64, c: &Correlation, t: f64) -> Result<()> {
    let linked: Option<i64> = match tx
        .query_opt(
            "SELECT incident_group_id FROM group_incidents WHERE group_id=$1",
            &[&group_id],
        )
        .await?
    {
        Some(r) => Some(get(&r, 0)?),
        None => None,
    };
    let mut incident = linked;
    let since = t - c.window_secs;
    for s in &c.subjects {
        let r = tx
            .query_one(
                "INSERT INTO incident_subjects(subject, incident_group_id, last_at) VALUES ($1, $2, $3)
                 ON CONFLICT (subject) DO UPDATE SET
                   incident_group_id = CASE WHEN incident_subjects.last_at >= $4
                     THEN incident_subjects.incident_group_id ELSE excluded.incident_group_id END,
                   last_at = excluded.last_at
                 RETURNING incident_group_id",
                &[s, &linked.unwrap_or(group_id), &t, &since],
            )
            .await?;
        let got: i64 = get(&r, 0)?;
        incident.get_or_insert(got);
    }
    if linked.is_none() {
        if let Some(i) = incident {
            tx.execute(
                "INSERT INTO group_incidents(group_id, incident_group_id, linked_at) VALUES ($1, $2, $3)
                 ON CONFLICT (group_id) DO NOTHING",
                &[&group_id, &i, &t],
            )
            .await?;
        }
    }
    Ok(())
}

/// Locks a group's row for the rest of the transaction; `false` if none.
pub(crate) async fn lock_group(tx: &Transaction<'_>, group_id: i64) -> Result<bool> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM alert_groups WHERE id=$1 FOR UPDATE",
            &[&group_id],
        )
        .await?
        .is_some())
}

/// Points the pending alert row of (group, destination) at `rev`, or adds
/// one (the partial unique index makes it one row, whoever races).
pub(crate) async fn upsert_alert_row(
    tx: &Transaction<'_>,
    group_id: i64,
    dest: &str,
    rev: i64,
    t: f64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO outbox(group_id, destination, kind, rev, created_at, next_attempt_at)
         VALUES ($1, $2, 'alert', $3, $4, $4)
         ON CONFLICT (group_id, destination) WHERE kind = 'alert' DO UPDATE SET rev = excluded.rev",
        &[&group_id, &dest, &rev, &t],
    )
    .await?;
    Ok(())
}

pub(crate) async fn refresh_tx(tx: &Transaction<'_>, group_id: i64, t: f64) -> Result<usize> {
    let Some(row) = tx
        .query_opt(
            "UPDATE alert_groups SET rev=rev+1, updated_at=$2 WHERE id=$1 RETURNING rev",
            &[&group_id, &t],
        )
        .await?
    else {
        return Ok(0);
    };
    let rev: i64 = get(&row, 0)?;
    let dests = group_destinations(tx, group_id).await?;
    for d in &dests {
        upsert_alert_row(tx, group_id, d, rev, t).await?;
    }
    Ok(dests.len())
}

/// Destinations a group was posted to or has pending alert rows for.
pub(crate) async fn group_destinations(tx: &Transaction<'_>, group_id: i64) -> Result<Vec<String>> {
    let rows = tx
        .query(
            "SELECT destination FROM messages WHERE group_id=$1
             UNION SELECT destination FROM outbox WHERE group_id=$1 AND kind='alert'
             ORDER BY 1",
            &[&group_id],
        )
        .await?;
    rows.iter().map(|r| get(r, 0)).collect()
}

const GROUP_SELECT: &str =
    "SELECT g.id, g.group_key, g.status, g.tier, g.rev, g.state, g.updated_at, a.who, a.at
     FROM alert_groups g LEFT JOIN acks a ON a.group_id = g.id";

async fn group_where(
    c: &tokio_postgres::Client,
    cond: &str,
    value: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<Option<GroupRecord>> {
    let row = c
        .query_opt(&format!("{GROUP_SELECT} WHERE {cond}"), &[value])
        .await?;
    row.as_ref().map(group_row).transpose()
}

pub(crate) fn group_row(r: &tokio_postgres::Row) -> Result<GroupRecord> {
    let who: Option<String> = get(r, 7)?;
    let at: Option<f64> = get(r, 8)?;
    Ok(GroupRecord {
        id: get(r, 0)?,
        group_key: get(r, 1)?,
        status: get(r, 2)?,
        tier: get(r, 3)?,
        rev: get(r, 4)?,
        state: get(r, 5)?,
        updated_at: get(r, 6)?,
        ack: who.map(|by| Ack {
            by,
            at: at.unwrap_or(0.0),
        }),
    })
}

fn message_row(r: &tokio_postgres::Row) -> Result<MessageRecord> {
    Ok(MessageRecord {
        group_id: get(r, 0)?,
        destination: get(r, 1)?,
        channel: get(r, 2)?,
        message_id: get(r, 3)?,
        rev: get(r, 4)?,
    })
}
