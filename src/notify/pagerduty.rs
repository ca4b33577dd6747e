//! PagerDuty Events API v2 (`pagerduty_routing_key` in a destination, and
//! `pagerduty:FILE` escalation targets): one incident per (group,
//! destination).
//!
//! Every call is `POST <api_url>/v2/enqueue` with
//! `{routing_key, event_action, dedup_key, payload?, client, client_url?, links?}`.
//! The first post of a firing group sends `trigger` (with `payload`:
//! `summary` ≤ 1,024 characters, `source`, `severity` from the tier,
//! `component`/`group`/`class` from labels, `custom_details` with every
//! alert's labels, trimmed so the whole event stays under PagerDuty's 512
//! KiB: the first N alerts, measured on the serialized event, then
//! `alerts_not_shown: "… and 1,950 more"`; text through `crate::escape`,
//! `links` only to `http(s)` URLs); later edits send `acknowledge` once the group is
//! acknowledged and `resolve` once it resolves, and nothing when the
//! incident's state did not change. The `dedup_key` is ours and
//! deterministic per (group, destination) (`gpuops/<group>/<destination id>`),
//! so an event re-sent after a `kill -9` lands on the same incident; it is
//! stored as the message id (`<dedup_key>|<last action>`), and every later
//! event carries it with the same routing key. Thread replies are not sent.
//!
//! 202 is success; 400 is permanent (PagerDuty's message and errors); 429
//! and 5xx are retried by the outbox (PagerDuty drops a 429'd event, so
//! the retry must follow). The routing key never appears in an error.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::json;

use crate::notify::{
    alert_line_in, headline, rollup_unit, truncate_chars, AlertLine, AlertMessage, Delivery, Error,
    GroupStatus, Message, Notifier, Op, Outgoing, PlatformRef,
};
use crate::routing::{Routing, Tier};

/// PagerDuty's limit on `payload.summary`.
pub const SUMMARY_MAX: usize = 1024;
/// Alerts (and nodes) listed in `custom_details`; the rest are counted, so
/// a storm of thousands stays far inside the Events API's 512 KB.
pub const MAX_DETAIL_ALERTS: usize = 100;
/// PagerDuty's limit on `dedup_key`.
pub const DEDUP_KEY_MAX: usize = 255;
/// PagerDuty refuses an event larger than 512 KiB (400 "larger than 512
/// KiB"): the whole serialized event must stay under it.
pub const EVENT_MAX_BYTES: usize = 512 * 1024;
/// What [`event`] allows itself (a margin under [`EVENT_MAX_BYTES`]).
pub const EVENT_BUDGET_BYTES: usize = EVENT_MAX_BYTES - 8 * 1024;

pub struct PagerDutyNotifier {
    client: reqwest::Client,
    enqueue_url: String,
    /// `pagerduty_id(key)` → routing key.
    keys: BTreeMap<String, crate::config::Secret>,
}

/// What an incident needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Trigger,
    Acknowledge,
    Resolve,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Trigger => "trigger",
            Action::Acknowledge => "acknowledge",
            Action::Resolve => "resolve",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        match s {
            "trigger" => Some(Action::Trigger),
            "acknowledge" => Some(Action::Acknowledge),
            "resolve" => Some(Action::Resolve),
            _ => None,
        }
    }

    /// The state a group's incident should be in.
    pub fn for_group(m: &AlertMessage) -> Action {
        match (m.status, &m.acknowledged) {
            (GroupStatus::Resolved, _) => Action::Resolve,
            (GroupStatus::Firing { .. }, Some(_)) => Action::Acknowledge,
            (GroupStatus::Firing { .. }, None) => Action::Trigger,
        }
    }
}

/// Our dedup key for (group, destination id).
pub fn dedup_key(group_id: i64, destination_id: &str) -> String {
    truncate_chars(
        &format!("gpuops/{group_id}/{destination_id}"),
        DEDUP_KEY_MAX,
    )
}

