//! Step flow of chat runs through the bot's router: a failed drain never
//! leads to a reset (escalation still runs), a denied step is skipped and
//! the run goes on to the steps that do not depend on it, Approve / Deny
//! buttons run the same checks as the typed commands, one approval covers an
//! approval group, the alert's thread is the incident timeline ending with
//! the node's state, and the stored output comes back through
//! `gpuops audit --run` and `gpuops audit --group --markdown`. Plans before
//! approvals: a step is planned (by the node's real `/v1/plan` router for
//! node steps) before anyone is asked; the request shows the planned argv,
//! a step that cannot run is skipped with its reason, and an approval never
//! covers another member of an alternative group.

#![allow(clippy::disallowed_methods)] // the real binary, as a user runs it

use crate::chat_support;

use std::sync::{Arc, Mutex};

use chat_support::*;
use futures_util::future::BoxFuture;
use gpuops::notify::{Button, Message};
use gpuops::runbook::engine::{Executor, NodeSteps};
use gpuops::runbook::exec::resolve::SearchPath;
use gpuops::runbook::exec::{CommandOutput, CommandRunner, CommandSpec, RunError};
use gpuops::signing::Clock as _;

const RUNBOOK: &str = r#"
id: flow
title: Flow test
params:
  node:
    pattern: '(?P<value>[A-Za-z0-9][A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9.-]+)?(?::[0-9]{1,5})?'
    from_label: instance
steps:
  - name: look
    phase: investigate
    kind: command
    target: node
    run: ["echo", "looking at {{node}}"]
  - name: drain-slurm
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    alternative: drain
    only_if_exists: /nonexistent/gpuops-test/scontrol
    run: ["scontrol", "update", "nodename={{node}}", "state=drain"]
    state_on_success: "{{node}} is drained (Slurm)"
    state_on_failure: "{{node}} is NOT drained: the Slurm drain failed"
  - name: cordon
    phase: mitigate
    kind: command
    target: bot
    needs_approval: true
    alternative: drain
    only_if_exists: /
    run: ["kubectl", "cordon", "{{node}}"]
    state_on_success: "{{node}} is cordoned: no new pods land on it"
    state_on_failure: "{{node}} is NOT cordoned: the cordon failed; it still takes new pods"
  - name: reset
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    requires: [drain]
    approval_group: reset-path
    run: ["nvidia-smi", "-r", "-i", "0"]
    state_on_success: "{{node}} has a freshly reset GPU 0"
    state_on_failure: "{{node}}: the GPU reset failed"
  - name: reset-check
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    when: previous_succeeded
    approval_group: reset-path
    run: ["nvidia-smi", "-q", "-i", "0"]
  - name: drop-caches
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    requires: []
    run: ["sysctl", "-w", "vm.drop_caches=3"]
    state_on_success: "{{node}} had its page cache dropped"
  - name: page
    phase: escalate
    kind: command
    target: bot
    run: ["echo", "page the on-call about {{node}}"]
"#;

/// The shape of the shipped GPU runbooks: a drain, then a privileged
/// investigation (`fuser` as root) that declares nothing, a reset that needs
/// the drain, and a privileged escalation.
const HOLDERS_RUNBOOK: &str = r#"
id: holders-flow
title: Holders after a drain
params:
  node:
    pattern: '(?P<value>[A-Za-z0-9][A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9.-]+)?(?::[0-9]{1,5})?'
    from_label: instance
steps:
  - name: look
    phase: investigate
    kind: command
    target: node
    run: ["echo", "looking at {{node}}"]
  - name: drain
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    run: ["scontrol", "update", "nodename={{node}}", "state=drain"]
  - name: holders
    phase: investigate
    kind: command
    target: node
    needs_approval: true
    run: ["fuser", "-v", "/dev/nvidia0"]
  - name: reset
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    requires: [drain]
    run: ["nvidia-smi", "-r", "-i", "0"]
  - name: bug-report
    phase: escalate
    kind: command
    target: node
    needs_approval: true
    run: ["nvidia-bug-report.sh"]
  - name: page
    phase: escalate
    kind: command
    target: bot
    run: ["echo", "page the on-call about {{node}}"]
"#;

/// Answers every command with its argv as output; programs listed in
/// `failing` exit 1.
#[derive(Default)]
struct Scripted {
    calls: Mutex<Vec<Vec<String>>>,
    failing: Mutex<Vec<String>>,
}

impl Scripted {
    /// The programs run, by name (the argv names them by absolute path).
    fn programs(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|a| base(&a[0]))
            .collect()
    }
}

