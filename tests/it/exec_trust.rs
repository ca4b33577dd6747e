//! The exec trust boundary end to end, tried as an attacker on loopback
//! would: two real agents (node-a, node-b) holding the bot's public key, a
//! hostile "agent" that records whatever reaches it, and the bot with the
//! two real agents in its inventory.
//!
//! - `alert_naming_a_hostile_address_gets_no_request`: an alert whose
//!   `instance` is the hostile listener; an operator presses Run: the run is
//!   refused in chat with the reason and audited, and no request leaves the
//!   bot (finding 2: the bot signed for whatever host an alert named).
//! - `requests_captured_from_a_real_run_replay_nowhere`: a run on node-a,
//!   mitigation approved by an admin, every request captured on the way (a
//!   recording proxy in front of node-a) and replayed: to node-a (replay),
//!   to node-b (another node), rewritten for node-b (forged), with the
//!   signature's hex case changed: all refused, and node-b ran nothing.
// Integration tests start the real binaries; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use crate::chat_support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use chat_support::*;
use gpuops::exec_auth::{KEY_ID_HEADER, SIGNATURE_HEADER};
use gpuops::notify::Button;
use gpuops::signing::Clock as _;

const RUNBOOK: &str = r#"
id: trust-test
title: Trust test
description: harmless steps run by the agents
triggers:
  - alertname: 'TrustTest.*'
params:
  node:
    pattern: '[A-Za-z0-9][A-Za-z0-9-]{0,62}'
    from_label: node
steps:
  - name: who
    phase: investigate
    kind: command
    target: node
    timeout: 10s
    run: ["echo", "investigated {{node}}"]
  - name: reboot
    phase: mitigate
    kind: command
    target: node
    timeout: 10s
    needs_approval: true
    run: ["echo", "rebooted {{node}}"]
"#;

fn start_agent(node: &str, runbooks: &Path, public_key: &Path, log: &Path) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args([
            "agent",
            "--listen",
            &addr,
            "--node-name",
            node,
            "--runbooks",
        ])
        .arg(runbooks)
        .arg("--exec-public-key")
        .arg(public_key)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start gpuops agent");
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "agent {node} did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (p, addr)
}

/// One captured exec request: (signature, key id, body).
type Captured = (String, String, Vec<u8>);

/// A listener that records every request; with `forward_to`, it passes each
/// on and returns the answer (a man in the middle), else answers 200 `{}`.
async fn recorder(forward_to: Option<String>) -> (String, Arc<Mutex<Vec<Captured>>>) {
    let seen: Arc<Mutex<Vec<Captured>>> = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let s = s.clone();
        let forward_to = forward_to.clone();
        async move {
            let headers = req.headers().clone();
            let h = |n: &str| -> String {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let (sig, kid) = (h(SIGNATURE_HEADER), h(KEY_ID_HEADER));
            let path = req.uri().path().to_string();
            let body: Vec<u8> = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            s.lock()
                .unwrap()
                .push((sig.clone(), kid.clone(), body.clone()));
            match forward_to {
                Some(to) => {
                    let r = reqwest::Client::new()
                        .post(format!("{to}{path}"))
                        .header(SIGNATURE_HEADER, sig)
                        .header(KEY_ID_HEADER, kid)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap();
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        [("content-type", "application/json")],
                        text,
                    )
                }
                None => (
                    axum::http::StatusCode::OK,
                    [("content-type", "application/json")],
                    "{}".to_string(),
                ),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr.to_string(), seen)
}

async fn post_exec(addr: &str, sig: &str, kid: &str, body: Vec<u8>) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/exec"))
        .header(SIGNATURE_HEADER, sig)
        .header(KEY_ID_HEADER, kid)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

struct Fleet {
    _a: Proc,
    _b: Proc,
    b_addr: String,
    a_direct: String,
    /// The address the inventory lists for node-a: a recording proxy.
    a_addr: String,
    a_captured: Arc<Mutex<Vec<Captured>>>,
    hostile_addr: String,
    hostile_seen: Arc<Mutex<Vec<Captured>>>,
    b_log: std::path::PathBuf,
    bot: Bot,
}

async fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("trust-test.yaml"), RUNBOOK).unwrap();
    let (key, public, _) = exec_keys(dir.path());
    let (a, a_direct) = start_agent("node-a", &rb, &public, &dir.path().join("a.log"));
    let (b, b_addr) = start_agent("node-b", &rb, &public, &dir.path().join("b.log"));
    let (a_addr, a_captured) = recorder(Some(format!("http://{a_direct}"))).await;
    let (hostile_addr, hostile_seen) = recorder(None).await;
    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n[agents]\nsigning_key_file = \"{}\"\n[[agents.nodes]]\ninstance = \"{a_addr}\"\nnode = \"node-a\"\n[[agents.nodes]]\ninstance = \"{b_addr}\"\nnode = \"node-b\"\n",
        rb.display(),
        key.display()
    );
    let b_log = dir.path().join("b.log");
    let bot = Bot::start_in(dir, &extra, None).await;
    Fleet {
        b_log,
        _a: a,
        _b: b,
        b_addr,
        a_direct,
        a_addr,
        a_captured,
        hostile_addr,
        hostile_seen,
        bot,
    }
}

