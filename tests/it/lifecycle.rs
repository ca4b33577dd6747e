//! Nodes out of service, through the bot's router: a runbook's drain puts
//! its node in `quarantined`, the reboot in `verifying`, the resume back in
//! service with the GPU-hours the stretch cost; `/gpuops nodes` lists the
//! nodes out, most GPU-hours lost first; `/gpuops node … awaiting-repair`
//! and `… return` need an operator; the bot's `/metrics` exports them; a
//! node left quarantined gets one reminder a day in its thread; the report
//! lists the nodes out; the shipped XID 79 runbook's success path takes
//! its node out and back (a scripted node standing in for the agent). Each
//! case runs on SQLite and on PostgreSQL (`chat_on_both!`).

use crate::chat_support;

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use chat_support::*;
use futures_util::future::BoxFuture;
use gpuops::lifecycle::{NodeState, Transition};
use gpuops::runbook::engine::{Executor, NodeSteps};
use gpuops::runbook::exec::{CommandOutput, CommandRunner, CommandSpec, RunError};
use gpuops::signing::Clock as _;

/// The shape of the shipped XID 79 runbook: drain, reboot, verify, resume.
const RUNBOOK: &str = r#"
id: life
title: Lifecycle test
params:
  node:
    pattern: '(?P<value>[A-Za-z0-9][A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9.-]+)?(?::[0-9]{1,5})?'
    from_label: instance
steps:
  - name: drain-slurm
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    run: ["scontrol", "update", "nodename={{node}}", "state=drain"]
    node_state: quarantined
  - name: reboot
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    requires: [drain-slurm]
    approval_group: reboot-path
    run: ["systemctl", "reboot"]
    node_state: verifying
  - name: verify-dcgm
    phase: mitigate
    kind: command
    target: node
    requires: [reboot]
    needs_approval: true
    approval_group: reboot-path
    run: ["dcgmi", "diag", "-r", "2"]
    node_state_on_failure: awaiting_repair
  - name: resume-slurm
    phase: mitigate
    kind: command
    target: node
    needs_approval: true
    requires: [verify-dcgm]
    run: ["scontrol", "update", "nodename={{node}}", "state=resume"]
    node_state: in_service
"#;

/// Answers every command with exit 0 (programs in `failing`: exit 1).
#[derive(Default)]
struct Scripted {
    calls: Mutex<Vec<Vec<String>>>,
    failing: Mutex<Vec<String>>,
}

impl CommandRunner for Scripted {
    fn run<'a>(&'a self, cmd: &'a CommandSpec) -> BoxFuture<'a, Result<CommandOutput, RunError>> {
        self.calls.lock().unwrap().push(cmd.argv.clone());
        let program = cmd.argv[0]
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let fail = self.failing.lock().unwrap().contains(&program);
        let out = CommandOutput {
            exit_code: Some(i32::from(fail)),
            stdout: format!("ran: {}\n", cmd.argv.join(" ")),
            ..CommandOutput::default()
        };
        Box::pin(async move { Ok(out) })
    }
}

async fn bot() -> (Bot, Arc<Scripted>) {
    bot_with("").await
}

/// [`bot`] with more configuration appended.
async fn bot_with(more: &str) -> (Bot, Arc<Scripted>) {
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("life.yaml"), RUNBOOK).unwrap();
    let runner = Arc::new(Scripted::default());
    let exec = Arc::new(
        Executor::new(runner.clone(), NodeSteps::Local, None).with_search_path(
            gpuops::runbook::exec::resolve::SearchPath::first_then_default(&[
                crate::support::fake_node_bins().to_path_buf(),
            ]),
        ),
    );
    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n\n[lifecycle]\ngpus_per_node = 8\n{more}",
        rb.display()
    );
    (Bot::start_in(dir, &extra, Some(exec)).await, runner)
}

fn text(v: &serde_json::Value) -> String {
    v["text"].as_str().unwrap_or_default().to_string()
}

/// The XID 79 alert on gpu-node-17, GPU 3; its group id.
async fn xid_alert(b: &Bot) -> i64 {
    b.alert(webhook(
        "GPUXIDFellOffBus",
        "gpu-node-17:9949",
        &[("xid", "79"), ("gpu", "3")],
    ))
    .await
}

async fn node(b: &Bot, name: &str) -> Option<gpuops::lifecycle::NodeRecord> {
    b.state
        .store
        .node_states()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.node == name)
}

