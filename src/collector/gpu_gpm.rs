//! GPM (GPU Performance Monitoring) for the GPU collector: the background
//! sampler that measures one window every `[gpu] gpm_interval_secs`, and the
//! rendering of a window's averages (`gpu_sm_active_percent`, ...) and of
//! their opt-in `DCGM_FI_PROF_*` aliases.
//!
//! The sampler calls only [`GpuBackend::gpm_measure`] on a thread of its own;
//! a window older than [`GpmLatest::fresh`] allows is not exported (never a
//! stale or zero value). This module must not call NVML or read the host.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::collector::Sink;
use crate::gpu::{GpmMeasurement, GpmReading, GpuBackend};

/// The window `gpuops collect --once` measures (no background sampler there).
pub const ONCE_WINDOW: Duration = Duration::from_millis(100);

/// The latest GPM window, shared by the sampler and the scrapes.
#[derive(Default)]
pub struct GpmLatest {
    measured: Mutex<Option<(Instant, Arc<Vec<GpmMeasurement>>)>>,
}

impl GpmLatest {
    pub fn store(&self, m: Vec<GpmMeasurement>) {
        *self.measured.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), Arc::new(m)));
    }

    /// The last window and whether it is recent enough (measured within
    /// `max_age`) for its readings to be exported.
    pub fn get(&self, max_age: Duration) -> Option<(Arc<Vec<GpmMeasurement>>, bool)> {
        let g = self.measured.lock().unwrap_or_else(PoisonError::into_inner);
        g.as_ref()
            .map(|(at, m)| (m.clone(), at.elapsed() <= max_age))
    }
}

/// How old a window may be and still be exported: two intervals and a window
/// (one missed round is tolerated), at least 5 s.
pub fn max_age(interval: Duration, window: Duration) -> Duration {
    (interval * 2 + window).max(Duration::from_secs(5))
}

/// Starts the thread that measures a window every `interval`. It holds the
/// backend; a `gpm_measure` that hangs holds this one thread and the
/// readings go stale (and are then left out).
pub fn spawn_sampler(
    backend: Arc<dyn GpuBackend>,
    latest: Arc<GpmLatest>,
    interval: Duration,
    window: Duration,
) {
    let spawned = std::thread::Builder::new()
        .name("gpuops-gpm".into())
        .spawn(move || {
            let mut failing = false;
            loop {
                let started = Instant::now();
                match backend.gpm_measure(window) {
                    Ok(m) => {
                        if failing {
                            tracing::info!("gpm measurement works again");
                            failing = false;
                        }
                        latest.store(m);
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "gpm measurement failed, gpm series left out");
                            failing = true;
                        }
                    }
                }
                let rest = interval.saturating_sub(started.elapsed());
                std::thread::sleep(rest.max(Duration::from_millis(100)));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the gpm sampler, no gpm metrics");
    }
}

