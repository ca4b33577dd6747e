//! The agent's `POST /v1/plan`: what one step of one of the node's
//! runbooks would run here, without running it. Authenticated exactly like
//! `/v1/exec` (the same checks, in the same order) but on a request signed
//! for planning (`purpose: plan`): an exec-signed request is refused here
//! and a plan-signed one by `/v1/exec`.
//!
//! It answers a [`StepPlan`]: `available`, the argv resolved on this node's
//! search path (exactly what `/v1/exec` runs and the digest it checks),
//! `reason` when the step cannot run (binary not found, `only_if_exists`
//! path missing, sudo refusing), `sudo` (for a sudo argv: the one command a
//! plan runs, `sudo -n -l <command>`, through the [`CommandRunner`] with a
//! 5 s timeout; it runs nothing privileged) and, for a `releases_gpu` step,
//! the other processes holding NVML ([`NVML_HOLDERS`], read from procfs,
//! bounded).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::exec_auth::Purpose;
use crate::host::HostRoots;
use crate::runbook::agent_exec::{
    check_request, refuse, resolve_here, Checked, ExecState, MAX_CONCURRENT, READ_DEADLINE,
};
use crate::runbook::engine::{GpuHolder, StepPlan};
use crate::runbook::exec::resolve::{is_sudo, sudo_list_argv};
use crate::runbook::exec::CommandSpec;
use crate::signing::Clock;

/// Processes that hold NVML besides the agent (their full names; a
/// `/proc/<pid>/comm` holds at most the first 15 bytes).
pub const NVML_HOLDERS: &[&str] = &[
    "nvidia-persistenced",
    "nv-hostengine",
    "nvidia-fabricmanager",
    "nv-fabricmanager",
    "dcgm-exporter",
];
/// Timeout of the plan's `sudo -n -l` check.
pub const SUDO_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most `/proc` entries looked at for holders.
const MAX_PROC_ENTRIES: usize = 65_536;

pub(crate) async fn handle<C: Clock + 'static>(
    State(state): State<Arc<ExecState<C>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Checked {
        runbook,
        step,
        argv,
        ..
    } = match check_request(&state, &headers, body, Purpose::Plan).await {
        Ok(c) => c,
        Err(refused) => return refused,
    };
    let node = state.verifier.node().to_string();
    let mut plan = StepPlan::unavailable(&argv, "");
    plan.node = Some(node.clone());
    if let Some(path) = &step.flow.only_if_exists {
        if !crate::host::path_exists(std::path::Path::new(path)) {
            plan.reason = Some(format!("only_if_exists path {path} missing on {node}"));
            return answer(&runbook.id, &step.name, plan);
        }
    }
    match resolve_here(&state, &argv).await {
        Ok(Ok(resolved)) => plan.argv = resolved,
        Ok(Err(why)) => {
            plan.reason = Some(why);
            return answer(&runbook.id, &step.name, plan);
        }
        Err(refused) => return refused,
    }
    if plan.argv.first().is_some_and(|a| is_sudo(a)) {
        let Ok(_permit) = state.slots.try_acquire() else {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{MAX_CONCURRENT} steps are already running"),
            );
        };
        match sudo_check(&state, &plan.argv).await {
            Ok(()) => plan.sudo = Some("allowed".into()),
            Err(why) => {
                plan.sudo = Some(why.clone());
                plan.reason = Some(format!("sudo refuses: {why}"));
                return answer(&runbook.id, &step.name, plan);
            }
        }
    }
    if step.releases_gpu {
        let procfs = state.procfs.clone();
        let task = tokio::task::spawn_blocking(move || nvml_holders(&procfs));
        match tokio::time::timeout(READ_DEADLINE, task).await {
            Ok(Ok(h)) => plan.holders = h,
            _ => tracing::warn!("cannot list the NVML holders in time"),
        }
    }
    plan.available = true;
    plan.reason = None;
    answer(&runbook.id, &step.name, plan)
}

fn answer(runbook: &str, step: &str, plan: StepPlan) -> Response {
    tracing::info!(
        runbook = %runbook,
        step = %step,
        available = plan.available,
        argv = ?plan.argv,
        reason = %plan.reason_text(),
        "step planned"
    );
    (StatusCode::OK, Json(plan)).into_response()
}

/// `sudo -n -l <command>`: `Ok` when sudo would run it without a password,
/// else the first line of what sudo said.
async fn sudo_check<C: Clock>(state: &ExecState<C>, resolved: &[String]) -> Result<(), String> {
    let Some(argv) = sudo_list_argv(resolved) else {
        return Err("sudo is given no command to run".into());
    };
    let spec = CommandSpec {
        argv,
        timeout: SUDO_CHECK_TIMEOUT,
        output_cap: 4096,
    };
    match state.runner.run(&spec).await {
        Ok(out) if out.exit_code == Some(0) && !out.timed_out => Ok(()),
        Ok(out) if out.timed_out => Err(format!(
            "no answer within {}s",
            SUDO_CHECK_TIMEOUT.as_secs()
        )),
        Ok(out) => {
            let first = out
                .stderr
                .lines()
                .chain(out.stdout.lines())
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(|l| crate::escape::line(l).to_string());
            Err(first.unwrap_or_else(|| match out.exit_code {
                Some(c) => format!("exit {c}"),
                None => "killed".into(),
            }))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Processes under `procfs` other than this one whose `comm` is one of
/// [`NVML_HOLDERS`] (blocking; reads at most [`MAX_PROC_ENTRIES`] entries).
pub fn nvml_holders(procfs: &std::path::Path) -> Vec<GpuHolder> {
    let roots = HostRoots {
        procfs: PathBuf::from(procfs),
        ..HostRoots::default()
    };
    let me = std::process::id();
    let Ok(entries) = roots.list_dir(procfs) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in entries.iter().take(MAX_PROC_ENTRIES) {
        let Ok(pid) = name.parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(comm) = roots.read_proc(&format!("{pid}/comm")) else {
            continue;
        };
        let comm = comm.trim();
        if let Some(full) = NVML_HOLDERS
            .iter()
            .find(|h| **h == comm || (comm.len() == 15 && h.starts_with(comm)))
        {
            out.push(GpuHolder {
                process: full.to_string(),
                pid,
            });
        }
    }
    out.sort_by_key(|h| h.pid);
    out
}
