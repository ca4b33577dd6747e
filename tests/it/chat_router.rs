//! The chat endpoints through the bot's router: signature checks (forged,
//! stale, replayed → 401, nothing changes), Discord Ed25519 with a generated
//! key, the role matrix, parameter injection through `/gpuops run`, and the
//! approval flow (two-person rule, self-approval, expiry, restart).

use crate::chat_support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use chat_support::*;
use gpuops::chat::approvals;
use gpuops::runbook::engine::{Executor, NodeSteps};
use gpuops::runbook::exec::{CommandOutput, CommandRunner, CommandSpec, RecordingRunner, RunError};
use gpuops::signing::Clock as _;

const RUNBOOK: &str = r#"
id: test-gpu
title: Test GPU runbook
description: steps for the chat tests
triggers:
  - alertname: 'TestGpu.*'
params:
  node:
    pattern: '(?P<value>[A-Za-z0-9][A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9.-]+)?(?::[0-9]{1,5})?'
    from_label: instance
  instance:
    pattern: '[A-Za-z0-9.:_-]{1,255}'
    from_label: instance
steps:
  - name: look
    phase: investigate
    kind: command
    target: node
    timeout: 10s
    run: ["uname", "-a"]
  - name: echo-node
    phase: investigate
    kind: command
    target: node
    timeout: 10s
    run: ["echo", "node={{node}}", "instance={{instance}}"]
  - name: quick-fix
    phase: mitigate
    kind: command
    target: node
    timeout: 10s
    run: ["echo", "quick fix"]
  - name: drain
    phase: mitigate
    kind: command
    target: node
    timeout: 10s
    needs_approval: true
    # Independent of quick-fix, which an operator's run skips.
    requires: []
    run: ["echo", "drained {{node}}"]
  - name: page
    phase: escalate
    kind: command
    target: bot
    timeout: 5s
    run: ["echo", "page the on-call"]
"#;

/// Runs through `inner` with the resolved binaries named by name again
/// (`/usr/bin/echo` is recorded as `echo`): these tests are about the flow,
/// `chat_flow` and `agent_exec` about the resolution.
struct ByName(Arc<RecordingRunner>);

impl CommandRunner for ByName {
    fn run<'a>(
        &'a self,
        cmd: &'a CommandSpec,
    ) -> futures_util::future::BoxFuture<'a, Result<CommandOutput, RunError>> {
        let base = |a: &str| a.rsplit('/').next().unwrap_or(a).to_string();
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
        Box::pin(async move { self.0.run(&cmd).await })
    }
}

/// The local executor of these tests: fake Slurm, Kubernetes and NVIDIA
/// binaries searched first (this machine has none), commands recorded.
fn local_exec(runner: &Arc<RecordingRunner>) -> Executor {
    Executor::new(Arc::new(ByName(runner.clone())), NodeSteps::Local, None).with_search_path(
        gpuops::runbook::exec::resolve::SearchPath::first_then_default(&[
            crate::support::fake_node_bins().to_path_buf(),
        ]),
    )
}

async fn bot() -> (Bot, Arc<RecordingRunner>) {
    let dir = tempfile::tempdir().unwrap();
    bot_in(dir).await
}

async fn bot_in(dir: tempfile::TempDir) -> (Bot, Arc<RecordingRunner>) {
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("test-gpu.yaml"), RUNBOOK).unwrap();
    let runner = Arc::new(RecordingRunner::new());
    let exec = Arc::new(local_exec(&runner));
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    (Bot::start_in(dir, &extra, Some(exec)).await, runner)
}

fn text(v: &serde_json::Value) -> String {
    v["text"].as_str().unwrap_or_default().to_string()
}

async fn run_count(b: &Bot) -> i64 {
    b.state.store.run_ids().await.unwrap().len() as i64
}

async fn slack_forged_stale_replayed_and_unsigned_requests_get_401_and_change_nothing() {
    let (b, runner) = bot().await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let audit_before = b.audit().await.len();
    let now = b.clock.now_unix();
    let ack = slack_command_body(OPERATOR, &format!("ack {g}"), "http://127.0.0.1:9/x");
    let run = slack_command_body(
        OPERATOR,
        "run test-gpu instance=node1:9949",
        "http://127.0.0.1:9/x",
    );
    let button = slack_button_body(
        OPERATOR,
        "gpuops_ack",
        &g.to_string(),
        "http://127.0.0.1:9/x",
    );
    let cases: Vec<(&str, Request<Body>)> = vec![
        (
            "forged",
            slack_request("/slack/commands", &ack, now, "not-the-secret"),
        ),
        (
            "stale",
            slack_request("/slack/commands", &ack, now - 301, SLACK_SECRET),
        ),
        (
            "future",
            slack_request("/slack/commands", &run, now + 301, SLACK_SECRET),
        ),
        (
            "forged button",
            slack_request("/slack/interactions", &button, now, "wrong"),
        ),
        (
            "stale button",
            slack_request("/slack/interactions", &button, now - 600, SLACK_SECRET),
        ),
        (
            "unsigned",
            Request::post("/slack/commands")
                .body(Body::from(ack.clone()))
                .unwrap(),
        ),
        ("tampered", {
            let mut r = slack_request("/slack/commands", &ack, now, SLACK_SECRET);
            *r.body_mut() = Body::from(run.clone());
            r
        }),
        ("bad signature format", {
            let mut r = slack_request("/slack/commands", &ack, now, SLACK_SECRET);
            r.headers_mut()
                .insert("x-slack-signature", "v1=00".parse().unwrap());
            r
        }),
    ];
    for (name, req) in cases {
        let (status, body) = b.send(req).await;
        assert_eq!(status, 401, "{name}: {body}");
    }
    // A valid request is accepted once; the same bytes again are a replay.
    let (s, _) = b
        .send(slack_request("/slack/commands", &ack, now, SLACK_SECRET))
        .await;
    assert_eq!(s, 200);
    let acked = b.state.store.group(g).await.unwrap().unwrap().ack;
    assert!(acked.is_some());
    let audit_after_valid = b.audit().await.len();
    assert_eq!(
        audit_after_valid,
        audit_before + 1,
        "only the valid request is audited"
    );
    let (s, _) = b
        .send(slack_request("/slack/commands", &ack, now, SLACK_SECRET))
        .await;
    assert_eq!(s, 401, "replay");
    assert_eq!(b.audit().await.len(), audit_after_valid);
    assert_eq!(run_count(&b).await, 0);
    assert!(runner.calls().is_empty());
    b.stop();
}

async fn slack_documented_example_passes_the_router_only_at_its_time() {
    let (b, _) = bot().await;
    // https://api.slack.com/authentication/verifying-requests-from-slack
    let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    let req = || {
        Request::post("/slack/commands")
            .header("x-slack-request-timestamp", "1531420618")
            .header(
                "x-slack-signature",
                "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
            )
            .body(Body::from(body))
            .unwrap()
    };
    let (s, _) = b.send(req()).await;
    assert_eq!(s, 401, "stale at the real time");
    b.clock.set(1531420618 + 10);
    let (s, out) = b.send(req()).await;
    assert_eq!(s, 200, "{out}");
    assert!(out.contains("gpuops commands"), "{out}");
    b.stop();
}

