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
