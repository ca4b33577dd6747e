//! GPU backends: the [`GpuBackend`] seam and the readings it returns.
//!
//! A backend returns a [`Snapshot`]: driver-wide facts and one
//! [`DeviceReading`] per GPU. Every reading is an `Option` (or an empty list):
//! a value that could not be read is `None` and its series is left out, never
//! exported as 0. The readings deserialize from the fake backend's JSON
//! fixture format (see docs/gpu.md), so the fixture and the NVML backend fill
//! the same structure.
//! Only `nvml.rs` touches NVML; this module must not read the host or render
//! metrics (that is `collector::gpu`).

pub mod fake;
pub mod nvml;
pub mod xid;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Deserialize;

/// A source of GPU readings. Calls may block (NVML on a sick GPU): the
/// collector only calls `snapshot` through a deadline-bounded single flight.
pub trait GpuBackend: Send + Sync {
    /// `nvml` or `fake`; feeds `gpuops_build_info{gpu_backend}`.
    fn kind(&self) -> &'static str;
    /// Reads every GPU once: the fast values only (what changes from one
    /// scrape to the next). The slow values ([`SlowValues`]) are left `None`:
    /// they come from [`GpuBackend::slow_snapshot`]. An error means no GPU
    /// could be read at all; a single GPU that stops answering is a reading
    /// with `lost` set.
    fn snapshot(&self) -> Result<Arc<Snapshot>, String>;
    /// Reads every GPU's slow, slowly changing values ([`SlowValues`]: the
    /// energy counter, about 3 ms per call on an H200; the power limit; ECC
    /// totals, retired pages and remapped rows). The collector calls it in
    /// the background every `[gpu] slow_interval_secs` and serves the last
    /// reading with its age, so a scrape never waits for these calls. Like
    /// `snapshot`, it may block: every GPU is read within a deadline, and a
    /// GPU that misses it is a reading with `lost` set. Default: none.
    fn slow_snapshot(&self) -> Result<Vec<SlowReading>, String> {
        Ok(Vec::new())
    }
    /// Measures GPM (GPU Performance Monitoring, Hopper and newer) on every
    /// GPU: a first sample, `window` later a second, and the metrics between
    /// them. Blocks for about `window`; like `snapshot`, it may hang on a sick
    /// GPU, so it runs on a thread of its own. One entry per GPU index; a GPU
    /// without GPM support says so. The default: no GPU supports GPM.
    fn gpm_measure(&self, window: Duration) -> Result<Vec<GpmMeasurement>, String> {
        let _ = window;
        Ok(Vec::new())
    }
    /// Lets go of the GPUs so the driver can reset one: closes every handle
    /// and shuts the library down (NVML: `nvmlShutdown`). Until
    /// [`GpuBackend::reinit`], `snapshot` and `gpm_measure` fail at once
    /// without touching a GPU. Waits a bounded time for calls in flight to
    /// let go; if they do not, nothing is released and the error says so.
    /// May block: callers run it through a deadline. Default: nothing held.
    fn release(&self) -> Result<(), String> {
        Ok(())
    }
    /// Initialises the library again after [`GpuBackend::release`] (a no-op
    /// when it is not released). May block like `release`.
    fn reinit(&self) -> Result<(), String> {
        Ok(())
    }
    /// Whether it is released now (no handle held).
    fn is_released(&self) -> bool {
        false
    }
}

/// Shared by the GPU collector and the agent's `POST /v1/exec`: the backend
/// the collector reads (once it has one) and whether it is released for a
/// runbook step (`releases_gpu: true`). While released, the collector does
/// not call the backend (a scrape answers at once with
/// `gpuops_gpu_released 1` and no GPU series) and does not load one.
#[derive(Default)]
pub struct GpuGate {
    inner: Mutex<GateInner>,
}

#[derive(Default)]
struct GateInner {
    /// The step the GPU is released for (`runbook:step`), while it is.
    released_for: Option<String>,
    backend: Option<Arc<dyn GpuBackend>>,
    /// Bumped at every release: a reading taken before it (the slow values)
    /// is not served after it (a GPU reset changes those counters).
    epoch: u64,
}

