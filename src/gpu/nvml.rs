//! The NVML backend: the only file that touches NVML (through nvml-wrapper,
//! which loads `libnvidia-ml.so.1` at run time).
//!
//! NVML calls can hang on a sick GPU, so every GPU is read on its own thread
//! through a [`SingleFlight`] keyed by its index: a GPU that does not answer
//! within the per-device deadline is reported `lost` (and keeps its one stuck
//! thread; no new thread is started for it until that call returns), while the
//! other GPUs are still read. The critical-XID event thread records NVML XIDs
//! in the shared [`KernelEvents`]. [`GpuBackend::release`] lets go of NVML
//! for a GPU reset: new calls fail at once, the XID thread stops, and once
//! the calls in flight have let go (bounded wait) `nvmlShutdown` runs;
//! [`GpuBackend::reinit`] initialises NVML again and restarts the XID thread.
//! This module must not render metrics or read /proc and /sys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enum_wrappers::nv_link::ErrorCounter;
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::{gpm_metrics_get, GpmSample};
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::struct_wrappers::gpm::GpmMetricResult;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id;
use nvml_wrapper::{Device, Nvml};

use crate::deadline::{Outcome, SingleFlight};
use crate::events::{unix_now, KernelEvent, KernelEvents, XidSource};
use crate::gpu::{
    normalize_pci_bus_id, ClockEventReason, ClockEvents, DeviceReading, GpmMeasurement, GpmReading,
    GpuBackend, MigReading, NvLinkReading, ProcessReading, Snapshot,
};

mod gpm;
use gpm::*;

/// Reads GPUs through NVML.
pub struct NvmlBackend {
    /// `None` while released for a GPU reset.
    nvml: RwLock<Option<Arc<Nvml>>>,
    /// Set while released on purpose; cleared by `reinit`. With the handle
    /// gone and this clear (a re-init failed), `snapshot` tries again.
    held_released: AtomicBool,
    /// Bumped at each release: the XID thread of an older one stops.
    generation: Arc<AtomicU64>,
    /// Where the XID thread records events (set by `spawn_xid_watcher`), so
    /// a re-init can start it again.
    events: Mutex<Option<Arc<KernelEvents>>>,
    flight: SingleFlight<u32, DeviceReading>,
    /// Last good identity per index, to label a GPU that stopped answering.
    identities: Mutex<HashMap<u32, DeviceReading>>,
    /// What never changes while a GPU keeps its uuid (name, bus id, VBIOS,
    /// supported throttle reasons, fan count), so a warm read skips those calls.
    statics: Arc<Mutex<HashMap<u32, StaticInfo>>>,
    device_deadline: Duration,
    process_metrics: bool,
    driver_version: Option<String>,
    cuda_version: Option<String>,
}

impl NvmlBackend {
    /// Loads and initialises NVML. The error says why NVML is not available
    /// (library missing, driver not loaded, no GPU). May block: call it off
    /// the request path.
    pub fn init(device_deadline: Duration, process_metrics: bool) -> Result<NvmlBackend, String> {
        let (nvml, driver_version, cuda_version) = open()?;
        Ok(NvmlBackend {
            nvml: RwLock::new(Some(Arc::new(nvml))),
            held_released: AtomicBool::new(false),
            generation: Arc::new(AtomicU64::new(0)),
            events: Mutex::new(None),
            flight: SingleFlight::new("gpuops-nvml"),
            identities: Mutex::new(HashMap::new()),
            statics: Arc::new(Mutex::new(HashMap::new())),
            device_deadline,
            process_metrics,
            driver_version,
            cuda_version,
        })
    }

