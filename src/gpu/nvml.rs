//! The NVML backend: the only file that touches NVML (through nvml-wrapper,
//! which loads `libnvidia-ml.so.1` at run time).
//!
//! NVML calls can hang on a sick GPU, so every GPU is read on its own thread
//! through a [`SingleFlight`] keyed by its index: a GPU that does not answer
//! within the per-device deadline is reported `lost` (and keeps its one stuck
//! thread; no new thread is started for it until that call returns), while the
//! other GPUs are still read. The slow values ([`GpuBackend::slow_snapshot`]:
//! energy, ECC totals, remapped rows, power limit) are read apart, by the
//! collector's background thread, through a single flight of their own. The
//! per-GPU reads are in `nvml/device.rs`. The critical-XID event thread records NVML XIDs
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
    GpuBackend, MigReading, NvLinkReading, ProcessReading, SlowReading, SlowValues, Snapshot,
};

mod device;
mod gpm;
use device::*;
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
    /// The slow reads (`slow_snapshot`), one per GPU at most, apart from the
    /// fast ones: a slow call stuck on a GPU does not hold its scrape reads.
    slow_flight: SingleFlight<u32, SlowReading>,
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
            slow_flight: SingleFlight::new("gpuops-nvml-slow"),
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

    fn slow_snapshot(&self) -> Result<Vec<SlowReading>, String> {
        // Never re-initialises (only `snapshot` does, within a scrape).
        let handle = self.handle()?;
        let count = handle
            .device_count()
            .map_err(|e| format!("nvml: cannot count GPUs: {e}"))?;
        let until = Instant::now() + self.device_deadline;
        let pending: Vec<_> = (0..count)
            .map(|i| {
                let nvml = handle.clone();
                let started = Instant::now();
                let p = self.slow_flight.start(i, self.device_deadline, move || {
                    let mut r = read_slow(&nvml, i);
                    r.read_seconds = Some(started.elapsed().as_secs_f64());
                    r
                });
                (i, p)
            })
            .collect();
        drop(handle);
        Ok(pending
            .into_iter()
            .map(|(i, p)| match p.wait_until(until) {
                Outcome::Done(r) => r,
                Outcome::TimedOut => SlowReading {
                    index: i,
                    lost: Some("nvml did not answer within the deadline".into()),
                    ..SlowReading::default()
                },
                Outcome::StillRunning { since } => SlowReading {
                    index: i,
                    lost: Some(format!(
                        "an nvml call has been stuck for {}s",
                        since.as_secs()
                    )),
                    ..SlowReading::default()
                },
            })
            .collect())
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
