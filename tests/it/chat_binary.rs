//! The whole path with the real binaries, as a new user would wire it: a
//! `gpuops bot` (config pointing at the fake Slack and Discord APIs, a
//! runbook directory, the bot's signing key, the agent in its inventory) and a
//! `gpuops agent` with `--exec-public-key`, `--node-name` and `--runbooks`. AlertManager's webhook posts the alert
//! with a Run button; a signed Slack button press runs the investigate steps
//! on the agent and their output lands in the alert's thread on the fake
//! Slack (and Discord); the mitigation waits for a second person; forged
//! requests get 401; `gpuops audit` shows every step.
// Integration tests start the real binaries; only the product is held to the
// no-spawn-outside-exec.rs rule.
#![allow(clippy::disallowed_methods)]

use crate::support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gpuops::signing;
use support::{bot_config, free_port, gpuops, wait_http_ok, wait_listening, FakeApi, Proc};

const SIGNING_SECRET: &str = "slack-signing-s3cret";
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
    run: ["uname", "-s", "-r"]
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

/// A bot key pair in `dir`: (private key file, public key file, private PEM).
fn exec_keys(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let signer = gpuops::exec_auth::ExecSigner::generate();
    let key = dir.join("exec.key");
    let pem = signer.private_pem().unwrap().expose().to_string();
    std::fs::write(&key, &pem).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let public = dir.join("exec.pub");
    std::fs::write(&public, signer.public_key().to_pem().unwrap()).unwrap();
    (key, public, pem)
}

fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn signed_post(base: &str, path: &str, body: &str, secret: &str) -> (u16, String) {
    let ts = chrono::Utc::now().timestamp();
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header(signing::SLACK_TIMESTAMP, ts.to_string())
        .header(
            signing::SLACK_SIGNATURE,
            signing::sign_slack(secret.as_bytes(), ts, body.as_bytes()),
        )
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let took = started.elapsed();
    eprintln!("chat request {path}: HTTP {status} in {took:?}");
    assert!(took < Duration::from_secs(3), "{path} answered in {took:?}");
    (status, text)
}

async fn command(base: &str, user: &str, text: &str) -> serde_json::Value {
    let body = form(&[
        ("team_id", "T0001"),
        ("channel_id", "C0ALERTS"),
        ("user_id", user),
        ("user_name", &user.to_ascii_lowercase()),
        ("command", "/gpuops"),
        ("text", text),
        ("response_url", "http://127.0.0.1:9/unused"),
        ("trigger_id", &format!("t-{}", rand::random::<u64>())),
    ]);
    let (s, b) = signed_post(base, "/slack/commands", &body, SIGNING_SECRET).await;
    assert_eq!(s, 200, "{b}");
    serde_json::from_str(&b).unwrap()
}

/// The `value` of the element with `action_id`, anywhere in a message.
fn find_action(v: &serde_json::Value, action_id: &str) -> Option<String> {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("action_id").and_then(|a| a.as_str()) == Some(action_id) {
                return m.get("value").and_then(|x| x.as_str()).map(str::to_string);
            }
            m.values().find_map(|x| find_action(x, action_id))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_action(x, action_id)),
        _ => None,
    }
}

/// Texts of the thread replies the fake Slack received.
fn slack_thread_texts(slack: &FakeApi) -> Vec<String> {
    slack
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("chat.postMessage") && !r.body["thread_ts"].is_null())
        .map(|r| r.raw)
        .collect()
}

