//! The GPU collector (to be written): renders a `GpuBackend`'s readings.

use std::sync::Arc;

use crate::collector::{Collector, Context, Error, Sink};

pub struct GpuCollector;

impl GpuCollector {
    /// `None` when the GPU collector is disabled in config.
    pub fn new(_ctx: &Arc<Context>) -> Option<GpuCollector> {
        Some(GpuCollector)
    }

    /// Words for `gpuops_build_info{gpu_backend}`: `nvml`, `fake`, `none`.
    pub fn backend_kind(&self) -> &'static str {
        "none"
    }
}

impl Collector for GpuCollector {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
        Err(Error::Unavailable("gpu collector not written yet".into()))
    }
}
