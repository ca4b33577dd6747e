//! The cpu collector (to be written).

use std::sync::Arc;

use crate::collector::{Collector, Context, Error, Sink};

pub struct CpuCollector;

impl CpuCollector {
    pub fn new(_ctx: &Arc<Context>) -> CpuCollector {
        CpuCollector
    }
}

impl Collector for CpuCollector {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
        Ok(())
    }
}
