//! Plans before approvals: a run's step is planned (`StepExecutor::plan`)
//! before it is offered for approval or run. A step whose plan says it
//! cannot run is recorded `unavailable` with the reason, posted in the
//! thread ("⏭ step `drain-slurm` skipped before approval: scontrol not
//! found on gpu-node-17's PATH (…)"), audited and skipped; a plan that
//! could not be made (agent unreachable, too old to plan) is an error and
//! the step is never run unplanned. An approval request shows the planned
//! argv of its step, and of each later step of its `approval_group`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::chat::approvals::*;
use crate::runbook::engine::{PlannedStep, Rendered, StepOutcome, StepPlan};

/// What a step's planning needs from the run being driven.
pub(super) struct StepContext<'a> {
    pub row: &'a RunRecord,
    pub plan: &'a RunPlan,
    pub sink: &'a RunThread,
    pub step_params: &'a serde_json::Value,
    pub target: &'a Option<String>,
}

/// Plans `ps`. `Ok`: the step to run or offer (its `planned_argv` set for
/// a command) and the plan; `Err(status)`: not run, already recorded,
/// posted and audited. A step just approved runs the argv its request
/// showed, not a new plan.
pub(super) async fn plan_step(
    chat: &ChatState,
    ctx: &StepContext<'_>,
    ps: &PlannedStep,
    just_approved: bool,
) -> Result<(PlannedStep, Option<StepPlan>), StepStatus> {
    let mut ps = ps.clone();
    if !matches!(ps.rendered, Rendered::Command { .. }) {
        return Ok((ps, None));
    }
    if just_approved {
        if let Some(argv) = ctx.row.planned.get(&ps.step.name) {
            ps.planned_argv = Some(argv.clone());
            return Ok((ps, None));
        }
    }
    let p = chat.executor.plan(ctx.plan, &ps).await;
    let name = ps.step.name.clone();
    if p.failed {
        let out = StepOutcome::error(format!("not planned: {}", p.reason_text()), Duration::ZERO);
        let (head, body) = step_message(ctx.plan, &ps, &out, &ctx.row.id);
        ctx.sink.post(chat, head, Some(body)).await;
        chat.audit(
            &ctx.row.requester,
            "step",
            ctx.step_params.clone(),
            ctx.target.clone(),
            &format!("error: not planned: {}", p.reason_text()),
        )
        .await;
        record_step(chat, &ctx.row.id, &name, &out, None).await;
        return Err(StepStatus::Error);
    }
    if !p.available {
        let reason = p.reason_text();
        let when = if ps.step.needs_approval {
            "skipped before approval"
        } else {
            "not run"
        };
        ctx.sink
            .post(chat, format!("⏭ step `{name}` {when}: {reason}"), None)
            .await;
        chat.audit(
            &ctx.row.requester,
            "step",
            ctx.step_params.clone(),
            ctx.target.clone(),
            &format!("unavailable: {reason}"),
        )
        .await;
        let out = StepOutcome::unavailable_because(reason);
        record_step(chat, &ctx.row.id, &name, &out, None).await;
        return Err(StepStatus::Unavailable);
    }
    if !p.argv.is_empty() {
        ps.planned_argv = Some(p.argv.clone());
    }
    Ok((ps, Some(p)))
}

/// For an approval request of `ps`: the code block (the planned argv of the
/// step and of each later step of its approval group, where each runs),
/// the planned argv to store (step → argv, with the run's earlier ones),
/// and the "approving it also approves …" text.
pub(super) async fn approval_request_plans(
    chat: &ChatState,
    ctx: &StepContext<'_>,
    ps: &PlannedStep,
    step_plan: Option<&StepPlan>,
    group: Option<&str>,
) -> (String, BTreeMap<String, Vec<String>>, String) {
    let mut planned = ctx.row.planned.clone();
    let mut code = match step_plan {
        Some(p) => p.approval_block(&ps.step, &ps.rendered),
        None => ps.rendered.display(),
    };
    if let Some(argv) = &ps.planned_argv {
        planned.insert(ps.step.name.clone(), argv.clone());
    }
    let Some(g) = group else {
        return (code, planned, String::new());
    };
    let mut covered: Vec<String> = Vec::new();
    for o in ctx.plan.steps.iter().filter(|o| {
        o.index > ps.index
            && selected(&ctx.row.only_steps, &o.step.name)
            && approval_group(&o.step).as_deref() == Some(g)
    }) {
        covered.push(format!("`{}`", o.step.name));
        if !matches!(o.rendered, Rendered::Command { .. }) {
            code.push_str(&format!(
                "\n\n# and {}:\n{}",
                o.step.name,
                o.rendered.display()
            ));
            continue;
        }
        let op = chat.executor.plan(ctx.plan, o).await;
        if op.available && !op.failed {
            planned.insert(o.step.name.clone(), op.argv.clone());
            code.push_str(&format!(
                "\n\n# and {}:\n{}",
                o.step.name,
                op.approval_block(&o.step, &o.rendered)
            ));
        } else {
            code.push_str(&format!(
                "\n\n# and {}: cannot run ({}), it will be skipped",
                o.step.name,
                op.reason_text()
            ));
        }
    }
    let covers = if covered.is_empty() {
        String::new()
    } else {
        format!(
            "; approving it also approves {} (group `{g}`), each with the command shown",
            covered.join(", ")
        )
    };
    (code, planned, covers)
}
