//! Runbook runs started from chat, and their approvals.
//!
//! A run walks its runbook's steps in file order; [`engine::next_action`]
//! (the same rule as `gpuops runbook run`) decides whether each step runs
//! or is skipped with its reason (`when`, `requires`, alternatives, a failed
//! mitigation; escalation always runs). Steps the requester's role may not
//! run are skipped (and say why); a `needs_approval` step stops the run in
//! `waiting` until an admin other than the requester approves it (two-person
//! rule; the typed command and the Approve button run the same checks).
//! Denying it, or nobody approving within `[approvals] expiry_secs`, skips
//! that step and the run goes on with what does not depend on it. Before
//! an approval request, the step is planned (`StepExecutor::plan`: on the
//! node by its agent's `/v1/plan`, bot-side steps here): the request shows
//! the planned argv and where it runs, a step that cannot run is recorded
//! `unavailable` with the reason and skipped before anyone is asked, and
//! the argv signed when the approval arrives is the one shown (stored in
//! `chat_runs.planned`). One approval covers the later steps of the same
//! `approval_group` in the run, each planned and listed in the request,
//! and only with the argv it showed; never the other members of an
//! `alternative` group.
//! The rule compares people, not accounts: `[[rbac.people]]` maps each
//! person's Slack and Discord accounts to one name (an account not listed is
//! a person of its own), and approval audit records name both people.
//! The alert's thread (through the bot's outbox) is the incident timeline:
//! run started (who, runbook, node), each step and its output, approval
//! requests with Approve / Deny buttons, decisions, and a closing summary
//! with the node's state in plain words ([`engine::node_state`]). A run not
//! tied to an alert answers the requester's chat instead. Every request,
//! decision and step is audited.
//!
//! Runs are persisted in the bot's store, in the tables `chat_runs` and
//! `chat_run_steps` (each step's outcome and output, at most
//! [`STORED_OUTPUT_BYTES`]; the SQL is `store/runs.rs`), created
//! (`CREATE TABLE IF NOT EXISTS`) on first use: a waiting approval survives a restart. A run that
//! was executing when the bot stopped is marked `interrupted` on the next
//! start (its step may or may not have run; it is not repeated). This module
//! spawns no process: steps run through the
//! [`StepExecutor`](crate::runbook::engine::StepExecutor).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::alert::Webhook;
use crate::chat::{respond, step_message, ChatState, Outcome, Reply, Responder, User};
use crate::exec_auth::SignedApproval;
use crate::notify::{self, Button, Message, TextMessage};
use crate::rbac::{authorize, authorize_approval, Actor, ChatAction};
use crate::runbook::engine::{self, RunPlan, StepStatus};
use crate::runbook::{Role, StepTarget};
use crate::store;
mod buttons;
mod expiry;
mod plan;
mod runs;
mod thread;

pub use crate::store::runs::{RunRecord, StepRecord, STORED_OUTPUT_BYTES};
pub use buttons::{approve_button, button_value, deny_button, is_button_value};
pub use expiry::{expire_due, recover, spawn_expiry};
use plan::*;
use runs::*;
pub use thread::post_thread;
use thread::*;

/// How often waiting approvals are checked for expiry.
pub const EXPIRY_TICK: Duration = Duration::from_millis(500);

/// What someone asked to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub runbook: String,
    pub steps: Option<Vec<String>>,
    pub group: Option<i64>,
    pub params: BTreeMap<String, String>,
}

