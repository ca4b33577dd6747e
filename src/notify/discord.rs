//! Discord: embeds and buttons within Discord's limits, sent through
//! serenity's HTTP layer (`HttpBuilder::proxy(api_url)` for the base URL,
//! serenity's routes, request builder and message builders).
//!
//! The request is executed here rather than by `Http::request` because with
//! a proxy serenity's rate limiter must be off (it ignores the proxy) and
//! `Http::request` then drops a 429's `retry_after`; reading the response
//! ourselves lets the outbox honour it. Limits kept: embed title ≤ 256,
//! description ≤ 4096, ≤ 25 fields, field name ≤ 256 and value ≤ 1024, footer
//! ≤ 2048, all embed text ≤ 6000, content ≤ 2000, button label ≤ 80,
//! custom_id ≤ 100. The token is only in the Authorization header; errors
//! are redacted. Health reports (an embed with the charts attached,
//! multipart) are `discord/report.rs`.

use std::time::Duration;

use futures_util::future::BoxFuture;
use serenity::all::{
    ApplicationId, ButtonStyle, ChannelId, Command, CreateActionRow, CreateAllowedMentions,
    CreateButton, CreateCommand, CreateEmbed, CreateEmbedFooter, CreateMessage, EditMessage,
    MessageId, MessageReference,
};
use serenity::http::{Http, HttpBuilder, HttpError, LightMethod, Request, Route};

use crate::config::bot::DiscordConfig;
use crate::notify::{
    alert_line_in, fit_alert_lines, headline, status_text, tier_text, truncate_chars, AlertMessage,
    Delivery, Error, GroupStatus, Message, Notifier, Op, Outgoing, PlatformRef,
};

pub const MAX_CONTENT: usize = 2000;
pub const MAX_TITLE: usize = 256;
pub const MAX_DESCRIPTION: usize = 4096;
pub const MAX_FIELDS: usize = 25;
pub const MAX_FIELD_NAME: usize = 256;
pub const MAX_FIELD_VALUE: usize = 1024;
pub const MAX_FOOTER: usize = 2048;
pub const MAX_EMBED_TOTAL: usize = 6000;
pub const MAX_BUTTON_LABEL: usize = 80;

pub mod report;

pub struct DiscordNotifier {
    http: Http,
    client: reqwest::Client,
}

impl DiscordNotifier {
    pub fn new(cfg: &DiscordConfig, timeout: Duration) -> anyhow::Result<DiscordNotifier> {
        let (http, client) = http_client(cfg, timeout)?;
        Ok(DiscordNotifier {
            http: http.build(),
            client,
        })
    }

    async fn execute(&self, req: Request<'_>) -> Result<String, Error> {
        let built = req
            .build(&self.client, self.http.token(), self.http.proxy.as_deref())
            .map_err(|e| Error::permanent(format!("discord request: {e}")))?;
        self.respond(built).await
    }

    /// Sends a built request; the body of a 2xx answer, or the error kind
    /// (a 429's `retry_after` kept).
    async fn respond(&self, built: reqwest::RequestBuilder) -> Result<String, Error> {
        let resp = built.send().await.map_err(|e| {
            Error::retryable(format!("discord request failed: {}", e.without_url()))
        })?;
        let status = resp.status().as_u16();
        let header_retry = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok());
        let body = resp
            .text()
            .await
            .map_err(|e| Error::retryable(format!("discord response: {}", e.without_url())))?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let json: serde_json::Value =
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
        let message = json["message"].as_str().unwrap_or("").to_string();
        let code = json["code"].as_i64();
        let detail = match code {
            Some(c) => format!("discord error {c}: {message}"),
            None => format!(
                "discord: {}",
                truncate_chars(if message.is_empty() { &body } else { &message }, 200)
            ),
        };
        if status == 404 && code == Some(10008) {
            return Err(Error::MessageGone { reason: detail });
        }
        if status == 429 {
            // The JSON body's retry_after (seconds, fractional) is authoritative.
            let secs = json["retry_after"].as_f64().or(header_retry);
            let delay = secs
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| Duration::from_secs_f64(s.min(3600.0)));
            return Err(Error::rate_limited(delay, detail));
        }
        Err(Error::from_status(status, None, &detail))
    }
}