impl CommandRunner for Scripted {
    fn run<'a>(&'a self, cmd: &'a CommandSpec) -> BoxFuture<'a, Result<CommandOutput, RunError>> {
        // Recorded (and echoed) with the resolved binaries named by name
        // again: these tests are about the flow; the resolution itself is
        // checked by the plan tests below and in agent_exec.
        let mut cmd = cmd.clone();
        if let Some(first) = cmd.argv.first().cloned() {
            cmd.argv[0] = base(&first);
            if let Some(i) = gpuops::runbook::exec::resolve::is_sudo(&first)
                .then(|| gpuops::runbook::exec::resolve::sudo_command_index(&cmd.argv))
                .flatten()
            {
                cmd.argv[i] = base(&cmd.argv[i]);
            }
        }
        let cmd = &cmd;
        self.calls.lock().unwrap().push(cmd.argv.clone());
        let fail = self.failing.lock().unwrap().contains(&base(&cmd.argv[0]));
        let out = CommandOutput {
            exit_code: Some(if fail { 1 } else { 0 }),
            stdout: format!("ran: {}\n", cmd.argv.join(" ")),
            ..CommandOutput::default()
        };
        Box::pin(async move { Ok(out) })
    }
}

fn base(program: &str) -> String {
    program.rsplit('/').next().unwrap_or(program).to_string()
}

/// The flow tests' executor: steps run here through `runner`, with fake
/// Slurm, Kubernetes, NVIDIA and sudo binaries first on the search path
/// (this machine has none of them), PromQL steps asked of `prometheus`.
fn local_executor(runner: &Arc<Scripted>, prometheus: Option<String>) -> Arc<Executor> {
    let bins = crate::support::fake_node_bins();
    Arc::new(
        Executor::new(runner.clone(), NodeSteps::Local, prometheus)
            .with_search_path(SearchPath::first_then_default(&[bins.to_path_buf()])),
    )
}

async fn bot() -> (Bot, Arc<Scripted>, Capture) {
    let capture = Capture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("flow.yaml"), RUNBOOK).unwrap();
    std::fs::write(rb.join("holders-flow.yaml"), HOLDERS_RUNBOOK).unwrap();
    // The shipped XID runbook, as an operator runs it.
    std::fs::copy("runbooks/gpu-xid.yaml", rb.join("gpu-xid.yaml")).unwrap();
    let runner = Arc::new(Scripted::default());
    let exec = local_executor(&runner, None);
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    std::fs::write(dir.path().join("bot.toml"), config_text(dir.path(), &extra)).unwrap();
    std::fs::set_permissions(
        dir.path().join("bot.toml"),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    (
        Bot::start_in(dir, &extra, Some(exec)).await,
        runner,
        capture,
    )
}

fn text(v: &serde_json::Value) -> String {
    v["text"].as_str().unwrap_or_default().to_string()
}

/// The id of the run whose approval request is the latest reply.
fn waiting_run(b: &Bot) -> String {
    let r = b
        .slack
        .replies()
        .into_iter()
        .rev()
        .find(|r| r.contains("/gpuops approve r"))
        .expect("an approval request");
    let at = r.find("approve r").unwrap() + "approve ".len();
    r[at..at + 7].to_string()
}

async fn wait_reply(b: &Bot, what: &str, needle: &str) {
    let n = needle.to_string();
    b.wait_for(10, what, move |b| {
        b.slack.replies().iter().any(|r| r.contains(&n))
    })
    .await;
}

/// Waits until the latest thread reply is an approval request for `step`.
async fn wait_request(b: &Bot, step: &str) {
    let n = format!(" {step} (");
    b.wait_for(10, &format!("approval request for {step}"), move |b| {
        b.slack
            .replies()
            .last()
            .is_some_and(|r| r.contains("/gpuops approve r") && r.contains(&n))
    })
    .await;
}

/// The value of the latest approval request's Approve button
/// (`<run>.<step>.<nonce>`: it approves that request only).
fn approve_button(b: &Bot) -> String {
    b.slack
        .calls()
        .into_iter()
        .rev()
        .find_map(|c| match c.message {
            Message::Text(t) => t.buttons.into_iter().find_map(|x| match x {
                Button::Approve(v) => Some(v),
                _ => None,
            }),
            _ => None,
        })
        .unwrap_or_default()
}

async fn press(b: &Bot, capture: &Capture, user: &str, action: &str, run: &str) -> u16 {
    let body = slack_button_body(user, action, run, &format!("{}/respond", capture.url));
    let (s, _) = b
        .send(slack_request(
            "/slack/interactions",
            &body,
            b.clock.now_unix(),
            SLACK_SECRET,
        ))
        .await;
    s
}