async fn discord_ed25519_ping_command_forged_stale_and_replayed() {
    let (b, _) = bot().await;
    let now = b.clock.now_unix();
    let ping =
        r#"{"type":1,"id":"1","application_id":"223456789012345678","token":"tok","version":1}"#;
    let (s, out) = b.send(discord_request(&b.discord_key, ping, now)).await;
    assert_eq!((s, out.as_str()), (200, r#"{"type":1}"#));
    let audit_before = b.audit().await.len();

    let other = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let cmd = discord_interaction(
        2,
        "323456789012345678",
        "tok2",
        serde_json::json!({ "name": "gpuops", "options": [{ "name": "command", "type": 3, "value": "help" }] }),
    );
    let forged = discord_request(&other, &cmd, now);
    let stale = discord_request(&b.discord_key, &cmd, now - 400);
    let tampered = {
        let mut r = discord_request(&b.discord_key, &cmd, now);
        *r.body_mut() = Body::from(cmd.replace("help", "alerts"));
        r
    };
    let replayed = discord_request(&b.discord_key, ping, now);
    for (name, req) in [
        ("forged", forged),
        ("stale", stale),
        ("tampered", tampered),
        ("replayed ping", replayed),
        (
            "unsigned",
            Request::post("/discord/interactions")
                .body(Body::from(cmd.clone()))
                .unwrap(),
        ),
    ] {
        let (s, body) = b.send(req).await;
        assert_eq!(s, 401, "{name}: {body}");
    }
    assert_eq!(
        b.audit().await.len(),
        audit_before,
        "refusals change nothing"
    );

    let (s, out) = b.send(discord_request(&b.discord_key, &cmd, now)).await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["type"], 4);
    assert_eq!(v["data"]["flags"], 64);
    assert!(v["data"]["content"]
        .as_str()
        .unwrap()
        .contains("gpuops commands"));
    let last = b.audit().await.pop().unwrap();
    assert_eq!(
        (last.who.as_str(), last.action.as_str()),
        ("discord:323456789012345678", "help")
    );
    b.stop();
}

async fn role_matrix_through_the_router() {
    let (b, runner) = bot().await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let capture = Capture::start().await;

    // Viewers (anyone not listed) read, and are refused everything else.
    for (cmd, allowed) in [
        ("help", true),
        ("status", true),
        ("status node1", true),
        ("alerts", true),
        ("runbooks", true),
        ("runbooks TestGpuDown", true),
        (&*format!("ack {g}"), false),
        ("silence TestGpuDown 1h", false),
        ("unsilence 0f3c2d1e-aaaa-bbbb-cccc-0123456789ab", false),
        (&*format!("run test-gpu alert={g}"), false),
        ("approve r000000", false),
    ] {
        let (s, v) = b.slack_command(STRANGER, cmd).await;
        assert_eq!(s, 200);
        let t = text(&v);
        assert_eq!(!t.contains('⛔'), allowed, "{cmd}: {t}");
    }
    let (_, v) = b.slack_command(STRANGER, "alerts").await;
    assert!(text(&v).contains(&format!("#{g}")), "{v}");
    let (_, v) = b.slack_command(STRANGER, "runbooks TestGpuDown").await;
    assert!(text(&v).contains("test-gpu"), "{v}");
    // A stranger's button press is refused too (answered via response_url).
    let body = slack_button_body(
        STRANGER,
        "gpuops_run_runbook",
        &format!("{g}|test-gpu"),
        &format!("{}/resp", capture.url),
    );
    let (s, _) = b
        .send(slack_request(
            "/slack/interactions",
            &body,
            b.clock.now_unix(),
            SLACK_SECRET,
        ))
        .await;
    assert_eq!(s, 200);
    capture.wait_for(5, "\u{26d4}").await;
    assert!(b.state.store.group(g).await.unwrap().unwrap().ack.is_none());
    assert!(runner.calls().is_empty(), "a viewer ran nothing");
    let denied: Vec<String> = b
        .audit()
        .await
        .into_iter()
        .filter(|r| r.who == format!("slack:{STRANGER}") && r.outcome.starts_with("denied"))
        .map(|r| r.action)
        .collect();
    assert_eq!(
        denied,
        ["ack", "silence", "unsilence", "run", "approve", "run"],
        "{denied:?}"
    );

    // Operators ack and run investigate steps; a mitigation without approval
    // is skipped, one with approval waits.
    let (_, v) = b.slack_command(OPERATOR, &format!("ack {g}")).await;
    assert!(text(&v).contains("acknowledged"), "{v}");
    assert_eq!(v["response_type"], "in_channel");
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run test-gpu alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    b.wait_for(10, "approval request", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("needs approval"))
    })
    .await;
    let argv: Vec<Vec<String>> = runner.calls().into_iter().map(|c| c.argv).collect();
    assert_eq!(
        argv,
        [
            vec!["uname".to_string(), "-a".into()],
            vec![
                "echo".into(),
                "node=node1".into(),
                "instance=node1:9949".into()
            ]
        ]
    );
    let replies = b.slack.replies().join("\n---\n");
    assert!(
        replies.contains("quick-fix") && replies.contains("only an admin"),
        "{replies}"
    );
    // The ack edited the alert message.
    b.wait_for(10, "the ack edit", |b| {
        b.slack.calls().iter().any(|c| {
            c.op == "edit"
                && matches!(&c.message, gpuops::notify::Message::Alert(m)
                    if m.acknowledged.as_ref().is_some_and(|a| a.by.contains("slack:U0OPER")))
        })
    })
    .await;
    b.stop();
}

async fn parameter_injection_through_run_is_refused_and_runs_nothing() {
    let (b, runner) = bot().await;
    for (cmd, expect) in [
        (
            "run test-gpu instance=node1;reboot",
            "does not match pattern",
        ),
        ("run test-gpu instance=$(reboot)", "does not match pattern"),
        ("run test-gpu instance=`id`", "does not match pattern"),
        (
            r#"run test-gpu instance="node1 --help""#,
            "does not match pattern",
        ),
        ("run test-gpu instance=node1 --help", "is not a parameter"),
        (
            "run test-gpu instance=node1 extra=1",
            "has no such parameter",
        ),
        ("run test-gpu instance=node1 instance=node2", "given twice"),
        ("run test-gpu instance=node1\nreboot", "is not a parameter"),
        (
            "run test-gpu instance=node1&amp;&amp;reboot",
            "does not match pattern",
        ),
        ("run ../../etc/passwd", "is not a runbook id"),
        (
            "run test-gpu:look;uname instance=n1",
            "is not a list of step names",
        ),
        ("run test-gpu:nope instance=n1", "has no step"),
        ("run test-gpu alert=1;2", "is not a group id"),
        ("run test-gpu alert=999", "no alert group 999"),
        ("run test-gpu", "no value given"),
        (
            &*format!("run test-gpu instance={}", "a".repeat(300)),
            "longer than",
        ),
        ("run test-gpu instance=node1\u{202e}", "bidirectional"),
    ] {
        let (s, v) = b.slack_command(OPERATOR, cmd).await;
        assert_eq!(s, 200);
        let t = text(&v);
        assert!(t.contains(expect), "{cmd:?}: {t}");
        assert!(!t.contains("started run"), "{cmd:?}: {t}");
    }
    assert!(runner.calls().is_empty());
    assert_eq!(run_count(&b).await, 0);
    let refusals = b
        .audit()
        .await
        .into_iter()
        .filter(|r| r.outcome.starts_with("refused") || r.outcome.starts_with("error"))
        .count();
    assert_eq!(refusals, 17, "every attempt is audited");
    b.stop();
}

