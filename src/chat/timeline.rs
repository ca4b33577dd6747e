//! What `gpuops audit --run ID` and `gpuops audit --group ID --markdown`
//! print: one run with every step's stored output, and an alert group's
//! incident timeline (alert received, messages posted, acknowledgements,
//! runs, approvals, steps with their output, resolution) as Markdown for a
//! post-mortem.
//!
//! Read-only: everything comes from the bot's store (the audit log, the
//! `chat_runs` and `chat_run_steps` tables, the group's history). Nothing
//! here posts, runs or changes anything.

use std::fmt::Write as _;

use crate::alert::{self, Links};
use crate::chat::approvals::StepRecord;
use crate::inventory::NodeNames;
use crate::notify::Message;
use crate::routing::Routing;
use crate::store::{self, AuditRecord, Store};

/// Nodes a timeline's header lists (the rest are counted).
const MAX_NODES_LISTED: usize = 50;

/// `gpuops status [NODE]`: what chat's `status` says from the store alone
/// (no AlertManager, no agents): the open groups, or one node's by its name
/// or instance; `Err` with "no node called X; known nodes: …" for a name it
/// cannot map.
pub fn status_text(
    groups: Vec<store::GroupRecord>,
    routing: &Routing,
    names: &NodeNames,
    node: Option<&str>,
) -> Result<String, String> {
    use crate::chat::handlers::{alerts_text_of, select_node, unknown_node_text};
    match node {
        Some(target) => match select_node(names, &groups, target) {
            Some(sel) => Ok(alerts_text_of(routing, groups, Some(&sel), names)),
            None => Err(unknown_node_text(names, &groups, target)),
        },
        None => Ok(alerts_text_of(routing, groups, None, names)),
    }
}

/// `gpuops audit --run ID`: the run, then each step with its output (nodes
/// named from alert labels and DNS only; see [`run_report_named`]).
pub fn run_report(store: &Store, id: &str) -> store::Result<Option<String>> {
    run_report_named(store, id, &NodeNames::default())
}

/// As [`run_report`], the run's node named by `names` (the inventory's),
/// its instance beside it.
pub fn run_report_named(
    store: &Store,
    id: &str,
    names: &NodeNames,
) -> store::Result<Option<String>> {
    let Some((run, steps)) = store.run_with_steps_blocking(id)? else {
        return Ok(None);
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "run {} of runbook {}: {}",
        run.id, run.runbook, run.status
    );
    let _ = writeln!(
        out,
        "requested by {} ({}){}",
        run.requester_name,
        run.requester_role,
        match run.group_id {
            Some(g) => format!(", alert group #{g}"),
            None => String::new(),
        }
    );
    let instance = run.labels.get("instance").map(String::as_str);
    let node = names
        .name_of(instance, &run.labels)
        .or_else(|| run.given.get("node").cloned());
    match (node, instance) {
        (Some(n), Some(i)) if n != i => {
            let _ = writeln!(out, "node {n} ({i})");
        }
        (Some(n), _) => {
            let _ = writeln!(out, "node {n}");
        }
        (None, Some(i)) => {
            let _ = writeln!(out, "instance {i}");
        }
        (None, None) => {}
    }
    for (k, v) in &run.given {
        let _ = writeln!(out, "  {k}={v}");
    }
    if steps.is_empty() {
        let _ = writeln!(out, "(no step has run yet)");
    }
    for s in &steps {
        let _ = writeln!(out, "\n== {}", step_line(s));
        let body = s.output.trim_end();
        if !body.is_empty() {
            let _ = writeln!(out, "{body}");
        }
        if s.truncated {
            let _ = writeln!(out, "[output truncated]");
        }
    }
    Ok(Some(out))
}

/// `gpuops audit --group ID --markdown`: the group's incident timeline
/// (nodes named from alert labels and DNS only; see [`group_markdown_named`]).
pub fn group_markdown(store: &Store, group: i64) -> store::Result<Option<String>> {
    group_markdown_named(store, group, &NodeNames::default())
}

