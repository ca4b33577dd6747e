//! Slack: Block Kit rendering within Slack's limits, and `chat.postMessage`
//! / `chat.update` through slack-morphism with a hyper connector that speaks
//! https and (for proxies and tests) plain http.
//!
//! Limits kept (Slack docs, plus an observed `msg_blocks_too_long` at about
//! 13k characters of block text in total): ≤ 50 blocks, header ≤ 150, section
//! text ≤ 3000, context ≤ 10 elements, button text ≤ 75, fallback text ≤
//! 40000 (we keep 3000). The token never leaves this file except in the
//! Authorization header; errors are redacted. Health reports (Block Kit
//! summary, charts through the three-step file upload) are `slack/report.rs`.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use slack_morphism::errors::SlackClientError;
use slack_morphism::prelude::*;

use crate::config::bot::SlackConfig;
use crate::notify::{
    alert_line_in, fit_alert_lines, headline, status_text, tier_text, truncate_chars, AlertMessage,
    Delivery, Error, GroupStatus, Message, Notifier, Op, Outgoing, PlatformRef, TextMessage,
};
use crate::routing::Tier;

pub mod report;

pub const MAX_BLOCKS: usize = 50;
pub const MAX_SECTION_TEXT: usize = 3000;
pub const MAX_HEADER_TEXT: usize = 150;
pub const MAX_CONTEXT_ELEMENTS: usize = 10;
pub const MAX_BUTTON_TEXT: usize = 75;
pub const MAX_FALLBACK_TEXT: usize = 3000;
/// Total block text we allow ourselves (Slack refuses near 13k).
pub const MAX_TOTAL_BLOCK_TEXT: usize = 11_000;

type Connector = SlackClientHyperConnector<HttpsConnector<HttpConnector>>;

pub struct SlackNotifier {
    client: Arc<SlackClient<Connector>>,
    token: SlackApiToken,
    secret: String,
    /// Health reports whose delivery is under way (see `report.rs`).
    reports: report::Reports,
}

impl SlackNotifier {
    pub fn new(cfg: &SlackConfig) -> anyhow::Result<SlackNotifier> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let connector =
            SlackClientHyperConnector::with_connector(https).with_slack_api_url(&cfg.api_url);
        Ok(SlackNotifier {
            client: Arc::new(SlackClient::new(connector)),
            token: SlackApiToken::new(SlackApiTokenValue::new(cfg.bot_token.expose().to_string())),
            secret: cfg.bot_token.expose().to_string(),
            reports: report::Reports::new(&cfg.api_url),
        })
    }
}

impl Notifier for SlackNotifier {
    fn platform(&self) -> &'static str {
        "slack"
    }

    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>> {
        Box::pin(async move {
            self.call(out)
                .await
                .map_err(|e| e.scrubbed(&[&self.secret]))
        })
    }
}

impl SlackNotifier {
    async fn call(&self, out: &Outgoing<'_>) -> Result<Delivery, Error> {
        if let Message::Report(r) = out.message {
            let session = self.client.open_session(&self.token);
            return report::send(&session, &self.reports, out, r).await;
        }
        {
            let content = render(out.message);
            let session = self.client.open_session(&self.token);
            match &out.op {
                Op::Post | Op::Reply(_) => {
                    let (channel, thread) = match &out.op {
                        Op::Reply(p) => {
                            (p.channel.clone(), Some(SlackTs::new(p.message_id.clone())))
                        }
                        _ => (out.channel.to_string(), None),
                    };
                    let mut req =
                        SlackApiChatPostMessageRequest::new(SlackChannelId::new(channel), content);
                    // A reply that notifies again is also shown in the channel.
                    if thread.is_some() && out.renotify.is_some() {
                        req.reply_broadcast = Some(true);
                    }
                    req.thread_ts = thread;
                    req.unfurl_links = Some(false);
                    let resp = session.chat_post_message(&req).await.map_err(map_error)?;
                    Ok(Delivery {
                        message: PlatformRef {
                            channel: resp.channel.to_string(),
                            message_id: resp.ts.to_string(),
                        },
                    })
                }
                Op::Edit(p) => {
                    let req = SlackApiChatUpdateRequest::new(
                        SlackChannelId::new(p.channel.clone()),
                        content,
                        SlackTs::new(p.message_id.clone()),
                    );
                    let resp = session.chat_update(&req).await.map_err(map_error)?;
                    Ok(Delivery {
                        message: PlatformRef {
                            channel: resp.channel.to_string(),
                            message_id: resp.ts.to_string(),
                        },
                    })
                }
            }
        }
    }
}