/// serenity's `Http` for `cfg` (not yet built): the bot token, `api_url` as
/// its proxy (Discord itself, or a local fake in tests), no rate limiter (it
/// ignores the proxy), and our reqwest client with `timeout`.
fn http_client(
    cfg: &DiscordConfig,
    timeout: Duration,
) -> anyhow::Result<(HttpBuilder, reqwest::Client)> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("gpuops/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let http = HttpBuilder::new(cfg.bot_token.expose())
        .proxy(cfg.api_url.clone())
        .ratelimiter_disabled(true)
        .client(client.clone());
    Ok((http, client))
}

/// Replaces the application's global slash commands with `commands`
/// (serenity's `Command::set_global_commands`:
/// `PUT /api/v10/applications/{application_id}/commands`) and returns them
/// as Discord registered them. An error names the HTTP status and Discord's
/// message, never the token.
pub async fn set_global_commands(
    cfg: &DiscordConfig,
    application_id: u64,
    commands: Vec<CreateCommand>,
    timeout: Duration,
) -> anyhow::Result<Vec<Command>> {
    let application_id = ApplicationId::new(application_id);
    let (http, _) = http_client(cfg, timeout)?;
    let http = http.application_id(application_id).build();
    let path = format!("PUT /api/v10/applications/{application_id}/commands");
    Command::set_global_commands(&http, commands)
        .await
        .map_err(|e| match e {
            serenity::Error::Http(HttpError::UnsuccessfulRequest(r)) => {
                let mut detail = format!(
                    "{path}: HTTP {}: {} (Discord error {})",
                    r.status_code.as_u16(),
                    r.error.message,
                    r.error.code
                );
                for err in &r.error.errors {
                    detail.push_str(&format!("; {}: {}", err.path, err.message));
                }
                if r.status_code.as_u16() == 401 {
                    detail.push_str("; is [discord] bot_token right?");
                }
                anyhow::anyhow!(crate::telemetry::redact(&detail))
            }
            serenity::Error::Http(HttpError::Request(e)) => {
                let e = e.without_url();
                let mut detail = format!("{path}: request failed: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    detail.push_str(&format!(": {s}"));
                    source = s.source();
                }
                anyhow::anyhow!(crate::telemetry::redact(&detail))
            }
            other => anyhow::anyhow!(crate::telemetry::redact(&format!("{path}: {other}"))),
        })
}

impl Notifier for DiscordNotifier {
    fn platform(&self) -> &'static str {
        "discord"
    }

    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>> {
        Box::pin(async move {
            if let (Message::Report(r), Op::Post | Op::Reply(_)) = (out.message, &out.op) {
                return report::send(self, out, r).await;
            }
            let parse_id = |s: &str, what: &str| {
                s.parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Error::permanent(format!("{what} {s:?} is not a Discord id")))
            };
            let (route, method, body) = match &out.op {
                Op::Post | Op::Reply(_) => {
                    let channel = match &out.op {
                        Op::Reply(p) => p.channel.as_str(),
                        _ => out.channel,
                    };
                    let channel_id = ChannelId::new(parse_id(channel, "channel")?);
                    let mut msg = create_message(out.message);
                    if let Op::Reply(p) = &out.op {
                        let parent = MessageId::new(parse_id(&p.message_id, "message")?);
                        let mut reference = MessageReference::from((channel_id, parent));
                        // A deleted parent still gets the reply, unthreaded.
                        reference.fail_if_not_exists = Some(false);
                        msg = msg.reference_message(reference);
                    }
                    let body = serde_json::to_vec(&msg)
                        .map_err(|e| Error::permanent(format!("cannot encode message: {e}")))?;
                    (
                        Route::ChannelMessages { channel_id },
                        LightMethod::Post,
                        body,
                    )
                }
                Op::Edit(p) => {
                    let channel_id = ChannelId::new(parse_id(&p.channel, "channel")?);
                    let message_id = MessageId::new(parse_id(&p.message_id, "message")?);
                    let body = serde_json::to_vec(&edit_message(out.message))
                        .map_err(|e| Error::permanent(format!("cannot encode message: {e}")))?;
                    (
                        Route::ChannelMessage {
                            channel_id,
                            message_id,
                        },
                        LightMethod::Patch,
                        body,
                    )
                }
            };
            let token = self.http.token().trim_start_matches("Bot ").to_string();
            let text = self
                .execute(Request::new(route, method).body(Some(body)))
                .await
                .map_err(|e| e.scrubbed(&[&token]))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
            let id = v["id"]
                .as_str()
                .map(str::to_string)
                .or_else(|| v["id"].as_u64().map(|n| n.to_string()));
            let channel =
                v["channel_id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| match &out.op {
                        Op::Edit(p) | Op::Reply(p) => p.channel.clone(),
                        Op::Post => out.channel.to_string(),
                    });
            match id {
                Some(message_id) => Ok(Delivery {
                    message: PlatformRef {
                        channel,
                        message_id,
                    },
                }),
                None => match &out.op {
                    Op::Edit(p) => Ok(Delivery { message: p.clone() }),
                    _ => Err(Error::retryable("discord answered without a message id")),
                },
            }
        })
    }
}