    /// The NVML handle, or an error while released.
    fn handle(&self) -> Result<Arc<Nvml>, String> {
        self.nvml
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| "nvml is released for a runbook step (GPU reset)".to_string())
    }

    /// Starts the thread that records NVML's critical-XID events.
    pub fn spawn_xid_watcher(&self, events: Arc<KernelEvents>) {
        *self.events.lock().unwrap_or_else(PoisonError::into_inner) = Some(events.clone());
        let Ok(nvml) = self.handle() else {
            return;
        };
        let generation = self.generation.clone();
        let mine = generation.load(Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name("gpuops-nvml-xid".into())
            .spawn(move || watch_xids(&nvml, &events, &generation, mine));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the nvml xid watcher");
        }
    }
}

/// How long a release waits for NVML calls in flight (per-GPU reads, a GPM
/// window, the XID thread's event wait) to let go before giving up.
pub const RELEASE_WAIT: Duration = Duration::from_secs(8);

/// Loads and initialises NVML: the handle, driver and CUDA versions.
fn open() -> Result<(Nvml, Option<String>, Option<String>), String> {
    {
        let nvml = Nvml::init().map_err(|e| match e {
            NvmlError::LibloadingError(e) => {
                format!("cannot load libnvidia-ml.so.1 (is the NVIDIA driver installed?): {e}")
            }
            NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_string(),
            NvmlError::LibRmVersionMismatch => {
                "NVML library and kernel driver versions differ (reboot or reload the driver after an upgrade)".to_string()
            }
            other => format!("nvml init failed: {other}"),
        })?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("cannot count GPUs: {e}"))?;
        if count == 0 {
            return Err("NVML loaded but found no NVIDIA GPU".into());
        }
        let driver_version = nvml.sys_driver_version().ok();
        let cuda_version = nvml.sys_cuda_driver_version().ok().map(|v| {
            let (major, minor) = (v / 1000, (v % 1000) / 10);
            format!("{major}.{minor}")
        });
        tracing::info!(
            gpus = count,
            driver_version = driver_version.as_deref().unwrap_or("unknown"),
            cuda_version = cuda_version.as_deref().unwrap_or("unknown"),
            "nvml loaded"
        );
        Ok((nvml, driver_version, cuda_version))
    }
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>, String> {
        let handle = match self.handle() {
            Ok(h) => h,
            Err(e) if self.held_released.load(Ordering::SeqCst) => return Err(e),
            // A re-init after a release failed: try again (within the
            // collector's deadline).
            Err(_) => {
                self.reinit_nvml()?;
                self.handle()?
            }
        };
        let count = handle
            .device_count()
            .map_err(|e| format!("nvml: cannot count GPUs: {e}"))?;
        let until = Instant::now() + self.device_deadline;
        let pending: Vec<_> = (0..count)
            .map(|i| {
                let nvml = handle.clone();
                let statics = self.statics.clone();
                let processes = self.process_metrics;
                let started = Instant::now();
                let p = self.flight.start(i, self.device_deadline, move || {
                    let mut r = read_device(&nvml, i, processes, &statics);
                    r.read_seconds = Some(started.elapsed().as_secs_f64());
                    r
                });
                (i, p)
            })
            .collect();
        let mut devices = Vec::with_capacity(count as usize);
        let mut ids = self
            .identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (i, p) in pending {
            let reading = match p.wait_until(until) {
                Outcome::Done(r) => r,
                Outcome::TimedOut => lost(&ids, i, "nvml did not answer within the deadline"),
                Outcome::StillRunning { since } => lost(
                    &ids,
                    i,
                    &format!("an nvml call has been stuck for {}s", since.as_secs()),
                ),
            };
            if reading.lost.is_none() && !reading.uuid.is_empty() {
                ids.insert(i, identity(&reading));
            }
            devices.push(reading);
        }
        drop(handle);
        Ok(Arc::new(Snapshot {
            driver_version: self.driver_version.clone(),
            cuda_version: self.cuda_version.clone(),
            devices,
        }))
    }

    fn gpm_measure(&self, window: Duration) -> Result<Vec<GpmMeasurement>, String> {
        let handle = self.handle()?;
        let nvml = &*handle;
        let count = nvml
            .device_count()
            .map_err(|e| format!("nvml: cannot count GPUs: {e}"))?;
        let mut out = Vec::with_capacity(count as usize);
        let mut first: Vec<GpmFirst<'_>> = Vec::new();
        for i in 0..count {
            let Ok(dev) = nvml.device_by_index(i) else {
                continue;
            };
            if !matches!(dev.gpm_support(), Ok(true)) {
                out.push(GpmMeasurement {
                    index: i,
                    supported: false,
                    reading: None,
                    mig: Vec::new(),
                });
                continue;
            }
            let whole = match dev.gpm_sample() {
                Ok(s) => Some((s, Instant::now())),
                Err(e) => {
                    tracing::debug!(gpu = i, error = %e, "gpm sample failed");
                    None
                }
            };
            // MIG: nvml-wrapper cannot list GPU instance ids, so the possible
            // ones are tried; those that exist answer.
            let mut mig = Vec::new();
            if matches!(dev.mig_mode(), Ok(m) if m.current == 1) {
                for gi in 0..MAX_GPU_INSTANCE_ID {
                    if let Ok(s) = dev.gpm_mig_sample(gi) {
                        mig.push((gi, s, Instant::now()));
                    }
                }
            }
            first.push(GpmFirst {
                index: i,
                dev,
                whole,
                mig,
            });
        }
        if !first.is_empty() {
            std::thread::sleep(window);
        }
        let metrics = |s1: &GpmSample<'_>, s2: GpmSample<'_>, t1: Instant, what: &str| {
            let secs = t1.elapsed().as_secs_f64();
            match gpm_metrics_get(nvml, s1, &s2, &GPM_METRICS) {
                Ok(results) => Some(gpm_reading(&results, secs)),
                Err(e) => {
                    tracing::debug!(what, error = %e, "gpm metrics get failed");
                    None
                }
            }
        };
        for f in first {
            let reading = f.whole.and_then(|(s1, t1)| match f.dev.gpm_sample() {
                Ok(s2) => metrics(&s1, s2, t1, "gpu"),
                Err(e) => {
                    tracing::debug!(gpu = f.index, error = %e, "gpm sample failed");
                    None
                }
            });
            let mig = f
                .mig
                .into_iter()
                .filter_map(|(gi, s1, t1)| {
                    let s2 = f.dev.gpm_mig_sample(gi).ok()?;
                    Some((gi, metrics(&s1, s2, t1, "mig")?))
                })
                .collect();
            out.push(GpmMeasurement {
                index: f.index,
                supported: true,
                reading,
                mig,
            });
        }
        out.sort_by_key(|m| m.index);
        Ok(out)
    }

    fn release(&self) -> Result<(), String> {
        self.release_nvml()
    }

    fn reinit(&self) -> Result<(), String> {
        self.reinit_nvml()
    }

    fn is_released(&self) -> bool {
        self.nvml
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
    }
}