/// Slack API error codes worth retrying.
const TRANSIENT_CODES: &[&str] = &[
    "ratelimited",
    "rate_limited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
];

fn map_error(e: SlackClientError) -> Error {
    match e {
        SlackClientError::RateLimitError(r) => Error::rate_limited(
            r.retry_after,
            format!(
                "slack 429 rate limited{}",
                r.code.map(|c| format!(": {c}")).unwrap_or_default()
            ),
        ),
        SlackClientError::ApiError(a) if a.code == "message_not_found" => Error::MessageGone {
            reason: "slack error: message_not_found".into(),
        },
        SlackClientError::ApiError(a) if TRANSIENT_CODES.contains(&a.code.as_str()) => {
            Error::retryable(format!("slack error: {}", a.code))
        }
        SlackClientError::ApiError(a) => Error::permanent(format!(
            "slack error: {}{}",
            a.code,
            a.errors
                .map(|e| format!(" ({})", e.join("; ")))
                .unwrap_or_default()
        )),
        SlackClientError::HttpError(h) => {
            let body = h
                .http_response_body
                .as_deref()
                .map(|b| truncate_chars(b, 200))
                .unwrap_or_default();
            Error::from_status(h.status_code.as_u16(), None, &format!("slack: {body}"))
        }
        other => Error::retryable(format!("slack request failed: {other}")),
    }
}

/// Escapes text for Slack mrkdwn (`&`, `<`, `>`): [`crate::escape::slack`].
pub fn escape(s: &str) -> String {
    crate::escape::slack(s)
}

/// A link `<url|text>` when `url` is an `http(s)` URL that cannot break the
/// syntax ([`crate::escape::safe_url`]); anything else (`javascript:`, a
/// `|` or `>` in it) is shown as escaped text. `text` is ours.
fn link(url: &str, text: &str) -> String {
    match crate::escape::safe_url(url) {
        Some(u) => format!("<{}|{text}>", u.replace('&', "&amp;")),
        None => format!("{text}: {}", escape(&crate::escape::line(url))),
    }
}

fn tier_emoji(m: &AlertMessage) -> &'static str {
    if m.status == GroupStatus::Resolved {
        return "✅";
    }
    match m.tier {
        Tier::P1 => "🔴",
        Tier::P2 => "🟠",
        Tier::P3 => "🟡",
        Tier::P4 => "🔵",
    }
}

fn colour(m: &AlertMessage) -> String {
    if m.status == GroupStatus::Resolved {
        "#2EB67D".into()
    } else {
        format!("#{:06X}", m.tier.colour())
    }
}

fn mrkdwn_section(text: String) -> SlackBlock {
    SlackBlock::Section(SlackSectionBlock::new().with_text(SlackBlockText::MarkDown(
        SlackBlockMarkDownText::new(truncate_chars(&text, MAX_SECTION_TEXT)),
    )))
}

fn context(texts: Vec<String>) -> SlackBlock {
    SlackBlock::Context(SlackContextBlock::new(
        texts
            .into_iter()
            .take(MAX_CONTEXT_ELEMENTS)
            .map(|t| {
                SlackContextBlockElement::MarkDown(SlackBlockMarkDownText::new(truncate_chars(
                    &t, 2000,
                )))
            })
            .collect(),
    ))
}

/// The message content for `chat.postMessage` / `chat.update`.
pub fn render(message: &Message) -> SlackMessageContent {
    match message {
        Message::Alert(m) => render_alert(m),
        Message::Text(t) => render_text(t),
        Message::Report(r) => report::content(r),
    }
}

