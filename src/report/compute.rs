//! A report's sections computed from Prometheus (Fleet, GPU health,
//! Utilization and waste, Host, Checks) and the store (Incidents, in
//! `incidents.rs`). All queries run at once, each with the report's
//! deadline; a failed query becomes a line of its section's failures and
//! the rest of the section goes on. Every number links to its PromQL;
//! every finding names the node, the GPU and the next action.

use std::collections::{BTreeMap, HashMap};

use tokio::task::JoinSet;

use crate::config::reports::SectionKind;
use crate::gpu::xid;
use crate::report::prom::{graph_link, Prometheus, Sample};
use crate::report::queries::{self as q, Query};
use crate::report::render::{fmt_bytes, fmt_duration, fmt_local, fmt_num};
use crate::report::{
    checks, host, incidents, lost, Figures, Finding, Inputs, Level, Line, Section, XidRow,
};

/// Shared by the section builders: the answers and how to link them.
pub(super) struct Answers {
    base: String,
    at: f64,
    pub(super) secs: u64,
    results: HashMap<&'static str, Result<Vec<Sample>, String>>,
    /// [`q::NODES_LAST_SEEN`] as run (for its link).
    last_seen_expr: Option<String>,
    /// instance -> the node's name ([`crate::inventory::NodeNames`]).
    names: BTreeMap<String, String>,
    /// `(instance, gpu)` -> the GPU's UUID, from any series that carried it.
    uuids: BTreeMap<(String, String), String>,
}

impl Answers {
    pub(super) fn link(&self, query: &Query) -> String {
        graph_link(&self.base, &query.render(self.secs), self.at, self.secs)
    }

    pub(super) fn link_expr(&self, promql: &str) -> String {
        graph_link(&self.base, promql, self.at, self.secs)
    }

    /// The node's name for `instance`, else the instance.
    pub(super) fn name<'a>(&'a self, instance: &'a str) -> &'a str {
        self.names
            .get(instance)
            .map(String::as_str)
            .unwrap_or(instance)
    }

    /// A line that starts with the node: its name in bold, the instance
    /// beside it as a detail (when the name is not the instance).
    pub(super) fn node_line(&self, instance: &str) -> Line {
        let name = self.name(instance);
        let line = Line::new().bold(name.to_string());
        if name == instance {
            line
        } else {
            line.text(" (").value(instance.to_string()).text(")")
        }
    }

    /// `line` + `GPU 3 (GPU-3f2a1b2c)`: the GPU by index, with its UUID
    /// prefix where a series carried it.
    pub(super) fn gpu_line(&self, line: Line, instance: &str, gpu: &str) -> Line {
        let uuid = self
            .uuids
            .get(&(instance.to_string(), gpu.to_string()))
            .map(String::as_str);
        gpu_parts(line, Some(gpu), uuid, None)
    }

    /// The samples of `query` if it answered (nothing recorded otherwise).
    pub(super) fn answered(&self, query: &Query) -> Option<&[Sample]> {
        match self.results.get(query.id) {
            Some(Ok(s)) => Some(s),
            _ => None,
        }
    }

    /// The samples of `query`, or records its failure in `section`.
    pub(super) fn get(&self, query: &Query, section: &mut Section) -> Option<&[Sample]> {
        match self.results.get(query.id) {
            Some(Ok(s)) => {
                section.answered += 1;
                Some(s)
            }
            Some(Err(why)) => {
                section
                    .failures
                    .push(format!("{} ({}): {why}", query.what, query.id));
                None
            }
            None => {
                section
                    .failures
                    .push(format!("{} ({}): not run", query.what, query.id));
                None
            }
        }
    }
}