/// The parts shared by create and edit.
pub struct Rendered {
    pub content: String,
    pub embed: Option<CreateEmbed>,
    pub components: Vec<CreateActionRow>,
}

pub fn create_message(m: &Message) -> CreateMessage {
    let r = render(m);
    // Alert text must never ping @everyone or a role.
    let mut msg = CreateMessage::new()
        .content(r.content)
        .components(r.components)
        .allowed_mentions(CreateAllowedMentions::new());
    if let Some(e) = r.embed {
        msg = msg.embed(e);
    }
    msg
}

pub fn edit_message(m: &Message) -> EditMessage {
    let r = render(m);
    // Always send components, so a resolved group's buttons disappear.
    // Alert text must never ping @everyone or a role.
    let mut msg = EditMessage::new()
        .content(r.content)
        .components(r.components)
        .allowed_mentions(CreateAllowedMentions::new());
    if let Some(e) = r.embed {
        msg = msg.embed(e);
    }
    msg
}

pub fn render(m: &Message) -> Rendered {
    match m {
        Message::Text(t) => {
            // The whole text is escaped: it may carry outside values (a
            // label, an echoed command); the step output is in a code
            // block, where Discord renders no Markdown and no mention.
            let mut content = escape(&t.text);
            if let Some(code) = &t.code {
                let code = crate::escape::pagerduty(code)
                    .replace("```", "ˋˋˋ")
                    .replace("@everyone", "@\u{200B}everyone")
                    .replace("@here", "@\u{200B}here");
                let room = MAX_CONTENT.saturating_sub(content.chars().count() + 10);
                content = format!(
                    "{content}\n```\n{}\n```",
                    crate::notify::slack::truncate_code(&code, room.max(60))
                );
            }
            Rendered {
                content: truncate_chars(&content, MAX_CONTENT),
                embed: None,
                components: buttons_row(&t.buttons, 0),
            }
        }
        Message::Alert(a) => render_alert(a),
        // An edit keeps the attachments; the first stays the image.
        Message::Report(r) => Rendered {
            content: String::new(),
            embed: Some(report::embed(
                r,
                report::attachments(r).first().map(|(n, _)| n.as_str()),
            )),
            components: Vec::new(),
        },
    }
}

/// Escapes outside text for Discord Markdown: [`crate::escape::discord`].
pub fn escape(s: &str) -> String {
    crate::escape::discord(s)
}

