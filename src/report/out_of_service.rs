//! The report's "Out of service" lines (in the Incidents section), from
//! the bot's store (`src/lifecycle.rs`): the nodes not in service at the
//! period's end (nodes, GPUs, the oldest first, repeats flagged) and the
//! GPU-hours lost within the period and over the stretches it touches. A
//! period in which no node was out adds nothing. The SQL is
//! `store/lifecycle.rs`; no availability against an objective yet (the
//! report's inputs do not carry `[lifecycle]`).

use crate::lifecycle::{NodeRecord, NodeState, TransitionRecord};
use crate::report::render::fmt_local;
use crate::report::{Inputs, Line, Section};
use crate::store::Store;

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
pub async fn extend(s: &mut Section, store: &Store, inputs: &Inputs<'_>, start: f64, end: f64) {
    let (rows, transitions) = match (
        store.node_states().await,
        store.node_transitions(start).await,
    ) {
        (Ok(r), Ok(t)) => (r, t),
        (Err(e), _) | (_, Err(e)) => {
            s.failures
                .push(format!("nodes out of service from the store: {e}"));
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
    if out.is_empty() && returns.is_empty() {
        return;
    }
    s.answered += 1;
    out.sort_by(|a, b| {
        a.out_since
            .unwrap_or(end)
            .total_cmp(&b.out_since.unwrap_or(end))
            .then_with(|| a.node.cmp(&b.node))
    });
    let (in_period, total) = gpu_hours(&out, &returns, start, end);
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