impl NvmlBackend {
    fn release_nvml(&self) -> Result<(), String> {
        let taken = self
            .nvml
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut nvml) = taken else {
            return Ok(());
        };
        self.held_released.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        let until = Instant::now() + RELEASE_WAIT;
        loop {
            match Arc::try_unwrap(nvml) {
                Ok(owned) => {
                    // Device handles are re-read after re-init.
                    self.statics
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clear();
                    tracing::info!("nvml released (nvmlShutdown) for a runbook step");
                    return owned
                        .shutdown()
                        .map_err(|e| format!("nvmlShutdown failed: {e}"));
                }
                Err(shared) if Instant::now() < until => {
                    nvml = shared;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(shared) => {
                    let holders = Arc::strong_count(&shared) - 1;
                    self.held_released.store(false, Ordering::SeqCst);
                    let mut slot = self.nvml.write().unwrap_or_else(PoisonError::into_inner);
                    // A re-init may have come first (this release outlived its deadline).
                    if slot.is_none() {
                        *slot = Some(shared);
                        drop(slot);
                        self.restart_xid_watcher();
                    }
                    return Err(format!(
                        "nvml not released: {holders} call(s) still in flight after {}s (a GPU not answering?)",
                        RELEASE_WAIT.as_secs()
                    ));
                }
            }
        }
    }