/// The event's summary: the headline, and the pod when every alert of the
/// group is about the same one (`… · pod training/llama-ft-7b-0`).
fn summary_line(m: &AlertMessage) -> String {
    let pods: std::collections::BTreeSet<Option<String>> =
        m.alerts.iter().map(|a| m.pod_of(a)).collect();
    match pods.into_iter().collect::<Vec<_>>().as_slice() {
        [Some(p)] => format!("{} · {p}", headline(m)),
        _ => headline(m),
    }
}

/// Events API severity of a tier.
pub fn severity(tier: Tier) -> &'static str {
    match tier {
        Tier::P1 => "critical",
        Tier::P2 => "error",
        Tier::P3 => "warning",
        Tier::P4 => "info",
    }
}

impl PagerDutyNotifier {
    /// `None` when no destination or escalation names a routing key.
    pub fn new(
        routing: &Routing,
        api_url: &str,
        timeout: Duration,
    ) -> anyhow::Result<Option<PagerDutyNotifier>> {
        if routing.pagerduty_keys.is_empty() {
            return Ok(None);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("gpuops/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Some(PagerDutyNotifier {
            client,
            enqueue_url: format!("{}/v2/enqueue", api_url.trim_end_matches('/')),
            keys: routing.pagerduty_keys.clone(),
        }))
    }
}

impl Notifier for PagerDutyNotifier {
    fn platform(&self) -> &'static str {
        "pagerduty"
    }

    fn send<'a>(&'a self, out: &'a Outgoing<'a>) -> BoxFuture<'a, Result<Delivery, Error>> {
        Box::pin(async move {
            let key = self.keys.get(out.channel);
            let result = self.call(out).await;
            match key {
                Some(k) => result.map_err(|e| e.scrubbed(&[k.expose()])),
                None => result,
            }
        })
    }
}

impl PagerDutyNotifier {
    async fn call(&self, out: &Outgoing<'_>) -> Result<Delivery, Error> {
        let Some(key) = self.keys.get(out.channel) else {
            return Err(Error::permanent(format!(
                "pagerduty routing key {} is no longer configured",
                out.channel
            )));
        };
        let m = match out.message {
            Message::Alert(m) => m,
            // Thread replies (runbook output, escalation notes) are chat's;
            // one that notifies again (an alert joined the group) re-sends
            // `trigger` on the open incident, so its details update without
            // a new incident.
            Message::Text(_) | Message::Report(_) => {
                let parent = match &out.op {
                    Op::Reply(p) | Op::Edit(p) => p.message_id.clone(),
                    Op::Post => "-".to_string(),
                };
                if let (Some(card), Some((dedup, last))) = (out.renotify, parent.split_once('|')) {
                    if Action::parse(last) == Some(Action::Trigger)
                        && Action::for_group(card) == Action::Trigger
                    {
                        self.post(&event(key.expose(), Action::Trigger, dedup, card))
                            .await?;
                    }
                }
                return Ok(delivered(out.channel, parent));
            }
        };
        let (dedup, last) = match &out.op {
            Op::Edit(p) | Op::Reply(p) => match p.message_id.split_once('|') {
                Some((d, a)) => (d.to_string(), Action::parse(a)),
                None => (p.message_id.clone(), None),
            },
            // A group correlated with an earlier one about the same GPU
            // pages into that group's incident.
            Op::Post => (
                dedup_key(out.incident.map_or(m.group_id, |i| i.group_id), out.channel),
                None,
            ),
        };
        let want = Action::for_group(m);
        // The incident is shared and another of its groups still fires:
        // this group's end does not end the incident. It is recorded as
        // resolved, so the group firing again re-sends `trigger`.
        if want == Action::Resolve && out.incident.is_some_and(|i| i.others_firing) {
            return Ok(delivered(
                out.channel,
                format!("{dedup}|{}", Action::Resolve.as_str()),
            ));
        }
        let mut sends: Vec<Action> = Vec::new();
        match (last, want) {
            (Some(l), w) if l == w => {}
            // Nothing open and nothing to open.
            (None, Action::Resolve) => {}
            // Acknowledging what was never triggered: open it first.
            (None | Some(Action::Resolve), Action::Acknowledge) => {
                sends.push(Action::Trigger);
                sends.push(Action::Acknowledge);
            }
            (_, w) => sends.push(w),
        }
        for action in &sends {
            let body = event(key.expose(), *action, &dedup, m);
            self.post(&body).await?;
        }
        let state = sends.last().copied().or(last).unwrap_or(want);
        Ok(delivered(
            out.channel,
            format!("{dedup}|{}", state.as_str()),
        ))
    }

