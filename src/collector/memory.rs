//! The memory collector (to be written).

use std::sync::Arc;

use crate::collector::{Collector, Context, Error, Sink};

pub struct MemoryCollector;

impl MemoryCollector {
    pub fn new(_ctx: &Arc<Context>) -> MemoryCollector {
        MemoryCollector
    }
}

impl Collector for MemoryCollector {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
        Ok(())
    }
}
