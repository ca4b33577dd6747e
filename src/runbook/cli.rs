//! `gpuops runbook check | list | run`: the command-line face of the runbook
//! engine. Printing and prompting live here; validation and execution do not.
//!
//! `run` executes on this machine: node and bot command steps alike go
//! through the real [`ProcessRunner`]; promql steps need
//! `GPUOPS_PROMETHEUS_URL` and are skipped with a note without it.
//! Steps with `needs_approval` are confirmed on a terminal; without a
//! terminal they are refused unless `--yes` is given (the other steps still
//! run). Which step runs next is decided by [`engine::next_action`], the
//! same rule as in chat (`when`, `requires`, alternatives; a failed or
//! declined mitigation holds back the later ones that declare no
//! dependencies; escalation always runs).
//! Each step is planned before it is confirmed or run: its binaries are
//! resolved by name (`runbook::exec::resolve`), the resolved argv is shown
//! and is what runs, and a step whose binary is missing here is reported
//! and marked unavailable without asking.
//! `--step NAME` runs only the named steps. The run ends with the node's
//! state in plain words ([`engine::node_state`]). The exit status is
//! non-zero when any step did not succeed. A runbook's `node` parameter,
//! when not given, is this host's short name (`uname -n` up to the first dot);
//! an `instance` parameter naming another host is then refused: the only
//! agent this command knows is this host's.

use std::collections::BTreeMap;
use std::io::{BufRead as _, IsTerminal as _, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;

use crate::cli::{RunbookCommand, RunbookRunArgs};
use crate::runbook::engine::{self, Executor, NodeSteps, StepExecutor as _, StepStatus};
use crate::runbook::exec::ProcessRunner;
use crate::runbook::RunbookSet;

/// Environment variable naming Prometheus for promql steps run from the CLI.
pub const PROMETHEUS_URL_ENV: &str = "GPUOPS_PROMETHEUS_URL";

/// Dispatches `gpuops runbook ...`.
pub fn cli(cmd: RunbookCommand) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let result = match cmd {
        RunbookCommand::Check { dir } => check(&mut out, &dir),
        RunbookCommand::List { dir } => list(&mut out, &default_dir(dir)),
        RunbookCommand::Run(args) => run(&mut out, args),
    };
    // A closed pipe (`| head`) ends the output quietly.
    match result {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::FAILURE)
        }
        other => other,
    }
}

/// `--dir`, else `./runbooks` if it exists, else the packaged directory.
pub fn default_dir(dir: Option<PathBuf>) -> PathBuf {
    dir.unwrap_or_else(|| {
        let local = PathBuf::from("runbooks");
        if local.is_dir() {
            local
        } else {
            PathBuf::from("/usr/share/gpuops/runbooks")
        }
    })
}

fn check(out: &mut impl Write, dir: &Path) -> anyhow::Result<ExitCode> {
    let (set, errors) = RunbookSet::load_dir(dir);
    for e in &errors.0 {
        eprintln!("{e}");
    }
    if errors.0.is_empty() {
        if set.runbooks.is_empty() {
            eprintln!("{}: no runbooks (*.yaml) found", dir.display());
            return Ok(ExitCode::FAILURE);
        }
        writeln!(
            out,
            "{}: {} runbooks ok, {} steps",
            dir.display(),
            set.runbooks.len(),
            set.runbooks.iter().map(|r| r.steps.len()).sum::<usize>()
        )?;
        Ok(ExitCode::SUCCESS)
    } else {
        let n = errors.0.len();
        eprintln!(
            "{}: {n} error{}",
            dir.display(),
            if n == 1 { "" } else { "s" }
        );
        Ok(ExitCode::FAILURE)
    }
}