/// `r` and six hex digits.
pub fn is_run_id(s: &str) -> bool {
    s.len() == 7
        && s.starts_with('r')
        && s[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Creates the `chat_runs` table if it is missing (blocking; at start).
pub fn create_table(store: &store::Store) -> store::Result<()> {
    store.create_runs_table()
}

/// A run by id.
pub async fn load(chat: &ChatState, id: &str) -> store::Result<Option<RunRecord>> {
    chat.bot.store.run(id).await
}

/// How many runs wait for an approval.
pub async fn waiting_count(chat: &ChatState) -> store::Result<i64> {
    chat.bot.store.waiting_runs().await
}

/// Starts a run: checks the runbook, steps, parameters and role, stores the
/// run, and walks it in a task.
pub async fn start_run(
    chat: &Arc<ChatState>,
    user: &User,
    mut req: RunRequest,
    responder: Responder,
) -> Outcome {
    let who = user.key();
    let role = chat.role_of(user);
    let audit_params = serde_json::json!({
        "runbook": req.runbook, "steps": req.steps, "alert": req.group, "params": req.params,
        "person": chat.person_of(&who),
    });
    macro_rules! refuse {
        ($outcome:expr, $msg:expr) => {{
            let msg: String = $msg;
            let outcome: String = $outcome.into();
            chat.audit(
                &who,
                "run",
                audit_params.clone(),
                Some(req.runbook.clone()),
                &outcome,
            )
            .await;
            return Outcome::Now(Reply::private(msg));
        }};
    }
    if role == Role::Viewer {
        refuse!(
            "denied: viewer",
            "⛔ running runbooks needs the operator or admin role (you are a viewer).".to_string()
        );
    }
    let set = chat.runbooks().await;
    let Some(rb) = set.get(&req.runbook) else {
        refuse!(
            "error: no such runbook",
            format!("no runbook `{}` (see `/gpuops runbooks`)", req.runbook)
        );
    };
    if let Some(only) = &req.steps {
        let unknown: Vec<&String> = only.iter().filter(|s| rb.step(s).is_none()).collect();
        if !unknown.is_empty() {
            refuse!(
                "error: unknown step",
                format!(
                    "runbook `{}` has no step {}; its steps: {}",
                    rb.id,
                    unknown
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    rb.steps
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            );
        }
    }
    let labels = match req.group {
        Some(g) => match group_labels(chat, g).await {
            Ok(l) => l,
            Err(msg) => refuse!(format!("error: {msg}"), msg.clone()),
        },
        None => {
            // Without an alert, given values named like a parameter's
            // from_label double as labels, and `instance=host:port` names the
            // agent (looked up in the inventory like an alert's label).
            rb.params
                .iter()
                .filter_map(|p| p.from_label.as_ref())
                .map(String::as_str)
                .chain(["instance"])
                .filter_map(|l| req.params.get(l).map(|v| (l.to_string(), v.clone())))
                .collect()
        }
    };
    if !rb.params.iter().any(|p| p.name == "instance") {
        // Consumed as a label above; not a parameter of this runbook.
        req.params.remove("instance");
    }
    let mut labels = labels;
    let node_steps = rb
        .steps
        .iter()
        .any(|s| s.target == StepTarget::Node && selected(&req.steps, &s.name));
    if let Some(dir) = &chat.agents {
        // The inventory, never the instance label, says which node this is;
        // an address the bot does not know gets no request at all.
        match labels.get("instance").cloned() {
            Some(instance) => match dir.agent(&instance).await {
                Ok(agent) => {
                    if let Some(given) = req.params.get("node").filter(|n| **n != agent.node) {
                        refuse!(
                            "refused: node mismatch",
                            format!(
                                "⛔ runbook `{}` not started: node={given} is not the node of {instance} ({})",
                                rb.id, agent.node
                            )
                        );
                    }
                    labels.insert("node".into(), agent.node);
                }
                Err(why) if node_steps => refuse!(
                    "refused: unknown agent",
                    format!("⛔ runbook `{}` not started: {why}", rb.id)
                ),
                Err(_) => {}
            },
            None if node_steps => refuse!(
                "refused: no instance",
                format!(
                    "⛔ runbook `{}` not started: it has node steps and the alert names no instance (the agent to run them on)",
                    rb.id
                )
            ),
            None => {}
        }
    }
    let plan = match engine::plan(rb, &req.params, &labels) {
        Ok(p) => p,
        Err(e) => refuse!(
            "refused: invalid parameters",
            format!("⛔ runbook `{}` not started: {e}", rb.id)
        ),
    };
    let selected: Vec<&engine::PlannedStep> = plan
        .steps
        .iter()
        .filter(|s| selected(&req.steps, &s.step.name))
        .collect();
    if !selected
        .iter()
        .any(|s| authorize(role, ChatAction::RunStep, Some(&s.step)).is_ok())
    {
        let why = selected
            .first()
            .and_then(|s| authorize(role, ChatAction::RunStep, Some(&s.step)).err())
            .map(|d| d.0)
            .unwrap_or_else(|| "no steps".into());
        refuse!(
            format!("denied: {why}"),
            format!("⛔ you may run none of these steps: {why}")
        );
    }
    let record = RunRecord {
        id: String::new(),
        runbook: rb.id.clone(),
        only_steps: req.steps.clone(),
        given: req.params.clone(),
        labels: labels.clone(),
        group_id: req.group,
        requester: who.clone(),
        requester_name: user.display(),
        requester_role: role.as_str().to_string(),
        status: "running".into(),
        next_step: 0,
        results: Vec::new(),
        expires_at: None,
        decided_by: None,
        planned: Default::default(),
    };
    let id = match insert(chat, record).await {
        Ok(id) => id,
        Err(e) => refuse!(format!("error: {e}"), format!("cannot store the run: {e}")),
    };
    chat.audit(
        &who,
        "run",
        audit_params.clone(),
        Some(format!("{}/{}", rb.id, id)),
        &format!("started: {id}"),
    )
    .await;
    // A group holding several GPUs: the run acts on one (its `gpu`
    // parameter); say which, and offer the others as runs of their own.
    let gpu_note = match (
        req.group,
        rb.params
            .iter()
            .find(|p| p.from_label.as_deref() == Some("gpu")),
    ) {
        (Some(g), Some(param)) if !req.params.contains_key(&param.name) => {
            let acting = plan.params.get(&param.name).unwrap_or("").to_string();
            let others: Vec<String> =
                group_gpus(chat, g, labels.get("instance").map(String::as_str))
                    .await
                    .into_iter()
                    .filter(|x| *x != acting)
                    .collect();
            if others.is_empty() {
                String::new()
            } else {
                format!(
                    "; it acts on GPU {acting} only: alert group #{g} also holds GPU{} {} ({})",
                    if others.len() == 1 { "" } else { "s" },
                    others.join(", "),
                    others
                        .iter()
                        .map(|x| format!("`/gpuops run {} alert={g} {}={x}`", rb.id, param.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
        _ => String::new(),
    };
    // A repeat of the same fault soon after a return: replace the hardware.
    let repeat = crate::lifecycle::repeat_advice(
        &chat.bot.store,
        &chat.bot.config.lifecycle,
        &plan,
        chat.now() as f64,
    )
    .await
    .map(|a| format!("\n{a}"))
    .unwrap_or_default();
    let where_ = match req.group {
        Some(g) => format!("{gpu_note}; output goes to the thread of alert group #{g}{repeat}"),
        None => repeat.clone(),
    };
    let ack = Reply::public(format!(
        "▶ {} started run `{id}` of runbook `{}` ({} step{}){where_}",
        user.display(),
        rb.id,
        selected.len(),
        if selected.len() == 1 { "" } else { "s" }
    ));
    if let Some(g) = req.group {
        post_thread(
            chat,
            g,
            format!(
                "▶ {} started run `{id}` of runbook `{}` ({}) on node {}{} ({} step{}){gpu_note}",
                user.display(),
                rb.id,
                rb.title,
                plan.params
                    .get("node")
                    .or_else(|| labels.get("node").map(String::as_str))
                    .or_else(|| labels.get("instance").map(String::as_str))
                    .unwrap_or("(none)"),
                // The pod the alert is about (outside text, one line).
                crate::message::pod_labels(|k| labels.get(k).map(String::as_str))
                    .map(|(ns, pod, _)| format!(
                        ", pod {}/{}",
                        crate::escape::line(ns),
                        crate::escape::line(pod)
                    ))
                    .unwrap_or_default(),
                selected.len(),
                if selected.len() == 1 { "" } else { "s" }
            ) + &repeat,
            None,
        )
        .await;
    }
    let chat2 = chat.clone();
    Outcome::Later {
        ack,
        work: Box::pin(async move { drive(chat2, id, None, responder).await }),
    }
}

/// Approves the step a run waits on (two-person rule), then resumes the run.
pub async fn approve(
    chat: &Arc<ChatState>,
    user: &User,
    id: &str,
    responder: Responder,
) -> Outcome {
    approve_step(chat, user, id, responder, None).await
}

/// [`approve`], of step `expect` only when given (a button's step).
async fn approve_step(
    chat: &Arc<ChatState>,
    user: &User,
    id: &str,
    responder: Responder,
    expect: Option<usize>,
) -> Outcome {
    let who = user.key();
    let role = chat.role_of(user);
    let params = serde_json::json!({ "run": id });
    if let Err(denied) = authorize(role, ChatAction::Approve, None) {
        chat.audit(
            &who,
            "approve",
            params,
            Some(id.into()),
            &format!("denied: {denied}"),
        )
        .await;
        return Outcome::Now(Reply::private(format!("⛔ {denied}")));
    }
    let row = match waiting_run(chat, id)
        .await
        .and_then(|r| still_waiting_on(r, expect))
    {
        Ok(r) => r,
        Err(msg) => {
            chat.audit(
                &who,
                "approve",
                params,
                Some(id.into()),
                &format!("refused: {msg}"),
            )
            .await;
            return Outcome::Now(Reply::private(msg));
        }
    };
    let (plan, index) = match plan_of(chat, &row).await {
        Ok(p) => (p, row.next_step),
        Err(msg) => {
            chat.audit(
                &who,
                "approve",
                params,
                Some(id.into()),
                &format!("error: {msg}"),
            )
            .await;
            return Outcome::Now(Reply::private(msg));
        }
    };
    let Some(ps) = plan.steps.get(index) else {
        return Outcome::Now(Reply::private(format!("run {id} has no step {index}")));
    };
    // The two-person rule compares people ([[rbac.people]]), not accounts.
    let requester = Actor {
        id: chat.person_of(&row.requester),
        role: parse_role(&row.requester_role),
    };
    let approver = Actor {
        id: chat.person_of(&who),
        role,
    };
    let step_params = serde_json::json!({
        "run": id, "runbook": row.runbook, "step": ps.step.name,
        "requested_by": row.requester, "command": ps.rendered.display(),
        "person": approver.id, "requested_by_person": requester.id,
    });
    if let Err(denied) = authorize_approval(&approver, &requester, &ps.step) {
        chat.audit(
            &who,
            "approve",
            step_params,
            Some(format!("{}/{id}", row.runbook)),
            &format!("denied: {denied}"),
        )
        .await;
        return Outcome::Now(Reply::private(format!("⛔ {denied}")));
    }
    let now = chat.now() as f64;
    let changed = decide(chat, id, "running", &who, now).await;
    if !matches!(changed, Ok(true)) {
        return Outcome::Now(Reply::private(format!(
            "run {id} was decided or expired meanwhile"
        )));
    }
    chat.audit(
        &who,
        "approve",
        step_params,
        Some(format!("{}/{id}", row.runbook)),
        "approved",
    )
    .await;
    let note = format!(
        "✅ {} approved step `{}` of run `{id}` (requested by {})",
        user.display(),
        ps.step.name,
        row.requester_name
    );
    let chat2 = chat.clone();
    let id2 = id.to_string();
    let group = row.group_id;
    let note2 = note.clone();
    Outcome::Later {
        ack: Reply::public(note),
        work: Box::pin(async move {
            if let Some(g) = group {
                post_thread(&chat2, g, note2, None).await;
            }
            drive(chat2, id2, Some(index), responder).await
        }),
    }
}

/// Denies the step a run waits on: that step is skipped and the run goes on
/// with the steps that do not depend on it. Admins, or the requester
/// (withdrawing their own request), may deny.
pub async fn deny(chat: &Arc<ChatState>, user: &User, id: &str, responder: Responder) -> Outcome {
    deny_step(chat, user, id, responder, None).await
}

/// [`deny`], of step `expect` only when given (a button's step).
async fn deny_step(
    chat: &Arc<ChatState>,
    user: &User,
    id: &str,
    responder: Responder,
    expect: Option<usize>,
) -> Outcome {
    let who = user.key();
    let role = chat.role_of(user);
    let params = serde_json::json!({ "run": id });
    let row = match waiting_run(chat, id)
        .await
        .and_then(|r| still_waiting_on(r, expect))
    {
        Ok(r) => r,
        Err(msg) => {
            chat.audit(
                &who,
                "deny",
                params,
                Some(id.into()),
                &format!("refused: {msg}"),
            )
            .await;
            return Outcome::Now(Reply::private(msg));
        }
    };
    let (person, requester_person) = (chat.person_of(&who), chat.person_of(&row.requester));
    if requester_person != person {
        if let Err(denied) = authorize(role, ChatAction::Deny, None) {
            chat.audit(
                &who,
                "deny",
                params,
                Some(id.into()),
                &format!("denied: {denied}"),
            )
            .await;
            return Outcome::Now(Reply::private(format!("⛔ {denied}")));
        }
    }
    let now = chat.now() as f64;
    // The run goes on: the denied step is skipped, and so is whatever
    // depends on it (engine::next_action), never anything more dangerous.
    if !matches!(decide(chat, id, "running", &who, now).await, Ok(true)) {
        return Outcome::Now(Reply::private(format!(
            "run {id} was decided or expired meanwhile"
        )));
    }
    let step = plan_of(chat, &row)
        .await
        .ok()
        .and_then(|p| p.steps.get(row.next_step).map(|s| s.step.name.clone()))
        .unwrap_or_default();
    chat.audit(
        &who,
        "deny",
        serde_json::json!({
            "run": id, "runbook": row.runbook, "step": step, "requested_by": row.requester,
            "person": person, "requested_by_person": requester_person,
        }),
        Some(format!("{}/{id}", row.runbook)),
        "denied",
    )
    .await;
    let note = format!(
        "🚫 {} denied step `{step}` of run `{id}`; the run goes on with the steps that do not depend on it",
        user.display(),
    );
    skip_waiting_step(
        chat,
        &row,
        &step,
        StepStatus::Denied,
        &format!("denied by {}", user.display()),
    )
    .await;
    if let Some(g) = row.group_id {
        post_thread(chat, g, note.clone(), None).await;
    }
    let chat2 = chat.clone();
    let id2 = id.to_string();
    Outcome::Later {
        ack: Reply::public(note),
        work: Box::pin(async move { drive(chat2, id2, None, responder).await }),
    }
}

/// Records the step a run waited on as not run (denied, expired) and moves
/// the run past it.
async fn skip_waiting_step(
    chat: &ChatState,
    row: &RunRecord,
    step: &str,
    status: StepStatus,
    why: &str,
) {
    let mut results = row.results.clone();
    results.push((step.to_string(), status_name(status).to_string()));
    let mut out = engine::StepOutcome::skipped(why);
    out.status = status;
    record_step(chat, &row.id, step, &out, None).await;
    if let Err(e) = progress(chat, &row.id, row.next_step + 1, &results).await {
        tracing::error!(error = %e, run = %row.id, "cannot record run progress");
    }
}

/// Walks a run from its next step. `approved` is the index of a step an
/// approver just allowed. What runs next is [`engine::next_action`]'s
/// decision (the same rule as `gpuops runbook run`); every step's outcome
/// and output are stored (`chat_run_steps`) and posted.
pub async fn drive(
    chat: Arc<ChatState>,
    id: String,
    approved: Option<usize>,
    responder: Responder,
) {
    let row = match load(&chat, &id).await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, run = %id, "cannot read the run");
            return;
        }
    };
    let sink = RunThread::new(row.group_id, responder);
    let plan = match plan_of(&chat, &row).await {
        Ok(p) => p,
        Err(msg) => {
            let _ = finish(&chat, &id, "failed", &row.results).await;
            sink.finish(&chat, format!("⚠️ run `{id}` cannot continue: {msg}"), None)
                .await;
            chat.audit(
                "gpuops",
                "run",
                serde_json::json!({ "run": id }),
                Some(row.runbook),
                &format!("failed: {msg}"),
            )
            .await;
            return;
        }
    };
    let role = parse_role(&row.requester_role);
    let mut results = row.results.clone();
    // Approval groups already approved in this run: group -> approver.
    let mut approved_groups: BTreeMap<String, String> = BTreeMap::new();
    for st in load_steps(&chat, &id).await.unwrap_or_default() {
        if let (Some(by), Some(g)) = (
            st.approved_by,
            plan.step(&st.step).and_then(|p| approval_group(&p.step)),
        ) {
            approved_groups.entry(g).or_insert(by);
        }
    }
    let total = plan.steps.len();
    for i in row.next_step..total {
        let ps = &plan.steps[i];
        if !selected(&row.only_steps, &ps.step.name) {
            continue;
        }
        let step_params = serde_json::json!({
            "run": id, "runbook": plan.runbook.id, "step": ps.step.name,
            "phase": ps.step.phase.as_str(), "target": ps.step.target.as_str(),
            "command": ps.rendered.display(), "requested_by": row.requester,
            "requested_by_person": chat.person_of(&row.requester),
        });
        let target = Some(format!("{}/{id}", plan.runbook.id));
        let done = flow_results(&results);
        // The flow first: a step the run's outcomes rule out says why (a
        // failed drain), not who could have run it.
        let skip = match engine::next_action(&plan, i, &done) {
            engine::NextAction::Skip(why) => Some((why.clone(), why)),
            engine::NextAction::Run => match authorize(role, ChatAction::RunStep, Some(&ps.step)) {
                Err(denied) => Some((
                    format!("skipped: {denied}"),
                    "skipped: not allowed".to_string(),
                )),
                Ok(()) => None,
            },
        };
        if let Some((why, audit_outcome)) = skip {
            let out = engine::StepOutcome::skipped(why.clone());
            let (head, _) = step_message(&plan, ps, &out, &id);
            let why_text = why.strip_prefix("skipped: ").unwrap_or(&why);
            sink.post(&chat, format!("{head}: {why_text}"), None).await;
            chat.audit(&row.requester, "step", step_params, target, &audit_outcome)
                .await;
            results.push((ps.step.name.clone(), "skipped".into()));
            record_step(&chat, &id, &ps.step.name, &out, None).await;
            let _ = progress(&chat, &id, i + 1, &results).await;
            continue;
        }
        let group = approval_group(&ps.step);
        let mut approver = if approved == Some(i) {
            row.decided_by.clone()
        } else {
            group.as_ref().and_then(|g| approved_groups.get(g).cloned())
        };
        // Plan before asking: what runs, where, and whether it can at all.
        let ctx = StepContext {
            row: &row,
            plan: &plan,
            sink: &sink,
            step_params: &step_params,
            target: &target,
        };
        let (mut ps, step_plan) = match plan_step(&chat, &ctx, ps, approved == Some(i)).await {
            Ok(p) => p,
            Err(status) => {
                results.push((ps.step.name.clone(), status_name(status).to_string()));
                let _ = progress(&chat, &id, i + 1, &results).await;
                continue;
            }
        };
        if approved != Some(i) && approver.is_some() && ps.planned_argv.is_some() {
            // A group's approval covers only the argv its request showed.
            if row.planned.get(&ps.step.name) != ps.planned_argv.as_ref() {
                approver = None;
            }
        }
        if ps.step.needs_approval && approver.is_none() {
            let expiry = chat.bot.config.approvals.expiry;
            let expires = chat.now() as f64 + expiry.as_secs_f64();
            let (code, planned, covers) =
                approval_request_plans(&chat, &ctx, &ps, step_plan.as_ref(), group.as_deref())
                    .await;
            if let Err(e) = chat
                .bot
                .store
                .set_run_planned(&id, &planned, chat.now() as f64)
                .await
            {
                tracing::error!(error = %e, run = %id, "cannot record the planned argv");
                return;
            }
            if let Err(e) = wait_for_approval(&chat, &id, i, &results, expires).await {
                tracing::error!(error = %e, run = %id, "cannot record the approval request");
                return;
            }
            chat.audit(
                &row.requester,
                "approval_requested",
                step_params,
                target,
                "waiting",
            )
            .await;
            let text = format!(
                "⏸ {} needs approval by an admin other than {} (admins: {}){covers}: press Approve or Deny, or `/gpuops approve {id}` / `/gpuops deny {id}` (expires in {})",
                ps.header(total),
                row.requester_name,
                admins_text(&chat, &row.requester),
                humantime::format_duration(expiry)
            );
            match row.group_id {
                Some(g) => {
                    post_message(
                        &chat,
                        g,
                        TextMessage {
                            text,
                            code: Some(code),
                            buttons: vec![
                                Button::Approve(button_value(&id, i, expires)),
                                Button::Deny(button_value(&id, i, expires)),
                            ],
                        },
                    )
                    .await
                }
                None => sink.finish(&chat, text, Some(code)).await,
            }
            return;
        }
        if ps.step.needs_approval {
            let by = approver.clone().unwrap_or_default();
            if let Some(g) = &group {
                approved_groups.entry(g.clone()).or_insert(by.clone());
            }
            ps.approval = Some(SignedApproval {
                run: id.clone(),
                step: ps.step.name.clone(),
                requested_by: row.requester.clone(),
                approved_by: by,
                approved_at: chat.now(),
            });
        }
        let ps = &ps;
        let out = chat.executor.execute(&plan, ps).await;
        let status = status_name(out.status);
        let (head, body) = step_message(&plan, ps, &out, &id);
        sink.post(&chat, head, Some(body)).await;
        chat.audit(
            &row.requester,
            "step",
            step_params,
            target,
            &match out.exit_code {
                Some(c) => format!("{status} (exit {c})"),
                None => status.to_string(),
            },
        )
        .await;
        results.push((ps.step.name.clone(), status.to_string()));
        let by = if ps.step.needs_approval {
            approver.as_deref()
        } else {
            None
        };
        record_step(&chat, &id, &ps.step.name, &out, by).await;
        crate::chat::handlers::node_after_step(&chat, &row, &plan, ps, &out, by).await;
        if let Err(e) = progress(&chat, &id, i + 1, &results).await {
            tracing::error!(error = %e, run = %id, "cannot record run progress");
        }
    }
    let _ = finish(&chat, &id, "finished", &results).await;
    let counts = summary_counts(&results);
    let state = engine::node_state(&plan, &flow_results(&results));
    chat.audit(
        &row.requester,
        "run",
        serde_json::json!({ "run": id, "runbook": plan.runbook.id, "node_state": state }),
        Some(format!("{}/{id}", plan.runbook.id)),
        &format!("finished: {counts}"),
    )
    .await;
    let lines: Vec<String> = results
        .iter()
        .map(|(s, st)| format!("{st:<11} {s}"))
        .collect();
    sink.finish(
        &chat,
        format!(
            "🏁 run `{id}` of `{}` finished: {counts}\n*Node state:* {}",
            plan.runbook.id,
            state.join("; ")
        ),
        Some(lines.join("\n")),
    )
    .await;
}

/// The approval group a step shares its approval with: its
/// `approval_group` only. Members of an `alternative` group run different
/// commands (often on different machines): each is planned and approved on
/// its own.
fn approval_group(step: &crate::runbook::Step) -> Option<String> {
    step.approval_group.clone()
}

/// Who may approve a request of `requester`: the admins under `[rbac]`,
/// by person, less the requester.
pub(crate) fn admins_text(chat: &ChatState, requester: &str) -> String {
    let me = chat.person_of(requester);
    let mut names: Vec<String> = Vec::new();
    for a in &chat.bot.config.rbac.admins {
        let key = if a.contains(':') {
            a.clone()
        } else if a.bytes().all(|b| b.is_ascii_digit()) {
            format!("discord:{a}")
        } else {
            format!("slack:{a}")
        };
        let person = chat.person_of(&key);
        if person != me && !names.contains(&person) {
            names.push(person);
        }
    }
    if names.is_empty() {
        "none configured".into()
    } else {
        names.join(", ")
    }
}

/// The results as the flow rule reads them.
fn flow_results(results: &[(String, String)]) -> Vec<(String, StepStatus)> {
    results
        .iter()
        .map(|(n, s)| {
            (
                n.clone(),
                StepStatus::parse(s).unwrap_or(StepStatus::Skipped),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn button_values_name_run_step_and_request() {
        let v = button_value("r0a1b2c", 3, 1_700_000_600.0);
        assert!(is_button_value(&v), "{v}");
        assert!(v.starts_with("r0a1b2c.3."), "{v}");
        assert!(format!("gpuops:approve:{v}").len() <= 100);
        assert_ne!(v, button_value("r0a1b2c", 3, 1_700_000_900.0));
        assert_ne!(v, button_value("r0a1b2c", 4, 1_700_000_600.0));
        assert!(is_button_value("r0a1b2c"));
        assert!(!is_button_value("r0a1b2c.3"));
        assert!(!is_button_value("r0a1b2c.3.XYZ"));
        assert!(!is_button_value("r0a1b2c.3.0011aabb.x"));
    }

    #[test]
    fn run_ids() {
        assert!(is_run_id("r0a1b2c"));
        assert!(!is_run_id("r0A1b2c"));
        assert!(!is_run_id("x0a1b2c"));
        assert!(!is_run_id("r0a1b2"));
    }

    #[test]
    fn summaries_count_by_status() {
        let r = vec![
            ("a".to_string(), "succeeded".to_string()),
            ("b".to_string(), "failed".to_string()),
            ("c".to_string(), "succeeded".to_string()),
        ];
        assert_eq!(summary_counts(&r), "1 failed, 2 succeeded");
        assert_eq!(summary_counts(&[]), "no steps run");
    }
}
