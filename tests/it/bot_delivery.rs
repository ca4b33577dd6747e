//! The bot in-process (real router, store, outbox worker and notifiers)
//! against local fake Slack and Discord APIs: routing by tier, update on
//! change, edit on resolve, HA duplicates, truncation, 429, 5xx backoff,
//! dead letters.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpuops::bot::BotState;
use gpuops::bot_role::router;
use gpuops::config::BotConfig;
use serde_json::{json, Value};
use support::{am_payload, bot_config, FakeApi, Recorded, Scripted};

const WAIT: Duration = Duration::from_secs(10);

struct Bot {
    state: Arc<BotState>,
    base: String,
    slack: FakeApi,
    discord: FakeApi,
    _dir: tempfile::TempDir,
}

impl Bot {
    async fn start(extra: &str) -> Bot {
        let dir = tempfile::tempdir().unwrap();
        let slack = FakeApi::slack().await;
        let discord = FakeApi::discord().await;
        let text = bot_config(dir.path(), &slack, &discord, extra);
        let cfg = BotConfig::from_str(Path::new("test.toml"), &text).unwrap();
        let store = support::open_store(&cfg).await;
        let (state, worker) = BotState::new(Arc::new(cfg), store).unwrap();
        tokio::spawn(worker.run(std::future::pending()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let app = router(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Bot {
            state,
            base,
            slack,
            discord,
            _dir: dir,
        }
    }

    async fn post(&self, body: &str) -> Value {
        let r = reqwest::Client::new()
            .post(format!("{}/alertmanager", self.base))
            .bearer_auth("hook-token-s3cret")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

fn slack_posts(r: &[Recorded]) -> Vec<&Recorded> {
    r.iter()
        .filter(|r| r.path.ends_with("chat.postMessage"))
        .collect()
}

fn slack_updates(r: &[Recorded]) -> Vec<&Recorded> {
    r.iter()
        .filter(|r| r.path.ends_with("chat.update"))
        .collect()
}

/// All the text of a Slack message body, blocks included.
fn slack_text(r: &Recorded) -> String {
    r.raw.clone()
}

async fn tiers_route_to_their_channels_on_both_platforms() {
    let bot = Bot::start("").await;
    bot.post(&am_payload(
        "GpuFellOffBus",
        "firing",
        &[("n1:9949", "critical", "firing")],
    ))
    .await;
    bot.post(&am_payload(
        "GpuHot",
        "firing",
        &[("n2:9949", "warning", "firing")],
    ))
    .await;
    bot.post(&am_payload(
        "Weird",
        "firing",
        &[("n3:9949", "catastrophic", "firing")],
    ))
    .await;
    let s = bot.slack.wait_for(3, WAIT).await;
    let d = bot.discord.wait_for(3, WAIT).await;
    let channel_of = |name: &str| {
        s.iter()
            .find(|r| r.raw.contains(name))
            .map(|r| r.body["channel"].as_str().unwrap().to_string())
    };
    assert_eq!(channel_of("GpuFellOffBus").as_deref(), Some("CP1"));
    assert_eq!(channel_of("GpuHot").as_deref(), Some("CP3"));
    assert_eq!(channel_of("Weird").as_deref(), Some("CP3"));
    let discord_path_of = |name: &str| {
        d.iter()
            .find(|r| r.raw.contains(name))
            .map(|r| r.path.clone())
    };
    assert_eq!(
        discord_path_of("GpuFellOffBus").as_deref(),
        Some("/api/v10/channels/1001/messages")
    );
    assert_eq!(
        discord_path_of("GpuHot").as_deref(),
        Some("/api/v10/channels/3003/messages")
    );
    let weird = s.iter().find(|r| r.raw.contains("Weird")).unwrap();
    assert!(
        slack_text(weird).contains("unknown severity"),
        "{}",
        weird.raw
    );
    let weird = d.iter().find(|r| r.raw.contains("Weird")).unwrap();
    assert!(weird.raw.contains("unknown severity"), "{}", weird.raw);
    // Tokens go where the platforms expect them.
    assert_eq!(s[0].authorization, "Bearer xoxb-test-token-s3cret");
    assert_eq!(d[0].authorization, "Bot discord-token-s3cret");
    let m = bot.metrics().await;
    assert!(
        m.contains(r#"gpuops_alerts_received_total{status="firing",tier="P1"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"gpuops_alerts_received_total{status="firing",tier="P3"} 2"#),
        "{m}"
    );
    assert!(
        m.contains(r#"gpuops_notifications_total{outcome="sent",platform="slack"} 3"#),
        "{m}"
    );
}

async fn changes_edit_in_place_and_resolve_edits_then_replies_in_thread() {
    let bot = Bot::start("").await;
    bot.post(&am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing")],
    ))
    .await;
    let s = bot.slack.wait_for(1, WAIT).await;
    let ts = s[0].raw.clone();
    assert!(ts.contains("FIRING 1"), "{ts}");
    bot.discord.wait_for(1, WAIT).await;
    // A second alert joins: the same message is edited, and a thread
    // reply says what joined.
    bot.post(&am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing"), ("n2", "critical", "firing")],
    ))
    .await;
    let s = bot.slack.wait_for(3, WAIT).await;
    let up = slack_updates(&s);
    assert_eq!(up.len(), 1, "{s:#?}");
    assert_eq!(up[0].body["ts"], "1700000000.000001");
    assert_eq!(up[0].body["channel"], "CP1");
    assert!(up[0].raw.contains("FIRING 2"));
    assert!(s[2].raw.contains("+1 firing"), "{}", s[2].raw);
    let d = bot.discord.wait_for(3, WAIT).await;
    assert_eq!(d[1].method, "PATCH");
    let first_id = "900000000000000001";
    assert_eq!(
        d[1].path,
        format!("/api/v10/channels/1001/messages/{first_id}")
    );
    // Resolve: edit to RESOLVED (buttons gone), then a thread reply.
    bot.post(&am_payload(
        "GpuXid",
        "resolved",
        &[
            ("n1", "critical", "resolved"),
            ("n2", "critical", "resolved"),
        ],
    ))
    .await;
    let s = bot.slack.wait_for(5, WAIT).await;
    let up = slack_updates(&s);
    assert_eq!(up.len(), 2);
    assert!(up[1].raw.contains("RESOLVED"), "{}", up[1].raw);
    assert!(
        !up[1].raw.contains("gpuops_ack"),
        "resolved message keeps buttons"
    );
    let posts = slack_posts(&s);
    assert_eq!(posts.len(), 3);
    assert_eq!(posts[2].body["thread_ts"], "1700000000.000001");
    assert!(posts[2].raw.contains("Resolved"));
    let d = bot.discord.wait_for(5, WAIT).await;
    assert_eq!(d[3].method, "PATCH");
    assert_eq!(d[3].body["components"], json!([]));
    assert_eq!(d[4].method, "POST");
    assert_eq!(d[4].body["message_reference"]["message_id"], first_id);
    bot.slack
        .expect_no_more(5, Duration::from_millis(300))
        .await;
}

/// XID 94 alerts on `gpu-node-17:9949`, one per `(gpu, status)`.
fn xid_payload(severity: &str, status: &str, gpus: &[(&str, &str)]) -> String {
    let alerts: Vec<(&str, &str, &str)> = gpus
        .iter()
        .map(|(_, st)| ("gpu-node-17:9949", severity, *st))
        .collect();
    let mut v: Value = serde_json::from_str(&am_payload("GPUXIDError", status, &alerts)).unwrap();
    for (i, (gpu, _)) in gpus.iter().enumerate() {
        let a = &mut v["alerts"][i];
        a["labels"]["gpu"] = json!(gpu);
        a["labels"]["xid"] = json!("94");
        a["fingerprint"] = json!(format!("xid94-gpu{gpu}"));
    }
    v.to_string()
}

/// Issue 21 (3): XID 94 on GPUs 1 and 6 joined an open P3 group; the bot
/// edited the message and told nobody.
async fn alert_joining_open_group_posts_a_thread_reply() {
    let bot = Bot::start("").await;
    bot.post(&xid_payload("warning", "firing", &[("0", "firing")]))
        .await;
    bot.slack.wait_for(1, WAIT).await;
    bot.discord.wait_for(1, WAIT).await;
    bot.post(&xid_payload(
        "warning",
        "firing",
        &[("0", "firing"), ("1", "firing"), ("6", "firing")],
    ))
    .await;
    let s = bot.slack.wait_for(3, WAIT).await;
    assert!(s[1].path.ends_with("chat.update"), "{s:#?}");
    assert!(s[1].raw.contains("FIRING 3"), "{}", s[1].raw);
    let reply = &s[2];
    assert!(reply.path.ends_with("chat.postMessage"), "{s:#?}");
    assert_eq!(reply.body["channel"], "CP3");
    assert_eq!(reply.body["thread_ts"], "1700000000.000001");
    let text = slack_text(reply);
    assert!(text.contains("+2 firing: XID 94 on gpu-node-17"), "{text}");
    assert!(text.contains("GPU 1, GPU 6"), "{text}");
    assert!(!text.contains("GPU 0"), "{text}");
    // P3: a thread reply only, not broadcast to the channel.
    assert!(reply.body.get("reply_broadcast").is_none(), "{text}");
    let d = bot.discord.wait_for(3, WAIT).await;
    assert_eq!(
        (d[1].method.as_str(), d[2].method.as_str()),
        ("PATCH", "POST")
    );
    assert_eq!(
        d[2].body["message_reference"]["message_id"],
        "900000000000000001"
    );
    assert!(d[2].raw.contains("+2 firing"), "{}", d[2].raw);
    bot.slack
        .expect_no_more(3, Duration::from_millis(300))
        .await;
}

/// Issue 21 (3): some alerts of a group resolve while others still fire.
async fn partial_resolve_posts_a_thread_reply() {
    let bot = Bot::start("").await;
    bot.post(&xid_payload(
        "warning",
        "firing",
        &[("0", "firing"), ("1", "firing"), ("6", "firing")],
    ))
    .await;
    bot.slack.wait_for(1, WAIT).await;
    bot.post(&xid_payload(
        "warning",
        "firing",
        &[("0", "firing"), ("1", "resolved"), ("6", "resolved")],
    ))
    .await;
    let s = bot.slack.wait_for(3, WAIT).await;
    assert!(s[1].path.ends_with("chat.update"), "{s:#?}");
    assert!(s[1].raw.contains("FIRING 1"), "{}", s[1].raw);
    let reply = &s[2];
    assert_eq!(reply.body["thread_ts"], "1700000000.000001");
    let text = slack_text(reply);
    assert!(
        text.contains("−2 resolved: XID 94 on gpu-node-17"),
        "{text}"
    );
    assert!(text.contains("GPU 1, GPU 6"), "{text}");
    assert!(!text.contains("firing:"), "{text}");
    assert!(reply.body.get("reply_broadcast").is_none(), "{text}");
    bot.slack
        .expect_no_more(3, Duration::from_millis(300))
        .await;
}

/// HA: two AlertManagers deliver each state; the second copy (and a late,
/// out-of-order one) posts nothing: one edit and one change reply.
async fn ha_duplicate_state_posts_nothing() {
    let bot = Bot::start("").await;
    let one = am_payload("GpuXid", "firing", &[("n1", "critical", "firing")]);
    let two = am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing"), ("n2", "critical", "firing")],
    );
    assert_eq!(bot.post(&one).await["duplicate"], false);
    assert_eq!(bot.post(&one).await["duplicate"], true);
    bot.slack.wait_for(1, WAIT).await;
    bot.discord.wait_for(1, WAIT).await;
    assert_eq!(bot.post(&two).await["duplicate"], false);
    // The second replica's copies, one of them late and out of order.
    assert_eq!(bot.post(&two).await["duplicate"], true);
    assert_eq!(bot.post(&one).await["duplicate"], true);
    let s = bot.slack.wait_for(3, WAIT).await;
    assert_eq!(slack_updates(&s).len(), 1, "{s:#?}");
    assert_eq!(
        s.iter().filter(|r| r.raw.contains("+1 firing")).count(),
        1,
        "{s:#?}"
    );
    bot.discord.wait_for(3, WAIT).await;
    bot.slack
        .expect_no_more(3, Duration::from_millis(500))
        .await;
    bot.discord
        .expect_no_more(3, Duration::from_millis(10))
        .await;
}

async fn a_huge_group_is_truncated_not_rejected() {
    let bot = Bot::start("").await;
    let alerts: Vec<(String, &str, &str)> = (0..400)
        .map(|i| {
            (
                format!("node-{i:03}.cluster.example.com:9949"),
                "critical",
                "firing",
            )
        })
        .collect();
    let refs: Vec<(&str, &str, &str)> = alerts
        .iter()
        .map(|(a, b, c)| (a.as_str(), *b, *c))
        .collect();
    bot.post(&am_payload("GpuXid", "firing", &refs)).await;
    let s = bot.slack.wait_for(1, WAIT).await;
    let blocks = s[0].body["attachments"][0]["blocks"]
        .as_array()
        .unwrap()
        .clone();
    assert!(blocks.len() <= 50);
    let lines = blocks
        .iter()
        .filter_map(|b| b["text"]["text"].as_str())
        .find(|t| t.contains("node-001"))
        .unwrap();
    assert!(lines.chars().count() <= 3000);
    assert!(lines.ends_with("more nodes"), "{lines}");
    let d = bot.discord.wait_for(1, WAIT).await;
    let desc = d[0].body["embeds"][0]["description"].as_str().unwrap();
    assert!(desc.chars().count() <= 4096);
    assert!(desc.ends_with("more nodes"));
}

async fn rate_limits_are_honoured_then_delivery_succeeds() {
    let bot = Bot::start("").await;
    bot.slack.script([
        Scripted::new(429, json!({"ok": false, "error": "ratelimited"})).header("Retry-After", "1"),
    ]);
    bot.discord.script([Scripted::new(
        429,
        json!({"message": "You are being rate limited.", "retry_after": 0.7, "global": false}),
    )]);
    bot.post(&am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing")],
    ))
    .await;
    let s = bot.slack.wait_for(2, WAIT).await;
    let gap = s[1].at - s[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "slack retried after {gap:?}"
    );
    assert!(gap < Duration::from_secs(3), "slack retried after {gap:?}");
    let d = bot.discord.wait_for(2, WAIT).await;
    let gap = d[1].at - d[0].at;
    assert!(
        gap >= Duration::from_millis(650),
        "discord retried after {gap:?}"
    );
    assert!(
        gap < Duration::from_secs(3),
        "discord retried after {gap:?}"
    );
    bot.slack
        .expect_no_more(2, Duration::from_millis(300))
        .await;
    let m = bot.metrics().await;
    assert!(
        m.contains(r#"gpuops_notifications_total{outcome="rate_limited",platform="slack"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"gpuops_notifications_total{outcome="sent",platform="discord"} 1"#),
        "{m}"
    );
}

async fn server_errors_back_off_exponentially() {
    let bot = Bot::start("").await;
    bot.slack.script([
        Scripted::new(503, json!({})),
        Scripted::new(502, json!({})),
        Scripted::new(500, json!({})),
    ]);
    let started = Instant::now();
    bot.post(&am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing")],
    ))
    .await;
    let s = bot.slack.wait_for(4, WAIT).await;
    let gaps: Vec<Duration> = s.windows(2).map(|w| w[1].at - w[0].at).collect();
    // backoff_initial 0.2 s doubling, capped at 1 s, jitter in the upper half.
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(190), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(390), "{gaps:?}");
    assert!(started.elapsed() < Duration::from_secs(8));
    let m = bot.metrics().await;
    assert!(
        m.contains(r#"gpuops_notifications_total{outcome="retry",platform="slack"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"gpuops_notifications_total{outcome="sent",platform="slack"} 1"#),
        "{m}"
    );
}

async fn permanent_errors_become_dead_letters() {
    let bot = Bot::start("").await;
    bot.slack.script([Scripted::new(
        200,
        json!({"ok": false, "error": "channel_not_found"}),
    )]);
    bot.discord.script([Scripted::new(
        403,
        json!({"message": "Missing Access", "code": 50001}),
    )]);
    bot.post(&am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing")],
    ))
    .await;
    bot.slack.wait_for(1, WAIT).await;
    bot.discord.wait_for(1, WAIT).await;
    let deadline = Instant::now() + WAIT;
    let dead = loop {
        let dead = bot.state.store.dead_letters().await.unwrap();
        if dead.len() == 2 || Instant::now() > deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead.len(), 2, "{dead:?}");
    let by = |p: &str| {
        dead.iter()
            .find(|d| d.destination.starts_with(p))
            .unwrap()
            .error
            .clone()
    };
    assert!(by("slack").contains("channel_not_found"), "{dead:?}");
    assert!(by("discord").contains("50001"), "{dead:?}");
    assert!(by("discord").contains("Missing Access"), "{dead:?}");
    bot.slack
        .expect_no_more(1, Duration::from_millis(500))
        .await;
    assert_eq!(bot.state.store.pending().await.unwrap(), 0);
    let m = bot.metrics().await;
    assert!(
        m.contains(r#"gpuops_notifications_total{outcome="dead_letter",platform="slack"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"gpuops_notifications_total{outcome="dead_letter",platform="discord"} 1"#),
        "{m}"
    );
}

async fn outbox_replies_and_acks_reach_the_alert_thread() {
    let bot = Bot::start("").await;
    let r = bot
        .post(&am_payload(
            "GpuXid",
            "firing",
            &[("n1", "critical", "firing")],
        ))
        .await;
    let group = r["group_id"].as_i64().unwrap();
    bot.slack.wait_for(1, WAIT).await;
    bot.discord.wait_for(1, WAIT).await;
    let text = gpuops::notify::Message::Text(gpuops::notify::TextMessage {
        text: "step 1/3 nvidia-smi: exit 0".into(),
        code: Some("GPU 0: ok".into()),
        buttons: Vec::new(),
    });
    assert_eq!(bot.state.outbox.reply(group, &text).await.unwrap(), 2);
    assert!(bot.state.outbox.acknowledge(group, "U0OPER").await.unwrap());
    let s = bot.slack.wait_for(3, WAIT).await;
    let reply = slack_posts(&s)[1];
    assert_eq!(reply.body["thread_ts"], "1700000000.000001");
    assert!(reply.raw.contains("GPU 0: ok"));
    let up = slack_updates(&s)[0];
    assert!(up.raw.contains("acknowledged by U0OPER"), "{}", up.raw);
    assert!(!up.raw.contains("gpuops_ack"), "ack button stays after ack");
    let d = bot.discord.wait_for(3, WAIT).await;
    assert!(d
        .iter()
        .any(|r| r.body["message_reference"]["message_id"] == "900000000000000001"));
}

async fn a_deleted_message_is_posted_again_instead_of_lost() {
    let bot = Bot::start("").await;
    bot.post(&am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing")],
    ))
    .await;
    bot.slack.wait_for(1, WAIT).await;
    bot.discord.wait_for(1, WAIT).await;
    bot.slack.script([Scripted::new(
        200,
        json!({"ok": false, "error": "message_not_found"}),
    )]);
    bot.discord.script([Scripted::new(
        404,
        json!({"message": "Unknown Message", "code": 10008}),
    )]);
    bot.post(&am_payload(
        "GpuXid",
        "firing",
        &[("n1", "critical", "firing"), ("n2", "critical", "firing")],
    ))
    .await;
    let s = bot.slack.wait_for(3, WAIT).await;
    assert!(s[1].path.ends_with("chat.update"));
    assert!(s[2].path.ends_with("chat.postMessage"), "{s:#?}");
    assert!(s[2].raw.contains("FIRING 2"));
    let d = bot.discord.wait_for(3, WAIT).await;
    assert_eq!(
        (d[1].method.as_str(), d[2].method.as_str()),
        ("PATCH", "POST")
    );
    assert!(bot.state.store.dead_letters().await.unwrap().is_empty());
}

/// The message the outbox renders for group `id`, with the bot's identity.
async fn rendered(bot: &Bot, id: i64) -> gpuops::notify::AlertMessage {
    let g = bot.state.store.group(id).await.unwrap().unwrap();
    let links =
        gpuops::alert::identity_links(&bot.state.identity, &g, gpuops::alert::Links::default())
            .await;
    match gpuops::alert::render_group(&g, &bot.state.config.routing, &links) {
        gpuops::notify::Message::Alert(m) => *m,
        other => panic!("not an alert: {other:?}"),
    }
}

/// Discord text as a reader sees it: outside text is Markdown-escaped
/// (`\(`, `\:`, `\_`), and Discord shows each escaped character as itself.
fn discord_shown(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

/// PagerDuty's trigger event and the email for a message.
fn pagerduty_and_email(m: &gpuops::notify::AlertMessage) -> (Value, gpuops::notify::email::Mail) {
    use gpuops::notify::{pagerduty, Message, Op, Outgoing};
    let ev = pagerduty::event("R0UTING", pagerduty::Action::Trigger, "dedup", m);
    let msg = Message::Alert(Box::new(m.clone()));
    let out = Outgoing {
        channel: "oncall@example.com",
        op: Op::Post,
        message: &msg,
        renotify: None,
        incident: None,
    };
    let (mail, _) = gpuops::notify::email::plan(&out).unwrap();
    (ev, mail)
}

/// A webhook for `alertname` firing on each of `instances` (one group).
fn storm(alertname: &str, severity: &str, instances: &[String]) -> String {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let alerts: Vec<Value> = instances
        .iter()
        .map(|i| {
            json!({
                "status": "firing",
                "labels": {"alertname": alertname, "severity": severity, "instance": i,
                           "job": "gpuops-agent", "component": "memory"},
                "annotations": {"summary": format!("OOM killer fired on {i}"), "runbook": "oom-kill"},
                "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": format!("{alertname}-{i}")
            })
        })
        .collect();
    json!({
        "version": "4", "groupKey": format!("{{}}:{{alertname=\"{alertname}\"}}"),
        "status": "firing", "receiver": "gpuops",
        "groupLabels": {"alertname": alertname},
        "commonLabels": {"alertname": alertname, "severity": severity, "job": "gpuops-agent", "component": "memory"},
        "commonAnnotations": {"runbook": "oom-kill"},
        "externalURL": "http://alertmanager:9093", "alerts": alerts
    })
    .to_string()
}

/// Agents' `GET /<node>/v1/events`: one OOM kill per node, 30 s ago.
async fn fake_agents() -> String {
    async fn events(axum::extract::Path(node): axum::extract::Path<String>) -> axum::Json<Value> {
        let n: u32 = node.trim_start_matches("gpu-node-").parse().unwrap_or(0);
        let now = chrono::Utc::now().timestamp() as f64;
        axum::Json(json!({"since": now - 3600.0, "events": [
            {"timestamp": now - 400.0, "counted": true, "type": "io_error", "device": "nvme0n1", "message": "m"},
            {"timestamp": now - 30.0, "counted": true, "type": "oom_kill", "pid": 4200 + n,
             "process": "python3", "cgroup": format!("/slurm/uid_1000/job_{n}"), "message": "m"}
        ]}))
    }
    let app = axum::Router::new().route("/{node}/v1/events", axum::routing::get(events));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test]
async fn alert_lines_name_the_node_not_the_instance() {
    let bot = Bot::start(
        "[agents]\n[[agents.nodes]]\ninstance = \"127.0.0.1:18949\"\nnode = \"gpu-node-17\"\n",
    )
    .await;
    let hook = json!({
        "version": "4", "groupKey": "{}:{alertname=\"GPUFellOffBus\", instance=\"127.0.0.1:18949\"}",
        "status": "firing", "receiver": "gpuops",
        "groupLabels": {"alertname": "GPUFellOffBus", "instance": "127.0.0.1:18949"},
        "commonLabels": {"alertname": "GPUFellOffBus", "severity": "critical", "instance": "127.0.0.1:18949",
                         "gpu": "5", "uuid": "GPU-bf6b5d8a-6e7c-4a0f-8bcd-5c6d7e8f9aa5", "pci_bus_id": "00000000:AB:00.0"},
        "commonAnnotations": {"summary": "GPU 5 on 127.0.0.1:18949 fell off the bus"},
        "externalURL": "http://alertmanager:9093",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "GPUFellOffBus", "severity": "critical", "instance": "127.0.0.1:18949",
                       "gpu": "5", "uuid": "GPU-bf6b5d8a-6e7c-4a0f-8bcd-5c6d7e8f9aa5", "pci_bus_id": "00000000:AB:00.0"},
            "annotations": {"summary": "GPU 5 on 127.0.0.1:18949 fell off the bus"},
            "startsAt": "2026-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph", "fingerprint": "f1"
        }]
    });
    let id = bot.post(&hook.to_string()).await["group_id"]
        .as_i64()
        .unwrap();
    let s = bot.slack.wait_for(1, WAIT).await;
    let header = s[0].body["attachments"][0]["blocks"][0]["text"]["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        header.contains("GPUFellOffBus on gpu-node-17 (127.0.0.1:18949)"),
        "{header}"
    );
    assert!(!header.contains("instance="), "{header}");
    let raw = slack_text(&s[0]);
    assert!(
        raw.contains("gpu-node-17 (127.0.0.1:18949) GPU 5 (GPU-bf6b5d8a)"),
        "{raw}"
    );
    assert!(
        raw.contains("GPU 5 on gpu-node-17 fell off the bus"),
        "{raw}"
    );
    assert!(!raw.contains("gpu=5"), "{raw}");
    let d = bot.discord.wait_for(1, WAIT).await;
    let embed = &d[0].body["embeds"][0];
    assert!(
        discord_shown(embed["title"].as_str().unwrap())
            .contains("GPUFellOffBus on gpu-node-17 (127.0.0.1:18949)"),
        "{embed}"
    );
    assert!(
        discord_shown(embed["description"].as_str().unwrap())
            .contains("gpu-node-17 (127.0.0.1:18949) GPU 5 (GPU-bf6b5d8a)"),
        "{embed}"
    );
    let m = rendered(&bot, id).await;
    let (ev, mail) = pagerduty_and_email(&m);
    let summary = ev["payload"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("on gpu-node-17 (127.0.0.1:18949)"),
        "{summary}"
    );
    assert_eq!(ev["payload"]["source"], "gpu-node-17");
    let first = &ev["payload"]["custom_details"]["alerts"][0];
    assert_eq!(first["node"], "gpu-node-17", "{first}");
    assert_eq!(first["gpu"], "GPU 5 (GPU-bf6b5d8a)", "{first}");
    assert!(
        mail.subject
            .contains("GPUFellOffBus on gpu-node-17 (127.0.0.1:18949)"),
        "{}",
        mail.subject
    );
}

