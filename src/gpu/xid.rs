//! NVIDIA XID errors: the catalogue (meaning, severity, resolution class after
//! NVIDIA's Xid Catalog, recommended action
//! in our own words) and the kernel-log parser for `NVRM: Xid (...)` lines.
//!
//! [`lookup`] is what `/v1/events`, the metrics and the runbooks use to
//! explain a code; [`catalogue_markdown`] renders the table in docs/gpu.md (a
//! test keeps the two in sync). This module does no I/O.

use crate::events::{EventKind, XidSource};
pub use crate::events::{XidInfo, XidResolution, XidSeverity};
use crate::gpu::normalize_pci_bus_id;

/// XID 79, "GPU has fallen off the bus": a lost GPU's instruction is its
/// entry's (the report's Fleet line uses it).
pub const FELL_OFF_THE_BUS: u32 = 79;

/// The catalogue entry for `code`, if we have one.
pub fn lookup(code: u32) -> Option<&'static XidInfo> {
    CATALOGUE.iter().find(|x| x.code == code)
}

/// Whether `code` counts as `gpu_errors_total{type="xid_critical"}`.
pub fn is_critical(code: u32) -> bool {
    lookup(code).is_some_and(|x| x.severity == XidSeverity::Critical)
}

/// Every entry, by code.
pub fn catalogue() -> &'static [XidInfo] {
    CATALOGUE
}

/// The catalogue as a Markdown table (pasted into docs/gpu.md between the
/// `xid-catalogue` markers; `tests/it/gpu_docs.rs` checks they match).
pub fn catalogue_markdown() -> String {
    let mut out = String::from(
        "| XID | What | Severity | Class (NVIDIA bucket) | Meaning | Recommended action | Runbook | Source |\n|---|---|---|---|---|---|---|---|\n",
    );
    for x in CATALOGUE {
        let class = if x.nvidia_bucket == x.resolution.as_str() {
            format!("`{}`", x.nvidia_bucket)
        } else {
            format!("`{}` (`{}`)", x.resolution.as_str(), x.nvidia_bucket)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | `{}` | {} |\n",
            x.code,
            x.title,
            x.severity.as_str(),
            class,
            x.meaning,
            x.action,
            x.runbook,
            x.source
        ));
    }
    out
}

/// Where a text about `code` (an alert rule's description, a report line, a
/// runbook's texts, a chat note) disagrees with the catalogue's action for
/// it: a word the class's instruction needs that the text lacks, or an
/// action the class rules out given as an instruction (in a clause without
/// "never", "cannot", "not", "no", "without" or "failed"). XID 79 (RESTART_BM):
/// drain, reboot, power-cycle through the BMC, never a GPU reset. XID 94:
/// restart the application, no drain, a pending row remap applied by a reset
/// once the GPU is idle. A GPU reset class:
/// drain and reset. `None` when the text agrees (or the code is unknown).
pub fn disagreement(code: u32, text: &str) -> Option<String> {
    let info = lookup(code)?;
    let (must, never): (&[&str], &[&[&str]]) = match (info.resolution, code) {
        (RestartBm, _) => (
            &["drain", "reboot", "bmc"],
            &[&["reset", "resets", "resetting"]],
        ),
        (RestartApp, 94) => (
            &["restart", "remap", "pending", "idle"],
            &[&["drain", "drains", "draining"]],
        ),
        (ResetGpu, _) => (&["drain", "reset"], &[]),
        _ => (&[], &[]),
    };
    let lower = text.to_lowercase();
    let missing: Vec<&str> = must
        .iter()
        .copied()
        .filter(|w| !lower.contains(w))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "XID {code} ({}): the text does not say {} ({:?})",
            info.nvidia_bucket,
            missing.join(", "),
            info.action
        ));
    }
    const NEGATIONS: &[&str] = &["never", "cannot", "not", "no", "without", "failed", "can't"];
    for clause in lower.split(['.', ';', ':', ',', '(', ')', '\n']) {
        let words: Vec<&str> = clause
            .split(|c: char| !c.is_alphanumeric() && c != '\'')
            .filter(|w| !w.is_empty())
            .collect();
        let negated = words.iter().any(|w| NEGATIONS.contains(w));
        for forms in never {
            if !negated && words.iter().any(|w| forms.contains(w)) {
                return Some(format!(
                    "XID {code} ({}): {:?} instructs {} ({:?})",
                    info.nvidia_bucket,
                    clause.trim(),
                    forms[0],
                    info.action
                ));
            }
        }
    }
    None
}