    fn reinit_nvml(&self) -> Result<(), String> {
        self.held_released.store(false, Ordering::SeqCst);
        let mut slot = self.nvml.write().unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Ok(());
        }
        let (nvml, _, _) = open()?;
        *slot = Some(Arc::new(nvml));
        drop(slot);
        self.restart_xid_watcher();
        Ok(())
    }

    fn restart_xid_watcher(&self) {
        let events = self
            .events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(events) = events {
            self.spawn_xid_watcher(events);
        }
    }
}

fn identity(r: &DeviceReading) -> DeviceReading {
    DeviceReading {
        index: r.index,
        uuid: r.uuid.clone(),
        name: r.name.clone(),
        pci_bus_id: r.pci_bus_id.clone(),
        minor_number: r.minor_number,
        ..DeviceReading::default()
    }
}

fn lost(ids: &HashMap<u32, DeviceReading>, index: u32, why: &str) -> DeviceReading {
    let mut r = ids.get(&index).cloned().unwrap_or_else(|| DeviceReading {
        index,
        ..DeviceReading::default()
    });
    r.lost = Some(why.to_string());
    r
}

/// Whether an error means the GPU itself is gone rather than one unsupported call.
fn is_lost(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::GpuLost | NvmlError::ResetRequired | NvmlError::Timeout
    )
}

/// Values of a GPU that do not change while it keeps its uuid.
#[derive(Clone)]
struct StaticInfo {
    uuid: String,
    name: String,
    pci_bus_id: String,
    minor_number: Option<u32>,
    vbios_version: Option<String>,
    supported_throttle: Option<ThrottleReasons>,
    fans: Option<u32>,
}

