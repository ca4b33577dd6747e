//! Health report delivery against local fakes and a real SMTP server: the
//! Slack summary and its charts through the three-step file upload (never
//! `files.upload`), a retry that does not post the summary twice (through
//! the real outbox worker), Discord's multipart message with the charts
//! attached, the email's text, HTML and inline charts (Debian's aiosmtpd),
//! the webhook's JSON, and PagerDuty staying silent.
#![allow(clippy::disallowed_methods)] // aiosmtpd and python3's email parser are external

use crate::paging_support;
use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gpuops::bot::BotState;
use gpuops::config::bot::{DiscordConfig, SlackConfig};
use gpuops::config::paging::EmailConfig;
use gpuops::config::{BotConfig, Secret};
use gpuops::message::{Chart, Message, ReportMessage, ReportSection};
use gpuops::notify::console::ConsoleNotifier;
use gpuops::notify::discord::DiscordNotifier;
use gpuops::notify::email::EmailNotifier;
use gpuops::notify::pagerduty::PagerDutyNotifier;
use gpuops::notify::slack::SlackNotifier;
use gpuops::notify::webhook::WebhookNotifier;
use gpuops::notify::{Error, Notifier, Op, Outgoing};
use gpuops::routing::Target;
use gpuops::store::paging::DigestDelivery;
use gpuops::store::Store;
use paging_support::{header, FakePagerDuty, Smtp};
use serde_json::{json, Value};
use support::{multipart_parts, FakeApi, Recorded, Scripted};

const WAIT: Duration = Duration::from_secs(10);
const SLACK_TOKEN: &str = "xoxb-test-token-s3cret";
const DISCORD_TOKEN: &str = "discord-token-s3cret";

/// A valid 2×2 RGB PNG.
const PNG: [u8; 75] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x02, 0x08, 0x02, 0x00, 0x00, 0x00, 0xfd, 0xd4, 0x9a,
    0x73, 0x00, 0x00, 0x00, 0x12, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0xf8, 0xcf, 0xc0, 0xc0,
    0x00, 0xc2, 0x0c, 0xff, 0x81, 0x00, 0x00, 0x1f, 0xee, 0x05, 0xfb, 0x0b, 0xd9, 0x68, 0x8b, 0x00,
    0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
];

fn report(charts: usize) -> ReportMessage {
    let names = [
        "fleet-gpu-utilization.png",
        "idle-gpu-hours.png",
        "errors.png",
    ];
    let mut second = PNG.to_vec();
    second.extend_from_slice(b"trailing bytes make a different length");
    ReportMessage {
        name: "daily".into(),
        title: "Daily health report: 27 Nov 08:00 – 28 Nov 08:00 (Europe/Berlin)".into(),
        summary: vec![
            "3 findings: [2 XIDs](http://prom:9090/graph?g0.expr=increase(gpu_xid_errors_total[24h])) on node-7".into(),
            "[12.5 idle GPU-hours](http://prom:9090/graph?g0.expr=idle) & <nothing else>".into(),
        ],
        sections: vec![
            ReportSection {
                heading: "Fleet".into(),
                lines: vec!["8 of 8 nodes reporting".into()],
            },
            ReportSection {
                heading: "GPU health".into(),
                lines: vec![
                    "node-7 GPU 3: XID 79 (fell off the bus) — runbook `gpu-xid`".into(),
                ],
            },
        ],
        text: "Daily health report\n\n3 findings: 2 XIDs on node-7\n".into(),
        html: format!(
            "<html><body><h1>Daily health report</h1>{}</body></html>",
            names
                .iter()
                .take(charts)
                .map(|n| format!("<img src=\"cid:{n}\" alt=\"{n}\">"))
                .collect::<String>()
        ),
        charts: (0..charts)
            .map(|i| Chart {
                file_name: names[i % names.len()].into(),
                title: format!("Chart {i}"),
                png: if i == 1 { second.clone() } else { PNG.to_vec() },
            })
            .collect(),
        late: false,
    }
}

fn slack_notifier(fake: &FakeApi) -> SlackNotifier {
    SlackNotifier::new(&SlackConfig {
        bot_token: Secret::new(SLACK_TOKEN),
        signing_secret: None,
        api_url: fake.url(),
    })
    .unwrap()
}