impl GpuGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The collector's backend, once loaded. `false` (and not attached) while
    /// the GPU is released: the caller drops it.
    pub fn attach(&self, backend: Arc<dyn GpuBackend>) -> bool {
        let mut g = self.lock();
        if g.released_for.is_some() {
            return false;
        }
        g.backend = Some(backend);
        true
    }

    /// The collector's backend, once loaded.
    pub fn backend(&self) -> Option<Arc<dyn GpuBackend>> {
        self.lock().backend.clone()
    }

    /// The step the GPU is released for, while it is.
    pub fn released_for(&self) -> Option<String> {
        self.lock().released_for.clone()
    }

    /// Marks the GPU released for `step` (the collector stops at once) and
    /// returns the backend to release (`None`: none is loaded, nothing to
    /// release). An error when it is already released for another step.
    pub fn begin_release(&self, step: &str) -> Result<Option<Arc<dyn GpuBackend>>, String> {
        let mut g = self.lock();
        if let Some(other) = &g.released_for {
            return Err(format!("the GPU is already released for {other}"));
        }
        g.released_for = Some(step.to_string());
        g.epoch += 1;
        Ok(g.backend.clone())
    }

    /// Which release period this is: it changes at every release, so a
    /// reading taken under an older epoch is not served (see
    /// [`GpuGate::begin_release`]).
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Ends the release: the collector reads the backend again.
    pub fn end_release(&self) {
        self.lock().released_for = None;
    }
}

/// What one GPM window found on one GPU.
#[derive(Debug, Clone, PartialEq)]
pub struct GpmMeasurement {
    /// NVML's index (the `gpu` label).
    pub index: u32,
    /// Whether the GPU supports GPM (`nvmlGpmQueryDeviceSupport`).
    pub supported: bool,
    /// The averages over the window; `None` when the GPU does not support GPM
    /// or the samples could not be taken.
    pub reading: Option<GpmReading>,
    /// Per MIG GPU instance (by `gpu_instance_id`), where NVML supports it.
    pub mig: Vec<(u32, GpmReading)>,
}

/// GPM metrics averaged over one window (`nvmlGpmMetricsGet` between two
/// samples). Percentages are 0..100 like NVML's; rates are bytes per second.
/// Every value may be absent (not supported on this GPU or driver). Field
/// names are the fake fixture's JSON keys (`devices[].gpm`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GpmReading {
    /// How long the window was, in seconds (fixtures leave it out: the
    /// sampler's window is used).
    pub window_seconds: Option<f64>,
    /// `NVML_GPM_METRIC_GRAPHICS_UTIL`: time the graphics/compute engine was busy.
    pub graphics_engine_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_SM_UTIL`: time an SM had at least one warp, averaged over SMs.
    pub sm_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_SM_OCCUPANCY`: resident warps vs the maximum, averaged over SMs.
    pub sm_occupancy_percent: Option<f64>,
    /// `NVML_GPM_METRIC_ANY_TENSOR_UTIL`: time any tensor pipe was busy.
    pub tensor_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_DFMA_TENSOR_UTIL` (FP64 tensor).
    pub tensor_dfma_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_HMMA_TENSOR_UTIL` (FP16/BF16/TF32 tensor).
    pub tensor_hmma_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_IMMA_TENSOR_UTIL` (integer tensor).
    pub tensor_imma_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_FP64_UTIL`.
    pub fp64_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_FP32_UTIL`.
    pub fp32_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_FP16_UTIL`.
    pub fp16_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_INTEGER_UTIL`.
    pub integer_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_DRAM_BW_UTIL`: DRAM bandwidth used vs the peak.
    pub dram_active_percent: Option<f64>,
    /// `NVML_GPM_METRIC_PCIE_TX_PER_SEC`.
    pub pcie_tx_bytes_per_second: Option<f64>,
    /// `NVML_GPM_METRIC_PCIE_RX_PER_SEC`.
    pub pcie_rx_bytes_per_second: Option<f64>,
    /// `NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC`.
    pub nvlink_tx_bytes_per_second: Option<f64>,
    /// `NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC`.
    pub nvlink_rx_bytes_per_second: Option<f64>,
    /// `NVML_GPM_METRIC_NVDEC_<i>_UTIL`, per decoder instance the GPU has.
    pub nvdec_active_percent: Vec<f64>,
    /// `NVML_GPM_METRIC_NVJPG_<i>_UTIL`, per JPEG decoder instance.
    pub nvjpg_active_percent: Vec<f64>,
    /// `NVML_GPM_METRIC_NVOFA_<i>_UTIL`, per optical-flow accelerator instance.
    pub nvofa_active_percent: Vec<f64>,
}

