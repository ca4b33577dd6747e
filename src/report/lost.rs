//! One fault, one finding: a GPU that falls off the bus shows as XID 79,
//! its node's `gpu_devices` dropping, its series stopping and `gpu_up` 0;
//! these are grouped per (node, GPU) into one [`LostGpu`] with all of them
//! as evidence, listed once (in Fleet). The XID stays in GPU health's
//! totals without a finding of its own; its still-firing alerts are that
//! finding's lines (`incidents.rs`). No I/O here.

use std::collections::{BTreeMap, HashMap};

use crate::report::compute::{count, gpu_parts, promql_string, Answers};
use crate::report::prom::Sample;
use crate::report::queries::{self as q, Query};
use crate::report::{Figures, Line, LostGpu};

/// The GPUs lost in the period, one per fault: a GPU that is down, stopped
/// reporting or had XID 79, on a node whose GPU count dropped, is one
/// fault with all of that as evidence; a dropped count with no GPU to pin
/// it on is one fault of the node.
pub fn lost_gpus_from(
    down: &[Sample],
    missing: &[Sample],
    xids: &[Sample],
    dropped: &[Sample],
    most: &[Sample],
) -> Vec<LostGpu> {
    let mut faults: BTreeMap<(String, Option<String>), LostGpu> = BTreeMap::new();
    let gpu_of = |r: &Sample| {
        r.labels
            .get("gpu")
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
    };
    let uuid_of = |r: &Sample| r.labels.get("uuid").filter(|u| !u.is_empty()).cloned();
    fn entry<'f>(
        faults: &'f mut BTreeMap<(String, Option<String>), LostGpu>,
        r: &Sample,
    ) -> Option<&'f mut LostGpu> {
        let instance = r.labels.get("instance")?.clone();
        let gpu = r
            .labels
            .get("gpu")
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())?;
        let f = faults
            .entry((instance.clone(), Some(gpu.clone())))
            .or_insert_with(|| LostGpu {
                instance,
                gpu: Some(gpu),
                ..LostGpu::default()
            });
        if f.uuid.is_none() {
            f.uuid = r.labels.get("uuid").filter(|u| !u.is_empty()).cloned();
        }
        Some(f)
    }
    for r in down {
        if let Some(f) = entry(&mut faults, r) {
            f.down = true;
        }
    }
    for r in missing {
        if let Some(f) = entry(&mut faults, r) {
            f.stopped_reporting = true;
        }
    }
    let most: HashMap<&str, u64> = most
        .iter()
        .filter_map(|r| Some((r.labels.get("instance")?.as_str(), count(r.value))))
        .collect();
    for r in dropped {
        let Some(instance) = r.labels.get("instance") else {
            continue;
        };
        let fewer = count(r.value);
        let devices = most
            .get(instance.as_str())
            .map(|m| (*m, m.saturating_sub(fewer)));
        let mut pinned = false;
        for ((i, _), f) in faults.iter_mut() {
            if i == instance {
                f.devices = devices;
                f.fewer = fewer;
                pinned = true;
            }
        }
        if !pinned {
            faults.insert(
                (instance.clone(), None),
                LostGpu {
                    instance: instance.clone(),
                    fewer,
                    devices,
                    ..LostGpu::default()
                },
            );
        }
    }
    // XID 79 is evidence of a fault the other signals show; alone (the
    // GPU came back) it stays an XID finding of its own.
    for r in xids.iter().filter(|r| r.label("xid") == "79") {
        let Some(instance) = r.labels.get("instance") else {
            continue;
        };
        let n = count(r.value);
        let target = match gpu_of(r) {
            Some(g) => faults.get_mut(&(instance.clone(), Some(g))),
            // On a bus where no GPU is known any more: the node's one
            // lost GPU, or its dropped count.
            None => {
                let of_node: Vec<&(String, Option<String>)> =
                    faults.keys().filter(|(i, _)| i == instance).collect();
                match of_node.as_slice() {
                    [k] => {
                        let k = (*k).clone();
                        faults.get_mut(&k)
                    }
                    _ => None,
                }
            }
        };
        if let Some(f) = target {
            f.xid79 += n;
            if f.uuid.is_none() {
                f.uuid = uuid_of(r);
            }
        }
    }
    faults.into_values().collect()
}

