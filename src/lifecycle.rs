//! Nodes out of service: every node gpuops drains, from the fault to its
//! return. A node is `in service`, `quarantined` (drained or cordoned),
//! `awaiting repair` (hardware must be replaced) or `verifying`; each state
//! records since when, why (alert, XID, step), the run and the person.
//!
//! Transitions come from runbook step outcomes ([`on_step`]: a mitigation's
//! `node_state` on success, `node_state_on_failure` on failure) and from
//! chat (`/gpuops node <name> awaiting-repair|return`, [`set_by_person`]);
//! the store decides each against the state it holds
//! (`store::lifecycle::decide`), so replicas never apply one twice. This
//! module turns rows into what people read (`/gpuops nodes`, `gpuops nodes`:
//! [`nodes_text`]) and what Prometheus scrapes ([`gauges`]); it holds no
//! state and writes no SQL.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::config::bot::LifecycleConfig;
use crate::runbook::engine::{PlannedStep, RunPlan, StepOutcome, StepStatus};
pub use crate::store::lifecycle::{Applied, NodeRecord, NodeState, Transition, TransitionRecord};
use crate::store::Store;

/// Who and what a step outcome belongs to.
#[derive(Debug, Clone, Copy)]
pub struct StepContext<'a> {
    pub run: &'a str,
    /// The alert group whose thread is the incident timeline.
    pub group: Option<i64>,
    /// The person who acted (the approver of an approved step, else the
    /// requester).
    pub by: &'a str,
    pub at: f64,
}

/// The state a step's outcome puts its node in, if any: a mitigation's
/// `node_state` when it succeeded, `node_state_on_failure` when it failed
/// or timed out.
pub fn state_after(ps: &PlannedStep, out: &StepOutcome) -> Option<NodeState> {
    match out.status {
        StepStatus::Succeeded => ps.step.node_state,
        StepStatus::Failed | StepStatus::TimedOut => ps.step.node_state_on_failure,
        _ => None,
    }
}

/// The node a run acts on: its `node` parameter (the inventory's name),
/// else the alert's `node` label.
pub fn node_of(plan: &RunPlan) -> Option<String> {
    plan.params
        .get("node")
        .or_else(|| plan.labels.get("node").map(String::as_str))
        .filter(|n| crate::exec_auth::is_node_name(n))
        .map(str::to_string)
}

/// Records what a step's outcome says about its node (nothing when the
/// step sets no state, or the node is already there). Store errors are
/// logged: the run goes on.
pub async fn on_step(
    store: &Store,
    cfg: &LifecycleConfig,
    plan: &RunPlan,
    ps: &PlannedStep,
    out: &StepOutcome,
    ctx: StepContext<'_>,
) -> Option<Applied> {
    let to = state_after(ps, out)?;
    let node = node_of(plan)?;
    let label = |k: &str| plan.labels.get(k).filter(|v| !v.is_empty()).cloned();
    let alert = label("alertname");
    let xid = label("xid");
    let mut reason = format!(
        "{} {} ({})",
        ps.step.name,
        match out.status {
            StepStatus::Succeeded => "succeeded",
            other => other.as_reason(),
        },
        plan.runbook.id
    );
    if let Some(a) = &alert {
        let _ = write!(reason, ": {a}");
    }
    if let Some(x) = &xid {
        let _ = write!(reason, " XID {x}");
    }
    if let Some(g) = label("gpu") {
        let _ = write!(reason, " on GPU {g}");
    }
    let t = Transition {
        node,
        to: Some(to),
        from: Vec::new(),
        at: ctx.at,
        reason,
        alert,
        xid,
        step: Some(ps.step.name.clone()),
        run: Some(ctx.run.to_string()),
        by: Some(ctx.by.to_string()),
        gpus: i64::from(cfg.gpus_per_node),
        group_id: ctx.group,
        repeat_window_secs: cfg.repeat_window.as_secs_f64(),
        expect_updated_at: None,
    };
    match store.node_transition(t).await {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(error = %e, run = ctx.run, "cannot record the node's state");
            None
        }
    }
}

