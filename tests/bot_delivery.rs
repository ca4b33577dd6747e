//! The bot in-process (real router, store, outbox worker and notifiers)
//! against local fake Slack and Discord APIs: routing by tier, update on
//! change, edit on resolve, HA duplicates, truncation, 429, 5xx backoff,
//! dead letters.

mod support;

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
    assert!(lines.ends_with("more"), "{lines}");
    let d = bot.discord.wait_for(1, WAIT).await;
    let desc = d[0].body["embeds"][0]["description"].as_str().unwrap();
    assert!(desc.chars().count() <= 4096);
    assert!(desc.ends_with("more"));
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
