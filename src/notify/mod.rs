//! Notifiers: the platform-neutral message model, the [`Notifier`] seam,
//! its error kinds (retryable with an optional retry-after, or permanent),
//! truncation helpers for each platform's limits, and the outbox worker.
//!
//! Wire formats live only in `slack.rs`, `discord.rs`, `webhook.rs`,
//! `pagerduty.rs`, `email.rs` and `console.rs`. Errors leaving a notifier are already redacted: no token,
//! signing secret or webhook URL may appear in them. Nothing here parses
//! AlertManager payloads or touches the store directly except `outbox.rs`.

pub mod console;
pub mod discord;
pub mod email;
pub mod outbox;
pub mod pagerduty;
pub mod slack;
pub mod webhook;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::routing::Tier;

pub use outbox::Outbox;

/// Slack block-action ids of the alert buttons (the chat role handles them).
pub const SLACK_ACTION_ACK: &str = "gpuops_ack";
pub const SLACK_ACTION_SILENCE_1H: &str = "gpuops_silence_1h";
pub const SLACK_ACTION_RUN_RUNBOOK: &str = "gpuops_run_runbook";
/// Slack block-action ids of the Approve / Deny buttons on an approval
/// request (value: the run id).
pub const SLACK_ACTION_APPROVE: &str = "gpuops_approve";
pub const SLACK_ACTION_DENY: &str = "gpuops_deny";

/// What a message is: an alert group's card, or a text (thread replies,
/// runbook output).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Alert(Box<AlertMessage>),
    Text(TextMessage),
}

/// A plain message with an optional code block (runbook step output) and
/// optional buttons (Approve / Deny on an approval request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextMessage {
    pub text: String,
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub buttons: Vec<Button>,
}

impl TextMessage {
    pub fn new(text: impl Into<String>, code: Option<String>) -> TextMessage {
        TextMessage {
            text: text.into(),
            code,
            buttons: Vec::new(),
        }
    }
}

/// One alert group as a responder should see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertMessage {
    /// The store's id of the group (button values carry it).
    pub group_id: i64,
    pub tier: Tier,
    pub title: String,
    pub summary: Option<String>,
    pub description: Option<String>,
    /// The severity label value(s) as sent.
    pub severity: String,
    /// The severity was missing or not mapped: `tier` is the default tier.
    pub severity_unknown: bool,
    pub status: GroupStatus,
    pub acknowledged: Option<Ack>,
    pub alerts: Vec<AlertLine>,
    /// Alerts AlertManager left out of the payload (`truncatedAlerts`).
    pub truncated_alerts: u64,
    pub runbook_url: Option<String>,
    /// A runbook id (`runbooks/<id>.yaml`) suggested for this group.
    pub runbook_id: Option<String>,
    /// Prometheus graph link of the first alert.
    pub generator_url: Option<String>,
    pub alertmanager_url: Option<String>,
    pub buttons: Vec<Button>,
    /// The start-up self test: labelled as such everywhere.
    pub is_test: bool,
    /// Labels every alert of the group shares (PagerDuty's
    /// `component`/`group`/`class` and `custom_details`).
    #[serde(default)]
    pub common_labels: std::collections::BTreeMap<String, String>,
    /// How far the group has escalated (none: not escalated).
    #[serde(default)]
    pub escalation: Option<EscalationStep>,
}

/// An escalation step reached: `step` of `of` (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscalationStep {
    pub step: u32,
    pub of: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupStatus {
    Firing { firing: usize, resolved: usize },
    Resolved,
}

/// Who acknowledged a group and when (Unix seconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub by: String,
    pub at: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertLine {
    pub firing: bool,
    pub name: String,
    pub instance: Option<String>,
    pub gpu: Option<String>,
    /// Labels that tell this alert apart (not shared by the group).
    pub labels: Vec<(String, String)>,
    pub summary: Option<String>,
    pub generator_url: Option<String>,
}