#[tokio::test]
async fn oom_storm_on_8_nodes_is_one_message_naming_8_nodes_with_victims() {
    let agents = fake_agents().await;
    let mut extra = "[agents]\n".to_string();
    let instances: Vec<String> = (1..=8).map(|i| format!("10.0.0.{i}:9949")).collect();
    for (i, instance) in instances.iter().enumerate() {
        extra.push_str(&format!(
            "[[agents.nodes]]\ninstance = \"{instance}\"\nnode = \"gpu-node-{}\"\nurl = \"{agents}/gpu-node-{}\"\n",
            i + 1,
            i + 1
        ));
    }
    let bot = Bot::start(&extra).await;
    let posted = Instant::now();
    let id = bot.post(&storm("OOMKill", "warning", &instances)).await["group_id"]
        .as_i64()
        .unwrap();
    let s = bot.slack.wait_for(1, WAIT).await;
    eprintln!(
        "8-node OOM storm posted {:?} after the webhook (8 agents asked)",
        s[0].at.duration_since(posted)
    );
    bot.slack
        .expect_no_more(1, Duration::from_millis(500))
        .await;
    assert_eq!(s[0].body["channel"], "CP3");
    let raw = slack_text(&s[0]);
    assert!(raw.contains("OOMKill on 8 nodes"), "{raw}");
    for n in 1..=8 {
        assert!(
            raw.contains(&format!(
                "gpu-node-{n} (10.0.0.{n}:9949) — OOM killer fired on gpu-node-{n} · OOM victim: python3 (pid {}, cgroup /slurm/uid_1000/job_{n})",
                4200 + n
            )),
            "node {n}: {raw}"
        );
    }
    let d = bot.discord.wait_for(1, WAIT).await;
    let desc = discord_shown(d[0].body["embeds"][0]["description"].as_str().unwrap());
    assert_eq!(desc.matches("OOM victim: python3").count(), 8, "{desc}");
    eprintln!(
        "8-node OOM storm, Slack lines:\n{}",
        s[0].body["attachments"][0]["blocks"][2]["text"]["text"]
    );
    let m = rendered(&bot, id).await;
    let (ev, mail) = pagerduty_and_email(&m);
    assert_eq!(ev["payload"]["source"], "8 nodes");
    assert_eq!(
        ev["payload"]["custom_details"]["alerts"][7]["oom_victim"],
        "python3 (pid 4208, cgroup /slurm/uid_1000/job_8)"
    );
    assert!(
        mail.subject.contains("OOMKill on 8 nodes"),
        "{}",
        mail.subject
    );
    assert_eq!(mail.text.matches("OOM victim: python3").count(), 8);
}

