//! Bounded loopback load test of the real binary, in each role: with 2,000
//! idle and 500 slow (1 byte/s) connections open, `/metrics` and `/healthz`
//! keep answering within 100 ms, and the server's open file descriptors stay
//! bounded. The role starts with a soft open-file limit of 1,024 (systemd's
//! default), as in the finding where 1,100 idle connections starved the agent.
//! One client holding more idle connections than the server has slots
//! (reopening each as it is cut) cannot keep a scrape out either: the server
//! closes the oldest idle connection to admit a new one (issue 20, finding 9).
#![allow(clippy::disallowed_methods)] // integration tests spawn the real binary

use crate::support::free_port;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const IDLE: usize = 2000;
const SLOW: usize = 500;
const BUDGET: Duration = Duration::from_millis(100);

struct Server {
    child: std::process::Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `gpuops ARGS` with the soft open-file limit at 1,024 (the hard limit
/// stays as it is), in `dir`.
fn spawn(dir: &Path, args: &[String]) -> std::process::Child {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -Sn 1024 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_gpuops"))
        .args(args)
        .current_dir(dir)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .env_remove("GPUOPS_BOT_CONFIG")
        .env("GPUOPS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.spawn().unwrap()
}

fn agent(dir: &Path) -> Server {
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host/full");
    let toml = dir.join("agent.toml");
    std::fs::write(&toml, "[collectors]\ngpu = false\n").unwrap();
    let port = free_port();
    let p = |s: &str| host.join(s).display().to_string();
    let args: Vec<String> = vec![
        "agent".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--config".into(),
        toml.display().to_string(),
        "--procfs".into(),
        p("proc"),
        "--sysfs".into(),
        p("sys"),
        "--rootfs".into(),
        p("root"),
        "--kmsg".into(),
        dir.join("kmsg").display().to_string(),
    ];
    std::fs::write(dir.join("kmsg"), "").unwrap();
    Server {
        child: spawn(dir, &args),
        port,
    }
}

fn bot(dir: &Path) -> Server {
    let port = free_port();
    let toml = dir.join("bot.toml");
    std::fs::write(
        &toml,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\npath = \"{}\"\n",
            dir.join("bot.db").display()
        ),
    )
    .unwrap();
    let args = vec!["bot".into(), "--config".into(), toml.display().to_string()];
    Server {
        child: spawn(dir, &args),
        port,
    }
}

/// One GET on a fresh connection; the time until the whole answer is in.
async fn get(port: u16, path: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| format!("{path}: no answer in 5 s"))?
        .map_err(|e| format!("{path}: {e}"))?;
    let took = started.elapsed();
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "{path}: {}",
            String::from_utf8_lossy(&buf[..buf.len().min(200)])
        ));
    }
    Ok(took)
}

