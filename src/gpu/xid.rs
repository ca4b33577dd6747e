//! NVIDIA XID errors: the catalogue (meaning, severity and recommended action
//! in our own words) and the kernel-log parser for `NVRM: Xid (...)` lines.
//!
//! [`lookup`] is what `/v1/events`, the metrics and the runbooks use to
//! explain a code; [`catalogue_markdown`] renders the table in docs/gpu.md (a
//! test keeps the two in sync). This module does no I/O.

use serde::Serialize;

use crate::collector::kmsg::{EventKind, XidSource};
use crate::gpu::normalize_pci_bus_id;

/// How urgently an XID needs a person.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum XidSeverity {
    /// The GPU (or node) needs action now: drain, reset, replace. Counted in
    /// `gpu_errors_total{type="xid_critical"}`.
    Critical,
    /// Usually one job failed or the GPU needs attention soon.
    Warning,
    /// Informational: a consequence of another error or of a killed process.
    Info,
}

impl XidSeverity {
    pub fn as_str(self) -> &'static str {
        match self {
            XidSeverity::Critical => "critical",
            XidSeverity::Warning => "warning",
            XidSeverity::Info => "info",
        }
    }
}

/// One catalogue entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct XidInfo {
    pub code: u32,
    /// A few words.
    pub title: &'static str,
    /// What the driver is telling you.
    pub meaning: &'static str,
    pub severity: XidSeverity,
    /// What an operator should do.
    pub action: &'static str,
    /// The runbook id that answers it (`runbooks/<id>.yaml`).
    pub runbook: &'static str,
}

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
/// `xid-catalogue` markers; `tests/gpu_docs.rs` checks they match).
pub fn catalogue_markdown() -> String {
    let mut out = String::from(
        "| XID | What | Severity | Meaning | Recommended action | Runbook |\n|---|---|---|---|---|---|\n",
    );
    for x in CATALOGUE {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | `{}` |\n",
            x.code,
            x.title,
            x.severity.as_str(),
            x.meaning,
            x.action,
            x.runbook
        ));
    }
    out
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
const ECC: &str = "gpu-ecc-remap";

