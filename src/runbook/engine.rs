//! The runbook engine: turns a [`Runbook`] plus parameters and alert labels
//! into a [`RunPlan`] of rendered steps, runs one step at a time through a
//! [`StepExecutor`]. Who may do what is decided in the `rbac` module.
//!
//! The engine does not iterate a whole run by itself, ask for approvals or
//! post anything: callers (the CLI, the chat commands) walk the plan, ask
//! [`next_action`] whether each step runs (the one step-flow rule), enforce
//! `needs_approval` and roles with `rbac`'s functions, show each
//! [`StepOutcome`], and end with [`node_state`]. Processes are spawned only through a
//! [`CommandRunner`]; node steps for the bot go to the node's agent as
//! `POST /v1/exec` requests signed for that one agent ([`AgentClient`]),
//! only to agents an [`AgentDirectory`] (the bot's inventory) knows.
//!
//! For an alert, the chat side does:
//! ```text
//! let (set, errors) = RunbookSet::load_dir(dir);           // log errors, keep the valid ones
//! let rb = set.suggest(&alert_labels)[0];                   // or set.get(id) for `/gpuops run`
//! let plan = engine::plan(rb, &given_k_v, &alert_labels)?;  // ParamErrors: show to the user
//! let exec = Executor::new(Arc::new(ProcessRunner),
//!     NodeSteps::Agent(AgentClient::new(inventory, signer)), Some(prometheus_url));
//! for s in plan.steps_in(Phase::Investigate) {
//!     rbac::authorize(role, ChatAction::RunStep, Some(&s.step))?;
//!     // s.step.needs_approval: wait for rbac::authorize_approval(approver, requester, &s.step)
//!     let outcome = exec.execute(&plan, s).await;             // post s.header(n) + outcome.output
//! }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::exec_auth::SignedApproval;
use crate::runbook::{Action, Escape, HttpMethod, ParamErrors, Params, Phase, Runbook, Step};
#[cfg(feature = "bot")]
use crate::signing::{self, Clock as _};

mod executor;

pub use executor::*;

/// Added to a step's timeout for the HTTP round trip to an agent.
pub const AGENT_MARGIN: Duration = Duration::from_secs(10);
/// Default cap on the output kept per step (each of stdout and stderr).
pub const DEFAULT_OUTPUT_CAP: usize = 64 * 1024;

/// A runbook with its parameters resolved and every step rendered.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub runbook: Runbook,
    pub params: Params,
    /// The alert's labels (empty for a run started by hand).
    pub labels: BTreeMap<String, String>,
    pub steps: Vec<PlannedStep>,
}

/// One step and what it will do, with parameters substituted.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub index: usize,
    pub step: Step,
    pub rendered: Rendered,
    /// Set by the caller once a `needs_approval` step is approved; a node
    /// step carries it to the agent inside the signed request.
    pub approval: Option<SignedApproval>,
    /// The argv its plan resolved ([`StepExecutor::plan`]), shown to the
    /// approver: when set, exactly this argv is signed and run (the agent
    /// resolves again and must agree); when `None` the executor plans first.
    pub planned_argv: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    Command {
        argv: Vec<String>,
    },
    Http {
        method: HttpMethod,
        url: String,
        body: Option<String>,
    },
    Promql {
        query: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Exit code 0, HTTP 2xx, or a PromQL answer.
    Succeeded,
    /// Ran and failed (non-zero exit, HTTP error status, PromQL error).
    Failed,
    TimedOut,
    /// Not run (no Prometheus URL, refused approval…); `output` says why.
    Skipped,
    /// Could not be run (spawn failure, agent unreachable, agent refused).
    Error,
    /// Not run: its `only_if_exists` path is missing where it would run
    /// (the next member of its alternative group is tried).
    Unavailable,
    /// Not run: the approval was denied (or declined at the CLI prompt).
    Denied,
    /// Not run: nobody approved it in time.
    Expired,
}