/// The run id in a "needs approval" reply.
fn waiting_run_id(replies: &[String]) -> String {
    let r = replies
        .iter()
        .rev()
        .find(|r| r.contains("/gpuops approve r"))
        .expect("an approval request");
    let at = r.find("approve r").unwrap() + "approve ".len();
    r[at..at + 7].to_string()
}

async fn approval_needs_a_second_admin_and_expires() {
    let (b, runner) = bot().await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run test-gpu alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    b.wait_for(10, "approval request", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("needs approval"))
    })
    .await;
    let run = waiting_run_id(&b.slack.replies());

    // The requester cannot approve; another operator is not an approver.
    let (_, v) = b.slack_command(OPERATOR, &format!("approve {run}")).await;
    assert!(text(&v).contains("needs the admin role"), "{v}");
    let (_, v) = b.slack_command("U0OPER2", &format!("approve {run}")).await;
    assert!(text(&v).contains("needs the admin role"), "{v}");
    let (_, v) = b.slack_command(STRANGER, &format!("deny {run}")).await;
    assert!(text(&v).contains('⛔'), "{v}");
    assert_eq!(runner.calls().len(), 2, "the mitigation has not run");

    let (_, v) = b.slack_command(ADMIN, &format!("approve {run}")).await;
    assert!(text(&v).contains("approved step `drain`"), "{v}");
    b.wait_for(10, "the run's summary", |b| {
        b.slack.replies().iter().any(|r| r.contains("finished"))
    })
    .await;
    let argv: Vec<String> = runner
        .calls()
        .into_iter()
        .map(|c| c.argv.join(" "))
        .collect();
    assert_eq!(
        argv,
        [
            "uname -a",
            "echo node=node1 instance=node1:9949",
            "echo drained node1",
            "echo page the on-call"
        ]
    );
    let (_, v) = b.slack_command(ADMIN2, &format!("approve {run}")).await;
    assert!(text(&v).contains("finished, not waiting"), "{v}");

    // Self-approval is refused for admins too; a second admin may approve.
    let (_, v) = b
        .slack_command(ADMIN, &format!("run test-gpu:drain alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    b.wait_for(10, "second approval request", |b| {
        b.slack
            .replies()
            .iter()
            .filter(|r| r.contains("/gpuops approve r"))
            .count()
            == 2
    })
    .await;
    let run2 = waiting_run_id(&b.slack.replies());
    let (_, v) = b.slack_command(ADMIN, &format!("approve {run2}")).await;
    assert!(
        text(&v).contains("someone other than the person who asked"),
        "{v}"
    );

    // Nobody approves: it expires.
    b.clock.set(b.clock.now_unix() + 601);
    // Expired here or by the bot's own expiry task, whichever comes first.
    let expired = approvals::expire_due(&b.chat).await;
    assert!(
        expired.is_empty() || expired == std::slice::from_ref(&run2),
        "{expired:?}"
    );
    b.wait_for(10, "the expiry note", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("nobody approved"))
    })
    .await;
    // The expired step is skipped and the run goes on (here: to its end).
    b.wait_for(10, "the second run's summary", |b| {
        b.slack
            .replies()
            .iter()
            .filter(|r| r.contains("🏁"))
            .count()
            == 2
    })
    .await;
    let (_, v) = b.slack_command(ADMIN2, &format!("approve {run2}")).await;
    assert!(text(&v).contains("finished, not waiting"), "{v}");
    let notes = b
        .slack
        .replies()
        .iter()
        .filter(|r| r.contains("nobody approved"))
        .count();
    assert_eq!(notes, 1, "announced once");
    assert_eq!(runner.calls().len(), 4, "the expired step never ran");

    let audit: Vec<(String, String, String)> = b
        .audit()
        .await
        .into_iter()
        .filter(|r| {
            matches!(
                r.action.as_str(),
                "approve" | "deny" | "approval_requested" | "approval_expired" | "step"
            )
        })
        .map(|r| (r.who, r.action, r.outcome))
        .collect();
    let show: Vec<String> = audit
        .iter()
        .map(|(w, a, o)| format!("{w} {a} {o}"))
        .collect();
    expect_test::expect![[r#"
        slack:U0OPER step succeeded (exit 0)
        slack:U0OPER step succeeded (exit 0)
        slack:U0OPER step skipped: not allowed
        slack:U0OPER approval_requested waiting
        slack:U0OPER approve denied: approve needs the admin role
        slack:U0OPER2 approve denied: approve needs the admin role
        slack:U0STRANGER deny denied: deny needs the admin role
        slack:U0ADMIN approve approved
        slack:U0OPER step succeeded (exit 0)
        slack:U0OPER step succeeded (exit 0)
        slack:U0ADMIN2 approve refused: run RUN is finished, not waiting for approval
        slack:U0ADMIN approval_requested waiting
        slack:U0ADMIN approve denied: step drain needs approval by someone other than the person who asked for it
        gpuops approval_expired expired
        slack:U0ADMIN2 approve refused: run RUN2 is finished, not waiting for approval"#]]
    .assert_eq(&show.join("\n").replace(&run2, "RUN2").replace(&run, "RUN"));
    b.stop();
}

async fn a_waiting_approval_survives_a_restart() {
    let (a, runner_a) = bot().await;
    let (_, v) = a
        .slack_command(OPERATOR, "run test-gpu:drain instance=node7:9949")
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    // Without an alert the approval request goes to the requester's chat.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while approvals_waiting(&a).await == 0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let run: String = a.state.store.run_ids().await.unwrap().remove(0);
    a.stop();
    let dir = a.dir;
    drop(a.router);
    let (b, runner_b) = bot_in(dir).await;
    let capture = Capture::start().await;
    let (_, v) = b
        .slack_command_with_url(
            ADMIN,
            &format!("approve {run}"),
            &format!("{}/r", capture.url),
        )
        .await;
    assert!(text(&v).contains("approved step `drain`"), "{v}");
    capture.wait_for(10, "finished").await;
    assert!(runner_a.calls().is_empty());
    let argv: Vec<String> = runner_b
        .calls()
        .into_iter()
        .map(|c| c.argv.join(" "))
        .collect();
    assert_eq!(argv, ["echo drained node7"]);
    b.stop();
}

async fn approvals_waiting(b: &Bot) -> i64 {
    approvals::waiting_count(&b.chat).await.unwrap_or(0)
}

async fn discord_commands_defer_and_follow_up_and_buttons_answer_inline() {
    let capture = Capture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("test-gpu.yaml"), RUNBOOK).unwrap();
    let runner = Arc::new(RecordingRunner::new());
    let exec = Arc::new(local_exec(&runner));
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    let b = Bot::start_full(dir, &extra, Some(exec), Some(&capture.url)).await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let now = b.clock.now_unix();
    const OPER: &str = "423456789012345678";

    // A run is deferred (type 5), then the original response and follow-ups
    // arrive through the interaction webhook.
    let body = discord_interaction(
        2,
        OPER,
        "tok-run",
        serde_json::json!({ "name": "gpuops", "options": [{ "name": "command", "type": 3, "value": "run test-gpu instance=node1:9949" }] }),
    );
    let (s, out) = b.send(discord_request(&b.discord_key, &body, now)).await;
    assert_eq!((s, out.as_str()), (200, r#"{"type":5}"#));
    capture.wait_for(10, "/gpuops approve r").await;
    let reqs = capture.requests.lock().unwrap().clone();
    let hook = "/api/v10/webhooks/223456789012345678/tok-run";
    assert_eq!(reqs[0].0, "PATCH");
    assert_eq!(reqs[0].1, format!("{hook}/messages/@original"));
    assert!(reqs[0].2.contains("started run"), "{reqs:#?}");
    assert!(
        reqs[1..].iter().all(|r| r.0 == "POST" && r.1 == hook),
        "{reqs:#?}"
    );
    assert!(
        reqs.iter().any(|r| r.2.contains("investigate look")),
        "{reqs:#?}"
    );
    assert_eq!(runner.calls().len(), 2);

    // Buttons answer inline (type 4); a viewer's is refused, ephemerally.
    let press = |user: &str, custom_id: String, token: &str| {
        discord_interaction(
            3,
            user,
            token,
            serde_json::json!({ "custom_id": custom_id, "component_type": 2 }),
        )
    };
    let (s, out) = b
        .send(discord_request(
            &b.discord_key,
            &press("999999999999999999", format!("gpuops:silence:{g}:1h"), "t1"),
            now,
        ))
        .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["type"].as_u64(), v["data"]["flags"].as_u64()),
        (Some(4), Some(64))
    );
    assert!(v["data"]["content"].as_str().unwrap().contains('⛔'), "{v}");
    let (_, out) = b
        .send(discord_request(
            &b.discord_key,
            &press(OPER, format!("gpuops:ack:{g}"), "t2"),
            now,
        ))
        .await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["type"], 4);
    assert!(
        v["data"]["content"]
            .as_str()
            .unwrap()
            .contains("acknowledged"),
        "{v}"
    );
    let ack = b.state.store.group(g).await.unwrap().unwrap().ack.unwrap();
    assert!(ack.by.contains("discord:423456789012345678"), "{ack:?}");
    b.stop();
}

