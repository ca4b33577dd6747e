//! The agent binary with the GPU collector: a stuck backend never blocks
//! `/metrics`, a missing NVML is one log line and no GPU series, and XIDs from
//! the kernel log are counted and shown with their catalogue entry.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and external tools

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Agent {
    child: Child,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts `gpuops agent` with `config` (TOML) and extra arguments, and
    /// waits for `/healthz`.
    fn start(config: &str, args: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, config).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = dir.path().join("agent.log");
        let child = Command::new(env!("CARGO_BIN_EXE_gpuops"))
            .arg("agent")
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg(&addr)
            .args(args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            addr,
            log,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if agent.try_get("/healthz").is_some() {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent did not start:\n{}", agent.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        Some((status, body))
    }

    fn get(&self, path: &str) -> String {
        let (status, body) = self
            .try_get(path)
            .unwrap_or_else(|| panic!("GET {path} failed\n{}", self.log()));
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gpu")
        .join(name)
}

fn sample<'a>(metrics: &'a str, prefix: &str) -> Option<&'a str> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
}

#[test]
fn stuck_gpu_backend_never_blocks_metrics() {
    // The fixture sleeps 5 s per snapshot; the GPU deadline is 0.5 s.
    let slow = fixture("slow.json");
    let kmsg = tempfile::NamedTempFile::new().unwrap();
    let agent = Agent::start(
        "[collectors]\ncpu = false\nmemory = false\noom = false\nstorage = false\ndeadline_secs = 2\n[gpu]\ndeadline_secs = 0.5\n",
        &[
            "--gpu-fake",
            slow.to_str().unwrap(),
            "--kmsg",
            kmsg.path().to_str().unwrap(),
        ],
    );
    for round in 0..3 {
        let started = Instant::now();
        let m = agent.get("/metrics");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "round {round}: /metrics took {took:?}"
        );
        assert_eq!(
            sample(&m, "gpuops_collector_success{collector=\"gpu\"}"),
            Some("0"),
            "round {round}:\n{m}"
        );
        // The other collectors' series are still there.
        assert_eq!(
            sample(&m, "gpuops_collector_success{collector=\"kmsg\"}"),
            Some("1")
        );
        assert!(m.contains("gpuops_kernel_log_records_total"));
        assert!(!m.lines().any(|l| l.starts_with("gpu_up")), "{m}");
    }
    let log = agent.log();
    assert!(
        log.contains("gpu backend did not answer within 0.5s")
            || log.contains("gpu backend still stuck"),
        "{log}"
    );
}

#[test]
fn missing_nvml_is_one_line_and_no_gpu_series() {
    let kmsg = tempfile::NamedTempFile::new().unwrap();
    let agent = Agent::start(
        "[collectors]\nstorage = false\n",
        &["--kmsg", kmsg.path().to_str().unwrap()],
    );
    let m = agent.get("/metrics");
    if Path::new("/proc/driver/nvidia/version").exists() {
        // A machine with the NVIDIA driver: the other half of the contract.
        assert!(m.contains("gpu_backend=\"nvml\""), "{m}");
        assert!(m.lines().any(|l| l.starts_with("gpu_up{")), "{m}");
        return;
    }
    assert_eq!(
        sample(&m, "gpuops_collector_success{collector=\"gpu\"}"),
        Some("0"),
        "{m}"
    );
    assert!(!m.lines().any(|l| l.starts_with("gpu_")), "{m}");
    assert!(m.contains("gpu_backend=\"none\""), "{m}");
    // Host collectors still report.
    assert_eq!(
        sample(&m, "gpuops_collector_success{collector=\"cpu\"}"),
        Some("1"),
        "{m}"
    );
    let _ = agent.get("/metrics");
    let log = agent.log();
    assert_eq!(
        log.matches("NVML not available, no gpu metrics").count(),
        1,
        "one warning, not one per scrape:\n{log}"
    );
    assert!(log.contains("libnvidia-ml"), "the line says why:\n{log}");
}

