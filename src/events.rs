//! The kernel event store: recent kernel events (OOM kills, block I/O
//! errors, XIDs from the kernel log and from NVML) and the counters derived
//! from them, shared by the kernel-log watcher (`collector::kmsg`), the NVML
//! backend, the collectors and `GET /v1/events`. Also the types an XID event
//! carries (`XidInfo`; the catalogue itself is `gpu::xid`). A base leaf: it
//! reads nothing and imports nothing of the crate.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How many events `GET /v1/events` can return.
const EVENT_CAPACITY: usize = 2048;
/// The two kernel lines of one OOM kill are this close together.
const OOM_MERGE_WINDOW_SECS: f64 = 5.0;
/// NVML and the kernel log report the same XID within this window.
const XID_DEDUPE_WINDOW_SECS: f64 = 10.0;

/// One kernel event the agent recognised.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KernelEvent {
    /// Unix time in seconds.
    pub timestamp: f64,
    /// False for records that were already in the ring buffer at start.
    pub counted: bool,
    #[serde(flatten)]
    pub kind: EventKind,
    /// The log line it came from (or a description for NVML events).
    pub message: String,
}

/// What happened.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The OOM killer killed a process (globally or in a memory cgroup).
    OomKill {
        pid: Option<u32>,
        process: Option<String>,
        cgroup: Option<String>,
    },
    /// A block-layer I/O error on a device.
    IoError { device: String },
    /// An NVIDIA XID error (build it with `gpu::xid::event`, which
    /// attaches the catalogue entry shown by `GET /v1/events`).
    Xid {
        pci_bus_id: String,
        xid: u32,
        pid: Option<u32>,
        process: Option<String>,
        source: XidSource,
        /// What the code means and what to do (`None` for codes not in the catalogue).
        #[serde(skip_serializing_if = "Option::is_none")]
        info: Option<&'static XidInfo>,
    },
    /// A GPU stopped answering NVML (lost, fell off the bus, or timed out).
    GpuLost {
        pci_bus_id: String,
        uuid: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum XidSource {
    Kmsg,
    Nvml,
}

/// Recent events and the counters derived from them; shared by the watcher,
/// the collectors and the HTTP API.
#[derive(Default)]
pub struct KernelEvents {
    inner: Mutex<Inner>,
    records: AtomicU64,
    /// 0 unknown, 1 readable, 2 not readable.
    readable: AtomicU8,
}

#[derive(Default)]
struct Inner {
    events: VecDeque<KernelEvent>,
    io_errors: BTreeMap<String, u64>,
    xids: BTreeMap<(String, u32), u64>,
    oom_last: Option<f64>,
    /// Recent XIDs not yet matched by the other source: (bus, xid, time, source).
    recent_xids: VecDeque<(String, u32, f64, XidSource)>,
}

impl KernelEvents {
    pub fn new() -> KernelEvents {
        KernelEvents::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one kernel-log record read (the watcher calls it per counted record).
    pub fn count_record(&self) {
        self.records.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes whether the kernel log could be opened.
    pub fn set_readable(&self, readable: bool) {
        self.readable
            .store(if readable { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Records an event; `counted` events also bump the counters.
    pub fn record(&self, event: KernelEvent) {
        let mut inner = self.lock();
        match &event.kind {
            EventKind::OomKill { .. } => {
                inner.oom_last = Some(
                    inner
                        .oom_last
                        .map_or(event.timestamp, |t| t.max(event.timestamp)),
                );
                if inner.merge_oom_kill(&event) {
                    return;
                }
            }
            EventKind::IoError { device } if event.counted => {
                *inner.io_errors.entry(device.clone()).or_insert(0) += 1;
            }
            EventKind::Xid {
                pci_bus_id,
                xid,
                source,
                ..
            } if event.counted => {
                let key = (pci_bus_id.clone(), *xid);
                if !inner.take_matching_xid(&key, event.timestamp, *source) {
                    *inner.xids.entry(key.clone()).or_insert(0) += 1;
                    inner
                        .recent_xids
                        .push_back((key.0, key.1, event.timestamp, *source));
                    if inner.recent_xids.len() > 256 {
                        inner.recent_xids.pop_front();
                    }
                } else {
                    // Already counted from the other source: keep the richer
                    // kmsg record (pid, process, text) in place of NVML's.
                    tracing::debug!(pci_bus_id = %key.0, xid = key.1, "xid seen by both nvml and kmsg, counted once");
                    if *source == XidSource::Kmsg {
                        let t = event.timestamp;
                        if let Some(slot) = inner.events.iter_mut().rev().find(|e| {
                            matches!(&e.kind, EventKind::Xid { pci_bus_id: b, xid: x, source: XidSource::Nvml, .. }
                                if *b == key.0 && *x == key.1)
                                && (e.timestamp - t).abs() <= XID_DEDUPE_WINDOW_SECS
                        }) {
                            *slot = event;
                        }
                    }
                    return;
                }
            }
            _ => {}
        }
        if inner.events.len() >= EVENT_CAPACITY {
            inner.events.pop_front();
        }
        inner.events.push_back(event);
    }

    /// Events at or after `since` (Unix seconds), oldest first.
    pub fn since(&self, since: f64) -> Vec<KernelEvent> {
        self.lock()
            .events
            .iter()
            .filter(|e| e.timestamp >= since)
            .cloned()
            .collect()
    }

    /// Counted block I/O errors per device from the kernel log.
    pub fn io_errors(&self) -> BTreeMap<String, u64> {
        self.lock().io_errors.clone()
    }

    /// Counted XIDs per (PCI bus id, code), NVML and kmsg deduplicated.
    pub fn xids(&self) -> BTreeMap<(String, u32), u64> {
        self.lock().xids.clone()
    }

    /// Time of the latest OOM kill seen in the kernel log.
    pub fn oom_last_timestamp(&self) -> Option<f64> {
        self.lock().oom_last
    }

    /// Kernel-log records read (counted ones).
    pub fn records_read(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
    }

    /// Whether the kernel log could be opened (`None` before the first try).
    pub fn readable(&self) -> Option<bool> {
        match self.readable.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }
}

impl Inner {
    /// The kernel reports one OOM kill in two lines (`oom-kill:` with the
    /// cgroup, `Killed process` with the usage): when `event` is the second
    /// line of a kill already recorded (same pid, within a few seconds), fill
    /// in what the first lacked and report the event as merged.
    fn merge_oom_kill(&mut self, event: &KernelEvent) -> bool {
        let EventKind::OomKill {
            pid: Some(pid),
            process,
            cgroup,
        } = &event.kind
        else {
            return false;
        };
        let found = self.events.iter_mut().rev().take(16).find(|e| {
            matches!(&e.kind, EventKind::OomKill { pid: Some(p), .. } if p == pid)
                && (e.timestamp - event.timestamp).abs() <= OOM_MERGE_WINDOW_SECS
        });
        let Some(old) = found else {
            return false;
        };
        if let EventKind::OomKill {
            process: old_process,
            cgroup: old_cgroup,
            ..
        } = &mut old.kind
        {
            if old_process.is_none() {
                old_process.clone_from(process);
            }
            if old_cgroup.is_none() {
                old_cgroup.clone_from(cgroup);
            }
        }
        // The "Killed process" line names the kill best.
        if event.message.contains("Killed process") {
            old.message.clone_from(&event.message);
        }
        old.counted |= event.counted;
        true
    }

    fn take_matching_xid(&mut self, key: &(String, u32), t: f64, source: XidSource) -> bool {
        let now_cut = t - 60.0;
        self.recent_xids.retain(|r| r.2 >= now_cut);
        let pos = self.recent_xids.iter().position(|(bus, xid, when, src)| {
            *src != source
                && bus == &key.0
                && *xid == key.1
                && (when - t).abs() <= XID_DEDUPE_WINDOW_SECS
        });
        match pos {
            Some(i) => {
                self.recent_xids.remove(i);
                true
            }
            None => false,
        }
    }
}

/// Now, in Unix seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// How urgently an XID needs a person. Follows the resolution class: a GPU
/// or node that must be reset or rebooted is critical, an application that
/// must restart is a warning, no action is info (`tests/it/runbook_xid.rs`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum XidSeverity {
    /// The GPU (or node) needs action now: drain, reset, reboot. Counted in
    /// `gpu_errors_total{type="xid_critical"}`.
    Critical,
    /// Usually one job failed; the GPU is fine or needs attention later.
    Warning,
    /// Informational: no action, or a consequence of another XID.
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

/// What recovers the system, after the "Resolution Bucket (Immediate
/// Action)" of NVIDIA's Xid Catalog (XID errors document, r555 and later).
/// The catalogue's own bucket name is kept verbatim in
/// [`XidInfo::nvidia_bucket`]; workflow buckets (`WORKFLOW_XID_48`,
/// `WORKFLOW_NVLINK_ERR`, `XID_154`, ...) map to the class their workflow
/// resolves to for a data-center node.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub enum XidResolution {
    /// `IGNORE`: no action; the GPU keeps working.
    #[serde(rename = "IGNORE")]
    Ignore,
    /// `RESTART_APP`: the application that hit it restarts; the GPU is fine.
    #[serde(rename = "RESTART_APP")]
    RestartApp,
    /// `CONTACT_SUPPORT`: not expected on current GPUs; collect a bug report.
    #[serde(rename = "CONTACT_SUPPORT")]
    ContactSupport,
    /// `RESET_GPU`: drain, reset the GPU, verify, return it to service.
    #[serde(rename = "RESET_GPU")]
    ResetGpu,
    /// `WORKFLOW_NVLINK_ERR` / `WORKFLOW_NVLINK5_ERR`: decode the NVLink
    /// error; fatal ones need the GPUs reset (and the fabric checked).
    #[serde(rename = "CHECK_NVLINK")]
    CheckNvlink,
    /// `RESTART_BM`: reboot (power-cycle) the node; a GPU reset cannot
    /// reach the GPU.
    #[serde(rename = "RESTART_BM")]
    RestartBm,
}

impl XidResolution {
    pub fn as_str(self) -> &'static str {
        match self {
            XidResolution::Ignore => "IGNORE",
            XidResolution::RestartApp => "RESTART_APP",
            XidResolution::ContactSupport => "CONTACT_SUPPORT",
            XidResolution::ResetGpu => "RESET_GPU",
            XidResolution::CheckNvlink => "CHECK_NVLINK",
            XidResolution::RestartBm => "RESTART_BM",
        }
    }

    /// The severity this class implies.
    pub fn severity(self) -> XidSeverity {
        match self {
            XidResolution::Ignore => XidSeverity::Info,
            XidResolution::RestartApp | XidResolution::ContactSupport => XidSeverity::Warning,
            XidResolution::ResetGpu | XidResolution::CheckNvlink | XidResolution::RestartBm => {
                XidSeverity::Critical
            }
        }
    }

    /// Whether an operator may act on the GPU or node (drain, reset, reboot)
    /// for this class. Classes without it are answered by a runbook with no
    /// mitigation step.
    pub fn needs_gpu_action(self) -> bool {
        self.severity() == XidSeverity::Critical
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
    /// Our resolution class (from NVIDIA's immediate-action bucket).
    pub resolution: XidResolution,
    /// NVIDIA's "Resolution Bucket (Immediate Action)" for the code, verbatim.
    pub nvidia_bucket: &'static str,
    /// What an operator should do.
    pub action: &'static str,
    /// The runbook id that answers it (`runbooks/<id>.yaml`).
    pub runbook: &'static str,
    /// Where the entry comes from (document and section).
    pub source: &'static str,
}
