//! Nodes found out of service by their scheduler, not by gpuops: a node
//! drained or down in Slurm (the agents' `gpuops_node_scheduler_state`,
//! `src/collector/node_state.rs`) or cordoned in Kubernetes
//! (kube-state-metrics' `kube_node_spec_unschedulable`), read from
//! Prometheus every `[lifecycle] found_interval`.
//!
//! - A node in service (or untracked) that its scheduler has out becomes
//!   `quarantined`, reason "found drained in Slurm: <Slurm's reason>" (by
//!   `slurm`, step `found-slurm`; or `kubernetes`, `found-kubernetes`),
//!   said in the report channels in one line.
//! - A node quarantined *only because it was found so* returns to service
//!   when that scheduler shows it back ("resumed in Slurm by hand").
//! - A node gpuops took out itself, or that awaits a repair, is never
//!   returned on the scheduler's word: its reminder says what the scheduler
//!   shows ([`Pass::notes`], `lifecycle::remind_due_noted`).
//!
//! Stale readings are never acted on: Prometheus answers only fresh series
//! (its lookback), a Slurm series counts only with the agent's
//! `gpuops_collector_success{collector="node_state"} == 1`, a query error
//! changes nothing (logged, `gpuops_node_found_checks_total{outcome="error"}`;
//! no answer is never "not drained", and no node returns while any read
//! failed). A node with a run in progress, or whose state changed within
//! `[lifecycle] found_hold` (a person, a runbook), is left alone; each
//! change is decided in the store against the row read
//! (`Transition::expect_updated_at`) and enqueued with its line in one
//! transaction, so replicas apply and say it once.
//!
//! Outside text (Slurm's reason, node names) passes through
//! [`crate::escape::line`]; the platforms' escaping is the notifiers'.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bot::state::BotState;
use crate::inventory::NodeNames;
use crate::lifecycle::{NodeRecord, NodeState, Transition};
use crate::report::prom::{Prometheus, Sample};

/// Slurm's state of each agent's node, 0 or 1 per state, only from agents
/// whose last reading succeeded.
pub const SLURM_STATES: &str = r#"gpuops_node_scheduler_state{scheduler="slurm"} and on (instance, job) gpuops_collector_success{collector="node_state"} == 1"#;

/// Slurm's drain reasons, from the same agents.
pub const SLURM_REASONS: &str = r#"gpuops_node_scheduler_info{scheduler="slurm"} and on (instance, job) gpuops_collector_success{collector="node_state"} == 1"#;

/// Kubernetes' cordons (kube-state-metrics): 1 cordoned, 0 schedulable.
pub const KUBE_CORDONS: &str = "kube_node_spec_unschedulable";

/// The deadline of one query.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a view comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scheduler {
    Slurm,
    Kubernetes,
}

impl Scheduler {
    pub const ALL: [Scheduler; 2] = [Scheduler::Slurm, Scheduler::Kubernetes];

    /// `slurm`, `kubernetes`: the `by` of the changes it makes.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Slurm => "slurm",
            Scheduler::Kubernetes => "kubernetes",
        }
    }

    /// The `step` of the changes it makes.
    pub fn step(self) -> &'static str {
        match self {
            Scheduler::Slurm => "found-slurm",
            Scheduler::Kubernetes => "found-kubernetes",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Scheduler::Slurm => "Slurm",
            Scheduler::Kubernetes => "Kubernetes",
        }
    }

    fn back_words(self) -> &'static str {
        match self {
            Scheduler::Slurm => "resumed in Slurm by hand",
            Scheduler::Kubernetes => "uncordoned in Kubernetes by hand",
        }
    }
}

/// What a scheduler shows of a node (`what`: gpuops' own words).
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// Drained, draining or down (Slurm), cordoned (Kubernetes); the
    /// scheduler's reason, if it gives one.
    Out {
        what: &'static str,
        reason: Option<String>,
    },
    /// Idle, allocated or mixed (Slurm), schedulable (Kubernetes).
    Back { what: &'static str },
}

/// A scheduler's view: node (the inventory's name) → what it shows.
pub type View = BTreeMap<String, Seen>;

/// What one pass found and did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Pass {
    /// Nodes this pass moved to `quarantined`.
    pub quarantined: Vec<String>,
    /// Nodes this pass returned to service.
    pub returned: Vec<String>,
    /// Nodes out of service that a scheduler shows back ("Slurm shows it
    /// idle"), for their reminder.
    pub notes: BTreeMap<String, String>,
    /// Schedulers whose view could not be read, and why.
    pub errors: Vec<(Scheduler, String)>,
}

