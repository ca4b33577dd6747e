//! `gpuops runbook run` with the real binary: the same step-flow rule as in
//! chat (alternatives chosen by what exists, `requires`, a failed drain
//! never leads to a reset, escalation always runs), the node's state at the
//! end, and `--step NAME` like `run id:step` in chat.

#![allow(clippy::disallowed_methods)] // the real binary, as a user runs it

use std::process::Command;

const RUNBOOK: &str = r#"
id: cli-flow
title: CLI flow
params:
  node: { pattern: '[a-z0-9-]{1,63}', default: n1 }
steps:
  - name: look
    phase: investigate
    kind: command
    target: bot
    run: ["echo", "looking at {{node}}"]
  - name: drain-slurm
    phase: mitigate
    kind: command
    target: node
    alternative: drain
    only_if_exists: /nonexistent/gpuops-test/scontrol
    run: ["echo", "slurm drain"]
  - name: cordon
    phase: mitigate
    kind: command
    target: node
    alternative: drain
    run: ["false"]
    state_on_success: "{{node}} is cordoned"
    state_on_failure: "{{node}} is NOT cordoned: the cordon failed"
  - name: reset
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    requires: [drain]
    run: ["echo", "reset"]
    state_on_success: "{{node}} has a reset GPU"
  - name: page
    phase: escalate
    kind: command
    target: bot
    run: ["echo", "page about {{node}}"]
"#;

fn run(args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cli-flow.yaml"), RUNBOOK).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["runbook", "run", "cli-flow", "--dir"])
        .arg(dir.path())
        .args(["-p", "node=n1"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let masked = regex::Regex::new(r"\d+\.\d\ds")
        .unwrap()
        .replace_all(&stdout, "T")
        .into_owned();
    // The resolved program's directory (`/usr/bin` or `/bin`, by machine).
    let masked = regex::Regex::new(r"\$ (/usr)?/bin/")
        .unwrap()
        .replace_all(&masked, "$$ BIN/")
        .into_owned();
    (
        out.status.success(),
        masked,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn failed_drain_skips_the_reset_and_escalation_still_runs() {
    let (ok, stdout, stderr) = run(&["--yes"]);
    assert!(!ok, "a failed step fails the run: {stdout}{stderr}");
    expect_test::expect![[r#"
        runbook cli-flow: CLI flow
          node=n1
        [1/5] investigate look (bot command, 30s)
            $ BIN/echo 'looking at n1'
            | looking at n1
            -> ok (exit 0, T)
        [2/5] mitigate drain-slurm (node command, 30s)
            $ echo 'slurm drain'
            not run: only_if_exists path /nonexistent/gpuops-test/scontrol missing on this host
            -> unavailable
        [3/5] mitigate cordon (node command, 30s)
            $ BIN/false
            -> failed (exit 1, T)
        [4/5] mitigate reset (node command, 30s, needs approval)
            $ echo reset
            skipped: drain did not succeed (cordon failed)
        [5/5] escalate page (bot command, 30s)
            $ BIN/echo 'page about n1'
            | page about n1
            -> ok (exit 0, T)
        state: n1 is NOT cordoned: the cordon failed
        runbook cli-flow: 2 of 5 steps succeeded
    "#]]
    .assert_eq(&stdout);
}

#[test]
fn step_runs_only_the_named_steps_and_their_unmet_dependencies_skip() {
    let (ok, stdout, stderr) = run(&["--yes", "--step", "reset", "--step", "page"]);
    assert!(!ok, "{stdout}{stderr}");
    expect_test::expect![[r#"
        runbook cli-flow: CLI flow
          node=n1
        [4/5] mitigate reset (node command, 30s, needs approval)
            $ echo reset
            skipped: drain did not run in this run
        [5/5] escalate page (bot command, 30s)
            $ BIN/echo 'page about n1'
            | page about n1
            -> ok (exit 0, T)
        state: n1 was not changed; it is still serving jobs
        runbook cli-flow: 1 of 2 steps succeeded
    "#]]
    .assert_eq(&stdout);
    let (ok, stdout, stderr) = run(&["--step", "look"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("looking at n1"), "{stdout}");
    assert!(!stdout.contains("page about"), "{stdout}");
    let (ok, _, stderr) = run(&["--step", "nope"]);
    assert!(!ok);
    assert!(
        stderr.contains("runbook cli-flow has no step \"nope\"; its steps: look, drain-slurm, cordon, reset, page"),
        "{stderr}"
    );
}

/// Issue 22, observation 10: `instance=gpu-node-07:9949` with no `node` was
/// run as this host (`nodename=vm`); it is an error naming the inventory.
#[test]
fn runbook_run_with_an_instance_the_inventory_does_not_know_is_an_error() {
    const NODE_RUNBOOK: &str = r#"
id: drain-it
title: Drain it
params:
  node: { pattern: '[A-Za-z0-9-]{1,63}' }
  instance: { pattern: '[A-Za-z0-9.:_-]{1,255}' }
steps:
  - name: drain
    phase: mitigate
    kind: command
    target: bot
    run: ["echo", "drain nodename={{node}} via {{instance}}"]
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("drain-it.yaml"), NODE_RUNBOOK).unwrap();
    let run = |params: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpuops"));
        c.args(["runbook", "run", "drain-it", "--dry-run", "--dir"])
            .arg(dir.path());
        for p in params {
            c.args(["-p", p]);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let host = gpuops::runbook::cli::local_node_name().expect("this host has a name");
    let (ok, stdout, stderr) = run(&["instance=gpu-node-07:9949"]);
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("instance=gpu-node-07:9949 is not in the inventory"),
        "{stderr}"
    );
    assert!(!stdout.contains(&format!("nodename={host}")), "{stdout}");
    // The node given: the operator said which node it is.
    let (ok, stdout, stderr) = run(&["instance=gpu-node-07:9949", "node=gpu-node-07"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("nodename=gpu-node-07"), "{stdout}");
    // This host's own agent: node is this host.
    let (ok, stdout, stderr) = run(&["instance=localhost:9949"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("nodename={host}")), "{stdout}");
}

/// Issue 22, observation 4, on the node: `gpuops runbook run` shows the
/// resolved argv before it asks, and a step whose binary is missing is
/// reported and marked unavailable without asking (the next alternative
/// runs).
#[test]
fn runbook_run_shows_the_resolved_argv_and_skips_a_missing_binary_without_asking() {
    const MISSING: &str = r#"
id: cli-missing
title: CLI missing binary
steps:
  - name: drain-slurm
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    alternative: drain
    run: ["gpuops-no-such-scontrol", "update"]
  - name: drain-other
    phase: mitigate
    kind: command
    target: node
    alternative: drain
    run: ["true"]
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cli-missing.yaml"), MISSING).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["runbook", "run", "cli-missing", "--dir"])
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("    not run: gpuops-no-such-scontrol not found on this host's PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/opt/slurm/bin)\n    -> unavailable"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("needs approval; not a terminal"),
        "{stdout}"
    );
    assert!(
        regex::Regex::new(r"\$ (/usr)?/bin/true\n")
            .unwrap()
            .is_match(&stdout),
        "{stdout}"
    );
}