async fn a_long_run_without_an_alert_stays_within_slacks_response_url_budget() {
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    let mut many = String::from("id: many\ntitle: Many steps\ndescription: eight steps\nsteps:\n");
    for i in 1..=8 {
        many.push_str(&format!(
            "  - {{ name: step-{i}, phase: investigate, kind: command, target: bot, run: [echo, \"output of step {i}\"] }}\n"
        ));
    }
    std::fs::write(rb.join("many.yaml"), many).unwrap();
    let exec = Arc::new(Executor::new(
        Arc::new(gpuops::runbook::exec::ProcessRunner),
        NodeSteps::Local,
        None,
    ));
    let extra = format!("[runbooks]\ndir = \"{}\"\n", rb.display());
    let b = Bot::start_in(dir, &extra, Some(exec)).await;
    let capture = Capture::start().await;
    let (_, v) = b
        .slack_command_with_url(OPERATOR, "run many", &format!("{}/once", capture.url))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    let last = capture.wait_for(10, "finished: 8 succeeded").await;
    let posts = capture.bodies();
    assert_eq!(
        posts.len(),
        4,
        "three step messages, then one with the rest: {posts:#?}"
    );
    for i in 4..=8 {
        assert!(last.contains(&format!("output of step {i}")), "{last}");
    }
    b.stop();
}

async fn shipped_gpu_reset_runbook_from_its_alert_investigates_then_waits_and_deny_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let runner = Arc::new(RecordingRunner::new());
    let exec = Arc::new(local_exec(&runner));
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks");
    let extra = format!("[runbooks]\ndir = \"{}\"\n", shipped.display());
    let b = Bot::start_in(dir, &extra, Some(exec)).await;
    let g = b
        .alert(webhook(
            "GPUCriticalXID",
            "node1:9949",
            // XID 62 needs a GPU reset; the bot's inventory adds the node's name.
            &[("gpu", "0"), ("xid", "62"), ("node", "node1")],
        ))
        .await;
    // The alert message suggests the runbook by its triggers.
    b.wait_for(10, "the alert message", |b| {
        b.slack.calls().iter().any(|c| {
            matches!(&c.message, gpuops::notify::Message::Alert(m)
                if m.buttons.contains(&gpuops::notify::Button::RunRunbook("gpu-reset".into())))
        })
    })
    .await;
    let body = slack_button_body(
        OPERATOR,
        "gpuops_run_runbook",
        &format!("{g}|gpu-reset"),
        "http://127.0.0.1:9/x",
    );
    let (s, _) = b
        .send(slack_request(
            "/slack/interactions",
            &body,
            b.clock.now_unix(),
            SLACK_SECRET,
        ))
        .await;
    assert_eq!(s, 200);
    b.wait_for(10, "the approval request", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("/gpuops approve r"))
    })
    .await;
    let calls = runner.calls();
    let programs: Vec<&str> = calls.iter().map(|c| c.argv[0].as_str()).collect();
    assert_eq!(
        programs,
        ["journalctl", "nvidia-smi", "nvidia-smi", "systemctl"]
    );
    assert_eq!(
        calls[1].argv.last().unwrap(),
        "0",
        "gpu from the alert label"
    );
    let replies = b.slack.replies();
    assert!(
        replies
            .iter()
            .any(|r| r.contains("xid-count") && r.contains("skipped")),
        "{replies:#?}"
    );
    let run = waiting_run_id(&replies);
    assert!(
        replies.last().unwrap().contains("drain-slurm"),
        "{replies:#?}"
    );
    let (_, v) = b.slack_command(ADMIN, &format!("deny {run}")).await;
    assert!(text(&v).contains("denied step `drain-slurm`"), "{v}");
    b.wait_for(10, "the denial in the thread", |b| {
        b.slack.replies().iter().any(|r| r.contains("denied step"))
    })
    .await;
    // The run goes on to its end without asking anyone again (issue 22,
    // observation 5: it used to offer `holders`, `fuser` as root): no
    // privileged step is offered after the denied drain.
    b.wait_for(10, "the run's summary", |b| {
        b.slack.replies().iter().any(|r| r.contains("🏁"))
    })
    .await;
    let offered = b
        .slack
        .replies()
        .iter()
        .filter(|r| r.contains("/gpuops approve r"))
        .count();
    assert_eq!(offered, 1, "{:#?}", b.slack.replies());
    // Only investigations ran: the denied drain decides the `drain` group,
    // and every later mitigation requires it (or a step that does).
    let calls = runner.calls();
    assert!(
        calls.iter().all(|c| !c
            .argv
            .iter()
            .any(|a| a == "scontrol" || a == "kubectl" || a == "-r")),
        "{calls:?}"
    );
    let all = b.slack.replies().join("\n");
    assert!(
        all.contains("cordon-kubernetes (bot command, 30s, needs approval) `gpu-reset` — skipped: drain was decided by drain-slurm, which was denied"),
        "{all}"
    );
    assert!(
        all.contains("holders (node command, 30s, needs approval) `gpu-reset` — skipped: drain-slurm was denied"),
        "{all}"
    );
    b.stop();
}