/// One agent's states at 1, and its drain reason.
type AgentReading = (BTreeSet<&'static str>, Option<String>);

const SLURM_OUT: [&str; 4] = ["drain", "drained", "draining", "down"];
const SLURM_BACK: [&str; 3] = ["idle", "allocated", "mixed"];

/// Slurm's view: per agent (`instance`, `job`), the states at 1; a node
/// is out when drained, draining or down, back when idle, allocated or
/// mixed and none of those. An agent the inventory cannot name is left out.
pub async fn read_slurm(prom: &Prometheus, names: &NodeNames, at: f64) -> Result<View, String> {
    let states = prom.instant(SLURM_STATES, at).await?;
    let reasons = prom.instant(SLURM_REASONS, at).await?;
    let key = |s: &Sample| (s.label("instance").to_string(), s.label("job").to_string());
    let mut on: BTreeMap<(String, String), AgentReading> = BTreeMap::new();
    for s in &states {
        let e = on.entry(key(s)).or_default();
        let state = s.label("state");
        if s.value == 1.0 {
            if let Some(known) = SLURM_OUT.iter().chain(&SLURM_BACK).find(|k| **k == state) {
                e.0.insert(known);
            }
        }
    }
    for s in &reasons {
        if let Some(e) = on.get_mut(&key(s)) {
            e.1 = s
                .labels
                .get("reason")
                .map(|r| crate::escape::line(r))
                .filter(|r| !r.trim().is_empty());
        }
    }
    let mut view = View::new();
    for s in &states {
        let Some((set, reason)) = on.remove(&key(s)) else {
            continue;
        };
        let Some(node) = names
            .name_of(s.labels.get("instance").map(String::as_str), &s.labels)
            .filter(|n| crate::exec_auth::is_node_name(n))
        else {
            continue;
        };
        let seen = if let Some(what) = ["drained", "draining", "drain", "down"]
            .into_iter()
            .find(|w| set.contains(w))
        {
            Seen::Out {
                what: if what == "down" { "down" } else { "drained" },
                reason,
            }
        } else if let Some(what) = SLURM_BACK.into_iter().find(|w| set.contains(w)) {
            Seen::Back { what }
        } else {
            continue;
        };
        view.insert(node, seen);
    }
    Ok(view)
}

/// Kubernetes' view: kube-state-metrics' `node` label is the Kubernetes
/// node name; it names a node when it is, or its first DNS label is, a
/// node the inventory knows or gpuops tracks (`known`). Others (a cordoned
/// CPU node) are left out.
pub async fn read_kubernetes(
    prom: &Prometheus,
    known: &BTreeSet<String>,
    at: f64,
) -> Result<View, String> {
    let rows = prom.instant(KUBE_CORDONS, at).await?;
    let mut view = View::new();
    for s in rows {
        let Some(k8s) = s.labels.get("node") else {
            continue;
        };
        let short = k8s.split('.').next().unwrap_or_default();
        let Some(node) = [k8s.as_str(), short]
            .into_iter()
            .find(|n| known.contains(*n) && crate::exec_auth::is_node_name(n))
        else {
            continue;
        };
        let seen = if s.value == 1.0 {
            Seen::Out {
                what: "cordoned",
                reason: None,
            }
        } else if s.value == 0.0 {
            Seen::Back {
                what: "schedulable",
            }
        } else {
            continue;
        };
        // A node seen twice (two kube-state-metrics): cordoned wins.
        if !matches!(view.get(node), Some(Seen::Out { .. })) {
            view.insert(node.to_string(), seen);
        }
    }
    Ok(view)
}

/// One pass: reads each scheduler's view from `prom` at `now` and applies
/// what it says to the store (see the module's rules); the changes are
/// enqueued to the report channels (`lifecycle::report_channels`). A store
/// error ends the pass (nothing half-said: each change and its line are
/// one transaction).
pub async fn found_pass(
    state: &BotState,
    prom: &Prometheus,
    now: f64,
) -> crate::store::Result<Pass> {
    let cfg = &state.config.lifecycle;
    let channels = crate::lifecycle::report_channels(&state.config);
    let names = state.identity.names().await;
    let rows: BTreeMap<String, NodeRecord> = state
        .store
        .node_states()
        .await?
        .into_iter()
        .map(|r| (r.node.clone(), r))
        .collect();
    let mut pass = Pass::default();
    let mut views: Vec<(Scheduler, View)> = Vec::new();
    for s in Scheduler::ALL {
        let read = match s {
            Scheduler::Slurm => read_slurm(prom, &names, now).await,
            Scheduler::Kubernetes => {
                let mut known: BTreeSet<String> = names.known_nodes().into_iter().collect();
                known.extend(rows.keys().cloned());
                read_kubernetes(prom, &known, now).await
            }
        };
        let outcome = match read {
            Ok(v) => {
                views.push((s, v));
                "ok"
            }
            Err(e) => {
                tracing::warn!(scheduler = s.as_str(), error = %e, "cannot read which nodes the scheduler has out: nothing changed");
                pass.errors.push((s, e));
                "error"
            }
        };
        state
            .metrics
            .found_checks
            .with_label_values(&[s.as_str(), outcome])
            .inc();
    }
    if views.iter().all(|(_, v)| v.is_empty()) {
        return Ok(pass);
    }
    let busy = busy_nodes(state, &names).await?;
    let hold = cfg.found_hold.as_secs_f64();
    let nodes: BTreeSet<&String> = views.iter().flat_map(|(_, v)| v.keys()).collect();
    for node in nodes {
        let row = rows.get(node.as_str());
        if busy.contains(node.as_str()) || row.is_some_and(|r| now - r.updated_at < hold) {
            continue;
        }
        let seen: Vec<(Scheduler, &Seen)> = views
            .iter()
            .filter_map(|(s, v)| v.get(node.as_str()).map(|seen| (*s, seen)))
            .collect();
        let out = seen.iter().find_map(|(s, x)| match x {
            Seen::Out { what, reason } => Some((*s, *what, reason)),
            Seen::Back { .. } => None,
        });
        let back = |sched: Scheduler| {
            seen.iter().find_map(|(s, x)| match x {
                Seen::Back { what } if *s == sched => Some(*what),
                _ => None,
            })
        };
        let current = row.map(|r| r.state).unwrap_or(NodeState::InService);
        match (current, out, row) {
            (NodeState::InService, Some((s, what, reason)), _) => {
                if quarantine(state, node, row, s, what, reason.as_deref(), &channels, now).await? {
                    pass.quarantined.push(node.clone());
                }
            }
            (NodeState::InService, None, _) | (_, _, None) => {}
            (_, Some(_), Some(_)) => {}
            (_, None, Some(r)) => {
                let found_by = Scheduler::ALL.into_iter().find(|s| {
                    r.state == NodeState::Quarantined && r.step.as_deref() == Some(s.step())
                });
                match found_by {
                    Some(s) => {
                        if let (Some(what), true) = (back(s), pass.errors.is_empty()) {
                            if release(state, r, s, what, &channels, now).await? {
                                pass.returned.push(node.clone());
                            }
                        }
                    }
                    None => {
                        if let Some(note) = Scheduler::ALL
                            .into_iter()
                            .find_map(|s| back(s).map(|w| format!("{} shows it {w}", s.title())))
                        {
                            pass.notes.insert(node.clone(), note);
                        }
                    }
                }
            }
        }
    }
    Ok(pass)
}

/// The nodes of the runs in progress: their `node` parameter, the alert's
/// `node` label, and the inventory's name for the alert's instance.
async fn busy_nodes(state: &BotState, names: &NodeNames) -> crate::store::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for (given, labels) in state.store.active_runs().await? {
        out.extend(given.get("node").cloned());
        out.extend(labels.get("node").cloned());
        out.extend(names.name_of(labels.get("instance").map(String::as_str), &labels));
    }
    Ok(out)
}

