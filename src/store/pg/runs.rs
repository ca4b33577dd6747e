//! PostgreSQL: runbook runs started from chat and their steps. Deciding an
//! approval is one conditional UPDATE (`WHERE status='waiting'`), so an
//! approval given on one replica and an expiry on another cannot both win.

use crate::store::pg::{big, get, Pg};
use crate::store::runs::{RunRecord, StepRecord};
use crate::store::{Error, Result};

const COLUMNS: &str = "id, runbook, only_steps, given, labels, group_id, requester, requester_name, requester_role, status, next_step, results, expires_at, decided_by, planned";

fn run_row(r: &tokio_postgres::Row) -> Result<RunRecord> {
    let only: Option<String> = get(r, 2)?;
    let given: String = get(r, 3)?;
    let labels: String = get(r, 4)?;
    let results: String = get(r, 11)?;
    let next: i64 = get(r, 10)?;
    Ok(RunRecord {
        id: get(r, 0)?,
        runbook: get(r, 1)?,
        only_steps: only.and_then(|s| serde_json::from_str(&s).ok()),
        given: serde_json::from_str(&given).unwrap_or_default(),
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        group_id: get(r, 5)?,
        requester: get(r, 6)?,
        requester_name: get(r, 7)?,
        requester_role: get(r, 8)?,
        status: get(r, 9)?,
        next_step: usize::try_from(next).unwrap_or(0),
        results: serde_json::from_str(&results).unwrap_or_default(),
        expires_at: get(r, 12)?,
        decided_by: get(r, 13)?,
        planned: get::<Option<String>>(r, 14)?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
    })
}

async fn steps_of(c: &tokio_postgres::Client, run: &str) -> Result<Vec<StepRecord>> {
    let rows = c
        .query(
            "SELECT seq, step, status, exit_code, duration_secs, output, truncated, approved_by, at
             FROM chat_run_steps WHERE run_id=$1 ORDER BY seq",
            &[&run],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let code: Option<i64> = get(r, 3)?;
            Ok(StepRecord {
                seq: get(r, 0)?,
                step: get(r, 1)?,
                status: get(r, 2)?,
                exit_code: code.and_then(|c| i32::try_from(c).ok()),
                duration_secs: get(r, 4)?,
                output: get(r, 5)?,
                truncated: get::<i64>(r, 6)? != 0,
                approved_by: get(r, 7)?,
                at: get(r, 8)?,
            })
        })
        .collect()
}

impl Pg {
    /// The tables come with the migrations.
    pub fn create_runs_table(&self) -> Result<()> {
        Ok(())
    }

    pub fn run_with_steps_blocking(
        &self,
        id: &str,
    ) -> Result<Option<(RunRecord, Vec<StepRecord>)>> {
        self.blocking(|pg| async move {
            let Some(run) = pg.run(id).await? else {
                return Ok(None);
            };
            let steps = pg.run_steps(id).await?;
            Ok(Some((run, steps)))
        })
    }

    pub fn runs_of_group_blocking(
        &self,
        group: i64,
    ) -> Result<Vec<(RunRecord, f64, Vec<StepRecord>)>> {
        self.blocking(|pg| async move {
            pg.within(async {
                let c = pg.client().await?;
                let rows = c
                    .query(
                        &format!(
                            "SELECT {COLUMNS}, created_at FROM chat_runs WHERE group_id=$1 ORDER BY created_at, id"
                        ),
                        &[&group],
                    )
                    .await?;
                let mut out = Vec::new();
                for r in &rows {
                    let run = run_row(r)?;
                    let at: f64 = get(r, 15)?;
                    let steps = steps_of(&c, &run.id).await?;
                    out.push((run, at, steps));
                }
                Ok(out)
            })
            .await
        })
    }

