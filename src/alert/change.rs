//! Every change is heard, one fault one page: the thread reply that names
//! what joined or resolved since a group's stored state (decided inside the
//! ingest transaction), the one description of an alert for people
//! ("XID 94 on gpu-node-17 GPU 1"), the resolved reply, and the P1/P2
//! correlation subjects (`instance|gpu`) that let groups about one GPU share
//! a PagerDuty incident. Text only: no I/O.

use std::sync::Arc;

use crate::alert::{device_text, group_title, Alert, Webhook, SHOWN_ELSEWHERE};
use crate::inventory::NodeNames;
use crate::notify::{AlertLine, Message};
use crate::routing::Tier;
use crate::store::{ChangeReply, Correlation, Reply};

/// The thread reply about what changed since the group's previous state:
/// "+2 firing: XID 94 on n1 GPU 1, GPU 6" and "−1 resolved: …". An alert
/// joining an open (firing) group notifies again when `renotify` (the
/// tier's `renotify_tiers`).
/// Nothing for a resolved group (its resolved reply says it) or when the
/// set of firing alerts is the same (a changed annotation, an ack).
pub(super) fn change_reply(
    hook: &Webhook,
    renotify: bool,
    names: NodeNames,
) -> Option<ChangeReply> {
    if hook.status != "firing" {
        return None;
    }
    let new = hook.clone();
    Some(ChangeReply(Arc::new(move |old_state: &str| {
        let old: Webhook = serde_json::from_str(old_state).ok()?;
        let (text, added) = change_text(&old, &new, &names)?;
        let body =
            serde_json::to_string(&Message::Text(crate::notify::TextMessage::new(text, None)))
                .ok()?;
        // Joining an open group notifies again; a resolved group firing
        // again is notified by its own card (PagerDuty: a new `trigger`).
        Some(Reply {
            body,
            renotify: renotify && added > 0 && old.status == "firing",
        })
    })))
}

/// An alert's identity within its group (AlertManager's fingerprint, else
/// its labels).
pub(super) fn alert_id(a: &Alert) -> String {
    if a.fingerprint.is_empty() {
        serde_json::to_string(&a.labels).unwrap_or_default()
    } else {
        a.fingerprint.clone()
    }
}

/// The change between two states of a group, in words, and how many
/// alerts joined; `None` when the firing set is the same.
pub(super) fn change_text(
    old: &Webhook,
    new: &Webhook,
    names: &NodeNames,
) -> Option<(String, usize)> {
    let firing_ids = |w: &Webhook| -> std::collections::BTreeSet<String> {
        w.alerts
            .iter()
            .filter(|a| a.status == "firing")
            .map(alert_id)
            .collect()
    };
    let (was, now) = (firing_ids(old), firing_ids(new));
    let added: Vec<AlertLine> = new
        .alerts
        .iter()
        .filter(|a| a.status == "firing" && !was.contains(&alert_id(a)))
        .map(|a| alert_line_of(a, names))
        .collect();
    let resolved: Vec<AlertLine> = old
        .alerts
        .iter()
        .filter(|a| a.status == "firing" && !now.contains(&alert_id(a)))
        .map(|a| alert_line_of(a, names))
        .collect();
    let mut lines = Vec::new();
    if !added.is_empty() {
        lines.push(format!(
            "🔥 +{} firing: {}",
            added.len(),
            describe_alert_lines(&added)
        ));
    }
    if !resolved.is_empty() {
        lines.push(format!(
            "✅ −{} resolved: {}",
            resolved.len(),
            describe_alert_lines(&resolved)
        ));
    }
    (!lines.is_empty()).then(|| (lines.join("\n"), added.len()))
}

/// The line of one alert for change replies (the labels that tell it apart
/// included, `xid` among them).
pub(super) fn alert_line_of(a: &Alert, names: &NodeNames) -> AlertLine {
    let instance = a.labels.get("instance").cloned();
    AlertLine {
        firing: a.status == "firing",
        name: a.labels.get("alertname").cloned().unwrap_or_default(),
        node: names.name_of(instance.as_deref(), &a.labels),
        device: device_text(&a.labels),
        instance,
        gpu: a.labels.get("gpu").cloned(),
        labels: a
            .labels
            .iter()
            .filter(|(k, _)| !SHOWN_ELSEWHERE.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        summary: a.annotations.get("summary").cloned(),
        generator_url: None,
        value: None,
        victim: None,
    }
}

/// What one alert is about, in words: what happened, where, on which GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSubject {
    /// "XID 94" for an alert with an `xid` label, else the alert's name.
    pub what: String,
    /// The node's name (the inventory's), else its `instance`.
    pub place: Option<String>,
    /// "GPU 1", or the device text ("PCI … (no GPU index)").
    pub gpu: Option<String>,
}

