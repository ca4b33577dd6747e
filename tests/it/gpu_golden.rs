//! End-to-end exposition of the fake GPU backend: `gpuops collect --once
//! --gpu-fake <fixture>` against checked-in golden files, and promtool lint.
//! Regenerate the golden files with `GPUOPS_BLESS=1 cargo test --test it gpu_golden::`.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

use std::path::PathBuf;
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `gpuops collect --once` with only the GPU collector (and kmsg) on.
fn collect(fixture: &str, extra_config: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!("[collectors]\ncpu = false\nmemory = false\noom = false\nstorage = false\n{extra_config}"),
    )
    .unwrap();
    let fx = root().join("tests/fixtures/gpu");
    let out = Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .arg("collect")
        .arg("--once")
        .arg("--config")
        .arg(&cfg)
        .arg("--gpu-fake")
        .arg(fx.join(fixture))
        .arg("--procfs")
        .arg(fx.join("proc"))
        .arg("--rootfs")
        .arg(fx.join("root"))
        .arg("--kmsg")
        .arg(fx.join("kmsg-xid.txt"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The stable part of an exposition: GPU families, DCGM families, whether
/// NVML is released, the age of the slow values (its value masked as 0) and
/// the collectors' success (durations, process and build metrics vary).
fn stable(text: &str) -> String {
    const AGE: &str = "gpuops_gpu_slow_read_age_seconds";
    let keep = |name: &str| {
        name.starts_with("gpu_")
            || name.starts_with("DCGM_")
            || name.starts_with("gpuops_collector_success")
            || name.starts_with("gpuops_build_info")
            || name.starts_with("gpuops_gpu_released")
            || name.starts_with(AGE)
    };
    text.lines()
        .filter(|l| {
            let name = l
                .strip_prefix("# HELP ")
                .or_else(|| l.strip_prefix("# TYPE "))
                .unwrap_or(l);
            keep(name)
        })
        .map(|l| match l.rsplit_once(' ') {
            Some((series, _)) if l.starts_with(AGE) => format!("{series} 0\n"),
            _ => format!("{l}\n"),
        })
        .collect()
}

fn check_golden(name: &str, actual: &str) {
    let path = root().join("tests/golden").join(name);
    if std::env::var_os("GPUOPS_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with GPUOPS_BLESS=1 to create it)",
            path.display()
        )
    });
    if expected != actual {
        let diff: Vec<String> = expected
            .lines()
            .zip(actual.lines())
            .filter(|(a, b)| a != b)
            .take(10)
            .map(|(a, b)| format!("-{a}\n+{b}"))
            .collect();
        panic!(
            "{} differs from the output ({} vs {} lines); first differences:\n{}\n(run with GPUOPS_BLESS=1 to accept)",
            path.display(),
            expected.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}

#[test]
fn h100x8_fixture_matches_golden_exposition() {
    let (out, err) = collect("h100x8.json", "");
    assert!(err.contains("gpu readings are FAKE"), "{err}");
    assert!(
        out.contains("gpuops_build_info{version=\"0.1.0\",role=\"agent\",gpu_backend=\"fake\"} 1")
    );
    assert!(out.contains("gpuops_collector_success{collector=\"gpu\"} 1"));
    // All 8 GPUs have their USE series.
    for i in 0..8 {
        for name in [
            "gpu_up",
            "gpu_utilization_percent",
            "gpu_memory_used_bytes",
            "gpu_memory_total_bytes",
            "gpu_memory_used_percent",
            "gpu_temperature_celsius",
            "gpu_power_watts",
            "gpu_throttle_reason",
            "gpu_errors_total",
        ] {
            let prefix = format!("{name}{{gpu=\"{i}\"");
            assert!(out.contains(&prefix), "{prefix} missing");
        }
    }
    check_golden("gpu-h100x8.prom", &stable(&out));
}

#[test]
fn mig_fixture_exports_instance_labels() {
    let (out, _) = collect("mig.json", "");
    check_golden("gpu-mig.prom", &stable(&out));
    assert!(out.contains(
        "gpu_instance_id=\"13\",compute_instance_id=\"0\",mig_profile=\"1g.10gb\"} 536870912"
    ));
    // No utilization for GPU 0 in the fixture: left out, not 0.
    assert!(!out.contains("gpu_utilization_percent{gpu=\"0\""));
}

#[test]
fn lost_gpu_is_down_and_counted_once() {
    let (out, err) = collect("lost.json", "");
    assert!(err.contains("gpu stopped answering"), "{err}");
    let gpu5: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("gpu_") && l.contains("gpu=\"5\""))
        .collect();
    assert!(
        gpu5.iter()
            .any(|l| l.starts_with("gpu_up{") && l.ends_with(" 0")),
        "{gpu5:#?}"
    );
    assert!(
        gpu5.iter()
            .any(|l| l.contains("type=\"fell_off_bus\"") && l.ends_with(" 1")),
        "{gpu5:#?}"
    );
    // Nothing else about a lost GPU: no stale or zero readings.
    assert!(
        gpu5.iter()
            .all(|l| l.starts_with("gpu_up{") || l.starts_with("gpu_errors_total{")),
        "{gpu5:#?}"
    );
    assert!(out.contains("gpu_up{gpu=\"4\""));
}

#[test]
fn dcgm_compat_adds_dcgm_exporter_names() {
    let (out, _) = collect("h100x8.json", "[gpu]\ndcgm_compat = true\n");
    let dcgm: String = stable(&out)
        .lines()
        .filter(|l| l.contains("DCGM_"))
        .map(|l| format!("{l}\n"))
        .collect();
    check_golden("gpu-h100x8-dcgm.prom", &dcgm);
    assert!(out.contains("DCGM_FI_DEV_FB_USED{gpu=\"3\",UUID=\"GPU-9d4f3b6e-4c5a-4e8d-8fab-3a4b5c6d7e83\",device=\"nvidia3\",modelName=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:5D:00.0\"} 50000"));
    assert!(out.contains("DCGM_FI_DEV_XID_ERRORS{gpu=\"3\""));
}

#[test]
fn training_fixture_exports_gpm_and_workloads() {
    let (out, _) = collect("h100x8-training.json", "");
    check_golden("gpu-h100x8-training.prom", &stable(&out));
    let has = |line: &str| {
        assert!(out.contains(line), "missing {line:?}");
    };
    let gpu0 = "gpu=\"0\",uuid=\"GPU-0b6c1d2e-3f40-4a51-9b62-7c8d9e0fa100\",name=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:18:00.0\"";
    // GPM: the numbers ML teams tune by, next to "utilization 100".
    has(&format!("gpu_utilization_percent{{{gpu0}}} 100\n"));
    has(&format!("gpu_gpm_supported{{{gpu0}}} 1\n"));
    has(&format!("gpu_sm_active_percent{{{gpu0}}} 96.2\n"));
    has(&format!("gpu_sm_occupancy_percent{{{gpu0}}} 14.2\n"));
    has(&format!("gpu_tensor_active_percent{{{gpu0}}} 93.4\n"));
    has(&format!("gpu_dram_active_percent{{{gpu0}}} 17.4\n"));
    has(&format!(
        "gpu_pipe_active_percent{{{gpu0},pipe=\"tensor_hmma\"}} 93.4\n"
    ));
    has(&format!(
        "gpu_nvlink_bytes_per_second{{{gpu0},direction=\"tx\"}} 112000000000\n"
    ));
    // collect --once measures its own short window.
    has(&format!("gpu_gpm_window_seconds{{{gpu0}}} 0.1\n"));
    // Workloads: Slurm (v1 path with uid, v2 path with uid from status), Kubernetes, systemd.
    has(&format!("gpu_workload_memory_used_bytes{{{gpu0},workload_type=\"slurm\",workload=\"8123\",user=\"alice\",container=\"\"}} 78383153152\n"));
    has("workload_type=\"slurm\",workload=\"8124\",user=\"bob\",container=\"\"} 13958643712\n");
    // Slurm without its cgroup plugin: SLURM_JOB_ID from the environment.
    has("workload_type=\"slurm\",workload=\"8125\",user=\"alice\",container=\"\"} 536870912\n");
    has("workload_type=\"kubernetes\",workload=\"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\",user=\"\",container=\"containerd:a1b2c3d4e5f6\"} 42949672960\n");
    has("workload_type=\"systemd\",workload=\"jupyterhub.service\",user=\"\",container=\"\"} 22548578304\n");
    has(&format!("gpu_workload_sm_utilization_percent{{{gpu0},workload_type=\"slurm\",workload=\"8123\",user=\"alice\",container=\"\"}} 100\n"));
    // Idle allocations: GPU 6 (a service at 0.3 % SM), GPU 7 (memory, no process).
    for (gpu, idle) in [(0, 0), (4, 0), (6, 1), (7, 1)] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("gpu_allocated_idle{{gpu=\"{gpu}\"")))
            .unwrap_or_else(|| panic!("no gpu_allocated_idle for gpu {gpu}"));
        assert!(line.ends_with(&format!(" {idle}")), "{line}");
    }
    // Per-pid series are opt-in.
    assert!(!out.contains("gpu_process_memory_used_bytes{"));
    let (pids, _) = collect("h100x8-training.json", "[gpu]\nper_pid_metrics = true\n");
    assert!(pids.contains(&format!("gpu_process_memory_used_bytes{{{gpu0},pid=\"62000\",process=\"python\",unit=\"\"}} 78383153152\n")), "{pids}");
    assert!(pids.contains(&format!("gpu_process_sm_utilization_percent{{{gpu0},pid=\"62000\",process=\"python\",unit=\"\"}} 100\n")));
    let per_pid: String = stable(&pids)
        .lines()
        .filter(|l| l.contains("gpu_process_"))
        .map(|l| format!("{l}\n"))
        .collect();
    check_golden("gpu-h100x8-training-pids.prom", &per_pid);
    // GPM off: no GPM series at all, not zeros.
    let (off, _) = collect("h100x8-training.json", "[gpu]\ngpm = false\n");
    assert!(!off.contains("gpu_gpm_supported{") && !off.contains("gpu_sm_active_percent{"));
}

