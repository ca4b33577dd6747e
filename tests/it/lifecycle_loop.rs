//! Nodes out of service, the whole loop on loopback with the real agent:
//! `gpuops agent` (fake GPU backend, the bot's public key, the shipped
//! runbooks) with recording stand-ins for `sudo`, `scontrol`,
//! `systemctl`, `nvidia-smi`, `dcgmi`, … on its `[exec] path`
//! (`support::recording_bins`: each call's argv, one line each), the bot
//! through its router with that agent in its inventory, and a fake
//! Prometheus for the runbook's PromQL step. The agent searches the
//! default directories before `[exec] path`: this machine's own
//! `journalctl` answers the kernel-log step, and a `sudo … systemctl`
//! names `/usr/bin/systemctl` where there is one (the stand-in `sudo`
//! runs the stand-in of that name, never the real one); a machine with a
//! real `sudo`, `scontrol`, `nvidia-smi` or `dcgmi` there fails the test.
//!
//! - `xid_79_loop_on_the_real_agent_takes_the_node_out_and_back`: XID 79 →
//!   the shipped `gpu-fell-off-bus` run → drain planned by the agent
//!   (`/v1/plan`), approved, run by it (the stand-in `scontrol` records
//!   `update nodename=… state=drain …`) → quarantined → reboot → verify
//!   (`nvidia-smi -L`, `dcgmi diag`) → resume → in service; every command
//!   the node ran is the argv its approver saw; the thread, `/gpuops
//!   nodes` and the report show the stretch and its GPU-hours.
//! - `xid_79_loop_with_failing_dcgm_leaves_the_node_awaiting_repair`: the
//!   same loop with `dcgmi diag` failing: awaiting repair, never resumed.
//! - `shipped_gpu_runbooks_walk_the_real_agent_out_and_back`: every
//!   shipped GPU mitigation runbook's success path with the real agent:
//!   out at the drain, back at the end, every approved command run.
//! - `night_with_two_gpu_faults_then_morning_report`: two nodes drained in
//!   one night by two people; in the morning `/gpuops nodes` and the report
//!   say which, why, since when, who acted last and the GPU-hours; their
//!   return closes both stretches.
//! - `reminders_survive_kill_9_of_the_bot_*`: the real `gpuops bot`
//!   (SQLite, then PostgreSQL) reminds once of a node left quarantined,
//!   is killed with SIGKILL and started again on the same store, and does
//!   not remind again while its reminder loop keeps running; the node
//!   returned and failing again with the same XID is a repeat in the next
//!   run's start message.
//!
//! Each in-process case runs on SQLite and on PostgreSQL (`chat_on_both!`).
// Integration tests start the real binaries; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use crate::chat_support;
use crate::lifecycle::{states_of, walk};
use crate::support::{self, StandInCall};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use chat_support::*;
use gpuops::lifecycle::{NodeRecord, NodeState};
use gpuops::runbook::engine::quote_for_display;
use gpuops::signing::Clock as _;

const RUNBOOK: &str = "gpu-fell-off-bus";

/// What the stand-ins print (the rest print nothing).
const OUTPUTS: &[(&str, &str)] = &[
    (
        "nvidia-smi",
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e0d7c4a-0000-0000-0000-000000000000)\nGPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-5e0d7c4a-0000-0000-0000-000000000003)",
    ),
    (
        "lspci",
        "0000:18:00.0 3D controller [0302]: NVIDIA Corporation GH100 [H100 SXM5 80GB] [10de:2330] (rev a1)",
    ),
    (
        "dcgmi",
        "Successfully ran diagnostic for group.\n| Deployment | Pass |\n| Memory     | Pass |",
    ),
];

/// The programs a node has as stand-ins.
const STAND_INS: &[&str] = &[
    "sudo",
    "scontrol",
    "systemctl",
    "nvidia-smi",
    "dcgmi",
    "lspci",
    "journalctl",
    "kubectl",
    "fuser",
    "nvidia-bug-report.sh",
    "sysctl",
];

/// One real agent on loopback and its stand-ins.
struct Node {
    name: String,
    addr: String,
    calls: PathBuf,
    _agent: Proc,
}

impl Node {
    /// Every call the node's stand-ins received, in order.
    fn calls(&self) -> Vec<StandInCall> {
        support::stand_in_calls(&self.calls)
    }

    /// The commands the agent itself ran (not `sudo -n -l` plan probes, not
    /// what the stand-in `sudo` ran in turn), as an approver reads them.
    fn executed(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.via.is_empty())
            .filter(|c| !(c.program() == "sudo" && c.argv.iter().any(|a| a == "-l")))
            .map(|c| display(&c.argv))
            .collect()
    }

    /// What the stand-in `sudo` ran (argv without `argv[0]`'s directory).
    fn via_sudo(&self) -> Vec<Vec<String>> {
        self.calls()
            .into_iter()
            .filter(|c| c.via == "sudo")
            .map(|c| {
                let mut v = vec![c.program().to_string()];
                v.extend(c.argv[1..].iter().cloned());
                v
            })
            .collect()
    }
}