/// Waits until gpu-node-17 is in `state`.
async fn wait_state(b: &Bot, state: NodeState) -> gpuops::lifecycle::NodeRecord {
    for _ in 0..400 {
        if let Some(r) = node(b, "gpu-node-17").await {
            if r.state == state {
                return r;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!(
        "gpu-node-17 never became {state:?}: {:?}; replies: {:#?}",
        node(b, "gpu-node-17").await,
        b.slack.replies()
    );
}

/// The run waiting for approval (the only run of these tests).
async fn run_id(b: &Bot) -> String {
    b.state.store.run_ids().await.unwrap().remove(0)
}

/// Waits until the run waits for approval of `step`.
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

async fn approve(b: &Bot, step: &str) {
    approve_as(b, ADMIN, step).await
}

async fn approve_as(b: &Bot, approver: &str, step: &str) {
    wait_request(b, step).await;
    let run = run_id(b).await;
    let (_, v) = b.slack_command(approver, &format!("approve {run}")).await;
    assert!(text(&v).contains(&format!("approved step `{step}`")), "{v}");
}

async fn drain_success_quarantines_the_node() {
    let (b, runner) = bot().await;
    let g = xid_alert(&b).await;
    assert!(node(&b, "gpu-node-17").await.is_none());
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run life:drain-slurm alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    approve(&b, "drain-slurm").await;
    let r = wait_state(&b, NodeState::Quarantined).await;
    let run = run_id(&b).await;
    assert_eq!(r.since, b.clock.now_unix() as f64);
    assert_eq!(r.out_since, Some(r.since));
    assert_eq!(r.gpus, 8);
    assert_eq!(r.step.as_deref(), Some("drain-slurm"));
    assert_eq!(r.run.as_deref(), Some(run.as_str()));
    assert_eq!(r.by.as_deref(), Some("slack:U0ADMIN"), "the approver acted");
    assert_eq!(r.alert.as_deref(), Some("GPUXIDFellOffBus"));
    assert_eq!(r.xid.as_deref(), Some("79"));
    assert_eq!(r.group_id, Some(g));
    assert!(
        r.reason
            .contains("drain-slurm succeeded (life): GPUXIDFellOffBus XID 79 on GPU 3"),
        "{}",
        r.reason
    );
    let first = runner.calls.lock().unwrap()[0].clone();
    assert!(first[0].ends_with("/scontrol"), "{first:?}");
    assert_eq!(
        first[1..],
        ["update", "nodename=gpu-node-17", "state=drain"]
    );
    b.stop();
}

async fn resume_success_returns_the_node_to_service_with_gpu_hours_lost() {
    let (b, _runner) = bot().await;
    let g = xid_alert(&b).await;
    let start = b.clock.now_unix();
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run life alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    approve(&b, "drain-slurm").await;
    wait_state(&b, NodeState::Quarantined).await;
    // The reboot is approved 9 minutes later (within the approval's 10),
    // the resume 9 minutes after that.
    wait_request(&b, "reboot").await;
    b.clock.set(start + 540);
    approve(&b, "reboot").await;
    let v = wait_state(&b, NodeState::Verifying).await;
    assert_eq!(
        (v.since, v.out_since),
        ((start + 540) as f64, Some(start as f64))
    );
    wait_request(&b, "resume-slurm").await;
    b.clock.set(start + 1080);
    approve(&b, "resume-slurm").await;
    let back = wait_state(&b, NodeState::InService).await;
    assert_eq!(back.out_since, None);
    let hist = b.state.store.node_transitions(0.0).await.unwrap();
    let path: Vec<(NodeState, NodeState)> = hist.iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        path,
        [
            (NodeState::InService, NodeState::Quarantined),
            (NodeState::Quarantined, NodeState::Verifying),
            (NodeState::Verifying, NodeState::InService),
        ]
    );
    // 18 minutes × 8 GPUs, said in the incident's thread too.
    assert_eq!(hist[2].lost_gpu_seconds, Some(1080.0 * 8.0));
    b.wait_for(10, "the return in the thread", |b| {
        b.slack.replies().iter().any(|r| {
            r.contains(
                "📍 gpu-node-17 is back in service (was verifying): 2.4 GPU-hours lost while out",
            )
        })
    })
    .await;
    let all = b.slack.replies().join("\n");
    assert!(
        all.contains("📍 gpu-node-17 is now quarantined (was in service): drain-slurm succeeded"),
        "{all}"
    );
    assert!(
        all.contains("📍 gpu-node-17 is now verifying (was quarantined)"),
        "{all}"
    );
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    assert!(text(&v).contains("every tracked node is in service"), "{v}");
    b.stop();
}

async fn verify_failure_leaves_the_node_awaiting_repair() {
    let (b, runner) = bot().await;
    runner.failing.lock().unwrap().push("dcgmi".into());
    let g = xid_alert(&b).await;
    b.slack_command(OPERATOR, &format!("run life alert={g}"))
        .await;
    approve(&b, "drain-slurm").await;
    approve(&b, "reboot").await;
    let r = wait_state(&b, NodeState::AwaitingRepair).await;
    assert!(r.reason.contains("verify-dcgm failed"), "{}", r.reason);
    b.stop();
}

/// A run on an alert about a pod says which pod in its thread's start
/// line (the run's context), the pod's names as data.
async fn run_context_names_the_pod() {
    let (b, _) = bot().await;
    let g = b
        .alert(webhook(
            "GPUXIDFellOffBus",
            "gpu-node-17:9949",
            &[
                ("xid", "79"),
                ("gpu", "3"),
                ("namespace", "training"),
                ("pod", "llama-ft-7b-0\n<!channel>"),
            ],
        ))
        .await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run life:drain-slurm alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    b.wait_for(10, "the run's thread line", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.starts_with("▶ ") && r.contains("started run"))
    })
    .await;
    let start = b
        .slack
        .replies()
        .into_iter()
        .find(|r| r.starts_with("▶ ") && r.contains("started run"))
        .unwrap();
    assert!(
        start.contains("on node gpu-node-17, pod training/llama-ft-7b-0 <!channel> (1 step)"),
        "{start}"
    );
    b.stop();
}

/// Puts `name` out of service `hours` ago with `gpus` GPUs.
async fn out(b: &Bot, name: &str, state: NodeState, hours: i64, gpus: i64, reason: &str) {
    let a = b
        .state
        .store
        .node_transition(Transition {
            node: name.into(),
            to: Some(state),
            at: (b.clock.now_unix() - hours * 3600) as f64,
            reason: reason.into(),
            step: Some("drain-slurm".into()),
            run: Some("r0a1b2c".into()),
            by: Some("alice".into()),
            gpus,
            ..Transition::default()
        })
        .await
        .unwrap();
    assert!(a.changed);
}

async fn nodes_command_lists_out_of_service_nodes_sorted_by_gpu_hours_lost() {
    let (b, _) = bot().await;
    out(&b, "gpu-node-1", NodeState::Quarantined, 2, 4, "XID 79").await; // 8 GPU-h
    out(
        &b,
        "gpu-node-2",
        NodeState::AwaitingRepair,
        3,
        8,
        "RMA <!channel>",
    )
    .await; // 24
    out(&b, "gpu-node-3", NodeState::Verifying, 2, 8, "reboot").await; // 16
    let (s, v) = b.slack_command(STRANGER, "nodes").await;
    assert_eq!(s, 200);
    let t = text(&v);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 4, "{t}");
    assert!(
        lines[0].starts_with("3 nodes out of service (20 GPUs, 48.0 GPU-hours lost so far)"),
        "{t}"
    );
    for (line, name) in lines[1..]
        .iter()
        .zip(["gpu-node-2", "gpu-node-3", "gpu-node-1"])
    {
        assert!(line.contains(name), "{t}");
    }
    assert!(lines[1].contains("awaiting repair since"), "{t}");
    assert!(
        lines[1].contains("last: drain-slurm by alice (run r0a1b2c)"),
        "{t}"
    );
    assert!(lines[1].ends_with("24.0 GPU-hours lost"), "{t}");
    // Outside text is escaped for Slack: no mention reaches the channel.
    assert!(lines[1].contains("RMA &lt;!channel&gt;"), "{t}");
    b.stop();
}