static CATALOGUE: &[XidInfo] = &[
    XidInfo {
        code: 8,
        title: "GPU stopped responding to a channel",
        meaning: "A command stream on the GPU stopped making progress and the driver timed it out; usually the application's kernel hung, occasionally a driver or hardware fault.",
        severity: XidSeverity::Warning,
        action: "Check the job that owned the GPU. If it recurs with different jobs on the same GPU, reset the GPU and run diagnostics.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 13,
        title: "Graphics engine exception",
        meaning: "A shader or CUDA kernel hit an exception such as an out-of-range address or an illegal instruction. Nearly always an application bug.",
        severity: XidSeverity::Warning,
        action: "Tell the job owner (run the job with compute-sanitizer). Only if many different jobs hit it on the same GPU, drain the GPU and run diagnostics.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 31,
        title: "GPU memory page fault",
        meaning: "A kernel accessed GPU virtual memory that was not mapped (an MMU fault). Usually an application bug; rarely a driver problem.",
        severity: XidSeverity::Warning,
        action: "Tell the job owner; the job usually dies. If the fault repeats across unrelated jobs on the same GPU, drain it and run diagnostics.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 32,
        title: "Corrupted command stream",
        meaning: "The driver saw an invalid or corrupted push buffer, from a misbehaving application, memory corruption or PCIe errors.",
        severity: XidSeverity::Warning,
        action: "Check PCIe replay counters and other XIDs on the GPU; reset it if the errors continue.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 38,
        title: "Driver firmware error",
        meaning: "The driver's firmware on the GPU reported an internal error.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and reset it; if it recurs, update the driver and collect an nvidia-bug-report for the vendor.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 43,
        title: "GPU stopped processing",
        meaning: "The driver stopped a channel after a fault in the application (it often follows XID 13 or 31). The GPU itself is fine.",
        severity: XidSeverity::Warning,
        action: "No GPU action; the application that owned the channel needs fixing. Watch for it repeating across unrelated jobs.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 44,
        title: "Graphics engine fault during context switch",
        meaning: "The GPU faulted while switching between contexts; the GPU may be left in a bad state.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and reset it; if it recurs, run diagnostics.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 45,
        title: "Preemptive cleanup",
        meaning: "The driver cleaned up a channel because its process was killed or an earlier error stopped it. A consequence, not a cause.",
        severity: XidSeverity::Info,
        action: "Nothing by itself; look at the XIDs just before it on the same GPU.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 48,
        title: "Double-bit ECC error",
        meaning: "GPU memory returned an uncorrectable (double-bit) ECC error. Applications using that memory were stopped.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and reset it so the bad memory is retired or remapped. Check gpu_remapped_rows; repeated DBEs mean the GPU should be replaced.",
        runbook: ECC,
    },
    XidInfo {
        code: 61,
        title: "Internal micro-controller warning",
        meaning: "A micro-controller on the GPU hit a breakpoint or warning; the GPU may keep working.",
        severity: XidSeverity::Warning,
        action: "Watch the GPU; reset it when idle if XID 62 or hangs follow, and update the driver.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 62,
        title: "Internal micro-controller halt",
        meaning: "A micro-controller on the GPU halted. The GPU will not work correctly until it is reset.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and reset it (or reboot the node); if it recurs, collect an nvidia-bug-report and open a vendor case.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 63,
        title: "Row remap or page retirement recorded",
        meaning: "The GPU recorded a memory row for remapping (or a page for retirement) after ECC errors. It takes effect at the next GPU reset.",
        severity: XidSeverity::Warning,
        action: "Schedule a GPU reset when the GPU is idle so the pending remap is applied (gpu_remapped_rows{state=\"pending\"}).",
        runbook: ECC,
    },
    XidInfo {
        code: 64,
        title: "Row remap or page retirement failed",
        meaning: "The GPU could not record a memory row for remapping (or a page for retirement), for example because no spare rows are left.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and plan its replacement (RMA); it can no longer repair its memory.",
        runbook: ECC,
    },
    XidInfo {
        code: 69,
        title: "Graphics engine class error",
        meaning: "The graphics engine rejected a command; usually an application or driver bug.",
        severity: XidSeverity::Warning,
        action: "Check the application; reset the GPU if it keeps happening with different jobs.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 74,
        title: "NVLink error",
        meaning: "An NVLink link reported a fatal error (the line names the link). Multi-GPU jobs over that link fail.",
        severity: XidSeverity::Critical,
        action: "Drain the node, check gpu_nvlink_errors_total and the fabric manager log, reset the GPUs (or reboot); reseat or replace the hardware if it recurs.",
        runbook: "gpu-nvlink",
    },
    XidInfo {
        code: 79,
        title: "GPU has fallen off the bus",
        meaning: "The GPU stopped answering on PCIe. Nothing can use it until the node is power-cycled; NVML calls on it fail or hang.",
        severity: XidSeverity::Critical,
        action: "Drain the node and power-cycle it; check PCIe seating, power and temperatures. Repeated occurrences mean hardware replacement.",
        runbook: "gpu-fell-off-bus",
    },
    XidInfo {
        code: 92,
        title: "High single-bit ECC error rate",
        meaning: "The GPU corrected an unusually high number of single-bit memory errors.",
        severity: XidSeverity::Warning,
        action: "Watch gpu_ecc_errors_total{type=\"corrected\"} and remapped rows; schedule a reset and diagnostics.",
        runbook: ECC,
    },
    XidInfo {
        code: 94,
        title: "Contained ECC error",
        meaning: "An uncorrectable memory error was contained: only the application using that memory was stopped, the others keep running.",
        severity: XidSeverity::Warning,
        action: "Reset the GPU when it is idle so the affected row is remapped; check gpu_remapped_rows.",
        runbook: ECC,
    },
    XidInfo {
        code: 95,
        title: "Uncontained ECC error",
        meaning: "An uncorrectable memory error could not be contained: every application on the GPU is affected.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and reset it now; replace the GPU if it repeats or remapping fails.",
        runbook: ECC,
    },
    XidInfo {
        code: 109,
        title: "Context switch timeout",
        meaning: "The GPU did not finish switching contexts in time; often an application problem, sometimes a driver or hardware fault.",
        severity: XidSeverity::Warning,
        action: "Check the job; if it recurs on this GPU with other jobs, reset the GPU and run diagnostics.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 119,
        title: "GSP RPC timeout",
        meaning: "The GPU System Processor (GSP firmware) did not answer the driver in time. The GPU is usually unusable until reset. NVML often misses this one.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and reset it (or reboot); update the driver. If it recurs, collect an nvidia-bug-report for the vendor.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 120,
        title: "GSP error",
        meaning: "The GPU System Processor firmware reported an error. The GPU is usually unusable until reset.",
        severity: XidSeverity::Critical,
        action: "Drain the GPU and reset it (or reboot); update the driver if it recurs.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 140,
        title: "Unrecovered ECC error",
        meaning: "The GPU found uncorrectable memory errors it could not recover from (for example at start-up).",
        severity: XidSeverity::Critical,
        action: "Drain the GPU, reset it and check gpu_remapped_rows; replace the GPU if the error persists.",
        runbook: ECC,
    },
    XidInfo {
        code: 143,
        title: "GPU initialization failure",
        meaning: "The GPU failed to initialise (firmware or hardware fault); it cannot be used.",
        severity: XidSeverity::Critical,
        action: "Drain the node and reboot it; if the GPU still fails to come up, replace it.",
        runbook: GPU_XID,
    },
    XidInfo {
        code: 154,
        title: "GPU recovery action changed",
        meaning: "The driver states the recovery the GPU now needs (for example a GPU reset or a node reboot) after an earlier error.",
        severity: XidSeverity::Critical,
        action: "Do what the message asks: drain, then reset the GPU or reboot the node.",
        runbook: GPU_XID,
    },
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
            13, 31, 43, 45, 48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 109, 119, 120, 140, 143,
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
    }
}
