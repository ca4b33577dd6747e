//! Notifiers: the [`Notifier`] seam (the platform-neutral message model is
//! `crate::message`, re-exported here),
//! its error kinds (retryable with an optional retry-after, or permanent),
//! and truncation helpers for each platform's limits. The outbox worker that
//! calls them is the top-level `outbox` module; notifiers never import it.
//!
//! Wire formats live only in `slack.rs`, `discord.rs`, `webhook.rs`,
//! `pagerduty.rs`, `email.rs` and `console.rs` (and their `report.rs`
//! children: health reports); `report_lines.rs` turns a report's Markdown
//! lines into each platform's syntax within its limits. Errors leaving a notifier are already redacted: no token,
//! signing secret or webhook URL may appear in them. Nothing here parses
//! AlertManager payloads or touches the store.

pub mod console;
pub mod discord;
pub mod email;
pub mod pagerduty;
pub mod report_lines;
pub mod slack;
pub mod webhook;

use std::time::Duration;

use futures_util::future::BoxFuture;

use serde::{Deserialize, Serialize};

pub use crate::message::{
    Ack, AlertLine, AlertMessage, Button, EscalationStep, GroupStatus, Incident, Message,
    TextMessage, SLACK_ACTION_ACK, SLACK_ACTION_APPROVE, SLACK_ACTION_DENY,
    SLACK_ACTION_RUN_RUNBOOK, SLACK_ACTION_SILENCE_1H,
};

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
    /// A thread reply that notifies again, with the group's current card:
    /// Slack sets `reply_broadcast`, Discord posts a reply that pings
    /// nobody, PagerDuty re-sends `trigger` on the incident's dedup key.
    pub renotify: Option<&'a AlertMessage>,
    /// The PagerDuty incident the group shares with others (None: its own).
    pub incident: Option<Incident>,
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
    fit_lines_counting(lines, max_chars, extra_more, None)
}

/// An alert message's lines (rendered and escaped by the platform) fitted
/// into `max_chars` as [`fit_lines`] does; a multi-node roll-up ends with
/// "… and N more nodes".
pub fn fit_alert_lines(m: &AlertMessage, lines: &[String], max_chars: usize) -> String {
    fit_lines_counting(lines, max_chars, m.truncated_alerts, rollup_unit(m))
}

/// "nodes" when every line of `m` is another node (a storm rolled up).
pub fn rollup_unit(m: &AlertMessage) -> Option<&'static str> {
    let mut nodes: Vec<&str> = m
        .alerts
        .iter()
        .filter_map(AlertLine::node_or_instance)
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    (nodes.len() > 1 && nodes.len() == m.alerts.len()).then_some("nodes")
}

/// The tail of a cut list: "+N more", or "… and N more nodes".
pub fn more_text(n: u64, unit: Option<&str>) -> String {
    match unit {
        Some(u) => format!("… and {n} more {u}"),
        None => format!("+{n} more"),
    }
}

fn fit_lines_counting(
    lines: &[String],
    max_chars: usize,
    extra_more: u64,
    unit: Option<&str>,
) -> String {
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
            let tail = format!(
                "{}{}",
                if out.is_empty() { "" } else { "\n" },
                more_text(more, unit)
            );
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
            "{}{}",
            if out.is_empty() { "" } else { "\n" },
            more_text(extra_more, unit)
        );
        if used + tail.chars().count() <= max_chars {
            out.push_str(&tail);
        }
    }
    out
}

/// One alert's line as plain text, every outside value flattened to one
/// line ([`crate::escape::line`]); each renderer escapes the result for
/// its format.
pub fn alert_line_text(a: &AlertLine) -> String {
    line_text(a, None)
}

/// [`alert_line_text`] within its message: the pod the alert is about
/// (`pod <namespace>/<pod>`, [`AlertMessage::pod_of`]) after the node and
/// device, its labels not repeated as `key=value`.
pub fn alert_line_in(m: &AlertMessage, a: &AlertLine) -> String {
    line_text(a, m.pod_of(a))
}

fn line_text(a: &AlertLine, pod: Option<String>) -> String {
    use crate::escape::line;
    let mut parts: Vec<String> = Vec::new();
    parts.push(if a.firing {
        "🔥".into()
    } else {
        "✅".into()
    });
    let place = a.where_text();
    if let Some(w) = &place {
        parts.push(line(w));
    }
    let device = a
        .device
        .clone()
        .or_else(|| a.gpu.as_ref().map(|g| format!("GPU {g}")));
    if let Some(d) = &device {
        parts.push(line(d));
    }
    let pod_shown = pod.is_some();
    if let Some(p) = pod {
        parts.push(p);
    }
    for (k, v) in a
        .labels
        .iter()
        .filter(|(k, _)| !(pod_shown && crate::message::POD_LABELS.contains(&k.as_str())))
        .take(6)
    {
        parts.push(format!("{}={}", line(k), line(v)));
    }
    if let Some(v) = &a.value {
        parts.push(format!("value {}", line(v)));
    }
    if place.is_none()
        && device.is_none()
        && !pod_shown
        && a.labels.is_empty()
        && !a.name.is_empty()
    {
        parts.push(line(&a.name));
    }
    let mut s = parts.join(" ");
    if let Some(sum) = &a.summary {
        s.push_str(" — ");
        s.push_str(&line(sum));
    }
    if let Some(v) = &a.victim {
        s.push_str(" · OOM victim: ");
        s.push_str(&line(v));
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
        s.push_str(&format!(
            " · acknowledged by {}",
            crate::escape::line(&a.by)
        ));
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
            crate::escape::line(&m.severity)
        )
    } else {
        format!(
            "{} ({}) · severity {}",
            m.tier,
            m.tier.meaning(),
            crate::escape::line(&m.severity)
        )
    }
}

/// A one-line plain summary (notification text, logs, webhook): plain
/// text, one line; each renderer escapes it for its format.
pub fn headline(m: &AlertMessage) -> String {
    let test = if m.is_test { "[TEST] " } else { "" };
    format!(
        "{test}[{}] [{}] {}",
        m.tier,
        status_text(m),
        crate::escape::line(&m.title)
    )
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

#[cfg(test)]
mod hostile_tests;
