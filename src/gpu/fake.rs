//! The fake GPU backend: replays a JSON fixture (docs/gpu.md describes the
//! format) for tests, demos and benchmarks on machines without GPUs.
//!
//! Its data is labelled fake: the agent warns at start and
//! `gpuops_build_info{gpu_backend="fake"}`. A fixture may ask for an injected
//! delay (`delay_ms`) to simulate a hung NVML, and for a per-call latency
//! (`call_latency_us`, or [`FakeBackend::set_call_latency`]) to give
//! benchmarks NVML's timing: then every GPU is read on its own thread with a
//! per-GPU deadline and single flight, as the NVML backend does. GPM readings
//! (`devices[].gpm`) are replayed by [`GpuBackend::gpm_measure`]. It models
//! NVML's release and re-init ([`GpuBackend::release`], `reinit`): while
//! released every read fails and is counted, so tests can see whether the
//! collector left it alone. Like the NVML backend it splits each GPU's values:
//! `snapshot` gives the fast ones, [`GpuBackend::slow_snapshot`] the slow ones
//! ([`crate::gpu::SlowValues`], taken out of the fixture's devices), each slow
//! call with its own injected latency (`slow_call_latency_us`); every call is
//! logged ([`FakeBackend::calls`]) with the thread it ran on, so tests can
//! see which calls a scrape waits for. This module reads only the fixture
//! file and never touches NVML.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::deadline::{Outcome, SingleFlight};
use crate::gpu::{
    normalize_pci_bus_id, DeviceReading, GpmMeasurement, GpuBackend, SlowReading, Snapshot,
};

/// About how many NVML calls the NVML backend makes to read one GPU (identity,
/// utilization, memory, temperature, power, energy, clocks, throttle reasons,
/// PCIe, ECC, fields, NVLink, processes): what an injected per-call latency
/// is multiplied by.
pub const CALLS_PER_DEVICE: u32 = 30;
/// NVML calls of one GPM window per GPU: two samples and one metrics get.
pub const CALLS_PER_GPM_WINDOW: u32 = 3;
/// NVML calls of one GPU's slow read: the field-value batch (energy, ECC
/// totals, remapped rows, retired pages) and the enforced power limit.
pub const SLOW_CALLS_PER_DEVICE: u32 = 2;

/// One backend call the fake served: which, and on which thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCall {
    /// `snapshot` (the fast values) or `slow_snapshot`.
    pub kind: &'static str,
    /// The name of the thread that made the call.
    pub thread: String,
}

/// A fixture file's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fixture {
    /// Free text for the reader of the fixture.
    #[serde(default)]
    #[allow(dead_code)]
    comment: Option<String>,
    /// Every snapshot sleeps this long first (simulates a hung NVML call).
    #[serde(default)]
    delay_ms: u64,
    /// Simulated latency of every NVML call, in microseconds (0: none).
    #[serde(default)]
    call_latency_us: u64,
    /// Simulated latency of every slow NVML call (the energy counter, ECC
    /// totals...), in microseconds (0: none); the GPUs are read in parallel.
    #[serde(default)]
    slow_call_latency_us: u64,
    #[serde(default)]
    driver_version: Option<String>,
    #[serde(default)]
    cuda_version: Option<String>,
    devices: Vec<DeviceReading>,
}

/// Replays one fixture.
pub struct FakeBackend {
    path: PathBuf,
    snapshot: Arc<Snapshot>,
    /// What a GPM window reads, per GPU (taken out of the fixture's devices).
    gpm: Vec<GpmMeasurement>,
    /// What a slow read returns, per GPU (taken out of the fixture's devices).
    slow: Vec<SlowReading>,
    delay: Duration,
    call_latency: Duration,
    slow_call_latency: Duration,
    slow_flight: SingleFlight<u32, SlowReading>,
    /// Every `snapshot` and `slow_snapshot` call, in order.
    calls: Mutex<Vec<FakeCall>>,
    device_deadline: Duration,
    flight: SingleFlight<u32, DeviceReading>,
    /// Released (as after `nvmlShutdown`) until re-initialised.
    released: AtomicBool,
    releases: AtomicU32,
    reinits: AtomicU32,
    /// Reads attempted while released (the collector should make none).
    reads_while_released: AtomicU32,
}