fn text_body(text: String) -> String {
    let msg = crate::message::Message::Text(crate::message::TextMessage::new(text, None));
    serde_json::to_string(&msg).unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn quarantine(
    state: &BotState,
    node: &str,
    row: Option<&NodeRecord>,
    s: Scheduler,
    what: &str,
    reason: Option<&str>,
    channels: &[String],
    now: f64,
) -> crate::store::Result<bool> {
    let cfg = &state.config.lifecycle;
    let found = format!("found {what} in {}", s.title());
    let stored = match reason {
        Some(r) => format!("{found}: {}", crate::escape::line(r)),
        None => found.clone(),
    };
    let esc = crate::escape::line(node);
    let line = format!(
        "🔎 {esc} {}: now quarantined (was in service); gpuops returns it to service when {} shows it back. `/gpuops nodes` lists the nodes out.",
        match reason {
            Some(r) => format!("{found} ({})", crate::escape::line(r)),
            None => found,
        },
        s.title()
    );
    let t = Transition {
        node: node.to_string(),
        to: Some(NodeState::Quarantined),
        from: vec![NodeState::InService],
        at: now,
        reason: stored,
        step: Some(s.step().into()),
        by: Some(s.as_str().into()),
        gpus: if row.is_some() {
            0
        } else {
            i64::from(cfg.gpus_per_node)
        },
        repeat_window_secs: cfg.repeat_window.as_secs_f64(),
        expect_updated_at: Some(row.map(|r| r.updated_at).unwrap_or(0.0)),
        ..Transition::default()
    };
    let a = state
        .store
        .node_transition_announced(t, text_body(line), channels.to_vec())
        .await?;
    if a.changed {
        tracing::info!(
            node,
            scheduler = s.as_str(),
            "node found out of service by its scheduler: quarantined"
        );
    }
    Ok(a.changed)
}

async fn release(
    state: &BotState,
    r: &NodeRecord,
    s: Scheduler,
    what: &str,
    channels: &[String],
    now: f64,
) -> crate::store::Result<bool> {
    let why = format!("{} ({} shows it {what})", s.back_words(), s.title());
    let line = format!(
        "📍 {} is back in service (was quarantined, {}): {why}; {:.1} GPU-hours lost while out",
        crate::escape::line(&r.node),
        crate::escape::line(&r.reason),
        crate::lifecycle::gpu_hours_lost(r, now),
    );
    let t = Transition {
        node: r.node.clone(),
        to: Some(NodeState::InService),
        from: vec![NodeState::Quarantined],
        at: now,
        reason: why,
        step: Some(s.step().into()),
        by: Some(s.as_str().into()),
        expect_updated_at: Some(r.updated_at),
        ..Transition::default()
    };
    let a = state
        .store
        .node_transition_announced(t, text_body(line), channels.to_vec())
        .await?;
    if a.changed {
        tracing::info!(node = %r.node, scheduler = s.as_str(), "node back in its scheduler: returned to service");
    }
    Ok(a.changed)
}

/// The bot's lifecycle task: every `lifecycle::REMIND_POLL` (or half
/// `remind_after` when shorter, at least every second), a found pass
/// when `[lifecycle] found_interval` has passed (with `[prometheus] url`
/// and `found` on), then the reminders with what the schedulers show
/// (`lifecycle::remind_due_noted`). Notes older than two intervals are
/// dropped (never a stale view in a reminder).
pub fn spawn(state: Arc<BotState>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let channels = crate::lifecycle::report_channels(&state.config);
    let cfg = state.config.lifecycle.clone();
    let prom = state
        .config
        .prometheus
        .as_ref()
        .filter(|_| cfg.found)
        .and_then(|p| match Prometheus::new(&p.url, QUERY_TIMEOUT) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "nodes found out of service by their scheduler are not read");
                None
            }
        });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(crate::lifecycle::remind_poll(cfg.remind_after));
        let mut last: Option<Instant> = None;
        let mut notes: (Option<Instant>, BTreeMap<String, String>) = (None, BTreeMap::new());
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Some(p) = &prom {
                if last.is_none_or(|t| t.elapsed() >= cfg.found_interval) {
                    last = Some(Instant::now());
                    match found_pass(&state, p, crate::store::now()).await {
                        Ok(pass) => {
                            if !pass.quarantined.is_empty() || !pass.returned.is_empty() {
                                state.outbox.wake();
                            }
                            notes = (Some(Instant::now()), pass.notes);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot apply the schedulers' view of the nodes")
                        }
                    }
                }
            }
            if notes
                .0
                .is_some_and(|t| t.elapsed() > 2 * cfg.found_interval)
            {
                notes = (None, BTreeMap::new());
            }
            match crate::lifecycle::remind_due_noted(
                &state.store,
                &cfg,
                &channels,
                crate::store::now(),
                &notes.1,
            )
            .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(reminders = n, "reminded of nodes left out of service");
                    state.outbox.wake();
                }
                Err(e) => tracing::warn!(error = %e, "cannot look for nodes left out of service"),
            }
        }
    });
}