fn list(out: &mut impl Write, dir: &Path) -> anyhow::Result<ExitCode> {
    let (set, errors) = RunbookSet::load_dir(dir);
    for e in &errors.0 {
        eprintln!("warning: {e}");
    }
    let width = set.runbooks.iter().map(|r| r.id.len()).max().unwrap_or(0);
    for r in &set.runbooks {
        let triggers = r
            .triggers
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" or ");
        writeln!(out, "{:width$}  {}  [{}]", r.id, r.title, triggers)?;
    }
    Ok(if errors.0.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The parameter that names the node a runbook acts on.
pub const NODE_PARAM: &str = "node";

/// This host's short name (the kernel's nodename up to the first dot), the
/// `node` of a runbook run on the node itself. `None` when it cannot be read
/// or is empty.
pub fn local_node_name() -> Option<String> {
    let full = sysinfo::System::host_name().ok()?;
    short_host_name(&full)
}

/// `gpu-node-07.dc1.example` -> `gpu-node-07`; `None` for an empty name.
pub fn short_host_name(full: &str) -> Option<String> {
    let short = full.trim().split('.').next().unwrap_or("");
    (!short.is_empty()).then(|| short.to_string())
}

/// The parameter that names the agent (`host:port`) a runbook acts through.
pub const INSTANCE_PARAM: &str = "instance";

/// Whether `instance` (`host:port`, or a bare host) is the agent on this
/// host, whose full name is `full`: loopback, or this host's name (full or
/// short).
pub fn is_this_host(instance: &str, full: &str) -> bool {
    let host = match instance.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => instance,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host == "::1" || host.starts_with("127.") {
        return true;
    }
    let full = full.trim();
    !full.is_empty()
        && (host.eq_ignore_ascii_case(full)
            || short_host_name(full).is_some_and(|s| host.eq_ignore_ascii_case(&s)))
}

/// Parses `k=v` arguments.
pub fn parse_param_args(args: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for a in args {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("--param {a:?}: expected name=value"))?;
        if out.insert(k.to_string(), v.to_string()).is_some() {
            anyhow::bail!("--param {k} given twice");
        }
    }
    Ok(out)
}