    async fn post(&self, body: &serde_json::Value) -> Result<(), Error> {
        let resp = self
            .client
            .post(&self.enqueue_url)
            .json(body)
            .send()
            .await
            .map_err(|e| {
                Error::retryable(format!("pagerduty request failed: {}", e.without_url()))
            })?;
        let status = resp.status().as_u16();
        if status == 202 || status == 200 {
            return Ok(());
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        let text = resp.text().await.unwrap_or_default();
        let detail = match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => {
                let msg = v.get("message").and_then(|m| m.as_str()).unwrap_or("");
                let errors = v
                    .get("errors")
                    .and_then(|e| e.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| e.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .unwrap_or_default();
                format!("{msg}{}{errors}", if errors.is_empty() { "" } else { ": " })
            }
            Err(_) => truncate_chars(&text, 200),
        };
        Err(Error::from_status(
            status,
            retry_after,
            &format!("pagerduty: {}", truncate_chars(&detail, 300)),
        ))
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

/// One Events API v2 event for a group.
pub fn event(
    routing_key: &str,
    action: Action,
    dedup: &str,
    m: &AlertMessage,
) -> serde_json::Value {
    let mut ev = json!({
        "routing_key": routing_key,
        "event_action": action.as_str(),
        "dedup_key": dedup,
    });
    if action != Action::Trigger {
        return ev;
    }
    use crate::escape::{line, pagerduty as plain};
    let label = |k: &str| m.common_labels.get(k).map(|v| line(v));
    // The node by name (resolved into the lines); a roll-up names its count.
    let source = match rollup_unit(m) {
        Some(unit) => format!("{} {unit}", m.alerts.len()),
        None => m
            .alerts
            .iter()
            .find_map(|a| a.node.as_deref().map(line))
            .or_else(|| label("node"))
            .or_else(|| label("instance"))
            .or_else(|| {
                m.alerts
                    .iter()
                    .find_map(|a| a.instance.as_deref().map(line))
            })
            .unwrap_or_else(|| "gpuops".to_string()),
    };
    let common: BTreeMap<String, String> = m
        .common_labels
        .iter()
        .map(|(k, v)| (line(k), line(v)))
        .collect();
    let alerts: Vec<serde_json::Value> = m
        .alerts
        .iter()
        .take(MAX_DETAIL_ALERTS)
        .map(|a| {
            let mut labels: BTreeMap<String, String> = common.clone();
            labels.extend(a.labels.iter().map(|(k, v)| (line(k), line(v))));
            if let Some(i) = &a.instance {
                labels.insert("instance".into(), line(i));
            }
            if !a.name.is_empty() {
                labels.insert("alertname".into(), line(&a.name));
            }
            let mut alert = json!({
                "status": if a.firing { "firing" } else { "resolved" },
                "line": alert_line_in(m, a),
                "labels": labels,
            });
            for (key, value) in [
                ("node", &a.node),
                ("instance", &a.instance),
                ("gpu", &a.device),
                ("oom_victim", &a.victim),
            ] {
                if let Some(v) = value {
                    alert[key] = json!(line(v));
                }
            }
            if let Some(p) = m.pod_of(a) {
                alert["pod"] = json!(p);
            }
            alert
        })
        .collect();
    let mut details = json!({
        "tier": m.tier.as_str(),
        "severity": line(&m.severity),
        "firing": match m.status { GroupStatus::Firing { firing, .. } => firing, GroupStatus::Resolved => 0 },
        "alerts": [],
        "common_labels": common,
        "group_id": m.group_id,
    });
    if let Some(s) = &m.summary {
        details["summary"] = json!(line(s));
    }
    if let Some(d) = &m.description {
        details["description"] = json!(plain(&truncate_chars(d, 4000)));
    }
    if m.truncated_alerts > 0 {
        details["truncated_alerts"] = json!(m.truncated_alerts);
    }
    let nodes: Vec<String> = {
        let mut v: Vec<String> = m
            .alerts
            .iter()
            .filter_map(AlertLine::where_text)
            .map(|w| line(&w))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    if !nodes.is_empty() {
        let shown: Vec<&String> = nodes.iter().take(MAX_DETAIL_ALERTS).collect();
        details["nodes"] = json!(shown);
    }
    let mut payload = json!({
        "summary": truncate_chars(&plain(&summary_line(m)), SUMMARY_MAX),
        "source": truncate_chars(&source, 255),
        "severity": severity(m.tier),
        "custom_details": {},
    });
    for (field, keys) in [
        ("component", &["component", "job", "gpu"][..]),
        ("group", &["cluster", "team", "namespace"][..]),
        ("class", &["alertname"][..]),
    ] {
        if let Some(v) = keys.iter().find_map(|k| label(k)) {
            payload[field] = json!(truncate_chars(&v, 255));
        }
    }
    if payload.get("class").is_none() {
        if let Some(a) = m.alerts.first().filter(|a| !a.name.is_empty()) {
            payload["class"] = json!(truncate_chars(&line(&a.name), 255));
        }
    }
    ev["payload"] = payload;
    ev["client"] = json!("gpuops");
    // Links only to http(s) URLs: a `javascript:` runbook_url is left out
    // (it is in the alert's labels and annotations as text).
    let mut links = Vec::new();
    for (href, text) in [
        (&m.runbook_url, "Runbook"),
        (&m.alertmanager_url, "AlertManager"),
        (&m.generator_url, "Prometheus graph"),
    ] {
        if let Some(h) = href.as_deref().and_then(crate::escape::safe_url) {
            links.push(json!({"href": h, "text": text}));
        }
    }
    if let Some(am) = m
        .alertmanager_url
        .as_deref()
        .and_then(crate::escape::safe_url)
    {
        ev["client_url"] = json!(am);
    }
    if !links.is_empty() {
        ev["links"] = json!(links);
    }
    fit_alerts(&mut ev, details, alerts, m.alerts.len(), rollup_unit(m));
    ev
}

/// Puts `details` with as many of `alerts` as fit into the event's
/// `payload.custom_details`, so the whole event stays within
/// [`EVENT_BUDGET_BYTES`] (measured on the serialized event, not guessed):
/// the first N alerts, then `alerts_not_shown: "… and 1,950 more"` (of
/// `total`, the group's alerts; `unit`: "nodes" for a roll-up).
fn fit_alerts(
    ev: &mut serde_json::Value,
    mut details: serde_json::Value,
    alerts: Vec<serde_json::Value>,
    total: usize,
    unit: Option<&str>,
) {
    let size = |v: &serde_json::Value| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
    // The event without alerts, with the longest note it could carry.
    details["alerts_not_shown"] = json!(more_note(total, unit));
    ev["payload"]["custom_details"] = details.clone();
    let mut base = size(ev);
    if base > EVENT_BUDGET_BYTES {
        // Only oversized common parts can do this: drop them, say so.
        for k in ["description", "common_labels", "summary"] {
            if let Some(o) = details.as_object_mut() {
                o.remove(k);
            }
        }
        details["omitted"] =
            json!("description, common labels and summary: too large for PagerDuty");
        ev["payload"]["custom_details"] = details.clone();
        base = size(ev);
    }
    let mut used = base;
    let mut keep = 0usize;
    for a in &alerts {
        let n = size(a) + 1;
        if used + n > EVENT_BUDGET_BYTES {
            break;
        }
        used += n;
        keep += 1;
    }
    let mut alerts = alerts;
    loop {
        alerts.truncate(keep);
        let shown = alerts.len();
        details["alerts"] = json!(alerts);
        match details.as_object_mut() {
            Some(o) if shown == total => {
                o.remove("alerts_not_shown");
            }
            _ => details["alerts_not_shown"] = json!(more_note(total - shown, unit)),
        }
        ev["payload"]["custom_details"] = details.clone();
        if size(ev) <= EVENT_BUDGET_BYTES || keep == 0 {
            return;
        }
        keep /= 2;
    }
}

/// `… and 1,950 more` (`… and 200 more nodes` with a unit).
fn more_note(n: usize, unit: Option<&str>) -> String {
    let digits = n.to_string();
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match unit {
        Some(u) => format!("… and {grouped} more {u}"),
        None => format!("… and {grouped} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::{Ack, AlertLine};

    fn message(status: GroupStatus, ack: bool) -> AlertMessage {
        AlertMessage {
            group_id: 7,
            tier: Tier::P1,
            title: "GpuXidError".into(),
            summary: Some("x".repeat(3000)),
            description: None,
            severity: "critical".into(),
            severity_unknown: false,
            status,
            acknowledged: ack.then(|| Ack {
                by: "alice".into(),
                at: 0.0,
            }),
            alerts: vec![AlertLine {
                firing: true,
                name: "GpuXidError".into(),
                instance: Some("node-1:9949".into()),
                gpu: Some("0".into()),
                labels: vec![("xid".into(), "79".into())],
                summary: None,
                generator_url: None,
                ..Default::default()
            }],
            truncated_alerts: 0,
            runbook_url: Some("https://wiki.example/xid".into()),
            runbook_id: None,
            generator_url: None,
            alertmanager_url: Some("http://am:9093".into()),
            buttons: vec![],
            is_test: false,
            common_labels: BTreeMap::from([
                ("alertname".to_string(), "GpuXidError".to_string()),
                ("cluster".to_string(), "a100".to_string()),
            ]),
            escalation: None,
        }
    }

    #[test]
    fn trigger_carries_a_bounded_summary_severity_and_labels() {
        let mut m = message(
            GroupStatus::Firing {
                firing: 1,
                resolved: 0,
            },
            false,
        );
        m.title = "t".repeat(5000);
        let ev = event("k".repeat(32).as_str(), Action::Trigger, "gpuops/7/abc", &m);
        assert_eq!(ev["event_action"], "trigger");
        assert_eq!(ev["payload"]["severity"], "critical");
        assert_eq!(ev["payload"]["source"], "node-1:9949");
        assert_eq!(ev["payload"]["group"], "a100");
        assert_eq!(ev["payload"]["class"], "GpuXidError");
        let summary = ev["payload"]["summary"].as_str().unwrap();
        assert_eq!(summary.chars().count(), SUMMARY_MAX);
        assert_eq!(
            ev["payload"]["custom_details"]["alerts"][0]["labels"]["xid"],
            "79"
        );
        assert_eq!(ev["links"][0]["href"], "https://wiki.example/xid");
        let ack = event("k", Action::Acknowledge, "d", &m);
        assert!(ack.get("payload").is_none());
    }

    /// The listed alerts are capped at [`MAX_DETAIL_ALERTS`]; alerts with
    /// large labels are then cut by measured size, so even 100 of them never
    /// make PagerDuty refuse the event.
    #[test]
    fn alerts_with_large_labels_are_cut_by_measured_size() {
        let mut m = message(
            GroupStatus::Firing {
                firing: 100,
                resolved: 0,
            },
            false,
        );
        m.alerts = (0..100)
            .map(|i| AlertLine {
                firing: true,
                name: "GpuXidError".into(),
                instance: Some(format!("n{i}:9949")),
                labels: (0..16)
                    .map(|k| (format!("label_{k}"), "v".repeat(1000)))
                    .collect(),
                ..AlertLine::default()
            })
            .collect();
        let ev = event(&"k".repeat(32), Action::Trigger, "gpuops/7/abc", &m);
        let bytes = serde_json::to_vec(&ev).unwrap().len();
        assert!(bytes <= EVENT_MAX_BYTES, "{bytes} bytes");
        let details = &ev["payload"]["custom_details"];
        let shown = details["alerts"].as_array().unwrap().len();
        assert!((1..100).contains(&shown), "{shown}");
        assert_eq!(
            details["alerts_not_shown"],
            format!("… and {} more nodes", 100 - shown)
        );
    }

    /// Finding 3 (issue 20): a 2,000-alert P1 group became a 685 KB event
    /// that PagerDuty refused (400, larger than 512 KiB): nobody was paged.
    #[test]
    fn a_2000_alert_p1_group_event_fits_512_kib() {
        let mut m = message(
            GroupStatus::Firing {
                firing: 2000,
                resolved: 0,
            },
            false,
        );
        m.alerts = (0..2000)
            .map(|i| AlertLine {
                firing: true,
                name: "GpuXidError".into(),
                instance: Some(format!("gpu-node-{i:04}.cluster.example:9949")),
                gpu: Some((i % 8).to_string()),
                labels: vec![
                    ("xid".into(), "79".into()),
                    (
                        "uuid".into(),
                        format!("GPU-{i:08x}-1111-2222-3333-444455556666"),
                    ),
                    (
                        "pci_bus_id".into(),
                        format!("00000000:{:02X}:00.0", i % 256),
                    ),
                    ("job".into(), "gpuops-agent".into()),
                ],
                summary: Some(format!(
                    "GPU {} on gpu-node-{i:04} has fallen off the bus",
                    i % 8
                )),
                generator_url: None,
                ..AlertLine::default()
            })
            .collect();
        let ev = event(&"k".repeat(32), Action::Trigger, "gpuops/7/abc", &m);
        let bytes = serde_json::to_vec(&ev).unwrap().len();
        assert!(bytes <= EVENT_MAX_BYTES, "{bytes} bytes");
        let details = &ev["payload"]["custom_details"];
        let shown = details["alerts"].as_array().unwrap().len();
        assert!((100..2000).contains(&shown), "{shown}");
        // A roll-up of 2,000 nodes counts what it leaves out in nodes.
        assert_eq!(
            details["alerts_not_shown"],
            format!("… and {} more nodes", fmt_thousands(2000 - shown))
        );
        assert_eq!(details["firing"], 2000);
        eprintln!("2,000-alert event: {bytes} bytes, {shown} alerts shown");
        // A small group is sent whole, with no note.
        m.alerts.truncate(3);
        let ev = event(&"k".repeat(32), Action::Trigger, "gpuops/7/abc", &m);
        assert_eq!(
            ev["payload"]["custom_details"]["alerts"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert!(ev["payload"]["custom_details"]
            .get("alerts_not_shown")
            .is_none());
    }

    fn fmt_thousands(n: usize) -> String {
        more_note(n, None)
            .trim_start_matches("… and ")
            .trim_end_matches(" more")
            .to_string()
    }

    /// Finding 2 (issue 20): `runbook_url: javascript:…` reached the
    /// event's `links`; labels' control characters reached its text.
    #[test]
    fn javascript_runbook_url_is_never_a_pagerduty_link() {
        let mut m = message(
            GroupStatus::Firing {
                firing: 1,
                resolved: 0,
            },
            false,
        );
        m.runbook_url = Some("javascript:alert(document.cookie)".into());
        m.alertmanager_url = Some("data:text/html,x".into());
        m.title = "Gpu\r\nHot\u{1b}[31m".into();
        let ev = event(&"k".repeat(32), Action::Trigger, "gpuops/7/abc", &m);
        assert!(ev.get("links").is_none(), "{}", ev["links"]);
        assert!(ev.get("client_url").is_none());
        let summary = ev["payload"]["summary"].as_str().unwrap();
        assert!(!summary.contains(['\r', '\n', '\u{1b}']), "{summary:?}");
        assert_eq!(more_note(1950, None), "… and 1,950 more");
        assert_eq!(more_note(12, None), "… and 12 more");
        assert_eq!(more_note(1_234_567, None), "… and 1,234,567 more");
    }

    #[test]
    fn the_incident_follows_the_group() {
        let firing = GroupStatus::Firing {
            firing: 1,
            resolved: 0,
        };
        assert_eq!(Action::for_group(&message(firing, false)), Action::Trigger);
        assert_eq!(
            Action::for_group(&message(firing, true)),
            Action::Acknowledge
        );
        assert_eq!(
            Action::for_group(&message(GroupStatus::Resolved, true)),
            Action::Resolve
        );
        assert_eq!(dedup_key(7, "0a1b2c3d4e5f"), "gpuops/7/0a1b2c3d4e5f");
    }
}
