//! Incidents walked through as an on-call engineer would, on loopback, with
//! the shipped runbooks: XID 79, XID 48, XID 13 and a full disk. An alert
//! arrives; its message suggests the runbook for it; an operator presses Run;
//! an admin approves each request; the node's agent (in-process, signed
//! `/v1/exec`, a scripted command runner where the Slurm drain fails) runs
//! the node steps. Each walk checks: the right runbook, the node name from
//! the bot's inventory (never from `instance`), a failed drain stopping the
//! dangerous steps (no reboot, no reset), a thread that is a timeline ending
//! in the node's state, and the post-mortem markdown of `audit --group`.
//!
//! The runbooks are the shipped files, copied with one change: the Slurm
//! drain's `only_if_exists: /usr/bin/scontrol` points at a file of the test,
//! so the drain is "available" here and its failure is what the walk sees.

use crate::chat_support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_support::*;
use futures_util::future::BoxFuture;
use gpuops::exec_auth::{ExecSigner, ExecVerifier};
use gpuops::notify::{Button, Message};
use gpuops::runbook::agent_exec::{self, ExecState};
use gpuops::runbook::exec::{CommandOutput, CommandRunner, CommandSpec, RunError};
use gpuops::signing::Clock as _;

const NODE: &str = "gpu-node-17";

/// The node's commands: everything succeeds with "ok" except a Slurm drain.
#[derive(Default)]
struct NodeRunner {
    calls: Mutex<Vec<Vec<String>>>,
}

impl CommandRunner for NodeRunner {
    fn run<'a>(&'a self, cmd: &'a CommandSpec) -> BoxFuture<'a, Result<CommandOutput, RunError>> {
        let is = |a: &str, name: &str| a == name || a.ends_with(&format!("/{name}"));
        if is(&cmd.argv[0], "sudo") && cmd.argv.iter().any(|a| a == "-l") {
            // The plan's `sudo -n -l` check: allowed, and not a step.
            return Box::pin(async move {
                Ok(CommandOutput {
                    exit_code: Some(0),
                    ..CommandOutput::default()
                })
            });
        }
        self.calls.lock().unwrap().push(cmd.argv.clone());
        let drain = cmd.argv.iter().any(|a| is(a, "scontrol"))
            && cmd.argv.iter().any(|a| a == "state=drain");
        let out = if drain {
            CommandOutput {
                exit_code: Some(1),
                stderr: "scontrol: error: Invalid node name specified\n".into(),
                ..CommandOutput::default()
            }
        } else {
            CommandOutput {
                exit_code: Some(0),
                stdout: "ok\n".into(),
                ..CommandOutput::default()
            }
        };
        Box::pin(async move { Ok(out) })
    }
}

struct Walk {
    runbook: String,
    replies: Vec<String>,
    node_calls: Vec<Vec<String>>,
    markdown: String,
}

/// The shipped runbooks, with the Slurm drain available here.
fn runbooks(dir: &Path) -> std::path::PathBuf {
    // The node's binaries (found by name on the agent's search path).
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in [
        "scontrol",
        "sudo",
        "nvidia-smi",
        "dcgmi",
        "fuser",
        "nvidia-bug-report.sh",
    ] {
        crate::support::executable(&bin.join(name), "#!/bin/sh\n");
    }
    let scontrol = bin.join("scontrol");
    let out = dir.join("runbooks");
    std::fs::create_dir_all(&out).unwrap();
    for e in std::fs::read_dir("runbooks").unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) == Some("yaml") {
            let text = std::fs::read_to_string(&p)
                .unwrap()
                .replace("/usr/bin/scontrol", scontrol.to_str().unwrap());
            std::fs::write(out.join(p.file_name().unwrap()), text).unwrap();
        }
    }
    out
}

