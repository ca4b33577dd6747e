//! The oom collector (to be written).

use std::sync::Arc;

use crate::collector::{Collector, Context, Error, Sink};

pub struct OomCollector;

impl OomCollector {
    pub fn new(_ctx: &Arc<Context>) -> OomCollector {
        OomCollector
    }
}

impl Collector for OomCollector {
    fn name(&self) -> &'static str {
        "oom"
    }

    fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
        Ok(())
    }
}

/// Recognises an OOM-kill kernel message.
pub fn parse_kmsg(_message: &str) -> Option<crate::collector::kmsg::EventKind> {
    None
}
