//! A step's plan, asked for before anyone is asked to approve it: where it
//! runs, the exact (resolved) argv, whether it can run there at all
//! (binary on the PATH, `only_if_exists`, `sudo -n -l`), and for a
//! `releases_gpu` step the other NVML holders on the node. Node steps are
//! planned by their agent (`POST /v1/plan`, signed for planning only);
//! bot-side and local steps here, with the same resolution
//! ([`crate::runbook::exec::resolve`]). PromQL and HTTP steps need none.

use std::time::Duration;
#[cfg(feature = "bot")]
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[cfg(feature = "bot")]
use crate::exec_auth::ExecSigner;
#[cfg(feature = "bot")]
use crate::runbook::engine::executor::{cap_text, read_text_capped};
use crate::runbook::engine::*;
use crate::runbook::exec::resolve::{resolve_argv, SearchPath};
use crate::runbook::{Step, StepTarget};

/// Deadline for an agent's plan answer (its `sudo -n -l` has 5 s).
pub const PLAN_TIMEOUT: Duration = Duration::from_secs(15);

/// What a step will run and whether it can (`/v1/plan`'s answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    pub available: bool,
    /// The argv that runs (resolved to absolute paths); empty for a step
    /// that is not a command.
    #[serde(default)]
    pub argv: Vec<String>,
    /// Why it cannot run, when not available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a sudo argv: `allowed`, or sudo's refusal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sudo: Option<String>,
    /// For a `releases_gpu` step: other processes holding NVML on the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<GpuHolder>,
    /// The node it runs on; `None` where the caller runs it (the bot, or
    /// this host for `gpuops runbook run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The plan itself could not be made (agent unreachable, refused, too
    /// old to plan): the step is an error, never run unplanned.
    #[serde(skip)]
    pub failed: bool,
}

/// A process other than the agent that holds the GPU driver's NVML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuHolder {
    pub process: String,
    pub pid: u32,
}

impl StepPlan {
    /// A step that needs no plan (PromQL, HTTP), or a test executor's
    /// default: the rendered argv, available.
    pub fn assumed(rendered: &Rendered) -> StepPlan {
        StepPlan {
            available: true,
            argv: match rendered {
                Rendered::Command { argv } => argv.clone(),
                _ => Vec::new(),
            },
            reason: None,
            sudo: None,
            holders: Vec::new(),
            node: None,
            failed: false,
        }
    }

    /// Cannot run: `reason`.
    pub fn unavailable(argv: &[String], reason: impl Into<String>) -> StepPlan {
        StepPlan {
            available: false,
            argv: argv.to_vec(),
            reason: Some(reason.into()),
            ..StepPlan::assumed(&Rendered::Command { argv: Vec::new() })
        }
    }

    /// Could not be planned at all: `why` (an error outcome).
    pub fn failed(why: impl Into<String>) -> StepPlan {
        StepPlan {
            failed: true,
            ..StepPlan::unavailable(&[], why)
        }
    }

    /// The reason, or an empty string.
    pub fn reason_text(&self) -> &str {
        self.reason.as_deref().unwrap_or("")
    }

