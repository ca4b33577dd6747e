//! Email through SMTP (lettre, tokio, rustls): `email = [...]` in a
//! destination, `email:ADDR` escalation targets, and the P4 digest.
//!
//! One thread per (group, address): the first post of a group is a
//! multipart text + HTML mail whose `Message-ID` is derived from the group
//! and the address (`<gpuops.g<group>.<hash>@gpuops>`), so a mail re-sent
//! after a `kill -9` has the same id and threads (or is dropped as a
//! duplicate) instead of starting a second thread. Later mails of the
//! group (its resolve, it firing again, escalation notes) carry
//! `In-Reply-To` and `References` to that id. Edits that do not change
//! whether the group fires (an acknowledgement, one more alert) send
//! nothing; the stored message id says what was last mailed
//! (`<root id>|firing` or `|resolved`). Thread replies are mailed only when
//! they are escalation notes ([`MAILED_REPLY_PREFIX`]); a text posted
//! without a parent (the digest) is its own mail, its first line the subject.
//!
//! SMTP 4xx and network errors are retried by the outbox; 5xx are
//! permanent. Credentials never appear in an error. Health reports (text
//! and HTML with inline charts) are `email/report.rs`.

use std::time::Duration;

use futures_util::future::BoxFuture;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use sha2::Digest as _;

use crate::config::paging::EmailConfig;
use crate::notify::{
    alert_line_in, headline, more_text, rollup_unit, status_text, tier_text, AlertMessage,
    Delivery, Error, GroupStatus, Message, Notifier, Op, Outgoing, PlatformRef, TextMessage,
};

/// Thread replies starting with this are mailed (escalation notes); other
/// replies (runbook output) stay in chat.
pub const MAILED_REPLY_PREFIX: &str = "⏫ Escalation";

pub mod report;

pub struct EmailNotifier {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    password: Option<String>,
}

impl EmailNotifier {
    pub fn new(cfg: &EmailConfig, timeout: Duration) -> anyhow::Result<EmailNotifier> {
        let mut b =
            AsyncSmtpTransport::<Tokio1Executor>::from_url(&cfg.smtp_url)?.timeout(Some(timeout));
        if let Some((user, pass)) = &cfg.credentials {
            b = b.credentials(Credentials::new(user.clone(), pass.expose().to_string()));
        }
        Ok(EmailNotifier {
            transport: b.build(),
            from: cfg.from.parse()?,
            password: cfg
                .credentials
                .as_ref()
                .map(|(_, p)| p.expose().to_string()),
        })
    }
}

impl Notifier for EmailNotifier {
    fn platform(&self) -> &'static str {
        "email"
    }

    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>> {
        Box::pin(async move {
            let r = self.call(out).await;
            match &self.password {
                Some(p) => r.map_err(|e| e.scrubbed(&[p.as_str()])),
                None => r,
            }
        })
    }
}

/// The root `Message-ID` of a group's thread to one address.
pub fn thread_id(group_id: i64, address: &str) -> String {
    let h = sha2::Sha256::digest(address.to_ascii_lowercase().as_bytes());
    format!("<gpuops.g{group_id}.{}@gpuops>", hex::encode(&h[..6]))
}

/// One mail to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Mail {
    pub subject: String,
    pub text: String,
    pub html: String,
    pub message_id: String,
    /// The thread's root (replies only).
    pub in_reply_to: Option<String>,
}

impl EmailNotifier {
    async fn call(&self, out: &Outgoing<'_>) -> Result<Delivery, Error> {
        let to: Mailbox = out
            .channel
            .parse()
            .map_err(|e| Error::permanent(format!("{:?} is not an address: {e}", out.channel)))?;
        if let Message::Report(r) = out.message {
            return report::send(self, out, to, r).await;
        }
        let Some((mail, state)) = plan(out) else {
            let id = match &out.op {
                Op::Edit(p) | Op::Reply(p) => p.message_id.clone(),
                Op::Post => "-".into(),
            };
            return Ok(delivered(out.channel, id));
        };
        let mut b = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.clone())
            .message_id(Some(mail.message_id.clone()));
        if let Some(root) = &mail.in_reply_to {
            b = b.in_reply_to(root.clone()).references(root.clone());
        }
        let msg = b
            .multipart(MultiPart::alternative_plain_html(mail.text, mail.html))
            .map_err(|e| Error::permanent(format!("cannot build the mail: {e}")))?;
        match self.transport.send(msg).await {
            Ok(_) => Ok(delivered(out.channel, state)),
            Err(e) if e.is_permanent() => Err(Error::permanent(format!("smtp: {e}"))),
            Err(e) => Err(Error::retryable(format!("smtp: {e}"))),
        }
    }
}

fn delivered(channel: &str, message_id: String) -> Delivery {
    Delivery {
        message: PlatformRef {
            channel: channel.to_string(),
            message_id,
        },
    }
}

