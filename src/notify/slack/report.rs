//! Slack health reports: the summary as Block Kit within Slack's limits,
//! posted with `chat.postMessage`, then each chart uploaded with the current
//! file API into the summary's thread: `files.getUploadURLExternal`
//! (filename, length) → `POST` of the bytes to the returned `upload_url`
//! (slack-morphism's `files_upload_via_url`, the same client) →
//! `files.completeUploadExternal` (the file id and title, `channel_id`,
//! `thread_ts`). The retired `files.upload` is never called.
//!
//! A retry never posts the summary twice. The outbox retries a failed
//! delivery by calling `send` again with the same row, and only the
//! notifier knows how far the first attempt got, so [`Reports`] remembers,
//! per (channel, report), the summary's `ts` and how many charts were
//! completed, step by step as they succeed (so even an attempt cut off by
//! the outbox's deadline leaves its progress). The next attempt skips what
//! is done: no second `chat.postMessage`, no chart twice. The memory is the
//! process's (bounded: [`MAX_REMEMBERED`] reports, [`REMEMBER_FOR`]): a bot
//! killed between the summary and its charts posts the summary again on
//! its next start, the same at-least-once window every outbox row has
//! between the platform's answer and the store's record. Uploaded but not
//! completed files are invisible and expire on Slack's side.
//!
//! The upload URL comes from Slack's answer; the bot token goes to it only
//! when it is Slack's (`https://*.slack.com`) or the configured API's own
//! origin (a proxy, the tests' fake). Every step has a deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use slack_morphism::prelude::*;

use crate::message::{Chart, ReportMessage};
use crate::notify::report_lines::{fit_lines, more, plain_text, safe_file_name, slack_mrkdwn};
use crate::notify::slack::{
    escape, map_error, Connector, MAX_BLOCKS, MAX_FALLBACK_TEXT, MAX_HEADER_TEXT, MAX_SECTION_TEXT,
    MAX_TOTAL_BLOCK_TEXT,
};
use crate::notify::{truncate_chars, Delivery, Error, Op, Outgoing, PlatformRef};

/// How many unfinished report deliveries are remembered.
pub const MAX_REMEMBERED: usize = 64;
/// How long an unfinished report delivery is remembered.
pub const REMEMBER_FOR: Duration = Duration::from_secs(24 * 3600);
/// The deadline of one Slack call (the outbox's delivery timeout bounds
/// the whole delivery too).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Report deliveries in progress, and where uploads may go.
pub struct Reports {
    progress: Mutex<HashMap<[u8; 32], Progress>>,
    /// `(scheme, host, port)` of the configured API URL.
    api_origin: Option<(String, String, Option<u16>)>,
}

#[derive(Debug, Clone)]
struct Progress {
    summary: PlatformRef,
    charts_done: usize,
    at: Instant,
}

impl Reports {
    pub fn new(api_url: &str) -> Reports {
        let api_origin = reqwest::Url::parse(api_url).ok().and_then(|u| {
            Some((
                u.scheme().to_string(),
                u.host_str()?.to_string(),
                u.port_or_known_default(),
            ))
        });
        Reports {
            progress: Mutex::new(HashMap::new()),
            api_origin,
        }
    }

    fn key(out: &Outgoing<'_>, r: &ReportMessage) -> [u8; 32] {
        let mut h = sha2::Sha256::new();
        h.update(out.channel.as_bytes());
        h.update([0]);
        if let Op::Reply(p) = &out.op {
            h.update(p.channel.as_bytes());
            h.update([0]);
            h.update(p.message_id.as_bytes());
        }
        h.update([0]);
        h.update(serde_json::to_vec(r).unwrap_or_default());
        h.finalize().into()
    }

    fn get(&self, key: &[u8; 32]) -> Option<Progress> {
        let g = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        g.get(key)
            .filter(|p| p.at.elapsed() < REMEMBER_FOR)
            .cloned()
    }