#[tokio::test]
async fn drain_fails_so_reset_is_not_offered_and_escalation_runs() {
    let (b, runner, capture) = bot().await;
    runner.failing.lock().unwrap().push("kubectl".into());
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run flow alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    wait_request(&b, "cordon").await;
    let run = waiting_run(&b);
    assert_eq!(
        press(&b, &capture, ADMIN, "gpuops_approve", &approve_button(&b)).await,
        200
    );
    // Only the independent drop-caches (`requires: []`) is offered next.
    wait_request(&b, "drop-caches").await;
    let (_, v) = b.slack_command(ADMIN, &format!("deny {run}")).await;
    assert!(text(&v).contains("denied step `drop-caches`"), "{v}");
    wait_reply(&b, "the summary", "🏁").await;

    // Slurm is not installed: its plan said so before anyone was asked; its
    // alternative (cordon, approved on its own) ran and failed; nothing that
    // needs the drain was offered.
    assert_eq!(runner.programs(), ["echo", "kubectl", "echo"]);
    let replies = b.slack.replies();
    let all = replies.join("\n");
    assert!(
        all.contains("⏭ step `drain-slurm` skipped before approval: only_if_exists path /nonexistent/gpuops-test/scontrol missing on this host"),
        "{all}"
    );
    assert!(
        all.contains(
            "reset (node command, 30s, needs approval) `flow` — skipped: drain did not succeed (cordon failed)"
        ),
        "{all}"
    );
    assert!(
        all.contains(
            "reset-check (node command, 30s, needs approval) `flow` — skipped: reset was skipped"
        ),
        "{all}"
    );
    let offered: Vec<&String> = replies
        .iter()
        .filter(|r| r.contains("/gpuops approve r"))
        .collect();
    assert_eq!(offered.len(), 2, "the drain and drop-caches only: {all}");
    assert!(offered.iter().all(|r| !r.contains(" reset")), "{all}");
    assert!(all.contains("escalate page"), "{all}");
    let summary = replies.iter().find(|r| r.contains("🏁")).unwrap();
    assert!(
        summary.contains(
            "*Node state:* node1 is NOT cordoned: the cordon failed; it still takes new pods"
        ),
        "{summary}"
    );
    b.stop();
}

#[tokio::test]
async fn deny_skips_the_step_and_the_run_goes_on_to_independent_steps() {
    let (b, runner, capture) = bot().await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run flow alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    wait_request(&b, "cordon").await;
    let run = waiting_run(&b);
    // The Deny button, by an admin.
    assert_eq!(
        press(&b, &capture, ADMIN, "gpuops_deny", &approve_button(&b)).await,
        200
    );
    wait_reply(&b, "the denial", "denied step `cordon`").await;
    // Independent drop-caches is offered next; nothing of the drain path.
    wait_request(&b, "drop-caches").await;
    assert_eq!(waiting_run(&b), run, "the same run goes on");
    assert_eq!(runner.programs(), ["echo"]);
    let all = b.slack.replies().join("\n");
    assert!(
        all.contains("— skipped: drain did not succeed (cordon was denied)"),
        "{all}"
    );
    let (_, v) = b.slack_command(ADMIN2, &format!("approve {run}")).await;
    assert!(text(&v).contains("approved step `drop-caches`"), "{v}");
    wait_reply(&b, "the summary", "🏁").await;
    assert_eq!(runner.programs(), ["echo", "sysctl", "echo"]);
    let all = b.slack.replies().join("\n");
    assert!(
        all.contains("*Node state:* node1 had its page cache dropped"),
        "{all}"
    );
    b.stop();
}

