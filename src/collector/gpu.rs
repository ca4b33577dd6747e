//! The GPU collector: reads a [`GpuBackend`] (NVML or the fake fixture) and
//! renders the GPU half of the USE table, the XID counters and
//! `gpu_errors_total`.
//!
//! The backend runs on its own thread with the `[gpu] deadline_secs` deadline
//! and single flight: a hung NVML call makes this collector fail at once on
//! later scrapes (no thread pile-up) until the call returns. NVML is loaded
//! lazily on the first collection (and retried every minute while it is
//! missing); when it is missing one warning says why, the collector reports
//! failure and no GPU series are exported. While the agent has released the
//! backend for a runbook step (`releases_gpu: true`, see
//! [`crate::gpu::GpuGate`]) the collector does not call it: a scrape answers
//! at once with `gpuops_gpu_released 1`, the collector failed, no GPU series
//! (the kernel log's XIDs still), and reads resume after the re-init.
//! Process names, units and
//! workloads come from `<procfs>/<pid>/{comm,cgroup,status,environ}` (and user names
//! from `<rootfs>/etc/passwd`) through [`crate::host::HostRoots`]; GPM
//! windows from the sampler in [`crate::collector::gpu_gpm`].
//! The slow values (energy counter, power limit, ECC totals, retired pages,
//! remapped rows: [`crate::gpu::SlowValues`]) are not read on the scrape
//! path: a background thread (`gpu/slow.rs`) reads them every
//! `[gpu] slow_interval_secs`, and a scrape serves the last reading with
//! `gpuops_gpu_slow_read_age_seconds`. Only the first collection (and the
//! first after a release) reads them inline.
//! This module must not call NVML itself (only `crate::gpu::nvml` does).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::collector::gpu_gpm::{self, GpmLatest};
use crate::collector::gpu_workload::{self, Workload};
use crate::collector::{Collector, Context, Error, KernelEvents, Sink};
use crate::config::agent::GpuBackendChoice;
use crate::deadline::{Outcome, SingleFlight};
use crate::events::{unix_now, EventKind, KernelEvent};
use crate::gpu::fake::FakeBackend;
use crate::gpu::nvml::NvmlBackend;
use crate::gpu::{xid, DeviceReading, GpmMeasurement, GpuBackend, GpuGate, SlowReading, Snapshot};

pub use crate::collector::gpu_workload::unit_from_cgroup;

mod render;
mod slow;

use render::{
    dcgm_labels, render_dcgm, render_device, render_mig_gpm, render_slow_age, render_xids, with,
};
use slow::SlowLatest;

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
    per_pid_metrics: bool,
    dcgm_compat: bool,
    /// GPM on, its interval and window.
    gpm: Option<(Duration, Duration)>,
    gpm_latest: Arc<GpmLatest>,
    gpm_sampler_started: AtomicBool,
    /// How often the slow values are read in the background.
    slow_interval: Duration,
    slow_latest: Arc<SlowLatest>,
    slow_reader_started: AtomicBool,
    backend: Mutex<BackendState>,
    /// `nvml`, `fake` or `none`, once known.
    kind: OnceLock<&'static str>,
    flight: SingleFlight<(), Fetched>,
    /// The last good snapshot: labels for XIDs while the backend fails.
    last: Mutex<Option<Arc<Snapshot>>>,
    /// Per GPU (uuid, else bus id): what `gpu_errors_total` has counted.
    books: Mutex<HashMap<String, ErrorBook>>,
    /// What is known of each pid seen on a GPU in the last collection, so a
    /// long-running job's /proc files are read once, not on every scrape.
    /// Pids no longer on any GPU are dropped at each collection.
    processes: Mutex<HashMap<u32, ProcessInfo>>,
    gate: Arc<GpuGate>,
    /// `gpu_pod_info` as rendered for the kubelet's current mapping.
    pod_info: gpu_workload::PodInfoCache,
}

/// A GPU process's name, unit and workload, read once per pid.
#[derive(Clone)]
struct ProcessInfo {
    comm: String,
    unit: String,
    workload: Workload,
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
                    Ok(mut b) => {
                        if !cfg.fake_call_latency.is_zero() {
                            b.set_call_latency(cfg.fake_call_latency, cfg.deadline.mul_f64(0.8));
                        }
                        tracing::warn!(
                            fixture = %path.display(),
                            "gpu readings are FAKE, replayed from a fixture (gpu_backend=\"fake\"); do not use on a real node"
                        );
                        let b: Arc<dyn GpuBackend> = Arc::new(b);
                        ctx.gpu_gate.attach(b.clone());
                        BackendState::Ready(b)
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
        Some(GpuCollector::build(ctx, kind, state))
    }