#[test]
fn kernel_log_xids_are_counted_and_explained() {
    let dir = tempfile::tempdir().unwrap();
    let kmsg = dir.path().join("kmsg");
    std::fs::copy(fixture("kmsg-xid.txt"), &kmsg).unwrap();
    let fake = fixture("lost.json");
    let procfs = fixture("proc");
    let agent = Agent::start(
        "[collectors]\ncpu = false\nmemory = false\noom = false\nstorage = false\n",
        &[
            "--gpu-fake",
            fake.to_str().unwrap(),
            "--kmsg",
            kmsg.to_str().unwrap(),
            "--procfs",
            procfs.to_str().unwrap(),
        ],
    );
    let xid = |m: &str, bus: &str, code: u32| -> Option<String> {
        m.lines()
            .find(|l| {
                l.starts_with("gpu_xid_errors_total{")
                    && l.contains(&format!("pci_bus_id=\"{bus}\""))
                    && l.contains(&format!("xid=\"{code}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
    };
    // The watcher follows the file: wait for its records.
    let until = Instant::now() + Duration::from_secs(10);
    let mut m = String::new();
    while Instant::now() < until {
        m = agent.get("/metrics");
        if xid(&m, "00000000:3A:00.0", 43).is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(xid(&m, "00000000:3A:00.0", 13).as_deref(), Some("2"), "{m}");
    assert_eq!(xid(&m, "00000000:5D:00.0", 48).as_deref(), Some("1"));
    // A bus no GPU has: labelled by bus id only.
    assert!(m.contains("gpu_xid_errors_total{pci_bus_id=\"00000000:C1:00.0\",xid=\"79\"} 1"));
    assert!(m.contains(
        "gpu_xid_errors_total{gpu=\"2\",uuid=\"GPU-8c3e2a5d-3b4f-4d7c-9e9a-2f3a4b5c6d72\""
    ));

    // Appending a line while the agent runs counts it.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&kmsg)
        .unwrap();
    writeln!(f, "4,2000,20000000,-;NVRM: Xid (PCI:0000:3a:00): 13, pid=41002, name=python, Graphics Exception").unwrap();
    drop(f);
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until && xid(&m, "00000000:3A:00.0", 13).as_deref() != Some("3") {
        std::thread::sleep(Duration::from_millis(100));
        m = agent.get("/metrics");
    }
    assert_eq!(xid(&m, "00000000:3A:00.0", 13).as_deref(), Some("3"), "{m}");

    let ev: serde_json::Value = serde_json::from_str(&agent.get("/v1/events?since=1e9")).unwrap();
    let events = ev["events"].as_array().unwrap();
    let x79 = events
        .iter()
        .find(|e| e["type"] == "xid" && e["xid"] == 79)
        .unwrap_or_else(|| panic!("{ev:#}"));
    assert_eq!(x79["pci_bus_id"], "00000000:C1:00.0");
    assert_eq!(x79["source"], "kmsg");
    assert_eq!(x79["pid"], 1234);
    assert_eq!(x79["info"]["severity"], "critical");
    assert_eq!(x79["info"]["runbook"], "gpu-fell-off-bus");
    assert!(x79["info"]["action"]
        .as_str()
        .unwrap()
        .contains("power-cycle"));
    // The fixture's GPU 5 is lost: one gpu_lost event.
    let lost: Vec<_> = events.iter().filter(|e| e["type"] == "gpu_lost").collect();
    assert_eq!(lost.len(), 1, "{ev:#}");
    assert_eq!(lost[0]["pci_bus_id"], "00000000:AB:00.0");
    assert!(m.contains("gpu_up{gpu=\"5\",uuid=\"GPU-bf6b5d8a-6e7c-4a0f-8bcd-5c6d7e8f9aa5\",name=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:AB:00.0\"} 0"));
    assert!(m.contains("gpu_errors_total{gpu=\"5\",uuid=\"GPU-bf6b5d8a-6e7c-4a0f-8bcd-5c6d7e8f9aa5\",name=\"NVIDIA H100 80GB HBM3\",pci_bus_id=\"00000000:AB:00.0\",type=\"fell_off_bus\"} 1"));
}