impl FakeBackend {
    /// Reads and validates `path`. The error names the file and, for a JSON
    /// error, the line and column.
    pub fn load(path: &Path) -> Result<FakeBackend, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read gpu fixture: {e}", path.display()))?;
        FakeBackend::from_json(path, &text)
    }

    /// Validates fixture text that came from `path`.
    pub fn from_json(path: &Path, text: &str) -> Result<FakeBackend, String> {
        let bad = |m: String| format!("{}: {m}", path.display());
        let fixture: Fixture = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut devices = fixture.devices;
        let mut seen = BTreeSet::new();
        let mut gpm = Vec::new();
        let mut slow = Vec::new();
        for (i, d) in devices.iter_mut().enumerate() {
            let values = d.take_slow();
            if d.lost.is_none() {
                slow.push(SlowReading {
                    index: d.index,
                    uuid: d.uuid.clone(),
                    lost: None,
                    values,
                    read_seconds: None,
                });
                gpm.push(GpmMeasurement {
                    index: d.index,
                    supported: d.gpm.is_some(),
                    reading: d.gpm.take(),
                    mig: d
                        .mig
                        .iter_mut()
                        .filter_map(|m| Some((m.gpu_instance_id?, m.gpm.take()?)))
                        .collect(),
                });
            }
            if !seen.insert(d.index) {
                return Err(bad(format!("devices[{i}]: duplicate index {}", d.index)));
            }
            d.pci_bus_id = normalize_pci_bus_id(&d.pci_bus_id).ok_or_else(|| {
                bad(format!(
                    "devices[{i}].pci_bus_id: {:?} is not a PCI bus id like 00000000:3B:00.0",
                    d.pci_bus_id
                ))
            })?;
            if d.uuid.is_empty() {
                return Err(bad(format!("devices[{i}].uuid: must not be empty")));
            }
        }
        Ok(FakeBackend {
            path: path.to_path_buf(),
            snapshot: Arc::new(Snapshot {
                driver_version: fixture.driver_version,
                cuda_version: fixture.cuda_version,
                devices,
            }),
            gpm,
            slow,
            delay: Duration::from_millis(fixture.delay_ms),
            call_latency: Duration::from_micros(fixture.call_latency_us),
            slow_call_latency: Duration::from_micros(fixture.slow_call_latency_us),
            slow_flight: SingleFlight::new("gpuops-fake-gpu-slow"),
            calls: Mutex::new(Vec::new()),
            device_deadline: Duration::from_secs(2),
            flight: SingleFlight::new("gpuops-fake-gpu"),
            released: AtomicBool::new(false),
            releases: AtomicU32::new(0),
            reinits: AtomicU32::new(0),
            reads_while_released: AtomicU32::new(0),
        })
    }

    /// Simulates NVML's latency: every call takes `latency`, GPUs are read in
    /// parallel, each within `device_deadline` (a GPU that misses it is lost).
    pub fn set_call_latency(&mut self, latency: Duration, device_deadline: Duration) {
        self.call_latency = latency;
        self.device_deadline = device_deadline;
    }

    /// Reads every GPU on its own thread, as the NVML backend does.
    fn read_in_parallel(&self) -> Vec<DeviceReading> {
        let until = Instant::now() + self.device_deadline;
        let per_device = self.call_latency * CALLS_PER_DEVICE;
        let pending: Vec<_> = self
            .snapshot
            .devices
            .iter()
            .map(|d| {
                let reading = d.clone();
                let started = Instant::now();
                let p = self.flight.start(d.index, self.device_deadline, move || {
                    std::thread::sleep(per_device);
                    let mut r = reading;
                    r.read_seconds = Some(started.elapsed().as_secs_f64());
                    r
                });
                (d, p)
            })
            .collect();
        pending
            .into_iter()
            .map(|(d, p)| match p.wait_until(until) {
                Outcome::Done(r) => r,
                Outcome::TimedOut | Outcome::StillRunning { .. } => DeviceReading {
                    index: d.index,
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    pci_bus_id: d.pci_bus_id.clone(),
                    minor_number: d.minor_number,
                    lost: Some("the fake gpu did not answer within the deadline".into()),
                    ..DeviceReading::default()
                },
            })
            .collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every `snapshot` and `slow_snapshot` call so far, in order, with the
    /// thread that made it.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn log_call(&self, kind: &'static str) {
        let thread = std::thread::current().name().unwrap_or("").to_string();
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(FakeCall { kind, thread });
    }

    /// How often it was released and re-initialised, and how many reads
    /// were attempted while it was released.
    pub fn release_counts(&self) -> (u32, u32, u32) {
        (
            self.releases.load(Ordering::SeqCst),
            self.reinits.load(Ordering::SeqCst),
            self.reads_while_released.load(Ordering::SeqCst),
        )
    }

    /// An error (counted) when released: a read after `nvmlShutdown`.
    fn check_not_released(&self) -> Result<(), String> {
        if self.is_released() {
            self.reads_while_released.fetch_add(1, Ordering::SeqCst);
            return Err("the fake gpu is released (nvmlShutdown): no reads until re-init".into());
        }
        Ok(())
    }
}