/// Finding 7: `/gpuops run agent-down:healthz instance=127.0.0.1:PORT` made
/// the bot GET `/healthz` on a host outside its inventory and post the body
/// to chat. The request is refused before it is made; the same step for an
/// inventory node still goes out.
async fn probe_to_host_outside_inventory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _, _) = exec_keys(dir.path());
    let outside = Capture::start().await;
    let outside_addr = outside.url.trim_start_matches("http://").to_string();
    let inside = Capture::start().await;
    let inside_addr = inside.url.trim_start_matches("http://").to_string();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks");
    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n[agents]\nsigning_key_file = \"{}\"\n[[agents.nodes]]\ninstance = \"{inside_addr}\"\nnode = \"node1\"\n",
        shipped.display(),
        key.display()
    );
    let b = Bot::start_in(dir, &extra, None).await;
    let replies = Capture::start().await;
    let (_, v) = b
        .slack_command_with_url(
            OPERATOR,
            &format!("run agent-down:healthz instance={outside_addr}"),
            &format!("{}/out", replies.url),
        )
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    let posted = replies.wait_for(10, "healthz").await;
    assert!(
        posted.contains("is not a node of the bot's agent inventory: not contacted"),
        "{posted}"
    );
    assert!(
        outside.requests.lock().unwrap().is_empty(),
        "the bot contacted a host outside its inventory: {:?}",
        outside.requests.lock().unwrap()
    );
    // The inventory node is probed as before.
    let (_, v) = b
        .slack_command_with_url(
            OPERATOR,
            &format!("run agent-down:healthz instance={inside_addr}"),
            &format!("{}/in", replies.url),
        )
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    inside.wait_for(10, "").await;
    assert_eq!(inside.requests.lock().unwrap()[0].1, "/healthz");
    b.stop();
}

/// The Approve buttons of the approval requests posted so far, in order.
fn approve_buttons(b: &Bot) -> Vec<String> {
    b.slack
        .calls()
        .into_iter()
        .filter_map(|c| match c.message {
            gpuops::notify::Message::Text(t) => t.buttons.into_iter().find_map(|x| match x {
                gpuops::notify::Button::Approve(v) => Some(v),
                _ => None,
            }),
            _ => None,
        })
        .collect()
}

/// Finding 6: on the shipped memory-pressure runbook, an old Approve button
/// (its value was the run id only), pressed after its step (drop-caches)
/// had been denied, approved the next gated step (drain-slurm). Now the
/// button names run, step and request: the stale one changes nothing and
/// says why; the current one still works.
async fn stale_approve_button_after_deny_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let runner = Arc::new(RecordingRunner::new());
    let exec = Arc::new(local_exec(&runner));
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks");
    let extra = format!("[runbooks]\ndir = \"{}\"\n", shipped.display());
    let b = Bot::start_in(dir, &extra, Some(exec)).await;
    let g = b
        .alert(webhook(
            "MemoryPressure",
            "node1:9949",
            &[("node", "node1")],
        ))
        .await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run memory-pressure alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    b.wait_for(10, "the drop-caches approval request", |b| {
        approve_buttons(b).len() == 1
    })
    .await;
    let replies = b.slack.replies();
    let run = waiting_run_id(&replies);
    let old = approve_buttons(&b)[0].clone();
    assert!(old.starts_with(&format!("{run}.")), "{old}");
    let answers = Capture::start().await;
    let press = |value: String, to: &str| {
        let url = format!("{}/{to}", answers.url);
        let body = slack_button_body(ADMIN, "gpuops_approve", &value, &url);
        slack_request(
            "/slack/interactions",
            &body,
            b.clock.now_unix(),
            SLACK_SECRET,
        )
    };
    let (_, v) = b.slack_command(ADMIN, &format!("deny {run}")).await;
    assert!(text(&v).contains("denied step `drop-caches`"), "{v}");
    b.wait_for(10, "the drain-slurm approval request", |b| {
        approve_buttons(b).len() == 2
    })
    .await;
    let current = approve_buttons(&b)[1].clone();
    assert_ne!(old, current);

    // The stale button: nothing changes, and the answer says why.
    let (s, _) = b.send(press(old.clone(), "stale")).await;
    assert_eq!(s, 200);
    let body = answers.wait_for(10, "stale").await;
    assert!(
        body.contains("this approval was for step `drop-caches`")
            && body.contains("which was denied at"),
        "{body}"
    );
    let row = approvals::load(&b.chat, &run).await.unwrap().unwrap();
    assert_eq!(row.status, "waiting", "the run still waits for drain-slurm");
    let plan_index = |name: &str| {
        gpuops::runbook::RunbookSet::load_dir(&shipped)
            .0
            .get("memory-pressure")
            .and_then(|rb| rb.steps.iter().position(|s| s.name == name))
            .unwrap()
    };
    assert_eq!(row.next_step, plan_index("drain-slurm"));
    assert!(
        !b.slack
            .replies()
            .iter()
            .any(|r| r.contains("approved step")),
        "{:#?}",
        b.slack.replies()
    );
    // The same holds for a bare run id (a button from before this change).
    let (_, _) = b.send(press(run.clone(), "bare")).await;
    let body = answers.wait_for(10, "not the step it was for").await;
    assert!(body.contains("stale"), "{body}");
    assert_eq!(
        approvals::load(&b.chat, &run)
            .await
            .unwrap()
            .unwrap()
            .status,
        "waiting"
    );

    // The current button approves drain-slurm.
    let (s, _) = b.send(press(current, "current")).await;
    assert_eq!(s, 200);
    answers.wait_for(10, "approved step `drain-slurm`").await;
    b.stop();
}