async fn walk(alertname: &str, labels: &[(&str, &str)]) -> Walk {
    let dir = tempfile::tempdir().unwrap();
    let rb = runbooks(dir.path());
    let signer = ExecSigner::generate();
    let key = dir.path().join("exec.key");
    std::fs::write(&key, signer.private_pem().unwrap().expose()).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // The node's agent: its own copy of the runbooks, its name, the bot's key.
    let runner = Arc::new(NodeRunner::default());
    let state = ExecState::new(
        ExecVerifier::new(vec![signer.public_key()], NODE),
        rb.clone(),
        64 * 1024,
        runner.clone(),
    )
    .with_search_path(
        gpuops::runbook::exec::resolve::SearchPath::first_then_default(&[dir.path().join("bin")]),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let _ = axum::serve(listener, agent_exec::router_with(Arc::new(state))).await;
    });

    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n[agents]\nsigning_key_file = \"{}\"\n[[agents.nodes]]\ninstance = \"{agent}\"\nnode = \"{NODE}\"\n",
        rb.display(),
        key.display()
    );
    let b = Bot::start_in(dir, &extra, None).await;
    let g = b.alert(webhook(alertname, &agent, labels)).await;

    // The alert message suggests a runbook with its Run button.
    b.wait_for(10, "the alert message", |b| {
        b.slack.calls().iter().any(|c| c.op == "post")
    })
    .await;
    let posted = b
        .slack
        .calls()
        .into_iter()
        .find(|c| c.op == "post")
        .unwrap();
    let Message::Alert(m) = &posted.message else {
        panic!("not an alert message: {posted:?}")
    };
    let runbook = m
        .buttons
        .iter()
        .find_map(|b| match b {
            Button::RunRunbook(id) => Some(id.clone()),
            _ => None,
        })
        .expect("a Run button");

    // An operator presses Run.
    let capture = Capture::start().await;
    let (action, value) = Button::RunRunbook(runbook.clone()).slack_action(g);
    let body = slack_button_body(OPERATOR, action, &value, &format!("{}/resp", capture.url));
    let (s, _) = b
        .send(slack_request(
            "/slack/interactions",
            &body,
            b.clock.now_unix(),
            SLACK_SECRET,
        ))
        .await;
    assert_eq!(s, 200);

    // An admin approves every request until the run finishes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut approved = 0;
    loop {
        let replies = b.slack.replies();
        if replies.iter().any(|r| r.contains("🏁 run")) {
            break;
        }
        let waiting = replies
            .iter()
            .filter(|r| r.contains("/gpuops approve r"))
            .count();
        if waiting > approved {
            let req = replies
                .iter()
                .rev()
                .find(|r| r.contains("/gpuops approve r"))
                .unwrap();
            let at = req.find("approve r").unwrap() + "approve ".len();
            let run = req[at..at + 7].to_string();
            let (_, v) = b.slack_command(ADMIN, &format!("approve {run}")).await;
            assert!(v.to_string().contains("approved"), "{v}");
            approved = waiting;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish: {replies:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = b.state.store.clone();
    let markdown = tokio::task::spawn_blocking(move || {
        gpuops::chat::timeline::group_markdown(&store, g)
            .unwrap()
            .unwrap_or_default()
    })
    .await
    .unwrap();
    let replies = b.slack.replies();
    let node_calls = runner.calls.lock().unwrap().clone();
    eprintln!(
        "--- thread ---\n{}\n--- audit --group {g} --markdown ---\n{markdown}",
        replies.join("\n")
    );
    b.stop();
    Walk {
        runbook,
        replies,
        node_calls,
        markdown,
    }
}

fn ran(w: &Walk, needle: &str) -> bool {
    w.node_calls
        .iter()
        .any(|argv| argv.join(" ").contains(needle))
}

/// What every walk must show: the node's real name, a timeline from the
/// run's start to the node's state, and the same story in the post-mortem.
fn timeline_checks(w: &Walk) {
    let all = w.replies.join("\n");
    assert!(all.contains("started run"), "{all}");
    assert!(all.contains(&format!("on node {NODE}")), "{all}");
    assert!(!all.contains("nodename=127"), "{all}");
    let last = w.replies.last().unwrap();
    assert!(
        last.contains("🏁 run") && last.contains("Node state"),
        "{last}"
    );
    for argv in &w.node_calls {
        for a in argv.iter().filter(|a| a.starts_with("nodename=")) {
            assert_eq!(a, &format!("nodename={NODE}"), "{argv:?}");
        }
    }
    assert!(w.markdown.starts_with('#'), "{}", w.markdown);
    assert!(w.markdown.contains(&w.runbook), "{}", w.markdown);
    assert!(w.markdown.contains(NODE), "{}", w.markdown);
}

#[tokio::test]
async fn xid_79_fell_off_the_bus_failed_drain_means_no_reboot() {
    let w = walk(
        "GPUXIDFellOffBus",
        &[
            ("xid", "79"),
            ("gpu", "3"),
            ("pci_bus_id", "00000000:3B:00.0"),
        ],
    )
    .await;
    assert_eq!(w.runbook, "gpu-fell-off-bus");
    timeline_checks(&w);
    assert!(ran(&w, "scontrol update nodename=gpu-node-17 state=drain"));
    assert!(!ran(&w, "reboot"), "{:?}", w.node_calls);
    assert!(!ran(&w, "nvidia-smi -r"), "{:?}", w.node_calls);
    assert!(!ran(&w, "state=resume"), "{:?}", w.node_calls);
    let last = w.replies.last().unwrap();
    assert!(last.contains("gpu-node-17 is NOT drained"), "{last}");
    let all = w.replies.join("\n");
    assert!(
        all.contains("mitigate reboot")
            && all.contains("skipped: drain did not succeed (drain-slurm failed)"),
        "{all}"
    );
    assert!(
        all.contains("escalate escalate") && all.contains("succeeded"),
        "{all}"
    );
}

#[tokio::test]
async fn xid_48_memory_error_failed_drain_means_no_reset() {
    let w = walk("GPUXIDMemoryError", &[("xid", "48"), ("gpu", "5")]).await;
    assert_eq!(w.runbook, "gpu-ecc-remap");
    timeline_checks(&w);
    assert!(ran(&w, "state=drain"));
    assert!(!ran(&w, "nvidia-smi -r"), "{:?}", w.node_calls);
    assert!(!ran(&w, "systemctl stop"), "{:?}", w.node_calls);
    let last = w.replies.last().unwrap();
    assert!(last.contains("gpu-node-17 is NOT drained"), "{last}");
}

#[tokio::test]
async fn xid_13_application_fault_changes_nothing_on_the_node() {
    let w = walk("GPUXIDError", &[("xid", "13"), ("gpu", "1")]).await;
    assert_eq!(w.runbook, "gpu-xid");
    timeline_checks(&w);
    assert!(!ran(&w, "scontrol"), "{:?}", w.node_calls);
    assert!(!ran(&w, "sudo -n nvidia-smi"), "{:?}", w.node_calls);
    let last = w.replies.last().unwrap();
    assert!(
        last.contains("gpu-node-17 was not changed; it is still serving jobs"),
        "{last}"
    );
}

#[tokio::test]
async fn full_disk_failed_drain_is_said_plainly() {
    let w = walk(
        "StorageFull",
        &[("mountpoint", "/scratch"), ("device", "nvme0n1p1")],
    )
    .await;
    assert_eq!(w.runbook, "storage");
    timeline_checks(&w);
    assert!(
        ran(&w, "du -x -h --max-depth=1 /scratch"),
        "{:?}",
        w.node_calls
    );
    assert!(ran(&w, "lsof -n -P -a +L1 /scratch"), "{:?}", w.node_calls);
    let last = w.replies.last().unwrap();
    assert!(last.contains("gpu-node-17 is NOT drained"), "{last}");
}
