//! The `audit` and `replay_keys` tables: the audit log of chat actions and
//! runbook steps, a group's history for timelines, and the replay cache of
//! verified chat requests.

use rusqlite::params;

use crate::store::sqlite::{group_by, Sqlite};
use crate::store::{now, AuditRecord, Error, GroupHistory, Result};

impl Sqlite {
    /// Appends an audit record (blocking; see [`Store::audit`] for async).
    pub fn audit_blocking(
        &self,
        who: &str,
        action: &str,
        params_json: &serde_json::Value,
        target: Option<&str>,
        outcome: &str,
    ) -> Result<i64> {
        let (who, action, params_json) =
            (who.to_string(), action.to_string(), params_json.to_string());
        let (target, outcome) = (target.map(str::to_string), outcome.to_string());
        self.write_blocking(move |c| {
            c.execute(
                "INSERT INTO audit(at, who, action, params, target, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![now(), who, action, params_json, target, outcome],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// Records the replay key of a verified chat request (a digest the
    /// caller computed); `false` when it is already recorded, i.e. the
    /// request is a replay. Keys seen more than `keep_secs` before `now` are
    /// forgotten first. Durable, so a replay is refused across restarts.
    pub async fn first_use(&self, key: [u8; 32], now: i64, keep_secs: i64) -> Result<bool> {
        self.write(move |c| {
            c.execute(
                "DELETE FROM replay_keys WHERE seen_at < ?1",
                params![now - keep_secs],
            )?;
            let added = c.execute(
                "INSERT OR IGNORE INTO replay_keys(key, seen_at) VALUES (?1, ?2)",
                params![&key[..], now],
            )?;
            Ok(added == 1)
        })
        .await
    }

    /// Appends an audit record (`Store::audit` logs it first).
    pub async fn audit_insert(
        &self,
        who: String,
        action: String,
        params_json: serde_json::Value,
        target: Option<String>,
        outcome: String,
    ) -> Result<i64> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO audit(at, who, action, params, target, outcome) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![now(), who, action, params_json.to_string(), target, outcome],
            )?;
            Ok(c.last_insert_rowid())
        })
        .await
    }

    /// A group with its delivery history, for `gpuops audit --group`
    /// (blocking; the CLI).
    pub fn group_history_blocking(&self, group_id: i64) -> Result<Option<GroupHistory>> {
        self.read_blocking(|c| {
            let Some(group) = group_by(c, "id", &group_id)? else {
                return Ok(None);
            };
            let first_seen: f64 = c.query_row(
                "SELECT first_seen FROM alert_groups WHERE id=?1",
                [group_id],
                |r| r.get(0),
            )?;
            let mut st = c.prepare(
                "SELECT received_at, payload FROM webhooks WHERE group_id=?1 AND duplicate=0 ORDER BY received_at, id",
            )?;
            let webhooks = st
                .query_map([group_id], |r| {
                    let payload: String = r.get(1)?;
                    let status = serde_json::from_str::<serde_json::Value>(&payload)
                        .ok()
                        .and_then(|v| v["status"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "unknown".into());
                    Ok((r.get(0)?, status))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut st = c.prepare(
                "SELECT posted_at, destination, channel FROM messages WHERE group_id=?1 ORDER BY posted_at",
            )?;
            let messages = st
                .query_map([group_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Some(GroupHistory {
                group,
                first_seen,
                webhooks,
                messages,
            }))
        })
    }

    /// Audit records at or after `since` (Unix seconds), oldest first.
    pub fn audit_since_blocking(&self, since: f64) -> Result<Vec<AuditRecord>> {
        self.read_blocking(|c| {
            let mut st = c.prepare(
                "SELECT id, at, who, action, params, target, outcome FROM audit WHERE at >= ?1 ORDER BY at, id",
            )?;
            let rows = st
                .query_map([since], |r| {
                    let params: String = r.get(4)?;
                    Ok(AuditRecord {
                        id: r.get(0)?,
                        at: r.get(1)?,
                        who: r.get(2)?,
                        action: r.get(3)?,
                        params: serde_json::from_str(&params)
                            .unwrap_or(serde_json::Value::String(params)),
                        target: r.get(5)?,
                        outcome: r.get(6)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    pub async fn audit_since(&self, since: f64) -> Result<Vec<AuditRecord>> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.audit_since_blocking(since))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    /// Rows in one of the store's tables (tests, `gpuops store copy`).
    pub async fn count_rows(&self, table: &'static str) -> Result<i64> {
        let table = crate::store::copy::known_table(table)?;
        self.read(move |c| {
            Ok(c.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?)
        })
        .await
    }

    /// Answers when the database does (`/readyz`).
    pub async fn ping(&self) -> Result<()> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |_| Ok(()))?))
            .await
    }
}