    /// A collector reading `backend` (tests and benchmarks that hold on to
    /// their fake backend), configured by `ctx.config.gpu` otherwise.
    pub fn with_backend(ctx: &Arc<Context>, backend: Arc<dyn GpuBackend>) -> GpuCollector {
        let kind = OnceLock::new();
        let _ = kind.set(backend.kind());
        let _ = ctx.gpu_backend.set(backend.kind());
        ctx.gpu_gate.attach(backend.clone());
        GpuCollector::build(ctx, kind, BackendState::Ready(backend))
    }

    fn build(
        ctx: &Arc<Context>,
        kind: OnceLock<&'static str>,
        state: BackendState,
    ) -> GpuCollector {
        let cfg = &ctx.config.gpu;
        GpuCollector {
            inner: Arc::new(Inner {
                choice: cfg.backend.clone(),
                deadline: cfg.deadline,
                process_metrics: cfg.process_metrics,
                per_pid_metrics: cfg.per_pid_metrics,
                dcgm_compat: cfg.dcgm_compat,
                gpm: cfg.gpm.then_some((cfg.gpm_interval, cfg.gpm_window)),
                gpm_latest: Arc::new(GpmLatest::default()),
                gpm_sampler_started: AtomicBool::new(false),
                slow_interval: cfg.slow_interval,
                slow_latest: Arc::new(SlowLatest::default()),
                slow_reader_started: AtomicBool::new(false),
                backend: Mutex::new(state),
                kind,
                flight: SingleFlight::new("gpuops-gpu"),
                last: Mutex::new(None),
                books: Mutex::new(HashMap::new()),
                processes: Mutex::new(HashMap::new()),
                gate: ctx.gpu_gate.clone(),
                pod_info: gpu_workload::PodInfoCache::default(),
            }),
        }
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

    /// Not while the backend is known absent (no NVML, tried less than
    /// `NVML_RETRY` ago; a fake fixture that cannot be read): the
    /// collection then only says so, at once, so a node without GPUs pays
    /// no thread hand-off for it on every scrape.
    fn may_block(&self) -> bool {
        self.inner.absent().is_none()
    }

    fn collect(&self, ctx: &Context, sink: &mut Sink) -> Result<(), Error> {
        let released = self.inner.gate.released_for();
        sink.gauge(
            "gpuops_gpu_released",
            "1 while the agent has released NVML for a runbook step (releases_gpu: true, e.g. a GPU reset): the gpu collector is paused, gpuops_collector_success{collector=\"gpu\"} is 0 and no GPU series are exported until NVML is initialised again; else 0.",
            &[],
            if released.is_some() { 1.0 } else { 0.0 },
        );
        if let Some(step) = released {
            // The kernel log's XIDs are real while NVML is released.
            let last = lock(&self.inner.last).clone().unwrap_or_default();
            render_xids(&last, &ctx.events.xids(), sink);
            return Err(Error::Unavailable(format!(
                "gpu collector paused: nvml is released for runbook step {step}"
            )));
        }
        let outcome = match self.inner.absent() {
            Some(e) => Outcome::Done(Err(e)),
            None => {
                let inner = self.inner.clone();
                let events = ctx.events.clone();
                let background = ctx.background;
                self.inner.flight.call((), self.inner.deadline, move || {
                    inner.fetch(&events, background)
                })
            }
        };
        if let Some(k) = self.inner.kind.get() {
            let _ = ctx.gpu_backend.set(k);
        }
        let xids = ctx.events.xids();
        // A backend that is absent (no NVML) logged that itself, once; a
        // stuck one is worth a warning when it starts.
        let failure = match outcome {
            Outcome::Done(Ok(snap)) => {
                *lock(&self.inner.last) = Some(snap.clone());
                let gpm = self.inner.gpm.and_then(|(interval, window)| {
                    let max_age = if ctx.background {
                        gpu_gpm::max_age(interval, window)
                    } else {
                        Duration::from_secs(60)
                    };
                    self.inner.gpm_latest.get(max_age)
                });
                let slow = self.inner.slow_latest.get(
                    self.inner.gate.epoch(),
                    slow::max_age(self.inner.slow_interval),
                );
                self.render(ctx, &snap, &xids, gpm, slow, sink);
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
    /// Why the backend is known absent right now, without waiting: a fake
    /// fixture that cannot be read, or NVML that failed to load less than
    /// `NVML_RETRY` ago. `None` when it is ready, not tried yet, due for
    /// another try, or being loaded (the lock is held).
    fn absent(&self) -> Option<String> {
        let state = self.backend.try_lock().ok()?;
        match &*state {
            BackendState::Broken(e) => Some(e.clone()),
            BackendState::Pending {
                last_try: Some(t),
                error: Some(e),
            } if t.elapsed() < NVML_RETRY => Some(e.clone()),
            _ => None,
        }
    }

    /// Runs on the flight thread: loads the backend if needed, then reads it.
    fn fetch(&self, events: &Arc<KernelEvents>, background: bool) -> Fetched {
        if let Some(step) = self.gate.released_for() {
            return Err(format!("nvml is released for runbook step {step}"));
        }
        let backend = self.backend(events, background)?;
        let snap = self.fast(&backend, background)?;
        self.slow(&backend, background);
        Ok(snap)
    }

    /// The fast values (and GPM, started or measured).
    fn fast(&self, backend: &Arc<dyn GpuBackend>, background: bool) -> Fetched {
        let started = Instant::now();
        let Some((interval, window)) = self.gpm else {
            return backend.snapshot();
        };
        if background {
            if !self.gpm_sampler_started.swap(true, Ordering::SeqCst) {
                gpu_gpm::spawn_sampler(backend.clone(), self.gpm_latest.clone(), interval, window);
            }
            return backend.snapshot();
        }
        // One-shot: two samples a short interval apart, taken while the
        // snapshot is read, waited for within this collection's deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        let b = backend.clone();
        let spawned = std::thread::Builder::new()
            .name("gpuops-gpm-once".into())
            .spawn(move || {
                let _ = tx.send(b.gpm_measure(gpu_gpm::ONCE_WINDOW.min(window)));
            });
        let snap = backend.snapshot()?;
        if spawned.is_ok() {
            let left = self.deadline.mul_f64(0.9).saturating_sub(started.elapsed());
            match rx.recv_timeout(left) {
                Ok(Ok(m)) => self.gpm_latest.store(m),
                Ok(Err(e)) => tracing::warn!(error = %e, "gpm measurement failed"),
                Err(_) => tracing::warn!("gpm measurement did not finish in time, no gpm series"),
            }
        }
        Ok(snap)
    }

    /// The slow values: read here only when none were read in this gate
    /// epoch yet (the first collection, the first after a release), then by
    /// the background thread (started here, once) on their own cadence.
    fn slow(&self, backend: &Arc<dyn GpuBackend>, background: bool) {
        let epoch = self.gate.epoch();
        if self.slow_latest.last().is_none_or(|(e, _)| e != epoch) {
            slow::read_now(&**backend, &self.slow_latest, &self.gate);
        }
        if background && !self.slow_reader_started.swap(true, Ordering::SeqCst) {
            slow::spawn_reader(
                backend.clone(),
                self.slow_latest.clone(),
                self.gate.clone(),
                self.slow_interval,
            );
        }
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
                        let _ = self.kind.set("nvml");
                        let b = Arc::new(b);
                        if !self.gate.attach(b.clone()) {
                            // Released meanwhile: drop it (nvmlShutdown), load it later.
                            *last_try = None;
                            return Err("nvml is released for a runbook step".into());
                        }
                        if background {
                            b.spawn_xid_watcher(events.clone());
                        }
                        let b: Arc<dyn GpuBackend> = b;
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
        gpm: Option<(Arc<Vec<GpmMeasurement>>, bool)>,
        slow: Option<(Instant, Arc<Vec<SlowReading>>)>,
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
        let slow_age = slow.as_ref().map(|(at, _)| at.elapsed().as_secs_f64());
        for d in &snap.devices {
            // The GPU's slow reading, when it is this GPU's and answered.
            let slow_reading = slow.as_ref().and_then(|(_, all)| {
                all.iter()
                    .find(|s| s.index == d.index && s.uuid == d.uuid && s.lost.is_none())
            });
            let slow_values = slow_reading.map(|s| s.values.clone()).unwrap_or_default();
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
                    slow_values.ecc.uncorrected_volatile,
                );
                absorb(
                    &mut book.remap_failure,
                    &mut book.remap_last,
                    slow_values.remapped_rows.failure,
                );
                render_device(snap, d, &slow_values, &base, sink);
                if let (Some(r), Some(age)) = (slow_reading, slow_age) {
                    render_slow_age(&base, age, r.read_seconds, sink);
                }
                let measured = gpm
                    .as_ref()
                    .and_then(|(m, fresh)| Some((m.iter().find(|m| m.index == d.index)?, *fresh)));
                if let Some((m, _)) = measured {
                    sink.gauge(
                        "gpu_gpm_supported",
                        "Whether the GPU supports GPM (NVML nvmlGpmQueryDeviceSupport; Hopper and newer), 1 or 0: the gpu_sm_*, gpu_*_active_percent and gpu_*_bytes_per_second series exist only where it is 1.",
                        &base,
                        if m.supported { 1.0 } else { 0.0 },
                    );
                }
                let reading = measured
                    .filter(|(_, fresh)| *fresh)
                    .and_then(|(m, _)| Some((m, m.reading.as_ref()?)));
                if let Some((_, r)) = reading {
                    gpu_gpm::render(&base, r, sink);
                }
                if let Some((m, true)) = measured {
                    render_mig_gpm(d, m, &base, sink);
                }
                let sm_activity = reading
                    .and_then(|(_, r)| r.sm_active_percent)
                    .or(d.utilization_percent);
                if let Some(idle) = gpu_workload::allocated_idle(
                    d.memory_used_bytes,
                    !d.processes.is_empty(),
                    sm_activity,
                ) {
                    sink.gauge(
                        "gpu_allocated_idle",
                        "1 when the GPU holds memory (a process has it, or at least 1 GiB is in use) while its SMs are idle (GPM SM activity, else NVML utilization, below 1 %), else 0; min_over_time(gpu_allocated_idle[1h]) == 1 finds GPUs held idle for an hour.",
                        &base,
                        if idle { 1.0 } else { 0.0 },
                    );
                }
                if self.inner.process_metrics {
                    self.render_processes(ctx, d, &base, &mut known, &mut seen, sink);
                }
                if self.inner.dcgm_compat {
                    render_dcgm(ctx, d, &slow_values, xids, sink);
                    if let Some((_, r)) = reading {
                        gpu_gpm::render_dcgm(&dcgm_labels(d).as_pairs(), r, sink);
                    }
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
        if let Some(pods) = ctx.pod_resources.current() {
            self.inner.pod_info.render(snap, &pods, sink);
        }
        render_xids(snap, xids, sink);
    }
}

impl GpuCollector {
    /// Per-workload sums (always, with `process_metrics`) and per-pid series
    /// (with `per_pid_metrics`) of one GPU's processes.
    fn render_processes(
        &self,
        ctx: &Context,
        d: &DeviceReading,
        base: &[(&str, &str)],
        known: &mut HashMap<u32, ProcessInfo>,
        seen: &mut HashMap<u32, ProcessInfo>,
        sink: &mut Sink,
    ) {
        for p in &d.processes {
            if seen.contains_key(&p.pid) {
                continue;
            }
            let info = known
                .remove(&p.pid)
                .unwrap_or_else(|| read_process(ctx, p.pid));
            seen.insert(p.pid, info);
        }
        let unknown = Workload::unknown();
        let sums = gpu_workload::sum_by_workload(d.processes.iter().map(|p| {
            let w = seen.get(&p.pid).map_or(&unknown, |i| &i.workload);
            (w, p.memory_used_bytes, p.sm_utilization_percent)
        }));
        let pods = ctx.pod_resources.current();
        let named = pods
            .as_deref()
            .and_then(|p| gpu_workload::pod_on_gpu(p, d, sums.keys().copied()));
        for (w, u) in &sums {
            let plain = with(
                base,
                &[
                    ("workload_type", w.kind),
                    ("workload", &w.id),
                    ("user", &w.user),
                    ("container", &w.container),
                ],
            );
            let named_labels = named
                .as_ref()
                .filter(|n| w.kind == "kubernetes" && n.uid == w.id)
                .map(|n| gpu_workload::with_pod_name(&plain, n));
            let labels: &[(&str, &str)] = named_labels.as_deref().unwrap_or(&plain);
            sink.gauge(
                "gpu_workload_processes",
                "Processes of a workload on the GPU (NVML nvmlDeviceGetComputeRunningProcesses + graphics processes); workload from /proc/<pid>/cgroup: workload_type slurm (workload = job id, user from the cgroup path or /proc/<pid>/status and <rootfs>/etc/passwd), kubernetes (workload = pod uid, container), container (workload = runtime:id), systemd (workload = unit) or unknown.",
                labels,
                u.processes as f64,
            );
            if let Some(v) = u.memory_used_bytes {
                sink.gauge(
                    "gpu_workload_memory_used_bytes",
                    "Device memory used by a workload's processes on the GPU (NVML nvmlDeviceGetComputeRunningProcesses); labels as gpu_workload_processes.",
                    labels,
                    v as f64,
                );
            }
            if let Some(v) = u.sm_utilization_percent {
                sink.gauge(
                    "gpu_workload_sm_utilization_percent",
                    "SM utilization of a workload's processes on the GPU over the driver's last sample period, summed and capped at 100 (NVML nvmlDeviceGetProcessUtilization); labels as gpu_workload_processes.",
                    labels,
                    v,
                );
            }
        }
        if !self.inner.per_pid_metrics {
            return;
        }
        for p in &d.processes {
            let Some(info) = seen.get(&p.pid) else {
                continue;
            };
            let pid = p.pid.to_string();
            let labels = with(
                base,
                &[("pid", &pid), ("process", &info.comm), ("unit", &info.unit)],
            );
            if let Some(bytes) = p.memory_used_bytes {
                sink.gauge(
                    "gpu_process_memory_used_bytes",
                    "Device memory used by a process (NVML nvmlDeviceGetComputeRunningProcesses); process from /proc/<pid>/comm, unit (systemd unit or container) from /proc/<pid>/cgroup. Only with [gpu] per_pid_metrics = true.",
                    &labels,
                    bytes as f64,
                );
            }
            if let Some(v) = p.sm_utilization_percent {
                sink.gauge(
                    "gpu_process_sm_utilization_percent",
                    "SM utilization of a process over the driver's last sample period (NVML nvmlDeviceGetProcessUtilization). Only with [gpu] per_pid_metrics = true.",
                    &labels,
                    v,
                );
            }
        }
    }
}

/// A process's name, unit and workload from `<procfs>/<pid>/{comm,cgroup,status}`.
fn read_process(ctx: &Context, pid: u32) -> ProcessInfo {
    let comm = ctx
        .roots
        .read_proc(&format!("{pid}/comm"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default();
    let cgroup = ctx
        .roots
        .read_proc(&format!("{pid}/cgroup"))
        .unwrap_or_default();
    let status_uid = ctx
        .roots
        .read_proc(&format!("{pid}/status"))
        .ok()
        .and_then(|s| gpu_workload::uid_from_status(&s));
    let user_name = |uid: u32| {
        let passwd = ctx
            .roots
            .read_text(&ctx.roots.rootfs_path("/etc/passwd"))
            .ok()?;
        gpu_workload::user_from_passwd(&passwd, uid)
    };
    let mut workload = gpu_workload::workload_from_cgroup(&cgroup, status_uid, &user_name);
    if workload.kind != "slurm" {
        // Slurm without its cgroup plugin: the job is in the environment
        // (readable by root or the same user only; otherwise left as is).
        let slurm = ctx
            .roots
            .read_proc_lossy(&format!("{pid}/environ"))
            .ok()
            .and_then(|e| gpu_workload::slurm_from_environ(&e));
        if let Some((job, user)) = slurm {
            let user = user
                .or_else(|| status_uid.map(|u| user_name(u).unwrap_or_else(|| u.to_string())))
                .unwrap_or_default();
            workload = Workload {
                kind: "slurm",
                id: job,
                user,
                container: String::new(),
            };
        }
    }
    ProcessInfo {
        comm,
        unit: unit_from_cgroup(&cgroup).unwrap_or_default(),
        workload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A backend known absent (here a fake fixture that cannot be read; on
    /// a node without NVML, NVML that failed to load) makes the collector
    /// say so at once, on the scrape's own thread: no hand-off per scrape.
    #[test]
    fn absent_backend_fails_at_once_without_blocking() {
        let mut cfg = crate::config::AgentConfig::default();
        cfg.gpu.backend = GpuBackendChoice::Fake("/nonexistent/gpuops-fixture.json".into());
        let ctx = Arc::new(Context::new(
            Arc::new(cfg),
            Arc::new(crate::collector::KernelEvents::new()),
            false,
        ));
        let gpu = GpuCollector::new(&ctx).expect("a gpu collector");
        assert!(!gpu.may_block());
        let mut sink = Sink::new();
        let err = gpu.collect(&ctx, &mut sink).unwrap_err().to_string();
        assert!(err.contains("gpuops-fixture.json"), "{err}");
    }
}