async fn wait_slack(slack: &FakeApi, what: &str, f: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = slack_thread_texts(slack);
        if f(&t) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {t:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn slack_button_runs_a_runbook_on_the_agent_into_the_thread_with_the_real_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("test-node.yaml"), RUNBOOK).unwrap();

    let (key, public, pem) = exec_keys(dir.path());
    let agent_addr = format!("127.0.0.1:{}", free_port());
    let _agent = Proc(
        Command::new(gpuops())
            .args([
                "agent",
                "--listen",
                &agent_addr,
                "--node-name",
                NODE,
                "--exec-public-key",
            ])
            .arg(&public)
            .arg("--runbooks")
            .arg(&rb)
            .env_remove("GPUOPS_AGENT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(&agent_addr, "the agent");

    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n[agents]\nsigning_key_file = \"{}\"\n[[agents.nodes]]\ninstance = \"{agent_addr}\"\nnode = \"{NODE}\"\n[rbac]\nadmins = [\"U0ADMIN\"]\noperators = [\"U0OPER\"]\n",
        rb.display(),
        key.display()
    );
    let cfg = dir.path().join("bot.toml");
    std::fs::write(&cfg, bot_config(dir.path(), &slack, &discord, &extra)).unwrap();
    std::fs::set_permissions(
        &cfg,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap(); // holds inline secrets
    let bot_addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{bot_addr}");
    let log = std::fs::File::create(dir.path().join("bot.log")).unwrap();
    let _bot = Proc(
        Command::new(gpuops())
            .args(["bot", "--listen", &bot_addr, "--config"])
            .arg(&cfg)
            .env_remove("GPUOPS_BOT_CONFIG")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    wait_http_ok(&format!("{base}/healthz"), Duration::from_secs(20)).await;

    // Forged and unsigned chat requests are refused.
    let (s, _) = signed_post(
        &base,
        "/slack/commands",
        "user_id=U0ADMIN&text=help",
        "wrong",
    )
    .await;
    assert_eq!(s, 401);
    let r = reqwest::Client::new()
        .post(format!("{base}/discord/interactions"))
        .body(r#"{"type":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // AlertManager posts the alert; the message carries the Run button.
    let hook = serde_json::json!({
        "version": "4", "groupKey": "{}:{alertname=\"TestNodeDown\"}", "status": "firing",
        "receiver": "gpuops", "groupLabels": {"alertname": "TestNodeDown"},
        "commonLabels": {"alertname": "TestNodeDown", "severity": "critical", "instance": agent_addr},
        "commonAnnotations": {"summary": "test node down"}, "externalURL": "http://am:9093",
        "alerts": [{"status": "firing",
            "labels": {"alertname": "TestNodeDown", "severity": "critical", "instance": agent_addr},
            "annotations": {"summary": "test node down"}, "startsAt": "2026-11-22T00:00:00Z",
            "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prom/graph", "fingerprint": "fp1"}]
    });
    let r = reqwest::Client::new()
        .post(format!("{base}/alertmanager"))
        .bearer_auth("hook-token-s3cret")
        .json(&hook)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let posted = slack.wait_for(1, Duration::from_secs(20)).await;
    let raw = &posted[0].raw;
    let value = find_action(&serde_json::from_str(raw).unwrap(), "gpuops_run_runbook")
        .unwrap_or_else(|| panic!("no Run button in {raw}"));
    assert!(value.ends_with("|test-node"), "{value}");

    // An operator presses it.
    let payload = serde_json::json!({
        "type": "block_actions",
        "team": {"id": "T0001", "domain": "gpuops-test"},
        "user": {"id": "U0OPER", "username": "oper", "team_id": "T0001"},
        "api_app_id": "A0001",
        "container": {"type": "message", "message_ts": "1700000000.000001", "channel_id": "CP1"},
        "channel": {"id": "CP1"},
        "response_url": "http://127.0.0.1:9/unused",
        "trigger_id": "t-button",
        "actions": [{"type": "button", "action_id": "gpuops_run_runbook", "value": value}]
    });
    let (s, b) = signed_post(
        &base,
        "/slack/interactions",
        &form(&[("payload", &payload.to_string())]),
        SIGNING_SECRET,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    wait_slack(&slack, "the approval request", |t| {
        t.iter().any(|r| r.contains("/gpuops approve r"))
    })
    .await;
    let texts = slack_thread_texts(&slack);
    let uname = String::from_utf8_lossy(
        &Command::new("uname")
            .args(["-s", "-r"])
            .output()
            .unwrap()
            .stdout,
    )
    .trim()
    .to_string();
    assert!(texts.iter().any(|t| t.contains(&uname)), "{texts:#?}");
    assert!(
        texts.iter().any(|t| t.contains("investigated test-node-a")),
        "{texts:#?}"
    );

    // The operator cannot approve their own mitigation; the admin can.
    let req = texts
        .iter()
        .find(|t| t.contains("/gpuops approve r"))
        .unwrap();
    let at = req.find("/gpuops approve r").unwrap() + "/gpuops approve ".len();
    let run = req[at..at + 7].to_string();
    let v = command(&base, "U0OPER", &format!("approve {run}")).await;
    assert!(v["text"].as_str().unwrap().contains('⛔'), "{v}");
    let v = command(&base, "U0ADMIN", &format!("approve {run}")).await;
    assert!(v["text"].as_str().unwrap().contains("approved"), "{v}");
    wait_slack(&slack, "the mitigation and the summary", |t| {
        t.iter().any(|r| r.contains("drained test-node-a"))
            && t.iter().any(|r| r.contains("finished"))
    })
    .await;
    // Discord's copy of the alert got the same thread.
    let discord_replies: Vec<String> = discord
        .requests()
        .into_iter()
        .filter(|r| !r.body["message_reference"].is_null())
        .map(|r| r.raw)
        .collect();
    assert!(
        discord_replies
            .iter()
            .any(|r| r.contains("investigated test-node-a")),
        "{discord_replies:#?}"
    );

    // The bot's log names refusals and steps, never a secret.
    let log = std::fs::read_to_string(dir.path().join("bot.log")).unwrap();
    assert!(log.contains("slack request refused"), "{log}");
    assert!(
        log.contains("chat endpoints at POST /slack/commands"),
        "{log}"
    );
    for secret in [
        SIGNING_SECRET,
        pem.lines().nth(1).unwrap(),
        "xoxb-test-token-s3cret",
        "discord-token-s3cret",
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }

    // The audit log, as `gpuops audit` prints it.
    let out = Command::new(gpuops())
        .args(["audit", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for (who, action, outcome) in [
        ("slack:U0OPER", "run", "started"),
        ("slack:U0OPER", "step", "succeeded"),
        ("slack:U0OPER", "approval_requested", "waiting"),
        ("slack:U0OPER", "approve", "denied"),
        ("slack:U0ADMIN", "approve", "approved"),
        ("slack:U0OPER", "run", "finished"),
    ] {
        assert!(
            text.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1] == who && f[2] == action && f[3].starts_with(outcome)
            }),
            "{who} {action} {outcome} not in:\n{text}"
        );
    }
}
