//! `scripts/gpu-check` against canned `nvidia-smi` output and a fake-backend
//! exposition (no GPU needed): agreement passes, each kind of disagreement is
//! named and fails.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fake 8× H100 exposition, written to `dir/metrics.prom`.
fn metrics(dir: &Path) -> PathBuf {
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        "[collectors]\ncpu = false\nmemory = false\noom = false\nstorage = false\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["collect", "--once", "--config"])
        .arg(&cfg)
        .arg("--gpu-fake")
        .arg(root().join("tests/fixtures/gpu/h100x8.json"))
        .arg("--kmsg")
        .arg(dir.join("no-kmsg"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let p = dir.join("metrics.prom");
    std::fs::write(&p, out.stdout).unwrap();
    p
}

fn run(csv: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let m = metrics(dir.path());
    let smi = dir.path().join("smi.csv");
    std::fs::write(&smi, csv).unwrap();
    let out = Command::new("bash")
        .arg(root().join("scripts/gpu-check"))
        .arg("--smi-csv")
        .arg(&smi)
        .arg("--metrics")
        .arg(&m)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn canned() -> String {
    std::fs::read_to_string(root().join("tests/fixtures/gpu/nvidia-smi-h100x8.csv")).unwrap()
}

#[test]
fn agreeing_readings_pass() {
    let (code, out) = run(&canned());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("all 8 GPUs agree"), "{out}");
}

#[test]
fn each_disagreement_is_named() {
    // GPU 3: memory off by 1 MiB, temperature off by 5 °C, power off by 20 %.
    let csv = canned().replace(
        "3, 61, 50000, 81559, 89, 414.57, 1290, 2619",
        "3, 61, 50001, 81559, 93, 482.00, 1290, 2619",
    );
    let (code, out) = run(&csv);
    assert_eq!(code, 1, "{out}");
    let gpu3 = out
        .split("GPU 3")
        .nth(1)
        .unwrap()
        .split("GPU 4")
        .next()
        .unwrap();
    for field in ["memory.used", "temperature", "power.draw"] {
        assert!(
            gpu3.lines()
                .any(|l| l.contains(field) && l.ends_with("MISMATCH")),
            "{field}: {out}"
        );
    }
    assert!(out.contains("3 mismatch(es)"), "{out}");
}

#[test]
fn unsupported_power_is_skipped_and_unknown_gpu_fails() {
    let csv = canned().replace("674.86", "[N/A]") + "8, 0, 0, 81559, 30, 70.00, 345, 2619\n";
    let (code, out) = run(&csv);
    assert_eq!(code, 1, "{out}");
    let gpu0 = out
        .split("GPU 0")
        .nth(1)
        .unwrap()
        .split("GPU 1")
        .next()
        .unwrap();
    assert!(!gpu0.contains("power.draw"), "{out}");
    assert!(out.contains("GPU 8\n  not in gpuops output"), "{out}");
}

/// Runs the script on the training fixture's exposition with canned GPM.
fn run_gpm(gpm: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[collectors]\ncpu = false\nmemory = false\noom = false\nstorage = false\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .args(["collect", "--once", "--config"])
        .arg(&cfg)
        .arg("--gpu-fake")
        .arg(root().join("tests/fixtures/gpu/h100x8-training.json"))
        .arg("--kmsg")
        .arg(dir.path().join("no-kmsg"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let m = dir.path().join("metrics.prom");
    std::fs::write(&m, out.stdout).unwrap();
    // nvidia-smi's side agreeing with the fixture (GPU 0 only).
    let smi = dir.path().join("smi.csv");
    std::fs::write(&smi, "0, 100, 75776, 81559, 58, 668.00, 1980, 2619\n").unwrap();
    let g = dir.path().join("gpm.csv");
    std::fs::write(&g, gpm).unwrap();
    let out = Command::new("bash")
        .arg(root().join("scripts/gpu-check"))
        .args(["--smi-csv"])
        .arg(&smi)
        .arg("--metrics")
        .arg(&m)
        .arg("--gpm-csv")
        .arg(&g)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn gpm_is_compared_with_an_independent_reading() {
    let (code, out) = run_gpm("0,95.80,14.20,93.00,17.50\n");
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("sm_active") && out.contains("all 1 GPUs agree"),
        "{out}"
    );
    let (code, out) = run_gpm("0,40.00,14.20,93.00,17.50\n");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("sm_active") && out.contains("MISMATCH"),
        "{out}"
    );
    // NVML says no GPM while gpuops exported it: a mismatch.
    let (code, out) = run_gpm("0,unsupported\n");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("gpu_gpm_supported=1"), "{out}");
}