    fn record(&self, key: [u8; 32], summary: &PlatformRef, charts_done: usize) {
        let mut g = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|_, p| p.at.elapsed() < REMEMBER_FOR);
        if g.len() >= MAX_REMEMBERED && !g.contains_key(&key) {
            if let Some(oldest) = g.iter().min_by_key(|(_, p)| p.at).map(|(k, _)| *k) {
                g.remove(&oldest);
            }
        }
        let at = g.get(&key).map(|p| p.at).unwrap_or_else(Instant::now);
        g.insert(
            key,
            Progress {
                summary: summary.clone(),
                charts_done,
                at,
            },
        );
    }

    fn forget(&self, key: &[u8; 32]) {
        let mut g = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        g.remove(key);
    }

    /// Whether the bot token may be sent to `url` (Slack's upload host, or
    /// the configured API's origin).
    fn upload_allowed(&self, url: &reqwest::Url) -> bool {
        let host = url.host_str().unwrap_or("");
        let slack =
            url.scheme() == "https" && (host == "slack.com" || host.ends_with(".slack.com"));
        let own = self.api_origin.as_ref().is_some_and(|(s, h, p)| {
            url.scheme() == s && host == h && url.port_or_known_default() == *p
        });
        slack || own
    }
}

type Session<'a> = SlackClientSession<'a, Connector>;

/// Posts (or, for an edit, updates) a report; see the module docs.
pub(super) async fn send(
    session: &Session<'_>,
    reports: &Reports,
    out: &Outgoing<'_>,
    r: &ReportMessage,
) -> Result<Delivery, Error> {
    let content = content(r);
    if let Op::Edit(p) = &out.op {
        // The charts stay where they are; only the summary changes.
        let req = SlackApiChatUpdateRequest::new(
            SlackChannelId::new(p.channel.clone()),
            content,
            SlackTs::new(p.message_id.clone()),
        );
        step("chat.update", session.chat_update(&req)).await?;
        return Ok(Delivery { message: p.clone() });
    }
    let key = Reports::key(out, r);
    let (summary, done) = match reports.get(&key) {
        Some(p) => {
            tracing::info!(
                report = %r.name,
                ts = %p.summary.message_id,
                charts_done = p.charts_done,
                "report summary already posted; continuing with its charts"
            );
            (p.summary, p.charts_done)
        }
        None => {
            let (channel, thread) = match &out.op {
                Op::Reply(p) => (p.channel.clone(), Some(SlackTs::new(p.message_id.clone()))),
                _ => (out.channel.to_string(), None),
            };
            let mut req =
                SlackApiChatPostMessageRequest::new(SlackChannelId::new(channel), content);
            req.thread_ts = thread;
            req.unfurl_links = Some(false);
            req.unfurl_media = Some(false);
            let resp = step("chat.postMessage", session.chat_post_message(&req)).await?;
            let summary = PlatformRef {
                channel: resp.channel.to_string(),
                message_id: resp.ts.to_string(),
            };
            reports.record(key, &summary, 0);
            (summary, 0)
        }
    };
    // Charts go to the summary's thread (a reply's thread is its parent's).
    let thread = match &out.op {
        Op::Reply(p) => p.message_id.clone(),
        _ => summary.message_id.clone(),
    };
    for (i, chart) in r.charts.iter().enumerate().skip(done) {
        upload_chart(session, reports, &summary.channel, &thread, chart).await?;
        reports.record(key, &summary, i + 1);
    }
    reports.forget(&key);
    Ok(Delivery { message: summary })
}