/// The body of one GET (empty on any error).
async fn get_body(port: u16, path: &str) -> String {
    let io = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn soft_nofile(pid: u32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

async fn wait_up(port: u16) {
    let until = Instant::now() + Duration::from_secs(30);
    while get(port, "/healthz").await.is_err() {
        assert!(Instant::now() < until, "server on {port} never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens the connections, scrapes for a few seconds, and checks the budget.
async fn check_not_starved(role: &str, server: &Server) {
    let port = server.port;
    let pid = server.child.id();
    wait_up(port).await;
    let soft = soft_nofile(pid);
    assert!(
        soft.is_some_and(|s| s > 1024),
        "{role}: the soft open-file limit was not raised: {soft:?}"
    );
    let baseline = open_fds(pid);

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        slow.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // 1 byte per second on each slow connection, for as long as the test runs.
    let head = b"GET /metrics HTTP/1.1\r\nHost: slow.example\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let trickle = tokio::spawn(async move {
        for b in head.iter().cycle() {
            for s in &mut slow {
                let _ = s.try_write(&[*b]);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    // Until the server holds them all (or 5 s).
    let until = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) < baseline + IDLE + SLOW && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = open_fds(pid);

    let mut times = Vec::new();
    let mut errors = Vec::new();
    let mut max_fds = held;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..40 {
        tick.tick().await;
        let path = if i % 2 == 0 { "/metrics" } else { "/healthz" };
        match get(port, path).await {
            Ok(t) => times.push(t),
            Err(e) => errors.push(e),
        }
        max_fds = max_fds.max(open_fds(pid));
    }
    trickle.abort();
    drop(idle);

    times.sort();
    let max = times.last().copied().unwrap_or_default();
    let median = times.get(times.len() / 2).copied().unwrap_or_default();
    eprintln!(
        "{role}: {} scrapes with {IDLE} idle + {SLOW} slow connections open: median {median:?}, max {max:?}; \
         fds: {baseline} before, {held} with the connections, {max_fds} at most; soft limit {soft:?}",
        times.len()
    );
    assert!(errors.is_empty(), "{role}: failed scrapes: {errors:?}");
    assert!(
        max <= BUDGET,
        "{role}: slowest scrape {max:?} > {BUDGET:?} (median {median:?})"
    );
    assert!(
        held >= baseline + IDLE + SLOW - 50,
        "{role}: the server did not hold the connections ({held} fds, {baseline} before)"
    );
    assert!(
        max_fds <= baseline + IDLE + SLOW + 64,
        "{role}: {max_fds} fds open, expected at most {} (+64)",
        baseline + IDLE + SLOW
    );
}

fn dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_starve_metrics() {
    let (_agent_dir, a) = dir();
    let server = agent(&a);
    check_not_starved("agent", &server).await;
    drop(server);

    let (_bot_dir, b) = dir();
    let server = bot(&b);
    check_not_starved("bot", &server).await;
}

/// One client (127.0.0.1, like the probes) holds `hold` idle connections to
/// `port`, reopening each one the server closes, while `/metrics` is probed
/// 20 times on fresh connections; each probe must answer within 1 s.
async fn probe_while_one_client_holds(what: &str, server: &Server, hold: usize) {
    let port = server.port;
    let pid = server.child.id();
    wait_up(port).await;
    let mut held = Vec::with_capacity(hold);
    for _ in 0..hold {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("{what}: connect failed: {e}"),
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reopened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let attacker = {
        let (stop, reopened) = (stop.clone(), reopened.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in held.iter_mut() {
                    // Closed by the server (0 bytes or an error): reopen.
                    let closed = match s.try_read(&mut buf) {
                        Ok(n) => n == 0,
                        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                    };
                    if closed {
                        if let Ok(new) = TcpStream::connect(("127.0.0.1", port)).await {
                            *s = new;
                            reopened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            held.len()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds = open_fds(pid);
    let mut times = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        match tokio::time::timeout(Duration::from_secs(1), get(port, "/metrics")).await {
            Ok(Ok(t)) => times.push(t),
            Ok(Err(e)) => errors.push(format!("{e} after {:?}", started.elapsed())),
            Err(_) => errors.push("no answer within 1 s".to_string()),
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let holding = attacker.await.unwrap();
    let metrics = get_body(port, "/metrics").await;
    let counter = |name: &str| {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let evicted = counter("gpuops_http_connections_evicted_total");
    let refused = counter("gpuops_http_connections_refused_total");
    let accept_errors = counter("gpuops_http_accept_errors_total");
    times.sort();
    eprintln!(
        "{what}: one client holding {holding} idle connections (reopened {} as they were cut; server fds {fds}): \
         {} of 20 /metrics probes answered, median {:?}, max {:?}; {evicted} connections evicted, \
         {refused} refused, {accept_errors} accept errors; errors {errors:?}",
        reopened.load(std::sync::atomic::Ordering::Relaxed),
        times.len(),
        times.get(times.len() / 2).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default(),
    );
    assert!(errors.is_empty(), "{what}: probes failed: {errors:?}");
    assert!(
        times.iter().all(|t| *t < Duration::from_secs(1)),
        "{what}: {times:?}"
    );
    assert!(evicted > 0.0, "{what}: nothing was evicted");
    // Every connection here was idle, so each new one had one to evict:
    // a refusal is a scrape that could have been refused (CI of
    // 2026-12-03: 235-777 refusals a run, one of them a probe, while
    // evicted connections were still closing).
    assert_eq!(
        refused, 0.0,
        "{what}: connections refused with idle ones to evict"
    );
}

/// Finding 9 (issue 20): one client holding 4,096 idle connections made
/// the agent refuse 24 of 24 `/metrics` probes over 25 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holding_4100_idle_connections_does_not_starve_metrics() {
    let (_d, dir) = dir();
    let server = agent(&dir);
    probe_while_one_client_holds("agent, max_connections 4096", &server, 4100).await;
}

/// Finding 9 (issue 20): under a hard `ulimit -n 1024`, 1,100 idle
/// connections did the same (the cap is the open-file limit minus 128).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_under_a_hard_1024_fd_limit_do_not_starve_metrics() {
    let (_d, dir) = dir();
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host/full");
    let toml = dir.join("agent.toml");
    std::fs::write(&toml, "[collectors]\ngpu = false\n").unwrap();
    std::fs::write(dir.join("kmsg"), "").unwrap();
    let port = free_port();
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 1024 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_gpuops"))
        .arg("agent")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(&toml)
        .arg("--procfs")
        .arg(host.join("proc"))
        .arg("--sysfs")
        .arg(host.join("sys"))
        .arg("--rootfs")
        .arg(host.join("root"))
        .arg("--kmsg")
        .arg(dir.join("kmsg"))
        .current_dir(&dir)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .env("GPUOPS_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let server = Server { child, port };
    wait_up(port).await;
    assert_eq!(soft_nofile(server.child.id()), Some(1024));
    probe_while_one_client_holds("agent, hard ulimit -n 1024", &server, 1100).await;
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_errors_back_off_and_idle_connections_are_reaped() {
    let (_d, dir) = dir();
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host/full");
    let toml = dir.join("agent.toml");
    std::fs::write(
        &toml,
        "[collectors]\ngpu = false\n[web]\nheader_timeout_secs = 1.0\n",
    )
    .unwrap();
    std::fs::write(dir.join("kmsg"), "").unwrap();
    let port = free_port();
    // A hard limit of 24 open files: with the agent's own dozen, the idle
    // connections below exhaust it before the connection cap (16) is reached.
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 24 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_gpuops"))
        .arg("agent")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--config")
        .arg(&toml)
        .arg("--procfs")
        .arg(host.join("proc"))
        .arg("--sysfs")
        .arg(host.join("sys"))
        .arg("--rootfs")
        .arg(host.join("root"))
        .arg("--kmsg")
        .arg(dir.join("kmsg"))
        .current_dir(&dir)
        .env_remove("GPUOPS_AGENT_CONFIG")
        .env("GPUOPS_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child, port };
    let pid = server.child.id();
    wait_up(port).await;

    let mut idle = Vec::new();
    for _ in 0..40 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)).await {
            idle.push(s);
        }
    }
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    // The server answers again once the silent connections are cut off
    // (header timeout 1 s), while the attacker keeps its sockets open.
    let mut answered = None;
    while started.elapsed() < Duration::from_secs(20) {
        if get(port, "/healthz").await.is_ok() {
            answered = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let wall = started.elapsed().as_secs_f64();
    let metrics = get_body(port, "/metrics").await;
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let accept_errors = counter("gpuops_http_accept_errors_total ");
    let header_timeouts = counter("gpuops_http_timeouts_total{timeout=\"header\"} ");
    eprintln!(
        "fd limit 24, {} idle connections: /healthz answered after {answered:?}; agent used {cpu:.2} s CPU in {wall:.1} s; {} fds open; \
         accept errors {accept_errors}, header timeouts {header_timeouts}",
        idle.len(),
        open_fds(pid)
    );
    assert!(accept_errors > 0.0, "the test did not exhaust the fd limit");
    assert!(header_timeouts > 0.0, "{metrics}");
    assert!(answered.is_some(), "the agent never answered again");
    assert!(
        cpu < 0.5 * wall,
        "the agent used {cpu:.2} s of CPU in {wall:.1} s: accept errors spin"
    );
    assert!(open_fds(pid) <= 24);
    drop(idle);
}
