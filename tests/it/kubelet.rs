//! The agent with the kubelet's pod-resources API: `gpuops agent` (the fake
//! 8-GPU backend, GPU 0 in MIG mode) against a fake kubelet
//! (`tests/fixtures/kubelet/fake_kubelet.py`, Python's grpcio: a gRPC
//! implementation other than ours) exports each allocation as
//! `gpu_pod_info`, names the pod on `gpu_workload_*` where that cannot be
//! wrong, and keeps answering `/metrics` at its usual speed, with every
//! other series, while the kubelet errs, hangs, closes the socket, answers
//! 6 MB or stops.
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary and the fake kubelet

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, gpuops, wait_listening, Proc};

const NEEDS: &str = "needs python3-grpcio: run by .ci/run";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fake kubelet serving `scenario` on `socket`, once it says "ready".
fn fake_kubelet(socket: &Path, scenario: &str) -> Proc {
    let mut child = Command::new("/usr/bin/python3")
        .arg(fixtures().join("kubelet/fake_kubelet.py"))
        .arg(socket)
        .arg(scenario)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("/usr/bin/python3");
    let stdout = child.stdout.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line == "ready" {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the fake kubelet ({scenario}) did not start: {NEEDS}"));
    proc
}

struct Agent {
    _proc: Proc,
    addr: String,
    log: PathBuf,
}

impl Agent {
    /// `gpuops agent` on the 8-GPU fixture, host collectors off, with
    /// `[kubernetes]` `kubernetes` (TOML lines).
    fn start(dir: &Path, kubernetes: &str) -> Agent {
        let f = fixtures();
        let cfg = dir.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "[collectors]\ncpu = false\nmemory = false\noom = false\nstorage = false\n\
                 [paths]\nprocfs = {:?}\nrootfs = {:?}\nkmsg = {:?}\n\
                 [gpu]\nbackend = \"fake\"\nfake_fixture = {:?}\ngpm = false\n\
                 [kubernetes]\n{kubernetes}\n",
                f.join("gpu/proc"),
                f.join("gpu/root"),
                dir.join("kmsg"),
                f.join("kubelet/gpus8.json"),
            ),
        )
        .unwrap();
        std::fs::write(dir.join("kmsg"), "").unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("agent.log");
        let child = Command::new(gpuops())
            .args(["agent", "--config"])
            .arg(&cfg)
            .args(["--listen", &addr])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let agent = Agent {
            _proc: Proc(child),
            addr,
            log,
        };
        wait_listening(&agent.addr, "gpuops agent");
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` and how long it took.
    fn scrape(&self) -> (String, Duration) {
        let started = Instant::now();
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let took = started.elapsed();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        (body.to_string(), took)
    }

    /// Scrapes until `ready` holds (up to 20 s).
    fn scrape_until(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let (m, _) = self.scrape();
            if ready(&m) {
                return m;
            }
            assert!(Instant::now() < until, "{what}:\n{m}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn value<'a>(m: &'a str, series: &str) -> Option<&'a str> {
    m.lines()
        .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
        .and_then(|l| l.rsplit(' ').next())
}

fn pod_info(m: &str) -> Vec<&str> {
    m.lines()
        .filter(|l| l.starts_with("gpu_pod_info{"))
        .collect()
}

const H100: &str = "name=\"NVIDIA H100 80GB HBM3\"";

/// The `gpu_pod_info` series of the `gpus` scenario (and of `big`).
fn expected_pod_info() -> Vec<String> {
    let gpu = |i: u32, uuid: &str, bus: &str| {
        format!("gpu=\"{i}\",uuid=\"{uuid}\",{H100},pci_bus_id=\"00000000:{bus}:00.0\"")
    };
    let g0 = gpu(0, "GPU-6a1c0e3b-1f2d-4b5a-9c7e-0d1e2f3a4b50", "18");
    let g1 = gpu(1, "GPU-7b2d1f4c-2a3e-4c6b-8d8f-1e2f3a4b5c61", "2A");
    let g2 = gpu(2, "GPU-8c3e2a5d-3b4f-4d7c-9e9a-2f3a4b5c6d72", "3A");
    let g3 = gpu(3, "GPU-9d4f3b6e-4c5a-4e8d-8fab-3a4b5c6d7e83", "5D");
    let g5 = gpu(5, "GPU-bf6b5d8a-6e7c-4a0f-8bcd-5c6d7e8f9aa5", "AB");
    vec![
        format!("gpu_pod_info{{{g5},namespace=\"batch\",pod=\"render-0\",container=\"worker\",resource=\"nvidia.com/gpu\"}} 1"),
        format!("gpu_pod_info{{{g3},namespace=\"inference\",pod=\"chat-a\",container=\"server\",resource=\"nvidia.com/gpu\",replica=\"0\"}} 1"),
        format!("gpu_pod_info{{{g3},namespace=\"inference\",pod=\"chat-b\",container=\"server\",resource=\"nvidia.com/gpu\",replica=\"1\"}} 1"),
        format!("gpu_pod_info{{{g0},gpu_instance_id=\"1\",compute_instance_id=\"0\",mig_profile=\"3g.40gb\",namespace=\"research\",pod=\"notebook-1\",container=\"jupyter\",resource=\"nvidia.com/mig-3g.40gb\"}} 1"),
        format!("gpu_pod_info{{{g0},gpu_instance_id=\"13\",compute_instance_id=\"0\",mig_profile=\"1g.10gb\",namespace=\"research\",pod=\"notebook-2\",container=\"jupyter\",resource=\"nvidia.com/mig-1g.10gb\"}} 1"),
        format!("gpu_pod_info{{{g1},namespace=\"training\",pod=\"llama-ft-7b-0\",container=\"trainer\",resource=\"nvidia.com/gpu\"}} 1"),
        format!("gpu_pod_info{{{g2},namespace=\"training\",pod=\"llama-ft-7b-0\",container=\"trainer\",resource=\"nvidia.com/gpu\"}} 1"),
    ]
}

/// Every GPU series is there whatever the kubelet does.
fn assert_gpu_series(m: &str) {
    assert_eq!(
        value(m, "gpuops_collector_success{collector=\"gpu\"}"),
        Some("1"),
        "{m}"
    );
    assert_eq!(value(m, "gpu_devices"), Some("8"), "{m}");
    assert_eq!(
        m.lines().filter(|l| l.starts_with("gpu_up{")).count(),
        8,
        "{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with("gpu_memory_used_bytes{")),
        "{m}"
    );
    assert!(
        m.lines().any(|l| l.starts_with("gpu_workload_processes{")),
        "{m}"
    );
    assert_eq!(
        value(m, "gpuops_collector_success{collector=\"kmsg\"}"),
        Some("1"),
        "{m}"
    );
}

const SUCCESS: &str = "gpuops_collector_success{collector=\"pod_resources\"}";

/// A scrape of the fake backend alone is a few milliseconds; a second is
/// far above it and far below the kubelet call's 5 s deadline.
const USUAL: Duration = Duration::from_secs(1);

fn named_workload_line(gpu: &str) -> String {
    format!("gpu_workload_processes{{gpu=\"{gpu}\",")
}

/// `promtool check metrics` on an exposition: its output (empty when clean).
fn promtool(text: &str) -> String {
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
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
#[ignore = "needs python3-grpcio and promtool: run by .ci/run"]
fn pod_info_for_gpu_uuids_replicas_mig_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kubelet.sock");
    let _kubelet = fake_kubelet(&sock, "gpus");
    let agent = Agent::start(dir.path(), &format!("pod_resources_socket = {sock:?}"));
    let m = agent.scrape_until("pod names", |m| value(m, SUCCESS) == Some("1"));
    assert_eq!(pod_info(&m), expected_pod_info(), "{m}");
    assert!(
        !m.contains("example.com/nic") && !m.contains("coredns"),
        "{m}"
    );
    assert_eq!(value(&m, "gpuops_pod_resources_allocations"), Some("7"));
    assert!(value(&m, "gpuops_pod_resources_age_seconds").is_some());
    assert_gpu_series(&m);
    assert_eq!(promtool(&m).trim(), "", "promtool check metrics");
    // GPU 1 is held by one pod, and one pod's process runs on it: named.
    let gpu1 = m
        .lines()
        .find(|l| l.starts_with(&named_workload_line("1")))
        .unwrap();
    assert!(
        gpu1.contains("workload=\"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\",user=\"\",container=\"trainer\",namespace=\"training\",pod=\"llama-ft-7b-0\"}"),
        "{gpu1}"
    );
    // GPU 3 is shared by two pods (replicas): which is which cannot be told, the uid stays.
    let gpu3 = m
        .lines()
        .find(|l| l.starts_with(&named_workload_line("3")))
        .unwrap();
    assert!(
        gpu3.ends_with("workload=\"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0\",user=\"\",container=\"containerd:b2c3d4e5f607\"} 1"),
        "{gpu3}"
    );
}

#[test]
#[ignore = "needs python3-grpcio: run by .ci/run"]
fn pod_resources_answer_of_6_mb_is_read_off_the_scrape_path() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kubelet.sock");
    let _kubelet = fake_kubelet(&sock, "big");
    let agent = Agent::start(dir.path(), &format!("pod_resources_socket = {sock:?}"));
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let (m, took) = agent.scrape();
        slowest = slowest.max(took);
        if value(&m, SUCCESS) == Some("1") {
            break m;
        }
        assert!(Instant::now() < until, "{m}\n{}", agent.log());
    };
    assert_eq!(pod_info(&m), expected_pod_info(), "{m}");
    assert_gpu_series(&m);
    for _ in 0..5 {
        slowest = slowest.max(agent.scrape().1);
    }
    assert!(slowest < USUAL, "a scrape took {slowest:?}");
}

/// The kubelet answers with an error, a hang or a closed socket: the
/// collector fails with the reason, no pod names, every GPU series there.
fn kubelet_fails(scenario: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kubelet.sock");
    let _kubelet = fake_kubelet(&sock, scenario);
    let agent = Agent::start(
        dir.path(),
        &format!("pod_resources_socket = {sock:?}\nrefresh_interval_secs = 1"),
    );
    let until = Instant::now() + Duration::from_secs(20);
    let mut scrapes = 0;
    loop {
        let (m, took) = agent.scrape();
        scrapes += 1;
        assert!(took < USUAL, "{scenario}: a scrape took {took:?}");
        assert_eq!(value(&m, SUCCESS), Some("0"), "{scenario}:\n{m}");
        assert!(pod_info(&m).is_empty(), "{m}");
        assert_eq!(value(&m, "gpuops_pod_resources_allocations"), Some("0"));
        assert!(value(&m, "gpuops_pod_resources_age_seconds").is_none());
        if m.lines().any(|l| l.starts_with("gpu_up{")) {
            assert_gpu_series(&m);
        }
        if agent.log().contains(reason) && scrapes > 3 {
            assert_gpu_series(&m);
            break;
        }
        assert!(
            Instant::now() < until,
            "{scenario}: no {reason:?} in\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs python3-grpcio: run by .ci/run"]
fn kubelet_trailers_only_error_keeps_every_other_series() {
    kubelet_fails(
        "unavailable",
        "gRPC error UNAVAILABLE (14): kubelet is restarting",
    );
}

#[test]
#[ignore = "needs python3-grpcio: run by .ci/run"]
fn kubelet_hang_never_delays_the_scrape() {
    kubelet_fails("hang", "within 5s");
}

#[test]
#[ignore = "needs python3-grpcio: run by .ci/run"]
fn kubelet_answer_over_16_mib_is_refused() {
    kubelet_fails("huge", "over the 16 MiB limit, refused");
}

#[test]
#[ignore = "needs python3-grpcio: run by .ci/run"]
fn kubelet_closed_socket_is_a_collector_failure() {
    // hyper reports the closed connection at the handshake or at the
    // request, as the close races its preface: both name the socket.
    kubelet_fails("closed", "kubelet.sock failed: ");
}

#[test]
#[ignore = "needs python3-grpcio: run by .ci/run"]
fn kubelet_stopping_keeps_pod_names_for_six_intervals_then_drops_them() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("kubelet.sock");
    let kubelet = fake_kubelet(&sock, "gpus");
    let agent = Agent::start(
        dir.path(),
        &format!("pod_resources_socket = {sock:?}\nrefresh_interval_secs = 0.5"),
    );
    agent.scrape_until("pod names", |m| value(m, SUCCESS) == Some("1"));
    drop(kubelet);
    let stopped = Instant::now();
    let m = agent.scrape_until("the failure", |m| value(m, SUCCESS) == Some("0"));
    if stopped.elapsed() < Duration::from_secs(2) {
        assert_eq!(pod_info(&m).len(), 7, "kept while young:\n{m}");
    }
    // Six intervals (3 s) after the last answer: dropped, the uid stays.
    let m = agent.scrape_until("the mapping dropped", |m| pod_info(m).is_empty());
    assert!(
        stopped.elapsed() >= Duration::from_millis(2000),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(value(&m, "gpuops_pod_resources_allocations"), Some("0"));
    let age: f64 = value(&m, "gpuops_pod_resources_age_seconds")
        .unwrap()
        .parse()
        .unwrap();
    assert!(age >= 2.5, "{age}");
    assert!(!m.contains("namespace=\"training\""), "{m}");
    assert_gpu_series(&m);
}

#[test]
fn kubernetes_enabled_without_socket_is_a_collector_failure() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("missing.sock");
    let agent = Agent::start(
        dir.path(),
        &format!("enabled = true\npod_resources_socket = {sock:?}"),
    );
    let m = agent.scrape_until("the failure", |m| {
        agent.log().contains("cannot connect") && m.contains(SUCCESS)
    });
    assert_eq!(value(&m, SUCCESS), Some("0"), "{m}");
    assert!(pod_info(&m).is_empty());
    assert_gpu_series(&m);
}

#[test]
fn kubernetes_auto_without_socket_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("missing.sock");
    let agent = Agent::start(dir.path(), &format!("pod_resources_socket = {sock:?}"));
    let m = agent.scrape_until("the gpu series", |m| m.contains("gpu_up{"));
    assert!(!m.contains("pod_resources"), "{m}");
    assert_gpu_series(&m);
}