/// A person sets a node's state from chat: `awaiting repair` from any
/// state, `in service` (return) only from a state out of service.
pub async fn set_by_person(
    store: &Store,
    cfg: &LifecycleConfig,
    node: &str,
    to: NodeState,
    reason: &str,
    by: &str,
    at: f64,
) -> crate::store::Result<Applied> {
    store
        .node_transition(Transition {
            node: node.to_string(),
            to: Some(to),
            from: Vec::new(),
            at,
            reason: reason.to_string(),
            step: Some("chat".into()),
            by: Some(by.to_string()),
            gpus: i64::from(cfg.gpus_per_node),
            repeat_window_secs: cfg.repeat_window.as_secs_f64(),
            ..Transition::default()
        })
        .await
}

/// The incident timeline's line for a change (None: nothing changed):
/// the node's new state, and on a return the stretch's GPU-hours.
pub fn change_line(a: &Applied) -> Option<String> {
    let row = a.row.as_ref().filter(|_| a.changed)?;
    let node = crate::escape::line(&row.node);
    Some(match a.lost_gpu_seconds {
        Some(lost) => format!(
            "📍 {node} is back in service (was {}): {:.1} GPU-hours lost while out",
            a.from.words(),
            lost / 3600.0
        ),
        None => format!(
            "📍 {node} is now {} (was {}): {}{}",
            row.state.words(),
            a.from.words(),
            crate::escape::line(&row.reason),
            if row.repeat {
                " 🔁 It failed again with the same fault soon after its return: replace the hardware rather than return it (`/gpuops node … awaiting-repair \"RMA …\"`)."
            } else {
                ""
            }
        ),
    })
}

/// A reminder is repeated at most this often.
pub const REMIND_EVERY: Duration = Duration::from_secs(86_400);

/// How often the reminder task looks for nodes left out, at most.
pub const REMIND_POLL: Duration = Duration::from_secs(60);

/// How often the reminder task looks: every [`REMIND_POLL`], or every half
/// `remind_after` when that is shorter (at least every second), so a
/// reminder is never later than half its own delay.
pub fn remind_poll(remind_after: Duration) -> Duration {
    (remind_after / 2).clamp(Duration::from_secs(1), REMIND_POLL)
}

/// The reminder for a node left out of service.
pub fn reminder_text(r: &NodeRecord, now: f64) -> String {
    let node = crate::escape::line(&r.node);
    format!(
        "⏰ {node} has been {} for {} with nothing done since ({}; last: {} by {}); {:.1} GPU-hours lost so far.{} Return it (`/gpuops node {node} return`) or mark it awaiting repair (`/gpuops node {node} awaiting-repair \"RMA …\"`).",
        r.state.words(),
        ago(now - r.since),
        crate::escape::line(&r.reason),
        r.step.as_deref().map(crate::escape::line).unwrap_or_else(|| "?".into()),
        r.by.as_deref().map(crate::escape::line).unwrap_or_else(|| "?".into()),
        gpu_hours_lost(r, now),
        if r.repeat { " 🔁 A repeat of the same fault: replace the hardware." } else { "" },
    )
}

/// The reminder for a node out of service that its scheduler shows back
/// (`note`: "Slurm shows it idle", from `src/found.rs`, gpuops' own words):
/// gpuops does not return a node it took out itself, or that awaits a
/// repair, on the scheduler's word; a person says whether it is repaired.
pub fn reminder_text_noted(r: &NodeRecord, now: f64, note: &str) -> String {
    let node = crate::escape::line(&r.node);
    let hint = format!(
        " {note}, gpuops still tracks it {}: `/gpuops node {node} return` if {}.",
        r.state.words(),
        if r.state == NodeState::AwaitingRepair {
            "repaired"
        } else {
            "it is back"
        }
    );
    if r.state == NodeState::AwaitingRepair {
        format!(
            "⏰ {node} has been awaiting repair for {} ({}; last: {} by {}); {:.1} GPU-hours lost so far.{hint}",
            ago(now - r.since),
            crate::escape::line(&r.reason),
            r.step.as_deref().map(crate::escape::line).unwrap_or_else(|| "?".into()),
            r.by.as_deref().map(crate::escape::line).unwrap_or_else(|| "?".into()),
            gpu_hours_lost(r, now),
        )
    } else {
        format!("{}{hint}", reminder_text(r, now))
    }
}