#[test]
fn gpm_is_absent_without_gpm_support_and_per_mig_instance_where_given() {
    let (out, _) = collect("h100x8.json", "");
    assert!(out.contains("gpu_gpm_supported{gpu=\"0\""));
    assert!(out
        .lines()
        .filter(|l| l.starts_with("gpu_gpm_supported{"))
        .all(|l| l.ends_with(" 0")));
    for name in [
        "gpu_sm_active_percent{",
        "gpu_sm_occupancy_percent{",
        "gpu_tensor_active_percent{",
        "gpu_gpm_window_seconds{",
    ] {
        assert!(!out.contains(name), "{name} without GPM support");
    }
    let (mig, _) = collect("mig.json", "");
    assert!(mig.contains("gpu_sm_active_percent{gpu=\"0\",uuid=\"GPU-6a1c0e3b-1f2d-4b5a-9c7e-0d1e2f3a4b50\",name=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:18:00.0\",gpu_instance_id=\"1\",compute_instance_id=\"0\",mig_profile=\"3g.40gb\"} 88\n"), "{mig}");
}

#[test]
fn dcgm_compat_adds_dcgm_profiling_names_for_gpm() {
    let (out, _) = collect("h100x8-training.json", "[gpu]\ndcgm_compat = true\n");
    let labels = "gpu=\"0\",UUID=\"GPU-0b6c1d2e-3f40-4a51-9b62-7c8d9e0fa100\",device=\"nvidia0\",modelName=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:18:00.0\"";
    for (name, v) in [
        ("DCGM_FI_PROF_SM_ACTIVE", "0.962"),
        ("DCGM_FI_PROF_SM_OCCUPANCY", "0.142"),
        ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "0.934"),
        ("DCGM_FI_PROF_DRAM_ACTIVE", "0.174"),
        ("DCGM_FI_PROF_NVLINK_TX_BYTES", "112000000000"),
    ] {
        let line = format!("{name}{{{labels}}} {v}\n");
        assert!(out.contains(&line), "missing {line}");
    }
    assert!(out.contains("DCGM_FI_PROF_NVDEC6_ACTIVE{"));
    let prof: String = stable(&out)
        .lines()
        .filter(|l| l.contains("DCGM_FI_PROF_"))
        .map(|l| format!("{l}\n"))
        .collect();
    check_golden("gpu-h100x8-training-dcgm.prom", &prof);
}