/// `gpu_gpm_supported` and, when `reading` is given, the window's averages,
/// each with `labels` (a GPU's, or a MIG instance's).
pub fn render(labels: &[(&str, &str)], reading: &GpmReading, sink: &mut Sink) {
    let mut g = |name: &str, help: &str, extra: &[(&str, &str)], v: Option<f64>| {
        if let Some(v) = v {
            let mut l: Vec<(&str, &str)> = Vec::with_capacity(labels.len() + extra.len());
            l.extend_from_slice(labels);
            l.extend_from_slice(extra);
            sink.gauge(name, help, &l, v);
        }
    };
    g(
        "gpu_gpm_window_seconds",
        "Length of the GPM window the gpu_*_active_percent, gpu_sm_occupancy_percent, gpu_dram_active_percent and gpu_*_bytes_per_second averages are over (time between the two nvmlGpmSampleGet samples).",
        &[],
        reading.window_seconds,
    );
    g(
        "gpu_graphics_engine_active_percent",
        "Percent of time the graphics/compute engine was busy over the GPM window (NVML GPM NVML_GPM_METRIC_GRAPHICS_UTIL; DCGM_FI_PROF_GR_ENGINE_ACTIVE).",
        &[],
        reading.graphics_engine_active_percent,
    );
    g(
        "gpu_sm_active_percent",
        "Percent of time an SM had at least one warp resident, averaged over all SMs, over the GPM window (NVML GPM NVML_GPM_METRIC_SM_UTIL; DCGM_FI_PROF_SM_ACTIVE). Unlike gpu_utilization_percent, a kernel on one SM does not count as 100.",
        &[],
        reading.sm_active_percent,
    );
    g(
        "gpu_sm_occupancy_percent",
        "Resident warps as a percent of the maximum an SM can hold, averaged over all SMs, over the GPM window (NVML GPM NVML_GPM_METRIC_SM_OCCUPANCY; DCGM_FI_PROF_SM_OCCUPANCY).",
        &[],
        reading.sm_occupancy_percent,
    );
    g(
        "gpu_tensor_active_percent",
        "Percent of time any tensor pipe was busy over the GPM window (NVML GPM NVML_GPM_METRIC_ANY_TENSOR_UTIL; DCGM_FI_PROF_PIPE_TENSOR_ACTIVE).",
        &[],
        reading.tensor_active_percent,
    );
    for (pipe, v) in [
        ("tensor_dfma", reading.tensor_dfma_active_percent),
        ("tensor_hmma", reading.tensor_hmma_active_percent),
        ("tensor_imma", reading.tensor_imma_active_percent),
        ("fp64", reading.fp64_active_percent),
        ("fp32", reading.fp32_active_percent),
        ("fp16", reading.fp16_active_percent),
        ("integer", reading.integer_active_percent),
    ] {
        g(
            "gpu_pipe_active_percent",
            "Percent of time a pipe was busy over the GPM window, by pipe: tensor_dfma (FP64 tensor), tensor_hmma (FP16/BF16/TF32 tensor), tensor_imma (integer tensor), fp64, fp32, fp16, integer (NVML GPM NVML_GPM_METRIC_{DFMA,HMMA,IMMA}_TENSOR_UTIL, _FP64_UTIL, _FP32_UTIL, _FP16_UTIL, _INTEGER_UTIL; DCGM_FI_PROF_PIPE_*_ACTIVE).",
            &[("pipe", pipe)],
            v,
        );
    }
    g(
        "gpu_dram_active_percent",
        "Device memory bandwidth used as a percent of the peak over the GPM window (NVML GPM NVML_GPM_METRIC_DRAM_BW_UTIL; DCGM_FI_PROF_DRAM_ACTIVE).",
        &[],
        reading.dram_active_percent,
    );
    for (dir, v) in [
        ("tx", reading.pcie_tx_bytes_per_second),
        ("rx", reading.pcie_rx_bytes_per_second),
    ] {
        g(
            "gpu_pcie_bytes_per_second",
            "PCIe traffic of the GPU over the GPM window, tx (from the GPU) and rx (to it) (NVML GPM NVML_GPM_METRIC_PCIE_{TX,RX}_PER_SEC; DCGM_FI_PROF_PCIE_{TX,RX}_BYTES).",
            &[("direction", dir)],
            v,
        );
    }
    for (dir, v) in [
        ("tx", reading.nvlink_tx_bytes_per_second),
        ("rx", reading.nvlink_rx_bytes_per_second),
    ] {
        g(
            "gpu_nvlink_bytes_per_second",
            "NVLink traffic of the GPU over all links over the GPM window, tx and rx (NVML GPM NVML_GPM_METRIC_NVLINK_TOTAL_{TX,RX}_PER_SEC; DCGM_FI_PROF_NVLINK_{TX,RX}_BYTES).",
            &[("direction", dir)],
            v,
        );
    }
    for (engine, values) in [
        ("nvdec", &reading.nvdec_active_percent),
        ("nvjpg", &reading.nvjpg_active_percent),
        ("nvofa", &reading.nvofa_active_percent),
    ] {
        for (i, v) in values.iter().enumerate() {
            let instance = i.to_string();
            g(
                "gpu_media_engine_active_percent",
                "Percent of time a media engine instance was busy over the GPM window: nvdec (video decoder), nvjpg (JPEG decoder), nvofa (optical flow) (NVML GPM NVML_GPM_METRIC_{NVDEC,NVJPG,NVOFA}_<i>_UTIL; DCGM_FI_PROF_{NVDEC,NVJPG,NVOFA}<i>_ACTIVE).",
                &[("engine", engine), ("instance", &instance)],
                Some(*v),
            );
        }
    }
}