/// A masked link `[text](url)` when `url` is an `http(s)` URL
/// ([`crate::escape::safe_url`], parentheses percent-encoded so Discord
/// finds the link's end); anything else is shown as escaped text. `text`
/// is ours.
fn link(url: &str, text: &str) -> String {
    match crate::escape::safe_url(url) {
        Some(u) => format!("[{text}]({})", u.replace('(', "%28").replace(')', "%29")),
        None => format!("{text}: {}", escape(&crate::escape::line(url))),
    }
}

/// Cuts escaped text to `max` characters without leaving a lone `\` at the
/// end (which would escape whatever follows).
fn truncate_escaped(s: &str, max: usize) -> String {
    let mut t = truncate_chars(s, max);
    if t.ends_with('…') {
        t.pop();
        let trailing = t.chars().rev().take_while(|c| *c == '\\').count();
        if trailing % 2 == 1 {
            t.pop();
        }
        t.push('…');
    }
    t
}

fn render_alert(m: &AlertMessage) -> Rendered {
    let title = truncate_escaped(
        &format!(
            "{}{} · {}",
            if m.is_test { "[TEST] " } else { "" },
            m.tier,
            escape(&crate::escape::line(&m.title))
        ),
        MAX_TITLE,
    );
    let mut fields: Vec<(String, String)> = vec![
        ("Status".into(), escape(&status_text(m))),
        ("Tier".into(), escape(&tier_text(m))),
    ];
    let mut links = Vec::new();
    if let Some(u) = &m.runbook_url {
        links.push(link(u, "Runbook"));
    }
    if let Some(id) = &m.runbook_id {
        links.push(format!("runbook {}", escape(&crate::escape::line(id))));
    }
    if let Some(u) = &m.generator_url {
        links.push(link(u, "Prometheus"));
    }
    if let Some(u) = &m.alertmanager_url {
        links.push(link(u, "AlertManager"));
    }
    if !links.is_empty() {
        fields.push(("Links".into(), links.join(" · ")));
    }
    if let Some(d) = &m.description {
        fields.push(("Description".into(), escape(&truncate_chars(d, 1500))));
    }
    let fields: Vec<(String, String)> = fields
        .into_iter()
        .take(MAX_FIELDS)
        .map(|(n, v)| {
            (
                truncate_escaped(&n, MAX_FIELD_NAME),
                truncate_escaped(&v, MAX_FIELD_VALUE),
            )
        })
        .collect();
    let footer = if m.is_test {
        "gpuops test alert".to_string()
    } else {
        format!("gpuops · group {}", m.group_id)
    };
    let used = title.chars().count()
        + footer.chars().count()
        + fields
            .iter()
            .map(|(n, v)| n.chars().count() + v.chars().count())
            .sum::<usize>();
    let budget = MAX_DESCRIPTION.min(MAX_EMBED_TOTAL.saturating_sub(used + 16));
    let mut description = String::new();
    if let Some(s) = &m.summary {
        description = format!(
            "**{}**\n",
            truncate_escaped(&escape(&crate::escape::line(s)), 500)
        );
    }
    let lines: Vec<String> = m
        .alerts
        .iter()
        .map(|a| escape(&alert_line_in(m, a)))
        .collect();
    let room = budget.saturating_sub(description.chars().count());
    description.push_str(&fit_alert_lines(m, &lines, room));
    let colour = if m.status == GroupStatus::Resolved {
        0x2E_B6_7D
    } else {
        m.tier.colour()
    };
    let embed = CreateEmbed::new()
        .title(title)
        .description(description)
        .colour(colour)
        .fields(fields.into_iter().map(|(n, v)| (n, v, false)))
        .footer(CreateEmbedFooter::new(truncate_chars(&footer, MAX_FOOTER)));
    let components = buttons_row(&m.buttons, m.group_id);
    Rendered {
        content: truncate_escaped(&escape(&headline(m)), MAX_CONTENT),
        embed: Some(embed),
        components,
    }
}

