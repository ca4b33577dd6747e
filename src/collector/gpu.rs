//! The GPU collector: reads a [`GpuBackend`] (NVML or the fake fixture) and
//! renders the GPU half of the USE table, the XID counters and
//! `gpu_errors_total`.
//!
//! The backend runs on its own thread with the `[gpu] deadline_secs` deadline
//! and single flight: a hung NVML call makes this collector fail at once on
//! later scrapes (no thread pile-up) until the call returns. NVML is loaded
//! lazily on the first collection (and retried every minute while it is
//! missing); when it is missing one warning says why, the collector reports
//! failure and no GPU series are exported. Process names and units come from
//! `<procfs>/<pid>/{comm,cgroup}` through [`crate::host::HostRoots`].
//! This module must not call NVML itself (only `crate::gpu::nvml` does).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::collector::kmsg::{unix_now, EventKind, KernelEvent};
use crate::collector::{Collector, Context, Error, KernelEvents, Sink};
use crate::config::agent::GpuBackendChoice;
use crate::deadline::{Outcome, SingleFlight};
use crate::gpu::fake::FakeBackend;
use crate::gpu::nvml::NvmlBackend;
use crate::gpu::{xid, DeviceReading, GpuBackend, Snapshot};

/// How often a missing NVML is looked for again.
const NVML_RETRY: Duration = Duration::from_secs(60);

pub struct GpuCollector {
    inner: Arc<Inner>,
}

type Fetched = Result<Arc<Snapshot>, String>;

struct Inner {
    choice: GpuBackendChoice,
    deadline: Duration,
    process_metrics: bool,
    dcgm_compat: bool,
    backend: Mutex<BackendState>,
    /// `nvml`, `fake` or `none`, once known.
    kind: OnceLock<&'static str>,
    flight: SingleFlight<(), Fetched>,
    /// The last good snapshot: labels for XIDs while the backend fails.
    last: Mutex<Option<Arc<Snapshot>>>,
    /// Per GPU (uuid, else bus id): what `gpu_errors_total` has counted.
    books: Mutex<HashMap<String, ErrorBook>>,
    /// `(process, unit)` per pid seen on a GPU in the last collection, so a
    /// long-running job's /proc files are read once, not on every scrape.
    /// Pids no longer on any GPU are dropped at each collection.
    processes: Mutex<HashMap<u32, (String, String)>>,
}

enum BackendState {
    /// Not loaded yet (NVML): when it was last tried and why it failed.
    Pending {
        last_try: Option<Instant>,
        error: Option<String>,
    },
    Ready(Arc<dyn GpuBackend>),
    /// A fake fixture that cannot be read: fails every collection.
    Broken(String),
}