/// Where reminders go besides the incident thread: the Slack and Discord
/// channels of every `[[reports]]` entry (destination keys, once each).
pub fn report_channels(cfg: &crate::config::bot::BotConfig) -> Vec<String> {
    let mut out: Vec<String> = cfg
        .reports
        .iter()
        .flat_map(|r| r.targets())
        .filter(|t| {
            matches!(
                t,
                crate::config::routing::Target::Slack(_)
                    | crate::config::routing::Target::Discord(_)
            )
        })
        .map(|t| t.key())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Claims and enqueues every reminder due at `now`: a node quarantined or
/// verifying for `remind_after` with no change since, at most once per
/// [`REMIND_EVERY`], in its incident thread and to each of `channels` (the
/// report channels, [`report_channels`]). The claim is the store's (one
/// conditional UPDATE in the transaction that enqueues), so a restart or a
/// second replica never sends one twice. Returns how many were claimed.
pub async fn remind_due(
    store: &Store,
    cfg: &LifecycleConfig,
    channels: &[String],
    now: f64,
) -> crate::store::Result<usize> {
    remind_due_noted(store, cfg, channels, now, &BTreeMap::new()).await
}

/// [`remind_due`] with what the nodes' schedulers show (`notes`: node →
/// "Slurm shows it idle", for nodes out of service that a scheduler shows
/// back; `src/found.rs`): such a node's reminder says so, and a node
/// awaiting repair gets one too (after `remind_after`, at most daily).
pub async fn remind_due_noted(
    store: &Store,
    cfg: &LifecycleConfig,
    channels: &[String],
    now: f64,
    notes: &BTreeMap<String, String>,
) -> crate::store::Result<usize> {
    let min_age = cfg.remind_after.as_secs_f64();
    let gap = REMIND_EVERY.as_secs_f64();
    let mut sent = 0;
    for r in store.node_states().await? {
        let note = notes.get(&r.node);
        let due = (matches!(r.state, NodeState::Quarantined | NodeState::Verifying)
            || (note.is_some() && r.state == NodeState::AwaitingRepair))
            && now - r.since >= min_age
            && r.reminded_at.is_none_or(|t| now - t >= gap);
        if !due {
            continue;
        }
        let text = match note {
            Some(n) => reminder_text_noted(&r, now, n),
            None => reminder_text(&r, now),
        };
        let msg = crate::message::Message::Text(crate::message::TextMessage::new(text, None));
        let body = serde_json::to_string(&msg).unwrap_or_default();
        let (node, ch) = (r.node.clone(), channels.to_vec());
        let claimed = if r.state == NodeState::AwaitingRepair {
            store
                .claim_node_notice(node, r.since, now, min_age, gap, body, ch)
                .await?
        } else {
            store
                .claim_node_reminder(node, r.since, now, min_age, gap, body, ch)
                .await?
        };
        if claimed {
            sent += 1;
        }
    }
    Ok(sent)
}

/// The advice for a run on a node that fails again with the same fault
/// (the alert's name or XID) within `repeat_window` of its last return, or
/// that is out of service flagged as a repeat: replace the hardware rather
/// than reset or reboot it again. `None`: not a repeat (or the store cannot
/// say; logged).
pub async fn repeat_advice(
    store: &Store,
    cfg: &LifecycleConfig,
    plan: &RunPlan,
    now: f64,
) -> Option<String> {
    let node = node_of(plan)?;
    let window = cfg.repeat_window.as_secs_f64();
    if window <= 0.0 {
        return None;
    }
    let label = |k: &str| plan.labels.get(k).filter(|v| !v.is_empty()).cloned();
    let (alert, xid) = (label("alertname"), label("xid"));
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    let last = match store.node_last_return(node.clone(), now - window).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, node = %node, "cannot read the node's last return");
            return None;
        }
    };
    let (last, fault_xid, fault_alert) = match last {
        Some(l) if same(&l.xid, &xid) || same(&l.alert, &alert) => {
            let x = l.xid.clone().filter(|_| same(&l.xid, &xid));
            let a = l.alert.clone();
            (l, x, a)
        }
        _ => {
            // Out of service and flagged a repeat when it left.
            let rows = store.node_states().await.ok()?;
            let row = rows
                .into_iter()
                .find(|r| r.node == node && r.repeat && r.state != NodeState::InService)?;
            let l = store.node_last_return(node.clone(), 0.0).await.ok()??;
            (l, row.xid, row.alert)
        }
    };
    let fault = match (fault_xid, fault_alert) {
        (Some(x), _) => format!("XID {}", crate::escape::line(&x)),
        (None, Some(a)) => crate::escape::line(&a),
        (None, None) => "the same fault".into(),
    };
    Some(format!(
        "🔁 {} is a repeat of {fault} within {} of its return on {}: replace the hardware (RMA) rather than reset/reboot again (`/gpuops node {} awaiting-repair \"RMA …\"`)",
        crate::escape::line(&node),
        window_words(cfg.repeat_window),
        utc(last.at).get(..10).unwrap_or_default(),
        crate::escape::line(&node),
    ))
}