/// As [`group_markdown`], the alert and its nodes named by `names` (the
/// inventory's), each instance beside its node.
pub fn group_markdown_named(
    store: &Store,
    group: i64,
    names: &NodeNames,
) -> store::Result<Option<String>> {
    let Some(history) = store.group_history_blocking(group)? else {
        return Ok(None);
    };
    let runs = store.runs_of_group_blocking(group)?;
    let audit = store.audit_since_blocking(history.first_seen - 1.0)?;
    let run_ids: Vec<&str> = runs.iter().map(|(r, _, _)| r.id.as_str()).collect();

    let mut events: Vec<(f64, String)> = Vec::new();
    for (i, (at, status)) in history.webhooks.iter().enumerate() {
        let what = if i == 0 {
            format!("alert received from AlertManager ({status})")
        } else if status == "resolved" {
            "AlertManager says the alert resolved".to_string()
        } else {
            format!("alert updated ({status})")
        };
        events.push((*at, what));
    }
    for (at, dest, channel) in &history.messages {
        let place = if dest.ends_with(channel.as_str()) {
            dest.clone()
        } else {
            format!("{dest} (channel {channel})")
        };
        events.push((*at, format!("alert message posted to {place}")));
    }
    for r in &audit {
        if let Some(line) = audit_line(r, group, &run_ids) {
            events.push((r.at, line));
        }
    }
    for (run, _, steps) in &runs {
        for s in steps {
            let mut line = format!("run `{}` step {}", run.id, step_line(s));
            let body = s.output.trim_end();
            if !body.is_empty() {
                let body = body.replace("```", "`\u{200b}``");
                let _ = write!(line, "\n\n  ```\n  {}\n  ```", body.replace('\n', "\n  "));
                if s.truncated {
                    line.push_str("\n  (output truncated)");
                }
            }
            events.push((s.at, line));
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));

    let g = &history.group;
    let mut out = String::new();
    let _ = writeln!(out, "# Incident timeline: alert group #{}", g.id);
    let _ = writeln!(out);
    let links = Links {
        names: names.clone(),
        ..Links::default()
    };
    if let Message::Alert(m) = alert::render_group(g, &Routing::default(), &links) {
        let _ = writeln!(out, "- Alert: {}", m.title);
        let mut nodes: Vec<String> = m.alerts.iter().filter_map(|a| a.where_text()).collect();
        nodes.sort();
        nodes.dedup();
        if !nodes.is_empty() {
            let more = nodes.len().saturating_sub(MAX_NODES_LISTED);
            nodes.truncate(MAX_NODES_LISTED);
            let mut list = nodes.join(", ");
            if more > 0 {
                let _ = write!(list, " … and {more} more nodes");
            }
            let _ = writeln!(out, "- Nodes: {list}");
        }
    }
    let _ = writeln!(out, "- Group: `{}`", g.group_key);
    let _ = writeln!(out, "- Tier: {}; status now: {}", g.tier, g.status);
    if let Some(a) = &g.ack {
        let _ = writeln!(out, "- Acknowledged by {} at {}", a.by, time(a.at));
    }
    let _ = writeln!(out, "- Runbook runs: {}", runs.len());
    let _ = writeln!(out);
    let _ = writeln!(out, "## Timeline (UTC)");
    let _ = writeln!(out);
    for (at, what) in &events {
        let _ = writeln!(out, "- {} {what}", time(*at));
    }
    if g.status == "resolved" {
        let _ = writeln!(out, "- {} group resolved", time(g.updated_at));
    }
    Ok(Some(out))
}

/// `look: succeeded (exit 0, 0.01s), approved by X`.
fn step_line(s: &StepRecord) -> String {
    let mut line = format!("`{}`: {}", s.step, s.status);
    let mut detail = Vec::new();
    if let Some(c) = s.exit_code {
        detail.push(format!("exit {c}"));
    }
    if s.duration_secs > 0.0 {
        detail.push(format!("{:.2}s", s.duration_secs));
    }
    if !detail.is_empty() {
        let _ = write!(line, " ({})", detail.join(", "));
    }
    if let Some(by) = &s.approved_by {
        let _ = write!(line, ", approved by {by}");
    }
    line
}

/// One timeline line for an audit record about this group or its runs.
fn audit_line(r: &AuditRecord, group: i64, runs: &[&str]) -> Option<String> {
    let p = &r.params;
    let run = p["run"].as_str().filter(|id| runs.contains(id));
    let about_group = p["group"].as_i64() == Some(group)
        || p["alert"].as_i64() == Some(group)
        || p["groups"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v.as_i64() == Some(group)))
        || r.target.as_deref() == Some(&format!("group:{group}"));
    let step = p["step"].as_str().unwrap_or("?");
    match r.action.as_str() {
        "ack" | "button_ack" if about_group && r.outcome.starts_with("ok") => {
            Some(format!("acknowledged by {}", r.who))
        }
        "silence" | "button_silence" if about_group && r.outcome.starts_with("ok") => {
            Some(format!("silenced by {} ({})", r.who, r.outcome))
        }
        "run" if about_group && r.outcome.starts_with("started") => Some(format!(
            "{} started runbook `{}`: {}",
            r.who,
            p["runbook"].as_str().unwrap_or("?"),
            r.outcome
        )),
        "run" if run.is_some() && r.outcome.starts_with("finished") => {
            let state: Vec<&str> = p["node_state"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            Some(format!(
                "run `{}` {}; node state: {}",
                run.unwrap_or("?"),
                r.outcome,
                state.join("; ")
            ))
        }
        "approval_requested" if run.is_some() => Some(format!(
            "run `{}` asks approval for step `{step}` (requested by {})",
            run.unwrap_or("?"),
            r.who
        )),
        "approve" | "deny" if run.is_some() => {
            let run = run.unwrap_or("?");
            Some(match (r.action.as_str(), r.outcome.as_str()) {
                ("approve", "approved") => {
                    format!("{} approved step `{step}` of run `{run}`", r.who)
                }
                ("deny", "denied") => format!("{} denied step `{step}` of run `{run}`", r.who),
                (action, outcome) => format!(
                    "{} tried to {action} step `{step}` of run `{run}`: {outcome}",
                    r.who
                ),
            })
        }
        "approval_expired" if run.is_some() => Some(format!(
            "nobody approved step `{step}` of run `{}` in time",
            run.unwrap_or("?")
        )),
        _ => None,
    }
}

fn time(at: f64) -> String {
    chrono::DateTime::from_timestamp(at as i64, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| at.to_string())
}