fn queries_of(kind: SectionKind) -> &'static [Query] {
    match kind {
        SectionKind::Fleet => &[
            q::NODES_NOW,
            q::NODES_SEEN,
            q::NODES_STOPPED,
            q::GPUS_DROPPED,
            q::GPUS_MOST,
            q::GPUS_MISSING,
            q::GPUS_DOWN,
            q::COLLECTOR_FAILURES,
        ],
        SectionKind::GpuHealth => &[
            q::XIDS,
            q::ECC_UNCORRECTED,
            q::REMAP_PENDING,
            q::REMAP_FAILED,
            q::NVLINK_ERRORS,
            q::PCIE_REPLAYS,
            q::THROTTLE_SECONDS,
        ],
        SectionKind::Utilization => &[
            q::FLEET_UTILIZATION,
            q::NODE_UTILIZATION,
            q::IDLE_GPU_HOURS,
            q::GPU_MEMORY_USED,
            q::WORKLOADS_TOP,
        ],
        SectionKind::Host => &[
            q::OOM_KILLS,
            q::FILESYSTEMS_FULL,
            q::FILESYSTEMS_TIME_TO_FULL,
            q::MOUNTS_READONLY,
            q::MOUNTS_STUCK,
            q::MEMORY_PRESSURE,
            q::IO_PRESSURE,
        ],
        SectionKind::Incidents | SectionKind::Checks => &[],
    }
}

/// The step of the utilization chart: about 240 points, at least a minute.
pub fn chart_step(secs: u64) -> u64 {
    (secs / 240).max(60) / 60 * 60
}

