//! The GPU collector's rendering: one device's readings (and its MIG
//! instances' GPM metrics, XID counters, the DCGM-compatible series) written
//! into the [`Sink`]. Reading, caching and processes are in `gpu.rs`.

use std::collections::BTreeMap;

use crate::collector::gpu::*;
use crate::collector::Sink;
use crate::gpu::{DeviceReading, GpmMeasurement, SlowValues, Snapshot};

/// `base` plus `extra` labels, on the stack (a scrape builds hundreds of label
/// sets; at most 8 labels, more are dropped).
pub(super) struct Labels<'a> {
    pairs: [(&'a str, &'a str); 8],
    len: usize,
}

impl<'a> std::ops::Deref for Labels<'a> {
    type Target = [(&'a str, &'a str)];
    fn deref(&self) -> &Self::Target {
        &self.pairs[..self.len]
    }
}

pub(super) fn with<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Labels<'a> {
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

/// One GPU's series: the fast values of `d`, the slow ones of `slow` (the
/// background reading; absent: their series are left out).
pub(super) fn render_device(
    snap: &Snapshot,
    d: &DeviceReading,
    slow: &SlowValues,
    base: &[(&str, &str)],
    sink: &mut Sink,
) {
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
        slow.power_limit_watts,
    );
    if let Some(j) = slow.energy_joules {
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
        ("corrected", "volatile", slow.ecc.corrected_volatile),
        ("uncorrected", "volatile", slow.ecc.uncorrected_volatile),
        ("corrected", "aggregate", slow.ecc.corrected_aggregate),
        ("uncorrected", "aggregate", slow.ecc.uncorrected_aggregate),
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
        ("single_bit_ecc", slow.retired_pages.single_bit_ecc),
        ("double_bit_ecc", slow.retired_pages.double_bit_ecc),
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
        ("correctable", slow.remapped_rows.correctable),
        ("uncorrectable", slow.remapped_rows.uncorrectable),
        ("pending", slow.remapped_rows.pending),
        ("failure", slow.remapped_rows.failure),
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
            "How long the backend took to read this GPU's fast values in the last collection (the scrape path; the slow values are read apart, see gpuops_gpu_slow_read_duration_seconds).",
            base,
            s,
        );
    }
}

/// How old the slow values served for a GPU are, and how long reading them
/// took.
pub(super) fn render_slow_age(
    base: &[(&str, &str)],
    age_seconds: f64,
    read_seconds: Option<f64>,
    sink: &mut Sink,
) {
    sink.gauge(
        "gpuops_gpu_slow_read_age_seconds",
        "Age of the slow GPU values served (gpu_energy_joules_total, gpu_power_limit_watts, gpu_ecc_errors_total, gpu_retired_pages, gpu_remapped_rows and their DCGM names): they are read in the background every [gpu] slow_interval_secs, not on every scrape.",
        base,
        age_seconds,
    );
    if let Some(s) = read_seconds {
        sink.gauge(
            "gpuops_gpu_slow_read_duration_seconds",
            "How long the backend took to read the GPU's slow values in the background (not part of any scrape).",
            base,
            s,
        );
    }
}

/// GPM of a GPU's MIG instances, with their labels.
pub(super) fn render_mig_gpm(
    d: &DeviceReading,
    m: &GpmMeasurement,
    base: &[(&str, &str)],
    sink: &mut Sink,
) {
    for (gi, r) in &m.mig {
        // NVML's MIG readings lack instance ids: then the GPU instance id
        // alone labels the series.
        let mig = d.mig.iter().find(|x| x.gpu_instance_id == Some(*gi));
        let gi = gi.to_string();
        let ci = mig.and_then(|x| x.compute_instance_id.map(|v| v.to_string()));
        let mut labels = base.to_vec();
        labels.push(("gpu_instance_id", &gi));
        if let Some(ci) = &ci {
            labels.push(("compute_instance_id", ci));
        }
        if let Some(mig) = mig {
            labels.push(("mig_profile", &mig.profile));
        }
        gpu_gpm::render(&labels, r, sink);
    }
}

/// `gpu_xid_errors_total{xid}`: with the GPU's labels when a known GPU has the
/// bus id, else labelled by `pci_bus_id` only.
pub(super) fn render_xids(snap: &Snapshot, xids: &BTreeMap<(String, u32), u64>, sink: &mut Sink) {
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

/// dcgm-exporter's label values for a GPU.
pub(super) struct DcgmLabels<'a> {
    idx: String,
    device: String,
    d: &'a DeviceReading,
}

impl<'a> DcgmLabels<'a> {
    pub(super) fn as_pairs(&self) -> [(&str, &str); 5] {
        [
            ("gpu", &self.idx),
            ("UUID", &self.d.uuid),
            ("device", &self.device),
            ("modelName", &self.d.name),
            ("pci_bus_id", &self.d.pci_bus_id),
        ]
    }
}

pub(super) fn dcgm_labels(d: &DeviceReading) -> DcgmLabels<'_> {
    DcgmLabels {
        idx: d.index.to_string(),
        device: format!("nvidia{}", d.minor_number.unwrap_or(d.index)),
        d,
    }
}

/// dcgm-exporter's names, units and labels for the common fields
/// (`dcgm_compat = true`), so dashboards built for it keep working. All are
/// gauges: dcgm-exporter's counters lack the `_total` suffix Prometheus wants.
pub(super) fn render_dcgm(
    ctx: &Context,
    d: &DeviceReading,
    slow: &SlowValues,
    xids: &BTreeMap<(String, u32), u64>,
    sink: &mut Sink,
) {
    let owned = dcgm_labels(d);
    let labels = owned.as_pairs();
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
            slow.power_limit_watts,
        ),
        (
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
            "Total energy consumption since boot (in mJ).",
            slow.energy_joules.map(|j| j * 1000.0),
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
            slow.ecc.corrected_volatile.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "Total number of double-bit volatile ECC errors.",
            slow.ecc.uncorrected_volatile.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
            "Total number of single-bit persistent ECC errors.",
            slow.ecc.corrected_aggregate.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
            "Total number of double-bit persistent ECC errors.",
            slow.ecc.uncorrected_aggregate.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for correctable errors.",
            slow.remapped_rows.correctable.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
            "Number of remapped rows for uncorrectable errors.",
            slow.remapped_rows.uncorrectable.map(|v| v as f64),
        ),
        (
            "DCGM_FI_DEV_ROW_REMAP_FAILURE",
            "Whether remapping of rows has failed.",
            slow.remapped_rows.failure.map(|v| v as f64),
        ),
    ];
    for (name, help, v) in fields {
        if let Some(v) = v {
            sink.gauge(name, help, &labels, v);
        }
    }
}
