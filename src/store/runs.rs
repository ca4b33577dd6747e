//! The `chat_runs` and `chat_run_steps` tables: runbook runs started from
//! chat, their approvals' state and each step's stored outcome. Created on
//! first use (`CREATE TABLE IF NOT EXISTS`); a store that never ran the chat
//! role has none, and the read-only queries say so. The run logic is
//! `chat/approvals.rs`; only the SQL is here.

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension};

use crate::store;
use crate::store::sqlite::Sqlite;

/// A persisted run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: String,
    pub runbook: String,
    pub only_steps: Option<Vec<String>>,
    pub given: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub group_id: Option<i64>,
    pub requester: String,
    pub requester_name: String,
    pub requester_role: String,
    /// `running`, `waiting`, `finished`, `denied`, `expired`, `interrupted`, `failed`.
    pub status: String,
    pub next_step: usize,
    /// `(step, status)` of every step run or skipped so far.
    pub results: Vec<(String, String)>,
    pub expires_at: Option<f64>,
    pub decided_by: Option<String>,
    /// Step name → the argv its plan resolved, as the approval request
    /// showed it (`planned`, JSON): what an approval of that step covers.
    pub planned: BTreeMap<String, Vec<String>>,
}

/// A run by id, and its stored steps (blocking; `gpuops audit --run`).
fn run_with_steps(c: &Connection, id: &str) -> store::Result<Option<(RunRecord, Vec<StepRecord>)>> {
    ensure_schema_read(c)?;
    let Some(run) = c
        .query_row(
            &format!("SELECT {COLUMNS} FROM chat_runs WHERE id=?1"),
            [id],
            run_row,
        )
        .optional()?
    else {
        return Ok(None);
    };
    let steps = steps_of(c, id)?;
    Ok(Some((run, steps)))
}

