//! Scheduled health reports: the fleet's period in one message, with
//! charts. A report is computed from Prometheus (`prom.rs`, every PromQL
//! expression in `queries.rs`) and the bot's own store (`incidents.rs`),
//! section by section (`compute.rs`, `host.rs`, `checks.rs`; a lost GPU's
//! signals grouped into one finding in `lost.rs`), with OOM
//! victims from the agents' `/v1/events` when `[agents]` is configured
//! (`victims.rs`); rendered as Markdown, plain text and
//! HTML (`render.rs`) with PNG charts drawn in-process (`chart.rs`);
//! and sent on a cron schedule through the outbox, each slot claimed once
//! in the store (`schedule.rs`), or by hand (`cli.rs`).
//!
//! A section whose queries fail says which and why, and the report still
//! goes out. This module speaks no platform's wire format (the notifiers
//! render `Message::Report`) and holds no SQL (`store/reports.rs`).

pub mod chart;
pub mod checks;
pub mod cli;
pub mod compute;
pub mod host;
pub mod incidents;
pub mod lost;
pub mod out_of_service;
pub mod prom;
pub mod queries;
pub mod render;
pub mod schedule;
pub mod victims;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::config::bot::LifecycleConfig;
use crate::config::reports::{ReportConfig, SectionKind};
use crate::inventory::NodeNames;
use crate::message::ReportMessage;
use crate::store::Store;

/// A piece of a report line.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Text(String),
    Bold(String),
    /// A value from outside (a process name, an agent's error): escaped
    /// for Markdown and HTML, as is in plain text.
    Value(String),
    /// A number (or word) linked to the PromQL that produced it.
    Link {
        text: String,
        url: String,
    },
}

/// One line of a report, rendered to Markdown, text or HTML.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Line(pub Vec<Part>);

impl Line {
    pub fn new() -> Line {
        Line(Vec::new())
    }

    pub fn text(mut self, s: impl Into<String>) -> Line {
        self.0.push(Part::Text(s.into()));
        self
    }

    pub fn bold(mut self, s: impl Into<String>) -> Line {
        self.0.push(Part::Bold(s.into()));
        self
    }

    pub fn value(mut self, s: impl Into<String>) -> Line {
        self.0.push(Part::Value(s.into()));
        self
    }

    pub fn link(mut self, text: impl Into<String>, url: impl Into<String>) -> Line {
        self.0.push(Part::Link {
            text: text.into(),
            url: url.into(),
        });
        self
    }
}

/// How bad a finding is (summary order: critical first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Critical,
    Warning,
}

/// Something someone should act on: names the node, the GPU and the next
/// action.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub level: Level,
    pub line: Line,
}

/// One computed section.
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub kind: SectionKind,
    pub findings: Vec<Finding>,
    /// Facts that are not findings (counts, averages, top lists).
    pub lines: Vec<Line>,
    /// Queries that could not be computed: `what: why`.
    pub failures: Vec<String>,
    /// Queries (or store reads) that answered.
    pub answered: usize,
}

impl Section {
    pub fn new(kind: SectionKind) -> Section {
        Section {
            kind,
            findings: Vec::new(),
            lines: Vec::new(),
            failures: Vec::new(),
            answered: 0,
        }
    }

    /// Whether the section could see: every query answered, some did, or
    /// none did (failures and nothing else to say).
    pub fn computed(&self) -> Computed {
        if self.failures.is_empty() {
            Computed::Fully
        } else if self.answered == 0 && self.findings.is_empty() && self.lines.is_empty() {
            Computed::Not
        } else {
            Computed::Partly
        }
    }
}

/// How much of a section could be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Computed {
    Fully,
    Partly,
    Not,
}

/// An XID count.
#[derive(Debug, Clone, PartialEq)]
pub struct XidRow {
    pub node: String,
    pub gpu: String,
    pub code: u32,
    pub count: u64,
}

/// A filesystem above 80 %.
#[derive(Debug, Clone, PartialEq)]
pub struct FsRow {
    pub node: String,
    pub mountpoint: String,
    pub used_ratio: f64,
    /// At the period's trend; `None` when it is not growing.
    pub days_to_full: Option<f64>,
}