fn display(argv: &[String]) -> String {
    argv.iter()
        .map(|a| quote_for_display(a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts the real agent for node `name`: fake GPUs, `runbooks`, the bot's
/// public key, the stand-ins on `[exec] path`.
fn start_node(
    dir: &Path,
    name: &str,
    runbooks: &Path,
    public_key: &Path,
    failing: &[&str],
) -> Node {
    // The agent searches the default directories before `[exec] path`: a
    // real sudo there would run the real `systemctl reboot` and `scontrol`,
    // a real nvidia-smi or dcgmi would answer instead of the stand-ins.
    for real in ["sudo", "scontrol", "nvidia-smi", "dcgmi"] {
        let found = gpuops::runbook::exec::resolve::SearchPath::default().find(real);
        assert!(
            found.is_none(),
            "this test runs the real agent with stand-ins after the default search path; {found:?} would run instead of its stand-in (run it on a machine without one)"
        );
    }
    let bin = dir.join(format!("{name}-bin"));
    let calls = dir.join(format!("{name}-calls"));
    support::recording_bins(&bin, &calls, STAND_INS, OUTPUTS, failing);
    let toml = dir.join(format!("{name}-agent.toml"));
    std::fs::write(
        &toml,
        format!(
            "[gpu]\nbackend = \"fake\"\nfake_fixture = \"{}/tests/fixtures/gpu/h100x8.json\"\n[exec]\npath = [\"{}\"]\n",
            env!("CARGO_MANIFEST_DIR"),
            bin.display()
        ),
    )
    .unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join(format!("{name}-agent.log"))).unwrap();
    let child = Command::new(support::gpuops())
        .args([
            "agent",
            "--listen",
            &addr,
            "--node-name",
            name,
            "--runbooks",
        ])
        .arg(runbooks)
        .arg("--exec-public-key")
        .arg(public_key)
        .arg("--config")
        .arg(&toml)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start gpuops agent");
    let agent = Proc(child);
    support::wait_listening(&addr, "the agent");
    Node {
        name: name.to_string(),
        addr,
        calls,
        _agent: agent,
    }
}

/// The shipped runbook in a directory of its own (the bot's and the agents').
fn runbooks(dir: &Path) -> PathBuf {
    let rb = dir.join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    for id in SHIPPED_GPU.iter().chain(&SHIPPED_HOST) {
        std::fs::copy(format!("runbooks/{id}.yaml"), rb.join(format!("{id}.yaml"))).unwrap();
    }
    rb
}

/// The shipped GPU mitigation runbooks (each drains its node and returns it).
const SHIPPED_GPU: [&str; 4] = [
    "gpu-fell-off-bus",
    "gpu-reset",
    "gpu-ecc-remap",
    "gpu-nvlink",
];

/// The shipped host mitigation runbooks (each drains its node; a person
/// returns it).
const SHIPPED_HOST: [&str; 6] = [
    "cpu-saturation",
    "gpu-throttle",
    "memory-pressure",
    "oom-kill",
    "storage",
    "storage-mount-stuck",
];

/// The bot (in-process, its router) with one real agent per name in its
/// inventory, a fake Prometheus and a daily report.
async fn fleet(names: &[&str]) -> (Bot, Vec<Node>, String) {
    fleet_failing(names, &[]).await
}

/// [`fleet`] with the stand-ins named in `failing` exiting 1.
async fn fleet_failing(names: &[&str], failing: &[&str]) -> (Bot, Vec<Node>, String) {
    let dir = tempfile::tempdir().unwrap();
    let rb = runbooks(dir.path());
    let (key, public, _) = exec_keys(dir.path());
    let nodes: Vec<Node> = names
        .iter()
        .map(|n| start_node(dir.path(), n, &rb, &public, failing))
        .collect();
    let prometheus = crate::report_support::fake_prometheus(Vec::new()).await;
    let mut extra = format!(
        "[runbooks]\ndir = \"{}\"\n[prometheus]\nurl = \"{prometheus}\"\n[lifecycle]\ngpus_per_node = 8\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\ntimezone = \"UTC\"\nslack_channel = \"C0REPORTS\"\nsections = [\"incidents\"]\n[agents]\nsigning_key_file = \"{}\"\n",
        rb.display(),
        key.display()
    );
    for n in &nodes {
        extra.push_str(&format!(
            "[[agents.nodes]]\ninstance = \"{}\"\nnode = \"{}\"\n",
            n.addr, n.name
        ));
    }
    let b = Bot::start_in(dir, &extra, None).await;
    (b, nodes, prometheus)
}

fn text(v: &serde_json::Value) -> String {
    v["text"].as_str().unwrap_or_default().to_string()
}

async fn node_row(b: &Bot, name: &str) -> Option<NodeRecord> {
    b.state
        .store
        .node_states()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.node == name)
}

/// Waits until `name` is in `state`.
async fn wait_state(b: &Bot, name: &str, state: NodeState) -> NodeRecord {
    for _ in 0..800 {
        if let Some(r) = node_row(b, name).await {
            if r.state == state {
                return r;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{name} never became {state:?}: {:?}; replies: {:#?}",
        node_row(b, name).await,
        b.slack.replies()
    );
}

/// The approval requests posted so far: (text, code block).
fn requests(b: &Bot) -> Vec<(String, String)> {
    b.slack
        .calls()
        .into_iter()
        .filter_map(|c| match c.message {
            gpuops::notify::Message::Text(t) if t.text.contains("/gpuops approve r") => {
                Some((t.text, t.code.unwrap_or_default()))
            }
            _ => None,
        })
        .collect()
}

/// Waits for the request to approve `step` of a run on `node`; the run's id.
async fn wait_request(b: &Bot, node: &str, step: &str) -> String {
    let header = format!(" {step} (");
    for _ in 0..800 {
        if let Some((t, _)) = requests(b)
            .into_iter()
            .rev()
            .find(|(t, c)| t.contains(&header) && c.contains(node))
        {
            let at = t.find("/gpuops approve ").unwrap() + "/gpuops approve ".len();
            return t[at..]
                .chars()
                .take_while(|c| c.is_alphanumeric())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "no approval request for {step} on {node}: {:#?}",
        b.slack.replies()
    )
}

/// Waits for the request to approve `step` of a run on `node` and approves
/// it as `approver`; the run's id.
async fn approve(b: &Bot, approver: &str, node: &str, step: &str) -> String {
    let run = wait_request(b, node, step).await;
    let (_, v) = b.slack_command(approver, &format!("approve {run}")).await;
    assert!(
        text(&v).contains(&format!("approved step `{step}`")),
        "{step}: {v}"
    );
    run
}

/// The bot's `/metrics`.
async fn metrics(b: &Bot) -> String {
    let (s, m) = b
        .send(
            axum::http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, 200);
    m
}

/// The report at `at` (the bot's config and store).
async fn report(b: &Bot, prometheus: &str, at: i64) -> String {
    let cfg = &b.state.config;
    let names = gpuops::inventory::Identity::from_config(cfg).names().await;
    gpuops::report::build(gpuops::report::Inputs {
        config: &cfg.reports[0],
        prometheus_url: prometheus,
        store: Some(&b.state.store),
        at: chrono::DateTime::from_timestamp(at, 0).unwrap(),
        late: false,
        agent_events: None,
        names: &names,
        lifecycle: &cfg.lifecycle,
    })
    .await
    .markdown
}

/// An XID 79 alert on `node` as Prometheus labels it (the agent's
/// instance; the bot names the node from its inventory); its group id.
async fn xid_79(b: &Bot, node: &Node, gpu: &str) -> i64 {
    b.alert(webhook(
        "GPUXIDFellOffBus",
        &node.addr,
        &[("xid", "79"), ("gpu", gpu)],
    ))
    .await
}

async fn xid_79_loop_on_the_real_agent_takes_the_node_out_and_back() {
    let (b, nodes, prometheus) = fleet(&["gpu-node-17"]).await;
    let node = &nodes[0];
    // The bot's clock starts 20 minutes back and catches up step by step:
    // the agent takes an approval given within the hour before the request
    // it signs (real time), never one from its future.
    let t0 = b.clock.now_unix() - 1200;
    b.clock.set(t0);
    let g = xid_79(&b, node, "3").await;
    // The reboot may be run by an admin only; another admin approves.
    let (_, v) = b
        .slack_command(ADMIN, &format!("run {RUNBOOK} alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    assert!(!text(&v).contains("repeat"), "{v}");

    // Drain: planned by the agent, approved, run by the agent.
    approve(&b, ADMIN2, "gpu-node-17", "drain-slurm").await;
    let q = wait_state(&b, "gpu-node-17", NodeState::Quarantined).await;
    assert_eq!(q.by.as_deref(), Some("slack:U0ADMIN2"));
    assert_eq!(q.step.as_deref(), Some("drain-slurm"));
    assert_eq!(q.out_since, Some(t0 as f64));
    assert_eq!(
        node.via_sudo().first().map(Vec::as_slice),
        Some(
            &[
                "scontrol".to_string(),
                "update".into(),
                "nodename=gpu-node-17".into(),
                "state=drain".into(),
                "reason=gpuops: GPUXIDFellOffBus".into(),
            ][..]
        ),
        "{:#?}",
        node.calls()
    );

    // The bot's metrics: one node quarantined, its stretch's seconds.
    let m = metrics(&b).await;
    assert!(
        m.lines()
            .any(|l| l == "gpuops_nodes{state=\"quarantined\"} 1"),
        "{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with(
            "gpuops_node_out_of_service_seconds{node=\"gpu-node-17\",state=\"quarantined\"} "
        )),
        "{m}"
    );
    // Out: `/gpuops nodes` and the report say so, 9 minutes in.
    b.clock.set(t0 + 540);
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    let t = text(&v);
    assert!(
        t.starts_with("1 node out of service (8 GPUs, 1.2 GPU-hours lost so far):"),
        "{t}"
    );
    assert!(
        t.contains("• gpu-node-17 · 8 GPUs · quarantined since "),
        "{t}"
    );
    assert!(
        t.contains("drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79 on GPU 3"),
        "{t}"
    );
    assert!(
        t.contains("last: drain-slurm by slack:U0ADMIN2 (run r"),
        "{t}"
    );
    assert!(t.ends_with("· 1.2 GPU-hours lost"), "{t}");
    let md = report(&b, &prometheus, t0 + 540).await;
    assert!(
        md.contains("Out of service: 1 node (8 GPUs) at the period's end, 0 returned within it; 1.2 GPU-hours lost in the period, 1.2 over these stretches"),
        "{md}"
    );
    assert!(
        md.contains("Out of service: **gpu-node-17** quarantined since"),
        "{md}"
    );
    assert!(md.contains("(8 GPUs, 1.2 GPU-hours lost so far)"), "{md}");

    // Reboot (and, in its approval group, the two verifications) 9
    // minutes after the drain, the resume 9 minutes after that.
    b.clock.set(t0 + 540);
    approve(&b, ADMIN2, "gpu-node-17", "reboot").await;
    let v = wait_state(&b, "gpu-node-17", NodeState::Verifying).await;
    assert_eq!((v.since, v.out_since), ((t0 + 540) as f64, Some(t0 as f64)));
    // The resume is asked for once both verifications passed.
    wait_request(&b, "gpu-node-17", "resume-slurm").await;
    b.clock.set(t0 + 1080);
    approve(&b, ADMIN2, "gpu-node-17", "resume-slurm").await;
    let back = wait_state(&b, "gpu-node-17", NodeState::InService).await;
    assert_eq!(back.out_since, None);
    let summary = run_summary(&b).await;
    // The timeline ends with the node's state in plain words.
    assert!(
        summary.contains("*Node state:* gpu-node-17 is back in service: Slurm resumed it"),
        "{summary}"
    );

    // What the node ran.
    let sudo = node.via_sudo();
    assert_eq!(
        sudo.iter().map(|argv| argv.join(" ")).collect::<Vec<_>>(),
        [
            "scontrol update nodename=gpu-node-17 state=drain reason=gpuops: GPUXIDFellOffBus",
            "systemctl reboot",
            "scontrol update nodename=gpu-node-17 state=resume",
        ],
        "{:#?}",
        node.calls()
    );
    let executed = node.executed();
    for want in ["nvidia-smi -L", "dcgmi diag -r 2"] {
        assert!(
            executed.iter().any(|c| c.ends_with(want)),
            "{want} not run: {executed:#?}"
        );
    }
    // Each command the node received is the argv its approver saw: the
    // requests' first lines, in order, are the node's sudo commands, and
    // every command a request showed (its own, then its group's) ran.
    let seen = requests(&b);
    assert_eq!(seen.len(), 3, "{seen:#?}");
    let first_lines: Vec<String> = seen
        .iter()
        .map(|(_, c)| c.lines().next().unwrap_or_default().to_string())
        .collect();
    let sudo_executed: Vec<String> = executed
        .iter()
        .filter(|c| c.split(' ').next().unwrap_or_default().ends_with("/sudo"))
        .cloned()
        .collect();
    assert_eq!(first_lines, sudo_executed, "{executed:#?}");
    for (_, code) in &seen {
        for cmd in code
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            assert!(
                executed.iter().any(|c| c == cmd),
                "approved but not run: {cmd}\n{executed:#?}"
            );
        }
    }

    // The timeline: the node's state at each step, the return's GPU-hours.
    let all = b.slack.replies().join("\n");
    for line in [
        "📍 gpu-node-17 is now quarantined (was in service): drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79 on GPU 3",
        "📍 gpu-node-17 is now verifying (was quarantined): reboot succeeded (gpu-fell-off-bus)",
        "📍 gpu-node-17 is back in service (was verifying): 2.4 GPU-hours lost while out",
    ] {
        assert!(all.contains(line), "{line} in\n{all}");
    }
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    assert!(text(&v).contains("every tracked node is in service"), "{v}");
    let m = metrics(&b).await;
    assert!(
        m.lines()
            .any(|l| l == "gpuops_nodes{state=\"in_service\"} 1"),
        "{m}"
    );
    assert!(!m.contains("node=\"gpu-node-17\""), "{m}");
    // A minute after the return (a period is [start, end)).
    let md = report(&b, &prometheus, t0 + 1140).await;
    assert!(
        md.contains("Out of service: 0 nodes (0 GPUs) at the period's end, 1 returned within it; 2.4 GPU-hours lost in the period, 2.4 over these stretches"),
        "{md}"
    );
    // 2.4 of 8 GPUs × 24 h lost.
    assert!(md.contains("Availability: 98.7 % (objective 98 %)"), "{md}");
    assert!(
        md.contains("(2.4 of 192 GPU-hours lost, 8 GPUs owned)"),
        "{md}"
    );
    b.stop();
}

/// The same loop where `dcgmi diag` fails after the reboot: the node is
/// left awaiting repair, its resume is never asked for nor run (the node
/// received the drain and the reboot only), and the summary and `/gpuops
/// nodes` say why.
async fn xid_79_loop_with_failing_dcgm_leaves_the_node_awaiting_repair() {
    let (b, nodes, _) = fleet_failing(&["gpu-node-17"], &["dcgmi"]).await;
    let node = &nodes[0];
    let t0 = b.clock.now_unix() - 600;
    b.clock.set(t0);
    let g = xid_79(&b, node, "3").await;
    let (_, v) = b
        .slack_command(ADMIN, &format!("run {RUNBOOK} alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    approve(&b, ADMIN2, "gpu-node-17", "drain-slurm").await;
    wait_state(&b, "gpu-node-17", NodeState::Quarantined).await;
    b.clock.set(t0 + 300);
    approve(&b, ADMIN2, "gpu-node-17", "reboot").await;
    let r = wait_state(&b, "gpu-node-17", NodeState::AwaitingRepair).await;
    assert!(
        r.reason
            .starts_with("verify-dcgm failed (gpu-fell-off-bus): GPUXIDFellOffBus XID 79"),
        "{}",
        r.reason
    );
    assert_eq!(r.out_since, Some(t0 as f64));
    let summary = run_summary(&b).await;
    assert!(
        summary.contains("DCGM diagnostics fail on gpu-node-17 after the reboot; it stays drained"),
        "{summary}"
    );
    assert!(summary.contains("skipped     resume-slurm"), "{summary}");
    assert_eq!(
        node.via_sudo()
            .iter()
            .map(|argv| argv.join(" "))
            .collect::<Vec<_>>(),
        [
            "scontrol update nodename=gpu-node-17 state=drain reason=gpuops: GPUXIDFellOffBus",
            "systemctl reboot",
        ],
        "{:#?}",
        node.calls()
    );
    assert_eq!(requests(&b).len(), 2, "no request to resume it");
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    let t = text(&v);
    assert!(
        t.contains("• gpu-node-17 · 8 GPUs · awaiting repair since "),
        "{t}"
    );
    assert!(t.contains("last: verify-dcgm by slack:U0ADMIN2"), "{t}");
    b.stop();
}

chat_on_both!(
    xid_79_loop_on_the_real_agent_takes_the_node_out_and_back,
    xid_79_loop_with_failing_dcgm_leaves_the_node_awaiting_repair,
);

/// The night an on-call lead finds in the morning: XID 79 on gpu-node-17
/// (drained by one admin's approval), 45 minutes later on gpu-node-18
/// (another's), both left drained. 6 hours on, `/gpuops nodes` and the
/// report list both: why, since when, who acted last, the GPU-hours; their
/// return (by an operator) closes both stretches, and the report then
/// counts what they cost.
async fn night_with_two_gpu_faults_then_morning_report() {
    let (b, nodes, prometheus) = fleet(&["gpu-node-17", "gpu-node-18"]).await;
    // The drains 45 minutes apart, the later one now (the agents take an
    // approval from the hour before the request only); the morning 6 h on.
    let t0 = b.clock.now_unix() - 2700;
    b.clock.set(t0);
    let g17 = xid_79(&b, &nodes[0], "3").await;
    let (_, v) = b
        .slack_command(ADMIN, &format!("run {RUNBOOK} alert={g17}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    approve(&b, ADMIN2, "gpu-node-17", "drain-slurm").await;
    wait_state(&b, "gpu-node-17", NodeState::Quarantined).await;

    b.clock.set(t0 + 2700);
    let g18 = xid_79(&b, &nodes[1], "5").await;
    let (_, v) = b
        .slack_command(ADMIN2, &format!("run {RUNBOOK} alert={g18}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    approve(&b, ADMIN, "gpu-node-18", "drain-slurm").await;
    wait_state(&b, "gpu-node-18", NodeState::Quarantined).await;
    for n in &nodes {
        let drained: Vec<Vec<String>> = n.via_sudo();
        assert_eq!(drained.len(), 1, "{:#?}", n.calls());
        assert_eq!(
            drained[0][..4],
            [
                "scontrol".to_string(),
                "update".into(),
                format!("nodename={}", n.name),
                "state=drain".into()
            ]
        );
    }

    // The morning: 6 h 45 m × 8 GPUs and 6 h × 8 GPUs.
    let morning = t0 + 2700 + 6 * 3600;
    b.clock.set(morning);
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    let t = text(&v);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    assert_eq!(
        lines[0],
        "2 nodes out of service (16 GPUs, 102.0 GPU-hours lost so far):"
    );
    for (line, node, gpu, by, hours, ago) in [
        (
            lines[1],
            "gpu-node-17",
            "3",
            "slack:U0ADMIN2",
            "54.0",
            "6h 45m",
        ),
        (
            lines[2],
            "gpu-node-18",
            "5",
            "slack:U0ADMIN",
            "48.0",
            "6h 0m",
        ),
    ] {
        assert!(
            line.starts_with(&format!("• {node} · 8 GPUs · quarantined since ")),
            "{t}"
        );
        assert!(line.contains(&format!("({ago}")), "{t}");
        assert!(
            line.contains(&format!(
                "drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79 on GPU {gpu}"
            )),
            "{t}"
        );
        assert!(
            line.contains(&format!("last: drain-slurm by {by} (run r")),
            "{t}"
        );
        assert!(line.ends_with(&format!("· {hours} GPU-hours lost")), "{t}");
    }
    let md = report(&b, &prometheus, morning).await;
    assert!(
        md.contains("Out of service: 2 nodes (16 GPUs) at the period's end, 0 returned within it; 102.0 GPU-hours lost in the period, 102.0 over these stretches"),
        "{md}"
    );
    let at17 = md
        .find("Out of service: **gpu-node-17** quarantined since")
        .expect(&md);
    let at18 = md
        .find("Out of service: **gpu-node-18** quarantined since")
        .expect(&md);
    assert!(at17 < at18, "oldest first: {md}");
    assert!(
        md.contains("(8 GPUs, 54.0 GPU-hours lost so far): drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79 on GPU 3, last by slack:U0ADMIN2"),
        "{md}"
    );
    assert!(
        md.contains("(8 GPUs, 48.0 GPU-hours lost so far): drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79 on GPU 5, last by slack:U0ADMIN"),
        "{md}"
    );
    // 102 of 16 GPUs × 24 h = 384 GPU-hours lost: 73.4 %.
    assert!(md.contains("Availability: 73.4 % (objective 98 %)"), "{md}");

    // Returned at 09:00 by an operator: both stretches closed.
    for n in ["gpu-node-17", "gpu-node-18"] {
        let (_, v) = b.slack_command(OPERATOR, &format!("node {n} return")).await;
        assert!(text(&v).contains("GPU-hours out of service"), "{v}");
        let r = wait_state(&b, n, NodeState::InService).await;
        assert_eq!(r.out_since, None);
    }
    let (_, v) = b.slack_command(STRANGER, "nodes").await;
    assert!(text(&v).contains("every tracked node is in service"), "{v}");
    let md = report(&b, &prometheus, morning + 60).await;
    assert!(
        md.contains("Out of service: 0 nodes (0 GPUs) at the period's end, 2 returned within it; 102.0 GPU-hours lost in the period, 102.0 over these stretches"),
        "{md}"
    );
    let returns: Vec<(String, Option<f64>)> = b
        .state
        .store
        .node_transitions(0.0)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.to == NodeState::InService)
        .map(|t| (t.node, t.lost_gpu_seconds))
        .collect();
    assert_eq!(
        returns,
        [
            ("gpu-node-17".to_string(), Some(54.0 * 3600.0)),
            ("gpu-node-18".to_string(), Some(48.0 * 3600.0)),
        ]
    );
    b.stop();
}

chat_on_both!(night_with_two_gpu_faults_then_morning_report);

/// The real `gpuops bot` on `addr` with the configuration `cfg`, its log
/// appended to `log`.
fn spawn_bot(cfg: &Path, addr: &str, log: &Path) -> Proc {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Proc(
        Command::new(support::gpuops())
            .args(["bot", "--listen", addr, "--config"])
            .arg(cfg)
            .env_remove("GPUOPS_BOT_CONFIG")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start gpuops bot"),
    )
}

/// A signed `/gpuops <text>` from Slack user `user` to the bot at `base`.
async fn slash(base: &str, user: &str, command: &str) -> String {
    let body = slack_command_body(user, command, "http://127.0.0.1:9/nowhere");
    let ts = gpuops::signing::SystemClock.now_unix();
    let r = reqwest::Client::new()
        .post(format!("{base}/slack/commands"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header(gpuops::signing::SLACK_TIMESTAMP, ts.to_string())
        .header(
            gpuops::signing::SLACK_SIGNATURE,
            gpuops::signing::sign_slack(b"slack-signing-s3cret", ts, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    text(&v)
}

/// AlertManager's webhook to the bot at `base`; the group id.
async fn post_alert(base: &str, hook: &serde_json::Value) -> i64 {
    let r = reqwest::Client::new()
        .post(format!("{base}/alertmanager"))
        .bearer_auth("hook-token-s3cret")
        .json(hook)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    v["group_id"].as_i64().unwrap()
}

/// The requests to `api` (the fake Slack or Discord) carrying a reminder
/// about `node`.
fn reminders(api: &support::FakeApi, node: &str) -> usize {
    let needle = format!("⏰ {node} has been quarantined for");
    api.requests()
        .iter()
        .filter(|r| r.raw.contains(&needle))
        .count()
}

/// The reminders about `node` posted to Slack channel `channel` (not in a
/// thread).
fn channel_reminders(slack: &support::FakeApi, node: &str, channel: &str) -> usize {
    let needle = format!("⏰ {node} has been quarantined for");
    slack
        .requests()
        .iter()
        .filter(|r| r.raw.contains(&needle))
        .filter(|r| r.body["channel"] == channel && r.body["thread_ts"].is_null())
        .count()
}

/// Waits (up to `secs`) until `f` holds.
async fn eventually(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node quarantined `ago` seconds before `now` by a drain for XID 79 in
/// group `g`.
fn quarantined(node: &str, now: f64, ago: f64, g: i64) -> gpuops::lifecycle::Transition {
    gpuops::lifecycle::Transition {
        node: node.into(),
        to: Some(NodeState::Quarantined),
        at: now - ago,
        reason: "drain-slurm succeeded (gpu-fell-off-bus): GPUXIDFellOffBus XID 79 on GPU 3".into(),
        alert: Some("GPUXIDFellOffBus".into()),
        xid: Some("79".into()),
        step: Some("drain-slurm".into()),
        run: Some("r0a1b2c".into()),
        by: Some("slack:U0ADMIN2".into()),
        gpus: 8,
        group_id: Some(g),
        repeat_window_secs: 7.0 * 86_400.0,
        ..gpuops::lifecycle::Transition::default()
    }
}

/// The real bot process, its store SQLite in a temp dir (`pg_url`: a
/// PostgreSQL schema instead): a node quarantined past `remind_after`
/// (2 s here; the reminder task then looks every second) gets one
/// reminder in its thread on Slack and on Discord; `kill -9` of the bot,
/// started again on the same store: no second reminder, while a node
/// quarantined after the restart gets its own (the loop runs) and three
/// more passes go by. Then the node returns (`/gpuops node … return`),
/// XID 79 fires on it again, and the run's start message says it is a
/// repeat: replace the hardware.
async fn reminders_survive_kill_9_of_the_bot(pg_url: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let rb = runbooks(dir.path());
    let slack = support::FakeApi::slack().await;
    let discord = support::FakeApi::discord().await;
    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n[lifecycle]\ngpus_per_node = 8\nremind_after = \"2s\"\n[prometheus]\nurl = \"http://127.0.0.1:9\"\n[[reports]]\nname = \"daily\"\nschedule = \"0 9 * * *\"\nslack_channel = \"C0REPORTS\"\n[rbac]\nadmins = [\"{ADMIN}\", \"{ADMIN2}\"]\noperators = [\"{OPERATOR}\"]\n[[agents.nodes]]\ninstance = \"gpu-node-17:9400\"\nnode = \"gpu-node-17\"\n[[agents.nodes]]\ninstance = \"gpu-node-18:9400\"\nnode = \"gpu-node-18\"\n",
        rb.display()
    );
    let db = dir.path().join("bot.db");
    let mut text = support::bot_config(dir.path(), &slack, &discord, &extra);
    let store = match &pg_url {
        Some(url) => {
            text = text.replace(
                &format!("path = \"{}\"", db.display()),
                &format!("url = \"{url}\""),
            );
            gpuops::store::pg::open_url(url).await.unwrap()
        }
        None => gpuops::store::Store::open(&db).unwrap(),
    };
    let cfg = dir.path().join("bot.toml");
    std::fs::write(&cfg, text).unwrap();
    // Inline secrets: 0600, or the configuration is refused.
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{addr}");
    let log = dir.path().join("bot.log");
    let mut bot = spawn_bot(&cfg, &addr, &log);
    support::wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;

    let mut hook = webhook(
        "GPUXIDFellOffBus",
        "gpu-node-17:9400",
        &[("xid", "79"), ("gpu", "3")],
    );
    let g = post_alert(&base, &hook).await;
    eventually(20, "the alert on Slack and Discord", || {
        !slack.requests().is_empty() && !discord.requests().is_empty()
    })
    .await;
    let now = gpuops::store::now();
    assert!(
        store
            .node_transition(quarantined("gpu-node-17", now, 10.0, g))
            .await
            .unwrap()
            .changed
    );
    eventually(
        20,
        "the reminder on Slack (thread, channel) and Discord",
        || reminders(&slack, "gpu-node-17") >= 2 && reminders(&discord, "gpu-node-17") >= 1,
    )
    .await;
    // Delivered and recorded (nothing left in the outbox: a delivery in
    // flight may go twice, a reminder claimed must not), then killed
    // (SIGKILL, no graceful stop).
    for _ in 0..200 {
        if store.pending().await.unwrap() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.pending().await.unwrap(), 0, "the outbox drained");
    bot.0.kill().unwrap();
    let status = bot.0.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    drop(bot);
    let bot = spawn_bot(&cfg, &addr, &log);
    support::wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(30)).await;
    let restarted = gpuops::store::now();
    assert!(
        store
            .node_transition(quarantined("gpu-node-18", restarted, 0.0, g))
            .await
            .unwrap()
            .changed
    );
    // gpu-node-18 is due 2 s after the restart: its reminder shows the loop
    // running on the restarted bot; three more passes after it.
    eventually(20, "gpu-node-18's reminder after the restart", || {
        reminders(&slack, "gpu-node-18") >= 2 && reminders(&discord, "gpu-node-18") >= 1
    })
    .await;
    assert!(gpuops::store::now() - restarted >= 2.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Once each in the thread on Slack and on Discord, and once in the
    // report channel.
    let counts = |node: &str| {
        (
            reminders(&slack, node) - channel_reminders(&slack, node, "C0REPORTS"),
            reminders(&discord, node),
            channel_reminders(&slack, node, "C0REPORTS"),
        )
    };
    for node in ["gpu-node-17", "gpu-node-18"] {
        assert_eq!(
            counts(node),
            (1, 1, 1),
            "{node}'s reminders (slack thread, discord thread, report channel); log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    let reminder = slack
        .requests()
        .into_iter()
        .find(|r| r.raw.contains("⏰ gpu-node-17") && r.body["channel"] == "CP1")
        .unwrap();
    let reminder_text = reminder.body["text"].as_str().unwrap_or_default();
    assert!(
        reminder_text.contains("last: drain-slurm by slack:U0ADMIN2"),
        "{reminder_text}"
    );
    assert!(
        reminder.body["thread_ts"].as_str().is_some(),
        "in the incident's thread: {}",
        reminder.raw
    );

    // Returned; the same XID on it again within repeat_window: a repeat.
    let t = slash(&base, OPERATOR, "node gpu-node-17 return").await;
    assert!(t.contains("GPU-hours out of service"), "{t}");
    hook["groupKey"] = serde_json::json!("{}:{alertname=\"GPUXIDFellOffBus\", again=\"1\"}");
    hook["alerts"][0]["fingerprint"] = serde_json::json!("fp-again");
    let g2 = post_alert(&base, &hook).await;
    assert_ne!(g2, g);
    let t = slash(&base, ADMIN, &format!("run {RUNBOOK}:escalate alert={g2}")).await;
    assert!(t.contains("started run"), "{t}");
    assert!(
        t.contains("🔁 gpu-node-17 is a repeat of XID 79 within 7 days of its return on"),
        "{t}"
    );
    assert!(
        t.contains("replace the hardware (RMA) rather than reset/reboot again"),
        "{t}"
    );
    // Drained again for it: `/gpuops nodes` flags the repeat.
    let again = store
        .node_transition(quarantined("gpu-node-17", gpuops::store::now(), 0.0, g2))
        .await
        .unwrap();
    assert!(again.changed && again.row.is_some_and(|r| r.repeat));
    let t = slash(&base, OPERATOR, "nodes").await;
    assert!(
        t.contains("• gpu-node-17 🔁 repeat · 8 GPUs · quarantined since"),
        "{t}"
    );
    // And in the new alert's thread.
    eventually(
        20,
        "the run's start line with the advice in the thread",
        || {
            slack.requests().iter().any(|r| {
                r.body["thread_ts"].is_string()
                    && r.body["text"].as_str().is_some_and(|t| {
                        t.starts_with("▶ ") && t.contains("🔁 gpu-node-17 is a repeat of XID 79")
                    })
            })
        },
    )
    .await;
    drop(bot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminders_survive_kill_9_of_the_bot_on_sqlite() {
    reminders_survive_kill_9_of_the_bot(None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run by .ci/run"]
async fn reminders_survive_kill_9_of_the_bot_on_postgres() {
    let url = gpuops::store::pg::test_url()
        .await
        .expect("a PostgreSQL test schema");
    reminders_survive_kill_9_of_the_bot(Some(url)).await
}

/// The run's closing summary (its 🏁 reply), once posted.
async fn run_summary(b: &Bot) -> String {
    b.wait_for(20, "the run's summary", |b| {
        b.slack.replies().iter().any(|r| r.contains("🏁"))
    })
    .await;
    b.slack
        .replies()
        .into_iter()
        .find(|r| r.contains("🏁"))
        .unwrap()
}

/// The steps of `results` that failed or erred, but for those `allowed`.
fn failed_steps<'a>(results: &'a [(String, String)], allowed: &[&str]) -> Vec<&'a str> {
    results
        .iter()
        .filter(|(_, st)| st == "failed" || st == "error")
        .map(|(s, _)| s.as_str())
        .filter(|s| !allowed.contains(s))
        .collect()
}

/// Every node command an approver saw (each request's own and its
/// group's; a group's PromQL check runs on the bot), at least `at_least`
/// of them, is one a node ran.
fn every_approved_command_ran(b: &Bot, nodes: &[Node], at_least: usize) {
    let seen: Vec<String> = requests(b)
        .into_iter()
        .flat_map(|(_, code)| {
            code.lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .filter(|l| !l.starts_with("promql: "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(seen.len() >= at_least, "{seen:#?}");
    let executed: Vec<String> = nodes.iter().flat_map(Node::executed).collect();
    for cmd in &seen {
        assert!(
            executed.contains(cmd),
            "approved but not run: {cmd}\n{executed:#?}"
        );
    }
}

/// The success path of every shipped GPU mitigation runbook, walked with
/// the real agent (one node each): the node leaves service at its drain
/// and is back at the end, no mitigation failed, and every command an
/// approver saw (each request's own and its group's) is one the node ran.
async fn shipped_gpu_runbooks_walk_the_real_agent_out_and_back() {
    let cases = [
        ("gpu-fell-off-bus", "GPUFellOffBus", "79", "gpu-node-1"),
        ("gpu-reset", "GPUCriticalXID", "62", "gpu-node-2"),
        ("gpu-ecc-remap", "GPURowRemapPending", "", "gpu-node-3"),
        ("gpu-nvlink", "GPUNVLinkErrors", "", "gpu-node-4"),
    ];
    let names: Vec<&str> = cases.iter().map(|c| c.3).collect();
    let (b, nodes, _) = fleet(&names).await;
    for ((id, alert, xid, name), node) in cases.into_iter().zip(&nodes) {
        let mut labels = vec![("gpu", "3")];
        if !xid.is_empty() {
            labels.push(("xid", xid));
        }
        let g = b.alert(webhook(alert, &node.addr, &labels)).await;
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
        // Only investigations answered by this machine's own journalctl
        // (no journal here) and systemctl (no Fabric Manager unit), found
        // before the stand-ins, may fail.
        let failed = failed_steps(&results, &["kernel-log", "fabric-manager"]);
        assert!(failed.is_empty(), "{id}: {results:?}");
    }
    every_approved_command_ran(&b, &nodes, 12);
    b.stop();
}

chat_on_both!(shipped_gpu_runbooks_walk_the_real_agent_out_and_back);

/// The success path of every shipped host mitigation runbook (the ones that
/// take a node out of service without a GPU fault), walked with the real
/// agent: each approved drain leaves the node quarantined, no step fails,
/// and every command an approver saw is one the node ran. These runbooks
/// stop at the drain: a person returns the node (`/gpuops node … return`).
/// (`gpu-xid` has its own walks in `runbook_xid`; `agent-down` acts on a
/// node whose agent is down, so a node's agent cannot run it.)
async fn shipped_host_runbooks_walk_the_real_agent_to_quarantine() {
    let mount = tempfile::tempdir().unwrap();
    let mount = mount.path().display().to_string();
    // (runbook, alert, the alert's labels, node)
    type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: [Case; 6] = [
        ("cpu-saturation", "CPUPressure", vec![], "cpu-node-1"),
        (
            "gpu-throttle",
            "GPUMemoryTemperatureHigh",
            vec![("gpu", "3")],
            "gpu-node-2",
        ),
        (
            "memory-pressure",
            "MemoryUtilizationHigh",
            vec![],
            "gpu-node-3",
        ),
        ("oom-kill", "OOMKill", vec![], "gpu-node-4"),
        (
            "storage",
            "StorageErrors",
            vec![("mountpoint", mount.as_str()), ("device", "nvme0n1")],
            "gpu-node-5",
        ),
        (
            "storage-mount-stuck",
            "StorageMountStuck",
            vec![("mountpoint", mount.as_str())],
            "gpu-node-6",
        ),
    ];
    let names: Vec<&str> = cases.iter().map(|c| c.3).collect();
    let (b, nodes, _) = fleet(&names).await;
    for ((id, alert, labels, name), node) in cases.iter().zip(&nodes) {
        let g = b.alert(webhook(alert, &node.addr, labels)).await;
        let results = walk(&b, g, id).await;
        // This machine's own journalctl and lsof answer the log and
        // open-file investigations (found before the stand-ins). lsof
        // finding nothing is a succeeded step (`nothing_found_exit`);
        // journalctl here has no journal at all ("No journal files were
        // found."): it could not look, so its steps fail, truthfully.
        let failed = failed_steps(&results, &["kernel-log", "thermal-log", "oom-log"]);
        assert!(failed.is_empty(), "{id}: {results:?}");
        assert!(
            results.iter().any(|(_, st)| st == "succeeded"),
            "{id}: nothing ran: {results:?}"
        );
        let states = states_of(&b, name).await;
        assert_eq!(states, [NodeState::Quarantined], "{id}: {results:?}");
    }
    every_approved_command_ran(&b, &nodes, cases.len());
    b.stop();
}

chat_on_both!(shipped_host_runbooks_walk_the_real_agent_to_quarantine);