/// dcgm-exporter's `DCGM_FI_PROF_*` names for a GPM window: ratios 0..1 and
/// bytes per second, as DCGM's profiling module reports them.
pub fn render_dcgm(labels: &[(&str, &str)], r: &GpmReading, sink: &mut Sink) {
    // Rounded to 6 places, so 96.2 % reads 0.962 as DCGM shows it.
    let ratio = |v: Option<f64>| v.map(|p| (p * 1e4).round() / 1e6);
    let fields: [(&str, &str, Option<f64>); 16] = [
        (
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
            "Ratio of time the graphics engine is active.",
            ratio(r.graphics_engine_active_percent),
        ),
        (
            "DCGM_FI_PROF_SM_ACTIVE",
            "The ratio of cycles an SM has at least 1 warp assigned.",
            ratio(r.sm_active_percent),
        ),
        (
            "DCGM_FI_PROF_SM_OCCUPANCY",
            "The ratio of number of warps resident on an SM.",
            ratio(r.sm_occupancy_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
            "Ratio of cycles the tensor (HMMA) pipe is active.",
            ratio(r.tensor_active_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_TENSOR_DFMA_ACTIVE",
            "Ratio of cycles the tensor (DFMA) pipe is active.",
            ratio(r.tensor_dfma_active_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_TENSOR_HMMA_ACTIVE",
            "Ratio of cycles the tensor (HMMA) pipe is active.",
            ratio(r.tensor_hmma_active_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_TENSOR_IMMA_ACTIVE",
            "Ratio of cycles the tensor (IMMA) pipe is active.",
            ratio(r.tensor_imma_active_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_FP64_ACTIVE",
            "Ratio of cycles the fp64 pipes are active.",
            ratio(r.fp64_active_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
            "Ratio of cycles the fp32 pipes are active.",
            ratio(r.fp32_active_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_FP16_ACTIVE",
            "Ratio of cycles the fp16 pipes are active.",
            ratio(r.fp16_active_percent),
        ),
        (
            "DCGM_FI_PROF_PIPE_INT_ACTIVE",
            "Ratio of cycles the integer pipe is active.",
            ratio(r.integer_active_percent),
        ),
        (
            "DCGM_FI_PROF_DRAM_ACTIVE",
            "Ratio of cycles the device memory interface is active sending or receiving data.",
            ratio(r.dram_active_percent),
        ),
        (
            "DCGM_FI_PROF_PCIE_TX_BYTES",
            "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
            r.pcie_tx_bytes_per_second,
        ),
        (
            "DCGM_FI_PROF_PCIE_RX_BYTES",
            "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
            r.pcie_rx_bytes_per_second,
        ),
        (
            "DCGM_FI_PROF_NVLINK_TX_BYTES",
            "The rate of data transmitted over NVLink, not including protocol headers, in bytes per second.",
            r.nvlink_tx_bytes_per_second,
        ),
        (
            "DCGM_FI_PROF_NVLINK_RX_BYTES",
            "The rate of data received over NVLink, not including protocol headers, in bytes per second.",
            r.nvlink_rx_bytes_per_second,
        ),
    ];
    for (name, help, v) in fields {
        if let Some(v) = v {
            sink.gauge(name, help, labels, v);
        }
    }
    for (prefix, what, values) in [
        ("NVDEC", "NVDEC", &r.nvdec_active_percent),
        ("NVJPG", "NVJPG", &r.nvjpg_active_percent),
        ("NVOFA", "NVOFA", &r.nvofa_active_percent),
    ] {
        for (i, v) in values.iter().enumerate() {
            sink.gauge(
                &format!("DCGM_FI_PROF_{prefix}{i}_ACTIVE"),
                &format!("Ratio of time the {what}{i} engine is active."),
                labels,
                (v * 1e4).round() / 1e6,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_exported_while_fresh_only() {
        let latest = GpmLatest::default();
        assert!(latest.get(Duration::from_secs(1)).is_none());
        latest.store(vec![]);
        assert!(latest.get(Duration::from_secs(1)).unwrap().1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!latest.get(Duration::from_millis(10)).unwrap().1);
        assert_eq!(
            max_age(Duration::from_secs(15), Duration::from_secs(1)),
            Duration::from_secs(31)
        );
        assert_eq!(
            max_age(Duration::from_secs(1), Duration::from_secs(1)),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn absent_values_are_left_out_and_ratios_are_fractions() {
        let r = GpmReading {
            window_seconds: Some(1.0),
            sm_active_percent: Some(96.0),
            nvdec_active_percent: vec![0.0, 12.5],
            ..GpmReading::default()
        };
        let mut sink = Sink::new();
        render(&[("gpu", "0")], &r, &mut sink);
        render_dcgm(&[("gpu", "0")], &r, &mut sink);
        let text = sink.into_text();
        assert!(
            text.contains("gpu_sm_active_percent{gpu=\"0\"} 96\n"),
            "{text}"
        );
        assert!(text.contains(
            "gpu_media_engine_active_percent{gpu=\"0\",engine=\"nvdec\",instance=\"1\"} 12.5\n"
        ));
        assert!(text.contains("DCGM_FI_PROF_SM_ACTIVE{gpu=\"0\"} 0.96\n"));
        assert!(text.contains("DCGM_FI_PROF_NVDEC1_ACTIVE{gpu=\"0\"} 0.125\n"));
        assert!(!text.contains("\ngpu_sm_occupancy_percent{"));
        assert!(!text.contains("\ngpu_pipe_active_percent{"));
    }
}