fn buttons_row(buttons: &[crate::notify::Button], group_id: i64) -> Vec<CreateActionRow> {
    use crate::notify::Button;
    let buttons: Vec<CreateButton> = buttons
        .iter()
        .take(5)
        .map(|b| {
            let style = match b {
                Button::Acknowledge => ButtonStyle::Primary,
                Button::Approve(_) => ButtonStyle::Success,
                Button::Deny(_) => ButtonStyle::Danger,
                _ => ButtonStyle::Secondary,
            };
            CreateButton::new(truncate_chars(&b.discord_custom_id(group_id), 100))
                .label(truncate_chars(&b.label(), MAX_BUTTON_LABEL))
                .style(style)
        })
        .collect();
    if buttons.is_empty() {
        Vec::new()
    } else {
        vec![CreateActionRow::Buttons(buttons)]
    }
}

/// A chat answer's content (our Markdown, which may echo what a user typed
/// or a label): its formatting kept, but no masked link (`](` is broken by
/// a zero-width space), no `@everyone` / `@here`, and no `<@…>`, `<@&…>`
/// or `<#…>` mention syntax. Answers also carry `allowed_mentions` that
/// allow nothing.
pub fn reply_content(text: &str) -> String {
    text.replace("](", "]\u{200B}(")
        .replace("@everyone", "@\u{200B}everyone")
        .replace("@here", "@\u{200B}here")
        .replace("<@", "<\u{200B}@")
        .replace("<#", "<\u{200B}#")
}

/// The interaction webhook of a deferred Discord answer (follow-ups are
/// posted here; `/messages/@original` edits the deferred message).
pub fn followup_url(api_url: &str, application_id: &str, token: &str) -> String {
    format!("{api_url}/api/v10/webhooks/{application_id}/{token}")
}