pub(super) fn lost_gpus(a: &Answers) -> Vec<LostGpu> {
    let get = |q: &Query| a.answered(q).unwrap_or_default();
    lost_gpus_from(
        get(&q::GPUS_DOWN),
        get(&q::GPUS_MISSING),
        get(&q::XIDS),
        get(&q::GPUS_DROPPED),
        get(&q::GPUS_MOST),
    )
}

/// Whether an XID row is evidence of a lost GPU the Fleet section lists.
pub(super) fn is_lost_gpu_evidence(f: &Figures, r: &Sample) -> bool {
    if r.label("xid") != "79" {
        return false;
    }
    let instance = r.label("instance");
    let gpu = r
        .labels
        .get("gpu")
        .map(|g| g.trim())
        .filter(|g| !g.is_empty());
    f.lost_gpus.iter().any(|l| {
        l.instance == instance && l.xid79 > 0 && (gpu.is_none() || l.gpu.as_deref() == gpu)
    })
}

/// `**gpu-node-3** (10.0.0.3:9949) GPU 5 (GPU-3f2a1b2c) fell off the bus:
/// XID 79 ×1, GPUs 8 → 7, stopped reporting, `gpu_up` 0: drain …`.
pub(super) fn lost_gpu_line(a: &Answers, l: &LostGpu) -> Line {
    let mut line = a.node_line(&l.instance).text(" ");
    line = match &l.gpu {
        Some(g) => gpu_parts(line, Some(g), l.uuid.as_deref(), None).text(if l.xid79 > 0 {
            " fell off the bus: "
        } else if l.down {
            " is lost (the driver cannot read it): "
        } else {
            " stopped reporting: "
        }),
        None => line.text(format!(
            "lost {} GPU{} (fell off the bus?): ",
            l.fewer.max(1),
            if l.fewer > 1 { "s" } else { "" }
        )),
    };
    let mut first = true;
    let mut sep = |line: Line| {
        if std::mem::take(&mut first) {
            line
        } else {
            line.text(", ")
        }
    };
    if l.xid79 > 0 {
        let expr = format!(
            "{} and on (instance) gpu_xid_errors_total{{instance=\"{}\",xid=\"79\"}}",
            q::XIDS.render(a.secs),
            promql_string(&l.instance),
        );
        line = sep(line)
            .text("XID 79 ×")
            .link(l.xid79.to_string(), a.link_expr(&expr));
    }
    match l.devices {
        Some((most, now)) => {
            line = sep(line)
                .text("GPUs ")
                .link(format!("{most} → {now}"), a.link(&q::GPUS_DROPPED));
        }
        None if l.fewer > 0 => {
            line = sep(line)
                .link(l.fewer.to_string(), a.link(&q::GPUS_DROPPED))
                .text(format!(" GPU{} fewer", if l.fewer == 1 { "" } else { "s" }));
        }
        None => {}
    }
    if l.stopped_reporting {
        line = sep(line).link("stopped reporting", a.link(&q::GPUS_MISSING));
    }
    if l.down {
        line = sep(line).text("`gpu_up` ").link("0", a.link(&q::GPUS_DOWN));
    }
    // The catalogue's XID 79 entry is the one instruction for a lost GPU.
    let (action, runbook) = crate::gpu::xid::lookup(crate::gpu::xid::FELL_OFF_THE_BUS).map_or(
        (
            "Drain the node and reboot it; never a GPU reset.",
            "gpu-fell-off-bus",
        ),
        |i| (i.action, i.runbook),
    );
    line.text(format!(": {action} (runbook `{runbook}`)"))
}
