//! The "Incidents" section, from the bot's own store: alert groups that
//! fired in the period by tier, the noisiest alert names, MTTA (first
//! notification → acknowledgement) and MTTR (firing → resolved), groups
//! still firing at the period's end, dead letters and runbook runs by how
//! they ended. The SQL is `store/reports.rs`.

use std::collections::BTreeMap;

use crate::config::reports::SectionKind;
use crate::inventory::NodeNames;
use crate::report::render::fmt_duration;
use crate::report::{Figures, Finding, Inputs, Level, Line, LostGpu, Section};
use crate::store::reports::IncidentGroup;

/// Mean time to acknowledge and to resolve, and how many groups each
/// mean covers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Means {
    /// Seconds, over the groups acknowledged within the period.
    pub mtta: Option<f64>,
    pub acknowledged: u64,
    /// Seconds, over the groups resolved within the period.
    pub mttr: Option<f64>,
    pub resolved: u64,
}

/// Mean time to acknowledge and to resolve, in seconds, over the groups
/// acknowledged (resp. resolved) within `[start, end)`.
pub fn mtta_mttr(groups: &[IncidentGroup], start: f64, end: f64) -> Means {
    let mean = |v: &[f64]| {
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let tta: Vec<f64> = groups
        .iter()
        .filter_map(|g| {
            let ack = g.acked_at.filter(|a| *a >= start && *a < end)?;
            let first = g.first_notified?;
            Some((ack - first).max(0.0))
        })
        .collect();
    let ttr: Vec<f64> = groups
        .iter()
        .filter(|g| g.status == "resolved" && g.updated_at >= start && g.updated_at < end)
        .map(|g| (g.updated_at - g.first_seen).max(0.0))
        .collect();
    Means {
        mtta: mean(&tta),
        acknowledged: tta.len() as u64,
        mttr: mean(&ttr),
        resolved: ttr.len() as u64,
    }
}

/// `MTTA (…): 10m over 2 acknowledged groups of 3; MTTR (…): 2h over 2
/// resolved groups of 3; 1 still open`: a mean says what it covers.
pub fn means_line(m: &Means, groups: u64, open: u64) -> Line {
    let of = |n: u64, what: &str| {
        format!(
            "{n} {what} group{} of {groups}",
            if n == 1 { "" } else { "s" }
        )
    };
    let mtta = match m.mtta {
        Some(v) => format!(
            "{} over {}",
            fmt_duration(v),
            of(m.acknowledged, "acknowledged")
        ),
        None => "- (no group acknowledged in the period)".to_string(),
    };
    let mttr = match m.mttr {
        Some(v) => format!("{} over {}", fmt_duration(v), of(m.resolved, "resolved")),
        None => "- (no group resolved in the period)".to_string(),
    };
    Line::new().text(format!(
        "MTTA (first notification → acknowledgement): {mtta}; MTTR (firing → resolved): {mttr}; {open} still open"
    ))
}

/// Nodes (and GPUs) a still-firing line names before "+N more".
const PLACES_SHOWN: usize = 3;

/// Where a group's alerts fire: `(node name, GPU index)`, each once, in
/// order; the node named as [`NodeNames`] names it, else its instance.
pub fn alert_places(state: &str, names: &NodeNames) -> Vec<(String, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(state).unwrap_or_default();
    let mut out: Vec<(String, Option<String>)> = Vec::new();
    for a in v
        .get("alerts")
        .and_then(|a| a.as_array())
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let labels: BTreeMap<String, String> = a
            .get("labels")
            .and_then(|l| serde_json::from_value(l.clone()).ok())
            .unwrap_or_default();
        let Some(instance) = labels.get("instance").filter(|i| !i.is_empty()) else {
            continue;
        };
        let node = names
            .name_of(Some(instance), &labels)
            .unwrap_or_else(|| instance.clone());
        let gpu = labels.get("gpu").filter(|g| !g.trim().is_empty()).cloned();
        let place = (node, gpu);
        if !out.contains(&place) {
            out.push(place);
        }
    }
    out
}

/// Alerts that say a GPU is lost (the shipped rules' names).
const LOST_GPU_ALERTS: [&str; 4] = ["GPUFellOffBus", "GPUDown", "GPUMissing", "GPUXIDFellOffBus"];