impl GpuBackend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>, String> {
        self.log_call("snapshot");
        self.check_not_released()?;
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        if self.call_latency.is_zero() {
            return Ok(self.snapshot.clone());
        }
        Ok(Arc::new(Snapshot {
            driver_version: self.snapshot.driver_version.clone(),
            cuda_version: self.snapshot.cuda_version.clone(),
            devices: self.read_in_parallel(),
        }))
    }

    fn slow_snapshot(&self) -> Result<Vec<SlowReading>, String> {
        self.log_call("slow_snapshot");
        self.check_not_released()?;
        if self.slow_call_latency.is_zero() {
            return Ok(self.slow.clone());
        }
        // Every GPU in parallel, each within the device deadline, as the
        // NVML backend reads them.
        let until = Instant::now() + self.device_deadline;
        let per_device = self.slow_call_latency * SLOW_CALLS_PER_DEVICE;
        let pending: Vec<_> = self
            .slow
            .iter()
            .map(|s| {
                let reading = s.clone();
                let started = Instant::now();
                let p = self
                    .slow_flight
                    .start(s.index, self.device_deadline, move || {
                        std::thread::sleep(per_device);
                        let mut r = reading;
                        r.read_seconds = Some(started.elapsed().as_secs_f64());
                        r
                    });
                (s, p)
            })
            .collect();
        Ok(pending
            .into_iter()
            .map(|(s, p)| match p.wait_until(until) {
                Outcome::Done(r) => r,
                Outcome::TimedOut | Outcome::StillRunning { .. } => SlowReading {
                    index: s.index,
                    uuid: s.uuid.clone(),
                    lost: Some("the fake gpu did not answer within the deadline".into()),
                    ..SlowReading::default()
                },
            })
            .collect())
    }

    fn gpm_measure(&self, window: Duration) -> Result<Vec<GpmMeasurement>, String> {
        self.check_not_released()?;
        std::thread::sleep(window + self.call_latency * CALLS_PER_GPM_WINDOW);
        let secs = Some(window.as_secs_f64());
        Ok(self
            .gpm
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(r) = &mut m.reading {
                    r.window_seconds = secs;
                }
                for (_, r) in &mut m.mig {
                    r.window_seconds = secs;
                }
                m
            })
            .collect())
    }

    fn release(&self) -> Result<(), String> {
        if !self.released.swap(true, Ordering::SeqCst) {
            self.releases.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn is_released(&self) -> bool {
        self.released.load(Ordering::SeqCst)
    }

    fn reinit(&self) -> Result<(), String> {
        if self.released.swap(false, Ordering::SeqCst) {
            self.reinits.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<FakeBackend, String> {
        FakeBackend::from_json(Path::new("f.json"), text)
    }

    #[test]
    fn shipped_fixtures_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu");
        for name in [
            "h100x8.json",
            "h100x8-training.json",
            "mig.json",
            "slow.json",
            "lost.json",
        ] {
            let b = FakeBackend::load(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!b.snapshot.devices.is_empty(), "{name}");
        }
        let h = FakeBackend::load(&dir.join("h100x8.json")).unwrap();
        assert_eq!(h.snapshot.devices.len(), 8);
    }

    #[test]
    fn gpm_is_replayed_with_the_window_and_only_where_supported() {
        let b = load(
            r#"{"devices": [
              {"index": 0, "uuid": "GPU-0", "pci_bus_id": "1:0", "gpm": {"sm_active_percent": 96.2}},
              {"index": 1, "uuid": "GPU-1", "pci_bus_id": "2:0"}]}"#,
        )
        .unwrap();
        assert!(b.snapshot.devices.iter().all(|d| d.gpm.is_none()));
        let m = b.gpm_measure(Duration::from_millis(5)).unwrap();
        assert_eq!(m.len(), 2);
        assert!(m[0].supported && !m[1].supported);
        let r = m[0].reading.as_ref().unwrap();
        assert_eq!(r.sm_active_percent, Some(96.2));
        assert_eq!(r.window_seconds, Some(0.005));
        assert_eq!(m[1].reading, None);
    }

    #[test]
    fn injected_latency_reads_gpus_in_parallel_within_the_deadline() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpu");
        let mut b = FakeBackend::load(&dir.join("h100x8.json")).unwrap();
        // 30 calls × 1 ms = 30 ms per GPU; 8 GPUs in series would be 240 ms.
        b.set_call_latency(Duration::from_millis(1), Duration::from_secs(2));
        let started = Instant::now();
        let s = b.snapshot().unwrap();
        let took = started.elapsed();
        assert_eq!(s.devices.len(), 8);
        assert!(s.devices.iter().all(|d| d.lost.is_none()));
        assert!(s.devices.iter().all(|d| d.read_seconds.unwrap() >= 0.03));
        assert!(took < Duration::from_millis(200), "{took:?}");
        // A GPU read slower than the deadline is lost, and the pass returns in time.
        b.set_call_latency(Duration::from_millis(10), Duration::from_millis(50));
        let started = Instant::now();
        let s = b.snapshot().unwrap();
        assert!(started.elapsed() < Duration::from_millis(200));
        assert!(s.devices.iter().all(|d| d.lost.is_some()), "{s:?}");
    }

    #[test]
    fn fake_serves_slow_values_only_from_slow_snapshot() {
        let b = load(
            r#"{"devices": [{"index": 0, "uuid": "GPU-0", "pci_bus_id": "1:0",
                "energy_joules": 5.5, "power_limit_watts": 700,
                "ecc": {"uncorrected_volatile": 2}, "remapped_rows": {"failure": 0}}]}"#,
        )
        .unwrap();
        let fast = b.snapshot().unwrap();
        let d = &fast.devices[0];
        assert_eq!((d.energy_joules, d.power_limit_watts), (None, None));
        assert_eq!(d.ecc.uncorrected_volatile, None);
        let slow = b.slow_snapshot().unwrap();
        assert_eq!((slow[0].index, slow[0].uuid.as_str()), (0, "GPU-0"));
        let v = &slow[0].values;
        assert_eq!(
            (v.energy_joules, v.power_limit_watts),
            (Some(5.5), Some(700.0))
        );
        assert_eq!(v.ecc.uncorrected_volatile, Some(2));
        assert_eq!(v.remapped_rows.failure, Some(0));
        let kinds: Vec<_> = b.calls().iter().map(|c| c.kind).collect();
        assert_eq!(kinds, ["snapshot", "slow_snapshot"]);
    }

    #[test]
    fn fake_release_fails_reads_until_reinit() {
        let b =
            load(r#"{"devices": [{"index": 0, "uuid": "GPU-0", "pci_bus_id": "1:0"}]}"#).unwrap();
        assert!(b.snapshot().is_ok());
        b.release().unwrap();
        assert!(b.is_released());
        let e = b.snapshot().err().unwrap();
        assert!(e.contains("released"), "{e}");
        assert!(b.gpm_measure(Duration::ZERO).is_err());
        b.reinit().unwrap();
        assert!(!b.is_released());
        assert_eq!(b.snapshot().unwrap().devices.len(), 1);
        assert_eq!(b.release_counts(), (1, 1, 2));
    }

    #[test]
    fn bad_fixtures_name_the_problem() {
        let e = load("{\"devices\": [{\"index\": 0, \"uuid\": \"GPU-1\", \"pci_bus_id\": \"x\"}]}")
            .err()
            .unwrap();
        assert!(e.contains("devices[0].pci_bus_id"), "{e}");
        let e = load("{\"devices\": [{\"index\": 0, \"uuid\": \"GPU-1\", \"pci_bus_id\": \"0000:3b:00\", \"utilisation\": 3}]}")
            .err()
            .unwrap();
        assert!(e.starts_with("f.json: unknown field `utilisation`"), "{e}");
        assert!(e.contains("line 1"), "{e}");
        let e = load("{\"devices\": [{\"index\": 0, \"uuid\": \"GPU-1\", \"pci_bus_id\": \"0000:3b:00\", \"clock_events\": {\"active\": [\"too_hot\"]}}]}")
            .err()
            .unwrap();
        assert!(e.contains("unknown variant `too_hot`"), "{e}");
        let dup = "{\"devices\": [{\"index\": 0, \"uuid\": \"a\", \"pci_bus_id\": \"1:0\"}, {\"index\": 0, \"uuid\": \"b\", \"pci_bus_id\": \"2:0\"}]}";
        assert!(load(dup).err().unwrap().contains("duplicate index 0"));
    }
}
