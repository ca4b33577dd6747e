//! The fake GPU backend: replays a JSON fixture (docs/gpu.md describes the
//! format) for tests, demos and benchmarks on machines without GPUs.
//!
//! Its data is labelled fake: the agent warns at start and
//! `gpuops_build_info{gpu_backend="fake"}`. A fixture may ask for an injected
//! delay (`delay_ms`) to simulate a hung NVML. This module reads only the
//! fixture file and never touches NVML.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::gpu::{normalize_pci_bus_id, DeviceReading, GpuBackend, Snapshot};

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
    delay: Duration,
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
        for (i, d) in devices.iter_mut().enumerate() {
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
            delay: Duration::from_millis(fixture.delay_ms),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl GpuBackend for FakeBackend {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>, String> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(self.snapshot.clone())
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
        for name in ["h100x8.json", "mig.json", "slow.json", "lost.json"] {
            let b = FakeBackend::load(&dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
            assert!(!b.snapshot.devices.is_empty(), "{name}");
        }
        let h = FakeBackend::load(&dir.join("h100x8.json")).unwrap();
        assert_eq!(h.snapshot.devices.len(), 8);
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