/// A window in words: "7 days", "12 h".
fn window_words(d: Duration) -> String {
    let s = d.as_secs();
    match (s % 86_400, s / 86_400, s / 3600) {
        (0, 1, _) => "1 day".into(),
        (0, n, _) => format!("{n} days"),
        (_, _, h) if s % 3600 == 0 => format!("{h} h"),
        _ => ago(s as f64),
    }
}

/// GPU-hours a node has been out of service in its current stretch.
pub fn gpu_hours_lost(row: &NodeRecord, now: f64) -> f64 {
    row.out_since
        .map(|s| (now - s).max(0.0) * row.gpus as f64 / 3600.0)
        .unwrap_or(0.0)
}

/// The nodes not in service, most GPU-hours lost first (then by name).
pub fn out_of_service(rows: &[NodeRecord], now: f64) -> Vec<&NodeRecord> {
    let mut out: Vec<&NodeRecord> = rows
        .iter()
        .filter(|r| r.state != NodeState::InService)
        .collect();
    out.sort_by(|a, b| {
        gpu_hours_lost(b, now)
            .total_cmp(&gpu_hours_lost(a, now))
            .then_with(|| a.node.cmp(&b.node))
    });
    out
}

/// `/gpuops nodes` and `gpuops nodes`: one line per node not in service.
/// Values from outside (names, reasons, people) pass through
/// [`crate::escape::line`]; the chat platform's escaping is applied to the
/// whole reply at the wire.
pub fn nodes_text(rows: &[NodeRecord], now: f64) -> String {
    let out = out_of_service(rows, now);
    if out.is_empty() {
        return "✅ every tracked node is in service".into();
    }
    let total: f64 = out.iter().map(|r| gpu_hours_lost(r, now)).sum();
    let gpus: i64 = out.iter().map(|r| r.gpus).sum();
    let mut s = format!(
        "{} node{} out of service ({gpus} GPUs, {total:.1} GPU-hours lost so far):",
        out.len(),
        if out.len() == 1 { "" } else { "s" }
    );
    for r in out {
        let esc = |v: &Option<String>| v.as_deref().map(crate::escape::line);
        let _ = write!(
            s,
            "\n• {}{} · {} GPUs · {} since {} ({}) · {} · last: {} by {}{} · {:.1} GPU-hours lost",
            crate::escape::line(&r.node),
            if r.repeat { " 🔁 repeat" } else { "" },
            r.gpus,
            r.state.words(),
            utc(r.since),
            ago(now - r.since),
            crate::escape::line(&r.reason),
            esc(&r.step).unwrap_or_else(|| "?".into()),
            esc(&r.by).unwrap_or_else(|| "?".into()),
            esc(&r.run)
                .map(|run| format!(" (run {run})"))
                .unwrap_or_default(),
            gpu_hours_lost(r, now),
        );
    }
    s
}

