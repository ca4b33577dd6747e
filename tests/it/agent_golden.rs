//! End-to-end golden test (node_exporter's habit): run the real binary's
//! `collect --once` on the fixture tree `tests/fixtures/host/full` and compare
//! the whole exposition with `tests/golden/host.prom`. `GPUOPS_BLESS=1`
//! rewrites the golden file. Only values that cannot be pinned are masked:
//! durations, process metrics and the statvfs figures of the fixture's root
//! directory (a real filesystem; the unit tests pin those with a fake statvfs).
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(scenario: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/host")
        .join(scenario)
}

/// Runs `gpuops collect --once` on a fixture scenario with the GPU collector off.
fn collect_once(scenario: &str) -> Output {
    let dir = tempfile::tempdir().expect("temp dir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[collectors]\ngpu = false\n\n[cpu]\nthrottle_cgroups = [\"kubepods.slice/kubepods-burstable.slice\"]\n",
    )
    .expect("write config");
    let f = fixture(scenario);
    Command::new(env!("CARGO_BIN_EXE_gpuops"))
        .current_dir(dir.path())
        .env_remove("GPUOPS_AGENT_CONFIG")
        .env_remove("GPUOPS_LOG")
        .arg("collect")
        .arg("--once")
        .arg("--config")
        .arg(&cfg)
        .arg("--procfs")
        .arg(f.join("proc"))
        .arg("--sysfs")
        .arg(f.join("sys"))
        .arg("--rootfs")
        .arg(f.join("root"))
        .arg("--kmsg")
        .arg(f.join("kmsg"))
        .output()
        .expect("run gpuops")
}

const MASKED_FAMILIES: &[&str] = &[
    "gpuops_collector_duration_seconds",
    "process_",
    "storage_total_bytes",
    "storage_used_bytes",
    "storage_available_bytes",
    "storage_inodes",
    "storage_inodes_free",
];

/// Replaces the value of every sample of a masked family with `<masked>`.
fn mask(exposition: &str) -> String {
    exposition
        .lines()
        .map(|line| {
            let masked =
                !line.starts_with('#') && MASKED_FAMILIES.iter().any(|f| line.starts_with(f));
            match line.rsplit_once(' ') {
                Some((series, _)) if masked => format!("{series} <masked>\n"),
                _ => format!("{line}\n"),
            }
        })
        .collect()
}

fn first_difference(want: &str, got: &str) -> String {
    let (w, g): (Vec<_>, Vec<_>) = (want.lines().collect(), got.lines().collect());
    for i in 0..w.len().max(g.len()) {
        if w.get(i) != g.get(i) {
            return format!(
                "line {}:\n  golden: {:?}\n  actual: {:?}",
                i + 1,
                w.get(i),
                g.get(i)
            );
        }
    }
    String::from("no difference")
}

#[test]
fn host_exposition_matches_golden() {
    let out = collect_once("full");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(
        stderr.is_empty(),
        "no warnings expected on the full fixture: {stderr}"
    );
    let got = mask(&String::from_utf8(out.stdout).expect("utf-8 exposition"));
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/host.prom");
    if std::env::var_os("GPUOPS_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&golden, &got).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        want == got,
        "exposition differs from {} (GPUOPS_BLESS=1 cargo test --test it agent_golden:: regenerates it)\n{}",
        golden.display(),
        first_difference(&want, &got)
    );
}

#[test]
fn malformed_sources_fail_their_collectors_but_exit_zero() {
    let out = collect_once("malformed");
    assert!(out.status.success(), "exit {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    for c in ["cpu", "memory", "oom", "storage"] {
        let line = format!("gpuops_collector_success{{collector=\"{c}\"}} 0");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    for absent in [
        "cpu_seconds_total",
        "memory_total_bytes",
        "oom_kills_total",
        "storage_reads_total",
    ] {
        assert!(
            !text.lines().any(|l| l.starts_with(absent)),
            "{absent} must be left out:\n{text}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("malformed/proc/meminfo"),
        "the warning names the file: {stderr}"
    );
}

#[test]
fn missing_sources_are_left_out_without_failing() {
    let out = collect_once("missing");
    assert!(out.status.success(), "exit {:?}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    for c in ["cpu", "memory", "oom", "storage"] {
        let line = format!("gpuops_collector_success{{collector=\"{c}\"}} 1");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    let host_series: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            ["cpu_", "memory_", "oom_", "storage_"]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert!(host_series.is_empty(), "no fake zeros: {host_series:?}");
    assert!(text.contains("gpuops_kernel_log_readable 0"), "{text}");
}

#[test]
#[ignore = "needs promtool; run by .ci/run"]
fn promtool_check_metrics_is_clean() {
    use std::io::Write as _;
    let out = collect_once("full");
    assert!(out.status.success());
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool on PATH (Debian package prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&out.stdout)
        .expect("feed promtool");
    let res = child.wait_with_output().expect("promtool result");
    assert!(
        res.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
}