/// The one description of an [`AlertLine`] that change replies use
/// ("XID 94 on gpu-node-17 GPU 1"): what, where, which GPU.
pub fn describe_alert_line(line: &AlertLine) -> AlertSubject {
    let xid = line
        .labels
        .iter()
        .find(|(k, _)| k == "xid")
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty());
    let what = match xid {
        Some(x) => format!("XID {x}"),
        None if line.name.is_empty() => "alert".to_string(),
        None => line.name.clone(),
    };
    AlertSubject {
        what,
        place: line
            .node_or_instance()
            .filter(|p| !p.is_empty())
            .map(str::to_string),
        gpu: match line.gpu.as_deref().map(str::trim) {
            Some(g) if !g.is_empty() => Some(format!("GPU {g}")),
            _ => line.device.clone(),
        },
    }
}

/// Most (what, where) entries a change reply names before "… and N more".
const CHANGE_ENTRIES_MAX: usize = 20;

/// Alerts in words, one entry per (what, where) with its GPUs:
/// "XID 94 on gpu-node-17 GPU 1, GPU 6; GPUDown on gpu-node-3 GPU 0".
pub fn describe_alert_lines(lines: &[AlertLine]) -> String {
    let mut entries: Vec<(String, Option<String>, Vec<String>)> = Vec::new();
    for l in lines {
        let d = describe_alert_line(l);
        let i = match entries
            .iter()
            .position(|(w, p, _)| *w == d.what && *p == d.place)
        {
            Some(i) => i,
            None => {
                entries.push((d.what, d.place, Vec::new()));
                entries.len() - 1
            }
        };
        if let Some(g) = d.gpu {
            if !entries[i].2.contains(&g) {
                entries[i].2.push(g);
            }
        }
    }
    let more = entries.len().saturating_sub(CHANGE_ENTRIES_MAX);
    let mut out: Vec<String> = entries
        .into_iter()
        .take(CHANGE_ENTRIES_MAX)
        .map(|(what, place, gpus)| {
            let mut s = what;
            if let Some(p) = place {
                s.push_str(&format!(" on {p}"));
            }
            if !gpus.is_empty() {
                s.push_str(&format!(" {}", gpus.join(", ")));
            }
            s
        })
        .collect();
    if more > 0 {
        out.push(format!("… and {more} more"));
    }
    out.join("; ")
}

/// One fault, one page: the subjects (`<instance>|<gpu>`) of a firing P1/P2
/// group's alerts, sorted (so replicas lock subject rows in one order).
pub(super) fn correlation(
    hook: &Webhook,
    tier: Tier,
    window: std::time::Duration,
) -> Option<Correlation> {
    if tier > Tier::P2 || hook.status != "firing" || window.is_zero() {
        return None;
    }
    let subjects: std::collections::BTreeSet<String> = hook
        .alerts
        .iter()
        .filter(|a| a.status == "firing")
        .filter_map(|a| {
            let instance = a.labels.get("instance").filter(|v| !v.is_empty())?;
            let gpu = a.labels.get("gpu").filter(|v| !v.is_empty())?;
            Some(format!("{instance}|{gpu}"))
        })
        .collect();
    (!subjects.is_empty()).then(|| Correlation {
        subjects: subjects.into_iter().collect(),
        window_secs: window.as_secs_f64(),
    })
}

/// The thread reply for a resolved group, naming its node(s) by `names`.
pub fn resolved_reply_named(hook: &Webhook, names: &NodeNames) -> String {
    let n = hook.alerts.len();
    format!(
        "✅ Resolved: {} — all {n} alert{} of this group resolved.",
        group_title(hook, names),
        if n == 1 { "" } else { "s" }
    )
}