/// Reads one GPU. Unsupported values stay `None`; a lost GPU returns early.
fn read_device(
    nvml: &Nvml,
    index: u32,
    processes: bool,
    statics: &Mutex<HashMap<u32, StaticInfo>>,
) -> DeviceReading {
    let mut r = DeviceReading {
        index,
        ..DeviceReading::default()
    };
    let dev = match nvml.device_by_index(index) {
        Ok(d) => d,
        Err(e) => {
            r.lost = Some(format!("nvml cannot open the gpu: {e}"));
            return r;
        }
    };
    // Identity first: an Unknown error here also means the GPU is gone.
    match dev.uuid() {
        Ok(u) => r.uuid = u,
        Err(e) => {
            r.lost = Some(format!("nvml cannot read the gpu's uuid: {e}"));
            return r;
        }
    }
    let cached = statics
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&index)
        .filter(|s| s.uuid == r.uuid)
        .cloned();
    let fresh = cached.is_none();
    let info = cached.unwrap_or_else(|| StaticInfo {
        uuid: r.uuid.clone(),
        name: dev.name().unwrap_or_default(),
        pci_bus_id: dev
            .pci_info()
            .ok()
            .and_then(|p| normalize_pci_bus_id(&p.bus_id))
            .unwrap_or_default(),
        minor_number: dev.minor_number().ok(),
        vbios_version: dev.vbios_version().ok(),
        supported_throttle: dev.supported_throttle_reasons().ok(),
        fans: dev.num_fans().ok(),
    });
    r.name = info.name.clone();
    r.pci_bus_id = info.pci_bus_id.clone();
    r.minor_number = info.minor_number;
    r.vbios_version = info.vbios_version.clone();
    let mut gone: Option<String> = None;
    macro_rules! get {
        ($e:expr) => {
            match $e {
                Ok(v) => Some(v),
                Err(e) => {
                    if gone.is_none() && is_lost(&e) {
                        gone = Some(format!("gpu stopped answering nvml: {e}"));
                    }
                    None
                }
            }
        };
    }
    if let Some(u) = get!(dev.utilization_rates()) {
        r.utilization_percent = Some(f64::from(u.gpu));
        r.memory_utilization_percent = Some(f64::from(u.memory));
    }
    if gone.is_some() {
        r.lost = gone;
        return r;
    }
    if fresh && !info.name.is_empty() && !info.pci_bus_id.is_empty() {
        statics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(index, info.clone());
    }
    // One batched field-value call: energy, PCIe replays, ECC totals, memory
    // temperature, row remapping, retired pages. What it cannot give is read
    // with its own call below.
    read_fields(&dev, &mut r);
    if let Some(m) = get!(dev.memory_info()) {
        r.memory_used_bytes = Some(m.used);
        r.memory_total_bytes = Some(m.total);
    }
    r.temperature_celsius = get!(dev.temperature(TemperatureSensor::Gpu)).map(f64::from);
    r.power_watts = get!(dev.power_usage()).map(|mw| f64::from(mw) / 1000.0);
    r.power_limit_watts = get!(dev.enforced_power_limit()).map(|mw| f64::from(mw) / 1000.0);
    if r.energy_joules.is_none() {
        r.energy_joules = get!(dev.total_energy_consumption()).map(|mj| mj as f64 / 1000.0);
    }
    r.sm_clock_mhz = get!(dev.clock_info(Clock::SM)).map(f64::from);
    r.memory_clock_mhz = get!(dev.clock_info(Clock::Memory)).map(f64::from);
    if let (Some(supported), Some(active)) = (
        info.supported_throttle,
        get!(dev.current_throttle_reasons()),
    ) {
        r.clock_events = Some(ClockEvents {
            supported: reasons(supported),
            active: reasons(active),
        });
    }
    if let Some(n) = info.fans {
        r.fan_speed_percent = (0..n)
            .filter_map(|f| dev.fan_speed(f).ok().map(f64::from))
            .collect();
    }
    r.pcie_link_generation = get!(dev.current_pcie_link_gen());
    r.pcie_link_width = get!(dev.current_pcie_link_width());
    if r.pcie_replay_total.is_none() {
        r.pcie_replay_total = get!(dev.pcie_replay_counter()).map(u64::from);
    }
    for (slot, kind, counter) in [
        (
            &mut r.ecc.corrected_volatile,
            MemoryError::Corrected,
            EccCounter::Volatile,
        ),
        (
            &mut r.ecc.uncorrected_volatile,
            MemoryError::Uncorrected,
            EccCounter::Volatile,
        ),
        (
            &mut r.ecc.corrected_aggregate,
            MemoryError::Corrected,
            EccCounter::Aggregate,
        ),
        (
            &mut r.ecc.uncorrected_aggregate,
            MemoryError::Uncorrected,
            EccCounter::Aggregate,
        ),
    ] {
        if slot.is_none() {
            *slot = get!(dev.total_ecc_errors(kind, counter));
        }
    }
    read_nvlinks(&dev, &mut r);
    read_mig(&dev, &mut r);
    if processes {
        let mut procs: Vec<ProcessInfo> = Vec::new();
        if let Some(p) = get!(dev.running_compute_processes()) {
            procs.extend(p);
        }
        if let Some(p) = get!(dev.running_graphics_processes()) {
            for g in p {
                if !procs.iter().any(|c| c.pid == g.pid) {
                    procs.push(g);
                }
            }
        }
        // The latest of the driver's buffered per-process samples, per pid.
        let mut sm: HashMap<u32, (u64, u32)> = HashMap::new();
        if !procs.is_empty() {
            for s in dev.process_utilization_stats(None).unwrap_or_default() {
                let e = sm.entry(s.pid).or_insert((s.timestamp, s.sm_util));
                if s.timestamp >= e.0 {
                    *e = (s.timestamp, s.sm_util);
                }
            }
        }
        r.processes = procs
            .into_iter()
            .map(|p| ProcessReading {
                pid: p.pid,
                memory_used_bytes: match p.used_gpu_memory {
                    UsedGpuMemory::Used(b) => Some(b),
                    UsedGpuMemory::Unavailable => None,
                },
                sm_utilization_percent: sm.get(&p.pid).map(|(_, u)| f64::from(*u)),
            })
            .collect();
    }
    r.lost = gone;
    r
}

