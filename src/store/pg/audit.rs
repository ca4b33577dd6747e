//! PostgreSQL: the audit log, group histories and the replay cache. A
//! replay key is one `INSERT … ON CONFLICT DO NOTHING`: a chat request
//! replayed to another replica is refused there too.

use crate::store::pg::core::group_row;
use crate::store::pg::{get, Pg};
use crate::store::{now, AuditRecord, GroupHistory, Result};

impl Pg {
    pub async fn audit_insert(
        &self,
        who: String,
        action: String,
        params_json: serde_json::Value,
        target: Option<String>,
        outcome: String,
    ) -> Result<i64> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "INSERT INTO audit(at, who, action, params, target, outcome)
                     VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
                    &[
                        &now(),
                        &who,
                        &action,
                        &params_json.to_string(),
                        &target,
                        &outcome,
                    ],
                )
                .await?;
            get(&row, 0)
        })
        .await
    }

    pub fn audit_blocking(
        &self,
        who: &str,
        action: &str,
        params_json: &serde_json::Value,
        target: Option<&str>,
        outcome: &str,
    ) -> Result<i64> {
        let (who, action, outcome) = (who.to_string(), action.to_string(), outcome.to_string());
        let (params_json, target) = (params_json.clone(), target.map(str::to_string));
        self.blocking(|pg| async move {
            pg.audit_insert(who, action, params_json, target, outcome)
                .await
        })
    }

    pub async fn first_use(&self, key: [u8; 32], now: i64, keep_secs: i64) -> Result<bool> {
        self.within(async {
            let c = self.client().await?;
            c.execute(
                "DELETE FROM replay_keys WHERE seen_at < $1",
                &[&(now - keep_secs)],
            )
            .await?;
            let added = c
                .execute(
                    "INSERT INTO replay_keys(key, seen_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[&&key[..], &now],
                )
                .await?;
            Ok(added == 1)
        })
        .await
    }

    pub async fn audit_since(&self, since: f64) -> Result<Vec<AuditRecord>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    "SELECT id, at, who, action, params, target, outcome FROM audit
                     WHERE at >= $1 ORDER BY at, id",
                    &[&since],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let params: String = get(r, 4)?;
                    Ok(AuditRecord {
                        id: get(r, 0)?,
                        at: get(r, 1)?,
                        who: get(r, 2)?,
                        action: get(r, 3)?,
                        params: serde_json::from_str(&params)
                            .unwrap_or(serde_json::Value::String(params)),
                        target: get(r, 5)?,
                        outcome: get(r, 6)?,
                    })
                })
                .collect()
        })
        .await
    }

    pub fn audit_since_blocking(&self, since: f64) -> Result<Vec<AuditRecord>> {
        self.blocking(|pg| async move { pg.audit_since(since).await })
    }

    pub fn group_history_blocking(&self, group_id: i64) -> Result<Option<GroupHistory>> {
        self.blocking(|pg| async move {
            pg.within(async {
                let c = pg.client().await?;
                let Some(g) = c
                    .query_opt(
                        "SELECT g.id, g.group_key, g.status, g.tier, g.rev, g.state, g.updated_at,
                                a.who, a.at, g.first_seen
                         FROM alert_groups g LEFT JOIN acks a ON a.group_id = g.id WHERE g.id=$1",
                        &[&group_id],
                    )
                    .await?
                else {
                    return Ok(None);
                };
                let group = group_row(&g)?;
                let first_seen: f64 = get(&g, 9)?;
                let rows = c
                    .query(
                        "SELECT received_at, payload FROM webhooks WHERE group_id=$1 AND duplicate=0
                         ORDER BY received_at, id",
                        &[&group_id],
                    )
                    .await?;
                let mut webhooks = Vec::new();
                for r in &rows {
                    let payload: String = get(r, 1)?;
                    let status = serde_json::from_str::<serde_json::Value>(&payload)
                        .ok()
                        .and_then(|v| v["status"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "unknown".into());
                    webhooks.push((get(r, 0)?, status));
                }
                let rows = c
                    .query(
                        "SELECT posted_at, destination, channel FROM messages WHERE group_id=$1
                         ORDER BY posted_at",
                        &[&group_id],
                    )
                    .await?;
                let messages = rows
                    .iter()
                    .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(GroupHistory {
                    group,
                    first_seen,
                    webhooks,
                    messages,
                }))
            })
            .await
        })
    }
}