    /// "also holding the GPU: nvidia-persistenced (pid 812), nv-hostengine
    /// (pid 990)", or `None`.
    pub fn holders_text(&self) -> Option<String> {
        if self.holders.is_empty() {
            return None;
        }
        Some(format!(
            "also holding the GPU: {}",
            self.holders
                .iter()
                .map(|h| format!("{} (pid {})", h.process, h.pid))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    }

    /// Where it runs, in words: `node gpu-node-17` or `the bot`.
    pub fn runs_on(&self, step: &Step) -> String {
        match (&self.node, step.target) {
            (Some(n), _) => format!("node {n}"),
            (None, StepTarget::Bot) => "the bot".into(),
            (None, StepTarget::Node) => "this host".into(),
        }
    }

    /// The code block an approval request shows: the planned argv, where it
    /// runs, sudo's answer and the GPU's other holders.
    pub fn approval_block(&self, step: &Step, rendered: &Rendered) -> String {
        let what = if self.argv.is_empty() {
            rendered.display()
        } else {
            Rendered::Command {
                argv: self.argv.clone(),
            }
            .display()
        };
        let mut out = format!("{what}\n# runs on {}", self.runs_on(step));
        if let Some(s) = &self.sudo {
            out.push_str(&format!("\n# sudo -n -l: {s}"));
        }
        if let Some(h) = self.holders_text() {
            out.push_str(&format!("\n# {h}"));
        }
        out
    }
}

/// Plans a command step on this machine: `only_if_exists`, then the argv
/// resolved on `path`. `where_` names this machine in reasons (`the bot`).
pub fn plan_here(step: &PlannedStep, path: &SearchPath, where_: &str) -> StepPlan {
    let Rendered::Command { argv } = &step.rendered else {
        return StepPlan::assumed(&step.rendered);
    };
    if let Some(p) = &step.step.flow.only_if_exists {
        if !crate::host::path_exists(std::path::Path::new(p)) {
            return StepPlan::unavailable(
                argv,
                format!("only_if_exists path {p} missing on {where_}"),
            );
        }
    }
    match resolve_argv(argv, path) {
        Ok(resolved) => StepPlan {
            argv: resolved,
            ..StepPlan::assumed(&step.rendered)
        },
        Err(e) => StepPlan::unavailable(argv, e.reason_on(where_)),
    }
}

#[cfg(feature = "bot")]
impl AgentClient {
    /// Asks the node's agent for a node step's plan (`POST /v1/plan`,
    /// signed for planning only). An agent without `/v1/plan` (404) is an
    /// older version: the plan fails and the step is never run unplanned.
    pub async fn plan(&self, plan: &RunPlan, step: &PlannedStep) -> StepPlan {
        let agent = match self.target(plan).await {
            Ok(a) => a,
            Err(why) => return StepPlan::failed(why),
        };
        let req = ExecSigner::plan_request(
            &agent.node,
            &plan.runbook.id,
            &step.step.name,
            plan.params.as_map().clone(),
            signing::SystemClock.now_unix(),
        );
        let base = agent.url.trim_end_matches('/').to_string();
        let start = Instant::now();
        let resp = match self.send(&base, "/v1/plan", &req, PLAN_TIMEOUT).await {
            Ok(r) => r,
            Err(e) => return StepPlan::failed(e),
        };
        let status = resp.status();
        let (text, _) = read_text_capped(resp, 1024 * 1024).await;
        if status == reqwest::StatusCode::NOT_FOUND && !text.contains("runbook") {
            return StepPlan::failed(format!(
                "the agent at {base} does not know POST /v1/plan (an older gpuops agent than this bot): upgrade it; the step is not run unplanned"
            ));
        }
        if !status.is_success() {
            let (text, _) = cap_text(text, 2048);
            return StepPlan::failed(format!(
                "agent at {base} refused the plan: HTTP {}: {}",
                status.as_u16(),
                text.trim()
            ));
        }
        match serde_json::from_str::<StepPlan>(&text) {
            Ok(mut p) => {
                p.node = Some(agent.node);
                tracing::debug!(step = %step.step.name, available = p.available, duration_seconds = start.elapsed().as_secs_f64(), "step planned");
                p
            }
            Err(e) => StepPlan::failed(format!("agent at {base} sent an unreadable plan: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approval_block_shows_the_planned_argv_where_it_runs_sudo_and_holders() {
        let rb = crate::runbook::parse_runbook(
            std::path::Path::new("t.yaml"),
            "id: t\ntitle: T\nsteps:\n  - { name: reset, phase: investigate, kind: command, target: node, releases_gpu: true, run: [sudo, -n, nvidia-smi, -r] }\n",
        )
        .unwrap();
        let step = &rb.steps[0];
        let rendered = Rendered::Command {
            argv: vec!["sudo".into(), "-n".into(), "nvidia-smi".into(), "-r".into()],
        };
        let mut p = StepPlan::assumed(&rendered);
        p.argv = vec![
            "/usr/bin/sudo".into(),
            "-n".into(),
            "/usr/bin/nvidia-smi".into(),
            "-r".into(),
        ];
        p.node = Some("gpu-node-17".into());
        p.sudo = Some("allowed".into());
        p.holders = vec![
            GpuHolder {
                process: "nvidia-persistenced".into(),
                pid: 812,
            },
            GpuHolder {
                process: "nv-hostengine".into(),
                pid: 990,
            },
        ];
        assert_eq!(
            p.approval_block(step, &rendered),
            "/usr/bin/sudo -n /usr/bin/nvidia-smi -r\n# runs on node gpu-node-17\n# sudo -n -l: allowed\n# also holding the GPU: nvidia-persistenced (pid 812), nv-hostengine (pid 990)"
        );
    }
}
