//! GPM (GPU Performance Monitoring) for the NVML backend: the metrics read
//! per window, MIG instances tried, and a window's two samples turned into
//! rates. Part of the one NVML door (`gpu/nvml.rs`).

use crate::gpu::nvml::*;

/// GPU instance ids tried for MIG GPM (NVML's are small: at most 7 instances,
/// ids up to 14 on current GPUs).
pub(super) const MAX_GPU_INSTANCE_ID: u32 = 15;

/// First samples of one GPU's GPM window: the whole GPU and its MIG instances.
pub(super) struct GpmFirst<'n> {
    pub(super) index: u32,
    pub(super) dev: Device<'n>,
    pub(super) whole: Option<(GpmSample<'n>, Instant)>,
    pub(super) mig: Vec<(u32, GpmSample<'n>, Instant)>,
}

/// Every GPM metric read per window, in the order [`gpm_reading`] expects.
pub(super) const GPM_METRICS: [GpmMetricId; 34] = [
    GpmMetricId::GraphicsUtil,
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DfmaTensorUtil,
    GpmMetricId::HmmaTensorUtil,
    GpmMetricId::ImmaTensorUtil,
    GpmMetricId::Fp64Util,
    GpmMetricId::Fp32Util,
    GpmMetricId::Fp16Util,
    GpmMetricId::IntegerUtil,
    GpmMetricId::DramBwUtil,
    GpmMetricId::PcieTxPerSec,
    GpmMetricId::PcieRxPerSec,
    GpmMetricId::NvlinkTotalTxPerSec,
    GpmMetricId::NvlinkTotalRxPerSec,
    GpmMetricId::Nvdec0Util,
    GpmMetricId::Nvdec1Util,
    GpmMetricId::Nvdec2Util,
    GpmMetricId::Nvdec3Util,
    GpmMetricId::Nvdec4Util,
    GpmMetricId::Nvdec5Util,
    GpmMetricId::Nvdec6Util,
    GpmMetricId::Nvdec7Util,
    GpmMetricId::Nvjpg0Util,
    GpmMetricId::Nvjpg1Util,
    GpmMetricId::Nvjpg2Util,
    GpmMetricId::Nvjpg3Util,
    GpmMetricId::Nvjpg4Util,
    GpmMetricId::Nvjpg5Util,
    GpmMetricId::Nvjpg6Util,
    GpmMetricId::Nvjpg7Util,
    GpmMetricId::Nvofa0Util,
    GpmMetricId::Nvofa1Util,
];

/// Bytes per unit of a GPM rate, from NVML's unit string (`MiB/sec` in
/// NVML's headers for PCIe and NVLink; other spellings just in case).
pub(super) fn bytes_per_unit(unit: &str) -> f64 {
    let u = unit.trim().to_ascii_lowercase();
    if u.starts_with("mib") {
        1024.0 * 1024.0
    } else if u.starts_with("kib") {
        1024.0
    } else if u.starts_with("gib") {
        1024.0 * 1024.0 * 1024.0
    } else if u.starts_with("mb") {
        1e6
    } else if u.starts_with("kb") {
        1e3
    } else if u.starts_with("gb") {
        1e9
    } else if u.starts_with('b') {
        1.0
    } else {
        1024.0 * 1024.0
    }
}

/// Turns `nvmlGpmMetricsGet`'s answers (in [`GPM_METRICS`] order) into a
/// reading; a metric NVML could not compute stays `None`.
pub(super) fn gpm_reading(
    results: &[Result<GpmMetricResult, NvmlError>],
    window_seconds: f64,
) -> GpmReading {
    let pct = |i: usize| -> Option<f64> {
        match results.get(i) {
            Some(Ok(r)) if r.value.is_finite() && r.value >= 0.0 => Some(r.value),
            _ => None,
        }
    };
    let rate = |i: usize| -> Option<f64> {
        match results.get(i) {
            Some(Ok(r)) if r.value.is_finite() && r.value >= 0.0 => {
                Some(r.value * bytes_per_unit(&r.metric_info.unit))
            }
            _ => None,
        }
    };
    // Engine instances: as many as answer, in order.
    let engines = |from: usize, n: usize| -> Vec<f64> { (from..from + n).map_while(pct).collect() };
    GpmReading {
        window_seconds: Some(window_seconds),
        graphics_engine_active_percent: pct(0),
        sm_active_percent: pct(1),
        sm_occupancy_percent: pct(2),
        tensor_active_percent: pct(3),
        tensor_dfma_active_percent: pct(4),
        tensor_hmma_active_percent: pct(5),
        tensor_imma_active_percent: pct(6),
        fp64_active_percent: pct(7),
        fp32_active_percent: pct(8),
        fp16_active_percent: pct(9),
        integer_active_percent: pct(10),
        dram_active_percent: pct(11),
        pcie_tx_bytes_per_second: rate(12),
        pcie_rx_bytes_per_second: rate(13),
        nvlink_tx_bytes_per_second: rate(14),
        nvlink_rx_bytes_per_second: rate(15),
        nvdec_active_percent: engines(16, 8),
        nvjpg_active_percent: engines(24, 8),
        nvofa_active_percent: engines(32, 2),
    }
}