impl StepStatus {
    /// The stored name (`succeeded`, `timed_out`…).
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::TimedOut => "timed_out",
            StepStatus::Skipped => "skipped",
            StepStatus::Error => "error",
            StepStatus::Unavailable => "unavailable",
            StepStatus::Denied => "denied",
            StepStatus::Expired => "expired",
        }
    }

    /// The inverse of [`StepStatus::as_str`].
    pub fn parse(s: &str) -> Option<StepStatus> {
        Some(match s {
            "succeeded" => StepStatus::Succeeded,
            "failed" => StepStatus::Failed,
            "timed_out" => StepStatus::TimedOut,
            "skipped" => StepStatus::Skipped,
            "error" => StepStatus::Error,
            "unavailable" => StepStatus::Unavailable,
            "denied" => StepStatus::Denied,
            "expired" => StepStatus::Expired,
            _ => return None,
        })
    }

    /// For reasons: `drain failed`, `drain was denied`.
    pub fn as_reason(self) -> &'static str {
        match self {
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::TimedOut => "timed out",
            StepStatus::Skipped => "was skipped",
            StepStatus::Error => "could not be run",
            StepStatus::Unavailable => "is not available there",
            StepStatus::Denied => "was denied",
            StepStatus::Expired => "was not approved in time",
        }
    }
}

/// What the run does with a step next ([`next_action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextAction {
    /// Run it (after the caller's role and approval checks).
    Run,
    /// Do not run it; the reason starts with `skipped:`.
    Skip(String),
}

/// The one rule that decides whether a step runs, given what the earlier
/// steps of this run came to (`done`: step name and status, in the order
/// they got them; steps not selected for the run are simply absent). Both
/// the chat runs and `gpuops runbook run` call it.
///
/// - Escalation steps always run (or are offered for approval).
/// - A member of an alternative group runs only while every earlier member
///   of the group was `unavailable`; once one got any other outcome, the
///   group is decided and later members are skipped.
/// - `when: previous_succeeded`: the last step that got an outcome succeeded.
/// - `requires`: every named step (or some member of the named alternative
///   group) succeeded in this run; a name that did not run here is not met.
/// - A mitigation without `when`/`requires` is held back by every earlier
///   mitigation of this run: it is skipped once one of them failed, timed
///   out, was denied, expired or was skipped (the safe default: a reset
///   never follows a drain that did not happen). One that was unavailable
///   (another alternative ran) or could not be run at all (changed nothing)
///   does not hold it back. `requires: []` declares a mitigation
///   independent of the earlier ones.
pub fn next_action(plan: &RunPlan, index: usize, done: &[(String, StepStatus)]) -> NextAction {
    let Some(ps) = plan.steps.get(index) else {
        return NextAction::Skip("skipped: no such step".into());
    };
    let step = &ps.step;
    let status_of = |name: &str| done.iter().rev().find(|(n, _)| n == name).map(|(_, s)| *s);
    let group_of = |name: &str| {
        plan.step(name)
            .and_then(|p| p.step.flow.alternative.clone())
    };
    if let Some(g) = &step.flow.alternative {
        if let Some((m, st)) = done.iter().find(|(n, st)| {
            *st != StepStatus::Unavailable && group_of(n).as_deref() == Some(g.as_str())
        }) {
            return NextAction::Skip(match st {
                StepStatus::Succeeded => format!("skipped: alternative {m} of {g} was used"),
                other => format!(
                    "skipped: {g} was decided by {m}, which {}",
                    other.as_reason()
                ),
            });
        }
    }
    // After a denied (or expired) privileged step or a failed mitigation, a
    // later privileged step asks nobody for approval unless it declares what
    // it depends on (`requires`, checked below; `requires: []` for nothing).
    // A read-only check that exits non-zero (`fuser`: nobody holds the GPU)
    // holds nothing back.
    if step.needs_approval && !step.flow.declared {
        let refused = done.iter().find(|(n, st)| {
            plan.step(n).is_some_and(|p| match st {
                StepStatus::Denied | StepStatus::Expired => {
                    p.step.needs_approval || p.step.phase == Phase::Mitigate
                }
                StepStatus::Failed | StepStatus::TimedOut => p.step.phase == Phase::Mitigate,
                _ => false,
            })
        });
        if let Some((n, st)) = refused {
            return NextAction::Skip(format!("skipped: {n} {}", st.as_reason()));
        }
    }
    if step.phase == Phase::Escalate {
        return NextAction::Run;
    }
    if step.flow.previous_succeeded {
        match done.last() {
            None => return NextAction::Skip("skipped: no earlier step ran in this run".into()),
            Some((n, st)) if *st != StepStatus::Succeeded => {
                return NextAction::Skip(format!("skipped: {n} {}", st.as_reason()))
            }
            Some(_) => {}
        }
    }
    // `requires: [a]`: `a` (or a member of group `a`) succeeded; `a?`: or
    // `a` was not available where it would run.
    let required = step.flow.requires.iter().map(|r| (r, false));
    let if_available = step.flow.requires_if_available.iter().map(|r| (r, true));
    for (r, or_unavailable) in required.chain(if_available) {
        let is_group = plan.step(r).is_none();
        let outcomes: Vec<(&str, StepStatus)> = if is_group {
            done.iter()
                .filter(|(n, _)| group_of(n).as_deref() == Some(r.as_str()))
                .map(|(n, st)| (n.as_str(), *st))
                .collect()
        } else {
            status_of(r)
                .map(|st| (r.as_str(), st))
                .into_iter()
                .collect()
        };
        let met = outcomes.iter().any(|(_, st)| *st == StepStatus::Succeeded)
            || (or_unavailable
                && !outcomes.is_empty()
                && outcomes
                    .iter()
                    .all(|(_, st)| *st == StepStatus::Unavailable));
        if met {
            continue;
        }
        let culprit = outcomes
            .iter()
            .find(|(_, st)| *st != StepStatus::Unavailable)
            .or(outcomes.last());
        return NextAction::Skip(match culprit {
            None => format!("skipped: {r} did not run in this run"),
            Some((n, st)) if is_group && !or_unavailable => {
                format!("skipped: {r} did not succeed ({n} {})", st.as_reason())
            }
            Some((_, st)) => format!("skipped: {r} {}", st.as_reason()),
        });
    }
    if step.phase == Phase::Mitigate && !step.flow.declared {
        let failed = done.iter().find(|(n, st)| {
            matches!(
                st,
                StepStatus::Failed
                    | StepStatus::TimedOut
                    | StepStatus::Denied
                    | StepStatus::Expired
                    | StepStatus::Skipped
            ) && plan
                .step(n)
                .is_some_and(|p| p.step.phase == Phase::Mitigate)
        });
        if let Some((n, st)) = failed {
            return NextAction::Skip(format!("skipped: {n} {}", st.as_reason()));
        }
    }
    NextAction::Run
}

