//! AlertManager's webhook payload (version 4), its receiver route
//! `POST /alertmanager`, and the alert-group → [`AlertMessage`] rendering.
//!
//! Parsing is tolerant (unknown fields are ignored; new ones keep arriving)
//! but the fields we rely on are checked, and a bad payload is answered 400
//! with what is wrong; a body that is not `application/json` is answered
//! 415 and not read. The route answers 200 only after the payload is
//! committed to the store. This module talks to no chat platform.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::bot::state::BotState;
use crate::inventory::{Identity, NodeNames, OomKill};
use crate::notify::{AlertLine, AlertMessage, Button, GroupStatus, Message};
use crate::routing::{Routing, Tier};
use crate::store::{GroupRecord, GroupUpdate, IngestResult};

mod change;
#[cfg(test)]
use change::{alert_line_of, change_text};
use change::{change_reply, correlation};
pub use change::{describe_alert_line, describe_alert_lines, resolved_reply_named, AlertSubject};

/// One AlertManager notification: one alert group's current state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    #[serde(default)]
    pub version: String,
    pub group_key: String,
    #[serde(default)]
    pub truncated_alerts: u64,
    pub status: String,
    #[serde(default)]
    pub receiver: String,
    #[serde(default)]
    pub group_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub common_annotations: BTreeMap<String, String>,
    #[serde(rename = "externalURL", default)]
    pub external_url: String,
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub starts_at: String,
    #[serde(default)]
    pub ends_at: String,
    #[serde(rename = "generatorURL", default)]
    pub generator_url: String,
    #[serde(default)]
    pub fingerprint: String,
}

/// Why a payload was refused (the 400 body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PayloadError(pub String);

impl Webhook {
    /// Parses and checks a webhook body.
    pub fn parse(body: &[u8]) -> Result<Webhook, PayloadError> {
        let w: Webhook = serde_json::from_slice(body)
            .map_err(|e| PayloadError(format!("invalid AlertManager webhook JSON: {e}")))?;
        w.check()?;
        Ok(w)
    }

    fn check(&self) -> Result<(), PayloadError> {
        if !self.version.is_empty() && self.version != "4" {
            tracing::debug!(version = %self.version, "webhook version is not 4; parsing anyway");
        }
        if self.group_key.trim().is_empty() {
            return Err(PayloadError("groupKey must not be empty".into()));
        }
        if !matches!(self.status.as_str(), "firing" | "resolved") {
            return Err(PayloadError(format!(
                "status must be \"firing\" or \"resolved\", got {:?}",
                self.status
            )));
        }
        if self.alerts.is_empty() {
            return Err(PayloadError("alerts must not be empty".into()));
        }
        for (i, a) in self.alerts.iter().enumerate() {
            if !matches!(a.status.as_str(), "firing" | "resolved") {
                return Err(PayloadError(format!(
                    "alerts[{i}].status must be \"firing\" or \"resolved\", got {:?}",
                    a.status
                )));
            }
        }
        Ok(())
    }