/// The three steps of one chart.
async fn upload_chart(
    session: &Session<'_>,
    reports: &Reports,
    channel: &str,
    thread_ts: &str,
    chart: &Chart,
) -> Result<(), Error> {
    let name = safe_file_name(&chart.file_name, 120);
    let title = truncate_chars(&chart.title, 250);
    let req = SlackApiFilesGetUploadUrlExternalRequest::new(name.clone(), chart.png.len())
        .with_alt_txt(truncate_chars(&chart.title, 1000));
    let target = step(
        "files.getUploadURLExternal",
        session.get_upload_url_external(&req),
    )
    .await?;
    if !reports.upload_allowed(target.upload_url.value()) {
        return Err(Error::permanent(format!(
            "slack answered files.getUploadURLExternal with an upload URL on an unexpected host ({})",
            target.upload_url.value().host_str().unwrap_or("none")
        )));
    }
    let upload = SlackApiFilesUploadViaUrlRequest::new(
        target.upload_url.clone(),
        chart.png.clone(),
        "image/png".into(),
    );
    step("upload", session.files_upload_via_url(&upload)).await?;
    let complete =
        SlackApiFilesCompleteUploadExternalRequest::new(vec![SlackApiFilesComplete::new(
            target.file_id.clone(),
        )
        .with_title(title)])
        .with_channel_id(SlackChannelId::new(channel.to_string()))
        .with_thread_ts(SlackTs::new(thread_ts.to_string()));
    step(
        "files.completeUploadExternal",
        session.files_complete_upload_external(&complete),
    )
    .await?;
    Ok(())
}

/// Runs one Slack call with its deadline, mapping its error.
async fn step<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, slack_morphism::errors::SlackClientError>>,
) -> Result<T, Error> {
    match tokio::time::timeout(STEP_TIMEOUT, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(match map_error(e) {
            Error::Retryable {
                retry_after,
                reason,
            } => Error::Retryable {
                retry_after,
                reason: format!("{what}: {reason}"),
            },
            Error::Permanent { reason } => Error::Permanent {
                reason: format!("{what}: {reason}"),
            },
            Error::MessageGone { reason } => Error::MessageGone {
                reason: format!("{what}: {reason}"),
            },
        }),
        Err(_) => Err(Error::retryable(format!(
            "{what}: no answer within {STEP_TIMEOUT:?}"
        ))),
    }
}

/// The summary message: a header, a "late" note, the summary lines, one
/// section block per report section, a note on the charts; within Slack's
/// limits (blocks, header, section text, the total block text), sections
/// that do not fit counted in a last `… N more sections`.
pub fn content(r: &ReportMessage) -> SlackMessageContent {
    let mut blocks: Vec<SlackBlock> = Vec::new();
    let mut budget = MAX_TOTAL_BLOCK_TEXT;
    let header = truncate_chars(&r.title, MAX_HEADER_TEXT);
    budget = budget.saturating_sub(header.chars().count());
    blocks.push(SlackBlock::Header(SlackHeaderBlock::new(
        SlackBlockPlainTextOnly::from(header),
    )));
    let mut notes = Vec::new();
    if r.late {
        notes.push("⏰ Sent late: gpuops was not running at the scheduled time.".to_string());
    }
    if !r.charts.is_empty() {
        notes.push(format!(
            "📈 {} chart{} in the thread",
            r.charts.len(),
            if r.charts.len() == 1 { "" } else { "s" }
        ));
    }
    if !notes.is_empty() {
        let text = notes.join(" · ");
        budget = budget.saturating_sub(text.chars().count());
        blocks.push(context(text));
    }
    // Room kept for the "… N more sections" note.
    const MORE_NOTE: usize = 40;
    if !r.summary.is_empty() {
        let room = MAX_SECTION_TEXT.min(budget.saturating_sub(MORE_NOTE));
        let text = fit_lines(&r.summary, room, "lines", &slack_mrkdwn);
        budget = budget.saturating_sub(text.chars().count());
        blocks.push(section(text));
    }
    let n = r.sections.len();
    for (i, s) in r.sections.iter().enumerate() {
        let last = i + 1 == n;
        let slots = MAX_BLOCKS - blocks.len();
        let heading = format!("*{}*", escape(&truncate_chars(&s.heading, 150)));
        let room = MAX_SECTION_TEXT
            .min(budget.saturating_sub(if last { 0 } else { MORE_NOTE }))
            .saturating_sub(heading.chars().count() + 1);
        // A section needs its slot (and one for the note unless it is the
        // last) and room for its heading and a line or its count.
        if slots < if last { 1 } else { 2 } || room < 60 {
            blocks.push(context(more(n - i, "sections")));
            break;
        }
        let body = if s.lines.is_empty() {
            "_nothing to report_".to_string()
        } else {
            fit_lines(&s.lines, room, "lines", &slack_mrkdwn)
        };
        let text = format!("{heading}\n{body}");
        budget = budget.saturating_sub(text.chars().count());
        blocks.push(section(text));
    }
    let mut fallback = r.title.clone();
    for l in &r.summary {
        fallback.push('\n');
        fallback.push_str(&plain_text(l));
    }
    SlackMessageContent::new()
        .with_text(truncate_chars(&escape(&fallback), MAX_FALLBACK_TEXT))
        .with_blocks(blocks)
}