fn render_text(t: &TextMessage) -> SlackMessageContent {
    let mut blocks = vec![mrkdwn_section(escape(&t.text))];
    if let Some(code) = &t.code {
        // Three backticks inside would end the block early.
        let code = code.replace("```", "ˋˋˋ");
        let body = truncate_code(&code, MAX_SECTION_TEXT - 8);
        blocks.push(mrkdwn_section(format!("```{}```", escape(&body))));
    }
    if !t.buttons.is_empty() {
        blocks.push(buttons_block(&t.buttons, 0));
    }
    SlackMessageContent::new()
        .with_text(truncate_chars(&escape(&t.text), MAX_FALLBACK_TEXT))
        .with_blocks(blocks)
}

fn buttons_block(buttons: &[crate::notify::Button], group_id: i64) -> SlackBlock {
    use crate::notify::Button;
    let elements = buttons
        .iter()
        .take(25)
        .map(|b| {
            let (action_id, value) = b.slack_action(group_id);
            let mut button = SlackBlockButtonElement::new(SlackBlockPlainTextOnly::from(
                truncate_chars(&b.label(), MAX_BUTTON_TEXT),
            ))
            .with_action_id(SlackActionId::new(action_id.to_string()))
            .with_value(value);
            match b {
                Button::Acknowledge | Button::Approve(_) => {
                    button = button.with_style(SlackBlockButtonStyle::Primary)
                }
                Button::Deny(_) => button = button.with_style(SlackBlockButtonStyle::Danger),
                _ => {}
            }
            SlackActionBlockElement::Button(button)
        })
        .collect();
    SlackBlock::Actions(SlackActionsBlock::new(elements))
}

/// Keeps the head of `code` within `max` characters, saying how much was cut.
pub fn truncate_code(code: &str, max: usize) -> String {
    let n = code.chars().count();
    if n <= max {
        return code.to_string();
    }
    let note = format!("\n… ({} more characters)", n - (max - 40));
    let head: String = code.chars().take(max - 40).collect();
    format!("{head}{note}")
}

fn render_alert(m: &AlertMessage) -> SlackMessageContent {
    let mut blocks: Vec<SlackBlock> = Vec::new();
    let test = if m.is_test { "[TEST] " } else { "" };
    let header = format!(
        "{} {test}{} · {} · {}",
        tier_emoji(m),
        m.tier,
        status_text(m),
        crate::escape::line(&m.title)
    );
    blocks.push(SlackBlock::Header(SlackHeaderBlock::new(
        SlackBlockPlainTextOnly::from(truncate_chars(&escape(&header), MAX_HEADER_TEXT)),
    )));
    if let Some(s) = &m.summary {
        blocks.push(mrkdwn_section(format!(
            "*{}*",
            escape(&crate::escape::line(s))
        )));
    }
    let mut ctx = vec![escape(&tier_text(m))];
    if let Some(a) = &m.acknowledged {
        ctx.push(format!(
            "👀 acknowledged by {}",
            escape(&crate::escape::line(&a.by))
        ));
    }
    if m.is_test {
        ctx.push("This is a test alert from gpuops.".into());
    }
    blocks.push(context(ctx));
    let lines: Vec<String> = m
        .alerts
        .iter()
        .map(|a| escape(&alert_line_in(m, a)))
        .collect();
    blocks.push(mrkdwn_section(fit_alert_lines(m, &lines, MAX_SECTION_TEXT)));
    if let Some(d) = &m.description {
        // Cut again after escaping (`<` is four characters escaped).
        blocks.push(mrkdwn_section(truncate_chars(
            &escape(&truncate_chars(d, 1500)),
            1500,
        )));
    }
    let mut links = Vec::new();
    if let Some(u) = &m.runbook_url {
        links.push(link(u, "📖 Runbook"));
    }
    if let Some(id) = &m.runbook_id {
        links.push(format!("runbook `{}`", escape(&crate::escape::line(id))));
    }
    if let Some(u) = &m.generator_url {
        links.push(link(u, "📈 Prometheus"));
    }
    if let Some(u) = &m.alertmanager_url {
        links.push(link(u, "🔕 AlertManager"));
    }
    if !links.is_empty() {
        blocks.push(context(vec![links.join(" · ")]));
    }
    if !m.buttons.is_empty() {
        blocks.push(buttons_block(&m.buttons, m.group_id));
    }
    blocks.truncate(MAX_BLOCKS);
    let attachment = SlackMessageAttachment::new()
        .with_color(colour(m))
        .with_blocks(blocks);
    SlackMessageContent::new()
        .with_text(truncate_chars(&escape(&headline(m)), MAX_FALLBACK_TEXT))
        .with_attachments(vec![attachment])
}