    /// A hash of what a responder sees: group status and, per alert, its
    /// identity, status, start and annotations. Two AlertManager replicas
    /// sending the same state give the same hash; `endsAt` (which differs
    /// between replicas for firing alerts) is left out.
    pub fn state_hash(&self) -> String {
        let mut alerts: Vec<String> = self
            .alerts
            .iter()
            .map(|a| {
                let id = if a.fingerprint.is_empty() {
                    serde_json::to_string(&a.labels).unwrap_or_default()
                } else {
                    a.fingerprint.clone()
                };
                let ann = serde_json::to_string(&a.annotations).unwrap_or_default();
                format!("{id}\u{1f}{}\u{1f}{}\u{1f}{ann}", a.status, a.starts_at)
            })
            .collect();
        alerts.sort();
        let mut h = sha2::Sha256::new();
        h.update(self.status.as_bytes());
        h.update(self.truncated_alerts.to_le_bytes());
        for a in &alerts {
            h.update([0x1e]);
            h.update(a.as_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }

    /// Labels shared by the group (common ∪ group labels).
    pub fn shared_labels(&self) -> BTreeMap<String, String> {
        let mut l = self.common_labels.clone();
        for (k, v) in &self.group_labels {
            l.entry(k.clone()).or_insert_with(|| v.clone());
        }
        l
    }

    pub fn firing(&self) -> usize {
        self.alerts.iter().filter(|a| a.status == "firing").count()
    }
}

/// Ingests one parsed webhook: classify, route, store (one transaction).
/// Shared by the HTTP route and the start-up test alert.
pub async fn ingest(
    state: &BotState,
    raw: String,
    hook: &Webhook,
) -> Result<IngestResult, crate::store::Error> {
    let routing = &state.config.routing;
    let class = routing.classify_group(
        hook.alerts
            .iter()
            .map(|a| a.labels.get("severity").map(String::as_str)),
    );
    let targets = routing.targets(class.tier, &hook.shared_labels());
    if targets.is_empty() {
        tracing::warn!(
            group_key = %hook.group_key,
            tier = %class.tier,
            "no destination is configured for this tier; the alert is stored but not posted"
        );
    }
    // Names as last read: the webhook's answer never waits on Prometheus.
    let names = state.identity.known_names().await;
    let update = GroupUpdate {
        group_key: hook.group_key.clone(),
        receiver: hook.receiver.clone(),
        status: hook.status.clone(),
        tier: class.tier.as_str().to_string(),
        state_hash: hook.state_hash(),
        state: serde_json::to_string(hook).unwrap_or_default(),
        destinations: targets.iter().map(|t| t.key()).collect(),
        resolved_reply: resolved_reply_named(hook, &names),
        change: change_reply(hook, routing.renotifies(class.tier), names),
        correlate: correlation(hook, class.tier, routing.correlation_window),
    };
    let result = state.store.ingest(raw, update).await?;
    for a in &hook.alerts {
        let tier = routing
            .classify(a.labels.get("severity").map(String::as_str))
            .tier;
        state
            .metrics
            .alerts_received
            .with_label_values(&[a.status.as_str(), tier.as_str()])
            .inc();
    }
    if result.enqueued > 0 {
        state.outbox.wake();
    }
    Ok(result)
}

/// `POST /alertmanager`.
pub async fn receive(
    State(state): State<Arc<BotState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(token) = &state.config.server.webhook_token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), token.expose().as_bytes()) {
            tracing::warn!("webhook refused: missing or wrong bearer token");
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    if !is_json_content_type(&headers) {
        tracing::warn!(
            content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none"),
            "webhook refused: not application/json"
        );
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json (AlertManager's webhook format)",
        );
    }
    let hook = match Webhook::parse(&body) {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, bytes = body.len(), "webhook refused");
            return error(StatusCode::BAD_REQUEST, &e.0);
        }
    };
    let raw = String::from_utf8_lossy(&body).into_owned();
    match ingest(&state, raw, &hook).await {
        Ok(r) => {
            tracing::debug!(
                group_key = %hook.group_key,
                group_id = r.group_id,
                duplicate = r.duplicate,
                enqueued = r.enqueued,
                "webhook stored"
            );
            (
                StatusCode::OK,
                Json(serde_json::json!({
                    "status": "stored",
                    "group_id": r.group_id,
                    "duplicate": r.duplicate,
                    "deliveries": r.enqueued,
                })),
            )
                .into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store webhook; AlertManager will retry");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot store the webhook; retry later",
            )
        }
    }
}

/// `application/json`, in any case, with optional parameters; a `charset`
/// parameter must say UTF-8 (the body is read as UTF-8).
pub fn is_json_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or("").trim();
    media.eq_ignore_ascii_case("application/json")
        && parts.all(|p| match p.split_once('=') {
            Some((k, v)) if k.trim().eq_ignore_ascii_case("charset") => {
                let v = v.trim().trim_matches('"');
                v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")
            }
            _ => true,
        })
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// Compares secrets without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Picks a runbook id for a group (the chat role matches runbook triggers).
pub type RunbookSuggester = Arc<dyn Fn(&Webhook) -> Option<String> + Send + Sync>;

/// What the renderer may add beyond the payload.
#[derive(Clone, Default)]
pub struct Links {
    /// Base URL of AlertManager (`[alertmanager] url`) for the link.
    pub alertmanager: Option<String>,
    /// Consulted when no annotation or label names a runbook id.
    pub suggest_runbook: Option<RunbookSuggester>,
    /// The one instance → node-name map (the inventory's); resolved here,
    /// once, and carried in each [`AlertLine`].
    pub names: NodeNames,
    /// OOM kills per instance from the agents' `/v1/events` (or why they
    /// are unknown), for OOM alerts' victims; see [`identity_links`].
    pub oom_kills: HashMap<String, Result<Vec<OomKill>, String>>,
}

/// `links` with the node names and, for a group's firing OOM alerts on the
/// inventory's nodes, the OOM victims filled in from `identity` (bounded by
/// [`crate::inventory::VICTIMS_DEADLINE`], cached). The outbox worker and
/// the chat handlers call this before [`render_group`].
pub async fn identity_links(identity: &Identity, group: &GroupRecord, mut links: Links) -> Links {
    links.names = identity.names().await;
    if let Ok(hook) = serde_json::from_str::<Webhook>(&group.state) {
        let mut oom: Vec<String> = hook
            .alerts
            .iter()
            .filter(|a| a.status == "firing" && is_oom_alert(a))
            .filter_map(|a| a.labels.get("instance").cloned())
            .collect();
        oom.sort();
        oom.dedup();
        if !oom.is_empty() {
            links.oom_kills = identity.oom_kills(&oom).await;
        }
    }
    links
}