async fn node_command_needs_operator_role() {
    let (b, _) = bot().await;
    out(&b, "gpu-node-17", NodeState::Quarantined, 5, 8, "XID 79").await;
    let (_, v) = b
        .slack_command(STRANGER, "node gpu-node-17 awaiting-repair \"RMA 12345\"")
        .await;
    assert!(
        text(&v).contains("setting a node's state needs the operator or admin role"),
        "{v}"
    );
    assert_eq!(
        node(&b, "gpu-node-17").await.unwrap().state,
        NodeState::Quarantined
    );
    let (_, v) = b
        .slack_command(OPERATOR, "node gpu-node-17 awaiting-repair \"RMA 12345\"")
        .await;
    assert!(text(&v).contains("set gpu-node-17 awaiting repair"), "{v}");
    let r = node(&b, "gpu-node-17").await.unwrap();
    assert_eq!(r.state, NodeState::AwaitingRepair);
    assert_eq!(r.reason, "RMA 12345");
    assert_eq!(r.by.as_deref(), Some("slack:U0OPER"));
    assert_eq!(r.out_since, Some((b.clock.now_unix() - 5 * 3600) as f64));
    let (_, v) = b.slack_command(OPERATOR, "node gpu-node-17 return").await;
    assert!(
        text(&v).contains("after 40.0 GPU-hours out of service"),
        "{v}"
    );
    let (_, v) = b.slack_command(OPERATOR, "node gpu-node-17 return").await;
    assert!(text(&v).contains("already in service"), "{v}");
    let (_, v) = b.slack_command(OPERATOR, "node gpu-node-9 return").await;
    assert!(text(&v).contains("not out of service"), "{v}");
    let audit: Vec<(String, String)> = b
        .audit()
        .await
        .into_iter()
        .filter(|a| a.action == "node")
        .map(|a| (a.who, a.outcome))
        .collect();
    assert_eq!(
        audit,
        [
            (
                "slack:U0STRANGER".to_string(),
                "denied: setting a node's state needs the operator or admin role".to_string()
            ),
            ("slack:U0OPER".into(), "ok".into()),
            ("slack:U0OPER".into(), "ok".into()),
            ("slack:U0OPER".into(), "unchanged".into()),
            ("slack:U0OPER".into(), "refused: not tracked".into()),
        ]
    );
    b.stop();
}