/// Nodes per state, and `(node, state, seconds out)` per node out of service.
pub type Gauges = (Vec<(NodeState, i64)>, Vec<(String, NodeState, f64)>);

/// The bot's gauges: nodes per state (every state, zero included), and
/// each node out of service with the seconds of its current stretch.
pub fn gauges(rows: &[NodeRecord], now: f64) -> Gauges {
    let mut per: BTreeMap<NodeState, i64> = NodeState::ALL.iter().map(|s| (*s, 0)).collect();
    let mut out = Vec::new();
    for r in rows {
        *per.entry(r.state).or_default() += 1;
        if let Some(since) = r.out_since {
            out.push((r.node.clone(), r.state, (now - since).max(0.0)));
        }
    }
    (per.into_iter().collect(), out)
}

/// Sets the bot's node gauges from the store (each `/metrics` scrape); a
/// store error leaves the last values and is logged.
pub async fn export(store: &Store, metrics: &crate::bot::state::BotMetrics) {
    let rows = match store.node_states().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read node states for /metrics");
            return;
        }
    };
    let now = crate::store::now();
    let (per, out) = gauges(&rows, now);
    let per: Vec<(&str, i64)> = per.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let out: Vec<(&str, &str, f64)> = out
        .iter()
        .map(|(n, s, secs)| (n.as_str(), s.as_str(), *secs))
        .collect();
    metrics.set_nodes(&per, &out);
}

fn utc(t: f64) -> String {
    let secs = if t.is_finite() && t > 0.0 {
        t as u64
    } else {
        0
    };
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

fn ago(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m}m"),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(node: &str, state: NodeState, out_since: f64, gpus: i64) -> NodeRecord {
        NodeRecord {
            node: node.into(),
            state,
            since: out_since,
            out_since: (state != NodeState::InService).then_some(out_since),
            reason: "drain-slurm succeeded".into(),
            alert: None,
            xid: None,
            step: Some("drain-slurm".into()),
            run: Some("r0a1b2c".into()),
            by: Some("alice".into()),
            gpus,
            group_id: None,
            updated_at: out_since,
            repeat: false,
            reminded_at: None,
        }
    }

    #[test]
    fn nodes_are_listed_by_gpu_hours_lost_and_one_line_each() {
        let now = 100_000.0;
        let mut evil = row("gpu-node-3", NodeState::Verifying, now - 3600.0, 8);
        evil.reason = "RMA\n<!channel>".into();
        let rows = vec![
            row("gpu-node-1", NodeState::Quarantined, now - 7200.0, 4),
            row("gpu-node-2", NodeState::AwaitingRepair, now - 7200.0, 8),
            evil,
            row("gpu-node-4", NodeState::InService, now - 99.0, 8),
        ];
        let text = nodes_text(&rows, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].starts_with("3 nodes out of service (20 GPUs, 32.0 GPU-hours"),
            "{text}"
        );
        assert!(
            lines[1].contains("gpu-node-2 · 8 GPUs · awaiting repair since"),
            "{text}"
        );
        assert!(lines[1].ends_with("16.0 GPU-hours lost"), "{text}");
        assert!(lines[2].contains("gpu-node-1"), "{text}");
        assert!(lines[3].contains("RMA <!channel>"), "{text}");
        assert!(
            lines[3].contains("last: drain-slurm by alice (run r0a1b2c)"),
            "{text}"
        );
        let (per, out) = gauges(&rows, now);
        assert_eq!(per.len(), 4);
        assert!(per.contains(&(NodeState::InService, 1)));
        assert_eq!(out.len(), 3);
    }
}