/// An alert about the OOM killer (`OOMKill`, `OomKill`, `NodeOOMKills`…).
fn is_oom_alert(a: &Alert) -> bool {
    a.labels
        .get("alertname")
        .is_some_and(|n| n.to_ascii_lowercase().contains("oom"))
}

/// The group's title: the alert name, the node(s) it is on (by name, the
/// instance beside a single node's name: `GpuXid on gpu-node-17
/// (127.0.0.1:18949)`, `OOMKill on 8 nodes`), and other grouping labels.
fn group_title(hook: &Webhook, names: &NodeNames) -> String {
    let shared = hook.shared_labels();
    let name = shared
        .get("alertname")
        .cloned()
        .or_else(|| {
            hook.alerts
                .first()
                .and_then(|a| a.labels.get("alertname").cloned())
        })
        .unwrap_or_else(|| "alert".to_string());
    let mut extra: Vec<String> = hook
        .group_labels
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "alertname" | "instance" | "node" | "nodename"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    extra.truncate(3);
    let mut nodes: Vec<(Option<String>, Option<String>)> = hook
        .alerts
        .iter()
        .map(|a| {
            let instance = a.labels.get("instance").cloned();
            (names.name_of(instance.as_deref(), &a.labels), instance)
        })
        .filter(|(n, i)| n.is_some() || i.is_some())
        .collect();
    nodes.sort();
    nodes.dedup_by(|a, b| match (&a.0, &b.0) {
        (Some(x), Some(y)) => x == y,
        _ => a.1 == b.1,
    });
    let on = match nodes.as_slice() {
        [] => String::new(),
        [(Some(n), Some(i))] if n != i => format!(" on {n} ({i})"),
        [(Some(n), _)] | [(None, Some(n))] => format!(" on {n}"),
        [(None, None)] => String::new(),
        many => format!(" on {} nodes", many.len()),
    };
    if extra.is_empty() {
        format!("{name}{on}")
    } else {
        format!("{name}{on} ({})", extra.join(", "))
    }
}

/// The device of an alert as a person reads it: the GPU index with its UUID
/// (or serial) prefix, `PCI <bus id> (no GPU index)` for a bus with no GPU
/// index, else the UUID.
fn device_text(labels: &BTreeMap<String, String>) -> Option<String> {
    let get = |k: &str| labels.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let id_prefix = get("uuid")
        .map(|u| u.chars().take(12).collect::<String>())
        .or_else(|| {
            get("serial").map(|s| format!("serial {}", s.chars().take(8).collect::<String>()))
        });
    match (get("gpu"), get("pci_bus_id")) {
        (Some(g), _) => Some(match id_prefix {
            Some(p) => format!("GPU {g} ({p})"),
            None => format!("GPU {g}"),
        }),
        (None, Some(bus)) => Some(format!("PCI {bus} (no GPU index)")),
        (None, None) => id_prefix.map(|p| format!("GPU {p}")),
    }
}

/// An OOM alert's victim line: the last kill the agent recorded since
/// shortly before the alert started (`python3 (pid 4242, cgroup
/// /slurm/job_17)`, `+2 more kills`), or why it is unknown.
fn victim_text(kills: Option<&Result<Vec<OomKill>, String>>, starts_at: &str) -> Option<String> {
    let kills = match kills? {
        Ok(k) => k,
        Err(why) => return Some(format!("unknown ({why})")),
    };
    // The rule looks back 5 minutes; allow for scrape and evaluation lag.
    let since = chrono::DateTime::parse_from_rfc3339(starts_at)
        .map(|t| t.timestamp() as f64 - 600.0)
        .unwrap_or(0.0);
    let recent: Vec<&OomKill> = kills.iter().filter(|k| k.timestamp >= since).collect();
    let Some(last) = recent.last() else {
        return Some("none recorded by the agent".into());
    };
    let mut s = last.process.clone().unwrap_or_else(|| "a process".into());
    let mut detail = Vec::new();
    if let Some(p) = last.pid {
        detail.push(format!("pid {p}"));
    }
    if let Some(c) = &last.cgroup {
        detail.push(format!("cgroup {c}"));
    }
    if !detail.is_empty() {
        s.push_str(&format!(" ({})", detail.join(", ")));
    }
    if recent.len() > 1 {
        s.push_str(&format!(
            " +{} more kill{}",
            recent.len() - 1,
            if recent.len() == 2 { "" } else { "s" }
        ));
    }
    Some(s)
}

/// Label names shown in their own place (not repeated in an alert's line).
const SHOWN_ELSEWHERE: &[&str] = &[
    "alertname",
    "severity",
    "instance",
    "gpu",
    "job",
    "uuid",
    "pci_bus_id",
    "serial",
    "node",
    "nodename",
];