async fn metrics_export_nodes_per_state_and_each_node_out_of_service() {
    let (b, _) = bot().await;
    out(&b, "gpu-node-17", NodeState::Quarantined, 2, 8, "XID 79").await;
    out(&b, "gpu-node-18", NodeState::AwaitingRepair, 1, 8, "RMA").await;
    let (s, m) = b
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert_eq!(s, 200);
    for line in [
        "gpuops_nodes{state=\"quarantined\"} 1",
        "gpuops_nodes{state=\"awaiting_repair\"} 1",
        "gpuops_nodes{state=\"verifying\"} 0",
        "gpuops_nodes{state=\"in_service\"} 0",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }
    let secs = |node: &str, state: &str| -> f64 {
        let p = format!("gpuops_node_out_of_service_seconds{{node=\"{node}\",state=\"{state}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&p))
            .unwrap_or_else(|| panic!("{p} in\n{m}"))
            .parse()
            .unwrap()
    };
    // The gauge uses the wall clock; the test clock is the wall clock at start.
    assert!((secs("gpu-node-17", "quarantined") - 7200.0).abs() < 120.0);
    assert!((secs("gpu-node-18", "awaiting_repair") - 3600.0).abs() < 120.0);
    // A returned node's series goes away.
    b.slack_command(OPERATOR, "node gpu-node-18 return").await;
    let (_, m) = b
        .send(Request::get("/metrics").body(Body::empty()).unwrap())
        .await;
    assert!(!m.contains("node=\"gpu-node-18\""), "{m}");
    assert!(
        m.lines()
            .any(|l| l == "gpuops_nodes{state=\"in_service\"} 1"),
        "{m}"
    );
    b.stop();
}

/// An XID 79 alert on gpu-node-17, drained by alice now (its incident
/// thread's group); the time it was drained.
async fn drained_by_alice(b: &Bot) -> f64 {
    let g = xid_alert(b).await;
    let t0 = b.clock.now_unix() as f64;
    b.state
        .store
        .node_transition(Transition {
            node: "gpu-node-17".into(),
            to: Some(NodeState::Quarantined),
            at: t0,
            reason: "drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79".into(),
            step: Some("drain-slurm".into()),
            by: Some("alice".into()),
            gpus: 8,
            group_id: Some(g),
            ..Transition::default()
        })
        .await
        .unwrap();
    t0
}

async fn a_node_left_quarantined_gets_one_reminder_a_day_in_its_thread() {
    let (b, _) = bot().await;
    let t0 = drained_by_alice(&b).await;
    let cfg = b.state.config.lifecycle.clone();
    let remind = |h: f64| {
        let store = b.state.store.clone();
        let cfg = cfg.clone();
        async move {
            gpuops::lifecycle::remind_due(&store, &cfg, &[], t0 + h * 3600.0)
                .await
                .unwrap()
        }
    };
    assert_eq!(remind(11.0).await, 0, "remind_after is 12h");
    assert_eq!(remind(13.0).await, 1);
    // A second replica, or this one after a restart, the same hour: none.
    assert_eq!(remind(13.5).await, 0);
    assert_eq!(remind(36.0).await, 0, "at most daily");
    assert_eq!(remind(37.0).await, 1);
    b.state.outbox.wake();
    b.wait_for(10, "two reminders in the thread", |b| {
        b.slack
            .replies()
            .iter()
            .filter(|r| r.contains("⏰ gpu-node-17 has been quarantined for"))
            .count()
            == 2
    })
    .await;
    let all = b.slack.replies().join("\n");
    assert!(
        all.contains("⏰ gpu-node-17 has been quarantined for 13h 0m with nothing done since (drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79; last: drain-slurm by alice); 104.0 GPU-hours lost so far."),
        "{all}"
    );
    assert!(all.contains("for 1d 13h"), "{all}");
    b.stop();
}

/// The reminder also goes to the report channel (a post of its own),
/// claimed with the thread's (one claim: at most one a day, whatever the
/// number of passes), naming the last person who acted.
async fn a_node_left_quarantined_is_reminded_once_a_day_in_the_report_channel_too() {
    let (b, _) = bot_with(
        "[prometheus]\nurl = \"http://127.0.0.1:9\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\nslack_channel = \"C0REPORTS\"\n",
    )
    .await;
    let channels = gpuops::lifecycle::report_channels(&b.state.config);
    assert_eq!(channels, vec!["slack:C0REPORTS".to_string()]);
    let t0 = drained_by_alice(&b).await;
    let cfg = b.state.config.lifecycle.clone();
    let remind = |h: f64| {
        let (store, cfg, channels) = (b.state.store.clone(), cfg.clone(), channels.clone());
        async move {
            gpuops::lifecycle::remind_due(&store, &cfg, &channels, t0 + h * 3600.0)
                .await
                .unwrap()
        }
    };
    assert_eq!(remind(13.0).await, 1);
    assert_eq!(remind(13.5).await, 0, "claimed once");
    assert_eq!(remind(36.0).await, 0, "at most daily");
    assert_eq!(remind(37.0).await, 1);
    b.state.outbox.wake();
    let in_channel = |b: &Bot| -> Vec<String> {
        b.slack
            .calls()
            .into_iter()
            .filter(|c| c.channel == "C0REPORTS")
            .filter_map(|c| match c.message {
                gpuops::notify::Message::Text(t) => Some(t.text),
                _ => None,
            })
            .collect()
    };
    b.wait_for(10, "two reminders in the report channel", move |b| {
        in_channel(b).len() == 2
    })
    .await;
    let posts = in_channel(&b);
    assert!(
        posts[0].starts_with("⏰ gpu-node-17 has been quarantined for 13h 0m"),
        "{posts:?}"
    );
    assert!(posts[0].contains("last: drain-slurm by alice"), "{posts:?}");
    assert!(posts[1].contains("for 1d 13h"), "{posts:?}");
    // And the thread got the same two, not more.
    let thread = b
        .slack
        .replies()
        .iter()
        .filter(|r| r.contains("⏰ gpu-node-17"))
        .count();
    assert_eq!(thread, 2);
    b.stop();
}

/// A node that returned to service and fails again with the same XID
/// within `repeat_window`: the run's start message and its thread line say
/// to replace the hardware rather than reset or reboot it again.
async fn a_run_on_a_node_failing_again_with_the_same_fault_advises_replacing_the_hardware() {
    let (b, _) = bot().await;
    let now = b.clock.now_unix() as f64;
    let day = 86_400.0;
    let go = |to: NodeState, at: f64| Transition {
        node: "gpu-node-17".into(),
        to: Some(to),
        at,
        reason: "earlier".into(),
        alert: Some("GPUXIDFellOffBus".into()),
        xid: Some("79".into()),
        by: Some("alice".into()),
        gpus: 8,
        repeat_window_secs: 7.0 * day,
        ..Transition::default()
    };
    for t in [
        go(NodeState::Quarantined, now - 3.0 * day),
        go(NodeState::InService, now - 2.0 * day),
    ] {
        assert!(b.state.store.node_transition(t).await.unwrap().changed);
    }
    let g = xid_alert(&b).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run life alert={g}"))
        .await;
    let date = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs((now - 2.0 * day) as u64),
    )
    .to_string();
    let advice = format!(
        "🔁 gpu-node-17 is a repeat of XID 79 within 7 days of its return on {}: replace the hardware (RMA) rather than reset/reboot again",
        &date[..10]
    );
    assert!(text(&v).contains("started run"), "{v}");
    assert!(text(&v).contains(&advice), "{v}");
    b.wait_for(10, "the run's thread line", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.starts_with("▶ ") && r.contains("started run"))
    })
    .await;
    let start = b
        .slack
        .replies()
        .into_iter()
        .find(|r| r.starts_with("▶ ") && r.contains("started run"))
        .unwrap();
    assert!(start.contains(&advice), "{start}");

    // Another fault on another node: no advice.
    let g2 = b
        .alert(webhook(
            "GPUXIDFellOffBus",
            "gpu-node-18:9949",
            &[("xid", "79"), ("gpu", "1")],
        ))
        .await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run life alert={g2}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    assert!(!text(&v).contains("repeat"), "{v}");
    b.stop();
}

/// A scripted node on which every step succeeds: records each step it
/// receives as (step, the command as rendered) and answers exit 0. It
/// stands in for the agent (and for `scontrol`, `kubectl`, `nvidia-smi`).
#[derive(Default)]
struct ScriptedNode {
    received: Mutex<Vec<(String, String)>>,
}

impl gpuops::runbook::engine::StepExecutor for ScriptedNode {
    fn execute<'a>(
        &'a self,
        _plan: &'a gpuops::runbook::engine::RunPlan,
        step: &'a gpuops::runbook::engine::PlannedStep,
    ) -> BoxFuture<'a, gpuops::runbook::engine::StepOutcome> {
        self.received
            .lock()
            .unwrap()
            .push((step.step.name.clone(), step.rendered.display()));
        Box::pin(async move {
            gpuops::runbook::engine::StepOutcome {
                status: gpuops::runbook::engine::StepStatus::Succeeded,
                exit_code: Some(0),
                output: "ok\n".into(),
                duration: std::time::Duration::from_millis(1),
                truncated: false,
            }
        })
    }
}