async fn post(n: &dyn Notifier, channel: &str, m: &Message) -> Result<String, Error> {
    let out = Outgoing {
        channel,
        op: Op::Post,
        message: m,
        renotify: None,
        incident: None,
    };
    n.send(&out).await.map(|d| d.message.message_id)
}

/// The Slack calls in order, as `(method, detail)`.
fn slack_steps(reqs: &[Recorded]) -> Vec<String> {
    reqs.iter()
        .map(|r| r.path.rsplit('/').next().unwrap_or("").to_string())
        .map(|m| {
            if m.starts_with('F') {
                "upload".into()
            } else {
                m
            }
        })
        .collect()
}

#[tokio::test]
async fn slack_report_posts_the_summary_then_uploads_each_chart_into_its_thread() {
    let slack = FakeApi::slack().await;
    let n = slack_notifier(&slack);
    let r = report(2);
    let ts = post(&n, "CREPORTS", &Message::Report(Box::new(r.clone())))
        .await
        .unwrap();
    let reqs = slack.requests();
    assert_eq!(
        slack_steps(&reqs),
        [
            "chat.postMessage",
            "files.getUploadURLExternal",
            "upload",
            "files.completeUploadExternal",
            "files.getUploadURLExternal",
            "upload",
            "files.completeUploadExternal",
        ],
        "{reqs:#?}"
    );
    let summary = &reqs[0].body;
    assert_eq!(summary["channel"], "CREPORTS");
    assert_eq!(summary["blocks"][0]["type"], "header");
    let blocks = summary["blocks"].to_string();
    assert!(
        blocks.contains(
            "<http://prom:9090/graph?g0.expr=increase(gpu_xid_errors_total[24h])|2 XIDs>"
        ),
        "{blocks}"
    );
    assert!(blocks.contains("&amp; &lt;nothing else&gt;"), "{blocks}");
    assert!(blocks.contains("*GPU health*"), "{blocks}");
    for (i, chart) in r.charts.iter().enumerate() {
        let get = &reqs[1 + 3 * i];
        assert_eq!(get.query_param("filename").unwrap(), chart.file_name);
        assert_eq!(
            get.query_param("length").unwrap(),
            chart.png.len().to_string()
        );
        let upload = &reqs[2 + 3 * i];
        assert_eq!(upload.method, "POST");
        assert_eq!(upload.bytes, chart.png, "the PNG's bytes, as they are");
        let complete = &reqs[3 + 3 * i].body;
        assert_eq!(complete["channel_id"], "CREPORTS", "{complete}");
        assert_eq!(complete["thread_ts"], ts.as_str(), "{complete}");
        assert_eq!(complete["files"][0]["title"], chart.title);
        let file_id = upload.path.rsplit('/').next().unwrap();
        assert_eq!(complete["files"][0]["id"], file_id);
    }
    assert!(
        slack.calls("files.upload").is_empty(),
        "files.upload is retired"
    );
    for r in &reqs {
        assert_eq!(
            r.authorization,
            format!("Bearer {SLACK_TOKEN}"),
            "{}",
            r.path
        );
    }
}

#[tokio::test]
async fn slack_report_blocks_stay_within_limits_for_a_huge_report() {
    let slack = FakeApi::slack().await;
    let n = slack_notifier(&slack);
    let mut r = report(0);
    r.title = "T".repeat(500);
    let line = "node-0001 GPU 3: [XID 79](http://prom:9090/graph?g0.expr=increase(gpu_xid_errors_total[24h])) fell off the bus".to_string();
    r.summary = vec![line.clone(); 400];
    r.sections = (0..120)
        .map(|i| ReportSection {
            heading: format!("Section {i}"),
            lines: vec![line.clone(); 300],
        })
        .collect();
    post(&n, "CREPORTS", &Message::Report(Box::new(r)))
        .await
        .unwrap();
    let body = &slack.calls("chat.postMessage")[0].body;
    let blocks = body["blocks"].as_array().unwrap();
    assert!(blocks.len() <= 50, "{}", blocks.len());
    assert!(blocks[0]["text"]["text"].as_str().unwrap().chars().count() <= 150);
    let mut total = 0;
    for b in blocks {
        let t = b["text"]["text"]
            .as_str()
            .or(b["elements"][0]["text"].as_str())
            .unwrap_or("");
        assert!(t.chars().count() <= 3000, "{}", t.len());
        total += t.chars().count();
    }
    assert!(total <= 11_000, "{total}");
    let last = blocks.last().unwrap()["elements"][0]["text"]
        .as_str()
        .unwrap();
    assert!(
        last.starts_with("… ") && last.ends_with(" more sections"),
        "{last}"
    );
    assert!(body["text"].as_str().unwrap().chars().count() <= 3000);
}