/// Recognises an NVIDIA XID kernel message:
/// `NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.`
/// and its variants (no `PCI:` prefix, no pid/name, `pid='<unknown>'`,
/// `name=<unknown>`). The follow-up lines of a multi-line report
/// (`NVRM: GPU at PCI:...`, `NVRM: GPU Board Serial Number: ...`) are not XIDs.
pub fn parse_kmsg(message: &str) -> Option<EventKind> {
    let at = message.find("NVRM: Xid (")?;
    let rest = &message[at + "NVRM: Xid (".len()..];
    let (bus, rest) = rest.split_once(')')?;
    let pci_bus_id = normalize_pci_bus_id(bus)?;
    let rest = rest.strip_prefix(':')?.trim_start();
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let xid: u32 = rest[..digits].parse().ok()?;
    let mut rest = rest[digits..].trim_start_matches(',').trim_start();
    let mut pid = None;
    let mut process = None;
    if let Some(v) = rest.strip_prefix("pid=") {
        let (value, tail) = v.split_once(',').unwrap_or((v, ""));
        pid = value.trim().parse::<u32>().ok();
        rest = tail.trim_start();
    }
    if let Some(v) = rest.strip_prefix("name=") {
        let value = v
            .split_once(", ")
            .map_or(v.trim_end_matches(','), |(n, _)| n);
        let value = value.trim();
        if !value.is_empty() && value != "<unknown>" && value != "'<unknown>'" {
            process = Some(value.to_string());
        }
    }
    Some(event(pci_bus_id, xid, pid, process, XidSource::Kmsg))
}

/// An XID event with its catalogue entry attached.
pub fn event(
    pci_bus_id: String,
    xid: u32,
    pid: Option<u32>,
    process: Option<String>,
    source: XidSource,
) -> EventKind {
    EventKind::Xid {
        pci_bus_id,
        xid,
        pid,
        process,
        source,
        info: lookup(xid),
    }
}

const GPU_XID: &str = "gpu-xid";
const GPU_RESET: &str = "gpu-reset";
const ECC: &str = "gpu-ecc-remap";
const NVLINK: &str = "gpu-nvlink";
const FELL_OFF_BUS: &str = "gpu-fell-off-bus";

/// The document every entry was checked against.
const CATALOG: &str = "NVIDIA Xid Catalog (XID Errors, r555+), sheet Xids";
const CATALOG_48: &str =
    "NVIDIA Xid Catalog, sheet Xids; Fault Resolution Buckets: WORKFLOW_XID_48";
const CATALOG_13: &str =
    "NVIDIA Xid Catalog, sheet Xids; Fault Resolution Buckets: WORKFLOW_XID_13";
const CATALOG_31: &str =
    "NVIDIA Xid Catalog, sheet Xids; Fault Resolution Buckets: WORKFLOW_XID_31";
const CATALOG_45: &str =
    "NVIDIA Xid Catalog, sheet Xids; Fault Resolution Buckets: WORKFLOW_XID_45";
const CATALOG_74: &str = "NVIDIA Xid Catalog, sheet Xids (trigger conditions); Fault Resolution Buckets: WORKFLOW_NVLINK_ERR";
const CATALOG_NVL5: &str = "NVIDIA Xid Catalog, sheet Xids; sheet XID 144-150 Decode";
const CATALOG_ECC: &str = "NVIDIA Xid Catalog, sheet Xids (trigger conditions 94/95)";
const CATALOG_REMAP: &str =
    "NVIDIA Xid Catalog, sheet Xids; NVIDIA GPU Memory Error Management (row remapping)";

