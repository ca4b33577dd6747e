//! Runs across time: on start, runs cut off by a restart are marked
//! `interrupted`; every [`EXPIRY_TICK`] waiting approvals past their
//! deadline expire (the step is skipped and the run goes on).

use crate::chat::approvals::*;

/// On start: runs cut off mid-step by a restart are marked `interrupted`.
pub async fn recover(chat: &Arc<ChatState>) {
    let now = chat.now() as f64;
    let cut = chat.bot.store.interrupt_running_runs(now).await;
    match cut {
        Ok(rows) => {
            for (id, runbook, group) in rows {
                tracing::warn!(run = %id, runbook = %runbook, "run interrupted by a restart");
                chat.audit(
                    "gpuops",
                    "run",
                    serde_json::json!({ "run": id }),
                    Some(format!("{runbook}/{id}")),
                    "interrupted: bot restarted",
                )
                .await;
                if let Some(g) = group {
                    post_thread(chat, g, format!("⚠️ run `{id}` of `{runbook}` was interrupted by a bot restart; start it again if needed"), None).await;
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read runs at start"),
    }
}

/// Expires waiting approvals past their deadline, every [`EXPIRY_TICK`].
pub fn spawn_expiry(chat: Arc<ChatState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            expire_due(&chat).await;
        }
    });
}

/// Expires every waiting run whose deadline passed; returns their ids.
pub async fn expire_due(chat: &Arc<ChatState>) -> Vec<String> {
    let now = chat.now() as f64;
    let due = chat.bot.store.expired_runs(now).await;
    let mut expired = Vec::new();
    for row in due.unwrap_or_default() {
        if !matches!(
            decide(chat, &row.id, "running", "gpuops", now).await,
            Ok(true)
        ) {
            continue;
        }
        let step = plan_of(chat, &row)
            .await
            .ok()
            .and_then(|p| p.steps.get(row.next_step).map(|s| s.step.name.clone()))
            .unwrap_or_default();
        chat.audit(
            "gpuops",
            "approval_expired",
            serde_json::json!({ "run": row.id, "runbook": row.runbook, "step": step, "requested_by": row.requester }),
            Some(format!("{}/{}", row.runbook, row.id)),
            "expired",
        )
        .await;
        tracing::info!(run = %row.id, step = %step, "approval expired; step skipped");
        skip_waiting_step(
            chat,
            &row,
            &step,
            StepStatus::Expired,
            "nobody approved it in time",
        )
        .await;
        if let Some(g) = row.group_id {
            post_thread(
                chat,
                g,
                format!(
                    "⌛ nobody approved step `{step}` of run `{}` in time; it is skipped and the run goes on with the steps that do not depend on it",
                    row.id,
                ),
                None,
            )
            .await;
        }
        tokio::spawn(drive(chat.clone(), row.id.clone(), None, Responder::None));
        expired.push(row.id);
    }
    expired
}