/// A runbook id (not a URL) named by `runbook`/`runbook_id` annotation or label.
pub fn suggested_runbook(hook: &Webhook) -> Option<String> {
    let looks_like_id = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    let from = |m: &BTreeMap<String, String>| {
        ["runbook_id", "runbook"]
            .iter()
            .filter_map(|k| m.get(*k))
            .find(|v| looks_like_id(v))
            .cloned()
    };
    from(&hook.common_annotations)
        .or_else(|| from(&hook.common_labels))
        .or_else(|| {
            hook.alerts
                .iter()
                .find_map(|a| from(&a.annotations).or_else(|| from(&a.labels)))
        })
}

/// `text` with the instance replaced by the node's name (the line shows
/// the instance beside it): "OOM killer fired on gpu-node-17".
fn named(text: Option<String>, instance: &Option<String>, node: &Option<String>) -> Option<String> {
    match (text, instance, node) {
        // Only a `host:port` instance: a bare word could be part of another.
        (Some(t), Some(i), Some(n)) if i.contains(':') && i != n => Some(t.replace(i.as_str(), n)),
        (t, _, _) => t,
    }
}

/// Rules written for alerts that always carry `gpu` render "on GPU  of"
/// for a PCI bus with no GPU index (an empty `{{ $labels.gpu }}`): name the
/// bus instead.
fn no_empty_gpu(text: Option<String>, labels: &BTreeMap<String, String>) -> Option<String> {
    let t = text?;
    if labels.get("gpu").is_some_and(|g| !g.trim().is_empty()) || !t.contains("GPU  ") {
        return Some(t);
    }
    let instead = match labels.get("pci_bus_id").filter(|b| !b.trim().is_empty()) {
        Some(bus) => format!("PCI {} (no GPU index) ", bus.trim()),
        None => "a GPU with no index ".to_string(),
    };
    Some(t.replace("GPU  ", &instead))
}

/// An alert's summary with its XID's catalogue entry appended (meaning,
/// NVIDIA's resolution class, the action and our runbook), so the person
/// paged at 3 AM reads what the code means without looking it up.
fn with_xid_note(summary: Option<String>, labels: &BTreeMap<String, String>) -> Option<String> {
    let Some(info) = labels
        .get("xid")
        .and_then(|x| x.trim().parse::<u32>().ok())
        .and_then(crate::gpu::xid::lookup)
    else {
        return summary;
    };
    let note = format!(
        "XID {}: {} ({}). {}",
        info.code, info.title, info.nvidia_bucket, info.action
    );
    Some(match summary {
        Some(s) if !s.is_empty() => format!("{s} · {note}"),
        _ => note,
    })
}

