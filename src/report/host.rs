//! The "Host" section: OOM kills per node, filesystems above 80 % with
//! days until full at the period's trend, read-only and stuck mounts,
//! memory and I/O pressure. Queries are `queries.rs`'; answers arrive
//! through `compute.rs`. With `[agents]`, each OOM line names the victims
//! the node's agent still holds (`victims.rs`), or why they are unknown.

use std::collections::HashMap;

use crate::config::reports::SectionKind;
use crate::report::compute::{count, days_to_full, node, Answers};
use crate::report::queries as q;
use crate::report::render::{fmt_local, fmt_num};
use crate::report::victims::{self, OomVictim};
use crate::report::{Figures, Finding, FsRow, Inputs, Level, Line, Section};

/// Victims named per node before "+N more".
const VICTIMS_SHOWN: usize = 5;

pub(super) async fn section(a: &Answers, inputs: &Inputs<'_>, f: &mut Figures) -> Section {
    let mut s = Section::new(SectionKind::Host);
    if let Some(rows) = a.get(&q::OOM_KILLS, &mut s) {
        let mut oom: Vec<(String, u64)> = rows.iter().map(|r| (node(r), count(r.value))).collect();
        oom.retain(|x| x.1 > 0);
        oom.sort();
        if let Some(source) = inputs.agent_events {
            let nodes: Vec<String> = oom.iter().map(|x| x.0.clone()).collect();
            let to = inputs.at.timestamp() as f64;
            let from = to - inputs.config.period.as_secs() as f64;
            f.oom_victims = victims::fetch_all(source, &nodes, from, to).await;
        }
        for (n, c) in &oom {
            let line = a
                .node_line(n)
                .text(": ")
                .link(c.to_string(), a.link(&q::OOM_KILLS))
                .text(format!(" OOM kill{}", if *c == 1 { "" } else { "s" }));
            let line = match f.oom_victims.get(n) {
                None => line.text(": see the victims in the agent's `/v1/events`"),
                Some(Ok(v)) if v.is_empty() => line
                    .text("; victims unknown: the agent no longer holds this period's OOM events"),
                Some(Ok(v)) => {
                    let line = victims_line(line, v, inputs.config.timezone);
                    match c.checked_sub(v.len() as u64) {
                        Some(gone) if gone > 0 => line.text(format!(
                            "; {gone} other{} no longer held by the agent",
                            if gone == 1 { "" } else { "s" }
                        )),
                        _ => line,
                    }
                }
                Some(Err(why)) => line.text("; victims unknown: ").value(why.clone()),
            };
            s.findings.push(Finding {
                level: Level::Warning,
                line: line.text(" (runbook `oom-kill`)"),
            });
        }
        f.oom_kills = oom;
    }
    let to_full: HashMap<(String, String), f64> = a
        .get(&q::FILESYSTEMS_TIME_TO_FULL, &mut s)
        .unwrap_or_default()
        .iter()
        .map(|r| ((node(r), r.label("mountpoint").to_string()), r.value))
        .collect();
    if let Some(rows) = a.get(&q::FILESYSTEMS_FULL, &mut s) {
        let mut fs: Vec<FsRow> = rows
            .iter()
            .map(|r| {
                let key = (node(r), r.label("mountpoint").to_string());
                let days = to_full.get(&key).and_then(|v| days_to_full(*v));
                FsRow {
                    node: key.0,
                    mountpoint: key.1,
                    used_ratio: r.value,
                    days_to_full: days,
                }
            })
            .collect();
        fs.sort_by(|x, y| (&x.node, &x.mountpoint).cmp(&(&y.node, &y.mountpoint)));
        for r in &fs {
            let mut line = a
                .node_line(&r.node)
                .text(format!(" `{}`: ", r.mountpoint))
                .link(
                    format!("{} % used", fmt_num(r.used_ratio * 100.0)),
                    a.link(&q::FILESYSTEMS_FULL),
                );
            let level = match r.days_to_full {
                Some(d) => {
                    line = line
                        .text(", full in ")
                        .link(
                            format!("{} days", fmt_num(d)),
                            a.link(&q::FILESYSTEMS_TIME_TO_FULL),
                        )
                        .text(" at this period's trend");
                    if d < 7.0 {
                        Level::Critical
                    } else {
                        Level::Warning
                    }
                }
                None => {
                    line = line.text(", not growing");
                    Level::Warning
                }
            };
            s.findings.push(Finding {
                level,
                line: line.text(": free space or grow it (runbook `storage`)"),
            });
        }
        f.filesystems = fs;
    }
    for (query, what, runbook) in [
        (&q::MOUNTS_READONLY, "turned read-only", "storage"),
        (
            &q::MOUNTS_STUCK,
            "stuck (statfs hung)",
            "storage-mount-stuck",
        ),
    ] {
        for r in a.get(query, &mut s).unwrap_or_default() {
            s.findings.push(Finding {
                level: Level::Critical,
                line: a
                    .node_line(r.label("instance"))
                    .text(format!(" `{}` ", r.label("mountpoint")))
                    .link(what, a.link(query))
                    .text(format!(
                        ": check the device and the kernel log (runbook `{runbook}`)"
                    )),
            });
        }
    }
    for (query, what, runbook) in [
        (&q::MEMORY_PRESSURE, "memory", "memory-pressure"),
        (&q::IO_PRESSURE, "I/O", "storage"),
    ] {
        for r in a.get(query, &mut s).unwrap_or_default() {
            let line = a
                .node_line(r.label("instance"))
                .text(format!(": tasks stalled on {what} "))
                .link(format!("{} %", fmt_num(r.value)), a.link(query))
                .text(" of the time");
            if r.value >= 10.0 {
                s.findings.push(Finding {
                    level: Level::Warning,
                    line: line.text(format!(": find the workload (runbook `{runbook}`)")),
                });
            } else {
                s.lines.push(line);
            }
        }
    }
    if s.findings.is_empty() && s.failures.is_empty() {
        s.lines.push(
            Line::new()
                .text("No OOM kills, no filesystem above 80 %, no read-only or stuck mount."),
        );
    }
    s
}

/// `; victims: trainer (pid 77, /system.slice/train.service, 28 Nov 07:14), … +N more`.
fn victims_line(mut line: Line, v: &[OomVictim], tz: chrono_tz::Tz) -> Line {
    line = line.text("; victims: ");
    for (i, k) in v.iter().take(VICTIMS_SHOWN).enumerate() {
        if i > 0 {
            line = line.text(", ");
        }
        line = line
            .value(k.process.clone().unwrap_or_else(|| "?".into()))
            .text(" (");
        if let Some(pid) = k.pid {
            line = line.text(format!("pid {pid}, "));
        }
        if let Some(cg) = &k.cgroup {
            line = line.value(cg.clone()).text(", ");
        }
        line = line.text(format!("{})", fmt_local(tz, k.timestamp)));
    }
    if v.len() > VICTIMS_SHOWN {
        line = line.text(format!(" +{} more", v.len() - VICTIMS_SHOWN));
    }
    line
}
