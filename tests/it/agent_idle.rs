//! What the agent costs a node between scrapes: its background threads wake
//! only when there is something to do. Each wake-up of a sleeping thread
//! costs about 70-130 µs of CPU on a 2-core VM, more than the work it does;
//! before these tests the kernel-log watcher woke twice a second and the
//! CPU sampler once a second, about 270 µs of CPU a second on an idle node.
//! Counted here as each thread's voluntary context switches
//! (`/proc/<pid>/task/<tid>/status`): one per sleep.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{free_port, gpuops, http_get, wait_listening, Proc};

/// The agent on this host's real /proc and /sys (so CPU time moves), with
/// `kmsg` as its kernel log and `toml` as its configuration.
fn agent(dir: &Path, kmsg: &Path, toml: &str) -> (Proc, u16) {
    let config = dir.join("agent.toml");
    std::fs::write(&config, toml).unwrap();
    let port = free_port();
    let child = Command::new(gpuops())
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--config")
        .arg(&config)
        .arg("--kmsg")
        .arg(kmsg)
        .current_dir(dir)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .env("GPUOPS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let p = Proc(child);
    wait_listening(&format!("127.0.0.1:{port}"), "agent");
    (p, port)
}

/// Voluntary context switches of the process's thread named `name` (its
/// first 15 bytes, as the kernel keeps it).
fn wakes(pid: u32, name: &str) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == &name[..name.len().min(15)] {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap();
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap();
        }
    }
    panic!("no thread {name} in process {pid}");
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Regression: the watcher read /dev/kmsg every 500 ms whether or not the
/// kernel had logged anything. It now sleeps in poll(2) until a record
/// comes, and a record still reaches `/v1/events` at once.
#[test]
fn kernel_log_watcher_sleeps_until_a_record_comes() {
    let d = tempfile::tempdir().unwrap();
    // A FIFO stands in for /dev/kmsg: a character-device-like source that
    // poll(2) reports readable only when a record was written.
    let kmsg = d.path().join("kmsg");
    mkfifo(&kmsg);
    let (agent, port) = agent(d.path(), &kmsg, "[collectors]\ngpu = false\n");
    // The writer end, opened once the agent reads (keeps the FIFO from
    // reporting a hang-up).
    let mut writer = std::fs::OpenOptions::new().write(true).open(&kmsg).unwrap();
    let pid = agent.0.id();
    std::thread::sleep(Duration::from_millis(500));
    let before = wakes(pid, "gpuops-kmsg");
    std::thread::sleep(Duration::from_secs(3));
    let idle = wakes(pid, "gpuops-kmsg") - before;
    assert!(
        idle <= 1,
        "the kernel-log watcher woke {idle} times in 3 s with nothing logged (was 6)"
    );

    // Stamped now (microseconds since boot), as the kernel would.
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let usec = (uptime * 1e6) as u64;
    writer
        .write_all(format!("3,9,{usec},-;Out of memory: Killed process 4242 (idle-test) total-vm:10kB, anon-rss:5kB, file-rss:0kB\n").as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, events) = http_get(port, "/v1/events").unwrap();
        if events.contains("idle-test") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record did not reach /v1/events: {events}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Regression: the CPU sampler read /proc/stat every sample interval
/// whether or not anyone scraped. With scrapes further apart than the
/// window it now reads about once a scrape (a window before the next
/// one), and every scrape still gets `cpu_utilization_percent`.
#[test]
fn cpu_sampler_reads_about_once_a_scrape() {
    let d = tempfile::tempdir().unwrap();
    let kmsg = d.path().join("kmsg");
    std::fs::write(&kmsg, "").unwrap();
    // Scaled down from 15 s scrapes, a 10 s window and 1 s samples, so that
    // the test takes seconds: a regular sampler would read 5 times a second.
    let (agent, port) = agent(
        d.path(),
        &kmsg,
        "[collectors]\ngpu = false\n[cpu]\nsample_interval_secs = 0.2\nutilization_window_secs = 1.0\n",
    );
    let pid = agent.0.id();
    let scrape = || {
        let (_, body) = http_get(port, "/metrics").unwrap();
        assert!(
            body.lines()
                .any(|l| l.starts_with("cpu_utilization_percent ")),
            "no cpu_utilization_percent in a scrape"
        );
    };
    // Warm-up: two scrapes to learn the interval (the sampler reads
    // regularly until then), then scrapes every 1.5 s.
    let step = Duration::from_millis(1500);
    for _ in 0..3 {
        std::thread::sleep(step);
        scrape();
    }
    let before = wakes(pid, "gpuops-cpu-sampler");
    let scrapes = 5;
    for _ in 0..scrapes {
        std::thread::sleep(step);
        scrape();
    }
    let reads = wakes(pid, "gpuops-cpu-sampler") - before;
    // One read a scrape and one look at its plan besides, with room for a
    // scrape made late by a loaded machine (the sampler reads every 0.2 s
    // while one is overdue); a regular sampler: 37 in these 7.5 s.
    assert!(
        reads <= 3 * scrapes,
        "the cpu sampler woke {reads} times over {scrapes} scrapes 1.5 s apart"
    );
}
