//! The XID catalogue and kernel-log XID parsing (to be written).

/// Recognises an `NVRM: Xid (PCI:dddd:bb:dd): N, ...` kernel message.
pub fn parse_kmsg(_message: &str) -> Option<crate::collector::kmsg::EventKind> {
    None
}