/// The body of a Discord follow-up (or of the edit of the deferred
/// message): the content with `allowed_mentions` that allow nothing (no
/// user, role, `@everyone` or `@here` is pinged), flagged ephemeral (64)
/// if asked.
pub fn followup_body(content: &str, ephemeral: bool) -> serde_json::Value {
    let mut body = serde_json::json!({
        "content": reply_content(content),
        "allowed_mentions": { "parse": [] },
    });
    if ephemeral {
        body["flags"] = serde_json::json!(64);
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{AlertLine, Button};
    use crate::routing::Tier;

    fn big_alert(n: usize) -> AlertMessage {
        AlertMessage {
            group_id: 7,
            tier: Tier::P3,
            title: "T".repeat(400),
            summary: Some("s".repeat(3000)),
            description: Some("d".repeat(9000)),
            severity: "bogus".into(),
            severity_unknown: true,
            status: GroupStatus::Firing {
                firing: n,
                resolved: 0,
            },
            acknowledged: None,
            alerts: (0..n)
                .map(|i| AlertLine {
                    firing: true,
                    name: "A".into(),
                    instance: Some(format!("node-{i:04}:9949")),
                    gpu: Some("0".into()),
                    labels: vec![],
                    summary: Some("summary ".repeat(10)),
                    generator_url: None,
                    ..Default::default()
                })
                .collect(),
            truncated_alerts: 0,
            runbook_url: Some("https://wiki/x".into()),
            runbook_id: Some("gpu-xid".into()),
            generator_url: None,
            alertmanager_url: None,
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

    #[test]
    fn a_huge_group_stays_within_discord_limits() {
        let v = serde_json::to_value(create_message(&Message::Alert(Box::new(big_alert(3000)))))
            .unwrap();
        let e = &v["embeds"][0];
        let title = e["title"].as_str().unwrap();
        let desc = e["description"].as_str().unwrap();
        assert!(title.chars().count() <= MAX_TITLE);
        assert!(desc.chars().count() <= MAX_DESCRIPTION);
        assert!(desc.ends_with("more nodes"), "{desc}");
        let fields = e["fields"].as_array().unwrap();
        assert!(fields.len() <= MAX_FIELDS);
        let mut total = title.chars().count()
            + desc.chars().count()
            + e["footer"]["text"].as_str().unwrap().chars().count();
        for f in fields {
            let (n, val) = (f["name"].as_str().unwrap(), f["value"].as_str().unwrap());
            assert!(n.chars().count() <= MAX_FIELD_NAME && val.chars().count() <= MAX_FIELD_VALUE);
            total += n.chars().count() + val.chars().count();
        }
        assert!(total <= MAX_EMBED_TOTAL, "{total}");
        assert!(v["content"].as_str().unwrap().chars().count() <= MAX_CONTENT);
        let tier = fields.iter().find(|f| f["name"] == "Tier").unwrap();
        assert!(tier["value"].as_str().unwrap().contains("unknown severity"));
    }

    /// Findings 1 and 2 (issue 20): mentions, masked links and a
    /// `javascript:` runbook URL from labels, in a Discord message and edit.
    #[test]
    fn discord_alert_escapes_mentions_and_masked_links() {
        let mut m = big_alert(1);
        m.title = "[Reset your SSO password](https://evil.example/login) @everyone".into();
        m.alerts[0].summary = Some("<@123> @here # heading".into());
        m.runbook_url = Some("javascript:alert(document.cookie)".into());
        m.acknowledged = Some(crate::notify::Ack {
            by: "@everyone Mallory".into(),
            at: 0.0,
        });
        for v in [
            serde_json::to_value(create_message(&Message::Alert(Box::new(m.clone())))).unwrap(),
            serde_json::to_value(edit_message(&Message::Alert(Box::new(m)))).unwrap(),
        ] {
            assert_eq!(v["allowed_mentions"]["parse"], serde_json::json!([]));
            let s = v.to_string();
            assert!(!s.contains("@everyone") && !s.contains("@here"), "{s}");
            assert!(
                !s.contains("](https://evil") && !s.contains("](javascript"),
                "{s}"
            );
            assert!(!s.contains("<@123>"), "{s}");
            assert!(!s.contains("[Runbook]"), "{s}");
        }
    }

    /// Chat input echoed back (an unknown command) cannot link or mention.
    #[test]
    fn discord_chat_answers_echo_input_without_links_or_mentions() {
        let echoed = r#"error: unknown command "[Reset your SSO password](https://evil.example/login) @everyone <@123> <#9>""#;
        let v = followup_body(echoed, false);
        let c = v["content"].as_str().unwrap();
        assert!(!c.contains("](") && !c.contains("@everyone"), "{c}");
        assert!(!c.contains("<@") && !c.contains("<#"), "{c}");
        assert_eq!(v["allowed_mentions"]["parse"], serde_json::json!([]));
        assert_eq!(reply_content("**bold** `code`"), "**bold** `code`");
    }

    #[test]
    fn buttons_carry_the_contract_ids() {
        let v =
            serde_json::to_value(create_message(&Message::Alert(Box::new(big_alert(1))))).unwrap();
        let ids: Vec<&str> = v["components"][0]["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "gpuops:ack:7",
                "gpuops:silence:7:1h",
                "gpuops:run:7:gpu-xid"
            ]
        );
        assert_eq!(v["allowed_mentions"]["parse"], serde_json::json!([]), "{v}");
    }

    #[test]
    fn resolved_edit_clears_buttons() {
        let mut m = big_alert(1);
        m.status = GroupStatus::Resolved;
        m.buttons.clear();
        let v = serde_json::to_value(edit_message(&Message::Alert(Box::new(m)))).unwrap();
        assert_eq!(v["components"], serde_json::json!([]));
        assert_eq!(v["embeds"][0]["color"], 0x2EB67D);
    }

    #[test]
    fn approval_request_carries_approve_and_deny_buttons() {
        let t = crate::notify::TextMessage {
            text: "drain needs approval".into(),
            code: None,
            buttons: vec![
                crate::notify::Button::Approve("r0a1b2c".into()),
                crate::notify::Button::Deny("r0a1b2c".into()),
            ],
        };
        let v = serde_json::to_value(edit_message(&Message::Text(t))).unwrap();
        let c = &v["components"][0]["components"];
        assert_eq!(c[0]["custom_id"], "gpuops:approve:r0a1b2c", "{v}");
        assert_eq!(c[1]["custom_id"], "gpuops:deny:r0a1b2c");
    }
}