/// What to mail for this call, and the message id to remember; `None`
/// when nothing is mailed.
pub fn plan(out: &Outgoing<'_>) -> Option<(Mail, String)> {
    let fresh = || format!("<gpuops.{:016x}@gpuops>", rand::random::<u64>());
    match (out.message, &out.op) {
        (Message::Alert(m), op) => {
            let root = thread_id(m.group_id, out.channel);
            let now = if m.status == GroupStatus::Resolved {
                "resolved"
            } else {
                "firing"
            };
            let last = match op {
                Op::Edit(p) | Op::Reply(p) => p.message_id.split_once('|').map(|(_, s)| s),
                Op::Post => None,
            };
            match (last, now) {
                (Some(l), n) if l == n => None,
                // A group first seen resolved: nothing to tell.
                (None, "resolved") => None,
                (None, _) => Some((render_alert(m, root.clone(), None), format!("{root}|{now}"))),
                (Some(_), _) => Some((
                    render_alert(m, fresh(), Some(root.clone())),
                    format!("{root}|{now}"),
                )),
            }
        }
        (Message::Text(t), Op::Reply(p)) if t.text.starts_with(MAILED_REPLY_PREFIX) => {
            let root = p.message_id.split('|').next().unwrap_or("").to_string();
            let root = (!root.is_empty()).then_some(root);
            Some((render_text(t, fresh(), root), p.message_id.clone()))
        }
        (Message::Text(_), Op::Reply(_) | Op::Edit(_)) => None,
        // Reports are mailed by `report.rs` (with their charts).
        (Message::Report(_), _) => None,
        (Message::Text(t), Op::Post) => {
            let id = fresh();
            Some((render_text(t, id.clone(), None), id))
        }
    }
}

fn render_alert(m: &AlertMessage, message_id: String, in_reply_to: Option<String>) -> Mail {
    let subject = crate::escape::email_header(&if in_reply_to.is_some() {
        format!("Re: {}", headline(m))
    } else {
        headline(m)
    });
    let title = crate::escape::line(&m.title);
    let summary = m.summary.as_deref().map(crate::escape::line);
    let description = m
        .description
        .as_deref()
        .map(|d| crate::escape::pagerduty(&crate::notify::truncate_chars(d, 4000)));
    let mut text = format!("{title}\n{}\n{}\n", status_text(m), tier_text(m));
    if let Some(s) = &summary {
        text.push_str(&format!("\n{s}\n"));
    }
    if let Some(d) = &description {
        text.push_str(&format!("\n{d}\n"));
    }
    text.push('\n');
    // At most 100 lines of at most 1,000 characters: a mail of bounded size.
    let lines: Vec<String> = m
        .alerts
        .iter()
        .map(|a| crate::notify::truncate_chars(&alert_line_in(m, a), 1000))
        .collect();
    for l in lines.iter().take(100) {
        text.push_str(&format!("- {l}\n"));
    }
    if lines.len() > 100 || m.truncated_alerts > 0 {
        let more = lines.len().saturating_sub(100) as u64 + m.truncated_alerts;
        text.push_str(&format!("{}\n", more_text(more, rollup_unit(m))));
    }
    let links: Vec<(&str, String)> = [
        ("Runbook", &m.runbook_url),
        ("AlertManager", &m.alertmanager_url),
        ("Prometheus", &m.generator_url),
    ]
    .into_iter()
    .filter_map(|(n, u)| u.as_ref().map(|u| (n, crate::escape::line(u))))
    .collect();
    if !links.is_empty() {
        text.push('\n');
        for (n, u) in &links {
            text.push_str(&format!("{n}: {u}\n"));
        }
    }
    let colour = format!("#{:06x}", m.tier.colour());
    let mut html = format!(
        "<html><body><div style=\"border-left:6px solid {colour};padding-left:12px\"><h2>{}</h2><p><b>{}</b><br>{}</p>",
        esc(&title),
        esc(&status_text(m)),
        esc(&tier_text(m))
    );
    if let Some(s) = &summary {
        html.push_str(&format!("<p>{}</p>", esc(s)));
    }
    if let Some(d) = &description {
        html.push_str(&format!("<p>{}</p>", esc(d)));
    }
    html.push_str("<ul>");
    for l in lines.iter().take(100) {
        html.push_str(&format!("<li>{}</li>", esc(l)));
    }
    html.push_str("</ul>");
    if lines.len() > 100 || m.truncated_alerts > 0 {
        let more = lines.len().saturating_sub(100) as u64 + m.truncated_alerts;
        html.push_str(&format!("<p>{}</p>", esc(&more_text(more, rollup_unit(m)))));
    }
    // Only an http(s) URL becomes a link; anything else (`javascript:`)
    // is shown as text.
    for (n, u) in &links {
        match crate::escape::safe_url(u) {
            Some(u) => html.push_str(&format!("<a href=\"{}\">{}</a> ", esc(u), esc(n))),
            None => html.push_str(&format!("{}: {} ", esc(n), esc(u))),
        }
    }
    html.push_str("</div></body></html>");
    Mail {
        subject,
        text,
        html,
        message_id,
        in_reply_to,
    }
}