impl GpuCollector {
    /// `None` when the GPU collector is disabled in config (`backend = "none"`).
    pub fn new(ctx: &Arc<Context>) -> Option<GpuCollector> {
        let cfg = &ctx.config.gpu;
        let kind = OnceLock::new();
        let state = match &cfg.backend {
            GpuBackendChoice::Disabled => {
                let _ = ctx.gpu_backend.set("none");
                return None;
            }
            GpuBackendChoice::Fake(path) => {
                let _ = kind.set("fake");
                let _ = ctx.gpu_backend.set("fake");
                match FakeBackend::load(path) {
                    Ok(b) => {
                        tracing::warn!(
                            fixture = %path.display(),
                            "gpu readings are FAKE, replayed from a fixture (gpu_backend=\"fake\"); do not use on a real node"
                        );
                        BackendState::Ready(Arc::new(b))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot load the fake gpu fixture, no gpu metrics");
                        BackendState::Broken(e)
                    }
                }
            }
            GpuBackendChoice::Auto | GpuBackendChoice::Nvml => BackendState::Pending {
                last_try: None,
                error: None,
            },
        };
        Some(GpuCollector {
            inner: Arc::new(Inner {
                choice: cfg.backend.clone(),
                deadline: cfg.deadline,
                process_metrics: cfg.process_metrics,
                dcgm_compat: cfg.dcgm_compat,
                backend: Mutex::new(state),
                kind,
                flight: SingleFlight::new("gpuops-gpu"),
                last: Mutex::new(None),
                books: Mutex::new(HashMap::new()),
                processes: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Words for `gpuops_build_info{gpu_backend}`: `nvml`, `fake`, `none`.
    pub fn backend_kind(&self) -> &'static str {
        self.inner.kind.get().copied().unwrap_or("none")
    }
}

impl Collector for GpuCollector {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        let inner = self.inner.clone();
        let events = ctx.events.clone();
        let background = ctx.background;
        let outcome = self.inner.flight.call((), self.inner.deadline, move || {
            inner.fetch(&events, background)
        });
        if let Some(k) = self.inner.kind.get() {
            let _ = ctx.gpu_backend.set(k);
        }
        let xids = ctx.events.xids();
        // A backend that is absent (no NVML) logged that itself, once; a
        // stuck one is worth a warning when it starts.
        let failure = match outcome {
            Outcome::Done(Ok(snap)) => {
                *lock(&self.inner.last) = Some(snap.clone());
                self.render(ctx, &snap, &xids, sink);
                return Ok(());
            }
            Outcome::Done(Err(e)) => Error::Unavailable(e),
            Outcome::TimedOut => Error::Other(format!(
                "gpu backend did not answer within {}s",
                self.inner.deadline.as_secs_f64()
            )),
            Outcome::StillRunning { since } => Error::Other(format!(
                "gpu backend still stuck in an earlier call ({}s)",
                since.as_secs()
            )),
        };
        // The kernel log's XIDs are real even when the backend is not.
        let last = lock(&self.inner.last).clone().unwrap_or_default();
        render_xids(&last, &xids, sink);
        Err(failure)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Inner {
    /// Runs on the flight thread: loads the backend if needed, then reads it.
    fn fetch(&self, events: &Arc<KernelEvents>, background: bool) -> Fetched {
        let backend = self.backend(events, background)?;
        backend.snapshot()
    }

    fn backend(
        &self,
        events: &Arc<KernelEvents>,
        background: bool,
    ) -> Result<Arc<dyn GpuBackend>, String> {
        let mut state = lock(&self.backend);
        match &mut *state {
            BackendState::Ready(b) => Ok(b.clone()),
            BackendState::Broken(e) => Err(e.clone()),
            BackendState::Pending { last_try, error } => {
                if let (Some(t), Some(e)) = (last_try.as_ref(), error.as_ref()) {
                    if t.elapsed() < NVML_RETRY {
                        return Err(e.clone());
                    }
                }
                let first = last_try.is_none();
                *last_try = Some(Instant::now());
                // Per-GPU reads get most of the deadline; the rest is for the device count.
                match NvmlBackend::init(self.deadline.mul_f64(0.8), self.process_metrics) {
                    Ok(b) => {
                        if background {
                            b.spawn_xid_watcher(events.clone());
                        }
                        let _ = self.kind.set("nvml");
                        let b: Arc<dyn GpuBackend> = Arc::new(b);
                        *state = BackendState::Ready(b.clone());
                        Ok(b)
                    }
                    Err(why) => {
                        let _ = self.kind.set("none");
                        if first {
                            tracing::warn!(
                                reason = %why,
                                configured = if self.choice == GpuBackendChoice::Nvml { "nvml" } else { "auto" },
                                "NVML not available, no gpu metrics (set [gpu] backend = \"none\" on nodes without GPUs)"
                            );
                        } else {
                            tracing::debug!(reason = %why, "nvml still not available");
                        }
                        let msg = format!("NVML not available: {why}");
                        *error = Some(msg.clone());
                        Err(msg)
                    }
                }
            }
        }
    }
}

/// What `gpu_errors_total` has attributed to one GPU since the agent started.
#[derive(Default)]
struct ErrorBook {
    fell_off_bus: u64,
    was_lost: bool,
    ecc_uncorrected: u64,
    ecc_last: Option<u64>,
    remap_failure: u64,
    remap_last: Option<u64>,
}

/// Adds the growth of a device counter (its whole value at first sight, the
/// new value after a reset) to `total`.
fn absorb(total: &mut u64, last: &mut Option<u64>, now: Option<u64>) {
    let Some(v) = now else { return };
    *total += match *last {
        Some(prev) if v >= prev => v - prev,
        _ => v,
    };
    *last = Some(v);
}

impl GpuCollector {
    fn render(
        &self,
        ctx: &Context,
        snap: &Snapshot,
        xids: &BTreeMap<(String, u32), u64>,
        sink: &mut Sink,
    ) {
        sink.gauge(
            "gpu_devices",
            "Number of GPUs the backend reports (NVML nvmlDeviceGetCount, or the fake fixture).",
            &[],
            snap.devices.len() as f64,
        );
        let mut books = lock(&self.inner.books);
        let mut known = std::mem::take(&mut *lock(&self.inner.processes));
        let mut seen = HashMap::new();
        for d in &snap.devices {
            let idx = d.index.to_string();
            let base: [(&str, &str); 4] = [
                ("gpu", &idx),
                ("uuid", &d.uuid),
                ("name", &d.name),
                ("pci_bus_id", &d.pci_bus_id),
            ];
            let key = if d.uuid.is_empty() {
                format!("bus:{}:{}", d.pci_bus_id, d.index)
            } else {
                d.uuid.clone()
            };
            let book = books.entry(key).or_default();
            let lost = d.lost.is_some();
            if lost && !book.was_lost {
                book.fell_off_bus += 1;
                let why = d.lost.as_deref().unwrap_or("");
                tracing::warn!(gpu = d.index, uuid = %d.uuid, pci_bus_id = %d.pci_bus_id, reason = why, "gpu stopped answering");
                ctx.events.record(KernelEvent {
                    timestamp: unix_now(),
                    counted: true,
                    kind: EventKind::GpuLost {
                        pci_bus_id: d.pci_bus_id.clone(),
                        uuid: (!d.uuid.is_empty()).then(|| d.uuid.clone()),
                    },
                    message: format!("gpu {} stopped answering: {why}", d.index),
                });
            } else if !lost && book.was_lost {
                tracing::info!(gpu = d.index, uuid = %d.uuid, "gpu answers again");
            }
            book.was_lost = lost;
            sink.gauge(
                "gpu_up",
                "Whether the GPU answered the backend (1) or is lost, fell off the bus or timed out (0).",
                &base,
                if lost { 0.0 } else { 1.0 },
            );
            if !lost {
                absorb(
                    &mut book.ecc_uncorrected,
                    &mut book.ecc_last,
                    d.ecc.uncorrected_volatile,
                );
                absorb(
                    &mut book.remap_failure,
                    &mut book.remap_last,
                    d.remapped_rows.failure,
                );
                render_device(snap, d, &base, sink);
                if self.inner.process_metrics {
                    render_processes(ctx, d, &base, &mut known, &mut seen, sink);
                }
                if self.inner.dcgm_compat {
                    render_dcgm(ctx, d, xids, sink);
                }
            }
            let (mut all, mut critical) = (0u64, 0u64);
            for ((bus, code), n) in xids.range((d.pci_bus_id.clone(), 0)..) {
                if *bus != d.pci_bus_id {
                    break;
                }
                all += n;
                if xid::is_critical(*code) {
                    critical += n;
                }
            }
            for (kind, v) in [
                ("xid", all),
                ("xid_critical", critical),
                ("ecc_uncorrected", book.ecc_uncorrected),
                ("remap_failure", book.remap_failure),
                ("fell_off_bus", book.fell_off_bus),
            ] {
                sink.counter(
                    "gpu_errors_total",
                    "Errors attributed to the GPU since the agent started, by type: xid (any XID), xid_critical (XIDs of critical severity in the catalogue), ecc_uncorrected (growth of NVML's volatile uncorrected ECC count), remap_failure (row remapping failed), fell_off_bus (the GPU stopped answering).",
                    &with(&base, &[("type", kind)]),
                    v as f64,
                );
            }
        }
        drop(books);
        *lock(&self.inner.processes) = seen;
        render_xids(snap, xids, sink);
    }
}

/// `base` plus `extra` labels, on the stack (a scrape builds hundreds of label
/// sets; at most 8 labels, more are dropped).
struct Labels<'a> {
    pairs: [(&'a str, &'a str); 8],
    len: usize,
}

impl<'a> std::ops::Deref for Labels<'a> {
    type Target = [(&'a str, &'a str)];
    fn deref(&self) -> &Self::Target {
        &self.pairs[..self.len]
    }
}

fn with<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Labels<'a> {
    let mut l = Labels {
        pairs: [("", ""); 8],
        len: 0,
    };
    for p in base.iter().chain(extra).take(8) {
        l.pairs[l.len] = *p;
        l.len += 1;
    }
    l
}

fn render_device(snap: &Snapshot, d: &DeviceReading, base: &[(&str, &str)], sink: &mut Sink) {
    let g = |sink: &mut Sink, name: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            sink.gauge(name, help, base, v);
        }
    };
    sink.gauge(
        "gpu_info",
        "GPU identity and versions, always 1 (NVML nvmlSystemGetDriverVersion, nvmlSystemGetCudaDriverVersion, nvmlDeviceGetVbiosVersion).",
        &with(
            base,
            &[
                ("driver_version", snap.driver_version.as_deref().unwrap_or("")),
                ("cuda_version", snap.cuda_version.as_deref().unwrap_or("")),
                ("vbios_version", d.vbios_version.as_deref().unwrap_or("")),
            ],
        ),
        1.0,
    );
    g(
        sink,
        "gpu_utilization_percent",
        "Percent of time a kernel was running on the GPU over the last sample period (NVML nvmlDeviceGetUtilizationRates.gpu).",
        d.utilization_percent,
    );
    g(
        sink,
        "gpu_memory_utilization_percent",
        "Percent of time device memory was being read or written (NVML nvmlDeviceGetUtilizationRates.memory).",
        d.memory_utilization_percent,
    );
    let mem = |v: Option<u64>| v.map(|b| b as f64);
    g(
        sink,
        "gpu_memory_used_bytes",
        "Device memory in use (NVML nvmlDeviceGetMemoryInfo.used).",
        mem(d.memory_used_bytes),
    );
    g(
        sink,
        "gpu_memory_total_bytes",
        "Device memory size (NVML nvmlDeviceGetMemoryInfo.total).",
        mem(d.memory_total_bytes),
    );
    let used_pct = match (d.memory_used_bytes, d.memory_total_bytes) {
        (Some(u), Some(t)) if t > 0 => Some(u as f64 * 100.0 / t as f64),
        _ => None,
    };
    g(
        sink,
        "gpu_memory_used_percent",
        "Device memory in use as a percentage of its size (NVML nvmlDeviceGetMemoryInfo).",
        used_pct,
    );
    g(
        sink,
        "gpu_temperature_celsius",
        "GPU die temperature (NVML nvmlDeviceGetTemperature).",
        d.temperature_celsius,
    );
    g(
        sink,
        "gpu_memory_temperature_celsius",
        "HBM memory temperature (NVML field NVML_FI_DEV_MEMORY_TEMP).",
        d.memory_temperature_celsius,
    );
    g(
        sink,
        "gpu_power_watts",
        "Power draw (NVML nvmlDeviceGetPowerUsage).",
        d.power_watts,
    );
    g(
        sink,
        "gpu_power_limit_watts",
        "Enforced power limit (NVML nvmlDeviceGetEnforcedPowerLimit).",
        d.power_limit_watts,
    );
    if let Some(j) = d.energy_joules {
        sink.counter(
            "gpu_energy_joules_total",
            "Energy used since the driver was loaded (NVML nvmlDeviceGetTotalEnergyConsumption).",
            base,
            j,
        );
    }
    g(
        sink,
        "gpu_sm_clock_hertz",
        "Current SM clock (NVML nvmlDeviceGetClockInfo(NVML_CLOCK_SM)).",
        d.sm_clock_mhz.map(|m| m * 1e6),
    );
    g(
        sink,
        "gpu_memory_clock_hertz",
        "Current memory clock (NVML nvmlDeviceGetClockInfo(NVML_CLOCK_MEM)).",
        d.memory_clock_mhz.map(|m| m * 1e6),
    );
    if let Some(ce) = &d.clock_events {
        for reason in crate::gpu::ClockEventReason::ALL {
            if !ce.supported.contains(&reason) {
                continue;
            }
            sink.gauge(
                "gpu_throttle_reason",
                "Whether a clock-event (throttle) reason holds the clocks down now, 1 or 0, for every reason the GPU supports (NVML nvmlDeviceGetCurrentClocksEventReasons).",
                &with(base, &[("reason", reason.as_str())]),
                if ce.active.contains(&reason) { 1.0 } else { 0.0 },
            );
        }
    }
    for (i, pct) in d.fan_speed_percent.iter().enumerate() {
        let fan = i.to_string();
        sink.gauge(
            "gpu_fan_speed_percent",
            "Fan speed in percent of its maximum, per fan (NVML nvmlDeviceGetFanSpeed_v2).",
            &with(base, &[("fan", &fan)]),
            *pct,
        );
    }
    if let Some(v) = d.pcie_replay_total {
        sink.counter(
            "gpu_pcie_replay_total",
            "PCIe replays (link-level retransmissions) (NVML nvmlDeviceGetPcieReplayCounter).",
            base,
            v as f64,
        );
    }
    g(
        sink,
        "gpu_pcie_link_generation",
        "Current PCIe link generation (NVML nvmlDeviceGetCurrPcieLinkGeneration).",
        d.pcie_link_generation.map(f64::from),
    );
    g(
        sink,
        "gpu_pcie_link_width",
        "Current PCIe link width in lanes (NVML nvmlDeviceGetCurrPcieLinkWidth).",
        d.pcie_link_width.map(f64::from),
    );
    for (kind, scope, v) in [
        ("corrected", "volatile", d.ecc.corrected_volatile),
        ("uncorrected", "volatile", d.ecc.uncorrected_volatile),
        ("corrected", "aggregate", d.ecc.corrected_aggregate),
        ("uncorrected", "aggregate", d.ecc.uncorrected_aggregate),
    ] {
        if let Some(v) = v {
            sink.counter(
                "gpu_ecc_errors_total",
                "ECC memory errors; scope volatile counts since the driver was loaded, aggregate over the GPU's life (NVML nvmlDeviceGetTotalEccErrors).",
                &with(base, &[("type", kind), ("scope", scope)]),
                v as f64,
            );
        }
    }
    for (cause, v) in [
        ("single_bit_ecc", d.retired_pages.single_bit_ecc),
        ("double_bit_ecc", d.retired_pages.double_bit_ecc),
    ] {
        if let Some(v) = v {
            sink.gauge(
                "gpu_retired_pages",
                "Memory pages retired, by cause (NVML fields NVML_FI_DEV_RETIRED_SBE/DBE; pre-Ampere GPUs).",
                &with(base, &[("cause", cause)]),
                v as f64,
            );
        }
    }
    for (state, v) in [
        ("correctable", d.remapped_rows.correctable),
        ("uncorrectable", d.remapped_rows.uncorrectable),
        ("pending", d.remapped_rows.pending),
        ("failure", d.remapped_rows.failure),
    ] {
        if let Some(v) = v {
            sink.gauge(
                "gpu_remapped_rows",
                "HBM row remapping: rows remapped for correctable and uncorrectable errors, and pending (1: reset the GPU to apply) and failure (1: no spare rows) flags (NVML fields NVML_FI_DEV_REMAPPED_*).",
                &with(base, &[("state", state)]),
                v as f64,
            );
        }
    }
    for l in &d.nvlinks {
        let link = l.link.to_string();
        for (kind, v) in [
            ("replay", l.replay),
            ("recovery", l.recovery),
            ("crc_flit", l.crc_flit),
            ("crc_data", l.crc_data),
        ] {
            if let Some(v) = v {
                sink.counter(
                    "gpu_nvlink_errors_total",
                    "NVLink data-link errors per link: replay, recovery, crc_flit, crc_data (NVML nvmlDeviceGetNvLinkErrorCounter).",
                    &with(base, &[("link", &link), ("type", kind)]),
                    v as f64,
                );
            }
        }
    }
    for m in &d.mig {
        let gi = m.gpu_instance_id.map(|v| v.to_string());
        let ci = m.compute_instance_id.map(|v| v.to_string());
        let mut labels = base.to_vec();
        if let Some(gi) = &gi {
            labels.push(("gpu_instance_id", gi));
        }
        if let Some(ci) = &ci {
            labels.push(("compute_instance_id", ci));
        }
        labels.push(("mig_profile", &m.profile));
        if let Some(v) = m.memory_used_bytes {
            sink.gauge(
                "gpu_memory_used_bytes",
                "Device memory in use (NVML nvmlDeviceGetMemoryInfo.used).",
                &labels,
                v as f64,
            );
        }
        if let Some(v) = m.memory_total_bytes {
            sink.gauge(
                "gpu_memory_total_bytes",
                "Device memory size (NVML nvmlDeviceGetMemoryInfo.total).",
                &labels,
                v as f64,
            );
        }
    }
    if let Some(s) = d.read_seconds {
        sink.gauge(
            "gpuops_gpu_read_duration_seconds",
            "How long the backend took to read this GPU in the last collection.",
            base,
            s,
        );
    }
}

fn render_processes(
    ctx: &Context,
    d: &DeviceReading,
    base: &[(&str, &str)],
    known: &mut HashMap<u32, (String, String)>,
    seen: &mut HashMap<u32, (String, String)>,
    sink: &mut Sink,
) {
    for p in &d.processes {
        let Some(bytes) = p.memory_used_bytes else {
            continue;
        };
        let (comm, unit) = match known.remove(&p.pid).or_else(|| seen.get(&p.pid).cloned()) {
            Some(v) => v,
            None => {
                let comm = ctx
                    .roots
                    .read_proc(&format!("{}/comm", p.pid))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                let unit = ctx
                    .roots
                    .read_proc(&format!("{}/cgroup", p.pid))
                    .ok()
                    .and_then(|c| unit_from_cgroup(&c))
                    .unwrap_or_default();
                (comm, unit)
            }
        };
        let pid = p.pid.to_string();
        sink.gauge(
            "gpu_process_memory_used_bytes",
            "Device memory used by a process (NVML nvmlDeviceGetComputeRunningProcesses); process from /proc/<pid>/comm, unit (systemd unit or container) from /proc/<pid>/cgroup.",
            &with(base, &[("pid", &pid), ("process", &comm), ("unit", &unit)]),
            bytes as f64,
        );
        seen.insert(p.pid, (comm, unit));
    }
}

/// The systemd unit or container a process runs in, from its
/// `/proc/<pid>/cgroup`: `docker:<id12>`, `containerd:<id12>`, `crio:<id12>`,
/// `podman:<id12>`, `pod:<uid>` (a Kubernetes pod without a recognisable
/// container), else the innermost `*.service`/`*.scope` unit
/// (`slurmstepd.scope`, `ollama.service`). The cgroup v2 line wins over v1 lines.
pub fn unit_from_cgroup(text: &str) -> Option<String> {
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| {
            text.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
                (ctrl
                    .split(',')
                    .any(|c| c == "name=systemd" || c == "memory"))
                .then_some(path)
            })
        })?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let is_id = |s: &str| s.len() >= 12 && s.chars().all(|c| c.is_ascii_hexdigit());
    let short = |s: &str| s[..12].to_string();
    for (i, part) in parts.iter().enumerate().rev() {
        let stem = part.strip_suffix(".scope").unwrap_or(part);
        for (prefix, runtime) in [
            ("docker-", "docker"),
            ("cri-containerd-", "containerd"),
            ("crio-", "crio"),
            ("libpod-", "podman"),
        ] {
            if let Some(id) = stem.strip_prefix(prefix) {
                if is_id(id) {
                    return Some(format!("{runtime}:{}", short(id)));
                }
            }
        }
        // cgroup v1 / cgroupfs driver: /docker/<id>, /kubepods/burstable/pod<uid>/<id>.
        if is_id(part) && i > 0 {
            let parent = parts[i - 1];
            let runtime = if parent == "docker" {
                "docker"
            } else if parent.starts_with("pod") || parent.contains("-pod") {
                "containerd"
            } else {
                continue;
            };
            return Some(format!("{runtime}:{}", short(part)));
        }
    }
    for part in parts.iter().rev() {
        let stem = part.strip_suffix(".slice").unwrap_or(part);
        if let Some(uid) = stem.rsplit_once("-pod").map(|(_, u)| u) {
            if !uid.is_empty() {
                return Some(format!("pod:{}", uid.replace('_', "-")));
            }
        }
        if let Some(uid) = part.strip_prefix("pod") {
            if !uid.is_empty() {
                return Some(format!("pod:{uid}"));
            }
        }
    }
    parts
        .iter()
        .rev()
        .find(|p| p.ends_with(".service") || p.ends_with(".scope"))
        .map(|p| p.to_string())
}