/// The lost GPU a group's alerts are all about, if they are: each alert a
/// lost-GPU alert on the fault's instance (and GPU, when it names one).
pub fn part_of_lost_gpu<'a>(state: &str, lost: &'a [LostGpu]) -> Option<&'a LostGpu> {
    let v: serde_json::Value = serde_json::from_str(state).ok()?;
    let alerts = v.get("alerts")?.as_array()?;
    let mut found: Option<&LostGpu> = None;
    for a in alerts {
        let labels = a.get("labels")?;
        let label = |k: &str| labels.get(k).and_then(|x| x.as_str());
        if !LOST_GPU_ALERTS.contains(&label("alertname")?) {
            return None;
        }
        let instance = label("instance")?;
        let gpu = label("gpu").filter(|g| !g.is_empty());
        let l = lost
            .iter()
            .find(|l| l.instance == instance && (gpu.is_none() || l.gpu.as_deref() == gpu))?;
        match found {
            Some(x) if x != l => return None,
            _ => found = Some(l),
        }
    }
    found
}

/// Alert names of a group's latest webhook.
fn alert_names(state: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(state).unwrap_or_default();
    let mut out: Vec<String> = v
        .get("alerts")
        .and_then(|a| a.as_array())
        .map(|alerts| {
            alerts
                .iter()
                .filter_map(|a| a.get("labels")?.get("alertname")?.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

pub async fn section(inputs: &Inputs<'_>, f: &mut Figures) -> Section {
    let mut s = Section::new(SectionKind::Incidents);
    let Some(store) = inputs.store else {
        s.failures
            .push("the bot's store: not available here (no [store] path file)".to_string());
        return s;
    };
    let end = inputs.at.timestamp() as f64;
    let start = end - inputs.config.period.as_secs_f64();
    let groups = match store.incident_groups(start, end).await {
        Ok(g) => {
            s.answered += 1;
            g
        }
        Err(e) => {
            s.failures.push(format!("alert groups from the store: {e}"));
            return s;
        }
    };
    let fired: Vec<&IncidentGroup> = groups.iter().filter(|g| g.first_seen >= start).collect();
    let mut by_tier: BTreeMap<String, u64> = BTreeMap::new();
    for g in &fired {
        *by_tier.entry(g.tier.clone()).or_default() += 1;
    }
    let tiers: Vec<String> = by_tier.iter().map(|(t, n)| format!("{t} {n}")).collect();
    s.lines.push(Line::new().text(format!(
        "Alert groups that fired: {}{}",
        fired.len(),
        if tiers.is_empty() {
            String::new()
        } else {
            format!(" ({})", tiers.join(", "))
        }
    )));
    f.alerts_by_tier = by_tier;
    let mut noisy: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for g in &groups {
        if g.webhooks == 0 && g.first_seen < start {
            continue;
        }
        for name in alert_names(&g.state) {
            let e = noisy.entry(name).or_default();
            e.0 += 1;
            e.1 += g.webhooks;
        }
    }
    let mut noisy: Vec<(String, (u64, i64))> = noisy.into_iter().collect();
    noisy.sort_by(|x, y| {
        y.1 .1
            .cmp(&x.1 .1)
            .then(y.1 .0.cmp(&x.1 .0))
            .then(x.0.cmp(&y.0))
    });
    if !noisy.is_empty() {
        let top: Vec<String> = noisy
            .iter()
            .take(5)
            .map(|(n, (groups, hooks))| {
                format!(
                    "{n} ({hooks} notification{}, {groups} group{})",
                    if *hooks == 1 { "" } else { "s" },
                    if *groups == 1 { "" } else { "s" }
                )
            })
            .collect();
        s.lines
            .push(Line::new().text(format!("Noisiest alerts: {}", top.join("; "))));
    }
    let means = mtta_mttr(&groups, start, end);
    f.mtta_secs = means.mtta;
    f.mttr_secs = means.mttr;
    f.mtta_groups = means.acknowledged;
    f.mttr_groups = means.resolved;
    f.groups_in_period = groups.len() as u64;
    let firing: Vec<&IncidentGroup> = groups.iter().filter(|g| g.status == "firing").collect();
    f.still_firing = Some(firing.len() as u64);
    s.lines
        .push(means_line(&means, groups.len() as u64, firing.len() as u64));
    for g in firing.iter().take(10) {
        let names = alert_names(&g.state).join(", ");
        // The alerts of a GPU the Fleet section lists as lost are that
        // finding's, not another one.
        let lost = part_of_lost_gpu(&g.state, &f.lost_gpus);
        let mut line = Line::new()
            .text("Still firing: ")
            .bold(if names.is_empty() {
                "(unnamed)".to_string()
            } else {
                names
            });
        let where_ = alert_places(&g.state, inputs.names);
        if !where_.is_empty() {
            line = line.text(" on ");
            for (i, (node, gpu)) in where_.iter().take(PLACES_SHOWN).enumerate() {
                if i > 0 {
                    line = line.text(", ");
                }
                line = line.bold(node.clone());
                if let Some(gpu) = gpu {
                    line = line.text(" GPU ").value(gpu.clone());
                }
            }
            if where_.len() > PLACES_SHOWN {
                line = line.text(format!(" +{} more", where_.len() - PLACES_SHOWN));
            }
        }
        let line = line.text(format!(
            " ({}, group {}, since {}{}): see `gpuops audit --group {} --markdown`",
            g.tier,
            g.id,
            crate::report::render::fmt_local(inputs.config.timezone, g.first_seen),
            if g.acked_at.is_some() {
                ", acknowledged"
            } else {
                ", not acknowledged"
            },
            g.id
        ));
        match lost {
            Some(l) => {
                let mut line = line.text(": the lost GPU of ");
                line.0
                    .extend(Line::new().bold(f.node_name(&l.instance).to_string()).0);
                if let Some(gpu) = &l.gpu {
                    line = line.text(" GPU ").value(gpu.clone());
                }
                s.lines.push(line.text(" (Fleet)"));
            }
            None => s.findings.push(Finding {
                level: if g.tier == "P1" || g.tier == "P2" {
                    Level::Critical
                } else {
                    Level::Warning
                },
                line,
            }),
        }
    }
    match store.incident_counts(start, end).await {
        Ok(c) => {
            f.dead_letters = Some(c.dead_letters as u64);
            if c.dead_letters > 0 {
                s.findings.push(Finding {
                    level: Level::Warning,
                    line: Line::new().text(format!(
                        "{} deliveries became dead letters: check the bot's log and `gpuops_notifications_total{{outcome=\"dead_letter\"}}`",
                        c.dead_letters
                    )),
                });
            }
            let runs: Vec<String> = c
                .runs_by_status
                .iter()
                .map(|(st, n)| format!("{st} {n}"))
                .collect();
            s.lines.push(Line::new().text(if runs.is_empty() {
                "Runbook runs: none".to_string()
            } else {
                format!("Runbook runs: {}", runs.join(", "))
            }));
        }
        Err(e) => s
            .failures
            .push(format!("dead letters and runs from the store: {e}")),
    }
    crate::report::out_of_service::extend(&mut s, f, store, inputs, start, end).await;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(
        first_seen: f64,
        notified: Option<f64>,
        ack: Option<f64>,
        resolved: Option<f64>,
    ) -> IncidentGroup {
        IncidentGroup {
            id: 1,
            tier: "P2".into(),
            status: if resolved.is_some() {
                "resolved"
            } else {
                "firing"
            }
            .into(),
            first_seen,
            updated_at: resolved.unwrap_or(first_seen),
            state: r#"{"alerts":[{"labels":{"alertname":"GPUDown"}}]}"#.into(),
            first_notified: notified,
            acked_at: ack,
            webhooks: 1,
        }
    }

    #[test]
    fn mtta_and_mttr_are_means_over_the_period() {
        let groups = [
            g(100.0, Some(110.0), Some(410.0), Some(1900.0)),
            g(200.0, Some(200.0), Some(800.0), None),
            // Acknowledged before the period: not counted.
            g(0.0, Some(1.0), Some(50.0), Some(3700.0)),
        ];
        let m = mtta_mttr(&groups, 60.0, 4000.0);
        assert_eq!(m.mtta, Some(450.0));
        assert_eq!(m.mttr, Some((1800.0 + 3700.0) / 2.0));
        assert_eq!((m.acknowledged, m.resolved), (2, 2));
        assert_eq!(alert_names(&groups[0].state), vec!["GPUDown".to_string()]);
        assert!(alert_names("not json").is_empty());
    }

    #[test]
    fn mtta_mttr_say_how_many_groups_they_cover() {
        // 20 groups: one resolved after 16 s, 19 still open.
        let mut groups = vec![g(100.0, Some(100.0), None, Some(116.0))];
        groups.extend((0..19).map(|i| g(200.0 + f64::from(i), Some(201.0), None, None)));
        let m = mtta_mttr(&groups, 0.0, 4000.0);
        let text = crate::report::render::line_text(&means_line(&m, 20, 19));
        assert_eq!(
            text,
            "MTTA (first notification → acknowledgement): - (no group acknowledged in the period); \
             MTTR (firing → resolved): 16s over 1 resolved group of 20; 19 still open"
        );
        let m = mtta_mttr(&groups[..1], 0.0, 4000.0);
        let text = crate::report::render::line_text(&means_line(&m, 1, 0));
        assert!(
            text.contains("16s over 1 resolved group of 1; 0 still open"),
            "{text}"
        );
    }
}