/// Maps NVML's throttle-reason bits to our reasons.
fn reasons(bits: ThrottleReasons) -> Vec<ClockEventReason> {
    let table = [
        (ThrottleReasons::GPU_IDLE, ClockEventReason::GpuIdle),
        (
            ThrottleReasons::APPLICATIONS_CLOCKS_SETTING,
            ClockEventReason::ApplicationsClocksSetting,
        ),
        (ThrottleReasons::SW_POWER_CAP, ClockEventReason::SwPowerCap),
        (ThrottleReasons::HW_SLOWDOWN, ClockEventReason::HwSlowdown),
        (ThrottleReasons::SYNC_BOOST, ClockEventReason::SyncBoost),
        (
            ThrottleReasons::SW_THERMAL_SLOWDOWN,
            ClockEventReason::SwThermalSlowdown,
        ),
        (
            ThrottleReasons::HW_THERMAL_SLOWDOWN,
            ClockEventReason::HwThermalSlowdown,
        ),
        (
            ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
            ClockEventReason::HwPowerBrakeSlowdown,
        ),
        (
            ThrottleReasons::DISPLAY_CLOCK_SETTING,
            ClockEventReason::DisplayClockSetting,
        ),
    ];
    table
        .iter()
        .filter(|(bit, _)| bits.contains(*bit))
        .map(|(_, r)| *r)
        .collect()
}

fn sample_u64(v: &SampleValue) -> Option<u64> {
    match *v {
        SampleValue::U32(x) => Some(u64::from(x)),
        SampleValue::U64(x) => Some(x),
        SampleValue::I64(x) => u64::try_from(x).ok(),
        SampleValue::F64(x) if x >= 0.0 && x.is_finite() => Some(x as u64),
        SampleValue::F64(_) => None,
    }
}

/// Values read as NVML field values in one call: those only available so
/// (memory temperature, row remapping, retired pages) and some that have
/// their own call but cost a driver round trip each (energy, about 3 ms on
/// an H200; PCIe replays; the four ECC totals).
fn read_fields(dev: &Device<'_>, r: &mut DeviceReading) {
    let ids = [
        field_id::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        field_id::NVML_FI_DEV_PCIE_REPLAY_COUNTER,
        field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
        field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
        field_id::NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
        field_id::NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
        field_id::NVML_FI_DEV_MEMORY_TEMP,
        field_id::NVML_FI_DEV_REMAPPED_COR,
        field_id::NVML_FI_DEV_REMAPPED_UNC,
        field_id::NVML_FI_DEV_REMAPPED_PENDING,
        field_id::NVML_FI_DEV_REMAPPED_FAILURE,
        field_id::NVML_FI_DEV_RETIRED_SBE,
        field_id::NVML_FI_DEV_RETIRED_DBE,
    ];
    let request: Vec<FieldId> = ids.iter().map(|i| FieldId(*i)).collect();
    let Ok(samples) = dev.field_values_for(&request) else {
        return;
    };
    for (id, sample) in ids.iter().zip(samples) {
        let Some(v) = sample
            .ok()
            .and_then(|s| s.value.ok())
            .and_then(|v| sample_u64(&v))
        else {
            continue;
        };
        match *id {
            field_id::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION => {
                r.energy_joules = Some(v as f64 / 1000.0)
            }
            field_id::NVML_FI_DEV_PCIE_REPLAY_COUNTER => r.pcie_replay_total = Some(v),
            field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL => r.ecc.corrected_volatile = Some(v),
            field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL => r.ecc.uncorrected_volatile = Some(v),
            field_id::NVML_FI_DEV_ECC_SBE_AGG_TOTAL => r.ecc.corrected_aggregate = Some(v),
            field_id::NVML_FI_DEV_ECC_DBE_AGG_TOTAL => r.ecc.uncorrected_aggregate = Some(v),
            field_id::NVML_FI_DEV_MEMORY_TEMP if v > 0 => {
                r.memory_temperature_celsius = Some(v as f64)
            }
            field_id::NVML_FI_DEV_REMAPPED_COR => r.remapped_rows.correctable = Some(v),
            field_id::NVML_FI_DEV_REMAPPED_UNC => r.remapped_rows.uncorrectable = Some(v),
            field_id::NVML_FI_DEV_REMAPPED_PENDING => r.remapped_rows.pending = Some(v),
            field_id::NVML_FI_DEV_REMAPPED_FAILURE => r.remapped_rows.failure = Some(v),
            field_id::NVML_FI_DEV_RETIRED_SBE => r.retired_pages.single_bit_ecc = Some(v),
            field_id::NVML_FI_DEV_RETIRED_DBE => r.retired_pages.double_bit_ecc = Some(v),
            _ => {}
        }
    }
}

