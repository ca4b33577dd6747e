//! The platform-neutral message model: what the bot says ([`Message`]: an
//! alert group's card or a text), its buttons, acknowledgements and the
//! button ids. A bot-side leaf: the store keeps these (serialized), the
//! notifiers render them; it imports nothing but `routing::Tier`.

use serde::{Deserialize, Serialize};

use crate::routing::Tier;

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
    /// A scheduled health report (summary, sections, charts).
    Report(Box<ReportMessage>),
}

/// A health report as the notifiers receive it (built by `report`).
/// Lines are Markdown with `[text](url)` links (each notifier converts them
/// to its platform's link syntax); `html` is a whole email body whose
/// images are referenced as `cid:<Chart::file_name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportMessage {
    /// `daily`, from `[[reports]] name`.
    pub name: String,
    /// e.g. "Daily health report: 27 Nov 08:00 – 28 Nov 08:00 (Europe/Berlin)".
    pub title: String,
    /// The most important lines first (findings count, worst items).
    pub summary: Vec<String>,
    pub sections: Vec<ReportSection>,
    /// The plain-text rendering (email text part, console, webhook).
    pub text: String,
    /// The HTML rendering (email).
    pub html: String,
    pub charts: Vec<Chart>,
    /// The slot was sent after its time (the bot was down at the time).
    #[serde(default)]
    pub late: bool,
}

/// One section of a report: a heading and its lines (Markdown, as above).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportSection {
    pub heading: String,
    pub lines: Vec<String>,
}

/// A rendered chart (PNG bytes, base64 in the serialized form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chart {
    /// `fleet-gpu-utilization.png`.
    pub file_name: String,
    /// Human title, used as alt text and upload title.
    pub title: String,
    #[serde(with = "base64_bytes")]
    pub png: Vec<u8>,
}

mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
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

/// The PagerDuty incident a group pages into when it shares one with
/// groups about the same GPU (`store::Correlation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// The group whose dedup key the incident uses.
    pub group_id: i64,
    /// Another group of the incident still fires: do not resolve it yet.
    pub others_firing: bool,
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

/// One alert of a group. Identity is resolved once, when the message is
/// built (`alert::render_group`, from the inventory's `NodeNames`), and
/// carried here as data: renderers show [`AlertLine::node`] first and the
/// instance beside it, and [`AlertLine::device`] for the GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertLine {
    pub firing: bool,
    pub name: String,
    pub instance: Option<String>,
    /// The node's name (inventory, `node`/`nodename` label, DNS host part);
    /// `None` when nothing names it (renderers show the instance).
    #[serde(default)]
    pub node: Option<String>,
    /// The `gpu` label (the GPU's index) as sent.
    pub gpu: Option<String>,
    /// The device as a person reads it: `GPU 3 (GPU-8c3e2a5d)`, or
    /// `PCI 00000000:C1:00.0 (no GPU index)` for a bus with no GPU index.
    #[serde(default)]
    pub device: Option<String>,
    /// The alert's value (`value` annotation), where the rule gives one.
    #[serde(default)]
    pub value: Option<String>,
    /// What the OOM killer killed on this node (from the agent's
    /// `/v1/events`), or why that is unknown.
    #[serde(default)]
    pub victim: Option<String>,
    /// Labels that tell this alert apart (not shared by the group).
    pub labels: Vec<(String, String)>,
    pub summary: Option<String>,
    pub generator_url: Option<String>,
}

impl AlertLine {
    /// `gpu-node-17 (127.0.0.1:18949)`: the node's name with the instance
    /// beside it; the instance alone when nothing names the node.
    pub fn where_text(&self) -> Option<String> {
        node_with_instance(self.node.as_deref(), self.instance.as_deref())
    }

    /// The node's name, else the instance (one word per node: roll-ups).
    pub fn node_or_instance(&self) -> Option<&str> {
        self.node.as_deref().or(self.instance.as_deref())
    }
}

impl AlertMessage {
    /// The pod an alert is about, as a person reads it: `pod
    /// training/llama-ft-7b-0 (container trainer)`, from its `namespace`,
    /// `pod` and `container` labels (the line's own, else the group's
    /// shared ones); `None` without both a namespace and a pod. Each value
    /// is outside text, flattened to one line ([`crate::escape::line`]);
    /// the renderers escape the whole line for their format.
    pub fn pod_of(&self, a: &AlertLine) -> Option<String> {
        let get = |k: &str| {
            a.labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .or_else(|| self.common_labels.get(k).map(String::as_str))
        };
        let (ns, pod, container) = pod_labels(get)?;
        let (ns, pod) = (crate::escape::line(ns), crate::escape::line(pod));
        Some(match container {
            Some(c) => format!("pod {ns}/{pod} (container {})", crate::escape::line(c)),
            None => format!("pod {ns}/{pod}"),
        })
    }
}

/// The workload pod a series or alert names, `(namespace, pod, container)`:
/// `exported_namespace`/`exported_pod`/`exported_container` where
/// Prometheus renamed the agent's labels (prometheus-operator's target
/// labels `namespace`, `pod`, `container` win: docs/kubernetes.md), else
/// `namespace`/`pod`/`container` unless the series came through
/// prometheus-operator (an `endpoint` label: then those name the agent's
/// own pod, not a workload). `None` without both a namespace and a pod.
pub fn pod_labels<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
) -> Option<(&'a str, &'a str, Option<&'a str>)> {
    let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
    if let (Some(ns), Some(pod)) = (get("exported_namespace"), get("exported_pod")) {
        return Some((ns, pod, get("exported_container")));
    }
    if get("endpoint").is_some() {
        return None;
    }
    Some((get("namespace")?, get("pod")?, get("container")))
}

/// Labels an alert line shows as its pod ([`AlertMessage::pod_of`]), not
/// as `key=value`.
pub const POD_LABELS: [&str; 6] = [
    "namespace",
    "pod",
    "container",
    "exported_namespace",
    "exported_pod",
    "exported_container",
];

/// How a person reads a node: `gpu-node-17 (127.0.0.1:18949)`, the name
/// alone when it is the instance, the instance alone when nothing names it.
pub fn node_with_instance(node: Option<&str>, instance: Option<&str>) -> Option<String> {
    match (node, instance) {
        (Some(n), Some(i)) if n != i => Some(format!("{n} ({i})")),
        (Some(n), _) => Some(n.to_string()),
        (None, Some(i)) => Some(i.to_string()),
        (None, None) => None,
    }
}

/// Buttons on an alert message. Their wire ids are a contract with the chat
/// role: Slack `action_id`s [`SLACK_ACTION_ACK`], [`SLACK_ACTION_SILENCE_1H`],
/// [`SLACK_ACTION_RUN_RUNBOOK`] with `value` `<group_id>` or
/// `<group_id>|<runbook_id>`; Discord `custom_id`s `gpuops:ack:<group_id>`,
/// `gpuops:silence:<group_id>:1h`, `gpuops:run:<group_id>:<runbook_id>`.
/// On an approval request: [`SLACK_ACTION_APPROVE`] / [`SLACK_ACTION_DENY`]
/// with `value` `<run_id>.<step>.<nonce>` (the one request they were posted
/// with; `chat::approvals::button_value`); Discord
/// `gpuops:approve:<run_id>.<step>.<nonce>`, `gpuops:deny:…`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Button {
    Acknowledge,
    Silence1h,
    RunRunbook(String),
    /// Approve the request `.0` (`<run>.<step>.<nonce>`) names.
    Approve(String),
    /// Deny the request `.0` names.
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