/// The report's numbers, for tests and the summary (every field is what a
/// line says; `None` when its query failed).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Figures {
    pub nodes_now: Option<u64>,
    pub nodes_seen: Option<u64>,
    /// `(node, last seen Unix seconds)`.
    pub nodes_stopped: Vec<(String, f64)>,
    /// `(node, GPUs fewer than the period's most)`.
    pub gpus_dropped: Vec<(String, u64)>,
    /// `(node, gpu)` that stopped reporting or are down.
    pub gpus_missing: Vec<(String, String)>,
    pub xids: Vec<XidRow>,
    pub xids_by_code: BTreeMap<u32, u64>,
    /// `(node, gpu, count)`.
    pub ecc_uncorrectable: Vec<(String, String, u64)>,
    pub fleet_utilization: Option<f64>,
    /// `(node, idle GPU-hours)`, most idle first.
    pub idle_gpu_hours: Vec<(String, u64)>,
    pub idle_gpu_hours_total: Option<u64>,
    /// `(node, kills)`.
    pub oom_kills: Vec<(String, u64)>,
    /// Per node with OOM kills: the victims its agent still holds within
    /// the period, or why they are unknown (empty without `[agents]`).
    pub oom_victims: BTreeMap<String, Result<Vec<victims::OomVictim>, String>>,
    pub filesystems: Vec<FsRow>,
    /// Alert groups that fired in the period, by tier.
    pub alerts_by_tier: BTreeMap<String, u64>,
    /// Mean first notification → acknowledgement, seconds.
    pub mtta_secs: Option<f64>,
    /// Mean firing → resolved, seconds.
    pub mttr_secs: Option<f64>,
    pub still_firing: Option<u64>,
    pub dead_letters: Option<u64>,
    /// `(node, errors)` per kind: XIDs, uncorrectable ECC, NVLink + PCIe.
    pub errors_per_node: Vec<(String, [u64; 3])>,
    /// Fleet utilization over time: `(unix seconds, percent)`.
    pub utilization_series: Vec<(f64, f64)>,
    /// The node's name for each instance the report saw
    /// ([`NodeNames`]: the inventory's, else the one it derives, else the
    /// instance itself). The fields above are keyed by instance.
    pub node_names: BTreeMap<String, String>,
    /// GPUs lost in the period (fell off the bus, down, stopped
    /// reporting), one per fault with its evidence.
    pub lost_gpus: Vec<LostGpu>,
    /// Alert groups the MTTA mean covers (acknowledged in the period).
    pub mtta_groups: u64,
    /// Alert groups the MTTR mean covers (resolved in the period).
    pub mttr_groups: u64,
    /// Alert groups seen in the period (fired in it or still open in it).
    pub groups_in_period: u64,
    /// When every Prometheus query failed for one reason: that reason.
    pub prometheus_down: Option<String>,
    /// The fleet's availability in the period (`None`: unknown).
    pub availability: Option<out_of_service::Availability>,
}

impl Figures {
    /// What a person reads for `instance`: the node's name, else the
    /// instance.
    pub fn node_name<'a>(&'a self, instance: &'a str) -> &'a str {
        self.node_names
            .get(instance)
            .map(String::as_str)
            .unwrap_or(instance)
    }
}

/// One lost GPU (or a node's GPU count dropping with no GPU to pin it
/// on): one fault, one finding, whatever number of signals showed it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LostGpu {
    pub instance: String,
    /// The GPU's index; `None` when only the node's count showed it.
    pub gpu: Option<String>,
    /// The GPU's UUID where a series carried it.
    pub uuid: Option<String>,
    /// XID 79 (fell off the bus) in the period.
    pub xid79: u64,
    /// GPUs fewer on the node than the period's most (0: the count did
    /// not drop).
    pub fewer: u64,
    /// `(most in the period, now)` of the node's `gpu_devices`.
    pub devices: Option<(u64, u64)>,
    /// Its series stopped (it reported in the period, not at its end).
    pub stopped_reporting: bool,
    /// `gpu_up` is 0 at the period's end.
    pub down: bool,
}

/// What a computed report came to (`gpuops_reports_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// `only_if_findings` and nothing found: nothing sent.
    Empty,
    /// Some sections could not be computed (the report says which).
    Partial,
    /// No section could be computed: the report says only that it is blind.
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Empty => "empty",
            Outcome::Partial => "partial",
            Outcome::Failed => "failed",
        }
    }
}

/// What a report is computed from.
pub struct Inputs<'a> {
    pub config: &'a ReportConfig,
    /// `[prometheus] url`.
    pub prometheus_url: &'a str,
    /// The bot's store (the Incidents section); `None`: that section says
    /// there is no store.
    pub store: Option<&'a Store>,
    /// The period's end.
    pub at: DateTime<Utc>,
    /// Sent after its slot (the bot was down then).
    pub late: bool,
    /// Where OOM victims come from (the agents of `[agents]`:
    /// [`victims::AgentEvents`]); `None`: the Host lines point at the
    /// agent's `/v1/events` instead.
    pub agent_events: Option<&'a dyn victims::OomEvents>,
    /// Node names ([`node_names`] for a bot configuration).
    pub names: &'a NodeNames,
    /// `[lifecycle]`: GPUs per node and the availability objective.
    pub lifecycle: &'a LifecycleConfig,
}

/// A computed and rendered report.
#[derive(Debug, Clone)]
pub struct Built {
    pub message: ReportMessage,
    /// `report.md`.
    pub markdown: String,
    /// `report.html`: images by file name instead of `cid:`.
    pub preview_html: String,
    pub figures: Figures,
    pub sections: Vec<Section>,
    pub findings: usize,
    /// `section: what: why` for every query that failed.
    pub failures: Vec<String>,
    pub outcome: Outcome,
}

/// Computes and renders a report. Never fails as a whole: what could not
/// be computed is named in the report.
pub async fn build(inputs: Inputs<'_>) -> Built {
    let (sections, figures) = compute::compute(&inputs).await;
    let charts = chart::render_all(inputs.config, inputs.at, &figures);
    let findings: usize = sections.iter().map(|s| s.findings.len()).sum();
    let failures: Vec<String> = sections
        .iter()
        .flat_map(|s| {
            s.failures
                .iter()
                .map(move |f| format!("{}: {f}", s.kind.heading()))
        })
        .collect();
    let not_computed = sections
        .iter()
        .filter(|s| s.computed() == Computed::Not)
        .count();
    let outcome = if !sections.is_empty() && not_computed == sections.len() {
        Outcome::Failed
    } else if !failures.is_empty() {
        Outcome::Partial
    } else if inputs.config.only_if_findings && findings == 0 {
        Outcome::Empty
    } else {
        Outcome::Sent
    };
    let rendered = render::render(&inputs, &sections, &figures, charts);
    Built {
        message: rendered.message,
        markdown: rendered.markdown,
        preview_html: rendered.preview_html,
        figures,
        sections,
        findings,
        failures,
        outcome,
    }
}