/// One pass over all GPUs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Snapshot {
    /// The kernel driver's version, e.g. `550.54.15`.
    pub driver_version: Option<String>,
    /// The CUDA version the driver supports, e.g. `12.4`.
    pub cuda_version: Option<String>,
    pub devices: Vec<DeviceReading>,
}

/// Everything read from one GPU. Field names are the fake fixture's JSON keys.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeviceReading {
    /// NVML's index (the `gpu` label).
    pub index: u32,
    /// `GPU-xxxxxxxx-...`; empty when it could not be read.
    pub uuid: String,
    /// Product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Normalised with [`normalize_pci_bus_id`]: `00000000:3B:00.0`.
    pub pci_bus_id: String,
    /// The `/dev/nvidiaN` minor number (dcgm-exporter's `device` label).
    pub minor_number: Option<u32>,
    pub vbios_version: Option<String>,
    /// Set when the GPU stopped answering (lost, fell off the bus, timed out):
    /// the reason. Such a GPU exports `gpu_up 0` and nothing else.
    pub lost: Option<String>,
    pub utilization_percent: Option<f64>,
    pub memory_utilization_percent: Option<f64>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub temperature_celsius: Option<f64>,
    pub memory_temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    /// Slow value (fixtures only: backends return it in [`SlowValues`]).
    pub power_limit_watts: Option<f64>,
    /// Energy used since the driver was loaded. Slow value (fixtures only).
    pub energy_joules: Option<f64>,
    pub sm_clock_mhz: Option<f64>,
    pub memory_clock_mhz: Option<f64>,
    /// Clock-event (throttle) reasons; `None` when NVML cannot tell.
    pub clock_events: Option<ClockEvents>,
    /// Fan speed per fan, in percent of the maximum (empty: no fans, e.g. SXM).
    pub fan_speed_percent: Vec<f64>,
    pub pcie_replay_total: Option<u64>,
    pub pcie_link_generation: Option<u32>,
    pub pcie_link_width: Option<u32>,
    /// Slow values (fixtures only: backends return them in [`SlowValues`]).
    pub ecc: EccCounts,
    pub retired_pages: RetiredPages,
    pub remapped_rows: RemappedRows,
    pub nvlinks: Vec<NvLinkReading>,
    pub mig: Vec<MigReading>,
    pub processes: Vec<ProcessReading>,
    /// Fake fixtures only: what a GPM window on this GPU reads (absent: the
    /// GPU has no GPM support). The NVML backend measures GPM through
    /// [`GpuBackend::gpm_measure`] instead and leaves this `None`.
    pub gpm: Option<GpmReading>,
    /// How long the backend took to read this GPU (NVML only; not in fixtures).
    #[serde(skip)]
    pub read_seconds: Option<f64>,
}

impl DeviceReading {
    /// Moves the slow values out of a fixture's reading (they are served by
    /// [`GpuBackend::slow_snapshot`], not by `snapshot`).
    pub fn take_slow(&mut self) -> SlowValues {
        SlowValues {
            power_limit_watts: self.power_limit_watts.take(),
            energy_joules: self.energy_joules.take(),
            ecc: std::mem::take(&mut self.ecc),
            retired_pages: std::mem::take(&mut self.retired_pages),
            remapped_rows: std::mem::take(&mut self.remapped_rows),
        }
    }
}

/// The slow, slowly changing values of one GPU: NVML calls that cost
/// milliseconds each (the energy counter about 3 ms on an H200) for values
/// that change rarely or only count up. Read in the background on their own
/// cadence and served from the last reading, with its age.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlowValues {
    /// `nvmlDeviceGetEnforcedPowerLimit`.
    pub power_limit_watts: Option<f64>,
    /// Energy used since the driver was loaded (field
    /// `NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION`, else
    /// `nvmlDeviceGetTotalEnergyConsumption`).
    pub energy_joules: Option<f64>,
    pub ecc: EccCounts,
    pub retired_pages: RetiredPages,
    pub remapped_rows: RemappedRows,
}

