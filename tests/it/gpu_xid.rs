//! XIDs through the kernel-log store: the fixture of real-world lines (with
//! and without pid/name, multi-line 79) counted per GPU and code, and the
//! same XID from NVML and the kernel log counted once.

use std::collections::BTreeMap;
use std::path::Path;

use gpuops::collector::kmsg::{self, EventKind, KernelEvent, XidSource};
use gpuops::collector::KernelEvents;
use gpuops::gpu::xid;
use gpuops::host::HostRoots;

fn counts(pairs: &[(&str, u32, u64)]) -> BTreeMap<(String, u32), u64> {
    pairs
        .iter()
        .map(|(b, x, n)| ((b.to_string(), *x), *n))
        .collect()
}

#[test]
fn kernel_log_fixture_is_counted_per_gpu_and_code() {
    let roots = HostRoots {
        procfs: Path::new("/nonexistent").into(),
        kmsg: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu/kmsg-xid.txt"),
        ..HostRoots::default()
    };
    let events = KernelEvents::new();
    kmsg::read_once(&roots, &events);
    assert_eq!(
        events.xids(),
        counts(&[
            ("00000000:3A:00.0", 13, 2),
            ("00000000:3A:00.0", 43, 1),
            ("00000000:5D:00.0", 48, 1),
            ("00000000:5D:00.0", 63, 1),
            ("00000000:C1:00.0", 79, 1),
            ("00000000:C1:00.0", 154, 1),
        ])
    );
    // The multi-line 79's follow-up lines are not events; every XID event
    // carries its catalogue entry.
    let all = events.since(0.0);
    assert_eq!(all.len(), 7);
    for e in &all {
        match &e.kind {
            EventKind::Xid { xid, info, .. } => {
                assert_eq!(info.map(|i| i.code), Some(*xid), "{e:?}")
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
}

fn nvml_event(bus: &str, code: u32, t: f64) -> KernelEvent {
    KernelEvent {
        timestamp: t,
        counted: true,
        kind: xid::event(bus.into(), code, None, None, XidSource::Nvml),
        message: format!("NVML critical XID event: Xid {code} on {bus}"),
    }
}

#[test]
fn same_xid_from_nvml_and_kernel_log_counts_once() {
    let ev = KernelEvents::new();
    let boot = 1_000.0;
    // Kernel log first (t = 1005), NVML a second later.
    ev.ingest_record(
        "4,1,5000000,-;NVRM: Xid (PCI:0000:5d:00): 48, pid=41003, name=python, An uncorrectable double bit error (DBE) has been detected",
        boot,
        true,
    );
    ev.record(nvml_event("00000000:5D:00.0", 48, 1006.0));
    assert_eq!(ev.xids(), counts(&[("00000000:5D:00.0", 48, 1)]));
    // NVML first, then the kernel log.
    ev.record(nvml_event("00000000:5D:00.0", 94, 1100.0));
    ev.ingest_record(
        "4,2,100500000,-;NVRM: Xid (PCI:0000:5d:00): 94, pid=41003, name=python, Contained: SM (0x1). RST: No, D-RST: No",
        boot,
        true,
    );
    assert_eq!(
        ev.xids(),
        counts(&[("00000000:5D:00.0", 48, 1), ("00000000:5D:00.0", 94, 1)])
    );
    // Another GPU, or the same code much later, is a new event.
    ev.record(nvml_event("00000000:9A:00.0", 48, 1006.5));
    ev.record(nvml_event("00000000:5D:00.0", 48, 1500.0));
    assert_eq!(
        ev.xids(),
        counts(&[
            ("00000000:5D:00.0", 48, 2),
            ("00000000:5D:00.0", 94, 1),
            ("00000000:9A:00.0", 48, 1),
        ])
    );
    // NVML misses 79: the kernel log alone counts it.
    ev.ingest_record(
        "4,3,200000000,-;NVRM: Xid (PCI:0000:5d:00): 79, GPU has fallen off the bus.",
        boot,
        true,
    );
    assert_eq!(
        ev.xids().get(&("00000000:5D:00.0".to_string(), 79)),
        Some(&1)
    );
}
