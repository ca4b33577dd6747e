//! The Approve / Deny buttons of an approval request: values that name
//! run, step and request (`<run>.<step>.<nonce>`), and the check that a
//! pressed button is for the step the run waits on now; a stale one changes
//! nothing, says why and is audited as refused.

use crate::chat::approvals::*;

/// The value of the Approve / Deny buttons on one approval request:
/// `<run>.<step index>.<nonce>` (at most 7 + 1 + 3 + 1 + 8 characters, so
/// `gpuops:approve:<value>` stays far inside Discord's 100-character
/// `custom_id`). The nonce is drawn from the request itself (run, step and
/// when it expires), so a button from an earlier request, even for the same
/// step, never matches the one waiting now.
pub fn button_value(run: &str, step: usize, expires_at: f64) -> String {
    format!("{run}.{step}.{}", button_nonce(run, step, expires_at))
}

pub(super) fn button_nonce(run: &str, step: usize, expires_at: f64) -> String {
    use sha2::Digest as _;
    let millis = (expires_at * 1000.0).round() as i64;
    let digest = sha2::Sha256::digest(format!("gpuops-approval-button\n{run}\n{step}\n{millis}"));
    hex::encode(&digest[..4])
}

/// A button value: `<run>.<step>.<nonce>`, or a bare run id (buttons posted
/// before buttons named their step; answered as stale).
pub fn is_button_value(s: &str) -> bool {
    if is_run_id(s) {
        return true;
    }
    let mut parts = s.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(run), Some(step), Some(nonce), None) => {
            is_run_id(run)
                && (1..=3).contains(&step.len())
                && step.bytes().all(|b| b.is_ascii_digit())
                && nonce.len() == 8
                && nonce
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }
        _ => false,
    }
}

/// An Approve button pressed: approves only the very request it was posted
/// with; a stale one changes nothing and says why.
pub async fn approve_button(
    chat: &Arc<ChatState>,
    user: &User,
    value: &str,
    responder: Responder,
) -> Outcome {
    match current_button(chat, user, "approve", value).await {
        Ok((run, step)) => approve_step(chat, user, &run, responder, Some(step)).await,
        Err(why) => Outcome::Now(Reply::private(why)),
    }
}

/// A Deny button pressed (the same staleness rule as [`approve_button`]).
pub async fn deny_button(
    chat: &Arc<ChatState>,
    user: &User,
    value: &str,
    responder: Responder,
) -> Outcome {
    match current_button(chat, user, "deny", value).await {
        Ok((run, step)) => deny_step(chat, user, &run, responder, Some(step)).await,
        Err(why) => Outcome::Now(Reply::private(why)),
    }
}

/// The run and step a button is for when its request is the one waiting now; else
/// why the button is stale (audited as refused).
pub(super) async fn current_button(
    chat: &ChatState,
    user: &User,
    action: &str,
    value: &str,
) -> Result<(String, usize), String> {
    let mut parts = value.split('.');
    let run = parts.next().unwrap_or_default().to_string();
    let step: Option<usize> = parts.next().and_then(|s| s.parse().ok());
    let nonce = parts.next().unwrap_or_default();
    let stale = |why: String| format!("⛔ this button is stale, nothing changed: {why}");
    let why = match load(chat, &run).await {
        Err(e) => return Err(format!("store error: {e}")),
        Ok(None) => format!("no run {run}"),
        Ok(Some(row)) => {
            let Some(step) = step else {
                let why = stale(format!(
                    "it names run `{run}` but not the step it was for; use `/gpuops {action} {run}` after checking which step waits"
                ));
                audit_stale(chat, user, action, value, &run, &why).await;
                return Err(why);
            };
            let current = row.status == "waiting"
                && row.next_step == step
                && row
                    .expires_at
                    .is_some_and(|e| button_nonce(&run, step, e) == nonce);
            if current {
                return Ok((run, step));
            }
            let name = plan_of(chat, &row)
                .await
                .ok()
                .and_then(|p| p.steps.get(step).map(|s| s.step.name.clone()))
                .unwrap_or_else(|| format!("#{}", step + 1));
            let recorded = load_steps(chat, &run)
                .await
                .unwrap_or_default()
                .into_iter()
                .rev()
                .find(|s| s.step == name);
            match recorded {
                Some(r) => {
                    let at = chrono::DateTime::from_timestamp(r.at as i64, 0)
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                        .unwrap_or_default();
                    let by = r
                        .approved_by
                        .map(|b| format!(" (approved by {})", chat.person_of(&b)))
                        .unwrap_or_default();
                    format!(
                        "this approval was for step `{name}` of run `{run}`, which was {} at {at}{by}",
                        r.status
                    )
                }
                None if row.status == "waiting" && row.next_step == step => format!(
                    "it belongs to an earlier request for step `{name}` of run `{run}`; use the newest Approve / Deny"
                ),
                None => format!(
                    "this approval was for step `{name}` of run `{run}`, which is not waiting for approval (run {})",
                    row.status
                ),
            }
        }
    };
    let why = stale(why);
    audit_stale(chat, user, action, value, &run, &why).await;
    Err(why)
}

pub(super) async fn audit_stale(
    chat: &ChatState,
    user: &User,
    action: &str,
    value: &str,
    run: &str,
    why: &str,
) {
    chat.audit(
        &user.key(),
        action,
        serde_json::json!({ "run": run, "button": value, "person": chat.person_of(&user.key()) }),
        Some(run.to_string()),
        &format!("refused: {why}"),
    )
    .await;
}