fn render_text(t: &TextMessage, message_id: String, in_reply_to: Option<String>) -> Mail {
    let mut lines = t.text.lines();
    let first = lines.next().unwrap_or("gpuops").trim().to_string();
    let subject = crate::escape::email_header(&match &in_reply_to {
        Some(_) => format!("Re: {first}"),
        None => first.clone(),
    });
    let mut text = t.text.clone();
    if let Some(c) = &t.code {
        text.push_str(&format!("\n\n{c}\n"));
    }
    let mut html = format!(
        "<html><body><pre style=\"font-family:inherit\">{}</pre>",
        esc(&t.text)
    );
    if let Some(c) = &t.code {
        html.push_str(&format!("<pre>{}</pre>", esc(c)));
    }
    html.push_str("</body></html>");
    Mail {
        subject,
        text,
        html,
        message_id,
        in_reply_to,
    }
}

/// HTML text and attribute values: [`crate::escape::html`].
fn esc(s: &str) -> String {
    crate::escape::html(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{Ack, AlertLine};
    use crate::routing::Tier;

    fn alert(status: GroupStatus, ack: bool) -> Message {
        Message::Alert(Box::new(AlertMessage {
            group_id: 3,
            tier: Tier::P3,
            title: "GpuHot <node>".into(),
            summary: None,
            description: None,
            severity: "warning".into(),
            severity_unknown: false,
            status,
            acknowledged: ack.then(|| Ack {
                by: "bob".into(),
                at: 0.0,
            }),
            alerts: vec![AlertLine {
                firing: true,
                name: "GpuHot".into(),
                instance: Some("n1:9949".into()),
                gpu: None,
                labels: vec![],
                summary: None,
                generator_url: None,
                ..Default::default()
            }],
            truncated_alerts: 0,
            runbook_url: None,
            runbook_id: None,
            generator_url: None,
            alertmanager_url: None,
            buttons: vec![],
            is_test: false,
            common_labels: Default::default(),
            escalation: None,
        }))
    }

    /// Finding 2 (issue 20): `runbook_url: javascript:…` reached the
    /// email's `<a href>`; a label's CRLF reached the Subject.
    #[test]
    fn javascript_runbook_url_is_never_an_email_link() {
        let Message::Alert(mut m) = alert(
            GroupStatus::Firing {
                firing: 1,
                resolved: 0,
            },
            false,
        ) else {
            unreachable!()
        };
        m.runbook_url = Some("javascript:alert(document.cookie)".into());
        m.alertmanager_url = Some("https://am.example/#/alerts".into());
        m.title = "GpuHot\r\nBcc: victim@example.com <img src=x onerror=alert(1)>".into();
        let msg = Message::Alert(m);
        let post = Outgoing {
            channel: "ops@example.com",
            op: Op::Post,
            message: &msg,
            renotify: None,
            incident: None,
        };
        let (mail, _) = plan(&post).unwrap();
        assert!(!mail.html.contains("href=\"javascript"), "{}", mail.html);
        assert!(mail
            .html
            .contains("Runbook: javascript:alert(document.cookie)"));
        assert!(mail
            .html
            .contains("<a href=\"https://am.example/#/alerts\">"));
        assert!(!mail.html.contains("<img"), "{}", mail.html);
        assert!(!mail.subject.contains(['\r', '\n']), "{:?}", mail.subject);
    }

    #[test]
    fn a_group_is_one_thread_and_only_state_changes_are_mailed() {
        let firing = GroupStatus::Firing {
            firing: 1,
            resolved: 0,
        };
        let m = alert(firing, false);
        let post = Outgoing {
            channel: "ops@example.com",
            op: Op::Post,
            message: &m,
            renotify: None,
            incident: None,
        };
        let (mail, id) = plan(&post).unwrap();
        let root = thread_id(3, "ops@example.com");
        assert_eq!(mail.message_id, root);
        assert_eq!(id, format!("{root}|firing"));
        assert!(mail.html.contains("GpuHot &lt;node&gt;"));
        let parent = PlatformRef {
            channel: "ops@example.com".into(),
            message_id: id,
        };
        let acked = alert(firing, true);
        let edit = Outgoing {
            channel: "ops@example.com",
            op: Op::Edit(parent.clone()),
            message: &acked,
            renotify: None,
            incident: None,
        };
        assert!(plan(&edit).is_none(), "an ack is not mailed");
        let resolved = alert(GroupStatus::Resolved, true);
        let edit = Outgoing {
            channel: "ops@example.com",
            op: Op::Edit(parent.clone()),
            message: &resolved,
            renotify: None,
            incident: None,
        };
        let (mail, id) = plan(&edit).unwrap();
        assert_eq!(mail.in_reply_to.as_deref(), Some(root.as_str()));
        assert!(mail.subject.starts_with("Re: "));
        assert_eq!(id, format!("{root}|resolved"));
        let note = Message::Text(TextMessage::new("runbook output", None));
        let reply = Outgoing {
            channel: "ops@example.com",
            op: Op::Reply(parent),
            message: &note,
            renotify: None,
            incident: None,
        };
        assert!(plan(&reply).is_none(), "runbook output stays in chat");
    }
}