/// One GPU's slow values, as one [`GpuBackend::slow_snapshot`] read them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlowReading {
    /// NVML's index.
    pub index: u32,
    /// The GPU's uuid, so values are never served for another GPU at this
    /// index; empty when it could not be read.
    pub uuid: String,
    /// Set when the GPU did not answer (then `values` is empty).
    pub lost: Option<String>,
    pub values: SlowValues,
    /// How long the backend took to read them.
    pub read_seconds: Option<f64>,
}

/// Which clock-event reasons the GPU supports and which are active now.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClockEvents {
    /// Reasons the GPU can report; exported as 0 or 1 each.
    #[serde(default = "ClockEventReason::all")]
    pub supported: Vec<ClockEventReason>,
    /// Reasons holding the clocks down now.
    #[serde(default)]
    pub active: Vec<ClockEventReason>,
}

/// Every clock-event ("throttle") reason NVML defines.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ClockEventReason {
    /// Nothing runs; clocks are idle.
    GpuIdle,
    /// Application clocks (or user-defined clocks) set below the maximum.
    ApplicationsClocksSetting,
    /// Software power capping (the power limit).
    SwPowerCap,
    /// Hardware slowdown: thermal, power brake or external signal.
    HwSlowdown,
    /// Held in step with other GPUs of a sync-boost group.
    SyncBoost,
    /// Software thermal slowdown (GPU or memory above its target temperature).
    SwThermalSlowdown,
    /// Hardware thermal slowdown (too hot).
    HwThermalSlowdown,
    /// Hardware power brake (external power brake signal).
    HwPowerBrakeSlowdown,
    /// Display clock setting.
    DisplayClockSetting,
}

impl ClockEventReason {
    pub const ALL: [ClockEventReason; 9] = [
        ClockEventReason::GpuIdle,
        ClockEventReason::ApplicationsClocksSetting,
        ClockEventReason::SwPowerCap,
        ClockEventReason::HwSlowdown,
        ClockEventReason::SyncBoost,
        ClockEventReason::SwThermalSlowdown,
        ClockEventReason::HwThermalSlowdown,
        ClockEventReason::HwPowerBrakeSlowdown,
        ClockEventReason::DisplayClockSetting,
    ];

    pub fn all() -> Vec<ClockEventReason> {
        ClockEventReason::ALL.to_vec()
    }

    /// NVML's bit for the reason (`nvmlClocksEventReason*`), as in
    /// dcgm-exporter's `DCGM_FI_DEV_CLOCK_THROTTLE_REASONS` bitmask.
    pub fn bit(self) -> u64 {
        match self {
            ClockEventReason::GpuIdle => 0x1,
            ClockEventReason::ApplicationsClocksSetting => 0x2,
            ClockEventReason::SwPowerCap => 0x4,
            ClockEventReason::HwSlowdown => 0x8,
            ClockEventReason::SyncBoost => 0x10,
            ClockEventReason::SwThermalSlowdown => 0x20,
            ClockEventReason::HwThermalSlowdown => 0x40,
            ClockEventReason::HwPowerBrakeSlowdown => 0x80,
            ClockEventReason::DisplayClockSetting => 0x100,
        }
    }

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClockEventReason::GpuIdle => "gpu_idle",
            ClockEventReason::ApplicationsClocksSetting => "applications_clocks_setting",
            ClockEventReason::SwPowerCap => "sw_power_cap",
            ClockEventReason::HwSlowdown => "hw_slowdown",
            ClockEventReason::SyncBoost => "sync_boost",
            ClockEventReason::SwThermalSlowdown => "sw_thermal_slowdown",
            ClockEventReason::HwThermalSlowdown => "hw_thermal_slowdown",
            ClockEventReason::HwPowerBrakeSlowdown => "hw_power_brake_slowdown",
            ClockEventReason::DisplayClockSetting => "display_clock_setting",
        }
    }
}

/// ECC error counts (corrected = single-bit, uncorrected = double-bit).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EccCounts {
    /// Since the driver was loaded.
    pub corrected_volatile: Option<u64>,
    pub uncorrected_volatile: Option<u64>,
    /// Over the GPU's lifetime (infoROM).
    pub corrected_aggregate: Option<u64>,
    pub uncorrected_aggregate: Option<u64>,
}