/// Computes the configured sections, in the configured order.
pub async fn compute(inputs: &Inputs<'_>) -> (Vec<Section>, Figures) {
    let cfg = inputs.config;
    let secs = cfg.period.as_secs();
    let at = inputs.at.timestamp() as f64;
    let mut figures = Figures::default();
    let prom = Prometheus::new(inputs.prometheus_url, cfg.query_timeout);
    let mut answers = Answers {
        base: inputs.prometheus_url.trim_end_matches('/').to_string(),
        at,
        secs,
        results: HashMap::new(),
        last_seen_expr: None,
        names: BTreeMap::new(),
        uuids: BTreeMap::new(),
    };
    let mut check_results: Vec<Result<Vec<Sample>, String>> = Vec::new();
    let mut series_result: Option<Result<Vec<(f64, f64)>, String>> = None;
    match &prom {
        Ok(prom) => {
            let mut set = JoinSet::new();
            let wanted = cfg.sections.iter().flat_map(|k| queries_of(*k).iter());
            for query in wanted {
                let (p, id, promql) = (prom.clone(), query.id, query.render(secs));
                set.spawn(async move { (id, p.instant(&promql, at).await) });
            }
            let range = if cfg.sections.contains(&SectionKind::Utilization) {
                let (p, promql) = (prom.clone(), q::FLEET_UTILIZATION_SERIES.render(secs));
                let step = chart_step(secs) as f64;
                Some(tokio::spawn(async move {
                    p.range(&promql, at - secs as f64, at, step).await
                }))
            } else {
                None
            };
            let checks: Vec<_> = if cfg.sections.contains(&SectionKind::Checks) {
                cfg.checks
                    .iter()
                    .map(|c| {
                        let (p, promql) = (prom.clone(), c.query.clone());
                        tokio::spawn(async move { p.instant(&promql, at).await })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            while let Some(done) = set.join_next().await {
                if let Ok((id, r)) = done {
                    answers.results.insert(id, r);
                }
            }
            // When the nodes that stopped were last seen: only for those.
            let stopped: Vec<String> = match answers.results.get(q::NODES_STOPPED.id) {
                Some(Ok(rows)) => rows.iter().take(50).map(node).collect(),
                _ => Vec::new(),
            };
            if !stopped.is_empty() {
                let promql = last_seen_query(&stopped, secs);
                answers
                    .results
                    .insert(q::NODES_LAST_SEEN.id, prom.instant(&promql, at).await);
                answers.last_seen_expr = Some(promql);
            }
            if let Some(task) = range {
                series_result = Some(match task.await {
                    Ok(Ok(series)) => Ok(series
                        .into_iter()
                        .next()
                        .map(|s| s.points)
                        .unwrap_or_default()),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(format!("query task failed: {e}")),
                });
            }
            for task in checks {
                check_results.push(match task.await {
                    Ok(r) => r,
                    Err(e) => Err(format!("query task failed: {e}")),
                });
            }
        }
        Err(e) => {
            for query in q::ALL {
                answers.results.insert(query.id, Err(e.clone()));
            }
            check_results = cfg.checks.iter().map(|_| Err(e.clone())).collect();
            series_result = Some(Err(e.clone()));
        }
    }
    figures.prometheus_down = prometheus_down(
        answers
            .results
            .values()
            .chain(check_results.iter())
            .map(|r| r.as_ref().err()),
    );
    // Every instance a query named, by the name a person reads.
    for r in answers.results.values().flatten() {
        for sample in r {
            if let Some(instance) = sample.labels.get("instance") {
                if !answers.names.contains_key(instance) {
                    let name = inputs
                        .names
                        .name_of(Some(instance), &sample.labels)
                        .unwrap_or_else(|| instance.clone());
                    answers.names.insert(instance.clone(), name);
                }
                if let (Some(gpu), Some(uuid)) =
                    (sample.labels.get("gpu"), sample.labels.get("uuid"))
                {
                    if !uuid.is_empty() {
                        answers
                            .uuids
                            .entry((instance.clone(), gpu.clone()))
                            .or_insert_with(|| uuid.clone());
                    }
                }
            }
        }
    }
    figures.node_names = answers.names.clone();
    if cfg.sections.contains(&SectionKind::Fleet) {
        figures.lost_gpus = lost::lost_gpus(&answers);
    }
    let mut sections = Vec::new();
    for kind in &cfg.sections {
        let s = match kind {
            SectionKind::Fleet => fleet(&answers, inputs, &mut figures),
            SectionKind::GpuHealth => gpu_health(&answers, &mut figures),
            SectionKind::Utilization => {
                let mut s = utilization(&answers, &mut figures);
                match series_result.take() {
                    Some(Ok(points)) => {
                        s.answered += 1;
                        figures.utilization_series = points
                    }
                    Some(Err(why)) => s.failures.push(format!(
                        "{} ({}): {why}",
                        q::FLEET_UTILIZATION_SERIES.what,
                        q::FLEET_UTILIZATION_SERIES.id
                    )),
                    None => {}
                }
                s
            }
            SectionKind::Host => host::section(&answers, inputs, &mut figures).await,
            SectionKind::Incidents => incidents::section(inputs, &mut figures).await,
            SectionKind::Checks => checks::section(&answers, &cfg.checks, &check_results),
        };
        sections.push(s);
    }
    (sections, figures)
}

/// The one reason every Prometheus query failed for, if they all failed
/// for one (Prometheus unreachable, a bad URL); `None` when any answered
/// or none ran.
pub fn prometheus_down<'a>(errors: impl Iterator<Item = Option<&'a String>>) -> Option<String> {
    let mut why: Option<&String> = None;
    for e in errors {
        match (e, why) {
            (None, _) => return None,
            (Some(e), None) => why = Some(e),
            (Some(e), Some(w)) if e != w => return None,
            _ => {}
        }
    }
    why.cloned()
}

/// `GPU 1 (GPU-3f2a1b2c)`, or the PCI address of an XID on a bus where no
/// GPU is known; never an empty index.
pub(super) fn gpu_words(line: Line, r: &Sample) -> Line {
    gpu_parts(
        line,
        r.labels.get("gpu").map(String::as_str),
        r.labels.get("uuid").map(String::as_str),
        r.labels.get("pci_bus_id").map(String::as_str),
    )
}

/// See [`gpu_words`].
pub(super) fn gpu_parts(
    line: Line,
    gpu: Option<&str>,
    uuid: Option<&str>,
    bus: Option<&str>,
) -> Line {
    fn known(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty() && *v != "-")
    }
    match (known(gpu), known(uuid), known(bus)) {
        (Some(g), Some(u), _) => line
            .text("GPU ")
            .value(g.to_string())
            .text(" (")
            .value(u.chars().take(12).collect::<String>())
            .text(")"),
        (Some(g), None, _) => line.text("GPU ").value(g.to_string()),
        (None, _, Some(b)) => line
            .text("the PCI device ")
            .value(b.to_string())
            .text(" (no GPU known at that address)"),
        (None, Some(u), None) => line
            .text("GPU ")
            .value(u.chars().take(12).collect::<String>()),
        (None, None, None) => line.text("a GPU (no index reported)"),
    }
}

/// [`q::NODES_LAST_SEEN`] for these nodes (an anchored regex of their
/// names, each quoted).
pub fn last_seen_query(nodes: &[String], secs: u64) -> String {
    let alternatives: Vec<String> = nodes.iter().map(|n| regex::escape(n)).collect();
    q::NODES_LAST_SEEN
        .render(secs)
        .replace("$NODES", &promql_string(&alternatives.join("|")))
}

/// Days until full from the seconds-to-full query's value (free bytes over
/// the slope of used bytes); `None` when the filesystem is not growing
/// (a zero or negative slope gives an infinite or negative value).
pub fn days_to_full(seconds: f64) -> Option<f64> {
    (seconds.is_finite() && seconds > 0.0).then(|| seconds / 86_400.0)
}

/// Idle GPU-hours per node (whole hours summed over the node's GPUs, most
/// first, nodes without any left out) and the fleet's total.
pub fn idle_hours(rows: &[(String, f64)]) -> (Vec<(String, u64)>, u64) {
    let mut idle: Vec<(String, u64)> = rows
        .iter()
        .map(|(n, v)| (n.clone(), count(*v)))
        .filter(|x| x.1 > 0)
        .collect();
    idle.sort_by(|x, y| y.1.cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    let total = idle.iter().map(|x| x.1).sum();
    (idle, total)
}

/// A label value inside a PromQL double-quoted string.
pub fn promql_string(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

pub(super) fn node(s: &Sample) -> String {
    s.label("instance").to_string()
}

pub(super) fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

fn fleet(a: &Answers, inputs: &Inputs<'_>, f: &mut Figures) -> Section {
    let mut s = Section::new(SectionKind::Fleet);
    let tz = inputs.config.timezone;
    let now = a
        .get(&q::NODES_NOW, &mut s)
        .map(|v| v.first().map(|x| count(x.value)).unwrap_or(0));
    let seen = a
        .get(&q::NODES_SEEN, &mut s)
        .map(|v| v.first().map(|x| count(x.value)).unwrap_or(0));
    f.nodes_now = now;
    f.nodes_seen = seen;
    if let (Some(now), Some(seen)) = (now, seen) {
        s.lines.push(
            Line::new()
                .text("Nodes reporting: ")
                .link(now.to_string(), a.link(&q::NODES_NOW))
                .text(" now, of ")
                .link(seen.to_string(), a.link(&q::NODES_SEEN))
                .text(" seen in the period"),
        );
    }
    if let Some(rows) = a.get(&q::NODES_STOPPED, &mut s) {
        let seen: HashMap<String, f64> = if rows.is_empty() {
            HashMap::new()
        } else {
            a.get(&q::NODES_LAST_SEEN, &mut s)
                .unwrap_or_default()
                .iter()
                .map(|r| (node(r), r.value))
                .collect()
        };
        let mut rows: Vec<(String, f64)> = rows
            .iter()
            .map(|r| {
                let n = node(r);
                let last = seen.get(&n).copied().unwrap_or(f64::NAN);
                (n, last)
            })
            .collect();
        rows.sort_by(|x, y| x.0.cmp(&y.0));
        let link = a
            .last_seen_expr
            .as_deref()
            .map(|e| a.link_expr(e))
            .unwrap_or_else(|| a.link(&q::NODES_STOPPED));
        for (n, last) in &rows {
            let when = if last.is_finite() {
                fmt_local(tz, *last)
            } else {
                "in the period".to_string()
            };
            s.findings.push(Finding {
                level: Level::Critical,
                line: a
                    .node_line(n)
                    .text(" stopped reporting (last seen ")
                    .link(when, link.clone())
                    .text("): check the node and its agent (runbook `agent-down`)"),
            });
        }
        f.nodes_stopped = rows;
    }
    if let Some(rows) = a.get(&q::GPUS_DROPPED, &mut s) {
        let mut rows: Vec<(String, u64)> = rows.iter().map(|r| (node(r), count(r.value))).collect();
        rows.sort();
        f.gpus_dropped = rows;
    }
    // Asked for its failure only: the numbers come with the lost GPUs.
    let _ = a.get(&q::GPUS_MOST, &mut s);
    let mut missing: Vec<(String, String)> = Vec::new();
    for query in [&q::GPUS_MISSING, &q::GPUS_DOWN] {
        if let Some(rows) = a.get(query, &mut s) {
            missing.extend(rows.iter().map(|r| (node(r), r.label("gpu").to_string())));
        }
    }
    missing.sort();
    missing.dedup();
    f.gpus_missing = missing;
    for lost in &f.lost_gpus {
        s.findings.push(Finding {
            level: Level::Critical,
            line: lost::lost_gpu_line(a, lost),
        });
    }
    if let Some(rows) = a.get(&q::COLLECTOR_FAILURES, &mut s) {
        for r in rows {
            s.findings.push(Finding {
                level: Level::Warning,
                line: a
                    .node_line(r.label("instance"))
                    .text(format!(": collector `{}` failed in ", r.label("collector")))
                    .link(
                        format!("{} %", fmt_num((1.0 - r.value) * 100.0)),
                        a.link(&q::COLLECTOR_FAILURES),
                    )
                    .text(" of scrapes: see the agent's log (`journalctl -u gpuops-agent`)"),
            });
        }
    }
    if s.findings.is_empty() && s.failures.is_empty() {
        s.lines
            .push(Line::new().text("No node stopped reporting; no GPU was lost."));
    }
    s
}

fn gpu_health(a: &Answers, f: &mut Figures) -> Section {
    let mut s = Section::new(SectionKind::GpuHealth);
    let mut errors: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    if let Some(rows) = a.get(&q::XIDS, &mut s) {
        let mut xids: Vec<(XidRow, &Sample)> = rows
            .iter()
            .filter_map(|r| {
                Some((
                    XidRow {
                        node: node(r),
                        gpu: r.label("gpu").to_string(),
                        code: r.labels.get("xid")?.parse().ok()?,
                        count: count(r.value),
                    },
                    r,
                ))
            })
            .filter(|x| x.0.count > 0)
            .collect();
        xids.sort_by(|(x, _), (y, _)| (&x.node, &x.gpu, x.code).cmp(&(&y.node, &y.gpu, y.code)));
        for (x, r) in &xids {
            *f.xids_by_code.entry(x.code).or_default() += x.count;
            errors.entry(x.node.clone()).or_default()[0] += x.count;
            // Counted above; its finding is the lost GPU's (Fleet).
            if lost::is_lost_gpu_evidence(f, r) {
                continue;
            }
            let selector: Vec<String> = ["instance", "gpu", "pci_bus_id", "xid"]
                .iter()
                .filter_map(|k| {
                    let v = r.labels.get(*k)?;
                    Some(format!("{k}=\"{}\"", promql_string(v)))
                })
                .collect();
            let expr = format!(
                "{} and on (instance, gpu, pci_bus_id, xid) gpu_xid_errors_total{{{}}}",
                q::XIDS.render(a.secs),
                selector.join(",")
            );
            let (level, what) = match xid::lookup(x.code) {
                Some(info) => (
                    if info.severity == xid::XidSeverity::Critical {
                        Level::Critical
                    } else {
                        Level::Warning
                    },
                    format!(
                        " ({}): {} (runbook `{}`)",
                        info.title, info.action, info.runbook
                    ),
                ),
                None => (
                    Level::Warning,
                    " (not in our catalogue): look it up in NVIDIA's XID catalogue (runbook `gpu-xid`)".to_string(),
                ),
            };
            s.findings.push(Finding {
                level,
                line: gpu_words(a.node_line(&x.node).text(" "), r)
                    .text(format!(": XID {} ×", x.code))
                    .link(x.count.to_string(), a.link_expr(&expr))
                    .text(what),
            });
        }
        let xids: Vec<XidRow> = xids.into_iter().map(|(x, _)| x).collect();
        if !f.xids_by_code.is_empty() {
            let by_code: Vec<String> = f
                .xids_by_code
                .iter()
                .map(|(c, n)| format!("{c} ×{n}"))
                .collect();
            s.lines.push(
                Line::new()
                    .text("XIDs by code: ")
                    .link(by_code.join(", "), a.link(&q::XIDS)),
            );
        }
        f.xids = xids;
    }
    let per_gpu = |a: &Answers, s: &mut Section, query: &Query| -> Vec<(String, String, u64)> {
        let mut out: Vec<(String, String, u64)> = a
            .get(query, s)
            .unwrap_or_default()
            .iter()
            .map(|r| (node(r), r.label("gpu").to_string(), count(r.value)))
            .filter(|r| r.2 > 0)
            .collect();
        out.sort();
        out
    };
    let ecc = per_gpu(a, &mut s, &q::ECC_UNCORRECTED);
    for (n, g, c) in &ecc {
        errors.entry(n.clone()).or_default()[1] += c;
        s.findings.push(Finding {
            level: Level::Critical,
            line: a.gpu_line(a.node_line(n).text(" "), n, g)
                .text(": ")
                .link(c.to_string(), a.link(&q::ECC_UNCORRECTED))
                .text(" uncorrectable ECC errors: drain, reset the GPU and check row remapping (runbook `gpu-ecc-remap`)"),
        });
    }
    f.ecc_uncorrectable = ecc;
    for (n, g, _) in per_gpu(a, &mut s, &q::REMAP_PENDING) {
        s.findings.push(Finding {
            level: Level::Critical,
            line: a
                .gpu_line(a.node_line(&n).text(" "), &n, &g)
                .text(": ")
                .link("row remap pending", a.link(&q::REMAP_PENDING))
                .text(": reset the GPU to apply it (runbook `gpu-reset`)"),
        });
    }
    for (n, g, _) in per_gpu(a, &mut s, &q::REMAP_FAILED) {
        s.findings.push(Finding {
            level: Level::Critical,
            line: a.gpu_line(a.node_line(&n).text(" "), &n, &g)
                .text(": ")
                .link("row remapping failed", a.link(&q::REMAP_FAILED))
                .text(": no spare rows left, take it out of service for hardware inspection (runbook `gpu-ecc-remap`)"),
        });
    }
    for (query, what, action) in [
        (
            &q::NVLINK_ERRORS,
            "NVLink errors",
            "check the links and the fabric manager (runbook `gpu-nvlink`)",
        ),
        (
            &q::PCIE_REPLAYS,
            "PCIe replays",
            "check the PCIe link (riser, slot, width) before it drops (runbook `gpu-fell-off-bus`)",
        ),
    ] {
        for (n, g, c) in per_gpu(a, &mut s, query) {
            errors.entry(n.clone()).or_default()[2] += c;
            s.findings.push(Finding {
                level: Level::Warning,
                line: a
                    .gpu_line(a.node_line(&n).text(" "), &n, &g)
                    .text(": ")
                    .link(c.to_string(), a.link(query))
                    .text(format!(" {what}: {action}")),
            });
        }
    }
    if let Some(rows) = a.get(&q::THROTTLE_SECONDS, &mut s) {
        let mut rows: Vec<&Sample> = rows.iter().collect();
        rows.sort_by(|x, y| y.value.total_cmp(&x.value));
        for r in rows.iter().take(10) {
            let thermal =
                r.label("reason").contains("thermal") || r.label("reason").contains("brake");
            let line = gpu_words(a.node_line(r.label("instance")).text(" "), r)
                .text(format!(": held down by `{}` for ", r.label("reason")))
                .link(fmt_duration(r.value), a.link(&q::THROTTLE_SECONDS));
            if thermal && r.value > a.secs as f64 * 0.1 {
                s.findings.push(Finding {
                    level: Level::Warning,
                    line: line.text(": check cooling and power (runbook `gpu-throttle`)"),
                });
            } else {
                s.lines.push(line);
            }
        }
    }
    f.errors_per_node = errors.into_iter().collect();
    if s.findings.is_empty() && s.failures.is_empty() {
        s.lines.push(
            Line::new()
                .text("No XIDs, uncorrectable ECC errors, row remaps, NVLink or PCIe errors."),
        );
    }
    s
}

fn utilization(a: &Answers, f: &mut Figures) -> Section {
    let mut s = Section::new(SectionKind::Utilization);
    if let Some(v) = a.get(&q::FLEET_UTILIZATION, &mut s) {
        if let Some(x) = v.first().filter(|x| x.value.is_finite()) {
            f.fleet_utilization = Some(x.value);
            s.lines.push(
                Line::new()
                    .text("Fleet GPU utilization: ")
                    .link(
                        format!("{} %", fmt_num(x.value)),
                        a.link(&q::FLEET_UTILIZATION),
                    )
                    .text(" on average over the period"),
            );
        }
    }
    if let Some(v) = a.get(&q::GPU_MEMORY_USED, &mut s) {
        if let Some(x) = v.first().filter(|x| x.value.is_finite()) {
            s.lines.push(
                Line::new()
                    .text("GPU memory used: ")
                    .link(
                        format!("{} %", fmt_num(x.value * 100.0)),
                        a.link(&q::GPU_MEMORY_USED),
                    )
                    .text(" of the fleet's GPU memory on average"),
            );
        }
    }
    let node_util: BTreeMap<String, f64> = a
        .get(&q::NODE_UTILIZATION, &mut s)
        .unwrap_or_default()
        .iter()
        .map(|r| (node(r), r.value))
        .collect();
    if let Some(rows) = a.get(&q::IDLE_GPU_HOURS, &mut s) {
        let rows: Vec<(String, f64)> = rows.iter().map(|r| (node(r), r.value)).collect();
        let (idle, total) = idle_hours(&rows);
        f.idle_gpu_hours_total = Some(total);
        s.lines.push(
            Line::new()
                .text("Idle GPU-hours (whole hours under 5 % utilization): ")
                .link(total.to_string(), a.link(&q::IDLE_GPU_HOURS))
                .text(" in total"),
        );
        for (n, h) in idle.iter().filter(|x| x.1 > 0).take(5) {
            let mut line = Line::new().text("Idle: ");
            line.0.extend(a.node_line(n).0);
            line = line
                .text(" ")
                .link(format!("{h} GPU-hours"), a.link(&q::IDLE_GPU_HOURS));
            if let Some(u) = node_util.get(n) {
                line = line
                    .text(", average utilization ")
                    .link(format!("{} %", fmt_num(*u)), a.link(&q::NODE_UTILIZATION));
            }
            s.lines
                .push(line.text(": free or reassign the allocation (runbook `gpu-underutilized`)"));
        }
        f.idle_gpu_hours = idle;
    }
    if let Some(rows) = a.get(&q::WORKLOADS_TOP, &mut s) {
        let mut rows: Vec<&Sample> = rows.iter().filter(|r| r.value.is_finite()).collect();
        rows.sort_by(|x, y| y.value.total_cmp(&x.value));
        for r in rows {
            let mut line = Line::new()
                .text("GPU memory held: ")
                .value(workload_name(r))
                .text(" on ");
            line.0.extend(a.node_line(&node(r)).0);
            s.lines.push(
                line.text(": ")
                    .link(fmt_bytes(r.value), a.link(&q::WORKLOADS_TOP))
                    .text(" on average"),
            );
        }
    }
    s
}

/// A workload as a person reads it: `pod <namespace>/<pod>` where the
/// agent names the pod (`gpu_workload_*`'s `namespace` and `pod` labels,
/// `exported_*` behind prometheus-operator: `message::pod_labels`),
/// else by its kind and id (`Slurm job 4242`, `Kubernetes pod uid 3f2a…`).
/// Outside text: a value the renderers escape.
pub fn workload_name(r: &Sample) -> String {
    match crate::message::pod_labels(|k| r.labels.get(k).map(String::as_str)) {
        Some((ns, pod, _)) => format!("pod {ns}/{pod}"),
        None => {
            let id = r.label("workload");
            match r.label("workload_type") {
                "kubernetes" => format!("Kubernetes pod uid {id}"),
                "slurm" => format!("Slurm job {id}"),
                "-" => format!("workload {id}"),
                t => format!("{t} {id}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_hours_days_to_full_and_label_strings() {
        let rows = vec![
            ("b".to_string(), 4.0),
            ("a".to_string(), 29.000000001),
            ("c".to_string(), 0.0),
            ("d".to_string(), 4.0),
        ];
        let (idle, total) = idle_hours(&rows);
        assert_eq!(
            idle,
            vec![
                ("a".to_string(), 29),
                ("b".to_string(), 4),
                ("d".to_string(), 4)
            ]
        );
        assert_eq!(total, 37);
        assert_eq!(days_to_full(216_000.0), Some(2.5));
        assert_eq!(days_to_full(f64::INFINITY), None);
        assert_eq!(days_to_full(-5.0), None);
        assert_eq!(days_to_full(f64::NAN), None);
        assert_eq!(promql_string(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(chart_step(86_400), 360);
        let q = last_seen_query(&["10.0.0.3:9949".to_string(), "b".to_string()], 86_400);
        assert!(q.contains(r#"instance=~"10\\.0\\.0\\.3:9949|b""#), "{q}");
        assert_eq!(chart_step(3600), 60);
    }
}