/// Buttons on an alert message. Their wire ids are a contract with the chat
/// role: Slack `action_id`s [`SLACK_ACTION_ACK`], [`SLACK_ACTION_SILENCE_1H`],
/// [`SLACK_ACTION_RUN_RUNBOOK`] with `value` `<group_id>` or
/// `<group_id>|<runbook_id>`; Discord `custom_id`s `gpuops:ack:<group_id>`,
/// `gpuops:silence:<group_id>:1h`, `gpuops:run:<group_id>:<runbook_id>`.
/// On an approval request: [`SLACK_ACTION_APPROVE`] / [`SLACK_ACTION_DENY`]
/// with `value` `<run_id>`; Discord `gpuops:approve:<run_id>`,
/// `gpuops:deny:<run_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Button {
    Acknowledge,
    Silence1h,
    RunRunbook(String),
    /// Approve the step run `.0` waits on.
    Approve(String),
    /// Deny the step run `.0` waits on.
    Deny(String),
}

impl Button {
    pub fn label(&self) -> String {
        match self {
            Button::Acknowledge => "Acknowledge".into(),
            Button::Silence1h => "Silence 1h".into(),
            Button::RunRunbook(id) => format!("Run runbook {id}"),
            Button::Approve(_) => "Approve".into(),
            Button::Deny(_) => "Deny".into(),
        }
    }

    /// Slack `(action_id, value)`.
    pub fn slack_action(&self, group_id: i64) -> (&'static str, String) {
        match self {
            Button::Acknowledge => (SLACK_ACTION_ACK, group_id.to_string()),
            Button::Silence1h => (SLACK_ACTION_SILENCE_1H, group_id.to_string()),
            Button::RunRunbook(id) => (SLACK_ACTION_RUN_RUNBOOK, format!("{group_id}|{id}")),
            Button::Approve(run) => (SLACK_ACTION_APPROVE, run.clone()),
            Button::Deny(run) => (SLACK_ACTION_DENY, run.clone()),
        }
    }

    /// Discord `custom_id`.
    pub fn discord_custom_id(&self, group_id: i64) -> String {
        match self {
            Button::Acknowledge => format!("gpuops:ack:{group_id}"),
            Button::Silence1h => format!("gpuops:silence:{group_id}:1h"),
            Button::RunRunbook(id) => format!("gpuops:run:{group_id}:{id}"),
            Button::Approve(run) => format!("gpuops:approve:{run}"),
            Button::Deny(run) => format!("gpuops:deny:{run}"),
        }
    }
}

/// A message's address on a platform: where it was posted and its id
/// (Slack `ts`, Discord message id), plus the thread it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformRef {
    pub channel: String,
    pub message_id: String,
}

/// What to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A new message in `channel`.
    Post,
    /// Edit a message posted before.
    Edit(PlatformRef),
    /// A reply in the thread of a message posted before.
    Reply(PlatformRef),
}

/// One call a notifier makes.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Slack channel id, Discord channel id, or empty (webhook, console).
    pub channel: &'a str,
    pub op: Op,
    pub message: &'a Message,
}

/// A successful call: the message's address (for later edits and replies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub message: PlatformRef,
}

/// Why a call failed. Reasons are redacted before they are built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Worth retrying: 429 (with the platform's delay), 5xx, network.
    #[error("retryable: {reason}")]
    Retryable {
        retry_after: Option<Duration>,
        reason: String,
    },
    /// Retrying will not help: the platform's error (e.g. `channel_not_found`).
    #[error("permanent: {reason}")]
    Permanent { reason: String },
    /// The message to edit or reply to no longer exists on the platform
    /// (deleted by someone): post a new one instead.
    #[error("message gone: {reason}")]
    MessageGone { reason: String },
}

impl Error {
    pub fn retryable(reason: impl AsRef<str>) -> Error {
        Error::Retryable {
            retry_after: None,
            reason: crate::telemetry::redact(reason.as_ref()),
        }
    }

    pub fn rate_limited(retry_after: Option<Duration>, reason: impl AsRef<str>) -> Error {
        Error::Retryable {
            retry_after,
            reason: crate::telemetry::redact(reason.as_ref()),
        }
    }

    pub fn permanent(reason: impl AsRef<str>) -> Error {
        Error::Permanent {
            reason: crate::telemetry::redact(reason.as_ref()),
        }
    }