#[tokio::test]
async fn storm_of_300_nodes_fits_every_platform() {
    let bot = Bot::start("").await;
    let instances: Vec<String> = (0..300)
        .map(|i| format!("node-{i:03}.cluster.example.com:9949"))
        .collect();
    let started = Instant::now();
    let id = bot.post(&storm("OOMKill", "warning", &instances)).await["group_id"]
        .as_i64()
        .unwrap();
    let s = bot.slack.wait_for(1, WAIT).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let blocks = s[0].body["attachments"][0]["blocks"].as_array().unwrap();
    assert!(blocks.len() <= 50);
    assert!(
        blocks[0]["text"]["text"]
            .as_str()
            .unwrap()
            .contains("OOMKill on 300 nodes"),
        "{}",
        blocks[0]
    );
    let lines = blocks
        .iter()
        .filter_map(|b| b["text"]["text"].as_str())
        .find(|t| t.contains("node-000 (node-000.cluster.example.com:9949)"))
        .unwrap();
    assert!(lines.chars().count() <= 3000);
    let shown = lines.lines().filter(|l| l.starts_with("🔥 node-")).count();
    assert!(shown >= 20, "{lines}");
    assert!(
        lines.ends_with(&format!("… and {} more nodes", 300 - shown)),
        "{lines}"
    );
    assert!(s[0].raw.len() < 40_000, "{}", s[0].raw.len());
    let d = bot.discord.wait_for(1, WAIT).await;
    let embed = &d[0].body["embeds"][0];
    let desc = embed["description"].as_str().unwrap();
    assert!(desc.chars().count() <= 4096);
    let shown = desc.lines().filter(|l| l.starts_with("🔥 node-")).count();
    assert!(
        desc.ends_with(&format!("… and {} more nodes", 300 - shown)),
        "{desc}"
    );
    let total: usize = ["title", "description"]
        .iter()
        .map(|k| embed[*k].as_str().map_or(0, |s| s.chars().count()))
        .sum::<usize>()
        + embed["fields"].as_array().map_or(0, |f| {
            f.iter()
                .map(|f| {
                    f["name"].as_str().unwrap_or("").len() + f["value"].as_str().unwrap_or("").len()
                })
                .sum()
        })
        + embed["footer"]["text"]
            .as_str()
            .map_or(0, |s| s.chars().count());
    assert!(total <= 6000, "{total}");
    let m = rendered(&bot, id).await;
    let (ev, mail) = pagerduty_and_email(&m);
    assert!(
        ev.to_string().len() < 512 * 1024,
        "{}",
        ev.to_string().len()
    );
    let details = &ev["payload"]["custom_details"];
    assert_eq!(details["alerts"].as_array().unwrap().len(), 100);
    assert_eq!(details["alerts_not_shown"], "… and 200 more nodes");
    assert_eq!(ev["payload"]["source"], "300 nodes");
    assert!(ev["payload"]["summary"].as_str().unwrap().chars().count() <= 1024);
    assert!(
        mail.subject.contains("OOMKill on 300 nodes"),
        "{}",
        mail.subject
    );
    assert!(
        mail.text.contains("… and 200 more nodes\n"),
        "{}",
        mail.text
    );
    assert!(mail.html.contains("… and 200 more nodes"));
    let slack_more: usize = lines
        .rsplit("… and ")
        .next()
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    eprintln!(
        "300-node storm: Slack {} lines shown ({} chars, payload {} bytes), Discord {shown} lines ({} chars), PagerDuty event {} bytes, email text {} bytes; posted {:?} after the webhook",
        300 - slack_more,
        lines.chars().count(),
        s[0].raw.len(),
        desc.chars().count(),
        ev.to_string().len(),
        mail.text.len(),
        s[0].at.duration_since(started),
    );
}

on_both!(
    tiers_route_to_their_channels_on_both_platforms,
    changes_edit_in_place_and_resolve_edits_then_replies_in_thread,
    ha_duplicate_state_posts_nothing,
    alert_joining_open_group_posts_a_thread_reply,
    partial_resolve_posts_a_thread_reply,
    a_huge_group_is_truncated_not_rejected,
    rate_limits_are_honoured_then_delivery_succeeds,
    server_errors_back_off_exponentially,
    permanent_errors_become_dead_letters,
    outbox_replies_and_acks_reach_the_alert_thread,
    a_deleted_message_is_posted_again_instead_of_lost,
);
