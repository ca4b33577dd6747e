//! End to end, as a new user would try it: a runbook started from an alert's
//! Slack button runs its investigate steps on a real `gpuops agent` (signed
//! `/v1/exec`) and posts their output into the alert's thread, while the
//! mitigation waits for a second person's approval; and an operator's signed
//! `/gpuops silence` lands in a real AlertManager while a stranger's is
//! refused, both audited.
// Integration tests start the real binaries; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use crate::chat_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chat_support::*;
use gpuops::notify::{Button, Message};
use gpuops::signing::Clock as _;

/// The agent's node name, as the bot's inventory gives it.
const NODE: &str = "test-node-a";

const RUNBOOK: &str = r#"
id: test-node
title: Test node runbook
description: harmless steps run by the agent
triggers:
  - alertname: 'TestNode.*'
params:
  node:
    pattern: '[A-Za-z0-9][A-Za-z0-9-]{0,62}'
    from_label: node
steps:
  - name: kernel
    phase: investigate
    kind: command
    target: node
    timeout: 10s
    run: ["uname", "-a"]
  - name: who
    phase: investigate
    kind: command
    target: node
    timeout: 10s
    run: ["echo", "investigated {{node}}"]
  - name: drain
    phase: mitigate
    kind: command
    target: node
    timeout: 10s
    needs_approval: true
    run: ["echo", "drained {{node}}"]
"#;

fn wait_listening(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_agent(runbooks: &Path, public_key: &Path) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args([
            "agent",
            "--listen",
            &addr,
            "--node-name",
            NODE,
            "--runbooks",
        ])
        .arg(runbooks)
        .arg("--exec-public-key")
        .arg(public_key)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gpuops agent");
    let p = Proc(child);
    wait_listening(&addr, "the agent");
    (p, addr)
}

#[tokio::test]
async fn button_runs_investigate_steps_on_the_agent_into_the_thread_and_mitigation_waits() {
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("test-node.yaml"), RUNBOOK).unwrap();
    let (key, public, _) = exec_keys(dir.path());
    let (_agent, agent_addr) = start_agent(&rb, &public);
    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n[agents]\nsigning_key_file = \"{}\"\n[[agents.nodes]]\ninstance = \"{agent_addr}\"\nnode = \"{NODE}\"\n",
        rb.display(),
        key.display()
    );
    let b = Bot::start_in(dir, &extra, None).await;
    let g = b.alert(webhook("TestNodeDown", &agent_addr, &[])).await;

    // The alert message offers the runbook its triggers match.
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
    assert!(
        m.buttons.contains(&Button::RunRunbook("test-node".into())),
        "{:?}",
        m.buttons
    );
    let (action, value) = Button::RunRunbook("test-node".into()).slack_action(g);

    // `status <node>` shows the node's alerts and asks its agent for events.
    let (_, v) = b
        .slack_command(STRANGER, &format!("status {agent_addr}"))
        .await;
    let t = v["text"].as_str().unwrap();
    assert!(t.contains("TestNodeDown"), "{t}");
    assert!(t.contains(&format!("agent at {agent_addr}: ")), "{t}");
    assert!(!t.contains("not reachable"), "{t}");

    // An operator presses it.
    let capture = Capture::start().await;
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
    capture.wait_for(10, "started run").await;
    b.wait_for(20, "the approval request", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("/gpuops approve r"))
    })
    .await;
    let replies = b.slack.replies();
    let uname = String::from_utf8_lossy(&Command::new("uname").arg("-a").output().unwrap().stdout)
        .trim()
        .to_string();
    assert!(
        replies
            .iter()
            .any(|r| r.contains("kernel") && r.contains(&uname)),
        "{replies:#?}"
    );
    assert!(
        replies
            .iter()
            .any(|r| r.contains("investigated test-node-a")),
        "{replies:#?}"
    );
    assert!(
        !replies
            .iter()
            .any(|r| r.contains("drain (") && r.contains("succeeded")),
        "the mitigation ran without approval: {replies:#?}"
    );
    // Every reply went to the alert message's thread in its channel.
    for c in b.slack.calls().iter().filter(|c| c.op == "reply") {
        assert_eq!(c.channel, "C0ALERTS");
    }

    // The same operator cannot approve; an admin can, and the agent runs it.
    let req = replies
        .iter()
        .find(|r| r.contains("/gpuops approve r"))
        .unwrap();
    let at = req.find("approve r").unwrap() + "approve ".len();
    let run = &req[at..at + 7];
    let (_, v) = b.slack_command(OPERATOR, &format!("approve {run}")).await;
    assert!(v["text"].as_str().unwrap().contains('⛔'), "{v}");
    let (_, v) = b.slack_command(ADMIN, &format!("approve {run}")).await;
    assert!(v["text"].as_str().unwrap().contains("approved"), "{v}");
    b.wait_for(20, "the mitigation's output", |b| {
        b.slack.replies().iter().any(|r| {
            r.contains("drain (") && r.contains("succeeded") && r.contains("drained test-node-a")
        })
    })
    .await;
    b.wait_for(10, "the summary", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("finished: 3 succeeded"))
    })
    .await;

    let steps: Vec<String> = b
        .audit()
        .await
        .into_iter()
        .filter(|r| r.action == "step")
        .map(|r| {
            format!(
                "{} {} {}",
                r.who,
                r.params["step"].as_str().unwrap_or(""),
                r.outcome
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            "slack:U0OPER kernel succeeded (exit 0)",
            "slack:U0OPER who succeeded (exit 0)",
            "slack:U0OPER drain succeeded (exit 0)",
        ]
    );
    b.stop();
}