/// Error counters of every active NVLink link.
fn read_nvlinks(dev: &Device<'_>, r: &mut DeviceReading) {
    let links = dev
        .field_values_for(&[FieldId(field_id::NVML_FI_DEV_NVLINK_LINK_COUNT)])
        .ok()
        .and_then(|mut v| v.pop())
        .and_then(|s| s.ok())
        .and_then(|s| s.value.ok())
        .and_then(|v| sample_u64(&v))
        .unwrap_or(0)
        .min(64) as u32;
    for link in 0..links {
        let l = dev.link_wrapper_for(link);
        if !matches!(l.is_active(), Ok(true)) {
            continue;
        }
        r.nvlinks.push(NvLinkReading {
            link,
            replay: l.error_counter(ErrorCounter::DlReplay).ok(),
            recovery: l.error_counter(ErrorCounter::DlRecovery).ok(),
            crc_flit: l.error_counter(ErrorCounter::DlCrcFlit).ok(),
            crc_data: l.error_counter(ErrorCounter::DlCrcData).ok(),
        });
    }
}

/// MIG instances of a GPU in MIG mode. nvml-wrapper has no safe call for a MIG
/// device's GPU/compute instance ids, so they stay `None` (their labels are
/// left out) and the profile comes from the MIG device's name.
fn read_mig(dev: &Device<'_>, r: &mut DeviceReading) {
    if !matches!(dev.mig_mode(), Ok(m) if m.current == 1) {
        return;
    }
    let Ok(count) = dev.mig_device_count() else {
        return;
    };
    for k in 0..count {
        let Ok(m) = dev.mig_device_by_index(k) else {
            continue;
        };
        let name = m.name().unwrap_or_default();
        let profile = name
            .rsplit_once(" MIG ")
            .map(|(_, p)| p.to_string())
            .unwrap_or_default();
        let mem = m.memory_info().ok();
        r.mig.push(MigReading {
            gpu_instance_id: None,
            compute_instance_id: None,
            profile,
            uuid: m.uuid().unwrap_or_default(),
            memory_used_bytes: mem.as_ref().map(|x| x.used),
            memory_total_bytes: mem.as_ref().map(|x| x.total),
            gpm: None,
        });
    }
}