/// An operator presses the alert's Run button; returns what came back on
/// the response URL.
async fn press_run(b: &Bot, group: i64, capture: &Capture) {
    let (action, value) = Button::RunRunbook("trust-test".into()).slack_action(group);
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
}

#[tokio::test]
async fn alert_naming_a_hostile_address_gets_no_request() {
    let f = fleet().await;
    let g = f
        .bot
        .alert(webhook("TrustTestDown", &f.hostile_addr, &[]))
        .await;
    let capture = Capture::start().await;
    press_run(&f.bot, g, &capture).await;
    let refusal = capture.wait_for(10, "not started").await;
    assert!(refusal.contains("not a known agent"), "{refusal}");
    assert!(refusal.contains(&f.hostile_addr), "{refusal}");
    // Give a wrongly started run every chance to reach the hostile listener.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        f.hostile_seen.lock().unwrap().is_empty(),
        "the bot sent a request to the hostile address"
    );
    let audit = f.bot.audit().await;
    assert!(
        audit
            .iter()
            .any(|r| r.action == "run" && r.outcome == "refused: unknown agent"),
        "{audit:#?}"
    );
    // `/gpuops run` by hand, naming the hostile instance, is refused the same way.
    let (_, v) = f
        .bot
        .slack_command(
            ADMIN,
            &format!("run trust-test instance={}", f.hostile_addr),
        )
        .await;
    assert!(v.to_string().contains("not a known agent"), "{v}");
    assert!(f.hostile_seen.lock().unwrap().is_empty());
    f.bot.stop();
}

#[tokio::test]
async fn requests_captured_from_a_real_run_replay_nowhere() {
    let f = fleet().await;
    let b = &f.bot;
    let g = b.alert(webhook("TrustTestDown", &f.a_addr, &[])).await;
    let capture = Capture::start().await;
    press_run(b, g, &capture).await;
    b.wait_for(20, "the approval request", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("/gpuops approve r"))
    })
    .await;
    let replies = b.slack.replies();
    assert!(
        replies.iter().any(|r| r.contains("investigated node-a")),
        "{replies:#?}"
    );
    let req = replies
        .iter()
        .find(|r| r.contains("/gpuops approve r"))
        .unwrap();
    let at = req.find("approve r").unwrap() + "approve ".len();
    let run = req[at..at + 7].to_string();
    let (_, v) = b.slack_command(ADMIN, &format!("approve {run}")).await;
    assert!(v["text"].as_str().unwrap().contains("approved"), "{v}");
    b.wait_for(20, "the mitigation's output", |b| {
        b.slack.replies().iter().any(|r| {
            r.contains("reboot (") && r.contains("succeeded") && r.contains("rebooted node-a")
        })
    })
    .await;

    let all = f.a_captured.lock().unwrap().clone();
    // Each step was planned first (signed for planning only).
    let (plans, captured): (Vec<_>, Vec<_>) = all
        .into_iter()
        .partition(|c| String::from_utf8_lossy(&c.2).contains("\"purpose\":\"plan\""));
    assert_eq!(plans.len(), 2, "a plan per step");
    assert_eq!(captured.len(), 2, "investigate + approved mitigation");
    for (sig, kid, body) in plans {
        // A captured plan request never runs anything.
        let (s, t) = post_exec(&f.a_direct, &sig, &kid, body).await;
        assert_eq!(s, 403, "plan replayed to exec: {t}");
        assert!(t.contains("signed for plan"), "{t}");
    }
    let approved: serde_json::Value = serde_json::from_slice(&captured[1].2).unwrap();
    assert_eq!(approved["node"], "node-a");
    assert_eq!(approved["approval"]["run"], run.as_str());
    assert_eq!(approved["approval"]["approved_by"], "slack:U0ADMIN");
    assert_eq!(approved["approval"]["requested_by"], "slack:U0OPER");

    for (sig, kid, body) in captured {
        // Replayed to the agent it was for.
        let (s, t) = post_exec(&f.a_direct, &sig, &kid, body.clone()).await;
        assert_eq!(s, 401, "replay on node-a: {t}");
        // In another hex case.
        let (s, t) = post_exec(&f.a_direct, &sig.to_ascii_uppercase(), &kid, body.clone()).await;
        assert_eq!(s, 401, "case variant on node-a: {t}");
        // To another node of the fleet.
        let (s, t) = post_exec(&f.b_addr, &sig, &kid, body.clone()).await;
        assert_eq!(s, 403, "replay on node-b: {t}");
        assert!(t.contains("node-a"), "{t}");
        // Rewritten for the other node.
        let forged = String::from_utf8(body)
            .unwrap()
            .replace("node-a", "node-b")
            .into_bytes();
        let (s, t) = post_exec(&f.b_addr, &sig, &kid, forged).await;
        assert_eq!(s, 401, "forged for node-b: {t}");
    }
    let b_log = std::fs::read_to_string(&f.b_log).unwrap();
    assert!(
        !b_log.contains("exec step started"),
        "node-b ran a step:\n{b_log}"
    );
    assert!(b_log.contains("exec request refused"), "{b_log}");
    b.stop();
}
