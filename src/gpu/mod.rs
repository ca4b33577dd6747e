//! GPU backends (to be written): the `GpuBackend` trait and its readings.

pub mod xid;