/// Follows NVML's critical-XID events until NVML goes away.
/// Runs until NVML is released (`generation` moves on from `mine`).
fn watch_xids(nvml: &Nvml, events: &KernelEvents, generation: &AtomicU64, mine: u64) {
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "nvml xid events unavailable, relying on the kernel log");
            return;
        }
    };
    let count = nvml.device_count().unwrap_or(0);
    let mut registered = 0;
    for i in 0..count {
        let Ok(dev) = nvml.device_by_index(i) else {
            continue;
        };
        let supported = dev
            .supported_event_types()
            .map(|t| t.contains(EventTypes::CRITICAL_XID_ERROR))
            .unwrap_or(false);
        if !supported {
            continue;
        }
        match dev.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                tracing::warn!(gpu = i, error = %e.error, "cannot register nvml xid events, relying on the kernel log");
                return;
            }
        }
    }
    if registered == 0 {
        tracing::info!("no gpu supports nvml xid events, relying on the kernel log");
        return;
    }
    tracing::debug!(gpus = registered, "watching nvml xid events");
    // A short wait, so a release does not wait long for this thread.
    while generation.load(Ordering::SeqCst) == mine {
        match set.wait(1000) {
            Ok(data) => {
                if !data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                    continue;
                }
                let Some(XidError::Value(code)) = data.event_data else {
                    continue;
                };
                let Ok(code) = u32::try_from(code) else {
                    continue;
                };
                let bus = data
                    .device
                    .pci_info()
                    .ok()
                    .and_then(|p| normalize_pci_bus_id(&p.bus_id))
                    .unwrap_or_else(|| "unknown".to_string());
                tracing::warn!(pci_bus_id = %bus, xid = code, "nvml reported an xid");
                events.record(KernelEvent {
                    timestamp: unix_now(),
                    counted: true,
                    message: format!("NVML critical XID event: Xid {code} on {bus}"),
                    kind: crate::gpu::xid::event(bus, code, None, None, XidSource::Nvml),
                });
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                tracing::debug!(error = %e, "nvml event wait failed");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nvml_clock_event_reason_maps_to_ours_and_back() {
        for r in ClockEventReason::ALL {
            let bits = ThrottleReasons::from_bits_truncate(r.bit());
            assert_eq!(reasons(bits), vec![r], "{r:?}");
        }
        let both = ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_THERMAL_SLOWDOWN;
        assert_eq!(
            reasons(both),
            vec![
                ClockEventReason::SwPowerCap,
                ClockEventReason::HwThermalSlowdown
            ]
        );
        assert!(reasons(ThrottleReasons::NONE).is_empty());
    }

    #[test]
    fn a_gpu_that_stops_answering_keeps_its_last_labels() {
        let mut ids = HashMap::new();
        ids.insert(
            3,
            DeviceReading {
                index: 3,
                uuid: "GPU-3".into(),
                name: "NVIDIA H100 80GB HBM3".into(),
                pci_bus_id: "00000000:5D:00.0".into(),
                ..DeviceReading::default()
            },
        );
        let r = lost(&ids, 3, "timed out");
        assert_eq!(
            (r.uuid.as_str(), r.lost.as_deref()),
            ("GPU-3", Some("timed out"))
        );
        let unknown = lost(&ids, 4, "gone");
        assert_eq!((unknown.index, unknown.uuid.as_str()), (4, ""));
        assert!(is_lost(&NvmlError::GpuLost) && !is_lost(&NvmlError::NotSupported));
    }

    #[test]
    fn gpm_rates_follow_nvmls_unit() {
        assert_eq!(bytes_per_unit("MiB/sec"), 1048576.0);
        assert_eq!(bytes_per_unit("MB/s"), 1e6);
        assert_eq!(bytes_per_unit("B/s"), 1.0);
        assert_eq!(bytes_per_unit(""), 1048576.0);
        let r = gpm_reading(&[Err(NvmlError::NotSupported)], 1.0);
        assert_eq!(r.graphics_engine_active_percent, None);
        assert!(r.nvdec_active_percent.is_empty());
        assert_eq!(r.window_seconds, Some(1.0));
    }
}