    /// Classifies an HTTP status (no platform detail).
    pub fn from_status(status: u16, retry_after: Option<Duration>, detail: &str) -> Error {
        match status {
            429 => Error::rate_limited(retry_after, format!("HTTP 429: {detail}")),
            408 | 425 | 500..=599 => Error::retryable(format!("HTTP {status}: {detail}")),
            _ => Error::permanent(format!("HTTP {status}: {detail}")),
        }
    }
}

/// Replaces every occurrence of each secret (of 4+ characters) in `text`
/// with `<redacted>`. Notifiers pass their own credentials, so a platform
/// that echoes a token back cannot leak it through an error or a log line.
pub fn scrub(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.len() >= 4 && out.contains(s) {
            out = out.replace(s, "<redacted>");
        }
    }
    out
}

impl Error {
    /// The same error with `secrets` scrubbed from its reason.
    pub fn scrubbed(self, secrets: &[&str]) -> Error {
        match self {
            Error::Retryable {
                retry_after,
                reason,
            } => Error::Retryable {
                retry_after,
                reason: scrub(&reason, secrets),
            },
            Error::Permanent { reason } => Error::Permanent {
                reason: scrub(&reason, secrets),
            },
            Error::MessageGone { reason } => Error::MessageGone {
                reason: scrub(&reason, secrets),
            },
        }
    }
}

/// A boxed future (the trait is used as `dyn Notifier`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One chat platform (or sink). Implementations hold their clients and
/// secrets; they never log a secret and never put one in an [`Error`].
pub trait Notifier: Send + Sync {
    /// `slack`, `discord`, `webhook`, `console` (metrics label).
    fn platform(&self) -> &'static str;
    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>>;
}

/// Cuts `s` to at most `max` characters (not bytes), ending with `…` when cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    if max == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// Joins `lines` with newlines into at most `max_chars`, keeping whole
/// lines; when some do not fit the last line says `+N more`. `extra_more`
/// adds items that were never in `lines` (e.g. AlertManager's truncated ones).
pub fn fit_lines(lines: &[String], max_chars: usize, extra_more: u64) -> String {
    let total = lines.len() as u64 + extra_more;
    let mut out = String::new();
    let mut used = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let remaining_after = total - (i as u64 + 1);
        let line = truncate_chars(line, max_chars.min(1000));
        let need = line.chars().count() + usize::from(i > 0);
        // Reserve room for a "+N more" line unless this is the last item.
        let reserve = if remaining_after > 0 { 24 } else { 0 };
        if used + need + reserve > max_chars {
            let more = total - i as u64;
            let tail = format!("{}+{more} more", if out.is_empty() { "" } else { "\n" });
            out.push_str(&tail);
            return out;
        }
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&line);
        used += need;
    }
    if extra_more > 0 {
        let tail = format!(
            "{}+{extra_more} more",
            if out.is_empty() { "" } else { "\n" }
        );
        if used + tail.chars().count() <= max_chars {
            out.push_str(&tail);
        }
    }
    out
}

/// One alert's line as plain text with light markdown (`*bold*` is left to
/// the caller), shared by the renderers.
pub fn alert_line_text(a: &AlertLine) -> String {
    let mut parts: Vec<String> = Vec::new();
    parts.push(if a.firing {
        "🔥".into()
    } else {
        "✅".into()
    });
    if let Some(i) = &a.instance {
        parts.push(i.clone());
    }
    if let Some(g) = &a.gpu {
        parts.push(format!("gpu={g}"));
    }
    for (k, v) in a.labels.iter().take(6) {
        parts.push(format!("{k}={v}"));
    }
    if a.instance.is_none() && a.gpu.is_none() && a.labels.is_empty() && !a.name.is_empty() {
        parts.push(a.name.clone());
    }
    let mut s = parts.join(" ");
    if let Some(sum) = &a.summary {
        s.push_str(" — ");
        s.push_str(sum);
    }
    s
}