fn section(text: String) -> SlackBlock {
    SlackBlock::Section(SlackSectionBlock::new().with_text(SlackBlockText::MarkDown(
        SlackBlockMarkDownText::new(truncate_chars(&text, MAX_SECTION_TEXT)),
    )))
}

fn context(text: String) -> SlackBlock {
    SlackBlock::Context(SlackContextBlock::new(vec![
        SlackContextBlockElement::MarkDown(SlackBlockMarkDownText::new(truncate_chars(
            &text, 2000,
        ))),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ReportSection;

    pub(crate) fn report(sections: usize, lines: usize) -> ReportMessage {
        let line = |i: usize| {
            format!(
                "node-{i:04} GPU 3: [XID 79](http://prom:9090/graph?g0.expr=increase(gpu_xid_errors_total%7Bxid%3D%2279%22%7D%5B24h%5D)) fell off the bus <&> — runbook `gpu-xid`"
            )
        };
        ReportMessage {
            name: "daily".into(),
            title: format!("Daily health report {}", "x".repeat(300)),
            summary: (0..lines).map(line).collect(),
            sections: (0..sections)
                .map(|s| ReportSection {
                    heading: format!("Section {s}"),
                    lines: (0..lines).map(line).collect(),
                })
                .collect(),
            text: "plain".into(),
            html: "<html></html>".into(),
            charts: vec![Chart {
                file_name: "fleet gpu/util.png".into(),
                title: "Fleet GPU utilization".into(),
                png: vec![1, 2, 3],
            }],
            late: true,
        }
    }

    fn texts(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "text" {
                        if let Some(s) = x.as_str() {
                            out.push(s.to_string());
                        }
                    }
                    texts(x, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| texts(x, out)),
            _ => {}
        }
    }

    #[test]
    fn a_huge_report_stays_within_slack_limits() {
        let v = serde_json::to_value(content(&report(200, 500))).unwrap();
        let blocks = v["blocks"].as_array().unwrap();
        assert!(blocks.len() <= MAX_BLOCKS, "{}", blocks.len());
        assert_eq!(blocks[0]["type"], "header");
        assert!(blocks[0]["text"]["text"].as_str().unwrap().chars().count() <= MAX_HEADER_TEXT);
        let mut all = Vec::new();
        texts(&serde_json::Value::Array(blocks.clone()), &mut all);
        for t in &all {
            assert!(t.chars().count() <= MAX_SECTION_TEXT, "{}", t.len());
        }
        let total: usize = all.iter().map(|t| t.chars().count()).sum();
        assert!(total <= MAX_TOTAL_BLOCK_TEXT, "{total}");
        let last = blocks.last().unwrap()["elements"][0]["text"]
            .as_str()
            .unwrap();
        assert!(
            last.starts_with("… ") && last.ends_with("more sections"),
            "{last}"
        );
        let summary = blocks[2]["text"]["text"].as_str().unwrap();
        assert!(summary.ends_with("more lines"), "{summary}");
        assert!(summary.contains("<http://prom:9090/graph?g0.expr=increase(gpu_xid_errors_total%7Bxid%3D%2279%22%7D%5B24h%5D)|XID 79>"), "{summary}");
        assert!(summary.contains("&lt;&amp;&gt;"));
        assert!(v["text"].as_str().unwrap().chars().count() <= MAX_FALLBACK_TEXT);
        assert!(blocks[1]["elements"][0]["text"]
            .as_str()
            .unwrap()
            .contains("late"));
    }

    #[test]
    fn a_small_report_has_every_section() {
        let v = serde_json::to_value(content(&report(3, 2))).unwrap();
        let blocks = v["blocks"].as_array().unwrap();
        // header, notes, summary, 3 sections
        assert_eq!(blocks.len(), 6, "{v}");
        assert!(blocks[5]["text"]["text"]
            .as_str()
            .unwrap()
            .starts_with("*Section 2*\nnode-0000"));
    }

    #[test]
    fn progress_is_remembered_per_report_and_bounded() {
        let reports = Reports::new("http://127.0.0.1:9/api");
        let r = report(1, 1);
        let m = crate::message::Message::Report(Box::new(r.clone()));
        let out = Outgoing {
            channel: "C1",
            op: Op::Post,
            message: &m,
            renotify: None,
            incident: None,
        };
        let key = Reports::key(&out, &r);
        assert!(reports.get(&key).is_none());
        let p = PlatformRef {
            channel: "C1".into(),
            message_id: "1.2".into(),
        };
        reports.record(key, &p, 1);
        assert_eq!(reports.get(&key).unwrap().charts_done, 1);
        let other = Outgoing {
            channel: "C2",
            op: Op::Post,
            message: &m,
            renotify: None,
            incident: None,
        };
        assert!(reports.get(&Reports::key(&other, &r)).is_none());
        for i in 0..(MAX_REMEMBERED as u8 + 5) {
            reports.record([i; 32], &p, 0);
        }
        assert!(reports.progress.lock().unwrap().len() <= MAX_REMEMBERED);
        reports.forget(&key);
        assert!(reports.get(&key).is_none());
    }

    #[test]
    fn the_token_goes_only_to_slack_or_the_configured_api() {
        let reports = Reports::new("http://127.0.0.1:9000/api");
        let ok = |u: &str| reports.upload_allowed(&reqwest::Url::parse(u).unwrap());
        assert!(ok("https://files.slack.com/upload/v1/abc"));
        assert!(ok("http://127.0.0.1:9000/upload/F1"));
        assert!(!ok("http://files.slack.com/upload/v1/abc"));
        assert!(!ok("https://evil.example/upload"));
        assert!(!ok("https://slack.com.evil.example/upload"));
        assert!(!ok("http://127.0.0.1:9001/upload/F1"));
        assert_eq!(
            safe_file_name("fleet gpu/util.png", 120),
            "fleet_gpu_util.png"
        );
    }

    /// Issue 21, item 7: the Slack fallback `text` carried `**bold**` and
    /// Markdown escapes.
    #[test]
    fn report_slack_fallback_text_has_no_markdown_bold() {
        let mut r = report(1, 1);
        r.summary = vec![
            r"**7 findings** (5 critical, 2 warnings)".into(),
            r"🔴 **gpu\_node\-1** GPU 3: [XID 79](https://prom.example/graph?x) `<!channel>`"
                .into(),
        ];
        let v = serde_json::to_value(content(&r)).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(!text.contains("**"), "{text}");
        assert!(!text.contains('\\'), "{text}");
        assert!(
            text.contains("7 findings (5 critical, 2 warnings)"),
            "{text}"
        );
        assert!(text.contains("gpu_node-1 GPU 3: XID 79"), "{text}");
        assert!(!text.contains("<!channel>"), "{text}");
    }
}