/// The shipped XID 79 runbook's success path from its alert: drain →
/// quarantined, reboot → verifying, verify, resume → in service; each
/// mitigation the node receives is the command its approver saw.
async fn shipped_fell_off_bus_success_path_takes_the_node_out_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::copy(
        "runbooks/gpu-fell-off-bus.yaml",
        rb.join("gpu-fell-off-bus.yaml"),
    )
    .unwrap();
    let node = Arc::new(ScriptedNode::default());
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    let b = Bot::start_in(dir, &extra, Some(node.clone())).await;
    let g = b
        .alert(webhook(
            "GPUXIDFellOffBus",
            "gpu-node-17:9949",
            &[("xid", "79"), ("gpu", "3"), ("node", "gpu-node-17")],
        ))
        .await;
    let (_, v) = b
        // The reboot may be run by an admin only; another admin approves.
        .slack_command(ADMIN, &format!("run gpu-fell-off-bus alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    approve_as(&b, ADMIN2, "drain-slurm").await;
    wait_state(&b, NodeState::Quarantined).await;
    approve_as(&b, ADMIN2, "reboot").await;
    wait_state(&b, NodeState::Verifying).await;
    approve_as(&b, ADMIN2, "resume-slurm").await;
    wait_state(&b, NodeState::InService).await;
    b.wait_for(10, "the summary", |b| {
        b.slack.replies().iter().any(|r| r.contains("🏁"))
    })
    .await;
    // What each approver saw, in order, is what the node received.
    let seen: Vec<String> = b
        .slack
        .calls()
        .into_iter()
        .filter_map(|c| match c.message {
            // The block's first line is the planned command (then where it
            // runs, and the group's other steps).
            gpuops::notify::Message::Text(t) if t.text.contains("/gpuops approve r") => {
                t.code.and_then(|c| c.lines().next().map(str::to_string))
            }
            _ => None,
        })
        .collect();
    let received = node.received.lock().unwrap().clone();
    let mitigations: Vec<(String, String)> = received
        .iter()
        .filter(|(s, _)| ["drain-slurm", "reboot", "resume-slurm"].contains(&s.as_str()))
        .cloned()
        .collect();
    assert_eq!(
        mitigations
            .iter()
            .map(|(_, c)| c.clone())
            .collect::<Vec<_>>(),
        seen,
        "{received:#?}"
    );
    assert!(
        seen[0].contains("scontrol update nodename=gpu-node-17 state=drain"),
        "{seen:?}"
    );
    let steps: Vec<&str> = received.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        steps,
        [
            "kernel-log",
            "gpus-visible",
            "pci-devices",
            "gpu-up",
            "drain-slurm",
            "reboot",
            "verify-gpus",
            "verify-dcgm",
            "resume-slurm",
            "escalate"
        ]
    );
    let path: Vec<(NodeState, NodeState)> = b
        .state
        .store
        .node_transitions(0.0)
        .await
        .unwrap()
        .iter()
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(
        path,
        [
            (NodeState::InService, NodeState::Quarantined),
            (NodeState::Quarantined, NodeState::Verifying),
            (NodeState::Verifying, NodeState::InService),
        ]
    );
    b.stop();
}

/// The node states `node` went through, oldest first.
pub(crate) async fn states_of(b: &Bot, node: &str) -> Vec<NodeState> {
    b.state
        .store
        .node_transitions(0.0)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.node == node)
        .map(|t| t.to)
        .collect()
}