/// The body of an answer to a slash command's `response_url` (`text`
/// already escaped and truncated): ephemeral unless `in_channel`, never
/// replacing the original message.
pub fn response_url_body(text: &str, in_channel: bool) -> serde_json::Value {
    serde_json::json!({
        "response_type": if in_channel { "in_channel" } else { "ephemeral" },
        "replace_original": false,
        "text": text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{AlertLine, Button};

    pub(crate) fn big_alert(n: usize) -> AlertMessage {
        AlertMessage {
            group_id: 7,
            tier: Tier::P1,
            title: "GpuXidError".repeat(30),
            summary: Some("x".repeat(5000)),
            description: Some("d".repeat(9000)),
            severity: "critical".into(),
            severity_unknown: false,
            status: GroupStatus::Firing {
                firing: n,
                resolved: 0,
            },
            acknowledged: None,
            alerts: (0..n)
                .map(|i| AlertLine {
                    firing: true,
                    name: "GpuXidError".into(),
                    instance: Some(format!("node-{i:04}.cluster.example:9949")),
                    gpu: Some((i % 8).to_string()),
                    labels: vec![("xid".into(), "79".into())],
                    summary: Some("GPU has fallen off the bus <&>".into()),
                    generator_url: None,
                    ..Default::default()
                })
                .collect(),
            truncated_alerts: 3,
            runbook_url: Some("https://wiki.example/runbooks/xid".into()),
            runbook_id: Some("gpu-xid".into()),
            generator_url: Some("http://prom:9090/graph?g0.expr=x".into()),
            alertmanager_url: Some("http://am:9093".into()),
            buttons: vec![
                Button::Acknowledge,
                Button::Silence1h,
                Button::RunRunbook("gpu-xid".into()),
            ],
            is_test: false,
            common_labels: Default::default(),
            escalation: None,
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
    fn a_huge_group_stays_within_slack_limits() {
        let content = render(&Message::Alert(Box::new(big_alert(5000))));
        let v = serde_json::to_value(&content).unwrap();
        let blocks = v["attachments"][0]["blocks"].as_array().unwrap();
        assert!(blocks.len() <= MAX_BLOCKS);
        assert!(blocks[0]["text"]["text"].as_str().unwrap().chars().count() <= MAX_HEADER_TEXT);
        let mut all = Vec::new();
        texts(&serde_json::Value::Array(blocks.clone()), &mut all);
        for t in &all {
            assert!(t.chars().count() <= MAX_SECTION_TEXT, "{}", t.len());
        }
        let total: usize = all.iter().map(|t| t.chars().count()).sum();
        assert!(total <= MAX_TOTAL_BLOCK_TEXT, "{total}");
        let alerts = blocks
            .iter()
            .find(|b| {
                b["text"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("node-0000"))
            })
            .unwrap();
        let text = alerts["text"]["text"].as_str().unwrap();
        assert!(
            text.lines().last().unwrap().starts_with("… and ") && text.ends_with("more nodes"),
            "{text}"
        );
        assert!(text.contains("&lt;&amp;&gt;"));
        assert!(v["text"].as_str().unwrap().chars().count() <= MAX_FALLBACK_TEXT);
    }

    fn all_texts(v: &serde_json::Value) -> Vec<String> {
        let mut out = Vec::new();
        texts(v, &mut out);
        out
    }

    /// Finding 1 (issue 20): the top-level `text` of `chat.postMessage`
    /// carried an alert name's mentions unescaped.
    #[test]
    fn slack_fallback_text_escapes_mentions() {
        let mut m = big_alert(1);
        m.title = "Mention <!channel> <!here> <@U0ADMIN>".into();
        let v = serde_json::to_value(render(&Message::Alert(Box::new(m)))).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("Mention &lt;!channel&gt; &lt;!here&gt; &lt;@U0ADMIN&gt;"),
            "{text}"
        );
        for t in all_texts(&v) {
            assert!(!t.contains("<!") && !t.contains("<@"), "{t}");
        }
        // A thread reply's fallback too.
        let t = TextMessage::new("unknown command <!channel>", Some("<!here>".into()));
        let v = serde_json::to_value(render(&Message::Text(t))).unwrap();
        assert_eq!(v["text"], "unknown command &lt;!channel&gt;");
        for t in all_texts(&v) {
            assert!(!t.contains("<!"), "{t}");
        }
    }

    /// Finding 1 (issue 20): a PagerDuty acknowledgement by
    /// `<!channel> Mallory` landed in `chat.update` as a mention.
    #[test]
    fn pagerduty_ack_by_mention_is_escaped_in_chat_update() {
        let mut m = big_alert(1);
        m.acknowledged = Some(crate::notify::Ack {
            by: "<!channel> Mallory".into(),
            at: 0.0,
        });
        let v = serde_json::to_value(render(&Message::Alert(Box::new(m)))).unwrap();
        let all = all_texts(&v);
        assert!(
            all.iter()
                .any(|t| t.contains("acknowledged by &lt;!channel&gt; Mallory")),
            "{all:?}"
        );
        for t in &all {
            assert!(!t.contains("<!channel>"), "{t}");
        }
    }

    /// Finding 2 (issue 20): `runbook_url: javascript:…` became a link.
    #[test]
    fn javascript_runbook_url_is_never_a_slack_link() {
        let mut m = big_alert(1);
        m.runbook_url = Some("javascript:alert(document.cookie)".into());
        m.generator_url = Some("data:text/html,x".into());
        let v = serde_json::to_value(render(&Message::Alert(Box::new(m)))).unwrap();
        for t in all_texts(&v) {
            assert!(!t.contains("<javascript") && !t.contains("<data"), "{t}");
        }
        assert!(v.to_string().contains("javascript:alert(document.cookie)"));
        assert!(v.to_string().contains("<http://am:9093|"), "{v}");
    }

    #[test]
    fn buttons_carry_the_contract_ids() {
        let content = render(&Message::Alert(Box::new(big_alert(1))));
        let v = serde_json::to_value(&content).unwrap();
        let blocks = v["attachments"][0]["blocks"].as_array().unwrap();
        let actions = blocks.iter().find(|b| b["type"] == "actions").unwrap();
        let ids: Vec<(String, String)> = actions["elements"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["action_id"].as_str().unwrap().into(),
                    e["value"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            ids,
            [
                ("gpuops_ack".to_string(), "7".to_string()),
                ("gpuops_silence_1h".into(), "7".into()),
                ("gpuops_run_runbook".into(), "7|gpu-xid".into())
            ]
        );
        assert_eq!(v["attachments"][0]["color"], "#D00000");
    }

    #[test]
    fn long_code_output_is_cut_with_a_note() {
        let t = TextMessage {
            buttons: Vec::new(),
            text: "step 1: nvidia-smi".into(),
            code: Some("line\n".repeat(2000)),
        };
        let v = serde_json::to_value(render(&Message::Text(t))).unwrap();
        let code = v["blocks"][1]["text"]["text"].as_str().unwrap();
        assert!(code.chars().count() <= MAX_SECTION_TEXT);
        assert!(code.contains("more characters)"), "{code}");
    }

    #[test]
    fn approval_request_carries_approve_and_deny_buttons() {
        let t = TextMessage {
            text: "drain needs approval".into(),
            code: None,
            buttons: vec![
                crate::notify::Button::Approve("r0a1b2c".into()),
                crate::notify::Button::Deny("r0a1b2c".into()),
            ],
        };
        let v = serde_json::to_value(render(&Message::Text(t))).unwrap();
        let e = &v["blocks"][1]["elements"];
        assert_eq!(e[0]["action_id"], "gpuops_approve", "{v}");
        assert_eq!(e[0]["value"], "r0a1b2c");
        assert_eq!(e[0]["style"], "primary");
        assert_eq!(e[1]["action_id"], "gpuops_deny");
        assert_eq!(e[1]["style"], "danger");
    }
}
