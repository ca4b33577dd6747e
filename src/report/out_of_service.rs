//! The report's "Out of service" lines (in the Incidents section), from
//! the bot's store (`src/lifecycle.rs`): the nodes not in service at the
//! period's end (nodes, GPUs, the oldest first, repeats flagged) and the
//! GPU-hours lost within the period and over the stretches it touches;
//! and the fleet's availability (GPU-hours in service over GPU-hours owned
//! in the period) against `[lifecycle] availability_objective`, with the
//! share of the period's error budget used. The GPUs owned are the
//! inventory's nodes and the tracked ones, each with its recorded GPUs (else
//! `gpus_per_node`); with neither, or a store that cannot be read, the
//! report says availability is unknown (never a false 100 %). The SQL is
//! `store/lifecycle.rs`.

use crate::lifecycle::{NodeRecord, NodeState, TransitionRecord};
use crate::report::render::fmt_local;
use crate::report::{Figures, Inputs, Line, Section};
use crate::store::Store;

/// The fleet's availability in a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Availability {
    /// GPU-hours in service over GPU-hours owned (0..=1).
    pub ratio: f64,
    /// The objective (`[lifecycle] availability_objective`).
    pub objective: f64,
    /// GPU-hours lost over the budget the objective allows (1.0: all of
    /// it; above 1: overspent).
    pub budget_used: f64,
    pub owned_gpus: u64,
    pub lost_gpu_hours: f64,
    pub owned_gpu_hours: f64,
}

/// Availability from the GPU-hours lost in a period of `period_secs` by a
/// fleet of `owned_gpus`; `None` without GPUs or a period.
pub fn availability(
    lost_gpu_hours: f64,
    owned_gpus: u64,
    period_secs: f64,
    objective: f64,
) -> Option<Availability> {
    let owned_gpu_hours = owned_gpus as f64 * period_secs / 3600.0;
    if owned_gpu_hours <= 0.0 {
        return None;
    }
    let ratio = (1.0 - lost_gpu_hours / owned_gpu_hours).clamp(0.0, 1.0);
    let budget = (1.0 - objective) * owned_gpu_hours;
    Some(Availability {
        ratio,
        objective,
        budget_used: if budget > 0.0 {
            lost_gpu_hours / budget
        } else {
            0.0
        },
        owned_gpus,
        lost_gpu_hours,
        owned_gpu_hours,
    })
}

/// The GPUs the fleet owns: every node of the inventory and every node the
/// store tracks, with the GPUs recorded for it, else `gpus_per_node`.
pub fn owned_gpus(inventory: &[String], tracked: &[NodeRecord], gpus_per_node: u32) -> u64 {
    let mut gpus: std::collections::BTreeMap<&str, u64> = inventory
        .iter()
        .map(|n| (n.as_str(), u64::from(gpus_per_node)))
        .collect();
    for r in tracked {
        gpus.insert(r.node.as_str(), u64::try_from(r.gpus).unwrap_or(0));
    }
    gpus.values().sum()
}

/// The availability line: the figure against its objective and the budget
/// used.
pub fn availability_text(a: &Availability) -> String {
    format!(
        "Availability: {} % (objective {} %): {:.0} % of the period's error budget used ({:.1} of {:.0} GPU-hours lost, {} GPUs owned){}",
        percent(a.ratio),
        percent(a.objective),
        a.budget_used * 100.0,
        a.lost_gpu_hours,
        a.owned_gpu_hours,
        a.owned_gpus,
        if a.ratio < a.objective {
            ": below the objective"
        } else {
            ""
        },
    )
}

/// A ratio as a percentage with at most one decimal (99.1, 98): never
/// rounded up to 100 unless it is 1.
fn percent(x: f64) -> String {
    let tenths = (x * 1000.0).floor() / 10.0;
    let s = format!("{tenths:.1}");
    s.strip_suffix(".0").map(str::to_string).unwrap_or(s)
}

/// Most nodes listed one per line.
pub const NODES_SHOWN: usize = 10;

/// GPU-hours lost within `[start, end)` and over the whole stretches, for
/// the nodes out at `end` and the returns within the period.
pub fn gpu_hours(
    out: &[&NodeRecord],
    returns: &[TransitionRecord],
    start: f64,
    end: f64,
) -> (f64, f64) {
    let mut in_period = 0.0;
    let mut total = 0.0;
    for r in out {
        let since = r.out_since.unwrap_or(end);
        in_period += (end - since.max(start)).max(0.0) * r.gpus as f64;
        total += (end - since).max(0.0) * r.gpus as f64;
    }
    for t in returns {
        let since = t.out_since.unwrap_or(t.at);
        in_period += (t.at - since.max(start)).max(0.0) * t.gpus as f64;
        total += t.lost_gpu_seconds.unwrap_or(0.0);
    }
    (in_period / 3600.0, total / 3600.0)
}