/// Builds the platform-neutral message for a stored group: names resolved
/// once from `links.names` (node first, instance beside it), devices by
/// GPU index and UUID prefix, OOM victims from `links.oom_kills`.
pub fn render_group(group: &GroupRecord, routing: &Routing, links: &Links) -> Message {
    let hook: Webhook = match serde_json::from_str(&group.state) {
        Ok(h) => h,
        Err(e) => {
            return Message::Text(crate::notify::TextMessage {
                text: format!(
                    "gpuops could not render alert group {} (stored state unreadable: {e})",
                    group.id
                ),
                code: None,
                buttons: Vec::new(),
            })
        }
    };
    let class = routing.classify_group(
        hook.alerts
            .iter()
            .map(|a| a.labels.get("severity").map(String::as_str)),
    );
    let shared = hook.shared_labels();
    let severity = shared
        .get("severity")
        .cloned()
        .or_else(|| {
            let mut s: Vec<&str> = hook
                .alerts
                .iter()
                .filter_map(|a| a.labels.get("severity").map(String::as_str))
                .collect();
            s.sort();
            s.dedup();
            (!s.is_empty()).then(|| s.join(", "))
        })
        .unwrap_or_else(|| "none".to_string());
    let firing = hook.firing();
    let status = if hook.status == "resolved" {
        GroupStatus::Resolved
    } else {
        GroupStatus::Firing {
            firing,
            resolved: hook.alerts.len() - firing,
        }
    };
    let mut alerts: Vec<&Alert> = hook.alerts.iter().collect();
    // Firing first, then by start time: the newest trouble is at the top.
    alerts.sort_by(|a, b| {
        (a.status != "firing", &a.starts_at).cmp(&(b.status != "firing", &b.starts_at))
    });
    let names = &links.names;
    let lines: Vec<AlertLine> = alerts
        .iter()
        .map(|a| {
            let labels = a
                .labels
                .iter()
                .filter(|(k, _)| !SHOWN_ELSEWHERE.contains(&k.as_str()) && !shared.contains_key(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let instance = a.labels.get("instance").cloned();
            let node = names.name_of(instance.as_deref(), &a.labels);
            let victim = if is_oom_alert(a) && a.status == "firing" {
                victim_text(
                    instance.as_ref().and_then(|i| links.oom_kills.get(i)),
                    &a.starts_at,
                )
            } else {
                None
            };
            AlertLine {
                firing: a.status == "firing",
                name: a.labels.get("alertname").cloned().unwrap_or_default(),
                node: node.clone(),
                gpu: a.labels.get("gpu").cloned(),
                device: device_text(&a.labels),
                value: a.annotations.get("value").cloned(),
                victim,
                labels,
                summary: with_xid_note(
                    named(
                        no_empty_gpu(a.annotations.get("summary").cloned(), &a.labels),
                        &instance,
                        &node,
                    ),
                    &a.labels,
                ),
                generator_url: (!a.generator_url.is_empty()).then(|| a.generator_url.clone()),
                instance,
            }
        })
        .collect();
    // The group's summary and description name the node when every alert
    // is on one node (a storm's first alert's text names only its own).
    let one_node = match lines.as_slice() {
        [first, rest @ ..] if rest.iter().all(|l| l.instance == first.instance) => {
            Some((first.instance.clone(), first.node.clone()))
        }
        _ => None,
    };
    let first = |key: &str| {
        let common = hook.common_annotations.get(key).cloned();
        match &one_node {
            Some((instance, node)) => named(
                common.or_else(|| {
                    hook.alerts
                        .iter()
                        .find_map(|a| a.annotations.get(key).cloned())
                }),
                instance,
                node,
            ),
            // A roll-up: one alert's text would name one node of many.
            None => common,
        }
    };
    let runbook_id =
        suggested_runbook(&hook).or_else(|| links.suggest_runbook.as_ref().and_then(|f| f(&hook)));
    let any = |key: &str| {
        hook.common_annotations.get(key).cloned().or_else(|| {
            hook.alerts
                .iter()
                .find_map(|a| a.annotations.get(key).cloned())
        })
    };
    let runbook_url = any("runbook_url").or_else(|| {
        any("runbook").filter(|r| r.starts_with("http://") || r.starts_with("https://"))
    });
    let generator_url = hook
        .alerts
        .iter()
        .find(|a| !a.generator_url.is_empty())
        .map(|a| a.generator_url.clone());
    let alertmanager_url = links
        .alertmanager
        .clone()
        .or_else(|| (!hook.external_url.is_empty()).then(|| hook.external_url.clone()));
    let mut buttons = Vec::new();
    if status != GroupStatus::Resolved {
        if group.ack.is_none() {
            buttons.push(Button::Acknowledge);
        }
        buttons.push(Button::Silence1h);
        if let Some(id) = &runbook_id {
            buttons.push(Button::RunRunbook(id.clone()));
        }
    }
    let is_test = shared.get("gpuops_test").is_some_and(|v| v == "true");
    Message::Alert(Box::new(AlertMessage {
        group_id: group.id,
        tier: class.tier,
        title: group_title(&hook, names),
        summary: first("summary"),
        description: first("description"),
        severity,
        severity_unknown: class.unknown,
        status,
        acknowledged: group.ack.clone(),
        alerts: lines,
        truncated_alerts: hook.truncated_alerts,
        runbook_url,
        runbook_id,
        generator_url,
        alertmanager_url,
        buttons,
        is_test,
        common_labels: shared,
        escalation: None,
    }))
}

/// The clearly-labelled alert posted on start without a configuration.
pub fn test_webhook() -> Webhook {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let labels = BTreeMap::from([
        ("alertname".to_string(), "GpuopsTestAlert".to_string()),
        ("severity".to_string(), "info".to_string()),
        ("gpuops_test".to_string(), "true".to_string()),
        ("instance".to_string(), "localhost".to_string()),
    ]);
    let annotations = BTreeMap::from([
        (
            "summary".to_string(),
            "TEST ALERT from gpuops: the webhook → store → outbox → notifier pipeline works".to_string(),
        ),
        (
            "description".to_string(),
            "No configuration was given, so alerts are printed to this log. Point AlertManager at POST /alertmanager and write a bot.toml (see config/bot.example.toml) to post to Slack or Discord.".to_string(),
        ),
    ]);
    Webhook {
        version: "4".into(),
        group_key: format!("gpuops-test-alert/{now}"),
        truncated_alerts: 0,
        status: "firing".into(),
        receiver: "gpuops-self-test".into(),
        group_labels: BTreeMap::from([("alertname".to_string(), "GpuopsTestAlert".to_string())]),
        common_labels: labels.clone(),
        common_annotations: annotations.clone(),
        external_url: String::new(),
        alerts: vec![Alert {
            status: "firing".into(),
            labels,
            annotations,
            starts_at: now,
            ends_at: String::new(),
            generator_url: String::new(),
            fingerprint: "gpuops-test".into(),
        }],
    }
}

/// Tier of a stored group (for callers that only have the record).
pub fn stored_tier(group: &GroupRecord) -> Option<Tier> {
    Tier::parse(&group.tier)
}

#[cfg(test)]
mod tests {
    /// Issue 22, observation 1: the chat alert's XID note says what the
    /// catalogue says, for every catalogued code (79: never a reset).
    #[test]
    fn xid_note_agrees_with_the_catalogue() {
        for info in crate::gpu::xid::catalogue() {
            let labels = BTreeMap::from([("xid".to_string(), info.code.to_string())]);
            let note = super::with_xid_note(Some("summary".into()), &labels).unwrap_or_default();
            assert!(note.contains(info.action), "{note}");
            assert_eq!(crate::gpu::xid::disagreement(info.code, &note), None);
        }
    }

    use super::*;

    fn payload(status: &str, alerts: &[(&str, &str)]) -> String {
        let alerts: Vec<serde_json::Value> = alerts
            .iter()
            .map(|(instance, st)| {
                serde_json::json!({
                    "status": st,
                    "labels": {"alertname": "GpuXid", "severity": "critical", "instance": instance},
                    "annotations": {"summary": "xid"},
                    "startsAt": "2026-01-01T00:00:00Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://prom/graph",
                    "fingerprint": format!("fp-{instance}"),
                    "newFieldFromTheFuture": 1
                })
            })
            .collect();
        serde_json::json!({
            "version": "4", "groupKey": "{}:{alertname=\"GpuXid\"}", "status": status,
            "receiver": "gpuops", "groupLabels": {"alertname": "GpuXid"},
            "commonLabels": {"alertname": "GpuXid", "severity": "critical"},
            "commonAnnotations": {}, "externalURL": "http://am:9093", "alerts": alerts
        })
        .to_string()
    }

    #[test]
    fn only_json_content_types_are_webhooks() {
        let ok = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            is_json_content_type(&h)
        };
        assert!(ok("application/json"));
        assert!(ok("Application/JSON; charset=utf-8"));
        assert!(ok("application/json;charset=\"UTF-8\""));
        assert!(!ok("application/json; charset=latin1"));
        assert!(!ok("text/plain"));
        assert!(!ok("application/x-www-form-urlencoded"));
        assert!(!ok("application/jsonx"));
        assert!(!is_json_content_type(&HeaderMap::new()));
    }

    fn check_refused(body: &str, expect: &str) {
        let e = Webhook::parse(body.as_bytes()).unwrap_err();
        assert!(e.0.contains(expect), "{e} does not contain {expect}");
    }

    #[test]
    fn tolerant_parse_and_clear_refusals() {
        let w = Webhook::parse(payload("firing", &[("n1", "firing")]).as_bytes()).unwrap();
        assert_eq!(w.alerts.len(), 1);
        check_refused("{", "invalid AlertManager webhook JSON");
        check_refused(
            r#"{"groupKey":"g","status":"firing"}"#,
            "missing field `alerts`",
        );
        check_refused(
            r#"{"groupKey":"g","status":"on fire","alerts":[{"status":"firing"}]}"#,
            "status must be",
        );
        check_refused(
            r#"{"groupKey":"g","status":"firing","alerts":[]}"#,
            "alerts must not be empty",
        );
        check_refused(
            r#"{"groupKey":"","status":"firing","alerts":[{"status":"firing"}]}"#,
            "groupKey",
        );
    }

    #[test]
    fn state_hash_ignores_ends_at_and_order_but_not_status() {
        let a = Webhook::parse(payload("firing", &[("n1", "firing"), ("n2", "firing")]).as_bytes())
            .unwrap();
        let mut b = a.clone();
        b.alerts.reverse();
        b.alerts[0].ends_at = "2026-01-01T00:05:00Z".into();
        assert_eq!(a.state_hash(), b.state_hash());
        let c =
            Webhook::parse(payload("firing", &[("n1", "firing"), ("n2", "resolved")]).as_bytes())
                .unwrap();
        assert_ne!(a.state_hash(), c.state_hash());
    }

    #[test]
    fn runbook_id_comes_from_an_annotation_that_names_one() {
        let mut w = Webhook::parse(payload("firing", &[("n1", "firing")]).as_bytes()).unwrap();
        assert_eq!(suggested_runbook(&w), None);
        w.alerts[0]
            .annotations
            .insert("runbook".into(), "https://wiki/x".into());
        assert_eq!(suggested_runbook(&w), None);
        w.common_annotations
            .insert("runbook_id".into(), "gpu-xid".into());
        assert_eq!(suggested_runbook(&w).as_deref(), Some("gpu-xid"));
    }

    fn record(hook: &Webhook, ack: Option<crate::notify::Ack>) -> GroupRecord {
        GroupRecord {
            id: 9,
            group_key: hook.group_key.clone(),
            status: hook.status.clone(),
            tier: "P1".into(),
            rev: 1,
            state: serde_json::to_string(hook).unwrap(),
            ack,
            updated_at: 0.0,
        }
    }

    fn xid(gpu: &str, status: &str) -> serde_json::Value {
        serde_json::json!({
            "status": status,
            "labels": {"alertname": "GPUXIDError", "severity": "warning",
                       "instance": "gpu-node-17:9949", "gpu": gpu, "xid": "94"},
            "fingerprint": format!("x{gpu}"),
        })
    }

    fn group(alerts: Vec<serde_json::Value>) -> Webhook {
        serde_json::from_value(serde_json::json!({
            "groupKey": "g", "status": "firing", "alerts": alerts,
        }))
        .unwrap()
    }

    #[test]
    fn change_text_names_what_joined_and_what_resolved() {
        let one = group(vec![xid("0", "firing")]);
        let three = group(vec![
            xid("0", "firing"),
            xid("1", "firing"),
            xid("6", "firing"),
        ]);
        expect_test::expect![[r#"
            Some(
                (
                    "🔥 +2 firing: XID 94 on gpu-node-17 GPU 1, GPU 6",
                    2,
                ),
            )
        "#]]
        .assert_debug_eq(&change_text(&one, &three, &NodeNames::default()));
        let mixed = group(vec![
            xid("0", "resolved"),
            xid("1", "firing"),
            xid("7", "firing"),
        ]);
        expect_test::expect![[r#"
            Some(
                (
                    "🔥 +1 firing: XID 94 on gpu-node-17 GPU 7\n✅ −2 resolved: XID 94 on gpu-node-17 GPU 0, GPU 6",
                    1,
                ),
            )
        "#]]
        .assert_debug_eq(&change_text(&three, &mixed, &NodeNames::default()));
        assert_eq!(
            change_text(&three, &three, &NodeNames::default()),
            None,
            "same firing set"
        );
        // The change reply is only about firing groups, and says nothing
        // when the firing set is the same.
        let reply = change_reply(&three, true, NodeNames::default()).unwrap();
        let old = serde_json::to_string(&one).unwrap();
        assert!((reply.0)(&old).unwrap().renotify);
        assert!(
            !(change_reply(&three, false, NodeNames::default()).unwrap().0)(&old)
                .unwrap()
                .renotify
        );
        let same = serde_json::to_string(&three).unwrap();
        assert_eq!((reply.0)(&same), None);
        // A resolved group firing again: a plain reply (its card re-pages).
        let mut was_resolved = one.clone();
        was_resolved.status = "resolved".into();
        was_resolved.alerts[0].status = "resolved".into();
        let again = (reply.0)(&serde_json::to_string(&was_resolved).unwrap()).unwrap();
        assert!(
            !again.renotify && again.body.contains("+3 firing"),
            "{again:?}"
        );
        let mut resolved = three.clone();
        resolved.status = "resolved".into();
        assert!(change_reply(&resolved, true, NodeNames::default()).is_none());
    }

    #[test]
    fn many_alerts_are_cut_with_and_n_more() {
        let lines: Vec<AlertLine> = (0..30)
            .map(|i| {
                alert_line_of(
                    &serde_json::from_value(serde_json::json!({
                        "status": "firing",
                        "labels": {"alertname": "OOMKill", "instance": format!("n{i}")},
                    }))
                    .unwrap(),
                    &NodeNames::default(),
                )
            })
            .collect();
        let s = describe_alert_lines(&lines);
        assert!(s.starts_with("OOMKill on n0; OOMKill on n1;"), "{s}");
        assert!(s.ends_with("; … and 10 more"), "{s}");
    }

    #[test]
    fn only_firing_p1_p2_alerts_with_instance_and_gpu_are_correlated() {
        let w = group(vec![
            xid("6", "firing"),
            xid("1", "firing"),
            xid("2", "resolved"),
        ]);
        let window = std::time::Duration::from_secs(600);
        let c = correlation(&w, Tier::P1, window).unwrap();
        assert_eq!(
            c.subjects,
            ["gpu-node-17:9949|1", "gpu-node-17:9949|6"],
            "sorted, firing only"
        );
        assert_eq!(correlation(&w, Tier::P3, window), None);
        assert_eq!(correlation(&w, Tier::P2, std::time::Duration::ZERO), None);
    }

    #[test]
    fn xid_alert_lines_carry_the_catalogue_entry() {
        let mut w = Webhook::parse(payload("firing", &[("n1", "firing")]).as_bytes()).unwrap();
        w.alerts[0].labels.insert("xid".into(), "79".into());
        let Message::Alert(m) =
            render_group(&record(&w, None), &Routing::default(), &Links::default())
        else {
            panic!("not an alert")
        };
        let s = m.alerts[0].summary.clone().unwrap();
        assert!(s.starts_with("xid · XID 79: GPU has fallen off the bus (RESTART_BM). Drain the node and reboot it"), "{s}");
        // An unknown code or none: the summary as sent.
        w.alerts[0].labels.insert("xid".into(), "9999".into());
        let Message::Alert(m) =
            render_group(&record(&w, None), &Routing::default(), &Links::default())
        else {
            panic!("not an alert")
        };
        assert_eq!(m.alerts[0].summary.as_deref(), Some("xid"));
    }

    #[test]
    fn rendering_flags_tiers_buttons_and_suggestions() {
        let mut w =
            Webhook::parse(payload("firing", &[("n1", "firing"), ("n2", "resolved")]).as_bytes())
                .unwrap();
        let routing = Routing::default();
        let suggest: RunbookSuggester = Arc::new(|h: &Webhook| {
            (h.shared_labels().get("alertname").map(String::as_str) == Some("GpuXid"))
                .then(|| "gpu-xid".to_string())
        });
        let links = Links {
            alertmanager: None,
            suggest_runbook: Some(suggest),
            ..Links::default()
        };
        let Message::Alert(m) = render_group(&record(&w, None), &routing, &links) else {
            panic!("not an alert")
        };
        expect_test::expect![[r#"
            (
                "[P1] [FIRING 1 (1 resolved)] GpuXid on 2 nodes",
                "P1 (page, 5 min response) · severity critical",
                [
                    Acknowledge,
                    Silence1h,
                    RunRunbook(
                        "gpu-xid",
                    ),
                ],
                "🔥 n1 — xid",
            )
        "#]]
        .assert_debug_eq(&(
            crate::notify::headline(&m),
            crate::notify::tier_text(&m),
            m.buttons.clone(),
            crate::notify::alert_line_text(&m.alerts[0]),
        ));
        // Unknown severity: default tier, flagged; acked: no Ack button.
        for a in &mut w.alerts {
            a.labels.insert("severity".into(), "meltdown".into());
        }
        w.common_labels.insert("severity".into(), "meltdown".into());
        let ack = Some(crate::notify::Ack {
            by: "U1".into(),
            at: 0.0,
        });
        let Message::Alert(m) = render_group(&record(&w, ack), &routing, &Links::default()) else {
            panic!("not an alert")
        };
        assert!(m.severity_unknown);
        assert_eq!(m.tier, Tier::P3);
        assert_eq!(m.buttons, vec![Button::Silence1h]);
        assert!(crate::notify::status_text(&m).contains("acknowledged by U1"));
    }

    #[test]
    fn xid_on_pci_bus_without_gpu_reads_cleanly() {
        let mut w =
            Webhook::parse(payload("firing", &[("127.0.0.1:18949", "firing")]).as_bytes()).unwrap();
        w.alerts[0].labels.insert("xid".into(), "79".into());
        w.alerts[0]
            .labels
            .insert("pci_bus_id".into(), "00000000:C1:00.0".into());
        // The summary the shipped rule rendered before it knew buses with no index.
        w.alerts[0].annotations.insert(
            "summary".into(),
            "XID 79 (fell off the bus) on GPU  of 127.0.0.1:18949".into(),
        );
        let links = Links {
            names: NodeNames::fixed([("127.0.0.1:18949", "gpu-node-17")]),
            ..Links::default()
        };
        let Message::Alert(m) = render_group(&record(&w, None), &Routing::default(), &links) else {
            panic!("not an alert")
        };
        let line = crate::notify::alert_line_text(&m.alerts[0]);
        assert!(
            line.starts_with(
                "🔥 gpu-node-17 (127.0.0.1:18949) PCI 00000000:C1:00.0 (no GPU index) xid=79 — XID 79 (fell off the bus) on PCI 00000000:C1:00.0 (no GPU index) of gpu-node-17 · XID 79: "
            ),
            "{line}"
        );
        assert!(!line.contains("gpu=00000000"), "{line}");
        assert!(!line.contains("GPU  "), "{line}");
        assert_eq!(m.alerts[0].gpu, None);
        // With a GPU index: the index and the UUID's prefix.
        w.alerts[0].labels.insert("gpu".into(), "3".into());
        w.alerts[0].labels.insert(
            "uuid".into(),
            "GPU-8c3e2a5d-3b4f-4d7c-9e9a-2f3a4b5c6d72".into(),
        );
        let Message::Alert(m) = render_group(&record(&w, None), &Routing::default(), &links) else {
            panic!("not an alert")
        };
        assert_eq!(m.alerts[0].device.as_deref(), Some("GPU 3 (GPU-8c3e2a5d)"));
        assert_eq!(m.title, "GpuXid on gpu-node-17 (127.0.0.1:18949)");
    }
}