/// Pages retired by the driver (pre-Ampere GPUs; Ampere and later remap rows).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetiredPages {
    pub single_bit_ecc: Option<u64>,
    pub double_bit_ecc: Option<u64>,
}

/// HBM row remapping (Ampere and later).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RemappedRows {
    /// Rows remapped because of correctable errors.
    pub correctable: Option<u64>,
    /// Rows remapped because of uncorrectable errors.
    pub uncorrectable: Option<u64>,
    /// 1 when a remap is pending (takes effect at the next GPU reset).
    pub pending: Option<u64>,
    /// 1 when a remap failed (no spare rows left: replace the GPU).
    pub failure: Option<u64>,
}

/// Error counters of one NVLink link.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NvLinkReading {
    pub link: u32,
    /// Data-link transmit replays.
    pub replay: Option<u64>,
    /// Data-link recoveries.
    pub recovery: Option<u64>,
    /// Flow-control digit CRC errors.
    pub crc_flit: Option<u64>,
    /// Data CRC errors.
    pub crc_data: Option<u64>,
}

/// One MIG instance of a GPU with MIG mode on.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MigReading {
    pub gpu_instance_id: Option<u32>,
    pub compute_instance_id: Option<u32>,
    /// e.g. `1g.10gb`.
    pub profile: String,
    /// `MIG-xxxxxxxx-...`.
    pub uuid: String,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// Fake fixtures only: GPM of this GPU instance (see [`DeviceReading::gpm`]).
    pub gpm: Option<GpmReading>,
}

/// A process using the GPU.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessReading {
    pub pid: u32,
    pub memory_used_bytes: Option<u64>,
    /// SM (3D/compute) utilization of the process over the driver's last
    /// sample period (`nvmlDeviceGetProcessUtilization`), where NVML gives it.
    pub sm_utilization_percent: Option<f64>,
}

/// Normalises a PCI bus id to NVML's form `00000000:3B:00.0` (8-hex-digit
/// domain, upper-case hex, function). Accepts the kernel log's `0000:3b:00`,
/// NVML's `00000000:3B:00.0` and sysfs's `0000:3b:00.0`. `None` if it is not
/// a bus id.
pub fn normalize_pci_bus_id(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let raw = raw.strip_prefix("PCI:").unwrap_or(raw);
    let (rest, function) = match raw.rsplit_once('.') {
        Some((r, f)) => (r, f),
        None => (raw, "0"),
    };
    let mut parts = rest.split(':');
    let (domain, bus, device) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(d), Some(b), Some(dev), None) => (d, b, dev),
        (Some(b), Some(dev), None, None) => ("0", b, dev),
        _ => return None,
    };
    let hex = |s: &str, max_len: usize| -> Option<u32> {
        if s.is_empty() || s.len() > max_len {
            return None;
        }
        u32::from_str_radix(s, 16).ok()
    };
    let domain = hex(domain, 8)?;
    let bus = hex(bus, 2)?;
    let device = hex(device, 2)?;
    let function = hex(function, 1)?;
    Some(format!("{domain:08X}:{bus:02X}:{device:02X}.{function:X}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expect: Option<&str>) {
        assert_eq!(
            normalize_pci_bus_id(input).as_deref(),
            expect,
            "input {input:?}"
        );
    }

    #[test]
    fn normalizes_bus_ids() {
        check("0000:3b:00", Some("00000000:3B:00.0"));
        check("PCI:0000:3b:00", Some("00000000:3B:00.0"));
        check("00000000:3B:00.0", Some("00000000:3B:00.0"));
        check("0000:c1:00.1", Some("00000000:C1:00.1"));
        check("0001:1a:00", Some("00000001:1A:00.0"));
        check("3b:00", Some("00000000:3B:00.0"));
        check("", None);
        check("zz:00:00", None);
        check("0000:3b:00:00", None);
        check("0000:3b:00.12", None);
    }

    #[test]
    fn every_clock_event_reason_has_a_distinct_label() {
        let mut names: Vec<_> = ClockEventReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ClockEventReason::ALL.len());
    }
}