#[tokio::test]
async fn approve_button_runs_the_step_refuses_the_requester_and_covers_its_group() {
    let (b, runner, capture) = bot().await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    b.wait_for(10, "the alert message", |b| {
        b.slack
            .calls()
            .iter()
            .any(|c| matches!(c.message, Message::Alert(_)))
    })
    .await;
    // Stored as posted before anything else happens (the timeline's order).
    for _ in 0..200 {
        if !b.state.store.messages(g).await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // An acknowledgement goes into the thread too.
    let (_, v) = b.slack_command(OPERATOR, &format!("ack {g}")).await;
    assert!(text(&v).contains("acknowledged"), "{v}");
    wait_reply(&b, "the ack in the thread", "acknowledged the alert").await;

    let (_, v) = b.slack_command(ADMIN, &format!("run flow alert={g}")).await;
    assert!(text(&v).contains("started run"), "{v}");
    wait_request(&b, "cordon").await;
    let run = waiting_run(&b);
    // The request carries Approve / Deny buttons and says who may approve.
    let request = b
        .slack
        .calls()
        .into_iter()
        .rev()
        .find_map(|c| match c.message {
            Message::Text(t) if t.text.contains("/gpuops approve") => Some(t),
            _ => None,
        })
        .unwrap();
    let value = approve_button(&b);
    assert!(value.starts_with(&format!("{run}.")), "{value}");
    assert_eq!(
        request.buttons,
        [Button::Approve(value.clone()), Button::Deny(value)]
    );
    assert!(
        request.text.contains(&format!(
            "needs approval by an admin other than {} (admins: slack:{ADMIN2}",
            "u0admin (slack:U0ADMIN)"
        )),
        "{}",
        request.text
    );

    // The requester's own press is refused, as the typed command would be.
    assert_eq!(
        press(&b, &capture, ADMIN, "gpuops_approve", &approve_button(&b)).await,
        200
    );
    capture
        .wait_for(10, "someone other than the person who asked")
        .await;
    assert_eq!(runner.programs(), ["echo"], "nothing ran");

    // Another admin's press runs it (Slurm is not installed here: the
    // request was for cordon, the drain's available member).
    assert_eq!(
        press(&b, &capture, ADMIN2, "gpuops_approve", &approve_button(&b)).await,
        200
    );
    wait_request(&b, "reset").await;
    let all = b.slack.replies().join("\n");
    assert!(
        all.contains("approving it also approves `reset-check` (group `reset-path`)"),
        "{all}"
    );
    // The group's request lists each step's planned argv, where it runs.
    let request = b.slack.replies().pop().unwrap();
    assert!(
        request.contains("/nvidia-smi -r -i 0\n# runs on this host\n\n# and reset-check:\n")
            && request.contains("/nvidia-smi -q -i 0\n# runs on this host"),
        "{request}"
    );
    assert_eq!(runner.programs(), ["echo", "kubectl"]);
    let (_, v) = b.slack_command(ADMIN2, &format!("approve {run}")).await;
    assert!(text(&v).contains("approved step `reset`"), "{v}");
    // reset-check rides on the reset-path approval; drop-caches asks anew.
    wait_request(&b, "drop-caches").await;
    assert_eq!(
        runner.programs(),
        ["echo", "kubectl", "nvidia-smi", "nvidia-smi"]
    );
    let (_, v) = b.slack_command(ADMIN2, &format!("approve {run}")).await;
    assert!(text(&v).contains("approved step `drop-caches`"), "{v}");
    wait_reply(&b, "the summary", "🏁").await;
    let all = b.slack.replies().join("\n");
    assert!(
        all.contains("*Node state:* node1 is cordoned: no new pods land on it; node1 has a freshly reset GPU 0; reset-check succeeded on node1; node1 had its page cache dropped"),
        "{all}"
    );

    // The stored output comes back through the real binary.
    b.stop();
    let dir = b.dir.path();
    let bin = env!("CARGO_BIN_EXE_gpuops");
    let out = std::process::Command::new(bin)
        .args(["audit", "--config"])
        .arg(dir.join("bot.toml"))
        .args(["--run", &run])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).replace(&run, "RUN");
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = mask(&report);
    expect_test::expect![[r#"
        run RUN of runbook flow: finished
        requested by u0admin (slack:U0ADMIN) (admin), alert group #G
        node node1 (node1:9949)

        == `look`: succeeded (exit 0)
        ran: echo looking at node1

        == `drain-slurm`: unavailable
        not run: only_if_exists path /nonexistent/gpuops-test/scontrol missing on this host

        == `cordon`: succeeded (exit 0), approved by slack:U0ADMIN2
        ran: kubectl cordon node1

        == `reset`: succeeded (exit 0), approved by slack:U0ADMIN2
        ran: nvidia-smi -r -i 0

        == `reset-check`: succeeded (exit 0), approved by slack:U0ADMIN2
        ran: nvidia-smi -q -i 0

        == `drop-caches`: succeeded (exit 0), approved by slack:U0ADMIN2
        ran: sysctl -w vm.drop_caches=3

        == `page`: succeeded (exit 0)
        ran: echo page the on-call about node1
    "#]]
    .assert_eq(&report.replace(&format!("#{g}"), "#G"));

    let out = std::process::Command::new(bin)
        .args(["audit", "--config"])
        .arg(dir.join("bot.toml"))
        .args(["--group", &g.to_string(), "--markdown"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = mask(&String::from_utf8_lossy(&out.stdout).replace(&run, "RUN"));
    expect_test::expect![[r##"
        # Incident timeline: alert group #G

        - Alert: TestGpuDown on node1 (node1:9949)
        - Nodes: node1 (node1:9949)
        - Group: `{}:{alertname="TestGpuDown", instance="node1:9949"}`
        - Tier: P1; status now: firing
        - Acknowledged by u0oper (slack:U0OPER) at TIME
        - Runbook runs: 1

        ## Timeline (UTC)

        - TIME alert received from AlertManager (firing)
        - TIME alert message posted to slack:C0ALERTS
        - TIME acknowledged by slack:U0OPER
        - TIME slack:U0ADMIN started runbook `flow`: started: RUN
        - TIME run `RUN` step `look`: succeeded (exit 0)

          ```
          ran: echo looking at node1
          ```
        - TIME run `RUN` step `drain-slurm`: unavailable

          ```
          not run: only_if_exists path /nonexistent/gpuops-test/scontrol missing on this host
          ```
        - TIME run `RUN` asks approval for step `cordon` (requested by slack:U0ADMIN)
        - TIME slack:U0ADMIN tried to approve step `cordon` of run `RUN`: denied: step cordon needs approval by someone other than the person who asked for it
        - TIME slack:U0ADMIN2 approved step `cordon` of run `RUN`
        - TIME run `RUN` step `cordon`: succeeded (exit 0), approved by slack:U0ADMIN2

          ```
          ran: kubectl cordon node1
          ```
        - TIME run `RUN` asks approval for step `reset` (requested by slack:U0ADMIN)
        - TIME slack:U0ADMIN2 approved step `reset` of run `RUN`
        - TIME run `RUN` step `reset`: succeeded (exit 0), approved by slack:U0ADMIN2

          ```
          ran: nvidia-smi -r -i 0
          ```
        - TIME run `RUN` step `reset-check`: succeeded (exit 0), approved by slack:U0ADMIN2

          ```
          ran: nvidia-smi -q -i 0
          ```
        - TIME run `RUN` asks approval for step `drop-caches` (requested by slack:U0ADMIN)
        - TIME slack:U0ADMIN2 approved step `drop-caches` of run `RUN`
        - TIME run `RUN` step `drop-caches`: succeeded (exit 0), approved by slack:U0ADMIN2

          ```
          ran: sysctl -w vm.drop_caches=3
          ```
        - TIME run `RUN` step `page`: succeeded (exit 0)

          ```
          ran: echo page the on-call about node1
          ```
        - TIME run `RUN` finished: 6 succeeded, 1 unavailable; node state: node1 is cordoned: no new pods land on it; node1 has a freshly reset GPU 0; reset-check succeeded on node1; node1 had its page cache dropped
    "##]]
    .assert_eq(&md.replace(&format!("#{g}"), "#G"));
}

/// Times to `TIME`.
fn mask(s: &str) -> String {
    regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
        .unwrap()
        .replace_all(s, "TIME")
        .into_owned()
}

#[tokio::test]
async fn discord_approve_button_runs_the_same_checks() {
    let (b, runner, _capture) = bot().await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run flow alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    wait_request(&b, "cordon").await;
    let run = approve_button(&b);
    let press = |user: &str, token: &str| {
        discord_interaction(
            3,
            user,
            token,
            serde_json::json!({ "custom_id": format!("gpuops:approve:{run}"), "component_type": 2 }),
        )
    };
    let now = b.clock.now_unix();
    // A Discord operator is no approver: refused inline, nothing runs.
    let (s, out) = b
        .send(discord_request(
            &b.discord_key,
            &press("423456789012345678", "t1"),
            now,
        ))
        .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["data"]["content"]
            .as_str()
            .unwrap()
            .contains("needs the admin role"),
        "{v}"
    );
    assert_eq!(runner.programs(), ["echo"]);
    // A Discord admin's press approves: the cordon runs.
    let (s, out) = b
        .send(discord_request(
            &b.discord_key,
            &press("323456789012345678", "t2"),
            now,
        ))
        .await;
    assert_eq!((s, out.as_str()), (200, r#"{"type":5}"#));
    wait_reply(&b, "the approval note", "approved step `cordon`").await;
    wait_request(&b, "reset").await;
    assert_eq!(runner.programs(), ["echo", "kubectl"]);
    b.stop();
}

/// Issue 22, observation 5: after a denied drain the run still asked an
/// admin to approve `holders` (`fuser` as root). Now nothing privileged is
/// offered after the denial; the read-only escalation still runs.
#[tokio::test]
async fn after_a_denied_drain_no_privileged_step_is_offered() {
    let (b, runner, capture) = bot().await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run holders-flow alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    wait_request(&b, "drain").await;
    assert_eq!(
        press(&b, &capture, ADMIN, "gpuops_deny", &approve_button(&b)).await,
        200
    );
    wait_reply(&b, "the summary", "🏁").await;
    let replies = b.slack.replies();
    let all = replies.join("\n");
    let offered: Vec<&String> = replies
        .iter()
        .filter(|r| r.contains("/gpuops approve r"))
        .collect();
    assert_eq!(offered.len(), 1, "the drain only: {all}");
    assert!(all.contains("holders (node command, 30s, needs approval) `holders-flow` — skipped: drain was denied"), "{all}");
    assert!(all.contains("bug-report"), "{all}");
    assert!(!all.contains("approve bug-report"), "{all}");
    assert_eq!(runner.programs(), ["echo", "echo"], "{all}");
    b.stop();
}

/// Issue 22, observation 2: run on a group holding GPUs 1 and 6, the XID 94
/// runbook acted on GPU 1 only and did not say so. Now the start says which
/// GPU the run acts on and offers the other as a run of its own.
#[tokio::test]
async fn a_two_gpu_xid_94_group_says_which_gpu_it_acts_on_and_offers_the_other() {
    let (b, runner, _capture) = bot().await;
    let mut hook = webhook(
        "GPUXIDError",
        "node1:9949",
        &[("xid", "94"), ("gpu", "1"), ("node", "node1")],
    );
    let mut second = hook["alerts"][0].clone();
    second["labels"]["gpu"] = serde_json::json!("6");
    second["fingerprint"] = serde_json::json!("fp-gpu6");
    hook["alerts"].as_array_mut().unwrap().push(second);
    hook["commonLabels"].as_object_mut().unwrap().remove("gpu");
    let g = b.alert(hook).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run gpu-xid alert={g}"))
        .await;
    let ack = text(&v);
    assert!(ack.contains("started run"), "{v}");
    assert!(
        ack.contains(&format!(
            "it acts on GPU 1 only: alert group #{g} also holds GPU 6 (`/gpuops run gpu-xid alert={g} gpu=6`)"
        )),
        "{ack}"
    );
    wait_reply(&b, "the thread's start line", "also holds GPU 6").await;
    for _ in 0..200 {
        if runner
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|a| a.contains(&"-i".to_string()))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let calls = runner.calls.lock().unwrap().clone();
    assert!(
        calls.iter().any(|a| base(&a[0]) == "nvidia-smi"),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .filter(|a| base(&a[0]) == "nvidia-smi")
            .all(|a| a.ends_with(&["-i".to_string(), "1".to_string()])),
        "{calls:?}"
    );
    b.stop();
}

/// [`bot`] with the runs' PromQL steps answered by `prometheus`.
async fn bot_with_prometheus(prometheus: String) -> (Bot, Arc<Scripted>, Capture) {
    let capture = Capture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::copy("runbooks/gpu-xid.yaml", rb.join("gpu-xid.yaml")).unwrap();
    let runner = Arc::new(Scripted::default());
    let exec = local_executor(&runner, Some(prometheus));
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    (
        Bot::start_in(dir, &extra, Some(exec)).await,
        runner,
        capture,
    )
}

/// Issue 22, observation 2 and its quality bar: a group holding XID 94
/// alerts on GPUs 1 and 6, both with a pending row remap and idle. The run
/// (the shipped gpu-xid, started by an admin) says it acts on GPU 1 only
/// and offers GPU 6 as a run of its own; the one approval of the reset
/// path resets GPU 1 (never GPU 6), and the closing node state names GPU 1.
#[tokio::test]
async fn two_gpu_xid94_group_acts_on_both_gpus_or_says_it_does_not() {
    use std::collections::BTreeMap;
    // The queries as the runbook renders them, for each GPU.
    let rb = gpuops::runbook::load_file(std::path::Path::new("runbooks/gpu-xid.yaml")).unwrap();
    let query = |gpu: &str, step: &str| {
        let labels: BTreeMap<String, String> = [
            ("instance", "node1:9949"),
            ("node", "node1"),
            ("xid", "94"),
            ("gpu", gpu),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let plan = gpuops::runbook::engine::plan(&rb, &BTreeMap::new(), &labels).unwrap();
        match &plan.step(step).unwrap().rendered {
            gpuops::runbook::engine::Rendered::Promql { query } => query.clone(),
            other => panic!("{other:?}"),
        }
    };
    let mut answers = Vec::new();
    for gpu in ["1", "6"] {
        answers.push((
            query(gpu, "remap-pending"),
            vec![(vec![("gpu", gpu), ("state", "pending")], 1.0)],
        ));
        answers.push((
            query(gpu, "remap-applied"),
            vec![(vec![("gpu", gpu), ("state", "pending")], 0.0)],
        ));
    }
    let prometheus = crate::report_support::fake_prometheus(answers).await;
    let (b, runner, capture) = bot_with_prometheus(prometheus).await;
    let mut hook = webhook(
        "GPUXIDError",
        "node1:9949",
        &[("xid", "94"), ("gpu", "1"), ("node", "node1")],
    );
    let mut second = hook["alerts"][0].clone();
    second["labels"]["gpu"] = serde_json::json!("6");
    second["fingerprint"] = serde_json::json!("fp-gpu6");
    hook["alerts"].as_array_mut().unwrap().push(second);
    hook["commonLabels"].as_object_mut().unwrap().remove("gpu");
    let g = b.alert(hook).await;
    let (_, v) = b
        .slack_command(ADMIN, &format!("run gpu-xid alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    let note = format!(
        "it acts on GPU 1 only: alert group #{g} also holds GPU 6 (`/gpuops run gpu-xid alert={g} gpu=6`)"
    );
    assert!(text(&v).contains(&note), "{v}");
    wait_reply(&b, "the thread's start line", &note).await;
    // The reset path asks once, covering the reset itself.
    wait_request(&b, "stop-nvml-monitors").await;
    let request = b.slack.replies().last().cloned().unwrap_or_default();
    assert!(
        request.contains(
            "also approves `gpu-reset`, `verify-gpu`, `remap-applied`, `start-nvml-monitors`"
        ),
        "{request}"
    );
    assert_eq!(
        press(&b, &capture, ADMIN2, "gpuops_approve", &approve_button(&b)).await,
        200
    );
    // Then the escalation's bug report asks; declined, the run ends.
    wait_request(&b, "bug-report").await;
    let run = waiting_run(&b);
    let (_, v) = b.slack_command(ADMIN2, &format!("deny {run}")).await;
    assert!(text(&v).contains("denied step `bug-report`"), "{v}");
    wait_reply(&b, "the summary", "🏁").await;
    let calls: Vec<String> = runner
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.join(" "))
        .collect();
    assert!(
        calls.contains(&"sudo -n nvidia-smi -r -i 1".to_string()),
        "{calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.contains("nvidia-smi") && c.ends_with("-i 6")),
        "{calls:?}"
    );
    let replies = b.slack.replies();
    let summary = replies.iter().find(|r| r.contains("🏁")).unwrap();
    assert!(
        summary.contains("GPU 1 on node1 was reset to apply its pending row remap")
            && summary.contains("GPU 1 on node1: its row remap is applied"),
        "{summary}"
    );
    b.stop();
}

// Plans before approvals (issue 22, observation 4): the approver saw
// `sudo -n scontrol …`, the agent then found no `/usr/bin/scontrol`, and
// the bot ran the `kubectl cordon` alternative under that approval.

const NODE17: &str = "gpu-node-17";

const PLAN_FLOW: &str = r#"
id: plan-flow
title: Plan flow
params:
  node: { pattern: '[A-Za-z0-9-]{1,63}', from_label: node }
steps:
  - name: drain-slurm
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    alternative: drain
    run: ["sudo", "-n", "scontrol", "update", "nodename={{node}}", "state=drain"]
  - name: cordon-kubernetes
    phase: mitigate
    kind: command
    target: bot
    needs_approval: true
    alternative: drain
    run: ["kubectl", "cordon", "{{node}}"]
"#;

/// A bot whose node steps go to a real agent router (`/v1/plan` and
/// `/v1/exec`) for gpu-node-17 with `agent_bins` as its PATH; bot-side
/// steps find `bot_bins`. Both runners record and run nothing.
struct PlanBot {
    b: Bot,
    agent_runner: Arc<gpuops::runbook::exec::RecordingRunner>,
    bot_runner: Arc<gpuops::runbook::exec::RecordingRunner>,
    agent_bins: tempfile::TempDir,
    bot_bins: tempfile::TempDir,
    group: i64,
}

async fn plan_bot(agent_has: &[&str], bot_has: &[&str]) -> PlanBot {
    use gpuops::exec_auth::{ExecSigner, ExecVerifier};
    use gpuops::runbook::agent_exec::{self, ExecState};
    use gpuops::runbook::engine::{AgentAddr, AgentClient};
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("plan-flow.yaml"), PLAN_FLOW).unwrap();
    let (agent_bins, bot_bins) = (
        crate::support::fake_bins(agent_has),
        crate::support::fake_bins(bot_has),
    );
    let signer = Arc::new(ExecSigner::generate());
    let agent_runner = Arc::new(gpuops::runbook::exec::RecordingRunner::new());
    let state = ExecState::new(
        ExecVerifier::new(vec![signer.public_key()], NODE17),
        rb.clone(),
        64 * 1024,
        agent_runner.clone(),
    )
    .with_search_path(SearchPath::new([agent_bins.path().to_path_buf()]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, agent_exec::router_with(Arc::new(state))).await;
    });
    let inventory = Arc::new(gpuops::inventory::Inventory::fixed(vec![AgentAddr {
        instance: agent.clone(),
        node: NODE17.into(),
        url: format!("http://{agent}"),
    }]));
    let bot_runner = Arc::new(gpuops::runbook::exec::RecordingRunner::new());
    let exec = Executor::new(
        bot_runner.clone(),
        NodeSteps::Agent(AgentClient::new(inventory, signer)),
        None,
    )
    .with_search_path(SearchPath::new([bot_bins.path().to_path_buf()]));
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    let b = Bot::start_in(dir, &extra, Some(Arc::new(exec))).await;
    let group = b
        .alert(webhook("TestGpuDown", &agent, &[("node", NODE17)]))
        .await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run plan-flow alert={group}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    PlanBot {
        b,
        agent_runner,
        bot_runner,
        agent_bins,
        bot_bins,
        group,
    }
}

/// The approval requests posted so far (text and code block).
fn approval_requests(b: &Bot) -> Vec<String> {
    b.slack
        .replies()
        .into_iter()
        .filter(|r| r.contains("/gpuops approve r"))
        .collect()
}

#[tokio::test]
async fn approval_text_shows_the_planned_argv() {
    let p = plan_bot(&["sudo", "scontrol"], &["kubectl"]).await;
    wait_request(&p.b, "drain-slurm").await;
    let request = approval_requests(&p.b).pop().unwrap();
    let bins = p.agent_bins.path().display().to_string();
    // What the agent resolved on gpu-node-17 (not the runbook's `scontrol`),
    // where it runs, and that sudo allows it.
    assert!(
        request.contains(&format!(
            "{bins}/sudo -n {bins}/scontrol update nodename=gpu-node-17 state=drain\n# runs on node gpu-node-17\n# sudo -n -l: allowed"
        )),
        "{request}"
    );
    // The plan ran only sudo's check; approving signs and runs that argv.
    let run = waiting_run(&p.b);
    let (_, v) = p.b.slack_command(ADMIN2, &format!("approve {run}")).await;
    assert!(text(&v).contains("approved step `drain-slurm`"), "{v}");
    wait_reply(&p.b, "the summary", "🏁").await;
    let calls: Vec<Vec<String>> = p.agent_runner.calls().into_iter().map(|c| c.argv).collect();
    let planned: Vec<String> = [
        format!("{bins}/sudo"),
        "-n".into(),
        format!("{bins}/scontrol"),
        "update".into(),
        "nodename=gpu-node-17".into(),
        "state=drain".into(),
    ]
    .into();
    assert_eq!(calls.last(), Some(&planned), "{calls:?}");
    assert!(p.bot_runner.calls().is_empty(), "the cordon never ran");
    let _ = p.bot_bins;
    p.b.stop();
}

#[tokio::test]
async fn step_whose_binary_is_missing_is_skipped_before_any_approval_request() {
    // The node has sudo but no Slurm; the bot has kubectl.
    let p = plan_bot(&["sudo"], &["kubectl"]).await;
    wait_request(&p.b, "cordon-kubernetes").await;
    let all = p.b.slack.replies().join("\n");
    assert!(
        all.contains(&format!(
            "⏭ step `drain-slurm` skipped before approval: scontrol not found on gpu-node-17's PATH ({})",
            p.agent_bins.path().display()
        )),
        "{all}"
    );
    // No Approve button was ever posted for the drain; the next
    // alternative was planned (on the bot) and is the one asked for.
    let requests = approval_requests(&p.b);
    assert_eq!(requests.len(), 1, "{all}");
    assert!(!requests[0].contains("drain-slurm"), "{all}");
    assert!(
        requests[0].contains(&format!(
            "{}/kubectl cordon gpu-node-17\n# runs on the bot",
            p.bot_bins.path().display()
        )),
        "{all}"
    );
    assert!(p.agent_runner.calls().is_empty(), "the node ran nothing");
    // Stored with the run: unavailable, with the reason.
    let run = waiting_run(&p.b);
    let steps = p.b.state.store.run_steps(&run).await.unwrap();
    assert_eq!(steps[0].step, "drain-slurm");
    assert_eq!(steps[0].status, "unavailable");
    assert!(steps[0].output.contains("scontrol not found"), "{steps:?}");
    let _ = p.group;
    p.b.stop();
}

#[tokio::test]
async fn alternative_on_the_bot_is_not_run_under_another_members_approval() {
    let p = plan_bot(&["sudo", "scontrol"], &["kubectl"]).await;
    wait_request(&p.b, "drain-slurm").await;
    let run = waiting_run(&p.b);
    // Slurm goes away between the plan and the approval: the agent finds
    // the drain cannot run.
    std::fs::remove_file(p.agent_bins.path().join("scontrol")).unwrap();
    let (_, v) = p.b.slack_command(ADMIN2, &format!("approve {run}")).await;
    assert!(text(&v).contains("approved step `drain-slurm`"), "{v}");
    // The cordon is asked for on its own; it did not ride on the drain's
    // approval, and nothing ran on the bot.
    wait_request(&p.b, "cordon-kubernetes").await;
    assert!(
        p.bot_runner.calls().is_empty(),
        "{:?}",
        p.bot_runner.calls()
    );
    let all = p.b.slack.replies().join("\n");
    assert!(
        all.contains("drain-slurm") && all.contains("scontrol not found on gpu-node-17's PATH"),
        "{all}"
    );
    assert_eq!(approval_requests(&p.b).len(), 2, "{all}");
    let (_, v) = p.b.slack_command(ADMIN2, &format!("deny {run}")).await;
    assert!(text(&v).contains("denied step `cordon-kubernetes`"), "{v}");
    wait_reply(&p.b, "the summary", "🏁").await;
    assert!(
        p.bot_runner.calls().is_empty(),
        "{:?}",
        p.bot_runner.calls()
    );
    p.b.stop();
}