/// The node's state in plain words after a run, from its mitigations'
/// outcomes: each mitigation that ran says its `state_on_success` or
/// `state_on_failure` (or, without them, that it succeeded or failed),
/// from the last one that returned the node to service (`node_state:
/// in_service`) on: what was done before it is the thread's, no longer the
/// node's state; when no mitigation ran: "NODE was not changed; it is
/// still serving jobs".
pub fn node_state(plan: &RunPlan, done: &[(String, StepStatus)]) -> Vec<String> {
    let node = plan
        .params
        .get("node")
        .or_else(|| plan.labels.get("node").map(String::as_str))
        .or_else(|| plan.labels.get("instance").map(String::as_str))
        .unwrap_or("the node")
        .to_string();
    let mut lines = Vec::new();
    for (name, st) in done {
        let Some(ps) = plan.step(name) else { continue };
        if ps.step.phase != Phase::Mitigate {
            continue;
        }
        let (template, fallback) = match st {
            StepStatus::Succeeded => (
                &ps.step.state_on_success,
                format!("{name} succeeded on {node}"),
            ),
            StepStatus::Failed | StepStatus::TimedOut => (
                &ps.step.state_on_failure,
                format!(
                    "{name} {} on {node}: its change may be partly made",
                    st.as_reason()
                ),
            ),
            _ => continue,
        };
        let text = template
            .as_ref()
            .and_then(|t| t.render(&plan.params, Escape::None).ok())
            .unwrap_or(fallback);
        if *st == StepStatus::Succeeded
            && ps.step.node_state == Some(crate::runbook::NodeState::InService)
        {
            lines.clear();
        }
        lines.push(text);
    }
    if lines.is_empty() {
        lines.push(format!("{node} was not changed; it is still serving jobs"));
    }
    lines
}