fn run(out: &mut impl Write, args: RunbookRunArgs) -> anyhow::Result<ExitCode> {
    let dir = default_dir(args.dir.clone());
    let (set, errors) = RunbookSet::load_dir(&dir);
    let Some(runbook) = set.get(&args.id) else {
        for e in &errors.0 {
            eprintln!("{e}");
        }
        anyhow::bail!("no valid runbook {:?} in {}", args.id, dir.display());
    };
    let mut given = parse_param_args(&args.params)?;
    // On a node, `node` is this host unless given (its pattern still applies).
    // An `instance` of another host is not in this command's inventory.
    let mut node_from_host = false;
    let mut unknown_instance = None;
    if runbook.param(NODE_PARAM).is_some() && !given.contains_key(NODE_PARAM) {
        if let Some(instance) = given.get(INSTANCE_PARAM) {
            let full = sysinfo::System::host_name().unwrap_or_default();
            if !is_this_host(instance, &full) {
                unknown_instance = Some(instance.clone());
            }
        }
        if let Some(host) = local_node_name() {
            given.insert(NODE_PARAM.to_string(), host);
            node_from_host = true;
        }
    }
    let plan = engine::plan(runbook, &given, &BTreeMap::new()).map_err(|e| {
        let hint = if node_from_host && e.0.iter().any(|p| p.param == NODE_PARAM) {
            " (node is this host's name unless given: add -p node=NAME)"
        } else {
            ""
        };
        anyhow::anyhow!("runbook {}: refused: {e}{hint}", runbook.id)
    })?;
    // Checked after the parameters (their refusals come first); the plan's
    // `node` (this host) is never used then.
    if let Some(instance) = unknown_instance {
        anyhow::bail!(
            "runbook {}: instance={instance} is not in the inventory of `gpuops runbook run`, which holds only the agent on this host (localhost:PORT or this host's name): run it on that node, or give -p node=NAME for the node {instance} is",
            runbook.id
        );
    }
    if let Some(bad) = args.step.iter().find(|n| runbook.step(n).is_none()) {
        anyhow::bail!(
            "runbook {} has no step {bad:?}; its steps: {}",
            runbook.id,
            runbook
                .steps
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let total = plan.steps.len();
    writeln!(out, "runbook {}: {}", runbook.id, runbook.title)?;
    for (k, v) in plan.params.iter() {
        if k == NODE_PARAM && node_from_host {
            writeln!(out, "  {k}={v} (this host)")?;
        } else {
            writeln!(out, "  {k}={v}")?;
        }
    }
    if args.dry_run {
        for s in plan
            .steps
            .iter()
            .filter(|s| selected(&args.step, &s.step.name))
        {
            writeln!(out, "{}", s.header(total))?;
            writeln!(out, "    {}", s.rendered.display())?;
        }
        writeln!(out, "dry run: nothing was run")?;
        return Ok(ExitCode::SUCCESS);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let prometheus = std::env::var(PROMETHEUS_URL_ENV)
        .ok()
        .filter(|s| !s.trim().is_empty());
    let executor = Executor::new(Arc::new(ProcessRunner), NodeSteps::Local, prometheus);
    let interactive = std::io::stdin().is_terminal();
    let mut failures = 0usize;
    let mut ran = 0usize;
    let mut done: Vec<(String, StepStatus)> = Vec::new();
    for s in plan
        .steps
        .iter()
        .filter(|s| selected(&args.step, &s.step.name))
    {
        ran += 1;
        writeln!(out, "{}", s.header(total))?;
        if let engine::NextAction::Skip(why) = engine::next_action(&plan, s.index, &done) {
            writeln!(out, "    $ {}", s.rendered.display())?;
            writeln!(out, "    {why}")?;
            failures += 1;
            done.push((s.step.name.clone(), StepStatus::Skipped));
            continue;
        }
        // Planned first: the argv shown (and asked about) is the resolved
        // one that runs; a binary that is missing here is never asked about.
        let step_plan = rt.block_on(executor.plan(&plan, s));
        if step_plan.failed || !step_plan.available {
            writeln!(out, "    $ {}", s.rendered.display())?;
            writeln!(out, "    not run: {}", step_plan.reason_text())?;
            let status = if step_plan.failed {
                failures += 1;
                StepStatus::Error
            } else {
                StepStatus::Unavailable
            };
            writeln!(out, "    -> {}", status.as_str())?;
            done.push((s.step.name.clone(), status));
            continue;
        }
        let mut planned = s.clone();
        if !step_plan.argv.is_empty() {
            planned.planned_argv = Some(step_plan.argv.clone());
        }
        let s = &planned;
        match &s.planned_argv {
            Some(argv) => writeln!(
                out,
                "    $ {}",
                engine::Rendered::Command { argv: argv.clone() }.display()
            )?,
            None => writeln!(out, "    $ {}", s.rendered.display())?,
        }
        if let Some(h) = step_plan.holders_text() {
            writeln!(out, "    {h}")?;
        }
        if s.step.needs_approval && !args.yes {
            let approved = if interactive {
                confirm(out, &format!("    run step {}? [y/N] ", s.step.name))?
            } else {
                writeln!(
                    out,
                    "    refused: needs approval; not a terminal and --yes not given"
                )?;
                false
            };
            if !approved {
                writeln!(out, "    not run")?;
                failures += 1;
                done.push((s.step.name.clone(), StepStatus::Denied));
                continue;
            }
        }
        let outcome = rt.block_on(executor.execute(&plan, s));
        for line in outcome.output.lines() {
            writeln!(out, "    | {line}")?;
        }
        writeln!(
            out,
            "    -> {} (exit {}, {:.2}s{})",
            match outcome.status {
                StepStatus::Succeeded => "ok",
                StepStatus::Failed => "failed",
                StepStatus::TimedOut => "timed out",
                StepStatus::Skipped => "skipped",
                StepStatus::Error => "error",
                StepStatus::Unavailable => "unavailable",
                StepStatus::Denied => "denied",
                StepStatus::Expired => "expired",
            },
            outcome
                .exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            outcome.duration.as_secs_f64(),
            if outcome.truncated {
                ", output truncated"
            } else {
                ""
            }
        )?;
        // An unavailable alternative is not a failure while another member ran.
        if !matches!(
            outcome.status,
            StepStatus::Succeeded | StepStatus::Unavailable
        ) {
            failures += 1;
        }
        done.push((s.step.name.clone(), outcome.status));
    }
    for line in engine::node_state(&plan, &done) {
        writeln!(out, "state: {line}")?;
    }
    writeln!(
        out,
        "runbook {}: {} of {ran} steps succeeded",
        runbook.id,
        done.iter()
            .filter(|(_, st)| *st == StepStatus::Succeeded)
            .count()
    )?;
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// With `--step`, only the named steps run (dependencies on others are unmet).
fn selected(only: &[String], name: &str) -> bool {
    only.is_empty() || only.iter().any(|s| s == name)
}

fn confirm(out: &mut impl Write, prompt: &str) -> anyhow::Result<bool> {
    out.write_all(prompt.as_bytes())?;
    out.flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_host_name_drops_the_domain() {
        let check = |full: &str, want: Option<&str>| {
            assert_eq!(short_host_name(full).as_deref(), want, "{full:?}");
        };
        check("gpu-node-07.dc1.example", Some("gpu-node-07"));
        check("gpu-node-07", Some("gpu-node-07"));
        check(" n1 ", Some("n1"));
        check("", None);
        check(".example", None);
    }

    #[test]
    fn only_loopback_and_this_hosts_name_are_this_host() {
        let full = "gpu-node-07.dc1.example";
        for yes in [
            "localhost:9949",
            "127.0.0.1:9949",
            "[::1]:9949",
            "gpu-node-07:9949",
            "gpu-node-07.dc1.example:9949",
            "GPU-NODE-07",
        ] {
            assert!(is_this_host(yes, full), "{yes}");
        }
        for no in ["gpu-node-08:9949", "10.0.0.7:9949", "gpu-node-070:9949", ""] {
            assert!(!is_this_host(no, full), "{no}");
        }
    }
}