/// `gpu_xid_errors_total{xid}`: with the GPU's labels when a known GPU has the
/// bus id, else labelled by `pci_bus_id` only.
fn render_xids(snap: &Snapshot, xids: &BTreeMap<(String, u32), u64>, sink: &mut Sink) {
    const HELP: &str = "XID errors reported by the kernel log (NVRM: Xid) and NVML critical-XID events, the same event counted once, by code; see docs/gpu.md for the catalogue.";
    for ((bus, code), n) in xids {
        let code_s = code.to_string();
        match snap.devices.iter().find(|d| d.pci_bus_id == *bus) {
            Some(d) => {
                let idx = d.index.to_string();
                sink.counter(
                    "gpu_xid_errors_total",
                    HELP,
                    &[
                        ("gpu", &idx),
                        ("uuid", &d.uuid),
                        ("name", &d.name),
                        ("pci_bus_id", bus),
                        ("xid", &code_s),
                    ],
                    *n as f64,
                );
            }
            None => sink.counter(
                "gpu_xid_errors_total",
                HELP,
                &[("pci_bus_id", bus), ("xid", &code_s)],
                *n as f64,
            ),
        }
    }
}

/// dcgm-exporter's names, units and labels for the common fields
/// (`dcgm_compat = true`), so dashboards built for it keep working. All are
/// gauges: dcgm-exporter's counters lack the `_total` suffix Prometheus wants.
fn render_dcgm(
    ctx: &Context,
    d: &DeviceReading,
    xids: &BTreeMap<(String, u32), u64>,
    sink: &mut Sink,
) {
    let idx = d.index.to_string();
    let device = format!("nvidia{}", d.minor_number.unwrap_or(d.index));
    let labels: [(&str, &str); 5] = [
        ("gpu", &idx),
        ("UUID", &d.uuid),
        ("device", &device),
        ("modelName", &d.name),
        ("pci_bus_id", &d.pci_bus_id),
    ];
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = |v: Option<u64>| v.map(|b| (b as f64 / MIB).round());
    let free = match (d.memory_total_bytes, d.memory_used_bytes) {
        (Some(t), Some(u)) => Some(t.saturating_sub(u)),
        _ => None,
    };
    let throttle = d
        .clock_events
        .as_ref()
        .map(|c| c.active.iter().fold(0u64, |acc, r| acc | r.bit()) as f64);
    let last_xid = if xids.keys().any(|(b, _)| *b == d.pci_bus_id) {
        ctx.events
            .since(0.0)
            .iter()
            .rev()
            .find_map(|e| match &e.kind {
                EventKind::Xid {
                    pci_bus_id, xid, ..
                } if e.counted && *pci_bus_id == d.pci_bus_id => Some(f64::from(*xid)),
                _ => None,
            })
    } else {
        Some(0.0)
    };
    let fields: [(&str, &str, Option<f64>); 22] = [
        (
            "DCGM_FI_DEV_GPU_UTIL",
            "GPU utilization (in %).",
            d.utilization_percent,
        ),
        (
            "DCGM_FI_DEV_MEM_COPY_UTIL",
            "Memory utilization (in %).",
            d.memory_utilization_percent,
        ),
        (
            "DCGM_FI_DEV_FB_USED",
            "Framebuffer memory used (in MiB).",
            mib(d.memory_used_bytes),
        ),
        (
            "DCGM_FI_DEV_FB_FREE",
            "Framebuffer memory free (in MiB).",
            mib(free),
        ),
        (
            "DCGM_FI_DEV_FB_TOTAL",
            "Framebuffer memory total (in MiB).",
            mib(d.memory_total_bytes),
        ),
        (
            "DCGM_FI_DEV_GPU_TEMP",
            "GPU temperature (in C).",
            d.temperature_celsius,
        ),
        (
            "DCGM_FI_DEV_MEMORY_TEMP",
            "Memory temperature (in C).",
            d.memory_temperature_celsius,
        ),
        (
            "DCGM_FI_DEV_POWER_USAGE",
            "Power draw (in W).",
            d.power_watts,
        ),
        (
            "DCGM_FI_DEV_POWER_MGMT_LIMIT",
            "Power management limit (in W).",
            d.power_limit_watts,
        ),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            d.energy_joules.map(|j| j * 1000.0),
        ),
        (
            "DCGM_FI_DEV_SM_CLOCK",
            "SM clock frequency (in MHz).",
            d.sm_clock_mhz,
        ),
        (
            "DCGM_FI_DEV_MEM_CLOCK",
            "Memory clock frequency (in MHz).",
            d.memory_clock_mhz,
        ),
        (
            "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
            "Current clock throttle reasons (bitmask).",
            throttle,
        ),
        (
            "DCGM_FI_DEV_XID_ERRORS",
            "Value of the last XID error encountered (0: none since the agent started).",
            last_xid,
        ),
        (
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
            "Total number of PCIe retries.",
            d.pcie_replay_total.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
            "Total number of single-bit volatile ECC errors.",
            d.ecc.corrected_volatile.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "Total number of double-bit volatile ECC errors.",
            d.ecc.uncorrected_volatile.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
            "Total number of single-bit persistent ECC errors.",
            d.ecc.corrected_aggregate.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
            "Total number of double-bit persistent ECC errors.",
            d.ecc.uncorrected_aggregate.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for correctable errors.",
            d.remapped_rows.correctable.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for uncorrectable errors.",
            d.remapped_rows.uncorrectable.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ROW_REMAP_FAILURE",
            "Whether remapping of rows has failed.",
            d.remapped_rows.failure.map(|v| v as f64),
        ),
    ];
    for (name, help, v) in fields {
        if let Some(v) = v {
            sink.gauge(name, help, &labels, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(cgroup: &str, expect: Option<&str>) {
        assert_eq!(unit_from_cgroup(cgroup).as_deref(), expect, "{cgroup:?}");
    }

    #[test]
    fn finds_the_unit_or_container_of_a_process() {
        check(
            "0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0\n",
            Some("slurmstepd.scope"),
        );
        check("0::/system.slice/ollama.service\n", Some("ollama.service"));
        check(
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/session-3.scope\n",
            Some("session-3.scope"),
        );
        check(
            "0::/system.slice/docker-3f4e5d6c7b8a9f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766.scope\n",
            Some("docker:3f4e5d6c7b8a"),
        );
        check(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice/cri-containerd-aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899.scope\n",
            Some("containerd:aabbccddeeff"),
        );
        check(
            "0::/kubepods.slice/kubepods-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice/crio-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n",
            Some("crio:0123456789ab"),
        );
        check(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1c2d3e4f_5a6b_7c8d_9e0f_a1b2c3d4e5f6.slice\n",
            Some("pod:1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6"),
        );
        check(
            "12:memory:/docker/3f4e5d6c7b8a9f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766\n1:name=systemd:/docker/3f4e5d6c7b8a9f0e1d2c3b4a59687766554433221100ffeeddccbbaa99887766\n",
            Some("docker:3f4e5d6c7b8a"),
        );
        check(
            "11:memory:/kubepods/burstable/pod1c2d3e4f-5a6b-7c8d-9e0f-a1b2c3d4e5f6/aabbccddeeff00112233445566778899aabbccddeeff00112233445566778899\n",
            Some("containerd:aabbccddeeff"),
        );
        check(
            "0::/machine.slice/libpod-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope/container\n",
            Some("podman:0123456789ab"),
        );
        check("0::/\n", None);
        check("", None);
    }

    #[test]
    fn device_counters_grow_by_their_increase() {
        let (mut total, mut last) = (0, None);
        absorb(&mut total, &mut last, Some(3));
        assert_eq!(total, 3, "first sight counts the whole value");
        absorb(&mut total, &mut last, Some(3));
        absorb(&mut total, &mut last, None);
        assert_eq!(total, 3);
        absorb(&mut total, &mut last, Some(5));
        assert_eq!(total, 5);
        absorb(&mut total, &mut last, Some(1));
        assert_eq!(total, 6, "a reset counts the new value");
    }
}