/// Runs shipped runbook `id` on group `g` as an admin and approves every
/// request as a second admin until the run finishes; the run's results
/// (also the walks with the real agent in `lifecycle_loop`).
pub(crate) async fn walk(b: &Bot, g: i64, id: &str) -> Vec<(String, String)> {
    let before = b.state.store.run_ids().await.unwrap();
    let (_, v) = b.slack_command(ADMIN, &format!("run {id} alert={g}")).await;
    assert!(text(&v).contains("started run"), "{id}: {v}");
    let mut run = None;
    let mut approved: Option<usize> = None;
    for _ in 0..1600 {
        if run.is_none() {
            run = b
                .state
                .store
                .run_ids()
                .await
                .unwrap()
                .into_iter()
                .find(|r| !before.contains(r));
        }
        if let Some(r) = &run {
            let rec = b.state.store.run(r).await.unwrap().unwrap();
            match rec.status.as_str() {
                "finished" => return rec.results,
                "waiting" if approved != Some(rec.next_step) => {
                    let (_, v) = b.slack_command(ADMIN2, &format!("approve {r}")).await;
                    assert!(text(&v).contains("approved step"), "{id}: {v}");
                    approved = Some(rec.next_step);
                }
                _ => {}
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{id}: the run did not finish: {:#?}", b.slack.replies());
}

/// Every shipped GPU mitigation runbook's success path against a scripted
/// node: the node leaves service at the drain and is back in service at
/// the end, and every command an approver saw is one the node received.
async fn shipped_gpu_runbooks_success_paths_return_their_node() {
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    let cases = [
        ("gpu-reset", "GPUCriticalXID", "62", "gpu-node-1"),
        ("gpu-ecc-remap", "GPURowRemapPending", "", "gpu-node-2"),
        ("gpu-nvlink", "GPUNVLinkErrors", "", "gpu-node-3"),
        ("gpu-fell-off-bus", "GPUFellOffBus", "79", "gpu-node-4"),
    ];
    for (id, ..) in cases {
        std::fs::copy(format!("runbooks/{id}.yaml"), rb.join(format!("{id}.yaml"))).unwrap();
    }
    let node = Arc::new(ScriptedNode::default());
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    let b = Bot::start_in(dir, &extra, Some(node.clone())).await;
    for (id, alert, xid, name) in cases {
        let mut labels = vec![("gpu", "3"), ("node", name)];
        if !xid.is_empty() {
            labels.push(("xid", xid));
        }
        let g = b
            .alert(webhook(alert, &format!("{name}:9949"), &labels))
            .await;
        let results = walk(&b, g, id).await;
        let states = states_of(&b, name).await;
        assert_eq!(
            states.first(),
            Some(&NodeState::Quarantined),
            "{id}: {results:?}"
        );
        assert_eq!(
            states.last(),
            Some(&NodeState::InService),
            "{id}: {results:?}"
        );
        assert!(
            !results
                .iter()
                .any(|(_, st)| st == "failed" || st == "error"),
            "{id}: {results:?}"
        );
    }
    let received: Vec<String> = node
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    let seen: Vec<String> = b
        .slack
        .calls()
        .into_iter()
        .filter_map(|c| match c.message {
            gpuops::notify::Message::Text(t) if t.text.contains("/gpuops approve r") => t.code,
            _ => None,
        })
        // Every command a request showed (its own, then the group's), not
        // the `# runs on …` notes.
        .flat_map(|code| {
            code.lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(seen.len() >= 12, "{seen:#?}");
    for cmd in &seen {
        assert!(received.contains(cmd), "approved but not received: {cmd}");
    }
    b.stop();
}

chat_on_both!(
    shipped_gpu_runbooks_success_paths_return_their_node,
    shipped_fell_off_bus_success_path_takes_the_node_out_and_back,
    report_lists_nodes_out_of_service_oldest_first_with_gpu_hours,
    report_says_availability_against_the_objective_with_budget_used,
    report_without_gpus_owned_says_availability_is_unknown,
    a_node_left_quarantined_gets_one_reminder_a_day_in_its_thread,
    a_node_left_quarantined_is_reminded_once_a_day_in_the_report_channel_too,
    a_run_on_a_node_failing_again_with_the_same_fault_advises_replacing_the_hardware,
    drain_success_quarantines_the_node,
    resume_success_returns_the_node_to_service_with_gpu_hours_lost,
    verify_failure_leaves_the_node_awaiting_repair,
    nodes_command_lists_out_of_service_nodes_sorted_by_gpu_hours_lost,
    node_command_needs_operator_role,
    metrics_export_nodes_per_state_and_each_node_out_of_service,
    run_context_names_the_pod,
);

/// `gpuops nodes` reads the same store (SQLite only: the CLI opens the file).
#[tokio::test]
async fn cli_nodes_lists_the_nodes_out_of_service() {
    let (b, _) = bot().await;
    out(&b, "gpu-node-1", NodeState::Quarantined, 2, 4, "XID 79").await;
    out(
        &b,
        "gpu-node-2",
        NodeState::AwaitingRepair,
        3,
        8,
        "RMA 12345",
    )
    .await;
    let toml = b.dir.path().join("bot.toml");
    std::fs::write(&toml, config_text(b.dir.path(), "")).unwrap();
    // Inline secrets: 0600, or the configuration is refused.
    std::fs::set_permissions(&toml, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let o = std::process::Command::new(crate::support::gpuops())
        .args(["nodes", "--config"])
        .arg(&toml)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("2 nodes out of service (12 GPUs, 32.0 GPU-hours"),
        "{stdout}"
    );
    assert!(
        lines[1].contains("gpu-node-2 · 8 GPUs · awaiting repair since"),
        "{stdout}"
    );
    assert!(lines[1].contains("RMA 12345"), "{stdout}");
    assert!(
        lines[2].contains("gpu-node-1 · 4 GPUs · quarantined since"),
        "{stdout}"
    );
    b.stop();
}

/// `[lifecycle]`: defaults, values, and every bad value reported at once.
#[test]
fn lifecycle_config_is_read_and_validated() {
    use gpuops::config::BotConfig;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bot.toml");
    let d = BotConfig::from_str(&path, "").unwrap().lifecycle;
    assert_eq!(d.gpus_per_node, 8);
    assert_eq!(d.remind_after, std::time::Duration::from_secs(12 * 3600));
    assert_eq!(d.repeat_window, std::time::Duration::from_secs(7 * 86_400));
    assert_eq!(d.availability_objective, 0.98);
    let c = BotConfig::from_str(
        &path,
        "[lifecycle]\ngpus_per_node = 4\nremind_after = \"6h\"\nrepeat_window = \"14d\"\navailability_objective = 0.995\n",
    )
    .unwrap()
    .lifecycle;
    assert_eq!(c.gpus_per_node, 4);
    assert_eq!(c.remind_after, std::time::Duration::from_secs(6 * 3600));
    assert_eq!(c.repeat_window, std::time::Duration::from_secs(14 * 86_400));
    assert_eq!(c.availability_objective, 0.995);
    let e = BotConfig::from_str(
        &path,
        "[lifecycle]\ngpus_per_node = 0\nremind_after = \"soon\"\navailability_objective = 98\nremind = 1\n",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "gpus_per_node: must be between 1 and 1024",
        "remind_after: \"soon\" is not a duration",
        "availability_objective: must be a fraction between 0 and 1",
        "remind",
    ] {
        assert!(e.contains(want), "{want} in {e}");
    }
}

/// The Incidents section of a report lists the nodes out at the period's
/// end, oldest first, with the GPU-hours lost in the period and over the
/// stretches (a node returned within the period counted too).
async fn report_lists_nodes_out_of_service_oldest_first_with_gpu_hours() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", crate::support::free_port());
    let text = format!(
        "[store]\npath = \"{}\"\n[slack]\nbot_token = \"xoxb-test\"\napi_url = \"http://127.0.0.1:1/api\"\n[prometheus]\nurl = \"{down}\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"UTC\"\nslack_channel = \"C0REPORTS\"\nsections = [\"incidents\"]\n",
        dir.path().join("bot.db").display()
    );
    let cfg = gpuops::config::BotConfig::from_str(&dir.path().join("bot.toml"), &text).unwrap();
    assert_eq!(cfg.reports[0].period.as_secs(), 86_400);
    let store = crate::support::open_store_at(&cfg.store.path).await;
    let at = gpuops::store::now().floor();
    let h = 3600.0;
    let go = |node: &str, to: NodeState, t: f64, gpus: i64, reason: &str| Transition {
        node: node.into(),
        to: Some(to),
        at: t,
        reason: reason.into(),
        by: Some("alice".into()),
        gpus,
        ..Transition::default()
    };
    for t in [
        go(
            "gpu-node-1",
            NodeState::Quarantined,
            at - 30.0 * h,
            8,
            "XID 79",
        ),
        go(
            "gpu-node-2",
            NodeState::AwaitingRepair,
            at - 5.0 * h,
            4,
            "RMA 12345",
        ),
        go(
            "gpu-node-3",
            NodeState::Quarantined,
            at - 30.0 * h,
            8,
            "XID 48",
        ),
        go(
            "gpu-node-3",
            NodeState::InService,
            at - 6.0 * h,
            8,
            "resumed",
        ),
    ] {
        assert!(store.node_transition(t).await.unwrap().changed);
    }
    let names = gpuops::inventory::Identity::from_config(&cfg).names().await;
    let built = gpuops::report::build(gpuops::report::Inputs {
        config: &cfg.reports[0],
        prometheus_url: &down,
        store: Some(&store),
        at: chrono::DateTime::from_timestamp(at as i64, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &Default::default(),
    })
    .await;
    let md = &built.markdown;
    // In the period: 24 h × 8 + 5 h × 4 + 18 h × 8; over the stretches: 30 h × 8 + 20 + 24 h × 8.
    assert!(
        md.contains("Out of service: 2 nodes (12 GPUs) at the period's end, 1 returned within it; 356.0 GPU-hours lost in the period, 452.0 over these stretches"),
        "{md}"
    );
    let one = md
        .find("Out of service: **gpu-node-1** quarantined since")
        .expect(md);
    let two = md
        .find("Out of service: **gpu-node-2** awaiting repair since")
        .expect(md);
    assert!(one < two, "oldest first: {md}");
    assert!(
        md.contains("(8 GPUs, 240.0 GPU-hours lost so far): XID 79, last by alice"),
        "{md}"
    );
}

/// The report's availability: GPU-hours in service over GPU-hours owned
/// (the inventory's nodes × `gpus_per_node`, a tracked node's own GPUs)
/// against `[lifecycle] availability_objective`, with the error budget used.
async fn report_says_availability_against_the_objective_with_budget_used() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", crate::support::free_port());
    let mut text = format!(
        "[store]\npath = \"{}\"\n[slack]\nbot_token = \"xoxb-test\"\napi_url = \"http://127.0.0.1:1/api\"\n[prometheus]\nurl = \"{down}\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"UTC\"\nslack_channel = \"C0REPORTS\"\nsections = [\"incidents\"]\n[lifecycle]\ngpus_per_node = 8\navailability_objective = 0.98\n[agents]\n",
        dir.path().join("bot.db").display()
    );
    // 25 nodes of 8 GPUs: 200 GPUs, 4800 GPU-hours a day; the 2 % budget
    // is 96 GPU-hours.
    for i in 1..=25 {
        text.push_str(&format!(
            "[[agents.nodes]]\ninstance = \"10.0.0.{i}:9400\"\nnode = \"gpu-node-{i}\"\n"
        ));
    }
    let cfg = gpuops::config::BotConfig::from_str(&dir.path().join("bot.toml"), &text).unwrap();
    let store = crate::support::open_store_at(&cfg.store.path).await;
    let at = gpuops::store::now().floor();
    let h = 3600.0;
    let go = |node: &str, to: NodeState, t: f64| Transition {
        node: node.into(),
        to: Some(to),
        at: t,
        reason: "XID 79".into(),
        by: Some("alice".into()),
        gpus: 8,
        ..Transition::default()
    };
    // gpu-node-1 out for the last 3 h (24 GPU-hours); gpu-node-2 out from
    // 30 h ago until 27 h ago: before the period, nothing in it.
    for t in [
        go("gpu-node-1", NodeState::Quarantined, at - 3.0 * h),
        go("gpu-node-2", NodeState::Quarantined, at - 30.0 * h),
        go("gpu-node-2", NodeState::InService, at - 27.0 * h),
    ] {
        assert!(store.node_transition(t).await.unwrap().changed);
    }
    let names = gpuops::inventory::Identity::from_config(&cfg).names().await;
    let built = gpuops::report::build(gpuops::report::Inputs {
        config: &cfg.reports[0],
        prometheus_url: &down,
        store: Some(&store),
        at: chrono::DateTime::from_timestamp(at as i64, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &cfg.lifecycle,
    })
    .await;
    let md = &built.markdown;
    // 24 of 4800 GPU-hours lost: 99.5 %; 24 of the 96 budgeted: 25 %.
    assert!(
        md.contains("Availability: 99.5 % (objective 98 %): 25 % of the period's error budget used (24.0 of 4800 GPU-hours lost, 200 GPUs owned)"),
        "{md}"
    );
    let a = built.figures.availability.expect("availability computed");
    assert_eq!(a.owned_gpus, 200);
    assert!((a.ratio - 0.995).abs() < 1e-9, "{a:?}");
    assert!((a.budget_used - 0.25).abs() < 1e-9, "{a:?}");
}

/// No inventory and no tracked node: availability is unknown, never 100 %.
async fn report_without_gpus_owned_says_availability_is_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let down = format!("http://127.0.0.1:{}", crate::support::free_port());
    let text = format!(
        "[store]\npath = \"{}\"\n[slack]\nbot_token = \"xoxb-test\"\napi_url = \"http://127.0.0.1:1/api\"\n[prometheus]\nurl = \"{down}\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"UTC\"\nslack_channel = \"C0REPORTS\"\nsections = [\"incidents\"]\n",
        dir.path().join("bot.db").display()
    );
    let cfg = gpuops::config::BotConfig::from_str(&dir.path().join("bot.toml"), &text).unwrap();
    let store = crate::support::open_store_at(&cfg.store.path).await;
    let names = gpuops::inventory::Identity::from_config(&cfg).names().await;
    let built = gpuops::report::build(gpuops::report::Inputs {
        config: &cfg.reports[0],
        prometheus_url: &down,
        store: Some(&store),
        at: chrono::DateTime::from_timestamp(gpuops::store::now() as i64, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &cfg.lifecycle,
    })
    .await;
    let md = &built.markdown;
    assert!(md.contains("Availability: unknown (no GPUs owned"), "{md}");
    assert!(!md.contains("100 %"), "{md}");
    assert_eq!(built.figures.availability, None);
}

/// Writes a stand-in `scontrol` (the shell `script`) into `dir/bin` and an
/// agent configuration with `[node_state] slurm = true` and that directory
/// on `[exec] path`; returns the configuration's path.
fn scontrol_config(dir: &std::path::Path, script: &str) -> std::path::PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let scontrol = bin.join("scontrol");
    crate::support::executable(&scontrol, script);
    let toml = dir.join("agent.toml");
    std::fs::write(
        &toml,
        format!(
            "[collectors]\ngpu = false\n[node_state]\nslurm = true\n[exec]\npath = [\"{}\"]\n",
            bin.display()
        ),
    )
    .unwrap();
    toml
}

/// Starts the real agent (node `gpu-node-17`) with the configuration `toml`.
#[allow(clippy::disallowed_methods)] // the real binary, as a node runs it
fn start_agent(dir: &std::path::Path, toml: &std::path::Path) -> (crate::support::Proc, String) {
    let addr = format!("127.0.0.1:{}", crate::support::free_port());
    let child = std::process::Command::new(crate::support::gpuops())
        .current_dir(dir)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .args([
            "agent",
            "--listen",
            &addr,
            "--node-name",
            "gpu-node-17",
            "--config",
        ])
        .arg(toml)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent = crate::support::Proc(child);
    crate::support::wait_listening(&addr, "agent");
    (agent, addr)
}

/// The real agent with a stand-in `scontrol` first on `[exec] path`.
fn agent_with_scontrol(dir: &std::path::Path, script: &str) -> (crate::support::Proc, String) {
    let toml = scontrol_config(dir, script);
    start_agent(dir, &toml)
}

/// Scrapes `addr` until a line starts with `want` (10 s); the exposition.
async fn scrape_until(addr: &str, want: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let body = match reqwest::get(format!("http://{addr}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if body.lines().any(|l| l.starts_with(want)) {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "no {want} in\n{body}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The agent runs `scontrol show node <its node> --oneliner` (found on
/// `[exec] path`) and exports the node's Slurm state: drained here.
#[tokio::test]
async fn agent_exports_the_slurm_drain_state_from_scontrol() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let script = format!(
        "#!/bin/sh\necho \"$@\" >> {}\necho 'NodeName=gpu-node-17 Arch=x86_64 CPUAlloc=0 State=IDLE+DRAIN ThreadsPerCore=2 Partitions=gpu Reason=XID 79 on GPU 3 [root@2026-12-03T10:00:00]'\n",
        calls.display()
    );
    let (_agent, addr) = agent_with_scontrol(dir.path(), &script);
    let m = scrape_until(&addr, "gpuops_node_scheduler_state{").await;
    let value = |state: &str| {
        let p = format!("gpuops_node_scheduler_state{{scheduler=\"slurm\",state=\"{state}\"}} ");
        m.lines()
            .find_map(|l| l.strip_prefix(&p))
            .unwrap_or_else(|| panic!("{p} in\n{m}"))
            .to_string()
    };
    for (state, v) in [
        ("drain", "1"),
        ("drained", "1"),
        ("idle", "1"),
        ("draining", "0"),
        ("down", "0"),
        ("allocated", "0"),
        ("mixed", "0"),
    ] {
        assert_eq!(value(state), v, "{state}");
    }
    assert!(
        m.contains("gpuops_collector_success{collector=\"node_state\"} 1"),
        "{m}"
    );
    let argv = std::fs::read_to_string(&calls).unwrap();
    assert_eq!(
        argv.lines().next(),
        Some("show node gpu-node-17 --oneliner")
    );
}

/// A `scontrol` that fails: the collector says so and exports no state
/// (never a guess).
#[tokio::test]
async fn agent_with_failing_scontrol_exports_no_slurm_state() {
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let (_agent, addr) = agent_with_scontrol(
        dir.path(),
        &format!(
            "#!/bin/sh\necho \"$@\" >> {}\necho 'slurm_load_node error: Unable to contact slurm controller' >&2\nexit 1\n",
            calls.display()
        ),
    );
    // After scontrol ran (and failed), not before the first reading.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !calls.exists() {
        assert!(std::time::Instant::now() < deadline, "scontrol never ran");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let m = scrape_until(&addr, "gpuops_collector_success{collector=\"node_state\"}").await;
    assert!(
        m.contains("gpuops_collector_success{collector=\"node_state\"} 0"),
        "{m}"
    );
    assert!(!m.contains("gpuops_node_scheduler_state{"), "{m}");
}

/// A `scontrol` in a directory any user can write is never run by the
/// agent (someone could replace it): no state, the collector failing.
#[tokio::test]
async fn agent_never_runs_a_scontrol_any_user_could_replace() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let toml = scontrol_config(
        dir.path(),
        &format!(
            "#!/bin/sh\necho \"$@\" >> {}\necho 'NodeName=gpu-node-17 State=IDLE'\n",
            calls.display()
        ),
    );
    std::fs::set_permissions(
        dir.path().join("bin"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let (_agent, addr) = start_agent(dir.path(), &toml);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let m = scrape_until(&addr, "gpuops_collector_success{collector=\"node_state\"}").await;
    assert!(
        !calls.exists(),
        "scontrol ran from a directory anyone can write"
    );
    assert!(
        m.contains("gpuops_collector_success{collector=\"node_state\"} 0"),
        "{m}"
    );
    assert!(!m.contains("gpuops_node_scheduler_state{"), "{m}");
}

/// Slurm's drain reason is exported as a label of
/// `gpuops_node_scheduler_info` (outside text: escaped by the exposition
/// encoder, without Slurm's `[user@time]`, whose time is `since`).
#[tokio::test]
async fn agent_exports_the_slurm_drain_reason_as_an_escaped_label() {
    let dir = tempfile::tempdir().unwrap();
    let script = "#!/bin/sh\nprintf '%s\\n' 'NodeName=gpu-node-17 State=IDLE+DRAIN Partitions=gpu Reason=XID 79 \"on\" GPU\\3 [root@2026-12-03T10:00:00]'\n";
    let (_agent, addr) = agent_with_scontrol(dir.path(), script);
    let m = scrape_until(&addr, "gpuops_node_scheduler_info{").await;
    assert!(
        m.lines().any(|l| l
            == r#"gpuops_node_scheduler_info{scheduler="slurm",reason="XID 79 \"on\" GPU\\3",since="2026-12-03T10:00:00"} 1"#),
        "{m}"
    );
}

/// `[lifecycle] found`, `found_interval`, `found_hold`: defaults, values,
/// and bad values reported.
#[test]
fn lifecycle_found_keys_are_read_and_validated() {
    use gpuops::config::BotConfig;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bot.toml");
    let d = BotConfig::from_str(&path, "").unwrap().lifecycle;
    assert!(d.found);
    assert_eq!(d.found_interval, std::time::Duration::from_secs(300));
    assert_eq!(d.found_hold, std::time::Duration::from_secs(1800));
    let c = BotConfig::from_str(
        &path,
        "[lifecycle]\nfound = false\nfound_interval = \"2m\"\nfound_hold = \"1h\"\n",
    )
    .unwrap()
    .lifecycle;
    assert!(!c.found);
    assert_eq!(c.found_interval, std::time::Duration::from_secs(120));
    assert_eq!(c.found_hold, std::time::Duration::from_secs(3600));
    let e = BotConfig::from_str(
        &path,
        "[lifecycle]\nfound = \"yes\"\nfound_interval = \"soon\"\nfound_hold = \"0s\"\n",
    )
    .unwrap_err()
    .to_string();
    for want in [
        "found:",
        "found_interval: \"soon\" is not a duration",
        "found_hold: \"0s\" must be above zero",
    ] {
        assert!(e.contains(want), "{want} in {e}");
    }
}