const AM_CONFIG: &str = "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n";

fn start_alertmanager(dir: &Path) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    std::fs::write(dir.join("am.yml"), AM_CONFIG).unwrap();
    let child = Command::new("/usr/bin/prometheus-alertmanager")
        .arg(format!("--config.file={}", dir.join("am.yml").display()))
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address={addr}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start /usr/bin/prometheus-alertmanager");
    let p = Proc(child);
    wait_listening(&addr, "alertmanager");
    (p, format!("http://{addr}"))
}

async fn silences(am: &str) -> Vec<serde_json::Value> {
    reqwest::get(format!("{am}/api/v2/silences"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
#[ignore = "needs alertmanager; run by .ci/run"]
async fn operator_silence_lands_in_alertmanager_and_a_strangers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_am, am) = start_alertmanager(dir.path());
    let extra = format!("[alertmanager]\nurl = \"{am}\"\n");
    let b = Bot::start_in(dir, &extra, None).await;
    let capture = Capture::start().await;
    let resp = format!("{}/resp", capture.url);

    let (s, v) = b
        .slack_command_with_url(
            STRANGER,
            r#"silence alertname=GpuXid,instance=~"node1.*" 2h stranger danger"#,
            &resp,
        )
        .await;
    assert_eq!(s, 200);
    assert!(v["text"].as_str().unwrap().contains('⛔'), "{v}");

    let (s, v) = b
        .slack_command_with_url(
            OPERATOR,
            r#"silence alertname=GpuXid,instance=~"node1.*" 2h planned maintenance"#,
            &resp,
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        v["text"].as_str().unwrap().contains("creating the silence"),
        "{v}"
    );
    let answer = capture.wait_for(15, "silenced").await;
    let list = silences(&am).await;
    assert_eq!(list.len(), 1, "{list:#?}");
    let sil = &list[0];
    assert_eq!(sil["status"]["state"], "active");
    assert!(
        sil["createdBy"].as_str().unwrap().contains("slack:U0OPER"),
        "{sil}"
    );
    assert_eq!(sil["comment"], "planned maintenance");
    let mut matchers: Vec<String> = sil["matchers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{} {} {} {}",
                m["name"], m["value"], m["isRegex"], m["isEqual"]
            )
        })
        .collect();
    matchers.sort();
    assert_eq!(
        matchers,
        [
            r#""alertname" "GpuXid" false true"#,
            r#""instance" "node1.*" true true"#
        ]
    );
    let id = sil["id"].as_str().unwrap().to_string();
    assert!(answer.contains(&id), "{answer}");

    let audit: Vec<String> = b
        .audit()
        .await
        .into_iter()
        .filter(|r| r.action == "silence")
        .map(|r| format!("{} {}", r.who, r.outcome))
        .collect();
    assert_eq!(
        audit,
        [
            "slack:U0STRANGER denied: silence needs the operator or admin role".to_string(),
            format!("slack:U0OPER ok: {id}"),
        ]
    );

    // The Silence 1h button silences the group's common labels.
    let g = b.alert(webhook("GpuFellOffBus", "node2:9949", &[])).await;
    let body = slack_button_body(OPERATOR, "gpuops_silence_1h", &g.to_string(), &resp);
    let (s, _) = b
        .send(slack_request(
            "/slack/interactions",
            &body,
            b.clock.now_unix(),
            SLACK_SECRET,
        ))
        .await;
    assert_eq!(s, 200);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = silences(&am).await;
        if let Some(s) = list.iter().find(|s| s["id"] != id.as_str()) {
            let names: Vec<&str> = s["matchers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["name"].as_str().unwrap())
                .collect();
            assert!(
                names.contains(&"alertname") && names.contains(&"instance"),
                "{s}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no silence from the button");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Lifting it.
    let (_, v) = b
        .slack_command_with_url(OPERATOR, &format!("unsilence {id}"), &resp)
        .await;
    assert!(v["text"].as_str().unwrap().contains("lifting"), "{v}");
    capture.wait_for(15, "lifted silence").await;
    let list = silences(&am).await;
    let first = list.iter().find(|s| s["id"] == id.as_str()).unwrap();
    assert_eq!(first["status"]["state"], "expired");
    b.stop();
}
