//! A run's persistence from the chat side: each call hands the run's state
//! to the store (`store/runs.rs`, where the SQL is) with the chat's clock.

use crate::chat::approvals::*;

/// Stores one step's outcome with the run.
pub(super) async fn record_step(
    chat: &ChatState,
    run: &str,
    step: &str,
    out: &engine::StepOutcome,
    approved_by: Option<&str>,
) {
    let (run, step) = (run.to_string(), step.to_string());
    let mut output = out.output.clone();
    let mut truncated = out.truncated;
    if output.len() > STORED_OUTPUT_BYTES {
        let mut end = STORED_OUTPUT_BYTES;
        while !output.is_char_boundary(end) {
            end -= 1;
        }
        output.truncate(end);
        truncated = true;
    }
    let status = status_name(out.status).to_string();
    let exit_code = out.exit_code;
    let duration = out.duration.as_secs_f64();
    let approved_by = approved_by.map(str::to_string);
    let now = store::now();
    let r = chat
        .bot
        .store
        .insert_run_step(
            StepRecord {
                seq: 0,
                step,
                status,
                exit_code,
                duration_secs: duration,
                output,
                truncated,
                approved_by,
                at: now,
            },
            run,
        )
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "cannot store the step's outcome");
    }
}

pub(super) async fn load_steps(chat: &ChatState, run: &str) -> store::Result<Vec<StepRecord>> {
    chat.bot.store.run_steps(run).await
}

pub(super) async fn insert(chat: &ChatState, rec: RunRecord) -> store::Result<String> {
    chat.bot.store.insert_run(rec, chat.now() as f64).await
}

pub(super) async fn progress(
    chat: &ChatState,
    id: &str,
    next: usize,
    results: &[(String, String)],
) -> store::Result<()> {
    let now = chat.now() as f64;
    chat.bot.store.run_progress(id, next, results, now).await
}

pub(super) async fn wait_for_approval(
    chat: &ChatState,
    id: &str,
    step: usize,
    results: &[(String, String)],
    expires_at: f64,
) -> store::Result<()> {
    let now = chat.now() as f64;
    chat.bot
        .store
        .run_waits_for_approval(id, step, results, expires_at, now)
        .await
}

/// Moves a waiting run to `status` (once: false when someone else did).
pub(super) async fn decide(
    chat: &ChatState,
    id: &str,
    status: &str,
    who: &str,
    now: f64,
) -> store::Result<bool> {
    chat.bot.store.decide_run(id, status, who, now).await
}

pub(super) async fn finish(
    chat: &ChatState,
    id: &str,
    status: &str,
    results: &[(String, String)],
) -> store::Result<()> {
    let now = chat.now() as f64;
    chat.bot.store.finish_run(id, status, results, now).await
}

pub(super) async fn plan_of(chat: &ChatState, row: &RunRecord) -> Result<RunPlan, String> {
    let set = chat.runbooks().await;
    let rb = set.get(&row.runbook).ok_or_else(|| {
        format!(
            "runbook {} is no longer in the runbook directory",
            row.runbook
        )
    })?;
    engine::plan(rb, &row.given, &row.labels).map_err(|e| e.to_string())
}

/// `row` when it still waits on step `expect` (if given): a button pressed
/// just as its step was decided and the run moved on changes nothing.
pub(super) fn still_waiting_on(row: RunRecord, expect: Option<usize>) -> Result<RunRecord, String> {
    match expect {
        Some(step) if row.next_step != step => Err(format!(
            "⛔ this button is stale, nothing changed: run `{}` moved on from the step it was for",
            row.id
        )),
        _ => Ok(row),
    }
}

pub(super) async fn waiting_run(chat: &ChatState, id: &str) -> Result<RunRecord, String> {
    let row = match load(chat, id).await {
        Ok(Some(r)) => r,
        Ok(None) => return Err(format!("no run {id}")),
        Err(e) => return Err(format!("store error: {e}")),
    };
    if row.status != "waiting" {
        return Err(format!(
            "run {id} is {}, not waiting for approval",
            row.status
        ));
    }
    if row.expires_at.is_some_and(|t| (chat.now() as f64) >= t) {
        // The expiry task records and announces it (within a tick).
        return Err(format!("the approval request of run {id} expired"));
    }
    Ok(row)
}

pub(super) fn selected(only: &Option<Vec<String>>, name: &str) -> bool {
    only.as_ref().is_none_or(|o| o.iter().any(|s| s == name))
}

pub(super) fn parse_role(s: &str) -> Role {
    match s {
        "admin" => Role::Admin,
        "operator" => Role::Operator,
        _ => Role::Viewer,
    }
}

pub(super) fn status_name(s: StepStatus) -> &'static str {
    s.as_str()
}

pub(super) fn summary_counts(results: &[(String, String)]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, s) in results {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return "no steps run".into();
    }
    counts
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}