/// Appends the lines to the Incidents section `s`.
pub async fn extend(
    s: &mut Section,
    f: &mut Figures,
    store: &Store,
    inputs: &Inputs<'_>,
    start: f64,
    end: f64,
) {
    let (rows, transitions) = match (
        store.node_states().await,
        store.node_transitions(start).await,
    ) {
        (Ok(r), Ok(t)) => (r, t),
        (Err(e), _) | (_, Err(e)) => {
            s.failures
                .push(format!("nodes out of service from the store: {e}"));
            s.failures.push(format!(
                "availability: unknown (the store's node states cannot be read: {e})"
            ));
            return;
        }
    };
    let mut out: Vec<&NodeRecord> = rows
        .iter()
        .filter(|r| r.state != NodeState::InService && r.out_since.is_some_and(|t| t < end))
        .collect();
    let returns: Vec<TransitionRecord> = transitions
        .into_iter()
        .filter(|t| t.to == NodeState::InService && t.at < end)
        .collect();
    let (in_period, total) = gpu_hours(&out, &returns, start, end);
    let owned = owned_gpus(
        &inputs.names.known_nodes(),
        &rows,
        inputs.lifecycle.gpus_per_node,
    );
    match availability(
        in_period,
        owned,
        end - start,
        inputs.lifecycle.availability_objective,
    ) {
        Some(a) => {
            let mut text = availability_text(&a);
            if let Some(why) = inputs.names.blind() {
                text.push_str(&format!(
                    " (nodes discovered from Prometheus may be missing: {why})"
                ));
            }
            s.lines.push(Line::new().text(text));
            f.availability = Some(a);
        }
        None => s.lines.push(Line::new().text(
            "Availability: unknown (no GPUs owned: the inventory lists no nodes and none is tracked)",
        )),
    }
    s.answered += 1;
    if out.is_empty() && returns.is_empty() {
        return;
    }
    out.sort_by(|a, b| {
        a.out_since
            .unwrap_or(end)
            .total_cmp(&b.out_since.unwrap_or(end))
            .then_with(|| a.node.cmp(&b.node))
    });
    let gpus: i64 = out.iter().map(|r| r.gpus).sum();
    s.lines.push(Line::new().text(format!(
        "Out of service: {} node{} ({gpus} GPUs) at the period's end, {} returned within it; {in_period:.1} GPU-hours lost in the period, {total:.1} over these stretches",
        out.len(),
        if out.len() == 1 { "" } else { "s" },
        returns.len(),
    )));
    let tz = inputs.config.timezone;
    for r in out.iter().take(NODES_SHOWN) {
        let mut line = Line::new()
            .text("Out of service: ")
            .bold(r.node.clone())
            .text(format!(
                " {} since {} ({} GPUs, {:.1} GPU-hours lost so far): ",
                r.state.words(),
                fmt_local(tz, r.out_since.unwrap_or(end)),
                r.gpus,
                crate::lifecycle::gpu_hours_lost(r, end),
            ))
            .value(r.reason.clone());
        if let Some(by) = &r.by {
            line = line.text(", last by ").value(by.clone());
        }
        if r.repeat {
            line = line.text(", a repeat of the same fault: replace the hardware");
        }
        s.lines.push(line);
    }
    if out.len() > NODES_SHOWN {
        s.lines.push(Line::new().text(format!(
            "Out of service: … and {} more (`gpuops nodes`)",
            out.len() - NODES_SHOWN
        )));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_against_the_objective_with_the_budget_used() {
        // 100 GPUs for 24 h = 2400 GPU-hours; 21.6 lost = 99.1 %; the 2 %
        // budget is 48 GPU-hours, 45 % of it used.
        let a = availability(21.6, 100, 86_400.0, 0.98).unwrap();
        assert_eq!(
            availability_text(&a),
            "Availability: 99.1 % (objective 98 %): 45 % of the period's error budget used (21.6 of 2400 GPU-hours lost, 100 GPUs owned)"
        );
        // Never a false 100 %: 0.9999 reads 99.9.
        let a = availability(0.24, 100, 86_400.0, 0.98).unwrap();
        assert!(availability_text(&a).starts_with("Availability: 99.9 %"));
        let a = availability(96.0, 100, 86_400.0, 0.98).unwrap();
        assert!(availability_text(&a)
            .contains("96 % (objective 98 %): 200 % of the period's error budget used"));
        assert!(availability_text(&a).ends_with(": below the objective"));
        assert_eq!(availability(0.0, 0, 86_400.0, 0.98), None);
    }

    #[test]
    fn gpu_hours_count_the_period_and_the_whole_stretches() {
        let out = NodeRecord {
            node: "n1".into(),
            state: NodeState::Quarantined,
            since: 0.0,
            out_since: Some(-7200.0),
            reason: String::new(),
            alert: None,
            xid: None,
            step: None,
            run: None,
            by: None,
            gpus: 8,
            group_id: None,
            updated_at: 0.0,
            repeat: false,
            reminded_at: None,
        };
        let back = TransitionRecord {
            node: "n2".into(),
            from: NodeState::Verifying,
            to: NodeState::InService,
            at: 3600.0,
            reason: String::new(),
            by: None,
            gpus: 4,
            out_since: Some(-3600.0),
            lost_gpu_seconds: Some(7200.0 * 4.0),
        };
        // Period [0, 7200): n1 2h in it (4h in all) × 8, n2 1h in it (2h) × 4.
        assert_eq!(
            gpu_hours(&[&out], &[back], 0.0, 7200.0),
            (16.0 + 4.0, 32.0 + 8.0)
        );
    }
}