/// Builds a run plan: resolves parameters (given, then `from_label` alert
/// labels, then defaults; each against its pattern) and renders every step.
pub fn plan(
    runbook: &Runbook,
    given: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Result<RunPlan, ParamErrors> {
    let params = runbook.resolve_params(given, labels)?;
    let mut steps = Vec::new();
    for (index, step) in runbook.steps.iter().enumerate() {
        steps.push(PlannedStep {
            index,
            step: step.clone(),
            rendered: render(step, &params)?,
            approval: None,
            planned_argv: None,
        });
    }
    Ok(RunPlan {
        runbook: runbook.clone(),
        params,
        labels: labels.clone(),
        steps,
    })
}

/// Renders one step with validated parameters.
pub fn render(step: &Step, params: &Params) -> Result<Rendered, ParamErrors> {
    Ok(match &step.action {
        Action::Command { argv } => Rendered::Command {
            argv: argv
                .iter()
                .map(|t| t.render(params, Escape::None))
                .collect::<Result<_, _>>()?,
        },
        Action::Http { method, url, body } => Rendered::Http {
            method: *method,
            url: url.render(params, Escape::Url)?,
            body: body
                .as_ref()
                .map(|b| b.render(params, Escape::Json))
                .transpose()?,
        },
        Action::Promql { query, .. } => Rendered::Promql {
            query: query.render(params, Escape::Promql)?,
        },
    })
}

impl RunPlan {
    /// The planned step called `name`.
    pub fn step(&self, name: &str) -> Option<&PlannedStep> {
        self.steps.iter().find(|s| s.step.name == name)
    }

    /// The planned steps of one phase, in file order.
    pub fn steps_in(&self, phase: Phase) -> impl Iterator<Item = &PlannedStep> {
        self.steps.iter().filter(move |s| s.step.phase == phase)
    }
}

impl Rendered {
    /// One line for a dry run or a chat message: the argv shell-quoted (for
    /// reading only; it is never given to a shell), the request or the query.
    pub fn display(&self) -> String {
        match self {
            Rendered::Command { argv } => argv
                .iter()
                .map(|a| quote_for_display(a))
                .collect::<Vec<_>>()
                .join(" "),
            Rendered::Http { method, url, body } => match body {
                Some(b) => format!("{} {url} {b}", method.as_str()),
                None => format!("{} {url}", method.as_str()),
            },
            Rendered::Promql { query } => format!("promql: {query}"),
        }
    }
}

impl PlannedStep {
    /// A header line: `[2/7] mitigate drain-slurm (node command, 30s, needs approval)`.
    pub fn header(&self, total: usize) -> String {
        let s = &self.step;
        format!(
            "[{}/{}] {} {} ({} {}, {}{})",
            self.index + 1,
            total,
            s.phase.as_str(),
            s.name,
            s.target.as_str(),
            s.kind().as_str(),
            humantime::format_duration(s.timeout),
            if s.needs_approval {
                ", needs approval"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_vector_formats_one_series_a_line() {
        let (ok, text) = format_promql_response(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"__name__":"up","instance":"n1:9949"},"value":[1,"1"]}]}}"#,
        );
        assert!(ok);
        assert_eq!(text, "up{instance=\"n1:9949\"} 1\n");
        let (ok, text) = format_promql_response(
            r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        );
        assert!(!ok);
        assert_eq!(text, "query failed: bad_data parse error");
    }

    #[tokio::test]
    async fn bot_without_agents_reports_node_steps_unavailable() {
        let cfg = crate::config::BotConfig::default();
        let exec = Executor::for_bot(&cfg);
        let rb = crate::runbook::parse_runbook(
            std::path::Path::new("t.yaml"),
            "id: t\ntitle: T\nsteps:\n- {name: a, phase: investigate, kind: command, target: node, run: [uptime]}\n",
        )
        .unwrap();
        let plan = plan(&rb, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        let out = exec.execute(&plan, &plan.steps[0]).await;
        assert_eq!(out.status, StepStatus::Error);
        assert!(out.output.contains("[agents]"), "{}", out.output);
    }

    const FLOW: &str = r#"
id: t
title: T
params:
  node: { pattern: '[a-z0-9]+', default: n1 }
steps:
- {name: look, phase: investigate, kind: command, target: node, run: [uptime]}
- {name: drain-slurm, phase: mitigate, kind: command, target: node, run: [scontrol], alternative: drain, only_if_exists: /usr/bin/scontrol, needs_approval: true, state_on_success: "{{node}} is drained", state_on_failure: "{{node}} is NOT drained: drain failed"}
- {name: drain-k8s, phase: mitigate, kind: command, target: bot, run: [kubectl], alternative: drain, needs_approval: true, state_on_success: "{{node}} is cordoned"}
- {name: reset, phase: mitigate, kind: command, target: node, run: [nvidia-smi], requires: [drain], needs_approval: true, state_on_success: "{{node}} has a freshly reset GPU"}
- {name: check, phase: mitigate, kind: command, target: node, run: [nvidia-smi], when: previous_succeeded}
- {name: clear, phase: mitigate, kind: command, target: node, run: [echo]}
- {name: independent, phase: mitigate, kind: command, target: node, run: [echo], requires: []}
- {name: page, phase: escalate, kind: command, target: bot, run: [echo]}
"#;

    const PRIVILEGED_FLOW: &str = r#"
id: t
title: T
steps:
- {name: drain, phase: mitigate, kind: command, target: node, run: [scontrol], needs_approval: true}
- {name: holders, phase: investigate, kind: command, target: node, run: [fuser], needs_approval: true}
- {name: own-check, phase: investigate, kind: command, target: node, run: [fuser], needs_approval: true, requires: []}
- {name: after-drain, phase: mitigate, kind: command, target: node, run: [echo], needs_approval: true, requires: [drain]}
- {name: look, phase: investigate, kind: command, target: node, run: [uptime]}
- {name: bug-report, phase: escalate, kind: command, target: node, run: [nvidia-bug-report.sh], needs_approval: true}
- {name: page, phase: escalate, kind: command, target: bot, run: [echo]}
"#;

    /// Issue 22, observation 5: after a denied drain the run still asked an
    /// admin to approve `holders` (`fuser` as root).
    #[test]
    fn after_a_denied_drain_no_privileged_step_asks_for_approval() {
        use StepStatus::*;
        let rb =
            crate::runbook::parse_runbook(std::path::Path::new("t.yaml"), PRIVILEGED_FLOW).unwrap();
        let plan = plan(&rb, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        for st in [Denied, Failed, TimedOut, Expired] {
            let done = vec![("drain".to_string(), st)];
            let got: Vec<String> = plan.steps[1..]
                .iter()
                .map(|s| format!("{}: {:?}", s.step.name, next_action(&plan, s.index, &done)))
                .collect();
            let reason = st.as_reason();
            assert_eq!(
                got,
                vec![
                    format!("holders: Skip(\"skipped: drain {reason}\")"),
                    "own-check: Run".to_string(),
                    format!("after-drain: Skip(\"skipped: drain {reason}\")"),
                    "look: Run".to_string(),
                    format!("bug-report: Skip(\"skipped: drain {reason}\")"),
                    "page: Run".to_string(),
                ],
                "{st:?}"
            );
        }
        // A privileged read-only check that exits non-zero (`fuser` finding
        // nobody) holds nothing back; denying it does.
        let done = vec![("holders".to_string(), Failed)];
        assert_eq!(next_action(&plan, 5, &done), NextAction::Run);
        let done = vec![("holders".to_string(), Denied)];
        assert_eq!(
            next_action(&plan, 5, &done),
            NextAction::Skip("skipped: holders was denied".into())
        );
        // A drain that succeeded (or was unavailable) holds nothing back.
        for st in [Succeeded, Unavailable] {
            let done = vec![("drain".to_string(), st)];
            assert_eq!(next_action(&plan, 1, &done), NextAction::Run, "{st:?}");
            assert_eq!(next_action(&plan, 5, &done), NextAction::Run, "{st:?}");
        }
    }

    /// A failed DCGM diagnostic let the return to service go ahead (its
    /// failure text said the node stays drained): `verify-dcgm?` holds the
    /// resume back unless the diagnostic passed or dcgmi is not installed.
    #[test]
    fn failed_dcgm_diagnostic_holds_back_the_return_to_service() {
        use StepStatus::*;
        const RB: &str = r#"
id: t
title: T
steps:
- {name: verify-gpu, phase: mitigate, kind: command, target: node, run: [nvidia-smi], requires: []}
- {name: verify-dcgm, phase: mitigate, kind: command, target: node, run: [dcgmi], requires: [verify-gpu]}
- {name: resume, phase: mitigate, kind: command, target: node, run: [scontrol], requires: [verify-gpu, verify-dcgm?]}
"#;
        let rb = crate::runbook::parse_runbook(std::path::Path::new("t.yaml"), RB).unwrap();
        assert_eq!(rb.steps[2].flow.requires_if_available, vec!["verify-dcgm"]);
        let plan = plan(&rb, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        let resume = |dcgm: Option<StepStatus>| {
            let mut done = vec![("verify-gpu".to_string(), Succeeded)];
            done.extend(dcgm.map(|st| ("verify-dcgm".to_string(), st)));
            next_action(&plan, 2, &done)
        };
        assert_eq!(resume(Some(Succeeded)), NextAction::Run);
        assert_eq!(resume(Some(Unavailable)), NextAction::Run);
        for st in [Failed, TimedOut, Error, Skipped, Denied, Expired] {
            assert_eq!(
                resume(Some(st)),
                NextAction::Skip(format!("skipped: verify-dcgm {}", st.as_reason())),
                "{st:?}"
            );
        }
        assert_eq!(
            resume(None),
            NextAction::Skip("skipped: verify-dcgm did not run in this run".into())
        );
        // A `?` name is checked like any other: it must exist and come first.
        let bad = RB.replace("verify-dcgm?]", "verify-dcmg?]");
        let err = crate::runbook::parse_runbook(std::path::Path::new("t.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown step \"verify-dcmg\""), "{err}");
    }

    fn flow_check(done: &[(&str, StepStatus)], expect: expect_test::Expect) {
        let rb = crate::runbook::parse_runbook(std::path::Path::new("t.yaml"), FLOW).unwrap();
        let plan = plan(&rb, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        let done: Vec<(String, StepStatus)> =
            done.iter().map(|(n, s)| (n.to_string(), *s)).collect();
        let mut out = String::new();
        for s in &plan.steps {
            if done.iter().any(|(n, _)| *n == s.step.name) {
                continue;
            }
            let _ = writeln!(
                out,
                "{}: {:?}",
                s.step.name,
                next_action(&plan, s.index, &done)
            );
        }
        let _ = write!(out, "state: {}", node_state(&plan, &done).join("; "));
        expect.assert_eq(&out);
    }

    #[test]
    fn next_action_follows_dependencies_alternatives_and_failures() {
        use expect_test::expect;
        use StepStatus::*;
        flow_check(
            &[("look", Succeeded), ("drain-slurm", Failed)],
            expect![[r#"
                drain-k8s: Skip("skipped: drain was decided by drain-slurm, which failed")
                reset: Skip("skipped: drain did not succeed (drain-slurm failed)")
                check: Skip("skipped: drain-slurm failed")
                clear: Skip("skipped: drain-slurm failed")
                independent: Run
                page: Run
                state: n1 is NOT drained: drain failed"#]],
        );
        flow_check(
            &[("look", Succeeded), ("drain-slurm", Unavailable)],
            expect![[r#"
                drain-k8s: Run
                reset: Skip("skipped: drain did not succeed (drain-slurm is not available there)")
                check: Skip("skipped: drain-slurm is not available there")
                clear: Run
                independent: Run
                page: Run
                state: n1 was not changed; it is still serving jobs"#]],
        );
        flow_check(
            &[("look", Succeeded), ("drain-slurm", Denied)],
            expect![[r#"
                drain-k8s: Skip("skipped: drain was decided by drain-slurm, which was denied")
                reset: Skip("skipped: drain did not succeed (drain-slurm was denied)")
                check: Skip("skipped: drain-slurm was denied")
                clear: Skip("skipped: drain-slurm was denied")
                independent: Run
                page: Run
                state: n1 was not changed; it is still serving jobs"#]],
        );
        flow_check(
            &[
                ("look", Succeeded),
                ("drain-slurm", Unavailable),
                ("drain-k8s", Succeeded),
                ("reset", Succeeded),
            ],
            expect![[r#"
                check: Run
                clear: Run
                independent: Run
                page: Run
                state: n1 is cordoned; n1 has a freshly reset GPU"#]],
        );
        flow_check(
            &[],
            expect![[r#"
                look: Run
                drain-slurm: Run
                drain-k8s: Run
                reset: Skip("skipped: drain did not run in this run")
                check: Skip("skipped: no earlier step ran in this run")
                clear: Run
                independent: Run
                page: Run
                state: n1 was not changed; it is still serving jobs"#]],
        );
    }

    /// Issue 24's full loop: after drain, reboot, verify and resume, the
    /// run's summary said "Node state: n1 is drained: no new jobs land on
    /// it; …; n1 is back in service", the first clause false by then.
    #[test]
    fn node_state_after_a_return_to_service_says_only_that_it_is_back() {
        use StepStatus::*;
        const RB: &str = r#"
id: t
title: T
params:
  node: { pattern: '[a-z0-9]+', default: n1 }
steps:
- {name: drain, phase: mitigate, kind: command, target: node, run: [scontrol], needs_approval: true, node_state: quarantined, state_on_success: "{{node}} is drained: no new jobs land on it"}
- {name: reboot, phase: mitigate, kind: command, target: node, run: [systemctl], requires: [drain], needs_approval: true, node_state: verifying, state_on_success: "{{node}} was drained and is rebooting"}
- {name: verify, phase: mitigate, kind: command, target: node, run: [nvidia-smi], requires: [reboot]}
- {name: resume, phase: mitigate, kind: command, target: node, run: [scontrol], requires: [verify], needs_approval: true, node_state: in_service, state_on_success: "{{node}} is back in service"}
- {name: page, phase: escalate, kind: command, target: bot, run: [echo]}
"#;
        let rb = crate::runbook::parse_runbook(std::path::Path::new("t.yaml"), RB).unwrap();
        let plan = plan(&rb, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        let state = |done: &[(&str, StepStatus)]| {
            let done: Vec<(String, StepStatus)> =
                done.iter().map(|(n, s)| (n.to_string(), *s)).collect();
            node_state(&plan, &done)
        };
        let out = [
            ("drain", Succeeded),
            ("reboot", Succeeded),
            ("verify", Succeeded),
        ];
        assert_eq!(
            state(&out),
            [
                "n1 is drained: no new jobs land on it",
                "n1 was drained and is rebooting",
                "verify succeeded on n1"
            ]
        );
        let mut back = out.to_vec();
        back.extend([("resume", Succeeded), ("page", Succeeded)]);
        assert_eq!(state(&back), ["n1 is back in service"]);
        // A resume that failed leaves the whole story.
        let mut failed = out.to_vec();
        failed.push(("resume", Failed));
        assert_eq!(state(&failed).len(), 4);
    }

    #[test]
    fn hostports() {
        assert!(is_hostport("n1:9949"));
        assert!(is_hostport("10.0.0.1:9949"));
        assert!(is_hostport("[::1]:9949"));
        assert!(!is_hostport("evil.com/x?:1"));
        assert!(!is_hostport("a@b:1"));
        assert!(!is_hostport("n1"));
        assert!(!is_hostport("n1:0"));
    }

    #[test]
    fn display_quotes_only_for_reading() {
        assert_eq!(
            Rendered::Command {
                argv: vec!["echo".into(), "a b".into(), "it's".into(), "x=1".into()]
            }
            .display(),
            "echo 'a b' 'it'\\''s' x=1"
        );
    }
}