/// Finding 12c: an operator could `silence alertname=~".+"` for up to 90
/// days with no approval. A silence matching every alert, or longer than
/// `[rbac] max_silence`, now needs an admin: the operator is refused (told
/// who may create it) and AlertManager hears nothing; narrow and short ones
/// go through, and an admin may create the broad one.
async fn silence_matching_every_alert_or_too_long_needs_approval() {
    let am = Capture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[alertmanager]\nurl = \"{}\"\n", am.url);
    let b = Bot::start_in(dir, &extra, None).await;
    let silences = || {
        am.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == "POST" && r.1 == "/api/v2/silences")
            .count()
    };
    for cmd in [
        "silence alertname=~\".+\" 1h",
        "silence alertname=~\".*\", instance=~\".+\" 30m",
        "silence TestGpuDown 90d",
        "silence TestGpuDown 25h",
    ] {
        let (s, v) = b.slack_command(OPERATOR, cmd).await;
        assert_eq!(s, 200);
        let t = text(&v);
        assert!(
            t.contains("needs approval") && t.contains("admins: "),
            "{cmd}: {t}"
        );
        assert!(
            t.contains("matches every alert")
                || t.contains("longer than [rbac] max_silence (1day)"),
            "{cmd}: {t}"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(silences(), 0, "AlertManager got a silence");
    // Narrow and within the limit: as before.
    b.slack_command(OPERATOR, "silence TestGpuDown 2h").await;
    // An admin may create the broad one.
    b.slack_command(ADMIN, "silence alertname=~\".+\" 1h").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while silences() < 2 {
        assert!(std::time::Instant::now() < deadline, "silences not created");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let denied = b
        .audit()
        .await
        .into_iter()
        .filter(|r| {
            r.action == "silence" && r.outcome.starts_with("denied: this silence needs approval")
        })
        .count();
    assert_eq!(denied, 4);
    b.stop();
}

/// Spellings of one hex signature that decode to the same bytes.
fn hex_case_variants(sig: &str) -> Vec<String> {
    let (prefix, hex) = sig.split_at(sig.find('=').map_or(0, |i| i + 1));
    let mixed: String = hex
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    vec![
        format!("{prefix}{}", hex.to_ascii_uppercase()),
        format!("{prefix}{mixed}"),
        format!("{prefix}{hex} "),
    ]
}

async fn slack_signature_case_variant_is_a_replay() {
    let (b, runner) = bot().await;
    let now = b.clock.now_unix();
    let body = slack_command_body(
        OPERATOR,
        "run test-gpu:look instance=node1:9949",
        "http://127.0.0.1:9/x",
    );
    let signed = slack_request("/slack/commands", &body, now, SLACK_SECRET);
    let sig = signed.headers()[gpuops::signing::SLACK_SIGNATURE]
        .to_str()
        .unwrap()
        .to_string();
    let (s, out) = b.send(signed).await;
    assert_eq!(s, 200, "{out}");
    assert!(out.contains("started run"), "{out}");
    b.wait_for(10, "the run's step", |_| runner.calls().len() == 1)
        .await;
    for variant in hex_case_variants(&sig) {
        assert_ne!(variant, sig);
        let mut again = slack_request("/slack/commands", &body, now, SLACK_SECRET);
        again
            .headers_mut()
            .insert(gpuops::signing::SLACK_SIGNATURE, variant.parse().unwrap());
        let (s, out) = b.send(again).await;
        assert_eq!(s, 401, "{variant:?} replayed the request: {out}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(run_count(&b).await, 1, "one run");
    assert_eq!(runner.calls().len(), 1, "its step ran once");
    let runs = b
        .audit()
        .await
        .into_iter()
        .filter(|r| r.action == "run" && r.outcome.starts_with("started"))
        .count();
    assert_eq!(runs, 1, "one run started");
    b.stop();
}

async fn discord_signature_case_variant_is_a_replay() {
    let am = Capture::start().await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[alertmanager]\nurl = \"{}\"\n", am.url);
    let b = Bot::start_in(dir, &extra, None).await;
    let now = b.clock.now_unix();
    let body = discord_interaction(
        2,
        "423456789012345678",
        "tok-silence",
        serde_json::json!({ "name": "gpuops", "options": [{ "name": "command", "type": 3, "value": "silence TestGpuDown 1h" }] }),
    );
    let signed = discord_request(&b.discord_key, &body, now);
    let sig = signed.headers()[gpuops::signing::DISCORD_SIGNATURE]
        .to_str()
        .unwrap()
        .to_string();
    let (s, out) = b.send(signed).await;
    assert_eq!(s, 200, "{out}");
    let silences = || {
        am.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.0 == "POST" && r.1 == "/api/v2/silences")
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while silences() == 0 {
        assert!(std::time::Instant::now() < deadline, "no silence created");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for variant in hex_case_variants(&sig) {
        assert_ne!(variant, sig);
        let mut again = discord_request(&b.discord_key, &body, now);
        again
            .headers_mut()
            .insert(gpuops::signing::DISCORD_SIGNATURE, variant.parse().unwrap());
        let (s, out) = b.send(again).await;
        assert_eq!(s, 401, "{variant:?} replayed the interaction: {out}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(silences(), 1, "one silence");
    let audited = b
        .audit()
        .await
        .into_iter()
        .filter(|r| r.action == "silence")
        .count();
    assert_eq!(audited, 1, "one silence audited");
    b.stop();
}

async fn one_person_with_slack_and_discord_cannot_approve_own_request() {
    // alice is an operator on Slack and an admin on Discord.
    const ALICE_DISCORD: &str = "323456789012345678";
    let dir = tempfile::tempdir().unwrap();
    let rb = dir.path().join("runbooks");
    std::fs::create_dir_all(&rb).unwrap();
    std::fs::write(rb.join("test-gpu.yaml"), RUNBOOK).unwrap();
    let runner = Arc::new(RecordingRunner::new());
    let exec = Arc::new(local_exec(&runner));
    let extra = format!(
        "[runbooks]\ndir = \"{}\"\n[[rbac.people]]\nname = \"alice\"\naccounts = [\"slack:{OPERATOR}\", \"discord:{ALICE_DISCORD}\"]\n",
        rb.display()
    );
    let b = Bot::start_in(dir, &extra, Some(exec)).await;
    let g = b.alert(webhook("TestGpuDown", "node1:9949", &[])).await;
    let (_, v) = b
        .slack_command(OPERATOR, &format!("run test-gpu:drain alert={g}"))
        .await;
    assert!(text(&v).contains("started run"), "{v}");
    b.wait_for(10, "approval request", |b| {
        b.slack
            .replies()
            .iter()
            .any(|r| r.contains("/gpuops approve r"))
    })
    .await;
    let run = waiting_run_id(&b.slack.replies());

    // alice, through her Discord admin account, approves her own request.
    let body = discord_interaction(
        2,
        ALICE_DISCORD,
        "tok-approve",
        serde_json::json!({ "name": "gpuops", "options": [{ "name": "command", "type": 3, "value": format!("approve {run}") }] }),
    );
    let (s, out) = b
        .send(discord_request(&b.discord_key, &body, b.clock.now_unix()))
        .await;
    assert_eq!(s, 200, "{out}");
    assert!(
        out.contains("someone other than the person who asked"),
        "{out}"
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(runner.calls().is_empty(), "the step did not run");
    assert_eq!(approvals_waiting(&b).await, 1, "still waiting");
    let refused = b
        .audit()
        .await
        .into_iter()
        .rev()
        .find(|r| r.action == "approve")
        .unwrap();
    assert_eq!(refused.who, format!("discord:{ALICE_DISCORD}"));
    assert!(refused.outcome.starts_with("denied"), "{refused:?}");
    assert_eq!(refused.params["person"], "alice", "{refused:?}");
    assert_eq!(
        refused.params["requested_by_person"], "alice",
        "{refused:?}"
    );

    // Another person (an admin not listed in people) may approve.
    let (_, v) = b.slack_command(ADMIN, &format!("approve {run}")).await;
    assert!(text(&v).contains("approved step `drain`"), "{v}");
    b.wait_for(10, "the drain", |_| runner.calls().len() == 1)
        .await;
    let approved = b
        .audit()
        .await
        .into_iter()
        .rev()
        .find(|r| r.action == "approve")
        .unwrap();
    assert_eq!(approved.outcome, "approved");
    assert_eq!(approved.params["person"], format!("slack:{ADMIN}"));
    assert_eq!(approved.params["requested_by_person"], "alice");
    b.stop();
}

async fn slack_request_replayed_after_a_restart_is_refused() {
    let (a, runner_a) = bot().await;
    let now = a.clock.now_unix();
    let body = slack_command_body(
        OPERATOR,
        "run test-gpu:look instance=node1:9949",
        "http://127.0.0.1:9/x",
    );
    let (s, out) = a
        .send(slack_request("/slack/commands", &body, now, SLACK_SECRET))
        .await;
    assert_eq!(s, 200, "{out}");
    a.wait_for(10, "the run's step", |_| runner_a.calls().len() == 1)
        .await;
    a.stop();
    let dir = a.dir;
    drop(a.router);
    // The same signed bytes, to a restarted bot, well within the window.
    let (b, runner_b) = bot_in(dir).await;
    b.clock.set(now + 60);
    let (s, out) = b
        .send(slack_request("/slack/commands", &body, now, SLACK_SECRET))
        .await;
    assert_eq!(s, 401, "replayed across the restart: {out}");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(runner_b.calls().is_empty());
    assert_eq!(run_count(&b).await, 1);
    b.stop();
}

chat_on_both!(
    slack_forged_stale_replayed_and_unsigned_requests_get_401_and_change_nothing,
    slack_documented_example_passes_the_router_only_at_its_time,
    discord_ed25519_ping_command_forged_stale_and_replayed,
    role_matrix_through_the_router,
    parameter_injection_through_run_is_refused_and_runs_nothing,
    approval_needs_a_second_admin_and_expires,
    a_waiting_approval_survives_a_restart,
    discord_commands_defer_and_follow_up_and_buttons_answer_inline,
    a_long_run_without_an_alert_stays_within_slacks_response_url_budget,
    shipped_gpu_reset_runbook_from_its_alert_investigates_then_waits_and_deny_goes_on,
    slack_signature_case_variant_is_a_replay,
    discord_signature_case_variant_is_a_replay,
    one_person_with_slack_and_discord_cannot_approve_own_request,
    slack_request_replayed_after_a_restart_is_refused,
    probe_to_host_outside_inventory_is_refused,
    stale_approve_button_after_deny_changes_nothing,
    silence_matching_every_alert_or_too_long_needs_approval,
);

const NODE17: &str =
    "[agents]\n[[agents.nodes]]\ninstance = \"127.0.0.1:18949\"\nnode = \"gpu-node-17\"\n";

async fn status_by_node_name_finds_the_instances_alerts() {
    let b = Bot::start(NODE17, None).await;
    for (name, gpu) in [("GPUFellOffBus", "5"), ("GPUXIDError", "1")] {
        b.alert(webhook(name, "127.0.0.1:18949", &[("gpu", gpu)]))
            .await;
    }
    b.alert(webhook("OOMKill", "10.0.0.9:9949", &[])).await;
    let (_, v) = b.slack_command(STRANGER, "status gpu-node-17").await;
    let t = text(&v);
    assert!(!t.contains("no open alerts"), "{t}");
    assert!(
        t.contains("GPUFellOffBus") && t.contains("GPUXIDError"),
        "{t}"
    );
    assert!(t.contains("gpu-node-17 (127.0.0.1:18949)"), "{t}");
    assert!(!t.contains("OOMKill"), "another node's alert: {t}");
    // The instance finds the same alerts, under the node's name.
    let (_, v) = b.slack_command(STRANGER, "status 127.0.0.1:18949").await;
    let by_instance = text(&v);
    assert!(
        by_instance.contains("GPUFellOffBus") && by_instance.contains("gpu-node-17"),
        "{by_instance}"
    );
    b.stop();
}

async fn status_of_unknown_name_lists_known_nodes() {
    let b = Bot::start(NODE17, None).await;
    b.alert(webhook("OOMKill", "gpu-node-3.dc1:9949", &[]))
        .await;
    let (_, v) = b.slack_command(STRANGER, "status gpu-node-71").await;
    let t = text(&v);
    assert!(!t.contains("no open alerts"), "{t}");
    assert!(
        t.contains("no node called gpu-node-71; known nodes: gpu-node-17, gpu-node-3"),
        "{t}"
    );
    // A known node with nothing open is an all-clear for that node only.
    b.alert(webhook("OOMKill", "10.0.0.9:9949", &[])).await;
    let (_, v) = b.slack_command(STRANGER, "status gpu-node-17").await;
    let t = text(&v);
    assert!(
        t.contains("✅ no open alerts on gpu-node-17 (127.0.0.1:18949)"),
        "{t}"
    );
    b.stop();
}

/// A stored group the bot cannot read, then a store it cannot ask: never
/// an all-clear (SQLite only: the test edits the database file).
#[tokio::test]
async fn status_when_store_unreachable_says_so() {
    let b = Bot::start(NODE17, None).await;
    b.alert(webhook("GPUFellOffBus", "127.0.0.1:18949", &[("gpu", "5")]))
        .await;
    // The CLI form reads the same store: by name, and an unknown name.
    let toml = b.dir.path().join("bot.toml");
    std::fs::write(&toml, config_text(b.dir.path(), NODE17)).unwrap();
    // Inline secrets: 0600, or the configuration is refused.
    std::fs::set_permissions(&toml, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    #[allow(clippy::disallowed_methods)] // the real binary, as an operator runs it
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpuops"))
            .arg("status")
            .arg("--config")
            .arg(&toml)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = cli(&["gpu-node-17"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("GPUFellOffBus on gpu-node-17 (127.0.0.1:18949)"),
        "{out}"
    );
    let (code, out) = cli(&["gpu-node-71"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("no node called gpu-node-71; known nodes: gpu-node-17"),
        "{out}"
    );
    let db = rusqlite::Connection::open(b.dir.path().join("bot.db")).unwrap();
    db.execute("UPDATE alert_groups SET state = 'not json'", [])
        .unwrap();
    let (_, v) = b.slack_command(STRANGER, "status gpu-node-17").await;
    let t = text(&v);
    assert!(!t.contains('✅'), "{t}");
    assert!(t.contains("1 open group(s) could not be read"), "{t}");
    db.execute("ALTER TABLE alert_groups RENAME TO alert_groups_gone", [])
        .unwrap();
    let (code, out) = cli(&[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not an all-clear"), "{out}");
    for cmd in ["status", "status gpu-node-17", "alerts"] {
        let (_, v) = b.slack_command(STRANGER, cmd).await;
        let t = text(&v);
        assert!(!t.contains('✅'), "{cmd}: {t}");
        assert!(
            t.contains("the alert store could not be asked") && t.contains("not an all-clear"),
            "{cmd}: {t}"
        );
    }
    b.stop();
}

async fn status_with_prometheus_unreachable_says_the_node_list_may_be_incomplete() {
    // Nothing listens on port 9: discovery from Prometheus fails.
    let extra =
        "[prometheus]\nurl = \"http://127.0.0.1:9\"\n[agents]\nprometheus_job = \"gpuops\"\n\
                 [[agents.nodes]]\ninstance = \"127.0.0.1:18949\"\nnode = \"gpu-node-17\"\n";
    let b = Bot::start(extra, None).await;
    let (_, v) = b.slack_command(STRANGER, "status gpu-node-40").await;
    let t = text(&v);
    assert!(!t.contains('✅'), "{t}");
    assert!(
        t.contains("no node called gpu-node-40; known nodes: gpu-node-17"),
        "{t}"
    );
    assert!(
        t.contains("the list may be incomplete: Prometheus could not be asked"),
        "{t}"
    );
    b.stop();
}

chat_on_both!(
    status_with_prometheus_unreachable_says_the_node_list_may_be_incomplete,
    status_by_node_name_finds_the_instances_alerts,
    status_of_unknown_name_lists_known_nodes,
);

/// Issue 22, observations 7 and 8, and the packaging test of its quality
/// bar: the packaged `bot.toml` with only the Slack token and signing
/// secret filled in (plus the README's steps: a destination, an operator in
/// `[rbac]`, the exec key) lets that operator press Run on a GPUFellOffBus
/// alert and the node step goes to an agent the shipped Prometheus job
/// (`gpuops-agent`) scrapes. Before: "⛔ ack needs the operator or admin
/// role", "no runbook `gpu-fell-off-bus`", "not a known agent".
#[tokio::test]
async fn packaged_bot_toml_lets_an_rbac_operator_run_gpu_fell_off_bus_from_chat() {
    use std::os::unix::fs::PermissionsExt as _;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let (key, _, _) = exec_keys(dir.path());
    let secret = |name: &str, value: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, value).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p.display().to_string()
    };
    let token = secret("slack-bot-token", "xoxb-test-token");
    let signing = secret("slack-signing-secret", SLACK_SECRET);

    // The agent, and Prometheus scraping it as the shipped job names it.
    let agent = Capture::start().await;
    let scrape = format!("{}/metrics", agent.url);
    let jobs = prometheus_yml_jobs(repo);
    let app = axum::Router::new().route(
        "/api/v1/targets",
        axum::routing::get(move || {
            let scrape = scrape.clone();
            let jobs = jobs.clone();
            async move {
                let targets: Vec<serde_json::Value> = jobs
                    .iter()
                    .map(|j| {
                        serde_json::json!({
                            "labels": {"instance": "gpu-node-1:9949", "job": j},
                            "scrapeUrl": scrape, "health": "up"
                        })
                    })
                    .collect();
                axum::Json(serde_json::json!({
                    "status": "success", "data": {"activeTargets": targets}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let prometheus = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let packaged = std::fs::read_to_string(repo.join("packaging/bot.toml")).unwrap();
    let replace = |text: String, from: &str, to: &str| {
        assert!(text.contains(from), "packaging/bot.toml has no {from:?}");
        text.replacen(from, to, 1)
    };
    let mut text = packaged;
    // Where a test may write: the store, the runbooks the package installs
    // from this repository, this Prometheus.
    text = replace(
        text,
        "\"/var/lib/gpuops/gpuops.db\"",
        &format!("{:?}", dir.path().join("gpuops.db")),
    );
    text = replace(
        text,
        "dir = \"/usr/share/gpuops/runbooks\"",
        &format!("dir = {:?}", repo.join("runbooks")),
    );
    text = replace(
        text,
        "url = \"http://127.0.0.1:9090\"",
        &format!("url = \"{prometheus}\""),
    );
    // The README's steps.
    text = replace(
        text,
        "# [slack]\n# bot_token_file = \"slack-bot-token\"\n# signing_secret_file = \"slack-signing-secret\"",
        &format!("[slack]\nbot_token_file = {token:?}\nsigning_secret_file = {signing:?}"),
    );
    text = replace(
        text,
        "# [[routing.destinations]]\n# tiers = [\"P1\", \"P2\"]\n# slack_channel = \"#gpu-oncall\"",
        "[[routing.destinations]]\ntiers = [\"P1\", \"P2\"]\nslack_channel = \"C0ALERTS\"",
    );
    text = replace(
        text,
        "operators = []",
        &format!("operators = [\"{OPERATOR}\"]"),
    );
    text = replace(
        text,
        "# signing_key_file = \"exec-key\"",
        &format!("signing_key_file = {:?}", key.display().to_string()),
    );
    let path = dir.path().join("bot.toml");
    std::fs::write(&path, &text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = gpuops::config::BotConfig::from_file(&path).unwrap();
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    assert_eq!(gpuops::inventory::job_warning(&cfg).await, None);

    let b = Bot::start_config(dir, cfg, None).await;
    let g = b
        .alert(webhook("GPUFellOffBus", "gpu-node-1:9949", &[]))
        .await;
    b.wait_for(10, "the alert message", |b| {
        b.slack.calls().iter().any(|c| c.op == "post")
    })
    .await;
    let button = gpuops::notify::Button::RunRunbook("gpu-fell-off-bus".into());
    let posted = b
        .slack
        .calls()
        .into_iter()
        .find(|c| c.op == "post")
        .unwrap();
    let gpuops::notify::Message::Alert(m) = &posted.message else {
        panic!("not an alert message: {posted:?}")
    };
    assert!(m.buttons.contains(&button), "{:?}", m.buttons);

    let (action, value) = button.slack_action(g);
    let replies = Capture::start().await;
    let body = slack_button_body(OPERATOR, action, &value, &format!("{}/resp", replies.url));
    let (s, _) = b
        .send(slack_request(
            "/slack/interactions",
            &body,
            b.clock.now_unix(),
            SLACK_SECRET,
        ))
        .await;
    assert_eq!(s, 200);
    let started = replies.wait_for(10, "started run").await;
    assert!(!started.contains('⛔'), "{started}");
    // The first node step goes, signed, to the agent of the shipped job
    // (first for its plan: this stand-in agent answers no plan, so the step
    // is never run unplanned).
    let exec = agent.wait_for(20, "kernel-log").await;
    assert!(exec.contains("gpu-fell-off-bus"), "{exec}");
    assert!(exec.contains("gpu-node-1"), "{exec}");
    let reqs = agent.requests.lock().unwrap().clone();
    assert!(
        reqs.iter().any(|r| r.0 == "POST" && r.1 == "/v1/plan"),
        "{reqs:?}"
    );
    assert!(!reqs.iter().any(|r| r.1 == "/v1/exec"), "{reqs:?}");
    let all = b.slack.replies().join("\n");
    assert!(!all.contains("not a known agent"), "{all}");
    b.stop();
}

/// The job names of the shipped `config/prometheus/prometheus.yml` that
/// scrape the agents (port 9949).
fn prometheus_yml_jobs(repo: &std::path::Path) -> Vec<String> {
    let text = std::fs::read_to_string(repo.join("config/prometheus/prometheus.yml")).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let jobs: Vec<String> = doc["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter(|j| serde_norway::to_string(j).unwrap().contains(":9949"))
        .filter_map(|j| j["job_name"].as_str().map(str::to_string))
        .collect();
    assert!(!jobs.is_empty(), "no job of prometheus.yml scrapes :9949");
    jobs
}