/// The review's "retry after a partial failure" case, through the real
/// outbox worker with the row the report engine enqueues (kind `reply`,
/// group 0, posted with `Op::Post`): the first chart's upload fails once,
/// the worker retries, and Slack sees exactly one summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_upload_failing_once_is_retried_without_a_second_summary() {
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let text = support::bot_config(dir.path(), &slack, &discord, "");
    let cfg = BotConfig::from_str(Path::new("test.toml"), &text).unwrap();
    let store = Store::open(&cfg.store.path).unwrap();
    let (state, worker) = BotState::new(Arc::new(cfg), store).unwrap();
    let (stop, mut rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(worker.run(async move {
        let _ = rx.wait_for(|s| *s).await;
    }));
    slack.script_path("/upload/", Scripted::new(500, json!({"error": "boom"})));
    let body = serde_json::to_string(&Message::Report(Box::new(report(2)))).unwrap();
    // The digest's claim is the store's way to enqueue a group-0 row for a
    // destination today; the report engine enqueues the same kind of row.
    assert!(state
        .store
        .claim_digest_slot(
            1.0,
            false,
            1,
            vec![DigestDelivery {
                destination: "slack:CREPORTS".into(),
                body,
            }],
        )
        .await
        .unwrap());
    state.outbox.wake();
    // post, get, failed upload; then get, upload, complete for each chart.
    let reqs = slack.wait_for(9, WAIT).await;
    slack.expect_no_more(9, Duration::from_millis(700)).await;
    assert_eq!(
        slack_steps(&reqs),
        [
            "chat.postMessage",
            "files.getUploadURLExternal",
            "upload",
            "files.getUploadURLExternal",
            "upload",
            "files.completeUploadExternal",
            "files.getUploadURLExternal",
            "upload",
            "files.completeUploadExternal",
        ]
    );
    assert_eq!(slack.calls("chat.postMessage").len(), 1, "one summary");
    let ts = format!("1700000000.{:06}", 1);
    for c in slack.calls("files.completeUploadExternal") {
        assert_eq!(c.body["thread_ts"], ts.as_str(), "{}", c.raw);
    }
    let deadline = std::time::Instant::now() + WAIT;
    while state.store.pending().await.unwrap() > 0 {
        assert!(std::time::Instant::now() < deadline, "the row was not done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(state.store.dead_letters().await.unwrap().is_empty());
    let _ = stop.send(true);
    let _ = tokio::time::timeout(WAIT, worker).await;
}

#[tokio::test]
async fn slack_report_errors_are_classified_and_never_carry_the_token() {
    let slack = FakeApi::slack().await;
    let n = slack_notifier(&slack);
    let m = Message::Report(Box::new(report(2)));
    // Rate limited while completing the first chart: Slack's delay reaches
    // the outbox, and the retry neither re-posts the summary nor loses a chart.
    slack.script_path(
        "files.completeUploadExternal",
        Scripted::new(429, json!({"ok": false, "error": "ratelimited"})).header("Retry-After", "7"),
    );
    match post(&n, "CREPORTS", &m).await {
        Err(Error::Retryable {
            retry_after: Some(d),
            reason,
        }) => {
            assert_eq!(d, Duration::from_secs(7));
            assert!(reason.contains("files.completeUploadExternal"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    post(&n, "CREPORTS", &m).await.unwrap();
    assert_eq!(slack.calls("chat.postMessage").len(), 1);
    assert_eq!(slack.calls("files.completeUploadExternal").len(), 3);
    // A permanent error that echoes the token: redacted.
    slack.script_path(
        "chat.postMessage",
        Scripted::new(
            200,
            json!({"ok": false, "error": format!("invalid_auth {SLACK_TOKEN}")}),
        ),
    );
    let e = post(&n, "COTHER", &m).await.unwrap_err();
    assert!(matches!(e, Error::Permanent { .. }), "{e:?}");
    assert!(!e.to_string().contains(SLACK_TOKEN), "{e}");
    // A 5xx on the summary is retryable and nothing else was sent.
    let before = slack.requests().len();
    slack.script_path("chat.postMessage", Scripted::new(503, json!({})));
    let e = post(&n, "CTHIRD", &m).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Retryable {
                retry_after: None,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(slack.requests().len(), before + 1);
}

#[tokio::test]
async fn discord_report_is_one_multipart_message_with_the_charts_attached() {
    let discord = FakeApi::discord().await;
    let n = DiscordNotifier::new(
        &DiscordConfig {
            bot_token: Secret::new(DISCORD_TOKEN),
            application_id: None,
            public_key: None,
            api_url: discord.url(),
        },
        Duration::from_secs(5),
    )
    .unwrap();
    let r = report(2);
    let id = post(&n, "4004", &Message::Report(Box::new(r.clone())))
        .await
        .unwrap();
    assert!(!id.is_empty());
    let reqs = discord.requests();
    assert_eq!(reqs.len(), 1, "one request: {reqs:#?}");
    let req = &reqs[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/api/v10/channels/4004/messages");
    assert_eq!(req.authorization, format!("Bot {DISCORD_TOKEN}"));
    assert!(
        req.content_type.starts_with("multipart/form-data"),
        "{}",
        req.content_type
    );
    let parts = multipart_parts(req);
    let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["files[0]", "files[1]", "payload_json"]);
    for (i, chart) in r.charts.iter().enumerate() {
        let p = &parts[i];
        assert_eq!(p.file_name.as_deref(), Some(chart.file_name.as_str()));
        assert_eq!(p.content_type.as_deref(), Some("image/png"));
        assert_eq!(p.data, chart.png);
    }
    let payload: Value = serde_json::from_slice(&parts[2].data).unwrap();
    let embed = &payload["embeds"][0];
    assert_eq!(embed["title"], r.title.as_str());
    assert_eq!(
        embed["image"]["url"],
        "attachment://fleet-gpu-utilization.png"
    );
    let desc = embed["description"].as_str().unwrap();
    assert!(
        desc.contains(
            "[2 XIDs](http://prom:9090/graph?g0.expr=increase%28gpu_xid_errors_total[24h]%29)"
        ),
        "{desc}"
    );
    assert_eq!(embed["fields"][1]["name"], "GPU health");
    assert_eq!(
        payload["attachments"],
        json!([
            {"id": 0, "filename": "fleet-gpu-utilization.png", "description": "Chart 0"},
            {"id": 1, "filename": "idle-gpu-hours.png", "description": "Chart 1"}
        ])
    );
    assert_eq!(payload["allowed_mentions"]["parse"], json!([]));
    // Discord's 429 delay reaches the outbox; the token never does.
    discord.script([Scripted::new(
        429,
        json!({"message": format!("slow down {DISCORD_TOKEN}"), "retry_after": 1.5, "global": false}),
    )]);
    match post(&n, "4004", &Message::Report(Box::new(r))).await {
        Err(
            e @ Error::Retryable {
                retry_after: Some(_),
                ..
            },
        ) => assert!(!e.to_string().contains(DISCORD_TOKEN), "{e}"),
        other => panic!("{other:?}"),
    }
}

/// Parses a raw mail with python3's `email` package (a real MIME parser):
/// the decoded subject, the top content type and, per leaf part, its type, Content-ID,
/// disposition and decoded payload (hex).
fn parse_mail(raw: &str) -> Value {
    let script = r#"
import email, json, sys
from email import policy
m = email.message_from_string(sys.stdin.read(), policy=policy.default)
def tree(p):
    if p.is_multipart():
        return {"type": p.get_content_type(), "parts": [tree(x) for x in p.iter_parts()]}
    return {"type": p.get_content_type(), "cid": p.get("Content-ID"),
            "disposition": p.get_content_disposition(),
            "hex": p.get_payload(decode=True).hex()}
print(json.dumps({"subject": str(m["Subject"]), **tree(m)}))
"#;
    use std::io::Write as _;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(raw.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3-aiosmtpd: run by .ci/run"]
async fn email_report_has_text_html_and_inline_charts_on_real_smtp() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(dir.path()).expect("python3-aiosmtpd is not installed");
    let n = EmailNotifier::new(
        &EmailConfig {
            smtp_url: format!("smtp://127.0.0.1:{}", smtp.port),
            from: "gpuops <gpuops@example.com>".into(),
            credentials: None,
        },
        Duration::from_secs(5),
    )
    .unwrap();
    let mut r = report(2);
    r.late = true;
    post(&n, "ops@example.com", &Message::Report(Box::new(r.clone())))
        .await
        .unwrap();
    let mails = smtp.wait_for(1, WAIT).await;
    let raw = &mails[0];
    assert_eq!(header(raw, "To").unwrap(), "ops@example.com");
    let tree = parse_mail(raw);
    assert_eq!(tree["subject"], format!("[late] {}", r.title), "{raw}");
    assert_eq!(tree["type"], "multipart/alternative", "{tree}");
    let text = &tree["parts"][0];
    assert_eq!(text["type"], "text/plain");
    let decoded = String::from_utf8(hex::decode(text["hex"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(decoded.replace("\r\n", "\n").trim_end(), r.text.trim_end());
    let related = &tree["parts"][1];
    assert_eq!(related["type"], "multipart/related", "{tree}");
    let html = &related["parts"][0];
    assert_eq!(html["type"], "text/html");
    let html = String::from_utf8(hex::decode(html["hex"].as_str().unwrap()).unwrap()).unwrap();
    assert!(html.contains("cid:fleet-gpu-utilization.png"), "{html}");
    for (i, chart) in r.charts.iter().enumerate() {
        let img = &related["parts"][1 + i];
        assert_eq!(img["type"], "image/png", "{tree}");
        assert_eq!(img["cid"], format!("<{}>", chart.file_name));
        assert_eq!(img["disposition"], "inline");
        assert_eq!(
            hex::decode(img["hex"].as_str().unwrap()).unwrap(),
            chart.png
        );
    }
}

fn config_with(dir: &Path, slack: &FakeApi, discord: &FakeApi, extra: &str) -> BotConfig {
    let text = support::bot_config(dir, slack, discord, extra);
    BotConfig::from_str(Path::new("test.toml"), &text).unwrap()
}

#[tokio::test]
async fn webhook_report_json_has_title_text_and_sections_but_no_png() {
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let hook = FakeApi::discord().await;
    let cfg = config_with(
        dir.path(),
        &slack,
        &hook,
        &format!(
            "[[routing.destinations]]\ntiers = [\"P4\"]\nwebhook_url = \"{}/hook/s3cret-path\"",
            hook.url()
        ),
    );
    let n = WebhookNotifier::new(&cfg.routing, Duration::from_secs(5))
        .unwrap()
        .unwrap();
    let id = cfg
        .routing
        .destinations
        .iter()
        .flat_map(|d| d.targets())
        .find_map(|t| match t {
            Target::Webhook(id) => Some(id),
            _ => None,
        })
        .unwrap();
    let r = report(2);
    post(&n, &id, &Message::Report(Box::new(r.clone())))
        .await
        .unwrap();
    let req = &hook.requests()[0];
    let b = &req.body;
    assert_eq!(b["headline"], r.title.as_str());
    let m = &b["message"]["Report"];
    assert_eq!(m["title"], r.title.as_str());
    assert_eq!(m["text"], r.text.as_str());
    assert_eq!(m["sections"][1]["heading"], "GPU health");
    assert_eq!(
        m["charts"][0],
        json!({"file_name": "fleet-gpu-utilization.png", "title": "Chart 0", "bytes": 75})
    );
    assert!(m.get("html").is_none());
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(PNG);
    assert!(!req.raw.contains(&b64), "no PNG bytes in the webhook");
}

#[tokio::test]
async fn pagerduty_never_pages_for_a_report_and_console_logs_it() {
    let dir = tempfile::tempdir().unwrap();
    let slack = FakeApi::slack().await;
    let discord = FakeApi::discord().await;
    let pd = FakePagerDuty::start().await;
    let cfg = config_with(
        dir.path(),
        &slack,
        &discord,
        "[[routing.destinations]]\ntiers = [\"P1\"]\npagerduty_routing_key = \"R0PAGE00000000000000000000000001\"",
    );
    let n = PagerDutyNotifier::new(&cfg.routing, &pd.url(), Duration::from_secs(5))
        .unwrap()
        .unwrap();
    let id = cfg
        .routing
        .destinations
        .iter()
        .flat_map(|d| d.targets())
        .find_map(|t| match t {
            Target::PagerDuty(id) => Some(id),
            _ => None,
        })
        .unwrap();
    let m = Message::Report(Box::new(report(1)));
    post(&n, &id, &m).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(pd.events().is_empty(), "a report never pages");
    let console = ConsoleNotifier::new();
    assert!(post(&console, "", &m).await.is_ok());
}