    pub async fn run(&self, id: &str) -> Result<Option<RunRecord>> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM chat_runs WHERE id=$1"),
                    &[&id],
                )
                .await?;
            row.as_ref().map(run_row).transpose()
        })
        .await
    }

    pub async fn run_ids(&self) -> Result<Vec<String>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query("SELECT id FROM chat_runs ORDER BY created_at, id", &[])
                .await?;
            rows.iter().map(|r| get(r, 0)).collect()
        })
        .await
    }

    pub async fn waiting_runs(&self) -> Result<i64> {
        self.within(async {
            let c = self.client().await?;
            let row = c
                .query_one(
                    "SELECT COUNT(*)::BIGINT FROM chat_runs WHERE status='waiting'",
                    &[],
                )
                .await?;
            get(&row, 0)
        })
        .await
    }

    pub async fn run_steps(&self, run: &str) -> Result<Vec<StepRecord>> {
        self.within(async {
            let c = self.client().await?;
            steps_of(&c, run).await
        })
        .await
    }

    pub async fn insert_run_step(&self, s: StepRecord, run: String) -> Result<()> {
        self.within(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT 1 FROM chat_runs WHERE id=$1 FOR UPDATE", &[&run])
                .await?;
            tx.execute(
                "INSERT INTO chat_run_steps(run_id, seq, step, status, exit_code, duration_secs, output, truncated, approved_by, at)
                 VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM chat_run_steps WHERE run_id=$1), $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &run,
                    &s.step,
                    &s.status,
                    &s.exit_code.map(i64::from),
                    &s.duration_secs,
                    &s.output,
                    &i64::from(s.truncated),
                    &s.approved_by,
                    &s.at,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    pub async fn insert_run(&self, rec: RunRecord, now: f64) -> Result<String> {
        self.within(async {
            let c = self.client().await?;
            for _ in 0..8 {
                let id = format!("r{:06x}", rand::random::<u32>() & 0xff_ffff);
                let n = c
                    .execute(
                        "INSERT INTO chat_runs(id, runbook, only_steps, given, labels, group_id, requester,
                           requester_name, requester_role, status, next_step, results, expires_at, decided_by,
                           created_at, updated_at, owner)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, '[]', NULL, NULL, $11, $11, $12)
                         ON CONFLICT (id) DO NOTHING",
                        &[
                            &id,
                            &rec.runbook,
                            &rec.only_steps
                                .as_ref()
                                .map(|s| serde_json::to_string(s).unwrap_or_default()),
                            &serde_json::to_string(&rec.given).unwrap_or_default(),
                            &serde_json::to_string(&rec.labels).unwrap_or_default(),
                            &rec.group_id,
                            &rec.requester,
                            &rec.requester_name,
                            &rec.requester_role,
                            &rec.status,
                            &now,
                            &&*self.replica,
                        ],
                    )
                    .await?;
                if n == 1 {
                    return Ok(id);
                }
            }
            Err(Error::Task("cannot find a free run id".into()))
        })
        .await
    }

    pub async fn run_progress(
        &self,
        id: &str,
        next: usize,
        results: &[(String, String)],
        now: f64,
    ) -> Result<()> {
        let results = serde_json::to_string(results).unwrap_or_default();
        self.exec(
            "UPDATE chat_runs SET next_step=$2, results=$3, updated_at=$4 WHERE id=$1",
            &[&id, &big(next), &results, &now],
        )
        .await
        .map(|_| ())
    }

    pub async fn run_waits_for_approval(
        &self,
        id: &str,
        step: usize,
        results: &[(String, String)],
        expires_at: f64,
        now: f64,
    ) -> Result<()> {
        let results = serde_json::to_string(results).unwrap_or_default();
        self.exec(
            "UPDATE chat_runs SET status='waiting', next_step=$2, results=$3, expires_at=$4, updated_at=$5
             WHERE id=$1",
            &[&id, &big(step), &results, &expires_at, &now],
        )
        .await
        .map(|_| ())
    }

    pub async fn set_run_planned(
        &self,
        id: &str,
        planned: &std::collections::BTreeMap<String, Vec<String>>,
        now: f64,
    ) -> Result<()> {
        let planned = serde_json::to_string(planned).unwrap_or_default();
        self.exec(
            "UPDATE chat_runs SET planned=$2, updated_at=$3 WHERE id=$1",
            &[&id, &planned, &now],
        )
        .await
        .map(|_| ())
    }

    pub async fn decide_run(&self, id: &str, status: &str, who: &str, now: f64) -> Result<bool> {
        let n = self
            .exec(
                "UPDATE chat_runs SET status=$2, decided_by=$3, updated_at=$4,
                   owner = CASE WHEN $2 = 'running' THEN $5 ELSE owner END
                 WHERE id=$1 AND status='waiting'",
                &[&id, &status, &who, &now, &&*self.replica],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn finish_run(
        &self,
        id: &str,
        status: &str,
        results: &[(String, String)],
        now: f64,
    ) -> Result<()> {
        let results = serde_json::to_string(results).unwrap_or_default();
        self.exec(
            "UPDATE chat_runs SET status=$2, results=$3, updated_at=$4 WHERE id=$1",
            &[&id, &status, &results, &now],
        )
        .await
        .map(|_| ())
    }

    /// Runs still `running` whose replica is gone (it holds no owner
    /// lock) become `interrupted`; a live replica's runs are left alone.
    pub async fn interrupt_running_runs(
        &self,
        now: f64,
    ) -> Result<Vec<(String, String, Option<i64>)>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!(
                        "UPDATE chat_runs SET status='interrupted', updated_at=$1
                         WHERE status='running'
                           AND NOT EXISTS (SELECT 1 FROM pg_locks l
                                           WHERE l.locktype='advisory' AND l.granted AND l.objsubid=2
                                             AND l.classid={} AND l.objid=hashtext(owner)::oid)
                         RETURNING id, runbook, group_id",
                        super::OWNER_LOCK
                    ),
                    &[&now],
                )
                .await?;
            rows.iter()
                .map(|r| Ok((get(r, 0)?, get(r, 1)?, get(r, 2)?)))
                .collect()
        })
        .await
    }

    pub async fn expired_runs(&self, now: f64) -> Result<Vec<RunRecord>> {
        self.within(async {
            let c = self.client().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM chat_runs WHERE status='waiting' AND expires_at <= $1"
                    ),
                    &[&now],
                )
                .await?;
            rows.iter().map(run_row).collect()
        })
        .await
    }

    /// One statement outside a transaction; rows affected.
    pub(crate) async fn exec(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        self.within(async {
            let c = self.client().await?;
            Ok(c.execute(sql, params).await?)
        })
        .await
    }
}