/// The runs of an alert group, oldest first, each with its steps.
fn runs_of_group(
    c: &Connection,
    group: i64,
) -> store::Result<Vec<(RunRecord, f64, Vec<StepRecord>)>> {
    if ensure_schema_read(c).is_err() {
        return Ok(Vec::new());
    }
    let mut st = c.prepare(&format!(
        "SELECT {COLUMNS}, created_at FROM chat_runs WHERE group_id=?1 ORDER BY created_at, id"
    ))?;
    let runs = st
        .query_map([group], |r| Ok((run_row(r)?, r.get::<_, f64>(15)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out = Vec::new();
    for (run, at) in runs {
        let steps = steps_of(c, &run.id)?;
        out.push((run, at, steps));
    }
    Ok(out)
}

/// Most bytes of one step's output kept with the run (`gpuops audit --run`).
pub const STORED_OUTPUT_BYTES: usize = 64 * 1024;

/// One step of a run as stored: its outcome and (bounded) output.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub seq: i64,
    pub step: String,
    pub status: String,
    pub exit_code: Option<i32>,
    pub duration_secs: f64,
    /// At most [`STORED_OUTPUT_BYTES`] (then `truncated`).
    pub output: String,
    pub truncated: bool,
    /// The approver, for a step that needed approval.
    pub approved_by: Option<String>,
    /// Unix seconds.
    pub at: f64,
}

/// The stored steps of a run, in order.
fn steps_of(c: &Connection, run: &str) -> store::Result<Vec<StepRecord>> {
    ensure_schema_read(c)?;
    let mut st = c.prepare(
        "SELECT seq, step, status, exit_code, duration_secs, output, truncated, approved_by, at
         FROM chat_run_steps WHERE run_id=?1 ORDER BY seq",
    )?;
    let rows = st
        .query_map([run], |r| {
            Ok(StepRecord {
                seq: r.get(0)?,
                step: r.get(1)?,
                status: r.get(2)?,
                exit_code: r.get(3)?,
                duration_secs: r.get(4)?,
                output: r.get(5)?,
                truncated: r.get(6)?,
                approved_by: r.get(7)?,
                at: r.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// True when the chat tables exist (a store that never ran chat has none).
fn ensure_schema_read(c: &Connection) -> store::Result<()> {
    let n: i64 = c.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name='chat_run_steps'",
        [],
        |r| r.get(0),
    )?;
    if n == 0 {
        return Err(store::Error::Task(
            "this store has no runbook runs (the chat role never ran here)".into(),
        ));
    }
    Ok(())
}

const COLUMNS: &str = "id, runbook, only_steps, given, labels, group_id, requester, requester_name, requester_role, status, next_step, results, expires_at, decided_by, planned";

/// The tables come with the migrations; kept as the one place a run
/// query could check them.
fn ensure_schema(_c: &Connection) -> store::Result<()> {
    Ok(())
}

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let only: Option<String> = r.get(2)?;
    let given: String = r.get(3)?;
    let labels: String = r.get(4)?;
    let results: String = r.get(11)?;
    let next: i64 = r.get(10)?;
    Ok(RunRecord {
        id: r.get(0)?,
        runbook: r.get(1)?,
        only_steps: only.and_then(|s| serde_json::from_str(&s).ok()),
        given: serde_json::from_str(&given).unwrap_or_default(),
        labels: serde_json::from_str(&labels).unwrap_or_default(),
        group_id: r.get(5)?,
        requester: r.get(6)?,
        requester_name: r.get(7)?,
        requester_role: r.get(8)?,
        status: r.get(9)?,
        next_step: usize::try_from(next).unwrap_or(0),
        results: serde_json::from_str(&results).unwrap_or_default(),
        expires_at: r.get(12)?,
        decided_by: r.get(13)?,
        planned: r
            .get::<_, Option<String>>(14)?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
    })
}

impl Sqlite {
    /// A run by id, and its stored steps (blocking; `gpuops audit --run`).
    pub fn run_with_steps_blocking(
        &self,
        id: &str,
    ) -> store::Result<Option<(RunRecord, Vec<StepRecord>)>> {
        self.read_blocking(|c| run_with_steps(c, id))
    }

    /// The runs of an alert group, oldest first, each with its steps (blocking).
    pub fn runs_of_group_blocking(
        &self,
        group: i64,
    ) -> store::Result<Vec<(RunRecord, f64, Vec<StepRecord>)>> {
        self.read_blocking(|c| runs_of_group(c, group))
    }

    /// Ids of every stored run (tests).
    pub async fn run_ids(&self) -> store::Result<Vec<String>> {
        self.read(|c| {
            let mut st = c.prepare("SELECT id FROM chat_runs ORDER BY created_at, id")?;
            let rows = st
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// Creates the run tables if they are missing (blocking; at start).
    pub fn create_runs_table(&self) -> store::Result<()> {
        self.write_blocking(ensure_schema)
    }

    /// A run by id.
    pub async fn run(&self, id: &str) -> store::Result<Option<RunRecord>> {
        let id = id.to_string();
        self.read(move |c| {
            Ok(c.query_row(
                &format!("SELECT {COLUMNS} FROM chat_runs WHERE id=?1"),
                [&id],
                run_row,
            )
            .optional()?)
        })
        .await
    }

    /// How many runs wait for an approval.
    pub async fn waiting_runs(&self) -> store::Result<i64> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM chat_runs WHERE status='waiting'",
                [],
                |r| r.get(0),
            )?)
        })
        .await
    }

    /// The stored steps of a run, in order.
    pub async fn run_steps(&self, run: &str) -> store::Result<Vec<StepRecord>> {
        let run = run.to_string();
        self.read(move |c| steps_of(c, &run)).await
    }

    /// Stores one step's outcome (`seq` is assigned here) with run `run`.
    pub async fn insert_run_step(&self, s: StepRecord, run: String) -> store::Result<()> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO chat_run_steps(run_id, seq, step, status, exit_code, duration_secs, output, truncated, approved_by, at)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM chat_run_steps WHERE run_id=?1), ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![run, s.step, s.status, s.exit_code, s.duration_secs, s.output, s.truncated, s.approved_by, s.at],
            )?;
            Ok(())
        })
        .await
    }

    /// Stores a new run under a fresh id (`r` and six hex digits).
    pub async fn insert_run(&self, rec: RunRecord, now: f64) -> store::Result<String> {
        self.write(move |c| {
            ensure_schema(c)?;
            for _ in 0..8 {
                let id = format!("r{:06x}", rand::random::<u32>() & 0xff_ffff);
                let n = c.execute(
                    "INSERT OR IGNORE INTO chat_runs(id, runbook, only_steps, given, labels, group_id, requester,
                       requester_name, requester_role, status, next_step, results, expires_at, decided_by,
                       created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, '[]', NULL, NULL, ?11, ?11)",
                    params![
                        id,
                        rec.runbook,
                        rec.only_steps.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default()),
                        serde_json::to_string(&rec.given).unwrap_or_default(),
                        serde_json::to_string(&rec.labels).unwrap_or_default(),
                        rec.group_id,
                        rec.requester,
                        rec.requester_name,
                        rec.requester_role,
                        rec.status,
                        now
                    ],
                )?;
                if n == 1 {
                    return Ok(id);
                }
            }
            Err(store::Error::Task("cannot find a free run id".into()))
        })
        .await
    }

    /// Records a run's progress: the next step and the results so far.
    pub async fn run_progress(
        &self,
        id: &str,
        next: usize,
        results: &[(String, String)],
        now: f64,
    ) -> store::Result<()> {
        let id = id.to_string();
        let results = serde_json::to_string(results).unwrap_or_default();
        self.write(move |c| {
            c.execute(
                "UPDATE chat_runs SET next_step=?2, results=?3, updated_at=?4 WHERE id=?1",
                params![id, next as i64, results, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Puts a run in `waiting` for an approval of step `step` until `expires_at`.
    pub async fn run_waits_for_approval(
        &self,
        id: &str,
        step: usize,
        results: &[(String, String)],
        expires_at: f64,
        now: f64,
    ) -> store::Result<()> {
        let id = id.to_string();
        let results = serde_json::to_string(results).unwrap_or_default();
        self.write(move |c| {
            c.execute(
                "UPDATE chat_runs SET status='waiting', next_step=?2, results=?3, expires_at=?4, updated_at=?5
                 WHERE id=?1",
                params![id, step as i64, results, expires_at, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Stores the planned argv an approval request shows (merged into the
    /// run's earlier plans).
    pub async fn set_run_planned(
        &self,
        id: &str,
        planned: &BTreeMap<String, Vec<String>>,
        now: f64,
    ) -> store::Result<()> {
        let id = id.to_string();
        let planned = serde_json::to_string(planned).unwrap_or_default();
        self.write(move |c| {
            c.execute(
                "UPDATE chat_runs SET planned=?2, updated_at=?3 WHERE id=?1",
                params![id, planned, now],
            )?;
            Ok(())
        })
        .await
    }

    /// Moves a waiting run to `status` (once: false when someone else did).
    pub async fn decide_run(
        &self,
        id: &str,
        status: &str,
        who: &str,
        now: f64,
    ) -> store::Result<bool> {
        let (id, status, who) = (id.to_string(), status.to_string(), who.to_string());
        self.write(move |c| {
            let n = c.execute(
                "UPDATE chat_runs SET status=?2, decided_by=?3, updated_at=?4 WHERE id=?1 AND status='waiting'",
                params![id, status, who, now],
            )?;
            Ok(n == 1)
        })
        .await
    }

    /// Ends a run with `status` and its results.
    pub async fn finish_run(
        &self,
        id: &str,
        status: &str,
        results: &[(String, String)],
        now: f64,
    ) -> store::Result<()> {
        let (id, status) = (id.to_string(), status.to_string());
        let results = serde_json::to_string(results).unwrap_or_default();
        self.write(move |c| {
            c.execute(
                "UPDATE chat_runs SET status=?2, results=?3, updated_at=?4 WHERE id=?1",
                params![id, status, results, now],
            )?;
            Ok(())
        })
        .await
    }

    /// On start: marks runs cut off mid-step by a restart `interrupted`;
    /// returns their (id, runbook, group).
    pub async fn interrupt_running_runs(
        &self,
        now: f64,
    ) -> store::Result<Vec<(String, String, Option<i64>)>> {
        self.write(move |c| {
            ensure_schema(c)?;
            let mut st =
                c.prepare("SELECT id, runbook, group_id FROM chat_runs WHERE status='running'")?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            c.execute(
                "UPDATE chat_runs SET status='interrupted', updated_at=?1 WHERE status='running'",
                [now],
            )?;
            Ok(rows)
        })
        .await
    }

    /// Waiting runs whose approval deadline passed.
    pub async fn expired_runs(&self, now: f64) -> store::Result<Vec<RunRecord>> {
        self.read(move |c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM chat_runs WHERE status='waiting' AND expires_at <= ?1"
            ))?;
            let rows = st
                .query_map([now], run_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }
}