/// The status line: `FIRING 3 (1 resolved)`, `RESOLVED`, plus the ack.
pub fn status_text(m: &AlertMessage) -> String {
    let mut s = match m.status {
        GroupStatus::Firing {
            firing,
            resolved: 0,
        } => format!("FIRING {firing}"),
        GroupStatus::Firing { firing, resolved } => {
            format!("FIRING {firing} ({resolved} resolved)")
        }
        GroupStatus::Resolved => "RESOLVED".to_string(),
    };
    if let Some(a) = &m.acknowledged {
        s.push_str(&format!(" · acknowledged by {}", a.by));
        if let Some(t) = chrono::DateTime::from_timestamp(a.at as i64, 0) {
            s.push_str(&t.format(" at %H:%M UTC").to_string());
        }
    }
    if let Some(e) = &m.escalation {
        s.push_str(&format!(" · escalated (step {} of {})", e.step, e.of));
    }
    s
}

/// The tier line, with the unknown-severity flag when it applies.
pub fn tier_text(m: &AlertMessage) -> String {
    if m.severity_unknown {
        format!(
            "{} ({}) · ⚠ unknown severity {:?}: routed to the default tier",
            m.tier,
            m.tier.meaning(),
            m.severity
        )
    } else {
        format!(
            "{} ({}) · severity {}",
            m.tier,
            m.tier.meaning(),
            m.severity
        )
    }
}

/// A one-line plain summary (notification text, logs, webhook).
pub fn headline(m: &AlertMessage) -> String {
    let test = if m.is_test { "[TEST] " } else { "" };
    format!("{test}[{}] [{}] {}", m.tier, status_text(m), m.title)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_counts_characters_not_bytes() {
        assert_eq!(truncate_chars("héllo", 5), "héllo");
        assert_eq!(truncate_chars("héllo wörld", 5), "héll…");
        assert_eq!(truncate_chars("x", 0), "");
    }

    #[test]
    fn fit_lines_keeps_whole_lines_and_counts_the_rest() {
        let lines: Vec<String> = (0..100).map(|i| format!("alert number {i:03}")).collect();
        let out = fit_lines(&lines, 200, 0);
        assert!(out.chars().count() <= 200, "{}", out.len());
        let kept = out.lines().filter(|l| l.starts_with("alert")).count();
        assert_eq!(out.lines().last().unwrap(), format!("+{} more", 100 - kept));
        assert_eq!(
            fit_lines(&lines[..2], 200, 0),
            "alert number 000\nalert number 001"
        );
        assert_eq!(fit_lines(&lines[..1], 200, 5), "alert number 000\n+5 more");
    }

    #[test]
    fn button_ids_follow_the_contract() {
        assert_eq!(
            Button::Approve("r0a1b2c".into()).slack_action(7),
            (SLACK_ACTION_APPROVE, "r0a1b2c".to_string())
        );
        assert_eq!(
            Button::Deny("r0a1b2c".into()).discord_custom_id(7),
            "gpuops:deny:r0a1b2c"
        );
        let b = Button::RunRunbook("gpu-xid".into());
        assert_eq!(
            b.slack_action(7),
            ("gpuops_run_runbook", "7|gpu-xid".into())
        );
        assert_eq!(b.discord_custom_id(7), "gpuops:run:7:gpu-xid");
        assert_eq!(
            Button::Acknowledge.slack_action(7),
            ("gpuops_ack", "7".into())
        );
        assert_eq!(Button::Acknowledge.discord_custom_id(7), "gpuops:ack:7");
        assert_eq!(
            Button::Silence1h.slack_action(7),
            ("gpuops_silence_1h", "7".into())
        );
        assert_eq!(
            Button::Silence1h.discord_custom_id(7),
            "gpuops:silence:7:1h"
        );
    }

    #[test]
    fn errors_are_redacted_and_classified() {
        let e = Error::from_status(500, None, "token=abc xoxb-1-2-secret");
        assert!(matches!(e, Error::Retryable { .. }));
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(matches!(
            Error::from_status(404, None, "x"),
            Error::Permanent { .. }
        ));
        assert!(matches!(
            Error::from_status(429, Some(Duration::from_secs(3)), "x"),
            Error::Retryable {
                retry_after: Some(_),
                ..
            }
        ));
    }
}