#[test]
fn slow_gpu_reads_are_parallel_and_bounded_by_the_deadline() {
    // 30 calls × 2 ms = 60 ms per GPU: eight in series would be 480 ms.
    let started = std::time::Instant::now();
    let (out, _) = collect(
        "h100x8-training.json",
        "[gpu]\nfake_call_latency_us = 2000\n",
    );
    let fast = started.elapsed();
    assert_eq!(out.matches("gpu_up{").count(), 8);
    assert!(out
        .lines()
        .filter(|l| l.starts_with("gpu_up{"))
        .all(|l| l.ends_with(" 1")));
    assert!(out.contains("gpu_sm_active_percent{gpu=\"7\""));
    let read: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("gpuops_gpu_read_duration_seconds{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(read.len(), 8);
    assert!(read.iter().all(|s| *s >= 0.06), "{read:?}");
    assert!(fast < std::time::Duration::from_secs(5), "{fast:?}");
    // 30 × 50 ms = 1.5 s per GPU against a 0.5 s deadline: every GPU is
    // reported lost (gpu_up 0, nothing else) and the scrape still answers.
    let started = std::time::Instant::now();
    let (out, _) = collect(
        "h100x8-training.json",
        "[gpu]\ndeadline_secs = 0.5\nfake_call_latency_us = 50000\n",
    );
    let slow = started.elapsed();
    let up: Vec<&str> = out.lines().filter(|l| l.starts_with("gpu_up{")).collect();
    assert_eq!(up.len(), 8, "{out}");
    assert!(up.iter().all(|l| l.ends_with(" 0")), "{up:#?}");
    assert!(!out.contains("gpu_sm_active_percent{"));
    assert!(slow < std::time::Duration::from_secs(5), "{slow:?}");
}

/// promtool's findings on an exposition, minus those we knowingly accept: the
/// `DCGM_*` compatibility series use dcgm-exporter's names and label names
/// (`UUID`, `modelName`, `..._COUNTER`), which is their whole point.
fn promtool_findings(text: &str) -> Vec<String> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    all.lines()
        .filter(|l| !l.trim().is_empty())
        // dcgm-exporter's own names and labels break Prometheus naming advice.
        .filter(|l| !(l.starts_with("DCGM_FI_") && l.contains(" should ")))
        .map(str::to_string)
        .collect()
}

#[test]
#[ignore = "needs promtool; run by .ci/run"]
fn fake_expositions_are_promtool_clean() {
    for (fixture, extra) in [
        ("h100x8.json", ""),
        ("h100x8.json", "[gpu]\ndcgm_compat = true\n"),
        ("mig.json", ""),
        ("lost.json", ""),
        ("h100x8-training.json", ""),
        (
            "h100x8-training.json",
            "[gpu]\ndcgm_compat = true\nper_pid_metrics = true\n",
        ),
    ] {
        let (out, _) = collect(fixture, extra);
        let findings = promtool_findings(&out);
        assert!(findings.is_empty(), "{fixture} {extra}: {findings:#?}");
    }
}
