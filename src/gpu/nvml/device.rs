//! Reading one GPU through NVML for the NVML backend: the fast values a
//! scrape serves ([`read_device`]) and the slow ones read in the background
//! ([`read_slow`]). Part of the one NVML door (`gpu/nvml.rs`).

use crate::gpu::nvml::*;

/// Whether an error means the GPU itself is gone rather than one unsupported call.
pub(super) fn is_lost(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::GpuLost | NvmlError::ResetRequired | NvmlError::Timeout
    )
}

/// Values of a GPU that do not change while it keeps its uuid.
#[derive(Clone)]
pub(super) struct StaticInfo {
    uuid: String,
    name: String,
    pci_bus_id: String,
    minor_number: Option<u32>,
    vbios_version: Option<String>,
    supported_throttle: Option<ThrottleReasons>,
    fans: Option<u32>,
}

/// Opens GPU `index` and reads its UUID, identity first: an error here
/// (an Unknown one included) means the GPU is gone; `Err` says why.
fn open_device(nvml: &Nvml, index: u32) -> Result<(Device<'_>, String), String> {
    let dev = nvml
        .device_by_index(index)
        .map_err(|e| format!("nvml cannot open the gpu: {e}"))?;
    let uuid = dev
        .uuid()
        .map_err(|e| format!("nvml cannot read the gpu's uuid: {e}"))?;
    Ok((dev, uuid))
}

/// Reads one GPU. Unsupported values stay `None`; a lost GPU returns early.
pub(super) fn read_device(
    nvml: &Nvml,
    index: u32,
    processes: bool,
    statics: &Mutex<HashMap<u32, StaticInfo>>,
) -> DeviceReading {
    let mut r = DeviceReading {
        index,
        ..DeviceReading::default()
    };
    let dev = match open_device(nvml, index) {
        Ok((d, uuid)) => {
            r.uuid = uuid;
            d
        }
        Err(lost) => {
            r.lost = Some(lost);
            return r;
        }
    };
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
    // One batched field-value call: PCIe replays and memory temperature.
    // The slow values (energy, ECC totals, remapped rows, retired pages,
    // power limit) are read by `read_slow`, in the background.
    read_fast_fields(&dev, &mut r);
    if let Some(m) = get!(dev.memory_info()) {
        r.memory_used_bytes = Some(m.used);
        r.memory_total_bytes = Some(m.total);
    }
    r.temperature_celsius = get!(dev.temperature(TemperatureSensor::Gpu)).map(f64::from);
    r.power_watts = get!(dev.power_usage()).map(|mw| f64::from(mw) / 1000.0);
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
pub(super) fn reasons(bits: ThrottleReasons) -> Vec<ClockEventReason> {
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

/// The fast values read as NVML field values, in one call: PCIe replays
/// (also available with their own call, read below if this fails) and the
/// memory temperature (only available so).
fn read_fast_fields(dev: &Device<'_>, r: &mut DeviceReading) {
    let ids = [
        field_id::NVML_FI_DEV_PCIE_REPLAY_COUNTER,
        field_id::NVML_FI_DEV_MEMORY_TEMP,
    ];
    for (id, v) in field_values(dev, &ids) {
        match id {
            field_id::NVML_FI_DEV_PCIE_REPLAY_COUNTER => r.pcie_replay_total = Some(v),
            field_id::NVML_FI_DEV_MEMORY_TEMP if v > 0 => {
                r.memory_temperature_celsius = Some(v as f64)
            }
            _ => {}
        }
    }
}

/// The values of `ids` that could be read, as unsigned integers.
fn field_values(dev: &Device<'_>, ids: &[u32]) -> Vec<(u32, u64)> {
    let request: Vec<FieldId> = ids.iter().map(|i| FieldId(*i)).collect();
    let Ok(samples) = dev.field_values_for(&request) else {
        return Vec::new();
    };
    ids.iter()
        .zip(samples)
        .filter_map(|(id, sample)| {
            let v = sample.ok()?.value.ok()?;
            Some((*id, sample_u64(&v)?))
        })
        .collect()
}

/// Reads one GPU's slow values: one batched field-value call (energy, about
/// 3 ms on an H200; the four ECC totals; row remapping; retired pages), the
/// calls of their own for what it could not give, and the enforced power
/// limit. Unsupported values stay `None`; a GPU that is gone is `lost`.
pub(super) fn read_slow(nvml: &Nvml, index: u32) -> SlowReading {
    let mut s = SlowReading {
        index,
        ..SlowReading::default()
    };
    let dev = match open_device(nvml, index) {
        Ok((d, uuid)) => {
            s.uuid = uuid;
            d
        }
        Err(lost) => {
            s.lost = Some(lost);
            return s;
        }
    };
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
    let r = &mut s.values;
    let ids = [
        field_id::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
        field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
        field_id::NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
        field_id::NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
        field_id::NVML_FI_DEV_REMAPPED_COR,
        field_id::NVML_FI_DEV_REMAPPED_UNC,
        field_id::NVML_FI_DEV_REMAPPED_PENDING,
        field_id::NVML_FI_DEV_REMAPPED_FAILURE,
        field_id::NVML_FI_DEV_RETIRED_SBE,
        field_id::NVML_FI_DEV_RETIRED_DBE,
    ];
    for (id, v) in field_values(&dev, &ids) {
        match id {
            field_id::NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION => {
                r.energy_joules = Some(v as f64 / 1000.0)
            }
            field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL => r.ecc.corrected_volatile = Some(v),
            field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL => r.ecc.uncorrected_volatile = Some(v),
            field_id::NVML_FI_DEV_ECC_SBE_AGG_TOTAL => r.ecc.corrected_aggregate = Some(v),
            field_id::NVML_FI_DEV_ECC_DBE_AGG_TOTAL => r.ecc.uncorrected_aggregate = Some(v),
            field_id::NVML_FI_DEV_REMAPPED_COR => r.remapped_rows.correctable = Some(v),
            field_id::NVML_FI_DEV_REMAPPED_UNC => r.remapped_rows.uncorrectable = Some(v),
            field_id::NVML_FI_DEV_REMAPPED_PENDING => r.remapped_rows.pending = Some(v),
            field_id::NVML_FI_DEV_REMAPPED_FAILURE => r.remapped_rows.failure = Some(v),
            field_id::NVML_FI_DEV_RETIRED_SBE => r.retired_pages.single_bit_ecc = Some(v),
            field_id::NVML_FI_DEV_RETIRED_DBE => r.retired_pages.double_bit_ecc = Some(v),
            _ => {}
        }
    }
    if r.energy_joules.is_none() {
        r.energy_joules = get!(dev.total_energy_consumption()).map(|mj| mj as f64 / 1000.0);
    }
    r.power_limit_watts = get!(dev.enforced_power_limit()).map(|mw| f64::from(mw) / 1000.0);
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
    if gone.is_some() {
        s.values = SlowValues::default();
        s.lost = gone;
    }
    s
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