/// Builds an entry; the severity follows the class.
#[allow(clippy::too_many_arguments)]
const fn entry(
    code: u32,
    title: &'static str,
    meaning: &'static str,
    resolution: XidResolution,
    nvidia_bucket: &'static str,
    action: &'static str,
    runbook: &'static str,
    source: &'static str,
) -> XidInfo {
    let severity = match resolution {
        XidResolution::Ignore => XidSeverity::Info,
        XidResolution::RestartApp | XidResolution::ContactSupport => XidSeverity::Warning,
        XidResolution::ResetGpu | XidResolution::CheckNvlink | XidResolution::RestartBm => {
            XidSeverity::Critical
        }
    };
    XidInfo {
        code,
        title,
        meaning,
        severity,
        resolution,
        nvidia_bucket,
        action,
        runbook,
        source,
    }
}

use XidResolution::{CheckNvlink, ContactSupport, Ignore, ResetGpu, RestartApp, RestartBm};

static CATALOGUE: &[XidInfo] = &[
    entry(
        8,
        "GPU stopped processing (channel idle timeout)",
        "A command stream on the GPU stopped making progress and the driver timed it out; usually the application's kernel hung.",
        RestartApp,
        "RESTART_APP",
        "Restart the job; no GPU action. If it recurs on this GPU with different jobs, collect an nvidia-bug-report for support.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        13,
        "Graphics engine exception",
        "A CUDA kernel hit an exception such as an out-of-range address or an illegal instruction. Nearly always an application bug.",
        RestartApp,
        "RESTART_APP",
        "Tell the job owner (run the job under compute-sanitizer or cuda-gdb); no GPU action. Only if the same GPU faults with many unrelated jobs, drain it and run DCGM diagnostics.",
        GPU_XID,
        CATALOG_13,
    ),
    entry(
        31,
        "GPU memory page fault",
        "A kernel accessed GPU virtual memory that was not mapped (an MMU fault). Usually an application bug; rarely a driver or hardware problem.",
        RestartApp,
        "RESTART_APP",
        "Tell the job owner; no GPU action. If faults repeat on the same GPU across unrelated jobs, drain it and run DCGM diagnostics.",
        GPU_XID,
        CATALOG_31,
    ),
    entry(
        32,
        "Corrupted push buffer stream",
        "The DMA controller between driver and GPU saw an invalid command stream; mostly PCIe signal quality, rarely the application.",
        RestartApp,
        "RESTART_APP",
        "Restart the job; check gpu_pcie_replay_total on this GPU. Recurring on one GPU: ticket the hardware team (PCIe slot, riser).",
        GPU_XID,
        CATALOG,
    ),
    entry(
        38,
        "Driver firmware error (watchdog timeout)",
        "Firmware on the GPU reported a watchdog timeout; the GPU keeps working.",
        Ignore,
        "IGNORE",
        "No action. If it repeats, collect an nvidia-bug-report for support.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        43,
        "GPU stopped processing (application fault)",
        "The driver stopped a channel after a fault in the application (it often follows XID 13 or 31). The GPU stays healthy.",
        Ignore,
        "IGNORE",
        "No GPU action; the application that owned the channel needs fixing. Tell the job owner if it repeats.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        44,
        "Graphics engine fault during context switch",
        "The graphics engine faulted while switching contexts.",
        Ignore,
        "IGNORE",
        "No action. If it repeats, collect an nvidia-bug-report for support.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        45,
        "Preemptive cleanup",
        "The driver tore down a channel because its process was killed (Ctrl-C, SIGKILL, a GPU reset) or an earlier error stopped it. A consequence, not a cause.",
        Ignore,
        "WORKFLOW_XID_45",
        "Nothing by itself: follow the XID just before it on the same GPU. Seen alone on an NVSwitch system: restart the Fabric Manager (runbook gpu-nvlink).",
        GPU_XID,
        CATALOG_45,
    ),
    entry(
        46,
        "GPU stopped processing (GPU timeout)",
        "The GPU itself stopped answering the driver.",
        ResetGpu,
        "RESET_GPU",
        "Drain the node, stop what holds the GPU, reset it, verify (nvidia-smi, DCGM diag) and return it to service; contact support if it recurs.",
        GPU_RESET,
        CATALOG,
    ),
    entry(
        48,
        "Double-bit ECC error",
        "GPU memory (or SRAM) returned an uncorrectable error; the application using it was told and stopped.",
        ResetGpu,
        "WORKFLOW_XID_48",
        "Drain, reset the GPU (with XID 63/64 the reset applies the row remap), verify with DCGM diag and check gpu_remapped_rows. Repeats or an SRAM threshold exceeded: RMA.",
        ECC,
        CATALOG_48,
    ),
    entry(
        61,
        "Internal micro-controller breakpoint",
        "A micro-controller on the GPU hit a breakpoint (older GPUs; NVIDIA lists the code as unused on A100 and later).",
        ContactSupport,
        "CONTACT_SUPPORT",
        "No GPU action by itself; collect an nvidia-bug-report and contact support. Follow XID 62 if it follows.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        62,
        "Internal micro-controller halt",
        "A micro-controller on the GPU halted. The GPU does not work correctly until it is reset.",
        ResetGpu,
        "RESET_GPU",
        "Drain the node, stop what holds the GPU, reset it and verify; if it recurs, collect an nvidia-bug-report and contact support.",
        GPU_RESET,
        CATALOG,
    ),
    entry(
        63,
        "Row remap or page retirement recorded",
        "ECC handling recorded a memory row for remapping (or a page for retirement). The GPU keeps working; the remap takes effect at the next reset.",
        Ignore,
        "IGNORE",
        "No action. A pending remap is applied by the next GPU reset, whenever convenient (the GPURowRemapPending alert tracks it).",
        GPU_XID,
        CATALOG_REMAP,
    ),
    entry(
        64,
        "Row remap or page retirement failed",
        "The GPU could not record a memory row for remapping (or a page for retirement), for example because no spare rows are left.",
        ResetGpu,
        "RESET_GPU",
        "Drain and reset the GPU, check gpu_remapped_rows{state=\"failure\"}; if the failure flag stays set, keep it drained and RMA it.",
        ECC,
        CATALOG_REMAP,
    ),
    entry(
        69,
        "Graphics engine class error",
        "The graphics engine rejected a command; usually an application or driver bug.",
        RestartApp,
        "RESTART_APP",
        "Restart the job and tell its owner; no GPU action.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        74,
        "NVLink error",
        "An NVLink connection to another GPU or NVSwitch reported an error (the line names the link); a failed peer can cause it too. A GPU reset or node reboot clears it.",
        CheckNvlink,
        "WORKFLOW_NVLINK_ERR",
        "Drain the node, check the link counters and the Fabric Manager, reset the GPUs (or reboot); reseat or replace the hardware if it recurs after a reset.",
        NVLINK,
        CATALOG_74,
    ),
    entry(
        79,
        "GPU has fallen off the bus",
        "The GPU stopped answering on PCIe. Nothing can use it until the node is rebooted or power-cycled; a GPU reset cannot reach it and NVML calls on it fail or hang.",
        RestartBm,
        "RESTART_BM",
        "Drain the node and reboot it; power-cycle it through the BMC if the GPU is still missing; never a GPU reset (it cannot reach the GPU). Check PCIe seating, power and temperatures; a repeat means hardware replacement.",
        FELL_OFF_BUS,
        CATALOG,
    ),
    entry(
        92,
        "High single-bit ECC error rate",
        "The GPU corrected an unusually high number of single-bit memory errors; nothing was lost.",
        Ignore,
        "IGNORE",
        "No action. Watch gpu_ecc_errors_total{type=\"corrected\"} and gpu_remapped_rows; contact support if it keeps rising.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        94,
        "Contained ECC error",
        "An uncorrectable memory error was contained: only the application using that memory was stopped; the others keep running.",
        RestartApp,
        "RESTART_APP",
        "Restart the affected application; no drain. A pending row remap (gpu_remapped_rows{state=\"pending\"} > 0) is applied by a GPU reset once the GPU is idle (approval-gated: runbook gpu-xid offers the reset when the remap is pending and the GPU idle); a remap failure (state=\"failure\") keeps the GPU drained for hardware replacement (runbook gpu-ecc-remap).",
        GPU_XID,
        CATALOG_ECC,
    ),
    entry(
        95,
        "Uncontained ECC error",
        "An uncorrectable memory error could not be contained: every application on the GPU is affected.",
        ResetGpu,
        "RESET_GPU",
        "Drain, reset the GPU before restarting applications, verify with DCGM diag and check gpu_remapped_rows; RMA if it repeats or remapping fails.",
        ECC,
        CATALOG_ECC,
    ),
    entry(
        109,
        "Context switch timeout",
        "The GPU did not finish switching contexts in time.",
        ResetGpu,
        "RESET_GPU",
        "Drain the node, stop what holds the GPU, reset it and verify; contact support if it recurs.",
        GPU_RESET,
        CATALOG,
    ),
    entry(
        119,
        "GSP RPC timeout",
        "The GPU System Processor (GSP firmware) did not answer the driver in time. NVML often misses this one.",
        ResetGpu,
        "RESET_GPU",
        "Drain, reset the GPU and verify; a node power cycle if the reset does not clear it. Recurring after a power cycle: update the driver and send an nvidia-bug-report.",
        GPU_RESET,
        CATALOG,
    ),
    entry(
        120,
        "GSP error",
        "Code running on the GPU System Processor (GSP firmware) reported an error.",
        ResetGpu,
        "RESET_GPU",
        "Drain, reset the GPU and verify; a node power cycle if the reset does not clear it. Recurring after a power cycle: update the driver and send an nvidia-bug-report.",
        GPU_RESET,
        CATALOG,
    ),
    entry(
        137,
        "NVLink privilege error",
        "The remote MMU refused an NVLink peer-to-peer access; typically an application bug.",
        Ignore,
        "IGNORE",
        "No GPU action; tell the job owner (run it under compute-sanitizer or cuda-gdb).",
        GPU_XID,
        CATALOG,
    ),
    entry(
        140,
        "Unrecovered ECC error",
        "Uncorrectable memory errors interrupted the driver's ability to mark pages or rows for repair.",
        ResetGpu,
        "RESET_GPU",
        "Drain, reset the GPU, verify and check gpu_remapped_rows; contact the vendor if it persists.",
        ECC,
        CATALOG,
    ),
    entry(
        143,
        "GPU initialization failure",
        "The GPU failed to initialise (firmware or hardware fault).",
        ResetGpu,
        "RESET_GPU",
        "Drain, reset the GPU and verify; if it still fails to come up, reboot the node and contact support.",
        GPU_RESET,
        CATALOG,
    ),
    entry(
        144,
        "NVLink SAW error",
        "NVLink5 (GB200/B100): an error in the SAW unit; the message's subcode and error status say whether it is fatal.",
        CheckNvlink,
        "WORKFLOW_NVLINK5_ERR",
        "Decode the message (sheet XID 144-150 Decode): non-fatal statuses need nothing; fatal ones need the node drained and the GPU reset.",
        NVLINK,
        CATALOG_NVL5,
    ),
    entry(
        145,
        "NVLink RLW error",
        "NVLink5 (GB200/B100): an error in the RLW unit (remap, response, receive pipe, tag state); the subcode and error status say whether it is fatal.",
        CheckNvlink,
        "WORKFLOW_NVLINK5_ERR",
        "Decode the message (sheet XID 144-150 Decode): follow an accompanying XID 154; fatal statuses need the node drained and the GPU reset.",
        NVLINK,
        CATALOG_NVL5,
    ),
    entry(
        146,
        "NVLink TLW error",
        "NVLink5 (GB200/B100): an error in the TLW unit; the subcode and error status say whether it is fatal.",
        CheckNvlink,
        "WORKFLOW_NVLINK5_ERR",
        "Decode the message (sheet XID 144-150 Decode): fatal statuses need the node drained and the GPU reset.",
        NVLINK,
        CATALOG_NVL5,
    ),
    entry(
        147,
        "NVLink TREX error",
        "NVLink5 (GB200/B100): an error in the TREX unit; not expected in production.",
        CheckNvlink,
        "WORKFLOW_NVLINK5_ERR",
        "Decode the message (sheet XID 144-150 Decode); report it to support.",
        NVLINK,
        CATALOG_NVL5,
    ),
    entry(
        148,
        "NVLink NVLPW_CTRL error",
        "NVLink5 (GB200/B100): an error in the NVLPW control unit.",
        CheckNvlink,
        "WORKFLOW_NVLINK5_ERR",
        "Decode the message (sheet XID 144-150 Decode); report it to support if it repeats.",
        NVLINK,
        CATALOG_NVL5,
    ),
    entry(
        149,
        "NVLink NETIR error",
        "NVLink5 (GB200/B100): a NETIR event such as a link down; the subcode names the cause (peer side down, signal integrity, thermal).",
        CheckNvlink,
        "WORKFLOW_NVLINK5_ERR",
        "Decode the message (sheet XID 144-150 Decode): link-fatal events need the node drained and the GPU reset; check the peer device and the cables.",
        NVLINK,
        CATALOG_NVL5,
    ),
    entry(
        150,
        "NVLink MSE error",
        "NVLink5 (GB200/B100): the NVLink management firmware (MSE) degraded or its watchdog fired.",
        CheckNvlink,
        "WORKFLOW_NVLINK5_ERR",
        "Drain the node and reset the GPU; contact support if it recurs.",
        NVLINK,
        CATALOG_NVL5,
    ),
    entry(
        154,
        "GPU recovery action changed",
        "Accompanies another XID and states the recovery it needs: None, Drain P2P, Drain and Reset, GPU Reset Required or Node Reboot Required.",
        Ignore,
        "XID_154",
        "No action for this line itself: do what it states for the XID it accompanies (that XID has its own alert and runbook). Node Reboot Required means reboot, never a GPU reset.",
        GPU_XID,
        CATALOG,
    ),
    entry(
        158,
        "GPU fatal timeout",
        "The GPU hit a fatal timeout and stopped working.",
        ResetGpu,
        "RESET_GPU",
        "Drain, reset the GPU and verify; contact support if it recurs.",
        GPU_RESET,
        CATALOG,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// (bus, xid, pid, process) or None.
    fn check(line: &str, expect: Option<(&str, u32, Option<u32>, Option<&str>)>) {
        let got = parse_kmsg(line).map(|k| match k {
            EventKind::Xid {
                pci_bus_id,
                xid,
                pid,
                process,
                source,
                info,
            } => {
                assert_eq!(source, XidSource::Kmsg);
                assert_eq!(info, lookup(xid));
                (pci_bus_id, xid, pid, process)
            }
            other => panic!("not an xid: {other:?}"),
        });
        let expect = expect.map(|(b, x, p, n)| (b.to_string(), x, p, n.map(str::to_string)));
        assert_eq!(got, expect, "line {line:?}");
    }

    #[test]
    fn parses_real_world_xid_lines() {
        let b = "00000000:3B:00.0";
        check(
            "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus.",
            Some((b, 79, Some(1234), Some("python"))),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus.",
            Some((b, 79, None, None)),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception on (GPC 1, TPC 0, SM 1): Out Of Range Address",
            Some((b, 13, None, None)),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 31, pid=2389, name=pt_main_thread, Ch 00000008, intr 10000000. MMU Fault: ENGINE GRAPHICS GPCCLIENT_T1_0 faulted @ 0x7f2a_4f000000. Fault is of type FAULT_PDE ACCESS_TYPE_READ",
            Some((b, 31, Some(2389), Some("pt_main_thread"))),
        );
        check(
            "NVRM: Xid (PCI:0000:c1:00): 43, pid=99, name=python3, Ch 00000010",
            Some(("00000000:C1:00.0", 43, Some(99), Some("python3"))),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 48, pid=777, name=python, An uncorrectable double bit error (DBE) has been detected on GPU in the framebuffer at partition 6, subpartition 0.",
            Some((b, 48, Some(777), Some("python"))),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 63, pid='<unknown>', name=<unknown>, Row Remapper: New row (0x00000000000a1b2c) was marked for remapping, reset gpu to activate.",
            Some((b, 63, None, None)),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 64, pid='<unknown>', name=<unknown>, Row Remapper: Failed to remap row (0x0000000000012345).",
            Some((b, 64, None, None)),
        );
        check(
            "NVRM: Xid (PCI:0000:9d:00): 74, pid=5121, name=python, NVLink: fatal error detected on link 5(0x0, 0x0, 0x10000, 0x0, 0x0, 0x0, 0x0)",
            Some(("00000000:9D:00.0", 74, Some(5121), Some("python"))),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 94, pid=4242, name=python, Contained: SM (0x1). RST: No, D-RST: No",
            Some((b, 94, Some(4242), Some("python"))),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 95, pid='<unknown>', name=<unknown>, Uncontained: FBHUB. RST: Yes, D-RST: No",
            Some((b, 95, None, None)),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 119, pid=3071, name=nvidia-smi, Timeout after 6s of waiting for RPC response from GPU0 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20800a4c 0x4).",
            Some((b, 119, Some(3071), Some("nvidia-smi"))),
        );
        check(
            "NVRM: Xid (PCI:0000:3b:00): 120, pid=3071, name=python, GSP task exception: (reason 0x2, task 0x4)",
            Some((b, 120, Some(3071), Some("python"))),
        );
        // Older drivers: no `PCI:` prefix; a kernel timestamp before NVRM.
        check(
            "[ 8812.131313] NVRM: Xid (0000:05:00): 13, Graphics Exception: ESR 0x405840=0x0",
            Some(("00000000:05:00.0", 13, None, None)),
        );
        // Multi-line reports: the follow-up lines are not XIDs.
        check(
            "NVRM: GPU at PCI:0000:3b:00: GPU-5c5a3b1e-8f1c-4c2e-9c0b-8b3f1b2a6d71",
            None,
        );
        check("NVRM: GPU Board Serial Number: 1654322001234", None);
        check(
            "NVRM: A GPU crash dump has been created. If possible, please run",
            None,
        );
        // Garbage.
        check("NVRM: Xid (PCI:zz): 79, x", None);
        check("NVRM: Xid (PCI:0000:3b:00): abc", None);
        check("usb 1-1: new high-speed USB device", None);
    }

    #[test]
    fn catalogue_covers_the_codes_operators_meet() {
        for code in [
            13, 31, 43, 45, 48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 109, 119, 120, 140, 143, 144,
            145, 146, 147, 148, 149, 150,
        ] {
            let x = lookup(code).unwrap_or_else(|| panic!("xid {code} missing"));
            assert!(!x.meaning.is_empty() && !x.action.is_empty());
        }
        let codes: Vec<u32> = CATALOGUE.iter().map(|x| x.code).collect();
        let sorted = {
            let mut c = codes.clone();
            c.sort();
            c.dedup();
            c
        };
        assert_eq!(codes, sorted, "catalogue sorted by code, no duplicates");
        assert!(is_critical(79) && is_critical(48) && !is_critical(13) && !is_critical(9999));
        for x in CATALOGUE {
            assert_eq!(x.severity, x.resolution.severity(), "xid {}", x.code);
        }
    }
}
