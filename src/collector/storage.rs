//! The storage collector (to be written).

use std::sync::Arc;

use crate::collector::{Collector, Context, Error, Sink};

pub struct StorageCollector;

impl StorageCollector {
    pub fn new(_ctx: &Arc<Context>) -> StorageCollector {
        StorageCollector
    }
}

impl Collector for StorageCollector {
    fn name(&self) -> &'static str {
        "storage"
    }

    fn collect(&self, _ctx: &Context, _sink: &mut Sink) -> Result<(), Error> {
        Ok(())
    }
}

/// Recognises a block-layer "I/O error, dev X" kernel message.
pub fn parse_kmsg(_message: &str) -> Option<crate::collector::kmsg::EventKind> {
    None
}
